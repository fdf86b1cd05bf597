"""One loaded model shared by 8 threads: 1,000 calls, each identical to its single-threaded result.

Every call asks for something different (its own texts, sizes, max_length, queries or passages, a
single string or a list), so a result handed to the wrong caller, a race in lazy session or
tokenizer creation, or a batch mixed across calls shows up as a mismatch. Calls start behind a
barrier so the first ones race to create the ORT session. The token budget bounds every graph
run under concurrency (each run's padded tokens are recorded), which is what bounds ORT's working
memory; peak RSS itself is measured by the bench.
"""
from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from bgert.runtime import Embedder

THREADS = 8
CALLS = 1_000
WORDS = ["panda", "bear", "bamboo", "北京", "Москва", "שלום", "🐼", "retrieval", "embedding", "the", "of"]


def make_calls(n: int, seed: int = 0) -> list[dict]:
    """n distinct requests: texts tagged with the call number, of many lengths and shapes."""
    rng = random.Random(seed)
    calls = []
    for k in range(n):
        texts = [f"call {k} item {j}: " + " ".join(rng.choice(WORDS) for _ in range(rng.choice([0, 3, 20, 200])))
                 for j in range(rng.randint(1, 6))]
        calls.append({"method": rng.choice(["encode", "encode_queries", "encode_corpus"]),
                      "texts": texts[0] if rng.random() < 0.2 else texts,
                      "max_length": rng.choice([None, None, 16, 64])})
    return calls


def call(model: Embedder, c: dict) -> np.ndarray:
    return getattr(model, c["method"])(c["texts"], max_length=c["max_length"])


@pytest.fixture(scope="module")
def calls_and_reference(tiny_bge_art):
    calls = make_calls(CALLS)
    single = Embedder(tiny_bge_art, token_budget=512)
    return calls, [call(single, c) for c in calls]


def test_eight_threads_share_one_model(tiny_bge_art, calls_and_reference):
    calls, reference = calls_and_reference
    model = Embedder(tiny_bge_art, token_budget=512, verify=False)  # fresh: sessions are created under load
    padded_tokens: list[tuple[int, int]] = []
    barrier = threading.Barrier(THREADS)
    runs_wrapped = threading.Event()

    def record_runs() -> None:
        backend = model.backend_for(model.graph())
        run = backend.run

        def recording_run(feeds, output_names):
            padded_tokens.append(feeds["input_ids"].shape)
            return run(feeds, output_names)

        backend.run = recording_run
        runs_wrapped.set()

    def worker(k: int) -> list[tuple[int, np.ndarray]]:
        if k < THREADS:  # the first call of each thread waits for all: they race to create the session
            barrier.wait()
        if k == THREADS:
            record_runs()
        return call(model, calls[k])

    with ThreadPoolExecutor(THREADS) as pool:
        results = list(pool.map(worker, range(CALLS)))
    assert len(model._backends) == 1  # one session, however many threads asked at once
    mismatched = [k for k, (got, want) in enumerate(zip(results, reference))
                  if got.shape != want.shape or got.dtype != np.float32 or not np.array_equal(got, want)]
    assert not mismatched, f"{len(mismatched)} calls differ from single-threaded, first: {mismatched[:5]}"
    assert runs_wrapped.is_set() and len(padded_tokens) > CALLS // 2
    over = [(b, n) for b, n in padded_tokens if b > 1 and b * n > model.token_budget]
    assert not over, f"runs over the token budget of {model.token_budget}: {over[:5]}"


def test_threads_with_different_max_lengths_share_the_tokenizer(tiny_bge_art):
    """Truncating tokenizers are made lazily per max_length; 8 threads ask for new ones at once."""
    model = Embedder(tiny_bge_art, verify=False)
    text = "panda " * 300
    lengths = list(range(3, 3 + 4 * THREADS))
    want = {n: Embedder(tiny_bge_art, verify=False).encode(text, max_length=n) for n in lengths}
    barrier = threading.Barrier(THREADS)

    def worker(i: int) -> list[bool]:
        barrier.wait()
        return [np.array_equal(model.encode(text, max_length=n), want[n]) for n in lengths[i::THREADS] * 3]

    with ThreadPoolExecutor(THREADS) as pool:
        assert all(all(ok) for ok in pool.map(worker, range(THREADS)))
    # one tokenizer per length asked for, besides the model's own (made with the model)
    assert sorted(model.tokenizer._truncating) == sorted({(n, "right") for n in lengths} | {(model.max_length, "right")})
