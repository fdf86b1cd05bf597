"""``bgert serve`` against infinity-emb over loopback, same checkpoint, same threads; plus offline encode.

The bundled all-MiniLM-L6-v2 behind ``bgert serve`` (its ONNX artifact) and behind infinity-emb
(the same checkpoint, with its ONNX/optimum engine and its torch engine; infinity runs from its
own environment, benchmarks/envs/infinity, made by ``--make-infinity-env``, never our venv).
Each server is its own process, all started before the first measurement and kept idle between
them; each cell (1, 16, 64 concurrent clients sending single SciFact queries, or 32-document
requests) is measured for every server in turn, rounds interleaved. Clients are closed loops of
OpenAI ``/embeddings`` requests on one asyncio loop in a separate process (httpx), bounded by
time. The same run measures the offline ``Embedder.encode(batch_size=32)`` throughput of the same
short queries, in a process of its own: the ceiling the queue must reach (target: bgert at 64
clients >= 0.9x of it).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
INFINITY_ENV = os.path.join(HERE, "envs", "infinity")
SERVERS = ("bgert", "infinity-optimum", "infinity-torch")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_infinity_env(env: str = INFINITY_ENV) -> str:
    """infinity-emb in its own venv, with the CPU torch 2.13.0 the project pins (never a CUDA build)."""
    if not os.path.isfile(os.path.join(env, "bin", "infinity_emb")):
        subprocess.run([sys.executable, "-m", "venv", env], check=True)
        subprocess.run([os.path.join(env, "bin", "pip"), "install", "-q", "torch==2.13.0",
                        "infinity-emb[server,optimum,torch]"], check=True)
    return env


def infinity_checkpoint(ckpt: str, env: str = INFINITY_ENV) -> str:
    """A copy of the checkpoint with the plain ONNX export infinity's optimum engine loads (it does
    not export by itself): optimum-cli from infinity's env, transformers layout (last_hidden_state)."""
    out = os.path.join(os.path.dirname(env), "minilm-ckpt")
    if not os.path.isfile(os.path.join(out, "model.onnx")):
        import shutil

        shutil.copytree(ckpt, out, dirs_exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([os.path.join(env, "bin", "optimum-cli"), "export", "onnx", "--model", out, "--task",
                            "feature-extraction", "--library-name", "transformers", tmp], check=True,
                           capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            shutil.move(os.path.join(tmp, "model.onnx"), os.path.join(out, "model.onnx"))
    return out


def start(kind: str, art: str, ckpt: str, threads: int, log_dir: str) -> dict[str, Any]:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0"}
    if kind == "bgert":
        cmd = [sys.executable, "-m", "bgert.cli", "serve", art, "--name", "model", "--host", "127.0.0.1",
               "--port", str(port), "--threads", str(threads)]
        path = "/v1/embeddings"
        cwd = None
    else:
        # run from the checkpoint folder as "." : infinity 0.0.78 hands optimum 2.x an absolute ONNX file name
        # for a local path, which optimum then cannot find; a relative one works
        engine = kind.split("-", 1)[1]
        cmd = [os.path.join(INFINITY_ENV, "bin", "infinity_emb"), "v2", "--model-id", ".", "--served-model-name",
               "model", "--engine", engine, "--device", "cpu", "--host", "127.0.0.1", "--port", str(port),
               "--batch-size", "32", "--pooling-method", "mean"]
        cmd += (["--onnx-do-not-prefer-quantized"] if engine == "optimum"
                else ["--dtype", "float32", "--no-bettertransformer"])
        path, cwd = "/embeddings", ckpt
    log = open(os.path.join(log_dir, f"{kind}.log"), "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    return {"kind": kind, "port": port, "url": f"http://127.0.0.1:{port}{path}", "proc": proc, "log": log.name,
            "cmd": cmd}


def wait_ready(s: dict[str, Any], timeout: float = 600) -> bool:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if s["proc"].poll() is not None:
            return False
        try:
            if httpx.post(s["url"], json={"model": "model", "input": ["ready?"]}, timeout=30).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(1)
    return False


def stop(s: dict[str, Any]) -> None:
    if s["proc"].poll() is None:
        s["proc"].send_signal(signal.SIGTERM)
        try:
            s["proc"].wait(30)
        except subprocess.TimeoutExpired:
            s["proc"].kill()


# ---- the load generator (run in its own process: ``--load URL``) --------------------------------------
async def _load(url: str, clients: int, batches: list[list[str]], seconds: float, warmup: float,
                extra: dict[str, Any] | None = None) -> dict[str, Any]:
    import httpx

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    lat: list[float] = []
    texts = errors = 0
    async with httpx.AsyncClient(limits=limits, timeout=120) as c:
        t_start = time.perf_counter()
        t_measure, t_end = t_start + warmup, t_start + warmup + seconds

        async def loop(k: int) -> None:
            nonlocal texts, errors
            i = k
            while time.perf_counter() < t_end:
                batch = batches[i % len(batches)]
                i += clients
                t = time.perf_counter()
                try:
                    r = await c.post(url, json={"model": "model", "input": batch, **(extra or {})})
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                done = time.perf_counter()
                if t_measure <= done <= t_end:  # completed in the window (started before it or not)
                    if ok:
                        lat.append(done - t)
                        texts += len(batch)
                    else:
                        errors += 1

        await asyncio.gather(*(loop(k) for k in range(clients)))
    ms = np.asarray(lat) * 1000.0
    return {"requests": len(lat), "texts": texts, "errors": errors, "seconds": seconds,
            "p50_ms": float(np.percentile(ms, 50)) if len(ms) else None,
            "p99_ms": float(np.percentile(ms, 99)) if len(ms) else None}


def measure(url: str, clients: int, batches: list[list[str]], seconds: float, warmup: float,
            extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """One cell from a separate load-generator process (so the client's CPU is not the server's)."""
    spec = json.dumps({"url": url, "clients": clients, "batches": batches, "seconds": seconds, "warmup": warmup,
                       "extra": extra})
    out = subprocess.run([sys.executable, "-m", "bgert.benchmarks.serve_bench", "--load"], input=spec,
                         capture_output=True, text=True, check=True, timeout=seconds + warmup + 300)
    return json.loads(out.stdout.strip().splitlines()[-1])


def offline(art: str, texts: list[str], threads: int, seconds: float) -> dict[str, Any]:
    """``Embedder.encode(texts, batch_size=32)`` texts/s, in a process of its own."""
    code = (
        "import json,sys,time; from bgert.runtime import Embedder\n"
        f"m=Embedder({art!r}, intra_op_num_threads={threads}); t={json.dumps(texts)}\n"
        "m.encode(t, batch_size=32); n=0; s=time.perf_counter()\n"
        f"while time.perf_counter()-s < {seconds}: m.encode(t, batch_size=32); n+=len(t)\n"
        "print(json.dumps({'texts': n, 'seconds': time.perf_counter()-s}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=600)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return {"texts_per_s": r["texts"] / r["seconds"], **r}


def markdown(result: dict[str, Any]) -> str:
    from bgert.benchmarks.machine import describe

    o = result["options"]
    lines = [
        "# bgert serve vs infinity-emb: the bundled all-MiniLM-L6-v2 over loopback",
        "",
        f"Machine: {describe(result['machine'])}. Shared with other jobs (load average "
        f"{result['load_average']['before'][0]:.1f} before, {result['load_average']['after'][0]:.1f} after). "
        f"{o['threads']} threads per server; {o['seconds']} s per cell and round, {o['rounds']} rounds interleaved; "
        "OpenAI `/embeddings` requests from closed-loop clients in a separate process.",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Offline `Embedder.encode(batch_size=32)` of the same short queries: "
        f"{result['offline']['texts_per_s']:.1f} texts/s.",
        "",
    ]
    if result.get("missing"):
        lines += [f"Not measured: {', '.join(f'{k} ({v})' for k, v in result['missing'].items())}.", ""]
    lines += ["| requests | clients | server | requests/s | texts/s | p50 ms | p99 ms | errors |",
              "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        p50 = "-" if r["p50_ms"] is None else f"{r['p50_ms']:.1f}"
        p99 = "-" if r["p99_ms"] is None else f"{r['p99_ms']:.1f}"
        lines.append(f"| {r['shape']} | {r['clients']} | {r['server']} | {r['requests_per_s']:.1f} | "
                     f"{r['texts_per_s']:.1f} | {p50} | {p99} | {r['errors']} |")
    lines += ["", "Targets:"] + [f"- {k}: {v}" for k, v in result["targets"].items()] + [""]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({r["shape"] for r in result["rows"]})
    fig, axes = plt.subplots(2, len(shapes), figsize=(6 * len(shapes), 8), squeeze=False)
    for j, shape in enumerate(shapes):
        for k, server in enumerate(SERVERS):
            rows = [r for r in result["rows"] if r["shape"] == shape and r["server"] == server]
            if not rows:
                continue
            x = [r["clients"] for r in rows]
            axes[0][j].plot(x, [r["texts_per_s"] for r in rows], marker="o", color=f"C{k}", label=server)
            axes[1][j].plot(x, [r["p99_ms"] or np.nan for r in rows], marker="o", color=f"C{k}", label=f"{server} p99")
        if shape == "single query":
            axes[0][j].axhline(result["offline"]["texts_per_s"], color="gray", linestyle="--",
                               label="offline encode(batch_size=32)")
        for i, unit in enumerate(("texts/s", "p99 latency, ms")):
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


def main(argv: list[str] | None = None) -> int:
    if argv is None and sys.argv[1:] == ["--load"]:
        spec = json.loads(sys.stdin.read())
        print(json.dumps(asyncio.run(_load(spec["url"], spec["clients"], spec["batches"], spec["seconds"],
                                           spec["warmup"], spec.get("extra")))))
        return 0
    from bgert.benchmarks.concurrency import export_bundled
    from bgert.benchmarks.machine import command_line, machine_info
    from bgert.benchmarks.report import write_report
    from bgert.benchmarks.samples import bundled_model_dir, sample_texts

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", default="1,16,64")
    p.add_argument("--servers", default=",".join(SERVERS))
    p.add_argument("--shapes", default="single,32", help="request shapes: single (queries), 32 (32 documents)")
    p.add_argument("--seconds", type=float, default=4.0, help="measured seconds per cell and round")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="threads per server (default: usable cores)")
    p.add_argument("--artifact", default=None, help="export the bundled model here (reused if present)")
    p.add_argument("--make-infinity-env", action="store_true", help=f"install infinity-emb into {INFINITY_ENV}")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--name", default="serve_bench")
    args = p.parse_args(argv)
    threads = args.threads or len(os.sched_getaffinity(0))
    clients = [int(c) for c in args.clients.split(",")]
    wanted = [s for s in args.servers.split(",") if s]
    if args.make_infinity_env:
        make_infinity_env()
    art = export_bundled(args.artifact)
    ckpt = bundled_model_dir()
    docs, queries = sample_texts()
    shapes = {"single query": [[q] for q in queries],
              "32 documents": [docs[i:i + 32] for i in range(0, len(docs) - 31, 8)]}
    shapes = {k: v for k, v in shapes.items() if k.split()[0] in args.shapes.split(",")}
    load_before = os.getloadavg()
    off = offline(art, queries, threads, args.seconds)
    log_dir = tempfile.mkdtemp(prefix="bgert-serve-bench-")  # each server's log, named in "missing" if it fails
    missing: dict[str, str] = {}
    servers = []
    inf_ckpt = None
    if any(k != "bgert" for k in wanted) and os.path.isfile(os.path.join(INFINITY_ENV, "bin", "infinity_emb")):
        inf_ckpt = infinity_checkpoint(ckpt)
    for kind in wanted:
        if kind != "bgert" and not os.path.isfile(os.path.join(INFINITY_ENV, "bin", "infinity_emb")):
            missing[kind] = f"no infinity-emb env at {INFINITY_ENV}; run with --make-infinity-env"
            continue
        s = start(kind, art, inf_ckpt if kind != "bgert" else ckpt, threads, log_dir)
        if wait_ready(s):
            servers.append(s)
        else:
            stop(s)
            with open(s["log"], encoding="utf-8", errors="replace") as f:
                tail = f.read()[-300:].strip().replace("\n", " | ")
            missing[kind] = f"did not start: {tail}"
    rows = []
    try:
        for shape, batches in shapes.items():
            for c in clients:
                runs: dict[str, list] = {s["kind"]: [] for s in servers}
                for r in range(args.rounds):
                    for s in servers:
                        # infinity cuts long documents silently; bgert's OpenAI route does so when asked
                        extra = {"truncate": True} if s["kind"] == "bgert" else None
                        runs[s["kind"]].append(measure(s["url"], c, batches, args.seconds, args.warmup, extra))
                        time.sleep(0.5)  # ORT/OpenMP threads spin a little after a run
                for kind, parts in runs.items():
                    secs = sum(x["seconds"] for x in parts)
                    p50 = [x["p50_ms"] for x in parts if x["p50_ms"] is not None]
                    p99 = [x["p99_ms"] for x in parts if x["p99_ms"] is not None]
                    rows.append({"shape": shape, "clients": c, "server": kind,
                                 "requests_per_s": sum(x["requests"] for x in parts) / secs,
                                 "texts_per_s": sum(x["texts"] for x in parts) / secs,
                                 "p50_ms": float(np.median(p50)) if p50 else None,
                                 "p99_ms": float(max(p99)) if p99 else None,
                                 "errors": sum(x["errors"] for x in parts)})
                    print(json.dumps(rows[-1]), flush=True)
    finally:
        for s in servers:
            stop(s)
    targets = {}
    pick = lambda shape, server: next((r for r in rows if r["shape"] == shape and r["clients"] == max(clients)  # noqa: E731
                                       and r["server"] == server), None)
    b = pick("single query", "bgert")
    if b:
        ratio = b["texts_per_s"] / off["texts_per_s"]
        targets[f"{max(clients)} clients of single queries: bgert {ratio:.2f}x offline encode(batch_size=32) "
                "(>= 0.9x)"] = "met" if ratio >= 0.9 else "missed"
    for shape in shapes:
        b = pick(shape, "bgert")
        inf = [x for x in (pick(shape, k) for k in SERVERS[1:]) if x]
        if b and inf:
            best = max(inf, key=lambda x: x["texts_per_s"])
            ratio = b["texts_per_s"] / best["texts_per_s"]
            lower = b["p99_ms"] is not None and best["p99_ms"] is not None and b["p99_ms"] < best["p99_ms"]
            targets[f"{max(clients)} clients, {shape}: bgert {ratio:.2f}x {best['server']} (>= 1.5x), "
                    f"p99 {b['p99_ms']:.0f} vs {best['p99_ms']:.0f} ms"] = "met" if ratio >= 1.5 and lower else "missed"
    result = {"benchmark": "serve", "command": command_line(), "machine": machine_info(),
              "infinity_versions": _infinity_versions(), "artifact": art, "checkpoint": ckpt,
              "options": {"threads": threads, "seconds": args.seconds, "warmup": args.warmup, "rounds": args.rounds,
                          "clients": clients, "texts": "SciFact sample (bgert.benchmarks/data)"},
              "commands": {s["kind"]: " ".join(s["cmd"]) for s in servers},
              "load_average": {"before": load_before, "after": os.getloadavg()},
              "offline": off, "rows": rows, "missing": missing, "targets": targets}
    stem = write_report(args.out, args.name, result, markdown(result))
    plot(result, stem + ".png")
    print(markdown(result))
    return 0


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


if __name__ == "__main__":
    raise SystemExit(main())
