"""Rerankers: cross-encoders, the gemma LLM reranker and the MiniCPM layerwise reranker, exported
from tiny random checkpoints and compared with FlagEmbedding 1.4.2 itself (FlagReranker,
FlagLLMReranker, LayerWiseFlagLLMReranker, all fp32 on CPU)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest

import tiny_models
import variant_checks
from bgert.export import detect, export
from bgert.runtime import LayerwiseReranker, LLMReranker, Reranker, load

PAIRS = [
    ("what is panda?", "hi"),
    ("what is panda?", "The giant panda (Ailuropoda melanoleuca), sometimes called a panda bear or simply panda, "
                       "is a bear species endemic to China."),
    ("", "an empty query"),
    ("an empty passage", ""),
    ("", ""),
    ("What is BGE M3?", "BGE M3 is an embedding model supporting dense retrieval, lexical matching and "
                        "multi-vector interaction."),
    ("BM25", "BM25 is a bag-of-words retrieval function that ranks a set of documents. " * 300),  # far too long
    ("what is panda? " * 400, "a query far beyond query_max_length"),
    ("北京是哪里的首都？", "北京是中华人民共和国的首都。 Москва — столица России. 🐼"),
    ("Definition of BM25", "BM25 is a bag-of-words retrieval function."),
]
TOL = 1e-4


def assert_parity(ref, got, tol: float = TOL) -> None:
    """Same type and length as the reference, scores within ``tol``, identical ranking."""
    assert isinstance(got, list) and len(got) == len(ref)
    assert all(type(x) is float for x in got)
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    assert np.abs(ref - got).max() < tol
    assert np.array_equal(np.argsort(-ref, kind="stable"), np.argsort(-got, kind="stable"))


def assert_invariant(model, pairs, **kw) -> None:
    """Scores do not depend on batch size or on the order of the pairs."""
    base = np.asarray(model.compute_score(pairs, **kw))
    one = np.asarray(model.compute_score(pairs, batch_size=1, **kw))
    rev = np.asarray(model.compute_score(pairs[::-1], batch_size=3, **kw))
    assert np.abs(base - one).max() < 1e-5
    assert np.abs(base - rev[..., ::-1]).max() < 1e-5


# ---------------------------------------------------------------- cross-encoders
@pytest.fixture(scope="module")
def cross_ckpt(ckpt_root) -> str:
    return tiny_models.build_cross_encoder(ckpt_root)


@pytest.fixture(scope="module")
def cross_art(cross_ckpt, art_root) -> str:
    return export(cross_ckpt, os.path.join(art_root, "bge-reranker-v2-m3"), progress=False)


@pytest.fixture(scope="module")
def flag_cross(cross_ckpt):
    from FlagEmbedding import FlagReranker

    return FlagReranker(cross_ckpt, use_fp16=False, devices="cpu")


def test_cross_encoder_parity(cross_art, flag_cross):
    model = load(cross_art)
    assert type(model) is Reranker
    assert_parity(flag_cross.compute_score(PAIRS), model.compute_score(PAIRS))
    # short limits put the truncation boundaries inside every pair
    kw = {"max_length": 24, "query_max_length": 6}
    assert_parity(flag_cross.compute_score(PAIRS, **kw), model.compute_score(PAIRS, **kw))
    assert_parity(flag_cross.compute_score(PAIRS, max_length=40), model.compute_score(PAIRS, max_length=40))


def test_cross_encoder_normalize_single_pair_and_invariance(cross_art, flag_cross):
    model = Reranker(cross_art)
    assert_parity(flag_cross.compute_score(PAIRS, normalize=True), model.compute_score(PAIRS, normalize=True), 1e-5)
    assert Reranker(cross_art, normalize=True).compute_score(PAIRS) == model.compute_score(PAIRS, normalize=True)
    single = model.compute_score(["what is panda?", "hi"])
    assert isinstance(single, list) and len(single) == 1
    assert single == model.compute_score(("what is panda?", "hi")) == model.compute_score([("what is panda?", "hi")])
    assert abs(single[0] - flag_cross.compute_score(["what is panda?", "hi"])[0]) < TOL
    assert model.compute_score([]) == []
    assert_invariant(model, PAIRS)


def test_bert_cross_encoder_feeds_token_type_ids(ckpt_root, art_root):
    """A BERT cross-encoder: the passage segment has token type 1, as prepare_for_model gives it."""
    from FlagEmbedding import FlagReranker
    from transformers import BertConfig, BertForSequenceClassification

    d = os.path.join(ckpt_root, "tiny-bert-reranker")
    tok = tiny_models.build_wordpiece_tokenizer(d)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=tiny_models.H, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, type_vocab_size=2, num_labels=1, initializer_range=tiny_models.INIT,
                     architectures=["BertForSequenceClassification"])
    BertForSequenceClassification(cfg).eval().save_pretrained(d)
    art = export(d, os.path.join(art_root, "tiny-bert-reranker"), progress=False)
    model = load(art)
    assert "token_type_ids" in model.backend_for(model.graph()).input_names
    assert model.manifest.get("pair_template")["token_type_ids"] == [0, 0, 0, 1, 1]
    assert_parity(FlagReranker(d, use_fp16=False, devices="cpu").compute_score(PAIRS), model.compute_score(PAIRS))


def test_bad_input_is_reported(cross_art):
    model = Reranker(cross_art)
    with pytest.raises(TypeError, match=r"sentence_pairs\[1\]"):
        model.compute_score([("q", "p"), ("only one",)])
    with pytest.raises(TypeError, match=r"sentence_pairs\[0\]\[1\]"):
        model.compute_score([("q", 3)])
    with pytest.raises(ValueError, match="max_length"):
        model.compute_score(PAIRS, max_length=0)
    with pytest.raises(ValueError, match="query_max_length"):  # the query alone overflows the positions
        model.compute_score(PAIRS, max_length=512, query_max_length=600)


def test_external_data_for_big_checkpoints(cross_ckpt, cross_art, tmp_path, monkeypatch):
    """Above the threshold the weights go to one <graph>.data file, listed and hashed in the manifest."""
    from bgert.export import onnx_io

    monkeypatch.setattr(onnx_io, "EXTERNAL_DATA_THRESHOLD", 0)
    art = export(cross_ckpt, str(tmp_path / "ext"), progress=False)
    assert sorted(os.listdir(art)) == ["manifest.json", "model.onnx", "model.onnx.data", "tokenizer.json"]
    model = load(art)
    assert "model.onnx.data" in model.manifest.raw["files"]
    assert os.path.getsize(os.path.join(art, "model.onnx.data")) > os.path.getsize(os.path.join(art, "model.onnx"))
    assert np.abs(np.asarray(model.compute_score(PAIRS)) - load(cross_art).compute_score(PAIRS)).max() < 1e-5
    assert model.manifest.raw["parity"]["fp32"]["max_abs_diff"] < TOL


# ---------------------------------------------------------------- gemma LLM reranker
@pytest.fixture(scope="module")
def gemma_ckpt(ckpt_root) -> str:
    return tiny_models.build_gemma_reranker(ckpt_root)


@pytest.fixture(scope="module")
def gemma_art(gemma_ckpt, art_root) -> str:
    return export(gemma_ckpt, os.path.join(art_root, "bge-reranker-v2-gemma"), progress=False)


@pytest.fixture(scope="module")
def flag_gemma(gemma_ckpt):
    from FlagEmbedding import FlagLLMReranker

    return FlagLLMReranker(gemma_ckpt, use_fp16=False, devices="cpu")


def test_llm_reranker_parity(gemma_art, flag_gemma):
    model = load(gemma_art)
    assert type(model) is LLMReranker and model.tokenizer.padding_side == "left"
    assert_parity(flag_gemma.compute_score(PAIRS), model.compute_score(PAIRS))
    kw = {"max_length": 20, "query_max_length": 5}
    assert_parity(flag_gemma.compute_score(PAIRS, **kw), model.compute_score(PAIRS, **kw))
    assert_parity(flag_gemma.compute_score(PAIRS, normalize=True), model.compute_score(PAIRS, normalize=True), 1e-5)
    assert len(model.compute_score(["what is panda?", "hi"])) == 1
    assert_invariant(model, PAIRS)


def test_llm_reranker_prompt_override_and_right_padding(gemma_art, flag_gemma):
    prompt = "Predict whether passage B contains an answer to query A."
    ref = flag_gemma.compute_score(PAIRS, prompt=prompt)
    assert np.abs(np.asarray(ref) - flag_gemma.compute_score(PAIRS)).max() > 1e-3  # the prompt matters
    assert_parity(ref, load(gemma_art).compute_score(PAIRS, prompt=prompt))
    model = LLMReranker(gemma_art, prompt=prompt)
    assert_parity(ref, model.compute_score(PAIRS))
    model.tokenizer.padding_side = "right"  # the graph takes the last real token on either side
    assert_parity(ref, model.compute_score(PAIRS))


def test_llm_graph_never_outputs_vocabulary_logits(gemma_art):
    proto = onnx.load(os.path.join(gemma_art, "model.onnx"))
    (out,) = proto.graph.output
    assert out.name == "score" and len(out.type.tensor_type.shape.dim) == 1
    vocab = load(gemma_art).tokenizer.vocab_size
    big = {i.name for i in proto.graph.initializer if vocab in i.dims}
    assert big and all(n.op_type == "Gather" for n in proto.graph.node if big & set(n.input))


# ---------------------------------------------------------------- MiniCPM layerwise reranker
@pytest.fixture(scope="module")
def minicpm_ckpt(ckpt_root) -> str:
    return tiny_models.build_minicpm_layerwise(ckpt_root)  # 4 layers, heads for layers 2..4


@pytest.fixture(scope="module")
def minicpm_art(minicpm_ckpt, art_root) -> str:
    return export(minicpm_ckpt, os.path.join(art_root, "bge-reranker-v2-minicpm-layerwise"), progress=False,
                  cutoff_layers=[4, 2, 3])


@pytest.fixture(scope="module")
def flag_minicpm(minicpm_ckpt):
    from FlagEmbedding import LayerWiseFlagLLMReranker

    reranker = LayerWiseFlagLLMReranker(minicpm_ckpt, use_fp16=False, devices="cpu")
    reranker.model.config.use_cache = False  # transformers 4.57 crashes in the bundled code's cache path
    return reranker


def test_layerwise_parity(minicpm_art, flag_minicpm):
    model = load(minicpm_art)
    assert type(model) is LayerwiseReranker and model.exported_cutoffs == [2, 3, 4]
    ref = flag_minicpm.compute_score(PAIRS, cutoff_layers=[2, 3, 4])
    got = model.compute_score(PAIRS, cutoff_layers=[2, 3, 4])
    assert isinstance(got, list) and len(got) == 3
    for r, g in zip(ref, got):
        assert_parity(r, g)
    # one layer gives a flat list; the default is the last layer, as in the reference
    assert_parity(flag_minicpm.compute_score(PAIRS, cutoff_layers=[3]), model.compute_score(PAIRS, cutoff_layers=3))
    assert_parity(flag_minicpm.compute_score(PAIRS), model.compute_score(PAIRS))
    kw = {"max_length": 20, "query_max_length": 5, "normalize": True}
    assert_parity(flag_minicpm.compute_score(PAIRS, cutoff_layers=[2], **kw),
                  model.compute_score(PAIRS, cutoff_layers=[2], **kw))
    single = model.compute_score(["what is panda?", "hi"], cutoff_layers=[2, 4])
    assert [len(s) for s in single] == [1, 1]
    assert_invariant(model, PAIRS, cutoff_layers=[2, 4])


def test_layerwise_cutoff_order_and_duplicates(minicpm_art, flag_minicpm):
    """bgert sorts and de-duplicates cutoffs: equal to the reference for sorted input; for unsorted
    input the reference pairs heads with the wrong layers, bgert keeps each layer's own head."""
    model = load(minicpm_art)
    ref = flag_minicpm.compute_score(PAIRS, cutoff_layers=[2, 4])
    assert model.compute_score(PAIRS, cutoff_layers=[4, 2]) == model.compute_score(PAIRS, cutoff_layers=[2, 4, 4])
    for r, g in zip(ref, model.compute_score(PAIRS, cutoff_layers=[4, 2])):
        assert_parity(r, g)


def test_layerwise_graphs_hold_only_their_layers(minicpm_art):
    """Early exit saves compute: the graph for cutoff L holds L decoder layers, so it shrinks with L."""
    model = load(minicpm_art)
    assert [g.cutoff_layers for g in model.manifest.graphs] == [[2], [2, 3], [2, 3, 4]]
    counts = []
    for g in model.manifest.graphs:
        proto = onnx.load(os.path.join(minicpm_art, g.file))
        counts.append((len(proto.graph.initializer), len(proto.graph.node)))
    assert counts[0][0] < counts[1][0] < counts[2][0] and counts[0][1] < counts[1][1] < counts[2][1]
    assert model.graph_for([2]).file == "model_cutoff2.onnx" and model.graph_for([2, 3]).file == "model_cutoff3.onnx"


def test_layerwise_cli_cutoffs_and_unknown_cutoff(minicpm_ckpt, flag_minicpm, tmp_path):
    out = tmp_path / "lw"
    r = subprocess.run([sys.executable, "-m", "bgert.cli", "export", minicpm_ckpt, "--out", str(out),
                        "--cutoff-layers", "2,4", "-q"], capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    assert "kind       layerwise_reranker" in r.stdout and "cutoff_layers [2, 4]" in r.stdout
    model = load(out)
    assert_parity(flag_minicpm.compute_score(PAIRS), model.compute_score(PAIRS))
    with pytest.raises(ValueError, match=r"\[3\] were not exported; this artifact has \[2, 4\]"):
        model.compute_score(PAIRS, cutoff_layers=[3])
    with pytest.raises(ValueError, match=r"must lie in \[2, 4\]"):
        model.compute_score(PAIRS, cutoff_layers=[7])
    with pytest.raises(ValueError, match=r"\[1\] are outside this model's range 2..4"):
        export(minicpm_ckpt, str(tmp_path / "bad"), progress=False, cutoff_layers=[1, 4])
    assert not os.path.exists(tmp_path / "bad")


# ---------------------------------------------------------------- detection
def test_detection_and_kind_override(cross_ckpt, gemma_ckpt, minicpm_ckpt, tmp_path):
    assert detect(cross_ckpt).kind == "reranker"
    assert detect(gemma_ckpt).kind == "llm_reranker"
    assert detect(minicpm_ckpt).kind == "layerwise_reranker"
    renamed = shutil.copytree(gemma_ckpt, tmp_path / "my-finetuned-gemma")
    assert detect(str(renamed)).kind != "llm_reranker"  # a bare Gemma causal LM: nothing says reranker
    assert detect(str(renamed), "llm_reranker").kind == "llm_reranker"


# ---------------------------------------------------------------- precision variants
@pytest.fixture(scope="module")
def variant_arts(cross_ckpt, gemma_ckpt, minicpm_ckpt, art_root) -> dict[str, str]:
    # the tiny random rerankers' scores are nearly tied (std 0.07, with clusters 0.002 apart) while int8
    # moves a score by up to 0.03, so their rank gates are loosened here; the defaults apply to real models
    gates = {p: {"spearman": 0.9, "top5_agreement": 0.6} for p in ("int8", "int8-vnni", "int8-static")}
    out = lambda name: os.path.join(art_root, name + "-variants")  # noqa: E731
    return {"cross": variant_checks.export_variants(cross_ckpt, out("cross"), gates=gates),
            "gemma": variant_checks.export_variants(gemma_ckpt, out("gemma"), gates=gates),
            "minicpm": variant_checks.export_variants(minicpm_ckpt, out("minicpm"), cutoff_layers=[2, 4], gates=gates)}


@pytest.mark.parametrize("family,outputs", [("cross", {"score"}), ("gemma", {"score"}), ("minicpm", {"scores"})])
def test_variants_gated(variant_arts, family, outputs):
    by = variant_checks.assert_gated(variant_arts[family], outputs)
    assert all("top5_agreement" in g["quality"] and "spearman" in g["quality"] for p, gs in by.items()
               if p != "fp32" for g in gs)
    if family == "minicpm":  # every cutoff graph has its variants
        assert sorted(g["file"] for g in by["int8"]) == ["model_cutoff2.int8.onnx", "model_cutoff4.int8.onnx"]


@pytest.mark.parametrize("precision", variant_checks.RUNNABLE)
def test_variants_against_flagembedding(variant_arts, flag_cross, flag_gemma, flag_minicpm, precision):
    """Scores of each variant against the FlagEmbedding fp32 reranker: rank correlation and the best pair."""
    cases = [(flag_cross.compute_score(PAIRS), load(variant_arts["cross"], precision=precision).compute_score(PAIRS)),
             (flag_gemma.compute_score(PAIRS), load(variant_arts["gemma"], precision=precision).compute_score(PAIRS))]
    layerwise = load(variant_arts["minicpm"], precision=precision)
    cases += zip(flag_minicpm.compute_score(PAIRS, cutoff_layers=[2, 4]),
                 layerwise.compute_score(PAIRS, cutoff_layers=[2, 4]))
    for ref, got in cases:
        assert len(got) == len(ref)
        assert variant_checks.spearman(ref, got) >= variant_checks.SPEARMAN_MIN[precision], (ref, got)
        assert int(np.argmax(ref)) == int(np.argmax(got))


def test_each_layerwise_graph_keeps_its_own_fusion_counts(minicpm_ckpt, tmp_path, monkeypatch, caplog):
    """Fusion statistics are per graph (the TensorRT options read the chosen graph's), not the last graph's."""
    import bgert.export.exporter as exporter
    from bgert.runtime import tensorrt

    def fake_optimize(path, model_type):  # one 'Attention' per decoder layer the graph holds
        return {"Attention": sum(n.op_type == "Softmax" for n in onnx.load(path).graph.node)}

    monkeypatch.setattr(exporter, "optimize", fake_optimize)
    art = export(minicpm_ckpt, str(tmp_path / "lw"), progress=False, cutoff_layers=[2, 4])
    model = load(art)
    counts = {g.cutoff_layers[-1]: g.extra["fused_ops"]["Attention"] for g in model.manifest.graphs}
    assert counts == {2: 2, 4: 4}
    assert model.manifest.get("fused_ops") == {"Attention": 6}
    with caplog.at_level("WARNING", logger="bgert"):
        tensorrt.tensorrt_options(model.manifest, model.graph_for([2]), {16: 1}, cache_dir=str(tmp_path / "trt"))
    assert "Attention×2" in caplog.text


def test_misspelt_keyword_arguments_are_refused(cross_art, gemma_art, minicpm_art):
    for art, typo in ((cross_art, "normalise"), (gemma_art, "promt"), (minicpm_art, "cutoff_layer")):
        model = load(art)
        with pytest.raises(TypeError, match=rf"unknown keyword argument\(s\) {typo}; it takes .*normalize"):
            model.compute_score([("q", "p")], **{typo: 1})
        assert model.compute_score([("q", "p")], device="cuda", use_dataloader=True, num_workers=2) == \
            model.compute_score([("q", "p")])


def test_truncation_side_left_matches_the_reference(cross_art, flag_cross, gemma_art, minicpm_art):
    """A cross-encoder with ``truncation_side="left"`` against FlagReranker whose tokenizer truncates on the
    left (each side keeps its end, and the pair trims the passage's start); the decoder rerankers refuse it,
    saying why."""
    long_q = " ".join(["what is a panda"] * 60 + ["and where does it live"] * 60)
    long_p = " ".join(["the giant panda is a bear"] * 100 + ["it eats bamboo in china"] * 100)
    pairs = PAIRS + [(long_q, "hi"), ("what is panda?", long_p), (long_q, long_p)]
    model = load(cross_art)
    flag_cross.tokenizer.truncation_side = "left"
    try:
        ref = {kw: flag_cross.compute_score(pairs, **dict(kw)) for kw in ((), (("max_length", 24),))}
    finally:
        flag_cross.tokenizer.truncation_side = "right"
    for kw, want in ref.items():
        assert_parity(want, model.compute_score(pairs, truncation_side="left", **dict(kw)))
    right = model.compute_score(pairs)
    assert max(abs(a - b) for a, b in zip(right[-3:], ref[()][-3:])) > 1e-4  # the sides really differ
    for art in (gemma_art, minicpm_art):
        with pytest.raises(ValueError, match=r"truncation_side='left' is not supported.*passage marker"):
            load(art).compute_score(pairs, truncation_side="left")
        load(art).compute_score(PAIRS[:1], truncation_side="right")
