"""Property tests on tokenise → batch → run with hostile text (hypothesis).

Random unicode (control characters, zero-width and right-to-left marks, combining marks, emoji,
CJK), whitespace-only and empty strings, 100,000-character strings, lone surrogates and a list of
10,000 mixed items go through the real runtime. Properties: no crash, the right shape and dtype,
finite unit vectors, and each row equal to encoding that item alone (so a neighbour, a batch or a
bucket never changes a result). Tokenisation and vectors are also checked against the reference
(transformers' tokenizer, FlagEmbedding's FlagModel) on the same hostile text.

Examples are few and derandomised so CI is fast and repeatable; BGERT_HYPOTHESIS_SCALE=20 runs
twenty times more examples from fresh random seeds (what was done when these tests were written).
"""
from __future__ import annotations

import os
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from bgert.runtime import Embedder
from bgert.runtime.batching import bucket_for, pad, plan_batches

SCALE = float(os.environ.get("BGERT_HYPOTHESIS_SCALE", "1"))
ATOL = 1e-5  # float noise from padding to another bucket / batching with other rows


def cfg(examples: int) -> settings:
    return settings(max_examples=max(1, int(examples * SCALE)), deadline=None, derandomize=SCALE == 1,
                    database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


CONTROL = "".join(map(chr, [*range(0x00, 0x20), *range(0x7F, 0xA0)]))
ZERO_WIDTH = "\u200b\u200c\u200d\u2060\ufeff\u00ad\u180e"
BIDI = "\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u061c"
WHITESPACE = " \t\n\r\x0b\x0c\u00a0\u1680\u2000\u2003\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
SCRIPTS = "abcXYZ019 .,!?-panda北京中华Москваשלוםمرحبا🐼🎋👩‍💻é\u0301\u0308ﬁ①Ⅻ"

#: any scalar value except surrogates (Cs): includes controls, private use, unassigned
any_char = st.characters(exclude_categories=("Cs",))
hostile_char = st.one_of(any_char, st.sampled_from(CONTROL + ZERO_WIDTH + BIDI + WHITESPACE + SCRIPTS))
hostile_text = st.one_of(
    st.text(hostile_char, max_size=60),
    st.text(st.sampled_from(WHITESPACE), max_size=30),                     # whitespace only (or empty)
    st.text(st.sampled_from(ZERO_WIDTH + BIDI + CONTROL), min_size=1, max_size=30),  # nothing visible
    st.lists(st.sampled_from(["panda", "bear", "北京", "שלום", "\u202e", "\u200b", "🐼", "\x00"]),
             max_size=400).map(" ".join),                                  # up to hundreds of tokens
)


@pytest.fixture(scope="module")
def model(tiny_bge_art) -> Embedder:
    return Embedder(tiny_bge_art)


@pytest.fixture(scope="module")
def mean_model(tiny_mean_art) -> Embedder:
    return Embedder(tiny_mean_art)  # mean pooling: padding would leak into the mean if masking broke


def check_rows(model: Embedder, texts: list[str], got: np.ndarray, **kwargs) -> None:
    """Right shape, dtype, finite unit rows, and each row equal to that text encoded alone."""
    assert got.shape == (len(texts), model.dim) and got.dtype == np.float32
    assert np.isfinite(got).all()
    if len(texts):
        assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    for text, row in zip(texts, got):
        alone = model.encode(text, **kwargs)
        assert alone.shape == (model.dim,)
        assert np.abs(alone - row).max() <= ATOL, repr(text[:80])


# ---- the whole path on hostile text ---------------------------------------------------------
@cfg(30)
@given(texts=st.lists(hostile_text, max_size=12), max_length=st.sampled_from([None, 2, 3, 8, 64]))
def test_hostile_lists_match_items_encoded_alone(model, texts, max_length):
    got = model.encode(texts, max_length=max_length)
    check_rows(model, texts, got, max_length=max_length)


@cfg(15)
@given(texts=st.lists(hostile_text, min_size=1, max_size=8), budget=st.sampled_from([1, 40, 300]),
       batch_size=st.sampled_from([1, 3, None]))
def test_mean_pooling_ignores_neighbours_and_batching(mean_model, texts, budget, batch_size):
    base = mean_model.encode(texts)
    other = Embedder(mean_model.model_dir, token_budget=budget, length_buckets=[4, 128], verify=False)
    assert np.abs(other.encode(texts, batch_size=batch_size) - base).max() <= ATOL
    check_rows(mean_model, texts, base)


@cfg(6)
@given(seed=st.text(hostile_char, min_size=1, max_size=12))
def test_100k_character_strings_are_truncated_not_fatal(model, seed):
    long = (seed * (100_000 // len(seed) + 1))[:100_000]
    got = model.encode(["short", long, "   "])
    check_rows(model, ["short", long, "   "], got)
    # truncation keeps the first max_length tokens: any prefix that is already that long gives the same vector
    prefix = long[:20_000]
    assume(len(model.tokenizer.encode([prefix])[0]) > model.max_length + 10)
    assert np.abs(model.encode(prefix) - got[1]).max() <= ATOL


@cfg(30)
@given(texts=st.lists(hostile_text, min_size=1, max_size=6), data=st.data())
def test_lone_surrogate_is_a_clear_error_naming_the_item(model, texts, data):
    i = data.draw(st.integers(0, len(texts) - 1))
    pos = data.draw(st.integers(0, len(texts[i])))
    surrogate = chr(data.draw(st.integers(0xD800, 0xDFFF)))
    texts[i] = texts[i][:pos] + surrogate + texts[i][pos:]
    with pytest.raises(ValueError, match=rf"sentences\[{i}\] is not valid Unicode.*surrogate"):
        model.encode(texts)


# ---- against the reference -------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_tokenizer(tiny_bge):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_bge)


@cfg(60)
@given(texts=st.lists(hostile_text, min_size=1, max_size=8), max_length=st.integers(2, 80))
def test_token_ids_match_transformers(model, hf_tokenizer, texts, max_length):
    ref = hf_tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    assert model.tokenizer.encode(texts, max_length) == ref


@pytest.fixture(scope="module")
def flag_model(tiny_bge):
    from FlagEmbedding import FlagModel

    return FlagModel(tiny_bge, use_fp16=False, devices="cpu")


@cfg(10)
@given(texts=st.lists(hostile_text, min_size=1, max_size=8))
def test_vectors_match_flagmodel_on_hostile_text(model, flag_model, texts):
    ref = flag_model.encode(texts, batch_size=4)
    got = model.encode(texts)
    cos = (ref * got).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
    assert cos.min() >= 0.99999


# ---- batching, as pure functions -------------------------------------------------------------
@cfg(300)
@given(lengths=st.lists(st.integers(1, 600), max_size=300),
       buckets=st.lists(st.integers(1, 600), min_size=1, max_size=6, unique=True),
       budget=st.integers(1, 20_000), max_batch=st.one_of(st.none(), st.integers(1, 64)),
       multiple_of=st.sampled_from([1, 8]))
def test_plan_batches_covers_every_item_once_within_budget(lengths, buckets, budget, max_batch, multiple_of):
    batches = plan_batches(lengths, buckets, budget, max_batch, multiple_of)
    seen = np.concatenate([b.indices for b in batches]) if batches else np.array([], dtype=np.int64)
    assert sorted(seen.tolist()) == list(range(len(lengths)))
    previous = None
    for b in batches:
        longest = max(lengths[i] for i in b.indices)
        assert b.length == bucket_for(longest, sorted(buckets), multiple_of) >= longest
        assert b.length % multiple_of == 0
        assert len(b.indices) == 1 or len(b.indices) * b.length <= budget
        assert max_batch is None or len(b.indices) <= max_batch
        assert previous is None or longest <= previous  # longest first
        previous = min(lengths[i] for i in b.indices)


@cfg(100)
@given(seqs=st.lists(st.lists(st.integers(0, 500), max_size=20), min_size=1, max_size=10),
       extra=st.integers(0, 5), side=st.sampled_from(["left", "right"]), pad_id=st.integers(0, 3))
def test_pad_keeps_every_token_and_masks_the_rest(seqs, extra, side, pad_id):
    length = max(map(len, seqs)) + extra
    ids, mask = pad(seqs, length, pad_id, side)
    assert ids.shape == mask.shape == (len(seqs), length) and ids.dtype == mask.dtype == np.int64
    for row, seq in enumerate(seqs):
        assert mask[row].sum() == len(seq)
        assert ids[row][mask[row] == 1].tolist() == list(seq)
        assert (ids[row][mask[row] == 0] == pad_id).all()
        real = np.flatnonzero(mask[row])
        if len(seq):  # real tokens are contiguous, at the chosen side
            assert real[-1] - real[0] == len(seq) - 1
            assert (real[-1] == length - 1) if side == "left" else (real[0] == 0)


# ---- 10,000 mixed items ----------------------------------------------------------------------
def mixed_items(n: int, seed: int = 0) -> list[str]:
    """n texts of every hostile kind, with duplicates and three 100,000-character strings."""
    rng = random.Random(seed)
    pool = CONTROL + ZERO_WIDTH + BIDI + WHITESPACE + SCRIPTS

    def one(k: int) -> str:
        kind = k % 8
        if kind == 0:
            return ""
        if kind == 1:
            return "".join(rng.choice(WHITESPACE) for _ in range(rng.randint(1, 20)))
        if kind == 2:
            return "".join(rng.choice(ZERO_WIDTH + BIDI + CONTROL) for _ in range(rng.randint(1, 20)))
        if kind == 3:
            return "".join(chr(rng.choice([rng.randint(0x20, 0xD7FF), rng.randint(0xE000, 0x10FFFF)]))
                           for _ in range(rng.randint(1, 40)))
        if kind == 4:
            return " ".join(rng.choice(["panda", "北京", "שלום", "🐼", "bear"]) for _ in range(rng.randint(1, 60)))
        return "".join(rng.choice(pool) for _ in range(rng.randint(1, 120)))

    items = [one(k) for k in range(n)]
    for k in rng.sample(range(n), 3):
        items[k] = ("panda ביער 北京 " * 8000)[:100_000]
    for k in rng.sample(range(n), 50):  # duplicates far apart in the list
        items[k] = items[rng.randrange(n)]
    return items


def test_ten_thousand_mixed_items(model):
    items = mixed_items(10_000)
    got = model.encode(items)
    assert got.shape == (10_000, model.dim) and got.dtype == np.float32 and np.isfinite(got).all()
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # other batching (small budget, other buckets, reversed order) changes nothing
    other = Embedder(model.model_dir, token_budget=2048, length_buckets=[24, 96, 512], verify=False)
    assert np.abs(other.encode(items[::-1])[::-1] - got).max() <= ATOL
    # each item alone (a random sample, plus the duplicates and the long ones)
    rng = random.Random(1)
    sample = rng.sample(range(len(items)), 300) + [i for i, t in enumerate(items) if len(t) == 100_000]
    check_rows(model, [items[i] for i in sample], got[sample])
    index = {}
    for i, t in enumerate(items):
        index.setdefault(t, i)
        assert np.abs(got[i] - got[index[t]]).max() <= ATOL


# ---- bad arguments: clear errors before anything reaches ONNX Runtime ------------------------
@pytest.mark.parametrize("max_length,error,message", [
    (1, ValueError, r"max_length=1 is too small: texts\[0\] keeps \d+ tokens"),  # was an ORT crash
    (-5, ValueError, r"max_length must be >= 1, got -5"),
    (2.5, TypeError, r"max_length must be an int, got float"),
    ("64", TypeError, r"max_length must be an int, got str"),
])
def test_bad_max_length_is_a_clear_error(model, max_length, error, message):
    with pytest.raises(error, match=message):
        model.encode(["panda " * 1000], max_length=max_length)


@pytest.mark.parametrize("buckets", [[1000], [0, 64], [-4], [16, 513]])
def test_length_buckets_past_max_length_are_refused(tiny_bge_art, buckets):
    with pytest.raises(ValueError, match=r"length_buckets must be ints between 1 and max_length \(512\)"):
        Embedder(tiny_bge_art, length_buckets=buckets, verify=False)  # [1000] used to crash inside ORT


def test_unordered_or_wrong_containers_are_refused(model):
    with pytest.raises(TypeError, match="sentences is a set, which has no order"):
        model.encode({"a", "b"})
    for bad, what in ((None, "NoneType"), (b"bytes", "bytes"), ({"a": 1}, "dict"), (3, "int")):
        with pytest.raises(TypeError, match=f"sentences must be a str or a list of str, got {what}"):
            model.encode(bad)
    with pytest.raises(TypeError, match=r"sentences\[1\] is bytes, expected str"):
        model.encode(["a", b"b"])
    assert model.encode(x for x in ["a", "b"]).shape == (2, model.dim)  # any ordered iterable is fine
