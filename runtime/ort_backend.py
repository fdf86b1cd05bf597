"""Where a runtime class gets its ORT backend for a graph.

Provider options derived from the artifact (TensorRT precision flags, caches and shape profiles;
CUDA TF32 off for fp32 graphs, CUDA graphs when asked) are merged under the caller's own options,
and GPU providers run through the IO-binding backend (bgert.runtime.iobinding) unless
``io_binding=False``. ``arena`` sets ORT's CPU memory arena (ARENA_MODES in bgert.runtime.providers);
CPU sessions load the graph's optimised, memory-mapped copy (bgert.runtime.session_cache) unless
``session_cache=False``. This module sits above providers, backends, iobinding, session_cache and
tensorrt, which never import it.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import onnxruntime as ort

from . import iobinding, session_cache as graph_cache, tensorrt
from .backends import OrtBackend
from .providers import (CPU, CUDA, GPU_PROVIDERS, TENSORRT, ProviderError, ProviderSpec, cuda_options,
                        preload_gpu_libraries, provider_names, provider_options, uses_gpu)


def arena_settings(arena: str, sess_options: ort.SessionOptions) -> ort.RunOptions | None:
    """Apply ``arena`` (one of ARENA_MODES, checked by providers.check_backend_options) to ``sess_options``;
    the RunOptions every run then takes (None: ORT's)."""
    if arena == "off":
        sess_options.enable_cpu_mem_arena = False
    if arena != "shrink":
        return None
    run_options = ort.RunOptions()
    run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return run_options


#: ORT graph optimizers the CPU provider runs without: SkipLayerNormFusion would turn the int8 graphs' Add + Add +
#: LayerNormalization back into SkipLayerNormalization, whose CPU kernel took twice as long in ORT 1.32
#: (benchmarks/results/cpu_profile_*.md)
CPU_DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)


def make_ort_backend(path: str, manifest: Any, graph: Any, providers: Sequence[ProviderSpec],
                     sess_options: ort.SessionOptions, shapes: Mapping[int, int], *,
                     io_binding: bool | None = None, cuda_graph: bool = False,
                     tensorrt_cache_dir: str | None = None, tensorrt_profiles: str = "single",
                     arena: str = "on", session_cache: bool | None = None) -> Any:
    """The ORT backend for ``graph`` of ``manifest``: OrtBackend, or IoBindingBackend on GPUs.

    ``shapes`` maps each padded length (bucket) to the most rows a batch of it holds; it sizes
    the IO-binding buffers and the TensorRT profiles. ``io_binding=None`` means: on for CUDA and
    TensorRT, off for CPU. The caller's own provider options always win over derived ones.
    ``arena``: ORT's CPU memory arena, one of ARENA_MODES ("shrink" only without IO binding).
    ``session_cache``: load CPU-only sessions from the optimised-graph cache (None: unless
    ``BGERT_SESSION_CACHE=0``; the caller sets False for SessionOptions of its own).
    """
    names = provider_names(providers)
    on_gpu = uses_gpu(providers)
    if cuda_graph and not on_gpu:
        raise ProviderError(f"cuda_graph=True needs the CUDA or TensorRT provider; this model runs on {names}.")
    if on_gpu:
        preload_gpu_libraries()
    if TENSORRT in names and CUDA not in names and CUDA in ort.get_available_providers():
        providers = [*providers[:names.index(TENSORRT) + 1], CUDA, *providers[names.index(TENSORRT) + 1:]]
        names = provider_names(providers)  # nodes TensorRT rejects run on CUDA, not on CPU
    given = [provider_options(providers, p).get("device_id") for p in GPU_PROVIDERS]
    device_id = int(next((d for d in given if d is not None), 0))
    full: list[ProviderSpec] = []
    for name in names:
        derived: dict[str, Any] = {}
        if name == CUDA:
            derived = cuda_options(graph.precision, cuda_graph, device_id)
        elif name == TENSORRT:
            derived = tensorrt.tensorrt_options(manifest, graph, shapes, cache_dir=tensorrt_cache_dir,
                                       profiles=tensorrt_profiles, cuda_graph=cuda_graph, device_id=device_id)
        merged = {**derived, **provider_options(providers, name)}
        full.append((name, merged) if merged else name)
    use_binding = on_gpu if io_binding is None else bool(io_binding)
    cpu_only = names == [CPU]
    run_options = arena_settings(arena, sess_options)
    if run_options is not None and use_binding:
        raise ProviderError("arena='shrink' returns the CPU arena's chunks after each run of the CPU provider; "
                            "with IO binding (GPU providers) use arena='on' or 'off'.")
    if not use_binding:
        if cuda_graph:
            raise ProviderError("cuda_graph=True needs IO binding (fixed input/output addresses); "
                                "drop io_binding=False.")
        disabled = CPU_DISABLED_OPTIMIZERS if cpu_only else ()
        if cpu_only and graph_cache.enabled(session_cache):
            cached = graph_cache.cached_graph(path, manifest, graph.file, sess_options, disabled)
            if cached != path:
                try:
                    return OrtBackend(cached, full, sess_options, run_options, disabled)
                except RuntimeError as e:  # a copy ORT cannot read back: the artifact's own graph, from now on
                    graph_cache.refuse(cached, e)
        return OrtBackend(path, full, sess_options, run_options, disabled)
    on_cpu = {"disabled_optimizers": CPU_DISABLED_OPTIMIZERS} if cpu_only else {}  # IO binding on the CPU EP
    return iobinding.IoBindingBackend(path, full, sess_options, shapes=shapes, cuda_graph=cuda_graph, device_id=device_id,
                                      **on_cpu)
