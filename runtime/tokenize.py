"""Tokenisation with the `tokenizers` library from an artifact's tokenizer.json.

Any padding or truncation stored inside tokenizer.json is switched off: the runtime decides
truncation (per call, by max_length, counting special tokens, like HF's ``truncation=True``) and
padding (by length bucket, in bgert.runtime.batching).
"""
from __future__ import annotations

import json
import logging
import operator
import threading
from typing import Any, Sequence

from tokenizers import Tokenizer

from .manifest import ArtifactError

log = logging.getLogger("bgert")


def check_texts(texts: Any, what: str = "sentences", start: int = 0) -> tuple[list[str], bool]:
    """Normalise input to (list of str, was_single). Raises TypeError/ValueError naming the bad item
    (its index counted from ``start``, for a window of a longer list)."""
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
            raise TypeError(f"{what}[{start + i}] is {type(t).__name__}, expected str")
        try:
            t.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"{what}[{start + i}] is not valid Unicode text (lone surrogate at position "
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


#: where an over-long text is cut: "right" keeps its start (the reference's default), "left" keeps its end
TRUNCATION_SIDES = ("right", "left")


def check_side(side: Any) -> str:
    """``side`` as "right" or "left" (HF's ``truncation_side``); ValueError naming both otherwise."""
    if side not in TRUNCATION_SIDES:
        raise ValueError(f"truncation_side must be 'right' (keep the start of a text) or 'left' (keep its end), "
                         f"got {side!r}")
    return side


#: a text longer than this many characters per kept token is cut (at a space) before tokenising
CUT_CHARS_PER_TOKEN = 10
#: normalizers that map each character (or grapheme) on its own, and pre-tokenizers that split at
#: every space: with them, a text cut just before a space tokenises to exactly the leading tokens of
#: the whole text (``Replace`` only with a one-character pattern, which cannot straddle the cut)
_LOCAL_NORMALIZERS = {"BertNormalizer", "Lowercase", "NFC", "NFD", "NFKC", "NFKD", "StripAccents", "Strip",
                      "Prepend", "Precompiled", "Replace"}
_SPACE_SPLITTERS = {"BertPreTokenizer", "Whitespace", "WhitespaceSplit", "Metaspace", "ByteLevel"}
_LOCAL_SPLITTERS = _SPACE_SPLITTERS | {"Digits", "Punctuation"}


def _members(part: dict[str, Any] | None, key: str) -> list[dict[str, Any]]:
    if part is None:
        return []
    return [m for sub in part[key] for m in _members(sub, key)] if part.get("type") == "Sequence" else [part]


def cuts_exactly(spec: dict[str, Any]) -> bool:
    """Whether texts may be cut at a space before tokenising without changing their leading tokens:
    character-local normalizers, a pre-tokenizer that splits at every space, no added token holding one."""
    norms = _members(spec.get("normalizer"), "normalizers")
    pres = _members(spec.get("pre_tokenizer"), "pretokenizers")
    local = all(n.get("type") in _LOCAL_NORMALIZERS and (n.get("type") != "Replace" or
                len(n.get("pattern", {}).get("String") or "") == 1) for n in norms)
    splits = (pres and all(p.get("type") in _LOCAL_SPLITTERS for p in pres)
              and any(p.get("type") in _SPACE_SPLITTERS and p.get("split", True) and p.get("use_regex", True)
                      for p in pres))
    spaced = any(" " in t.get("content", "") for t in spec.get("added_tokens") or [])
    return bool(local and splits and not spaced)


def _pipeline_spec(tok: Tokenizer, text: str) -> dict[str, Any]:
    """The normalizer, pre-tokenizer and added tokens of tokenizer.json, as ``cuts_exactly`` reads them:
    from the tokenizer's own components (their pickled state is their JSON), not by parsing the whole
    file again (its vocabulary is most of it: ~15 ms for a BERT one); from the file where that fails."""
    try:
        parts = {name: None if comp is None else json.loads(comp.__getstate__())
                 for name, comp in (("normalizer", tok.normalizer), ("pre_tokenizer", tok.pre_tokenizer))}
        parts["added_tokens"] = [{"content": t.content} for t in tok.get_added_tokens_decoder().values()]
        return parts
    except (AttributeError, TypeError, ValueError):
        return json.loads(text)


class TextTokenizer:
    """Thread-safe wrapper around a `tokenizers.Tokenizer`, with per-max-length truncation.

    Truncation happens while tokenising (``enable_truncation``), and where the tokenizer allows it
    (``cuts_exactly``) a text far beyond the kept length is first cut at a space after
    ``CUT_CHARS_PER_TOKEN`` characters per kept token; a cut text that does not fill the kept length
    is tokenised again in full. So no token list longer than the kept length is built, and the ids
    are those of the whole text.
    """

    def __init__(self, path: str, info: dict[str, Any] | None = None, max_length: int | None = None):
        """``max_length``: the length most calls truncate to (the model's); its tokenizer is made now and
        serves the calls that do not depend on truncation too, so a model that only ever truncates to it
        builds one `tokenizers.Tokenizer` (each costs tens of ms and several MB), not two."""
        self._truncating: dict[tuple[int, str], Tokenizer] = {}
        self._plain_tokenizer: Tokenizer | None = None
        try:
            with open(path, encoding="utf-8") as f:
                self._json = f.read()
            first = self._fresh()
            if max_length is not None:
                first.enable_truncation(max_length=check_max_length(max_length), strategy="longest_first",
                                        direction="right")
                self._truncating[check_max_length(max_length), "right"] = first
            else:
                self._plain_tokenizer = first
            self.cuts_exactly = cuts_exactly(_pipeline_spec(first, self._json))
        except Exception as e:  # tokenizers raises a bare Exception for a damaged file
            raise ArtifactError(f"{path} is not a readable tokenizer.json ({e}); re-export the artifact.") from e
        self._any = first  # decode, vocabulary look-ups: the same whatever the truncation
        self.info = dict(info or {})
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

    @property
    def _plain(self) -> Tokenizer:
        """The untruncated tokenizer, made on first use."""
        if self._plain_tokenizer is None:
            with self._lock:
                if self._plain_tokenizer is None:
                    self._plain_tokenizer = self._fresh()
        return self._plain_tokenizer

    def _for_length(self, max_length: int | None, side: str = "right") -> Tokenizer:
        if max_length is None:
            return self._plain
        max_length = check_max_length(max_length)
        tok = self._truncating.get((max_length, side))
        if tok is None:
            with self._lock:
                tok = self._truncating.get((max_length, side))
                if tok is None:
                    tok = self._fresh()
                    tok.enable_truncation(max_length=max_length, strategy="longest_first", direction=side)
                    self._truncating[max_length, side] = tok
        return tok

    def _cut(self, text: str, max_length: int) -> str:
        """``text`` up to the first space after CUT_CHARS_PER_TOKEN * max_length characters (spaces before
        the cut dropped), or whole where it is shorter or has no space there."""
        limit = CUT_CHARS_PER_TOKEN * max_length
        at = text.find(" ", limit) if len(text) > limit else -1
        return text if at < 0 else text[:at].rstrip(" ")

    def _encodings(self, texts: Sequence[str], max_length: int | None, add_special_tokens: bool,
                   side: str) -> list[Any]:
        """Encodings truncated while tokenising; texts far too long cut first where that is exact."""
        tok = self._for_length(max_length, check_side(side))
        if max_length is None or side != "right" or not self.cuts_exactly:
            return tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        cut = [self._cut(t, max_length) for t in texts]
        encs = tok.encode_batch(cut, add_special_tokens=add_special_tokens)
        short = [i for i, (t, c) in enumerate(zip(texts, cut)) if t is not c and not encs[i].overflowing]
        if short:  # the cut kept fewer tokens than max_length: the whole text decides
            for i, e in zip(short, tok.encode_batch([texts[i] for i in short], add_special_tokens=add_special_tokens)):
                encs[i] = e
        return encs

    def encode(self, texts: Sequence[str], max_length: int | None = None,
               add_special_tokens: bool = True) -> list[list[int]]:
        """Token ids per text, truncated to ``max_length`` tokens (special tokens included)."""
        return self.encode_checked(texts, max_length, add_special_tokens)[0]

    def encode_checked(self, texts: Sequence[str], max_length: int | None = None,
                       add_special_tokens: bool = True, side: str = "right",
                       warn: bool = True) -> tuple[list[list[int]], bool]:
        """``encode``, and whether any text was truncated (the HTTP server refuses those with
        ``truncate=false``, as TEI does). ``side='left'`` keeps the end of each text instead."""
        if not texts:
            return [], False
        encs = self._encodings(texts, max_length, add_special_tokens, side)
        if max_length is not None:
            # tokenizers skips truncation when max_length cannot even hold the special tokens
            bad = next((i for i, e in enumerate(encs) if len(e.ids) > max_length), None)
            if bad is not None:
                raise ValueError(f"max_length={max_length} is too small: texts[{bad}] keeps {len(encs[bad].ids)} "
                                 "tokens because truncation cannot drop the special tokens the tokenizer adds; "
                                 "use a larger max_length.")
        cut = max_length is not None and any(e.overflowing for e in encs)
        if cut and warn and not self._warned:
            self._warned = True
            log.warning("bgert: some inputs are longer than max_length=%d tokens and were truncated "
                        "(as the reference does). This is reported once per model.", max_length)
        return [e.ids for e in encs], cut

    def encodings(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[Any]:
        """The `tokenizers` Encodings of ``texts``, untruncated (ids, tokens, offsets: ``bgert serve``'s /tokenize)."""
        return self._plain.encode_batch(list(texts), add_special_tokens=add_special_tokens) if texts else []

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._any.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._any.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._any.id_to_token(i)

    @property
    def vocab_size(self) -> int:
        return self._any.get_vocab_size(with_added_tokens=True)
