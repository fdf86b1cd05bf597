"""Triton python-backend model: raw strings (TYPE_STRING) → the padded token ids of the model step.

Runs inside tritonserver. It uses bgert.runtime's own tokenizer wrapper, length buckets and (for
cross-encoder rerankers) pair assembly, which ``bgert triton-repo`` copies next to this file
(``1/bgert/runtime``), so server-side tokenisation is the runtime's, not a re-implementation.

- Embedders and BGE-M3 (input TEXT): truncation at max_length counting special tokens.
- Rerankers (inputs QUERY and PASSAGE, one pair per row): each side with its instruction,
  tokenised and truncated on its own (bgert.runtime.reranker.tokenize_sides), then joined as the
  runtime joins them, only the passage trimmed to fit: cross-encoders by the tokenizer's pair
  template, token type ids from it (assemble_pair); LLM rerankers as ``[bos] query sep passage
  sep prompt`` (llm_pieces).

Every request is padded to the smallest length bucket that fits its longest row.
"""
import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the vendored bgert.runtime wins

from bgert.runtime.batching import bucket_for, pad  # noqa: E402
from bgert.runtime.tokenize import TextTokenizer  # noqa: E402
from bgert.triton_models.python_model import model_args  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        cfg = model_args(args, __file__)
        params = cfg.params
        self.tokenizer = TextTokenizer(os.path.join(cfg.here, "tokenizer.json"), json.loads(params["tokenizer_info"]))
        self.max_length = int(params["max_length"])
        self.buckets = sorted(json.loads(params["length_buckets"]))
        self.input_names, self.output_names = cfg.input_names, cfg.output_names
        self.pairs = "assembly" in params
        self.multiple_of = int(params.get("pad_to_multiple_of", "1"))
        if self.pairs:
            self.assembly = json.loads(params["assembly"])
            self.query_max_length = int(params["query_max_length"])
            self.model_max_length = int(params["model_max_length"])
            self.truncation_side = params["truncation_side"]
            self.instructions = json.loads(params["instructions"])

    def _texts(self, request, name):
        raw = pb_utils.get_input_tensor_by_name(request, name).as_numpy()
        texts = []
        for i, t in enumerate(raw.reshape(-1)):
            try:
                texts.append(t.decode("utf-8") if isinstance(t, bytes) else str(t))
            except UnicodeDecodeError as e:
                raise ValueError(f"{name}[{i}] is not valid UTF-8 ({e})") from None
        return texts

    def _pair_ids(self, request):
        """(ids, token types or None) per (QUERY, PASSAGE) row, assembled as bgert.runtime's rerankers do."""
        # imported here: embedder and M3 tokenizers need only tokenize/batching (no onnxruntime import)
        from bgert.runtime.embedder import format_instruction
        from bgert.runtime.reranker import assemble_pair, check_fits, llm_pieces, tokenize_sides

        queries, passages = (self._texts(request, n) for n in self.input_names)  # Triton checks equal rows
        queries = format_instruction(self.instructions.get("query"), "{}{}", queries)
        passages = format_instruction(self.instructions.get("passage"), "{}{}", passages)
        sides, _ = tokenize_sides(self.tokenizer, queries, passages, self.query_max_length, self.max_length,
                                  self.truncation_side)
        a = self.assembly
        if "template" in a:
            built = [assemble_pair(a["template"], a["template_types"], q, p, self.max_length, self.truncation_side)
                     for q, p in sides]
            ids, types = [i for i, _ in built], [t for _, t in built]
        else:
            ids = [x + y + z for x, y, z in llm_pieces(self.tokenizer, sides, a["bos_prefix"], a["separator"],
                                                       a["prompt"], self.max_length, self.truncation_side)]
            types = None
        check_fits(ids, self.model_max_length, "pair")
        return ids, types

    def _tokenize(self, request):
        if self.pairs:
            ids, types = self._pair_ids(request)
        else:
            ids, types = self.tokenizer.encode(self._texts(request, self.input_names[0]), self.max_length), None
        length = bucket_for(max(map(len, ids), default=1), self.buckets, self.multiple_of)
        side = self.tokenizer.padding_side
        input_ids, mask = pad(ids, length, self.tokenizer.pad_token_id, side)
        tensors = {"input_ids": input_ids, "attention_mask": mask,
                   "token_type_ids": np.zeros_like(input_ids) if types is None else pad(types, length, 0, side)[0]}
        return [pb_utils.Tensor(n, tensors[n]) for n in self.output_names]

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(pb_utils.InferenceResponse(output_tensors=self._tokenize(request)))
            except Exception as e:  # one bad request must not fail the others of the batch
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"bgert tokenizer: {e}")))
        return responses
