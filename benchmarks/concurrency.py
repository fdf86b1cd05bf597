"""Online serving: many concurrent callers, each sending one short text, with and without the
token-counted queue (bgert.runtime.token_queue), on the bundled all-MiniLM-L6-v2 on CPU.

    python -m bgert.benchmarks.concurrency                       # 1, 8, 64, 256 callers, 4 s each
    python -m bgert.benchmarks.concurrency --callers 64 --seconds 10 --max-wait-ms 2

Each caller is a closed loop: send a SciFact query, wait for its vector, send the next. Modes:
``per-call``: one thread per caller calling ``model.encode([text])`` directly (what a threaded
service does without a batcher); ``batched-async``: one asyncio task per caller awaiting
``model.aencode(text)``; ``batched-sync``: one thread per caller blocking on
``model.submit("encode", text).result()``. All modes share one model (one ORT session) and run
back to back in one process, so their ratios are comparable even on a noisy machine.
Reported per mode and caller count: throughput (requests/s), p50/p99 latency, and for the
batcher the model calls it made (mean items per call, median and p90 call time). The latency
target checked is p99 < max_wait_ms + 2 x (median batch run time).
Results: benchmarks/results/concurrency_cpu.{json,md,png}.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import threading
import time
from typing import Any, Callable

import numpy as np

MODES = ("per-call", "batched-async", "batched-sync")


def _percentiles(lat: list[float]) -> dict[str, float]:
    a = np.asarray(lat) * 1000.0
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "mean_ms": float(a.mean()), "max_ms": float(a.max())}


def _closed_loop_threads(callers: int, seconds: float, texts: list[str],
                         call: Callable[[str], Any]) -> tuple[list[float], float]:
    """``callers`` threads calling ``call(text)`` back to back for ``seconds``; (latencies, wall)."""
    lat: list[list[float]] = [[] for _ in range(callers)]
    start = threading.Barrier(callers + 1)
    stop_at = [0.0]

    def caller(k: int) -> None:
        start.wait()
        i = k
        while time.perf_counter() < stop_at[0]:
            t = time.perf_counter()
            call(texts[i % len(texts)])
            lat[k].append(time.perf_counter() - t)
            i += callers

    threads = [threading.Thread(target=caller, args=(k,), daemon=True) for k in range(callers)]
    for th in threads:
        th.start()
    t0 = time.perf_counter()
    stop_at[0] = t0 + seconds
    start.wait()
    for th in threads:
        th.join()
    return [x for per in lat for x in per], time.perf_counter() - t0


def _closed_loop_async(callers: int, seconds: float, texts: list[str], model: Any) -> tuple[list[float], float]:
    """``callers`` asyncio tasks awaiting ``model.aencode(text)`` back to back for ``seconds``."""
    lat: list[float] = []

    async def caller(k: int, stop_at: float) -> None:
        i = k
        while time.perf_counter() < stop_at:
            t = time.perf_counter()
            await model.aencode(texts[i % len(texts)])
            lat.append(time.perf_counter() - t)
            i += callers

    async def main() -> float:
        t0 = time.perf_counter()
        await asyncio.gather(*(caller(k, t0 + seconds) for k in range(callers)))
        return time.perf_counter() - t0

    wall = asyncio.run(main())
    return lat, wall


def measure(model: Any, mode: str, callers: int, seconds: float, warmup: float, texts: list[str],
            max_wait_ms: float) -> tuple[list[float], float, float, dict[str, Any] | None]:
    """Warm up, then run ``callers`` closed-loop callers for ``seconds``.

    Returns (latencies, wall seconds, CPU seconds of this process, the batcher's stats or None).
    """
    def once(s: float) -> tuple[list[float], float]:
        if mode == "per-call":
            return _closed_loop_threads(callers, s, texts, lambda t: model.encode([t]))
        if mode == "batched-sync":
            return _closed_loop_threads(callers, s, texts, lambda t: model.submit("encode", t).result())
        return _closed_loop_async(callers, s, texts, model)

    if warmup > 0:
        once(warmup)
    batcher = model.start_queue(max_wait_ms=max_wait_ms) if mode != "per-call" else None  # fresh counters
    cpu = time.process_time()
    lat, wall = once(seconds)
    cpu = time.process_time() - cpu
    return lat, wall, cpu, batcher.stats() if batcher else None


def summarise(mode: str, callers: int, runs: list[tuple[list[float], float, float, dict[str, Any] | None]],
              max_wait_ms: float) -> dict[str, Any]:
    """One table row from the rounds of one (mode, callers) pair."""
    lat = [x for r in runs for x in r[0]]
    wall = sum(r[1] for r in runs)
    cpu = sum(r[2] for r in runs)
    row: dict[str, Any] = {"mode": mode, "callers": callers, "requests": len(lat), "seconds": wall,
                           "throughput_rps": len(lat) / wall, "cpu_s": cpu,
                           "cpu_ms_per_request": 1000.0 * cpu / len(lat), **_percentiles(lat)}
    if mode != "per-call":
        stats = [r[3] for r in runs]
        calls = sum(st["calls"] for st in stats)
        run_ms = np.asarray([c[3] for st in stats for c in st["recent_calls"]]) * 1000.0  # last <= 4096 per round
        p50 = float(np.percentile(run_ms, 50))
        row.update(model_calls=calls, items_per_call=sum(st["items"] for st in stats) / calls,
                   batch_run_p50_ms=p50, batch_run_p90_ms=float(np.percentile(run_ms, 90)),
                   p99_target_ms=max_wait_ms + 2 * p50)
        row["p99_ok"] = row["p99_ms"] < row["p99_target_ms"]
    return row


def export_bundled(out: str | None) -> str:
    """The bundled all-MiniLM-L6-v2 exported to ``out`` (reused when a manifest is there)."""
    from bgert.benchmarks.samples import bundled_model_dir
    from bgert.export import export

    out = out or os.path.join(tempfile.mkdtemp(prefix="bgert-conc-"), "all-MiniLM-L6-v2")
    if not os.path.isfile(os.path.join(out, "manifest.json")):
        export(bundled_model_dir(), out, progress=False)
    return out


def markdown(result: dict[str, Any]) -> str:
    from bgert.benchmarks.machine import describe

    o = result["options"]
    lines = [
        "# Online serving: concurrent callers, per-call encode vs the micro-batcher",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Machine: {describe(result['machine'])}. Model: {result['model']} ({result['precision']}), "
        f"ORT CPU, intra_op_num_threads={o['threads']}. Each caller sends one SciFact query at a time "
        f"(closed loop), {o['seconds']} s per row in {o['rounds']} rounds that interleave the modes, after "
        f"{o['warmup']} s warm-up; batcher max_wait_ms={o['max_wait_ms']}. All rows ran in one process on a "
        "shared machine: compare the ratios within a caller count, not absolute numbers across runs. "
        f"1-minute load average: {result['load_average']['before'][0]:.1f} before, "
        f"{result['load_average']['after'][0]:.1f} after.",
        "",
        "| callers | mode | throughput (req/s) | vs per-call | CPU ms/request | p50 (ms) | p99 (ms) | items/call | "
        "batch run p50 (ms) | p99 target (ms) | p99 ok |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["rows"]:
        base = next(b for b in result["rows"] if b["callers"] == r["callers"] and b["mode"] == "per-call")
        batched = r["mode"] != "per-call"
        lines.append(
            f"| {r['callers']} | {r['mode']} | {r['throughput_rps']:.0f} | "
            f"{r['throughput_rps'] / base['throughput_rps']:.2f}x | {r['cpu_ms_per_request']:.1f} | "
            f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
            + (f"{r['items_per_call']:.1f} | {r['batch_run_p50_ms']:.1f} | {r['p99_target_ms']:.1f} | "
               f"{'yes' if r['p99_ok'] else 'no'} |" if batched else "1 | | | |"))
    lines += ["", "CPU ms/request: CPU time of the whole process (all threads) per request; unlike "
              "throughput it does not depend on the share of the cores the process got from the machine's "
              "other load. Target (64 callers): batched throughput >= 3x per-call, and p99 < max_wait_ms + "
              "2 x batch run p50.", ""]
    for k, v in result["targets"].items():
        lines.append(f"- {k}: {v}")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for k, mode in enumerate(MODES):
        rows = [r for r in result["rows"] if r["mode"] == mode]
        if not rows:
            continue
        x, color = [r["callers"] for r in rows], f"C{k}"
        axes[0].plot(x, [r["throughput_rps"] for r in rows], marker="o", color=color, label=mode)
        axes[1].plot(x, [r["cpu_ms_per_request"] for r in rows], marker="o", color=color, label=mode)
        axes[2].plot(x, [r["p99_ms"] for r in rows], marker="o", color=color, label=f"{mode} p99")
        axes[2].plot(x, [r["p50_ms"] for r in rows], marker=".", linestyle="--", color=color, label=f"{mode} p50")
    for ax, title, unit in zip(axes, ("throughput", "CPU time per request", "latency"),
                               ("requests/s", "CPU ms/request", "ms")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent callers")
        ax.set_ylabel(unit)
        ax.set_title(f"{result['model']} CPU: {title}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[1].set_ylim(bottom=0)
    axes[2].set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from bgert.benchmarks.machine import command_line, machine_info
    from bgert.benchmarks.report import write_report
    from bgert.benchmarks.samples import sample_texts
    from bgert.runtime import Embedder

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--callers", default="1,8,64,256", help="comma-separated caller counts")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of: {', '.join(MODES)}")
    p.add_argument("--seconds", type=float, default=4.0, help="measured seconds per row")
    p.add_argument("--warmup", type=float, default=0.5, help="warm-up seconds per row")
    p.add_argument("--rounds", type=int, default=2, help="rounds per caller count, modes interleaved")
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (default: usable cores)")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--artifact", default=None, help="export the bundled model here (reused if present)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--name", default="concurrency_cpu", help="result file stem")
    args = p.parse_args(argv)
    threads = args.threads or len(os.sched_getaffinity(0))
    callers = [int(c) for c in args.callers.split(",")]
    modes = [m for m in args.modes.split(",") if m]
    if "per-call" not in modes or any(m not in MODES for m in modes):
        p.error(f"--modes must include per-call (the baseline) and name only: {', '.join(MODES)}")
    art = export_bundled(args.artifact)
    _, queries = sample_texts()
    model = Embedder(art, precision=args.precision, intra_op_num_threads=threads)
    batcher = model.start_queue(max_wait_ms=args.max_wait_ms)
    load_before = os.getloadavg()
    rows = []
    for c in callers:
        runs: dict[str, list] = {m: [] for m in modes}
        for r in range(args.rounds):  # modes interleaved, so a load change on the machine hits them alike
            for mode in modes:
                runs[mode].append(measure(model, mode, c, args.seconds / args.rounds,
                                          args.warmup if r == 0 else 0.0, queries, args.max_wait_ms))
        for mode in modes:
            rows.append(summarise(mode, c, runs[mode], args.max_wait_ms))
            print(json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in rows[-1].items()}),
                  flush=True)
    model.close()
    targets = {}
    for mode in modes[1:] if 64 in callers else []:
        base = next(r for r in rows if r["callers"] == 64 and r["mode"] == "per-call")
        r = next(r for r in rows if r["callers"] == 64 and r["mode"] == mode)
        ratio = r["throughput_rps"] / base["throughput_rps"]
        targets[f"64 callers, {mode}: throughput {ratio:.2f}x per-call (>= 3x)"] = "met" if ratio >= 3 else "missed"
        targets[f"64 callers, {mode}: p99 {r['p99_ms']:.1f} ms < {r['p99_target_ms']:.1f} ms"] = (
            "met" if r["p99_ok"] else "missed")
    result = {"benchmark": "concurrency", "command": command_line(), "machine": machine_info(),
              "model": os.path.basename(os.path.normpath(art)), "artifact": art, "precision": model.precision,
              "options": {"threads": threads, "seconds": args.seconds, "warmup": args.warmup,
                          "rounds": args.rounds, "max_wait_ms": args.max_wait_ms,
                          "max_batch_items": batcher.max_batch_items, "max_batch_tokens": batcher.max_batch_tokens,
                          "texts": "SciFact queries sample (bgert.benchmarks/data)"},
              "load_average": {"before": load_before, "after": os.getloadavg()},
              "rows": rows, "targets": targets}
    stem = write_report(args.out, args.name, result, markdown(result))
    plot(result, stem + ".png")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
