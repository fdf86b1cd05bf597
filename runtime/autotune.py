"""Measuring which gated variant is fastest here: ``bgert tune``, and the short measurement of the first default
load (``measure_once``); ``explain`` says which variant a default load gets here and why.

Every variant is timed in its own process, one after another (ORT's and OpenMP's worker threads spin after a
run and would slow a neighbour; two at once would share the cores), on synthetic documents (~300 words: past
MiniLM's 256 tokens, as most retrieval passages are) and queries (~10 words) through the public encode / compute_score calls, tokenising included, each timed batch new
to the variant (a repeated batch hides the cost of a new shape, which OpenVINO's int8 graphs pay). A variant's score
is the geometric mean of its documents/s and queries/s. The result goes to the cache of bgert.runtime.tuning.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from .tuning import fastest, machine_key, measure, read_tuning, tune_mode, variant_override

_WORDS = ("protein cell gene expression receptor signal pathway tumor patient trial dose response model "
          "analysis effect study level increase decrease risk factor associated clinical data").split()


def explain(model_dir: str, threads: int | None = None) -> str:
    """Which variant a default load gets on this machine, and why."""
    from .base import BF16_FLAGS, cpu_flags, cpu_preference, default_precision
    from .manifest import read_manifest

    m = read_manifest(model_dir, verify=False)
    tuning = read_tuning(model_dir, threads)
    best = fastest(tuning, None, m.precisions())
    notes = []
    env_backend, env_precision = variant_override()
    if env_precision:
        notes.append(f"BGERT_VARIANT={os.environ['BGERT_VARIANT']} overrides the choice below for loads that name "
                     "no precision")
    if "bf16" in m.precisions() and not set(BF16_FLAGS) & cpu_flags():
        notes.append("bf16 is not offered here: this CPU lacks amx_bf16 and avx512_bf16")
    if any(not g.gate_passed for g in m.graphs if g.precision == "bf16"):
        notes.append("bf16's gate was not passed or not measured at export, so it is never a default")
    if best is not None:
        rows = ", ".join(f"{r['backend']} {r['precision']} {r['score']:.0f}" for r in
                         sorted(tuning["variants"], key=lambda r: -r.get("score", 0)) if "score" in r)
        why = (f"{best['backend']} {best['precision']}: the fastest gated variant measured on this machine "
               f"({tuning['machine']}, {tuning['measured_at']}, {tuning.get('how', 'bgert tune')}; texts/s, "
               f"geometric mean of documents and queries: {rows}); backend='ort' gets "
               f"{default_precision(m, False, 'ort', tuning)}")
    else:
        when = ("BGERT_TUNE=off" if tune_mode() == "off" else
                f"the first default load measures it, or `bgert tune {model_dir}`")
        why = (f"ort {default_precision(m, False)}: nothing measured on this machine ({machine_key(threads)}; "
               f"{when}), so the fixed order {'>'.join(cpu_preference())} among gated graphs that run well on this CPU")
    return "; ".join([why, *notes])


#: words per synthetic document: most SciFact passages pass a 256-token max length, and shorter documents rank the
#: variants differently (OpenVINO bf16 gains the most from long rows: 110 against ORT int8-vnni's 69 docs/s at 256
#: tokens, 98 against 102 at ~200, on the AMX Xeon of benchmarks/results/cpu_variants_all-MiniLM-L6-v2.md)
DOC_WORDS = 300


def synthetic_texts(n: int, words: int, seed: int) -> list[str]:
    """``n`` texts of about ``words`` words each (fixed, no data files needed)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(_WORDS, size=max(1, int(rng.integers(words // 2, words * 3 // 2 + 1)))))
            for _ in range(n)]


def _rate(call: Any, sets: list[list[str]], seconds: float) -> float:
    """Texts/s of ``call`` over the text sets in turn (one call each, cycling) for about ``seconds`` (one call at
    least): each set pads to shapes the others do not, as a corpus's batches do (OpenVINO's int8 graphs take
    up to 2x longer on a shape they have not run yet, ORT's about the same)."""
    n, spent, i = 0, 0.0, 0
    while spent < seconds or i == 0:
        texts = sets[i % len(sets)]
        t0 = time.perf_counter()
        call(texts)
        spent, n, i = spent + time.perf_counter() - t0, n + len(texts), i + 1
    return n / spent


def time_variant(model_dir: str, backend: str, precision: str, threads: int | None,
                 seconds: float = 2.0) -> dict[str, Any]:
    """Texts/s of one variant on documents (~300 words, up to 32 a batch) and queries (~10 words, 32 a batch)
    for about ``seconds`` in all, after a warm-up (compiles, allocations); the timed texts are new to it."""
    from . import load

    model = load(model_dir, backend=backend, precision=precision, intra_op_num_threads=threads, verify=False)
    call = _call(model)
    warm = synthetic_texts(32, DOC_WORDS, 0)
    call(warm[:2])  # the first call compiles and allocates: too slow to size the batches by
    t0 = time.perf_counter()
    call(warm[:2])
    per_doc = (time.perf_counter() - t0) / 2
    # batches of 32 (the benchmarks' size: a smaller one ranks the variants differently) unless one would take
    # longer than all the time given (a big model)
    n_docs = max(2, min(32, int(seconds / max(per_doc, 1e-6))))
    call(warm[:n_docs])
    call(synthetic_texts(32, 10, 0))
    docs = [synthetic_texts(n_docs, DOC_WORDS, seed) for seed in range(1, 9)]
    queries = [synthetic_texts(32, 10, seed) for seed in range(101, 109)]
    out: dict[str, Any] = {"backend": backend, "precision": precision,
                           "documents_per_s": _rate(call, docs, seconds / 2),
                           "queries_per_s": _rate(call, queries, seconds / 2)}
    out["score"] = (out["documents_per_s"] * out["queries_per_s"]) ** 0.5
    return out


def _call(model: Any) -> Any:
    if hasattr(model, "compute_score"):
        return lambda texts: model.compute_score([(t[:40], t) for t in texts], batch_size=32)
    return lambda texts: model.encode(texts, batch_size=32)


def candidates(model_dir: str) -> list[tuple[str, str]]:
    """(backend, precision) pairs worth timing here (bgert.runtime.base.tune_candidates)."""
    from .base import tune_candidates
    from .manifest import read_manifest

    return tune_candidates(read_manifest(model_dir, verify=False))


def tune(model_dir: str, threads: int | None = None, rounds: int = 3, seconds: float = 2.0) -> dict[str, Any]:
    """``bgert tune``: every candidate variant, ``rounds`` interleaved rounds of ``seconds`` each; cached."""
    return measure(model_dir, candidates(model_dir), threads, rounds, seconds, how="bgert tune")


if __name__ == "__main__":  # one variant, timed in this process (called by tune)
    art, be, prec, n, secs = sys.argv[1:6]
    print(json.dumps(time_variant(art, be, prec, int(n) or None, float(secs))))
