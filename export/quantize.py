"""INT8 graph transforms: activation statistics, smoothing, sensitive-node choice, ORT quantizers, emulation.

The recipe behind the ``int8`` variants (bgert.export.precision):

1. run the fp32 graph on calibration text and keep, for every quantizable node (MatMul with a
   constant 2-D weight, fused Attention), per-channel absmax of its activation input and a sample of rows;
2. per activation, choose a SmoothQuant factor ``s`` (alpha from a small grid, or none) that minimises
   the node's own output error under int8 (computed in numpy on the sampled rows), then insert
   ``x * (1/s)`` and scale the weight rows by ``s``: the fp32 function is unchanged;
3. keep the nodes whose int8 error stays largest in fp32 (a fraction of all, an option);
4. quantize with onnxruntime: dynamic (per-channel signed weights, u8 activations per tensor) or
   static QDQ (calibrated activation ranges, MatMul outputs not re-quantized).

``exact_int8_graph`` rebuilds a quantized graph as fp32 arithmetic on the dequantized weights and
fake-quantized activations: that is what a CPU whose u8×s8 dot products do not saturate (VNNI,
AMX, ARM dot products) computes, so a variant's quality can be measured for such machines on any host.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

log = logging.getLogger("bgert.export")


@contextlib.contextmanager
def _quiet_root() -> Iterator[None]:
    """onnxruntime.quantization logs advice on the root logger ("consider pre-processing"…): mute it."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)

#: SmoothQuant migration strengths tried per activation (None: no smoothing)
ALPHAS: tuple[float | None, ...] = (None, 0.4, 0.55, 0.7, 0.85)
#: rows of each activation kept for the numpy error estimates (fewer for very wide models)
SAMPLE_ROWS = 256
SAMPLE_BYTES = 256 * 2**20
#: weight range of QInt8 per-channel symmetric weights: full, and reduce_range (7 bits)
QMAX_FULL, QMAX_REDUCED = 127, 64


@dataclass
class Target:
    """A quantizable node: its name, activation input and constant weight [K, N]."""

    node: str
    act: str
    weight: str


@dataclass
class ActStats:
    """Per-activation statistics from the calibration run (real tokens only)."""

    absmax: dict[str, np.ndarray] = field(default_factory=dict)
    lo: dict[str, float] = field(default_factory=dict)
    hi: dict[str, float] = field(default_factory=dict)
    rows: dict[str, np.ndarray] = field(default_factory=dict)
    values: dict[str, list[np.ndarray]] = field(default_factory=dict)


def _initializers(model: Any) -> dict[str, Any]:
    return {i.name: i for i in model.graph.initializer}


def targets(model: Any) -> list[Target]:
    """MatMul nodes with a constant 2-D weight and fused Attention nodes (their QKV weight), in graph order."""
    inits = _initializers(model)
    out = []
    for n in model.graph.node:
        if n.domain in ("", "ai.onnx") and n.op_type == "MatMul" and n.input[1] in inits \
                and len(inits[n.input[1]].dims) == 2:
            out.append(Target(n.name, n.input[0], n.input[1]))
        elif n.domain == "com.microsoft" and n.op_type == "Attention" and n.input[1] in inits:
            out.append(Target(n.name, n.input[0], n.input[1]))
    if len({t.node for t in out}) != len(out):
        raise ValueError("quantizable nodes must have unique names")
    return out


def load(path: str) -> Any:
    import onnx

    return onnx.load(path)


def save(model: Any, path: str) -> str:
    """Save a graph, with its weights as external data when protobuf's 2 GB limit requires it."""
    import onnx

    from .onnx_io import EXTERNAL_DATA_THRESHOLD

    big = model.ByteSize() > EXTERNAL_DATA_THRESHOLD if _all_inline(model) else True
    onnx.save(model, path, save_as_external_data=big, location=os.path.basename(path) + ".data" if big else None)
    return path


def _all_inline(model: Any) -> bool:
    return not any(i.data_location == 1 for i in model.graph.initializer)  # onnx.TensorProto.EXTERNAL


def activation_stats(path: str, tgts: Sequence[Target], feeds: Iterable[tuple[dict[str, np.ndarray], np.ndarray]],
                     keep_values: bool = False, seed: int = 0) -> ActStats:
    """Run the fp32 graph at ``path`` on ``feeds`` ((inputs, attention_mask) pairs) and collect, per
    activation, per-channel absmax, min/max and a random sample of rows over real (unmasked) tokens.

    ``keep_values`` also keeps every real-token value (for percentile calibration).
    onnxruntime.quantization's calibrators are not used: they reduce over padded positions too (on the
    tiny BGE their MinMax ranges came out wider on 6 of 6 MatMul inputs) and give no per-channel
    statistics or rows, which the smoothing and the fp32-node plan need.
    """
    import onnx
    import onnxruntime as ort

    model = load(path)
    acts = list(dict.fromkeys(t.act for t in tgts))
    have = {o.name for o in model.graph.output}
    for a in acts:
        if a not in have:
            model.graph.output.append(onnx.helper.make_tensor_value_info(a, onnx.TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.log_severity_level = 3
    work = path + ".stats.onnx"
    try:
        save(model, work)
        sess = ort.InferenceSession(work, so, providers=["CPUExecutionProvider"])
    finally:
        for f in (work, work + ".data"):
            if os.path.exists(f):
                os.remove(f)
    inputs = {i.name for i in sess.get_inputs()}
    stats = ActStats()
    chunks: dict[str, list[np.ndarray]] = {a: [] for a in acts}
    rng = np.random.default_rng(seed)
    batches = list(feeds)
    widths: dict[str, int] = {}
    for feed, mask in batches:
        outs = sess.run(acts, {k: v for k, v in feed.items() if k in inputs})
        real = mask.astype(bool).reshape(-1)
        for a, o in zip(acts, outs):
            widths[a] = o.shape[-1]
            x = o.reshape(-1, o.shape[-1])
            if x.shape[0] == real.shape[0]:
                x = x[real]
            if not x.size:
                continue
            m = np.abs(x).max(0)
            stats.absmax[a] = m if a not in stats.absmax else np.maximum(stats.absmax[a], m)
            stats.lo[a] = min(stats.lo.get(a, 0.0), float(x.min()))
            stats.hi[a] = max(stats.hi.get(a, 0.0), float(x.max()))
            chunks[a].append(x)
            if keep_values:
                stats.values.setdefault(a, []).append(x.ravel())
    total_width = max(sum(widths.values()), 1)
    rows = int(min(SAMPLE_ROWS, max(64, SAMPLE_BYTES // (4 * total_width))))
    for a, xs in chunks.items():
        if xs:
            x = np.concatenate(xs)
            stats.rows[a] = x[rng.choice(len(x), size=min(rows, len(x)), replace=False)]
    return stats


def fake_quant_act(x: np.ndarray) -> np.ndarray:
    """Dynamic per-tensor asymmetric uint8 (ORT's DynamicQuantizeLinear), back to float."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = (hi - lo) / 255.0 or 1.0
    zp = np.clip(np.round(-lo / scale), 0, 255)
    return (np.clip(np.round(x / scale) + zp, 0, 255) - zp) * scale


def fake_quant_weight(w: np.ndarray, qmax: int) -> np.ndarray:
    """Per-output-channel symmetric int8 weights (columns of [K, N]), back to float."""
    scale = np.abs(w).max(0) / qmax
    scale[scale == 0] = 1.0
    return np.clip(np.round(w / scale), -qmax, qmax) * scale


def node_error(x: np.ndarray, w: np.ndarray, y: np.ndarray, qmax: int, s: np.ndarray | None = None) -> float:
    """Relative Frobenius error of ``y = x @ w`` under int8 (with smoothing factor ``s`` when given)."""
    if s is not None:
        x, w = x / s, w * s[:, None]
    yq = fake_quant_act(x) @ fake_quant_weight(w, qmax)
    return float(np.linalg.norm(yq - y) / max(np.linalg.norm(y), 1e-12))


def smoothing_factor(absmax: np.ndarray, weights: Sequence[np.ndarray], alpha: float) -> np.ndarray:
    """SmoothQuant's s_j = max|x_j|^alpha / max|w_j|^(1-alpha), clipped to a sane range."""
    wmax = np.max([np.abs(w).max(1) for w in weights], axis=0)
    s = np.maximum(absmax, 1e-5) ** alpha / np.maximum(wmax, 1e-5) ** (1 - alpha)
    return np.clip(s, 1e-2, 1e2).astype(np.float32)


@dataclass
class Plan:
    """What a recipe decided for one graph: smoothing per activation, nodes kept in fp32, errors."""

    smooth: dict[str, np.ndarray]
    alphas: dict[str, float | None]
    excluded: list[str]
    errors: dict[str, float]

    def summary(self) -> dict[str, Any]:
        return {"smoothed_activations": sum(a is not None for a in self.alphas.values()),
                "alphas": sorted({a for a in self.alphas.values() if a is not None}),
                "fp32_nodes": list(self.excluded), "quantized_nodes": len(self.errors) - len(self.excluded)}


def plan(model: Any, tgts: Sequence[Target], stats: ActStats, qmax: int, smooth: str | float | None = "auto",
         fp32_nodes: float = 0.25) -> Plan:
    """Choose smoothing per activation and the nodes to keep in fp32 from the int8 error estimates.

    ``smooth``: "auto" (best alpha of ALPHAS per activation), a fixed alpha, or None (no smoothing).
    ``fp32_nodes``: a fraction (< 1) or a count of the quantizable nodes kept in fp32, largest error first.
    """
    from onnx import numpy_helper

    inits = _initializers(model)
    weights = {t.weight: numpy_helper.to_array(inits[t.weight]).astype(np.float32) for t in tgts}
    groups: dict[str, list[Target]] = {}
    for t in tgts:
        groups.setdefault(t.act, []).append(t)
    if smooth == "auto":
        alphas: tuple[float | None, ...] = ALPHAS
    elif smooth in (None, 0, 0.0, "none"):
        alphas = (None,)
    else:
        alphas = (float(smooth),)
    chosen_s: dict[str, np.ndarray] = {}
    chosen_a: dict[str, float | None] = {}
    errors: dict[str, float] = {}
    for act, users in groups.items():
        x = stats.rows.get(act)
        if x is None:  # never reached by calibration text: plain quantization, largest-error candidate
            chosen_a[act] = None
            errors.update({t.node: float("inf") for t in users})
            continue
        ws = [weights[t.weight] for t in users]
        ys = [x @ w for w in ws]
        best: tuple[float, float | None, np.ndarray | None, list[float]] | None = None
        for a in alphas:
            s = None if a is None else smoothing_factor(stats.absmax[act], ws, a)
            errs = [node_error(x, w, y, qmax, s) for w, y in zip(ws, ys)]
            if best is None or sum(errs) < best[0]:
                best = (sum(errs), a, s, errs)
        assert best is not None
        _, a, s, errs = best
        chosen_a[act] = a
        if s is not None:
            chosen_s[act] = s
        errors.update({t.node: e for t, e in zip(users, errs)})
    k = int(round(fp32_nodes * len(tgts))) if fp32_nodes < 1 else int(fp32_nodes)
    excluded = sorted(errors, key=lambda n: -errors[n])[:max(0, min(k, len(tgts)))]
    kept = set(excluded)
    for act, users in groups.items():
        if act in chosen_s and all(t.node in kept for t in users):
            del chosen_s[act]  # every user stays fp32: smoothing would only add a Mul at run time
            chosen_a[act] = None
    return Plan(chosen_s, chosen_a, excluded, errors)


def apply_smoothing(model: Any, tgts: Sequence[Target], smooth: dict[str, np.ndarray]) -> Any:
    """Insert ``x * (1/s)`` before the users of each smoothed activation and scale their weight rows by s."""
    from onnx import helper, numpy_helper

    inits = _initializers(model)
    nodes = {n.name: n for n in model.graph.node}
    for act, s in smooth.items():
        users = [t for t in tgts if t.act == act]
        for t in users:
            w = numpy_helper.to_array(inits[t.weight])
            inits[t.weight].CopyFrom(numpy_helper.from_array((w * s[:, None]).astype(np.float32), t.weight))
        inv, out = f"{act}_bgert_smooth_inv", f"{act}_bgert_smoothed"
        model.graph.initializer.append(numpy_helper.from_array((1.0 / s).astype(np.float32), inv))
        mul = helper.make_node("Mul", [act, inv], [out], name=f"{act}_bgert_smooth")
        order = list(model.graph.node)
        first = min(order.index(nodes[t.node]) for t in users)
        for t in users:
            nodes[t.node].input[0] = out
        model.graph.node.insert(first, mul)
    return model


def add_float_value_info(model: Any, tgts: Sequence[Target]) -> Any:
    """Declare the activation inputs as float: ORT's quantizers skip tensors whose type they cannot infer
    (shape inference does not know the fused contrib ops)."""
    from onnx import TensorProto, helper

    known = {v.name for v in model.graph.value_info}
    for t in tgts:
        if t.act not in known:
            model.graph.value_info.append(helper.make_tensor_value_info(t.act, TensorProto.FLOAT, None))
            known.add(t.act)
    return model


def quantize_dynamic(pre: str, out: str, tgts: Sequence[Target], excluded: Sequence[str], reduce_range: bool) -> None:
    """ORT dynamic quantization: per-channel QInt8 weights, u8 activations quantized per tensor at run time."""
    import onnx
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic

    with _quiet_root():
        ort_quantize_dynamic(pre, out, op_types_to_quantize=["MatMul", "Attention"],
                             nodes_to_quantize=[t.node for t in tgts if t.node not in set(excluded)],
                             per_channel=True, reduce_range=reduce_range, weight_type=QuantType.QInt8,
                             use_external_data_format=not _all_inline(load(pre)),
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT, "MatMulConstBOnly": True})


def activation_ranges(stats: ActStats, acts: Iterable[str], method: str, percentile: float) -> dict[str, tuple]:
    """Calibrated (lo, hi) per activation: min/max, or the given percentile of |x| (clipping rare outliers)."""
    out = {}
    for a in acts:
        if a not in stats.lo:
            continue
        lo, hi = stats.lo[a], stats.hi[a]
        if method == "percentile":
            v = np.concatenate(stats.values[a])
            lo = min(float(np.percentile(v, 100 - percentile)), 0.0)
            hi = max(float(np.percentile(v, percentile)), 0.0)
        elif method != "minmax":
            raise ValueError(f"calibration method must be 'minmax' or 'percentile', got {method!r}")
        out[a] = (np.array(lo, dtype=np.float32), np.array(hi, dtype=np.float32))
    return out


def quantize_static(pre_model: Any, out: str, tgts: Sequence[Target], excluded: Sequence[str],
                    ranges: dict[str, tuple], reduce_range: bool, symmetric_activations: bool) -> None:
    """ORT static QDQ of the MatMuls with our calibrated ranges; MatMul outputs stay float (re-quantizing
    them cost most of the quality in our measurements). Fused Attention nodes stay float: ORT has no
    QDQ form for them."""
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorsData
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer

    model = add_float_value_info(pre_model, tgts)
    nodes = [t.node for t in tgts if t.node not in set(excluded) and t.act in ranges
             and any(n.name == t.node and n.op_type == "MatMul" for n in model.graph.node)]
    if symmetric_activations:
        ranges = {k: (-np.maximum(-lo, hi), np.maximum(-lo, hi)) for k, (lo, hi) in ranges.items()}
    q = QDQQuantizer(model, True, reduce_range, QuantType.QInt8,
                     QuantType.QInt8 if symmetric_activations else QuantType.QUInt8,
                     TensorsData(CalibrationMethod.MinMax, ranges), nodes, None, ["MatMul"],
                     {"OpTypesToExcludeOutputQuantization": ["MatMul"], "MatMulConstBOnly": True,
                      "ActivationSymmetric": symmetric_activations})
    with _quiet_root():
        save(q.quantize_model(), out)


def exact_int8_graph(pre: Any, quantized: Any, tgts: Sequence[Target]) -> Any | None:
    """The fp32 ``pre`` graph with the dynamic-quantized graph's weights (dequantized) and fake dynamic
    activation quantization: exact integer arithmetic, as on a CPU whose dot products do not saturate.

    Returns None when the quantized graph's weight names are not the ones onnxruntime's quantizer
    writes (``W_quantized``, ``W_scale``, ``W_zero_point``).
    """
    from onnx import helper, numpy_helper

    q = {i.name: i for i in quantized.graph.initializer}
    inits = _initializers(pre)
    nodes = {n.name: n for n in pre.graph.node}
    done = 0
    for t in tgts:
        if t.weight + "_quantized" not in q:
            continue
        wq = numpy_helper.to_array(q[t.weight + "_quantized"]).astype(np.float32)
        scale = numpy_helper.to_array(q[t.weight + "_scale"]).astype(np.float32)
        zp = numpy_helper.to_array(q[t.weight + "_zero_point"]).astype(np.float32)
        inits[t.weight].CopyFrom(numpy_helper.from_array(((wq - zp) * scale).astype(np.float32), t.weight))
        n = nodes[t.node]
        y, ys, yz, xd = (f"{n.input[0]}_{t.node}_bgert_fq{i}" for i in range(4))
        at = list(pre.graph.node).index(n)
        pre.graph.node.insert(at, helper.make_node("DequantizeLinear", [y, ys, yz], [xd]))
        pre.graph.node.insert(at, helper.make_node("DynamicQuantizeLinear", [n.input[0]], [y, ys, yz]))
        n.input[0] = xd
        done += 1
    integer_ops = sum(n.op_type in ("MatMulInteger", "QAttention", "DynamicQuantizeMatMul")
                      for n in quantized.graph.node)
    return pre if done and done == integer_ops else None
