"""What bgert's python-backend models (onnx_model, tokenizer_model, postprocess_model) share: reading
the model config that tritonserver hands to ``initialize``. ``bgert triton-repo`` copies this module
next to each model as ``bgert/triton_models/python_model.py``; it imports only the standard library.
"""
import json
import os
from dataclasses import dataclass


@dataclass
class ModelArgs:
    """A python model's name, string parameters, tensor names and version directory."""

    name: str
    params: dict
    input_names: list
    output_names: list
    here: str


def model_args(args: dict, model_file: str) -> ModelArgs:
    """``args`` of ``TritonPythonModel.initialize`` as ModelArgs; ``model_file`` is the model's ``__file__``."""
    cfg = json.loads(args["model_config"])
    return ModelArgs(name=cfg["name"],
                     params={k: v["string_value"] for k, v in cfg.get("parameters", {}).items()},
                     input_names=[i["name"] for i in cfg["input"]],
                     output_names=[o["name"] for o in cfg["output"]],
                     here=os.path.dirname(os.path.abspath(model_file)))
