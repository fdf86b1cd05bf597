"""Export spec for BGE-M3: one graph with the dense, sparse and ColBERT heads (or a subset).

The graph is the XLM-R backbone plus the two heads FlagEmbedding keeps beside the weights
(``colbert_linear.pt``: Linear H→D, ``sparse_linear.pt``: Linear H→1), with its outputs:

* ``dense``   [B, H]     CLS vector, L2-normalised
* ``sparse``  [B, L]     per-token ``relu(sparse_linear(h))`` (the runtime turns it into lexical weights)
* ``colbert`` [B, L-1, D] ``colbert_linear(h[:, 1:])`` with padding rows zeroed, L2-normalised

``--heads`` exports a subset; the traced module returns only those outputs, so the other
heads are not in the graph at all.

Long inputs (bge-m3 takes 8192 tokens): ORT's CPU attention kernels materialise the
[B, heads, L, L] score matrix (4 GiB per layer at 8192 tokens) except MultiHeadAttention
without a padding mask, which runs a tiled flash-attention kernel. So this spec fuses attention
into MultiHeadAttention and wraps each one in an ``If``: a batch without padding takes the
mask-free (flash) node, a padded batch the masked one. The runtime (bgert.runtime.m3) never pads
long texts, so their memory stays bounded; padded batches are short and bounded by the token budget.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from onnxruntime.transformers.fusion_options import FusionOptions
from onnxruntime.transformers.onnx_model_bert import BertOnnxModel

from bgert.quality import cosine_stats

from .embedder_spec import load_encoder
from .parity import PARITY_TEXTS
from .specs import BATCH_SEQ, ExportSpec, GraphPlan

HEADS = ("dense", "sparse", "colbert")
HEAD_FILES = {"colbert": "colbert_linear.pt", "sparse": "sparse_linear.pt"}
#: the tokens FlagEmbedding drops from lexical weights (M3Embedder._process_token_weights)
DROPPED_SPECIAL_TOKENS = ("cls_token", "eos_token", "pad_token", "unk_token")
OPTIMIZER_TYPE = "bgert_m3"
F = torch.nn.functional


class M3Heads(torch.nn.Module):
    """XLM-R backbone + the requested M3 heads, exactly as FlagEmbedding's M3 inference forward."""

    def __init__(self, model: torch.nn.Module, colbert: torch.nn.Linear | None, sparse: torch.nn.Linear | None,
                 heads: tuple[str, ...], normalize: bool = True):
        super().__init__()
        self.model, self.colbert, self.sparse = model, colbert, sparse
        self.heads, self.normalize = heads, normalize

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        out = []
        if "dense" in self.heads:
            dense = h[:, 0]
            out.append(F.normalize(dense, dim=-1) if self.normalize else dense)
        if "sparse" in self.heads:
            out.append(torch.relu(self.sparse(h)).squeeze(-1))
        if "colbert" in self.heads:
            col = self.colbert(h[:, 1:]) * attention_mask[:, 1:, None].to(h.dtype)
            out.append(F.normalize(col, dim=-1) if self.normalize else col)
        return tuple(out)


def load_head(path: str, in_features: int, name: str) -> torch.nn.Linear:
    """A head state_dict ({weight [out, in], bias [out]}) loaded with weights_only=True, shape-checked."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: a BGE-M3 checkpoint needs colbert_linear.pt and "
                                "sparse_linear.pt beside its weights (FlagEmbedding would silently use random "
                                "heads). Copy them in, or export --kind embedder for the dense output only.")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "weight" not in state or state["weight"].dim() != 2:
        raise ValueError(f"{path} is not a Linear state_dict with 'weight' and 'bias'")
    out_features, got_in = state["weight"].shape
    if got_in != in_features or (name == "sparse" and out_features != 1):
        raise ValueError(f"{path}: weight shape {tuple(state['weight'].shape)} does not fit the backbone "
                         f"(hidden size {in_features}{', 1 output' if name == 'sparse' else ''})")
    lin = torch.nn.Linear(in_features, out_features, bias="bias" in state)
    lin.load_state_dict(state)
    return lin.eval()


def add_flash_switch(model: onnx.ModelProto, mask_input: str = "attention_mask") -> int:
    """Wrap each masked MultiHeadAttention in If(no padding in the batch) → the same node without
    its key_padding_mask, which ORT's CPU kernel runs as tiled flash attention (memory O(L), not
    O(L²)). Returns the number of nodes switched. Results are the same on both branches."""
    g = model.graph
    targets = [n for n in g.node if n.op_type == "MultiHeadAttention" and len(n.input) > 4 and n.input[4]]
    if not targets:
        return 0
    one = "bgert_flash_one"
    g.initializer.append(helper.make_tensor(one, TensorProto.INT64, [], [1]))
    cond_nodes = [helper.make_node("ReduceMin", [mask_input], ["bgert_mask_min"], keepdims=0, name="bgert_mask_min"),
                  helper.make_node("Equal", ["bgert_mask_min", one], ["bgert_unpadded"], name="bgert_unpadded")]
    nodes = list(g.node)
    for i, n in enumerate(targets):
        branches = {}
        for branch, inputs in (("then", list(n.input[:4])), ("else", list(n.input))):
            out = f"{n.output[0]}_{branch}"
            node = helper.make_node("MultiHeadAttention", inputs, [out], domain=n.domain, name=f"{n.name}_{branch}")
            node.attribute.extend(n.attribute)
            branches[branch] = helper.make_graph([node], f"{n.name}_{branch}", [],
                                                 [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)])
        switch = helper.make_node("If", ["bgert_unpadded"], list(n.output[:1]), name=f"{n.name}_flash_switch",
                                  then_branch=branches["then"], else_branch=branches["else"])
        nodes[nodes.index(n)] = switch
    del g.node[:]
    g.node.extend(cond_nodes + nodes)
    return len(targets)


class M3OnnxModel(BertOnnxModel):
    """ORT's BERT fusions with MultiHeadAttention (separate Q/K/V), then the flash switch."""

    flash_switches = 0
    model_type = OPTIMIZER_TYPE  # its name in the manifest's recipes

    def optimize(self, options: FusionOptions | None = None, add_dynamic_axes: bool = False) -> None:
        options = FusionOptions("bert")  # this spec decides the fusions: BERT's, with MHA instead of Attention
        options.use_multi_head_attention = True
        super().optimize(options, add_dynamic_axes)
        self.flash_switches = add_flash_switch(self.model)

    def topological_sort(self, is_deterministic: bool = False, dump_model_on_failure: bool = False) -> None:
        """ORT's sort looks at node inputs only; an If's subgraph also reads q/k/v/bias/mask from the
        outer graph, so list those as inputs while sorting (else the If lands before its MatMuls)."""
        for n in self.model.graph.node:
            if n.op_type == "If":
                n.input.extend(dict.fromkeys(i for a in n.attribute for sn in a.g.node for i in sn.input if i))
        try:
            super().topological_sort(is_deterministic, dump_model_on_failure)
        finally:
            for n in self.model.graph.node:
                if n.op_type == "If":
                    del n.input[1:]  # an If's only real input is its condition

    def get_fused_operator_statistics(self) -> dict[str, int]:
        stats = super().get_fused_operator_statistics()
        stats["MultiHeadAttention"] = len(self.get_nodes_by_op_type("MultiHeadAttention")) + self.flash_switches
        stats["FlashAttentionSwitch"] = self.flash_switches
        return stats


class M3Spec(ExportSpec):
    optimizer_model_type = M3OnnxModel  # our own fusion class (bgert.export.onnx_io.fuse runs it)
    outputs = {"dense": {0: "batch"}, "sparse": BATCH_SEQ, "colbert": {0: "batch", 1: "colbert_tokens"}}

    def __init__(self, info, options):
        super().__init__(info, options)
        heads = options.get("heads") or list(HEADS)
        unknown = [h for h in heads if h not in HEADS]
        if unknown or not heads:
            raise ValueError(f"--heads {','.join(heads)}: unknown head(s) {unknown}; choose from {','.join(HEADS)}")
        self.heads = tuple(h for h in HEADS if h in heads)
        self.outputs = {k: v for k, v in M3Spec.outputs.items() if k in self.heads}
        self.normalize = True if options.get("normalize") is None else bool(options["normalize"])
        self._module: M3Heads | None = None

    @property
    def module(self) -> M3Heads:
        if self._module is None:
            backbone = load_encoder(self.info.path)
            hidden = int(backbone.config.hidden_size)
            heads = {name: load_head(os.path.join(self.info.path, f), hidden, name) for name, f in HEAD_FILES.items()}
            self._module = M3Heads(backbone, heads["colbert"] if "colbert" in self.heads else None,
                                   heads["sparse"] if "sparse" in self.heads else None,
                                   self.heads, self.normalize).eval()
            self._colbert_dim = heads["colbert"].out_features
        return self._module

    def graph_plans(self) -> list[GraphPlan]:
        return [GraphPlan(file="model.onnx", module=self.module, output_names=list(self.heads))]

    def manifest_fields(self, hf_tokenizer: Any) -> dict[str, Any]:
        cfg = self.module.model.config
        special = hf_tokenizer.special_tokens_map
        drop = sorted({int(hf_tokenizer.convert_tokens_to_ids(special[t])) for t in DROPPED_SPECIAL_TOKENS
                       if t in special})
        return {
            "heads": list(self.heads),
            "normalize": self.normalize,
            "dim": int(cfg.hidden_size),
            "colbert_dim": int(self._colbert_dim),
            "pooling": "cls",
            "sparse_drop_ids": drop,
            "clean_up_tokenization_spaces": bool(getattr(hf_tokenizer, "clean_up_tokenization_spaces", False)),
            "query_instruction": None,
            "query_instruction_format": "{}{}",
            "attention": "MultiHeadAttention; unpadded batches take ORT's flash kernel (If on the mask)",
        }

    def torch_reference(self, hf_tokenizer: Any, texts: list[str], max_length: int) -> list[tuple[np.ndarray, ...]]:
        """Per text (no padding at all): (ids, the module's outputs…) from PyTorch."""
        out = []
        with torch.no_grad():
            for t in texts:
                enc = hf_tokenizer(t, truncation=True, max_length=max_length, return_tensors="pt")
                res = self.module(enc["input_ids"], enc["attention_mask"])
                out.append((enc["input_ids"][0].numpy(), *(r[0].numpy() for r in res)))
        return out

    def parity(self, artifact_dir: str, hf_tokenizer: Any, precision: str = "fp32") -> dict[str, Any]:
        from bgert.runtime.m3 import M3Embedder

        model = M3Embedder(artifact_dir, precision=precision, verify=False)
        ref = self.torch_reference(hf_tokenizer, PARITY_TEXTS, self.info.max_length)
        got = model.encode(PARITY_TEXTS, max_length=self.info.max_length, return_dense="dense" in self.heads,
                           return_sparse="sparse" in self.heads, return_colbert_vecs="colbert" in self.heads)
        result: dict[str, Any] = {"reference": "torch fp32 (transformers XLMRobertaModel + M3 heads)",
                                  "heads": list(self.heads)}
        cols = dict(zip(self.heads, zip(*(r[1:] for r in ref))))
        cos_min = []
        if "dense" in cols:
            result["dense"] = cosine_stats(np.stack(cols["dense"]), got["dense_vecs"])
            cos_min.append(result["dense"]["cos_min"])
        if "colbert" in cols:
            n_real = [len(r[0]) - 1 for r in ref]
            ref_rows = np.concatenate([c[:n] for c, n in zip(cols["colbert"], n_real)])
            result["colbert"] = cosine_stats(ref_rows, np.concatenate(got["colbert_vecs"]))
            cos_min.append(result["colbert"]["cos_min"])
        if "sparse" in cols:
            drop = set(model.sparse_drop_ids)
            diff = 0.0
            for (ids, *_), w, lw in zip(ref, cols["sparse"], got["lexical_weights"]):
                want: dict[str, float] = {}
                for i, x in zip(ids.tolist(), w.tolist()):
                    if i not in drop and x > 0:
                        want[str(i)] = max(x, want.get(str(i), 0.0))
                diff = max([diff, *(abs(want.get(k, 0.0) - float(lw.get(k, 0.0))) for k in set(want) | set(lw))])
            result["sparse"] = {"max_abs_diff": diff, "n": len(ref)}
        result["cos_min"] = min(cos_min) if cos_min else 1.0
        result["cos_mean"] = float(np.mean([result[h]["cos_mean"] for h in ("dense", "colbert") if h in result]
                                           or [1.0]))
        result["max_abs_diff"] = max(result[h]["max_abs_diff"] for h in self.heads)
        if precision == "fp32" and result.get("sparse", {}).get("max_abs_diff", 0.0) > 1e-3:
            from .errors import ExportError

            raise ExportError(f"fp32 export misses its parity gate: sparse weights differ from PyTorch by "
                              f"{result['sparse']['max_abs_diff']:.2e} > 1e-3. This is a bug: please report it.")
        return result
