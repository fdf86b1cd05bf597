"""``bgert export SRC --out DIR``: checkpoint → ONNX artifact (heavy side, imports torch)."""
from __future__ import annotations

import argparse

from bgert.runtime import registry


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _ints(s: str) -> list[int]:
    return [int(x) for x in _csv(s)]


def _fp32_nodes(s: str) -> float | str:
    if s.strip().lower() == "auto":
        return "auto"
    try:
        return float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto, a fraction < 1 or a count, got {s!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    p = parser
    p.add_argument("src", help="local checkpoint directory (or a hub id when the network allows)")
    p.add_argument("--out", "-o", required=True, help="artifact directory to write")
    p.add_argument("--kind", default="auto", choices=["auto", *registry.kinds()],
                   help="model kind (default: detected from config.json and the checkpoint's files)")
    p.add_argument("--max-length", type=int, help="max tokens per input (default: the model's own limit)")
    p.add_argument("--precision", type=_csv, default=["fp32"],
                   help="comma-separated variants: fp32,fp16,int8,int8-static (fp32 is always written)")
    p.add_argument("--keep-failed", action="store_true",
                   help="keep precision variants that miss their quality gate (marked failed)")
    p.add_argument("--force", action="store_true", help="replace an existing artifact directory")
    p.add_argument("--no-tune", action="store_true",
                   help="do not measure which variant is fastest on this machine after the export (BGERT_TUNE=off "
                        "does the same; the first default load would measure it then)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p = parser.add_argument_group("graph")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset")
    p.add_argument("--no-optimize", action="store_true", help="skip ORT's transformer fusions")
    p = parser.add_argument_group("family options")
    p.add_argument("--no-normalize", action="store_true", help="embedders: output raw pooled vectors")
    p.add_argument("--query-instruction", help="embedders: query instruction stored in the manifest "
                                               "('' for none; default: the BGE model card's for bge-*-en/zh)")
    p.add_argument("--heads", type=_csv, help="m3: outputs to export, e.g. dense,sparse,colbert")
    p.add_argument("--cutoff-layers", type=_ints, help="layerwise rerankers: e.g. 8,16,28")
    p.add_argument("--matryoshka-dims", type=_ints, metavar="DIMS",
                   help="embedders trained with a Matryoshka loss: the dimensions vectors may be cut to, e.g. "
                        "768,512,256,128,64 (bgert serve's `dimensions`; default: not Matryoshka, no cutting)")
    q = parser.add_argument_group("int8 calibration and recipe")
    q.add_argument("--calibration", metavar="FILE",
                   help="calibration text: .jsonl with title/text fields or .txt, one text per line "
                        "(default: the bundled SciFact documents); embedders: also the int8 output ranges")
    q.add_argument("--calibration-size", type=int, help="calibration texts used (default 32)")
    q.add_argument("--calibration-method", choices=["minmax", "percentile"],
                   help="int8-static activation ranges (default minmax)")
    q.add_argument("--calibration-percentile", type=float, help="for --calibration-method percentile (99.99)")
    q.add_argument("--int8-fp32-nodes", type=_fp32_nodes,
                   help="quantizable MatMuls kept fp32, largest int8 error first: a fraction < 1, a count, or auto "
                        "(default auto: int8/int8-vnni the fewest of 0, 5%%, 10%%, 25%% that holds the gate on the "
                        "calibration text, int8-static 25%%)")
    q.add_argument("--static-activations", choices=["uint8", "int8"],
                   help="int8-static activation type; int8 (symmetric) is what TensorRT takes")


def run(args: argparse.Namespace) -> int:
    from bgert.export import export

    options = {"normalize": False if args.no_normalize else None, "query_instruction": args.query_instruction,
               "heads": args.heads, "cutoff_layers": args.cutoff_layers, "keep_failed": args.keep_failed,
               "matryoshka_dims": args.matryoshka_dims,
               "calibration": args.calibration, "calibration_size": args.calibration_size,
               "calibration_method": args.calibration_method, "calibration_percentile": args.calibration_percentile,
               "int8_fp32_nodes": args.int8_fp32_nodes, "static_activations": args.static_activations}
    out = export(args.src, args.out, kind=args.kind, max_length=args.max_length, force=args.force,
                 opset=args.opset, optimize_graph=not args.no_optimize, precisions=args.precision,
                 progress=not args.quiet, **{k: v for k, v in options.items() if v is not None})
    from bgert.cli.info_cmd import describe
    from bgert.runtime.base import tune_candidates
    from bgert.runtime.manifest import read_manifest
    from bgert.runtime.tuning import measure_once, tune_mode

    if not args.no_tune and tune_mode() == "auto":  # what the first default load here would measure, done now
        measure_once(out, None, lambda: tune_candidates(read_manifest(out, verify=False)))
    print(describe(out))
    return 0
