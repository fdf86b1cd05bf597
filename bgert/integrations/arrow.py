"""Model outputs as Arrow columns, shared by ``bgert encode``'s parquet output and the Ray Data actors.

Vectors are fixed-size float32 lists, M3's lexical weights a map int32 token id -> float32 weight,
ColBERT vectors a list of float32 lists per row, reranker scores float32 (a list per row for
several cutoff layers).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pyarrow as pa


def vector_array(vectors: np.ndarray) -> pa.FixedSizeListArray:
    """[n, dim] float32 as a fixed_size_list<float>[dim] column."""
    v = np.ascontiguousarray(vectors, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), v.shape[1])


def sparse_array(weights: Sequence[dict]) -> pa.MapArray:
    """M3 lexical weights (str(token id) -> weight per row) as map<int32, float>."""
    return pa.array([[(int(k), float(w)) for k, w in d.items()] for d in weights],
                    type=pa.map_(pa.int32(), pa.float32()))


def colbert_array(vectors: Sequence[np.ndarray]) -> pa.ListArray:
    """Per row a [tokens, dim] array as list<list<float>>."""
    return pa.array([np.asarray(c, dtype=np.float32).tolist() for c in vectors],
                    type=pa.list_(pa.list_(pa.float32())))


def m3_columns(out: dict[str, Any], prefix: str = "") -> dict[str, pa.Array]:
    """BGEM3FlagModel's dict as columns dense / sparse / colbert (those it holds)."""
    cols = {f"{prefix}dense": vector_array(out["dense_vecs"])} if out["dense_vecs"] is not None else {}
    if out["lexical_weights"] is not None:
        cols[f"{prefix}sparse"] = sparse_array(out["lexical_weights"])
    if out["colbert_vecs"] is not None:
        cols[f"{prefix}colbert"] = colbert_array(out["colbert_vecs"])
    return cols


def score_array(scores: Sequence[Any]) -> pa.Array:
    """Reranker scores: float32, or list<float32> per row for several cutoff layers (given layer-major)."""
    if scores and isinstance(scores[0], list):
        return pa.array(np.asarray(scores, dtype=np.float32).T.tolist(), type=pa.list_(pa.float32()))
    return pa.array(np.asarray(scores, dtype=np.float32))


def with_columns(table: pa.Table, cols: dict[str, pa.Array]) -> pa.Table:
    """``table`` with ``cols`` added (replacing columns of the same name), its other columns kept."""
    for name, arr in cols.items():
        if name in table.column_names:
            table = table.set_column(table.column_names.index(name), name, arr)
        else:
            table = table.append_column(name, arr)
    return table
