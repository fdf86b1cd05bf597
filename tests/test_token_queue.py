"""Batching across callers (bgert.runtime.token_queue): concurrent callers get exactly what encoding
alone gives, ownership and order under many interleaved requests, exact token counts from one
tokenisation, batches cut by padded tokens, graceful shutdown, cancellation, back-pressure, and
errors that stay with their request."""
from __future__ import annotations

import asyncio
import random
import threading
import time

import numpy as np
import pytest

from bgert.runtime import Embedder
from bgert.runtime.batching import bucket_for
from bgert.runtime.token_queue import QueueClosedError, QueueFullError, TokenQueue

TEXTS_MIX = [
    "", "a", "what is panda?", "北京是中华人民共和国的首都。", "🐼🎋 emoji 👩‍💻",
    "The giant panda (Ailuropoda melanoleuca) is a bear species endemic to China.",
    "panda " * 700,  # past the model's max length: truncated
    "BM25 is a bag-of-words retrieval function that ranks a set of documents.",
]


@pytest.fixture(scope="module")
def model(tiny_bge_art):
    m = Embedder(tiny_bge_art, intra_op_num_threads=1)
    yield m
    m.close()


@pytest.fixture
def gate(model, monkeypatch):
    """Make the model's graph runs block until ``gate.open()``: requests pile up behind a running batch."""
    class Gate:
        entered = threading.Event()
        released = threading.Event()

        def open(self) -> None:
            self.released.set()

    g = Gate()
    real = model.run_items

    def run_items(*args, **kwargs):
        g.entered.set()
        assert g.released.wait(30), "the test never opened the gate"
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "run_items", run_items)
    yield g
    g.open()


def close_to(a, b, tol=1e-5):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(close_to(a[k], b[k], tol) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(close_to(x, y, tol) for x, y in zip(a, b))
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and float(np.abs(a - b).max(initial=0)) <= tol


def test_api_surface(model):
    assert callable(model.aencode) and callable(model.aencode_queries) and callable(model.aencode_corpus)
    assert not hasattr(model, "acompute_score")  # only methods the class has get a twin
    assert asyncio.iscoroutinefunction(Embedder.aencode)
    with pytest.raises(ValueError, match="not a request-level method"):
        model.submit("dim", ["x"])
    model.start_queue(max_wait_ms=1)
    by_name = model.submit("encode", sentences=["by name"], max_length=8).result(timeout=30)
    np.testing.assert_allclose(by_name, model.encode(["by name"], max_length=8), atol=1e-5, rtol=0)
    with pytest.raises(TypeError, match="sentences"):
        model.submit("encode", max_length=8)


def test_concurrent_callers_equal_encoding_alone(model):
    rng = random.Random(0)
    requests = []  # (method, first argument, kwargs)
    for i in range(60):
        k = rng.choice([0, 1, 1, 2, 3])
        arg = rng.choice(TEXTS_MIX) if k == 0 else rng.sample(TEXTS_MIX, k)
        method = rng.choice(["encode", "encode", "encode_queries", "encode_corpus"])
        kwargs = rng.choice([{}, {}, {"max_length": 8}, {"convert_to_numpy": False}])
        requests.append((method, arg, kwargs))
    requests.append(("encode", [], {}))
    model.start_queue(max_wait_ms=50)

    async def main():
        return await asyncio.gather(*(getattr(model, "a" + m)(arg, **kw) for m, arg, kw in requests))

    got = asyncio.run(main())
    stats = model.queue.stats()
    assert stats["calls"] < len(requests) / 3, stats  # requests really were merged
    for (method, arg, kw), g in zip(requests, got):
        alone = getattr(model, method)(arg, **kw)
        assert type(g) is type(alone) and close_to(g, alone), (method, arg, kw)
    assert got[-1].shape == (0, model.dim)
    single = [g for (_, arg, _), g in zip(requests, got) if isinstance(arg, str)]
    assert single and all(np.ndim(g) == 1 for g in single)


def test_ownership_under_1000_interleaved_requests(model):
    texts = [f"request {i} says {' '.join(['panda'] * (i % 7))} {i * 7919 % 1000}" for i in range(1000)]
    ref = {"encode": model.encode(texts), "encode_queries": model.encode_queries(texts)}
    queue = model.start_queue(max_wait_ms=2, max_batch_items=64)
    results: dict[int, object] = {}
    plan = [(i, "encode_queries" if i % 3 == 0 else "encode", list(range(i, min(i + 1 + i % 3, 1000))))
            for i in range(1000)]
    order = list(range(1000))
    random.Random(1).shuffle(order)

    def client(part):
        futs = [(j, model.submit(plan[j][1], [texts[t] for t in plan[j][2]])) for j in part]
        for j, f in futs:
            results[j] = f.result(timeout=60)

    threads = [threading.Thread(target=client, args=(order[k::8],)) for k in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(results) == 1000
    for j, method, idx in plan:
        np.testing.assert_allclose(results[j], ref[method][idx], atol=1e-5, rtol=0)
    stats = queue.stats()
    assert stats["requests"] == 1000 and stats["calls"] < 500, stats


def test_close_finishes_requests_in_flight(model):
    queue = model.start_queue(max_wait_ms=60_000)  # only close() can make these run soon
    futs = [model.submit("encode", [t]) for t in TEXTS_MIX * 4]
    t = time.monotonic()
    queue.close()
    assert time.monotonic() - t < 30 and all(f.done() for f in futs)
    for f, text in zip(futs, TEXTS_MIX * 4):
        np.testing.assert_allclose(f.result(), model.encode([text]), atol=1e-5, rtol=0)
    with pytest.raises(QueueClosedError):
        queue.submit("encode", ["late"])
    # the model itself stays usable: its next batched call starts a new queue
    model.start_queue(max_wait_ms=1)
    assert model.submit("encode", "again").result(timeout=30).shape == (model.dim,)


def test_aclose_with_async_callers_in_flight(model):
    model.start_queue(max_wait_ms=60_000)

    async def main():
        tasks = [asyncio.ensure_future(model.aencode(t)) for t in TEXTS_MIX]
        await asyncio.sleep(0)  # let every task queue its request
        await model.aclose()
        return await asyncio.gather(*tasks)

    got = asyncio.run(main())
    np.testing.assert_allclose(np.stack(got), model.encode(TEXTS_MIX), atol=1e-5, rtol=0)
    model.start_queue(max_wait_ms=1)


def test_cancelled_waiting_callers_do_not_break_the_batcher(model, gate):
    queue = model.start_queue(max_wait_ms=0)

    async def main():
        first = asyncio.ensure_future(model.aencode("first"))
        while not gate.entered.is_set():  # the worker is now inside a model call
            await asyncio.sleep(0.01)
        tasks = [asyncio.ensure_future(model.aencode([t])) for t in TEXTS_MIX]
        await asyncio.sleep(0.05)
        for t in tasks[::2]:
            t.cancel()
        await asyncio.wait(tasks[::2])  # cancelled on the loop before the worker may take them
        await asyncio.get_running_loop().run_in_executor(None, gate.open)
        done = await asyncio.gather(first, *tasks, return_exceptions=True)
        after = await model.aencode(["after", "the cancellations"])
        return done, after

    done, after = asyncio.run(main())
    assert all(isinstance(d, asyncio.CancelledError) for d in done[1::2])
    kept = TEXTS_MIX[1::2]
    np.testing.assert_allclose(np.concatenate(done[2::2]), model.encode(kept), atol=1e-5, rtol=0)
    np.testing.assert_allclose(after, model.encode(["after", "the cancellations"]), atol=1e-5, rtol=0)
    assert queue.stats()["items"] == 1 + len(kept) + 2  # cancelled requests never ran


def test_back_pressure_raise(model, gate):
    queue = model.start_queue(max_wait_ms=0, max_queue_items=4, on_full="raise")
    running = model.submit("encode", "running")
    assert gate.entered.wait(30)
    queued = [model.submit("encode", [f"queued {i}"]) for i in range(4)]
    with pytest.raises(QueueFullError, match="max_queue_items=4"):
        model.submit("encode", ["one too many"])
    gate.open()
    assert running.result(timeout=30).shape == (model.dim,)
    assert all(f.result(timeout=30).shape == (1, model.dim) for f in queued)
    # a request larger than the whole queue is still admitted when the queue is empty
    assert queue.submit("encode", ["x"] * 10).result(timeout=30).shape == (10, model.dim)


def test_back_pressure_wait_sync_and_async(model, gate):
    model.start_queue(max_wait_ms=0, max_queue_items=2, on_full="wait")
    model.submit("encode", "running")
    assert gate.entered.wait(30)
    queued = [model.submit("encode", [f"queued {i}"]) for i in range(2)]
    blocked: list = []
    th = threading.Thread(target=lambda: blocked.append(model.submit("encode", ["waits"]).result(timeout=30)))
    th.start()

    async def main():
        waiting = asyncio.ensure_future(model.aencode(["waits too"]))
        ticks = 0
        for _ in range(10):  # the event loop keeps running while the caller waits for room
            await asyncio.sleep(0.02)
            ticks += 1
        assert ticks == 10 and not waiting.done() and th.is_alive()
        await asyncio.get_running_loop().run_in_executor(None, gate.open)
        return await waiting

    got = asyncio.run(main())
    th.join(30)
    np.testing.assert_allclose(got, model.encode(["waits too"]), atol=1e-5, rtol=0)
    np.testing.assert_allclose(blocked[0], model.encode(["waits"]), atol=1e-5, rtol=0)
    assert all(f.result(timeout=30).shape == (1, model.dim) for f in queued)


def test_bad_request_fails_alone(model):
    model.start_queue(max_wait_ms=50)

    async def main():
        return await asyncio.gather(model.aencode(["good", "one"]), model.aencode(["ok", 3]),
                                    model.aencode(42), model.aencode("good two"), model.aencode(["\ud800"]),
                                    return_exceptions=True)

    good1, bad_item, bad_type, good2, bad_text = asyncio.run(main())
    assert isinstance(bad_item, TypeError) and "sentences[1] is int" in str(bad_item)
    assert isinstance(bad_type, TypeError) and isinstance(bad_text, ValueError)
    np.testing.assert_allclose(good1, model.encode(["good", "one"]), atol=1e-5, rtol=0)
    np.testing.assert_allclose(good2, model.encode("good two"), atol=1e-5, rtol=0)


def test_failure_inside_a_merged_call_stays_with_its_request(model, monkeypatch):
    real = model.run_items
    poison = model.tokenizer.encode(["POISON"])[0]

    def run_items(job, items, *args, **kwargs):
        if any(it.ids == poison for it in items):
            raise RuntimeError("this input breaks the model")
        return real(job, items, *args, **kwargs)

    monkeypatch.setattr(model, "run_items", run_items)
    queue = model.start_queue(max_wait_ms=60_000, max_batch_items=6)  # fills at exactly 6 items
    futs = [model.submit("encode", t) for t in ["a", "b", ["POISON", "c"], "d", "e"]]
    results = [f.exception(timeout=30) or f.result() for f in futs]
    assert isinstance(results[2], RuntimeError) and "breaks the model" in str(results[2])
    for r, t in zip(results[:2] + results[3:], "abde"):
        np.testing.assert_allclose(r, model.encode(t), atol=1e-5, rtol=0)
    assert queue.stats()["isolated"] == 5
    queue.close()


def test_options_are_checked(model):
    with pytest.raises(ValueError, match="on_full"):
        model.start_queue(on_full="drop")
    with pytest.raises(ValueError, match="max_wait_ms"):
        model.start_queue(max_wait_ms=-1)
    with pytest.raises(ValueError, match="max_queue_items"):
        model.start_queue(max_queue_items=0)


# ---- what the queue counts and how it cuts batches ----------------------------------------------
def test_exact_token_counts_from_one_tokenisation(model, monkeypatch):
    """Each request is tokenised once, on admission; the batch runs those very token sequences."""
    texts = [f"text {i} " + "panda " * (i * 5) for i in range(12)]
    tokenised: list[int] = []
    real_tok = model.tokenizer.encode_checked

    def counting(batch, *args, **kwargs):
        tokenised.append(len(batch))
        return real_tok(batch, *args, **kwargs)

    ran: list[list[int]] = []
    real_run = model.run_items

    def recording(job, items, *args, **kwargs):
        ran.extend(it.ids for it in items)
        return real_run(job, items, *args, **kwargs)

    want = model.encode(texts)
    exact = model.tokenizer.encode(texts, model.max_length)
    monkeypatch.setattr(model.tokenizer, "encode_checked", counting)
    monkeypatch.setattr(model, "run_items", recording)
    queue = model.start_queue(max_wait_ms=50)
    assert sum(len(r.ids) for r in [model.prepare("encode", t).items[0] for t in texts]) == sum(map(len, exact))
    tokenised.clear()

    async def main():
        return await asyncio.gather(*(model.aencode(t) for t in texts))

    got = asyncio.run(main())
    assert tokenised == [1] * len(texts)  # one tokenisation per request, none when batches run
    assert sorted(map(tuple, ran)) == sorted(map(tuple, exact))
    np.testing.assert_allclose(np.stack(got), want, atol=1e-5, rtol=0)
    assert queue.stats()["calls"] < len(texts)


def test_batches_cut_by_padded_tokens_and_items(model):
    texts = [("panda " * (3 + (i * 7) % 40)).strip() for i in range(40)]
    budget = 128
    queue = model.start_queue(max_wait_ms=200, max_batch_tokens=budget, max_batch_items=5)
    futs = [model.submit("encode", [t]) for t in texts]
    for f, t in zip(futs, texts):
        np.testing.assert_allclose(f.result(timeout=60), model.encode([t]), atol=1e-5, rtol=0)
    recent = queue.stats()["recent_calls"]
    assert sum(r[1] for r in recent) == len(texts)
    for requests, items, padded, _ in recent:
        assert items <= 5 and (padded <= budget or requests == 1), recent
    longest = max(len(s) for s in model.tokenizer.encode(texts, model.max_length))
    assert bucket_for(longest, model.length_buckets) * 5 > budget  # the token budget did cut some batches
    assert any(items < 5 for _, items, _, _ in recent[:-1])


def test_standalone_queue_context_manager(model):
    with TokenQueue(model, max_wait_ms=1) as q:
        np.testing.assert_allclose(q.submit("encode", ["a", "b"]).result(timeout=30), model.encode(["a", "b"]),
                                   atol=1e-5, rtol=0)
    assert q.closed


# ---- the other runtime families, on tiny exported models -------------------------------------
RERANK_PAIRS = [("what is panda?", "hi"), ("what is panda?", "The giant panda is a bear species endemic to China."),
                ("北京", "北京是中华人民共和国的首都。"), ("", "empty query"), ("BM25", "panda " * 600)]


@pytest.fixture(scope="module")
def cross_art(tmp_path_factory) -> str:
    import tiny_models
    from bgert.export import export

    root = tmp_path_factory.mktemp("queue-cross")
    return export(tiny_models.build_cross_encoder(str(root)), str(root / "art"), progress=False)


@pytest.fixture(scope="module")
def m3_art(tmp_path_factory) -> str:
    import tiny_models
    from bgert.export import export

    root = tmp_path_factory.mktemp("queue-m3")
    return export(tiny_models.build_m3(str(root)), str(root / "art"), progress=False)


def test_reranker_acompute_score_equals_alone(cross_art):
    from bgert.runtime import Reranker

    rr = Reranker(cross_art, intra_op_num_threads=1)
    rr.start_queue(max_wait_ms=50)
    reqs = [(RERANK_PAIRS[i % 5], {}) for i in range(5)] + [(RERANK_PAIRS[:3], {}), (RERANK_PAIRS[2:], {}),
                                                            (RERANK_PAIRS[1:4], {"normalize": True}), ([], {})]

    async def main():
        return await asyncio.gather(*(rr.acompute_score(a, **kw) for a, kw in reqs))

    got = asyncio.run(main())
    assert rr.queue.stats()["calls"] <= 3  # plain, normalized, and the empty request merged in
    for (a, kw), g in zip(reqs, got):
        alone = rr.compute_score(a, **kw)
        assert isinstance(g, list) and len(g) == len(alone) and np.allclose(g, alone, atol=1e-5, rtol=0), (a, kw)
    rr.close()


def test_m3_aencode_dict_outputs_equal_alone(m3_art):
    from bgert.runtime import M3Embedder

    m3 = M3Embedder(m3_art, intra_op_num_threads=1)
    m3.start_queue(max_wait_ms=50)
    kw = {"return_dense": True, "return_sparse": True, "return_colbert_vecs": True}
    reqs = [(t, kw) for t in TEXTS_MIX[:5]] + [(TEXTS_MIX[3:], kw), (TEXTS_MIX[:2], {})]

    async def main():
        enc = [m3.aencode(a, **k) for a, k in reqs]
        return await asyncio.gather(*enc, m3.acompute_score(RERANK_PAIRS[:2]), m3.acompute_score(RERANK_PAIRS[1]),
                                    m3.acompute_score(RERANK_PAIRS, batch_size=2))

    *got, scores, one, quirk = asyncio.run(main())
    for (a, k), g in zip(reqs, got):
        alone = m3.encode(a, **k)
        assert g.keys() == alone.keys(), a
        for key, v in alone.items():
            if v is None:
                assert g[key] is None
            elif key == "lexical_weights":
                ref = [v] if isinstance(a, str) else v
                out = [g[key]] if isinstance(a, str) else g[key]
                assert all(x.keys() == y.keys() and all(abs(x[t] - y[t]) <= 1e-5 for t in x) for x, y in zip(out, ref))
            else:
                assert close_to(g[key], v), (a, key)
    assert close_to(scores, m3.compute_score(RERANK_PAIRS[:2]))
    assert isinstance(one["dense"], float) and close_to(one, m3.compute_score(RERANK_PAIRS[1]))
    # the ColBERT padding quirk depends on the call's own pairs and batch_size only, so calls merge
    assert close_to(quirk, m3.compute_score(RERANK_PAIRS, batch_size=2))
    assert m3.queue.stats()["calls"] < len(reqs) + 3
    m3.close()
