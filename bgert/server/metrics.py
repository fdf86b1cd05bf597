"""Prometheus metrics of ``bgert serve`` (the ones TEI exports), in a registry of the app's own."""
from __future__ import annotations

from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
TOKEN_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)


class Metrics:
    """Request counts and latency per model and endpoint; queue size; batch size, batch tokens,
    tokenisation, queue wait and inference time per model."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("bgert_requests", "HTTP requests by model, endpoint and status",
                                ["model", "endpoint", "status"], registry=r)
        self.latency = Histogram("bgert_request_duration_seconds", "HTTP request latency",
                                 ["model", "endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("bgert_requests_in_flight", "HTTP requests being answered (not /metrics)",
                               registry=r)
        self.queue_size = Gauge("bgert_queue_size", "items waiting in the model's queue", ["model"], registry=r)
        self.observed: dict[str, Histogram] = {
            "batch_items": Histogram("bgert_batch_size", "items per batch run", ["model"],
                                     buckets=SIZE_BUCKETS, registry=r),
            "batch_requests": Histogram("bgert_batch_requests", "requests per batch run", ["model"],
                                        buckets=SIZE_BUCKETS, registry=r),
            "batch_tokens": Histogram("bgert_batch_tokens", "padded tokens per batch run", ["model"],
                                      buckets=TOKEN_BUCKETS, registry=r),
            "tokenize_seconds": Histogram("bgert_tokenization_seconds", "time to check and tokenise a request",
                                          ["model"], buckets=LATENCY_BUCKETS, registry=r),
            "queue_seconds": Histogram("bgert_queue_seconds", "time a request waited in the queue",
                                       ["model"], buckets=LATENCY_BUCKETS, registry=r),
            "inference_seconds": Histogram("bgert_inference_seconds", "time of one batch run",
                                           ["model"], buckets=LATENCY_BUCKETS, registry=r),
        }

    def observer(self, model: str) -> Callable[[str, float], None]:
        """The queue's ``observe`` hook for ``model``."""
        children = {k: h.labels(model=model) for k, h in self.observed.items()}

        def observe(name: str, value: float) -> None:
            h = children.get(name)
            if h is not None:
                h.observe(value)

        return observe

    def request(self, model: str, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(model=model, endpoint=endpoint, status=str(status)).inc()
        self.latency.labels(model=model, endpoint=endpoint).observe(seconds)

    def render(self, queues: dict[str, Any]) -> bytes:
        """The text exposition, with the queue sizes read now."""
        for name, q in queues.items():
            self.queue_size.labels(model=name).set(q.queued_items)
        return generate_latest(self.registry)
