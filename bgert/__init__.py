"""bgert: ONNX export and a thin runtime for the BGE family of embedders and rerankers.

``bgert.export`` (torch side) writes artifacts; ``bgert.runtime`` (numpy + tokenizers +
onnxruntime) serves them. Importing ``bgert`` itself loads neither.
"""
__version__ = "0.1.0"
