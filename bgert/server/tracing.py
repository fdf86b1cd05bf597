"""OpenTelemetry traces of ``bgert serve``, exported over OTLP/HTTP (protobuf), as TEI exports them.

On with ``--otlp-endpoint URL`` (spans go to ``URL/v1/traces``) or the standard environment
(``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``, a full URL, or ``OTEL_EXPORTER_OTLP_ENDPOINT``, a base URL);
``--otlp-service-name`` (else ``OTEL_SERVICE_NAME``, else "bgert") names the service. Off otherwise,
and then free: opentelemetry is not even imported (it comes with the ``otel`` extra).

Each HTTP request is one span (``POST /v1/embeddings``, kind SERVER) with a child per step of its
run through the model: ``tokenize`` (check and tokenise, in the tokeniser pool), ``queue_wait``
(queued until its batch starts) and ``inference`` (the batch's graph run). Attributes: ``bgert.model``,
``bgert.inputs`` and ``bgert.token_count`` (real tokens of the request), ``bgert.batch_size`` (items of
the batch it ran in), ``bgert.batch_requests`` and ``bgert.batch_tokens`` (padded), and the HTTP
method, route and status.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

#: span names of the steps of a request
STEPS = ("tokenize", "queue_wait", "inference")


def traces_endpoint(endpoint: str | None) -> str | None:
    """Where spans go: ``endpoint`` + /v1/traces, else the standard environment's, else None (off)."""
    if endpoint:
        return endpoint.rstrip("/") + "/v1/traces"
    full = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    if full:
        return full
    base = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    return base.rstrip("/") + "/v1/traces" if base else None


class Tracing:
    """A tracer provider exporting to one OTLP/HTTP endpoint in batches."""

    def __init__(self, endpoint: str, service_name: str):
        try:
            from opentelemetry import trace
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError as e:
            raise RuntimeError(f"--otlp-endpoint needs the otel extra ({e}); pip install 'bgert[otel]'") from e
        self.endpoint = endpoint
        self._trace = trace
        self.provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        self.tracer = self.provider.get_tracer("bgert.server")

    @contextlib.contextmanager
    def request(self, method: str, path: str) -> Iterator[Any]:
        """The span of one HTTP request, current while it is answered (``annotate`` and ``step`` find it)."""
        attrs = {"http.request.method": method, "url.path": path, "http.route": path}
        with self.tracer.start_as_current_span(f"{method} {path}", kind=self._trace.SpanKind.SERVER,
                                               attributes=attrs, record_exception=False,
                                               set_status_on_exception=False) as span:
            yield span

    def finish(self, span: Any, status: int) -> None:
        """Set the HTTP status of a request's span (an error status from 500 on)."""
        span.set_attribute("http.response.status_code", status)
        if status >= 500:
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR))

    def annotate(self, **attrs: Any) -> None:
        """Attributes on the current request's span."""
        self._trace.get_current_span().set_attributes({f"bgert.{k}": v for k, v in attrs.items()})

    def step(self, name: str, start_ns: int, end_ns: int, **attrs: Any) -> None:
        """A finished child span of the current request's span, from ``start_ns`` to ``end_ns`` (epoch ns)."""
        span = self.tracer.start_span(name, start_time=start_ns,
                                      attributes={f"bgert.{k}": v for k, v in attrs.items()})
        span.end(end_time=max(start_ns, end_ns))

    def close(self) -> None:
        """Export what is left and stop."""
        self.provider.shutdown()


def from_options(endpoint: str | None, service_name: str | None) -> Tracing | None:
    """The server's tracing, or None where no endpoint is configured (then nothing is imported)."""
    url = traces_endpoint(endpoint)
    if url is None:
        return None
    return Tracing(url, service_name or os.environ.get("OTEL_SERVICE_NAME") or "bgert")
