"""Where the CPU time of an artifact's graphs goes: ORT's per-op profiler (OpenVINO's performance counters for
its variants) and a roofline.

For each ORT precision of an artifact (fp32, int8, int8-vnni, int8-static), each in its own process, the
graph runs with ``SessionOptions.enable_profiling`` on documents ([32, 256] tokens) and queries ([32, 16])
at the given thread count; the profile's kernel times are summed per op type (after ORT's own fusions,
so the op types are the ones that ran: DynamicQuantizeMatMul, Attention, SkipLayerNormalization...).

The roofline compares the model's arithmetic with the machine's peak:

- FLOPs per batch from the fp32 graph: 2*K*N per token for every MatMul with a constant [K, N] weight
  (a fused Attention's QKV weight included), plus 2*2*L*hidden per token for each attention's QK^T and
  softmax·V (L the padded length); embeddings, norms and activations are left out (a few percent).
- Measured ceiling: the GFLOP/s of ORT's own kernel on one large GEMM of the model's FFN shape ([8192, hidden]
  @ [hidden, 4·hidden]: fp32 MatMul, DynamicQuantizeMatMul for the dynamic int8 graphs, a QDQ MatMul for
  int8-static; bgert.benchmarks.precision_profile.gemm_ceiling), in its own process: what the machine and
  ORT's kernels reach on this arithmetic, turbo and memory included.
- Nominal peak = cores × clock × operations per cycle per core of the best unit this CPU has for the precision
  (CPU flags from /proc/cpuinfo; the clock is /proc/cpuinfo's "cpu MHz", under KVM the nominal one, so
  turbo or AVX-512 licence clocks are not in it): fp32 AVX-512 2×16 FMA = 64 FLOP, AVX2 2×8 FMA = 32;
  int8 AMX 1024 MAC = 2048 OP, AVX512-VNNI 2×64 MAC = 256 OP, AVX-VNNI 2×32 MAC = 128 OP, AVX2
  (vpmaddubsw + vpmaddwd) about 2× its fp32 = 64 OP; bf16 AMX 512 MAC = 1024 FLOP, AVX512-BF16 2×32 MAC
  = 128 FLOP.

    python -m bgert.benchmarks.cpu_profile --artifact ART --threads 2
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

SHAPES = {"documents": (32, 256, 6), "queries": (32, 16, 60)}  # batch, tokens, timed runs
#: (flag, operations per cycle per core, unit) best first, per arithmetic
PEAK_OPS = {
    "fp32": [("avx512f", 64, "AVX-512 FMA"), ("fma", 32, "AVX2 FMA")],
    "int8": [("amx_int8", 2048, "AMX-INT8"), ("avx512_vnni", 256, "AVX512-VNNI"), ("avx_vnni", 128, "AVX-VNNI"),
             ("avx2", 64, "AVX2 vpmaddubsw")],
    "bf16": [("amx_bf16", 1024, "AMX-BF16"), ("avx512_bf16", 128, "AVX512-BF16")],
}
#: the one-node GEMM of precision_profile.gemm_ceiling that measures each ORT precision's ceiling
CEILING_KIND = {"fp32": "fp32", "int8": "int8 dynamic", "int8-vnni": "int8 dynamic", "int8-static": "int8 static"}
GEMM_OPS = ("MatMul", "Gemm", "FusedMatMul", "MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
            "QLinearMatMul", "QGemm")


def arithmetic(precision: str) -> str:
    return "int8" if precision.startswith("int8") else "bf16" if precision == "bf16" else "fp32"


def peak(kind: str, threads: int) -> dict[str, Any]:
    """The CPU's peak for ``kind`` arithmetic on ``threads`` cores, with what it assumes."""
    from bgert.runtime.cpu import cpu_flags

    flags = cpu_flags()
    mhz = _cpu_mhz()
    for flag, ops, unit in PEAK_OPS[kind]:
        if flag in flags:
            return {"unit": unit, "ops_per_cycle_per_core": ops, "ghz": mhz / 1000, "cores": threads,
                    "gops": ops * threads * mhz / 1000}
    return {"unit": "scalar", "ops_per_cycle_per_core": 2, "ghz": mhz / 1000, "cores": threads,
            "gops": 2 * threads * mhz / 1000}


def _cpu_mhz() -> float:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return float(line.split(":", 1)[1])
    except (OSError, ValueError):
        pass
    return 2000.0


def flops(fp32_path: str, batch: int, length: int) -> dict[str, float]:
    """FLOPs of one [batch, length] run of an encoder graph: the MatMuls with constant weights outside attention
    (``matmul``), the fused attentions' QKV projections (``qkv``) and their QK^T and softmax·V (``attention``)."""
    import onnx

    g = onnx.load(fp32_path, load_external_data=False).graph
    dims = {i.name: list(i.dims) for i in g.initializer}
    out = {"matmul": 0.0, "qkv": 0.0, "attention": 0.0}
    tokens = batch * length
    for n in g.node:
        w = dims.get(n.input[1]) if len(n.input) > 1 else None
        if w is None or len(w) != 2:
            continue
        if n.op_type == "MatMul":
            out["matmul"] += 2.0 * w[0] * w[1] * tokens
        elif n.op_type == "Attention":
            out["qkv"] += 2.0 * w[0] * w[1] * tokens
            out["attention"] += 2 * 2.0 * length * w[0] * tokens  # QK^T and softmax·V over all heads
    if not out["qkv"]:  # unfused attention: its Q, K, V projections are MatMuls; count the layers by Softmax
        layers = sum(n.op_type == "Softmax" for n in g.node)
        hidden = next((w[0] for w in dims.values() if len(w) == 2 and w[0] == w[1]), 0)
        out["attention"] = layers * 2 * 2.0 * length * hidden * tokens
    out["total"] = sum(out.values())
    return out


ATTENTION_OPS = ("Attention", "QAttention", "MultiHeadAttention")


def _feed(session: Any, batch: int, length: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, 20000, size=(batch, length)).astype(np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    return {i.name: feed[i.name] for i in session.get_inputs()}


def profile_one(path: str, threads: int) -> dict[str, Any]:
    """Per shape: wall ms per run and kernel ms per run by op type (this process, profiling on)."""
    import onnxruntime as ort

    from bgert.runtime.backends import session_options
    from bgert.runtime.ort_backend import CPU_DISABLED_OPTIMIZERS

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for shape, (batch, length, runs) in SHAPES.items():
            so = session_options(threads)
            so.enable_profiling = True
            so.profile_file_prefix = os.path.join(tmp, shape)
            sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"],
                                        disabled_optimizers=list(CPU_DISABLED_OPTIMIZERS))
            feed = _feed(sess, batch, length)
            for _ in range(3):
                sess.run(None, feed)
            walls = []
            for _ in range(runs):
                t0 = time.perf_counter()
                sess.run(None, feed)
                walls.append(time.perf_counter() - t0)
            events = json.load(open(sess.end_profiling(), encoding="utf-8"))
            model_runs = [e for e in events if e.get("name") == "model_run"]
            start_us = model_runs[-runs]["ts"]  # the timed runs only (warm-up excluded)
            per_op: dict[str, float] = collections.defaultdict(float)
            count: dict[str, int] = collections.Counter()
            for e in events:
                if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start_us:
                    op = e["args"].get("op_name", "?")
                    per_op[op] += e["dur"] / 1000 / runs
                    count[op] += 1
            out[shape] = {"batch": batch, "length": length, "runs": runs,
                          "wall_ms": 1000 * float(np.median(walls)),
                          "model_run_ms": float(np.median([e["dur"] for e in model_runs[-runs:]])) / 1000,
                          "ops": {k: {"ms": v, "nodes": count[k] // runs} for k, v in
                                  sorted(per_op.items(), key=lambda kv: -kv[1])}}
    return out


def profile_openvino(path: str, precision: str, threads: int) -> dict[str, Any]:
    """As ``profile_one``, for OpenVINO (its CPU plugin's per-node performance counters, by node type)."""
    import openvino as ov

    from bgert.runtime.openvino_backend import OpenVinoBackend

    out: dict[str, Any] = {}
    for shape, (batch, length, runs) in SHAPES.items():
        be = OpenVinoBackend(path, precision, num_threads=threads, openvino_config={"PERF_COUNT": "YES"})
        request = be.compiled.create_infer_request()
        rng = np.random.default_rng(0)
        ids = rng.integers(1000, 20000, size=(batch, length)).astype(np.int64)
        feed = {k: v for k, v in {"input_ids": ids, "attention_mask": np.ones_like(ids),
                                  "token_type_ids": np.zeros_like(ids)}.items() if k in be.input_names}
        for _ in range(3):
            request.infer(feed)
        walls = []
        per_op: dict[str, float] = collections.defaultdict(float)
        count: dict[str, int] = collections.Counter()
        for _ in range(runs):
            t0 = time.perf_counter()
            request.infer(feed)
            walls.append(time.perf_counter() - t0)
            for p in request.profiling_info:
                if p.status == ov.ProfilingInfo.Status.EXECUTED:
                    key = f"{p.node_type} ({p.exec_type})"
                    per_op[key] += p.real_time.total_seconds() * 1000 / runs
                    count[key] += 1
        out[shape] = {"batch": batch, "length": length, "runs": runs, "wall_ms": 1000 * float(np.median(walls)),
                      "ops": {k: {"ms": v, "nodes": count[k] // runs} for k, v in
                              sorted(per_op.items(), key=lambda kv: -kv[1])}}
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    from bgert.runtime.manifest import read_manifest

    from .machine import command_line, machine_info

    loadavg_before = _loadavg()
    m = read_manifest(args.artifact, verify=False)
    fp32 = next(g for g in m.graphs if g.precision == "fp32")
    ceilings = _ceilings(m.path(fp32.file), args.threads)
    rows = []
    todo = [("ort", p) for p in args.precisions if not p.startswith("openvino:")] + \
        [("openvino", p.split(":", 1)[1]) for p in args.precisions if p.startswith("openvino:")]
    for backend, p in todo:
        g = next((g for g in m.graphs if g.precision == p and g.extra.get("backend", "any") in ("any", backend)), None)
        if g is None:
            continue
        r = subprocess.run([sys.executable, "-m", "bgert.benchmarks.cpu_profile", "--worker", m.path(g.file),
                            "--backend", backend, "--precisions", p, "--threads", str(args.threads)],
                           capture_output=True, text=True, timeout=900)
        if r.returncode:
            rows.append({"precision": p, "backend": backend,
                         "error": (r.stderr.strip().splitlines() or ["failed"])[-1]})
            continue
        prof = json.loads(r.stdout.strip().splitlines()[-1])
        pk = peak("int8" if p == "ov-int8" else arithmetic(p), args.threads)
        for shape, s in prof.items():
            f = flops(m.path(fp32.file), s["batch"], s["length"])
            ms = lambda ops: sum(v["ms"] for k, v in s["ops"].items() if k in ops)  # noqa: E731
            s["flops"] = f
            s["gflops_per_s"] = f["total"] / s["wall_ms"] / 1e6
            s["pct_of_peak"] = 100 * s["gflops_per_s"] / pk["gops"]
            ceiling = ceilings.get(CEILING_KIND.get(p, "")) if backend == "ort" else None
            s["ceiling_gflops_per_s"] = ceiling
            s["pct_of_ceiling"] = None if ceiling is None else 100 * s["gflops_per_s"] / ceiling
            s["gemm_gflops_per_s"] = f["matmul"] / max(ms(GEMM_OPS), 1e-9) / 1e6 if backend == "ort" else None
            s["attention_gflops_per_s"] = (f["qkv"] + f["attention"]) / max(ms(ATTENTION_OPS), 1e-9) / 1e6 \
                if backend == "ort" else None
            s["texts_per_s"] = s["batch"] / s["wall_ms"] * 1000
        rows.append({"precision": p, "backend": backend, "file": g.file, "peak": pk, "shapes": prof})
    return {"artifact": args.artifact, "threads": args.threads, "machine": machine_info(), "command": command_line(),
            "rows": rows, "ceilings": ceilings, "loadavg_before": loadavg_before, "loadavg": _loadavg(),
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _ceilings(fp32_path: str, threads: int) -> dict[str, float]:
    """{GEMM kind: GFLOP/s} of ORT's kernels on the model's FFN-in shape, measured in a process of its own."""
    r = subprocess.run([sys.executable, "-m", "bgert.benchmarks.cpu_profile", "--worker", fp32_path, "--backend", "gemm",
                        "--threads", str(threads)], capture_output=True, text=True, timeout=900)
    if r.returncode:
        return {}
    return json.loads(r.stdout.strip().splitlines()[-1])


def gemm_worker(fp32_path: str, threads: int) -> dict[str, float]:
    from .precision_profile import ffn_shapes, gemm_ceiling

    k, n = min(ffn_shapes(fp32_path))  # [hidden, 4·hidden]: the FFN's first GEMM
    rows = gemm_ceiling([(k, n)], 8192, threads, 3, tuple(dict.fromkeys(CEILING_KIND.values())))
    return {r["precision"]: r["gflops"] for r in rows}


def _loadavg() -> str:
    try:
        return open("/proc/loadavg", encoding="utf-8").read().strip()
    except OSError:
        return ""


def markdown(result: dict[str, Any], top: int = 10) -> str:
    from .machine import describe

    lines = [f"# CPU profile: {os.path.basename(os.path.normpath(result['artifact']))}", "",
             f"Machine: {describe(result['machine'])}. {result['threads']} threads, ORT "
             f"{result['machine']['versions'].get('onnxruntime')}, synthetic token ids, every position real "
             f"(no padding). /proc/loadavg before and after: `{result.get('loadavg_before', '')}` → `{result['loadavg']}`. "
             f"Command: `{result['command']}`", "",
             "## Roofline", "",
             "FLOPs from the fp32 graph (GEMMs with constant weights + attention QK^T and softmax·V); peak = "
             "cores × nominal clock × ops/cycle of the best unit for the precision (see the module doc). "
             "MatMul kernels: the non-attention GEMMs' FLOPs over the time in MatMul-type kernels (fp32 MatMul, "
             "DynamicQuantizeMatMul, MatMulIntegerToFloat...); attention kernels: QKV projection + QK^T + softmax·V "
             "FLOPs over the time in (Q)Attention. Measured ceiling: ORT's kernel on one [8192, hidden] @ [hidden, 4·hidden] "
             "GEMM of the precision's kind (" + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in result.get("ceilings", {}).items())
             + ").", "",
             "| precision | shape | texts/s | ms/batch | GFLOP | achieved GFLOP/s | nominal peak GOP/s (unit) | % of peak "
             "| % of measured ceiling | MatMul kernels GFLOP/s | attention kernels GFLOP/s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['backend']} {r['precision']} | not run: {r['error'][:120]} | | | | | | | | | |")
            continue
        for shape, s in r["shapes"].items():
            lines.append(f"| {r['backend']} {r['precision']} | {shape} [{s['batch']}×{s['length']}] | "
                         f"{s['texts_per_s']:.1f} | "
                         f"{s['wall_ms']:.1f} | {s['flops']['total'] / 1e9:.1f} | {s['gflops_per_s']:.0f} | "
                         f"{r['peak']['gops']:.0f} ({r['peak']['unit']}) | {s['pct_of_peak']:.1f} | "
                         f"{_num(s.get('pct_of_ceiling'))} | {_num(s['gemm_gflops_per_s'])} | {_num(s['attention_gflops_per_s'])} |")
    for r in result["rows"]:
        if "error" in r:
            continue
        for shape, s in r["shapes"].items():
            total = sum(v["ms"] for v in s["ops"].values())
            lines += ["", f"## {r['backend']} {r['precision']} ({r['file']}), {shape} [{s['batch']}×{s['length']}]: "
                          f"{s['wall_ms']:.1f} ms per batch, {total:.1f} ms in kernels", "",
                      "| op type (after ORT fusions; OpenVINO: node type (kernel)) | nodes | ms per batch | "
                      "% of kernel time |", "|---|---:|---:|---:|"]
            for k, v in list(s["ops"].items())[:top]:
                lines.append(f"| {k} | {v['nodes']} | {v['ms']:.2f} | {100 * v['ms'] / total:.1f} |")
            rest = list(s["ops"].items())[top:]
            if rest:
                lines.append(f"| {len(rest)} other op types | {sum(v['nodes'] for _, v in rest)} | "
                             f"{sum(v['ms'] for _, v in rest):.2f} | {100 * sum(v['ms'] for _, v in rest) / total:.1f} |")
    lines.append("")
    return "\n".join(lines)


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--artifact")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precisions", nargs="+", default=["fp32", "int8", "int8-vnni", "int8-static", "openvino:fp32",
                                                       "openvino:bf16", "openvino:ov-int8"],
                   help="ORT precisions, and openvino:PRECISION for OpenVINO's")
    p.add_argument("--backend", default="ort", help=argparse.SUPPRESS)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--name", default=None, help="result file stem (default cpu_profile_<model>)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(profile_one(args.worker, args.threads) if args.backend == "ort" else
                         gemm_worker(args.worker, args.threads) if args.backend == "gemm" else
                         profile_openvino(args.worker, args.precisions[0], args.threads)))
        return 0
    if not args.artifact:
        p.error("--artifact is required")
    from .report import write_report

    result = run(args)
    name = args.name or "cpu_profile_" + os.path.basename(os.path.normpath(args.artifact))
    stem = write_report(args.out, name, result, markdown(result))
    print(markdown(result))
    print(f"written: {stem}.json, {stem}.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
