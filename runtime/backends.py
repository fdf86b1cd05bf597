"""Execution backends: something that runs one graph on a dict of numpy inputs.

``OrtBackend`` runs a local ONNX Runtime session. Other backends (Triton) implement the same
two members, ``input_names`` and ``run(feeds, output_names)``, so the runtime classes do not
care where a graph runs.
"""
from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np
import onnxruntime as ort

from .providers import ProviderError, ProviderSpec, provider_names, resolve_providers

__all__ = ["Backend", "OrtBackend", "ProviderError", "ProviderSpec", "provider_names", "resolve_providers",
           "session_options"]

_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


#: ONNX Runtime's tensor type names (NodeArg.type, OrtValue.data_type()) -> numpy dtype
ORT_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
                   "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
                   "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_}


class Backend(Protocol):
    input_names: list[str]

    def run(self, feeds: dict[str, np.ndarray], output_names: Sequence[str]) -> list[np.ndarray]:
        ...


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

    def __init__(self, path: str, providers: Sequence[ProviderSpec], options: ort.SessionOptions,
                 run_options: ort.RunOptions | None = None, disabled_optimizers: Sequence[str] = ()):
        try:
            self.session = ort.InferenceSession(path, sess_options=options, providers=list(providers),
                                                disabled_optimizers=list(disabled_optimizers) or None)
        except Exception as e:  # ORT raises its own Fail/InvalidGraph types
            raise RuntimeError(f"onnxruntime could not load {path}: {e}") from e
        wanted = provider_names(providers)
        got = self.session.get_providers()
        missing = [p for p in wanted if p not in got]
        if missing:
            raise ProviderError(f"asked for {', '.join(wanted)} but onnxruntime silently dropped "
                                f"{', '.join(missing)} while loading {path} (it would run on {', '.join(got)}); "
                                "check that the CUDA/cuDNN/TensorRT libraries load (onnxruntime logs why), "
                                "or ask for providers='auto' or 'cpu'.")
        self.providers = got
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.run_options = run_options

    def run(self, feeds: dict[str, np.ndarray], output_names: Sequence[str]) -> list[np.ndarray]:
        return self.session.run(list(output_names), {k: feeds[k] for k in self.input_names}, self.run_options)
