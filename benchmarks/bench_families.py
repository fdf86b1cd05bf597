"""Bench adapters: how ``bgert bench`` calls each model family on both sides, compares and gates it.

Each family's description (bgert.runtime.registry) names its adapter here (``bench_adapter``);
``adapter_for`` reads the registry. The statistics and gate defaults are bgert.quality's.
"""
from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from bgert.quality import BENCH_TOP_K, FP32_MAX_ABS_DIFF, cos_min_gate, cosine_stats, score_stats, spearman_gate
from bgert.runtime.registry import family, load_object

SHORT_WORDS = 12  # a short text cut from a document when the data has no queries (~16 tokens)


class BenchError(RuntimeError):
    """The bench cannot run as asked (no reference checkpoint, unknown kind, bad option)."""


@dataclass
class InputSet:
    """Items of one kind of input (texts, or (query, passage) pairs), their role and real token counts."""

    name: str
    items: list[Any]
    role: str  # "query" or "passage": embedders call encode_queries / encode_corpus
    source: str
    tokens: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def summary(self) -> dict[str, Any]:
        return {"n": len(self.items), "role": self.role, "source": self.source,
                "mean_tokens": round(float(self.tokens.mean()), 1) if len(self.tokens) else 0.0,
                "total_tokens": int(self.tokens.sum())}


def cycle(items: Sequence[Any], n: int) -> list[Any]:
    return [items[i % len(items)] for i in range(n)] if items else []


def long_texts(docs: Sequence[str], n: int, min_words: int) -> list[str]:
    """``n`` texts of more than ``min_words`` words each, made of consecutive documents, so every
    one is truncated at the model's max length (a word is at least one token)."""
    out, i = [], 0
    while len(out) < n:
        parts, words = [], 0
        while words <= min_words:
            doc = docs[i % len(docs)]
            parts.append(doc)
            words += len(doc.split())
            i += 1
        out.append(" ".join(parts))
    return out


class BenchAdapter:
    """How one model kind is called on both sides, compared and gated. Subclasses per family."""

    pairs = False  # inputs are (query, passage) pairs

    def __init__(self, model: Any):
        self.model = model  # a runtime model of the artifact (token counts, settings)
        self.manifest = model.manifest

    # ---- inputs --------------------------------------------------------------------------
    def max_length(self) -> int:
        return int(getattr(self.model, "passage_max_length", self.model.max_length))

    def input_sets(self, docs: list[str], queries: list[str], sizes: dict[str, int], source: str) -> list[InputSet]:
        short = queries or [" ".join(d.split()[:SHORT_WORDS]) for d in docs]
        short_src = "queries" if queries else f"first {SHORT_WORDS} words of each document"
        sets = [InputSet("short", cycle(short, sizes["short"]), "query", f"{source}: {short_src}"),
                InputSet("mixed", cycle(docs, sizes["mixed"]), "passage", f"{source}: documents"),
                InputSet("long", long_texts(docs, sizes["long"], self.max_length()), "passage",
                         f"{source}: documents joined past {self.max_length()} tokens (truncated)")]
        sets = [s for s in sets if s.items]
        if self.pairs:
            qs = queries or short
            for s in sets:
                s.items = [(qs[i % len(qs)], p) for i, p in enumerate(s.items)]
                s.role = "pair"
        for s in sets:
            s.tokens = self.tokens(s.items, s.role)
        return sets

    def edge_set(self) -> InputSet:
        from bgert.export.parity import PARITY_PAIRS, PARITY_TEXTS

        items: list[Any] = list(PARITY_PAIRS) if self.pairs else list(PARITY_TEXTS)
        s = InputSet("edge", items, "pair" if self.pairs else "passage", "bgert.export.parity edge cases")
        s.tokens = self.tokens(items, s.role)
        return s

    def tokens(self, items: list[Any], role: str) -> np.ndarray:
        """Real tokens per item as the runtime feeds them (specials and instruction included)."""
        from bgert.runtime.embedder import format_instruction

        m = self.model
        if role == "query":
            items = format_instruction(m.query_instruction_for_retrieval, m.query_instruction_format, items)
            limit = m.query_max_length
        else:
            limit = self.max_length()
        return np.array([len(s) for s in m.tokenizer.encode(items, limit)], dtype=np.int64)

    # ---- calls ---------------------------------------------------------------------------
    def ours(self, model: Any) -> Callable[[list[Any], int, str], Any]:
        def call(items: list[Any], bs: int, role: str) -> Any:
            fn = model.encode_queries if role == "query" else model.encode_corpus
            return fn(items, batch_size=bs)
        return call

    def reference(self, which: str, src: str) -> tuple[Callable[[list[Any], int, str], Any], str]:
        raise NotImplementedError

    def auto_reference(self, src: str) -> str:
        return "flagembedding"

    # ---- comparison ----------------------------------------------------------------------
    def concat(self, outputs: list[Any]) -> Any:
        return np.concatenate([np.asarray(o, dtype=np.float64) for o in outputs])

    def compare(self, ref: Any, got: Any) -> dict[str, dict[str, float]]:
        return {"dense": cosine_stats(ref, got)}

    def export_gate(self, precision: str) -> dict[str, float]:
        """The gate the exporter recorded for this precision (bgert.export.precision), if any."""
        for g in self.manifest.graphs:
            if g.precision == precision and isinstance(g.quality.get("gate"), dict):
                return {k: float(v) for k, v in g.quality["gate"].items()}
        return {}

    def gate(self, stats: dict[str, dict[str, float]], precision: str,
             overrides: dict[str, float]) -> list[dict[str, Any]]:
        """cos_min (and the export's other cosine gates) per output; fp32 by bgert.quality's default, the
        other precisions by the gate their export recorded, else the default; ``overrides`` set cos_min."""
        gate = {"cos_min": cos_min_gate(precision)}
        if precision != "fp32":
            gate.update({k: v for k, v in self.export_gate(precision).items() if k in ("cos_min", "cos_mean")})
        if precision in overrides:
            gate["cos_min"] = overrides[precision]
        return [_gate(out, k, s[k], ">=", v) for out, s in stats.items() for k, v in gate.items() if k in s]

    # ---- compute -------------------------------------------------------------------------
    def layers(self, config: dict[str, Any]) -> int:
        return int(config_value(config, "num_hidden_layers", "n_layers", "num_layers"))


def _gate(output: str, metric: str, value: float, op: str, threshold: float) -> dict[str, Any]:
    ok = value >= threshold if op == ">=" else value <= threshold
    return {"output": output, "metric": metric, "value": value, "op": op, "threshold": threshold, "passed": bool(ok)}


def _quiet() -> contextlib.AbstractContextManager:
    """Silence the reference's tqdm bars (FlagEmbedding shows them for long inputs)."""
    return contextlib.redirect_stderr(io.StringIO())


class EmbedderBench(BenchAdapter):
    """Encoder embedders (FlagModel, or sentence-transformers for mean-pooling checkpoints)."""

    def auto_reference(self, src: str) -> str:
        """sentence-transformers for mean-pooling sentence-transformers checkpoints (its home
        library, e.g. all-MiniLM), FlagEmbedding's FlagModel for everything else (BGE)."""
        st = os.path.isfile(os.path.join(src, "modules.json"))
        return "sentence-transformers" if st and self.manifest.section.pooling == "mean" else "flagembedding"

    def reference(self, which: str, src: str) -> tuple[Callable[[list[Any], int, str], Any], str]:
        m = self.model
        if which == "sentence-transformers":
            from sentence_transformers import SentenceTransformer

            st = SentenceTransformer(src, device="cpu")
            st.max_seq_length = m.max_length
            prompt = m.query_instruction_for_retrieval
            if prompt and m.query_instruction_format != "{}{}":
                raise BenchError(f"the query format {m.query_instruction_format!r} has no sentence-transformers "
                                 "equivalent; use --reference flagembedding")

            def call(items: list[str], bs: int, role: str) -> np.ndarray:
                return st.encode(items, batch_size=bs, prompt=prompt if role == "query" else None,
                                 convert_to_numpy=True, normalize_embeddings=m.normalize_embeddings,
                                 show_progress_bar=False)
            return call, "sentence-transformers SentenceTransformer (fp32)"
        from FlagEmbedding import FlagModel

        fm = FlagModel(src, pooling_method=self.manifest.section.pooling, **self._flag_settings())
        return self._flag_call(fm), "FlagEmbedding FlagModel (use_fp16=False)"

    def _flag_settings(self) -> dict[str, Any]:
        """The constructor arguments FlagModel, FlagLLMModel and FlagICLModel share: fp32 on the CPU, with
        this model's normalisation, query instruction and lengths."""
        m = self.model
        return dict(use_fp16=False, devices="cpu", normalize_embeddings=m.normalize_embeddings,
                    query_instruction_for_retrieval=m.query_instruction_for_retrieval,
                    query_instruction_format=m.query_instruction_format,
                    query_max_length=m.query_max_length, passage_max_length=m.passage_max_length)

    @staticmethod
    def _flag_call(ref: Any) -> Callable[[list[str], int, str], np.ndarray]:
        """A FlagEmbedding embedder as the bench calls it: queries through encode_queries, the rest through
        encode_corpus."""
        def call(items: list[str], bs: int, role: str) -> np.ndarray:
            with _quiet():
                fn = ref.encode_queries if role == "query" else ref.encode_corpus
                return fn(items, batch_size=bs)
        return call


class DecoderEmbedderBench(EmbedderBench):
    """bge-multilingual-gemma2 (FlagLLMModel) and bge-en-icl (FlagICLModel, no examples)."""

    def auto_reference(self, src: str) -> str:
        return "flagembedding"

    def tokens(self, items: list[Any], role: str) -> np.ndarray:
        m = self.model
        if role == "query" and m.icl:
            seqs = m.icl_sequences(list(items), m.query_max_length, m.examples_for_task,
                                   m.query_instruction_for_retrieval)
            return np.array([len(s) for s in seqs], dtype=np.int64)
        return super().tokens(items, role)

    def reference(self, which: str, src: str) -> tuple[Callable[[list[Any], int, str], Any], str]:
        if which != "flagembedding":
            raise BenchError("decoder embedders are compared with FlagEmbedding (--reference flagembedding)")
        import FlagEmbedding

        name = "FlagICLModel" if self.model.icl else "FlagLLMModel"
        ref = getattr(FlagEmbedding, name)(src, **self._flag_settings())
        return self._flag_call(ref), f"FlagEmbedding {name} (use_fp16=False)"


class M3Bench(BenchAdapter):
    """BGE-M3 (BGEM3FlagModel): dense, lexical weights and ColBERT vectors compared separately."""

    OUTPUTS = {"dense": "return_dense", "sparse": "return_sparse", "colbert": "return_colbert_vecs"}

    def _flags(self) -> dict[str, bool]:
        heads = getattr(self.model, "heads", ("dense", "sparse", "colbert"))
        return {flag: out in heads for out, flag in self.OUTPUTS.items()}

    def ours(self, model: Any) -> Callable[[list[Any], int, str], Any]:
        flags = self._flags()

        def call(items: list[str], bs: int, role: str) -> dict[str, Any]:
            fn = model.encode_queries if role == "query" else model.encode_corpus
            return fn(items, batch_size=bs, **flags)
        return call

    def reference(self, which: str, src: str) -> tuple[Callable[[list[Any], int, str], Any], str]:
        if which != "flagembedding":
            raise BenchError("M3 artifacts are compared with FlagEmbedding's BGEM3FlagModel "
                             "(--reference flagembedding)")
        from FlagEmbedding import BGEM3FlagModel

        m = self.model
        ref = BGEM3FlagModel(src, use_fp16=False, devices="cpu", normalize_embeddings=m.normalize_embeddings,
                             query_instruction_for_retrieval=m.query_instruction_for_retrieval,
                             query_instruction_format=m.query_instruction_format,
                             query_max_length=m.query_max_length, passage_max_length=m.passage_max_length)
        flags = self._flags()

        def call(items: list[str], bs: int, role: str) -> dict[str, Any]:
            with _quiet():
                fn = ref.encode_queries if role == "query" else ref.encode_corpus
                return fn(items, batch_size=bs, **flags)
        return call, "FlagEmbedding BGEM3FlagModel (use_fp16=False)"

    def concat(self, outputs: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in ("dense_vecs", "lexical_weights", "colbert_vecs"):
            parts = [o.get(key) for o in outputs]
            if any(p is None for p in parts):
                continue
            out[key] = np.concatenate(parts) if key == "dense_vecs" else [x for p in parts for x in p]
        return out

    def compare(self, ref: dict[str, Any], got: dict[str, Any]) -> dict[str, dict[str, float]]:
        stats: dict[str, dict[str, float]] = {}
        if ref.get("dense_vecs") is not None and got.get("dense_vecs") is not None:
            stats["dense"] = cosine_stats(ref["dense_vecs"], got["dense_vecs"])
        if ref.get("lexical_weights") is not None and got.get("lexical_weights") is not None:
            stats["sparse"] = sparse_stats(ref["lexical_weights"], got["lexical_weights"])
        if ref.get("colbert_vecs") is not None and got.get("colbert_vecs") is not None:
            r, g = ref["colbert_vecs"], got["colbert_vecs"]
            bad = sum(np.shape(a) != np.shape(b) for a, b in zip(r, g))
            rows = [(a, b) for a, b in zip(r, g) if np.shape(a) == np.shape(b) and len(a)]
            s = cosine_stats(np.concatenate([a for a, _ in rows]), np.concatenate([b for _, b in rows]))
            s["shape_mismatches"] = int(bad)
            if bad:
                s["cos_min"] = -1.0  # a missing or extra token vector is a parity failure
            stats["colbert"] = s
        return stats


def sparse_stats(ref: list[dict], got: list[dict]) -> dict[str, float]:
    """Lexical weights as sparse vectors: row cosine (mean, min), max |weight diff| over the union
    of token ids, and the smallest Jaccard agreement of the token sets."""
    cos, diff, jac = [], 0.0, []
    for r, g in zip(ref, got):
        keys = sorted(set(r) | set(g))
        a = np.array([float(r.get(k, 0.0)) for k in keys])
        b = np.array([float(g.get(k, 0.0)) for k in keys])
        na, nb = np.linalg.norm(a), np.linalg.norm(b)
        cos.append(1.0 if na == nb == 0 else float(a @ b / max(na * nb, 1e-12)))
        diff = max(diff, float(np.abs(a - b).max()) if len(keys) else 0.0)
        jac.append(len(set(r) & set(g)) / len(keys) if keys else 1.0)
    c = np.array(cos)
    return {"cos_mean": float(c.mean()), "cos_min": float(c.min()), "cos_p01": float(np.percentile(c, 1)),
            "max_abs_diff": diff, "jaccard_min": float(min(jac)), "n": len(c)}


class RerankerBench(BenchAdapter):
    """Cross-encoders (FlagReranker); LLMRerankerBench and LayerwiseBench change only the reference."""

    pairs = True

    def max_length(self) -> int:
        return int(self.model.max_length)

    def tokens(self, items: list[Any], role: str) -> np.ndarray:
        """Tokens of each assembled pair, as the runtime builds it (its own truncation rules)."""
        m = self.model
        qml, ml = m._lengths(None, None)
        if hasattr(m, "_sequences"):  # LLM rerankers: bos A: q \n B: p \n prompt
            seqs = m._sequences(list(items), qml, ml, None)
        else:
            side = m._side(None)
            seqs = [m._assemble(q, p, ml, side)[0] for q, p in m._sides(list(items), qml, ml, side)[0]]
        return np.array([len(s) for s in seqs], dtype=np.int64)

    def call_kwargs(self) -> dict[str, Any]:
        return {"max_length": self.model.max_length}

    def ours(self, model: Any) -> Callable[[list[Any], int, str], Any]:
        kw = self.call_kwargs()
        return lambda items, bs, role: model.compute_score(items, batch_size=bs, **kw)

    def _reference_model(self, src: str) -> tuple[Any, str]:
        from FlagEmbedding import FlagReranker

        return FlagReranker(src, use_fp16=False, devices="cpu"), "FlagEmbedding FlagReranker (use_fp16=False)"

    def reference(self, which: str, src: str) -> tuple[Callable[[list[Any], int, str], Any], str]:
        if which != "flagembedding":
            raise BenchError("rerankers are compared with FlagEmbedding (--reference flagembedding)")
        ref, label = self._reference_model(src)
        kw = self.call_kwargs()

        def call(items: list[Any], bs: int, role: str) -> Any:
            with _quiet():
                return ref.compute_score([list(p) for p in items], batch_size=bs, **kw)
        return call, label

    def columns(self) -> list[str]:
        return ["score"]

    def concat(self, outputs: list[Any]) -> Any:
        """Join outputs in the call's own format: a flat list, or one list per cutoff layer."""
        if outputs and outputs[0] and isinstance(outputs[0][0], list):
            return [[x for o in outputs for x in o[j]] for j in range(len(outputs[0]))]
        return [x for o in outputs for x in o]

    @staticmethod
    def matrix(scores: Any) -> np.ndarray:
        """[n, cutoffs] float64 from a list of scores or a list of per-layer lists."""
        a = np.asarray(scores, dtype=np.float64)
        return a.T if a.ndim == 2 else a.reshape(-1, 1)

    def compare(self, ref: Any, got: Any) -> dict[str, dict[str, float]]:
        r, g = self.matrix(ref), self.matrix(got)
        return {name: score_stats(r[:, j], g[:, j], k=BENCH_TOP_K) for j, name in enumerate(self.columns())}

    def gate(self, stats: dict[str, dict[str, float]], precision: str,
             overrides: dict[str, float]) -> list[dict[str, Any]]:
        """fp32 by max |score diff| (as the exporter), the other precisions by Spearman (the gate their
        export recorded, else bgert.quality's default); ``overrides`` set the threshold."""
        if precision == "fp32":
            metric, threshold = "max_abs_diff", FP32_MAX_ABS_DIFF
        else:
            metric = "spearman"
            threshold = self.export_gate(precision).get("spearman", spearman_gate(precision))
        threshold = overrides.get(precision, threshold)
        op = "<=" if metric == "max_abs_diff" else ">="
        return [_gate(out, metric, s[metric], op, threshold) for out, s in stats.items()]


class LLMRerankerBench(RerankerBench):
    """bge-reranker-v2-gemma against FlagLLMReranker."""

    def _reference_model(self, src: str) -> tuple[Any, str]:
        from FlagEmbedding import FlagLLMReranker

        return FlagLLMReranker(src, use_fp16=False, devices="cpu"), "FlagEmbedding FlagLLMReranker (fp32)"


class LayerwiseBench(RerankerBench):
    """bge-reranker-v2-minicpm-layerwise: every exported cutoff scored and compared."""

    def call_kwargs(self) -> dict[str, Any]:
        return {"max_length": self.model.max_length, "cutoff_layers": list(self.model.exported_cutoffs)}

    def columns(self) -> list[str]:
        return [f"score@layer{c}" for c in self.model.exported_cutoffs]

    def _reference_model(self, src: str) -> tuple[Any, str]:
        from FlagEmbedding import LayerWiseFlagLLMReranker

        ref = LayerWiseFlagLLMReranker(src, use_fp16=False, devices="cpu")
        ref.model.config.use_cache = False  # transformers 4.57 crashes in the bundled code's cache path
        return ref, "FlagEmbedding LayerWiseFlagLLMReranker (fp32)"

    def layers(self, config: dict[str, Any]) -> int:
        return max(self.model.exported_cutoffs)


def adapter_for(model: Any) -> BenchAdapter:
    """The bench adapter the artifact's family names (BenchError when the bench cannot cover the kind)."""
    fam = family(model.manifest.kind)
    if fam.bench_adapter is None:
        raise BenchError(f"bgert bench cannot run {fam.name!r} artifacts: {fam.bench_not_covered}.")
    return load_object(fam.bench_adapter)(model)


def config_value(config: dict[str, Any], *names: str) -> Any:
    for n in names:
        if config.get(n) is not None:
            return config[n]
    raise KeyError(f"config.json has none of {names}")
