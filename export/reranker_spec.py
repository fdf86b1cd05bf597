"""Export specs for rerankers: cross-encoders, the gemma LLM reranker and the MiniCPM layerwise one.

Each graph already does the model's own pooling and head, so it outputs scores, never hidden
states or vocabulary logits:

* cross-encoder (FlagReranker): ``score`` [batch], the classification logit;
* LLM reranker (FlagLLMReranker): ``score`` [batch], the ``Yes`` logit at the last real token,
  computed from that one hidden vector and that one row of the LM head;
* layerwise (LayerWiseFlagLLMReranker): one graph per exported cutoff L holding only the first L
  decoder layers, the final norm and the heads of the exported cutoffs <= L; ``scores``
  [batch, n_cutoffs <= L].

The manifest stores what the runtime needs to build the inputs exactly as FlagEmbedding 1.4.2
does without an HF tokenizer: the special-token template of a pair, the prompt pieces, the BOS
rule, the ``Yes`` id. Parity is checked against the PyTorch model on inputs built with the HF
tokenizer the way FlagEmbedding builds them.
"""
from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch

from bgert.quality import score_stats
from bgert.runtime.reranker import DEFAULT_MAX_LENGTH

from .parity import PARITY_PAIRS
from .specs import BATCH_SEQ, ExportSpec, GraphPlan

#: FlagLLMReranker / LayerWiseFlagLLMReranker default prompt
LLM_PROMPT = ("Given a query A and a passage B, determine whether the passage contains an answer to the query "
              "by providing a prediction of either 'Yes' or 'No'.")
#: markers for the query and passage in the stored pair template
FIRST, SECOND = -1, -2


def last_real_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """FlagEmbedding's last_logit_pool per row: the last column when the row ends with a real token
    (left padding, or none), else the last real position (right padding)."""
    length = attention_mask.shape[1]
    last = attention_mask.sum(1) - 1
    return torch.where(attention_mask[:, -1] == 1, torch.full_like(last, length - 1), last)


def causal_4d_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive [B,1,L,L] causal + padding mask from plain ops. Given a 4D mask, transformers 4.57
    skips its vmap-based mask builder, which the TorchScript tracer cannot follow."""
    length = attention_mask.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).tril()
    allowed = causal[None, None] & attention_mask[:, None, None, :].bool()
    return torch.where(allowed, torch.zeros((), dtype=dtype), torch.full((), torch.finfo(dtype).min, dtype=dtype))


# ---------------------------------------------------------------- graph modules
class CrossEncoderScore(torch.nn.Module):
    """AutoModelForSequenceClassification → its single logit, [batch]."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        kw = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kw).logits[:, 0]


class YesLogit(torch.nn.Module):
    """Causal LM → the ``Yes`` logit at the last real token, [batch] (never [batch, length, vocab])."""

    def __init__(self, model: torch.nn.Module, yes_id: int):
        super().__init__()
        self.body = model.model
        self.yes = torch.nn.Parameter(model.lm_head.weight[yes_id].detach().clone(), requires_grad=False)
        self.softcap = getattr(model.config, "final_logit_softcapping", None)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = causal_4d_mask(attention_mask, self.yes.dtype)
        h = self.body(input_ids=input_ids, attention_mask=mask, use_cache=False).last_hidden_state
        score = h[torch.arange(h.shape[0]), last_real_index(attention_mask)] @ self.yes
        if self.softcap:
            score = self.softcap * torch.tanh(score / self.softcap)
        return score.float()


def truncated_decoder(body: torch.nn.Module, n_layers: int) -> torch.nn.Module:
    """A shallow copy of a decoder body that holds only its first ``n_layers`` layers (weights shared)."""
    short = copy.copy(body)
    short._modules = dict(body._modules)
    short.layers = torch.nn.ModuleList(list(body.layers)[:n_layers])
    return short


class LayerwiseScores(torch.nn.Module):
    """MiniCPM layerwise reranker cut after ``max(cutoffs)`` layers → [batch, len(cutoffs)] scores.

    Score of cutoff c = head_c(final_norm(state after c layers)) at the last real token, as in
    LayerWiseMiniCPMForCausalLM with head_type 'simple'.
    """

    def __init__(self, model: torch.nn.Module, cutoffs: list[int]):
        super().__init__()
        cfg = model.config
        self.cutoffs = sorted(cutoffs)
        self.body = truncated_decoder(model.model, self.cutoffs[-1])
        heads = [model.lm_head[c - cfg.start_layer] if cfg.head_multi else model.lm_head for c in self.cutoffs]
        self.heads = torch.nn.Parameter(torch.cat([h.linear_head.weight.detach() for h in heads]).clone(),
                                        requires_grad=False)  # [n_cutoffs, hidden]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.body(input_ids=input_ids, attention_mask=attention_mask, cutoff_layers=self.cutoffs,
                        output_hidden_states=True, use_cache=False, return_dict=True)
        # the truncated body records the lower cutoffs on the way; its last_hidden_state is the deepest one
        states = list(out.hidden_states[:len(self.cutoffs) - 1]) + [out.last_hidden_state]
        rows = torch.arange(input_ids.shape[0])
        last = last_real_index(attention_mask)
        pooled = torch.stack([s[rows, last] for s in states], dim=1)  # [batch, n_cutoffs, hidden]
        return (pooled * self.heads).sum(-1).float()


# ---------------------------------------------------------------- input assembly (HF side, for parity)
def hf_ids(tok: Any, text: str, max_length: int | None = None) -> list[int]:
    kw = {"max_length": max_length, "truncation": True} if max_length is not None else {}
    return tok(text, add_special_tokens=False, **kw)["input_ids"]


def hf_llm_sequence(tok: Any, query: str, passage: str, prompt: str, max_length: int, bos: int | None) -> list[int]:
    """FlagLLMReranker's token sequence, built with the HF tokenizer as FlagEmbedding 1.4.2 does."""
    sep, prompt_ids = hf_ids(tok, "\n"), hf_ids(tok, prompt)
    first = ([bos] if bos is not None else []) + hf_ids(tok, "A: " + query, max_length * 3 // 4)
    item = tok.prepare_for_model(first, sep + hf_ids(tok, "B: " + passage, max_length), truncation="only_second",
                                 max_length=max_length + len(sep) + len(prompt_ids), add_special_tokens=False)
    return item["input_ids"] + sep + prompt_ids


# ---------------------------------------------------------------- specs
class _RerankerSpec(ExportSpec):
    optimizer_model_type = None

    def __init__(self, info, options):
        super().__init__(info, options)
        self._model: torch.nn.Module | None = None

    @property
    def model(self) -> torch.nn.Module:
        if self._model is None:
            self._model = self.load_model().eval()
        return self._model

    def load_model(self) -> torch.nn.Module:
        raise NotImplementedError

    @property
    def tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.info.path)

    def manifest_fields(self, hf_tokenizer: Any) -> dict[str, Any]:
        return {"default_max_length": min(DEFAULT_MAX_LENGTH, self.info.max_length),
                "truncation_side": getattr(hf_tokenizer, "truncation_side", "right")}

    def parity(self, artifact_dir: str, hf_tokenizer: Any, precision: str = "fp32") -> dict[str, Any]:
        from bgert.runtime import load

        with torch.no_grad():
            ref = [self.torch_score(hf_tokenizer, q, p) for q, p in PARITY_PAIRS]
        got = load(artifact_dir, precision=precision, verify=False).compute_score(PARITY_PAIRS, **self.parity_kwargs())
        return {"reference": self.reference_name, **score_stats(np.ravel(ref), np.ravel(np.transpose(got)))}

    def parity_kwargs(self) -> dict[str, Any]:
        return {}


class CrossEncoderSpec(_RerankerSpec):
    """bge-reranker-base / -large / -v2-m3 (XLMRobertaForSequenceClassification) and BERT cross-encoders."""

    outputs = {"score": {0: "batch"}}
    optimizer_model_type = "bert"
    reference_name = "torch fp32 (AutoModelForSequenceClassification, FlagReranker pair encoding)"

    def __init__(self, info, options):
        super().__init__(info, options)
        if self.model.config.num_labels != 1:
            raise ValueError(f"{info.path}: a cross-encoder reranker has one label, this one has "
                             f"{self.model.config.num_labels}; it is a classifier, not a reranker.")
        self.inputs = dict(ExportSpec.inputs)
        if getattr(self.model.config, "type_vocab_size", 1) > 1:
            self.inputs["token_type_ids"] = BATCH_SEQ

    def load_model(self) -> torch.nn.Module:
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification.from_pretrained(self.info.path, dtype=torch.float32,
                                                                  attn_implementation="eager")

    def graph_plans(self) -> list[GraphPlan]:
        return [GraphPlan(file="model.onnx", module=CrossEncoderScore(self.model).eval())]

    def manifest_fields(self, hf_tokenizer: Any) -> dict[str, Any]:
        pair = hf_tokenizer.prepare_for_model([FIRST], [SECOND], add_special_tokens=True, return_token_type_ids=True)
        ids = list(pair["input_ids"])
        if ids.count(FIRST) != 1 or ids.count(SECOND) != 1 or ids.index(FIRST) > ids.index(SECOND):
            raise ValueError(f"{type(hf_tokenizer).__name__} builds pairs as {ids}; cannot store a pair template")
        types = list(pair["token_type_ids"]) if "token_type_ids" in self.inputs else None
        return {**super().manifest_fields(hf_tokenizer), "output_name": "score",
                "pair_template": {"input_ids": ids, "token_type_ids": types}}

    def torch_score(self, tok: Any, query: str, passage: str) -> float:
        max_length = min(DEFAULT_MAX_LENGTH, self.info.max_length)
        enc = tok.prepare_for_model(hf_ids(tok, query, max_length * 3 // 4), hf_ids(tok, passage, max_length),
                                    truncation="only_second", max_length=max_length, return_tensors="pt",
                                    prepend_batch_axis=True)
        feeds = {k: enc[k] for k in self.inputs if k in enc}
        return float(self.model(**feeds).logits[0, 0])


class _DecoderRerankerSpec(_RerankerSpec):
    def manifest_fields(self, hf_tokenizer: Any) -> dict[str, Any]:
        return {**super().manifest_fields(hf_tokenizer), "prompt": LLM_PROMPT, "separator": "\n",
                "query_instruction_for_rerank": "A: ", "passage_instruction_for_rerank": "B: ",
                "bos_prefix_id": self.bos_prefix(hf_tokenizer), "pad_to_multiple_of": 8}

    def sequence(self, tok: Any, query: str, passage: str) -> torch.Tensor:
        max_length = min(DEFAULT_MAX_LENGTH, self.info.max_length)
        return torch.tensor([hf_llm_sequence(tok, query, passage, LLM_PROMPT, max_length, self.bos_prefix(tok))])


class LLMRerankerSpec(_DecoderRerankerSpec):
    """bge-reranker-v2-gemma (GemmaForCausalLM): the graph outputs only the ``Yes`` logit."""

    outputs = {"score": {0: "batch"}}
    reference_name = "torch fp32 (AutoModelForCausalLM, FlagLLMReranker input assembly, last-token Yes logit)"

    def load_model(self) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(self.info.path, dtype=torch.float32, attn_implementation="eager")

    @staticmethod
    def bos_prefix(tok: Any) -> int | None:
        """FlagLLMReranker prepends BOS only when it exists and differs from the pad token."""
        bos = tok.bos_token_id
        return bos if bos is not None and bos != tok.pad_token_id else None

    @staticmethod
    def yes_id(tok: Any) -> int:
        return hf_ids(tok, "Yes")[0]

    def graph_plans(self) -> list[GraphPlan]:
        return [GraphPlan(file="model.onnx", module=YesLogit(self.model, self.yes_id(self.tokenizer)).eval())]

    def manifest_fields(self, hf_tokenizer: Any) -> dict[str, Any]:
        return {**super().manifest_fields(hf_tokenizer), "output_name": "score",
                "yes_token_id": self.yes_id(hf_tokenizer)}

    def torch_score(self, tok: Any, query: str, passage: str) -> float:
        return float(self.model(self.sequence(tok, query, passage), use_cache=False).logits[0, -1, self.yes_id(tok)])


class LayerwiseRerankerSpec(_DecoderRerankerSpec):
    """bge-reranker-v2-minicpm-layerwise (FlagEmbedding's bundled MiniCPM code), one graph per cutoff."""

    outputs = {"scores": {0: "batch"}}
    reference_name = "torch fp32 (LayerWiseMiniCPMForCausalLM, LayerWiseFlagLLMReranker input assembly)"

    def __init__(self, info, options):
        super().__init__(info, options)
        cfg = self.model.config
        if cfg.head_type != "simple":
            raise ValueError(f"{info.path}: head_type {cfg.head_type!r} outputs vocabulary logits; "
                             "LayerWiseFlagLLMReranker scores with head_type 'simple' only.")
        valid = range(cfg.start_layer, cfg.num_hidden_layers + 1)
        asked = options.get("cutoff_layers") or [cfg.num_hidden_layers]
        bad = [c for c in asked if c not in valid]
        if bad:
            raise ValueError(f"cutoff layers {bad} are outside this model's range {valid.start}..{valid.stop - 1} "
                             f"(start_layer..num_hidden_layers); e.g. --cutoff-layers {valid.start},{valid.stop - 1}")
        self.cutoffs = sorted(set(asked))

    def load_model(self) -> torch.nn.Module:
        try:
            from FlagEmbedding.inference.reranker.decoder_only.models.modeling_minicpm_reranker import (
                LayerWiseMiniCPMForCausalLM)
        except ImportError as e:
            raise ImportError("exporting a layerwise reranker needs FlagEmbedding's MiniCPM code: "
                              "pip install flagembedding==1.4.2") from e
        model = LayerWiseMiniCPMForCausalLM.from_pretrained(self.info.path, dtype=torch.float32,
                                                            attn_implementation="eager")
        model.config.use_cache = False  # transformers 4.57 crashes in this code's cache path
        return model

    @staticmethod
    def bos_prefix(tok: Any) -> int | None:
        """LayerWiseFlagLLMReranker always prepends BOS."""
        return tok.bos_token_id

    def graph_plans(self) -> list[GraphPlan]:
        plans = []
        for top in self.cutoffs:
            cuts = [c for c in self.cutoffs if c <= top]
            plans.append(GraphPlan(file=f"model_cutoff{top}.onnx", module=LayerwiseScores(self.model, cuts).eval(),
                                   fields={"cutoff_layers": cuts}))
        return plans

    def manifest_fields(self, hf_tokenizer: Any) -> dict[str, Any]:
        cfg = self.model.config
        return {**super().manifest_fields(hf_tokenizer), "output_name": "scores", "cutoff_layers": self.cutoffs,
                "num_hidden_layers": cfg.num_hidden_layers, "start_layer": cfg.start_layer}

    def parity_kwargs(self) -> dict[str, Any]:
        return {"cutoff_layers": self.cutoffs}

    def torch_score(self, tok: Any, query: str, passage: str) -> list[float]:
        out = self.model(self.sequence(tok, query, passage), cutoff_layers=self.cutoffs, output_hidden_states=True,
                         use_cache=False)
        return [float(logits[0, -1]) for logits in out.logits]
