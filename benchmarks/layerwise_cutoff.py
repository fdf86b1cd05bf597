"""Layerwise early exit: scoring time against the cutoff layer, on the same inputs.

    python -m bgert.benchmarks.layerwise_cutoff                  # 8 layers, hidden 256, cutoffs 1..8
    python -m bgert.benchmarks.layerwise_cutoff --layers 8 --hidden 256 --pairs 16 --rounds 5

A random MiniCPM layerwise reranker (FlagEmbedding's bundled code, the architecture of
bge-reranker-v2-minicpm-layerwise) with ``--layers`` decoder layers, a head per layer from
layer 1, and a hidden size large enough that the decoder layers dominate the time, is exported
with one graph per cutoff (``--cutoff-layers 1,...,N``). The same SciFact (query, passage)
pairs are then scored with ``LayerwiseReranker.compute_score(pairs, cutoff_layers=[L])`` for
every L, the cutoffs interleaved over ``--rounds`` rounds (so a load change on a shared machine
hits them alike). t(L) is the best (minimum) time per cutoff, the least disturbed by other work
on a shared machine; medians are reported too. If early exit really skips layers, time grows
linearly with L: the report gives t(L)/t(N) next to L/N and a least-squares fit t = a + b*L
(a: the fixed part: tokenisation, embedding lookup, batching).
Results: benchmarks/results/layerwise_cutoff.{json,md,png}.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Any

import numpy as np

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def build_checkpoint(root: str, layers: int, hidden: int) -> str:
    """A random LayerWiseMiniCPMForCausalLM (head_type simple, heads for layers 1..N) with the tiny
    test tokenizer; the weights do not matter for timing."""
    import torch
    from FlagEmbedding.inference.reranker.decoder_only.models.configuration_minicpm_reranker import (
        LayerWiseMiniCPMConfig)
    from FlagEmbedding.inference.reranker.decoder_only.models.modeling_minicpm_reranker import (
        LayerWiseMiniCPMForCausalLM)
    from transformers import LlamaTokenizerFast

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    import tiny_models  # the repository's test builders (run this benchmark from a checkout)

    d = os.path.join(root, "bge-reranker-v2-minicpm-layerwise")
    tok = tiny_models.build_bpe_tokenizer(d, ["<unk>", "<s>", "</s>"], LlamaTokenizerFast, unk_token="<unk>",
                                          bos_token="<s>", eos_token="</s>", pad_token="<unk>", padding_side="left")
    torch.manual_seed(0)
    cfg = LayerWiseMiniCPMConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden,
                                 num_hidden_layers=layers, num_attention_heads=hidden // 64,
                                 num_key_value_heads=hidden // 64, max_position_embeddings=2048, scale_emb=12,
                                 dim_model_base=256, scale_depth=1.4, start_layer=1, head_multi=True,
                                 head_type="simple", use_cache=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                 architectures=["LayerWiseMiniCPMForCausalLM"])
    LayerWiseMiniCPMForCausalLM(cfg).eval().save_pretrained(d)
    return d


def measure(art: str, pairs: list[tuple[str, str]], cutoffs: list[int], rounds: int, threads: int,
            max_length: int) -> dict[int, list[float]]:
    """Seconds per compute_score call, per cutoff, cutoffs interleaved in every round."""
    from bgert.runtime import LayerwiseReranker

    model = LayerwiseReranker(art, intra_op_num_threads=threads, max_length=max_length)
    for c in cutoffs:  # warm-up: create every session and run each graph once
        model.compute_score(pairs, cutoff_layers=[c])
    times: dict[int, list[float]] = {c: [] for c in cutoffs}
    for r in range(rounds):
        for c in (cutoffs if r % 2 == 0 else cutoffs[::-1]):
            t = time.perf_counter()
            model.compute_score(pairs, cutoff_layers=[c])
            times[c].append(time.perf_counter() - t)
    return times


def graph_sizes(art: str) -> dict[int, dict[str, int]]:
    """Per graph: decoder layers it runs, its node and initializer counts, its file size."""
    import onnx

    from bgert.runtime.manifest import read_manifest

    out = {}
    for g in read_manifest(art, verify=False).graphs:
        proto = onnx.load(os.path.join(art, g.file), load_external_data=False)
        out[max(g.cutoff_layers)] = {"nodes": len(proto.graph.node), "initializers": len(proto.graph.initializer),
                                     "bytes": os.path.getsize(os.path.join(art, g.file))}
    return out


def markdown(result: dict[str, Any]) -> str:
    from bgert.benchmarks.machine import describe

    o, fit = result["options"], result["fit"]
    n = o["layers"]
    lines = [
        "# Layerwise reranker: time against cutoff layer (early exit)",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Machine: {describe(result['machine'])}. ORT CPU, fp32, intra_op_num_threads={o['threads']}.",
        f"Model: random MiniCPM layerwise reranker (FlagEmbedding's bundled code), {n} layers, hidden "
        f"{o['hidden']}, exported with one graph per cutoff 1..{n}. Inputs: the same {o['pairs']} SciFact "
        f"(query, passage) pairs for every cutoff, max_length {o['max_length']} "
        f"({result['tokens_per_call']} tokens per call after assembly). {o['rounds']} rounds, cutoffs "
        "interleaved in each round; t(L) is the best round. The machine was shared with other jobs, so read "
        "the ratios, not the absolute times.",
        "",
        f"| cutoff L | L/{n} | graph nodes | initializers | t(L) best (ms) | median (ms) | t(L)/t({n}) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['cutoff']} | {r['cutoff'] / n:.3f} | {r['nodes']} | {r['initializers']} | "
                     f"{r['best_ms']:.1f} | {r['median_ms']:.1f} | {r['ratio']:.3f} |")
    lines += ["", f"Least-squares fit of the best times: t(L) = {fit['a_ms']:.1f} ms + {fit['b_ms']:.1f} ms x L "
                  f"(R^2 = {fit['r2']:.4f}); the intercept a (the part that does not scale with the layers run) is "
                  f"{fit['a_ms'] / result['rows'][-1]['best_ms']:.1%} of t({n}).", ""]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, fit = result["rows"], result["fit"]
    x = np.array([r["cutoff"] for r in rows])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(x, [r["best_ms"] for r in rows], marker="o", label="measured (best of rounds)")
    ax.plot(x, [r["median_ms"] for r in rows], marker=".", linestyle=":", label="median")
    ax.plot(x, fit["a_ms"] + fit["b_ms"] * x, linestyle="--", label=f"fit {fit['a_ms']:.0f} + {fit['b_ms']:.1f}·L ms")
    ax.set_xlabel("cutoff layer L (decoder layers run)")
    ax.set_ylabel("compute_score time (ms)")
    ax.set_title(f"Layerwise early exit, {result['options']['layers']} layers, hidden {result['options']['hidden']}")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from bgert.benchmarks.machine import command_line, machine_info
    from bgert.benchmarks.report import write_report
    from bgert.benchmarks.samples import sample_texts
    from bgert.export import export

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256, help="a multiple of 64 (64-dim attention heads)")
    p.add_argument("--pairs", type=int, default=16)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="ORT intra-op threads")
    p.add_argument("--out", default=RESULTS)
    p.add_argument("--name", default="layerwise_cutoff", help="result file stem")
    args = p.parse_args(argv)
    if args.hidden % 64:
        p.error("--hidden must be a multiple of 64")
    cutoffs = list(range(1, args.layers + 1))
    docs, queries = sample_texts()
    pairs = [(queries[i % len(queries)], docs[i % len(docs)]) for i in range(args.pairs)]
    with tempfile.TemporaryDirectory(prefix="bgert-layerwise-") as tmp:
        ckpt = build_checkpoint(tmp, args.layers, args.hidden)
        art = export(ckpt, os.path.join(tmp, "art"), progress=False, cutoff_layers=cutoffs)
        sizes = graph_sizes(art)
        from bgert.runtime import LayerwiseReranker

        model = LayerwiseReranker(art, max_length=args.max_length)
        tokens = sum(len(s) for s in model._sequences(pairs, args.max_length * 3 // 4, args.max_length, None))
        times = measure(art, pairs, cutoffs, args.rounds, args.threads, args.max_length)
    best = {c: float(np.min(v)) * 1000 for c, v in times.items()}
    y = np.array([best[c] for c in cutoffs])
    b, a = np.polyfit(cutoffs, y, 1)
    r2 = 1 - ((y - (a + b * np.array(cutoffs))) ** 2).sum() / ((y - y.mean()) ** 2).sum()
    rows = [{"cutoff": c, "best_ms": best[c], "median_ms": float(np.median(times[c])) * 1000,
             "ratio": best[c] / best[cutoffs[-1]],
             "times_ms": [t * 1000 for t in times[c]], **sizes[c]} for c in cutoffs]
    result = {"command": command_line(), "machine": machine_info(), "options": vars(args),
              "tokens_per_call": tokens, "rows": rows, "fit": {"a_ms": float(a), "b_ms": float(b), "r2": float(r2)}}
    stem = write_report(args.out, args.name, result, markdown(result))
    try:
        plot(result, stem + ".png")
    except ImportError:
        print("matplotlib not installed: no PNG", file=sys.stderr)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
