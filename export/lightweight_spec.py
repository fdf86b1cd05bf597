"""Export spec for bge-reranker-v2.5-gemma2-lightweight (FlagEmbedding 1.4.2's LightWeightFlagLLMReranker).

FlagEmbedding's bundled CostWiseGemma code runs only under transformers <= 4.47, and the model
exports only with the TorchScript exporter there (token compression has data-dependent shapes):
run this export in the environment made by ``benchmarks/envs/make_lightweight_env.sh``.

Cutoff layers, ``compress_ratio`` and ``compress_layers`` are Python control flow in the model, so
each exported combination is its own graph. The graph runs the model itself (loaded as the
reference loads it, so SDPA attention as in transformers 4.46), which stops after the deepest
cutoff: the layers above it never reach the graph. Inputs: ``input_ids``, ``attention_mask``
(right padding), ``query_lengths`` and ``prompt_lengths`` [batch] (the compression boundaries);
output ``scores`` [batch, n_cutoffs]: the softcapped per-cutoff head at the last real token of
the mask *at that cutoff* (after any compression). The head of the i-th emitted cutoff is
``lm_head[i]``, as in the reference, which is why a combination is matched exactly at run time.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from bgert.quality import score_stats
from bgert.runtime.lightweight import canonical


from .parity import PARITY_PAIRS
from .reranker_spec import DEFAULT_MAX_LENGTH, _RerankerSpec
from .specs import GraphPlan

PROMPT = "Predict whether passage B contains an answer to query A."
BATCH = {0: "batch"}


class LightweightScores(torch.nn.Module):
    """CostWiseGemmaForCausalLM with one fixed combination → [batch, n_cutoffs] softcapped scores."""

    def __init__(self, model: torch.nn.Module, combo: dict[str, Any]):
        super().__init__()
        self.model, self.combo = model, combo

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, query_lengths: torch.Tensor,
                prompt_lengths: torch.Tensor) -> torch.Tensor:
        c = self.combo
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, cutoff_layers=c["cutoff_layers"],
                         compress_layer=c["compress_layers"] or None,
                         compress_ratio=c["compress_ratio"] if c["compress_layers"] else None,
                         query_lengths=query_lengths, prompt_lengths=prompt_lengths, output_hidden_states=True,
                         use_cache=False)
        rows = torch.arange(input_ids.shape[0])
        # right padding (forced by the reference): the last real token is at sum(mask)-1
        return torch.stack([lg[rows, m.sum(1) - 1] for lg, m in zip(out.logits, out.attention_masks)], dim=1)


class LightweightRerankerSpec(_RerankerSpec):
    """bge-reranker-v2.5-gemma2-lightweight: one graph per (cutoff_layers, compress_ratio, compress_layers)."""

    inputs = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
              "query_lengths": BATCH, "prompt_lengths": BATCH}
    outputs = {"scores": {0: "batch"}}
    reference_name = "FlagEmbedding LightWeightFlagLLMReranker (fp32, transformers 4.46)"

    def __init__(self, info, options):
        super().__init__(info, options)
        cfg = self.model.config
        asked = options.get("combinations") or [{k: options.get(k) for k in
                                                 ("cutoff_layers", "compress_ratio", "compress_layers")}]
        combos = [canonical(a.get("cutoff_layers"), a.get("compress_ratio"), a.get("compress_layers"),
                            cfg.start_layer, cfg.num_hidden_layers, cfg.layer_sep) for a in asked]
        self.combos = [c for i, c in enumerate(combos) if c not in combos[:i]]

    def load_model(self) -> torch.nn.Module:
        try:
            from FlagEmbedding.inference.reranker.decoder_only.models.gemma_model import CostWiseGemmaForCausalLM
            import transformers
        except ImportError as e:
            raise ImportError("exporting the lightweight reranker needs FlagEmbedding 1.4.2 under transformers "
                              "4.46: run benchmarks/envs/make_lightweight_env.sh and export from that venv") from e
        if tuple(int(x) for x in transformers.__version__.split(".")[:2]) >= (4, 48):
            raise RuntimeError(f"transformers {transformers.__version__} cannot run FlagEmbedding's CostWiseGemma "
                               "code (it needs <= 4.47): export from the venv of "
                               "benchmarks/envs/make_lightweight_env.sh")
        model = CostWiseGemmaForCausalLM.from_pretrained(self.info.path, torch_dtype=torch.float32)
        model.config.use_cache = False
        return model

    @staticmethod
    def file_name(c: dict[str, Any]) -> str:
        name = "model_cutoff" + "-".join(map(str, c["cutoff_layers"]))
        if c["compress_layers"]:
            name += f"_ratio{c['compress_ratio']}_compress" + "-".join(map(str, c["compress_layers"]))
        return name + ".onnx"

    def graph_plans(self) -> list[GraphPlan]:
        return [GraphPlan(file=self.file_name(c), module=LightweightScores(self.model, c).eval(), fields=dict(c))
                for c in self.combos]

    def sample_inputs(self, hf_tokenizer: Any) -> dict[str, Any]:
        """Two right-padded pairs with room for compression."""
        ids = torch.tensor([[2] + list(range(10, 30)) + [0] * 4, [2] + list(range(30, 54))])
        mask = (torch.arange(ids.shape[1])[None] < torch.tensor([[21], [25]])).long()
        return {"input_ids": ids, "attention_mask": mask, "query_lengths": torch.tensor([4, 6]),
                "prompt_lengths": torch.tensor([5, 5])}

    def manifest_fields(self, hf_tokenizer: Any) -> dict[str, Any]:
        cfg = self.model.config
        return {**super().manifest_fields(hf_tokenizer), "output_name": "scores", "prompt": PROMPT, "separator": "\n",
                "query_instruction_for_rerank": "A: ", "passage_instruction_for_rerank": "B: ",
                "bos_prefix_id": hf_tokenizer.bos_token_id, "pad_to_multiple_of": 8, "padding_side": "right",
                "combinations": self.combos, "num_hidden_layers": cfg.num_hidden_layers,
                "start_layer": cfg.start_layer, "layer_sep": cfg.layer_sep,
                "final_logit_softcapping": cfg.final_logit_softcapping}

    def parity(self, artifact_dir: str, hf_tokenizer: Any, precision: str = "fp32") -> dict[str, Any]:
        """Every exported combination against LightWeightFlagLLMReranker itself."""
        from FlagEmbedding import LightWeightFlagLLMReranker

        from bgert.runtime import load

        ref_model = LightWeightFlagLLMReranker(self.info.path, use_fp16=False, devices="cpu",
                                               max_length=min(DEFAULT_MAX_LENGTH, self.info.max_length))
        ours = load(artifact_dir, precision=precision, verify=False)
        ref, got = [], []
        for c in self.combos:
            kw = {"cutoff_layers": c["cutoff_layers"], "compress_ratio": c["compress_ratio"],
                  "compress_layers": c["compress_layers"] or [0]}
            ref.append(np.asarray(ref_model.compute_score(PARITY_PAIRS, **kw)).ravel())
            got.append(np.asarray(ours.compute_score(PARITY_PAIRS, **kw)).ravel())
        return {"reference": self.reference_name, **score_stats(np.concatenate(ref), np.concatenate(got))}
