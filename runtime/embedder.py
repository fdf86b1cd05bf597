"""Encoder embedders (BGE v1/v1.5, sentence-transformers BERT models) with FlagModel's API."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .base import BgeModel, check_call_options
from .registry import ARCHITECTURE, Checkpoint, Family, register
from .request import Item, Request, request_method
from .tokenize import check_max_length, check_texts
from .windows import windowed


def format_instruction(instruction: str | None, fmt: str, texts: Sequence[str]) -> list[str]:
    """FlagEmbedding's get_detailed_instruct: a literal backslash-n in ``fmt`` becomes a newline."""
    if not instruction:
        return list(texts)
    fmt = fmt.replace("\\n", "\n")
    return [fmt.format(instruction, t) for t in texts]


def query_settings(model: BgeModel, query_instruction_for_retrieval: str | None,
                   query_instruction_format: str | None, normalize_embeddings: bool | None) -> None:
    """Set ``model``'s query instruction and its format, ``graph_normalizes`` and ``normalize_embeddings``:
    the constructor's arguments, else the manifest's (as FlagModel and BGEM3FlagModel take them)."""
    m = model.manifest.section
    model.query_instruction_for_retrieval = (query_instruction_for_retrieval if query_instruction_for_retrieval
                                             is not None else m.query_instruction)
    model.query_instruction_format = query_instruction_format or m.query_instruction_format
    model.graph_normalizes = m.normalize
    model.normalize_embeddings = model.graph_normalizes if normalize_embeddings is None else normalize_embeddings


class Embedder(BgeModel):
    """Dense sentence embeddings from an exported encoder (FlagModel-compatible calls).

    >>> m = Embedder("artifacts/bge-small-en-v1.5")
    >>> q = m.encode_queries(["what is a panda?"])      # query instruction from the manifest
    >>> p = m.encode_corpus(["The giant panda is a bear."])
    >>> scores = q @ p.T
    """


    def __init__(self, model_dir: str, *, query_instruction_for_retrieval: str | None = None,
                 query_instruction_format: str | None = None, normalize_embeddings: bool | None = None,
                 query_max_length: int | None = None, passage_max_length: int | None = None, **kwargs: Any):
        super().__init__(model_dir, **kwargs)
        query_settings(self, query_instruction_for_retrieval, query_instruction_format, normalize_embeddings)
        self.query_max_length = query_max_length or self.max_length
        self.passage_max_length = passage_max_length or self.max_length
        self.output_name = self.manifest.section.output_name

    @property
    def dim(self) -> int:
        return self.manifest.section.dim

    @windowed(check_texts)
    @request_method
    def encode(self, sentences: str | Sequence[str], batch_size: int | None = None, max_length: int | None = None,
               convert_to_numpy: bool = True, normalize_embeddings: bool | None = None,
               instruction: str | None = None, instruction_format: str = "{}{}", truncation_side: str = "right",
               **reference_only: Any) -> Request:
        """Embed ``sentences``: a str gives a 1-D float32 vector, a list a [n, dim] array.

        ``max_length`` counts special tokens and any instruction (default: the passage max length,
        capped by the model's). A longer text is cut: ``truncation_side="right"`` keeps its start (as
        the reference does), ``"left"`` its end (the special tokens stay; an instruction at the start
        of an over-long text is cut with it). ``convert_to_numpy=False`` gives a list of 1-D arrays. Other keyword
        arguments are refused, but FlagEmbedding's ``device``-like ones (REFERENCE_ONLY_CALL_OPTIONS).
        """
        check_call_options(self.encode, reference_only)
        texts, single = check_texts(sentences)
        texts = format_instruction(instruction, instruction_format, texts)
        max_length = check_max_length(max_length or self.passage_max_length, self.max_length)
        seqs, cut = self.tokenizer.encode_checked(texts, max_length, side=truncation_side)
        return self._vectors(seqs, single, batch_size, convert_to_numpy, normalize_embeddings, cut)

    @request_method
    def encode_ids(self, sequences: Sequence[Sequence[int]], single: bool = False, batch_size: int | None = None,
                   convert_to_numpy: bool = True, normalize_embeddings: bool | None = None) -> Request:
        """Vectors of ready token sequences (special tokens included), in order ([n, dim], or 1-D when
        ``single``); ValueError for an id outside the vocabulary or a sequence over the max length."""
        return self._vectors(self.check_ids(sequences), single, batch_size, convert_to_numpy, normalize_embeddings)

    def _vectors(self, sequences: list[list[int]], single: bool, batch_size: int | None, convert_to_numpy: bool,
                 normalize_embeddings: bool | None, truncated: bool = False) -> Request:
        """The request embedding these token sequences."""
        normalize = self.normalize_embeddings if normalize_embeddings is None else normalize_embeddings
        if self.graph_normalizes and not normalize:
            raise ValueError("this artifact's graph outputs L2-normalised vectors; re-export with "
                             "`bgert export ... --no-normalize` to get raw pooled vectors.")

        def finish(rows: list[np.ndarray]) -> Any:
            out = np.stack(rows) if rows else np.zeros((0, self.dim), dtype=np.float32)
            if normalize and not self.graph_normalizes:
                out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
            if single:
                return out[0] if convert_to_numpy else list(out)[0]
            return out if convert_to_numpy else list(out)

        return Request(self.job(self.graph(), [self.output_name]), [Item(s) for s in sequences], finish,
                       truncated=truncated, batch_size=batch_size)

    @windowed(check_texts)
    @request_method
    def encode_queries(self, queries: str | Sequence[str], batch_size: int | None = None,
                       max_length: int | None = None, convert_to_numpy: bool = True, **kwargs: Any) -> Request:
        """Embed queries with the query instruction (manifest default, or the constructor's)."""
        return self.prepare("encode", queries, batch_size=batch_size, max_length=max_length or self.query_max_length,
                            convert_to_numpy=convert_to_numpy, instruction=self.query_instruction_for_retrieval,
                            instruction_format=self.query_instruction_format, **kwargs)

    @windowed(check_texts)
    @request_method
    def encode_corpus(self, corpus: str | Sequence[str], batch_size: int | None = None,
                      max_length: int | None = None, convert_to_numpy: bool = True, **kwargs: Any) -> Request:
        """Embed passages (no instruction), like FlagModel.encode_corpus."""
        return self.prepare("encode", corpus, batch_size=batch_size, max_length=max_length or self.passage_max_length,
                            convert_to_numpy=convert_to_numpy, **kwargs)


@dataclass(kw_only=True)
class EmbedderSection:
    """The manifest keys of an encoder embedder."""

    dim: int
    normalize: bool = True
    pooling: str = "cls"
    output_name: str = "dense"
    query_instruction: str | None = None
    query_instruction_format: str = "{}{}"
    #: the dimensions a Matryoshka-trained model keeps its quality at when cut (None: not Matryoshka)
    matryoshka_dims: list[int] | None = None
    #: int8/uint8 output calibration: per output dimension (str), [[min...], [max...]] over a calibration set's
    #: vectors (bgert.runtime.vectors.int8_ranges; None: not calibrated)
    int8_ranges: dict[str, list[list[float]]] | None = None


#: config.json model types of the encoders bgert exports as embedders
ENCODER_TYPES = ("bert", "xlm-roberta", "roberta", "camembert", "distilbert", "mpnet", "electra", "deberta-v2")


@register
class EmbedderFamily(Family):
    """Encoder embedders: BGE v1/v1.5 (CLS pooling) and sentence-transformers BERT models (mean)."""

    name = "embedder"
    runtime_class = Embedder
    section = EmbedderSection
    export_spec = "bgert.export.embedder_spec:EmbedderSpec"
    bench_adapter = "bgert.benchmarks.bench_families:EmbedderBench"
    outputs = {"dense": "vectors"}
    model_types = ENCODER_TYPES
    triton_text_inputs = ("TEXT",)

    @classmethod
    def detect(cls, ck: Checkpoint) -> int:
        """A sentence-transformers layout (modules.json) says embedder as clearly as an architecture does."""
        if ck.model_type in cls.model_types and ck.has("modules.json"):
            return ARCHITECTURE
        return super().detect(ck)
