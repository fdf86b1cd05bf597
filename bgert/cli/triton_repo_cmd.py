"""``bgert triton-repo ARTIFACT --out REPO``: write a Triton model repository for an artifact."""
from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from bgert.triton_models.repository import BACKENDS, DEVICES

    p = parser
    p.add_argument("artifact", help="artifact directory (from `bgert export`)")
    p.add_argument("--out", "-o", required=True, help="model repository directory (created, or added to)")
    p.add_argument("--force", action="store_true", help="replace models of the same name in REPO")
    p = parser.add_argument_group("model step")
    p.add_argument("--backend", choices=BACKENDS, default="onnxruntime",
                   help="model step: Triton's onnxruntime backend, the same with the TensorRT accelerator (FP16), "
                        "or a python-backend model running onnxruntime (what the bundled server runs)")
    p.add_argument("--device", choices=DEVICES, default="gpu", help="instance kind (default: gpu)")
    p.add_argument("--instances", type=int, default=1, help="instances per model (default: 1)")
    p.add_argument("--max-batch-size", type=int, default=64, help="Triton max_batch_size (default: 64)")
    p.add_argument("--precision", default=None, help="graph precision to serve (default: preferred on --device)")
    p = parser.add_argument_group("names and ensemble")
    p.add_argument("--no-ensemble", action="store_true", help="only the model step (token ids in), no raw-text ensemble")
    p.add_argument("--name", default=None, help="model name prefix (default: the artifact directory's name)")
    p = parser.add_argument_group("batching and engines")
    p.add_argument("--queue-delay-us", type=int, default=500, help="dynamic batcher max queue delay (default: 500)")
    p.add_argument("--threads", type=int, default=None, help="ORT intra-op threads per instance (default: ORT's)")
    p.add_argument("--max-length", type=int, default=None,
                   help="tokens the raw-text ensemble truncates a text (a reranker pair) to (default: as the runtime "
                        "class: the model's max length; 512 for BGE-M3; the manifest's default for rerankers)")
    p.add_argument("--workspace-bytes", type=int, default=1 << 30, help="TensorRT workspace size (default: 1 GiB)")


def run(args: argparse.Namespace) -> int:
    from bgert.triton_models.repository import write_repository

    names = write_repository(args.artifact, args.out, backend=args.backend, device=args.device,
                             instances=args.instances, max_batch_size=args.max_batch_size,
                             precision=args.precision, ensemble=not args.no_ensemble, name=args.name,
                             queue_delay_us=args.queue_delay_us, threads=args.threads,
                             workspace_bytes=args.workspace_bytes, max_length=args.max_length,
                             force=args.force)
    print(f"wrote models {', '.join(names)} to {args.out}", file=sys.stderr)
    return 0
