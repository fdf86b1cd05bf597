"""Output vectors made smaller: Matryoshka cuts and sentence-transformers' quantised packings.

* ``truncate_dim``: the first ``dim`` components, re-normalised (what a Matryoshka-trained model is
  trained for; the artifact's manifest lists the dimensions in ``matryoshka_dims``).
* ``quantize``: sentence-transformers' ``quantize_embeddings`` in numpy: ``int8`` / ``uint8`` map each
  dimension's calibrated [min, max] onto 256 buckets (``floor((x - min) / step)``, clipped; int8 is
  that minus 128), ``binary`` / ``ubinary`` pack the sign bits (x > 0) 8 per byte as ``numpy.packbits``
  (binary is the packed byte minus 128, as int8).
* ``int8_ranges``: the calibration: per dimension [min, max] over a calibration set's vectors, one
  table per output dimension (the full one and each Matryoshka cut, re-normalised as served), fixed
  per model so that a vector's codes never depend on the other vectors of its request.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

#: sentence-transformers' precisions (``float32`` leaves vectors as they are)
PRECISIONS = ("float32", "int8", "uint8", "binary", "ubinary")


def truncate_dim(vectors: np.ndarray, dim: int, normalize: bool = True) -> np.ndarray:
    """The first ``dim`` components of each row, L2-normalised again when ``normalize``."""
    out = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32)[..., :dim])
    if normalize:
        out = out / np.maximum(np.linalg.norm(out, axis=-1, keepdims=True), 1e-12)
    return out


def calibration_ranges(vectors: np.ndarray) -> list[list[float]]:
    """[[min per dimension], [max per dimension]] of ``vectors`` [n, dim] (float32 values)."""
    v = np.asarray(vectors, dtype=np.float32)
    if v.ndim != 2 or len(v) == 0:
        raise ValueError(f"calibration needs a non-empty [n, dim] array of vectors, got shape {v.shape}")
    return [v.min(0).tolist(), v.max(0).tolist()]


def int8_ranges(vectors: np.ndarray, dims: Sequence[int] = (), normalize: bool = True) -> dict[str, list[list[float]]]:
    """Calibration ranges per output dimension (str keys, as JSON stores them): the full vectors', and those
    of each cut in ``dims`` (``truncate_dim``)."""
    v = np.asarray(vectors, dtype=np.float32)
    out = {str(v.shape[1]): calibration_ranges(v)}
    for d in dims:
        if d != v.shape[1]:
            out[str(d)] = calibration_ranges(truncate_dim(v, d, normalize))
    return out


def quantize(vectors: np.ndarray, precision: str, ranges: Any = None) -> np.ndarray:
    """``vectors`` [n, dim] as sentence-transformers' ``quantize_embeddings(vectors, precision, ranges)``;
    ``ranges`` ([2, dim]: min and max per dimension) is needed for int8 and uint8."""
    v = np.asarray(vectors, dtype=np.float32)
    if precision == "float32":
        return v
    if precision in ("int8", "uint8"):
        if ranges is None:
            raise ValueError(f"{precision} quantisation needs calibrated ranges ([2, dim]: min and max per dimension)")
        r = np.asarray(ranges, dtype=np.float32)
        if r.shape != (2, v.shape[-1]):
            raise ValueError(f"ranges must have shape (2, {v.shape[-1]}), got {r.shape}")
        starts = r[0]
        steps = (r[1] - r[0]) / 255
        steps = np.where(steps == 0, 1, steps)
        codes = np.clip(np.floor((v - starts) / steps), 0, 255)
        return codes.astype(np.uint8) if precision == "uint8" else (codes - 128).astype(np.int8)
    if precision in ("binary", "ubinary"):
        packed = np.packbits(v > 0, axis=-1).reshape(v.shape[0], -1)
        return packed if precision == "ubinary" else (packed.astype(np.int16) - 128).astype(np.int8)
    raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
