"""``bgert tune``: time every gated variant that runs here, each in its own process, rounds interleaved, and
cache the result (bgert.runtime.tuning); ``explain`` says which variant a default load gets here and why."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

from .tuning import cache_path, fastest, machine_key, read_tuning

_WORDS = ("protein cell gene expression receptor signal pathway tumor patient trial dose response model "
          "analysis effect study level increase decrease risk factor associated clinical data").split()


def explain(model_dir: str, threads: int | None = None) -> str:
    """Which variant a default load gets on this machine (``backend="auto"`` and ``"ort"``), and why."""
    from .base import BF16_FLAGS, CPU_PREFERENCE, cpu_flags, default_precision
    from .manifest import read_manifest

    m = read_manifest(model_dir, verify=False)
    tuning = read_tuning(model_dir, threads)
    best = fastest(tuning, None, m.precisions())
    notes = []
    if "bf16" in m.precisions() and not set(BF16_FLAGS) & cpu_flags():
        notes.append("bf16 is not offered here: this CPU lacks amx_bf16 and avx512_bf16")
    if any(not g.gate_passed for g in m.graphs if g.precision == "bf16"):
        notes.append("bf16's gate was not passed or not measured at export, so it is never a default")
    if best is not None:
        rows = ", ".join(f"{r['backend']} {r['precision']} {r['score']:.0f}" for r in
                         sorted(tuning["variants"], key=lambda r: -r.get("score", 0)) if "score" in r)
        why = (f"{best['backend']} {best['precision']}: the fastest gated variant measured on this machine "
               f"({tuning['machine']}, {tuning['measured_at']}; texts/s, geometric mean of documents and queries: "
               f"{rows}); backend='ort' gets {default_precision(m, False, 'ort', tuning)}")
    else:
        why = (f"ort {default_precision(m, False)}: nothing measured on this machine ({machine_key(threads)}), so the "
               f"fixed order {'>'.join(CPU_PREFERENCE)} among gated graphs that run well on this CPU; "
               f"run `bgert tune {model_dir}` to measure")
    return "; ".join([why, *notes])


def synthetic_texts(n: int, words: int, seed: int) -> list[str]:
    """``n`` texts of about ``words`` words each (fixed, no data files needed)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(_WORDS, size=max(1, int(rng.integers(words // 2, words * 3 // 2 + 1)))))
            for _ in range(n)]


def time_variant(model_dir: str, backend: str, precision: str, threads: int | None, rounds: int = 3) -> dict[str, Any]:
    """Texts/s of one variant on documents (~180 words, batch 32) and queries (~10 words, batch 32), best of
    ``rounds``; ``score`` is their geometric mean (both matter for retrieval)."""
    from . import load

    model = load(model_dir, backend=backend, precision=precision, intra_op_num_threads=threads, verify=False)
    sets = {"documents": synthetic_texts(64, 180, 1), "queries": synthetic_texts(256, 10, 2)}
    call = _call(model)
    out: dict[str, Any] = {"backend": backend, "precision": precision}
    for name, texts in sets.items():
        call(texts[:8])  # warm-up: compile, allocate
        best = float("inf")
        for _ in range(rounds):
            t0 = time.perf_counter()
            call(texts)
            best = min(best, time.perf_counter() - t0)
        out[f"{name}_per_s"] = len(texts) / best
    out["score"] = (out["documents_per_s"] * out["queries_per_s"]) ** 0.5
    return out


def _call(model: Any) -> Any:
    if hasattr(model, "compute_score"):
        return lambda texts: model.compute_score([(t[:40], t) for t in texts], batch_size=32)
    return lambda texts: model.encode(texts, batch_size=32)


def candidates(model_dir: str) -> list[tuple[str, str]]:
    """(backend, precision) pairs worth timing here: gated, runnable on this CPU and backend."""
    from .base import graph_backend, graph_runs_well_here
    from .manifest import read_manifest
    from .openvino_backend import openvino_available

    m = read_manifest(model_dir, verify=False)
    backends = ["ort"] + (["openvino"] if openvino_available() else [])
    out = []
    for b in backends:
        for p in m.precisions():
            graphs = [g for g in m.graphs if g.precision == p]
            if p == "fp16" or not all(g.gate_passed and graph_runs_well_here(g) for g in graphs):
                continue  # fp16 is a GPU graph; a failed or unmeasured gate is never a default
            if all(graph_backend(g) in (b, "any") for g in graphs) or (b == "openvino" and p == "fp32"):
                out.append((b, p))
    return out


def tune(model_dir: str, threads: int | None = None, rounds: int = 3) -> dict[str, Any]:
    """Time every candidate variant, each in its own process, rounds interleaved; cache and return the result."""
    model_dir = os.path.abspath(model_dir)
    cands = candidates(model_dir)
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {c: [] for c in cands}
    for _ in range(rounds):  # interleaved: a slow spell of a shared machine hits every variant
        for b, p in cands:
            cmd = [sys.executable, "-m", "bgert.runtime.autotune", model_dir, b, p, str(threads or 0)]
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            if r.returncode != 0:
                runs[(b, p)].append({"error": (r.stderr.strip().splitlines() or ["failed"])[-1]})
            else:
                runs[(b, p)].append(json.loads(r.stdout.strip().splitlines()[-1]))
    variants = []
    for (b, p), rs in runs.items():
        ok = [r for r in rs if "score" in r]
        if not ok:
            variants.append({"backend": b, "precision": p, "error": rs[-1].get("error")})
            continue
        variants.append({"backend": b, "precision": p,
                         **{k: max(r[k] for r in ok) for k in ("documents_per_s", "queries_per_s", "score")}})
    result = {"machine": machine_key(threads), "threads": threads, "rounds": rounds, "variants": variants,
              "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    best = fastest(result, None, [v["precision"] for v in variants])
    result["choice"] = {"backend": best["backend"], "precision": best["precision"]} if best else None
    path = cache_path(model_dir, threads)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, path)
    result["cache"] = path
    return result


if __name__ == "__main__":  # one variant, timed in this process (called by tune)
    art, be, prec, n = sys.argv[1:5]
    print(json.dumps(time_variant(art, be, prec, int(n) or None, rounds=1)))
