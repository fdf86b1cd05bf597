"""``bgert bench ARTIFACT``: parity and throughput against the PyTorch reference in one run, the
roofline, and a JSON + Markdown + PNG report. Exits 1 when a variant misses its parity gate."""
from __future__ import annotations

import argparse
import json
import os
import sys


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _ints(s: str) -> list[int]:
    vals = [int(x) for x in _csv(s)]
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,8,32, got {s!r}")
    return vals


def _gate(s: str) -> tuple[str, float]:
    precision, _, value = s.partition("=")
    try:
        return precision.strip(), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--gate wants PRECISION=VALUE, e.g. int8=0.98, got {s!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    p = parser
    p.add_argument("artifact", help="artifact directory")
    p = parser.add_argument_group("reference")
    p.add_argument("--reference", default="auto", choices=["auto", "flagembedding", "sentence-transformers"],
                   help="PyTorch reference (auto: sentence-transformers for mean-pooling sentence-transformers "
                        "checkpoints, FlagEmbedding otherwise)")
    p.add_argument("--reference-model", help="PyTorch checkpoint for the reference (default: the manifest's source)")
    p = parser.add_argument_group("variants")
    p.add_argument("--backend", type=_csv, default=["ort"], help="comma-separated: ort,openvino,triton")
    p.add_argument("--precision", type=_csv, help="comma-separated variants (default: every one in the artifact)")
    p.add_argument("--providers", type=_csv, help="ORT providers for bgert's variants (default: cpu)")
    p.add_argument("--triton-url", help="Triton server for --backend triton (host:port)")
    p.add_argument("--triton-protocol", default="grpc", choices=["grpc", "http"], help="Triton client protocol")
    p = parser.add_argument_group("inputs and timing")
    p.add_argument("--data", default="scifact", help="'scifact' (bundled) or a txt/jsonl file of texts")
    p.add_argument("--batch-sizes", type=_ints, help="default 1,8,32 (--quick: 1,8)")
    p.add_argument("--texts", type=int, help="texts in the mixed set (short gets 4x, long 1/2; default 32, quick 8)")
    p.add_argument("--repeats", type=int, help="timed passes per cell, best kept (default 2, quick 1)")
    p.add_argument("--latency-calls", type=int, help="batch-1 calls for p50/p99 (default 100, quick 20)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-RSS probes (one process per variant)")
    p.add_argument("--threads", type=int, help="threads for ORT, torch and the GEMM peak (default: usable cores)")
    p = parser.add_argument_group("gates and output")
    p.add_argument("--gate", type=_gate, action="append", default=[],
                   help="override a precision's gate, e.g. int8=0.98 (cosine) or fp32=0.0005 (reranker max diff)")
    p.add_argument("--quick", action="store_true", help="small sets, batch 1 and 8, one pass, no memory probes (CI)")
    p.add_argument("--out", default="bench-results", help="directory for bench_<model>.json/.md/_*.png")


def run(args: argparse.Namespace) -> int:
    from bgert.benchmarks.bench import BATCH_SIZES, QUICK_BATCH_SIZES, QUICK_SIZES, SIZES, bench, markdown, plots

    sizes = dict(QUICK_SIZES if args.quick else SIZES)
    if args.texts:
        if args.texts < 1:
            raise ValueError(f"--texts must be >= 1, got {args.texts}")
        sizes = {"short": 4 * args.texts, "mixed": args.texts, "long": max(1, args.texts // 2)}
    backend_options = {"url": args.triton_url, "protocol": args.triton_protocol} if args.triton_url else {}
    if "triton" in args.backend and not args.triton_url:
        raise ValueError("--backend triton needs --triton-url HOST:PORT (a server serving `bgert triton-repo`)")
    result = bench(args.artifact, reference=args.reference, reference_model=args.reference_model,
                   precisions=args.precision, backends=args.backend, providers=args.providers,
                   threads=args.threads, data=args.data, sizes=sizes,
                   batch_sizes=args.batch_sizes or (QUICK_BATCH_SIZES if args.quick else BATCH_SIZES),
                   repeats=args.repeats or (1 if args.quick else 2),
                   latency_calls=args.latency_calls if args.latency_calls is not None else (20 if args.quick else 100),
                   memory=not (args.no_memory or args.quick), gates=dict(args.gate),
                   backend_options=backend_options)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"bench_{result['model']}")
    with open(stem + ".json", "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    md = markdown(result)
    with open(stem + ".md", "w", encoding="utf-8") as f:
        f.write(md)
    pngs = plots(result, stem)
    print(md)
    print(f"wrote {stem}.json, {stem}.md, " + ", ".join(pngs), file=sys.stderr)
    if result["failures"]:
        print("bgert bench: parity gate missed: " + "; ".join(result["failures"]), file=sys.stderr)
        return 1
    return 0
