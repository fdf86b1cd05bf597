"""Tracing a torch module to ONNX and running ORT's transformer optimizer on the result."""
from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import warnings
from typing import Any

import torch

log = logging.getLogger("bgert.export")

DEFAULT_OPSET = 17
#: protobuf cannot hold more than 2 GB: bigger graphs keep their weights in external data
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def export_onnx(module: torch.nn.Module, sample: dict[str, torch.Tensor], path: str,
                inputs: dict[str, dict[int, str]], outputs: dict[str, dict[int, str]],
                opset: int = DEFAULT_OPSET) -> None:
    """torch.onnx.export (TorchScript tracer) with named, dynamic batch/sequence axes.

    Weights above EXTERNAL_DATA_THRESHOLD go to one ``<file>.data`` beside the graph. The tracer
    ignores ``external_data`` and, past 2 GB, writes one file per tensor, named so that two graphs
    of one artifact (layerwise cutoffs) would overwrite each other's; so it writes into a scratch
    directory and the graph is re-saved from there.
    """
    axes = {**{k: v for k, v in inputs.items() if k in sample}, **outputs}
    args = tuple(sample[k] for k in inputs if k in sample)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(path) or None) as scratch:
        traced = os.path.join(scratch, "model.onnx")
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(module, args, traced, input_names=[k for k in inputs if k in sample],
                              output_names=list(outputs), dynamic_axes=axes, opset_version=opset,
                              do_constant_folding=True, dynamo=False)
        if param_bytes(module) > EXTERNAL_DATA_THRESHOLD or len(os.listdir(scratch)) > 1:
            import onnx

            onnx.save_model(onnx.load(traced), path, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=os.path.basename(path) + ".data")
        else:
            os.replace(traced, path)


def fuse(path: str, model_type: Any, num_heads: int = 0, hidden_size: int = 0) -> Any:
    """ORT transformer fusions on the graph at ``path``: an ``onnxruntime.transformers`` OnnxModel with
    the fusions applied (the file is not changed).

    ``model_type`` is one of ORT's model types ("bert", …), or a family's own OnnxModel subclass
    (BGE-M3's), which runs the way ORT runs its own classes (optimize_by_fusion), without adding it
    to ORT's global table. The fused graph stays portable (opt_level 0: no provider-specific nodes).
    """
    import onnx
    from onnxruntime.transformers.optimizer import optimize_model

    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()):
        if isinstance(model_type, str):
            return optimize_model(path, model_type=model_type, num_heads=num_heads, hidden_size=hidden_size,
                                  opt_level=0)
        opt = model_type(onnx.load(path), num_heads, hidden_size)
        opt.optimize()
        opt.topological_sort()
        opt.model.producer_name = "onnxruntime.transformers"
        return opt


def fusion_name(model_type: Any) -> str | None:
    """How the manifest names ``model_type``: ORT's name, or the class's ``model_type`` attribute."""
    return model_type if model_type is None or isinstance(model_type, str) else model_type.model_type


def optimize(path: str, model_type: Any, num_heads: int = 0, hidden_size: int = 0) -> dict[str, Any]:
    """Fuse attention / LayerNorm / GELU with onnxruntime.transformers (in place, see ``fuse``).

    ORT applies its own session-level optimisations when the runtime loads the graph. Returns the
    fused-op counts.
    """
    if model_type is None:
        return {}
    import onnx

    opt = fuse(path, model_type, num_heads, hidden_size)
    stats = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
    unfused = unfuse_skip_layer_norm(opt.model)
    if unfused:
        stats["SkipLayerNormalization"] = stats.get("SkipLayerNormalization", 0) - unfused
        stats["LayerNormalization (from SkipLayerNormalization)"] = unfused
        stats = {k: v for k, v in stats.items() if v}
    external = os.path.getsize(path) > EXTERNAL_DATA_THRESHOLD or any(
        f.endswith(".data") for f in os.listdir(os.path.dirname(path) or "."))
    opt.save_model_to_file(path, use_external_data_format=external)
    onnx.checker.check_model(path)
    return stats


def unfuse_skip_layer_norm(model: Any) -> int:
    """Replace every com.microsoft SkipLayerNormalization of ``model`` by Add (input + bias) + Add (+ skip) +
    LayerNormalization, in place; returns how many were replaced.

    ORT 1.32's CPU SkipLayerNormalization kernel takes 1.4-2x as long as Add + Add + LayerNormalization on
    [32, 256, 384] (benchmarks/results/cpu_profile_*.md). The runtime's CPU sessions keep ORT from fusing it back
    (bgert.runtime.ort_backend); on CUDA ORT's own SkipLayerNormFusion fuses it again at session start, and
    TensorRT runs LayerNormalization natively, so every graph gets this form.
    Needs opset 17 (LayerNormalization); an optional mean / inverse-std output that something reads is left
    fused.
    """
    from onnx import helper

    if next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0) < 17:
        return 0
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    out, n_done = [], 0
    for n in model.graph.node:
        if n.domain != "com.microsoft" or n.op_type != "SkipLayerNormalization" or len(n.input) < 3 or any(
                o in used for o in list(n.output)[1:3] if o):
            out.append(n)
            continue
        eps = next((a.f for a in n.attribute if a.name == "epsilon"), 1e-12)
        x, skip, gamma = n.input[0], n.input[1], n.input[2]
        beta = n.input[3] if len(n.input) > 3 and n.input[3] else ""
        bias = n.input[4] if len(n.input) > 4 and n.input[4] else ""
        total = n.output[3] if len(n.output) > 3 and n.output[3] else f"{n.name}_bgert_sum"
        if bias:
            out.append(helper.make_node("Add", [x, bias], [f"{n.name}_bgert_biased"], name=f"{n.name}_bgert_bias"))
            x = f"{n.name}_bgert_biased"
        out.append(helper.make_node("Add", [x, skip], [total], name=f"{n.name}_bgert_skip"))
        out.append(helper.make_node("LayerNormalization", [total, gamma] + ([beta] if beta else []), [n.output[0]],
                                    name=f"{n.name}_bgert_ln", axis=-1, epsilon=eps))
        n_done += 1
    del model.graph.node[:]
    model.graph.node.extend(out)
    return n_done
