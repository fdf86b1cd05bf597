"""bgert's Triton python-backend models run in-process against a stand-in for tritonserver's
``triton_python_backend_utils``: one batch of requests in, one response per request out, each
request with its own inputs and outputs (the real server is exercised in tests/test_triton*.py)."""
from __future__ import annotations

import importlib
import json
import sys
import types

import numpy as np
import pytest

from bgert.runtime import Embedder


class Tensor:
    def __init__(self, name, value):
        self.name, self.value = name, np.asarray(value)

    def as_numpy(self):
        return self.value


class TritonError:
    def __init__(self, message):
        self.message = message


class InferenceResponse:
    def __init__(self, output_tensors=None, error=None):
        self.outputs = {t.name: t.value for t in output_tensors or []}
        self.error = error


class Request:
    def __init__(self, inputs, parameters=None):
        self.inputs, self._parameters = inputs, parameters

    def parameters(self):
        return json.dumps(self._parameters) if self._parameters else ""


@pytest.fixture
def pb_utils(monkeypatch):
    fake = types.ModuleType("triton_python_backend_utils")
    fake.Tensor, fake.TritonError, fake.InferenceResponse = Tensor, TritonError, InferenceResponse
    fake.get_input_tensor_by_name = lambda request, name: Tensor(name, request.inputs[name])
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake)
    path = list(sys.path)
    yield fake
    sys.path[:] = path  # the models put their own directory first


def onnx_model(art, sha):
    from bgert.runtime.manifest import read_manifest

    module = importlib.reload(importlib.import_module("bgert.triton_models.onnx_model"))
    m = read_manifest(art)
    config = {"name": "tiny_model", "parameters": {"graph_file": {"string_value": m.path("model.onnx")},
                                                    "bgert_graph_sha256": {"string_value": sha}},
              "input": [{"name": "input_ids"}, {"name": "attention_mask"}], "output": [{"name": "dense"}]}
    model = module.TritonPythonModel()
    model.initialize({"model_config": json.dumps(config), "model_instance_kind": "CPU"})
    return model


def test_onnx_model_gives_each_request_its_own_rows_when_one_is_refused(pb_utils, tiny_bge_art):
    local = Embedder(tiny_bge_art)
    sha = local.manifest.raw["files"]["model.onnx"]
    model = onnx_model(tiny_bge_art, sha)
    texts = [["panda"], ["bear", "bamboo eats"], ["北京"], ["retrieval of the panda"]]
    requests, want = [], []
    for t in texts:
        ids, mask = local.tokenizer.encode(t, 16), None
        padded = np.zeros((len(ids), 16), np.int64)
        mask = np.zeros_like(padded)
        for r, row in enumerate(ids):
            padded[r, :len(row)], mask[r, :len(row)] = row, 1
        requests.append(Request({"input_ids": padded, "attention_mask": mask}, {"bgert_graph_sha256": sha}))
        want.append(local.backend_for(local.graph()).run({"input_ids": padded, "attention_mask": mask,
                                                         "token_type_ids": np.zeros_like(padded)}, ["dense"])[0])
    requests[1]._parameters = {"bgert_graph_sha256": "0" * 64}  # another export's graph: refused
    responses = model.execute(requests)
    assert len(responses) == len(requests)
    assert responses[1].error is not None and "does not run this artifact's graph" in responses[1].error.message
    for i in (0, 2, 3):
        assert responses[i].error is None, responses[i].error.message
        np.testing.assert_allclose(responses[i].outputs["dense"], want[i], atol=1e-5)
