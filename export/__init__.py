"""bgert.export: the heavy side (torch, transformers, onnx). Checkpoint → ONNX artifact."""
from .detect import ModelInfo, detect
from .errors import ExportError
from .exporter import export

__all__ = ["ExportError", "ModelInfo", "detect", "export"]
