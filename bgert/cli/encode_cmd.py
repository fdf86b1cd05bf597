"""``bgert encode DIR --input FILE|- --output FILE``: embed texts (txt or jsonl in, npy or jsonl out)."""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", help="artifact directory")
    p.add_argument("--input", "-i", default="-", help="txt (one text per line) or jsonl file, '-' for stdin")
    p.add_argument("--output", "-o", required=True, help=".npy for an array, .jsonl for one vector per line")
    p.add_argument("--field", default="text", help="jsonl input: the key holding the text (default: text)")
    p.add_argument("--queries", action="store_true", help="apply the query instruction (encode_queries)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--precision", default=None)
    p.add_argument("--providers", default=None, help="comma-separated ORT providers (default: CPU)")
    p.add_argument("--backend", default="auto", choices=["auto", "ort", "openvino"],
                   help="auto: the fastest variant `bgert tune` measured here, else ORT; or ONNX Runtime, or "
                        "OpenVINO on the CPU (the openvino extra)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (ORT) / inference threads (OpenVINO)")
    p.add_argument("--sparse", action="store_true", help="m3: also write lexical weights (jsonl output)")
    p.add_argument("--colbert", action="store_true", help="m3: also write ColBERT vectors (jsonl output)")


def read_texts(path: str, field: str) -> list[str]:
    """Texts from a txt file (one per line) or a jsonl file (``field`` of each record)."""
    f = sys.stdin if path == "-" else open(path, encoding="utf-8")
    try:
        lines = f.read().splitlines()
    finally:
        if f is not sys.stdin:
            f.close()
    if path.endswith(".jsonl") or (lines and lines[0].lstrip().startswith("{")):
        texts = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            rec = json.loads(line)
            if field not in rec:
                raise ValueError(f"{path}:{n}: record has no {field!r} key (use --field)")
            texts.append(rec[field] if "title" not in rec else (rec["title"] + " " + rec[field]).strip())
        return texts
    return lines


def write_m3_jsonl(path: str, out: dict) -> None:
    """One record per text: {"dense": [...], "sparse": {token id: weight}, "colbert": [[...], ...]}."""
    n = len(out["dense_vecs"])
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            rec = {"dense": np.round(out["dense_vecs"][i].astype(float), 7).tolist()}
            if out["lexical_weights"] is not None:
                rec["sparse"] = {k: round(float(w), 7) for k, w in out["lexical_weights"][i].items()}
            if out["colbert_vecs"] is not None:
                rec["colbert"] = np.round(out["colbert_vecs"][i].astype(float), 7).tolist()
            f.write(json.dumps(rec) + "\n")


def run(args: argparse.Namespace) -> int:
    from bgert.runtime import load

    providers = args.providers.split(",") if args.providers else None
    model = load(args.artifact, precision=args.precision, providers=providers, backend=args.backend,
                 intra_op_num_threads=args.threads, show_progress_bar=True)
    texts = read_texts(args.input, args.field)
    fn = model.encode_queries if args.queries else model.encode
    m3 = model.manifest.kind == "m3"
    if (args.sparse or args.colbert) and not (m3 and args.output.endswith(".jsonl")):
        raise ValueError("--sparse/--colbert need an M3 artifact and a .jsonl output")
    kw = {"return_sparse": args.sparse, "return_colbert_vecs": args.colbert} if m3 else {}
    vecs = fn(texts, batch_size=args.batch_size, max_length=args.max_length, **kw)
    if m3 and not kw["return_sparse"] and not kw["return_colbert_vecs"]:
        vecs = vecs["dense_vecs"]  # M3Embedder returns BGEM3FlagModel's dict
    if isinstance(vecs, dict):
        write_m3_jsonl(args.output, vecs)
    elif args.output.endswith(".npy"):
        np.save(args.output, np.asarray(vecs, dtype=np.float32).reshape(len(texts), -1))
    else:
        with open(args.output, "w", encoding="utf-8") as f:
            for v in vecs:
                f.write(json.dumps([round(float(x), 7) for x in v]) + "\n")
    print(f"encoded {len(texts)} texts with {model!r} -> {args.output}", file=sys.stderr)
    return 0
