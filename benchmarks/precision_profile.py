"""Where the time goes in each precision variant, and how fast each precision's GEMM can be on this CPU.

    python -m bgert.benchmarks.precision_profile --artifact ART --threads 2

``bgert bench`` gives the end-to-end speed of every variant against PyTorch; this explains it:

1. **GEMM ceiling per precision**: one-node ONNX Runtime graphs with a BERT feed-forward's shapes
   (``--tokens`` rows × 384 → 1536 and 1536 → 384 for MiniLM, read from the graph) in fp32
   (MatMul), fp16 (MatMul), dynamic int8 (DynamicQuantizeMatMul: u8 activations quantized at run
   time × s8 weights, what ``int8`` runs) and static int8 (QDQ, fused by ORT into
   MatMulIntegerToFloat, what ``int8-static`` runs). GFLOP/s, best of ``--rounds``.
2. **Time per op type** in each variant graph (ORT's profiler), on the bundled SciFact sample
   documents (most at the 256-token cap) and queries (~21 tokens), batch 32.
3. **Graph time** of each variant relative to fp32 on the same batches, interleaved, best of ``--rounds``.

Writes ``precision_profile.json`` and ``.md`` (machine, versions, load average, command) to ``--out``.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
from typing import Any

import numpy as np

from bgert.benchmarks.samples import best_of, sample_texts

from .machine import command_line, machine_info
from .report import write_report

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _session(path: str, threads: int, profile: str | None = None) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.log_severity_level = 3
    if profile:
        so.enable_profiling, so.profile_file_prefix = True, profile
    from bgert.runtime.ort_backend import CPU_DISABLED_OPTIMIZERS  # as the runtime's CPU sessions run

    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(CPU_DISABLED_OPTIMIZERS))


def gemm_graph(kind: str, k: int, n: int, path: str) -> None:
    """A one-node (after ORT's fusions) graph y[M, n] = x[M, k] @ W[k, n] in the given precision."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.normal(size=(k, n)).astype(np.float32) * 0.05
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT16 if kind == "fp16" else TensorProto.FLOAT, ["m", k])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT16 if kind == "fp16" else TensorProto.FLOAT, ["m", n])
    scale = (np.abs(w).max(0) / 127).astype(np.float32)
    wq = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
    zp = np.zeros(n, np.int8)
    if kind in ("fp32", "fp16"):
        inits = [numpy_helper.from_array(w.astype(np.float16 if kind == "fp16" else np.float32), "W")]
        nodes = [helper.make_node("MatMul", ["x", "W"], ["y"])]
    elif kind == "int8 dynamic":
        inits = [numpy_helper.from_array(a, nm) for a, nm in ((wq, "Wq"), (scale, "Ws"), (zp, "Wz"))]
        nodes = [helper.make_node("DynamicQuantizeMatMul", ["x", "Wq", "Ws", "Wz"], ["y"], domain="com.microsoft")]
    elif kind == "int8 static":
        inits = [numpy_helper.from_array(a, nm) for a, nm in
                 ((wq, "Wq"), (scale, "Ws"), (zp, "Wz"), (np.float32(0.05), "xs"), (np.uint8(128), "xz"))]
        nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
                 helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
                 helper.make_node("DequantizeLinear", ["Wq", "Ws", "Wz"], ["Wd"], axis=1),
                 helper.make_node("MatMul", ["xd", "Wd"], ["y"])]
    else:
        raise ValueError(kind)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    onnx.save(helper.make_model(helper.make_graph(nodes, kind, [x], [y], inits), opset_imports=opsets), path)


GEMM_KINDS = ("fp32", "fp16", "int8 dynamic", "int8 static")


def gemm_ceiling(shapes: list[tuple[int, int]], tokens: int, threads: int, rounds: int,
                 kinds: tuple[str, ...] = GEMM_KINDS) -> list[dict[str, Any]]:
    """GFLOP/s of one-node GEMM graphs of each shape and kind (best of ``rounds``): what ORT's kernels reach."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="bgert-gemm-") as tmp:
        for k, n in shapes:
            x = np.random.default_rng(1).normal(size=(tokens, k)).astype(np.float32)
            for kind in kinds:
                path = os.path.join(tmp, f"{kind.replace(' ', '_')}_{k}_{n}.onnx")
                gemm_graph(kind, k, n, path)
                sess = _session(path, threads)
                feed = {"x": x.astype(np.float16) if kind == "fp16" else x}
                sess.run(None, feed)  # warm-up
                t = best_of(lambda: sess.run(None, feed), rounds)
                rows.append({"shape": f"{tokens}x{k} @ {k}x{n}", "precision": kind, "ms": t * 1000,
                             "gflops": 2 * tokens * k * n / t / 1e9})
                print(f"gemm {rows[-1]['shape']} {kind}: {rows[-1]['gflops']:.1f} GFLOP/s", file=sys.stderr)
    return rows


def ffn_shapes(path: str) -> list[tuple[int, int]]:
    """The distinct [K, N] weight shapes of the graph's MatMuls (an FFN's two, plus the attention output)."""
    import onnx

    m = onnx.load(path, load_external_data=False)
    dims = {i.name: tuple(i.dims) for i in m.graph.initializer}
    shapes = {dims[n.input[1]] for n in m.graph.node if n.op_type == "MatMul" and len(dims.get(n.input[1], ())) == 2}
    return sorted(shapes, key=lambda s: -s[0] * s[1])[:2]


def variant_feeds(art: str, texts: list[str], names: list[str]) -> list[dict[str, np.ndarray]]:
    from bgert.export.precision import feeds
    from bgert.runtime import load

    model = load(art, precision="fp32")
    seqs = model.tokenizer.encode(texts, model.manifest.max_length)
    tok = model.manifest.raw.get("tokenizer", {})
    return [f for f, _ in feeds(seqs, names, int(tok.get("pad_token_id") or 0), "right")]


def profile_ops(path: str, batches: list[dict[str, np.ndarray]], threads: int, tmp: str) -> dict[str, float]:
    """Share of kernel time per op type over ``batches`` (after one warm-up pass)."""
    sess = _session(path, threads, profile=os.path.join(tmp, "prof"))
    for f in batches:
        sess.run(None, f)
    for f in batches:
        sess.run(None, f)
    trace = sess.end_profiling()
    with open(trace, encoding="utf-8") as fh:
        events = json.load(fh)
    by: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            by[e["args"]["op_name"]] += e["dur"]
    total = sum(by.values()) or 1
    return {k: v / total for k, v in by.most_common()}


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    cpu = m.get("cpu", {})
    out = [f"# Precision profile: {r['artifact_name']}", "",
           f"`{r['command']}`", "",
           f"CPU {cpu.get('model')} ({', '.join(k for k, v in cpu.get('simd', {}).items() if v) or 'flags unknown'}), "
           f"{r['options']['threads']} ORT threads, 1-minute load average {r['load_average'][0]:.1f} before "
           f"and {r['load_average'][1]:.1f} after.", "",
           "## GEMM ceiling per precision (one-node ORT graphs)", "",
           "| shape | " + " | ".join(GEMM_KINDS) + " |", "|---|" + "---|" * len(GEMM_KINDS)]
    for shape in dict.fromkeys(x["shape"] for x in r["gemm"]):
        cells = {x["precision"]: x["gflops"] for x in r["gemm"] if x["shape"] == shape}
        fp32 = cells["fp32"]
        out.append(f"| {shape} | " + " | ".join(f"{cells[k]:.1f} GFLOP/s ({cells[k] / fp32:.2f}×)"
                                                 for k in GEMM_KINDS) + " |")
    out += ["", "## Graph time per variant, batch 32 (relative to fp32)", "",
            "| variant | documents ms | queries ms | top op types (documents) |", "|---|---|---|---|"]
    for v in r["variants"]:
        ops = ", ".join(f"{k} {s:.0%}" for k, s in list(v["op_share_documents"].items())[:5])
        out.append(f"| {v['precision']} | {v['documents_ms']:.0f} ({v['documents_vs_fp32']:.2f}×) | "
                   f"{v['queries_ms']:.0f} ({v['queries_vs_fp32']:.2f}×) | {ops} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", required=True, help="an embedder artifact exported with several --precision")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tokens", type=int, default=8192, help="GEMM rows (batch × sequence length)")
    p.add_argument("--texts", type=int, default=32, help="documents and queries profiled (one batch each)")
    p.add_argument("--out", default=RESULTS)
    p.add_argument("--name", default="precision_profile")
    args = p.parse_args(argv)
    from bgert.runtime import load
    from bgert.runtime.base import graph_runs_well_here

    load_before = os.getloadavg()[0]
    manifest = load(args.artifact, precision="fp32").manifest
    graphs = [g for g in manifest.graphs if graph_runs_well_here(g)]
    fp32 = next(g for g in graphs if g.precision == "fp32")
    gemm = gemm_ceiling(ffn_shapes(os.path.join(args.artifact, fp32.file)), args.tokens, args.threads, args.rounds)
    docs, queries = sample_texts(args.texts)
    variants = []
    with tempfile.TemporaryDirectory(prefix="bgert-prof-") as tmp:
        sessions = {g.precision: _session(os.path.join(args.artifact, g.file), args.threads) for g in graphs}
        names = [i.name for i in sessions["fp32"].get_inputs()]
        sets = {"documents": variant_feeds(args.artifact, docs[:args.texts], names),
                "queries": variant_feeds(args.artifact, queries[:args.texts], names)}
        run_set = lambda sess, batches: [sess.run(None, f) for f in batches]  # noqa: E731
        for sess in sessions.values():  # warm-up
            for batches in sets.values():
                run_set(sess, batches)
        times: dict[tuple[str, str], float] = {}
        for _ in range(args.rounds):  # interleaved: every variant once per round
            for prec, sess in sessions.items():
                for which, batches in sets.items():
                    t = best_of(lambda: run_set(sess, batches), 1)
                    times[prec, which] = min(times.get((prec, which), float("inf")), t)
        for g in graphs:
            print(f"profiling {g.precision}", file=sys.stderr)
            share = profile_ops(os.path.join(args.artifact, g.file), sets["documents"], args.threads, tmp)
            variants.append({"precision": g.precision, "file": g.file,
                             **{f"{w}_ms": times[g.precision, w] * 1000 for w in sets},
                             **{f"{w}_vs_fp32": times["fp32", w] / times[g.precision, w] for w in sets},
                             "op_share_documents": share})
    result = {"command": command_line(), "machine": machine_info(), "options": vars(args),
              "artifact_name": manifest.raw.get("source", {}).get("name"), "load_average": [load_before, os.getloadavg()[0]],
              "gemm": gemm, "variants": variants}
    write_report(args.out, args.name, result, markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
