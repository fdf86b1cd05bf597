"""bgert.runtime: the thin serving side (numpy + tokenizers + onnxruntime, never torch).

``load(artifact_dir)`` reads the manifest and returns the runtime class for its kind.
"""
from __future__ import annotations

import os
from typing import Any

from .backends import ProviderError, resolve_providers
from .base import BgeModel, class_for_kind, register
from .embedder import Embedder
from .m3 import M3Embedder
from .manifest import ArtifactError, Manifest, read_manifest
from .reranker import LayerwiseReranker, LLMReranker, Reranker

register("embedder", Embedder)
register("m3", M3Embedder)


register("reranker", Reranker)
register("llm_reranker", LLMReranker)
register("layerwise_reranker", LayerwiseReranker)

from .decoder_embedder import DecoderEmbedder  # noqa: E402

register("decoder_embedder", DecoderEmbedder)

from .lightweight import LightweightReranker  # noqa: E402

register("lightweight_reranker", LightweightReranker)


def load(model_dir: str | os.PathLike, **kwargs: Any) -> BgeModel:
    """Open an artifact with the runtime class its manifest names (Embedder, M3Embedder, …)."""
    kind = read_manifest(os.fspath(model_dir), verify=False).kind
    return class_for_kind(kind)(model_dir, **kwargs)


__all__ = ["ArtifactError", "BgeModel", "Embedder", "Manifest", "ProviderError", "load", "read_manifest",
           "register", "resolve_providers"]
__all__ += ["M3Embedder"]
__all__ += ["LLMReranker", "LayerwiseReranker", "Reranker"]
__all__ += ["DecoderEmbedder"]
__all__ += ["LightweightReranker"]
