"""Tokenisation with the `tokenizers` library from an artifact's tokenizer.json.

Any padding or truncation stored inside tokenizer.json is switched off: the runtime decides
truncation (per call, by max_length, counting special tokens, like HF's ``truncation=True``) and
padding (by length bucket, in bgert.runtime.batching).
"""
from __future__ import annotations

import logging
import operator
import threading
from typing import Any, Sequence

from tokenizers import Tokenizer

from .manifest import ArtifactError

log = logging.getLogger("bgert")


def check_texts(texts: Any, what: str = "sentences") -> tuple[list[str], bool]:
    """Normalise input to (list of str, was_single). Raises TypeError/ValueError naming the bad item."""
    if isinstance(texts, str):
        items, single = [texts], True
    elif isinstance(texts, (set, frozenset)):
        raise TypeError(f"{what} is a {type(texts).__name__}, which has no order to match results to; pass a list")
    elif isinstance(texts, (list, tuple)):
        items, single = list(texts), False
    elif hasattr(texts, "__iter__") and not isinstance(texts, (bytes, dict)):
        items, single = list(texts), False
    else:
        raise TypeError(f"{what} must be a str or a list of str, got {type(texts).__name__}")
    for i, t in enumerate(items):
        if not isinstance(t, str):
            raise TypeError(f"{what}[{i}] is {type(t).__name__}, expected str")
        try:
            t.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"{what}[{i}] is not valid Unicode text (lone surrogate at position "
                             f"{e.start}); clean it, e.g. text.encode('utf-8', 'replace').decode()") from e
    return items, single


def check_max_length(max_length: Any, limit: int | None = None) -> int:
    """``max_length`` as a positive int, capped at the model's ``limit``; a clear error otherwise."""
    try:
        n = operator.index(max_length)
    except TypeError:
        raise TypeError(f"max_length must be an int, got {type(max_length).__name__}") from None
    if n < 1:
        raise ValueError(f"max_length must be >= 1, got {n}")
    return n if limit is None else min(n, limit)


class TextTokenizer:
    """Thread-safe wrapper around a `tokenizers.Tokenizer`, with per-max-length truncation."""

    def __init__(self, path: str, info: dict[str, Any] | None = None):
        try:
            with open(path, encoding="utf-8") as f:
                self._json = f.read()
            self._plain = self._fresh()
        except Exception as e:  # tokenizers raises a bare Exception for a damaged file
            raise ArtifactError(f"{path} is not a readable tokenizer.json ({e}); re-export the artifact.") from e
        self.info = dict(info or {})
        self._truncating: dict[int, Tokenizer] = {}
        self._lock = threading.Lock()
        self._warned = False
        pad = self.info.get("pad_token_id")
        self.pad_token_id: int = int(pad) if pad is not None else 0
        self.padding_side: str = self.info.get("padding_side", "right")

    def _fresh(self) -> Tokenizer:
        tok = Tokenizer.from_str(self._json)
        tok.no_padding()
        tok.no_truncation()
        return tok

    def _for_length(self, max_length: int | None) -> Tokenizer:
        if max_length is None:
            return self._plain
        max_length = check_max_length(max_length)
        tok = self._truncating.get(max_length)
        if tok is None:
            with self._lock:
                tok = self._truncating.get(max_length)
                if tok is None:
                    tok = self._fresh()
                    tok.enable_truncation(max_length=max_length, strategy="longest_first", direction="right")
                    self._truncating[max_length] = tok
        return tok

    def encode(self, texts: Sequence[str], max_length: int | None = None,
               add_special_tokens: bool = True) -> list[list[int]]:
        """Token ids per text, truncated to ``max_length`` tokens (special tokens included)."""
        return self.encode_checked(texts, max_length, add_special_tokens)[0]

    def encode_checked(self, texts: Sequence[str], max_length: int | None = None,
                       add_special_tokens: bool = True) -> tuple[list[list[int]], bool]:
        """``encode``, and whether any text was truncated (the HTTP server refuses those with
        ``truncate=false``, as TEI does)."""
        if not texts:
            return [], False
        encs = self._for_length(max_length).encode_batch(list(texts), add_special_tokens=add_special_tokens)
        if max_length is not None:
            # tokenizers skips truncation when max_length cannot even hold the special tokens
            bad = next((i for i, e in enumerate(encs) if len(e.ids) > max_length), None)
            if bad is not None:
                raise ValueError(f"max_length={max_length} is too small: texts[{bad}] keeps {len(encs[bad].ids)} "
                                 "tokens because truncation cannot drop the special tokens the tokenizer adds; "
                                 "use a larger max_length.")
        cut = max_length is not None and any(e.overflowing for e in encs)
        if cut and not self._warned:
            self._warned = True
            log.warning("bgert: some inputs are longer than max_length=%d tokens and were truncated "
                        "(as the reference does). This is reported once per model.", max_length)
        return [e.ids for e in encs], cut

    def encode_pairs(self, firsts: Sequence[str], seconds: Sequence[str]) -> list[tuple[list[int], list[int]]]:
        """Ids of each side tokenised alone without special tokens (for pair assembly by rerankers)."""
        a = self._plain.encode_batch(list(firsts), add_special_tokens=False) if firsts else []
        b = self._plain.encode_batch(list(seconds), add_special_tokens=False) if seconds else []
        return [(x.ids, y.ids) for x, y in zip(a, b)]

    def encodings(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[Any]:
        """The `tokenizers` Encodings of ``texts``, untruncated (ids, tokens, offsets: ``bgert serve``'s /tokenize)."""
        return self._plain.encode_batch(list(texts), add_special_tokens=add_special_tokens) if texts else []

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._plain.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._plain.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._plain.id_to_token(i)

    @property
    def vocab_size(self) -> int:
        return self._plain.get_vocab_size(with_added_tokens=True)
