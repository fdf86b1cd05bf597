"""In-process online serving: one background micro-batcher per model, fed by many callers.

Latency-critical services call a model from many concurrent requests of one or a few texts.
Run one by one, each call pays the fixed cost of a model run; the ``MicroBatcher`` queues the
requests, waits at most ``max_wait_ms`` (from the oldest queued request) for a batch to fill up
to ``max_batch_items`` items or ``max_batch_tokens`` estimated tokens, and runs the batch on its
own worker thread, never on the event loop.

The seam is the model's own request-level method (``Embedder.encode``, ``M3Embedder.encode``,
``Reranker.compute_score``…), which already maps a list of N inputs to N outputs and sorts,
buckets and cuts them by token budget. The batcher merges queued requests that call the same
method with the same other arguments into one call, then splits the result back by offsets
(``split_result``): arrays and lists by item, dicts value by value, layer-major lists of lists
(several layerwise cutoffs) inside each inner list. No family needs code of its own here; a
class only declares which of its methods are request-level (``batched_methods``).

Errors stay with their request: each request's items are checked before it is queued (the
caller gets the TypeError/ValueError at once), and when a merged call still fails, every request
of it is re-run alone so that only the request at fault gets the error.
"""
from __future__ import annotations

import asyncio
import atexit
import collections
import concurrent.futures
import inspect
import logging
import threading
import time
import weakref
from dataclasses import dataclass, field, replace
from typing import Any, Callable, ClassVar, Mapping, Sequence

import numpy as np

from .tokenize import check_texts

log = logging.getLogger("bgert")


class QueueFullError(RuntimeError):
    """The batcher's queue holds ``max_queue_items`` items and ``on_full`` is "raise"."""


class BatcherClosedError(RuntimeError):
    """The batcher was closed (``close()``/``aclose()``) before the request was queued."""


# ---- what a request's items are ------------------------------------------------------------
def _first(piece: Any) -> Any:
    """The only item of a one-item result (dicts value by value, None kept)."""
    if isinstance(piece, dict):
        return {k: _first(v) for k, v in piece.items()}
    return None if piece is None else piece[0]


def _is_pair_input(x: Any) -> bool:
    # FlagEmbedding's rule (AbsReranker.compute_score): a str first element means one pair
    return isinstance(x, (list, tuple)) and len(x) > 0 and isinstance(x[0], str)


def _check_pairs(pairs: Any) -> list[Any]:
    if isinstance(pairs, (str, bytes, dict)) or not hasattr(pairs, "__iter__"):
        raise TypeError(f"sentence_pairs must be a (query, passage) pair or a list of pairs, "
                        f"got {type(pairs).__name__}")
    items = list(pairs)
    for i, p in enumerate(items):
        if not (isinstance(p, (list, tuple)) and len(p) == 2):
            raise TypeError(f"sentence_pairs[{i}] is {type(p).__name__}"
                            f"{f' of length {len(p)}' if isinstance(p, (list, tuple)) else ''}, "
                            "expected a (query, passage) pair of str")
        check_texts(list(p), f"sentence_pairs[{i}]")
    return items


def _text_tokens(text: str) -> int:
    return len(text) // 3 + 2  # a cautious estimate: ~4 chars/token in Latin scripts, ~1 in CJK


@dataclass(frozen=True)
class ItemSpec:
    """How a request-level method's first argument holds its items, and what one item gives.

    ``is_single(arg)``: the argument is one item (a str, a pair), not a list of them.
    ``items(arg)``: the list of items, each checked (TypeError/ValueError naming the bad one).
    ``tokens(item)``: estimated tokens of one item, to cut batches by ``max_batch_tokens``.
    ``unwrap(piece)``: a single input's result, from the one-item slice of a merged result.
    ``merge``: False for a method whose results depend on the other inputs of the call (such
    requests still queue and run on the worker, one call each).
    """

    is_single: Callable[[Any], bool]
    items: Callable[[Any], list[Any]]
    tokens: Callable[[Any], int]
    unwrap: Callable[[Any], Any]
    merge: bool = True


#: a str or a list of str; a str gives the single result (1-D vector, one dict…), as in FlagModel
TEXTS = ItemSpec(is_single=lambda x: isinstance(x, str), items=lambda x: check_texts(x)[0],
                 tokens=_text_tokens, unwrap=_first)
#: a (query, passage) pair or a list of them; one pair still gives a list from a reranker
#: (FlagReranker returns [score]) but floats from a dict of scores (M3's compute_score)
PAIRS = ItemSpec(is_single=_is_pair_input, items=_check_pairs,
                 tokens=lambda p: _text_tokens(p[0]) + _text_tokens(p[1]),
                 unwrap=lambda piece: {k: _first(v) for k, v in piece.items()} if isinstance(piece, dict) else piece)
#: pairs whose scores depend on the other pairs of the call (BGEM3FlagModel.compute_score's ColBERT
#: padding quirk): never merged with other requests
PAIRS_ALONE = replace(PAIRS, merge=False)


# ---- splitting a merged result ---------------------------------------------------------------
def _layer_major(result: Sequence[Any], n: int) -> bool:
    """A list of Python lists of n items each: one inner list per output (layerwise cutoffs)."""
    return bool(result) and all(isinstance(x, list) and len(x) == n for x in result)


def split_result(result: Any, start: int, stop: int, n: int) -> Any:
    """Items ``start:stop`` of the result of one call on n items.

    Arrays and lists with n rows are sliced (arrays copied, so a caller never holds a view of the
    whole batch); dicts are split value by value; None stays None (an output not asked for); a
    list of lists of n items each is split inside each inner list.
    """
    if result is None:
        return None
    if isinstance(result, dict):
        return {k: split_result(v, start, stop, n) for k, v in result.items()}
    if isinstance(result, np.ndarray) and result.ndim > 0 and result.shape[0] == n:
        return result[start:stop].copy()
    if isinstance(result, (list, tuple)):
        if _layer_major(result, n):
            return [x[start:stop] for x in result]
        if len(result) == n:
            return result[start:stop]
    raise TypeError(f"cannot split a {type(result).__name__} result of a call on {n} items by item; "
                    "a batched method must map a list of N inputs to N outputs")


# ---- the batcher ----------------------------------------------------------------------------
@dataclass(eq=False)
class _Request:
    method: str
    spec: ItemSpec
    single: bool
    items: list[Any]
    rest: tuple[Any, ...]
    kwargs: dict[str, Any]
    tokens: int
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    queued_at: float = 0.0

    @property
    def size(self) -> int:
        return max(1, len(self.items))

    def call_arg(self) -> Any:
        """The first argument to run this request alone (the single item itself when single)."""
        return self.items[0] if self.single else self.items

    def merges_with(self, other: "_Request") -> bool:
        if self.method != other.method or not self.spec.merge:
            return False
        try:
            return bool(self.rest == other.rest and self.kwargs == other.kwargs)
        except Exception:  # e.g. numpy arrays among the arguments: no merging, never an error
            return False


_LIVE: "weakref.WeakSet[MicroBatcher]" = weakref.WeakSet()


@atexit.register
def _close_live() -> None:
    for b in list(_LIVE):
        b.close()


class MicroBatcher:
    """Dynamic micro-batching of one model's request-level methods (see the module doc).

    ``target``: the model; ``specs``: its batched method names → ItemSpec.
    ``max_wait_ms``: longest time the oldest queued request waits for a batch to fill.
    ``max_batch_items`` / ``max_batch_tokens``: a batch stops filling at either (tokens are
    estimated from characters; the model's own token-budget batching still cuts its runs).
    ``max_queue_items``: items queued at most; a full queue raises ``QueueFullError``
    (``on_full="raise"``) or makes the caller wait for room (``on_full="wait"``).
    A request is never split: one larger than a batch runs alone.
    """

    def __init__(self, target: Any, specs: Mapping[str, ItemSpec], *, max_wait_ms: float = 5.0,
                 max_batch_items: int = 256, max_batch_tokens: int = 16384, max_queue_items: int = 10_000,
                 on_full: str = "raise", max_length: int | None = None):
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        for name, v in (("max_batch_items", max_batch_items), ("max_batch_tokens", max_batch_tokens),
                        ("max_queue_items", max_queue_items)):
            if int(v) < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if on_full not in ("raise", "wait"):
            raise ValueError(f"on_full must be 'raise' or 'wait', got {on_full!r}")
        self.target = target
        self.specs = dict(specs)
        self.max_wait_ms = float(max_wait_ms)
        self.max_batch_items = int(max_batch_items)
        self.max_batch_tokens = int(max_batch_tokens)
        self.max_queue_items = int(max_queue_items)
        self.on_full = on_full
        self.max_length = max_length
        self._queue: collections.deque[_Request] = collections.deque()
        self._queued_items = 0
        self._queued_tokens = 0
        self._cond = threading.Condition()
        self._space_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []
        self._closing = False
        self._counts = collections.Counter()
        self._recent: collections.deque[tuple[int, int, float]] = collections.deque(maxlen=4096)
        self._thread = threading.Thread(target=self._work, daemon=True,
                                        name=f"bgert-batcher-{type(target).__name__}")
        self._thread.start()
        _LIVE.add(self)

    # ---- submitting --------------------------------------------------------------------------
    def _request(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Request:
        spec = self.specs.get(method)
        if spec is None:
            raise ValueError(f"{type(self.target).__name__}.{method} is not a batched method; "
                             f"batched: {', '.join(sorted(self.specs)) or 'none'}")
        if not args:  # inputs given by name, e.g. encode(sentences=[...])
            params = inspect.signature(getattr(self.target, method)).parameters
            name = next(iter(params), None)
            if name not in kwargs:
                raise TypeError(f"{method}() missing its inputs ({name!r})")
            kwargs = dict(kwargs)
            args = (kwargs.pop(name),)
        first, rest = args[0], tuple(args[1:])
        single = spec.is_single(first)
        items = [first] if single else spec.items(first)
        if single:
            spec.items(items)  # check the one item too
        cap = self.max_length or 1 << 30
        tokens = sum(min(cap, spec.tokens(it)) for it in items)
        return _Request(method, spec, single, items, rest, dict(kwargs), tokens)

    def _try_enqueue(self, req: _Request) -> bool:
        """Queue ``req`` if there is room (caller holds the lock); False: wait for room."""
        if self._closing:
            raise BatcherClosedError(f"the micro-batcher of {type(self.target).__name__} is closed; "
                                     "the model starts a new one on its next batched call")
        if self._queue and self._queued_items + req.size > self.max_queue_items:
            if self.on_full == "raise":
                raise QueueFullError(f"the micro-batcher queue is full ({self._queued_items} items queued, "
                                     f"max_queue_items={self.max_queue_items}); retry later, or start the "
                                     "batcher with a larger max_queue_items or on_full='wait'")
            return False
        req.queued_at = time.monotonic()
        self._queue.append(req)
        self._queued_items += req.size
        self._queued_tokens += req.tokens
        self._cond.notify_all()
        return True

    def submit(self, method: str, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        """Queue ``method(*args, **kwargs)``; thread-safe. Returns a Future of its result.

        Bad inputs, a closed batcher and a full queue (``on_full="raise"``) raise here; with
        ``on_full="wait"`` this blocks until there is room (from async code use ``acall``).
        """
        req = self._request(method, args, kwargs)
        with self._cond:
            while not self._try_enqueue(req):
                self._cond.wait()
        return req.future

    async def acall(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """``await`` the result of ``method(*args, **kwargs)`` run in a batch; never blocks the loop.

        Cancelling the awaiting task drops the request if it has not run yet.
        """
        req = self._request(method, args, kwargs)
        loop = asyncio.get_running_loop()
        while True:
            with self._cond:
                if self._try_enqueue(req):
                    break
                room = loop.create_future()
                self._space_waiters.append((loop, room))
            await room
        return await asyncio.wrap_future(req.future)

    # ---- the worker --------------------------------------------------------------------------
    def _filled(self) -> bool:
        return self._queued_items >= self.max_batch_items or self._queued_tokens >= self.max_batch_tokens

    def _next_batch(self) -> list[_Request] | None:
        with self._cond:
            while not self._queue:
                if self._closing:
                    return None
                self._cond.wait()
            deadline = self._queue[0].queued_at + self.max_wait_ms / 1000.0
            while not self._closing and not self._filled():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch: list[_Request] = []
            items = tokens = 0
            while self._queue:
                req = self._queue[0]
                if batch and (items + req.size > self.max_batch_items or tokens + req.tokens > self.max_batch_tokens):
                    break
                self._queue.popleft()
                self._queued_items -= req.size
                self._queued_tokens -= req.tokens
                if req.future.set_running_or_notify_cancel():  # False: cancelled while waiting
                    batch.append(req)
                    items += req.size
                    tokens += req.tokens
            self._cond.notify_all()  # room for blocked submitters
            self._wake_space_waiters()
        return batch

    def _wake_space_waiters(self) -> None:
        for loop, room in self._space_waiters:
            try:
                loop.call_soon_threadsafe(lambda r=room: r.done() or r.set_result(None))
            except RuntimeError:  # that loop is closed: nobody waits any more
                pass
        self._space_waiters.clear()

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            groups: list[list[_Request]] = []
            for req in batch:
                for g in groups:
                    if g[0].merges_with(req):
                        g.append(req)
                        break
                else:
                    groups.append([req])
            for g in groups:
                try:
                    self._run_group(g)
                except BaseException as e:  # never lose the worker, never leave a caller hanging
                    for req in g:
                        if not req.future.done():
                            req.future.set_exception(e)

    def _call(self, reqs: Sequence[_Request], arg: Any) -> Any:
        head = reqs[0]
        t = time.perf_counter()
        out = getattr(self.target, head.method)(arg, *head.rest, **head.kwargs)
        with self._cond:
            self._recent.append((len(reqs), sum(len(r.items) for r in reqs), time.perf_counter() - t))
            self._counts.update(calls=1, requests=len(reqs), items=sum(len(r.items) for r in reqs))
        return out

    def _run_alone(self, req: _Request) -> None:
        try:
            req.future.set_result(self._call([req], req.call_arg()))
        except Exception as e:
            req.future.set_exception(e)

    def _run_group(self, group: list[_Request]) -> None:
        if len(group) == 1:
            self._run_alone(group[0])
            return
        merged = [it for req in group for it in req.items]
        try:
            out = self._call(group, merged)
            pieces, start = [], 0
            for req in group:
                piece = split_result(out, start, start + len(req.items), len(merged))
                pieces.append(req.spec.unwrap(piece) if req.single else piece)
                start += len(req.items)
        except Exception as e:
            log.debug("bgert: a merged %s call failed (%s); running its %d requests one by one",
                      group[0].method, e, len(group))
            with self._cond:
                self._counts.update(isolated=len(group))
            for req in group:
                self._run_alone(req)
            return
        for req, piece in zip(group, pieces):
            req.future.set_result(piece)

    # ---- state and shutdown ------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closing

    def stats(self) -> dict[str, Any]:
        """Counters since start: model calls, requests and items run, requests re-run alone after
        a failed merged call, items queued now, and the last calls as (requests, items, seconds)."""
        with self._cond:
            return {"calls": self._counts["calls"], "requests": self._counts["requests"],
                    "items": self._counts["items"], "isolated": self._counts["isolated"],
                    "queued_items": self._queued_items, "recent_calls": list(self._recent)}

    def close(self, timeout: float | None = None) -> None:
        """Refuse new requests, finish every queued one (without waiting for batches to fill), stop.

        Waits up to ``timeout`` seconds (None: until done) for the worker, unless called from it.
        """
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            self._wake_space_waiters()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    async def aclose(self) -> None:
        """``close()`` without blocking the event loop."""
        await asyncio.get_running_loop().run_in_executor(None, self.close)

    def __enter__(self) -> "MicroBatcher":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"MicroBatcher({type(self.target).__name__}, max_wait_ms={self.max_wait_ms}, "
                f"max_batch_items={self.max_batch_items}, max_batch_tokens={self.max_batch_tokens}, "
                f"max_queue_items={self.max_queue_items}, on_full={self.on_full!r}, closed={self.closed})")


# ---- the model side: every runtime class gets the API through BgeModel ----------------------
_START_LOCK = threading.RLock()


def _async_twin(name: str) -> Callable[..., Any]:
    async def twin(self: "BatchedAPI", *args: Any, **kwargs: Any) -> Any:
        return await self.batcher.acall(name, *args, **kwargs)

    twin.__name__ = twin.__qualname__ = "a" + name
    twin.__doc__ = (f"``await`` {name}(...) served by this model's micro-batcher: same arguments, "
                    f"same result, run in a batch with other callers' requests (bgert.runtime.batcher).")
    return twin


class BatchedAPI:
    """Mixin of BgeModel: ``a<method>`` coroutines, ``submit()``, ``start_batcher()``, ``close()``.

    ``batched_methods`` names the request-level methods (first argument: the inputs; result: one
    output per input) and how their inputs hold items. Each one a class has gets an awaitable twin
    ``a<name>`` (``aencode``, ``aencode_queries``, ``acompute_score``…). A class may narrow or
    extend the mapping.
    """

    batched_methods: ClassVar[Mapping[str, ItemSpec]] = {
        "encode": TEXTS, "encode_queries": TEXTS, "encode_corpus": TEXTS, "compute_score": PAIRS}
    _batcher: MicroBatcher | None = None
    _batcher_options: dict[str, Any] | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in cls.batched_methods:
            if callable(getattr(cls, name, None)) and not hasattr(cls, "a" + name):
                setattr(cls, "a" + name, _async_twin(name))

    def _batched_specs(self) -> dict[str, ItemSpec]:
        return {k: v for k, v in self.batched_methods.items() if callable(getattr(self, k, None))}

    def start_batcher(self, *, max_wait_ms: float = 5.0, max_batch_items: int | None = None,
                      max_batch_tokens: int | None = None, max_queue_items: int = 10_000,
                      on_full: str = "raise") -> MicroBatcher:
        """(Re)start this model's micro-batcher with these options and return it.

        A running one is closed (its queued work finishes). Batches default to the model's
        ``batch_size`` items and ``token_budget`` tokens. Without this call, the first batched
        call starts one with the defaults; after ``close()`` the next one restarts it with the
        options given here last.
        """
        opts = dict(max_wait_ms=max_wait_ms, max_queue_items=max_queue_items, on_full=on_full,
                    max_batch_items=max_batch_items or getattr(self, "batch_size", 256),
                    max_batch_tokens=max_batch_tokens or getattr(self, "token_budget", 16384))
        new = MicroBatcher(self, self._batched_specs(), max_length=getattr(self, "max_length", None), **opts)
        with _START_LOCK:
            old, self._batcher, self._batcher_options = self._batcher, new, opts
        if old is not None:
            old.close()
        return new

    @property
    def batcher(self) -> MicroBatcher:
        """This model's micro-batcher, started on first use (and again after ``close()``)."""
        b = self._batcher
        if b is None or b.closed:
            with _START_LOCK:
                b = self._batcher
                if b is None or b.closed:
                    opts = self._batcher_options
                    b = self.start_batcher(**opts) if opts else self.start_batcher()
        return b

    def submit(self, method: str, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        """Thread-safe sync entry: queue ``method(*args, **kwargs)`` on the micro-batcher and
        return a ``concurrent.futures.Future`` (``.result()`` blocks for it).

        >>> fut = model.submit("encode", ["one text"]); vecs = fut.result()
        """
        return self.batcher.submit(method, *args, **kwargs)

    def close(self, timeout: float | None = None) -> None:
        """Stop the micro-batcher after finishing its queued requests (no-op without one)."""
        b = self._batcher
        if b is not None:
            b.close(timeout)

    async def aclose(self) -> None:
        """``close()`` without blocking the event loop."""
        b = self._batcher
        if b is not None:
            await b.aclose()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    async def __aenter__(self) -> Any:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()
