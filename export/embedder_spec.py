"""Export spec for encoder embedders: BGE v1/v1.5 (CLS) and sentence-transformers models (mean)."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from bgert.quality import cosine_stats

from .detect import (BGE_EN_QUERY_INSTRUCTION, BGE_ZH_QUERY_INSTRUCTION, checkpoint_name,
                     sentence_transformers_settings)
from .parity import PARITY_TEXTS
from .specs import ExportSpec, GraphPlan, ModelInfo


class PooledEncoder(torch.nn.Module):
    """Encoder + pooling (+ L2 normalisation): the graph outputs the final sentence vector."""

    def __init__(self, model: torch.nn.Module, pooling: str, normalize: bool):
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling {pooling!r} is not supported for encoder embedders (cls, mean)")
        self.model, self.pooling, self.normalize = model, pooling, normalize

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            v = h[:, 0]
        else:  # FlagEmbedding / sentence-transformers mean pooling over real tokens
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            v = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
        if self.normalize:
            v = torch.nn.functional.normalize(v, dim=-1)
        return v


def load_encoder(path: str) -> torch.nn.Module:
    """The HF encoder in fp32 with eager attention (the pattern ORT's optimizer fuses)."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


class EmbedderSpec(ExportSpec):
    outputs = {"dense": {0: "batch"}}

    @classmethod
    def describe(cls, info: ModelInfo) -> None:
        """Pooling, normalisation and max length from a sentence-transformers layout; the BGE model card's
        query instruction for checkpoints named bge-*-en* / bge-*-zh*."""
        st = sentence_transformers_settings(info.path)
        info.pooling = st.get("pooling", "cls")
        info.normalize = st.get("normalize", True)
        if "max_length" in st:
            info.max_length = min(st["max_length"], info.max_length)
        name = checkpoint_name(info.path)
        if name.startswith("bge-") and "-en" in name:
            info.query_instruction = BGE_EN_QUERY_INSTRUCTION
        elif name.startswith("bge-") and "-zh" in name:
            info.query_instruction = BGE_ZH_QUERY_INSTRUCTION

    def __init__(self, info, options):
        super().__init__(info, options)
        if options.get("normalize") is not None:
            info.normalize = bool(options["normalize"])
        if options.get("query_instruction") is not None:
            info.query_instruction = options["query_instruction"] or None
        self._module: PooledEncoder | None = None

    @property
    def module(self) -> PooledEncoder:
        if self._module is None:
            self._module = PooledEncoder(load_encoder(self.info.path), self.info.pooling, self.info.normalize).eval()
        return self._module

    def graph_plans(self) -> list[GraphPlan]:
        return [GraphPlan(file="model.onnx", module=self.module)]

    def manifest_fields(self, hf_tokenizer: Any) -> dict[str, Any]:
        cfg = self.module.model.config
        return {
            "pooling": self.info.pooling,
            "normalize": self.info.normalize,
            "dim": int(cfg.hidden_size),
            "output_name": "dense",
            "query_instruction": self.info.query_instruction,
            "query_instruction_format": self.info.query_instruction_format,
        }

    def torch_reference(self, hf_tokenizer: Any, texts: list[str], max_length: int) -> np.ndarray:
        """Vectors from the PyTorch module, one text at a time (no padding at all)."""
        out = []
        with torch.no_grad():
            for t in texts:
                enc = hf_tokenizer(t, truncation=True, max_length=max_length, return_tensors="pt")
                out.append(self.module(enc["input_ids"], enc["attention_mask"])[0].numpy())
        return np.stack(out)

    def parity(self, artifact_dir: str, hf_tokenizer: Any, precision: str = "fp32") -> dict[str, Any]:
        from bgert.runtime import Embedder

        max_length = self.info.max_length
        ref = self.torch_reference(hf_tokenizer, PARITY_TEXTS, max_length)
        got = Embedder(artifact_dir, precision=precision, verify=False).encode(PARITY_TEXTS)
        return {"reference": "torch fp32 (transformers AutoModel + pooling)", **cosine_stats(ref, got)}
