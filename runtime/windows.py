"""Windows: any number of items is tokenised and run one window at a time, so that memory beyond the
output does not grow with the item count.

A request-level method (``Embedder.encode``, ``M3Embedder.encode`` / ``compute_score``, the rerankers'
``compute_score``) decorated with ``@windowed(check)`` takes a list longer than the model's
``window_size`` (or any other iterable) in consecutive windows, calls itself once per window and
joins the results in order: arrays row by row into one array allocated at the first window (when the
item count is known), lists item by item, dicts key by key, layer-major lists of lists layer by layer.
With ``by_batch=True`` (M3's compute_score) the window is rounded up to a multiple of the call's
batch size, so its batch-dependent ColBERT quirk sees the same batches as in one call. A window is an ordinary call, and a result never depends
on the other items of its call, so windowed results equal one call's. ``iter_windows`` yields each
window's result instead, for iterables of any length.
"""
from __future__ import annotations

import functools
import inspect
import itertools
from typing import Any, Callable, Iterable, Iterator, TypeVar

import numpy as np

F = TypeVar("F", bound=Callable[..., Any])
#: items per window by default: a few thousand keeps ORT's batches full and the token lists small
DEFAULT_WINDOW_SIZE = 4096


def window_length(window_size: int, batch_size: int | None) -> int:
    """``window_size`` rounded up to a multiple of ``batch_size``; ValueError below 1."""
    if window_size < 1:
        raise ValueError(f"window_size must be >= 1, got {window_size}")
    step = batch_size or 1
    return -(-window_size // step) * step


def _streamable(items: Any) -> bool:
    """An ordered iterable of items (not a str/bytes/dict/set, which the method itself answers or refuses)."""
    return hasattr(items, "__iter__") and not isinstance(items, (str, bytes, dict, set, frozenset))


def windows(items: Iterable[Any], size: int) -> Iterator[tuple[int, list[Any]]]:
    """(start index, list of up to ``size`` items) over ``items``, which may be any ordered iterable."""
    if not _streamable(items):
        raise TypeError(f"expected a list or another ordered iterable of items, got {type(items).__name__}")
    if isinstance(items, (list, tuple)):
        for start in range(0, len(items), size):
            yield start, list(items[start:start + size])
        return
    it = iter(items)
    for start in itertools.count(0, size):
        chunk = list(itertools.islice(it, size))
        if not chunk:
            return
        yield start, chunk


class _Join:
    """The whole result of a windowed call, built from each window's result in order."""

    def __init__(self, first: Any, total: int | None):
        self.total = total
        self.kind = ("none" if first is None else "dict" if isinstance(first, dict)
                     else "rows" if isinstance(first, np.ndarray)
                     else "layers" if isinstance(first, list) and first and isinstance(first[0], list) else "items")
        if self.kind == "dict":
            self.parts: Any = {k: _Join(v, total) for k, v in first.items()}
        elif self.kind == "layers":
            self.parts = [_Join(v, total) for v in first]
        elif self.kind == "rows" and total is not None:
            self.parts = np.empty((total, *first.shape[1:]), dtype=first.dtype)
        else:
            self.parts = []
        self.filled = 0

    def add(self, part: Any) -> None:
        if self.kind == "dict":
            for k, j in self.parts.items():
                j.add(part[k])
        elif self.kind == "layers":
            for j, p in zip(self.parts, part):
                j.add(p)
        elif self.kind == "rows" and self.total is not None:
            self.parts[self.filled:self.filled + len(part)] = part
            self.filled += len(part)
        elif self.kind == "rows":
            self.parts.append(part)
        elif self.kind == "items":
            self.parts.extend(part)

    def result(self) -> Any:
        if self.kind == "dict":
            return {k: j.result() for k, j in self.parts.items()}
        if self.kind == "layers":
            return [j.result() for j in self.parts]
        if self.kind == "rows" and self.total is None:
            return np.concatenate(self.parts)
        return None if self.kind == "none" else self.parts


def windowed(check: Callable[..., Any], by_batch: bool = False) -> Callable[[F], F]:
    """Run the decorated method per window of its first argument (see the module doc); ``check(window,
    start=i)`` validates each window first, so an error names the item's index in the whole input;
    ``by_batch``: windows hold whole batches of the call's batch size."""

    def wrap(fn: F) -> F:
        sig = inspect.signature(fn)
        name = list(sig.parameters)[1]  # the items: sentences, queries, sentence_pairs…

        @functools.wraps(fn)
        def call(self: Any, *args: Any, **kwargs: Any) -> Any:
            bound = sig.bind(self, *args, **kwargs)
            items = bound.arguments.get(name)
            size = window_length(self.window_size, (bound.arguments.get("batch_size") or self.batch_size)
                                 if by_batch else 1)
            if isinstance(items, (list, tuple)) and len(items) <= size or not _streamable(items):
                return fn(self, *args, **kwargs)
            total = len(items) if hasattr(items, "__len__") else None
            joined = None
            for start, chunk in windows(items, size):
                check(chunk, start=start)
                bound.arguments[name] = chunk
                part = fn(*bound.args, **bound.kwargs)
                if joined is None:
                    joined = _Join(part, total)
                joined.add(part)
            if joined is None:  # an empty iterable: the method's own empty result
                bound.arguments[name] = []
                return fn(*bound.args, **bound.kwargs)
            return joined.result()

        call.window_check, call.window_by_batch = check, by_batch  # type: ignore[attr-defined]
        return call  # type: ignore[return-value]

    return wrap


def iter_windows(method: Callable[..., Any], items: Iterable[Any], window_size: int, **kwargs: Any) -> Iterator[Any]:
    """``method(window, **kwargs)`` for each window of ``items`` (any iterable), in order; ``method`` is a
    bound ``@windowed`` method, whose check validates each window with its index in the whole input."""
    check = getattr(method, "window_check")
    step = (kwargs.get("batch_size") or method.__self__.batch_size) if getattr(method, "window_by_batch") else 1
    for start, chunk in windows(items, window_length(window_size, step)):
        check(chunk, start=start)
        yield method(chunk, **kwargs)
