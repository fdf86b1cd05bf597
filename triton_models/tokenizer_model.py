"""Triton python-backend model: raw strings (TEXT, TYPE_STRING) → the padded token ids of the model step.

Runs inside tritonserver. It uses bgert.runtime's own tokenizer wrapper and length buckets, which
``bgert triton-repo`` copies next to this file (``1/bgert/runtime``), so server-side tokenisation is
the runtime's, not a re-implementation: truncation at max_length counting special tokens, padding to
the smallest length bucket that fits the longest text of the request.
"""
import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the vendored bgert.runtime wins

from bgert.runtime.batching import bucket_for, pad  # noqa: E402
from bgert.runtime.tokenize import TextTokenizer  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}
        here = os.path.dirname(os.path.abspath(__file__))
        self.tokenizer = TextTokenizer(os.path.join(here, "tokenizer.json"), json.loads(params["tokenizer_info"]))
        self.max_length = int(params["max_length"])
        self.buckets = sorted(json.loads(params["length_buckets"]))
        self.input_name = cfg["input"][0]["name"]
        self.output_names = [o["name"] for o in cfg["output"]]

    def _tokenize(self, raw):
        texts = []
        for i, t in enumerate(raw.reshape(-1)):
            try:
                texts.append(t.decode("utf-8") if isinstance(t, bytes) else str(t))
            except UnicodeDecodeError as e:
                raise ValueError(f"{self.input_name}[{i}] is not valid UTF-8 ({e})") from None
        ids = self.tokenizer.encode(texts, self.max_length)
        length = bucket_for(max(len(s) for s in ids), self.buckets)
        input_ids, mask = pad(ids, length, self.tokenizer.pad_token_id, self.tokenizer.padding_side)
        tensors = {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": np.zeros_like(input_ids)}
        return [pb_utils.Tensor(n, tensors[n]) for n in self.output_names]

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                raw = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy()
                responses.append(pb_utils.InferenceResponse(output_tensors=self._tokenize(raw)))
            except Exception as e:  # one bad request must not fail the others of the batch
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"bgert tokenizer: {e}")))
        return responses
