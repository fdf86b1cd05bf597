"""IO-binding backend: inputs and outputs live in buffers allocated once per padded length.

Plain ``session.run`` allocates every output anew and, on a GPU, copies it back through a
temporary. ``IoBindingBackend`` instead keeps, per bucket length L, one set of buffers on the
provider's device sized for the most rows a batch of L holds (from ``bucket_shapes``):

- inputs are copied host → device into the same buffers each call (one copy per input, at most
  the token budget's worth of ids);
- outputs are written by ORT straight into pre-allocated device buffers, bound by address;
  ``run`` copies only the rows in use back to numpy, ``run_device`` hands them to torch or CuPy
  via DLPack without leaving the device (a copy on the device, since the buffers are reused);
- a batch of n rows binds the first n rows of the buffers, so no shape allocates twice.

CUDA graphs (``cuda_graph=True``, the CUDA EP option ``enable_cuda_graph``) replay a captured
run with one launch instead of one per kernel. ORT's constraints, which this backend meets:
every node must run on the CUDA EP (ORT refuses the session otherwise: CPU-placed shape nodes,
control flow and some contrib ops rule it out); inputs and outputs must be bound to device
memory whose address and shape never change for a captured graph; each distinct shape needs
its own graph (ORT >= 1.17 run option ``gpu_graph_id``). So, in graph mode, row counts are
rounded up to powers of two (padding rows repeat the last real row and are dropped), each
(length, rows, outputs) gets a graph id, and the first call of each runs uncaptured to learn
the output shapes. A graph's memory stays with the session: about log2(max rows) graphs per
bucket length. Works on the CPU EP too (minus CUDA graphs), which is how it is tested.
"""
from __future__ import annotations

import importlib
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import onnxruntime as ort

from .backends import ORT_NUMPY_TYPES, OrtBackend
from .providers import GPU_PROVIDERS, ProviderError, ProviderSpec

log = logging.getLogger("bgert")

#: the run option naming a captured CUDA graph; -1 runs without capturing or replaying
GRAPH_ID_KEY = "gpu_graph_id"
SKIP_GRAPH = -1


def bucket_shapes(buckets: Sequence[int], token_budget: int, batch_size: int) -> dict[int, int]:
    """{padded length: most rows a batch of that length holds}, as bgert.runtime.batching cuts them."""
    return {int(b): max(1, min(int(batch_size), int(token_budget) // int(b))) for b in buckets}


def next_power_of_two(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def graph_run_options(graph_id: int) -> ort.RunOptions:
    """RunOptions that select (or capture) the CUDA graph ``graph_id``."""
    ro = ort.RunOptions()
    ro.add_run_config_entry(GRAPH_ID_KEY, str(graph_id))
    return ro


@dataclass
class _Slot:
    """Buffers for one padded length: inputs (+ host staging) and outputs, ``rows`` rows each."""

    rows: int
    generation: int
    inputs: dict[str, ort.OrtValue] = field(default_factory=dict)
    staging: dict[str, np.ndarray] = field(default_factory=dict)
    outputs: dict[str, tuple[ort.OrtValue, type]] = field(default_factory=dict)  # buffer, numpy dtype


class IoBindingBackend(OrtBackend):
    """An ORT session run through IO binding with reused per-bucket buffers (see the module doc).

    Same interface as OrtBackend (``input_names``, ``run(feeds, output_names)``), plus
    ``run_device`` for outputs that stay on the device. Inputs must be [batch, length] arrays.
    Calls are serialised by a lock: the buffers and the binding are shared.
    """

    def __init__(self, path: str, providers: Sequence[ProviderSpec], options: ort.SessionOptions, *,
                 shapes: Mapping[int, int] | None = None, cuda_graph: bool = False,
                 fixed_shapes: bool | None = None, device_id: int = 0, disabled_optimizers: Sequence[str] = ()):
        #: pad rows to powers of two and give each shape a graph id (what CUDA graphs need)
        self.fixed_shapes = cuda_graph if fixed_shapes is None else bool(fixed_shapes)
        if cuda_graph and not self.fixed_shapes:
            raise ValueError("cuda_graph=True needs fixed_shapes (one captured graph per shape)")
        try:
            super().__init__(path, providers, options, disabled_optimizers=disabled_optimizers)
        except RuntimeError as e:
            if cuda_graph and "graph capture" in str(e):
                raise ProviderError(f"onnxruntime refused CUDA graphs for {path}: every node must run on the CUDA "
                                    f"provider (no CPU-placed nodes, no control flow). Use cuda_graph=False. "
                                    f"({e})") from e
            raise
        self.device = "cuda" if any(p in GPU_PROVIDERS for p in self.providers) else "cpu"
        if cuda_graph and self.device != "cuda":
            raise ProviderError(f"CUDA graphs need the CUDA provider; this session runs on {self.providers}")
        self.device_id = int(device_id)
        self.cuda_graph = cuda_graph
        self._hint = {int(k): (next_power_of_two(v) if self.fixed_shapes else int(v))
                      for k, v in (shapes or {}).items()}
        self._slots: dict[int, _Slot] = {}
        self._graph_ids: dict[tuple, int] = {}
        self._run_options: dict[int, ort.RunOptions] = {SKIP_GRAPH: graph_run_options(SKIP_GRAPH)}
        self._binding = self.session.io_binding()
        self._lock = threading.Lock()

    # ---- public -----------------------------------------------------------------------------
    @property
    def buffers(self) -> dict[int, int]:
        """{padded length: rows its buffers hold} for the lengths seen so far."""
        return {length: slot.rows for length, slot in self._slots.items()}

    @property
    def graph_ids(self) -> dict[tuple, int]:
        """{(length, rows, output names, generation): CUDA graph id} (empty without fixed shapes)."""
        return dict(self._graph_ids)

    def run(self, feeds: dict[str, np.ndarray], output_names: Sequence[str]) -> list[np.ndarray]:
        with self._lock:
            n, values = self._execute(feeds, output_names)
            if self.device == "cpu":  # numpy() of a CPU OrtValue is a view of a reused buffer
                return [np.array(v.numpy()[:n]) for v in values]
            return [v.numpy()[:n] for v in values]

    def run_device(self, feeds: dict[str, np.ndarray], output_names: Sequence[str], like: str = "torch") -> list[Any]:
        """Run and return the outputs as device arrays of the library ``like`` (torch, cupy, numpy).

        They are copies on the device (torch ``clone``/CuPy ``copy``) made through DLPack, so
        they stay valid after the next call reuses the buffers.
        """
        try:
            lib = importlib.import_module(like)
        except ImportError as e:
            raise ImportError(f"device-resident outputs as {like!r} arrays need {like} installed") from e
        if not hasattr(lib, "from_dlpack"):
            raise ValueError(f"{like!r} has no from_dlpack; use 'torch', 'cupy' or 'numpy'")
        with self._lock:
            n, values = self._execute(feeds, output_names)
            out = []
            for v in values:
                if not hasattr(v, "__dlpack__"):
                    raise RuntimeError(f"this onnxruntime ({ort.__version__}) cannot export OrtValues via DLPack; "
                                       "upgrade onnxruntime or use run()")
                arr = lib.from_dlpack(v)[:n]
                out.append(arr.clone() if hasattr(arr, "clone") else arr.copy())
            return out

    # ---- internals ----------------------------------------------------------------------------
    def _execute(self, feeds: dict[str, np.ndarray], output_names: Sequence[str]) -> tuple[int, list[ort.OrtValue]]:
        """Copy ``feeds`` into the buffers of their length, run, and return (n, bound output values)."""
        arrays = {name: np.ascontiguousarray(feeds[name]) for name in self.input_names}
        first = arrays[self.input_names[0]]
        if first.ndim != 2 or any(a.shape != first.shape for a in arrays.values()):
            raise ValueError(f"the IO-binding backend takes [batch, length] inputs of one shape, got "
                             f"{ {k: a.shape for k, a in arrays.items()} }; use io_binding=False")
        n, length = first.shape
        rows = next_power_of_two(n) if self.fixed_shapes else n
        slot = self._slot(length, rows, arrays)
        binding = self._binding
        for name, arr in arrays.items():
            staging = slot.staging[name]
            staging[:n] = arr
            staging[n:rows] = arr[n - 1]  # padding rows (fixed shapes) repeat the last real row
            slot.inputs[name].update_inplace(staging)
            binding.bind_input(name, self.device, self.device_id, staging.dtype, [rows, length],
                               slot.inputs[name].data_ptr())
        binding.clear_binding_outputs()
        missing = [o for o in output_names if o not in slot.outputs]
        for name in output_names:
            if name in missing:
                binding.bind_output(name, self.device, self.device_id)  # ORT allocates: shape still unknown
            else:
                buf, dtype = slot.outputs[name]
                binding.bind_output(name, self.device, self.device_id, dtype, [rows, *buf.shape()[1:]],
                                    buf.data_ptr())
        if self.device == "cuda":
            binding.synchronize_inputs()  # update_inplace's pageable copies must land before the kernels
        if self.fixed_shapes:
            graph_id = SKIP_GRAPH if missing else self._graph_id((length, rows, tuple(output_names), slot.generation))
            self.session.run_with_iobinding(binding, self._run_options[graph_id])
        else:
            self.session.run_with_iobinding(binding)
        values = binding.get_outputs()
        for name, value in zip(output_names, values):
            if name in missing:
                slot.outputs[name] = self._allocate_output(name, value, rows, slot.rows)
        return n, values

    def _slot(self, length: int, rows: int, arrays: dict[str, np.ndarray]) -> _Slot:
        """The buffers for ``length``, (re)allocated when absent, too small, or of another dtype."""
        slot = self._slots.get(length)
        if slot is not None and slot.rows >= rows and all(slot.staging[k].dtype == a.dtype for k, a in arrays.items()):
            return slot
        generation = 0
        capacity = max(rows, self._hint.get(length, 0))
        if slot is not None:
            generation, capacity = slot.generation + 1, max(capacity, 2 * slot.rows)
            log.info("bgert: IO-binding buffers for length %d grow to %d rows%s", length, capacity,
                     " (CUDA graphs of this length are captured again)" if self.fixed_shapes else "")
        slot = _Slot(rows=capacity, generation=generation)
        for name, arr in arrays.items():
            slot.staging[name] = np.zeros((capacity, length), dtype=arr.dtype)
            slot.inputs[name] = ort.OrtValue.ortvalue_from_shape_and_type([capacity, length], arr.dtype,
                                                                          self.device, self.device_id)
        self._slots[length] = slot
        return slot

    def _allocate_output(self, name: str, value: ort.OrtValue, rows: int,
                         capacity: int) -> tuple[ort.OrtValue, type]:
        shape, dtype = list(value.shape()), ORT_NUMPY_TYPES.get(value.data_type())
        if not shape or shape[0] != rows or dtype is None:
            raise ValueError(f"output {name!r} is a {value.data_type()} of shape {shape}; the IO-binding backend "
                             "needs batch-first numeric outputs. Use io_binding=False.")
        buf = ort.OrtValue.ortvalue_from_shape_and_type([capacity, *shape[1:]], dtype, self.device, self.device_id)
        return buf, dtype

    def _graph_id(self, key: tuple) -> int:
        gid = self._graph_ids.get(key)
        if gid is None:
            gid = self._graph_ids[key] = len(self._graph_ids) + 1
            self._run_options[gid] = graph_run_options(gid)
        return gid
