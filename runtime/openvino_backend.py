"""OpenVINO backend: runs an artifact's ONNX graph with the OpenVINO runtime on the CPU.

OpenVINO reads the artifact's ONNX files as they are (dynamic batch and sequence axes, ORT's
com.microsoft fused ops included) and, on CPUs with AMX-BF16 or AVX512-BF16, can run an fp32
graph in bf16, which ONNX Runtime's CPU provider cannot. Installed with the ``openvino`` extra
(``pip install bgert[openvino]``); the base install does not need it.

The graph's precision sets OpenVINO's ``INFERENCE_PRECISION_HINT``: ``f32`` for fp32 graphs (so an
fp32 graph stays fp32 even where OpenVINO would pick bf16 by itself), ``bf16`` for the ``bf16``
variant (the fp32 file read with that hint). ``intra_op_num_threads`` becomes
``INFERENCE_NUM_THREADS``; ``performance_hint`` is ``latency`` or ``throughput``;
``openvino_cache_dir`` is OpenVINO's compiled-model cache (``CACHE_DIR``); ``openvino_config`` adds
any other CPU plugin property.
"""
from __future__ import annotations

import threading
from typing import Any, Mapping, Sequence

import numpy as np

#: keyword arguments of the runtime classes that configure this backend
OPENVINO_BACKEND_OPTIONS = ("performance_hint", "openvino_cache_dir", "openvino_config")
#: OpenVINO inference precision per graph precision (None: OpenVINO's own choice for the file)
INFERENCE_PRECISION = {"fp32": "f32", "bf16": "bf16", "fp16": "f32", "ov-int8": "f32"}
HINTS = ("latency", "throughput")
_INSTALL = "install the openvino extra: pip install 'bgert[openvino]'"


class OpenVinoError(RuntimeError):
    """OpenVINO is missing here, or cannot compile or run a graph (the message names the op)."""


def openvino_available() -> bool:
    """Whether the openvino package can be imported here."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def check_backend_options(options: Mapping[str, Any]) -> None:
    """Refuse the backend where openvino is not installed, and keyword arguments it does not know."""
    if not openvino_available():
        raise OpenVinoError(f"backend='openvino' needs the openvino package: {_INSTALL}")
    unknown = sorted(set(options) - set(OPENVINO_BACKEND_OPTIONS))
    if unknown:
        raise TypeError(f"unknown option(s) {', '.join(unknown)} for backend='openvino'; it takes "
                        f"{', '.join(OPENVINO_BACKEND_OPTIONS)}")
    hint = options.get("performance_hint", "latency")
    if hint not in HINTS:
        raise ValueError(f"performance_hint must be one of {', '.join(HINTS)}, got {hint!r}")


def compile_config(precision: str, num_threads: int | None = None, performance_hint: str = "latency",
                   cache_dir: str | None = None, extra: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The CPU plugin's configuration for a graph of ``precision`` (the caller's ``extra`` keys win)."""
    config = {"PERFORMANCE_HINT": performance_hint.upper()}
    if precision in INFERENCE_PRECISION:
        config["INFERENCE_PRECISION_HINT"] = INFERENCE_PRECISION[precision]
    if num_threads is not None:
        config["INFERENCE_NUM_THREADS"] = str(int(num_threads))
    if cache_dir is not None:
        config["CACHE_DIR"] = str(cache_dir)
    config.update({k: str(v) for k, v in (extra or {}).items()})
    return config


def reason(error: BaseException) -> str:
    """The lines of an OpenVINO exception that say what failed (op summary, failing node), not its trace."""
    lines = [x.strip() for x in str(error).splitlines() if x.strip()]
    key = [x for x in lines if x.startswith(("-- ", "[CPU]")) or "conversion rule" in x]
    return " ".join(key or lines[-1:]) or repr(error)


def take_else_branches(model: Any) -> int:
    """Fix every ``If`` of ``model`` to its else branch; returns how many there were.

    The only Ifs in our graphs are M3's flash switches (bgert.export.m3_spec): "no padding in this
    batch" → attention without a mask (ORT's flash kernel), else the masked attention, which is right for
    every batch. OpenVINO 2026.4 returned NaN or wrong vectors now and then from the switched graph
    (never from either branch alone), so the condition becomes a constant False and OpenVINO's own
    UnrollIf pass inlines the masked branch.
    """
    import openvino as ov
    from openvino import opset13

    n = 0
    for node in model.get_ordered_ops():
        if node.get_type_name() == "If":
            node.input(0).replace_source_output(opset13.constant(False, dtype=ov.Type.boolean).output(0))
            n += 1
    if n:
        model.validate_nodes_and_infer_types()
    return n


class OpenVinoBackend:
    """One compiled OpenVINO model; ``run`` is thread-safe (one infer request per calling thread)."""

    def __init__(self, path: str, precision: str, *, num_threads: int | None = None,
                 performance_hint: str = "latency", openvino_cache_dir: str | None = None,
                 openvino_config: Mapping[str, Any] | None = None):
        try:
            import openvino as ov
        except ImportError as e:
            raise OpenVinoError(f"backend='openvino' needs the openvino package: {_INSTALL}") from e
        self.config = compile_config(precision, num_threads, performance_hint, openvino_cache_dir, openvino_config)
        core = ov.Core()
        try:
            model = core.read_model(path)
            self.if_nodes_unrolled = take_else_branches(model)
            self.compiled = core.compile_model(model, "CPU", self.config)
        except Exception as e:  # OpenVINO raises RuntimeError/OpConversionFailure with long traces
            raise OpenVinoError(f"OpenVINO {ov.get_version()} cannot compile {path}: {reason(e)}. Run this graph "
                                "with backend='ort'.") from e
        self.path = path
        self.input_names = [i.get_any_name() for i in self.compiled.inputs]
        self.output_names = [o.get_any_name() for o in self.compiled.outputs]
        self._ports = {n: o for o in self.compiled.outputs for n in o.get_names()}
        self._local = threading.local()

    def run(self, feeds: dict[str, np.ndarray], output_names: Sequence[str]) -> list[np.ndarray]:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        try:
            result = request.infer({k: feeds[k] for k in self.input_names})
        except RuntimeError as e:  # e.g. a shape OpenVINO's CPU plugin cannot infer for this batch
            shape = "x".join(map(str, feeds["input_ids"].shape)) if "input_ids" in feeds else "?"
            raise OpenVinoError(f"OpenVINO cannot run {self.path} on a batch of shape {shape}: {reason(e)}. Run this "
                                "graph with backend='ort'.") from e
        try:
            return [np.array(result[self._ports[n]]) for n in output_names]
        except KeyError as e:
            raise OpenVinoError(f"the graph has no output {e.args[0]!r}; it has {', '.join(self.output_names)}") from e

