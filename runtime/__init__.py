"""bgert.runtime: the thin serving side (numpy + tokenizers + onnxruntime, never torch).

``load(artifact_dir)`` reads the manifest and returns the runtime class its kind's family names
(bgert.runtime.registry). Each family module registers its description with ``@register``;
``FAMILY_MODULES`` is the one line a new family adds itself to.
"""
from __future__ import annotations

import importlib
import os
from typing import Any

from .backends import ProviderError, resolve_providers
from .base import BgeModel, class_for_kind
from .manifest import ArtifactError, Manifest, read_manifest
from .registry import FAMILIES, Family, family, register

#: the modules whose ``@register``-ed Family descriptions make up the registry, in detection/CLI order
FAMILY_MODULES = ("bgert.runtime.embedder", "bgert.runtime.m3", "bgert.runtime.reranker",
                  "bgert.runtime.decoder_embedder", "bgert.runtime.lightweight")

for _module in FAMILY_MODULES:
    importlib.import_module(_module)


def load(model_dir: str | os.PathLike, **kwargs: Any) -> BgeModel:
    """Open an artifact with the runtime class its manifest names (Embedder, M3Embedder, …)."""
    kind = read_manifest(os.fspath(model_dir), verify=False, section=False).kind
    return class_for_kind(kind)(model_dir, **kwargs)


def __getattr__(name: str) -> Any:
    """The runtime classes by name (Embedder, M3Embedder, Reranker…), read from the registry."""
    for fam in FAMILIES.values():
        if fam.runtime_class.__name__ == name:
            return fam.runtime_class
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ArtifactError", "BgeModel", "FAMILIES", "Family", "Manifest", "ProviderError", "class_for_kind", "family",
           "load", "read_manifest", "register", "resolve_providers",
           *sorted({fam.runtime_class.__name__ for fam in FAMILIES.values()})]
