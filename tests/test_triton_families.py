"""Triton ensembles for BGE-M3 and rerankers, and backend="triton" for their runtime classes, on a real server.

The server is the one nvidia-pytriton bundles (see tests/test_triton.py), started once for this
module on free ports of 127.0.0.1. Its repository holds the tiny BGE-M3, a tiny XLM-R cross-encoder,
a tiny BERT cross-encoder (token type ids) and a tiny Gemma LLM reranker, each as a raw-text
ensemble (python tokenizer → python-backend model running onnxruntime → python post-processing).
Raw-text requests over gRPC and HTTP and token-id requests (M3Embedder / rerankers with
backend="triton") are compared with the local ORT runtime classes (≤ 1e-5) and, for one protocol,
with FlagEmbedding's PyTorch classes. The server tests skip only when tritonserver cannot start.
"""
from __future__ import annotations

import os
import threading

import numpy as np
import pytest

import tiny_models
from triton_start import start_or_skip
from bgert.runtime import LLMReranker, M3Embedder, Reranker
from bgert.runtime.manifest import read_manifest
from bgert.triton_models.repository import graph_io, postprocess_config, write_repository
from bgert.triton_models.server import TritonServer

tc_grpc = pytest.importorskip("tritonclient.grpc")
tc_http = pytest.importorskip("tritonclient.http")
from google.protobuf import text_format  # noqa: E402
from tritonclient.grpc import model_config_pb2 as mc  # noqa: E402

TOL = 1e-5
ALL = dict(return_dense=True, return_sparse=True, return_colbert_vecs=True)
TEXTS = [
    "",
    "what is panda?",
    "hi hi hi hi panda hi",  # repeated ids: the lexical weight is the max over occurrences
    "北京是中华人民共和国的首都。 Москва — столица России. 🐼",
    "BGE M3 is an embedding model supporting dense retrieval, lexical matching and multi-vector interaction.",
    "panda bear " * 400,  # truncated at the default max length 512
]
PAIRS = [("what is panda?", "The giant panda (Ailuropoda melanoleuca) is a bear species endemic to China."),
         ("what is panda?", "hi"), ("BM25", "panda " * 600), ("北京", "Москва — столица России. 🐼"),
         ("", "an empty query")]


def parse(path: str) -> mc.ModelConfig:
    with open(path, encoding="utf-8") as f:
        return text_format.Parse(f.read(), mc.ModelConfig())


def params(cfg: mc.ModelConfig) -> dict[str, str]:
    return {k: v.string_value for k, v in cfg.parameters.items()}


def io(specs) -> list[tuple[str, int, list[int], bool]]:
    return [(t.name, t.data_type, list(t.dims), t.HasField("reshape")) for t in specs]


# ---- tiny artifacts, exported once for this module -------------------------------------------------
@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, str]:
    root = str(tmp_path_factory.mktemp("triton_families_ckpt"))
    return {"m3": tiny_models.build_m3(root), "cross": tiny_models.build_cross_encoder(root),
            "bert": tiny_models.build_bert_cross_encoder(root), "gemma": tiny_models.build_gemma_reranker(root)}


@pytest.fixture(scope="module")
def arts(ckpts, tmp_path_factory) -> dict[str, str]:
    from bgert.export import export

    root = tmp_path_factory.mktemp("triton_families_art")
    return {k: export(d, str(root / os.path.basename(d)), progress=False) for k, d in ckpts.items()}


@pytest.fixture(scope="module")
def local(arts) -> dict:
    return {"m3": M3Embedder(arts["m3"]), "cross": Reranker(arts["cross"]), "bert": Reranker(arts["bert"]),
            "gemma": LLMReranker(arts["gemma"])}


@pytest.fixture(scope="module")
def server(arts, tmp_path_factory):
    """One tritonserver for the module: every artifact as an ensemble, max_batch_size 4."""
    repo = str(tmp_path_factory.mktemp("triton_families") / "repo")
    for art in arts.values():
        write_repository(art, repo, backend="python", device="cpu", max_batch_size=4, queue_delay_us=2000, threads=1)
    srv = start_or_skip(lambda: TritonServer(repo), "test_triton_families")
    yield srv
    srv.stop()


def infer(server: TritonServer, protocol: str, model: str, inputs: dict[str, list[str]]) -> dict[str, np.ndarray]:
    """A raw-text request: each input a column of strings; every output of the model, as numpy."""
    mod = tc_grpc if protocol == "grpc" else tc_http
    client = mod.InferenceServerClient(server.grpc_url if protocol == "grpc" else server.http_url)
    try:
        tensors = []
        for name, texts in inputs.items():
            data = np.array([[t.encode("utf-8")] for t in texts], dtype=object)
            tensors.append(mod.InferInput(name, list(data.shape), "BYTES"))
            tensors[-1].set_data_from_numpy(data)
        cfg = client.get_model_config(model, **({"as_json": True} if protocol == "grpc" else {}))
        names = [o["name"] for o in cfg.get("config", cfg)["output"]]
        result = client.infer(model, tensors)
        return {n: result.as_numpy(n) for n in names}
    finally:
        client.close()


def m3_from_ensemble(out: dict[str, np.ndarray]) -> dict:
    """The M3 ensemble's padded outputs → BGEM3FlagModel.encode's format (the README's client recipe)."""
    n_lex, n_col = out["lexical_lengths"][:, 0], out["colbert_lengths"][:, 0]
    return {"dense_vecs": out["dense_vecs"],
            "lexical_weights": [dict(zip(map(str, ids[:k].tolist()), w[:k]))
                                for ids, w, k in zip(out["lexical_ids"], out["lexical_weights"], n_lex)],
            "colbert_vecs": [v[:k] for v, k in zip(out["colbert_vecs"], n_col)]}


def assert_same_m3(ref: dict, got: dict, tol: float = TOL) -> None:
    assert got["dense_vecs"].shape == ref["dense_vecs"].shape and got["dense_vecs"].dtype == np.float32
    assert np.abs(got["dense_vecs"] - ref["dense_vecs"]).max() <= tol
    assert len(got["lexical_weights"]) == len(ref["lexical_weights"])
    for r, g in zip(ref["lexical_weights"], got["lexical_weights"]):
        assert list(g) == list(r)  # same keys, in the same order (first occurrence)
        assert max([abs(float(r[k]) - float(g[k])) for k in r] or [0.0]) <= tol
    for r, g in zip(ref["colbert_vecs"], got["colbert_vecs"]):
        assert g.shape == r.shape and g.dtype == np.float32
        assert np.abs(r - g).max() <= tol


# ---- configs (no server) ----------------------------------------------------------------------------
def test_m3_ensemble_configs_parse_with_tritons_protobuf(arts, tmp_path):
    repo = str(tmp_path / "repo")
    names = write_repository(arts["m3"], repo, backend="onnxruntime", device="gpu", max_batch_size=16)
    assert names == ["bge-m3_model", "bge-m3_tokenizer", "bge-m3_postprocess", "bge-m3"]
    manifest = read_manifest(arts["m3"])
    tok = parse(os.path.join(repo, "bge-m3_tokenizer", "config.pbtxt"))
    assert io(tok.input) == [("TEXT", mc.TYPE_STRING, [1], False)]
    assert [o.name for o in tok.output] == ["input_ids", "attention_mask"]
    assert params(tok)["max_length"] == "512" and "assembly" not in params(tok)  # BGEM3FlagModel's default

    post = parse(os.path.join(repo, "bge-m3_postprocess", "config.pbtxt"))
    assert post.backend == "python" and post.max_batch_size == 16
    H = tiny_models.H
    assert io(post.input) == [("input_ids", mc.TYPE_INT64, [-1], False), ("attention_mask", mc.TYPE_INT64, [-1], False),
                              ("sparse", mc.TYPE_FP32, [-1], False), ("colbert", mc.TYPE_FP32, [-1, H], False)]
    outputs = [("lexical_ids", mc.TYPE_INT64, [-1], False), ("lexical_weights", mc.TYPE_FP32, [-1], False),
               ("lexical_lengths", mc.TYPE_INT32, [1], False), ("colbert_vecs", mc.TYPE_FP32, [-1, H], False),
               ("colbert_lengths", mc.TYPE_INT32, [1], False)]
    assert io(post.output) == outputs
    assert params(post) == {"kind": "m3", "sparse_drop_ids": "[0, 1, 2, 3]"}
    assert [g.kind for g in post.instance_group] == [mc.ModelInstanceGroup.KIND_CPU]
    assert os.path.isfile(os.path.join(repo, "bge-m3_postprocess", "1", "bgert", "runtime", "m3.py"))

    ens = parse(os.path.join(repo, "bge-m3", "config.pbtxt"))
    assert ens.platform == "ensemble" and io(ens.input) == [("TEXT", mc.TYPE_STRING, [1], False)]
    assert io(ens.output) == [("dense_vecs", mc.TYPE_FP32, [H], False)] + outputs
    steps = ens.ensemble_scheduling.step
    assert [s.model_name for s in steps] == ["bge-m3_tokenizer", "bge-m3_model", "bge-m3_postprocess"]
    assert dict(steps[1].output_map) == {"dense": "dense_vecs", "sparse": "sparse", "colbert": "colbert"}
    assert dict(steps[2].input_map) == {n: n for n in ("input_ids", "attention_mask", "sparse", "colbert")}
    assert dict(steps[2].output_map) == {o[0]: o[0] for o in outputs}
    assert params(ens)["bgert_kind"] == "m3"

    write_repository(arts["m3"], repo, max_length=64, force=True)
    assert params(parse(os.path.join(repo, "bge-m3_tokenizer", "config.pbtxt")))["max_length"] == "64"
    with pytest.raises(ValueError, match="max_length must be >= 1"):
        write_repository(arts["m3"], repo, max_length=0, force=True)
    # an artifact exported with the dense head only needs no post-processing step
    inputs, graph_outputs = graph_io(manifest.path("model.onnx"))
    assert postprocess_config("x", manifest, inputs, graph_outputs[:1], instances=1, max_batch_size=4,
                              queue_delay_us=0) is None


@pytest.mark.parametrize("which", ["cross", "bert", "gemma"])
def test_reranker_ensemble_configs_parse_with_tritons_protobuf(arts, tmp_path, which):
    repo = str(tmp_path / "repo")
    names = write_repository(arts[which], repo, backend="tensorrt", device="gpu", max_batch_size=8)
    base = names[-1]
    assert names == [f"{base}_model", f"{base}_tokenizer", f"{base}_postprocess", base]
    manifest = read_manifest(arts[which])
    tok = parse(os.path.join(repo, f"{base}_tokenizer", "config.pbtxt"))
    assert io(tok.input) == [("QUERY", mc.TYPE_STRING, [1], False), ("PASSAGE", mc.TYPE_STRING, [1], False)]
    graph_inputs = [i.name for i in parse(os.path.join(repo, f"{base}_model", "config.pbtxt")).input]
    assert [o.name for o in tok.output] == graph_inputs
    assert ("token_type_ids" in graph_inputs) == (which == "bert")
    p = params(tok)
    assert (p["max_length"], p["query_max_length"]) == ("512", "384")  # FlagReranker's defaults
    assert p["pad_to_multiple_of"] == str(manifest.get("pad_to_multiple_of", 1))
    assert ("template" in p["assembly"]) == (which != "gemma") and ("prompt" in p["assembly"]) == (which == "gemma")

    post = parse(os.path.join(repo, f"{base}_postprocess", "config.pbtxt"))
    assert io(post.input) == [("score", mc.TYPE_FP32, [1], False)]
    assert io(post.output) == [("normalized_score", mc.TYPE_FP32, [1], False)]
    assert params(post) == {"kind": "reranker"}
    ens = parse(os.path.join(repo, base, "config.pbtxt"))
    assert io(ens.input) == io(tok.input)
    assert io(ens.output) == [("score", mc.TYPE_FP32, [1], False), ("normalized_score", mc.TYPE_FP32, [1], False)]
    steps = ens.ensemble_scheduling.step
    assert [s.model_name for s in steps] == [f"{base}_tokenizer", f"{base}_model", f"{base}_postprocess"]
    assert dict(steps[0].input_map) == {"QUERY": "QUERY", "PASSAGE": "PASSAGE"}
    assert dict(steps[1].output_map) == dict(steps[2].input_map) == {"score": "score"}


# ---- a real tritonserver ----------------------------------------------------------------------------
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_m3_raw_text_ensemble_matches_local(server, local, protocol):
    out = infer(server, protocol, "bge-m3", {"TEXT": TEXTS[:4]})  # ≤ max_batch_size 4 rows per request
    assert out["lexical_ids"].dtype == np.int64 and out["colbert_vecs"].dtype == np.float32
    got = m3_from_ensemble(out)
    assert_same_m3(local["m3"].encode(TEXTS[:4], **ALL), got)
    # a one-text request is trimmed to its own tokens: no padding rows at all
    one = infer(server, protocol, "bge-m3", {"TEXT": [TEXTS[4]]})
    ref = local["m3"].encode(TEXTS[4], **ALL)
    assert one["colbert_vecs"].shape == (1, *ref["colbert_vecs"].shape)
    assert one["lexical_ids"].shape == (1, len(ref["lexical_weights"]))
    assert_same_m3(local["m3"].encode(TEXTS[4:], **ALL), m3_from_ensemble(infer(server, protocol, "bge-m3",
                                                                                {"TEXT": TEXTS[4:]})))


def test_m3_ensemble_matches_bgem3flagmodel(server, ckpts):
    from FlagEmbedding import BGEM3FlagModel

    ref = BGEM3FlagModel(ckpts["m3"], use_fp16=False, devices="cpu").encode(TEXTS[:4], **ALL)
    assert_same_m3(ref, m3_from_ensemble(infer(server, "grpc", "bge-m3", {"TEXT": TEXTS[:4]})), tol=1e-4)


def test_m3_ensemble_under_concurrent_requests(server, local):
    """Requests batched together by the model step's dynamic batcher still get their own rows back."""
    texts = [TEXTS[k % 5] + f" {k}" for k in range(12)]
    results: dict[int, dict] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(texts))

    def worker(k: int) -> None:
        try:
            barrier.wait(timeout=60)
            results[k] = m3_from_ensemble(infer(server, "grpc", "bge-m3", {"TEXT": [texts[k]]}))
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    got = {key: [v for k in range(len(texts)) for v in results[k][key]]
           for key in ("lexical_weights", "colbert_vecs")}
    got["dense_vecs"] = np.concatenate([results[k]["dense_vecs"] for k in range(len(texts))])
    assert_same_m3(local["m3"].encode(texts, **ALL), got)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_m3_backend_triton_matches_local(server, arts, local, protocol):
    url = server.grpc_url if protocol == "grpc" else server.http_url
    remote = M3Embedder(arts["m3"], backend="triton", url=url, protocol=protocol)
    assert_same_m3(local["m3"].encode(TEXTS, **ALL), remote.encode(TEXTS, **ALL))  # 6 rows, split by 4
    single = remote.encode("what is panda?", return_sparse=True)
    assert single["dense_vecs"].shape == (tiny_models.H,) and isinstance(single["lexical_weights"], dict)
    pairs = [(q, p) for q, p in PAIRS[:4]]
    got, ref = remote.compute_score(pairs), local["m3"].compute_score(pairs)
    assert all(np.abs(np.array(got[k]) - ref[k]).max() <= TOL for k in ref)


@pytest.mark.parametrize("which", ["cross", "bert", "gemma"])
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_reranker_raw_text_ensemble_matches_local(server, arts, local, which, protocol):
    base = os.path.basename(arts[which])
    pairs = PAIRS[:4]
    out = infer(server, protocol, base, {"QUERY": [q for q, _ in pairs], "PASSAGE": [p for _, p in pairs]})
    assert out["score"].shape == out["normalized_score"].shape == (4, 1)
    model = local[which]
    assert np.abs(out["score"][:, 0] - model.compute_score(pairs)).max() <= TOL
    assert np.abs(out["normalized_score"][:, 0] - model.compute_score(pairs, normalize=True)).max() <= TOL
    one = infer(server, protocol, base, {"QUERY": [PAIRS[4][0]], "PASSAGE": [PAIRS[4][1]]})
    assert abs(float(one["score"][0, 0]) - model.compute_score(PAIRS[4])[0]) <= TOL


@pytest.mark.parametrize("which", ["bert", "gemma"])
def test_reranker_ensembles_match_flagembedding(server, ckpts, arts, which):
    from FlagEmbedding import FlagLLMReranker, FlagReranker

    cls = FlagLLMReranker if which == "gemma" else FlagReranker
    ref = cls(ckpts[which], use_fp16=False, devices="cpu").compute_score(PAIRS[:4], normalize=True)
    out = infer(server, "grpc", os.path.basename(arts[which]),
                {"QUERY": [q for q, _ in PAIRS[:4]], "PASSAGE": [p for _, p in PAIRS[:4]]})
    assert np.abs(out["normalized_score"][:, 0] - ref).max() <= 1e-5


@pytest.mark.parametrize("which", ["bert", "gemma"])
def test_reranker_backend_triton_matches_local(server, arts, local, which):
    remote = type(local[which])(arts[which], backend="triton", url=server.http_url, protocol="http")
    assert np.abs(np.array(remote.compute_score(PAIRS)) - local[which].compute_score(PAIRS)).max() <= TOL


def test_ensemble_errors_are_clear(server, arts):
    base = os.path.basename(arts["cross"])
    with pytest.raises(Exception, match="input 'QUERY' batch size does not match other inputs"):
        infer(server, "grpc", base, {"QUERY": ["a", "b"], "PASSAGE": ["c"]})
    with pytest.raises(Exception, match="not valid UTF-8"):
        client = tc_grpc.InferenceServerClient(server.grpc_url)
        inp = tc_grpc.InferInput("TEXT", [1, 1], "BYTES")
        inp.set_data_from_numpy(np.array([[b"\xff\xfe"]], dtype=object))
        client.infer("bge-m3", [inp])
