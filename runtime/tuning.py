"""Which variant (backend × precision) is fastest on this machine: the cache of what was measured.

``bgert tune ART`` (bgert.runtime.autotune) times every gated variant that runs here (ORT's precisions, and OpenVINO's where the
openvino extra is installed), each in its own process (ORT's and OpenMP's worker threads spin after a
run and would slow a neighbour in the same process), on synthetic documents and queries of the
shapes retrieval sees. The result is cached per (artifact, CPU model + flags, threads) in
``$BGERT_CACHE_DIR`` (default ``~/.cache/bgert/tune``). The runtime classes then default to the
fastest variant measured for their backend (``backend="auto"``: over all backends); where nothing
was measured they fall back to the fixed order in bgert.runtime.base (``CPU_PREFERENCE``).

Speed alone decides among variants that passed their quality gate; a variant whose gate was not
measured (bf16 exported on a CPU without bf16) is never timed, so never chosen.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Sequence

from .cpu import cpu_flags, cpu_model

#: flags that change which kernels run (int8 dot products, bf16, AVX-512)
RELEVANT_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16", "avx512_bf16", "asimddp")


def machine_key(threads: int | None) -> str:
    """CPU model, the kernel-relevant flags it has, and the thread count."""
    flags = "+".join(f for f in RELEVANT_FLAGS if f in cpu_flags()) or "none"
    return f"{cpu_model()} | {flags} | threads={threads or os.cpu_count()}"


def cache_path(model_dir: str, threads: int | None) -> str:
    """Where the measurement for this artifact (its manifest's sha256) and machine is kept."""
    from .manifest import MANIFEST_FILE, sha256_file

    root = os.environ.get("BGERT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "bgert", "tune")
    key = hashlib.sha256((sha256_file(os.path.join(model_dir, MANIFEST_FILE)) + machine_key(threads)).encode())
    return os.path.join(root, key.hexdigest()[:24] + ".json")


def read_tuning(model_dir: str, threads: int | None) -> dict[str, Any] | None:
    """The cached measurement for this artifact and machine, or None."""
    try:
        with open(cache_path(model_dir, threads), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def fastest(tuning: dict[str, Any] | None, backend: str | None, allowed: Sequence[str]) -> dict[str, Any] | None:
    """The fastest measured variant on ``backend`` (None: any) whose precision is in ``allowed``."""
    rows = [r for r in (tuning or {}).get("variants", []) if "score" in r and r["precision"] in allowed
            and (backend is None or r["backend"] == backend)]
    return max(rows, key=lambda r: r["score"], default=None)
