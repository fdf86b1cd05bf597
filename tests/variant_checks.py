"""Shared checks for the precision variants every family test exports (fp16, int8, int8-vnni, int8-static).

Each family test compares the variants with its PyTorch reference (FlagEmbedding) itself; this module
holds what is the same for all of them: the export call, the manifest checks and the thresholds.
"""
from __future__ import annotations

import json
import os

import numpy as np

from bgert.export import export
from bgert.runtime.base import cpu_int8_dot_exact

VARIANTS = ["fp16", "int8", "int8-static"]
FAST = {"calibration_size": 8, "quality_size": 4}
#: every variant this CPU runs as intended: int8-vnni only where u8×s8 products do not saturate
RUNNABLE = ["fp16", "int8", "int8-static"] + (["int8-vnni"] if cpu_int8_dot_exact() else [])
#: the smallest cosine each variant must keep against the PyTorch reference (the export gates' cos_min)
COS_MIN = {"fp16": 0.999, "int8": 0.97, "int8-vnni": 0.97, "int8-static": 0.97}
#: the smallest Spearman correlation of reranker scores against the reference
SPEARMAN_MIN = {"fp16": 0.99, "int8": 0.9, "int8-vnni": 0.9, "int8-static": 0.9}


def export_variants(ckpt: str, out: str, **kw) -> str:
    return export(ckpt, out, progress=False, precisions=VARIANTS, **FAST, **kw)


def assert_gated(art: str, outputs: set[str]) -> dict[str, list[dict]]:
    """Every variant written, gated and measured output by output; returns the graphs by precision."""
    with open(os.path.join(art, "manifest.json"), encoding="utf-8") as f:
        graphs = json.load(f)["graphs"]
    by: dict[str, list[dict]] = {}
    for g in graphs:
        by.setdefault(g["precision"], []).append(g)
    assert set(by) == {"fp32", "int8-vnni", *VARIANTS}
    assert len({len(v) for v in by.values()}) == 1, "one variant per fp32 graph"
    for p, gs in by.items():
        for g in gs:
            assert g["gate_passed"] is True, (p, g.get("quality"))
            if p == "fp32":
                continue
            q = g["quality"]
            section = q.get("vs_fp32") or q["vs_fp32_exact_int8"]  # int8-vnni: exact arithmetic only here
            assert set(section) == outputs, (p, sorted(section))
            for metric, bound in q["gate"].items():
                if metric in q:
                    assert q[metric] >= bound, (p, metric, q[metric], bound)
    return by


def cos_rows(a, b) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-24)


def spearman(a, b) -> float:
    rank = lambda x: np.argsort(np.argsort(np.asarray(x, np.float64), kind="stable"), kind="stable")  # noqa: E731
    return float(np.corrcoef(rank(a), rank(b))[0, 1])
