"""Batching across callers: one token-counted queue per model, as TEI's router does it.

Latency-critical services call a model from many concurrent requests of one or a few texts; run
one by one, each pays the fixed cost of a graph run. The ``TokenQueue`` admits a request by
running the method's prepare step (bgert.runtime.request: check and tokenise; from async code in
a worker pool, off the event loop), so every queue entry carries its exact token sequences. One
worker thread takes the oldest request and the requests behind it that run through the same
graph and outputs (``Job``), as long as the batch stays within ``max_batch_tokens`` padded tokens
(rows × the length bucket of the longest item) and ``max_batch_items`` items; runs their items
together (``BgeModel.run_items``, no second tokenisation; neighbouring length buckets share a graph
run where one run fewer saves more than the padding it adds, ``run_cost_tokens``); and hands each
request exactly its own rows, from which its ``finish`` builds the result. While a batch runs, the
next one fills, so no wait is needed (``max_wait_ms`` can add one).

``lanes`` > 1 starts that many workers on the same model (one graph session, called from several
threads: ORT sessions are thread-safe): on a CPU, one single-threaded lane per core runs batches side
by side instead of one batch on all cores, so no core waits while a batch is padded, finished or
handed back, and no intra-op thread spins between runs.

Errors stay with their request: a bad input raises when the request is prepared (the caller
gets the TypeError/ValueError at once); when a merged run still fails, every request of it is
re-run alone so that only the one at fault gets the error. The queue is bounded
(``max_queue_items``): a full queue raises ``QueueFullError`` (the HTTP server answers 429) or,
with ``on_full="wait"``, the caller waits for room.
"""
from __future__ import annotations

import atexit
import collections
import concurrent.futures
import functools
import logging
import os
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

from .batching import bucket_for
from .request import Request, request_methods

if TYPE_CHECKING:
    import asyncio

log = logging.getLogger("bgert")

#: ``observe(name, value)`` receives: "tokenize_seconds", "queue_seconds", "inference_seconds",
#: "batch_requests", "batch_items", "batch_tokens" (padded)
Observer = Callable[[str, float], None]

#: the fixed cost of one graph run, in padded tokens of work: measured on a 2-core Xeon (AVX-512) with the
#: 6-layer all-MiniLM-L6-v2, a run of r rows of L tokens took about 1.2 ms + r x L x 0.085 ms on 2 threads
#: (1.3 ms + r x L x 0.17 ms on 1); larger models have a larger fixed cost but a larger cost per token too
DEFAULT_RUN_COST_TOKENS = 16


class QueueFullError(RuntimeError):
    """The queue holds ``max_queue_items`` items and ``on_full`` is "raise"."""


class QueueClosedError(RuntimeError):
    """The queue was closed (``close()``/``aclose()``) before the request was admitted."""


@dataclass(eq=False)
class _Entry:
    request: Request
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    queued_at: float = 0.0

    @property
    def size(self) -> int:
        return max(1, len(self.request.items))

    @property
    def longest(self) -> int:
        return max((len(it.ids) for it in self.request.items), default=1)


_LIVE: "weakref.WeakSet[TokenQueue]" = weakref.WeakSet()


@atexit.register
def _close_live() -> None:
    for q in list(_LIVE):
        q.close()


class TokenQueue:
    """The token-counted queue of one model (see the module doc).

    ``model``: a runtime class (``prepare``, ``run_items``, ``length_buckets``).
    ``max_batch_tokens``: padded tokens of a batch at most (rows × bucket of its longest item);
    ``max_batch_items``: items (texts, pairs) of a batch at most. A request is never split: one
    larger than a batch runs alone (the model's own token budget still cuts its graph runs).
    ``max_queue_items``: items queued at most; ``on_full``: "raise" (``QueueFullError``) or "wait".
    ``max_wait_ms``: how long the oldest request may wait for a batch to fill (default 0: batches
    fill while the previous one runs). ``tokenizer_workers``: threads that prepare async requests.
    ``lanes``: worker threads running batches side by side (default 1). ``run_cost_tokens``: the fixed
    cost of one graph run in padded tokens, for merging buckets (``merge_runs``; 0: one run per bucket).
    ``observe``: a callback for metrics (see ``Observer``).
    """

    def __init__(self, model: Any, *, max_batch_tokens: int = 16384, max_batch_items: int = 256,
                 max_queue_items: int = 10_000, on_full: str = "raise", max_wait_ms: float = 0.0,
                 tokenizer_workers: int | None = None, observe: Observer | None = None, lanes: int = 1,
                 run_cost_tokens: int = DEFAULT_RUN_COST_TOKENS):
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        for name, v in (("max_batch_items", max_batch_items), ("max_batch_tokens", max_batch_tokens),
                        ("max_queue_items", max_queue_items), ("lanes", lanes)):
            if int(v) < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if on_full not in ("raise", "wait"):
            raise ValueError(f"on_full must be 'raise' or 'wait', got {on_full!r}")
        self.model = model
        self.max_batch_tokens = int(max_batch_tokens)
        self.max_batch_items = int(max_batch_items)
        self.max_queue_items = int(max_queue_items)
        self.on_full = on_full
        self.max_wait_ms = float(max_wait_ms)
        self.lanes = int(lanes)
        self.run_cost_tokens = max(0, int(run_cost_tokens))
        self.observe = observe
        self._pool = concurrent.futures.ThreadPoolExecutor(
            tokenizer_workers or min(4, os.cpu_count() or 1), thread_name_prefix="bgert-tokenize")
        self._queue: collections.deque[_Entry] = collections.deque()
        self._queued_items = 0
        self._admitting = 0  # async calls being prepared
        self._cond = threading.Condition()
        self._space_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []
        self._closing = False
        self._counts: collections.Counter = collections.Counter()
        self._recent: collections.deque[tuple[int, int, int, float]] = collections.deque(maxlen=4096)
        self._threads = [threading.Thread(target=self._work, daemon=True,
                                          name=f"bgert-queue-{type(model).__name__}" + (f"-{i}" if lanes > 1 else ""))
                         for i in range(self.lanes)]
        for t in self._threads:
            t.start()
        _LIVE.add(self)

    # ---- admission ---------------------------------------------------------------------------
    def _observe(self, name: str, value: float) -> None:
        if self.observe is not None:
            try:
                self.observe(name, value)
            except Exception:  # a broken metrics hook never breaks serving
                log.exception("bgert: the queue's observe hook failed")

    def _prepare(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Request:
        t = time.perf_counter()
        request = self.model.prepare(method, *args, **kwargs)
        self._observe("tokenize_seconds", time.perf_counter() - t)
        return request

    def _try_enqueue(self, entry: _Entry, admitted: bool = False) -> bool:
        """Queue ``entry`` if there is room (caller holds the lock); False: wait for room.
        ``admitted``: its preparation began before ``close()``, so it is still served."""
        if self._closing and not admitted:
            raise self._closed_error()
        if self._queue and self._queued_items + entry.size > self.max_queue_items:
            if self.on_full == "raise":
                raise QueueFullError(f"the queue is full ({self._queued_items} items queued, "
                                     f"max_queue_items={self.max_queue_items}); retry later, or start the "
                                     "queue with a larger max_queue_items or on_full='wait'")
            return False
        entry.queued_at = time.monotonic()
        if admitted:
            self._admitting -= 1
        self._queue.append(entry)
        self._queued_items += entry.size
        self._cond.notify_all()
        return True

    def _closed_error(self) -> QueueClosedError:
        return QueueClosedError(f"the queue of {type(self.model).__name__} is closed; "
                                "the model starts a new one on its next queued call")

    def put(self, request: Request) -> concurrent.futures.Future:
        """Queue a prepared request; thread-safe. Returns a Future of its result (``finish``'s).

        A closed queue and a full one (``on_full="raise"``) raise here; with ``on_full="wait"``
        this blocks until there is room (from async code use ``aput``).
        """
        entry = _Entry(request)
        with self._cond:
            while not self._try_enqueue(entry):
                self._cond.wait()
        return entry.future

    async def aput(self, request: Request, admitted: bool = False) -> Any:
        """``await`` the result of a prepared request run in a batch; never blocks the loop.

        Cancelling the awaiting task drops the request if it has not run yet.
        """
        import asyncio  # here, not at the top: the offline path (load + encode) never pays for asyncio

        entry = _Entry(request)
        loop = asyncio.get_running_loop()
        try:
            while True:
                with self._cond:
                    if self._try_enqueue(entry, admitted):
                        break
                    room = loop.create_future()
                    self._space_waiters.append((loop, room))
                await room
        except BaseException:  # full, or cancelled while waiting for room: no longer being admitted
            if admitted:
                with self._cond:
                    self._admitting -= 1
                    self._cond.notify_all()
            raise
        return await asyncio.wrap_future(entry.future)

    async def aprepare(self, method: str, *args: Any, **kwargs: Any) -> Request:
        """``model.prepare(method, ...)`` (check and tokenise) in the worker pool, off the event loop."""
        import asyncio

        return await asyncio.get_running_loop().run_in_executor(
            self._pool, functools.partial(self._prepare, method, args, kwargs))

    def submit(self, method: str, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        """Prepare ``method(*args, **kwargs)`` in the calling thread and queue it (thread-safe)."""
        return self.put(self._prepare(method, args, kwargs))

    async def acall(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """``await`` ``method(*args, **kwargs)``: prepared in the pool, run in a batch. A call that
        began before ``close()`` is still served."""
        with self._cond:
            if self._closing:
                raise self._closed_error()
            self._admitting += 1
        try:
            request = await self.aprepare(method, *args, **kwargs)
        except BaseException:
            with self._cond:
                self._admitting -= 1
                self._cond.notify_all()
            raise
        return await self.aput(request, admitted=True)

    # ---- the worker --------------------------------------------------------------------------
    def _padded(self, entry: _Entry, longest: int, items: int) -> int:
        """Padded tokens of a batch whose longest item has ``longest`` tokens, with ``entry`` added."""
        n = max(longest, entry.longest)
        return (items + entry.size) * bucket_for(n, self.model.length_buckets, entry.request.job.multiple_of)

    def _next_batch(self) -> list[_Entry] | None:
        with self._cond:
            while not self._queue:
                if self._closing and not self._admitting:
                    return None
                self._cond.wait()
            deadline = self._queue[0].queued_at + self.max_wait_ms / 1000.0
            while not self._closing and self._queued_items < self.max_batch_items:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch: list[_Entry] = []
            kept: list[_Entry] = []
            items = longest = 0
            job = None
            while self._queue:
                entry = self._queue.popleft()
                if entry.future.cancelled():  # cancelled while waiting: dropped
                    self._queued_items -= entry.size
                    continue
                if batch and (entry.request.job != job or items + entry.size > self.max_batch_items
                              or self._padded(entry, longest, items) > self.max_batch_tokens):
                    kept.append(entry)
                    if entry.request.job == job:  # the batch is full; the rest waits in order
                        break
                    continue
                self._queued_items -= entry.size
                if entry.future.set_running_or_notify_cancel():
                    job = entry.request.job
                    batch.append(entry)
                    items += entry.size
                    longest = max(longest, entry.longest)
            self._queue.extendleft(reversed(kept))
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
            if not batch:
                continue
            try:
                self._run_batch(batch)
            except BaseException as e:  # never lose the worker, never leave a caller hanging
                for entry in batch:
                    if not entry.future.done():
                        entry.future.set_exception(e)

    def _run(self, entries: Sequence[_Entry]) -> list[list[Any]]:
        """Run the items of ``entries`` in one call; each entry's rows, in order."""
        items = [it for e in entries for it in e.request.items]
        now = time.monotonic()
        for e in entries:
            self._observe("queue_seconds", now - e.queued_at)
        longest = max((len(it.ids) for it in items), default=1)
        padded = len(items) * bucket_for(longest, self.model.length_buckets, entries[0].request.job.multiple_of)
        t, started_ns = time.perf_counter(), time.time_ns()
        rows = self.model.run_items(entries[0].request.job, items, run_cost_tokens=self.run_cost_tokens) if items else []
        seconds = time.perf_counter() - t
        run = {"run_started_ns": started_ns, "run_ended_ns": time.time_ns(), "batch_requests": len(entries),
               "batch_items": len(items), "batch_tokens": padded}
        for e in entries:  # per request, for tracing (bgert.server.tracing)
            e.request.meta.update(run)
        for name, value in (("inference_seconds", seconds), ("batch_requests", len(entries)),
                            ("batch_items", len(items)), ("batch_tokens", padded)):
            self._observe(name, value)
        with self._cond:
            self._recent.append((len(entries), len(items), padded, seconds))
            self._counts.update(calls=1, requests=len(entries), items=len(items))
        out, start = [], 0
        for e in entries:
            out.append(rows[start:start + len(e.request.items)])
            start += len(e.request.items)
        return out

    @staticmethod
    def _finish(entry: _Entry, rows: list[Any]) -> None:
        try:
            entry.future.set_result(entry.request.finish(rows))
        except Exception as e:
            entry.future.set_exception(e)

    def _run_batch(self, batch: list[_Entry]) -> None:
        try:
            pieces = self._run(batch)
        except Exception as e:
            if len(batch) == 1:
                batch[0].future.set_exception(e)
                return
            log.debug("bgert: a merged batch failed (%s); running its %d requests one by one", e, len(batch))
            with self._cond:
                self._counts.update(isolated=len(batch))
            for entry in batch:
                try:
                    rows = self._run([entry])[0]
                except Exception as alone:
                    entry.future.set_exception(alone)
                else:
                    self._finish(entry, rows)
            return
        for entry, rows in zip(batch, pieces):
            self._finish(entry, rows)

    # ---- state and shutdown ------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closing

    @property
    def queued_items(self) -> int:
        """Items waiting now (not counting the batch that runs)."""
        return self._queued_items

    def stats(self) -> dict[str, Any]:
        """Counters since start: graph runs (calls), requests and items run, requests re-run alone
        after a failed merged run, items queued now, and the last runs as (requests, items,
        padded tokens, seconds)."""
        with self._cond:
            return {"calls": self._counts["calls"], "requests": self._counts["requests"],
                    "items": self._counts["items"], "isolated": self._counts["isolated"],
                    "queued_items": self._queued_items, "recent_calls": list(self._recent)}

    def close(self, timeout: float | None = None) -> None:
        """Refuse new requests, finish every queued one (without waiting for batches to fill), stop.

        Waits up to ``timeout`` seconds (None: until done) for the workers, unless called from one.
        """
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            self._wake_space_waiters()
        if threading.current_thread() not in self._threads:
            deadline = None if timeout is None else time.monotonic() + timeout
            for t in self._threads:
                t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        self._pool.shutdown(wait=False)

    async def aclose(self) -> None:
        """``close()`` without blocking the event loop."""
        import asyncio

        await asyncio.get_running_loop().run_in_executor(None, self.close)

    def __enter__(self) -> "TokenQueue":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"TokenQueue({type(self.model).__name__}, max_batch_tokens={self.max_batch_tokens}, "
                f"max_batch_items={self.max_batch_items}, max_queue_items={self.max_queue_items}, "
                f"on_full={self.on_full!r}, max_wait_ms={self.max_wait_ms}, lanes={self.lanes}, "
                f"run_cost_tokens={self.run_cost_tokens}, closed={self.closed})")


# ---- the model side: every runtime class gets the API through BgeModel ----------------------
_START_LOCK = threading.RLock()


def _async_twin(name: str) -> Callable[..., Any]:
    async def twin(self: "QueuedAPI", *args: Any, **kwargs: Any) -> Any:
        return await self.queue.acall(name, *args, **kwargs)

    twin.__name__ = twin.__qualname__ = "a" + name
    twin.__doc__ = (f"``await`` {name}(...) served by this model's token-counted queue: same arguments, "
                    f"same result, run in a batch with other callers' requests (bgert.runtime.token_queue).")
    return twin


class QueuedAPI:
    """Mixin of BgeModel: ``a<method>`` coroutines, ``prepare()``, ``submit()``, ``start_queue()``, ``close()``.

    Each request-level method (made by ``bgert.runtime.request.request_method``) gets an
    awaitable twin ``a<name>`` (``aencode``, ``aencode_queries``, ``acompute_score``…).
    """

    _queue: TokenQueue | None = None
    _queue_options: dict[str, Any] | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in request_methods(cls):
            if not hasattr(cls, "a" + name):
                setattr(cls, "a" + name, _async_twin(name))

    def prepare(self, method: str, *args: Any, **kwargs: Any) -> Request:
        """Check and tokenise the inputs of ``method(*args, **kwargs)`` without running them."""
        fn = getattr(type(self), method, None)
        if not hasattr(fn, "prepare"):
            raise ValueError(f"{type(self).__name__}.{method} is not a request-level method; "
                             f"these are: {', '.join(request_methods(type(self))) or 'none'}")
        return fn.prepare(self, *args, **kwargs)

    def start_queue(self, *, max_batch_tokens: int | None = None, max_batch_items: int | None = None,
                    max_queue_items: int = 10_000, on_full: str = "raise", max_wait_ms: float = 0.0,
                    tokenizer_workers: int | None = None, observe: Observer | None = None, lanes: int = 1,
                    run_cost_tokens: int = DEFAULT_RUN_COST_TOKENS) -> TokenQueue:
        """(Re)start this model's queue with these options and return it.

        A running one is closed (its queued work finishes). Batches default to the model's
        ``token_budget`` padded tokens and ``batch_size`` items. Without this call, the first
        queued call starts one with the defaults; after ``close()`` the next one restarts it with
        the options given here last.
        """
        opts = dict(max_queue_items=max_queue_items, on_full=on_full, max_wait_ms=max_wait_ms,
                    tokenizer_workers=tokenizer_workers, observe=observe, lanes=lanes, run_cost_tokens=run_cost_tokens,
                    max_batch_items=max_batch_items or getattr(self, "batch_size", 256),
                    max_batch_tokens=max_batch_tokens or getattr(self, "token_budget", 16384))
        new = TokenQueue(self, **opts)
        with _START_LOCK:
            old, self._queue, self._queue_options = self._queue, new, opts
        if old is not None:
            old.close()
        return new

    @property
    def queue(self) -> TokenQueue:
        """This model's queue, started on first use (and again after ``close()``)."""
        q = self._queue
        if q is None or q.closed:
            with _START_LOCK:
                q = self._queue
                if q is None or q.closed:
                    opts = self._queue_options
                    q = self.start_queue(**opts) if opts else self.start_queue()
        return q

    def submit(self, method: str, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        """Thread-safe sync entry: prepare ``method(*args, **kwargs)`` here, queue it, and return a
        ``concurrent.futures.Future`` (``.result()`` blocks for it).

        >>> fut = model.submit("encode", ["one text"]); vecs = fut.result()
        """
        return self.queue.submit(method, *args, **kwargs)

    def close(self, timeout: float | None = None) -> None:
        """Stop the queue after finishing its queued requests (no-op without one)."""
        q = self._queue
        if q is not None:
            q.close(timeout)

    async def aclose(self) -> None:
        """``close()`` without blocking the event loop."""
        q = self._queue
        if q is not None:
            await q.aclose()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    async def __aenter__(self) -> Any:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()
