"""GPU benchmark: PyTorch fp32/fp16 against ORT CUDA fp32 and ORT CUDA fp16 with IO binding.

One command, on a machine with a GPU, torch (CUDA) and onnxruntime-gpu::

    python -m bgert.benchmarks.gpu_bench               # --device cuda
    python -m bgert.benchmarks.gpu_bench --dry-run     # anywhere: CPU, a few texts, checks that it all runs

Models: a BERT shaped like bge-base-en-v1.5 (12 layers, hidden 768, 12 heads, intermediate 3072,
the 30522-token BERT uncased vocabulary of the bundled all-MiniLM-L6-v2 tokenizer) with random
weights (throughput does not depend on the weights), and the bundled all-MiniLM-L6-v2 (real
weights: its parity figures are the meaningful ones). Both are exported with bgert (fp32 + fp16).

Variants, each end to end (strings in, float32 numpy out, tokenisation included):
- PyTorch fp32 / fp16: transformers AutoModel (its default SDPA attention) on the device, batched
  like FlagModel.encode (tokenise, sort by length, 256 texts per batch padded to the longest),
  CLS or mean pooling, L2 normalisation. TF32 stays off for fp32, as PyTorch defaults.
- ORT fp32 (plain session.run), ORT fp16 (plain), ORT fp16 + IO binding, ORT fp16 + IO binding +
  CUDA graphs, and TensorRT fp16 where TensorRT works here: bgert.runtime.Embedder with
  token-budget batching into length buckets (bgert's defaults). IO-binding variants on CUDA run
  bgert.runtime.tensorrt.warmup first (engines, CUDA graphs, kernel choice; its time is recorded).

Inputs: short (SciFact queries, ≈16 tokens), mixed (SciFact documents), long (documents joined
past the model's max length, so every text is truncated to it). Per variant and input: texts/s
and tokens/s (best of ``--repeats`` timed passes after a warm-up pass), p50/p99 latency at batch
1, cosine against PyTorch fp32 on the same texts. Ratios are within one run on one device.

Writes benchmarks/results/gpu_<device>.json and .md (and .png when matplotlib is there); the JSON
is rewritten after each model, so a run cut short keeps what it measured.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shutil
import sys
import tempfile
import time
from typing import Any, Callable, Sequence

import numpy as np

from bgert.quality import row_cosines

BASE_SHAPE = dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072)
TINY_SHAPE = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=128)
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")
TARGETS = {"torch-fp32": 3.0, "torch-fp16": 1.3}  # ORT fp16 + IO binding on mixed inputs, ×texts/s
HEADLINE = "ort-{dev}-fp16-iobinding"


# ---- inputs -------------------------------------------------------------------------------------------
def load_texts(corpus: str | None) -> tuple[list[str], list[str]]:
    """(documents, queries): a BEIR corpus.jsonl[.gz] + queries.jsonl beside it, or the bundled sample."""
    if corpus is None:
        from bgert.benchmarks.samples import sample_texts

        return sample_texts()
    import gzip

    def read(path: str) -> list[dict]:
        with (gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")) as f:
            return [json.loads(line) for line in f if line.strip()]

    docs = [(d.get("title", "") + " " + d["text"]).strip() for d in read(corpus)]
    queries_path = os.path.join(os.path.dirname(corpus), "queries.jsonl")
    queries = [q["text"] for q in read(queries_path)] if os.path.isfile(queries_path) else [d[:80] for d in docs]
    return docs, queries


def input_sets(docs: list[str], queries: list[str], n: dict[str, int]) -> dict[str, list[str]]:
    """short / mixed / long text lists of the asked sizes (cycled when the source is smaller)."""
    cycle = lambda src, k: [src[i % len(src)] for i in range(k)]  # noqa: E731
    joined, buf = [], ""
    for d in docs * 4:
        buf = f"{buf} {d}".strip()
        if len(buf) > 4000:  # > 600 tokens: truncated to the max length
            joined.append(buf)
            buf = ""
    return {"short": cycle(queries, n["short"]), "mixed": cycle(docs, n["mixed"]), "long": cycle(joined, n["long"])}


# ---- models -------------------------------------------------------------------------------------------
def build_bge_base(root: str, tokenizer_dir: str, shape: dict[str, int]) -> str:
    """A bge-base-en-v1.5-shaped BertModel with random weights and the BERT uncased tokenizer."""
    import torch
    from transformers import BertConfig, BertModel

    d = os.path.join(root, "bge-base-en-v1.5")  # the name makes detection treat it as BGE (CLS, normalised)
    os.makedirs(d, exist_ok=True)
    for f in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(tokenizer_dir, f)):
            shutil.copy(os.path.join(tokenizer_dir, f), d)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, max_position_embeddings=512, type_vocab_size=2, **shape)
    BertModel(cfg).eval().save_pretrained(d)  # with the (unused) pooler, so AutoModel loads every weight
    with open(os.path.join(d, "tokenizer_config.json"), encoding="utf-8") as f:
        tcfg = json.load(f)
    tcfg["model_max_length"] = 512
    with open(os.path.join(d, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(tcfg, f)
    return d


def export_artifact(ckpt: str, out: str) -> tuple[str, str | None]:
    """Export fp32 + fp16; fp32 alone (and the reason) when the fp16 variant cannot be made."""
    import importlib.util

    from bgert.export import export

    if importlib.util.find_spec("bgert.export.precision") is None:
        note = "no fp16 graph: this bgert has no bgert.export.precision (fp16 export)"
    else:
        try:
            return export(ckpt, out, precisions=["fp32", "fp16"], progress=False, force=True), None
        except Exception as e:  # fp16 missed its quality gate, say
            note = f"no fp16 graph ({type(e).__name__}: {str(e)[:300]})"
    return export(ckpt, out, precisions=["fp32"], progress=False, force=True), note


class TorchEmbedder:
    """The PyTorch reference: AutoModel + pooling + normalisation, batched like FlagModel.encode."""

    def __init__(self, ckpt: str, device: str, half: bool, pooling: str, max_length: int, batch_size: int = 256):
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.torch, self.device, self.pooling = torch, device, pooling
        self.max_length, self.batch_size = max_length, batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(ckpt)
        self.model = AutoModel.from_pretrained(ckpt).to(device).eval()
        if half:
            self.model.half()

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        torch = self.torch
        ids = self.tokenizer(list(texts), truncation=True, max_length=self.max_length)["input_ids"]
        order = np.argsort([-len(x) for x in ids], kind="stable")
        out = np.zeros((len(texts), self.model.config.hidden_size), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                batch = self.tokenizer.pad({"input_ids": [ids[i] for i in idx]}, return_tensors="pt").to(self.device)
                hidden = self.model(**batch).last_hidden_state
                if self.pooling == "mean":
                    m = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
                else:
                    pooled = hidden[:, 0]
                out[idx] = torch.nn.functional.normalize(pooled.float(), dim=-1).cpu().numpy()
        return out


def variants(device: str, precisions: list[str], tensorrt: bool) -> list[dict[str, Any]]:
    """What to measure on ``device`` ('cuda' or 'cpu'), as constructor arguments."""
    dev = "cuda" if device == "cuda" else "cpu"
    out: list[dict[str, Any]] = [
        {"name": "torch-fp32", "torch": True, "half": False},
        {"name": "torch-fp16", "torch": True, "half": True},
        {"name": f"ort-{dev}-fp32", "providers": dev, "precision": "fp32", "io_binding": False},
    ]
    if dev == "cpu":
        out.append({"name": "ort-cpu-fp32-iobinding", "providers": "cpu", "precision": "fp32", "io_binding": True})
    if "fp16" in precisions:
        out += [{"name": f"ort-{dev}-fp16", "providers": dev, "precision": "fp16", "io_binding": False},
                {"name": HEADLINE.format(dev=dev), "providers": dev, "precision": "fp16", "io_binding": True}]
        if dev == "cuda":
            out.append({"name": "ort-cuda-fp16-iobinding-cudagraph", "providers": "cuda", "precision": "fp16",
                        "io_binding": True, "cuda_graph": True})
    if tensorrt:
        out.append({"name": "ort-tensorrt-fp16", "providers": ["tensorrt", "cuda"], "precision": "fp32",
                    "io_binding": True, "provider_options": {"trt_fp16_enable": "True"}})
    return out


# ---- measuring ----------------------------------------------------------------------------------------
def percentile_ms(samples: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(samples) * 1e3, q))


def measure(encode: Callable[[Sequence[str]], np.ndarray], texts: list[str], tokens: int, repeats: int,
            n_latency: int) -> tuple[dict[str, float], np.ndarray]:
    """Warm-up pass (its output is returned for parity), best of ``repeats`` passes, batch-1 latency."""
    vecs = encode(texts)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        encode(texts)
        best = min(best, time.perf_counter() - t)
    lat = []
    for text in texts[:n_latency]:
        t = time.perf_counter()
        encode([text])
        lat.append(time.perf_counter() - t)
    return {"seconds": best, "texts_per_s": len(texts) / best, "tokens_per_s": tokens / best,
            "p50_ms": percentile_ms(lat, 50), "p99_ms": percentile_ms(lat, 99), "latency_n": len(lat)}, vecs


def memcpy_nodes(path: str, providers: list[Any]) -> dict[str, int] | str:
    """Memcpy nodes ORT puts between CPU- and GPU-placed nodes of ``path`` (copies on every run)."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        so.log_severity_level = 3
        try:
            ort.InferenceSession(path, so, providers=providers)
            nodes = onnx.load(so.optimized_model_filepath, load_external_data=False).graph.node
        except Exception as e:  # saving is best effort (some fused nodes cannot be written back)
            return f"not counted ({type(e).__name__}: {str(e)[:200]})"
    counts: dict[str, int] = {}
    for n in nodes:
        if n.op_type.startswith("Memcpy"):
            counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def free_device_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def bench_model(name: str, ckpt: str, art: str, note: str | None, sets: dict[str, list[str]],
                args: argparse.Namespace) -> dict[str, Any]:
    """Every variant on every input set of one model."""
    from bgert.runtime import Embedder, read_manifest
    from bgert.runtime.providers import TENSORRT, provider_works

    manifest = read_manifest(art)
    counter = Embedder(art)  # token counts as every variant sees them (same tokenizer, same truncation)
    tokens = {k: sum(len(s) for s in counter.tokenizer.encode(v, counter.max_length)) for k, v in sets.items()}
    trt = args.device == "cuda" and not args.no_tensorrt and provider_works(TENSORRT)
    result: dict[str, Any] = {"checkpoint": ckpt, "artifact": art, "precisions": manifest.precisions(),
                              "pooling": manifest.section.pooling, "max_length": manifest.max_length,
                              "tokens": tokens, "texts": {k: len(v) for k, v in sets.items()},
                              "notes": [note] if note else [], "variants": {}}
    reference: dict[str, np.ndarray] = {}
    for spec in variants(args.device, manifest.precisions(), trt):
        vname = spec["name"]
        print(f"[{name}] {vname} ...", flush=True)
        row: dict[str, Any] = {}
        try:
            if spec.get("torch"):
                enc = TorchEmbedder(ckpt, args.device, spec["half"], manifest.section.pooling,
                                    manifest.max_length)
                encode = enc.encode
            else:
                provs = spec["providers"]
                if "provider_options" in spec:
                    provs = [(provs[0], spec["provider_options"]), *provs[1:]]
                enc = Embedder(art, providers=provs, precision=spec["precision"], io_binding=spec["io_binding"],
                               cuda_graph=spec.get("cuda_graph", False))
                encode = enc.encode
                if args.device == "cuda" and spec["io_binding"]:  # engines, CUDA graphs, kernel choice up front
                    from bgert.runtime.tensorrt import warmup

                    row["warmup_s"] = round(sum(warmup(enc).values()), 2)
            for kind, texts in sets.items():
                stats, vecs = measure(encode, texts, tokens[kind], args.repeats, args.latency)
                if vname == "torch-fp32":
                    reference[kind] = vecs
                    if kind == "mixed":
                        result["distinct_cos_mean"] = float(row_cosines(vecs[:-1], vecs[1:]).mean())
                cos = row_cosines(vecs, reference[kind])
                row[kind] = {**stats, "cos_min": float(cos.min()), "cos_mean": float(cos.mean())}
                print(f"    {kind:5}: {stats['texts_per_s']:9.1f} texts/s {stats['tokens_per_s']:11.0f} tokens/s "
                      f"p50 {stats['p50_ms']:7.2f} ms p99 {stats['p99_ms']:7.2f} ms cos_min {cos.min():.6f}",
                      flush=True)
            if not spec.get("torch"):
                backend = enc.backend_for(enc.graph())
                row["providers"] = list(backend.providers)
                row["backend"] = type(backend).__name__
                if args.device == "cuda":
                    row["memcpy_nodes"] = memcpy_nodes(enc.manifest.path(enc.graph().file), backend.providers)
        except Exception as e:  # a variant that cannot run here is reported, not fatal
            row["error"] = f"{type(e).__name__}: {str(e)[:500]}"
            print(f"    failed: {row['error']}", flush=True)
            if vname == "torch-fp32":
                raise
        finally:
            enc = encode = None  # noqa: F841  (release the model before the next variant)
            free_device_memory()
        result["variants"][vname] = row
    ratios = {}
    for vname, row in result["variants"].items():
        if "mixed" in row:
            ratios[vname] = {base: row["mixed"]["texts_per_s"] / result["variants"][base]["mixed"]["texts_per_s"]
                             for base in TARGETS if "mixed" in result["variants"].get(base, {})}
    result["ratios_mixed"] = ratios
    return result


# ---- reporting ----------------------------------------------------------------------------------------
def device_info(device: str) -> dict[str, Any]:
    from bgert.benchmarks.machine import machine_info

    info: dict[str, Any] = {"machine": machine_info()}
    try:
        import onnxruntime as ort

        info["onnxruntime"] = {"version": ort.__version__, "device": ort.get_device(),
                               "providers": ort.get_available_providers()}
        import torch

        info["torch"] = {"version": torch.__version__, "cuda": torch.version.cuda,
                         "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
                         "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}
    except ImportError:
        pass
    return info


def slug(report: dict[str, Any], dry_run: bool) -> str:
    if dry_run:
        return f"dryrun-{report['device']}"
    name = report["env"].get("torch", {}).get("device", report["device"])
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def markdown(report: dict[str, Any]) -> str:
    env = report["env"]
    gpu = env.get("torch", {}).get("device", "cpu")
    lines = [f"# GPU benchmark: {gpu}", "",
             f"Command: `{report['command']}`  ", f"Device: {gpu}; driver "
             f"{', '.join(g['driver'] for g in env['machine'].get('gpus', [])) or 'n/a'}; "
             f"torch {env.get('torch', {}).get('version')} (CUDA {env.get('torch', {}).get('cuda')}); "
             f"onnxruntime {env.get('onnxruntime', {}).get('version')} ({env.get('onnxruntime', {}).get('device')})  ",
             f"CPU: {env['machine']['cpu']['model']}, {env['machine']['cpu']['usable_cores']} cores. "
             f"Texts/s and tokens/s: best of {report['repeats']} passes after a warm-up pass, end to end (strings in, "
             f"numpy out). Latency: batch 1, {report['latency']} texts per input set. cos: min cosine against "
             "PyTorch fp32 on the same texts.", ""]
    if report["dry_run"]:
        lines += ["**Dry run** (few texts, CPU): checks that the benchmark runs; the numbers mean nothing.", ""]
    for name, res in report["models"].items():
        sizes = ", ".join(f"{k} {res['texts'][k]} texts / {res['tokens'][k]} tokens" for k in res["texts"])
        lines += [f"## {name}", "", f"Inputs: {sizes} (after truncation to {res['max_length']}); graphs: "
                  f"{', '.join(res['precisions'])}; mean cosine between different mixed texts under PyTorch fp32: "
                  f"{res['distinct_cos_mean']:.4f} (how far apart the vectors are, for reading the parity column).",
                  ""]
        lines += ["| variant | short texts/s | mixed texts/s | mixed tokens/s | long texts/s | × torch fp32 (mixed) "
                  "| × torch fp16 (mixed) | p50/p99 ms short | p50/p99 ms mixed | p50/p99 ms long | cos min |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for vname, row in res["variants"].items():
            if "error" in row:
                lines.append(f"| {vname} | failed: {row['error'][:160]} |" + " |" * 9)
                continue
            r = res["ratios_mixed"].get(vname, {})
            lat = " | ".join(f"{row[k]['p50_ms']:.2f} / {row[k]['p99_ms']:.2f}" for k in ("short", "mixed", "long"))
            lines.append(f"| {vname} | {row['short']['texts_per_s']:.1f} | {row['mixed']['texts_per_s']:.1f} | "
                         f"{row['mixed']['tokens_per_s']:.0f} | {row['long']['texts_per_s']:.1f} | "
                         f"{r.get('torch-fp32', float('nan')):.2f} | {r.get('torch-fp16', float('nan')):.2f} | {lat} | "
                         f"{min(row[k]['cos_min'] for k in ('short', 'mixed', 'long')):.6f} |")
        head = res["ratios_mixed"].get(HEADLINE.format(dev="cuda" if report["device"] == "cuda" else "cpu"))
        if head:
            verdict = ", ".join(f"{head[b]:.2f}× {b} (target ≥ {t})" + (" met" if head[b] >= t else " MISSED")
                                for b, t in TARGETS.items() if b in head)
            lines += ["", f"Targets, ORT fp16 + IO binding on mixed inputs: {verdict}."]
        copies = {v: r["memcpy_nodes"] for v, r in res["variants"].items() if "memcpy_nodes" in r}
        if copies:
            lines += ["", "Memcpy nodes ORT inserted (host↔device copies inside every run): "
                      + "; ".join(f"{v}: {c or 'none'}" for v, c in copies.items()) + "."]
        lines += [f"- {n}" for n in res["notes"]] + [""]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    models = list(report["models"])
    fig, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 4), squeeze=False)
    for ax, name in zip(axes[0], models):
        rows = {v: r for v, r in report["models"][name]["variants"].items() if "mixed" in r}
        ax.barh(list(rows), [r["mixed"]["texts_per_s"] for r in rows.values()])
        ax.set_title(f"{name}: mixed SciFact documents")
        ax.set_xlabel("texts/s, end to end")
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def write(report: dict[str, Any], out_dir: str, final: bool) -> str:
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, f"gpu_{slug(report, report['dry_run'])}")
    with open(base + ".json", "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    if final:
        with open(base + ".md", "w", encoding="utf-8") as f:
            f.write(markdown(report))
        plot(report, base + ".png")
    return base


# ---- main ---------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bgert.benchmarks.gpu_bench", description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda (cpu with --dry-run)")
    p.add_argument("--dry-run", action="store_true", help="CPU, a few texts, one pass: checks that it all runs")
    p.add_argument("--models", default="bge-base,all-minilm", help="comma list of bge-base, all-minilm")
    p.add_argument("--tiny", action="store_true", help="a 2-layer, hidden-64 stand-in for bge-base (tests)")
    p.add_argument("--minilm", default=None, help="all-MiniLM-L6-v2 directory (default: the bundled one)")
    p.add_argument("--corpus", default=None, help="BEIR corpus.jsonl[.gz] (default: the bundled SciFact sample)")
    p.add_argument("--short", type=int, help="short texts, SciFact queries (default 2000; dry run 16)")
    p.add_argument("--mixed", type=int, help="mixed texts, SciFact documents (default 1000; dry run 16)")
    p.add_argument("--long", type=int, help="long texts, truncated to the max length (default 256; dry run 4)")
    p.add_argument("--latency", type=int, help="batch-1 calls per input set (default 100; dry run 3)")
    p.add_argument("--repeats", type=int, help="timed passes, the best counts (default 2; dry run 1)")
    p.add_argument("--no-tensorrt", action="store_true", help="skip TensorRT even where it works")
    p.add_argument("--work", default=None, help="where checkpoints and artifacts go (default: a temp dir)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    sizes = dict(short=16, mixed=16, long=4, latency=3, repeats=1) if args.dry_run else \
        dict(short=2000, mixed=1000, long=256, latency=100, repeats=2)
    for k, v in sizes.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.device = args.device or ("cpu" if args.dry_run else "cuda")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from bgert.benchmarks.machine import command_line
    from bgert.benchmarks.samples import bundled_model_dir

    if args.device == "cuda":
        import torch

        from bgert.runtime.providers import CUDA, preload_gpu_libraries, provider_works

        preload_gpu_libraries()
        if not torch.cuda.is_available() or not provider_works(CUDA):
            print("no usable CUDA: torch.cuda.is_available() and onnxruntime-gpu's CUDA provider are both needed "
                  "(or run with --dry-run / --device cpu)", file=sys.stderr)
            return 2
    if args.dry_run:  # its numbers mean nothing: one torch thread keeps it quick on a busy machine
        import torch

        torch.set_num_threads(1)
    work = args.work or tempfile.mkdtemp(prefix="bgert-gpu-bench-")
    minilm = args.minilm or bundled_model_dir()
    docs, queries = load_texts(args.corpus)
    sets = input_sets(docs, queries, {"short": args.short, "mixed": args.mixed, "long": args.long})
    report: dict[str, Any] = {"command": command_line(sys.argv if argv is None else ["gpu_bench.py", *argv]),
                              "device": args.device, "dry_run": args.dry_run, "repeats": args.repeats,
                              "latency": args.latency, "env": device_info(args.device), "models": {}}
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        if model == "bge-base":
            ckpt = build_bge_base(os.path.join(work, "ckpt"), minilm, TINY_SHAPE if args.tiny else BASE_SHAPE)
            label = "bge-base-en-v1.5 shape (random weights)" + (" [tiny stand-in]" if args.tiny else "")
        elif model == "all-minilm":
            ckpt, label = minilm, "all-MiniLM-L6-v2 (bundled, real weights)"
        else:
            raise SystemExit(f"unknown model {model!r}; use bge-base, all-minilm")
        t = time.perf_counter()
        art, note = export_artifact(ckpt, os.path.join(work, "art", os.path.basename(ckpt)))
        print(f"exported {label} in {time.perf_counter() - t:.0f}s" + (f"; {note}" if note else ""), flush=True)
        report["models"][label] = bench_model(label, ckpt, art, note, sets, args)
        write(report, args.out, final=False)
    base = write(report, args.out, final=True)
    print(f"wrote {base}.json / .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
