"""TensorRT execution provider: options derived from the manifest, engine caches, profiles, warm-up.

TensorRT builds an engine per graph, precision and shape profile; that takes seconds to minutes,
so bgert pins everything that decides the engine:

- precision from the graph the runtime picked: fp16 → ``trt_fp16_enable``; int8-static (the QDQ
  graph: explicit quantisation, no calibration table) → ``trt_int8_enable`` plus fp16 for the
  layers left in float; fp32 → neither. Dynamic int8 graphs (MatMulInteger) are CPU-only.
- caches: engines in ``<cache>/<graph sha256[:16]>`` (``trt_engine_cache_enable`` + path), the
  timing cache shared by all graphs in ``<cache>`` (``trt_timing_cache_enable`` + path).
  ``<cache>`` is ``tensorrt_cache_dir=`` or ``$BGERT_CACHE_DIR/tensorrt`` (default
  ``~/.cache/bgert/tensorrt``). ORT rebuilds an engine when its profile shapes change.
- shape profiles from the length buckets and the batch cut (``bucket_shapes``): ``single`` (the
  default) is one profile from [1, smallest bucket] to [most rows, largest bucket], optimised
  for the middle bucket; ``per-bucket`` is one profile per bucket, [1, L] to [rows(L), L], which
  ORT accepts as repeated input names (``input_ids:1x16,...,input_ids:1x32,...``).
- ``warmup(model)`` runs one batch of 1 row and one full batch per bucket, so engines (and CUDA
  graphs, and cuDNN/cuBLAS autotuning) are built before the first real request.

TensorRT cannot run ORT's fused contrib ops (Attention, SkipLayerNormalization, …) that the
exporter's optimiser writes; those nodes fall back to the CUDA provider and split the engine.
Export with ``optimize_graph=False`` (``bgert export --no-optimize``) for a TensorRT artifact.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Mapping

import numpy as np

from .cache_dir import cache_dir
from .providers import ProviderError

log = logging.getLogger("bgert")

#: ORT transformer-optimizer fusions that only ORT's own kernels implement (com.microsoft domain)
CONTRIB_OPS = ("Attention", "MultiHeadAttention", "EmbedLayerNormalization", "SkipLayerNormalization",
               "SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization", "BiasGelu", "FastGelu",
               "Gelu", "QuickGelu", "BiasSoftmax", "BiasAdd", "RotaryEmbedding", "GroupQueryAttention")
PROFILE_KINDS = ("single", "per-bucket")


def default_cache_dir() -> str:
    return cache_dir("tensorrt")


def profile_inputs(manifest: Any, graph: Any) -> list[str]:
    """Names of the graph's [batch, sequence] inputs (the graph's own list when it has one)."""
    inputs = graph.extra.get("inputs") or manifest.get("inputs") or []
    names = []
    for spec in inputs:
        axes = {int(k): v for k, v in spec.get("axes", {}).items()}
        if sorted(axes) != [0, 1]:
            raise ProviderError(f"cannot derive a TensorRT profile for input {spec['name']!r} with dynamic axes "
                                f"{axes}; pass trt_profile_min/opt/max_shapes in the provider options")
        names.append(spec["name"])
    if not names:
        raise ProviderError("the manifest lists no inputs to build TensorRT profiles from; re-export the artifact")
    return names


def profile_shapes(input_names: list[str], shapes: Mapping[int, int], kind: str = "single") -> dict[str, str]:
    """``trt_profile_{min,opt,max}_shapes`` strings for [batch, length] inputs.

    ``shapes`` is {padded length: most rows} (bucket_shapes); see the module doc for ``kind``.
    """
    if kind not in PROFILE_KINDS:
        raise ValueError(f"tensorrt_profiles must be one of {PROFILE_KINDS}, got {kind!r}")
    if not shapes:
        raise ValueError("no length buckets to derive TensorRT profiles from")
    lengths = sorted(shapes)
    if kind == "single":
        mid = lengths[len(lengths) // 2]
        profiles = [((1, lengths[0]), (shapes[mid], mid), (max(shapes.values()), lengths[-1]))]
    else:
        profiles = [((1, L), (shapes[L], L), (shapes[L], L)) for L in lengths]

    def fmt(which: int) -> str:
        return ",".join(f"{name}:{p[which][0]}x{p[which][1]}" for p in profiles for name in input_names)

    return {"trt_profile_min_shapes": fmt(0), "trt_profile_opt_shapes": fmt(1), "trt_profile_max_shapes": fmt(2)}


def precision_flags(precision: str) -> dict[str, str]:
    """TensorRT precision options for the graph variant the runtime picked."""
    if precision == "int8":
        raise ProviderError("the 'int8' graph is dynamically quantised (MatMulInteger) for CPUs; TensorRT runs "
                            "precision='fp16', 'fp32' or the QDQ graph 'int8-static'.")
    fp16 = precision in ("fp16", "int8-static")
    flags = {"trt_fp16_enable": str(fp16), "trt_int8_enable": str(precision == "int8-static")}
    if fp16:
        flags["trt_layer_norm_fp32_fallback"] = "True"  # LayerNorm in fp16 loses accuracy
    return flags


def tensorrt_options(manifest: Any, graph: Any, shapes: Mapping[int, int], *, cache_dir: str | None = None,
                     profiles: str = "single", cuda_graph: bool = False, device_id: int = 0) -> dict[str, str]:
    """Options for TensorrtExecutionProvider from the manifest, the chosen graph and the buckets."""
    own = graph.extra.get("fused_ops")
    if own is None:  # artifacts exported before graphs carried their own fusion counts
        own = manifest.get("fused_ops")
    fused = {k: v for k, v in (own or {}).items() if k in CONTRIB_OPS and v}
    if fused:
        log.warning("bgert: %s holds ORT-only fused ops (%s) that TensorRT cannot run; they run on the CUDA "
                    "provider between TensorRT engines. Export with optimize_graph=False (bgert export "
                    "--no-optimize) for TensorRT.", graph.file, ", ".join(f"{k}×{v}" for k, v in sorted(fused.items())))
    root = os.path.abspath(cache_dir or default_cache_dir())
    sha = (manifest.get("files") or {}).get(graph.file, "")[:16] or "unhashed"
    engines = os.path.join(root, sha)
    os.makedirs(engines, exist_ok=True)
    opts = {
        "device_id": str(device_id),
        **precision_flags(graph.precision),
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": engines,
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": root,
        **profile_shapes(profile_inputs(manifest, graph), shapes, profiles),
    }
    if cuda_graph:
        opts["trt_cuda_graph_enable"] = "True"
    return opts


def warmup(model: Any, graph: Any = None) -> dict[tuple[int, int], float]:
    """Run a 1-row and a full batch of every bucket through ``model``'s backend for ``graph``.

    Builds TensorRT engines (or loads them from the cache), captures CUDA graphs and lets
    cuBLAS/cuDNN pick kernels before the first real request. Returns {(rows, length): seconds}.
    """
    from .iobinding import bucket_shapes

    graph = graph or model.graph()
    backend = model.backend_for(graph)
    unknown = set(backend.input_names) - {"input_ids", "attention_mask", "token_type_ids"}
    if unknown:
        raise ValueError(f"warmup() feeds input_ids/attention_mask/token_type_ids; {graph.file} also needs "
                         f"{sorted(unknown)}")
    pad_id = model.tokenizer.pad_token_id or 0
    took = {}
    for length, rows in sorted(bucket_shapes(model.length_buckets, model.token_budget, model.batch_size).items()):
        for n in sorted({1, rows}):
            ids = np.full((n, length), pad_id, dtype=np.int64)
            feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
            start = time.perf_counter()
            backend.run(feeds, backend.output_names)
            took[(n, length)] = time.perf_counter() - start
    log.info("bgert: warm-up of %s took %.1f s over %d shapes", graph.file, sum(took.values()), len(took))
    return took
