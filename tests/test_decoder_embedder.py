"""Decoder-only embedders (FlagLLMModel: bge-multilingual-gemma2, FlagICLModel: bge-en-icl), exported
from tiny random Gemma2 / Mistral checkpoints and compared with FlagEmbedding 1.4.2 itself
(use_fp16=False, devices='cpu'). The sliding window is set to 16 (Gemma2) and 64 (Mistral) tokens so the long texts cross it."""
from __future__ import annotations

import os

import numpy as np
import pytest

import tiny_models
import variant_checks
from bgert.export import detect, export
from bgert.runtime import DecoderEmbedder, load

QUERIES = ["what is panda?", "hi", "", "BGE M3 is an embedding model supporting dense retrieval. " * 30,
           "北京是哪里的首都？", "Emoji 🐼 and spaces   "]
PASSAGES = ["The giant panda (Ailuropoda melanoleuca) is a bear species endemic to China.", "hi", "",
            "BM25 is a bag-of-words retrieval function. " * 200, "北京是中华人民共和国的首都。 Москва — столица России."]
INSTRUCT = "Given a web search query, retrieve relevant passages that answer the query."
EXAMPLES = [{"instruct": "Find the definition.", "query": "what is a bear?", "response": "A bear is a mammal."},
            {"query": "panda", "response": "The giant panda is a bear."}]
GATE = 0.99999


def cos_min(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(((a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)).min())


@pytest.fixture(scope="module")
def gemma2(ckpt_root, art_root):
    d = tiny_models.build_gemma2_embedder(ckpt_root, sliding_window=16)
    return d, export(d, os.path.join(art_root, "bge-multilingual-gemma2"), progress=False)


@pytest.fixture(scope="module")
def mistral(ckpt_root, art_root):
    d = tiny_models.build_mistral_embedder(ckpt_root, sliding_window=64)
    return d, export(d, os.path.join(art_root, "bge-en-icl"), progress=False)


def test_detection_and_manifest(gemma2, mistral):
    assert detect(gemma2[0]).kind == detect(mistral[0]).kind == "decoder_embedder"
    g, m = load(gemma2[1]), load(mistral[1])
    assert type(g) is type(m) is DecoderEmbedder
    assert (g.icl, m.icl) == (False, True)
    assert g.query_instruction_format == m.query_instruction_format == "<instruct>{}\n<query>{}"
    assert g.manifest.get("pooling") == "last_token" and g.tokenizer.padding_side == "right"
    assert m.tokenizer.padding_side == "left"
    assert g.manifest.get("parity")["fp32"]["cos_min"] >= GATE


@pytest.mark.parametrize("max_length", [None, 20])
def test_llm_embedder_parity(gemma2, max_length):
    from FlagEmbedding import FlagLLMModel

    ckpt, art = gemma2
    ref = FlagLLMModel(ckpt, use_fp16=False, devices="cpu", query_instruction_for_retrieval=INSTRUCT,
                       query_instruction_format="<instruct>{}\n<query>{}")
    model = DecoderEmbedder(art, query_instruction_for_retrieval=INSTRUCT)
    q, p = model.encode_queries(QUERIES, max_length=max_length), model.encode_corpus(PASSAGES, max_length=max_length)
    assert q.shape == (len(QUERIES), 32) and q.dtype == np.float32
    cq, cp = cos_min(ref.encode_queries(QUERIES, max_length=max_length), q), cos_min(
        ref.encode_corpus(PASSAGES, max_length=max_length), p)
    print(f"FlagLLMModel (Gemma2) max_length={max_length}: cos_min queries {cq:.8f}, passages {cp:.8f}")
    assert cq >= GATE and cp >= GATE
    assert np.allclose(np.linalg.norm(q, axis=1), 1, atol=1e-5)
    # the instruction matters, and a per-call one overrides the constructor's
    plain = DecoderEmbedder(art).encode_queries(QUERIES[:2], max_length=max_length)
    assert cos_min(plain, q[:2]) < 0.999
    assert cos_min(DecoderEmbedder(art).encode_queries(QUERIES[:2], max_length=max_length, instruction=INSTRUCT),
                   q[:2]) >= GATE
    single = model.encode_queries(QUERIES[0], max_length=max_length)
    assert single.shape == (32,) and cos_min(single[None], q[:1]) >= GATE


@pytest.mark.parametrize("max_length", [None, 24])
def test_icl_embedder_parity(mistral, max_length):
    from FlagEmbedding import FlagICLModel

    ckpt, art = mistral
    ref = FlagICLModel(ckpt, use_fp16=False, devices="cpu", query_instruction_for_retrieval=INSTRUCT,
                       examples_for_task=EXAMPLES)
    model = DecoderEmbedder(art, query_instruction_for_retrieval=INSTRUCT, examples_for_task=EXAMPLES)
    q = model.encode_queries(QUERIES, max_length=max_length)
    cq, cp = cos_min(ref.encode_queries(QUERIES, max_length=max_length), q), cos_min(
        ref.encode_corpus(PASSAGES, max_length=max_length), model.encode_corpus(PASSAGES, max_length=max_length))
    print(f"FlagICLModel (Mistral) max_length={max_length}: cos_min queries {cq:.8f}, passages {cp:.8f}")
    assert cq >= GATE and cp >= GATE
    # examples per call give the same vectors as examples in the constructor; none differ
    per_call = DecoderEmbedder(art).encode_queries(QUERIES, max_length=max_length, instruction=INSTRUCT,
                                                   examples=EXAMPLES)
    assert cos_min(per_call, q) >= GATE
    no_examples = DecoderEmbedder(art, query_instruction_for_retrieval=INSTRUCT).encode_queries(
        QUERIES[:2], max_length=max_length)
    assert cos_min(no_examples, q[:2]) < 0.999
    ref_plain = FlagICLModel(ckpt, use_fp16=False, devices="cpu", query_instruction_for_retrieval=INSTRUCT)
    assert cos_min(ref_plain.encode_queries(QUERIES), DecoderEmbedder(art, query_instruction_for_retrieval=INSTRUCT)
                   .encode_queries(QUERIES)) >= GATE


def test_batching_invariance(mistral):
    model = load(mistral[1], query_instruction_for_retrieval=INSTRUCT, examples_for_task=EXAMPLES)
    base = model.encode_queries(QUERIES)
    assert cos_min(base, model.encode_queries(QUERIES, batch_size=1)) >= GATE
    assert cos_min(base[::-1], model.encode_queries(QUERIES[::-1], batch_size=2)) >= GATE


def test_bad_input(gemma2, mistral):
    with pytest.raises(ValueError, match="ICL"):
        DecoderEmbedder(gemma2[1], examples_for_task=EXAMPLES)
    with pytest.raises(ValueError, match="ICL"):
        DecoderEmbedder(gemma2[1]).encode_queries(["q"], examples=EXAMPLES)
    with pytest.raises(TypeError, match="examples"):
        DecoderEmbedder(mistral[1]).encode_queries(["q"], examples={"query": "q"})
    with pytest.raises(ValueError, match="unknown keys"):
        DecoderEmbedder(mistral[1]).encode_queries(["q"], examples=[{"question": "q"}])
    with pytest.raises(TypeError):
        DecoderEmbedder(mistral[1]).encode_corpus([1, 2])


@pytest.fixture(scope="module")
def variants(gemma2, mistral, art_root) -> dict[str, str]:
    return {name: variant_checks.export_variants(ckpt, os.path.join(art_root, art.rsplit("/", 1)[-1] + "-variants"))
            for name, (ckpt, art) in (("gemma2", gemma2), ("mistral", mistral))}


def test_variants_gated(variants):
    for art in variants.values():
        variant_checks.assert_gated(art, {"dense"})


@pytest.mark.parametrize("precision", variant_checks.RUNNABLE)
def test_variants_against_flagembedding(gemma2, mistral, variants, precision):
    """fp16 keeps the rotary angles in fp32: without that the tiny Mistral missed the fp16 gate."""
    from FlagEmbedding import FlagICLModel, FlagLLMModel

    for name, ref in (("gemma2", FlagLLMModel(gemma2[0], use_fp16=False, devices="cpu",
                                              query_instruction_for_retrieval=INSTRUCT,
                                              query_instruction_format="<instruct>{}\n<query>{}")),
                      ("mistral", FlagICLModel(mistral[0], use_fp16=False, devices="cpu",
                                               query_instruction_for_retrieval=INSTRUCT, examples_for_task=EXAMPLES))):
        kw = {"examples_for_task": EXAMPLES} if name == "mistral" else {}
        model = DecoderEmbedder(variants[name], precision=precision, query_instruction_for_retrieval=INSTRUCT, **kw)
        low = variant_checks.COS_MIN[precision]
        assert cos_min(ref.encode_queries(QUERIES), model.encode_queries(QUERIES)) >= low, name
        assert cos_min(ref.encode_corpus(PASSAGES), model.encode_corpus(PASSAGES)) >= low, name


def test_misspelt_keyword_arguments_are_refused(mistral):
    model = load(mistral[1])
    for call in (model.encode_queries, model.encode_corpus):
        with pytest.raises(TypeError, match=r"unknown keyword argument\(s\) normalise_embeddings; it takes "):
            call(["a"], normalise_embeddings=False)
