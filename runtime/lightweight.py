"""bge-reranker-v2.5-gemma2-lightweight with LightWeightFlagLLMReranker's ``compute_score``.

Inputs are FlagLLMReranker's (``[bos] "A: "+query "\\n" "B: "+passage "\\n" prompt``, BOS always,
default prompt ``Predict whether passage B contains an answer to query A.``), right-padded to a
multiple of 8, plus ``query_lengths`` (``len(bos+query+sep)``) and ``prompt_lengths``
(``len(sep+prompt)``) that tell the token compression where the passage is. Each exported
(cutoff_layers, compress_ratio, compress_layers) combination is one graph that already applies the
final-logit softcap 30·tanh(x/30); a call picks the graph of its combination, compared the way the
model runs it (cutoffs sorted, compression only at layers 0 < c < max(cutoffs), ratio 1 = off).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .base import check_call_options
from .manifest import Graph
from .registry import register
from .reranker import LLMReranker, LLMRerankerSection, Pair, _RerankerFamily, check_pairs
from .windows import windowed
from .request import Item, Request, request_method


def canonical(cutoff_layers: Any, compress_ratio: Any, compress_layers: Any, start_layer: int, num_layers: int,
              layer_sep: int = 1) -> dict[str, Any]:
    """A combination as the model runs it (bgert.export.lightweight_spec stores the same form)."""
    cuts = [num_layers] if cutoff_layers is None else [cutoff_layers] if isinstance(cutoff_layers, (int, np.integer)) \
        else list(cutoff_layers)
    valid = range(start_layer, num_layers + 1, layer_sep)
    kept = sorted({int(c) for c in cuts if c in valid})
    if not kept:
        raise ValueError(f"cutoff layers {cutoff_layers} are outside this model's {list(valid)}")
    ratio = int(compress_ratio or 1)
    if ratio < 1:
        raise ValueError(f"compress_ratio must be >= 1, got {compress_ratio}")
    layers = sorted({int(c) for c in (compress_layers or []) if 0 < int(c) < kept[-1]}) if ratio > 1 else []
    return {"cutoff_layers": kept, "compress_ratio": ratio if layers else 1, "compress_layers": layers}


class LightweightReranker(LLMReranker):
    """Gemma2 lightweight reranker: scores at exported cutoff layers, with optional token compression.

    >>> r = LightweightReranker("artifacts/bge-reranker-v2.5-gemma2-lightweight")
    >>> r.compute_score(pairs, cutoff_layers=[28], compress_ratio=2, compress_layers=[24, 40])
    """

    left_truncation_refused = ("its token compression finds the passage by the lengths of the query and prompt "
                               "around it, and cutting from the passage's start would drop the 'B: ' marker and "
                               "separator before it; truncate on the right (TEI truncation_direction Right, "
                               "Cohere END) or shorten the passage")

    def __init__(self, model_dir: str, *, cutoff_layers: int | Sequence[int] | None = None,
                 compress_ratio: int = 1, compress_layers: Sequence[int] = (8,), **kwargs: Any):
        super().__init__(model_dir, **kwargs)
        m = self.manifest.section
        # the reference pads on the right whatever the tokenizer says (compression needs it); the export
        # stores that side in the manifest, and the tokenizer itself is left as it is
        self.padding_side = m.padding_side
        self.layout = (m.start_layer, m.num_hidden_layers, m.layer_sep)
        self.combinations = [dict(c) for c in m.combinations]
        self.cutoff_layers, self.compress_ratio, self.compress_layers = cutoff_layers, compress_ratio, compress_layers

    def graph_for(self, combo: dict[str, Any]) -> Graph:
        """The graph of exactly this combination; ValueError listing the exported ones otherwise."""
        if combo in self.combinations:
            for g in self.manifest.graphs:
                if g.precision == self.precision and g.cutoff_layers == combo["cutoff_layers"] and all(
                        g.extra.get(k) == combo[k] for k in ("compress_ratio", "compress_layers")):
                    return g
        raise ValueError(f"cutoff_layers={combo['cutoff_layers']}, compress_ratio={combo['compress_ratio']}, "
                         f"compress_layers={combo['compress_layers']} was not exported; this artifact has "
                         f"{self.combinations}. Re-export with that combination (export(..., combinations=[...])).")

    @windowed(check_pairs)
    @request_method
    def compute_score(self, sentence_pairs: Pair | Sequence[Pair], batch_size: int | None = None,
                      query_max_length: int | None = None, max_length: int | None = None,
                      cutoff_layers: int | Sequence[int] | None = None, compress_ratio: int | None = None,
                      compress_layers: Sequence[int] | None = None, prompt: str | None = None,
                      normalize: bool | None = None, truncation_side: str | None = None,
                      **reference_only: Any) -> Request:
        """Scores per pair at each cutoff: a list for one cutoff, a list of lists (ascending layers) for several."""
        check_call_options(self.compute_score, reference_only)
        combo = canonical(self.cutoff_layers if cutoff_layers is None else cutoff_layers,
                          self.compress_ratio if compress_ratio is None else compress_ratio,
                          self.compress_layers if compress_layers is None else compress_layers, *self.layout)
        graph = self.graph_for(combo)
        pairs = check_pairs(sentence_pairs)
        n_cut = len(combo["cutoff_layers"])
        pieces, cut = self._pieces(pairs, *self._lengths(query_max_length, max_length), prompt,
                                   self._side(truncation_side))
        sep = len(self.tokenizer.encode([self.separator], add_special_tokens=False)[0])
        items = [Item(a + b + c, {"query_lengths": len(a) + sep, "prompt_lengths": len(c)}) for a, b, c in pieces]

        def finish(scores: np.ndarray) -> list[float] | list[list[float]]:
            scores = scores.reshape(len(items), n_cut)
            per_layer = [self._finish(scores[:, i], normalize) for i in range(n_cut)]
            return per_layer[0] if n_cut == 1 else per_layer

        return self._request(items, graph, batch_size, cut, finish, self.padding_side)


@dataclass(kw_only=True)
class LightweightSection(LLMRerankerSection):
    """The exported (cutoff_layers, compress_ratio, compress_layers) combinations and the layer layout."""

    output_name: str = "scores"
    combinations: list[dict[str, Any]]
    start_layer: int
    num_hidden_layers: int
    layer_sep: int = 1
    final_logit_softcapping: float | None = None
    padding_side: str = "right"


@register
class LightweightFamily(_RerankerFamily):
    """bge-reranker-v2.5-gemma2-lightweight (LightWeightFlagLLMReranker)."""

    name = "lightweight_reranker"
    runtime_class = LightweightReranker
    section = LightweightSection
    export_spec = "bgert.export.lightweight_spec:LightweightRerankerSpec"
    bench_adapter = None
    bench_not_covered = ("its reference, FlagEmbedding's LightWeightFlagLLMReranker, runs only under "
                         "transformers <= 4.47 (this environment has a newer one); its parity is checked "
                         "against stored reference scores by tests/test_lightweight.py")
    outputs = {"scores": "scores"}
    architectures = ("*CostWise*",)
    model_types = ("cost_wise_gemma",)
    name_hints = ("lightweight",)
    triton_text_inputs = None  # several graphs and extra length inputs: the model steps only
