"""``bgert serve`` under load, side by side with infinity-emb and with offline batches of the same artifact.

    python -m bgert.benchmarks.serve_bench --artifact /tmp/serve/minilm              # everything
    python -m bgert.benchmarks.serve_bench --shapes single --clients 1,16,64,256 --servers bgert
    python -m bgert.benchmarks.serve_bench --soak 600 --servers bgert                 # RSS over 10 min

The bundled all-MiniLM-L6-v2: its bgert artifact behind ``bgert serve`` with default flags (the
runtime's default variant and threads), and the same checkpoint behind infinity-emb (its ONNX/optimum
and its torch engine; infinity runs from its own environment, benchmarks/envs/infinity, made by
``--make-infinity-env``, never our venv). Each server is its own process, all started before the
first cell and idle between cells; every cell (clients × request shape) is measured for every server
in turn, rounds interleaved. Two shapes: one SciFact-like query per request (a pool of distinct
texts: the SciFact test queries, then corpus sentences of query length), and 32 SciFact documents
per request. Clients: bgert.benchmarks.loadgen (raw asyncio streams, kept-alive HTTP/1.1, closed
loop, its own process, its CPU time reported per cell), OpenAI ``/embeddings`` requests; every 200
answer is checked to hold its own rows (cosine >= 0.999 to the offline row of each of its texts).

The ceiling: offline ``Embedder.encode(texts, batch_size=32)`` of the same pools with the same
artifact in a process of its own (before and after the server cells), and the in-process latency of
one query. Since a server's batch holds at most one query per client, in the order they come, the
queries also get the in-process rate of the batch shapes a server meets: length-sorted batches of 16,
and calls of 8, 16 or 32 random queries run as the queue runs a batch. Results: JSON + Markdown + PNG
(items/s and p99 against clients) in benchmarks/results.

``bgert serve`` truncates over-long documents by default (``--auto-truncate``); ``--request-truncate``
also sends the per-request ``truncate: true`` (for a server run with ``--no-auto-truncate``, or an older
bgert that refused them by default).
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
INFINITY_ENV = os.path.join(HERE, "envs", "infinity")
SERVERS = ("bgert", "bgert-before", "infinity-optimum", "infinity-torch")
SHAPES = {"single": "single query", "docs": "32 documents"}
DOCS_PER_REQUEST = 32


# ---- texts -----------------------------------------------------------------------------------------
def _scifact(name: str) -> list[dict[str, Any]]:
    path = os.path.join(HERE, "data", "scifact", name)
    opener = gzip.open if name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def query_pool(n: int = 3000) -> list[str]:
    """``n`` distinct query-length texts: the 300 SciFact test queries, then sentences of the SciFact
    corpus of 6 to 30 words (claims are sentences of that length), in file order."""
    out = [q["text"] for q in _scifact("queries.jsonl")]
    seen = set(out)
    for d in _scifact("corpus.jsonl.gz"):
        for s in re.split(r"(?<=[.!?])\s+", d["text"]):
            if len(out) >= n:
                return out
            if 6 <= len(s.split()) <= 30 and s not in seen:
                seen.add(s)
                out.append(s)
    return out


def doc_pool(n: int = 512) -> list[str]:
    """The first ``n`` SciFact documents (title + abstract; most are longer than 256 tokens)."""
    return [(d["title"] + " " + d["text"]).strip() for d in _scifact("corpus.jsonl.gz")[:n]]


def doc_windows(n_docs: int, per: int = DOCS_PER_REQUEST, step: int = 8) -> list[tuple[int, int]]:
    """(start, stop) of each request's documents: windows of ``per`` documents every ``step`` (distinct
    requests, so concurrent clients never send the same body)."""
    return [(i, i + per) for i in range(0, n_docs - per + 1, step)]


# ---- servers ---------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def git_commit() -> str:
    """The checkout's commit (with ``-dirty`` when it has uncommitted changes), or "unknown"."""
    try:
        sha = subprocess.run(["git", "-C", HERE, "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", HERE, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _popen(kind: str, cmd: list[str], env: dict[str, str], log_dir: str, url: str, cwd: str | None = None
           ) -> dict[str, Any]:
    log = open(os.path.join(log_dir, f"{kind}.log"), "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    return {"kind": kind, "url": url, "proc": proc, "log": log.name, "cmd": cmd}


def start_bgert(art: str, flags: list[str], log_dir: str, threads: int | None = None, python: str | None = None,
                kind: str = "bgert") -> dict[str, Any]:
    """``bgert serve ART`` on a free loopback port with ``flags`` (default flags otherwise); ``python``: the
    interpreter of another checkout's environment (``bgert-before``: the code before a change)."""
    port = free_port()
    cmd = [python or sys.executable, "-m", "bgert.cli", "serve", art, "--name", "model", "--host", "127.0.0.1",
           "--port", str(port), "--log-level", "info", *(["--threads", str(threads)] if threads else []), *flags]
    # another checkout's interpreter runs from a neutral folder: started here, `-m bgert` would find this checkout
    return _popen(kind, cmd, dict(os.environ), log_dir, f"http://127.0.0.1:{port}/v1/embeddings",
                  cwd=log_dir if python else None)


def start_infinity(engine: str, ckpt: str, threads: int, log_dir: str) -> dict[str, Any]:
    """infinity-emb v2 with ``engine`` (optimum or torch) on the checkpoint, batch size 32, ``threads``."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0"}
    # run from the checkpoint folder as ".": infinity 0.0.78 hands optimum 2.x an absolute ONNX file name
    # for a local path, which optimum then cannot find; a relative one works
    cmd = [os.path.join(INFINITY_ENV, "bin", "infinity_emb"), "v2", "--model-id", ".", "--served-model-name",
           "model", "--engine", engine, "--device", "cpu", "--host", "127.0.0.1", "--port", str(port),
           "--batch-size", "32", "--pooling-method", "mean"]
    cmd += ["--onnx-do-not-prefer-quantized"] if engine == "optimum" else ["--dtype", "float32", "--no-bettertransformer"]
    return _popen(f"infinity-{engine}", cmd, env, log_dir, f"http://127.0.0.1:{port}/embeddings", cwd=ckpt)


def wait_ready(s: dict[str, Any], timeout: float = 600) -> bool:
    """Poll with a one-text request until the server answers 200 (False: it exited or timed out)."""
    body = json.dumps({"model": "model", "input": ["ready?"]}).encode()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if s["proc"].poll() is not None:
            return False
        try:
            req = urllib.request.Request(s["url"], body, {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=30) as r:
                if r.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    return False


def stop(s: dict[str, Any]) -> int | None:
    """SIGTERM, then wait (kill after 60 s); the exit code."""
    if s["proc"].poll() is None:
        s["proc"].send_signal(signal.SIGTERM)
        try:
            s["proc"].wait(60)
        except subprocess.TimeoutExpired:
            s["proc"].kill()
            s["proc"].wait(10)
    return s["proc"].returncode


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kb / 1024.0


def infinity_checkpoint(ckpt: str, env: str = INFINITY_ENV) -> str:
    """A copy of the checkpoint with the plain ONNX export infinity's optimum engine loads (it does not
    export by itself): optimum-cli from infinity's env, transformers layout (last_hidden_state)."""
    import shutil

    out = os.path.join(os.path.dirname(env), "minilm-ckpt")
    if not os.path.isfile(os.path.join(out, "model.onnx")):
        shutil.copytree(ckpt, out, dirs_exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([os.path.join(env, "bin", "optimum-cli"), "export", "onnx", "--model", out, "--task",
                            "feature-extraction", "--library-name", "transformers", tmp], check=True,
                           capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            shutil.move(os.path.join(tmp, "model.onnx"), os.path.join(out, "model.onnx"))
    return out


def make_infinity_env(env: str = INFINITY_ENV) -> str:
    """infinity-emb in its own venv, with the CPU torch 2.13.0 the project pins."""
    if not os.path.isfile(os.path.join(env, "bin", "infinity_emb")):
        subprocess.run([sys.executable, "-m", "venv", env], check=True)
        subprocess.run([os.path.join(env, "bin", "pip"), "install", "-q", "torch==2.13.0",
                        "infinity-emb[server,optimum,torch]"], check=True)
    return env


def _infinity_versions() -> dict[str, str]:
    py = os.path.join(INFINITY_ENV, "bin", "python")
    if not os.path.isfile(py):
        return {}
    code = ("import json; from importlib.metadata import version as v\n"
            "print(json.dumps({p: v(p) for p in ('infinity-emb', 'torch', 'optimum', 'onnxruntime')}))")
    try:
        return json.loads(subprocess.run([py, "-c", code], capture_output=True, text=True, timeout=60).stdout)
    except (ValueError, subprocess.SubprocessError):
        return {}


# ---- cells ------------------------------------------------------------------------------------------
def cell_spec(url: str, bodies: list[dict[str, Any]], clients: int, seconds: float, warmup: float,
              refs: str | None = None, min_cos: float = 0.999) -> dict[str, Any]:
    """The loadgen spec of one cell (bgert.benchmarks.loadgen.main)."""
    return {"url": url, "bodies": bodies, "clients": clients, "seconds": seconds, "warmup": warmup,
            "refs": refs, "min_cos": min_cos}


def measure(server: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    """One cell from the load-generator process, with the server's CPU cores and RSS over it."""
    pid = server["proc"].pid
    cpu0, t0 = proc_cpu(pid), time.perf_counter()
    timeout = spec["seconds"] + spec["warmup"] + 900
    out = subprocess.run([sys.executable, "-m", "bgert.benchmarks.loadgen"], input=json.dumps(spec),
                         capture_output=True, text=True, check=True, timeout=timeout)
    cell = json.loads(out.stdout.strip().splitlines()[-1])
    cell["server_cores"] = (proc_cpu(pid) - cpu0) / (time.perf_counter() - t0)
    cell["server_rss_mb"] = rss_mb(pid)
    return cell


_OFFLINE = r"""
import json, sys, time
import numpy as np
from bgert.runtime import load
from bgert.runtime.token_queue import DEFAULT_RUN_COST_TOKENS
spec = json.loads(sys.stdin.read())
m = load(spec["art"], **({"intra_op_num_threads": spec["threads"]} if spec["threads"] else {}))
out = {"precision": m.precision, "backend": m.backend_name}
m.encode(["warm up"] * 8, batch_size=32)
for name, texts in spec["pools"].items():
    t = time.perf_counter(); vecs = m.encode(texts, batch_size=32); first = time.perf_counter() - t
    if spec["refs"].get(name):
        np.save(spec["refs"][name], vecs.astype(np.float32))
    n, secs = len(texts), first
    while secs < spec["seconds"]:
        t = time.perf_counter(); m.encode(texts, batch_size=32); secs += time.perf_counter() - t; n += len(texts)
    out[name] = {"items_per_s": n / secs, "items": n, "seconds": secs}
if "single" in spec["pools"]:  # what a server's batches can be: at most one query per client, as they come
    texts = spec["pools"]["single"]
    n, secs = 0, 0.0
    while secs < spec["seconds"] / 2:
        t = time.perf_counter(); m.encode(texts, batch_size=16); secs += time.perf_counter() - t; n += len(texts)
    out["single_sorted_16"] = n / secs
    for k in (8, 16, 32):
        rng = np.random.default_rng(0)
        calls = [[texts[i] for i in rng.choice(len(texts), k, replace=False)] for _ in range(len(texts) // k)]
        n, secs = 0, 0.0
        while secs < spec["seconds"] / 4:
            for c in calls:
                t = time.perf_counter(); r = m.prepare("encode_corpus", c)
                m.run_items(r.job, r.items, run_cost_tokens=DEFAULT_RUN_COST_TOKENS)
                secs += time.perf_counter() - t; n += k
        out[f"single_random_{k}"] = n / secs
one = []
for q in spec["pools"].get("single", [])[:200]:
    t = time.perf_counter(); m.encode([q]); one.append(time.perf_counter() - t)
if one:
    out["one_query_ms"] = float(np.median(one) * 1000)
print(json.dumps(out))
"""


def offline(art: str, pools: dict[str, list[str]], threads: int | None, seconds: float,
            refs: dict[str, str] | None = None) -> dict[str, Any]:
    """``encode(pool, batch_size=32)`` items/s of each pool, in a process of its own; saves each pool's
    vectors to ``refs[name]`` (.npy) when given; ``one_query_ms``: the median latency of ``encode([q])``.
    For the queries also the batch shapes a server meets, since a batch holds at most one query per
    client: ``single_sorted_16`` (``encode(pool, batch_size=16)``, length-sorted batches of 16) and
    ``single_random_K`` (calls of K = 8, 16, 32 random queries, tokenised and run as the queue runs a batch:
    in a closed loop about half the clients' requests wait while the other half's batch runs)."""
    spec = {"art": art, "pools": pools, "threads": threads, "seconds": seconds, "refs": refs or {}}
    out = subprocess.run([sys.executable, "-c", _OFFLINE], input=json.dumps(spec), capture_output=True, text=True,
                         check=True, timeout=1800)
    return json.loads(out.stdout.strip().splitlines()[-1])


def aggregate(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Rounds of one (shape, clients, server) cell pooled: rates over the summed windows, the median of the
    rounds' latency percentiles, counts summed."""
    secs = sum(p["seconds"] for p in parts)
    med = lambda k: float(np.median([p[k] for p in parts if p[k] is not None])) if any(  # noqa: E731
        p[k] is not None for p in parts) else None
    statuses: dict[str, int] = {}
    for p in parts:
        for k, v in p["statuses"].items():
            statuses[k] = statuses.get(k, 0) + v
    return {"requests_per_s": sum(p["requests"] for p in parts) / secs,
            "items_per_s": sum(p["items"] for p in parts) / secs,
            "items_per_s_rounds": [p["items_per_s"] for p in parts],
            "p50_ms": med("p50_ms"), "p99_ms": med("p99_ms"), "p99_ms_rounds": [p["p99_ms"] for p in parts],
            "statuses": statuses, "wrong": sum(p["wrong"] for p in parts),
            "dropped": sum(p["dropped"] for p in parts),
            "client_cores": float(np.mean([p["client_cores"] for p in parts])),
            "server_cores": float(np.mean([p["server_cores"] for p in parts])),
            "server_rss_mb": max(p["server_rss_mb"] for p in parts), "rounds": len(parts),
            "seconds": secs}


# ---- report ---------------------------------------------------------------------------------------
def targets(result: dict[str, Any]) -> dict[str, str]:
    """The issue's targets, each with its measured figures and met / missed."""
    off, rows, out = result["offline"], result["rows"], {}

    def row(shape: str, clients: int, server: str = "bgert") -> dict[str, Any] | None:
        return next((r for r in rows if r["shape"] == SHAPES[shape] and r["clients"] == clients
                     and r["server"] == server), None)

    q_rate = off.get("single", {}).get("items_per_s")
    for c, bound in ((16, 2.0), (64, 4.0)):
        r = row("single", c)
        if r and q_rate:
            ratio, tail = r["items_per_s"] / q_rate, r["p99_ms"] / r["p50_ms"]
            refs = [("single_sorted_16", "offline batch-16")] if c < 32 else []
            refs += [(f"single_random_{k}", f"in-process calls of {k} random queries")
                     for k in sorted({min(c // 2, 32), min(c, 32)})]
            more = "".join(f"; {r['items_per_s'] / off[key]:.2f}x {what}" for key, what in refs if off.get(key))
            out[f"{c} clients, single queries: {ratio:.2f}x offline batch-32 (>= 0.85x), p99/p50 {tail:.2f} "
                f"(<= {bound:g}){more}"] = "met" if ratio >= 0.85 and tail <= bound else "missed"
    r, d_rate = row("docs", 16), off.get("docs", {}).get("items_per_s")
    if r and d_rate:
        ratio = r["items_per_s"] / d_rate
        flags = "per-request truncate" if result["options"]["request_truncate"] else "default flags"
        out[f"16 clients, 32-document requests ({flags}): {ratio:.2f}x offline documents/s (>= 0.85x)"] = (
            "met" if ratio >= 0.85 and r["statuses"].get("200") else "missed")
    r = row("single", 1)
    if r and off.get("one_query_ms"):
        ratio = r["p50_ms"] / off["one_query_ms"]
        out[f"1 client: p50 {r['p50_ms']:.1f} ms = {ratio:.2f}x the in-process latency of one query "
            f"({off['one_query_ms']:.1f} ms; <= 2x)"] = "met" if ratio <= 2.0 else "missed"
    for shape in SHAPES:
        r = row(shape, 256)
        if r:
            bad = {k: v for k, v in r["statuses"].items() if k not in ("200", "429")}
            out[f"256 clients, {SHAPES[shape]}: statuses {r['statuses']}, dropped {r['dropped']}, wrong rows "
                f"{r['wrong']} (only 200/429, none dropped or wrong)"] = (
                "met" if not bad and not r["dropped"] and not r["wrong"] else "missed")
    return out


def markdown(result: dict[str, Any]) -> str:
    from bgert.benchmarks.machine import describe

    o, off, la = result["options"], result["offline"], result["load_average"]
    lines = [
        "# bgert serve under load: vs infinity-emb and vs offline batches of the same artifact",
        "",
        f"Machine: {describe(result['machine'])}. Commit {result['commit']}. /proc/loadavg before: "
        f"{' '.join(la['before'])}; after: {' '.join(la['after'])} (a shared machine: compare within this run).",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Servers: {'; '.join(f'`{v}`' for v in result['commands'].values())}. bgert runs "
        f"{result.get('bgert_variant') or '?'}.",
        "",
        f"Cells: closed-loop clients (bgert.benchmarks.loadgen: raw asyncio streams, kept-alive HTTP/1.1, its own "
        f"process), {o['seconds']} s counted per cell and round after a warm-up ({o['warmup']} s, and for "
        f"documents at least one full turn of every client's request), {o['rounds']} round(s), servers "
        "interleaved; OpenAI `/embeddings`, every 200 checked for its own rows (cosine >= 0.999 to the offline "
        "row of each text). Client cores / server cores: CPU seconds per second of each process over the cell.",
        "",
        "Offline `encode(pool, batch_size=32)`, same artifact, own process, before / after the cells: " +
        "; ".join(f"{SHAPES[k]} {off[k]['items_per_s']:.1f} / {result['offline_after'].get(k, {}).get('items_per_s', float('nan')):.1f} items/s"
                  for k in SHAPES if k in off) +
        (f"; one query in-process: {off['one_query_ms']:.2f} ms." if off.get("one_query_ms") else "."),
        "",
    ]
    shapes = [("single_sorted_16", "16 length-sorted")] + [(f"single_random_{k}", f"{k} random") for k in (8, 16, 32)]
    if any(k in off for k, _ in shapes):
        lines += ["A batch holds at most one query per client, in the order they come (in a closed loop about half "
                  "the clients wait while the other half's batch runs), so the queries' ceiling depends on the "
                  "clients: before the cells, in-process batches of " +
                  ", ".join(f"{what} queries {off[k]:.1f}/s" for k, what in shapes if k in off) +
                  " (random: calls of K random queries tokenised and run as the queue runs a batch, "
                  "neighbouring length buckets merged).", ""]
    if result.get("missing"):
        lines += [f"Not measured: {'; '.join(f'{k}: {v}' for k, v in result['missing'].items())}.", ""]
    if result["rows"]:
        lines += ["| requests | clients | server | items/s | x offline | p50 ms | p99 ms | statuses | wrong | dropped | "
                  "client cores | server cores |", "|---|---:|---|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        key = next(k for k, v in SHAPES.items() if v == r["shape"])
        x = r["items_per_s"] / off[key]["items_per_s"] if key in off else float("nan")
        fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
        st = ", ".join(f"{k}: {v}" for k, v in r["statuses"].items())
        lines.append(f"| {r['shape']} | {r['clients']} | {r['server']} | {r['items_per_s']:.1f} | {x:.2f} | "
                     f"{fmt(r['p50_ms'])} | {fmt(r['p99_ms'])} | {st} | {r['wrong']} | {r['dropped']} | "
                     f"{r['client_cores']:.3f} | {r['server_cores']:.2f} |")
    if result.get("soak"):
        s = result["soak"]
        lines += ["", f"Soak: {s['clients']} clients of single queries for {s['seconds']:.0f} s: {s['items_per_s']:.1f} "
                  f"items/s, p50 {s['p50_ms']:.1f} ms, p99 {s['p99_ms']:.1f} ms, statuses {s['statuses']}, wrong "
                  f"{s['wrong']}, dropped {s['dropped']}; server RSS {s['rss_start_mb']:.1f} MB at the start of the "
                  f"window, {s['rss_end_mb']:.1f} MB at its end (max {s['rss_max_mb']:.1f} MB)."]
    if result["targets"]:
        lines += ["", "Targets:"] + [f"- {k}: **{v}**" for k, v in result["targets"].items()]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = [s for s in SHAPES.values() if any(r["shape"] == s for r in result["rows"])]
    if not shapes:
        return
    fig, axes = plt.subplots(2, len(shapes), figsize=(6 * len(shapes), 8), squeeze=False)
    for j, shape in enumerate(shapes):
        key = next(k for k, v in SHAPES.items() if v == shape)
        for k, server in enumerate(dict.fromkeys(r["server"] for r in result["rows"])):
            rows = [r for r in result["rows"] if r["shape"] == shape and r["server"] == server]
            if rows:
                x = [r["clients"] for r in rows]
                axes[0][j].plot(x, [r["items_per_s"] for r in rows], marker="o", color=f"C{k}", label=server)
                axes[1][j].plot(x, [r["p99_ms"] or np.nan for r in rows], marker="o", color=f"C{k}", label=server)
        if key in result["offline"]:
            axes[0][j].axhline(result["offline"][key]["items_per_s"], color="gray", linestyle="--",
                               label="offline encode(batch_size=32)")
        for i, unit in enumerate(("items/s", "p99 latency, ms")):
            ax = axes[i][j]
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrent clients")
            ax.set_ylabel(unit)
            ax.set_title(f"{shape}: {unit}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        axes[1][j].set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def soak(server: dict[str, Any], bodies: list[dict[str, Any]], refs: str, clients: int, seconds: float,
         warmup: float) -> dict[str, Any]:
    """One long cell; the server's RSS sampled every 5 s through it (start and end of the window)."""
    pid, samples, done = server["proc"].pid, [], threading.Event()

    def sample() -> None:
        t0 = time.perf_counter()
        while not done.wait(5.0):
            samples.append((time.perf_counter() - t0, rss_mb(pid)))

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        cell = measure(server, cell_spec(server["url"], bodies, clients, seconds, warmup, refs))
    finally:
        done.set()
        th.join()
    window = [(t, r) for t, r in samples if t >= warmup]
    return {**cell, "rss_series": samples, "rss_start_mb": window[0][1] if window else None,
            "rss_end_mb": window[-1][1] if window else None, "rss_max_mb": max(r for _, r in samples)}


def main(argv: list[str] | None = None) -> int:
    from bgert.benchmarks.concurrency import export_bundled
    from bgert.benchmarks.machine import command_line, machine_info
    from bgert.benchmarks.report import write_report
    from bgert.benchmarks.samples import bundled_model_dir

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", default="1,16,64,256")
    p.add_argument("--servers", default=",".join(SERVERS))
    p.add_argument("--shapes", default="single,docs", help="single (one query per request), docs (32 documents)")
    p.add_argument("--seconds", type=float, default=10.0, help="counted seconds per cell and round (>= 10)")
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--offline-seconds", type=float, default=20.0)
    p.add_argument("--threads", type=int, default=None,
                   help="threads of every server (default: bgert's own default; infinity and offline: usable cores)")
    p.add_argument("--serve-args", default="", help="more flags for bgert serve, e.g. '--max-queue-items 4096'")
    p.add_argument("--request-truncate", action="store_true",
                   help="send bgert's per-request truncate=true (needed where the server refuses over-long input)")
    p.add_argument("--queries", type=int, default=3000, help="distinct query texts in the pool")
    p.add_argument("--docs", type=int, default=512, help="distinct documents in the pool")
    p.add_argument("--soak", type=float, default=0.0, help="instead of cells: one run of this many seconds at "
                   "--soak-clients single-query clients, server RSS sampled through it")
    p.add_argument("--soak-clients", type=int, default=64)
    p.add_argument("--artifact", default=None, help="export the bundled model here (reused if present)")
    p.add_argument("--baseline-python", default=None,
                   help="also serve with this interpreter's bgert (another checkout's venv) as bgert-before")
    p.add_argument("--bgert-python", action="append", default=[], metavar="NAME=PYTHON",
                   help="also serve with this interpreter's bgert as server NAME (bgert-NAME), for A/B runs")
    p.add_argument("--bgert-flags", action="append", default=[], metavar="NAME=FLAGS",
                   help="also serve this checkout's bgert with these extra flags as bgert-NAME, e.g. "
                        "'lanes2=--lanes 2', for A/B runs of flags")
    p.add_argument("--make-infinity-env", action="store_true", help=f"install infinity-emb into {INFINITY_ENV}")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--name", default="serve_bench")
    args = p.parse_args(argv)
    load_before = open("/proc/loadavg").read().split()[:3]
    threads = args.threads
    other_threads = threads or len(os.sched_getaffinity(0))
    clients = [int(c) for c in args.clients.split(",")]
    others = dict(("bgert-" + n, py) for n, py in (x.split("=", 1) for x in args.bgert_python))
    if args.baseline_python:
        others["bgert-before"] = args.baseline_python
    flags = {"bgert-" + n: f.split() for n, f in (x.split("=", 1) for x in args.bgert_flags)}
    others.update({k: None for k in flags})
    wanted = [s for s in args.servers.split(",") if s and (s != "bgert-before" or args.baseline_python)] + [
        k for k in others if k != "bgert-before"]
    shapes = [s for s in args.shapes.split(",") if s] if not args.soak else ["single"]
    if args.make_infinity_env:
        make_infinity_env()
    art = export_bundled(args.artifact)
    ckpt = bundled_model_dir()
    work = tempfile.mkdtemp(prefix="bgert-serve-bench-")
    pools = {"single": query_pool(args.queries), "docs": doc_pool(args.docs)}
    pools = {k: v for k, v in pools.items() if k in shapes}
    ref_files = {k: os.path.join(work, f"{k}.npy") for k in pools}
    off = offline(art, pools, threads, args.offline_seconds, ref_files)
    print(f"offline: {json.dumps(off)}", flush=True)
    extra = {"truncate": True} if args.request_truncate else {}
    bodies: dict[str, dict[str, list]] = {}
    for k in pools:
        vecs = np.load(ref_files[k])
        if k == "single":
            spans = [(i, i + 1) for i in range(len(pools[k]))]
        else:
            spans = doc_windows(len(pools[k]))
        np.save(ref_files[k], np.stack([vecs[a:b] for a, b in spans]))
        texts = [pools[k][a:b] for a, b in spans]
        bodies[k] = {"bgert": [{"model": "model", "input": t, **extra} for t in texts],
                     "infinity": [{"model": "model", "input": t} for t in texts]}
    missing: dict[str, str] = {}
    servers = []
    have_infinity = os.path.isfile(os.path.join(INFINITY_ENV, "bin", "infinity_emb"))
    inf_ckpt = infinity_checkpoint(ckpt) if have_infinity and any(k.startswith("infinity") for k in wanted) else None
    for kind in wanted:
        if kind.startswith("infinity") and not have_infinity:
            missing[kind] = f"no infinity-emb env at {INFINITY_ENV}; run with --make-infinity-env"
            continue
        if kind.startswith("bgert"):
            s = start_bgert(art, args.serve_args.split() + flags.get(kind, []), work, threads, others.get(kind), kind)
        else:
            s = start_infinity(kind.split("-", 1)[1], inf_ckpt, other_threads, work)
        if wait_ready(s):
            servers.append(s)
        else:
            stop(s)
            with open(s["log"], encoding="utf-8", errors="replace") as f:
                tail = f.read()[-300:].strip().replace("\n", " | ")
            missing[kind] = f"did not start: {tail}"
    variant = None
    bg = next((s for s in servers if s["kind"] == "bgert"), None)
    if bg is not None:
        try:
            with urllib.request.urlopen(bg["url"].rsplit("/", 2)[0] + "/info", timeout=30) as r:
                info = json.loads(r.read())
            variant = info.get("runtime") or {k: info.get(k) for k in ("model_dtype",)}
        except (urllib.error.URLError, OSError, ValueError):
            pass
    rows, soak_result = [], None
    try:
        if args.soak:
            if bg is None:
                raise SystemExit("--soak needs the bgert server")
            soak_result = soak(bg, bodies["single"]["bgert"], ref_files["single"], args.soak_clients, args.soak,
                               args.warmup)
            print(json.dumps({k: v for k, v in soak_result.items() if k != "rss_series"}), flush=True)
        for shape in shapes if not args.soak else []:
            for c in clients:
                runs: dict[str, list] = {s["kind"]: [] for s in servers}
                warm = args.warmup
                if shape == "docs":  # every client's first request is answered before the window opens
                    warm = max(warm, 1.2 * c * DOCS_PER_REQUEST / off["docs"]["items_per_s"])
                for _ in range(args.rounds):
                    for s in servers:
                        b = bodies[shape]["bgert" if s["kind"].startswith("bgert") else "infinity"]
                        runs[s["kind"]].append(measure(s, cell_spec(s["url"], b, c, args.seconds, warm,
                                                                    ref_files[shape])))
                        time.sleep(0.5)  # ORT/OpenMP threads spin a little after a run
                for kind, parts in runs.items():
                    rows.append({"shape": SHAPES[shape], "clients": c, "server": kind, "warmup": warm,
                                 **aggregate(parts)})
                    print(json.dumps(rows[-1]), flush=True)
    finally:
        exits = {s["kind"]: stop(s) for s in servers}
    off_after = offline(art, pools, threads, args.offline_seconds) if rows else {}
    result = {"benchmark": "serve", "command": command_line(), "commit": git_commit(), "machine": machine_info(),
              "infinity_versions": _infinity_versions(), "artifact": art, "checkpoint": ckpt,
              "bgert_variant": variant,
              "options": {"threads": threads, "seconds": args.seconds, "warmup": args.warmup, "rounds": args.rounds,
                          "clients": clients, "shapes": shapes, "request_truncate": args.request_truncate,
                          "serve_args": args.serve_args, "queries": len(pools.get("single", [])),
                          "docs": len(pools.get("docs", []))},
              "commands": {s["kind"]: " ".join(s["cmd"]) for s in servers}, "exit_codes": exits,
              "load_average": {"before": load_before, "after": open("/proc/loadavg").read().split()[:3]},
              "offline": off, "offline_after": off_after, "rows": rows, "soak": soak_result, "missing": missing}
    result["targets"] = targets(result)
    stem = write_report(args.out, args.name, result, markdown(result))
    if rows:
        plot(result, stem + ".png")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
