"""Rerankers with FlagEmbedding 1.4.2's ``compute_score``.

* ``Reranker``: cross-encoders (FlagReranker: bge-reranker-base, -large, -v2-m3).
* ``LLMReranker``: bge-reranker-v2-gemma (FlagLLMReranker).
* ``LayerwiseReranker``: bge-reranker-v2-minicpm-layerwise (LayerWiseFlagLLMReranker), early exit.

Inputs are assembled as the reference does, from tokenizer.json and the manifest alone: each side
of a pair is tokenised without special tokens and truncated on its own (the query to
``query_max_length``, by default ``max_length*3//4``; the passage to ``max_length``), then the pair
is joined and only the passage is trimmed to fit (HF's ``truncation='only_second'``). Scores come
back as a ``list`` of Python floats, also for a single pair; ``normalize=True`` applies the sigmoid
in float64.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from .base import BgeModel, check_call_options
from .embedder import format_instruction
from .manifest import ArtifactError, Graph, Manifest
from .registry import MODEL_TYPE, Checkpoint, Family, register
from .request import Item, Request, request_method
from .tokenize import TextTokenizer, check_max_length, check_side, check_texts
from .windows import windowed

log = logging.getLogger("bgert")

Pair = tuple[str, str]
#: placeholders for the query and the passage in a cross-encoder's stored pair template
FIRST, SECOND = -1, -2


def sigmoid(scores: Sequence[float]) -> list[float]:
    """FlagEmbedding's normalisation: 1/(1+exp(-x)) in float64."""
    return [float(1 / (1 + np.exp(-np.float64(x)))) for x in scores]


def check_pairs(sentence_pairs: Any, start: int = 0) -> list[Pair]:
    """One (query, passage) pair or a list of them → list of pairs; TypeError naming a bad item (its index
    counted from ``start``, for a window of a longer list)."""
    if isinstance(sentence_pairs, (list, tuple)) and sentence_pairs and isinstance(sentence_pairs[0], str):
        sentence_pairs = [sentence_pairs]
    if not isinstance(sentence_pairs, (list, tuple)):
        raise TypeError("sentence_pairs must be a (query, passage) pair or a list of pairs, "
                        f"got {type(sentence_pairs).__name__}")
    pairs = []
    for i, pair in enumerate(sentence_pairs, start):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise TypeError(f"sentence_pairs[{i}] must be a (query, passage) pair, got {pair!r:.80}")
        query, passage = check_texts(list(pair), f"sentence_pairs[{i}]")[0]
        pairs.append((query, passage))
    return pairs


def trim_second(first_len: int, second: list[int], limit: int, side: str) -> list[int]:
    """HF ``prepare_for_model(truncation='only_second')``: cut the excess from the second sequence;
    when it is too short to absorb the excess, HF cuts nothing, and neither does this."""
    excess = first_len + len(second) - limit
    if excess <= 0 or len(second) <= excess:
        return second
    return second[:-excess] if side == "right" else second[excess:]


def check_fits(sequences: Sequence[Sequence[int]], model_max_length: int, what: str = "sentence_pairs") -> None:
    """Every assembled pair fits the model's positions (only the passage is trimmed, so a long query may not)."""
    for i, s in enumerate(sequences):
        if len(s) > model_max_length:
            raise ValueError(f"{what}[{i}] needs {len(s)} tokens, more than this model's {model_max_length} "
                             "positions: only the passage is cut to fit max_length, so lower query_max_length "
                             "(or max_length).")


def default_query_max_length(max_length: int) -> int:
    """FlagEmbedding's default query length for rerankers: three quarters of ``max_length``."""
    return max_length * 3 // 4


def tokenize_sides(tokenizer: TextTokenizer, queries: Sequence[str], passages: Sequence[str], query_max_length: int,
                   max_length: int, side: str) -> tuple[list[tuple[list[int], list[int]]], bool]:
    """Each side tokenised without special tokens and truncated on its own while tokenising (the query
    to ``query_max_length``, the passage to ``max_length``, keeping the end opposite ``side``); and
    whether any side was cut."""
    q, q_cut = tokenizer.encode_checked(queries, query_max_length, add_special_tokens=False, side=side, warn=False)
    p, p_cut = tokenizer.encode_checked(passages, max_length, add_special_tokens=False, side=side, warn=False)
    return list(zip(q, p)), q_cut or p_cut


def pair_template(manifest: Manifest) -> tuple[list[int], list[int] | None]:
    """A cross-encoder's pair template from its manifest: ids with one FIRST and one SECOND placeholder,
    and the token type ids (None where the model takes none)."""
    template = manifest.section.pair_template
    ids = list(template.get("input_ids") or [])
    if ids.count(FIRST) != 1 or ids.count(SECOND) != 1:
        raise ArtifactError(f"{manifest.root}: the manifest's pair_template is missing or damaged; "
                            "re-export the artifact.")
    return ids, template.get("token_type_ids")


def bos_prefix(manifest: Manifest) -> list[int]:
    """The id an LLM reranker puts before the query (FlagLLMReranker's bos), or none."""
    bos = manifest.section.bos_prefix_id
    return [] if bos is None else [int(bos)]


def assemble_pair(template: Sequence[int], template_types: Sequence[int] | None, query: list[int],
                  passage: list[int], max_length: int, side: str) -> tuple[list[int], list[int]]:
    """A cross-encoder's input: the tokenizer's pair template (special ids, FIRST/SECOND placeholders)
    filled with the query and the passage, the passage trimmed to fit; and the token type ids."""
    passage = trim_second(len(query) + len(template) - 2, passage, max_length, side)
    ids: list[int] = []
    types: list[int] = []
    for pos, tok in enumerate(template):
        piece = query if tok == FIRST else passage if tok == SECOND else [tok]
        ids += piece
        types += [template_types[pos] if template_types else 0] * len(piece)
    return ids, types


def llm_pieces(tokenizer: TextTokenizer, sides: Sequence[tuple[list[int], list[int]]], bos_prefix: list[int],
               separator: str, prompt: str, max_length: int, side: str) -> list[tuple[list[int], list[int], list[int]]]:
    """FlagLLMReranker's assembly as (bos+query, sep+passage, sep+prompt) per pair of tokenised
    sides: the passage (with its separator) trimmed to ``max_length + len(sep) + len(prompt)`` overall."""
    sep, prompt_ids = tokenizer.encode([separator, prompt], add_special_tokens=False)
    limit = max_length + len(sep) + len(prompt_ids)
    out = []
    for q, p in sides:
        first = bos_prefix + q
        out.append((first, trim_second(len(first), sep + p, limit, side), sep + prompt_ids))
    return out


class _PairReranker(BgeModel):
    """Shared part of the rerankers: settings, pair tokenisation, batched scoring, normalisation."""

    #: why this family cannot keep the end of an over-long passage (``truncation_side="left"``), or None
    left_truncation_refused: str | None = None

    def __init__(self, model_dir: str, *, query_max_length: int | None = None, max_length: int | None = None,
                 normalize: bool = False, query_instruction_for_rerank: str | None = None,
                 query_instruction_format: str = "{}{}", passage_instruction_for_rerank: str | None = None,
                 passage_instruction_format: str = "{}{}", **kwargs: Any):
        super().__init__(model_dir, **kwargs)
        m = self.manifest.section
        self.model_max_length = self.manifest.max_length
        self.max_length = check_max_length(m.default_max_length if max_length is None else max_length,
                                           self.model_max_length)
        self.query_max_length = query_max_length
        self.normalize = normalize
        self.query_instruction_for_rerank = (query_instruction_for_rerank if query_instruction_for_rerank is not None
                                             else m.query_instruction_for_rerank)
        self.query_instruction_format = query_instruction_format
        self.passage_instruction_for_rerank = (passage_instruction_for_rerank
                                               if passage_instruction_for_rerank is not None
                                               else m.passage_instruction_for_rerank)
        self.passage_instruction_format = passage_instruction_format
        self.truncation_side = m.truncation_side
        self.output_name = m.output_name
        self.pad_to_multiple_of = m.pad_to_multiple_of
        self._warned_truncation = False

    def _lengths(self, query_max_length: int | None, max_length: int | None) -> tuple[int, int]:
        """(query_max_length, max_length) for one call, with FlagEmbedding's defaults."""
        max_length = check_max_length(self.max_length if max_length is None else max_length, self.model_max_length)
        if query_max_length is None:
            query_max_length = (self.query_max_length if self.query_max_length is not None
                                else default_query_max_length(max_length))
        return check_max_length(query_max_length), max_length

    def _side(self, truncation_side: str | None) -> str:
        """The side a call cuts over-long texts on: its ``truncation_side``, else the artifact's (the
        reference tokenizer's); ValueError where the family cannot keep a passage's end."""
        if truncation_side is None:
            return self.truncation_side
        side = check_side(truncation_side)
        if side == "left" and self.truncation_side != "left" and self.left_truncation_refused:
            raise ValueError(f"truncation_side='left' is not supported by {type(self).__name__}: "
                             f"{self.left_truncation_refused}")
        return side

    def _sides(self, pairs: list[Pair], query_max_length: int, max_length: int,
               side: str | None = None) -> tuple[list[tuple[list[int], list[int]]], bool]:
        """Each side with its instruction, tokenised without special tokens and truncated on its own
        (on ``side``, default the artifact's); and whether any side was cut."""
        queries = format_instruction(self.query_instruction_for_rerank, self.query_instruction_format,
                                     [q for q, _ in pairs])
        passages = format_instruction(self.passage_instruction_for_rerank, self.passage_instruction_format,
                                      [p for _, p in pairs])
        sides, cut = tokenize_sides(self.tokenizer, queries, passages, query_max_length, max_length,
                                    side or self.truncation_side)
        if cut and not self._warned_truncation:
            self._warned_truncation = True
            log.warning("bgert: some queries/passages are longer than query_max_length=%d / max_length=%d tokens "
                        "and were truncated (as the reference does). This is reported once per model.",
                        query_max_length, max_length)
        return sides, cut

    def _request(self, items: list[Item], graph: Graph, batch_size: int | None, truncated: bool,
                 finish: Callable[[np.ndarray], Any], padding_side: str | None = None) -> Request:
        """A request scoring ``items`` with ``graph``, padded on ``padding_side`` (else the tokenizer's);
        ``finish`` gets the scores in order ([n] or [n, k])."""
        check_fits([it.ids for it in items], self.model_max_length)

        def collect(rows: list[np.ndarray]) -> Any:
            return finish(np.asarray(rows, dtype=np.float32))

        return Request(self.job(graph, [self.output_name], self.pad_to_multiple_of, padding_side), items, collect,
                       truncated=truncated, batch_size=batch_size)

    def _finish(self, scores: np.ndarray, normalize: bool | None) -> list[float]:
        normalize = self.normalize if normalize is None else normalize
        return sigmoid(scores) if normalize else scores.tolist()


class Reranker(_PairReranker):
    """Cross-encoder reranker with FlagReranker's ``compute_score``.

    >>> r = Reranker("artifacts/bge-reranker-v2-m3")
    >>> r.compute_score([["what is panda?", "The giant panda is a bear."], ["what is panda?", "hi"]])
    [5.26, -8.18]
    """


    def __init__(self, model_dir: str, **kwargs: Any):
        super().__init__(model_dir, **kwargs)
        self._template, self._template_types = pair_template(self.manifest)

    def _assemble(self, query: list[int], passage: list[int], max_length: int,
                  side: str) -> tuple[list[int], list[int]]:
        """Special tokens around the pair (the tokenizer's own template), the passage trimmed to fit on ``side``."""
        return assemble_pair(self._template, self._template_types, query, passage, max_length, side)

    @windowed(check_pairs)
    @request_method
    def compute_score(self, sentence_pairs: Pair | Sequence[Pair], batch_size: int | None = None,
                      query_max_length: int | None = None, max_length: int | None = None,
                      normalize: bool | None = None, truncation_side: str | None = None,
                      **reference_only: Any) -> Request:
        """Relevance logit per (query, passage) pair (sigmoid with ``normalize=True``), as a list.
        ``truncation_side`` (bgert): "left" keeps the end of an over-long query or passage, "right" its
        start (default: the artifact's, i.e. the reference tokenizer's)."""
        check_call_options(self.compute_score, reference_only)
        pairs = check_pairs(sentence_pairs)
        side = self._side(truncation_side)
        query_max_length, max_length = self._lengths(query_max_length, max_length)
        sides, cut = self._sides(pairs, query_max_length, max_length, side)
        built = [self._assemble(q, p, max_length, side) for q, p in sides]
        items = [Item(ids, {"token_type_ids": types} if self._template_types else None) for ids, types in built]
        return self._request(items, self.graph(), batch_size, cut, lambda scores: self._finish(scores, normalize))


class LLMReranker(_PairReranker):
    """Decoder-only reranker with FlagLLMReranker's ``compute_score`` (bge-reranker-v2-gemma).

    The sequence is ``[bos] "A: "+query "\\n" "B: "+passage "\\n" prompt``, each piece tokenised on
    its own; the score is the ``Yes`` logit at the last token. ``prompt`` can be set per call or in
    the constructor (default: the reference's).
    """


    left_truncation_refused = ("its input puts the passage marker ('B: ') and a separator before the passage, "
                               "and cutting from the start would drop them with the passage's first tokens; "
                               "truncate on the right (TEI truncation_direction Right, Cohere END) or shorten "
                               "the passage")

    def __init__(self, model_dir: str, *, prompt: str | None = None, **kwargs: Any):
        super().__init__(model_dir, **kwargs)
        self.prompt = prompt
        self.separator = self.manifest.section.separator
        self.bos_prefix = bos_prefix(self.manifest)

    def _pieces(self, pairs: list[Pair], query_max_length: int, max_length: int, prompt: str | None,
                side: str | None = None) -> tuple[list[tuple[list[int], list[int], list[int]]], bool]:
        """``llm_pieces`` of these pairs, with the call's prompt, else the constructor's, else the manifest's,
        cut on ``side`` (default the artifact's); and whether any side was cut."""
        prompt = prompt if prompt is not None else self.prompt if self.prompt is not None else self.manifest.section.prompt
        side = side or self.truncation_side
        sides, cut = self._sides(pairs, query_max_length, max_length, side)
        return llm_pieces(self.tokenizer, sides, self.bos_prefix, self.separator, prompt, max_length, side), cut

    def _sequences(self, pairs: list[Pair], query_max_length: int, max_length: int,
                   prompt: str | None) -> list[list[int]]:
        """The token ids of each pair: the three pieces of ``_pieces`` joined."""
        return [a + b + c for a, b, c in self._pieces(pairs, query_max_length, max_length, prompt)[0]]

    def _items(self, pairs: list[Pair], query_max_length: int | None, max_length: int | None,
               prompt: str | None, side: str | None = None) -> tuple[list[Item], bool]:
        pieces, cut = self._pieces(pairs, *self._lengths(query_max_length, max_length), prompt, side)
        return [Item(a + b + c) for a, b, c in pieces], cut

    @windowed(check_pairs)
    @request_method
    def compute_score(self, sentence_pairs: Pair | Sequence[Pair], batch_size: int | None = None,
                      query_max_length: int | None = None, max_length: int | None = None,
                      prompt: str | None = None, normalize: bool | None = None, truncation_side: str | None = None,
                      **reference_only: Any) -> Request:
        """``Yes`` logit per (query, passage) pair (sigmoid with ``normalize=True``), as a list.
        ``truncation_side`` (bgert): "right" cuts an over-long passage at its end (see
        ``left_truncation_refused`` for "left")."""
        check_call_options(self.compute_score, reference_only)
        items, cut = self._items(check_pairs(sentence_pairs), query_max_length, max_length, prompt,
                                 self._side(truncation_side))
        return self._request(items, self.graph(), batch_size, cut, lambda scores: self._finish(scores, normalize))


class LayerwiseReranker(LLMReranker):
    """bge-reranker-v2-minicpm-layerwise with LayerWiseFlagLLMReranker's ``compute_score``.

    ``cutoff_layers`` picks the layers whose scores are returned: one layer gives a list of
    floats, several a list of lists in ascending layer order, each scored by its own layer's head.
    (The reference pairs heads with layers in the order the caller gave them, which is only right
    for ascending input; bgert sorts and de-duplicates, so it matches the reference for sorted
    input and stays correct for any other.) Each exported cutoff L has its own graph with only
    the first L layers: asking for lower cutoffs runs fewer layers. The default is the deepest
    exported cutoff (the last layer unless the export chose otherwise, as in the reference).
    """


    def __init__(self, model_dir: str, *, cutoff_layers: int | Sequence[int] | None = None, **kwargs: Any):
        super().__init__(model_dir, **kwargs)
        m = self.manifest.section
        self.exported_cutoffs = sorted(m.cutoff_layers)
        self.start_layer = m.start_layer
        self.num_hidden_layers = m.num_hidden_layers
        self.cutoff_layers = cutoff_layers

    def _cutoffs(self, cutoff_layers: int | Sequence[int] | None) -> list[int]:
        """Requested cutoffs: sorted, unique, out-of-range ones dropped with a warning (as the reference),
        ValueError for none left or for one that was not exported."""
        cutoffs = self.cutoff_layers if cutoff_layers is None else cutoff_layers
        if cutoffs is None:
            return [self.exported_cutoffs[-1]]
        cutoffs = [cutoffs] if isinstance(cutoffs, (int, np.integer)) else list(cutoffs)
        valid = range(self.start_layer, self.num_hidden_layers + 1)
        dropped = [c for c in cutoffs if c not in valid]
        if dropped:
            log.warning("bgert: cutoff layers %s are outside %d..%d and are dropped (as the reference does)",
                        dropped, valid.start, valid.stop - 1)
        cutoffs = sorted({int(c) for c in cutoffs if c in valid})
        if not cutoffs:
            raise ValueError(f"cutoff_layers must lie in [{valid.start}, {valid.stop - 1}]; "
                             f"this artifact has {self.exported_cutoffs}")
        missing = [c for c in cutoffs if c not in self.exported_cutoffs]
        if missing:
            raise ValueError(f"cutoff layers {missing} were not exported; this artifact has {self.exported_cutoffs}. "
                             f"Re-export with `bgert export ... --cutoff-layers "
                             f"{','.join(map(str, sorted(set(self.exported_cutoffs) | set(cutoffs))))}`.")
        return cutoffs

    def graph_for(self, cutoffs: Sequence[int]) -> Graph:
        """The graph that stops at ``max(cutoffs)`` layers (it scores every exported cutoff below)."""
        return self.graph(cutoff_layers=[c for c in self.exported_cutoffs if c <= max(cutoffs)])

    @windowed(check_pairs)
    @request_method
    def compute_score(self, sentence_pairs: Pair | Sequence[Pair], batch_size: int | None = None,
                      query_max_length: int | None = None, max_length: int | None = None,
                      cutoff_layers: int | Sequence[int] | None = None, prompt: str | None = None,
                      normalize: bool | None = None, truncation_side: str | None = None,
                      **reference_only: Any) -> Request:
        """Scores per pair at each requested cutoff layer: a list, or a list of lists (one per layer)."""
        check_call_options(self.compute_score, reference_only)
        cutoffs = self._cutoffs(cutoff_layers)
        graph = self.graph_for(cutoffs)
        items, cut = self._items(check_pairs(sentence_pairs), query_max_length, max_length, prompt,
                                 self._side(truncation_side))

        def finish(scores: np.ndarray) -> list[float] | list[list[float]]:
            scores = scores.reshape(len(items), len(graph.cutoff_layers))
            per_layer = [self._finish(scores[:, graph.cutoff_layers.index(c)], normalize) for c in cutoffs]
            return per_layer[0] if len(per_layer) == 1 else per_layer

        return self._request(items, graph, batch_size, cut, finish)


#: FlagReranker's / FlagLLMReranker's default max_length (capped by the model's own limit at export)
DEFAULT_MAX_LENGTH = 512


@dataclass(kw_only=True)
class RerankerSection:
    """The manifest keys every reranker has."""

    default_max_length: int = DEFAULT_MAX_LENGTH
    truncation_side: str = "right"
    output_name: str = "score"
    pad_to_multiple_of: int = 1
    query_instruction_for_rerank: str | None = None
    passage_instruction_for_rerank: str | None = None


@dataclass(kw_only=True)
class CrossEncoderSection(RerankerSection):
    """A cross-encoder: the tokenizer's pair template (ids with FIRST/SECOND placeholders, token types)."""

    pair_template: dict[str, Any]


@dataclass(kw_only=True)
class LLMRerankerSection(RerankerSection):
    """A decoder reranker: prompt, separator, the bos id put before the query, the ``Yes`` token."""

    prompt: str
    separator: str = "\n"
    bos_prefix_id: int | None = None
    yes_token_id: int | None = None


@dataclass(kw_only=True)
class LayerwiseSection(LLMRerankerSection):
    """A layerwise reranker: the exported cutoffs and the layer range they may come from."""

    output_name: str = "scores"
    cutoff_layers: list[int]
    start_layer: int
    num_hidden_layers: int


class _RerankerFamily(Family):
    """What the rerankers share: pairs in, scores out, bench adapter, Triton's pair inputs and sigmoid step."""

    bench_adapter = "bgert.benchmarks.bench_families:RerankerBench"
    triton_text_inputs = ("QUERY", "PASSAGE")
    triton_postprocess = "reranker"

    @classmethod
    def default_text_length(cls, manifest: Manifest) -> int:
        return manifest.section.default_max_length


@register
class CrossEncoderFamily(_RerankerFamily):
    """Cross-encoders (FlagReranker): bge-reranker-base, -large, -v2-m3, BERT cross-encoders."""

    name = "reranker"
    runtime_class = Reranker
    section = CrossEncoderSection
    export_spec = "bgert.export.reranker_spec:CrossEncoderSpec"
    outputs = {"score": "scores"}
    architectures = ("*ForSequenceClassification",)

    @classmethod
    def triton_assembly(cls, manifest: Manifest) -> dict[str, Any]:
        ids, types = pair_template(manifest)
        return {"template": ids, "template_types": types}


@register
class LLMRerankerFamily(_RerankerFamily):
    """bge-reranker-v2-gemma (FlagLLMReranker): the ``Yes`` logit at the last token."""

    name = "llm_reranker"
    runtime_class = LLMReranker
    section = LLMRerankerSection
    export_spec = "bgert.export.reranker_spec:LLMRerankerSpec"
    bench_adapter = "bgert.benchmarks.bench_families:LLMRerankerBench"
    outputs = {"score": "scores"}

    @classmethod
    def detect(cls, ck: Checkpoint) -> int:
        """A causal LM is an LLM reranker or a decoder embedder: nothing in its config tells them apart,
        so only a causal LM whose directory name says reranker is taken for one (else pass --kind)."""
        causal = any(a.endswith("ForCausalLM") for a in ck.architectures)
        return MODEL_TYPE if causal and "reranker" in ck.name else 0

    @classmethod
    def triton_assembly(cls, manifest: Manifest) -> dict[str, Any]:
        s = manifest.section
        return {"bos_prefix": bos_prefix(manifest), "separator": s.separator, "prompt": s.prompt}


@register
class LayerwiseFamily(_RerankerFamily):
    """bge-reranker-v2-minicpm-layerwise (LayerWiseFlagLLMReranker): one graph per cutoff."""

    name = "layerwise_reranker"
    runtime_class = LayerwiseReranker
    section = LayerwiseSection
    export_spec = "bgert.export.reranker_spec:LayerwiseRerankerSpec"
    bench_adapter = "bgert.benchmarks.bench_families:LayerwiseBench"
    outputs = {"scores": "scores"}
    architectures = ("*LayerWise*",)
    model_types = ("minicpm",)
    name_hints = ("layerwise",)
    triton_text_inputs = None  # several graphs: the model steps only (clients send token ids)
