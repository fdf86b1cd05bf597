"""The FastAPI app of ``bgert serve``: OpenAI, TEI and Cohere/Jina routes over each model's
token-counted queue (bgert.runtime.token_queue), plus bgert's own M3 route and /metrics.

Every route takes the model from a ``model`` field in the body (the first artifact served answers
where it is omitted). A request is checked and tokenised in the queue's worker pool, queued with
its exact token counts, run in a batch off the event loop, and answered with its own rows. What
a model can answer follows from its runtime class (``capabilities``), never from a list of kinds.
"""
from __future__ import annotations

import asyncio
import base64
import hmac
import inspect
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from bgert.runtime import load
from bgert.runtime.request import request_methods
from bgert.runtime.token_queue import QueueClosedError, QueueFullError

from .errors import APIError, api_of, error_bytes, validation_message
from .metrics import Metrics

log = logging.getLogger("bgert")

#: what a model can do, from its runtime class: dense vectors, M3 heads, pair scores, extras
CAPABILITY_ENDPOINTS = {
    "embed": ("/v1/embeddings", "/embed"),
    "sparse": ("/embed_sparse",),
    "colbert": ("/embed_all",),
    "m3": ("/m3/encode",),
    "rerank": ("/rerank", "/v1/rerank"),
}


def capabilities(model: Any) -> frozenset[str]:
    """What ``model`` can answer, read from its runtime class: ``encode`` gives vectors (M3: those of
    its exported heads), ``compute_score`` on a class that does not embed scores pairs, and the
    extra parameters its ``compute_score`` takes (``cutoff_layers``, ``prompt``) become request fields."""
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
    if "compute_score" in methods and "encode" not in methods:
        caps.add("rerank")
        params = inspect.signature(type(model).compute_score).parameters
        caps.update(p for p in ("cutoff_layers", "prompt") if p in params)
    return frozenset(caps)


@dataclass
class ServerOptions:
    """Limits of ``bgert serve`` (flags of the same names)."""

    max_batch_tokens: int = 16384
    max_batch_requests: int = 256
    max_client_batch_size: int = 512
    max_request_bytes: int = 2_000_000
    max_queue_items: int = 10_000
    api_key: str | None = None
    tokenizer_workers: int | None = None


@dataclass
class Served:
    name: str
    path: str
    model: Any = None
    caps: frozenset[str] = frozenset()

    @property
    def queue(self) -> Any:
        return self.model.queue


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

    def load_all(self) -> None:
        """Load every model, start its queue and warm it up; ``ready`` is set only when all are."""
        try:
            for s in self.served:
                s.model = load(s.path, **self.load_kwargs)
                s.caps = capabilities(s.model)
                s.model.start_queue(max_batch_tokens=self.options.max_batch_tokens,
                                    max_batch_items=self.options.max_batch_requests,
                                    max_queue_items=self.options.max_queue_items, on_full="raise",
                                    tokenizer_workers=self.options.tokenizer_workers,
                                    observe=self.metrics.observer(s.name))
                warm_up(s)
                log.warning("bgert serve: %s ready (%s, %s)", s.name, type(s.model).__name__, ", ".join(sorted(s.caps)))
            self.ready.set()
        except Exception as e:  # reported by /health and by the CLI, which exits 1
            self.error = f"{type(e).__name__}: {e}"
            log.error("bgert serve: loading failed: %s", self.error)

    def close(self) -> None:
        for s in self.served:
            if s.model is not None:
                s.model.close()

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
        s.queue.submit("compute_score", [("warm", "up")]).result()


# ---- request bodies ------------------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class OpenAIEmbeddings(_Body):
    input: Union[str, list[str], list[int], list[list[int]]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    input_type: Literal["query", "document"] | None = Field(
        None, description="bgert: 'query' adds the model's query instruction (encode_queries)")
    truncate: bool = Field(False, description="bgert: cut inputs over the max length instead of refusing them")


class TEIEmbed(_Body):
    inputs: Union[str, list[str]]
    model: str | None = None
    normalize: bool = True
    truncate: bool = False
    truncation_direction: Literal["Right", "Left", "right", "left"] = "Right"
    prompt_name: str | None = None
    input_type: Literal["query", "document"] | None = Field(None, description="bgert: 'query' adds the query instruction")


class TEIRerank(_Body):
    query: str
    texts: list[str]
    model: str | None = None
    raw_scores: bool = False
    return_text: bool = False
    truncate: bool = False
    truncation_direction: Literal["Right", "Left", "right", "left"] = "Right"
    cutoff_layers: Union[int, list[int], None] = Field(None, description="bgert: layerwise/lightweight rerankers")
    prompt: str | None = Field(None, description="bgert: the LLM reranker's prompt")


class CohereDocument(_Body):
    text: str


class CohereRerank(_Body):
    query: str
    documents: list[Union[str, CohereDocument]]
    model: str | None = None
    top_n: int | None = Field(None, ge=1)
    return_documents: bool = False
    max_chunks_per_doc: int | None = None
    cutoff_layers: Union[int, list[int], None] = Field(None, description="bgert: layerwise/lightweight rerankers")
    prompt: str | None = Field(None, description="bgert: the LLM reranker's prompt")


class TEITokenize(_Body):
    inputs: Union[str, list[str]]
    model: str | None = None
    add_special_tokens: bool = True


class M3Encode(_Body):
    input: Union[str, list[str]]
    model: str | None = None
    return_dense: bool = True
    return_sparse: bool = True
    return_colbert_vecs: bool = True
    max_length: int | None = Field(None, ge=1)
    truncate: bool = True
    input_type: Literal["query", "document"] | None = None


# ---- the app -------------------------------------------------------------------------------------
def _json(obj: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY), status_code=status,
                    media_type="application/json")


def _endpoint(path: str) -> str:
    return path if path in ENDPOINTS else "other"


ENDPOINTS = ("/v1/embeddings", "/v1/models", "/embed", "/embed_sparse", "/embed_all", "/rerank", "/v1/rerank",
             "/tokenize", "/info", "/health", "/metrics", "/m3/encode")


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
        try:
            await self._guarded(scope, receive, sending, path)
        except APIError as e:
            await _send_error(sending, path, e)
        finally:
            if counted:
                self.state.metrics.in_flight.dec()
            model = scope.get("state", {}).get("model") or "-"
            self.state.metrics.request(model, _endpoint(path), status[0], time.perf_counter() - t)

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
        return state.find(name, need, request.url.path)

    async def run(s: Served, method: str, *args: Any, truncate: bool = True, **kwargs: Any) -> tuple[Any, Any]:
        """Prepare (tokenise) in the pool, refuse over-long inputs unless ``truncate``, queue, await."""
        try:
            req = await s.queue.aprepare(method, *args, **kwargs)
        except (TypeError, ValueError) as e:
            raise APIError(400, str(e), "Validation") from None
        if req.truncated and not truncate:
            raise APIError(413, f"an input is longer than {s.name}'s max length ({s.model.max_length} tokens) "
                                "and truncate is false; shorten it or send truncate=true", "Validation")
        try:
            return req, await s.queue.aput(req)
        except QueueFullError as e:
            raise APIError(429, f"{s.name} is overloaded: {e}", "Overloaded") from None
        except QueueClosedError:
            raise APIError(503, "the server is shutting down", "Unhealthy") from None
        except (TypeError, ValueError) as e:
            raise APIError(400, str(e), "Validation") from None

    def check_count(n: int, what: str) -> None:
        if n == 0:
            raise APIError(400, f"{what} is empty: send at least one input", "Empty", what)
        limit = state.options.max_client_batch_size
        if n > limit:
            raise APIError(413, f"{what} holds {n} inputs, more than --max-client-batch-size ({limit}); "
                                "split the request", "Validation", what)

    def direction(value: str) -> None:
        if value.lower() != "right":
            raise APIError(400, "truncation_direction 'Left' is not supported: bgert truncates on the right, "
                                "as the reference does", "Validation", "truncation_direction")

    async def vectors(s: Served, texts: list[str], input_type: str | None, truncate: bool) -> tuple[Any, np.ndarray]:
        method = "encode_queries" if input_type == "query" else "encode_corpus"
        if "m3" in s.caps:
            req, out = await run(s, method, texts, max_length=s.model.max_length, return_dense=True,
                                 return_sparse=False, return_colbert_vecs=False, truncate=truncate)
            return req, out["dense_vecs"]
        return await run(s, method, texts, truncate=truncate)

    # ---- OpenAI ------------------------------------------------------------------------------
    @app.post("/v1/embeddings", tags=["OpenAI"])
    async def openai_embeddings(body: OpenAIEmbeddings, request: Request) -> Response:
        """OpenAI's embeddings: input as a str, a list of str, or token ids (one list or a list of lists)."""
        s = served(request, body.model, "embed")
        inputs = body.input
        if isinstance(inputs, str):
            inputs = [inputs]
        check_count(len(inputs), "input")
        if body.dimensions is not None and body.dimensions != s.model.dim:
            raise APIError(400, f"model {s.name!r} was not trained for shortened embeddings (Matryoshka): it gives "
                                f"{s.model.dim}-dimensional vectors only; drop `dimensions` or send {s.model.dim}",
                           "Validation", "dimensions")
        if isinstance(inputs[0], int):
            inputs = [inputs]
        if isinstance(inputs[0], list):
            if "token_ids" not in s.caps:
                raise APIError(400, f"model {s.name!r} takes text only, not token ids", "Validation", "input")
            req, vecs = await run(s, "encode_ids", inputs)
        else:
            req, vecs = await vectors(s, inputs, body.input_type, body.truncate)
        if body.encoding_format == "base64":
            data = [base64.b64encode(v.astype("<f4").tobytes()).decode() for v in vecs]
        else:
            data = list(vecs)
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
        """TEI's /embed: one vector per input."""
        s, texts = tei_inputs(request, body, "embed")
        if not body.normalize and getattr(s.model, "graph_normalizes", False):
            raise APIError(400, f"model {s.name!r} outputs L2-normalised vectors only (normalised inside its "
                                "graph); send normalize=true or re-export with --no-normalize", "Validation")
        _, vecs = await vectors(s, texts, body.input_type, body.truncate)
        if body.normalize and not getattr(s.model, "graph_normalizes", True):
            vecs = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
        return _json(vecs)

    def tei_inputs(request: Request, body: TEIEmbed, need: str) -> tuple[Served, list[str]]:
        """The model and the checked inputs of a TEI embedding request."""
        s = served(request, body.model, need)
        texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
        check_count(len(texts), "inputs")
        direction(body.truncation_direction)
        return s, texts

    async def m3_head(request: Request, body: TEIEmbed, head: str) -> tuple[Served, list[Any]]:
        """One M3 head's per-input results ("sparse": lexical weights, "colbert": token vectors)."""
        s, texts = tei_inputs(request, body, head)
        flags = {"return_dense": False, "return_sparse": head == "sparse", "return_colbert_vecs": head == "colbert"}
        _, out = await run(s, "encode_corpus", texts, max_length=s.model.max_length, truncate=body.truncate, **flags)
        return s, out["lexical_weights" if head == "sparse" else "colbert_vecs"]

    @app.post("/embed_sparse", tags=["TEI"])
    async def tei_embed_sparse(body: TEIEmbed, request: Request) -> Response:
        """TEI's /embed_sparse: per input the non-zero lexical weights as [{index, value}] (BGE-M3)."""
        _, lexical = await m3_head(request, body, "sparse")
        return _json([[{"index": int(k), "value": float(v)} for k, v in lw.items()] for lw in lexical])

    @app.post("/embed_all", tags=["TEI"])
    async def tei_embed_all(body: TEIEmbed, request: Request) -> Response:
        """TEI's /embed_all: per input its token vectors (BGE-M3's ColBERT vectors, one per token after <s>)."""
        return _json((await m3_head(request, body, "colbert"))[1])

    async def scores(s: Served, query: str, texts: list[str], normalize: bool, truncate: bool,
                     cutoff_layers: Any, prompt: str | None) -> list[list[float]]:
        """Per text its score at each requested cutoff (one column without cutoffs)."""
        extra: dict[str, Any] = {}
        for name, value in (("cutoff_layers", cutoff_layers), ("prompt", prompt)):
            if value is not None:
                if name not in s.caps:
                    raise APIError(400, f"model {s.name!r} ({type(s.model).__name__}) takes no {name}", "Validation", name)
                extra[name] = value
        _, out = await run(s, "compute_score", [(query, t) for t in texts], normalize=normalize,
                           truncate=truncate, **extra)
        layered = bool(out) and isinstance(out[0], list)
        return [list(col) for col in zip(*out)] if layered else [[x] for x in out]

    @app.post("/rerank", tags=["TEI"])
    async def tei_rerank(body: TEIRerank, request: Request) -> Response:
        """TEI's /rerank: [{index, score, text?}] best first; ``cutoff_layers`` and ``prompt`` for
        layerwise/lightweight and LLM rerankers (several cutoffs add ``scores``, one per layer)."""
        s = served(request, body.model, "rerank")
        check_count(len(body.texts), "texts")
        direction(body.truncation_direction)
        per = await scores(s, body.query, body.texts, not body.raw_scores, body.truncate, body.cutoff_layers,
                           body.prompt)
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
        """TEI's /info, with every model served and what it can answer."""
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
                           "parameters": sorted(s.caps & {"cutoff_layers", "prompt", "token_ids"})})
        first = models[0]
        return _json({**first, "models": models, "max_batch_tokens": o.max_batch_tokens,
                      "max_batch_requests": o.max_batch_requests, "max_client_batch_size": o.max_client_batch_size,
                      "max_concurrent_requests": o.max_queue_items, "version": _version(), "ready": state.ready.is_set()})

    @app.get("/health", tags=["TEI"])
    async def tei_health() -> Response:
        """200 once every model is loaded and warmed up; 503 before (or when loading failed)."""
        if state.ready.is_set():
            return Response(status_code=200)
        msg = f"loading failed: {state.error}" if state.error else "the models are still loading"
        raise APIError(503, msg, "Unhealthy")

    # ---- Cohere / Jina -----------------------------------------------------------------------
    @app.post("/v1/rerank", tags=["Cohere/Jina"])
    async def cohere_rerank(body: CohereRerank, request: Request) -> Response:
        """Cohere's and Jina's rerank: results [{index, relevance_score, document?}] best first,
        relevance scores in [0, 1] (sigmoid of the logit)."""
        s = served(request, body.model, "rerank")
        texts = [d if isinstance(d, str) else d.text for d in body.documents]
        check_count(len(texts), "documents")
        per = await scores(s, body.query, texts, True, True, body.cutoff_layers, body.prompt)
        order = sorted(range(len(per)), key=lambda i: -per[i][-1])[:body.top_n or len(per)]
        results = []
        for i in order:
            r: dict[str, Any] = {"index": i, "relevance_score": per[i][-1]}
            if body.return_documents:
                r["document"] = {"text": texts[i]}
            results.append(r)
        return _json({"id": str(uuid.uuid4()), "results": results, "meta": {"api_version": {"version": "1"}}})

    # ---- bgert's own -------------------------------------------------------------------------
    @app.post("/m3/encode", tags=["bgert"])
    async def m3_encode(body: M3Encode, request: Request) -> Response:
        """BGE-M3 dense + sparse + ColBERT from one forward pass: per input ``dense`` (vector), ``sparse``
        ({token id: weight}) and ``colbert`` (token vectors), each only when asked for."""
        s = served(request, body.model, "m3")
        texts = [body.input] if isinstance(body.input, str) else body.input
        check_count(len(texts), "input")
        method = "encode_queries" if body.input_type == "query" else "encode_corpus"
        req, out = await run(s, method, texts, max_length=body.max_length or s.model.max_length,
                             return_dense=body.return_dense, return_sparse=body.return_sparse,
                             return_colbert_vecs=body.return_colbert_vecs, truncate=body.truncate)
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


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("bgert")
    except PackageNotFoundError:
        return "unknown"

