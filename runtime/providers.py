"""Execution providers: what the caller asked for, what this onnxruntime has, and what really works.

``resolve_providers`` turns ``None`` / ``"auto"`` / names / short aliases / (name, options) pairs
into ORT's provider list, or raises ProviderError naming what was asked and what is there.
``"auto"`` does not trust ``get_available_providers()`` alone: onnxruntime-gpu lists CUDA and
TensorRT even where their libraries are missing (and then silently runs on CPU), so each GPU
provider is probed once per process on a one-node model before it is picked.

The ORT backend itself is built by bgert.runtime.ort_backend, above this module and the backends.
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Mapping, Sequence, Union

import numpy as np
import onnxruntime as ort

log = logging.getLogger("bgert")

ProviderSpec = Union[str, tuple[str, dict[str, Any]]]

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
GPU_PROVIDERS = (TENSORRT, CUDA)
#: short names accepted anywhere a provider name is
ALIASES = {"cpu": CPU, "cuda": CUDA, "gpu": CUDA, "tensorrt": TENSORRT, "trt": TENSORRT}
AUTO_ORDER = (TENSORRT, CUDA, CPU)
#: keyword arguments of the runtime classes that configure the ORT backend (see bgert.runtime.ort_backend)
ORT_BACKEND_OPTIONS = ("io_binding", "cuda_graph", "tensorrt_cache_dir", "tensorrt_profiles", "arena", "session_cache")
#: ``arena=`` of the runtime classes: ORT's CPU memory arena. "on" (ORT's default): activation buffers come
#: from an arena that grows to the largest batch's needs and keeps them, so a process stays at its peak RSS;
#: "shrink": the same arena, but the chunks no run holds go back to the OS after every run (the idle RSS falls
#: back to about the weights; each run allocates afresh); "off": plain malloc per tensor (the idle RSS falls
#: back too, but the peak is higher: freed blocks are not reused as tightly). See bgert.runtime.ort_backend.
ARENA_MODES = ("on", "shrink", "off")
_GPU_HINT = ("For CUDA/TensorRT install bgert[gpu] (onnxruntime-gpu) in place of onnxruntime, with CUDA and "
             "cuDNN libraries it can load (and TensorRT itself for the TensorRT provider).")


class ProviderError(ValueError):
    """A requested execution provider is unknown, not installed, or was silently dropped by ORT."""


def canonical_name(name: Any) -> str:
    """ORT's spelling of ``name``: short aliases and any letter case are accepted."""
    if not isinstance(name, str) or not name:
        raise ProviderError(f"an execution provider name must be a non-empty string, got {name!r}")
    if name.lower() in ALIASES:
        return ALIASES[name.lower()]
    for known in ort.get_all_providers():
        if known.lower() == name.lower():
            return known
    raise ProviderError(f"unknown execution provider {name!r}; use one of {', '.join(sorted(ALIASES))}, 'auto', "
                        f"or a full ORT name. This onnxruntime ({ort.__version__}) has: "
                        f"{', '.join(ort.get_available_providers())}.")


def _split(spec: Any) -> tuple[str, dict[str, Any] | None]:
    if isinstance(spec, str):
        return canonical_name(spec), None
    if isinstance(spec, (tuple, list)) and len(spec) == 2 and isinstance(spec[1], Mapping):
        if not all(isinstance(k, str) for k in spec[1]):
            raise ProviderError(f"provider options must have string keys, got {dict(spec[1])!r}")
        return canonical_name(spec[0]), dict(spec[1])
    raise ProviderError(f"each provider must be a name or a (name, options dict) pair, got {spec!r}")


def resolve_providers(providers: str | Sequence[ProviderSpec] | None) -> list[ProviderSpec]:
    """Turn ``None`` / ``"auto"`` / names / (name, options) pairs into ORT's provider list.

    ``None`` means CPU. ``"auto"`` means TensorRT → CUDA → CPU, keeping only those that load
    and run here. Unknown names, duplicates and providers this onnxruntime lacks raise
    ProviderError naming what was asked and what is available.
    """
    if providers is None:
        return [CPU]
    if isinstance(providers, str) and providers.lower() == "auto":
        return [p for p in AUTO_ORDER if provider_works(p)]
    if isinstance(providers, str) or (isinstance(providers, tuple) and len(providers) == 2
                                      and isinstance(providers[1], Mapping)):
        providers = [providers]  # one name, or one (name, options) pair
    if not isinstance(providers, Sequence) or not providers:
        raise ProviderError(f"providers must be 'auto', a name, or a non-empty list, got {providers!r}")
    available = ort.get_available_providers()
    out: list[ProviderSpec] = []
    for spec in providers:
        name, opts = _split(spec)
        if name in provider_names(out):
            raise ProviderError(f"execution provider {name} is listed twice in {providers!r}")
        if name not in available:
            raise ProviderError(f"execution provider {name} was asked for ({spec!r}) but is not available in this "
                                f"onnxruntime ({ort.__version__}); available: {', '.join(available)}. "
                                + (_GPU_HINT if name in GPU_PROVIDERS else ""))
        out.append(name if opts is None else (name, opts))
    return out


def provider_names(providers: Sequence[ProviderSpec]) -> list[str]:
    """The names of a provider list, options dropped."""
    return [p if isinstance(p, str) else p[0] for p in providers]


def uses_gpu(providers: Sequence[ProviderSpec]) -> bool:
    """Whether a provider list holds CUDA or TensorRT."""
    return any(p in GPU_PROVIDERS for p in provider_names(providers))


def provider_options(providers: Sequence[ProviderSpec], name: str) -> dict[str, Any]:
    """The options the caller gave for ``name`` (empty when none or when it is not listed)."""
    for p in providers:
        if not isinstance(p, str) and p[0] == name:
            return dict(p[1])
    return {}


# ---- does a provider really work here? ---------------------------------------------------------
def _field(number: int, payload: bytes | int | str) -> bytes:
    """One protobuf field: varint for ints, length-delimited for bytes/str."""
    def varint(v: int) -> bytes:
        out = bytearray()
        while True:
            out.append((v & 0x7F) | (0x80 if v > 0x7F else 0))
            v >>= 7
            if not v:
                return bytes(out)

    if isinstance(payload, int):
        return varint(number << 3) + varint(payload)
    data = payload.encode() if isinstance(payload, str) else payload
    return varint(number << 3 | 2) + varint(len(data)) + data


def probe_model() -> bytes:
    """A serialized one-node ONNX model, y = Relu(x) with x float[1, 8] (no onnx package needed)."""
    def value_info(name: str) -> bytes:
        shape = _field(2, _field(1, _field(1, 1)) + _field(1, _field(1, 8)))  # TensorShapeProto: dims 1, 8
        return _field(1, name) + _field(2, _field(1, _field(1, 1) + shape))   # float tensor type
    node = _field(1, "x") + _field(2, "y") + _field(3, "relu") + _field(4, "Relu")
    graph = _field(1, node) + _field(2, "bgert_probe") + _field(11, value_info("x")) + _field(12, value_info("y"))
    return _field(1, 8) + _field(7, graph) + _field(8, _field(1, "") + _field(2, 13))


def preload_gpu_libraries() -> None:
    """Let onnxruntime-gpu find the CUDA/cuDNN libraries of pip-installed nvidia/torch wheels."""
    _preload_once()


@functools.lru_cache(maxsize=1)
def _preload_once() -> None:
    preload = getattr(ort, "preload_dlls", None)  # onnxruntime >= 1.21
    if preload is None:
        return
    try:
        preload()
    except Exception as e:  # a missing library is reported by the session that needs it
        log.debug("bgert: onnxruntime.preload_dlls failed: %s", e)


@functools.lru_cache(maxsize=None)
def provider_works(name: str) -> bool:
    """True when ``name`` is listed by this onnxruntime and a session on it keeps it (probed once)."""
    if name not in ort.get_available_providers():
        return False
    if name == CPU:
        return True
    preload_gpu_libraries()
    so = ort.SessionOptions()
    so.log_severity_level = 4
    try:
        sess = ort.InferenceSession(probe_model(), sess_options=so, providers=[name, CPU])
        sess.run(None, {"x": np.ones((1, 8), dtype=np.float32)})
    except Exception as e:  # a provider whose libraries fail to load
        log.info("bgert: %s is installed but does not work here (%s); 'auto' skips it", name, e)
        return False
    works = name in sess.get_providers()
    if not works:
        log.info("bgert: onnxruntime dropped %s on a probe model; 'auto' skips it", name)
    return works


# ---- provider options derived from the artifact -------------------------------------------------
def cuda_options(precision: str, cuda_graph: bool = False, device_id: int = 0) -> dict[str, str]:
    """CUDA EP options: TF32 off for fp32 graphs (fp32 must match PyTorch's fp32, which has TF32
    matmuls off by default), ``enable_cuda_graph`` when CUDA graphs are asked for."""
    opts = {"device_id": str(device_id), "use_tf32": "0" if precision == "fp32" else "1"}
    if cuda_graph:
        opts["enable_cuda_graph"] = "1"
    return opts


def check_backend_options(options: Mapping[str, Any]) -> None:
    """Reject keyword arguments the ORT backend does not know (a typo must not be ignored)."""
    unknown = sorted(set(options) - set(ORT_BACKEND_OPTIONS))
    if unknown:
        raise TypeError(f"unknown option(s) {', '.join(unknown)} for backend='ort'; it takes "
                        f"{', '.join(ORT_BACKEND_OPTIONS)}")
    if options.get("arena", "on") not in ARENA_MODES:
        raise ValueError(f"arena must be one of {', '.join(ARENA_MODES)}, got {options['arena']!r}")
