"""bgert.export: the heavy side (torch, transformers, onnx). Checkpoint → ONNX artifact."""
from .detect import ModelInfo, detect
from .exporter import ExportError, export

__all__ = ["ExportError", "ModelInfo", "detect", "export"]
