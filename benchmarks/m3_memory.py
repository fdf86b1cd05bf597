"""BGE-M3 on long inputs: peak memory and CPU throughput of bgert against BGEM3FlagModel, on a
random-weights model of bge-m3's real shape.

    python -m bgert.benchmarks.m3_memory                       # ~30-60 min on 2 cores
    python -m bgert.benchmarks.m3_memory --work /tmp/m3bench --lengths 128,512,8192 --repeats 2

Model: XLM-R with bge-m3's shape (24 layers, hidden 1024, 16 heads, intermediate 4096, 8194
positions, max length 8192) plus both heads (colbert 1024→1024, sparse 1024→1), random weights.
The vocabulary is a 1,000-word word-level one instead of bge-m3's 250,002: that saves ~1 GB of
embedding rows, which only a gather reads, so compute and activation memory are unchanged;
"weights" below are this model's (~1.2 GB fp32; the real bge-m3 is ~2.2 GB).

Memory: each case runs in a fresh process: load, warm up on a short text, reset the peak-RSS
counter (/proc/self/clear_refs), encode one text with all three outputs, read VmHWM. "Above
weights" is that peak minus the RSS just before the call. Cases:
  * bgert: an 8192-token text, run unpadded, so attention takes ORT's flash kernel;
  * bgert, padded: 8191 tokens padded to the 8192 bucket with the unpadded policy off
    (max_padded_length=8192), i.e. the masked O(L²) kernel every plain fused graph uses;
  * BGEM3FlagModel (use_fp16=False, CPU; transformers' SDPA attention).
Throughput and parity: texts of exactly L tokens (--tokens per run, at least one text; all three
outputs, max_length 8192), the two engines alternating in one process, best of --repeats; the
outputs of the two are compared (dense cosine, lexical and ColBERT max |diff|). Default threads.
Results: benchmarks/results/m3_memory.{json,md}.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

SHAPE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
             max_position_embeddings=8194)
VOCAB = 1000
MAX_LENGTH = 8192
ALL = dict(return_dense=True, return_sparse=True, return_colbert_vecs=True)
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def build_checkpoint(path: str) -> str:
    """bge-m3's layout (XLM-R + colbert_linear.pt + sparse_linear.pt) with random weights."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import XLMRobertaConfig, XLMRobertaModel, XLMRobertaTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    vocab = specials + [f"w{i}" for i in range(VOCAB - len(specials) - 1)] + ["<mask>"]
    tk = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
                                                      special_tokens=[("<s>", 0), ("</s>", 2)])
    tk.add_special_tokens(specials + ["<mask>"])
    tok = XLMRobertaTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                                  cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
                                  model_max_length=MAX_LENGTH)
    os.makedirs(path, exist_ok=True)
    tok.save_pretrained(path)
    torch.manual_seed(0)
    cfg = XLMRobertaConfig(vocab_size=VOCAB, type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                           layer_norm_eps=1e-5, **SHAPE)
    XLMRobertaModel(cfg, add_pooling_layer=False).eval().save_pretrained(path)
    hidden = SHAPE["hidden_size"]
    torch.save(torch.nn.Linear(hidden, hidden).state_dict(), os.path.join(path, "colbert_linear.pt"))
    torch.save(torch.nn.Linear(hidden, 1).state_dict(), os.path.join(path, "sparse_linear.pt"))
    return path


def texts_of(n_tokens: int, count: int, seed: int = 0) -> list[str]:
    """``count`` texts of exactly ``n_tokens`` ids each (<s> and </s> included)."""
    rng = np.random.default_rng(seed + n_tokens)
    return [" ".join(f"w{i}" for i in rng.integers(0, VOCAB - 5, n_tokens - 2)) for _ in range(count)]


def parity(ref: dict, got: dict) -> dict:
    """bgert against BGEM3FlagModel on the same texts: dense cosine, lexical and ColBERT max |diff|."""
    a, b = np.asarray(ref["dense_vecs"], np.float64), np.asarray(got["dense_vecs"], np.float64)
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    lex, keys_differ = 0.0, 0
    for r, g in zip(ref["lexical_weights"], got["lexical_weights"]):
        keys_differ += len(set(r) ^ set(g))
        lex = max([lex, *(abs(float(r.get(k, 0.0)) - float(g.get(k, 0.0))) for k in set(r) | set(g))])
    shapes = all(r.shape == g.shape for r, g in zip(ref["colbert_vecs"], got["colbert_vecs"]))
    col = max(float(np.abs(r - g).max()) for r, g in zip(ref["colbert_vecs"], got["colbert_vecs"])) if shapes else None
    return {"dense_cos_min": float(cos.min()), "dense_max_abs_diff": float(np.abs(a - b).max()),
            "lexical_max_abs_diff": lex, "lexical_keys_differing": keys_differ,
            "colbert_same_shapes": shapes, "colbert_max_abs_diff": col}


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _engine(name: str, ckpt: str, art: str, max_padded_length: int | None = None) -> Any:
    """A callable texts -> BGEM3FlagModel-style dict, for bgert or the FlagEmbedding reference."""
    if name == "bgert":
        from bgert.runtime import M3Embedder

        kw = {} if max_padded_length is None else {"max_padded_length": max_padded_length}
        m = M3Embedder(art, passage_max_length=MAX_LENGTH, **kw)
        return lambda texts: m.encode(texts, max_length=MAX_LENGTH, **ALL)
    from FlagEmbedding import BGEM3FlagModel

    ref = BGEM3FlagModel(ckpt, use_fp16=False, devices="cpu", passage_max_length=MAX_LENGTH)
    return lambda texts: ref.encode(texts, max_length=MAX_LENGTH, batch_size=256, **ALL)


def child_memory(engine: str, ckpt: str, art: str, n_tokens: int, max_padded_length: int | None) -> dict:
    """In a fresh process: peak RSS above the loaded (and warmed-up) model while encoding one text."""
    run = _engine(engine, ckpt, art, max_padded_length)
    run(texts_of(16, 2))
    gc.collect()
    before = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    t0 = time.perf_counter()
    out = run(texts_of(n_tokens, 1))
    seconds = time.perf_counter() - t0
    peak = _status("VmHWM")
    return {"engine": engine, "n_tokens": n_tokens, "max_padded_length": max_padded_length,
            "rss_before_mb": before / 2**20, "peak_mb": peak / 2**20, "peak_above_mb": (peak - before) / 2**20,
            "seconds": seconds, "tokens_per_s": n_tokens / seconds,
            "colbert_rows": int(out["colbert_vecs"][0].shape[0])}


def child_throughput(ckpt: str, art: str, lengths: list[int], tokens: int, repeats: int) -> list[dict]:
    """Both engines in this process, alternating, best of ``repeats`` per length."""
    import onnxruntime
    import torch

    engines = {"bgert": _engine("bgert", ckpt, art), "BGEM3FlagModel": _engine("flag", ckpt, art)}
    for run in engines.values():
        run(texts_of(16, 2))
    rows = []
    for n in lengths:
        texts = texts_of(n, max(1, tokens // n))
        best, outs = {k: float("inf") for k in engines}, {}
        for _ in range(repeats):
            for name, run in engines.items():
                t0 = time.perf_counter()
                outs[name] = run(texts)
                best[name] = min(best[name], time.perf_counter() - t0)
        for name, s in best.items():
            rows.append({"engine": name, "length": n, "texts": len(texts), "seconds": s,
                         "tokens_per_s": n * len(texts) / s})
        rows[-1]["parity"] = parity(outs["BGEM3FlagModel"], outs["bgert"])
    rows.append({"threads": {"torch": torch.get_num_threads(), "onnxruntime_default": "physical cores",
                             "onnxruntime": onnxruntime.__version__}})
    return rows


def _spawn(*args: str) -> Any:
    r = subprocess.run([sys.executable, "-m", "bgert.benchmarks.m3_memory", "--child", *args],
                       capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if r.returncode != 0:
        raise RuntimeError(f"benchmark step {args[0]} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def write_results(result: dict, out_dir: str) -> None:
    from bgert.benchmarks.machine import describe

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "m3_memory.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    lines = ["# BGE-M3: memory and CPU throughput on long inputs", "",
             f"Command: `{result['command']}`  ", f"Machine: {describe(result['machine'])}  ",
             f"Model: random weights, bge-m3's shape {result['shape']}, vocabulary {VOCAB} (bge-m3: 250,002); "
             f"weights {result['weights_mb']:.0f} MB (ONNX file)", "",
             "## Peak memory for one text (all three outputs)", "",
             "| engine | tokens | peak RSS above weights (MB) | peak RSS total (MB) | seconds | tokens/s |",
             "|---|---|---|---|---|---|"]
    for m in result["memory"]:
        name = m["engine"] if m["engine"] != "flag" else "BGEM3FlagModel (fp32, torch SDPA)"
        if m["engine"] == "bgert":
            name = "bgert (unpadded → flash attention)" if m["max_padded_length"] is None else \
                "bgert, padded batch (masked attention)"
        lines.append(f"| {name} | {m['n_tokens']} | {m['peak_above_mb']:.0f} | {m['peak_mb']:.0f} | "
                     f"{m['seconds']:.1f} | {m['tokens_per_s']:.1f} |")
    lines += ["", "## Throughput (tokens/s, all three outputs)", "",
              "| length | texts | bgert | BGEM3FlagModel | bgert / BGEM3FlagModel |", "|---|---|---|---|---|"]
    for row in result["throughput"]:
        lines.append(f"| {row['length']} | {row['texts']} | {row['bgert']:.1f} | {row['BGEM3FlagModel']:.1f} | "
                     f"{row['ratio']:.2f}x |")
    lines += ["", "## Parity against BGEM3FlagModel (same texts, fp32)", "",
              "| length | texts | dense cos min | lexical max abs diff | lexical keys differing | "
              "ColBERT same shapes | ColBERT max abs diff |", "|---|---|---|---|---|---|---|"]
    for c in result["parity"]:
        lines.append(f"| {c['length']} | {c['texts']} | {c['dense_cos_min']:.7f} | {c['lexical_max_abs_diff']:.1e} | "
                     f"{c['lexical_keys_differing']} | {c['colbert_same_shapes']} | {c['colbert_max_abs_diff']:.1e} |")
    lines += ["", result["note"], ""]
    with open(os.path.join(out_dir, "m3_memory.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", help="where the checkpoint and artifact go (default: a temporary directory)")
    p.add_argument("--lengths", default="128,512,8192", help="token lengths for throughput")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per throughput run at the shorter lengths")
    p.add_argument("--repeats", type=int, default=2, help="throughput: best of this many runs")
    p.add_argument("--skip-padded", action="store_true", help="skip the masked-attention case (needs ~5 GB)")
    p.add_argument("--out", default=RESULTS, help="results directory")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        kind, ckpt, art, *rest = args.child
        if kind == "build":
            res = build_checkpoint(ckpt)
        elif kind == "export":
            from bgert.export import export

            res = export(ckpt, art, progress=False)
        elif kind == "memory":
            engine, n, mpl = rest
            res = child_memory(engine, ckpt, art, int(n), None if mpl == "-" else int(mpl))
        else:
            res = child_throughput(ckpt, art, [int(x) for x in rest[0].split(",")], int(rest[1]), int(rest[2]))
        print(json.dumps(res))
        return 0

    from bgert.benchmarks.machine import command_line, machine_info

    lengths = sorted(int(x) for x in args.lengths.split(","))
    work = args.work or tempfile.mkdtemp(prefix="bgert-m3-bench-")
    ckpt = os.path.join(work, "bge-m3-shape")
    if not os.path.isfile(os.path.join(ckpt, "sparse_linear.pt")):
        _spawn("build", ckpt, "-")
    art = os.path.join(work, "artifact")
    if not os.path.isfile(os.path.join(art, "manifest.json")):  # in a child, so this process stays small
        _spawn("export", ckpt, art)
    longest = lengths[-1]
    print(f"memory runs at {longest} tokens…", file=sys.stderr)
    memory = [_spawn("memory", ckpt, art, "bgert", str(longest), "-")]
    if not args.skip_padded:
        memory.append(_spawn("memory", ckpt, art, "bgert", str(longest - 1), str(longest)))
    memory.append(_spawn("memory", ckpt, art, "flag", str(longest), "-"))
    print(f"throughput at {lengths} tokens…", file=sys.stderr)
    raw = _spawn("throughput", ckpt, art, ",".join(map(str, lengths)), str(args.tokens), str(args.repeats))
    per = {(r["engine"], r["length"]): r for r in raw[:-1]}
    throughput = [{"length": n, "texts": per[("bgert", n)]["texts"], "bgert": per[("bgert", n)]["tokens_per_s"],
                   "BGEM3FlagModel": per[("BGEM3FlagModel", n)]["tokens_per_s"],
                   "ratio": per[("bgert", n)]["tokens_per_s"] / per[("BGEM3FlagModel", n)]["tokens_per_s"]}
                  for n in lengths]
    checks = [{"length": r["length"], "texts": r["texts"], **r["parity"]} for r in raw[:-1] if "parity" in r]
    result = {
        "command": command_line(), "machine": machine_info(), "shape": SHAPE, "vocab": VOCAB,
        "weights_mb": os.path.getsize(os.path.join(art, "model.onnx")) / 2**20,
        "memory": memory, "throughput": throughput, "parity": checks, "threads": raw[-1]["threads"],
        "note": ("Timings on a shared 2-core machine are noisy: compare the throughput ratios, taken back to back "
                 "in one process. The memory runs' seconds come from separate processes at different times."),
    }
    write_results(result, args.out)
    print(open(os.path.join(args.out, "m3_memory.md"), encoding="utf-8").read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
