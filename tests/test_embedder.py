"""Encoder embedders: export → runtime parity against the PyTorch reference, batching invariance,
query instruction, and the runtime's handling of bad input."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from bgert.runtime import ArtifactError, Embedder, ProviderError, load

TEXTS = [
    "",
    "a",
    "what is panda?",
    "The giant panda (Ailuropoda melanoleuca) is a bear species endemic to China.",
    "北京是中华人民共和国的首都。",
    "Москва — столица России.",
    "مرحبا بالعالم",
    "🐼🎋 emoji 👩‍💻",
    "panda " * 2000,  # far beyond max length
    "BM25 is a bag-of-words retrieval function that ranks a set of documents.",
]


def cos_rows(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def exactly(tokenizer_dir: str, n_tokens: int) -> str:
    """A text that tokenises to exactly ``n_tokens`` ids including [CLS] and [SEP]."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    text = " ".join(["panda"] * (n_tokens - 2))
    assert len(tok(text)["input_ids"]) == n_tokens
    return text


@pytest.fixture(scope="module")
def flag_model(tiny_bge):
    from FlagEmbedding import FlagModel

    instr = "Represent this sentence for searching relevant passages: "
    return FlagModel(tiny_bge, query_instruction_for_retrieval=instr, use_fp16=False, devices="cpu")


def test_bge_parity_against_flagmodel(tiny_bge, tiny_bge_art, flag_model):
    texts = TEXTS + [exactly(tiny_bge, 512), exactly(tiny_bge, 513)]
    ref = flag_model.encode(texts)
    got = Embedder(tiny_bge_art).encode(texts)
    assert got.shape == ref.shape and got.dtype == np.float32
    assert cos_rows(ref, got).min() >= 0.99999
    assert np.abs(ref - got).max() < 1e-4


@pytest.mark.parametrize("arena", ["off", "shrink"])
def test_bge_parity_with_each_arena_mode(tiny_bge, tiny_bge_art, flag_model, arena):
    """ORT's CPU arena off, or shrunk after every run, changes where activations live, not the vectors."""
    texts = TEXTS + [exactly(tiny_bge, 512)]
    model = Embedder(tiny_bge_art, arena=arena, token_budget=1024)
    for _ in range(2):  # the second call runs on the shrunk (or absent) arena
        assert cos_rows(flag_model.encode(texts), model.encode(texts)).min() >= 0.99999


def test_bad_arena_mode_is_refused(tiny_bge_art):
    with pytest.raises(ValueError, match="arena must be one of on, shrink, off"):
        Embedder(tiny_bge_art, arena="small")
    with pytest.raises(ProviderError, match="shrink.*IO binding"):
        Embedder(tiny_bge_art, arena="shrink", io_binding=True).encode(["a"])


def test_cpu_batches_stay_within_the_cpu_token_budget(tiny_bge_art):
    """Without token_budget=, CPU runs hold at most CPU_TOKEN_BUDGET padded tokens (the activation peak
    follows the largest run); an explicit budget still wins."""
    from bgert.runtime.batching import CPU_TOKEN_BUDGET

    texts = ["panda " * 600] * 40 + ["a b"] * 300  # 40 rows of 512 tokens, 300 short ones
    for kwargs, limit in (({}, CPU_TOKEN_BUDGET), ({"token_budget": 16384}, 16384)):
        model = Embedder(tiny_bge_art, **kwargs)
        backend = model.backend_for(model.graph())
        shapes = []
        run = backend.run
        backend.run = lambda feeds, names: shapes.append(feeds["input_ids"].shape) or run(feeds, names)
        model.encode(texts)
        assert max(r * n for r, n in shapes) <= limit, (kwargs, shapes)
        assert max(r * n for r, n in shapes) > limit // 2, (kwargs, shapes)  # and batches do fill it


def test_bge_parity_at_short_max_length(tiny_bge, tiny_bge_art, flag_model):
    texts = TEXTS + [exactly(tiny_bge, 32), exactly(tiny_bge, 33)]
    ref = flag_model.encode(texts, max_length=32)
    got = Embedder(tiny_bge_art).encode(texts, max_length=32)
    assert cos_rows(ref, got).min() >= 0.99999


def test_query_instruction_applied(tiny_bge_art, flag_model):
    model = Embedder(tiny_bge_art)
    assert model.query_instruction_for_retrieval == flag_model.query_instruction_for_retrieval
    ref_q = flag_model.encode_queries(TEXTS[:6])
    got_q = model.encode_queries(TEXTS[:6])
    assert cos_rows(ref_q, got_q).min() >= 0.99999
    # and it really changes the vectors: queries differ from the plain encoding
    assert cos_rows(got_q, model.encode(TEXTS[:6])).min() < 0.9999
    ref_p = flag_model.encode_corpus(TEXTS[:6])
    assert cos_rows(ref_p, model.encode_corpus(TEXTS[:6])).min() >= 0.99999


def test_mean_pooling_parity_against_sentence_transformers(tiny_mean, tiny_mean_art):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(tiny_mean, device="cpu")
    assert st.max_seq_length == 128
    ref = st.encode(TEXTS, convert_to_numpy=True)
    model = Embedder(tiny_mean_art)
    assert model.manifest.get("pooling") == "mean" and model.max_length == 128
    got = model.encode(TEXTS)
    assert cos_rows(ref, got).min() >= 0.99999


def test_real_minilm_parity_against_sentence_transformers(minilm_dir, minilm_art):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(minilm_dir, device="cpu")
    texts = TEXTS + ["A study of 1,000 patients showed that aspirin lowers the risk of stroke. " * 20]
    ref = st.encode(texts, convert_to_numpy=True)
    got = load(minilm_art).encode(texts)
    assert cos_rows(ref, got).min() >= 0.99999


def test_results_independent_of_batch_size_buckets_and_order(tiny_bge_art):
    texts = TEXTS * 3
    base = Embedder(tiny_bge_art).encode(texts)
    for kwargs in ({"batch_size": 1}, {"batch_size": 7}, {"token_budget": 64}, {"length_buckets": [8, 512]},
                   {"length_buckets": [512]}):
        batch_size = kwargs.pop("batch_size", None)
        got = Embedder(tiny_bge_art, **kwargs).encode(texts, batch_size=batch_size)
        assert np.abs(got - base).max() <= 1e-5, kwargs
    perm = np.random.default_rng(0).permutation(len(texts))
    shuffled = Embedder(tiny_bge_art).encode([texts[i] for i in perm])
    assert np.abs(shuffled - base[perm]).max() <= 1e-5


def test_single_string_gives_1d_and_list_gives_2d(tiny_bge_art):
    m = Embedder(tiny_bge_art)
    one = m.encode("what is panda?")
    many = m.encode(["what is panda?"])
    assert one.shape == (m.dim,) and many.shape == (1, m.dim)
    assert np.allclose(one, many[0], atol=1e-6)
    assert isinstance(m.encode(["a", "b"], convert_to_numpy=False), list)


def test_empty_list_gives_empty_array(tiny_bge_art):
    m = Embedder(tiny_bge_art)
    out = m.encode([])
    assert out.shape == (0, m.dim) and out.dtype == np.float32


def test_non_string_item_names_its_index(tiny_bge_art):
    with pytest.raises(TypeError, match=r"sentences\[2\] is int"):
        Embedder(tiny_bge_art).encode(["a", "b", 3])


def test_lone_surrogate_is_a_clear_error(tiny_bge_art):
    with pytest.raises(ValueError, match=r"sentences\[1\].*surrogate"):
        Embedder(tiny_bge_art).encode(["ok", "bad \ud800 text"])


def test_unknown_provider_lists_available(tiny_bge_art):
    with pytest.raises(ProviderError, match="CPUExecutionProvider"):
        Embedder(tiny_bge_art, providers=["NoSuchExecutionProvider"])


def test_unnormalised_request_on_normalised_graph_is_refused(tiny_bge_art):
    with pytest.raises(ValueError, match="no-normalize"):
        Embedder(tiny_bge_art).encode(["a"], normalize_embeddings=False)


def test_missing_manifest_names_the_file(tmp_path):
    with pytest.raises(ArtifactError, match="manifest.json"):
        Embedder(str(tmp_path))


def test_changed_graph_is_refused(tiny_bge_art, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_bge_art, broken)
    with open(broken / "model.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    with pytest.raises(ArtifactError, match="model.onnx.*sha256"):
        Embedder(str(broken))


def test_runtime_import_loads_neither_torch_nor_transformers():
    code = ("import sys, bgert.runtime, bgert.runtime.embedder; "
            "bad = [m for m in ('torch', 'transformers', 'bgert.export') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_export_refuses_overwrite_without_force(tiny_bge, tiny_bge_art):
    from bgert.export import export

    with pytest.raises(FileExistsError, match="--force"):
        export(tiny_bge, tiny_bge_art, progress=False)


def test_failed_export_leaves_nothing_behind(tiny_bge, tmp_path, monkeypatch):
    from bgert.export import exporter

    def boom(*a, **k):
        raise RuntimeError("simulated crash during optimisation")

    monkeypatch.setattr(exporter, "optimize", boom)
    out = tmp_path / "art"
    with pytest.raises(RuntimeError, match="simulated"):
        exporter.export(tiny_bge, str(out), progress=False)
    assert not out.exists()
    assert os.listdir(tmp_path) == []  # no temporary directory left either


def test_manifest_records_hashes_and_parity(tiny_bge_art):
    m = Embedder(tiny_bge_art).manifest
    assert set(m.raw["files"]) >= {"model.onnx", "tokenizer.json"}
    assert m.raw["parity"]["fp32"]["cos_min"] >= 0.99999
    assert m.get("pooling") == "cls" and m.get("normalize") is True
    assert m.raw["source"]["sha256"] and len(m.raw["source"]["sha256"]) == 64


def test_flagembedding_only_options_are_accepted_and_typos_are_not(tiny_bge_art):
    m = Embedder(tiny_bge_art, use_fp16=True, devices="cpu")  # drop-in for FlagModel(...)
    assert m.encode("a").shape == (m.dim,)
    with pytest.raises(TypeError, match="intra_op_num_thread"):
        Embedder(tiny_bge_art, intra_op_num_thread=2)


def test_misspelt_keyword_arguments_are_refused(tiny_bge_art):
    """A typo (normalise_embeddings) raises naming what encode takes; FlagEmbedding's device=… is accepted."""
    model = Embedder(tiny_bge_art)
    for call in (model.encode, model.encode_queries, model.encode_corpus):
        with pytest.raises(TypeError, match=r"unknown keyword argument\(s\) normalise_embeddings; it takes "
                                            r"sentences, batch_size, max_length, convert_to_numpy, normalize_embeddings"):
            call(["a"], normalise_embeddings=False)
    np.testing.assert_array_equal(model.encode(["a"], device="cuda:0"), model.encode(["a"]))


#: a text whose start and end differ, far beyond 512 tokens: left and right truncation keep different tokens
HEAD_TAIL = " ".join(["the giant panda lives in china"] * 120 + ["bamboo is the food of a bear species"] * 120)


def test_truncation_side_left_keeps_the_end_as_the_reference_does(tiny_bge, tiny_bge_art, flag_model):
    """``truncation_side="left"`` against FlagModel with its tokenizer truncating on the left (HF's
    ``truncation_side``), and the ids against the HF tokenizer's own left truncation."""
    from transformers import AutoTokenizer

    texts = [HEAD_TAIL, "what is panda?", "panda " * 2000]
    m = Embedder(tiny_bge_art)
    flag_model.tokenizer.truncation_side = "left"
    try:
        ref, ref_q = flag_model.encode_corpus(texts), flag_model.encode_queries(texts)
    finally:
        flag_model.tokenizer.truncation_side = "right"
    got = m.encode_corpus(texts, truncation_side="left")
    assert cos_rows(ref, got).min() >= 0.99999 and np.abs(ref - got).max() < 1e-4
    with_instruction = Embedder(tiny_bge_art, query_instruction_for_retrieval=flag_model.query_instruction_for_retrieval)
    got_q = with_instruction.encode_queries(texts, truncation_side="left")  # the instruction is cut with the start
    assert cos_rows(ref_q, got_q).min() >= 0.99999
    assert cos_rows(m.encode_corpus(texts[:1]), got[:1])[0] < 0.999  # the start and the end really differ
    hf = AutoTokenizer.from_pretrained(tiny_bge, truncation_side="left")
    ids, cut = m.tokenizer.encode_checked(texts, 512, side="left")
    assert cut and ids == hf(texts, truncation=True, max_length=512)["input_ids"]
    with pytest.raises(ValueError, match="truncation_side must be 'right'.*or 'left'"):
        m.encode(texts, truncation_side="middle")
