"""BGE-M3: export of the dense/sparse/ColBERT graph and M3Embedder against FlagEmbedding's
BGEM3FlagModel (fp32, CPU) on a tiny random XLM-R with random heads in FlagEmbedding's layout."""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest

import tiny_models
import variant_checks
from bgert.runtime import ArtifactError, Embedder, M3Embedder, load

ALL = dict(return_dense=True, return_sparse=True, return_colbert_vecs=True)


def exactly(n_tokens: int) -> str:
    """A text of exactly ``n_tokens`` ids with <s> and </s> ("panda" is one token in the tiny vocabulary)."""
    return " ".join(["panda"] * (n_tokens - 2))


TEXTS = [
    "",
    "a",
    "what is panda?",
    "The giant panda (Ailuropoda melanoleuca) is a bear species endemic to China.",
    "北京是中华人民共和国的首都。",
    "Москва — столица России. 🐼",
    "BGE M3 is an embedding model supporting dense retrieval, lexical matching and multi-vector interaction.",
    "hi hi hi hi panda hi",  # repeated ids: the lexical weight is the max over occurrences
    "What is BGE M3? Definition of BM25",
    exactly(16), exactly(17), exactly(33), exactly(511), exactly(512), exactly(513),
    "panda bear " * 1500,  # far past max length: truncated as the reference does
]

#: query/passage pairs where some query token's best ColBERT similarity is negative with the tiny
#: model, so BGEM3FlagModel's padded-batch quirk (zero padding vectors join the max) changes the score
QUIRK_PAIRS = [("panda model", "hi"), ("panda model", "panda"), ("北京 model China", "M3")]


def cos_rows(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@pytest.fixture(scope="module")
def m3_ckpt(tmp_path_factory) -> str:
    return tiny_models.build_m3(str(tmp_path_factory.mktemp("m3ckpt")))


@pytest.fixture(scope="module")
def m3_art(m3_ckpt, tmp_path_factory) -> str:
    from bgert.export import export

    return export(m3_ckpt, str(tmp_path_factory.mktemp("m3art") / "bge-m3"), progress=False)


@pytest.fixture(scope="module")
def m3_dense_art(m3_ckpt, tmp_path_factory) -> str:
    from bgert.export import export

    return export(m3_ckpt, str(tmp_path_factory.mktemp("m3dense") / "bge-m3-dense"), progress=False,
                  heads=["dense"])


@pytest.fixture(scope="module")
def flag(m3_ckpt):
    from FlagEmbedding import BGEM3FlagModel

    return BGEM3FlagModel(m3_ckpt, use_fp16=False, devices="cpu")


@pytest.fixture(scope="module")
def model(m3_art) -> M3Embedder:
    return M3Embedder(m3_art)


def assert_same_encoding(ref: dict, got: dict, tol: float = 1e-4) -> None:
    assert got["dense_vecs"].shape == ref["dense_vecs"].shape and got["dense_vecs"].dtype == np.float32
    assert cos_rows(ref["dense_vecs"], got["dense_vecs"]).min() >= 0.99999
    assert np.abs(ref["dense_vecs"] - got["dense_vecs"]).max() < tol
    assert len(got["lexical_weights"]) == len(ref["lexical_weights"])
    for r, g in zip(ref["lexical_weights"], got["lexical_weights"]):
        assert list(g) == list(r)  # same keys, in the reference's insertion order
        assert all(isinstance(k, str) and isinstance(v, np.float32) for k, v in g.items())
        assert max([abs(float(r[k]) - float(g[k])) for k in r] or [0.0]) < tol
    for r, g in zip(ref["colbert_vecs"], got["colbert_vecs"]):
        assert g.shape == r.shape and g.dtype == np.float32
        assert np.abs(r - g).max() < tol


def test_manifest_and_graph(m3_art):
    m = json.load(open(os.path.join(m3_art, "manifest.json")))
    assert m["kind"] == "m3" and m["heads"] == ["dense", "sparse", "colbert"]
    assert m["sparse_drop_ids"] == [0, 1, 2, 3] and m["dim"] == m["colbert_dim"] == tiny_models.H
    assert m["fused_ops"]["FlashAttentionSwitch"] == 2  # one per layer
    assert m["parity"]["fp32"]["cos_min"] >= 0.99999 and m["parity"]["fp32"]["sparse"]["max_abs_diff"] < 1e-4
    g = onnx.load(os.path.join(m3_art, "model.onnx")).graph
    assert [o.name for o in g.output] == ["dense", "sparse", "colbert"]


@pytest.mark.parametrize("max_length", [512, 32])
def test_encode_parity_with_bgem3flagmodel(flag, model, max_length):
    ref = flag.encode(TEXTS, max_length=max_length, **ALL)
    got = model.encode(TEXTS, max_length=max_length, **ALL)
    assert_same_encoding(ref, got)


def test_queries_corpus_and_single_string(flag, model):
    for fn in ("encode_queries", "encode_corpus"):
        assert_same_encoding(getattr(flag, fn)(TEXTS[:6], **ALL), getattr(model, fn)(TEXTS[:6], **ALL))
    got = model.encode("what is panda?")  # defaults as the reference: dense only
    assert got["dense_vecs"].shape == (tiny_models.H,) and got["lexical_weights"] is None and got["colbert_vecs"] is None
    got, ref = model.encode("what is panda?", **ALL), flag.encode("what is panda?", **ALL)
    assert got["colbert_vecs"].shape == ref["colbert_vecs"].shape and dict(got["lexical_weights"]).keys() == ref[
        "lexical_weights"].keys()
    empty = model.encode([], **ALL)
    assert empty["dense_vecs"].shape == (0, tiny_models.H) and empty["lexical_weights"] == [] == empty["colbert_vecs"]


def test_independent_of_batch_size_order_and_padding(m3_art, model):
    base = model.encode(TEXTS, **ALL)
    order = list(range(len(TEXTS)))
    random.Random(0).shuffle(order)
    # small token budget and batch size; max_padded_length=16 runs everything longer unpadded,
    # one length per batch, so the graph takes the mask-free (flash) attention branch
    other = M3Embedder(m3_art, token_budget=200, batch_size=3, max_padded_length=16)
    got = other.encode([TEXTS[i] for i in order], **ALL)
    back = {k: [v[order.index(i)] for i in range(len(order))] for k, v in got.items()}
    back["dense_vecs"] = np.stack(back["dense_vecs"])
    assert_same_encoding(base, back, tol=1e-5)


def test_compute_score_parity(flag, model):
    pairs = ([(TEXTS[i], TEXTS[j]) for i, j in [(2, 3), (2, 7), (8, 6), (0, 1), (4, 5), (3, 15), (15, 2)]]
             + QUIRK_PAIRS + [("panda model", TEXTS[6])])
    for kw in ({}, {"batch_size": 2, "weights_for_different_modes": [0.4, 0.2, 0.4]},
               {"batch_size": 1, "max_query_length": 16, "max_passage_length": 64}):
        ref, got = flag.compute_score(pairs, **kw), model.compute_score(pairs, **kw)
        assert list(got) == list(ref)
        for k in ref:
            assert all(isinstance(x, float) for x in got[k])
            assert np.abs(np.array(ref[k]) - np.array(got[k])).max() < 1e-4, (k, kw)
    # the quirk is real here: the same pairs scored one per batch (no padding) differ
    q = flag.compute_score(QUIRK_PAIRS + [("x", TEXTS[6])], batch_size=4)["colbert"]
    alone = flag.compute_score(QUIRK_PAIRS, batch_size=1)["colbert"]
    assert max(abs(a - b) for a, b in zip(q, alone)) > 1e-3
    one_ref, one = flag.compute_score(pairs[1]), model.compute_score(pairs[1])
    assert isinstance(one["dense"], float) and all(abs(one[k] - one_ref[k]) < 1e-4 for k in one_ref)
    assert model.compute_score([]) == []
    with pytest.raises(ValueError, match="weights_for_different_modes"):
        model.compute_score(pairs, weights_for_different_modes=[1, 1])
    with pytest.raises(TypeError, match=r"sentence_pairs\[1\]"):
        model.compute_score([("a", "b"), ("a", 3)])


def test_score_helpers_match_reference(flag, model):
    ref = flag.encode(TEXTS[:9], **ALL)
    lw = ref["lexical_weights"]
    want = flag.compute_lexical_matching_score(lw, lw)
    got = model.compute_lexical_matching_score(lw, lw)
    assert got.shape == want.shape == (9, 9) and np.allclose(got, want, rtol=1e-6, atol=1e-6)
    one = model.compute_lexical_matching_score(lw[3], lw[6])
    assert isinstance(one, np.float32) and np.isclose(one, flag.compute_lexical_matching_score(lw[3], lw[6]), 1e-6)
    with pytest.raises(ValueError):
        model.compute_lexical_matching_score(lw[0], lw)
    c = ref["colbert_vecs"]
    for i, j in [(2, 3), (3, 2), (0, 8)]:
        s = model.colbert_score(c[i], c[j])
        assert isinstance(s, np.float32) and abs(float(s) - float(flag.colbert_score(c[i], c[j]))) < 1e-6
    assert model.convert_id_to_token(lw) == flag.convert_id_to_token(lw)
    assert model.convert_id_to_token(lw[3]) == flag.convert_id_to_token(lw[3])


def test_heads_subset(m3_dense_art, model):
    m = json.load(open(os.path.join(m3_dense_art, "manifest.json")))
    assert m["heads"] == ["dense"] and [o["name"] for o in m["outputs"]] == ["dense"]
    dense_graph = onnx.load(os.path.join(m3_dense_art, "model.onnx")).graph
    full_graph = onnx.load(os.path.join(model.model_dir, "model.onnx")).graph
    assert [o.name for o in dense_graph.output] == ["dense"]
    # the heads are not computed at all: two Linear layers (and their weights) fewer
    n_params = lambda g: sum(int(np.prod(t.dims)) for t in g.initializer)  # noqa: E731
    assert n_params(full_graph) - n_params(dense_graph) == tiny_models.H * (tiny_models.H + 1) + tiny_models.H + 1
    dense_only = load(m3_dense_art)
    assert isinstance(dense_only, M3Embedder)
    assert np.abs(dense_only.encode(TEXTS)["dense_vecs"] - model.encode(TEXTS)["dense_vecs"]).max() < 1e-6
    with pytest.raises(ValueError, match="--heads dense,sparse,colbert"):
        dense_only.encode(TEXTS, return_sparse=True)
    with pytest.raises(ValueError, match="return_colbert_vecs"):
        dense_only.compute_score([("a", "b")])


def test_raw_graph_without_normalisation(m3_ckpt, model, tmp_path):
    from FlagEmbedding import BGEM3FlagModel

    from bgert.export import export

    art = export(m3_ckpt, str(tmp_path / "raw"), progress=False, heads=["dense", "colbert"], normalize=False)
    kw = dict(return_dense=True, return_colbert_vecs=True)
    ref = BGEM3FlagModel(m3_ckpt, use_fp16=False, devices="cpu", normalize_embeddings=False).encode(TEXTS[:8], **kw)
    got = M3Embedder(art).encode(TEXTS[:8], **kw)
    assert np.abs(ref["dense_vecs"] - got["dense_vecs"]).max() < 1e-4
    assert np.linalg.norm(got["dense_vecs"], axis=1).max() > 1.5  # really raw
    assert max(np.abs(r - g).max() for r, g in zip(ref["colbert_vecs"], got["colbert_vecs"])) < 1e-4
    normed = M3Embedder(art, normalize_embeddings=True).encode(TEXTS[:8], **kw)
    want = model.encode(TEXTS[:8], **kw)
    assert np.abs(normed["dense_vecs"] - want["dense_vecs"]).max() < 1e-5
    assert max(np.abs(a - b).max() for a, b in zip(normed["colbert_vecs"], want["colbert_vecs"])) < 1e-5
    with pytest.raises(ValueError, match="--no-normalize"):
        M3Embedder(model.model_dir, normalize_embeddings=False)


def test_load_and_wrong_class(m3_art):
    assert isinstance(load(m3_art), M3Embedder)
    with pytest.raises(ArtifactError, match="M3Embedder"):
        Embedder(m3_art)
    with pytest.raises(ValueError, match="return_dense"):
        M3Embedder(m3_art).encode(["a"], return_dense=False)


def test_missing_head_file_is_a_clear_error(m3_ckpt, tmp_path):
    from bgert.export import export

    broken = shutil.copytree(m3_ckpt, tmp_path / "bge-m3")
    os.remove(broken / "sparse_linear.pt")
    with pytest.raises(ValueError, match="colbert_linear.pt / sparse_linear.pt"):
        export(str(broken), str(tmp_path / "out"), progress=False)
    with pytest.raises(FileNotFoundError, match="sparse_linear.pt"):
        export(str(broken), str(tmp_path / "out"), kind="m3", progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_encode_m3(m3_art, model, tmp_path):
    texts = ["what is panda?", "北京", "", "hi hi panda"]
    (tmp_path / "in.txt").write_text("\n".join(texts), encoding="utf-8")
    run = lambda *a: subprocess.run([sys.executable, "-m", "bgert.cli", "encode", m3_art, "--input",  # noqa: E731
                                     str(tmp_path / "in.txt"), *a], capture_output=True, text=True)
    r = run("--output", str(tmp_path / "v.jsonl"), "--sparse", "--colbert")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in (tmp_path / "v.jsonl").read_text().splitlines()]
    want = model.encode(texts, **ALL)
    assert np.abs(np.array([r["dense"] for r in rows]) - want["dense_vecs"]).max() < 1e-6
    for row, lw, col in zip(rows, want["lexical_weights"], want["colbert_vecs"]):
        assert list(row["sparse"]) == list(lw) and np.abs(np.array(row["colbert"]) - col).max() < 1e-6
    r = run("--output", str(tmp_path / "v.npy"))
    assert r.returncode == 0, r.stderr
    assert np.abs(np.load(tmp_path / "v.npy") - want["dense_vecs"]).max() < 1e-6
    r = run("--output", str(tmp_path / "v.npy"), "--sparse")
    assert r.returncode == 1 and ".jsonl" in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------- precision variants
@pytest.fixture(scope="module")
def m3_variants(m3_ckpt, tmp_path_factory) -> str:
    return variant_checks.export_variants(m3_ckpt, str(tmp_path_factory.mktemp("m3var") / "bge-m3"))


def test_variants_gated_per_output(m3_variants):
    variant_checks.assert_gated(m3_variants, {"dense", "sparse", "colbert"})


@pytest.mark.parametrize("precision", variant_checks.RUNNABLE)
def test_variants_against_flagembedding(m3_variants, flag, precision):
    """Each output of each variant against BGEM3FlagModel fp32: dense and ColBERT rows by cosine, lexical
    weights as vectors over the union of their tokens."""
    texts = TEXTS[1:12]
    ref = flag.encode(texts, **ALL)
    got = M3Embedder(m3_variants, precision=precision).encode(texts, **ALL)
    low = variant_checks.COS_MIN[precision]
    assert variant_checks.cos_rows(ref["dense_vecs"], got["dense_vecs"]).min() >= low
    for r, g in zip(ref["colbert_vecs"], got["colbert_vecs"]):
        # single token rows are noisier than pooled vectors; static ranges calibrated on SciFact clip a
        # little on 31 repeated tokens (min 0.967 measured), so rows get a looser floor than their mean
        c = variant_checks.cos_rows(r, g)
        assert g.shape == r.shape and c.mean() >= max(low, 0.99) and c.min() >= low - 0.02
    pairs = []
    for r, g in zip(ref["lexical_weights"], got["lexical_weights"]):
        keys = sorted(set(r) | set(g))
        pairs.append([np.array([float(d.get(k, 0)) for k in keys]) for d in (r, g)])
    scale = max(rv.max(initial=0) for rv, _ in pairs)  # the largest token weight (3.5 for the tiny model)
    for rv, gv in pairs:
        assert np.abs(rv - gv).max(initial=0) <= 0.05 * scale  # absolute: a near-zero weight may move
        if np.linalg.norm(rv) > 0.1 * scale:
            assert variant_checks.cos_rows(rv, gv) >= low
    if precision != "fp16":
        assert np.abs(ref["dense_vecs"] - got["dense_vecs"]).max() > 1e-5, "identical to fp32: nothing quantized"


def test_importing_the_m3_spec_leaves_onnxruntime_alone():
    """BGE-M3's fusion class is handed to the optimizer by the spec, not registered in ORT's global table."""
    code = ("import onnxruntime.transformers.optimizer as o; before = dict(o.MODEL_TYPES); "
            "import bgert.export.m3_spec; assert o.MODEL_TYPES == before, set(o.MODEL_TYPES) - set(before)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_misspelt_keyword_arguments_are_refused(m3_art):
    model = M3Embedder(m3_art)
    with pytest.raises(TypeError, match=r"unknown keyword argument\(s\) return_sparce; it takes .*return_sparse"):
        model.encode(["a"], return_sparce=True)
    with pytest.raises(TypeError, match=r"unknown keyword argument\(s\) weights; it takes .*weights_for_different"):
        model.compute_score([("q", "p")], weights=[1, 1, 1])
    assert model.encode(["a"], device="cpu")["dense_vecs"].shape == (1, model.dim)


def test_compute_score_modes_match_the_reference(flag, model, m3_dense_art):
    """``compute_score(modes=...)`` (what ``bgert serve`` scores M3 pairs with) against BGEM3FlagModel's
    value of each mode, with default and model-card weights; a dense-only artifact has only "dense"."""
    from bgert.runtime.m3 import SCORE_KEYS

    pairs = [(TEXTS[i], TEXTS[j]) for i, j in [(2, 3), (2, 7), (8, 6), (4, 5), (3, 15)]] + QUIRK_PAIRS
    for kw in ({}, {"weights_for_different_modes": [0.4, 0.2, 0.4], "batch_size": 2}):
        ref = flag.compute_score(pairs, **kw)
        for mode in SCORE_KEYS:
            got = model.compute_score(pairs, modes=[mode], **kw)
            assert list(got) == [mode]
            assert np.abs(np.array(got[mode]) - np.array(ref[mode])).max() < 1e-4, (mode, kw)
    assert model.score_modes == SCORE_KEYS
    dense_only = load(m3_dense_art)
    assert dense_only.score_modes == ("dense",)
    got = dense_only.compute_score(pairs, modes="dense")["dense"]
    assert np.abs(np.array(got) - np.array(flag.compute_score(pairs)["dense"])).max() < 1e-4
    with pytest.raises(ValueError, match=r"mode 'sparse' needs the sparse head.*has the modes dense\."):
        dense_only.compute_score(pairs, modes=["sparse"])
    with pytest.raises(ValueError, match="modes must name some of"):
        model.compute_score(pairs, modes=["lexical"])


def test_truncation_side_left_matches_the_reference(flag, model):
    """BGEM3FlagModel with its tokenizer truncating on the left keeps the end of long texts; so does
    ``truncation_side="left"``, in encode and in compute_score."""
    long = " ".join(["panda bear"] * 300 + ["what is BGE M3"] * 300)
    texts = [long, TEXTS[2], TEXTS[15]]
    pairs = [(long, TEXTS[6]), (TEXTS[2], long)]
    flag.tokenizer.truncation_side = "left"
    try:
        ref = flag.encode(texts, **ALL)
        ref_scores = flag.compute_score(pairs)
    finally:
        flag.tokenizer.truncation_side = "right"
    got = model.encode(texts, truncation_side="left", **ALL)
    assert_same_encoding(ref, got)
    assert cos_rows(model.encode(texts[:1])["dense_vecs"], got["dense_vecs"][:1])[0] < 0.999  # the sides differ
    got_scores = model.compute_score(pairs, truncation_side="left")
    for k in ref_scores:
        assert np.abs(np.array(ref_scores[k]) - np.array(got_scores[k])).max() < 1e-4, k
