"""The bench engine: parity and throughput of an artifact against its PyTorch reference, in one run.

For every requested variant (backend × precision) and for the reference (FlagEmbedding 1.4.2
or sentence-transformers, fp32 on CPU, loaded from the artifact's source checkpoint) it measures,
on the same inputs:

- parity against the reference: embedders cosine (mean, min, 1st percentile) and max |diff|;
  M3 per output (dense, sparse as weight vectors, colbert rows); rerankers score diff, Spearman
  and top-k agreement (layerwise: per cutoff layer). Each variant has a gate (bgert.quality's defaults, or the one its export recorded);
- throughput end to end (strings in, numpy out): texts/s and tokens/s at several batch sizes on
  short (SciFact queries, ~16 tokens), mixed (SciFact documents) and long (max length) inputs;
  latency p50/p99 at batch 1; peak RSS of a fresh process per variant;
- the roofline: fp32 GEMM peak measured now (numpy matmul, same thread count) and the fraction of
  it each variant reaches (model FLOPs of the real tokens ÷ time ÷ peak);
- the machine, package versions and the exact command.

``parity()`` is the part CI runs (tests/test_parity_gate.py); ``bench()`` is ``bgert bench``.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from .bench_families import BenchAdapter, BenchError, adapter_for, config_value, cycle

SETS = ("short", "mixed", "long")
#: texts per input set, and batch sizes: the default run, and --quick (CI)
SIZES = {"short": 128, "mixed": 32, "long": 16}
QUICK_SIZES = {"short": 32, "mixed": 8, "long": 4}
BATCH_SIZES = (1, 8, 32)
QUICK_BATCH_SIZES = (1, 8)

#: model types whose MLP is a plain up/down projection (the rest are gated: up, gate, down)
UNGATED = {"bert", "roberta", "xlm-roberta", "distilbert", "electra", "mpnet", "deberta", "deberta-v2", "nomic_bert"}


def load_corpus(data: str) -> tuple[list[str], list[str], str]:
    """(documents, queries, description) from ``scifact`` (the bundled test split) or a txt/jsonl file."""
    if data == "scifact":
        from .eval import load_beir

        d = load_beir("scifact")
        return d.docs, d.queries, "BEIR SciFact test (bundled)"
    if not os.path.isfile(data):
        raise BenchError(f"--data {data!r} is neither 'scifact' nor a file (txt: one text per line; jsonl: "
                         "'text' and optional 'title' per record).")
    from bgert.export.precision import read_texts

    docs = [t for t in read_texts(data) if t.strip()]
    if not docs:
        raise BenchError(f"--data {data} holds no text")
    return docs, [], os.path.basename(data)


# ============================================================================ roofline
def flops_model(config: dict[str, Any], layers: int) -> dict[str, Any]:
    """Per-layer linear MACs per token and attention width, from config.json (BERT/XLM-R style
    encoders and gated decoders, with grouped-query attention)."""
    h = int(config_value(config, "hidden_size", "dim", "d_model"))
    inter = int(config_value(config, "intermediate_size", "hidden_dim", "ffn_dim"))
    heads = int(config_value(config, "num_attention_heads", "n_heads"))
    head_dim = int(config.get("head_dim") or h // heads)
    kv = int(config.get("num_key_value_heads") or heads) * head_dim
    attn = heads * head_dim
    gated = config.get("model_type") not in UNGATED
    linear = h * attn + 2 * h * kv + attn * h + (3 if gated else 2) * h * inter
    return {"layers": int(layers), "hidden": h, "intermediate": inter, "attn_dim": attn, "kv_dim": kv,
            "gated_mlp": gated, "linear_macs_per_token_per_layer": linear}


def sequence_flops(fm: dict[str, Any], n: np.ndarray) -> np.ndarray:
    """FLOPs (2 × MACs) of one sequence of ``n`` real tokens: linear layers plus QKᵀ and PV."""
    n = np.asarray(n, dtype=np.float64)
    return 2.0 * fm["layers"] * (n * fm["linear_macs_per_token_per_layer"] + 2.0 * n * n * fm["attn_dim"])


def gemm_peak(threads: int, sizes: Sequence[int] = (1024, 2048), repeats: int = 5) -> dict[str, Any]:
    """fp32 GEMM GFLOP/s of numpy matmul in a fresh process limited to ``threads`` BLAS threads."""
    env = {**os.environ, **{k: str(threads) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                        "MKL_NUM_THREADS", "BLIS_NUM_THREADS")}}
    code = ("from bgert.benchmarks.bench import _gemm_child; _gemm_child(%r, %d)" % (list(sizes), repeats))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _gemm_child(sizes: list[int], repeats: int) -> None:
    per = {}
    for n in sizes:
        a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
        b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
        a @ b  # warm-up
        best = min(_timed(lambda: a @ b) for _ in range(repeats))
        per[str(n)] = round(2.0 * n ** 3 / best / 1e9, 2)
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]["name"]
    except (TypeError, KeyError):  # numpy < 1.26 prints instead
        blas = None
    print(json.dumps({"gflops": max(per.values()), "per_size": per, "blas": blas,
                      "threads": int(os.environ.get("OMP_NUM_THREADS", "0")), "method": "numpy float32 matmul n×n, "
                      f"best of {repeats}"}))


def _timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# ============================================================================ variants
@dataclass
class Variant:
    """One measured configuration: the reference, or bgert with a backend and precision."""

    name: str
    reference: bool = False
    precision: str = "fp32"
    backend: str = "ort"
    providers: list[str] | None = None
    library: str = ""


@dataclass
class Context:
    """What every variant needs to be built, in this process or in a memory probe."""

    artifact: str
    source: str
    reference: str
    threads: int
    backend_options: dict[str, Any] = field(default_factory=dict)


def open_artifact(ctx: Context, variant: Variant | None = None) -> Any:
    """A runtime model of the artifact for ``variant`` (default: fp32 on ORT CPU)."""
    from bgert.runtime import load

    v = variant or Variant("probe")
    opts = ctx.backend_options if v.backend == "triton" else {}
    return load(ctx.artifact, precision=v.precision, backend=v.backend, providers=v.providers,
                intra_op_num_threads=ctx.threads, verify=False, **opts)  # Run verified the hashes once


def build(ctx: Context, variant: Variant, family: BenchAdapter) -> Callable[[list[Any], int, str], Any]:
    """The call of ``variant``: strings (or pairs) in, numpy out."""
    if variant.reference:
        import torch

        torch.set_num_threads(ctx.threads)
        call, variant.library = family.reference(ctx.reference, ctx.source)
        return call
    return family.ours(open_artifact(ctx, variant))


def runnable_precisions(manifest: Any, providers: list[str] | None) -> list[str]:
    """Precisions worth measuring by default: graphs that need CPU flags this CPU lacks (int8-vnni
    without VNNI) are left out on CPU, as the runtime leaves them out (name them to measure them)."""
    from bgert.runtime.base import graph_runs_well_here

    on_cpu = not providers or all(p.lower() in ("cpu", "cpuexecutionprovider") for p in providers)
    return [p for p in manifest.precisions()
            if not on_cpu or all(graph_runs_well_here(g) for g in manifest.graphs if g.precision == p)]


def resolve_source(manifest: Any, reference_model: str | None) -> str:
    """The checkpoint the reference loads: ``--reference-model`` or the manifest's source path."""
    src = reference_model or (manifest.get("source") or {}).get("path")
    if not src or not os.path.isdir(src):
        raise BenchError(f"the reference checkpoint {src!r} (manifest source.path) is not a directory here; "
                         "pass the PyTorch checkpoint with --reference-model PATH.")
    return src


def read_config(src: str) -> dict[str, Any]:
    path = os.path.join(src, "config.json")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# ============================================================================ parity
def parity(artifact: str, *, reference: str = "auto", reference_model: str | None = None,
           precisions: Sequence[str] | None = None, backends: Sequence[str] = ("ort",),
           providers: list[str] | None = None, threads: int | None = None, data: str = "scifact",
           sizes: dict[str, int] | None = None, batch_size: int = 8, gates: dict[str, float] | None = None,
           backend_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Compare every variant of ``artifact`` with the PyTorch reference on the edge-case texts and
    the short/mixed/long sets; return the stats per set, the gates and the list of failures."""
    run = Run(artifact, reference=reference, reference_model=reference_model, precisions=precisions,
              backends=backends, providers=providers, threads=threads, data=data,
              sizes=sizes or QUICK_SIZES, backend_options=backend_options)
    run.parity_pass(batch_size, gates or {})
    return run.result()


class Run:
    """One bench run: the artifact, its family, the reference, the variants and the inputs."""

    def __init__(self, artifact: str, *, reference: str = "auto", reference_model: str | None = None,
                 precisions: Sequence[str] | None = None, backends: Sequence[str] = ("ort",),
                 providers: list[str] | None = None, threads: int | None = None, data: str = "scifact",
                 sizes: dict[str, int] | None = None, backend_options: dict[str, Any] | None = None):
        from bgert.runtime import read_manifest

        self.t0 = time.perf_counter()
        self.started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.load_start = os.getloadavg()
        manifest = read_manifest(artifact)
        threads = threads or len(os.sched_getaffinity(0))
        self.ctx = Context(os.path.abspath(artifact), "", reference, int(threads), dict(backend_options or {}))
        self.family = adapter_for(open_artifact(self.ctx))  # an uncovered kind says so before anything else
        self.ctx.source = resolve_source(manifest, reference_model)
        if reference == "auto":
            self.ctx.reference = self.family.auto_reference(self.ctx.source)
        elif reference not in ("flagembedding", "sentence-transformers"):
            raise BenchError(f"--reference must be auto, flagembedding or sentence-transformers, got {reference!r}")
        have = manifest.precisions()
        missing = [p for p in precisions or () if p not in have]
        if missing:
            raise BenchError(f"precision {', '.join(missing)} is not in {artifact}; it has {', '.join(have)}")
        self.skipped = [] if precisions else [p for p in have if p not in runnable_precisions(manifest, providers)]
        precisions = list(precisions or [p for p in have if p not in self.skipped])
        for b in backends:
            if b not in ("ort", "openvino", "triton"):
                raise BenchError(f"--backend must be ort, openvino or triton, got {b!r}")
        self.variants = [Variant("PyTorch fp32", reference=True)]
        from bgert.runtime.base import graph_backend

        self.variants += [Variant(f"bgert {b} {p}", precision=p, backend=b, providers=providers)
                          for b in backends for p in precisions  # bf16 is OpenVINO's only
                          if all(graph_backend(g) in ("any", b) for g in manifest.graphs if g.precision == p)]
        docs, queries, source = load_corpus(data)
        self.data = source
        self.sets = self.family.input_sets(docs, queries, sizes or SIZES, source)
        self.calls: dict[str, Callable[[list[Any], int, str], Any]] = {}
        self.parity: dict[str, dict[str, Any]] = {}
        self.gates: dict[str, list[dict[str, Any]]] = {}
        self.throughput: list[dict[str, Any]] = []
        self.latency: dict[str, dict[str, float]] = {}
        self.memory: dict[str, dict[str, Any]] = {}
        self.roofline: dict[str, Any] = {}
        self.peaks: list[dict[str, Any]] = []
        self.settings: dict[str, Any] = {"threads": self.ctx.threads, "sizes": dict(sizes or SIZES),
                                         "precisions_not_run_here": self.skipped}
        self.timings: dict[str, float] = {}

    def call(self, v: Variant) -> Callable[[list[Any], int, str], Any]:
        if v.name not in self.calls:
            t = time.perf_counter()
            self.calls[v.name] = build(self.ctx, v, self.family)
            self.timings[f"load {v.name}"] = round(time.perf_counter() - t, 2)
        return self.calls[v.name]

    # ---- parity (also the warm-up of every set for the timings that follow) -------------------
    def parity_pass(self, batch_size: int, gate_overrides: dict[str, float]) -> None:
        t = time.perf_counter()
        sets = [self.family.edge_set(), *self.sets]
        ref = self.variants[0]
        ref_out = {s.name: self.call(ref)(s.items, batch_size, s.role) for s in sets}
        for v in self.variants[1:]:
            got = {s.name: self.call(v)(s.items, batch_size, s.role) for s in sets}
            per = {s.name: self.family.compare(ref_out[s.name], got[s.name]) for s in sets}
            per["all"] = self.family.compare(self.family.concat([ref_out[s.name] for s in sets]),
                                             self.family.concat([got[s.name] for s in sets]))
            self.parity[v.name] = per
            self.gates[v.name] = self.family.gate(per["all"], v.precision, gate_overrides)
        self.settings["parity_batch_size"] = batch_size
        self.timings["parity"] = round(time.perf_counter() - t, 2)

    def failures(self) -> list[str]:
        return [f"{name}: {g['output']} {g['metric']} {g['value']:.6g} (gate {g['op']} {g['threshold']})"
                for name, gs in self.gates.items() for g in gs if not g["passed"]]

    # ---- throughput ------------------------------------------------------------------------
    def throughput_pass(self, batch_sizes: Sequence[int], repeats: int) -> None:
        """Best-of-``repeats`` wall time per (set, batch size), variants interleaved per cell so
        that load from other processes hits them alike."""
        t = time.perf_counter()
        for s in self.sets:
            for bs in batch_sizes:
                for v in self.variants:
                    fn = self.call(v)
                    times = [_timed(lambda: fn(s.items, bs, s.role)) for _ in range(repeats)]
                    best = min(times)
                    self.throughput.append({"variant": v.name, "set": s.name, "batch_size": bs,
                                            "seconds": round(best, 4), "times": [round(x, 4) for x in times],
                                            "texts_per_s": round(len(s.items) / best, 2),
                                            "tokens_per_s": round(float(s.tokens.sum()) / best, 1)})
        self.settings.update(batch_sizes=list(batch_sizes), repeats=repeats)
        self.timings["throughput"] = round(time.perf_counter() - t, 2)

    def latency_pass(self, calls: int) -> None:
        """Single-text calls (batch 1) on the short set: p50, p99 and mean in milliseconds."""
        t = time.perf_counter()
        short = next((s for s in self.sets if s.name == "short"), self.sets[0])
        items = cycle(short.items, calls)
        for v in self.variants:
            fn = self.call(v)
            ms = np.array([_timed(lambda: fn([x], 1, short.role)) * 1e3 for x in items])
            self.latency[v.name] = {"p50_ms": round(float(np.percentile(ms, 50)), 3),
                                    "p99_ms": round(float(np.percentile(ms, 99)), 3),
                                    "mean_ms": round(float(ms.mean()), 3), "calls": len(ms), "set": short.name}
        self.timings["latency"] = round(time.perf_counter() - t, 2)

    def memory_pass(self, batch_size: int) -> None:
        """Peak RSS of a fresh process per variant that imports its runtime, loads the model and
        encodes the mixed set once (so ours never counts torch, and the reference counts it)."""
        t = time.perf_counter()
        mixed = next((s for s in self.sets if s.name == "mixed"), self.sets[0])
        with tempfile.TemporaryDirectory() as tmp:
            for v in self.variants:
                spec = os.path.join(tmp, "spec.json")
                with open(spec, "w", encoding="utf-8") as f:
                    json.dump({"ctx": asdict(self.ctx), "variant": asdict(v), "items": mixed.items,
                               "role": mixed.role, "batch_size": batch_size}, f)
                code = "from bgert.benchmarks.bench import _rss_child; _rss_child()"
                r = subprocess.run([sys.executable, "-c", code, spec], capture_output=True, text=True)
                if r.returncode != 0:
                    self.memory[v.name] = {"error": r.stderr.strip().splitlines()[-1:] or ["failed"]}
                    continue
                self.memory[v.name] = json.loads(r.stdout.strip().splitlines()[-1])
        self.settings["memory_batch_size"] = batch_size
        self.timings["memory"] = round(time.perf_counter() - t, 2)

    def measure_peak(self) -> None:
        """The fp32 GEMM peak; called before and after the timings, the higher one is used (other
        processes on the machine can only lower it)."""
        self.peaks.append(gemm_peak(self.ctx.threads))

    def roofline_pass(self) -> None:
        """Model FLOPs per set, and the fraction of the GEMM peak each cell reaches."""
        t = time.perf_counter()
        try:
            config = read_config(self.ctx.source)
            fm = flops_model(config, self.family.layers(config))
        except (OSError, KeyError, ValueError) as e:
            self.roofline = {"error": f"no FLOP count: {e}"}
            return
        if not self.peaks:
            self.measure_peak()
        peak = dict(max(self.peaks, key=lambda p: p["gflops"]), measured=[p["gflops"] for p in self.peaks])
        flops = {s.name: float(sequence_flops(fm, s.tokens).sum()) for s in self.sets}
        per_token = {s.name: round(flops[s.name] / max(int(s.tokens.sum()), 1) / 1e6, 2) for s in self.sets}
        for row in self.throughput:
            gf = flops[row["set"]] / row["seconds"] / 1e9
            row["gflops"] = round(gf, 2)
            row["roofline"] = round(gf / peak["gflops"], 4)
        self.roofline = {"gemm_peak": peak, "model": fm, "mflops_per_token": per_token,
                         "note": "useful FLOPs of the real tokens (no padding), 2 per multiply-add; "
                                 "fraction of the fp32 GEMM peak (int8 variants can exceed what fp32 allows)"}
        self.timings["roofline"] = round(time.perf_counter() - t, 2)

    # ---- result ----------------------------------------------------------------------------
    def result(self) -> dict[str, Any]:
        from .machine import command_line, machine_info

        m = self.family.manifest
        ref = self.variants[0]
        return {
            "artifact": self.ctx.artifact, "model": os.path.basename(self.ctx.artifact.rstrip("/")),
            "kind": m.kind, "family": m.family, "max_length": self.family.max_length(),
            "reference": {"library": self.ctx.reference, "class": ref.library, "checkpoint": self.ctx.source,
                          "dtype": "fp32", "device": "cpu"},
            "variants": [asdict(v) for v in self.variants],
            "inputs": {s.name: s.summary() for s in [self.family.edge_set(), *self.sets]},
            "parity": self.parity, "gates": self.gates, "failures": self.failures(),
            "throughput": self.throughput, "latency": self.latency, "memory": self.memory,
            "roofline": self.roofline, "settings": self.settings, "timings_s": self.timings,
            "machine": machine_info(), "command": command_line(), "started": self.started,
            "load_average": {"start": [round(x, 2) for x in self.load_start],
                             "end": [round(x, 2) for x in os.getloadavg()], "note": "1, 5, 15 minutes"},
            "wall_s": round(time.perf_counter() - self.t0, 1),
        }


def peak_rss_kib() -> int:
    """This process's peak RSS in KiB: VmHWM from /proc (ru_maxrss on Linux keeps the parent's
    peak across fork + exec, so a small child of a big parent would report the parent's)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _rss_child() -> None:
    """Memory probe (run in a fresh process): import, build one variant, encode once, print RSS.

    ``model_rss_mb`` is the growth after the imports (weights, sessions, activations);
    ``peak_rss_mb`` is the whole process, imports included."""
    with open(sys.argv[1], encoding="utf-8") as f:
        spec = json.load(f)
    kb = peak_rss_kib
    variant = Variant(**spec["variant"])
    ctx = Context(**spec["ctx"])
    import bgert.runtime  # noqa: F401  (the reference process holds it too, for the artifact's settings)

    if variant.reference:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    family = adapter_for(open_artifact(ctx))  # no session yet: runtime models open graphs lazily
    imported = kb()
    fn = build(ctx, variant, family)
    fn([tuple(x) if isinstance(x, list) else x for x in spec["items"]], spec["batch_size"], spec["role"])
    print(json.dumps({"peak_rss_mb": round(kb() / 1024, 1), "model_rss_mb": round((kb() - imported) / 1024, 1),
                      "after_imports_mb": round(imported / 1024, 1)}))


def bench(artifact: str, *, batch_sizes: Sequence[int] = BATCH_SIZES, repeats: int = 2, latency_calls: int = 100,
          memory: bool = True, gates: dict[str, float] | None = None, **kwargs: Any) -> dict[str, Any]:
    """The full run: parity (and warm-up), throughput, latency, memory, roofline."""
    run = Run(artifact, **kwargs)
    run.parity_pass(max(batch_sizes), gates or {})
    run.measure_peak()
    run.throughput_pass(batch_sizes, repeats)
    run.measure_peak()
    if latency_calls:
        run.latency_pass(latency_calls)
    if memory:
        run.memory_pass(max(batch_sizes))
    run.roofline_pass()
    return run.result()


# ============================================================================ reports
def _cell(result: dict[str, Any], variant: str, set_name: str, bs: int) -> dict[str, Any] | None:
    return next((r for r in result["throughput"]
                 if r["variant"] == variant and r["set"] == set_name and r["batch_size"] == bs), None)


def speedups(result: dict[str, Any]) -> dict[str, dict[str, float]]:
    """texts/s of each variant ÷ the reference's, per set at the largest batch size (same run)."""
    ref = result["variants"][0]["name"]
    bs = max(result["settings"].get("batch_sizes", [0]))
    out: dict[str, dict[str, float]] = {}
    for v in result["variants"][1:]:
        for s in result["inputs"]:
            ours, theirs = _cell(result, v["name"], s, bs), _cell(result, ref, s, bs)
            if ours and theirs:
                out.setdefault(v["name"], {})[s] = round(ours["texts_per_s"] / theirs["texts_per_s"], 2)
    return out


def _quality(result: dict[str, Any], variant: str) -> tuple[str, float]:
    """The gated metric of a variant's first output (for the table and the speed/quality plot)."""
    g = result["gates"][variant][0]
    return g["metric"], g["value"]


def markdown(result: dict[str, Any]) -> str:
    """The report: parity, headline speed-ups, every throughput cell, inputs, roofline, machine."""
    from .machine import describe

    sets = [s for s in result["inputs"] if s != "edge"]
    names = [v["name"] for v in result["variants"]]
    bs = max(result["settings"].get("batch_sizes", [0]))
    ref = result["reference"]
    peak = result["roofline"].get("gemm_peak", {}).get("gflops")
    lines = [f"# bgert bench: {result['model']} ({result['kind']}, max length {result['max_length']})", "",
             f"Reference: {ref['class']} from `{ref['checkpoint']}`, PyTorch fp32 on CPU. "
             f"Threads: {result['settings']['threads']} (ORT intra-op, torch, BLAS). "
             f"Timings: best of {result['settings'].get('repeats', '?')}, variants interleaved per cell.", "",
             "## Parity against the reference (all inputs: edge cases + " + ", ".join(sets) + ")", "",
             "| variant | output | cos mean | cos min | cos p01 | max abs diff | Spearman | gate |",
             "|---|---|---|---|---|---|---|---|"]
    for name in names[1:]:
        for out, s in result["parity"].get(name, {}).get("all", {}).items():
            gates = [g for g in result["gates"].get(name, []) if g["output"] == out]
            f = lambda k: f"{s[k]:.6f}" if k in s else "–"  # noqa: E731
            mark = ("pass" if all(g["passed"] for g in gates) else "**FAIL**") + " (" + ", ".join(
                f"{g['metric']} {g['op']} {g['threshold']:g}" for g in gates) + ")"
            lines.append(f"| {name} | {out} | {f('cos_mean')} | {f('cos_min')} | {f('cos_p01')} | "
                         f"{s['max_abs_diff']:.2e} | {f('spearman')} | {mark} |")
    if result["settings"].get("precisions_not_run_here"):
        lines += ["", "Not measured on this CPU (their graphs need CPU flags it lacks; name them with --precision "
                      "to measure anyway): " + ", ".join(result["settings"]["precisions_not_run_here"])]
    sp = speedups(result)
    lines += ["", f"## Throughput at batch size {bs} (texts/s, end to end: strings in, numpy out)", "",
              "| variant | " + " | ".join(f"{s} texts/s" for s in sets) + " | "
              + " | ".join(f"{s} speed-up" for s in sets)
              + " | mixed tokens/s | roofline (mixed) | p50 / p99 ms (batch 1) | peak RSS MB (model) |",
              "|---" * (1 + 2 * len(sets) + 4) + "|"]
    for name in names:
        cells = [_cell(result, name, s, bs) for s in sets]
        mixed = _cell(result, name, "mixed", bs) or {}
        lat = result["latency"].get(name, {})
        mem = result["memory"].get(name, {})
        lines.append(f"| {name} | " + " | ".join(f"{c['texts_per_s']:.1f}" if c else "–" for c in cells) + " | "
                     + " | ".join(f"{sp[name][s]:.2f}×" if name in sp and s in sp[name] else "1×" for s in sets)
                     + f" | {mixed.get('tokens_per_s', 0):.0f} | "
                     + (f"{mixed['roofline']:.1%}" if "roofline" in mixed else "–") + " | "
                     + (f"{lat['p50_ms']:.1f} / {lat['p99_ms']:.1f}" if lat else "–") + " | "
                     + (f"{mem['peak_rss_mb']:.0f} ({mem['model_rss_mb']:.0f})" if "peak_rss_mb" in mem else "–")
                     + " |")
    lines += ["", "## Every cell", "", "| set | batch | variant | seconds | texts/s | tokens/s | GFLOP/s | roofline |",
              "|---|---|---|---|---|---|---|---|"]
    for r in result["throughput"]:
        lines.append(f"| {r['set']} | {r['batch_size']} | {r['variant']} | {r['seconds']:.3f} | "
                     f"{r['texts_per_s']:.1f} | "
                     f"{r['tokens_per_s']:.0f} | {r.get('gflops', '–')} | "
                     + (f"{r['roofline']:.1%}" if "roofline" in r else "–") + " |")
    lines += ["", "## Inputs", ""]
    for s, info in result["inputs"].items():
        lines.append(f"- **{s}**: {info['n']} items ({info['role']}), mean {info['mean_tokens']} tokens, "
                     f"{info['total_tokens']:,} in all; {info['source']}")
    lines += ["", "## Roofline", ""]
    if peak:
        rf = result["roofline"]
        lines.append(f"fp32 GEMM peak measured in this run: **{peak:.1f} GFLOP/s** ({rf['gemm_peak']['method']}, "
                     f"{rf['gemm_peak']['threads']} threads, BLAS {rf['gemm_peak'].get('blas')}; the higher of "
                     f"{rf['gemm_peak']['measured']} GFLOP/s, measured before and after the timings). Model: "
                     f"{rf['model']['layers']} layers, hidden {rf['model']['hidden']}, intermediate "
                     f"{rf['model']['intermediate']}; MFLOPs per token: "
                     + ", ".join(f"{k} {v}" for k, v in rf["mflops_per_token"].items()) + f". {rf['note']}.")
    else:
        lines.append(result["roofline"].get("error", "not measured"))
    if result["memory"]:
        lines += ["", "Peak RSS: a fresh process per variant imports its runtime, loads the model and encodes the "
                      "mixed set once; (model) is the growth after the imports. The reference's process also "
                      "imports bgert.runtime for the artifact's settings."]
    load = result.get("load_average", {})
    lines += ["", f"Machine: {describe(result['machine'])}. Load average (1 min) {load.get('start', ['?'])[0]} at the "
                  f"start, {load.get('end', ['?'])[0]} at the end, on {result['settings']['threads']} threads: other "
                  "processes shared the machine, so compare variants within one run (ratios), not across runs.", "",
              f"Command: `{result['command']}`", "", f"Started {result['started']}, wall {result['wall_s']} s."]
    if result["failures"]:
        lines += ["", "**Gates missed:** " + "; ".join(result["failures"])]
    return "\n".join(lines) + "\n"


def plots(result: dict[str, Any], stem: str) -> list[str]:
    """PNGs: throughput against batch size per set (a line per variant), and speed-up against quality."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = [s for s in result["inputs"] if s != "edge"]
    names = [v["name"] for v in result["variants"]]
    fig, axes = plt.subplots(1, len(sets), figsize=(4.2 * len(sets), 3.6), squeeze=False)
    for ax, s in zip(axes[0], sets):
        for name in names:
            rows = sorted((r for r in result["throughput"] if r["variant"] == name and r["set"] == s),
                          key=lambda r: r["batch_size"])
            ax.plot([r["batch_size"] for r in rows], [r["tokens_per_s"] for r in rows], marker="o", label=name,
                    linestyle="--" if name == names[0] else "-")
        rf = result["roofline"]
        if "gemm_peak" in rf:  # tokens/s a variant would reach at the fp32 GEMM peak
            ax.axhline(rf["gemm_peak"]["gflops"] * 1e3 / rf["mflops_per_token"][s], color="grey", linestyle=":",
                       label="fp32 GEMM peak")
        info = result["inputs"][s]
        ax.set(title=f"{s} (~{info['mean_tokens']:.0f} tokens)", xlabel="batch size", xscale="log", ylim=(0, None))
        ax.minorticks_off()
        ax.set_xticks(result["settings"]["batch_sizes"], [str(b) for b in result["settings"]["batch_sizes"]])
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("tokens/s (end to end)")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(f"{result['model']}: throughput, {result['settings']['threads']} threads", fontsize=10)
    fig.tight_layout()
    out = [f"{stem}_throughput.png"]
    fig.savefig(out[0], dpi=110)
    plt.close(fig)

    ref = names[0]
    sizes = result["settings"]["batch_sizes"]
    markers = "osD^vP*X"
    fig, ax = plt.subplots(figsize=(8, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    metric = _quality(result, names[1])[0] if len(names) > 1 else "cos_min"
    for i, name in enumerate(names[1:]):
        value = _quality(result, name)[1]
        loss = max(value, 1e-9) if metric == "max_abs_diff" else max(1.0 - value, 1e-9)
        for j, bs in enumerate(sizes):
            ours, theirs = _cell(result, name, "mixed", bs), _cell(result, ref, "mixed", bs)
            if ours and theirs:
                ax.scatter([loss], [ours["texts_per_s"] / theirs["texts_per_s"]],
                           color=colors[(i + 1) % len(colors)],  # colours as in the throughput plot
                           marker=markers[j % len(markers)], s=45, label=f"{name} (batch {bs})")
    ax.set(xscale="log", xlabel=("1 − " + metric if metric != "max_abs_diff" else metric)
           + " vs PyTorch fp32 (floor 1e-9)", ylabel="speed-up vs PyTorch (mixed set)",
           title=f"{result['model']}: speed against quality")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    out.append(f"{stem}_speed_quality.png")
    fig.savefig(out[1], dpi=110)
    plt.close(fig)
    return out
