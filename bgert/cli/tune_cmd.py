"""``bgert tune ART``: time every gated variant (ORT and OpenVINO × precision) on this machine, each in its own
process, and cache the fastest as this machine's default (bgert.runtime.tuning)."""
from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", help="artifact directory")
    p.add_argument("--threads", type=int, default=None, help="threads per variant (the default loads' intra-op "
                                                            "threads; default: the runtime's own)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds, best kept (default 3)")
    p.add_argument("--seconds", type=float, default=2.0, help="timed seconds per variant and round (default 2)")
    p.add_argument("--json", action="store_true", help="print the measurement as JSON")


def run(args: argparse.Namespace) -> int:
    from bgert.runtime.autotune import explain, tune

    if args.rounds < 1 or args.seconds <= 0:
        raise ValueError(f"--rounds must be >= 1 and --seconds > 0, got {args.rounds} and {args.seconds}")
    result = tune(args.artifact, threads=args.threads, rounds=args.rounds, seconds=args.seconds)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    for v in sorted(result["variants"], key=lambda r: -r.get("score", 0)):
        if "score" in v:
            print(f"{v['backend']:<9} {v['precision']:<12} documents {v['documents_per_s']:8.1f}/s  "
                  f"queries {v['queries_per_s']:8.1f}/s")
        else:
            print(f"{v['backend']:<9} {v['precision']:<12} failed: {v['error']}")
    print(f"cached in {result['cache']}" if result["cache"] else "not cached: the cache directory cannot be written")
    print(f"this machine gets: {explain(args.artifact, args.threads)}")
    return 0
