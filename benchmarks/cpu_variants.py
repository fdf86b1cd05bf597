"""CPU variants side by side: PyTorch fp32 (sentence-transformers, the reference), sentence-transformers'
ONNX int8 and OpenVINO backends where they can be installed, and every bgert backend × precision of an
artifact, on SciFact documents and queries.

Each variant runs in its own process (ORT's and OpenMP's worker threads spin after a run and slow a
neighbour in the same process), rounds interleaved (round 1 of every variant, then round 2 ...), best
round kept. Reported: texts/s, ratio to PyTorch fp32, cosine mean/min of each text's vector against
PyTorch's, peak RSS of the variant's process, the CPU's flags (JSON + Markdown in --out).

    python -m bgert.benchmarks.cpu_variants            # bundled all-MiniLM-L6-v2, exported on first use
    python -m bgert.benchmarks.cpu_variants --artifact ART --model CKPT --threads 2 --rounds 3

"bgert default" is what a load that names no variant gets: its first load measures (a fresh tune cache under
--work), so the row says which variant that measurement chose and why. The peers whose packages conflict with
the project's pins run in venvs of their own (benchmarks/envs/make_st_openvino_env.sh, make_st_onnx_env.sh).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from typing import Any, Callable

import numpy as np

#: the peers whose packages conflict with the project's venv run in venvs of their own (benchmarks/envs/make_*_env.sh)
PEER_ENVS = {"st-openvino": "st-openvino", "st-onnx-int8": "st-onnx"}
ENVS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "envs")


def variants(art: str) -> list[str]:
    """Every variant that runs on this machine: the reference, the peers, bgert backend × precision."""
    from bgert.runtime.base import graph_backend, graph_runs_well_here
    from bgert.runtime.manifest import read_manifest
    from bgert.runtime.openvino_backend import openvino_available

    m = read_manifest(art, verify=False)
    out = ["torch", "st-onnx-int8", "st-openvino", "bgert default"]
    for backend in ("ort", "openvino") if openvino_available() else ("ort",):
        for p in m.precisions():
            graphs = [g for g in m.graphs if g.precision == p]
            if p == "fp16" or not all(graph_runs_well_here(g) and graph_backend(g) in ("any", backend) for g in graphs):
                continue
            if backend == "openvino" and graph_backend(graphs[0]) == "any" and p != "fp32":
                continue  # ORT's int8 graphs are ORT's
            out.append(f"bgert {backend} {p}")
    return out


def _st_onnx_int8(model_dir: str, work: str, threads: int) -> Callable[[list[str]], np.ndarray]:
    """sentence-transformers' backend='onnx' with its own dynamic int8 export (the avx2 preset here, the
    avx512_vnni one on VNNI CPUs)."""
    import glob

    from sentence_transformers import SentenceTransformer, export_dynamic_quantized_onnx_model

    from .machine import cpu_info

    d = os.path.join(work, "st-onnx")
    simd = cpu_info().get("simd", {})
    preset = "avx512_vnni" if simd.get("avx512_vnni") else "avx2"
    found = lambda: glob.glob(os.path.join(d, "onnx", f"model_q*int8_{preset}.onnx"))  # qint8 or quint8  # noqa: E731
    if not found():
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(model_dir, d)
        export_dynamic_quantized_onnx_model(SentenceTransformer(d, backend="onnx", device="cpu"), preset, d)
    name = os.path.basename(found()[0])
    m = SentenceTransformer(d, backend="onnx", device="cpu", model_kwargs={
        "file_name": f"onnx/{name}", "provider": "CPUExecutionProvider"})
    return lambda texts: m.encode(texts, batch_size=32, normalize_embeddings=True)


def make_call(variant: str, art: str, model_dir: str, work: str, threads: int) -> Callable[[list[str]], np.ndarray]:
    """The encode call of ``variant`` (strings in, normalised vectors out)."""
    if variant == "torch":
        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(threads)
        m = SentenceTransformer(model_dir, device="cpu")
        return lambda texts: m.encode(texts, batch_size=32, normalize_embeddings=True)
    if variant == "st-onnx-int8":
        return _st_onnx_int8(model_dir, work, threads)
    if variant == "st-openvino":  # needs optimum-intel: benchmarks/envs/make_st_openvino_env.sh
        from sentence_transformers import SentenceTransformer

        d = os.path.join(work, "st-openvino")
        if not os.path.isfile(os.path.join(d, "openvino", "openvino_model.xml")):
            shutil.rmtree(d, ignore_errors=True)
            shutil.copytree(model_dir, d)
            SentenceTransformer(d, backend="openvino", device="cpu").save_pretrained(d)
        m = SentenceTransformer(d, backend="openvino", device="cpu")  # its default: OpenVINO's own precision
        return lambda texts: m.encode(texts, batch_size=32, normalize_embeddings=True)
    from bgert.runtime import load

    if variant == "bgert default":  # what a load that names no variant gets: measured on its first load here
        t0 = time.perf_counter()
        model = load(art, intra_op_num_threads=threads, verify=False)
        call = lambda texts: model.encode(texts, batch_size=32)  # noqa: E731
        call.chosen = {"chosen": f"{model.backend_name} {model.precision}", "chosen_by": model.chosen_by,
                       "load_s": round(time.perf_counter() - t0, 1)}  # the first round's includes the measurement
        return call
    _, backend, precision = variant.split()
    model = load(art, backend=backend, precision=precision, intra_op_num_threads=threads, verify=False)
    return lambda texts: model.encode(texts, batch_size=32)


def worker(variant: str, art: str, model_dir: str, work: str, threads: int, vectors: str | None) -> dict[str, Any]:
    """One round of one variant in this process: warm-up, then documents and queries timed once each."""
    sets = _sets(int(os.environ.get("BGERT_BENCH_DOCS", "384")), int(os.environ.get("BGERT_BENCH_QUERIES", "300")))
    call = make_call(variant, art, model_dir, work, threads)
    call(sets["documents"][:8] + sets["queries"][:8])
    out: dict[str, Any] = {}
    for name, texts in sets.items():
        t0 = time.perf_counter()
        vecs = np.asarray(call(texts), dtype=np.float32)
        out[f"{name}_per_s"] = len(texts) / (time.perf_counter() - t0)
        if vectors:
            np.save(f"{vectors}.{name}.npy", vecs)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out.update(getattr(call, "chosen", {}))
    return out


def _sets(n_docs: int, n_queries: int) -> dict[str, list[str]]:
    from .bench import load_corpus

    docs, queries, _ = load_corpus("scifact")
    return {"documents": docs[:n_docs], "queries": queries[:n_queries]}


def ensure_artifact(art: str | None, model_dir: str, work: str) -> str:
    """The artifact to measure: ``art``, or the bundled model exported with every CPU variant into ``work``."""
    if art:
        return art
    art = os.path.join(work, "artifact")
    if not os.path.isfile(os.path.join(art, "manifest.json")):
        from bgert.export import export

        export(model_dir, art, progress=False, precisions=["int8", "int8-static", "bf16", "ov-int8"], keep_failed=True)
    return art


def int8_op_counts(art: str) -> dict[str, dict[str, list[int]]]:
    """Per ORT int8 graph: {op type: [nodes in the file, nodes after ORT's CPU optimisations]} for the op types
    that change or carry elementwise work (is DynamicQuantizeLinear + MatMulInteger + Cast + Mul fused?)."""
    import collections
    import tempfile

    import onnx
    import onnxruntime as ort

    from bgert.runtime.ort_backend import CPU_DISABLED_OPTIMIZERS

    out = {}
    for f in ("model.int8.onnx", "model.int8-vnni.onnx"):
        path = os.path.join(art, f)
        if not os.path.isfile(path):
            continue
        so = ort.SessionOptions()
        so.log_severity_level = 3
        with tempfile.TemporaryDirectory() as tmp:
            so.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
            ort.InferenceSession(path, so, providers=["CPUExecutionProvider"],
                                 disabled_optimizers=list(CPU_DISABLED_OPTIMIZERS))  # as the runtime runs it
            after = collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)
        before = collections.Counter(n.op_type for n in onnx.load(path).graph.node)
        keep = {"Mul", "Cast", "MatMul", "MatMulInteger", "DynamicQuantizeLinear", "SkipLayerNormalization",
                "LayerNormalization"}
        out[f] = {k: [before.get(k, 0), after.get(k, 0)] for k in sorted(set(before) | set(after))
                  if k in keep or before.get(k, 0) != after.get(k, 0)}
    return out


def cosines(ref: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    c = (ref.astype(np.float64) * got).sum(-1) / (np.linalg.norm(ref, axis=-1) * np.linalg.norm(got, axis=-1))
    return float(c.mean()), float(c.min())


def run(args: argparse.Namespace) -> dict[str, Any]:
    from .machine import command_line, machine_info
    from .samples import bundled_model_dir

    model_dir = args.model or bundled_model_dir()
    os.makedirs(args.work, exist_ok=True)
    art = ensure_artifact(args.artifact, model_dir, args.work)
    names = variants(art)
    env = {**os.environ, "BGERT_BENCH_DOCS": str(args.docs), "BGERT_BENCH_QUERIES": str(args.queries),
           "OMP_NUM_THREADS": str(args.threads), "BGERT_TUNE": "auto",  # "bgert default" measures on its first load
           "BGERT_CACHE_DIR": os.path.join(os.path.abspath(args.work), "cache")}
    env.pop("BGERT_VARIANT", None)
    shutil.rmtree(env["BGERT_CACHE_DIR"], ignore_errors=True)  # a fresh first load: what a new machine gets
    loadavg = [_loadavg()]
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in names}
    for r in range(args.rounds):
        for v in names:
            if runs[v] and "error" in runs[v][-1]:
                continue  # a variant that cannot run here is tried once
            vec = os.path.join(args.work, "vectors", v.replace(" ", "_")) if r == 0 else ""
            os.makedirs(os.path.dirname(vec or os.path.join(args.work, "vectors", "x")), exist_ok=True)
            python = os.path.join(args.peer_envs, PEER_ENVS[v], "bin", "python") if v in PEER_ENVS else sys.executable
            if not os.path.isfile(python):
                runs[v].append({"error": f"no venv {python}: make it with benchmarks/envs/make_{PEER_ENVS[v].replace('-', '_')}_env.sh"})
                continue
            cmd = [python, "-m", "bgert.benchmarks.cpu_variants", "--worker", v, "--artifact", art,
                   "--model", model_dir, "--work", args.work, "--threads", str(args.threads), "--vectors", vec]
            p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
            if p.returncode:
                err = [x for x in p.stderr.strip().splitlines() if x.strip()]
                runs[v].append({"error": err[-1] if err else f"exit {p.returncode}"})
            else:
                runs[v].append(json.loads(p.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1} {v}: {runs[v][-1]}", file=sys.stderr)
    loadavg.append(_loadavg())
    ref = {s: np.load(os.path.join(args.work, "vectors", f"torch.{s}.npy")) for s in ("documents", "queries")}
    rows = []
    for v in names:
        ok = [x for x in runs[v] if "error" not in x]
        if not ok:
            rows.append({"variant": v, "error": runs[v][-1]["error"]})
            continue
        row: dict[str, Any] = {"variant": v, "rounds": len(ok), "peak_rss_mb": max(x["peak_rss_mb"] for x in ok),
                               **{k: ok[-1][k] for k in ("chosen", "chosen_by") if k in ok[-1]}}
        if "load_s" in ok[0]:
            row["first_load_s"] = ok[0]["load_s"]  # round 1: the first load on this machine, measurement included
        for s in ("documents", "queries"):
            row[f"{s}_per_s"] = max(x[f"{s}_per_s"] for x in ok)
            row[f"cos_mean_{s}"], row[f"cos_min_{s}"] = cosines(
                ref[s], np.load(os.path.join(args.work, "vectors", f"{v.replace(' ', '_')}.{s}.npy")))
        rows.append(row)
    base = next(r for r in rows if r["variant"] == "torch")
    for r in rows:
        for s in ("documents", "queries"):
            if f"{s}_per_s" in r:
                r[f"x_{s}"] = r[f"{s}_per_s"] / base[f"{s}_per_s"]
    from bgert.runtime.autotune import explain

    os.environ["BGERT_CACHE_DIR"] = env["BGERT_CACHE_DIR"]  # explain() reads what "bgert default" measured

    from bgert.runtime.manifest import read_manifest

    name = (read_manifest(art, verify=False).get("source") or {}).get("name") or os.path.basename(art)
    return {"model": os.path.basename(os.path.normpath(name)), "artifact": art, "threads": args.threads,
            "documents": args.docs, "queries": len(ref["queries"]), "batch_size": 32, "rounds": args.rounds,
            "machine": machine_info(), "command": command_line(), "rows": rows,
            "loadavg": loadavg, "default_here": explain(art, args.threads), "int8_ops": int8_op_counts(art)}


def _loadavg() -> str:
    with open("/proc/loadavg", encoding="utf-8") as f:
        return f.read().strip()


LABELS = {"torch": "PyTorch fp32 (sentence-transformers)", "st-onnx-int8": "sentence-transformers ONNX int8",
          "st-openvino": "sentence-transformers OpenVINO"}


def markdown(result: dict[str, Any]) -> str:
    from .machine import describe

    lines = [f"# CPU variants: {result['model']}", "",
             f"Machine: {describe(result['machine'])}. {result['threads']} threads, batch 32, "
             f"{result['documents']} SciFact documents and {result['queries']} queries, best of {result['rounds']} "
             "interleaved rounds, each variant in its own process. /proc/loadavg before and after: "
             + " → ".join(f"`{x}`" for x in result.get("loadavg", [])) + ". Command: `" + result["command"] + "`", "",
             "| variant | docs/s | × docs | queries/s | × queries | cos mean / min docs | cos mean / min queries "
             "| peak RSS MB |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        name = LABELS.get(r["variant"], r["variant"])
        if "chosen" in r:
            first = f"; first load {r['first_load_s']} s" if "first_load_s" in r else ""
            name += f" (chose {r['chosen']}: {r['chosen_by']}{first})"
        if "error" in r:
            lines.append(f"| {name} | not run: {r['error'][:160]} | | | | | | |")
            continue
        lines.append(f"| {name} | {r['documents_per_s']:.1f} | {r['x_documents']:.2f} | {r['queries_per_s']:.1f} | "
                     f"{r['x_queries']:.2f} | {r['cos_mean_documents']:.6f} / {r['cos_min_documents']:.6f} | "
                     f"{r['cos_mean_queries']:.6f} / {r['cos_min_queries']:.6f} | {r['peak_rss_mb']:.0f} |")
    lines += ["", f"Default on this machine: {result['default_here']}", ""]
    for f, ops in result.get("int8_ops", {}).items():
        lines.append(f"{f} nodes, in the file → after ORT's CPU optimisations: "
                     + ", ".join(f"{k} {a}→{b}" for k, (a, b) in ops.items()))
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--artifact", help="artifact to measure (default: the bundled model, exported into --work)")
    p.add_argument("--model", help="PyTorch checkpoint of the reference (default: the bundled all-MiniLM-L6-v2)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--docs", type=int, default=384, help="SciFact documents (the first N of the test corpus)")
    p.add_argument("--queries", type=int, default=300, help="SciFact test queries (the first N)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--work", default="bench-work/cpu_variants", help="exported artifact, peer models, vectors")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--peer-envs", default=ENVS,
                   help="folder of the peers' venvs: st-openvino (optimum-intel, benchmarks/envs/make_st_openvino_env.sh) "
                        "and st-onnx (optimum-onnx, make_st_onnx_env.sh); a peer whose venv is missing is reported "
                        "as not run")
    p.add_argument("--name", help="results file stem (default cpu_variants_<model name in the manifest>)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--vectors", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.artifact, args.model, args.work, args.threads, args.vectors)))
        return 0
    from .report import write_report

    result = run(args)
    stem = write_report(args.out, args.name or f"cpu_variants_{result['model']}", result, markdown(result))
    print(markdown(result))
    print(f"written: {stem}.json, {stem}.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
