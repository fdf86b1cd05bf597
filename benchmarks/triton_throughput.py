"""Client throughput through Triton against local ONNX Runtime, on the bundled all-MiniLM-L6-v2 (CPU).

    python -m bgert.benchmarks.triton_throughput                    # needs scripts/make_triton_env.sh
    python -m bgert.benchmarks.triton_throughput --repeats 5 --callers 8

The server is the tritonserver bundled in nvidia-pytriton, on 127.0.0.1, serving a repository from
``bgert triton-repo --backend python --device cpu`` (the model step is a python-backend model running
onnxruntime; the bundled server has no ONNX Runtime backend). Rows, all in one process, back to back:

- ``local ORT``: ``Embedder(art).encode(docs)`` (the reference for the ratios);
- ``Embedder(backend="triton")`` over gRPC and HTTP: same client-side tokenisation and batching,
  the padded id batches travel to the server;
- ``raw-text ensemble`` over gRPC: batches of texts sent as strings, tokenised by the server;
- ``short queries, N callers``: N threads each embedding one SciFact query per call, locally
  (one shared session) and through Triton (the dynamic batcher groups concurrent calls).

Client and server share the machine's cores, so the Triton rows pay for serialisation and the
hop but gain nothing from a separate device: on a GPU deployment the model step would run there.
Results: benchmarks/results/triton_throughput_cpu.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from typing import Any, Callable

import numpy as np

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def load_texts(name: str) -> list[str]:
    with open(os.path.join(DATA, name), encoding="utf-8") as f:
        recs = [json.loads(line) for line in f if line.strip()]
    return [(r.get("title", "") + " " + r["text"]).strip() for r in recs]


def timed(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` runs (callers warm up with a few texts first)."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def callers_run(callers: int, texts: list[str], call: Callable[[str], Any]) -> float:
    """Wall seconds for ``callers`` threads to embed ``texts`` one per call, split between them."""
    def worker(k: int) -> None:
        for t in texts[k::callers]:
            call(t)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(callers)]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return time.perf_counter() - t0


def ensemble_encoder(url: str, name: str, batch: int) -> Callable[[list[str]], np.ndarray]:
    """Send texts as strings to the ensemble in batches of ``batch`` (gRPC); returns the vectors."""
    import tritonclient.grpc as g

    client = g.InferenceServerClient(url)

    def encode(texts: list[str]) -> np.ndarray:
        out = []
        for i in range(0, len(texts), batch):
            data = np.array([[t.encode("utf-8")] for t in texts[i:i + batch]], dtype=object)
            inp = g.InferInput("TEXT", list(data.shape), "BYTES")
            inp.set_data_from_numpy(data)
            out.append(client.infer(name, [inp]).as_numpy("dense"))
        return np.concatenate(out)

    return encode


def markdown(result: dict[str, Any]) -> str:
    from bgert.benchmarks.machine import describe

    o = result["options"]
    lines = [
        "# Client throughput through Triton vs local ONNX Runtime (all-MiniLM-L6-v2, fp32, CPU)",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Machine: {describe(result['machine'])}. Server: tritonserver {result['server']} (nvidia-pytriton), "
        f"python-backend model step running onnxruntime, max_batch_size {o['max_batch_size']}, "
        f"queue delay {o['queue_delay_us']} µs, 1 instance. Client and server share the same cores; every row ran "
        f"back to back in one process, median of {o['repeats']} runs after a warm-up, so compare the ratios. "
        f"Load average (1/5/15 min) before: {', '.join(f'{x:.1f}' for x in result['load_average_1_5_15']['before'])}, "
        f"after: {', '.join(f'{x:.1f}' for x in result['load_average_1_5_15']['after'])} "
        f"(on {result['machine']['cpu'].get('usable_cores')} usable cores).",
        "",
        "| workload | path | texts/s | vs local ORT | max abs diff vs local |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        diff = "" if r.get("max_abs_diff") is None else f"{r['max_abs_diff']:.1e}"
        lines.append(f"| {r['workload']} | {r['path']} | {r['texts_per_s']:.1f} | {r['ratio']:.2f} | {diff} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from bgert.benchmarks.concurrency import export_bundled
    from bgert.benchmarks.machine import command_line, machine_info
    from bgert.benchmarks.report import write_report
    from bgert.runtime import Embedder
    from bgert.triton_models.repository import write_repository
    from bgert.triton_models.server import TritonServer

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--artifact", default=None, help="export the bundled model here (reused if present)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--docs", type=int, default=200, help="SciFact documents to embed (at most 200)")
    p.add_argument("--queries", type=int, default=50, help="SciFact queries for the caller rows (at most 50)")
    p.add_argument("--callers", type=int, default=8, help="concurrent callers for the short-query rows")
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--queue-delay-us", type=int, default=1000)
    p.add_argument("--env", default=None, help="server environment (default: $BGERT_TRITON_ENV or ~/.cache/...)")
    p.add_argument("--out", default=RESULTS)
    args = p.parse_args(argv)

    art = export_bundled(args.artifact)
    docs = load_texts("scifact_sample.jsonl")[:args.docs]
    queries = load_texts("scifact_queries_sample.jsonl")[:args.queries]
    work = tempfile.mkdtemp(prefix="bgert-triton-bench-")
    repo = os.path.join(work, "repo")
    name = write_repository(art, repo, backend="python", device="cpu", max_batch_size=args.max_batch_size,
                            queue_delay_us=args.queue_delay_us)[-1]
    rows: list[dict[str, Any]] = []

    def add(workload: str, path: str, n: int, seconds: float, ref_seconds: float | None, diff: float | None) -> None:
        rows.append({"workload": workload, "path": path, "texts": n, "seconds": seconds, "texts_per_s": n / seconds,
                     "ratio": (ref_seconds / seconds) if ref_seconds else 1.0, "max_abs_diff": diff})
        print(f"{workload:32s} {path:34s} {n / seconds:9.1f} texts/s", flush=True)

    load_before = os.getloadavg()
    local = Embedder(art)
    ref = local.encode(docs)  # also the local warm-up
    with TritonServer(repo, env_dir=args.env, log_path=os.path.join(work, "server.log")) as srv:
        remote = {proto: Embedder(art, backend="triton", url=url, protocol=proto, timeout=600)
                  for proto, url in (("grpc", srv.grpc_url), ("http", srv.http_url))}
        raw = ensemble_encoder(srv.grpc_url, name, args.max_batch_size)
        for m in remote.values():
            m.encode(docs[:8])  # connect, and warm the server's session up
        wl = f"{len(docs)} SciFact docs, one call"
        t_local = timed(lambda: local.encode(docs), args.repeats)
        add(wl, "local ORT", len(docs), t_local, None, None)
        for proto, m in remote.items():
            diff = float(np.abs(m.encode(docs) - ref).max())
            add(wl, f'Embedder(backend="triton"), {proto}', len(docs), timed(lambda: m.encode(docs), args.repeats),
                t_local, diff)
        diff = float(np.abs(raw(docs) - ref).max())
        add(wl, "raw-text ensemble, gRPC", len(docs), timed(lambda: raw(docs), args.repeats), t_local, diff)

        wq = f"{len(queries)} queries, {args.callers} callers, 1 per call"
        t_local_q = timed(lambda: callers_run(args.callers, queries, local.encode), args.repeats)
        add(wq, "local ORT (shared session)", len(queries), t_local_q, None, None)
        m = remote["grpc"]
        add(wq, 'Embedder(backend="triton"), grpc', len(queries),
            timed(lambda: callers_run(args.callers, queries, m.encode), args.repeats), t_local_q, None)
        server_version = remote["grpc"].backend_for(m.graph())._client().get_server_metadata().version

    result = {"benchmark": "triton_throughput", "command": command_line(), "machine": machine_info(),
              "server": server_version, "model": "all-MiniLM-L6-v2", "precision": local.precision,
              "options": {"repeats": args.repeats, "callers": args.callers, "max_batch_size": args.max_batch_size,
                          "docs": len(docs), "queries": len(queries),
                          "queue_delay_us": args.queue_delay_us, "backend": "python (onnxruntime)", "device": "cpu"},
              "load_average_1_5_15": {"before": load_before, "after": os.getloadavg()}, "rows": rows}
    base = write_report(args.out, "triton_throughput_cpu", result, markdown(result))
    print(f"wrote {base}.json and {base}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
