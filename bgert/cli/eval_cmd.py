"""``bgert eval ARTIFACT --beir DIR|scifact [--reranker ARTIFACT --top-k 100]``: BEIR retrieval
quality (NDCG@10, Recall@100, MRR@10) with exact cosine search, scored by ir-measures."""
from __future__ import annotations

import argparse
import json
import os
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    p = parser
    p.add_argument("artifact", help="embedder artifact directory (first stage)")
    p.add_argument("--beir", required=True,
                   help="BEIR folder (corpus.jsonl[.gz], queries.jsonl, qrels/test.tsv) or 'scifact' (bundled)")
    p.add_argument("--split", default="test", help="qrels split (default: test)")
    p = parser.add_argument_group("reranking")
    p.add_argument("--reranker", help="reranker artifact to rescore the embedder's top-k")
    p.add_argument("--top-k", type=int, default=100, help="candidates per query to rerank (default: 100)")
    p.add_argument("--cutoff-layer", type=int, help="layerwise rerankers: the cutoff layer to score with")
    p = parser.add_argument_group("runtime")
    p.add_argument("--precision", help="embedder precision (default: the runtime's choice)")
    p.add_argument("--reranker-precision", help="reranker precision (default: the runtime's choice)")
    p.add_argument("--threads", type=int, help="ORT intra-op threads (default: all cores)")
    p.add_argument("--batch-size", type=int, help="texts per batch (default: the runtime's)")
    p.add_argument("--max-queries", type=int, help="evaluate only the first N queries (smoke runs)")
    p = parser.add_argument_group("output")
    p.add_argument("--out", default="bench-results", help="directory for eval_<model>_<dataset>.json/.md")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from bgert.benchmarks.eval import METRICS, evaluate, markdown
    from bgert.benchmarks.machine import command_line, machine_info, package_versions

    if args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {args.top_k}")
    options = {"cutoff_layers": [args.cutoff_layer]} if args.cutoff_layer else {}
    result = evaluate(args.artifact, args.beir, reranker=args.reranker, top_k=args.top_k,
                      precision=args.precision, reranker_precision=args.reranker_precision, threads=args.threads,
                      batch_size=args.batch_size, max_queries=args.max_queries, split=args.split,
                      rerank_options=options, show_progress=not args.quiet)
    result.update(machine=machine_info(), versions=package_versions(("bgert", "onnxruntime", "ir-measures",
                                                                      "pytrec-eval-terrier")),
                  command=command_line())
    os.makedirs(args.out, exist_ok=True)
    name = os.path.basename(os.path.normpath(args.artifact))
    if result["embedder"]["precision"] != "fp32":  # one file per variant of the same artifact
        name += "-" + result["embedder"]["precision"]
    if args.reranker:
        name += "+" + os.path.basename(os.path.normpath(args.reranker))
    stem = os.path.join(args.out, f"eval_{name}_{result['dataset']['name']}")
    with open(stem + ".json", "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    md = markdown(result)
    with open(stem + ".md", "w", encoding="utf-8") as f:
        f.write(md)
    for label in ("embedder", "reranker"):
        if label in result:
            r = result[label]
            print(f"{label:>8} {r['precision']:>5}: " + "  ".join(f"{m} {r['metrics'][m]:.5f}" for m in METRICS))
    print(f"wrote {stem}.json and {stem}.md", file=sys.stderr)
    return 0
