"""``bgert triton-serve REPO``: run the tritonserver bundled in nvidia-pytriton on a model repository.

The server runs from the environment made by scripts/make_triton_env.sh (see the README's Triton
section); it serves python-backend repositories (``bgert triton-repo ... --backend python``).
"""
from __future__ import annotations

import argparse
import shlex
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("repo", help="model repository (from `bgert triton-repo`)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--http-port", type=int, default=8000, help="HTTP port")
    p.add_argument("--grpc-port", type=int, default=8001, help="gRPC port")
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics (default: off)")
    p.add_argument("--env", default=None, help="server environment (default: $BGERT_TRITON_ENV or "
                                               "~/.cache/bgert/triton-env)")
    p.add_argument("--print-command", action="store_true", help="print the tritonserver command and exit")
    p.add_argument("--server-arg", action="append", default=[], metavar="FLAG",
                   help="one more tritonserver flag, e.g. --server-arg=--log-verbose=1 (repeatable)")


def run(args: argparse.Namespace) -> int:
    import os

    from bgert.triton_models.server import find_env, run_foreground, server_command

    if not os.path.isdir(args.repo):
        raise FileNotFoundError(f"{args.repo} is not a directory; write one with `bgert triton-repo ARTIFACT --out REPO`")
    env = find_env(args.env)
    cmd = server_command(env, args.repo, args.host, args.http_port, args.grpc_port, args.metrics_port,
                         args.server_arg)
    if args.print_command:
        e = env.process_env()
        print(f'PATH={shlex.quote(os.path.join(env.root, "bin"))}:"$PATH"',
              " ".join(f"{k}={shlex.quote(e[k])}" for k in ("VIRTUAL_ENV", "LD_LIBRARY_PATH")), shlex.join(cmd))
        return 0
    print(f"tritonserver: HTTP {args.host}:{args.http_port}, gRPC {args.host}:{args.grpc_port} (Ctrl-C stops)",
          file=sys.stderr)
    return run_foreground(cmd, env)
