"""Decoder-only embedders with FlagEmbedding 1.4.2's API: FlagLLMModel (bge-multilingual-gemma2)
and FlagICLModel (bge-en-icl).

Both embed with the hidden state of the last real token, normalised (inside the graph), and put
queries into ``query_instruction_format`` (``<instruct>{}\\n<query>{}``) when an instruction is
given. FlagICLModel builds queries differently, and bgert copies it step by step:

1. the query (with its instruction) is tokenised without special tokens and cut to
   ``max_length - len(ids('<s>')) - len(ids(suffix + '</s>'))`` tokens, then decoded back to text;
2. the text becomes ``prefix + text + suffix``, where ``prefix`` is the in-context examples, each
   ``<instruct>{instruct}\\n<query>{query}\\n<response>{response}``, joined by blank lines and
   followed by one (empty without examples), and ``suffix`` is ``\\n<response>``;
3. that is tokenised with special tokens and cut to ``(len(prefix)+len(suffix)+max_length+8)//8*8+8``.

Passages are embedded as plain text in both (``encode_corpus``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from .base import check_call_options
from .embedder import Embedder, EmbedderSection
from .registry import ARCHITECTURE, NAME_HINT, Checkpoint, Family, register
from .request import Request, request_method
from .tokenize import check_max_length, check_texts
from .windows import windowed

Example = Mapping[str, str]
#: HF's PreTrainedTokenizerBase.clean_up_tokenization replacements, in its order
_CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
            (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def with_instruction(instruction: str | None, fmt: str, texts: Sequence[str]) -> list[str]:
    """FlagEmbedding's get_detailed_instruct for every text; ``None`` leaves texts as they are
    (an empty instruction still applies the format, as in the reference)."""
    if instruction is None:
        return list(texts)
    fmt = fmt.replace("\\n", "\n")
    return [fmt.format(instruction, t) for t in texts]


def check_examples(examples: Any) -> list[dict[str, str]]:
    """In-context examples as a list of dicts with optional 'instruct', 'query', 'response' strings."""
    if isinstance(examples, Mapping) or not isinstance(examples, (list, tuple)):
        raise TypeError("examples must be a list of dicts with 'instruct', 'query' and 'response' keys, "
                        f"got {type(examples).__name__}")
    out = []
    for i, ex in enumerate(examples):
        if not isinstance(ex, Mapping):
            raise TypeError(f"examples[{i}] must be a dict with 'instruct', 'query' and 'response', got {ex!r:.80}")
        unknown = set(ex) - {"instruct", "query", "response"}
        if unknown:
            raise ValueError(f"examples[{i}] has unknown keys {sorted(unknown)}; use instruct, query, response")
        out.append(dict(ex))
    return out


class DecoderEmbedder(Embedder):
    """Embeddings from an exported decoder-only embedder (FlagLLMModel / FlagICLModel calls).

    >>> m = DecoderEmbedder("artifacts/bge-en-icl", query_instruction_for_retrieval="Given a web search "
    ...                     "query, retrieve relevant passages that answer the query.",
    ...                     examples_for_task=[{"instruct": "...", "query": "...", "response": "..."}])
    >>> q = m.encode_queries(["how much protein should a female eat"])
    >>> p = m.encode_corpus(["As a general guideline, ..."])
    """


    def __init__(self, model_dir: str, *, examples_for_task: Sequence[Example] | None = None,
                 examples_instruction_format: str | None = None, suffix: str | None = None,
                 query_max_length: int | None = None, passage_max_length: int | None = None, **kwargs: Any):
        super().__init__(model_dir, query_max_length=query_max_length, passage_max_length=passage_max_length,
                         **kwargs)
        m = self.manifest.section
        default = min(m.default_max_length, self.max_length)
        self.query_max_length = check_max_length(query_max_length or default, self.max_length)
        self.passage_max_length = check_max_length(passage_max_length or default, self.max_length)
        self.query_instruction_format = self.query_instruction_format.replace("\\n", "\n")
        self.icl = m.icl
        self.examples_instruction_format = (examples_instruction_format or m.examples_instruction_format
                                            ).replace("\\n", "\n")
        self.suffix = suffix if suffix is not None else m.icl_suffix
        self.clean_up_tokenization_spaces = m.clean_up_tokenization_spaces
        self.examples_for_task = None if examples_for_task is None else check_examples(examples_for_task)
        if self.examples_for_task is not None and not self.icl:
            raise ValueError(f"{self.model_dir} is not an in-context-learning (ICL) embedder; examples_for_task "
                             "only applies to bge-en-icl style models (export with icl=True).")

    def set_examples(self, examples_for_task: Sequence[Example] | None = None) -> None:
        """Replace the in-context examples used by ``encode_queries`` (FlagICLModel.set_examples)."""
        if examples_for_task is not None:
            self.examples_for_task = check_examples(examples_for_task)

    def prefix(self, examples: Sequence[Example] | None, instruction: str | None) -> str:
        """FlagICLModel's prefix: formatted examples joined by blank lines plus one, or ''."""
        if examples is None:
            return ""
        # a missing 'instruct' falls back to the query instruction, formatted as the reference does (even None)
        parts = [self.examples_instruction_format.format(ex.get("instruct", instruction), ex.get("query", ""),
                                                         ex.get("response", "")) for ex in check_examples(examples)]
        return "\n\n".join(parts) + "\n\n"

    def _decode(self, ids: Sequence[int]) -> str:
        """HF ``batch_decode`` of one row: special tokens kept, the tokenizer's space clean-up if it has one."""
        text = self.tokenizer.decode(ids)
        if self.clean_up_tokenization_spaces:
            for a, b in _CLEANUP:
                text = text.replace(a, b)
        return text

    def icl_sequences(self, queries: list[str], max_length: int, examples: Sequence[Example] | None,
                      instruction: str | None, truncation_side: str = "right") -> list[list[int]]:
        """Token ids of each query as FlagICLModel.encode_queries_single_device builds them."""
        prefix = self.prefix(examples, instruction)
        count = lambda s: len(self.tokenizer.encode([s], add_special_tokens=False)[0])  # noqa: E731
        budget = max_length - count("<s>") - count(f"{self.suffix}</s>")
        if budget < 1:
            raise ValueError(f"max_length={max_length} leaves no room for the query after the ICL suffix; "
                             "use a larger max_length.")
        full_max = (count(prefix) + count(self.suffix) + max_length + 8) // 8 * 8 + 8
        texts = with_instruction(instruction, self.query_instruction_format, queries)
        cut = self.tokenizer.encode_checked(texts, budget, add_special_tokens=False, side=truncation_side, warn=False)[0]
        return self.tokenizer.encode([prefix + self._decode(ids) + self.suffix for ids in cut], full_max)

    @windowed(check_texts)
    @request_method
    def encode_queries(self, queries: str | Sequence[str], batch_size: int | None = None,
                       max_length: int | None = None, convert_to_numpy: bool = True, *,
                       instruction: str | None = None, examples: Sequence[Example] | None = None,
                       normalize_embeddings: bool | None = None, truncation_side: str = "right",
                       **reference_only: Any) -> Request:
        """Embed queries with the instruction (per call, else the constructor's) and, for ICL models,
        the in-context examples (per call, else the constructor's / set_examples'). ``truncation_side``
        as in ``encode`` (for ICL models it cuts the query with its instruction, before the examples join)."""
        check_call_options(self.encode_queries, reference_only)
        instruction = instruction if instruction is not None else self.query_instruction_for_retrieval
        max_length = check_max_length(max_length or self.query_max_length, self.max_length)
        if examples is not None and not self.icl:
            raise ValueError("examples= only applies to in-context-learning (ICL) embedders such as bge-en-icl; "
                             "this artifact was exported without icl.")
        texts, single = check_texts(queries)
        cut = False
        if self.icl:
            seqs = self.icl_sequences(texts, max_length,
                                      examples if examples is not None else self.examples_for_task, instruction,
                                      truncation_side)
        else:
            seqs, cut = self.tokenizer.encode_checked(
                with_instruction(instruction, self.query_instruction_format, texts), max_length, side=truncation_side)
        return self._vectors(seqs, single, batch_size, convert_to_numpy, normalize_embeddings, cut)


@dataclass(kw_only=True)
class DecoderEmbedderSection(EmbedderSection):
    """An encoder embedder's keys plus the decoder's default length and in-context-learning settings."""

    pooling: str = "last_token"
    default_max_length: int = 512  # FlagLLMModel's / FlagICLModel's default max length
    icl: bool = False
    examples_instruction_format: str = "<instruct>{}\n<query>{}\n<response>{}"
    icl_suffix: str = "\n<response>"
    clean_up_tokenization_spaces: bool = False


#: config.json model types of the decoder-only embedders (bge-multilingual-gemma2, bge-en-icl, Qwen/Llama ones)
DECODER_TYPES = ("gemma2", "mistral", "qwen2", "qwen3", "llama")


@register
class DecoderEmbedderFamily(Family):
    """Decoder-only embedders: FlagLLMModel (bge-multilingual-gemma2) and FlagICLModel (bge-en-icl)."""

    name = "decoder_embedder"
    runtime_class = DecoderEmbedder
    section = DecoderEmbedderSection
    export_spec = "bgert.export.decoder_embedder_spec:DecoderEmbedderSpec"
    bench_adapter = "bgert.benchmarks.bench_families:DecoderEmbedderBench"
    outputs = {"dense": "vectors"}

    @classmethod
    def detect(cls, ck: Checkpoint) -> int:
        """A decoder's base model class (Gemma2Model, MistralModel) says embedder; a bare decoder model
        type or causal LM is only a weak hint (LLM rerankers are causal LMs too)."""
        if ck.model_type in DECODER_TYPES and any(a.endswith("Model") for a in ck.architectures):
            return ARCHITECTURE
        if ck.model_type in DECODER_TYPES or any(a.endswith("ForCausalLM") for a in ck.architectures):
            return NAME_HINT
        return 0
