"""Detect what a checkpoint directory holds, from its files alone (no weights loaded).

Reads config.json (architectures, model_type, auto_map), the sentence-transformers files
(modules.json, 1_Pooling/config.json, sentence_bert_config.json) and the BGE-M3 head files, the
way FlagAutoModel / FlagAutoReranker decide, and returns a ``ModelInfo``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

BGE_EN_QUERY_INSTRUCTION = "Represent this sentence for searching relevant passages: "
BGE_ZH_QUERY_INSTRUCTION = "为这个句子生成表示以用于检索相关文章："

ENCODER_TYPES = ("bert", "xlm-roberta", "roberta", "camembert", "distilbert", "mpnet", "electra", "deberta-v2")


@dataclass
class ModelInfo:
    """What export needs to know about a checkpoint before loading it."""

    path: str
    kind: str
    family: str
    config: dict[str, Any]
    pooling: str = "cls"
    normalize: bool = True
    max_length: int = 512
    query_instruction: str | None = None
    query_instruction_format: str = "{}{}"
    notes: list[str] = field(default_factory=list)


def _read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _opt_json(path: str) -> Any:
    return _read_json(path) if os.path.isfile(path) else None


def sentence_transformers_settings(path: str) -> dict[str, Any]:
    """Pooling, normalisation and max length from a sentence-transformers layout, if present."""
    out: dict[str, Any] = {}
    modules = _opt_json(os.path.join(path, "modules.json"))
    if modules:
        types = [m.get("type", "") for m in modules]
        out["normalize"] = any(t.endswith("Normalize") for t in types)
        for m in modules:
            if m.get("type", "").endswith("Pooling"):
                pcfg = _opt_json(os.path.join(path, m.get("path", "1_Pooling"), "config.json")) or {}
                if pcfg.get("pooling_mode_cls_token"):
                    out["pooling"] = "cls"
                elif pcfg.get("pooling_mode_mean_tokens"):
                    out["pooling"] = "mean"
                elif pcfg.get("pooling_mode_lasttoken"):
                    out["pooling"] = "last_token"
                else:
                    modes = [k for k, v in pcfg.items() if k.startswith("pooling_mode") and v]
                    raise ValueError(f"{path}: sentence-transformers pooling {modes} is not supported "
                                     "(cls, mean and last-token are)")
    sbert = _opt_json(os.path.join(path, "sentence_bert_config.json"))
    if sbert and sbert.get("max_seq_length"):
        out["max_length"] = int(sbert["max_seq_length"])
    return out


def model_max_length(path: str, config: dict[str, Any]) -> int:
    """The model's own limit: tokenizer_config model_max_length if sane, else its position table."""
    positions = int(config.get("max_position_embeddings", 512))
    if config.get("model_type") in ("xlm-roberta", "roberta", "camembert"):
        positions -= 2  # positions start after the padding index
    tcfg = _opt_json(os.path.join(path, "tokenizer_config.json")) or {}
    mml = tcfg.get("model_max_length")
    if isinstance(mml, (int, float)) and 0 < mml < 1_000_000:
        return int(min(mml, positions))
    return positions


def _name(path: str) -> str:
    base = os.path.basename(os.path.normpath(path))
    if base.startswith("checkpoint-"):
        base = os.path.basename(os.path.dirname(os.path.normpath(path)))
    return base.lower()


def detect(path: str, kind: str = "auto") -> ModelInfo:
    """Describe the checkpoint at ``path``; ``kind`` overrides the detected model kind."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path} not found: {path!r} is not a Hugging Face checkpoint directory")
    config = _read_json(cfg_path)
    archs = config.get("architectures") or []
    model_type = config.get("model_type", "")
    name = _name(path)
    if kind == "auto":
        kind = _detect_kind(path, name, model_type, archs)
    info = ModelInfo(path=path, kind=kind, family=model_type, config=config,
                     max_length=model_max_length(path, config))
    if kind == "embedder":
        st = sentence_transformers_settings(path)
        info.pooling = st.get("pooling", "cls")
        info.normalize = st.get("normalize", True)
        if "max_length" in st:
            info.max_length = min(st["max_length"], info.max_length)
        if name.startswith("bge-") and "-en" in name:
            info.query_instruction = BGE_EN_QUERY_INSTRUCTION
        elif name.startswith("bge-") and "-zh" in name:
            info.query_instruction = BGE_ZH_QUERY_INSTRUCTION
    return info


def _detect_kind(path: str, name: str, model_type: str, archs: list[str]) -> str:
    has = lambda f: os.path.isfile(os.path.join(path, f))  # noqa: E731
    if has("colbert_linear.pt") and has("sparse_linear.pt"):
        return "m3"
    if "bge-m3" in name:
        raise ValueError(f"{path} looks like bge-m3 but lacks colbert_linear.pt / sparse_linear.pt; "
                         "FlagEmbedding would silently use random heads. Copy both files in, or pass "
                         "--kind embedder for the dense output only.")
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return "reranker"
    if any("LayerWise" in a for a in archs) or model_type == "minicpm" or "layerwise" in name:
        return "layerwise_reranker"
    if any("CostWise" in a for a in archs) or model_type == "cost_wise_gemma" or "lightweight" in name:
        return "lightweight_reranker"
    if "reranker" in name and any(a.endswith("ForCausalLM") for a in archs):
        return "llm_reranker"
    if model_type in ("gemma2", "mistral", "qwen2", "qwen3", "llama") or any(a.endswith("ForCausalLM") for a in archs):
        return "decoder_embedder"
    if model_type in ENCODER_TYPES:
        return "embedder"
    raise ValueError(f"cannot tell what {path} is (model_type={model_type!r}, architectures={archs}); "
                     "pass --kind explicitly")
