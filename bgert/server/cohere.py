"""Cohere's routes: ``POST /v1/rerank`` (Cohere v1, also Jina's shape), ``POST /v2/rerank`` and
``POST /v2/embed``, in Cohere's request and response shapes; errors are Cohere's ``{"message": ...}``.

* ``/v2/embed``: ``texts``; ``input_type`` search_query (the model's query instruction, as
  ``encode_queries``), search_document / classification / clustering (no instruction, as
  ``encode_corpus``; BGE models use no instruction for classification or clustering);
  ``embedding_types`` any of float, int8, uint8, binary, ubinary, base64 (bgert.server.output_types);
  ``output_dimension`` (Matryoshka-trained models only); ``max_tokens`` (a lower max length);
  ``truncate`` END (keep the start), START (keep the end) or NONE (413 for over-long input), default
  the server's --auto-truncate. Answer: ``{"id", "embeddings": {type: [...]}, "texts", "meta"}``.
* ``/v1/rerank`` and ``/v2/rerank``: ``query``, ``documents`` (strings or ``{"text": ...}``),
  ``top_n``, ``return_documents``; ``results`` ``[{index, relevance_score, document?}]`` best first.
  Relevance scores of rerankers are the sigmoid of the logit, in [0, 1]; of BGE-M3 its compute_score
  value for ``mode``. bgert's extensions: ``truncate`` (as above), ``mode`` / ``weights`` (BGE-M3),
  ``cutoff_layers`` / ``prompt`` (layerwise, lightweight, LLM rerankers).
"""
from __future__ import annotations

import uuid
from typing import Any, Callable, Literal, Union

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import Field

from . import output_types
from .bodies import Body, Reranking
from .errors import APIError
from .truncation import cohere

#: Cohere's input types, and the runtime's: queries get the query instruction, the rest none
INPUT_TYPES = {"search_query": "query", "search_document": "document", "classification": "document",
               "clustering": "document"}
EmbeddingType = Literal["float", "int8", "uint8", "binary", "ubinary", "base64"]
Truncate = Literal["NONE", "START", "END"]
TRUNCATE_DOC = ("END keeps the start of an over-long input, START its end, NONE refuses it (413); "
                "default: END, or NONE when the server runs --no-auto-truncate")


class CohereDocument(Body):
    text: str


class CohereRerank(Reranking):
    """Cohere's rerank body (v1 and v2), with bgert's extensions."""

    query: str
    documents: list[Union[str, CohereDocument]]
    model: str | None = None
    top_n: int | None = Field(None, ge=1)
    return_documents: bool = False
    max_chunks_per_doc: int | None = None
    max_tokens_per_doc: int | None = Field(None, ge=1, description="v2: accepted when at least the model's "
                                                                   "max length; documents are cut there")
    truncate: Truncate | None = Field(None, description="bgert: " + TRUNCATE_DOC)


class CohereEmbed(Body):
    """Cohere v2's embed body (text only)."""

    texts: list[str] | None = None
    images: list[Any] | None = None
    inputs: list[Any] | None = None
    model: str | None = None
    input_type: Literal["search_query", "search_document", "classification", "clustering", "image"] | None = Field(
        None, description="search_query adds the model's query instruction; default search_document")
    embedding_types: list[EmbeddingType] | None = Field(None, min_length=1, description="default [float]")
    output_dimension: int | None = Field(None, ge=1, description="Matryoshka-trained models only")
    max_tokens: int | None = Field(None, ge=1, description="tokens kept per input at most (the model's max length)")
    truncate: Truncate | None = Field(None, description=TRUNCATE_DOC)


def _json(obj: Any) -> Response:
    return Response(orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")


def register(app: FastAPI, options: Any, *, served: Callable[..., Any], check_count: Callable[..., None],
             vectors: Callable[..., Any], scores: Callable[..., Any]) -> None:
    """Add the Cohere routes to ``app``, answering through the app's own model lookup, count check,
    vector and score helpers (bgert.server.app)."""

    async def rerank(body: CohereRerank, request: Request, version: str) -> Response:
        s = served(request, body.model, "rerank")
        texts = [d if isinstance(d, str) else d.text for d in body.documents]
        check_count(len(texts), "documents")
        limit = getattr(s.model, "passage_max_length", s.model.max_length)
        if body.max_tokens_per_doc is not None and body.max_tokens_per_doc < limit:
            raise APIError(400, f"max_tokens_per_doc {body.max_tokens_per_doc} is below model {s.name!r}'s max "
                                f"length ({limit} tokens), where documents are cut; leave it out or send >= {limit}",
                           "Validation", "max_tokens_per_doc")
        per = await scores(s, body.query, texts, True, cohere(body.truncate, options.auto_truncate), body)
        order = sorted(range(len(per)), key=lambda i: -per[i][-1])[:body.top_n or len(per)]
        results = []
        for i in order:
            r: dict[str, Any] = {"index": i, "relevance_score": per[i][-1]}
            if body.return_documents:
                r["document"] = {"text": texts[i]}
            results.append(r)
        meta: dict[str, Any] = {"api_version": {"version": version}}
        if version == "2":
            meta["billed_units"] = {"search_units": 1}
        return _json({"id": str(uuid.uuid4()), "results": results, "meta": meta})

    @app.post("/v1/rerank", tags=["Cohere/Jina"])
    async def cohere_rerank(body: CohereRerank, request: Request) -> Response:
        """Cohere's (v1) and Jina's rerank: results [{index, relevance_score, document?}] best first,
        relevance scores in [0, 1] (sigmoid of the logit; BGE-M3: its compute_score value for ``mode``)."""
        return await rerank(body, request, "1")

    @app.post("/v2/rerank", tags=["Cohere/Jina"])
    async def cohere_rerank_v2(body: CohereRerank, request: Request) -> Response:
        """Cohere v2's rerank: as /v1/rerank, with v2's meta."""
        return await rerank(body, request, "2")

    @app.post("/v2/embed", tags=["Cohere/Jina"])
    async def cohere_embed_v2(body: CohereEmbed, request: Request) -> Response:
        """Cohere v2's embed: ``embeddings`` keyed by each asked ``embedding_types`` value (float, int8,
        uint8, binary, ubinary: lists of numbers; base64: the float32 bytes of each vector)."""
        if body.images or body.inputs or body.input_type == "image":
            raise APIError(400, "bgert serves text embeddings: send `texts` (images and `inputs` are not "
                                "supported)", "Validation", "texts")
        if body.texts is None:
            raise APIError(400, "`texts` is required: a list of strings to embed", "Validation", "texts")
        s = served(request, body.model, "embed")
        check_count(len(body.texts), "texts")
        types = body.embedding_types or ["float"]
        numeric = [t for t in types if t != "base64"] + (["float"] if "base64" in types else [])
        wanted = output_types.output(s.name, s.model, s.int8_ranges, body.output_dimension, numeric,
                                     param="output_dimension")
        req, vecs = await vectors(s, body.texts, INPUT_TYPES[body.input_type or "search_document"],
                                  cohere(body.truncate, options.auto_truncate), body.max_tokens)
        out = wanted.apply(vecs)
        embeddings = {t: output_types.rows(out["float" if t == "base64" else t], t == "base64") for t in types}
        return _json({"id": str(uuid.uuid4()), "embeddings": embeddings, "texts": body.texts,
                      "meta": {"api_version": {"version": "2"}, "billed_units": {"input_tokens": req.tokens}}})
