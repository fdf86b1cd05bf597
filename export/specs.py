"""Per-family export specs: one small declarative class per model kind.

A spec names the graph's inputs, outputs and dynamic axes (like Optimum's OnnxConfig), builds
the torch wrapper module whose graph already does pooling, normalisation and heads, lists the
graphs to write (one, or one per layerwise cutoff), adds its family's manifest fields, and
measures parity of the exported artifact against the PyTorch model. The exporter core
(bgert.export.exporter) only calls these members, so a new family is a new spec module plus
one line in ``SPEC_MODULES``.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .detect import ModelInfo

BATCH_SEQ = {0: "batch", 1: "sequence"}


@dataclass
class GraphPlan:
    """One graph to export: its file name, the module to trace and manifest fields for it."""

    file: str
    module: Any
    fields: dict[str, Any] = field(default_factory=dict)
    output_names: list[str] | None = None


class ExportSpec:
    """Base spec. Subclasses set the class attributes and implement the three methods."""

    kind: ClassVar[str] = ""
    inputs: ClassVar[dict[str, dict[int, str]]] = {"input_ids": BATCH_SEQ, "attention_mask": BATCH_SEQ}
    outputs: ClassVar[dict[str, dict[int, str]]] = {}
    #: model_type for onnxruntime.transformers.optimizer (None: skip the fusion pass)
    optimizer_model_type: ClassVar[str | None] = "bert"

    def __init__(self, info: ModelInfo, options: dict[str, Any]):
        self.info = info
        self.options = options

    def graph_plans(self) -> list[GraphPlan]:
        """The graphs to export, with the torch modules that produce them."""
        raise NotImplementedError

    def manifest_fields(self, hf_tokenizer: Any) -> dict[str, Any]:
        """Family-specific manifest keys (pooling, instructions, dims, special ids…)."""
        return {}

    def parity(self, artifact_dir: str, hf_tokenizer: Any, precision: str = "fp32") -> dict[str, Any]:
        """Compare the exported artifact (through bgert.runtime) with the torch model on fixed texts."""
        raise NotImplementedError

    def sample_inputs(self, hf_tokenizer: Any) -> dict[str, Any]:
        """Example inputs for tracing: a padded batch of two."""
        enc = hf_tokenizer(["a short one", "a somewhat longer sentence to trace with padding"],
                           padding=True, return_tensors="pt")
        return {k: enc[k] for k in self.inputs}


#: kind -> "module:Class" of its spec; modules are imported only when that kind is exported
SPEC_MODULES: dict[str, str] = {
    "embedder": "bgert.export.embedder_spec:EmbedderSpec",
    "m3": "bgert.export.m3_spec:M3Spec",
    "reranker": "bgert.export.reranker_spec:CrossEncoderSpec",
    "llm_reranker": "bgert.export.reranker_spec:LLMRerankerSpec",
    "layerwise_reranker": "bgert.export.reranker_spec:LayerwiseRerankerSpec",
    "decoder_embedder": "bgert.export.decoder_embedder_spec:DecoderEmbedderSpec",
    "lightweight_reranker": "bgert.export.lightweight_spec:LightweightRerankerSpec",
}


def spec_for(info: ModelInfo, options: dict[str, Any]) -> ExportSpec:
    """Instantiate the spec registered for ``info.kind``."""
    target = SPEC_MODULES.get(info.kind)
    if target is None:
        raise ValueError(f"export of kind {info.kind!r} is not supported yet; supported: {', '.join(SPEC_MODULES)}")
    mod, cls = target.split(":")
    return getattr(importlib.import_module(mod), cls)(info, options)
