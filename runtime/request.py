"""The seam between a family's request handling and the graph runs: tokenise, then run.

Every request-level method of a runtime class (``encode``, ``encode_queries``, ``compute_score``…)
is written as a *prepare* step that checks and tokenises its inputs and returns a ``Request``:
the token sequences to run (``Item``), how to run them (``Job``: which graph, which outputs) and
how to build the caller's result from the per-item rows (``finish``). ``@request_method`` turns
it into the public method, which runs the request at once (``BgeModel.execute``); the
token-counted queue (bgert.runtime.token_queue) calls the same prepare step on admission,
merges the items of requests with equal jobs into shared batches, and hands each request its
own rows. One way to run a request, whether it comes alone or through the queue.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass(frozen=True)
class Job:
    """How pre-tokenised items run: requests with equal jobs may share a batch.

    ``graph``: the graph file; ``outputs``: the graph outputs each row is built from;
    ``multiple_of``: pad lengths to a multiple of this (rerankers exported that way);
    ``padding_side``: "left"/"right", None for the tokenizer's.
    """

    graph: str
    outputs: tuple[str, ...]
    multiple_of: int = 1
    padding_side: str | None = None


@dataclass
class Item:
    """One token sequence, and any per-item graph inputs (a list per token, e.g. token_type_ids,
    or one int, e.g. query_lengths)."""

    ids: list[int]
    extra: dict[str, Any] | None = None


@dataclass
class Request:
    """A prepared call: items to run through ``job``, then ``finish(rows)`` gives the result.

    ``truncated``: some input was cut to the max length (HTTP ``truncate=false`` refuses it).
    ``batch_size``: the caller's batch_size, for a request run alone (the queue cuts its own).
    ``meta``: notes about the request; the queue records the batch it ran in there (``run_started_ns``,
    ``run_ended_ns`` epoch ns, ``batch_requests``, ``batch_items``, ``batch_tokens``), which
    ``bgert serve``'s tracing reads.
    """

    job: Job
    items: list[Item]
    finish: Callable[[list[Any]], Any]
    truncated: bool = False
    batch_size: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        """Real tokens of all items (what the queue counts)."""
        return sum(len(it.ids) for it in self.items)


def request_method(prepare: Callable[..., Request]) -> Callable[..., Any]:
    """Make a prepare step (inputs → ``Request``) the public method that runs it at once.

    The step stays reachable as ``method.prepare``, which ``BgeModel.prepare(name, ...)`` and the
    queue call; the public method keeps its signature and docstring.
    """

    @functools.wraps(prepare)
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        return self.execute(prepare(self, *args, **kwargs))

    method.__annotations__ = {**prepare.__annotations__, "return": Any}
    method.prepare = prepare  # type: ignore[attr-defined]
    return method


def request_methods(cls: type) -> list[str]:
    """Names of ``cls``'s request-level methods (those made by ``request_method``)."""
    return sorted(n for n in dir(cls) if not n.startswith("_") and hasattr(getattr(cls, n, None), "prepare"))

