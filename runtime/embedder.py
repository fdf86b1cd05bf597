"""Encoder embedders (BGE v1/v1.5, sentence-transformers BERT models) with FlagModel's API."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .base import BgeModel
from .tokenize import check_max_length, check_texts


def format_instruction(instruction: str | None, fmt: str, texts: Sequence[str]) -> list[str]:
    """FlagEmbedding's get_detailed_instruct: a literal backslash-n in ``fmt`` becomes a newline."""
    if not instruction:
        return list(texts)
    fmt = fmt.replace("\\n", "\n")
    return [fmt.format(instruction, t) for t in texts]


class Embedder(BgeModel):
    """Dense sentence embeddings from an exported encoder (FlagModel-compatible calls).

    >>> m = Embedder("artifacts/bge-small-en-v1.5")
    >>> q = m.encode_queries(["what is a panda?"])      # query instruction from the manifest
    >>> p = m.encode_corpus(["The giant panda is a bear."])
    >>> scores = q @ p.T
    """

    kinds = ("embedder",)

    def __init__(self, model_dir: str, *, query_instruction_for_retrieval: str | None = None,
                 query_instruction_format: str | None = None, normalize_embeddings: bool | None = None,
                 query_max_length: int | None = None, passage_max_length: int | None = None, **kwargs: Any):
        super().__init__(model_dir, **kwargs)
        m = self.manifest
        self.query_instruction_for_retrieval = (query_instruction_for_retrieval
                                                if query_instruction_for_retrieval is not None
                                                else m.get("query_instruction"))
        self.query_instruction_format = query_instruction_format or m.get("query_instruction_format", "{}{}")
        self.graph_normalizes = bool(m.get("normalize", True))
        self.normalize_embeddings = self.graph_normalizes if normalize_embeddings is None else normalize_embeddings
        self.query_max_length = query_max_length or self.max_length
        self.passage_max_length = passage_max_length or self.max_length
        self.output_name = m.get("output_name", "dense")

    @property
    def dim(self) -> int:
        return int(self.manifest.get("dim"))

    def encode(self, sentences: str | Sequence[str], batch_size: int | None = None, max_length: int | None = None,
               convert_to_numpy: bool = True, normalize_embeddings: bool | None = None,
               instruction: str | None = None, instruction_format: str = "{}{}", **_: Any) -> Any:
        """Embed ``sentences``: a str gives a 1-D float32 vector, a list a [n, dim] array.

        ``max_length`` counts special tokens and any instruction (default: the passage max length,
        capped by the model's). ``convert_to_numpy=False`` gives a list of 1-D arrays.
        """
        texts, single = check_texts(sentences)
        texts = format_instruction(instruction, instruction_format, texts)
        max_length = check_max_length(max_length or self.passage_max_length, self.max_length)
        normalize = self.normalize_embeddings if normalize_embeddings is None else normalize_embeddings
        if self.graph_normalizes and not normalize:
            raise ValueError("this artifact's graph outputs L2-normalised vectors; re-export with "
                             "`bgert export ... --no-normalize` to get raw pooled vectors.")
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        seqs = self.tokenizer.encode(texts, max_length)
        graph = self.graph()
        for batch, (vecs,), _ in self._run_batches(seqs, graph, [self.output_name], batch_size):
            out[batch.indices] = vecs
        if normalize and not self.graph_normalizes:
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        if single:
            return out[0] if convert_to_numpy else list(out)[0]
        return out if convert_to_numpy else list(out)

    def encode_queries(self, queries: str | Sequence[str], batch_size: int | None = None,
                       max_length: int | None = None, convert_to_numpy: bool = True, **kwargs: Any) -> Any:
        """Embed queries with the query instruction (manifest default, or the constructor's)."""
        return self.encode(queries, batch_size=batch_size, max_length=max_length or self.query_max_length,
                           convert_to_numpy=convert_to_numpy, instruction=self.query_instruction_for_retrieval,
                           instruction_format=self.query_instruction_format, **kwargs)

    def encode_corpus(self, corpus: str | Sequence[str], batch_size: int | None = None,
                      max_length: int | None = None, convert_to_numpy: bool = True, **kwargs: Any) -> Any:
        """Embed passages (no instruction), like FlagModel.encode_corpus."""
        return self.encode(corpus, batch_size=batch_size, max_length=max_length or self.passage_max_length,
                           convert_to_numpy=convert_to_numpy, **kwargs)
