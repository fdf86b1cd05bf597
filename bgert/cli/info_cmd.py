"""``bgert info DIR``: the manifest, for humans (or as JSON with --json)."""
from __future__ import annotations

import argparse
import json

from bgert.runtime.base import default_precision
from bgert.runtime.manifest import read_manifest
from bgert.runtime.autotune import explain
from bgert.runtime.registry import family

#: section fields shown when the artifact's family has them
SHOWN_FIELDS = ("pooling", "normalize", "dim", "query_instruction", "heads", "cutoff_layers")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", help="artifact directory")
    p.add_argument("--json", action="store_true", help="print the raw manifest")
    p.add_argument("--verify", action="store_true", help="also check every file's sha256")


def _fmt_quality(q: dict) -> str:
    keys = [k for k in ("cos_mean", "cos_min", "max_abs_diff", "spearman", "top5_agreement") if k in q]
    return ", ".join(f"{k} {q[k]:.6g}" for k in keys) or "-"


def describe(artifact: str, verify: bool = False) -> str:
    """A short human summary of an artifact: kind, source, lengths, graphs with their quality."""
    m = read_manifest(artifact, verify="full" if verify else False)
    raw = m.raw
    lines = [f"artifact   {m.root}",
             f"kind       {m.kind} ({m.family}), served by bgert.runtime.{family(m.kind).runtime_class.__name__}",
             f"source     {raw['source'].get('name')}  sha256 {raw['source'].get('sha256', '')[:16]}…",
             f"max_length {m.max_length}   buckets {m.length_buckets}"]
    section = vars(m.section)
    for key in SHOWN_FIELDS:
        if section.get(key) is not None:
            lines.append(f"{key:<10} {section[key]!r}")
    lines.append("graphs:")
    for g in m.graphs:
        cut = f" cutoff {g.cutoff_layers}" if g.cutoff_layers else ""
        status = ("ok" if g.gate_passed else "NOT MEASURED: " + str(g.quality.get("reason"))
                  if g.quality.get("measured") is False else "FAILED GATE")
        lines.append(f"  {g.precision:<12}{cut} {g.file:<28} [{status}] {_fmt_quality(g.quality)}")
    for prov, on_gpu in (("CPU", False), ("CUDA", True)):
        lines.append(f"default precision on {prov}: {default_precision(m, on_gpu)}")
    lines.append(f"this machine gets: {explain(artifact)}")
    if verify:
        lines.append("files: all sha256 match")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps(read_manifest(args.artifact, verify="full" if args.verify else False).raw, indent=2, ensure_ascii=False))
    else:
        print(describe(args.artifact, verify=args.verify))
    return 0
