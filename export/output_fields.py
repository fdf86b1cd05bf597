"""Manifest fields about an embedder's output vectors, written at export.

* ``matryoshka_dims`` (export option): the dimensions a Matryoshka-trained model was trained to be cut
  to. ``bgert serve`` cuts and re-normalises vectors to one of them on request (OpenAI ``dimensions``,
  Cohere ``output_dimension``) and refuses ``dimensions`` on a model without them, as vLLM does.
* ``int8_ranges``: per output dimension (the full one and each Matryoshka cut) the [min, max] of every
  component over the fp32 vectors of a calibration set (the bundled SciFact documents and queries, or
  the ``calibration`` file), encoded as documents and as queries (bgert.runtime.vectors). int8 / uint8
  output is sentence-transformers' ``quantize_embeddings`` with these ``ranges``: fixed per model, so
  a vector's codes never depend on the other texts of its request.

Both are fields of the family's typed manifest section (bgert.runtime.registry); a family whose section
has no such field gets neither.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from bgert.runtime.registry import family
from bgert.runtime.vectors import int8_ranges

from .errors import ExportError


def section_fields(kind: str) -> set[str]:
    return {f.name for f in dataclasses.fields(family(kind).section)}


def check_matryoshka_dims(dims: Any, dim: int) -> list[int]:
    """``dims`` as a sorted list of distinct ints in 1..dim (ExportError otherwise)."""
    try:
        out = sorted({int(d) for d in ([dims] if isinstance(dims, int) else dims)}, reverse=True)
    except (TypeError, ValueError):
        raise ExportError(f"matryoshka_dims must be a list of ints, got {dims!r}") from None
    if not out or out[-1] < 1 or out[0] > dim:
        raise ExportError(f"matryoshka_dims must lie in 1..{dim} (the model's dimension), got {dims!r}")
    return out


def calibration_vectors(model: Any, texts: Sequence[str]) -> np.ndarray:
    """``model``'s dense vectors of ``texts`` encoded as documents and as queries, [2 * len(texts), dim]."""
    def dense(out: Any) -> np.ndarray:
        return np.asarray(out["dense_vecs"] if isinstance(out, dict) else out, dtype=np.float32)

    return np.concatenate([dense(model.encode_corpus(list(texts))), dense(model.encode_queries(list(texts)))])


def output_fields(artifact_dir: str, kind: str, dim: int | None, options: dict[str, Any]) -> dict[str, Any]:
    """The output-vector manifest fields of the artifact being exported in ``artifact_dir`` (fp32 graph written)."""
    fields = section_fields(kind)
    out: dict[str, Any] = {}
    dims = options.get("matryoshka_dims")
    if dims is not None:
        if "matryoshka_dims" not in fields or dim is None:
            raise ExportError(f"matryoshka_dims applies to embedders; a {kind} model has no vectors to cut")
        out["matryoshka_dims"] = check_matryoshka_dims(dims, dim)
    if "int8_ranges" in fields and "dense" in (options.get("heads") or ["dense"]):
        from bgert.runtime import load

        from .precision import Settings, text_sets

        calibration, _ = text_sets(Settings.from_options(options), kind)
        model = load(artifact_dir, precision="fp32", verify=False)
        try:
            vecs = calibration_vectors(model, calibration)
            out["int8_ranges"] = int8_ranges(vecs, out.get("matryoshka_dims", ()), model.normalize_embeddings)
        finally:
            model.close()
    return out
