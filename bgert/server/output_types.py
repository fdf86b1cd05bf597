"""Output vectors as a request asks for them: Matryoshka ``dimensions`` and compressed types.

* ``dimensions`` (OpenAI; Cohere's ``output_dimension``): on a model whose manifest lists
  ``matryoshka_dims`` (``bgert export --matryoshka-dims``), one of those cuts, re-normalised; on any
  other model a 400 that says it is not Matryoshka-trained (as vLLM answers).
* types (Cohere's ``embedding_types``; the OpenAI route's ``embedding_type``): float, int8, uint8,
  binary, ubinary, exactly sentence-transformers' ``quantize_embeddings`` (bgert.runtime.vectors).
  int8 / uint8 use fixed calibrated ranges: ``bgert serve --int8-calibration FILE`` (computed at
  start-up from that file's texts), else the artifact's manifest ``int8_ranges`` (written by
  ``bgert export``, calibrated on the bundled SciFact sample or ``--calibration FILE``).
* base64: the little-endian bytes of each vector (float32 for float; one byte per value for the
  integer types), as OpenAI's ``encoding_format=base64`` and Cohere's ``base64`` type.
"""
from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from bgert.runtime.vectors import quantize, truncate_dim

from .errors import APIError

#: the API names of the types, and sentence-transformers' precision for each
TYPES = {"float": "float32", "int8": "int8", "uint8": "uint8", "binary": "binary", "ubinary": "ubinary"}


@dataclass(frozen=True)
class Output:
    """What a request asks its vectors to become, checked before the model runs: a Matryoshka cut
    (``dimensions``, None for none) and the types, with the calibration ranges int8/uint8 need."""

    dimensions: int | None
    types: tuple[str, ...]
    ranges: np.ndarray | None = None
    normalize: bool = True

    def apply(self, vectors: np.ndarray) -> dict[str, np.ndarray]:
        """{type: the vectors as that type}, cut first."""
        if self.dimensions is not None:
            vectors = truncate_dim(vectors, self.dimensions, self.normalize)
        return {t: quantize(vectors, TYPES[t], self.ranges if TYPES[t] in ("int8", "uint8") else None)
                for t in self.types}


def output(name: str, model: Any, table: dict[str, Any] | None, dimensions: int | None, types: Sequence[str],
           param: str = "dimensions", types_param: str = "embedding_types") -> Output:
    """The checked ``Output`` of a request to model ``name`` (400 naming what is wrong and what to send)."""
    full = int(model.dim)
    if dimensions is not None and dimensions > full:
        raise APIError(400, f"{param} {dimensions} is more than model {name!r}'s {full} dimensions",
                       "Validation", param)
    if dimensions == full:
        dimensions = None
    if dimensions is not None:
        dims = getattr(model.manifest.section, "matryoshka_dims", None)
        if not dims:
            raise APIError(400, f"model {name!r} was not trained for shortened embeddings (Matryoshka): it gives "
                                f"{full}-dimensional vectors only, and cutting them would lose quality; drop "
                                f"`{param}` or send {full} (an artifact exported with --matryoshka-dims can be cut)",
                           "Validation", param)
        if dimensions not in dims:
            raise APIError(400, f"model {name!r} is Matryoshka-trained for {param} {', '.join(map(str, dims))} "
                                f"(and {full}); got {dimensions}", "Validation", param)
    ranges = None
    if any(TYPES[t] in ("int8", "uint8") for t in types):
        dim = dimensions or full
        ranges = (table or {}).get(str(dim))
        if ranges is None:
            raise APIError(400, f"model {name!r} has no int8/uint8 calibration for {dim}-dimensional vectors: "
                                "start the server with --int8-calibration FILE (texts like the corpus, one per "
                                "line), or re-export the artifact with this bgert (it calibrates on export)",
                           "Validation", types_param)
        ranges = np.asarray(ranges, dtype=np.float32)
    return Output(dimensions, tuple(dict.fromkeys(types)), ranges, getattr(model, "normalize_embeddings", True))


def rows(values: np.ndarray, b64: bool = False) -> list[Any]:
    """Per row: its numbers (numpy rows, which orjson writes as lists of floats or ints), or base64 of its bytes."""
    if b64:
        data = values.astype("<f4") if values.dtype.kind == "f" else values
        return [base64.b64encode(r.tobytes()).decode() for r in data]
    return list(values)
