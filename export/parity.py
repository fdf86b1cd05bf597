"""Fixed parity texts and the statistics every family reports (cosine, score diff, ranking)."""
from __future__ import annotations

from typing import Any

import numpy as np

#: texts of many lengths and scripts, checked right after every export
PARITY_TEXTS: list[str] = [
    "",
    "a",
    "what is a panda?",
    "The giant panda (Ailuropoda melanoleuca) is a bear species endemic to China.",
    "BGE M3 is an embedding model supporting dense retrieval, lexical matching and multi-vector interaction.",
    "北京是中华人民共和国的首都。",
    "Москва — столица России.",
    "مرحبا بالعالم",
    "Emoji test 🐼🎋🔥 and ZWJ 👩‍💻",
    "   leading and trailing spaces   ",
    ("A long scientific abstract about protein folding, retrieval augmented generation and the "
     "statistics of embeddings. " * 60),
]

PARITY_PAIRS: list[tuple[str, str]] = [
    ("what is a panda?", "hi"),
    ("what is a panda?", "The giant panda (Ailuropoda melanoleuca) is a bear species endemic to China."),
    ("What is BGE M3?", "BGE M3 is an embedding model supporting dense retrieval, lexical matching and multi-vector "
                        "interaction."),
    ("", "an empty query"),
    ("an empty passage", ""),
    ("北京是哪里的首都？", "北京是中华人民共和国的首都。"),
    ("long passage", "Retrieval models rank documents by relevance to a query. " * 80),
]


def cosine_stats(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Row-wise cosine between two [n, d] arrays: mean, min, 1st percentile, and max |a-b|."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    na = np.maximum(np.linalg.norm(a, axis=-1), 1e-12)
    nb = np.maximum(np.linalg.norm(b, axis=-1), 1e-12)
    cos = (a * b).sum(-1) / (na * nb)
    return {"cos_mean": float(cos.mean()), "cos_min": float(cos.min()),
            "cos_p01": float(np.percentile(cos, 1)), "max_abs_diff": float(np.abs(a - b).max()),
            "n": int(a.shape[0])}


def score_stats(ref: Any, got: Any, k: int = 3) -> dict[str, float]:
    """Reranker scores: max |diff|, Spearman correlation and top-k agreement."""
    r = np.asarray(ref, dtype=np.float64).ravel()
    g = np.asarray(got, dtype=np.float64).ravel()
    rank = lambda x: np.argsort(np.argsort(x, kind="stable"), kind="stable")  # noqa: E731
    if len(r) > 1 and np.std(r) > 0 and np.std(g) > 0:
        spearman = float(np.corrcoef(rank(r), rank(g))[0, 1])
    else:
        spearman = 1.0
    k = min(k, len(r))
    topk = len(set(np.argsort(-r)[:k]) & set(np.argsort(-g)[:k])) / max(k, 1)
    return {"max_abs_diff": float(np.abs(r - g).max()) if len(r) else 0.0, "spearman": spearman,
            f"top{k}_agreement": float(topk), "n": int(len(r))}
