"""BGE-M3 with BGEM3FlagModel's API: dense vectors, lexical (sparse) weights and ColBERT vectors
from one exported graph (bgert.export.m3_spec), post-processed in numpy.

>>> m = M3Embedder("artifacts/bge-m3")
>>> out = m.encode(["what is BGE M3?"], max_length=8192, return_sparse=True, return_colbert_vecs=True)
>>> out["dense_vecs"].shape, out["lexical_weights"][0], out["colbert_vecs"][0].shape
>>> m.compute_score([("what is BGE M3?", "BGE M3 is an embedding model.")])   # 5 score kinds

Long inputs on CPU: batches whose padded length would exceed ``max_padded_length`` hold only
texts of one length and get no padding at all, so the graph runs ORT's flash-attention kernel
(memory O(L) instead of the O(L²) score matrix; see bgert.export.m3_spec). Shorter texts are
batched by the token budget as usual, which bounds their attention memory.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from .base import BgeModel, check_call_options
from .batching import Batch, pad
from .embedder import format_instruction, query_settings
from .manifest import Manifest
from .registry import Checkpoint, Family, register
from .request import Item, Job, Request, request_method
from .reranker import check_pairs
from .tokenize import check_max_length, check_texts
from .windows import windowed

#: BGEM3FlagModel's query_max_length / passage_max_length defaults (bge-m3 itself takes 8192)
REFERENCE_MAX_LENGTH = 512
#: on CPU, longer batches run unpadded (one length per batch) to take the flash-attention kernel
DEFAULT_MAX_PADDED_LENGTH = 512
SCORE_KEYS = ("colbert", "sparse", "dense", "sparse+dense", "colbert+sparse+dense")
#: the heads each compute_score mode (score key) needs
MODE_HEADS = {"colbert": ("colbert",), "sparse": ("sparse",), "dense": ("dense",), "sparse+dense": ("dense", "sparse"),
              "colbert+sparse+dense": ("dense", "sparse", "colbert")}
_CLEANUPS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
             (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def sparse_drop_ids(manifest: Manifest) -> np.ndarray:
    """Token ids never given a lexical weight: the manifest's list, else cls/eos/pad/unk (as BGEM3FlagModel)."""
    drop = manifest.section.sparse_drop_ids
    if drop is None:
        info = manifest.tokenizer_info
        drop = [info[k] for k in ("cls_token_id", "eos_token_id", "pad_token_id", "unk_token_id") if k in info]
    return np.asarray(sorted(set(drop)), dtype=np.int64)


def lexical_weights(weights: np.ndarray, ids: np.ndarray, drop_ids: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per row of a padded batch: (ids, max weight) of the positive weights, ``drop_ids`` left out, in
    order of first occurrence (FlagEmbedding's _process_token_weights, vectorised over the batch)."""
    rows, pos = np.nonzero((weights > 0) & ~np.isin(ids, drop_ids))
    tok, w = ids[rows, pos], weights[rows, pos]
    order = np.lexsort((pos, tok, rows))  # runs of one (row, id), first occurrence first
    rows, pos, tok, w = rows[order], pos[order], tok[order], w[order]
    if len(w):
        start = np.flatnonzero(np.r_[True, (rows[1:] != rows[:-1]) | (tok[1:] != tok[:-1])])
        w = np.maximum.reduceat(w, start)
        rows, pos, tok = rows[start], pos[start], tok[start]
    order = np.lexsort((pos, rows))
    rows, tok, w = rows[order], tok[order], w[order]
    bounds = np.searchsorted(rows, np.arange(ids.shape[0] + 1))
    return [(tok[a:b], w[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def colbert_vectors(colbert: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
    """Per row of a right-padded batch: the ColBERT vectors of its real tokens after <s>, [n_tokens - 1, D]."""
    n_real = mask.sum(1)
    return [colbert[row, :n_real[row] - 1].copy() for row in range(len(n_real))]


class _Encoded:
    """Per text (caller's order), from the rows of a run: token count, dense row, lexical (ids, max
    weights), ColBERT rows; the dense and ColBERT rows normalised here when the graph does not."""

    def __init__(self, rows: Sequence[dict[str, Any]], dim: int, want: Sequence[str], normalize: bool):
        self.lengths = np.asarray([r["length"] for r in rows], dtype=np.int64)
        self.dense = None
        if "dense" in want:
            self.dense = np.stack([r["dense"] for r in rows]) if rows else np.zeros((0, dim), dtype=np.float32)
        self.lex: list[tuple[np.ndarray, np.ndarray]] | None = [r["sparse"] for r in rows] if "sparse" in want else None
        self.colbert: list[np.ndarray] | None = [r["colbert"] for r in rows] if "colbert" in want else None
        if normalize:
            if self.dense is not None:
                self.dense /= np.maximum(np.linalg.norm(self.dense, axis=-1, keepdims=True), 1e-12)
            for c in self.colbert or []:
                c /= np.maximum(np.linalg.norm(c, axis=-1, keepdims=True), 1e-12)


class M3Embedder(BgeModel):
    """BGE-M3 served from an ONNX artifact, with BGEM3FlagModel-compatible calls and outputs."""


    def __init__(self, model_dir: str, *, query_instruction_for_retrieval: str | None = None,
                 query_instruction_format: str | None = None, normalize_embeddings: bool | None = None,
                 query_max_length: int | None = None, passage_max_length: int | None = None,
                 return_dense: bool = True, return_sparse: bool = False, return_colbert_vecs: bool = False,
                 max_padded_length: int = DEFAULT_MAX_PADDED_LENGTH, **kwargs: Any):
        """``query_max_length`` / ``passage_max_length`` default to 512 like BGEM3FlagModel (capped by
        the artifact's max length); pass ``max_length=8192`` per call, or here, for long texts.
        ``max_padded_length``: on CPU, batches longer than this are never padded (see module doc)."""
        super().__init__(model_dir, **kwargs)
        m = self.manifest.section
        self.heads: tuple[str, ...] = tuple(m.heads)
        query_settings(self, query_instruction_for_retrieval, query_instruction_format, normalize_embeddings)
        if self.graph_normalizes and not self.normalize_embeddings:
            raise ValueError("this artifact's graph outputs L2-normalised vectors; re-export with "
                             "`bgert export ... --no-normalize` to get raw ones.")
        default = min(REFERENCE_MAX_LENGTH, self.max_length)
        self.query_max_length = check_max_length(query_max_length or default, self.max_length)
        self.passage_max_length = check_max_length(passage_max_length or default, self.max_length)
        self.return_dense, self.return_sparse, self.return_colbert_vecs = return_dense, return_sparse, return_colbert_vecs
        self.max_padded_length = int(max_padded_length)
        self.sparse_drop_ids = sparse_drop_ids(self.manifest)
        self.clean_up_tokenization_spaces = m.clean_up_tokenization_spaces

    @property
    def dim(self) -> int:
        return self.manifest.section.dim

    @property
    def score_modes(self) -> tuple[str, ...]:
        """The ``compute_score`` modes this artifact's heads allow (all five when it has every head)."""
        return tuple(k for k in SCORE_KEYS if set(MODE_HEADS[k]) <= set(self.heads))

    def _modes(self, modes: Sequence[str] | None) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(score keys to compute, heads they need) for ``compute_score(modes=...)``; None: all five."""
        if modes is None:
            return SCORE_KEYS, self._want(True, True, True)
        modes = [modes] if isinstance(modes, str) else list(modes)
        unknown = [m for m in modes if m not in SCORE_KEYS]
        if unknown or not modes:
            raise ValueError(f"modes must name some of {', '.join(SCORE_KEYS)}; got {unknown or modes}")
        lacking = [m for m in modes if m not in self.score_modes]
        if lacking:
            raise ValueError(f"mode {lacking[0]!r} needs the {' and '.join(MODE_HEADS[lacking[0]])} head(s); this "
                             f"artifact was exported with --heads {','.join(self.heads)} and has the modes "
                             f"{', '.join(self.score_modes) or 'none'}. Re-export with "
                             "`bgert export SRC --out DIR --heads dense,sparse,colbert` for all of them.")
        keys = tuple(dict.fromkeys(modes))
        heads = {h for m in keys for h in MODE_HEADS[m]}
        return keys, tuple(h for h in ("dense", "sparse", "colbert") if h in heads)

    # ---- batching policy --------------------------------------------------------------------
    def _plan_batches(self, lengths: Sequence[int], batch_size: int, multiple_of: int = 1,
                      run_cost_tokens: int = 0) -> list[Batch]:
        """On ORT CPU: texts whose bucket exceeds ``max_padded_length`` run unpadded, one length per
        batch (the flash-attention path); the rest are bucketed by the token budget as usual."""
        if self.backend_name != "ort" or self._on_gpu():
            return super()._plan_batches(lengths, batch_size, multiple_of, run_cost_tokens)
        lengths = np.asarray(lengths, dtype=np.int64)
        buckets = np.asarray(self.length_buckets, dtype=np.int64)
        at = np.searchsorted(buckets, lengths)
        padded = np.where(at < len(buckets), buckets[np.minimum(at, len(buckets) - 1)], lengths)
        short = np.flatnonzero(padded <= self.max_padded_length)
        long = np.flatnonzero(padded > self.max_padded_length)
        long = long[np.argsort(-lengths[long], kind="stable")]
        batches = []
        for group in np.split(long, np.flatnonzero(np.diff(lengths[long])) + 1) if len(long) else []:
            n = int(lengths[group[0]])
            step = max(1, min(batch_size, self.token_budget // n))
            batches += [Batch(indices=group[i:i + step], length=n) for i in range(0, len(group), step)]
        batches += [Batch(indices=short[b.indices], length=b.length)
                    for b in super()._plan_batches(lengths[short], batch_size, multiple_of, run_cost_tokens)]
        return batches

    # ---- encoding ---------------------------------------------------------------------------
    def _want(self, dense: bool, sparse: bool, colbert: bool) -> tuple[str, ...]:
        want = tuple(h for h, on in (("dense", dense), ("sparse", sparse), ("colbert", colbert)) if on)
        if not want:
            raise ValueError("Must choose one or more from `return_colbert_vecs`, `return_sparse`, `return_dense` "
                             "to set `True`!")
        missing = [h for h in want if h not in self.heads]
        if missing:
            flag = {"dense": "return_dense", "sparse": "return_sparse", "colbert": "return_colbert_vecs"}
            raise ValueError(f"{', '.join(flag[h] + '=True' for h in missing)}: this artifact was exported with "
                             f"--heads {','.join(self.heads)} only; re-export with "
                             "`bgert export SRC --out DIR --heads dense,sparse,colbert`.")
        return want

    def _rows(self, job: Job, outputs: list[np.ndarray], mask: np.ndarray,
              sequences: list[Sequence[int]]) -> list[dict[str, Any]]:
        """Per text of a batch: its token count and the heads asked for, trimmed to its own tokens."""
        got = dict(zip(job.outputs, outputs))
        rows: list[dict[str, Any]] = [{"length": len(s)} for s in sequences]
        if "dense" in got:
            for row, vec in zip(rows, got["dense"]):
                row["dense"] = vec.copy()
        if "sparse" in got:
            ids, _ = pad(sequences, mask.shape[1], self.tokenizer.pad_token_id, self.tokenizer.padding_side)
            for row, lw in zip(rows, lexical_weights(got["sparse"], ids, self.sparse_drop_ids)):
                row["sparse"] = lw
        if "colbert" in got:
            for row, vecs in zip(rows, colbert_vectors(got["colbert"], mask)):
                row["colbert"] = vecs
        return rows

    def _items(self, texts: list[str], max_length: int, side: str = "right") -> tuple[list[Item], bool]:
        seqs, cut = self.tokenizer.encode_checked(texts, max_length, side=side)
        return [Item(s) for s in seqs], cut

    def _encoded(self, rows: Sequence[dict[str, Any]], want: Sequence[str]) -> _Encoded:
        return _Encoded(rows, self.dim, want, not self.graph_normalizes and self.normalize_embeddings)

    @windowed(check_texts)
    @request_method
    def encode(self, sentences: str | Sequence[str], batch_size: int | None = None, max_length: int | None = None,
               return_dense: bool | None = None, return_sparse: bool | None = None,
               return_colbert_vecs: bool | None = None, instruction: str | None = None,
               instruction_format: str = "{}{}", truncation_side: str = "right", **reference_only: Any) -> Request:
        """BGEM3FlagModel.encode: ``{"dense_vecs", "lexical_weights", "colbert_vecs"}``, None where not asked.

        ``dense_vecs``: float32 [n, dim]; ``lexical_weights``: per text a defaultdict(int) of
        str(token id) → np.float32 max weight (cls/eos/pad/unk dropped, only > 0);
        ``colbert_vecs``: per text float32 [n_tokens - 1, colbert_dim] (every real token after <s>).
        A str input gives one vector, one dict, one array. ``max_length`` defaults to 512, as in
        BGEM3FlagModel (``passage_max_length``); it is capped by the artifact's max length. A longer
        text is cut on ``truncation_side``: "right" keeps its start (the reference), "left" its end.
        """
        check_call_options(self.encode, reference_only)
        want = self._want(self.return_dense if return_dense is None else return_dense,
                          self.return_sparse if return_sparse is None else return_sparse,
                          self.return_colbert_vecs if return_colbert_vecs is None else return_colbert_vecs)
        texts, single = check_texts(sentences)
        texts = format_instruction(instruction, instruction_format, texts)
        max_length = check_max_length(max_length or self.passage_max_length, self.max_length)
        items, cut = self._items(texts, max_length, truncation_side)

        def finish(rows: list[dict[str, Any]]) -> dict[str, Any]:
            enc = self._encoded(rows, want)
            lexical = None
            if enc.lex is not None:
                lexical = [collections.defaultdict(int, zip(map(str, tok.tolist()), w)) for tok, w in enc.lex]
            out = {"dense_vecs": enc.dense, "lexical_weights": lexical, "colbert_vecs": enc.colbert}
            if single:
                out = {k: None if v is None else v[0] for k, v in out.items()}
            return out

        return Request(self.job(self.graph(), want), items, finish, truncated=cut, batch_size=batch_size)

    @windowed(check_texts)
    @request_method
    def encode_queries(self, queries: str | Sequence[str], batch_size: int | None = None,
                       max_length: int | None = None, **kwargs: Any) -> Request:
        """``encode`` with the query instruction (bge-m3 has none) and ``query_max_length``; the other
        arguments are ``encode``'s (return_dense, return_sparse, return_colbert_vecs)."""
        return self.prepare("encode", queries, batch_size=batch_size, max_length=max_length or self.query_max_length,
                            instruction=self.query_instruction_for_retrieval,
                            instruction_format=self.query_instruction_format, **kwargs)

    @windowed(check_texts)
    @request_method
    def encode_corpus(self, corpus: str | Sequence[str], batch_size: int | None = None,
                      max_length: int | None = None, **kwargs: Any) -> Request:
        """``encode`` with ``passage_max_length`` (no instruction), like BGEM3FlagModel.encode_corpus; the
        other arguments are ``encode``'s."""
        return self.prepare("encode", corpus, batch_size=batch_size, max_length=max_length or self.passage_max_length,
                            **kwargs)

    # ---- scores -----------------------------------------------------------------------------
    @staticmethod
    def _lexical_scores(lw1: Sequence[dict], lw2: Sequence[dict]) -> np.ndarray:
        """[len1, len2] float32: sum of w1[t] * w2[t] over shared keys, as one matmul over the keys
        that occur on both sides."""
        k1 = [k for d in lw1 for k in d]
        k2 = [k for d in lw2 for k in d]
        if not k1 or not k2:
            return np.zeros((len(lw1), len(lw2)), dtype=np.float32)
        keys, inv = np.unique(np.asarray(k1 + k2, dtype=object).astype(str), return_inverse=True)
        inv1, inv2 = inv[:len(k1)], inv[len(k1):]
        shared = np.zeros(len(keys), dtype=bool)
        shared[inv1] = True
        in2 = np.zeros(len(keys), dtype=bool)
        in2[inv2] = True
        shared &= in2
        col = np.cumsum(shared) - 1

        def matrix(dicts: Sequence[dict], inv_: np.ndarray) -> np.ndarray:
            rows = np.repeat(np.arange(len(dicts)), [len(d) for d in dicts])
            vals = np.fromiter((w for d in dicts for w in d.values()), dtype=np.float32, count=len(inv_))
            keep = shared[inv_]
            m = np.zeros((len(dicts), int(shared.sum())), dtype=np.float32)
            m[rows[keep], col[inv_[keep]]] = vals[keep]
            return m

        return matrix(lw1, inv1) @ matrix(lw2, inv2).T

    def compute_lexical_matching_score(self, lexical_weights_1: dict | list[dict],
                                       lexical_weights_2: dict | list[dict]) -> Any:
        """Sum of w1[t] * w2[t] over shared tokens: two dicts give an np.float32, two lists an
        np.ndarray [len1, len2] (float32). Anything else raises ValueError, like the reference."""
        if isinstance(lexical_weights_1, dict) and isinstance(lexical_weights_2, dict):
            return self._lexical_scores([lexical_weights_1], [lexical_weights_2])[0, 0]
        if isinstance(lexical_weights_1, list) and isinstance(lexical_weights_2, list):
            return self._lexical_scores(lexical_weights_1, lexical_weights_2)
        raise ValueError("The input format of lexical_weights is not correct: pass two dicts or two lists of dicts.")

    @staticmethod
    def colbert_score(q_reps: np.ndarray, p_reps: np.ndarray) -> np.float32:
        """Late-interaction score: max over passage vectors, summed over query vectors, divided by
        the query vector count. An np.float32 (the reference returns a 0-d torch tensor)."""
        q = np.asarray(q_reps, dtype=np.float32)
        p = np.asarray(p_reps, dtype=np.float32)
        return np.float32((q @ p.T).max(-1).sum() / q.shape[0])

    def convert_id_to_token(self, lexical_weights: dict | list[dict]) -> dict | list[dict]:
        """Keys str(id) → token text (tokenizer.decode([id])), as BGEM3FlagModel: a dict or a
        one-item list gives a dict; two ids decoding to the same text keep the last one's weight."""
        items = [lexical_weights] if isinstance(lexical_weights, dict) else lexical_weights
        out = [{self._decode_one(int(k)): w for k, w in d.items()} for d in items]
        return out[0] if len(out) == 1 else out

    def _decode_one(self, token_id: int) -> str:
        text = self.tokenizer.decode([token_id])
        if self.clean_up_tokenization_spaces:
            for a, b in _CLEANUPS:
                text = text.replace(a, b)
        return text

    @windowed(check_pairs, by_batch=True)
    @request_method
    def compute_score(self, sentence_pairs: Sequence[tuple[str, str]] | tuple[str, str],
                      batch_size: int | None = None, max_query_length: int | None = None,
                      max_passage_length: int | None = None,
                      weights_for_different_modes: Sequence[float] | None = None,
                      modes: Sequence[str] | str | None = None, truncation_side: str = "right",
                      **reference_only: Any) -> Request:
        """BGEM3FlagModel.compute_score: per pair the dense, sparse and ColBERT scores and two
        weighted sums (weights [dense, sparse, colbert], default [1, 1, 1]); a dict of lists of
        float, or of floats for a single pair.

        bgert's additions: ``modes`` (some of SCORE_KEYS) computes only those keys, and needs only
        the heads they use (``score_modes`` lists what the artifact allows); ``truncation_side="left"``
        keeps the end of an over-long query or passage instead of its start.

        Matches the reference's batching quirk: there, each batch of ``batch_size`` pairs pads its
        passages to the longest one, and those zero padding vectors take part in the ColBERT max,
        so a query token whose every similarity is negative scores 0 instead of its best one.
        (Only the call's own pairs and ``batch_size`` decide it, so the queue may merge calls.)
        """
        check_call_options(self.compute_score, reference_only)
        if isinstance(sentence_pairs, list) and len(sentence_pairs) == 0:
            return Request(self.job(self.graph(), ()), [], lambda rows: [])
        keys, want = self._modes(modes)
        job = self.job(self.graph(), want)
        single = isinstance(sentence_pairs[0], str)
        pairs = [sentence_pairs] if single else list(sentence_pairs)
        for i, p in enumerate(pairs):
            if not isinstance(p, (list, tuple)) or len(p) != 2:
                raise TypeError(f"sentence_pairs[{i}] must be a (query, passage) pair of str")
            check_texts(list(p), f"sentence_pairs[{i}]")
        weights = [1.0, 1.0, 1.0] if weights_for_different_modes is None else [float(w) for w in weights_for_different_modes]
        if len(weights) != 3:
            raise ValueError(f"weights_for_different_modes must be [dense, sparse, colbert], got {weights}")
        chunk = batch_size or self.batch_size
        n = len(pairs)
        q_items, q_cut = self._items([p[0] for p in pairs], check_max_length(max_query_length or self.query_max_length,
                                                                           self.max_length), truncation_side)
        p_items, p_cut = self._items([p[1] for p in pairs], check_max_length(
            max_passage_length or self.passage_max_length, self.max_length), truncation_side)

        def finish(rows: list[dict[str, Any]]) -> dict[str, Any]:
            q, p = self._encoded(rows[:n], want), self._encoded(rows[n:], want)
            scores: dict[str, np.ndarray] = {}
            if "dense" in want:
                scores["dense"] = np.einsum("ij,ij->i", q.dense, p.dense)
            if "sparse" in want:
                scores["sparse"] = self._pair_lexical_scores(q.lex, p.lex)
            if "colbert" in want:
                scores["colbert"] = self._pair_colbert_scores(q.colbert, p.colbert, p.lengths, chunk)
            w_d, w_s, w_c = weights
            if "sparse+dense" in keys:
                scores["sparse+dense"] = (scores["sparse"] * w_s + scores["dense"] * w_d) / (w_s + w_d)
            if "colbert+sparse+dense" in keys:
                scores["colbert+sparse+dense"] = (scores["colbert"] * w_c + scores["sparse"] * w_s
                                                  + scores["dense"] * w_d) / sum(weights)
            result = {k: np.asarray(scores[k], dtype=np.float32).tolist() for k in keys}
            return {k: v[0] for k, v in result.items()} if single else result

        return Request(job, q_items + p_items, finish, truncated=q_cut or p_cut, batch_size=batch_size)

    @staticmethod
    def _pair_colbert_scores(q: list[np.ndarray], p: list[np.ndarray], p_lengths: np.ndarray,
                             chunk: int) -> np.ndarray:
        """ColBERT score of pair i = (q[i], p[i]), with the reference's padded-batch quirk: in each batch of
        ``chunk`` pairs, a passage shorter than the longest one lets a query token score 0 at best."""
        n = len(q)
        starts = np.arange(0, n, chunk)
        padded = p_lengths < np.repeat(np.maximum.reduceat(p_lengths, starts), np.diff(np.r_[starts, n]))
        colbert = np.empty(n, dtype=np.float32)
        for i in range(n):
            best = (q[i] @ p[i].T).max(-1)
            colbert[i] = (np.maximum(best, 0) if padded[i] else best).sum() / q[i].shape[0]
        return colbert

    @staticmethod
    def _pair_lexical_scores(lex1: list[tuple[np.ndarray, np.ndarray]],
                             lex2: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
        """Lexical matching score of pair i = (lex1[i], lex2[i]), for all pairs at once."""
        def flat(lex: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            pair = np.repeat(np.arange(len(lex)), [len(t) for t, _ in lex])
            tok = np.concatenate([t for t, _ in lex]) if lex else np.zeros(0, np.int64)
            w = np.concatenate([w for _, w in lex]) if lex else np.zeros(0, np.float32)
            return pair, tok, w

        p1, t1, w1 = flat(lex1)
        p2, t2, w2 = flat(lex2)
        vocab = int(max(t1.max(initial=0), t2.max(initial=0))) + 1
        _, i1, i2 = np.intersect1d(p1 * vocab + t1, p2 * vocab + t2, assume_unique=True, return_indices=True)
        return np.bincount(p1[i1], weights=w1[i1] * w2[i2], minlength=len(lex1)).astype(np.float32)


@dataclass(kw_only=True)
class M3Section:
    """The manifest keys of a BGE-M3 artifact."""

    dim: int
    heads: list[str] = field(default_factory=lambda: ["dense", "sparse", "colbert"])
    normalize: bool = True
    pooling: str = "cls"
    colbert_dim: int | None = None
    sparse_drop_ids: list[int] | None = None
    clean_up_tokenization_spaces: bool = False
    query_instruction: str | None = None
    query_instruction_format: str = "{}{}"
    #: the dense dimensions a Matryoshka-trained model keeps its quality at when cut (None: not Matryoshka)
    matryoshka_dims: list[int] | None = None
    #: int8/uint8 output calibration: per output dimension (str), [[min...], [max...]] over a calibration set's
    #: vectors (bgert.runtime.vectors.int8_ranges; None: not calibrated)
    int8_ranges: dict[str, list[list[float]]] | None = None


@register
class M3Family(Family):
    """BGE-M3: dense, lexical (sparse) and ColBERT outputs of one graph."""

    name = "m3"
    runtime_class = M3Embedder
    section = M3Section
    export_spec = "bgert.export.m3_spec:M3Spec"
    bench_adapter = "bgert.benchmarks.bench_families:M3Bench"
    outputs = {"dense": "vectors", "sparse": "lexical_weights", "colbert": "token_vectors"}
    required_files = ("colbert_linear.pt", "sparse_linear.pt")
    triton_text_inputs = ("TEXT",)
    triton_postprocess = "m3"
    triton_renames = {"dense": "dense_vecs"}  # BGEM3FlagModel.encode's keys

    @classmethod
    def detect(cls, ck: Checkpoint) -> int:
        """The two head files; a checkpoint named bge-m3 without them is refused (FlagEmbedding would
        silently use random heads)."""
        strength = super().detect(ck)
        if not strength and "bge-m3" in ck.name:
            raise ValueError(f"{ck.path} looks like bge-m3 but lacks colbert_linear.pt / sparse_linear.pt; "
                             "FlagEmbedding would silently use random heads. Copy both files in, or pass "
                             "--kind embedder for the dense output only.")
        return strength

    @classmethod
    def default_text_length(cls, manifest: Manifest) -> int:
        return min(REFERENCE_MAX_LENGTH, manifest.max_length)
