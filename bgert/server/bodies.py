"""Request-body pieces shared by the routes of several APIs (bgert.server.app, bgert.server.cohere)."""
from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field

#: BGE-M3's compute_score modes, the rerank routes' ``mode`` (bgert.runtime.m3.SCORE_KEYS)
M3Mode = Literal["dense", "sparse", "colbert", "sparse+dense", "colbert+sparse+dense"]


class Body(BaseModel):
    """A request body; fields an API has and bgert does not are ignored."""

    model_config = ConfigDict(extra="ignore")


class Reranking(Body):
    """The bgert fields every rerank route takes."""

    cutoff_layers: Union[int, list[int], None] = Field(None, description="bgert: layerwise/lightweight rerankers")
    prompt: str | None = Field(None, description="bgert: the LLM reranker's prompt")
    mode: M3Mode | None = Field(None, description="bgert, BGE-M3: which compute_score value is the score "
                                                  "(default colbert+sparse+dense)")
    weights: list[float] | None = Field(None, min_length=3, max_length=3, description=(
        "bgert, BGE-M3: compute_score's weights_for_different_modes [dense, sparse, colbert] (default [1, 1, 1])"))
