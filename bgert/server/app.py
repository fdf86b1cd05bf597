"""The FastAPI app of ``bgert serve``: OpenAI, TEI and Cohere/Jina routes over each model's
token-counted queue (bgert.runtime.token_queue), plus bgert's own M3 route and /metrics. The Cohere
routes (v1 and v2) live in bgert.server.cohere, output types in bgert.server.output_types, tracing in
bgert.server.tracing, over-long input handling in bgert.server.truncation.

Every route takes the model from a ``model`` field in the body (the first artifact served answers
where it is omitted). A request is checked and tokenised in the queue's worker pool, queued with
its exact token counts, run in a batch off the event loop, and answered with its own rows. What
a model can answer follows from its runtime class (``capabilities``), never from a list of kinds.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import inspect
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import Field

from bgert.runtime import load
from bgert.runtime.request import request_methods
from bgert.runtime.token_queue import QueueClosedError, QueueFullError
from bgert.runtime.vectors import int8_ranges

from . import cohere, output_types, tracing
from .bodies import Body, Reranking
from .errors import APIError, api_of, error_bytes, validation_message
from .metrics import Metrics
from .truncation import Truncation, tei

log = logging.getLogger("bgert")

#: what a model can do, from its runtime class: dense vectors, M3 heads, pair scores, extras
CAPABILITY_ENDPOINTS = {
    "embed": ("/v1/embeddings", "/embed", "/v2/embed"),
    "sparse": ("/embed_sparse",),
    "colbert": ("/embed_all",),
    "m3": ("/m3/encode",),
    "rerank": ("/rerank", "/v1/rerank", "/v2/rerank"),
}



def capabilities(model: Any) -> frozenset[str]:
    """What ``model`` can answer, read from its runtime class: ``encode`` gives vectors (M3: those of
    its exported heads), ``compute_score`` on a class that does not embed scores pairs, and the
    extra parameters its ``compute_score`` takes (``cutoff_layers``, ``prompt``) become request fields. An
    M3 model reranks too: its ``compute_score`` value for one of its ``score_modes`` (``mode``)."""
    methods = set(request_methods(type(model)))
    heads = getattr(model, "heads", None)
    caps = set()
    if "encode" in methods:
        if heads is None or "dense" in heads:
            caps.add("embed")
        if heads is not None:
            caps.add("m3")
            caps.update(c for h, c in (("sparse", "sparse"), ("colbert", "colbert")) if h in heads)
    if "encode_ids" in methods:
        caps.add("token_ids")
    if "compute_score" in methods and heads is not None:
        caps.update(("rerank", "mode"))
    if "compute_score" in methods and "encode" not in methods:
        caps.add("rerank")
        params = inspect.signature(type(model).compute_score).parameters
        caps.update(p for p in ("cutoff_layers", "prompt") if p in params)
    return frozenset(caps)


@dataclass
class ServerOptions:
    """Limits of ``bgert serve`` (flags of the same names)."""

    max_batch_tokens: int | None = None  # None: each model's own token budget (smaller on the CPU)
    max_batch_requests: int = 256
    max_client_batch_size: int = 512
    max_request_bytes: int = 2_000_000
    max_queue_items: int = 10_000
    api_key: str | None = None
    tokenizer_workers: int | None = None
    lanes: int | None = None
    max_wait_ms: float = 0.0
    auto_truncate: bool = True
    otlp_endpoint: str | None = None
    otlp_service_name: str | None = None
    int8_calibration: str | None = None


@dataclass
class Served:
    name: str
    path: str
    model: Any = None
    caps: frozenset[str] = frozenset()
    runtime: dict[str, Any] = field(default_factory=dict)
    ready_at: float | None = None  # epoch seconds: loaded and warmed up
    load_seconds: float | None = None
    int8_ranges: dict[str, Any] | None = None  # int8/uint8 calibration (output_types), else the manifest's

    @property
    def queue(self) -> Any:
        return self.model.queue


def _on_cpu(load_kwargs: dict[str, Any]) -> bool:
    """Whether the model will run on the CPU (ORT's CPU provider, or OpenVINO): neither a GPU provider
    nor Triton was asked for."""
    from bgert.runtime.backends import provider_names, resolve_providers

    if load_kwargs.get("backend") == "triton":
        return False
    if load_kwargs.get("backend") == "openvino":
        return True
    names = provider_names(resolve_providers(load_kwargs.get("providers")))
    return all(n == "CPUExecutionProvider" for n in names)


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def lane_plan(load_kwargs: dict[str, Any], lanes: int | None) -> tuple[int, dict[str, Any]]:
    """How many lanes (queue workers) a model gets and the load arguments that go with them.

    Default: one lane on all the cores (ORT's own thread count). Measured on a 2-core Xeon with
    all-MiniLM-L6-v2 in one run (benchmarks/results/serve_bench_queries_lanes2.md), two single-threaded
    lanes served 1.05x / 1.02x the queries/s of one lane at 16 / 64 clients but answered a lone client in
    10.0 ms instead of 5.8 (p50): a run on one core is slower, and the spare core had little to do. On
    the CPU, ``--lanes N`` gives each lane cores // N threads unless ``--threads`` says; GPUs and Triton get
    the lanes asked for (default 1).
    """
    kw = dict(load_kwargs)
    lanes = lanes or 1
    if lanes > 1 and kw.get("intra_op_num_threads") is None and _on_cpu(kw):
        kw["intra_op_num_threads"] = max(1, usable_cores() // lanes)
    return lanes, kw


def runtime_info(model: Any, path: str, lanes: int) -> dict[str, Any]:
    """Which variant, backend, threads and lanes a loaded model runs, and why that variant (the runtime's
    own account, bgert.runtime.autotune.explain)."""
    from bgert.runtime.autotune import explain

    threads = model._sess_options[0] if hasattr(model, "_sess_options") else None
    try:
        why = explain(path, threads)
    except Exception as e:  # the account is informative only; never fail start-up on it
        why = f"(no account: {type(e).__name__}: {e})"
    from bgert.runtime.backends import provider_names

    return {"precision": model.precision, "backend": model.backend_name,
            "providers": provider_names(model.providers), "intra_op_threads": threads, "lanes": lanes,
            "variant_reason": why}


def describe_runtime(r: dict[str, Any]) -> str:
    """One log line from ``runtime_info``."""
    return (f"{r['backend']} {r['precision']} on {', '.join(r['providers']) or r['backend']}, {r['lanes']} lane(s) x "
            f"{r['intra_op_threads'] or 'default'} thread(s); variant: {r['variant_reason']}")


@dataclass
class ServerState:
    """The models, their load state and the metrics of one app."""

    served: list[Served]
    options: ServerOptions
    load_kwargs: dict[str, Any] = field(default_factory=dict)
    metrics: Metrics = field(default_factory=Metrics)
    ready: threading.Event = field(default_factory=threading.Event)
    error: str | None = None
    started: float = field(default_factory=time.time)
    tracing: Any = None  # bgert.server.tracing.Tracing, or None when off

    def load_all(self) -> None:
        """Load every model, start its queue and warm it up; ``ready`` is set only when all are."""
        try:
            for s in self.served:
                t = time.perf_counter()
                lanes, kw = lane_plan(self.load_kwargs, self.options.lanes)
                s.model = load(s.path, **kw)
                s.caps = capabilities(s.model)
                s.model.start_queue(max_batch_tokens=self.options.max_batch_tokens,
                                    max_batch_items=self.options.max_batch_requests,
                                    max_queue_items=self.options.max_queue_items, on_full="raise",
                                    tokenizer_workers=self.options.tokenizer_workers,
                                    observe=self.metrics.observer(s.name), lanes=lanes,
                                    max_wait_ms=self.options.max_wait_ms)
                warm_up(s)
                s.int8_ranges = int8_table(s, self.options.int8_calibration)
                s.runtime = runtime_info(s.model, s.path, lanes)
                s.load_seconds, s.ready_at = time.perf_counter() - t, time.time()
                log.warning("bgert serve: %s ready (%s, %s): %s", s.name, type(s.model).__name__,
                            ", ".join(sorted(s.caps)), describe_runtime(s.runtime))
            self.ready.set()
        except Exception as e:  # reported by /health and by the CLI, which exits 1
            self.error = f"{type(e).__name__}: {e}"
            log.error("bgert serve: loading failed: %s", self.error)

    def close(self) -> None:
        for s in self.served:
            if s.model is not None:
                s.model.close()
        if self.tracing is not None:
            self.tracing.close()

    def find(self, name: str | None, need: str | None, path: str) -> Served:
        """The model named ``name`` (the first one when None) that has capability ``need`` (any: None)."""
        if not self.ready.is_set():
            raise APIError(503, "the models are still loading; retry when /health answers 200", "Unhealthy")
        if name is None:
            s = self.served[0]
        else:
            s = next((x for x in self.served if x.name == name), None)
            if s is None:
                raise APIError(404, f"model {name!r} is not served here; served: "
                                    f"{', '.join(x.name for x in self.served)}", "NotFound", "model")
        if need is not None and need not in s.caps:
            able = [x.name for x in self.served if need in x.caps]
            raise APIError(400, f"model {s.name!r} ({type(s.model).__name__}) has no {path}; "
                                f"{'models that have it: ' + ', '.join(able) if able else 'no model served here has it'}",
                           "Validation", "model")
        return s


def warm_up(s: Served) -> None:
    """One small call through each route family, so sessions exist before /health says ready."""
    if "embed" in s.caps or "m3" in s.caps:
        s.queue.submit("encode", ["warm up"]).result()
    if "rerank" in s.caps:
        modes = {"modes": list(s.model.score_modes)} if "mode" in s.caps else {}
        s.queue.submit("compute_score", [("warm", "up")], **modes).result()


def int8_table(s: Served, calibration: str | None) -> dict[str, Any] | None:
    """The int8/uint8 ranges of an embedding model: from ``calibration``'s texts (one per line) where given,
    else the manifest's (None: not calibrated)."""
    if "embed" not in s.caps:
        return None
    if calibration is None:
        return getattr(s.model.manifest.section, "int8_ranges", None)
    with open(calibration, encoding="utf-8") as f:
        texts = [line for line in f.read().splitlines() if line.strip()]
    if not texts:
        raise ValueError(f"--int8-calibration {calibration} holds no text")
    vecs = [s.queue.submit(m, texts, **m3_dense(s)).result() for m in ("encode_corpus", "encode_queries")]
    vecs = np.concatenate([v["dense_vecs"] if isinstance(v, dict) else v for v in vecs])
    dims = getattr(s.model.manifest.section, "matryoshka_dims", None) or ()
    return int8_ranges(vecs, dims, getattr(s.model, "normalize_embeddings", True))


def m3_dense(s: Served) -> dict[str, Any]:
    """The encode arguments that make an M3 model give its dense vectors only (none for other embedders)."""
    if "m3" not in s.caps:
        return {}
    return {"max_length": s.model.max_length, "return_dense": True, "return_sparse": False,
            "return_colbert_vecs": False}


# ---- request bodies ------------------------------------------------------------------------------
TRUNCATE_DOC = ("cut inputs over the model's max length (true) or refuse them with 413 (false); "
                "default: the server's --auto-truncate (on)")
DIRECTION_DOC = "which end of an over-long input is cut: Right keeps its start, Left keeps its end"
Direction = Literal["Right", "Left", "right", "left"]


class OpenAIEmbeddings(Body):
    input: Union[str, list[str], list[int], list[list[int]]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, description="Matryoshka-trained models only: cut and re-normalised")
    user: str | None = None
    input_type: Literal["query", "document"] | None = Field(
        None, description="bgert: 'query' adds the model's query instruction (encode_queries)")
    embedding_type: Literal["float", "int8", "uint8", "binary", "ubinary"] = Field(
        "float", description="bgert: sentence-transformers' quantize_embeddings packing of each vector")
    truncate: bool | None = Field(None, description="bgert: " + TRUNCATE_DOC)
    truncation_direction: Direction | None = Field(None, description="bgert: " + DIRECTION_DOC)


class TEIEmbed(Body):
    inputs: Union[str, list[str]]
    model: str | None = None
    normalize: bool = True
    truncate: bool | None = Field(None, description=TRUNCATE_DOC)
    truncation_direction: Direction | None = Field(None, description=DIRECTION_DOC)
    prompt_name: str | None = None
    input_type: Literal["query", "document"] | None = Field(None, description="bgert: 'query' adds the query instruction")


class TEIRerank(Reranking):
    query: str
    texts: list[str]
    model: str | None = None
    raw_scores: bool = False
    return_text: bool = False
    truncate: bool | None = Field(None, description=TRUNCATE_DOC)
    truncation_direction: Direction | None = Field(None, description=DIRECTION_DOC)


class TEITokenize(Body):
    inputs: Union[str, list[str]]
    model: str | None = None
    add_special_tokens: bool = True


class M3Encode(Body):
    input: Union[str, list[str]]
    model: str | None = None
    return_dense: bool = True
    return_sparse: bool = True
    return_colbert_vecs: bool = True
    max_length: int | None = Field(None, ge=1)
    truncate: bool | None = Field(None, description=TRUNCATE_DOC)
    truncation_direction: Direction | None = Field(None, description=DIRECTION_DOC)
    input_type: Literal["query", "document"] | None = None


# ---- the app -------------------------------------------------------------------------------------
def _json(obj: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY), status_code=status,
                    media_type="application/json")


def _endpoint(path: str) -> str:
    return path if path in ENDPOINTS else "other"


ENDPOINTS = ("/v1/embeddings", "/v1/models", "/embed", "/embed_sparse", "/embed_all", "/rerank", "/v1/rerank",
             "/tokenize", "/info", "/health", "/metrics", "/m3/encode", "/v2/embed", "/v2/rerank")
#: probes and scrapes get no trace span
UNTRACED = ("/health", "/metrics")


class Guard:
    """ASGI middleware: API key (constant-time compare), body size limit, per-request metrics,
    and any unexpected error turned into a 4xx/424 body of the route's API instead of a bare 500."""

    def __init__(self, app: Any, state: ServerState):
        self.app, self.state = app, state
        key = state.options.api_key
        self.expected = f"Bearer {key}".encode() if key else None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        t = time.perf_counter()
        status = [500]

        async def sending(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        counted = path != "/metrics"
        if counted:
            self.state.metrics.in_flight.inc()
        tracer = self.state.tracing if path not in UNTRACED else None
        with tracer.request(scope.get("method", ""), path) if tracer else contextlib.nullcontext() as span:
            try:
                await self._guarded(scope, receive, sending, path)
            except APIError as e:
                await _send_error(sending, path, e)
            finally:
                if counted:
                    self.state.metrics.in_flight.dec()
                model = scope.get("state", {}).get("model") or "-"
                self.state.metrics.request(model, _endpoint(path), status[0], time.perf_counter() - t)
                if span is not None:
                    tracer.finish(span, status[0])

    async def _guarded(self, scope: dict, receive: Any, send: Any, path: str) -> None:
        headers = dict(scope.get("headers") or [])
        if self.expected is not None and path not in ("/health", "/docs", "/openapi.json"):
            got = headers.get(b"authorization", b"")
            if not hmac.compare_digest(got, self.expected):
                raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", "Unauthorized")
        limit = self.state.options.max_request_bytes
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > limit:
                raise APIError(413, f"request body over --max-request-bytes ({limit} bytes)", "Validation")
            return await self.app(scope, receive, send)
        if scope.get("method") in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        chunks, size, more = [], 0, True  # chunked upload: read it here, up to the limit
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > limit:
                raise APIError(413, f"request body over --max-request-bytes ({limit} bytes)", "Validation")
        body = b"".join(chunks)
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _send_error(send: Any, path: str, err: APIError) -> None:
    body = error_bytes(path, err)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if err.status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def create_app(state: ServerState) -> Any:
    """The ASGI app serving ``state``'s models (load them with ``state.load_all()``)."""
    app = FastAPI(title="bgert serve", version="1", description=(
        "OpenAI-, TEI- and Cohere/Jina-compatible embedding and reranking endpoints over bgert's ONNX "
        "artifacts, plus M3 dense + sparse + ColBERT in one call (/m3/encode), cutoff_layers for "
        "layerwise and lightweight rerankers and the prompt for LLM rerankers (/rerank, /v1/rerank)."))
    app.state.bgert = state
    if state.tracing is None:
        state.tracing = tracing.from_options(state.options.otlp_endpoint, state.options.otlp_service_name)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> Response:
        return Response(error_bytes(request.url.path, exc), status_code=exc.status, media_type="application/json")

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        errors = exc.errors()
        malformed = any(e.get("type") == "json_invalid" for e in errors)
        status = 400 if api_of(request.url.path) in ("openai", "cohere") else 422
        msg = "malformed JSON body" if malformed else validation_message(errors)
        kind = "Tokenizer" if not malformed and api_of(request.url.path) == "tei" else "Validation"
        return Response(error_bytes(request.url.path, APIError(status, msg, kind)), status_code=status,
                        media_type="application/json")

    @app.exception_handler(Exception)
    async def backend(request: Request, exc: Exception) -> Response:
        log.exception("bgert serve: %s failed", request.url.path)
        err = APIError(424, f"the model failed on this request: {type(exc).__name__}: {exc}", "Backend")
        return Response(error_bytes(request.url.path, err), status_code=424, media_type="application/json")

    def served(request: Request, name: str | None, need: str | None) -> Served:
        known = name is None or any(x.name == name for x in state.served)
        request.state.model = (name or state.served[0].name) if known else "-"
        if state.tracing is not None:
            state.tracing.annotate(model=request.state.model)
        return state.find(name, need, request.url.path)

    async def run(s: Served, method: str, *args: Any, truncate: Truncation = Truncation(),
                  **kwargs: Any) -> tuple[Any, Any]:
        """Prepare (tokenise) in the pool, refuse over-long inputs unless ``truncate`` cuts them, queue, await.
        With tracing on, the request's span gets the tokenise / queue wait / inference steps."""
        if truncate.side is not None:
            kwargs["truncation_side"] = truncate.side
        started = time.time_ns()
        try:
            req = await s.queue.aprepare(method, *args, **kwargs)
        except (TypeError, ValueError) as e:
            raise APIError(400, str(e), "Validation") from None
        prepared = time.time_ns()
        if req.truncated and not truncate.cut:
            raise truncate.refuse(s.name, s.model.max_length)
        try:
            out = await s.queue.aput(req)
        except QueueFullError as e:
            raise APIError(429, f"{s.name} is overloaded: {e}", "Overloaded") from None
        except QueueClosedError:
            raise APIError(503, "the server is shutting down", "Unhealthy") from None
        except (TypeError, ValueError) as e:
            raise APIError(400, str(e), "Validation") from None
        if state.tracing is not None:
            trace_steps(state.tracing, s, req, started, prepared)
        return req, out

    def check_count(n: int, what: str) -> None:
        if n == 0:
            raise APIError(400, f"{what} is empty: send at least one input", "Empty", what)
        limit = state.options.max_client_batch_size
        if n > limit:
            raise APIError(413, f"{what} holds {n} inputs, more than --max-client-batch-size ({limit}); "
                                "split the request", "Validation", what)

    def tei_truncation(truncate: bool | None, direction: str | None) -> Truncation:
        return tei(truncate, direction, state.options.auto_truncate)

    async def vectors(s: Served, texts: list[str], input_type: str | None, truncate: Truncation,
                      max_length: int | None = None) -> tuple[Any, np.ndarray]:
        """Dense vectors of ``texts`` (as queries for input_type "query"), cut to ``max_length`` tokens at most."""
        method = "encode_queries" if input_type == "query" else "encode_corpus"
        if "m3" in s.caps:
            kwargs = m3_dense(s)
            kwargs["max_length"] = min(max_length or s.model.max_length, s.model.max_length)
            req, out = await run(s, method, texts, truncate=truncate, **kwargs)
            return req, out["dense_vecs"]
        kwargs = {} if max_length is None else {"max_length": min(max_length, s.model.max_length)}
        return await run(s, method, texts, truncate=truncate, **kwargs)

    # ---- OpenAI ------------------------------------------------------------------------------
    @app.post("/v1/embeddings", tags=["OpenAI"])
    async def openai_embeddings(body: OpenAIEmbeddings, request: Request) -> Response:
        """OpenAI's embeddings: input as a str, a list of str, or token ids (one list or a list of lists).
        ``dimensions`` cuts a Matryoshka-trained model's vectors (400 on others); bgert's ``embedding_type``
        packs them as int8 / uint8 / binary / ubinary (base64: their bytes); over-long text is truncated
        unless ``truncate`` is false (or the server runs --no-auto-truncate): then 413."""
        s = served(request, body.model, "embed")
        inputs = body.input
        if isinstance(inputs, str):
            inputs = [inputs]
        check_count(len(inputs), "input")
        wanted = output_types.output(s.name, s.model, s.int8_ranges, body.dimensions, [body.embedding_type],
                                     types_param="embedding_type")
        if isinstance(inputs[0], int):
            inputs = [inputs]
        if isinstance(inputs[0], list):
            if "token_ids" not in s.caps:
                raise APIError(400, f"model {s.name!r} takes text only, not token ids", "Validation", "input")
            req, vecs = await run(s, "encode_ids", inputs)
        else:
            req, vecs = await vectors(s, inputs, body.input_type, tei_truncation(body.truncate,
                                                                                 body.truncation_direction))
        data = output_types.rows(wanted.apply(vecs)[body.embedding_type], body.encoding_format == "base64")
        return _json({"object": "list", "model": s.name,
                      "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)],
                      "usage": {"prompt_tokens": req.tokens, "total_tokens": req.tokens}})

    @app.get("/v1/models", tags=["OpenAI"])
    async def openai_models() -> Response:
        """The models served here, in OpenAI's list shape."""
        return _json({"object": "list", "data": [
            {"id": s.name, "object": "model", "created": int(state.started), "owned_by": "bgert"}
            for s in state.served]})

    # ---- TEI ---------------------------------------------------------------------------------
    @app.post("/embed", tags=["TEI"])
    async def tei_embed(body: TEIEmbed, request: Request) -> Response:
        """TEI's /embed: one vector per input. Over-long inputs are truncated (``truncation_direction``
        Right keeps the start, Left the end) unless ``truncate`` is false or the server runs
        --no-auto-truncate: then 413."""
        s, texts = tei_inputs(request, body, "embed")
        if not body.normalize and getattr(s.model, "graph_normalizes", False):
            raise APIError(400, f"model {s.name!r} outputs L2-normalised vectors only (normalised inside its "
                                "graph); send normalize=true or re-export with --no-normalize", "Validation")
        _, vecs = await vectors(s, texts, body.input_type, tei_truncation(body.truncate, body.truncation_direction))
        if body.normalize and not getattr(s.model, "graph_normalizes", True):
            vecs = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
        return _json(vecs)

    def tei_inputs(request: Request, body: TEIEmbed, need: str) -> tuple[Served, list[str]]:
        """The model and the checked inputs of a TEI embedding request."""
        s = served(request, body.model, need)
        texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
        check_count(len(texts), "inputs")
        return s, texts

    async def m3_head(request: Request, body: TEIEmbed, head: str) -> tuple[Served, list[Any]]:
        """One M3 head's per-input results ("sparse": lexical weights, "colbert": token vectors)."""
        s, texts = tei_inputs(request, body, head)
        flags = {"return_dense": False, "return_sparse": head == "sparse", "return_colbert_vecs": head == "colbert"}
        _, out = await run(s, "encode_corpus", texts, max_length=s.model.max_length,
                           truncate=tei_truncation(body.truncate, body.truncation_direction), **flags)
        return s, out["lexical_weights" if head == "sparse" else "colbert_vecs"]

    @app.post("/embed_sparse", tags=["TEI"])
    async def tei_embed_sparse(body: TEIEmbed, request: Request) -> Response:
        """TEI's /embed_sparse: per input the non-zero lexical weights as [{index, value}] (BGE-M3);
        truncation as on /embed."""
        _, lexical = await m3_head(request, body, "sparse")
        return _json([[{"index": int(k), "value": float(v)} for k, v in lw.items()] for lw in lexical])

    @app.post("/embed_all", tags=["TEI"])
    async def tei_embed_all(body: TEIEmbed, request: Request) -> Response:
        """TEI's /embed_all: per input its token vectors (BGE-M3's ColBERT vectors, one per token after <s>);
        truncation as on /embed."""
        return _json((await m3_head(request, body, "colbert"))[1])

    async def scores(s: Served, query: str, texts: list[str], normalize: bool, truncate: Truncation,
                     body: Reranking) -> list[list[float]]:
        """Per text its score at each requested cutoff (one column without cutoffs). An M3 model scores with
        its compute_score value for ``body.mode`` (never through a sigmoid: ``normalize`` does not apply)."""
        extra: dict[str, Any] = {}
        for name in ("cutoff_layers", "prompt", "mode", "weights"):
            value = getattr(body, name)
            if value is not None:
                need = "mode" if name == "weights" else name
                if need not in s.caps:
                    why = "; mode and weights are for BGE-M3 models" if need == "mode" else ""
                    raise APIError(400, f"model {s.name!r} ({type(s.model).__name__}) takes no {name}{why}",
                                   "Validation", name)
                extra[name] = value
        pairs = [(query, t) for t in texts]
        if "mode" in s.caps:
            mode = extra.get("mode", "colbert+sparse+dense")
            if mode not in s.model.score_modes:
                raise APIError(400, f"model {s.name!r} has no mode {mode!r}: its artifact was exported with the "
                                    f"heads {', '.join(s.model.heads)}, which give the modes "
                                    f"{', '.join(s.model.score_modes)}", "Validation", "mode")
            kwargs: dict[str, Any] = {"modes": [mode]}
            if "weights" in extra:
                check_weights(mode, extra["weights"])
                kwargs["weights_for_different_modes"] = extra["weights"]
            _, out = await run(s, "compute_score", pairs, truncate=truncate, **kwargs)
            return [[x] for x in out[mode]]
        _, out = await run(s, "compute_score", pairs, normalize=normalize, truncate=truncate, **extra)
        layered = bool(out) and isinstance(out[0], list)
        return [list(col) for col in zip(*out)] if layered else [[x] for x in out]

    @app.post("/rerank", tags=["TEI"])
    async def tei_rerank(body: TEIRerank, request: Request) -> Response:
        """TEI's /rerank: [{index, score, text?}] best first; ``cutoff_layers`` and ``prompt`` for
        layerwise/lightweight and LLM rerankers (several cutoffs add ``scores``, one per layer); ``mode``
        and ``weights`` for BGE-M3 (its compute_score value). Truncation as on /embed."""
        s = served(request, body.model, "rerank")
        check_count(len(body.texts), "texts")
        per = await scores(s, body.query, body.texts, not body.raw_scores,
                           tei_truncation(body.truncate, body.truncation_direction), body)
        results = []
        for i, row in enumerate(per):
            r: dict[str, Any] = {"index": i, "score": row[-1]}
            if len(row) > 1:
                r["scores"] = row
            if body.return_text:
                r["text"] = body.texts[i]
            results.append(r)
        results.sort(key=lambda r: -r["score"])
        return _json(results)

    @app.post("/tokenize", tags=["TEI"])
    async def tei_tokenize(body: TEITokenize, request: Request) -> Response:
        """TEI's /tokenize: per input its tokens as {id, text, special, start, stop}."""
        s = served(request, body.model, None)
        texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
        check_count(len(texts), "inputs")
        encs = await asyncio.get_running_loop().run_in_executor(
            None, s.model.tokenizer.encodings, texts, body.add_special_tokens)
        return _json([[{"id": i, "text": t, "special": bool(sp), "start": a, "stop": b}
                       for i, t, sp, (a, b) in zip(e.ids, e.tokens, e.special_tokens_mask, e.offsets)]
                      for e in encs])

    @app.get("/info", tags=["TEI"])
    async def tei_info() -> Response:
        """TEI's /info, with every model served, what it can answer and when it became ready."""
        o = state.options
        models = []
        for s in state.served:
            m = s.model
            models.append({"model_id": s.name, "path": s.path,
                           "model_type": None if m is None else type(m).__name__,
                           "kind": None if m is None else m.manifest.kind,
                           "model_dtype": None if m is None else m.precision,
                           "backend": None if m is None else m.backend_name,
                           "variant_chosen_by": None if m is None else m.chosen_by,
                           "max_input_length": None if m is None else m.max_length,
                           "endpoints": sorted(p for c in s.caps for p in CAPABILITY_ENDPOINTS.get(c, ())),
                           "parameters": sorted(s.caps & {"cutoff_layers", "prompt", "token_ids", "mode"}),
                           "score_modes": list(getattr(m, "score_modes", ())) if "mode" in s.caps else None,
                           "matryoshka_dims": getattr(m.manifest.section, "matryoshka_dims", None) if m else None,
                           "int8_calibrated": s.int8_ranges is not None,
                           "ready": s.ready_at is not None, "ready_at": _iso(s.ready_at),
                           "load_seconds": None if s.load_seconds is None else round(s.load_seconds, 3),
                           "runtime": s.runtime or None})
        first = models[0]
        budgets = [s.model.token_budget for s in state.served if s.model is not None]  # the queues' default
        return _json({**first, "models": models, "max_batch_tokens": o.max_batch_tokens or max(budgets, default=None),
                      "max_batch_requests": o.max_batch_requests, "max_client_batch_size": o.max_client_batch_size,
                      "max_concurrent_requests": o.max_queue_items, "auto_truncate": o.auto_truncate,
                      "version": _version(), "ready": state.ready.is_set(), "started_at": _iso(state.started)})

    @app.get("/health", tags=["TEI"])
    async def tei_health() -> Response:
        """200 once every model is loaded and has run one warm-up batch; 503 before (or when loading failed)."""
        if state.ready.is_set():
            return Response(status_code=200)
        msg = f"loading failed: {state.error}" if state.error else "the models are still loading"
        raise APIError(503, msg, "Unhealthy")

    # ---- Cohere / Jina (v1 and v2) -----------------------------------------------------------
    cohere.register(app, state.options, served=served, check_count=check_count, vectors=vectors, scores=scores)

    # ---- bgert's own -------------------------------------------------------------------------
    @app.post("/m3/encode", tags=["bgert"])
    async def m3_encode(body: M3Encode, request: Request) -> Response:
        """BGE-M3 dense + sparse + ColBERT from one forward pass: per input ``dense`` (vector), ``sparse``
        ({token id: weight}) and ``colbert`` (token vectors), each only when asked for; truncation as on /embed."""
        s = served(request, body.model, "m3")
        texts = [body.input] if isinstance(body.input, str) else body.input
        check_count(len(texts), "input")
        method = "encode_queries" if body.input_type == "query" else "encode_corpus"
        req, out = await run(s, method, texts, max_length=body.max_length or s.model.max_length,
                             return_dense=body.return_dense, return_sparse=body.return_sparse,
                             return_colbert_vecs=body.return_colbert_vecs,
                             truncate=tei_truncation(body.truncate, body.truncation_direction))
        data = []
        for i in range(len(texts)):
            d: dict[str, Any] = {"index": i}
            if out["dense_vecs"] is not None:
                d["dense"] = out["dense_vecs"][i]
            if out["lexical_weights"] is not None:
                d["sparse"] = {k: float(v) for k, v in out["lexical_weights"][i].items()}
            if out["colbert_vecs"] is not None:
                d["colbert"] = out["colbert_vecs"][i]
            data.append(d)
        return _json({"model": s.name, "data": data, "usage": {"prompt_tokens": req.tokens}})

    @app.get("/metrics", tags=["bgert"])
    async def metrics() -> Response:
        """Prometheus text format: requests and latency per model and endpoint, queue size, batch
        size and padded tokens, tokenisation, queue wait and inference time per model."""
        queues = {s.name: s.queue for s in state.served if s.model is not None}
        return Response(state.metrics.render(queues), media_type="text/plain; version=0.0.4; charset=utf-8")

    return Guard(app, state)


def check_weights(mode: str, weights: list[float]) -> None:
    """400 where ``mode``'s weighted sum would divide by zero."""
    w_d, w_s, w_c = weights
    total = {"sparse+dense": w_s + w_d, "colbert+sparse+dense": w_d + w_s + w_c}.get(mode, 1.0)
    if total == 0:
        raise APIError(400, f"weights {weights} sum to 0 over the modes {mode!r} combines; its score would be "
                            "undefined", "Validation", "weights")


def trace_steps(tracer: Any, s: Served, req: Any, started: int, prepared: int) -> None:
    """The tokenise, queue wait and inference spans of one run of a request, and its attributes."""
    meta = req.meta
    run_start, run_end = meta.get("run_started_ns", prepared), meta.get("run_ended_ns", prepared)
    batch = {k: meta[k] for k in ("batch_items", "batch_requests", "batch_tokens") if k in meta}
    tracer.annotate(model=s.name, inputs=len(req.items), token_count=req.tokens,
                    batch_size=batch.get("batch_items", len(req.items)))
    tracer.step("tokenize", started, prepared, model=s.name, token_count=req.tokens, inputs=len(req.items))
    tracer.step("queue_wait", prepared, run_start, model=s.name)
    tracer.step("inference", run_start, run_end, model=s.name, batch_size=batch.get("batch_items", 0),
                **{k: v for k, v in batch.items() if k != "batch_items"})


def _iso(t: float | None) -> str | None:
    """Epoch seconds as an ISO-8601 UTC time (None stays None)."""
    import datetime as dt

    return None if t is None else dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat(timespec="milliseconds")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("bgert")
    except PackageNotFoundError:
        return "unknown"

