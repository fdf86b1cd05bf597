"""Detect what a checkpoint directory holds, from its files alone (no weights loaded).

Each registered family (bgert.runtime.registry) says how strongly the checkpoint looks like its kind:
its own files (BGE-M3's colbert_linear.pt / sparse_linear.pt), then config.json ``architectures`` and
``auto_map``, then ``model_type`` (with the sentence-transformers files), and the directory name only
as a last hint. The strongest family wins; a tie is an error listing the candidates and ``--kind``.
The kind's export spec then reads its family's settings (pooling, normalisation, max length…) into
the ``ModelInfo``.
"""
from __future__ import annotations

import json
import os
from typing import Any

from bgert.runtime.registry import FAMILIES, STRENGTH_NAMES, Checkpoint

from .specs import ModelInfo, spec_class

BGE_EN_QUERY_INSTRUCTION = "Represent this sentence for searching relevant passages: "
BGE_ZH_QUERY_INSTRUCTION = "为这个句子生成表示以用于检索相关文章："


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


def checkpoint_name(path: str) -> str:
    base = os.path.basename(os.path.normpath(path))
    if base.startswith("checkpoint-"):
        base = os.path.basename(os.path.dirname(os.path.normpath(path)))
    return base.lower()


def checkpoint(path: str) -> Checkpoint:
    """What detection reads: config.json, the directory's file names and its (lower-case) name."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path} not found: {path!r} is not a Hugging Face checkpoint directory")
    return Checkpoint(path=path, name=checkpoint_name(path), config=_read_json(cfg_path), files=frozenset(os.listdir(path)))


def detect_kind(ck: Checkpoint) -> str:
    """The kind of the registered family that matches ``ck`` most strongly (ValueError when none or a tie)."""
    strengths = {kind: fam.detect(ck) for kind, fam in FAMILIES.items()}
    best = max(strengths.values(), default=0)
    if best == 0:
        raise ValueError(f"cannot tell what {ck.path} is (model_type={ck.model_type!r}, "
                         f"architectures={ck.architectures}); pass --kind, one of: {', '.join(FAMILIES)}")
    top = [k for k, v in strengths.items() if v == best]
    if len(top) > 1:
        raise ValueError(f"{ck.path} could be any of {', '.join(top)} (each matches by its "
                         f"{STRENGTH_NAMES[best]}); pass --kind {'|'.join(top)}")
    return top[0]


def detect(path: str, kind: str = "auto") -> ModelInfo:
    """Describe the checkpoint at ``path``; ``kind`` overrides the detected model kind."""
    ck = checkpoint(path)
    if kind == "auto":
        kind = detect_kind(ck)
    info = ModelInfo(path=path, kind=kind, family=ck.model_type, config=ck.config,
                     max_length=model_max_length(path, ck.config))
    spec_class(kind).describe(info)
    return info
