"""Length buckets and token-budget batching: the one place that decides how inputs are batched.

Items are sorted by length (longest first, stable), then cut into consecutive batches so that
``batch_len * padded_length <= token_budget`` and ``batch_len <= max_batch_size``, never across two
buckets; each batch is padded up to the smallest bucket that fits its longest item. Callers
scatter results back with ``Batch.indices`` so the caller's order is restored. Masked positions do
not contribute to any output, so results do not depend on batch size, bucket or neighbours beyond
float noise.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Sequence

import numpy as np

#: padded tokens per batch by default on GPUs (CUDA, TensorRT) and remote backends (Triton), which want big batches
DEFAULT_TOKEN_BUDGET = 16384
#: padded tokens per batch by default on the CPU (ORT's CPU provider, OpenVINO). A batch's activations grow with
#: its tokens (hidden states and FFN intermediates: tokens x width; attention probabilities: tokens x heads x
#: padded length), and the largest batch sets the process's peak memory, while a CPU's GEMMs are already as fast
#: at a few thousand tokens as at 16k: 4096 keeps all-MiniLM-L6-v2's encode() peak at ~0.4 GB (~0.8 GB at 16384)
#: at the same throughput (benchmarks/results/footprint_*.md)
CPU_TOKEN_BUDGET = 4096


def default_token_budget(on_cpu: bool) -> int:
    """The token budget per batch when the caller names none: CPU_TOKEN_BUDGET on the CPU, else DEFAULT_TOKEN_BUDGET."""
    return CPU_TOKEN_BUDGET if on_cpu else DEFAULT_TOKEN_BUDGET


@dataclass(frozen=True)
class Batch:
    """Indices into the caller's list, and the padded length every row of the batch gets."""

    indices: np.ndarray
    length: int


def check_buckets(buckets: Sequence[int], max_length: int) -> list[int]:
    """Sorted length buckets; ValueError unless each is an int in 1..max_length (padding past the
    model's positions would fail inside the graph)."""
    out = sorted(buckets)
    if not out or any(not isinstance(b, (int, np.integer)) or not 1 <= b <= max_length for b in out):
        raise ValueError(f"length_buckets must be ints between 1 and max_length ({max_length}), got {list(buckets)}")
    return [int(b) for b in out]


def bucket_for(n: int, buckets: Sequence[int], multiple_of: int = 1) -> int:
    """Smallest bucket >= n; past the largest bucket, n itself (rounded up to ``multiple_of``)."""
    i = bisect.bisect_left(buckets, n)
    b = buckets[i] if i < len(buckets) else n
    if multiple_of > 1:
        b = -(-b // multiple_of) * multiple_of
    return b


def plan_batches(lengths: Sequence[int], buckets: Sequence[int], token_budget: int = DEFAULT_TOKEN_BUDGET,
                 max_batch_size: int | None = None, multiple_of: int = 1) -> list[Batch]:
    """Sort by length (longest first) and cut batches by padded-token budget, item count and bucket.

    A batch never spans two buckets, so no item is padded past its own bucket (a batch of short
    queries with one long one would otherwise pay the long one's padding on every row). A single
    item longer than the budget still gets a batch of its own.
    """
    if token_budget < 1:
        raise ValueError(f"token_budget must be >= 1, got {token_budget}")
    if max_batch_size is not None and max_batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {max_batch_size}")
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size == 0:
        return []
    buckets = sorted(buckets)
    order = np.argsort(-lengths, kind="stable")
    batches: list[Batch] = []
    start = 0
    n = len(order)
    cap = max_batch_size or n
    # minus the bucket index of each sorted item (len(buckets) past the largest): non-decreasing
    klass = -np.searchsorted(np.asarray(buckets), lengths[order], side="left")
    while start < n:
        padded = bucket_for(int(lengths[order[start]]), buckets, multiple_of)
        same_bucket = int(np.searchsorted(klass, klass[start], side="right")) - start
        count = max(1, min(cap, token_budget // padded, same_bucket))
        batches.append(Batch(indices=order[start:start + count], length=padded))
        start += count
    return batches


def merge_runs(batches: Sequence[Batch], run_cost_tokens: int, token_budget: int = DEFAULT_TOKEN_BUDGET,
               max_batch_size: int | None = None) -> list[Batch]:
    """Fewer graph runs where that is cheaper: neighbouring batches of ``plan_batches`` (longest first)
    are grouped, each group padded to its first (longest) batch's length, so as to minimise the total
    cost, a run costing ``run_cost_tokens`` (its fixed cost, in padded tokens) plus rows x length.

    On a CPU a graph run has a fixed cost (about 14 padded tokens' worth for a 6-layer MiniLM on 2
    threads) besides its tokens, so a few requests of different lengths, one bucket each, are cheaper
    padded into one run than run bucket by bucket. Groups stay within ``token_budget`` and
    ``max_batch_size``; the result is the optimal grouping of consecutive batches (dynamic programming).
    """
    k = len(batches)
    if k < 2 or run_cost_tokens <= 0:
        return list(batches)
    rows = [len(b.indices) for b in batches]
    best = [0.0] + [float("inf")] * k  # best[j]: cheapest cost of batches[:j]
    start = [0] * (k + 1)  # the group ending at batch j-1 starts at batch start[j]
    for j in range(1, k + 1):
        n = 0
        for i in range(j - 1, -1, -1):  # the group batches[i:j], padded to batches[i].length
            n += rows[i]
            if i < j - 1 and (n * batches[i].length > token_budget or (max_batch_size and n > max_batch_size)):
                break
            cost = best[i] + run_cost_tokens + n * batches[i].length
            if cost < best[j]:
                best[j], start[j] = cost, i
    groups, j = [], k
    while j > 0:
        i = start[j]
        groups.append(Batch(indices=np.concatenate([b.indices for b in batches[i:j]]), length=batches[i].length))
        j = i
    return groups[::-1]


def pad(sequences: Sequence[Sequence[int]], length: int, pad_id: int, side: str = "right") -> tuple[np.ndarray, np.ndarray]:
    """Pad id lists to ``length`` on ``side``; returns (ids, attention_mask), both int64 [B, length]."""
    ids = np.full((len(sequences), length), pad_id, dtype=np.int64)
    mask = np.zeros((len(sequences), length), dtype=np.int64)
    for row, seq in enumerate(sequences):
        k = len(seq)
        if k > length:
            raise ValueError(f"sequence of {k} tokens does not fit the padded length {length}")
        if side == "left":
            ids[row, length - k:] = seq
            mask[row, length - k:] = 1
        else:
            ids[row, :k] = seq
            mask[row, :k] = 1
    return ids, mask
