"""Execution backends: something that runs one graph on a dict of numpy inputs.

``OrtBackend`` runs a local ONNX Runtime session. Other backends (Triton) implement the same
two members, ``input_names`` and ``run(feeds, output_names)``, so the runtime classes do not
care where a graph runs.
"""
from __future__ import annotations

from typing import Any, Protocol, Sequence, Union

import numpy as np
import onnxruntime as ort

ProviderSpec = Union[str, tuple[str, dict[str, Any]]]

_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
}
_AUTO_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


class ProviderError(ValueError):
    """A requested execution provider is unknown, not installed, or was silently dropped by ORT."""


class Backend(Protocol):
    input_names: list[str]

    def run(self, feeds: dict[str, np.ndarray], output_names: Sequence[str]) -> list[np.ndarray]:
        ...


def resolve_providers(providers: str | Sequence[ProviderSpec] | None) -> list[ProviderSpec]:
    """Turn ``None`` / ``"auto"`` / names / (name, options) pairs into ORT's provider list.

    ``None`` means CPU. ``"auto"`` means TensorRT → CUDA → CPU, as installed. Short names
    (cpu, cuda, tensorrt) are accepted. Unknown or unavailable names raise ProviderError
    listing what this onnxruntime build has.
    """
    available = ort.get_available_providers()
    if providers is None:
        return ["CPUExecutionProvider"]
    if isinstance(providers, str):
        if providers == "auto":
            return [p for p in _AUTO_ORDER if p in available]
        providers = [providers]
    out: list[ProviderSpec] = []
    for p in providers:
        name, opts = (p, None) if isinstance(p, str) else (p[0], dict(p[1]))
        name = _ALIASES.get(name.lower(), name) if isinstance(name, str) else name
        if name not in available:
            raise ProviderError(
                f"execution provider {name!r} is not available in this onnxruntime "
                f"({ort.__version__}); available: {', '.join(available)}. "
                "For CUDA/TensorRT install bgert[gpu] (onnxruntime-gpu) in place of onnxruntime.")
        out.append(name if opts is None else (name, opts))
    return out


def provider_names(providers: Sequence[ProviderSpec]) -> list[str]:
    return [p if isinstance(p, str) else p[0] for p in providers]


def session_options(intra_op_num_threads: int | None = None, inter_op_num_threads: int | None = None,
                    graph_optimization_level: str = "all",
                    base: ort.SessionOptions | None = None) -> ort.SessionOptions:
    """ORT SessionOptions from plain arguments (a caller's own ``base`` options are kept)."""
    so = base or ort.SessionOptions()
    if intra_op_num_threads is not None:
        so.intra_op_num_threads = int(intra_op_num_threads)
    if inter_op_num_threads is not None:
        so.inter_op_num_threads = int(inter_op_num_threads)
    if graph_optimization_level not in _OPT_LEVELS:
        raise ValueError(f"graph_optimization_level must be one of {sorted(_OPT_LEVELS)}, "
                         f"got {graph_optimization_level!r}")
    so.graph_optimization_level = _OPT_LEVELS[graph_optimization_level]
    so.log_severity_level = 3
    return so


class OrtBackend:
    """One ONNX Runtime InferenceSession. ``run`` is thread-safe (ORT sessions are)."""

    def __init__(self, path: str, providers: Sequence[ProviderSpec], options: ort.SessionOptions):
        try:
            self.session = ort.InferenceSession(path, sess_options=options, providers=list(providers))
        except Exception as e:  # ORT raises its own Fail/InvalidGraph types
            raise RuntimeError(f"onnxruntime could not load {path}: {e}") from e
        wanted = provider_names(providers)
        got = self.session.get_providers()
        missing = [p for p in wanted if p not in got]
        if missing:
            raise ProviderError(f"onnxruntime dropped {', '.join(missing)} while loading {path} "
                                f"(it runs on {', '.join(got)}); check the CUDA/TensorRT libraries, "
                                "or ask for providers=['CPUExecutionProvider'].")
        self.providers = got
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray], output_names: Sequence[str]) -> list[np.ndarray]:
        return self.session.run(list(output_names), {k: feeds[k] for k in self.input_names})
