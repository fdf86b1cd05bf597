"""The ``bgert`` command line. Each subcommand lives in its own module with two functions,
``add_arguments(parser)`` and ``run(args) -> int``, imported only when that command runs (so
``bgert encode`` never imports torch)."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

#: name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "export": ("bgert.cli.export_cmd", "export a BGE checkpoint to an ONNX artifact"),
    "info": ("bgert.cli.info_cmd", "show an artifact's manifest"),
    "encode": ("bgert.cli.encode_cmd", "embed texts from a file or stdin"),
    "tune": ("bgert.cli.tune_cmd", "measure which gated variant is fastest here and make it this machine's default"),
    "demo": ("bgert.cli.demo_cmd", "export the bundled all-MiniLM-L6-v2, check parity and speed"),
    "doctor": ("bgert.cli.doctor_cmd", "check providers, CPU features, versions, and an artifact's integrity"),
    "serve": ("bgert.cli.serve_cmd", "serve artifacts over HTTP: OpenAI, TEI and Cohere/Jina endpoints, /metrics"),
    "triton-repo": ("bgert.cli.triton_repo_cmd", "write a Triton model repository for an artifact"),
    "triton-serve": ("bgert.cli.triton_serve_cmd", "run the tritonserver bundled in nvidia-pytriton on a repository"),
    "bench": ("bgert.cli.bench_cmd", "parity and throughput against the PyTorch reference, roofline, plots"),
    "eval": ("bgert.cli.eval_cmd", "BEIR retrieval quality (NDCG@10, Recall@100, MRR@10), optional reranking"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="bgert", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # Only the chosen command's module is imported; the others just get a stub parser for --help.
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if name == chosen:
            importlib.import_module(module).add_arguments(p)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if not args.command:
        parser.print_help()
        return 2
    try:
        return int(importlib.import_module(COMMANDS[args.command][0]).run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (FileExistsError, FileNotFoundError, ValueError, TypeError, RuntimeError) as e:
        if args.verbose:
            raise
        print(f"bgert {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
