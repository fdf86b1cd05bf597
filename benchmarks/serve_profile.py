"""Where a live ``bgert serve`` spends its time under load: per-thread CPU, runnable threads, py-spy stacks.

    python -m bgert.benchmarks.serve_profile --artifact /tmp/serve/minilm --clients 1,16,64 \
        --out benchmarks/results --name serve_profile_before

Starts ``bgert serve ART`` (flags after ``--serve-args``), and for each client count drives it with
the closed-loop load generator (bgert.benchmarks.loadgen, its own process) sending single SciFact
queries. During the counted window it samples, every 10 ms, the state and CPU ticks of every thread
of the server (/proc/PID/task/*/stat: which threads burn the cores, how many are runnable at once
against the cores there are), and records the server with py-spy twice at once (``--threads``:
where each Python thread is when it is not idle; ``--gil``: which thread holds the GIL, and how
often any does). Writes ``NAME.json`` and ``NAME.md``. Needs py-spy (``pip install py-spy``);
Python-level stacks only (ORT's own threads are not Python threads: /proc covers them).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from .serve_bench import query_pool, start_bgert, stop, cell_spec, wait_ready

TICK = os.sysconf("SC_CLK_TCK")


class ThreadSampler:
    """Samples /proc/PID/task/*/stat every ``interval`` s: per thread its state and CPU ticks."""

    def __init__(self, pid: int, interval: float = 0.01):
        self.pid, self.interval = pid, interval
        self.first: dict[int, int] = {}
        self.last: dict[int, int] = {}
        self.names: dict[int, str] = {}
        self.running: collections.Counter = collections.Counter()
        self.runnable_hist: collections.Counter = collections.Counter()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _read(self) -> dict[int, tuple[str, int]]:
        out = {}
        base = f"/proc/{self.pid}/task"
        for tid in os.listdir(base):
            try:
                with open(f"{base}/{tid}/stat") as f:
                    s = f.read()
            except OSError:
                continue
            name = s[s.index("(") + 1:s.rindex(")")]
            fields = s[s.rindex(")") + 2:].split()
            out[int(tid)] = (fields[0], int(fields[11]) + int(fields[12]))
            self.names.setdefault(int(tid), name)
        return out

    def _loop(self) -> None:
        while not self._stop.is_set():
            now = self._read()
            for tid, (state, ticks) in now.items():
                self.first.setdefault(tid, ticks)
                self.last[tid] = ticks
                if state == "R":
                    self.running[tid] += 1
            self.runnable_hist[sum(1 for st, _ in now.values() if st == "R")] += 1
            self.samples += 1
            self._stop.wait(self.interval)

    def start(self) -> None:
        self.t0 = time.perf_counter()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.wall = time.perf_counter() - self.t0

    def summary(self, py_names: dict[int, str]) -> dict[str, Any]:
        rows = []
        for tid in self.last:
            cores = (self.last[tid] - self.first[tid]) / TICK / self.wall
            rows.append({"tid": tid, "name": py_names.get(tid) or f"native ({self.names.get(tid, '?')})", "cores": cores,
                         "running_share": self.running[tid] / max(1, self.samples)})
        rows.sort(key=lambda r: -r["cores"])
        mean_runnable = sum(k * v for k, v in self.runnable_hist.items()) / max(1, self.samples)
        return {"threads": rows, "process_cores": sum(r["cores"] for r in rows), "mean_runnable": mean_runnable,
                "runnable_histogram": {str(k): v / max(1, self.samples) for k, v in sorted(self.runnable_hist.items())}}


_LINE = re.compile(r"^thread \((?:0x)?([0-9a-fA-F]+)\): ?([^;]*);(.*) (\d+)$")


def parse_raw(path: str) -> tuple[dict[int, str], list[tuple[int, list[str], int]]]:
    """py-spy ``--format raw --threads``: thread names by tid, and (tid, frames root first, samples)."""
    names, stacks = {}, []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            m = _LINE.match(line.rstrip("\n"))
            if not m:
                continue
            tid = int(m.group(1), 16) if m.group(1).lower().startswith("7f") else int(m.group(1))
            names[tid] = m.group(2)
            stacks.append((tid, [fr.strip() for fr in m.group(3).split(";")], int(m.group(4))))
    return names, stacks


def _short(frame: str) -> str:
    """``func (path/file.py:line)`` -> ``func (file.py)``: one row per function, not per line."""
    m = re.match(r"(.*) \((.*?):\d+\)$", frame)
    return f"{m.group(1)} ({m.group(2)})" if m else frame


def top_frames(stacks: list[tuple[int, list[str], int]], names: dict[int, str], n: int = 12) -> dict[str, Any]:
    """Per thread name: samples, and the top functions by self and by inclusive share of its samples."""
    per: dict[str, dict[str, Any]] = {}
    for tid, frames, count in stacks:
        name = names.get(tid, str(tid))
        d = per.setdefault(name, {"samples": 0, "self": collections.Counter(), "incl": collections.Counter()})
        d["samples"] += count
        short = [_short(f) for f in frames]
        d["self"][short[-1]] += count
        for f in set(short):
            d["incl"][f] += count
    out = {}
    for name, d in sorted(per.items(), key=lambda kv: -kv[1]["samples"]):
        total = d["samples"]
        out[name] = {"samples": total,
                     "self": [(f, c / total) for f, c in d["self"].most_common(n)],
                     "inclusive": [(f, c / total) for f, c in d["incl"].most_common(3 * n)
                                   if not f.startswith(("Thread.", "_run_module", "_run_code", "<module>", "main ("))][:n]}
    return out


def scrape(url: str) -> dict[str, float]:
    """Sums and counts of the queue's histograms from /metrics (batch items, requests, padded tokens,
    inference, queue wait and tokenise seconds)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url.rsplit("/", 2)[0] + "/metrics", timeout=30) as r:
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name.endswith(("_sum", "_count")) and fam.name in (
                    "bgert_batch_size", "bgert_batch_requests", "bgert_batch_tokens", "bgert_inference_seconds",
                    "bgert_queue_seconds", "bgert_tokenization_seconds"):
                out[s.name] = out.get(s.name, 0.0) + s.value
    return out


def batch_stats(before: dict[str, float], after: dict[str, float], wall: float) -> dict[str, float]:
    """Per queue batch over a window: mean items, requests, padded tokens, run ms; batches/s; the worker's
    busy share (inference seconds per second); mean queue wait and tokenise ms per request."""
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    n = max(1.0, d.get("bgert_batch_size_count", 0.0))
    reqs = max(1.0, d.get("bgert_queue_seconds_count", 0.0))
    return {"batches_per_s": d.get("bgert_batch_size_count", 0.0) / wall,
            "items_per_batch": d.get("bgert_batch_size_sum", 0.0) / n,
            "requests_per_batch": d.get("bgert_batch_requests_sum", 0.0) / n,
            "padded_tokens_per_batch": d.get("bgert_batch_tokens_sum", 0.0) / n,
            "batch_run_ms": 1000 * d.get("bgert_inference_seconds_sum", 0.0) / n,
            "worker_busy": d.get("bgert_inference_seconds_sum", 0.0) / wall,
            "queue_wait_ms": 1000 * d.get("bgert_queue_seconds_sum", 0.0) / reqs,
            "tokenize_ms": 1000 * d.get("bgert_tokenization_seconds_sum", 0.0) / max(
                1.0, d.get("bgert_tokenization_seconds_count", 0.0))}


def profile_cell(url: str, pid: int, clients: int, bodies: list[dict], seconds: float, warmup: float,
                 rate: int, workdir: str) -> dict[str, Any]:
    """One load cell with the sampler and both py-spy records running through its counted window."""
    spec = cell_spec(url, bodies, clients, seconds, warmup)
    gen = subprocess.Popen([sys.executable, "-m", "bgert.benchmarks.loadgen"], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, text=True)
    gen.stdin.write(json.dumps(spec))
    gen.stdin.close()
    time.sleep(warmup)
    sampler = ThreadSampler(pid)
    raw, gil = os.path.join(workdir, f"threads-{clients}.txt"), os.path.join(workdir, f"gil-{clients}.txt")
    spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    dur = max(1, int(seconds) - 1)
    common = ["--pid", str(pid), "--nonblocking", "--format", "raw", "-d", str(dur), "-r", str(rate)]
    spies = [subprocess.Popen([spy, "record", *common, "--threads", "-o", raw], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL),
             subprocess.Popen([spy, "record", *common, "--threads", "--gil", "-o", gil], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)]
    sampler.start()
    metrics0 = scrape(url)
    spy_cpu = 0.0
    for p in spies:
        _, _, ru = os.wait4(p.pid, 0)
        spy_cpu += ru.ru_utime + ru.ru_stime
    sampler.stop()
    batches = batch_stats(metrics0, scrape(url), sampler.wall)
    load = json.loads(gen.stdout.read().strip().splitlines()[-1])
    gen.wait()
    names, stacks = parse_raw(raw)
    gnames, gstacks = parse_raw(gil)
    gil_samples = sum(c for _, _, c in gstacks)
    gil_by_thread = collections.Counter()
    for tid, _, c in gstacks:
        gil_by_thread[gnames.get(tid, str(tid))] += c
    expected = rate * dur
    return {"clients": clients, "load": load, "threads": sampler.summary({**names, **gnames}),
            "py_spy_cores": spy_cpu / sampler.wall, "batches": batches,
            "gil_held_share": gil_samples / expected,
            "gil_by_thread": {k: v / expected for k, v in gil_by_thread.most_common()},
            "gil_frames": top_frames(gstacks, gnames), "frames": top_frames(stacks, names)}


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# {result['title']}", "", f"Command: `{result['command']}`", "",
             f"Server: `{result['server_command']}` (commit {result['commit']}). Machine: {result['machine']}. "
             f"Load average {result['load_average']['before']} before, {result['load_average']['after']} after.",
             "", "Each cell: single SciFact queries from closed-loop clients (bgert.benchmarks.loadgen, own process), "
             f"{result['seconds']} s counted after {result['warmup']} s warm-up. During the window: /proc per-thread "
             f"CPU and state every 10 ms; py-spy at {result['rate']} Hz (all threads, and GIL holder only).", ""]
    lines += ["| clients | req/s | p50 ms | p99 ms | server cores | client cores | py-spy cores | mean runnable threads "
              "(2 cores) | GIL held |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in result["cells"]:
        lo, th = c["load"], c["threads"]
        lines.append(f"| {c['clients']} | {lo['requests_per_s']:.1f} | {lo['p50_ms']:.1f} | {lo['p99_ms']:.1f} | "
                     f"{th['process_cores']:.2f} | {lo['client_cores']:.3f} | {c['py_spy_cores']:.3f} | "
                     f"{th['mean_runnable']:.2f} | {c['gil_held_share']:.0%} |")
    lines += ["", "The queue's batches in the window (from /metrics): batches/s, mean items and padded tokens per "
              "batch, mean run time of a batch (all its graph runs), the worker's busy share, mean queue wait and "
              "tokenise time per request.", "",
              "| clients | batches/s | items/batch | padded tokens/batch | batch run ms | worker busy | queue wait ms "
              "| tokenise ms |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in result["cells"]:
        b = c["batches"]
        lines.append(f"| {c['clients']} | {b['batches_per_s']:.1f} | {b['items_per_batch']:.1f} | "
                     f"{b['padded_tokens_per_batch']:.0f} | {b['batch_run_ms']:.2f} | {b['worker_busy']:.0%} | "
                     f"{b['queue_wait_ms']:.2f} | {b['tokenize_ms']:.3f} |")
    for c in result["cells"]:
        lines += ["", f"## {c['clients']} clients", "", "Threads (cores: CPU seconds per second; R: share of samples "
                  "in state R):", "", "| thread | tid | cores | R |", "|---|---:|---:|---:|"]
        for t in c["threads"]["threads"]:
            if t["cores"] >= 0.005 or t["running_share"] >= 0.01:
                lines.append(f"| {t['name']} | {t['tid']} | {t['cores']:.3f} | {t['running_share']:.0%} |")
        hist = ", ".join(f"{k}: {v:.0%}" for k, v in c["threads"]["runnable_histogram"].items())
        lines += ["", f"Runnable threads at once (share of samples): {hist}.", "",
                  "GIL held, by thread (share of wall time): " +
                  (", ".join(f"{k} {v:.0%}" for k, v in c["gil_by_thread"].items()) or "none") + ".", ""]
        for name, d in list(c["gil_frames"].items())[:3]:
            lines += [f"GIL held by **{name}**: top functions by self share of its GIL samples:", ""]
            lines += [f"- {s:.0%} {f}" for f, s in d["self"][:10]] + [""]
            lines += [f"  inclusive: " + "; ".join(f"{f} {s:.0%}" for f, s in d["inclusive"][:10]), ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from .machine import command_line, describe, machine_info
    from .report import write_report
    from .serve_bench import git_commit

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", required=True)
    p.add_argument("--clients", default="1,16,64")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--name", default="serve_profile")
    p.add_argument("--title", default="bgert serve under load: profile")
    p.add_argument("--serve-args", nargs=argparse.REMAINDER, default=[], help="flags for bgert serve")
    args = p.parse_args(argv)
    load_before = open("/proc/loadavg").read().split()[:3]
    server = start_bgert(args.artifact, args.serve_args, tempfile.mkdtemp(prefix="bgert-prof-"))
    if not wait_ready(server):
        stop(server)
        raise SystemExit(f"bgert serve did not start; see {server['log']}")
    bodies = [{"model": "model", "input": [q]} for q in query_pool()]
    cells = []
    with tempfile.TemporaryDirectory() as work:
        try:
            for c in (int(x) for x in args.clients.split(",")):
                cells.append(profile_cell(server["url"], server["proc"].pid, c, bodies, args.seconds, args.warmup,
                                          args.rate, work))
                lo = cells[-1]["load"]
                print(f"{c} clients: {lo['requests_per_s']:.1f} req/s p50 {lo['p50_ms']:.1f} ms, server "
                      f"{cells[-1]['threads']['process_cores']:.2f} cores, GIL {cells[-1]['gil_held_share']:.0%}",
                      flush=True)
        finally:
            stop(server)
    result = {"title": args.title, "command": command_line(), "server_command": " ".join(server["cmd"]),
              "commit": git_commit(), "machine": describe(machine_info()), "seconds": args.seconds,
              "warmup": args.warmup, "rate": args.rate,
              "load_average": {"before": load_before, "after": open("/proc/loadavg").read().split()[:3]},
              "cells": cells}
    write_report(args.out, args.name, result, markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
