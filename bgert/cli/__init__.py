"""The ``bgert`` command line. Each subcommand lives in its own module with two functions,
``add_arguments(parser)`` and ``run(args) -> int``, imported only when that command runs (so
``bgert encode`` never imports torch)."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Iterable

DESCRIPTION = ("bgert: export BGE embedders and rerankers to ONNX artifacts, check them against PyTorch, "
               "and run, serve and benchmark them (numpy + tokenizers + onnxruntime, no torch).")

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


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with one line per option (``-o, --out OUT  help (default: X)``), never wrapped, and the
    default shown wherever it says something (not for None, False or help that already names it)."""

    #: choices longer than this show as the option's name in upper case, and the choices go into the help
    MAX_CHOICES_WIDTH = 24

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=34)

    def add_argument(self, action: argparse.Action) -> None:
        super().add_argument(action)
        for sub in self._iter_indented_subactions(action):  # argparse measures these without their own indent
            length = len(self._format_action_invocation(sub)) + self._current_indent
            self._action_max_length = max(self._action_max_length, length)

    def _long_choices(self, action: argparse.Action) -> bool:
        return (action.metavar is None and action.choices is not None
                and len(",".join(map(str, action.choices))) + 2 > self.MAX_CHOICES_WIDTH)

    def _metavar_formatter(self, action: argparse.Action, default_metavar: str):  # type: ignore[no-untyped-def]
        if self._long_choices(action):
            return super()._metavar_formatter(argparse.Action(action.option_strings, action.dest), default_metavar)
        return super()._metavar_formatter(action, default_metavar)

    def _get_help_string(self, action: argparse.Action) -> str:
        text, default = action.help or "", action.default
        if self._long_choices(action):
            text = f"{text} (one of: {', '.join(map(str, action.choices))})".lstrip()  # type: ignore[union-attr]
        if (default in (None, False, argparse.SUPPRESS) or default == [] or "default" in text
                or not action.option_strings):
            return text
        shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})".lstrip()

    def _get_default_metavar_for_optional(self, action: argparse.Action) -> str:
        return {int: "N", float: "X"}.get(action.type, action.dest.upper())  # type: ignore[arg-type]

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings or action.nargs == 0:
            return super()._format_action_invocation(action)
        return f"{', '.join(action.option_strings)} {self._format_args(action, self._get_default_metavar_for_optional(action))}"

    def _format_action(self, action: argparse.Action) -> str:
        column = min(self._action_max_length + 2, self._max_help_position)
        header = " " * self._current_indent + self._format_action_invocation(action)
        text = self._expand_help(action) if action.help else ""
        line = f"{header}{' ' * max(column - len(header), 2)}{text}" if text else header
        return line.rstrip() + "\n" + "".join(self._format_action(a) for a in self._iter_indented_subactions(action))


def build_parser(commands: Iterable[str] = ()) -> argparse.ArgumentParser:
    """The ``bgert`` parser; only the subcommands in ``commands`` get their full arguments (their modules are
    imported), the others a stub that is enough for ``bgert --help``."""
    parser = argparse.ArgumentParser(prog="bgert", description=DESCRIPTION, formatter_class=HelpFormatter,
                                     epilog="`bgert COMMAND --help` lists a command's options.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_, formatter_class=HelpFormatter)
        if name in commands:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Only the chosen command's module is imported; the others just get a stub parser for --help.
    chosen = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser([chosen] if chosen else [])
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
