"""Serving under load: merged graph runs (bgert.runtime.batching.merge_runs) cover every item once within
the limits and never cost more than one run per bucket; a queue with two lanes gives every caller what
encoding alone gives; and a real ``bgert serve`` on loopback, driven by the benchmark's own load
generator (bgert.benchmarks.loadgen), answers 64 concurrent clients with distinct texts each with its
own rows (cosine to the in-process row of its text above that to any other text's), and past a tiny
``--max-queue-items`` answers only 200 or 429, dropping no connection."""
from __future__ import annotations

import asyncio
import json
import threading
import urllib.request

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bgert.runtime import Embedder
from bgert.runtime.batching import merge_runs, plan_batches

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from test_server import Server  # noqa: E402


# ---- merged runs, as pure functions ---------------------------------------------------------------
def _cost(batches, run_cost: int) -> int:
    return sum(run_cost + len(b.indices) * b.length for b in batches)


@settings(max_examples=200, deadline=None)
@given(lengths=st.lists(st.integers(1, 300), max_size=200), budget=st.integers(1, 20_000),
       max_batch=st.one_of(st.none(), st.integers(1, 64)), run_cost=st.integers(0, 200),
       multiple_of=st.sampled_from([1, 8]))
def test_merge_runs_covers_every_item_within_limits_and_never_costs_more(lengths, budget, max_batch, run_cost,
                                                                         multiple_of):
    buckets = list(range(8, 300, 8)) + [300]
    plain = plan_batches(lengths, buckets, budget, max_batch, multiple_of)
    merged = merge_runs(plain, run_cost, budget, max_batch)
    seen = sorted(i for b in merged for i in b.indices.tolist())
    assert seen == list(range(len(lengths)))
    for b in merged:
        parts = [p for p in plain if set(p.indices.tolist()) <= set(b.indices.tolist())]
        assert sum(len(p.indices) for p in parts) == len(b.indices)  # whole batches of the plain plan
        assert b.length == max(p.length for p in parts) >= max(lengths[i] for i in b.indices)
        if len(parts) > 1:
            assert len(b.indices) * b.length <= budget and (max_batch is None or len(b.indices) <= max_batch)
    assert len(merged) <= len(plain)
    assert _cost(merged, run_cost) <= _cost(plain, run_cost)
    if run_cost == 0:
        assert len(merged) == len(plain)


def test_merge_runs_joins_a_few_short_requests_into_one_run():
    lengths = [9, 17, 25, 12, 14, 10]  # three buckets (16, 24, 32)
    plain = plan_batches(lengths, list(range(8, 257, 8)), 16384, 256)
    assert [len(b.indices) for b in plain] == [1, 1, 4]
    # a run costing 100 tokens: one run of 6 x 32 (292) beats three (420) and two (328)
    merged = merge_runs(plain, 100, 16384, 256)
    assert _cost(merged, 100) == 292 < _cost(plain, 100) == 420
    assert len(merged) == 1 and merged[0].length == 32 and sorted(merged[0].indices.tolist()) == list(range(6))
    assert [len(b.indices) for b in merge_runs(plain, 16, 16384, 256)] == [2, 4]  # 160 < 168
    assert len(merge_runs(plan_batches([250, 9], list(range(8, 257, 8)), 16384, 256), 16, 16384, 256)) == 2


# ---- lanes, in process -------------------------------------------------------------------------------
def test_two_lanes_give_every_caller_what_encoding_alone_gives(tiny_bge_art):
    m = Embedder(tiny_bge_art, intra_op_num_threads=1)
    texts = [f"lane text {i} " + "panda " * (i % 23) for i in range(300)]
    want = m.encode(texts)
    q = m.start_queue(lanes=2)
    assert len(q._threads) == 2

    async def main():
        return await asyncio.gather(*(m.aencode(t) for t in texts))

    got = asyncio.run(main())
    futs = [m.submit("encode", [t]) for t in texts[:50]]
    assert all(np.abs(g - w).max() <= 1e-5 for g, w in zip(got, want))
    assert all(np.abs(f.result(30)[0] - w).max() <= 1e-5 for f, w in zip(futs, want))
    assert q.stats()["calls"] < len(texts) + 50  # requests shared graph runs
    m.close()
    assert not any(t.is_alive() for t in q._threads)


# ---- the real server on loopback, under the load generator ---------------------------------------
def _cell(url: str, bodies: list[dict], clients: int, seconds: float, check=None):
    import orjson

    from bgert.benchmarks.loadgen import run_cell

    raw = [orjson.dumps(b) for b in bodies]
    return asyncio.run(run_cell(url, raw, [len(b["input"]) for b in bodies], clients, seconds, 0.0, check))


@pytest.fixture(scope="module")
def loaded(tiny_bge_art):
    s = Server(["bge"], [tiny_bge_art])
    yield s
    s.stop()


def test_64_clients_with_distinct_texts_each_get_their_own_rows(loaded, tiny_bge_art):
    rng = np.random.default_rng(0)
    texts = [" ".join("".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=rng.integers(2, 9)))
                      for _ in range(rng.integers(2, 12))) for _ in range(700)]
    local = Embedder(tiny_bge_art, intra_op_num_threads=1)
    ref = local.encode_corpus(texts)
    near = ref @ ref.T
    np.fill_diagonal(near, -1)
    keep = near.max(1) < 0.999  # the tiny random model maps a few texts to one vector: not told apart
    texts, ref = [t for t, k in zip(texts, keep) if k], ref[keep]
    assert len(texts) >= 600
    bodies = [{"model": "bge", "input": [t]} for t in texts]
    wrong: list[int] = []
    answered: list[int] = []
    lock = threading.Lock()

    def check(i: int, status: int, data: bytes) -> bool:
        row = np.asarray(json.loads(data)["data"][0]["embedding"], dtype=np.float32)
        cos = ref @ row / (np.linalg.norm(ref, axis=1) * np.linalg.norm(row))
        ok = int(np.argmax(cos)) == i and cos[i] >= 0.9999
        with lock:
            (answered if ok else wrong).append(i)
        return ok

    cell = _cell(loaded.url + "/v1/embeddings", bodies, 64, 2.0, check)
    assert not wrong, f"{len(wrong)} answers held another text's row, first: {wrong[:5]}"
    assert cell.requests >= 200 and set(cell.statuses) == {200}, cell.summary()
    assert cell.dropped == 0
    assert len(set(answered)) >= 200  # distinct texts, each answered with its own row


def test_past_a_tiny_queue_only_200_or_429(tiny_bge_art):
    s = Server(["bge"], [tiny_bge_art], "--max-queue-items", "4", "--max-batch-requests", "2", "--lanes", "1")
    try:
        texts = [f"busy {i} " + "panda " * (20 + i % 40) for i in range(256)]
        bodies = [{"model": "bge", "input": [t, t + " again"]} for t in texts]
        cell = _cell(s.url + "/v1/embeddings", bodies, 64, 2.0)
        assert set(cell.statuses) <= {200, 429} and cell.statuses[429] > 0 and cell.statuses[200] > 0, cell.statuses
        assert cell.dropped == 0
        with urllib.request.urlopen(s.url + "/info", timeout=30) as r:
            info = json.loads(r.read())
        rt = info["models"][0]["runtime"]
        assert rt["lanes"] == 1 and rt["precision"] and rt["backend"] == "ort" and rt["variant_reason"]
    finally:
        assert s.stop() == 0
