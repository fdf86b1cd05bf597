"""Ray Data integration: callable classes for ``Dataset.map_batches``, one model per actor.

>>> import ray
>>> from bgert.integrations.ray import Embed
>>> ds = ray.data.read_parquet("corpus.parquet")
>>> ds = ds.map_batches(Embed, fn_constructor_kwargs={"artifact": "artifacts/bge-small-en-v1.5"},
...                     concurrency=4, batch_size=1024, num_cpus=1, batch_format="pyarrow")
>>> ds.write_parquet("vectors/")

Each actor loads the artifact once (in ``__init__``), reads its text from ``text_column`` (rerankers:
``query_column`` and ``passage_column``), adds its output column(s) and keeps the batch's other
columns: ``Embed`` adds ``vector``, ``EmbedM3`` adds ``dense`` / ``sparse`` / ``colbert`` (those
asked for), ``Score`` adds ``score``; the Arrow types are bgert.integrations.arrow's. Batches may come
in any of Ray's formats; the result is a pyarrow table. Ray Data schedules, retries and spills; bgert
does not schedule anything itself. ``intra_op_num_threads`` defaults to 1 thread per actor: give
each actor ``num_cpus`` equal to its threads.
"""
from __future__ import annotations

from typing import Any

import pyarrow as pa

from bgert.integrations.arrow import m3_columns, score_array, vector_array, with_columns


def _table(batch: Any) -> pa.Table:
    """A Ray batch (pyarrow table, pandas frame or dict of numpy arrays) as a pyarrow table."""
    if isinstance(batch, pa.Table):
        return batch
    if hasattr(batch, "to_dict") and hasattr(batch, "columns"):  # pandas
        return pa.Table.from_pandas(batch, preserve_index=False)
    return pa.table({k: list(v) if getattr(v, "ndim", 1) > 1 else v for k, v in batch.items()})


def _texts(table: pa.Table, column: str) -> list[str]:
    if column not in table.column_names:
        raise KeyError(f"the batch has no column {column!r}; it has {table.column_names} (set text_column=)")
    return table.column(column).to_pylist()


class _Actor:
    """Loads one runtime model per actor; keyword arguments go to ``bgert.runtime.load``."""

    def __init__(self, artifact: str, *, intra_op_num_threads: int = 1, call_kwargs: dict | None = None,
                 **model_kwargs: Any):
        from bgert.runtime import load

        self.model = load(artifact, intra_op_num_threads=intra_op_num_threads, **model_kwargs)
        self.call_kwargs = dict(call_kwargs or {})


class Embed(_Actor):
    """Dense vectors of ``text_column`` into ``output_column`` (default ``vector``); ``queries=True``
    applies the query instruction (encode_queries)."""

    def __init__(self, artifact: str, *, text_column: str = "text", output_column: str = "vector",
                 queries: bool = False, **kwargs: Any):
        super().__init__(artifact, **kwargs)
        self.text_column, self.output_column = text_column, output_column
        self.encode = self.model.encode_queries if queries else self.model.encode

    def __call__(self, batch: Any) -> pa.Table:
        table = _table(batch)
        out = self.encode(_texts(table, self.text_column), **self.call_kwargs)
        if isinstance(out, dict):  # an M3 artifact asked for dense vectors only
            out = out["dense_vecs"]
        return with_columns(table, {self.output_column: vector_array(out)})


class EmbedM3(Embed):
    """BGE-M3: ``dense``, ``sparse`` (map token id -> weight) and ``colbert`` columns, as asked by
    ``return_dense`` / ``return_sparse`` / ``return_colbert_vecs``; ``prefix`` goes before each name."""

    def __init__(self, artifact: str, *, text_column: str = "text", queries: bool = False, return_dense: bool = True,
                 return_sparse: bool = True, return_colbert_vecs: bool = False, prefix: str = "", **kwargs: Any):
        call = {"return_dense": return_dense, "return_sparse": return_sparse,
                "return_colbert_vecs": return_colbert_vecs, **kwargs.pop("call_kwargs", {})}
        super().__init__(artifact, text_column=text_column, queries=queries, call_kwargs=call, **kwargs)
        self.prefix = prefix

    def __call__(self, batch: Any) -> pa.Table:
        table = _table(batch)
        out = self.encode(_texts(table, self.text_column), **self.call_kwargs)
        return with_columns(table, m3_columns(out, self.prefix))


class Score(_Actor):
    """Reranker scores of (``query_column``, ``passage_column``) into ``output_column`` (default ``score``):
    float32, or a list per row for several cutoff layers."""

    def __init__(self, artifact: str, *, query_column: str = "query", passage_column: str = "passage",
                 output_column: str = "score", **kwargs: Any):
        super().__init__(artifact, **kwargs)
        self.query_column, self.passage_column, self.output_column = query_column, passage_column, output_column

    def __call__(self, batch: Any) -> pa.Table:
        table = _table(batch)
        pairs = list(zip(_texts(table, self.query_column), _texts(table, self.passage_column)))
        scores = self.model.compute_score(pairs, **self.call_kwargs) if pairs else []
        if isinstance(scores, dict):  # M3's compute_score: one column per score kind
            return with_columns(table, {f"{self.output_column}_{k}": score_array(v) for k, v in scores.items()})
        return with_columns(table, {self.output_column: score_array(scores)})


def encode_parquet(artifact: str, source: str, destination: str, *, address: str = "auto", text_column: str = "text",
                   concurrency: int = 2, batch_size: int = 1024, queries: bool = False, sparse: bool = False,
                   colbert: bool = False, max_length: int | None = None, precision: str | None = None,
                   threads: int | None = None) -> int:
    """``bgert encode --ray``: read parquet ``source``, embed ``text_column`` on ``concurrency`` actors and
    write parquet files under ``destination`` with every input column plus the outputs. Connects to
    the cluster at ``address`` ('auto': the running one, else a new local one). A dead actor is restarted
    and its batches retried (Ray Data's defaults for actors). Returns the row count."""
    import ray

    from bgert.runtime import family, read_manifest

    if not ray.is_initialized():
        ray.init(address=None if address == "auto" else address, include_dashboard=False, log_to_driver=False)
    m3 = "lexical_weights" in family(read_manifest(artifact, verify=False).kind).outputs.values()  # BGE-M3 style
    threads = threads or 1
    kwargs: dict[str, Any] = {"artifact": artifact, "text_column": text_column, "queries": queries,
                              "intra_op_num_threads": threads, "precision": precision,
                              "call_kwargs": {"max_length": max_length}}
    cls = Embed
    if m3 and (sparse or colbert):
        cls, kwargs = EmbedM3, {**kwargs, "return_sparse": sparse, "return_colbert_vecs": colbert}
    ds = ray.data.read_parquet(source)
    rows = ds.count()
    ds.map_batches(cls, fn_constructor_kwargs=kwargs, concurrency=concurrency, batch_size=batch_size,
                   batch_format="pyarrow", num_cpus=threads).write_parquet(destination)
    return rows
