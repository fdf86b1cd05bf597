"""Bounded memory: every family tokenises and runs any number of items in windows (bgert.runtime.windows),
texts far past max length are cut before tokenising (bgert.runtime.tokenize), and the results equal
one call's. Parity of the families with FlagEmbedding itself is in their own test modules (their
inputs include texts far past max length, which now take the cut path)."""
from __future__ import annotations

import json
import os
import random
import tracemalloc

import numpy as np
import pytest
from tokenizers import Tokenizer

import tiny_models
from bgert.export import export
from bgert.runtime import Embedder, LayerwiseReranker, M3Embedder, Reranker, load
from bgert.runtime.lightweight import LightweightReranker
from bgert.runtime.reranker import tokenize_sides
from bgert.runtime.tokenize import CUT_CHARS_PER_TOKEN, TextTokenizer, cuts_exactly

HERE = os.path.dirname(__file__)
WORDS = ("panda bear BM25 retrieval, function. the giant's (Ailuropoda) 北京是 首都。 Москва — 🐼 "
         "don't x1234 ... ?! \t tab\nnew line").split(" ")


def mixed_texts(n: int, seed: int = 0, long_every: int = 5, long_words: int = 900) -> list[str]:
    """Short texts, with every ``long_every``-th one far past max length (odd spacing, CJK, emoji)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        k = long_words if i % long_every == 0 else rng.randint(0, 30)
        out.append(" ".join(rng.choice(WORDS) + " " * rng.randint(0, 2) for _ in range(k)))
    return out


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory) -> dict[str, str]:
    from transformers import GemmaTokenizerFast

    root = tmp_path_factory.mktemp("tok")
    tiny_models.build_wordpiece_tokenizer(str(root / "wordpiece"))
    tiny_models.build_unigram_xlmr_tokenizer(str(root / "unigram"))
    tiny_models.build_bpe_tokenizer(str(root / "bpe"), ["<pad>", "<eos>", "<bos>", "<unk>"], GemmaTokenizerFast,
                                    pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>")
    return {k: str(root / k / "tokenizer.json") for k in ("wordpiece", "unigram", "bpe")}


# ---------------------------------------------------------------- truncation while tokenising
@pytest.mark.parametrize("kind", ["wordpiece", "unigram", "bpe"])
@pytest.mark.parametrize("max_length", [8, 33, 128])
def test_cut_texts_give_the_ids_of_the_whole_text(tokenizer_files, kind, max_length):
    path = tokenizer_files[kind]
    tok = TextTokenizer(path)
    assert tok.cuts_exactly
    texts = mixed_texts(60, seed=max_length, long_every=2)
    texts += ["word " * 4000, " " * 5000 + "late words", "x" * 9000, "a" + " " * 3000 + "b " * 400]
    ref = Tokenizer.from_file(path)
    ref.no_padding()
    ref.enable_truncation(max_length=max_length)  # today's: the whole text, then truncation
    for special in (True, False):
        want = [e.ids for e in ref.encode_batch(texts, add_special_tokens=special)]
        assert tok.encode(texts, max_length, add_special_tokens=special) == want
    assert any(len(tok._cut(t, max_length)) < len(t) for t in texts)
    assert len(tok._cut("word " * 4000, max_length)) <= CUT_CHARS_PER_TOKEN * max_length + 4


def test_tokenizers_that_may_join_across_spaces_are_not_cut(tokenizer_files):
    spec = json.load(open(tokenizer_files["bpe"], encoding="utf-8"))
    assert cuts_exactly(spec)
    assert not cuts_exactly({**spec, "pre_tokenizer": None})  # e.g. Gemma's: BPE over the whole text
    assert not cuts_exactly({**spec, "normalizer": {"type": "Replace", "pattern": {"String": "  "}, "content": " "}})
    assert not cuts_exactly({**spec, "added_tokens": [*spec["added_tokens"], {"content": "a b"}]})


def test_the_cut_decision_read_from_the_tokenizer_equals_the_files(tokenizer_files, tmp_path):
    """TextTokenizer reads normalizer, pre-tokenizer and added tokens from the loaded tokenizer (not by
    parsing the whole file again); it decides as cuts_exactly over the file does, for tokenizers it may
    cut and ones it may not (no pre-tokenizer: BPE over the whole text)."""
    spec = json.load(open(tokenizer_files["bpe"], encoding="utf-8"))
    whole = tmp_path / "whole.json"
    whole.write_text(json.dumps({**spec, "pre_tokenizer": None}), encoding="utf-8")
    for path in (*tokenizer_files.values(), str(whole)):
        want = cuts_exactly(json.load(open(path, encoding="utf-8")))
        assert TextTokenizer(path).cuts_exactly is want, path
        assert TextTokenizer(path, max_length=16).cuts_exactly is want, path
    assert not TextTokenizer(str(whole)).cuts_exactly


def test_a_tokenizer_made_for_the_models_length_serves_every_length(tokenizer_files):
    """TextTokenizer(max_length=n) builds only that length's tokenizer at first; other lengths, no
    truncation, decode and the vocabulary give what a plain one gives."""
    path = tokenizer_files["unigram"]
    plain, tok = TextTokenizer(path), TextTokenizer(path, max_length=16)
    assert tok._plain_tokenizer is None and list(tok._truncating) == [(16, "right")]
    texts = mixed_texts(20, 3, 2)
    for n in (16, 7, None):
        assert tok.encode(texts, n) == plain.encode(texts, n)
    ids = plain.encode(texts[:1], None)[0]
    assert tok.decode(ids) == plain.decode(ids) and tok.vocab_size == plain.vocab_size
    assert [e.ids for e in tok.encodings(texts)] == [e.ids for e in plain.encodings(texts)]


@pytest.mark.parametrize("side", ["right", "left"])
def test_reranker_sides_truncate_as_slicing_the_whole_ids(tokenizer_files, side):
    tok = TextTokenizer(tokenizer_files["unigram"])
    queries, passages = mixed_texts(30, 1, 3), mixed_texts(30, 2, 2)
    plain = Tokenizer.from_file(tokenizer_files["unigram"])
    plain.no_truncation()
    sides, cut = tokenize_sides(tok, queries, passages, 12, 40, side)
    assert cut
    for (q, p), qt, pt in zip(sides, queries, passages):
        wq, wp = plain.encode(qt, add_special_tokens=False).ids, plain.encode(pt, add_special_tokens=False).ids
        assert q == (wq[:12] if side == "right" else wq[max(0, len(wq) - 12):])
        assert p == (wp[:40] if side == "right" else wp[max(0, len(wp) - 40):])


# ---------------------------------------------------------------- windows equal one call
@pytest.fixture(scope="module")
def arts(ckpt_root, tmp_path_factory, tiny_bge_art) -> dict[str, str]:
    root = tmp_path_factory.mktemp("warts")
    out = {"embedder": tiny_bge_art,
           "lightweight": os.path.join(HERE, "data", "lightweight_artifact")}
    for name, build, kw in (("m3", tiny_models.build_m3, {}), ("reranker", tiny_models.build_cross_encoder, {}),
                            ("layerwise", tiny_models.build_minicpm_layerwise, {"cutoff_layers": [2, 3, 4]})):
        out[name] = export(build(str(root / "ckpt")), str(root / name), progress=False, **kw)
    return out


def close(a, b, tol: float = 1e-6) -> None:
    """Same structure, arrays/floats within ``tol``, everything else equal."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            close(a[k], b[k], tol)
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            close(x, y, tol)
    elif isinstance(a, (np.ndarray, float, np.floating)):
        assert np.shape(a) == np.shape(b)
        assert np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max(initial=0) <= tol
    else:
        assert a == b


def windows_vs_one(model, call):
    model.window_size = 10**9
    one = call()
    model.window_size = 4
    return one, call()


def test_embedder_windows_equal_one_call(arts):
    m = Embedder(arts["embedder"], batch_size=3)
    texts = mixed_texts(23)
    for call in (lambda: m.encode(texts), lambda: m.encode_queries(texts), lambda: m.encode(texts, batch_size=5),
                 lambda: m.encode(texts, convert_to_numpy=False)):
        one, win = windows_vs_one(m, call)
        close(one, win)
    assert m.encode(iter(texts)).shape == (23, m.dim)
    close(m.encode(iter(texts)), one if isinstance(one, np.ndarray) else np.stack(one))


def test_m3_windows_equal_one_call_including_the_colbert_quirk(arts):
    m = M3Embedder(arts["m3"])
    texts = mixed_texts(21, seed=3)
    kw = {"return_dense": True, "return_sparse": True, "return_colbert_vecs": True}
    one, win = windows_vs_one(m, lambda: m.encode(texts, max_length=64, **kw))
    close(one, win)
    assert all(type(a) is type(b) for a, b in zip(one["lexical_weights"], win["lexical_weights"]))
    pairs = list(zip(texts[::-1], texts))
    # batch size 3: the reference's per-batch passage padding decides which ColBERT maxima are clipped at 0
    one, win = windows_vs_one(m, lambda: m.compute_score(pairs, batch_size=3, max_passage_length=64))
    close(one, win)
    m.window_size = 4
    assert [len(c["dense"]) for c in m.compute_score_iter(pairs, batch_size=3)] == [6, 6, 6, 3]  # 4 -> 6


def test_rerankers_windows_equal_one_call(arts):
    pairs = list(zip(mixed_texts(19, seed=4, long_every=4), mixed_texts(19, seed=5, long_every=3)))
    r = Reranker(arts["reranker"])
    close(*windows_vs_one(r, lambda: r.compute_score(pairs, normalize=True)))
    lw = LayerwiseReranker(arts["layerwise"])
    close(*windows_vs_one(lw, lambda: lw.compute_score(pairs, cutoff_layers=[2, 3, 4])), tol=1e-5)
    light = LightweightReranker(arts["lightweight"])
    close(*windows_vs_one(light, lambda: light.compute_score(pairs[:9], max_length=64)), tol=1e-5)


def test_streaming_api_takes_generators_and_yields_per_window(arts):
    m = load(arts["embedder"], window_size=8)
    texts = mixed_texts(30, seed=6)
    parts = list(m.encode_iter(t for t in texts))
    assert [p.shape[0] for p in parts] == [8, 8, 8, 6]
    close(np.concatenate(parts), m.encode(texts))
    close(np.concatenate(list(m.encode_iter(texts, queries=True))), m.encode_queries(texts))
    assert list(m.encode_iter(iter([]))) == []
    r = load(arts["reranker"], window_size=8)
    pairs = list(zip(texts, texts[::-1]))
    scores = [s for part in r.compute_score_iter(iter(pairs)) for s in part]
    close(scores, r.compute_score(pairs))


def test_errors_name_the_index_in_the_whole_input(arts):
    m = load(arts["embedder"], window_size=4)
    with pytest.raises(TypeError, match=r"sentences\[9\]"):
        m.encode(["a"] * 9 + [3] + ["b"] * 3)
    with pytest.raises(TypeError, match=r"sentences\[5\]"):
        list(m.encode_iter(iter(["a"] * 5 + [None])))
    r = load(arts["reranker"], window_size=4)
    with pytest.raises(TypeError, match=r"sentence_pairs\[6\]"):
        r.compute_score([("q", "p")] * 6 + [("q",)])
    with pytest.raises(ValueError, match="window_size"):
        load(arts["embedder"], window_size=0)


# ---------------------------------------------------------------- memory does not grow with the count
def test_memory_held_does_not_grow_with_the_item_count(arts):
    """Tokens held at once (counted at the tokenizer) and the traced peak of encode() beyond its output
    are the same for 600 and 6,000 mixed texts (a fifth far past max length) with 200-item windows."""
    m = Embedder(arts["embedder"], window_size=200, batch_size=64)
    held = []
    truncated = m.tokenizer.encode_checked

    def counting(texts, *a, **kw):
        ids, cut = truncated(texts, *a, **kw)
        held.append(sum(map(len, ids)))
        return ids, cut

    m.tokenizer.encode_checked = counting
    peaks = {}
    for n in (600, 6000):
        texts = mixed_texts(n, seed=n)
        held.clear()
        tracemalloc.start()
        out = m.encode(texts, max_length=128)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        peaks[n] = (peak - out.nbytes, max(held), len(held))
    (p1, h1, c1), (p2, h2, c2) = peaks[600], peaks[6000]
    assert (c1, c2) == (3, 30)  # one tokenizer call per window
    assert h2 <= 200 * 128 and h2 <= 1.2 * h1
    assert p2 <= 1.3 * p1, peaks
