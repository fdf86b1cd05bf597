"""Errors of ``bgert serve`` in the shape of the API each route belongs to.

OpenAI routes (``/v1/embeddings``, ``/v1/models``) answer OpenAI's error object, the Cohere/Jina
routes (``/v1/rerank``, ``/v2/embed``, ``/v2/rerank``) Cohere's ``{"message": ...}``, and every other route TEI's
``{"error": ..., "error_type": ...}``.
"""
from __future__ import annotations

import json

OPENAI_PATHS = ("/v1/embeddings", "/v1/models")
COHERE_PATHS = ("/v1/rerank", "/v2/")

#: TEI's error types, and OpenAI's error type for each
_OPENAI_TYPES = {"Validation": "invalid_request_error", "Empty": "invalid_request_error",
                 "Tokenizer": "invalid_request_error", "NotFound": "invalid_request_error",
                 "Unauthorized": "authentication_error", "Overloaded": "rate_limit_error",
                 "Unhealthy": "server_error", "Backend": "server_error"}


class APIError(Exception):
    """A request that gets ``status`` with ``message``; ``error_type`` is TEI's name for it
    (Validation, Empty, Tokenizer, NotFound, Unauthorized, Overloaded, Unhealthy, Backend)."""

    def __init__(self, status: int, message: str, error_type: str = "Validation", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.error_type, self.param = status, message, error_type, param


def api_of(path: str) -> str:
    """'openai', 'cohere' or 'tei': which API's error shape a route answers."""
    if path.startswith(OPENAI_PATHS):
        return "openai"
    if path.startswith(COHERE_PATHS):
        return "cohere"
    return "tei"


def error_body(path: str, err: APIError) -> dict:
    """The JSON body of ``err`` for a request to ``path``."""
    api = api_of(path)
    if api == "openai":
        code = {"NotFound": "model_not_found", "Unauthorized": "invalid_api_key"}.get(err.error_type)
        return {"error": {"message": err.message, "type": _OPENAI_TYPES.get(err.error_type, "invalid_request_error"),
                          "param": err.param, "code": code}}
    if api == "cohere":
        return {"message": err.message}
    return {"error": err.message, "error_type": err.error_type}


def error_bytes(path: str, err: APIError) -> bytes:
    return json.dumps(error_body(path, err)).encode()


def validation_message(errors: list[dict]) -> str:
    """One readable line from pydantic's validation errors: where, and what is wrong."""
    parts = []
    for e in errors[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        parts.append(f"{loc or 'body'}: {e.get('msg', 'invalid')}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return "invalid request: " + "; ".join(parts) + more
