"""Quality statistics and gate defaults, defined once for every place that measures an artifact.

Used by the export's parity check (bgert.export.parity / the specs), the precision gates
(bgert.export.precision), ``bgert bench`` (bgert.benchmarks) and the GPU bench. What an output is
(vectors, token vectors, lexical weights or scores) comes from its family (bgert.runtime.registry),
so a reranker's scores are never compared as [n, 1] "vectors" (whose cosines are all ±1).

numpy only at import; Spearman comes from scipy.stats (the ``export`` and ``bench`` extras), imported
when a score is compared, so the runtime's base install never needs scipy.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

# ---- gate defaults (README "Calibration and gates", "bgert bench") ------------------------------------
#: fp32 against PyTorch: minimum row cosine (vectors), maximum |score diff| (scores)
FP32_COS_MIN = 0.99999
FP32_MAX_ABS_DIFF = 1e-3
#: precision variants against fp32; a metric applies wherever the measured quality reports it
PRECISION_GATES: dict[str, dict[str, float]] = {
    "fp16": {"cos_mean": 0.9999, "cos_min": 0.999, "spearman": 0.995, "top5_agreement": 0.8},
    "int8": {"cos_mean": 0.99, "cos_min": 0.97, "spearman": 0.98, "top5_agreement": 0.6},
    "int8-vnni": {"cos_mean": 0.99, "cos_min": 0.97, "spearman": 0.98, "top5_agreement": 0.6},
    "int8-static": {"cos_mean": 0.99, "cos_min": 0.97, "spearman": 0.98, "top5_agreement": 0.6},
    "bf16": {"cos_mean": 0.9999, "cos_min": 0.999, "spearman": 0.995, "top5_agreement": 0.8},
    "ov-int8": {"cos_mean": 0.99, "cos_min": 0.97, "spearman": 0.98, "top5_agreement": 0.6},
}
#: the metrics a gate may name (all "at least")
GATE_METRICS = ("cos_mean", "cos_min", "spearman", "top5_agreement")
#: top-k of the agreement each measurement reports: the export's parity (few pairs), the precision
#: gates (top5_agreement above), the bench (many pairs)
PARITY_TOP_K, GATE_TOP_K, BENCH_TOP_K = 3, 5, 10
#: rows whose reference norm is below this carry nothing (padding, empty sequences) and are skipped
ZERO_ROW = 1e-6


def cos_min_gate(precision: str) -> float:
    """The minimum row cosine against PyTorch a precision must hold (fp32: FP32_COS_MIN)."""
    return FP32_COS_MIN if precision == "fp32" else PRECISION_GATES.get(precision, PRECISION_GATES["int8"])["cos_min"]


def spearman_gate(precision: str) -> float:
    """The minimum Spearman correlation of scores a non-fp32 precision must hold."""
    return PRECISION_GATES.get(precision, PRECISION_GATES["int8"])["spearman"]


# ---- statistics ------------------------------------------------------------------------------------------
def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of each pair of rows (last axis) in float64."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-24)


def cosine_summary(cos: np.ndarray, max_abs_diff: float) -> dict[str, float]:
    """Mean, min and 1st percentile of cosines, with the max |diff| they came with."""
    cos = np.asarray(cos, dtype=np.float64)
    if not cos.size:
        return {"n": 0}
    return {"cos_mean": float(cos.mean()), "cos_min": float(cos.min()), "cos_p01": float(np.percentile(cos, 1)),
            "max_abs_diff": float(max_abs_diff), "n": int(cos.size)}


def cosine_stats(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Row-wise cosine between two [n, d] arrays: mean, min, 1st percentile, and max |a-b|."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return cosine_summary(row_cosines(a, b), float(np.abs(a - b).max()) if a.size else 0.0)


def spearman(ref: Any, got: Any) -> float:
    """Spearman rank correlation (scipy.stats); 1.0 when either side is constant or has one value."""
    from scipy.stats import spearmanr

    r = np.asarray(ref, dtype=np.float64).ravel()
    g = np.asarray(got, dtype=np.float64).ravel()
    if len(r) < 2 or np.std(r) == 0 or np.std(g) == 0:
        return 1.0
    return float(spearmanr(r, g)[0])


def top_k_agreement(ref: Any, got: Any, k: int) -> float:
    """Share of the reference's top-k items that are also in the other's top-k."""
    r = np.asarray(ref, dtype=np.float64).ravel()
    g = np.asarray(got, dtype=np.float64).ravel()
    k = min(k, len(r))
    return len(set(np.argsort(-r)[:k]) & set(np.argsort(-g)[:k])) / max(k, 1)


def score_stats(ref: Any, got: Any, k: int = PARITY_TOP_K) -> dict[str, float]:
    """Scores: max |diff|, Spearman correlation and top-k agreement (key ``top{k}_agreement``)."""
    r = np.asarray(ref, dtype=np.float64).ravel()
    g = np.asarray(got, dtype=np.float64).ravel()
    k_used = min(k, len(r))
    return {"max_abs_diff": float(np.abs(r - g).max()) if len(r) else 0.0, "spearman": spearman(r, g),
            f"top{k_used}_agreement": float(top_k_agreement(r, g, k)), "n": int(len(r))}


def score_columns(ref: np.ndarray, got: np.ndarray, k: int = GATE_TOP_K) -> dict[str, Any]:
    """[n, c] scores (one column per cutoff layer): each column's stats, the worst of each metric overall."""
    cols = [score_stats(ref[:, j], got[:, j], k) for j in range(ref.shape[1])]
    if len(cols) == 1:
        return cols[0]
    worst: dict[str, Any] = {m: min(c[m] for c in cols) for m in cols[0] if m.endswith("_agreement") or m == "spearman"}
    return {**worst, "max_abs_diff": max(c["max_abs_diff"] for c in cols), "n": cols[0]["n"], "columns": cols}


def compare_output(output_type: str, ref: Sequence[np.ndarray], got: Sequence[np.ndarray]) -> dict[str, Any]:
    """Quality of one graph output, batch by batch (chunks may differ in length), by its type:

    - ``vectors`` and ``lexical_weights``: cosine per row ([n, d], or [n, T] weights per position);
    - ``token_vectors``: cosine per token vector ([n, T, d]);
    - ``scores``: Spearman, top-k agreement and max |diff| per score column ([n] or [n, c]).

    Rows whose reference is all zero (padding, empty sequences) are skipped.
    """
    if output_type == "scores":
        r = np.concatenate([c.reshape(c.shape[0], -1) for c in ref])
        g = np.concatenate([c.reshape(c.shape[0], -1) for c in got])
        return score_columns(r, g)
    if output_type not in ("vectors", "lexical_weights", "token_vectors"):
        raise ValueError(f"unknown output type {output_type!r}")
    cos, diff = [], 0.0
    for rc, gc in zip(ref, got):
        r = rc.reshape(-1, rc.shape[-1]) if output_type == "token_vectors" else rc.reshape(rc.shape[0], -1)
        g = gc.reshape(r.shape)
        keep = np.linalg.norm(r, axis=-1) > ZERO_ROW
        if keep.any():
            cos.append(row_cosines(r[keep], g[keep]))
            diff = max(diff, float(np.abs(r - g).max()))
    return cosine_summary(np.concatenate(cos) if cos else np.ones(0), diff)


def summarize(sections: Any) -> dict[str, float]:
    """Worst value of every gate metric over all checks and outputs (what `bgert info` shows)."""
    out: dict[str, float] = {}

    def walk(d: Any) -> None:
        if isinstance(d, dict):
            for k, v in d.items():
                if k in GATE_METRICS and isinstance(v, (int, float)):
                    out[k] = min(out.get(k, float("inf")), float(v))
                else:
                    walk(v)
        elif isinstance(d, list):
            for v in d:
                walk(v)

    walk(sections)
    return out


def gate_failures(summary: dict[str, float], gate: dict[str, float]) -> list[str]:
    """The gate metrics ``summary`` misses, as 'metric value < threshold'."""
    return [f"{k} {summary[k]:.6f} < {v}" for k, v in gate.items() if k in summary and summary[k] < v]
