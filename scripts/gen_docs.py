"""Pages made at `mkdocs build` time (a mkdocs-gen-files script), so they cannot drift from the code:

- ``reference/cli.md``: the ``--help`` of ``bgert`` and of every subcommand, from the argparse parsers;
- ``results/``: every file of benchmarks/results (tables, JSON, plots) and an index of them, so pages can
  link the file a figure comes from.

(The source tree mkdocstrings reads the docstrings from is made earlier, by scripts/docs_hooks.py.)
"""
from __future__ import annotations

import os
from pathlib import Path

import mkdocs_gen_files

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def cli_page() -> str:
    """Every command's ``--help``, as ``bgert COMMAND --help`` prints it in a 100-column terminal."""
    os.environ["COLUMNS"] = "100"
    from bgert.cli import COMMANDS, build_parser

    parser = build_parser(COMMANDS)
    sub = next(a for a in parser._actions if a.dest == "command")
    parts = ["# Command line\n",
             "Generated from the argparse parsers in `bgert/cli/` when the site is built: this is what "
             "`bgert --help` and `bgert COMMAND --help` print.\n",
             "```text\n$ bgert --help\n" + parser.format_help() + "```\n"]
    for name, cmd in sub.choices.items():
        parts.append(f"## bgert {name}\n\n{COMMANDS[name][1].capitalize()}.\n\n"
                     f"```text\n$ bgert {name} --help\n{cmd.format_help()}```\n")
    return "\n".join(parts)


def results_pages() -> None:
    """Copy benchmarks/results into the site under results/, with an index naming each file's title."""
    rows = []
    for path in sorted(RESULTS.iterdir()):
        if not path.is_file():
            continue
        with mkdocs_gen_files.open(f"results/{path.name}", "wb") as f:
            f.write(path.read_bytes())
        if path.suffix == ".md":
            title = next((line.lstrip("# ").strip() for line in path.read_text("utf-8").splitlines()
                          if line.startswith("#")), path.stem)
            others = [p.name for p in sorted(RESULTS.glob(path.stem + "*")) if p.suffix in (".json", ".png")
                      and (p.stem == path.stem or p.stem.startswith(path.stem + "_") and not
                           (RESULTS / (p.stem + ".md")).exists())]
            links = ", ".join(f"[{o}]({o})" for o in others)
            rows.append(f"| [{path.name}]({path.name}) | {title} | {links} |")
    index = ["# Results files\n",
             "Every file of `benchmarks/results/` in the repository, copied here when the site is built. "
             "The JSON beside each table records the machine, CPU flags, versions, load average and the "
             "exact command. [Benchmarks](../benchmarks.md) says how to reproduce each one.\n",
             "| file | title | data and plots |", "|---|---|---|", *rows, ""]
    with mkdocs_gen_files.open("results/index.md", "w") as f:
        f.write("\n".join(index))


with mkdocs_gen_files.open("reference/cli.md", "w") as f:
    f.write(cli_page())
results_pages()
