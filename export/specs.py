"""Per-family export specs: one small declarative class per model kind.

A spec names the graph's inputs, outputs and dynamic axes (like Optimum's OnnxConfig), builds
the torch wrapper module whose graph already does pooling, normalisation and heads, lists the
graphs to write (one, or one per layerwise cutoff), adds its family's manifest fields, and
measures parity of the exported artifact against the PyTorch model. The exporter core
(bgert.export.exporter) only calls these members; each kind's family description
(bgert.runtime.registry) names its spec by import path.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from bgert.runtime.registry import FAMILIES, load_object


BATCH_SEQ = {0: "batch", 1: "sequence"}


@dataclass
class ModelInfo:
    """What export needs to know about a checkpoint before loading it."""

    path: str
    kind: str
    family: str
    config: dict[str, Any]
    pooling: str = "cls"
    normalize: bool = True
    max_length: int = 512
    query_instruction: str | None = None
    query_instruction_format: str = "{}{}"
    notes: list[str] = field(default_factory=list)


@dataclass
class GraphPlan:
    """One graph to export: its file name, the module to trace and manifest fields for it."""

    file: str
    module: Any
    fields: dict[str, Any] = field(default_factory=dict)
    output_names: list[str] | None = None


class ExportSpec:
    """Base spec. Subclasses set the class attributes and implement the three methods."""

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

    @classmethod
    def describe(cls, info: ModelInfo) -> None:
        """Fill family-specific ModelInfo fields from the checkpoint's files at detection (default: none)."""

    def sample_inputs(self, hf_tokenizer: Any) -> dict[str, Any]:
        """Example inputs for tracing: a padded batch of two."""
        enc = hf_tokenizer(["a short one", "a somewhat longer sentence to trace with padding"],
                           padding=True, return_tensors="pt")
        return {k: enc[k] for k in self.inputs}


def spec_class(kind: str) -> type[ExportSpec]:
    """The export spec the family of ``kind`` names (its module is imported only now)."""
    fam = FAMILIES.get(kind)
    if fam is None or not fam.export_spec:
        supported = [k for k, f in FAMILIES.items() if f.export_spec]
        raise ValueError(f"export of kind {kind!r} is not supported; supported: {', '.join(supported)}")
    return load_object(fam.export_spec)


def spec_for(info: ModelInfo, options: dict[str, Any]) -> ExportSpec:
    """Instantiate the spec registered for ``info.kind``."""
    return spec_class(info.kind)(info, options)
