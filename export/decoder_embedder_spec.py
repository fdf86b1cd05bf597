"""Export spec for decoder-only embedders: FlagLLMModel (bge-multilingual-gemma2) and FlagICLModel
(bge-en-icl), FlagEmbedding 1.4.2's ``BaseLLMEmbedder`` / ``ICLLLMEmbedder``.

The graph runs the decoder body (AutoModel, no LM head), takes the hidden state of the last real
token (FlagEmbedding's ``last_token_pool``: the last column when the row ends with a real token,
else position ``sum(mask)-1``) and L2-normalises it: output ``dense`` [batch, hidden]. It is traced
with a ready-made 4D causal mask (plus a sliding-window one where the config has a window), which
transformers 4.57 passes through untouched, so the TorchScript tracer never meets its vmap mask
builder. Checkpoints past 2 GB keep their weights in one external-data file (bgert.export.onnx_io).

What differs between the two classes lives in the runtime (query assembly); the manifest records
``icl`` and the instruction formats. ICL is chosen by the checkpoint's name (``bge-en-icl``, as
FlagAutoModel does) or by the ``icl`` export option.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from bgert.quality import cosine_stats

from .parity import PARITY_TEXTS
from .reranker_spec import DEFAULT_MAX_LENGTH, causal_4d_mask, last_real_index
from .specs import ExportSpec, GraphPlan

#: FlagEmbedding's BGE_MAPPING query_instruction_format for the decoder embedders it names
REGISTRY_FORMATS = {"bge-multilingual-gemma2": "<instruct>{}\n<query>{}", "bge-en-icl": "<instruct>{}\n<query>{}",
                    "bge-code-v1": "<instruct>{}\n<query>{}",
                    "bge-reasoner-embed-qwen3-8b-0923": "Instruct: {}\nQuery: {}"}
#: class defaults when the name is not in the registry (FlagLLMModel / FlagICLModel)
LLM_FORMAT, ICL_FORMAT = "Instruct: {}\nQuery: {}", "<instruct>{}\n<query>{}"
ICL_EXAMPLE_FORMAT, ICL_SUFFIX = "<instruct>{}\n<query>{}\n<response>{}", "\n<response>"


def decoder_masks(config: Any, attention_mask: torch.Tensor, dtype: torch.dtype) -> Any:
    """The additive 4D mask(s) the decoder body expects: one tensor, or Gemma2's per-layer-type dict."""
    full = causal_4d_mask(attention_mask, dtype)
    window = getattr(config, "sliding_window", None)
    if not window:
        return full
    pos = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    far = (pos[:, None] - pos[None, :]) >= window  # transformers: kv_idx > q_idx - sliding_window
    sliding = full.masked_fill(far[None, None], torch.finfo(dtype).min)
    if getattr(config, "layer_types", None):
        return {"full_attention": full, "sliding_attention": sliding}
    return sliding


class LastTokenEmbedding(torch.nn.Module):
    """Decoder body → hidden state of the last real token (→ L2-normalised), [batch, hidden]."""

    def __init__(self, body: torch.nn.Module, normalize: bool):
        super().__init__()
        self.body, self.normalize = body, normalize

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = decoder_masks(self.body.config, attention_mask, self.body.dtype)
        h = self.body(input_ids=input_ids, attention_mask=mask, use_cache=False).last_hidden_state
        v = h[torch.arange(h.shape[0]), last_real_index(attention_mask)]
        return torch.nn.functional.normalize(v, dim=-1) if self.normalize else v


class DecoderEmbedderSpec(ExportSpec):
    outputs = {"dense": {0: "batch"}}
    optimizer_model_type = None  # ORT's transformer fusions target encoders

    def __init__(self, info, options):
        super().__init__(info, options)
        name = os.path.basename(os.path.normpath(info.path)).lower()
        self.icl = bool(options["icl"]) if options.get("icl") is not None else "icl" in name
        self.query_format = REGISTRY_FORMATS.get(name, ICL_FORMAT if self.icl else LLM_FORMAT)
        self.normalize = True if options.get("normalize") is None else bool(options["normalize"])
        self.query_instruction = options.get("query_instruction") or None
        self._module: LastTokenEmbedding | None = None

    @property
    def module(self) -> LastTokenEmbedding:
        if self._module is None:
            from transformers import AutoModel

            body = AutoModel.from_pretrained(self.info.path, dtype=torch.float32, attn_implementation="eager")
            self._module = LastTokenEmbedding(body.eval(), self.normalize).eval()
        return self._module

    def graph_plans(self) -> list[GraphPlan]:
        return [GraphPlan(file="model.onnx", module=self.module)]

    def manifest_fields(self, hf_tokenizer: Any) -> dict[str, Any]:
        fields = {"pooling": "last_token", "normalize": self.normalize, "dim": int(self.module.body.config.hidden_size),
                  "output_name": "dense", "icl": self.icl, "query_instruction": self.query_instruction,
                  "query_instruction_format": self.query_format,
                  "default_max_length": min(DEFAULT_MAX_LENGTH, self.info.max_length),
                  "clean_up_tokenization_spaces": bool(getattr(hf_tokenizer, "clean_up_tokenization_spaces", False))}
        if self.icl:
            fields.update(examples_instruction_format=ICL_EXAMPLE_FORMAT, icl_suffix=ICL_SUFFIX)
        return fields

    def parity(self, artifact_dir: str, hf_tokenizer: Any, precision: str = "fp32") -> dict[str, Any]:
        """Corpus-side vectors (plain tokenisation, one text at a time) against the torch module."""
        from bgert.runtime import load

        max_length = min(DEFAULT_MAX_LENGTH, self.info.max_length)
        with torch.no_grad():
            ref = [self.module(**{k: v for k, v in hf_tokenizer(t, truncation=True, max_length=max_length,
                                                                 return_tensors="pt").items()
                                  if k in self.inputs})[0].numpy() for t in PARITY_TEXTS]
        got = load(artifact_dir, precision=precision, verify=False).encode_corpus(PARITY_TEXTS)
        return {"reference": "torch fp32 (AutoModel + last-token pooling)", **cosine_stats(np.stack(ref), got)}
