"""Triton python-backend model: the post-processing step of bgert's raw-text ensembles.

Runs inside tritonserver, with bgert.runtime's own post-processing copied next to this file by
``bgert triton-repo`` (``1/bgert/runtime``), so the results are the runtime's, not a re-implementation.

- BGE-M3 (``kind`` m3), from the padded token ids and the graph's ``sparse`` / ``colbert`` outputs:
  lexical weights per text as bgert.runtime.m3.lexical_weights gives them (positive weights only,
  the max over repeated tokens, special ids dropped, in order of first occurrence) and the ColBERT
  vectors of each text's real tokens (bgert.runtime.m3.colbert_vectors). Triton tensors are not
  ragged, so a request of n texts gets padded arrays and per-text counts:
  ``lexical_ids`` [n, K] int64 (-1 past a text's count), ``lexical_weights`` [n, K] fp32 (0 past it),
  ``lexical_lengths`` [n, 1] int32; ``colbert_vecs`` [n, T, D] fp32 (zero rows past a text's count;
  T is the request's largest count), ``colbert_lengths`` [n, 1] int32.
- Rerankers (``kind`` reranker): ``normalized_score`` = sigmoid(``score``) (bgert.runtime.reranker.sigmoid).
"""
import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the vendored bgert.runtime wins

from bgert.runtime.m3 import M3Family, colbert_vectors, lexical_weights  # noqa: E402
from bgert.runtime.reranker import CrossEncoderFamily, sigmoid  # noqa: E402
from bgert.triton_models.python_model import model_args  # noqa: E402


def pack(rows, fill, dtype):
    """Ragged rows (arrays [k] or [k, D]) → one array [n, max k, ...] padded with ``fill``, and counts [n, 1]."""
    lengths = np.array([[len(r)] for r in rows], dtype=np.int32).reshape(len(rows), 1)
    width = int(lengths.max(initial=0))
    out = np.full((len(rows), width, *(rows[0].shape[1:] if rows else ())), fill, dtype=dtype)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out, lengths


class TritonPythonModel:
    def initialize(self, args):
        cfg = model_args(args, __file__)
        # the step the family names (triton_postprocess): BGE-M3's, or the rerankers' sigmoid
        self.step = {M3Family.triton_postprocess: self._m3,
                     CrossEncoderFamily.triton_postprocess: self._reranker}[cfg.params["kind"]]
        self.drop_ids = np.asarray(json.loads(cfg.params.get("sparse_drop_ids", "[]")), dtype=np.int64)
        self.input_names, self.output_names = cfg.input_names, cfg.output_names

    def _m3(self, got):
        out = {}
        if "sparse" in got:
            lex = lexical_weights(got["sparse"], got["input_ids"], self.drop_ids)
            out["lexical_ids"], out["lexical_lengths"] = pack([t for t, _ in lex], -1, np.int64)
            out["lexical_weights"], _ = pack([w for _, w in lex], 0, np.float32)
        if "colbert" in got:
            out["colbert_vecs"], out["colbert_lengths"] = pack(
                colbert_vectors(got["colbert"], got["attention_mask"]), 0, np.float32)
        return out

    def _reranker(self, got):
        score = got["score"]
        return {"normalized_score": np.asarray(sigmoid(score.reshape(-1)), dtype=np.float32).reshape(score.shape)}

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                got = {n: pb_utils.get_input_tensor_by_name(request, n).as_numpy() for n in self.input_names}
                out = self.step(got)
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(n, out[n]) for n in self.output_names]))
            except Exception as e:  # one bad request must not fail the others of the batch
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"bgert postprocess: {e}")))
        return responses
