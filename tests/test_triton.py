"""Triton: generated repositories (configs parsed with tritonclient's protobuf) and a real tritonserver.

The server is the one nvidia-pytriton bundles, run from the environment scripts/make_triton_env.sh
makes (.ci/run makes it). It serves a repository whose model step is a python-backend model running
onnxruntime on the exported graph. Results are compared with the local ORT backend (same batches,
≤ 1e-5) and with FlagEmbedding's PyTorch FlagModel. The server tests skip only when tritonserver
cannot start, and say why.
"""
from __future__ import annotations

import hashlib
import os
import threading

import numpy as np
import pytest

from bgert.runtime import Embedder
from bgert.runtime.manifest import read_manifest
from bgert.runtime.triton_backend import (TritonBackend, TritonError, TritonTimeoutError, TritonUnavailableError,
                                          model_step_name)
from bgert.triton_models.repository import preferred_batch_sizes, write_repository
from bgert.triton_models.server import TritonServer, free_port
from triton_start import start_or_skip

tc_grpc = pytest.importorskip("tritonclient.grpc")
tc_http = pytest.importorskip("tritonclient.http")
from google.protobuf import text_format  # noqa: E402  (comes with tritonclient[grpc])
from tritonclient.grpc import model_config_pb2 as mc  # noqa: E402

NAME = "bge-small-en-v1.5"  # the tiny artifact's directory name, hence the repository's model names
TEXTS = [
    "",
    "what is panda?",
    "The giant panda (Ailuropoda melanoleuca) is a bear species endemic to China.",
    "北京是中华人民共和国的首都。 Москва — столица России. 🐼",
    "panda " * 700,  # truncated at max_length 512
    "BM25 is a bag-of-words retrieval function that ranks a set of documents.",
    "hi",
] * 3  # 21 rows: more than the test repository's max_batch_size of 8


def parse(path: str) -> mc.ModelConfig:
    with open(path, encoding="utf-8") as f:
        return text_format.Parse(f.read(), mc.ModelConfig())


def params(cfg: mc.ModelConfig) -> dict[str, str]:
    return {k: v.string_value for k, v in cfg.parameters.items()}


def cos_rows(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


# ---- repositories and their configs (no server) ----------------------------------------------
@pytest.mark.parametrize("backend,device", [("onnxruntime", "gpu"), ("onnxruntime", "cpu"), ("tensorrt", "gpu"),
                                            ("python", "cpu")])
def test_repository_configs_parse_with_tritons_protobuf(tiny_bge_art, tmp_path, backend, device):
    repo = str(tmp_path / "repo")
    names = write_repository(tiny_bge_art, repo, backend=backend, device=device, instances=2, max_batch_size=16,
                             queue_delay_us=300, threads=1)
    assert names == [f"{NAME}_model", f"{NAME}_tokenizer", NAME]
    manifest = read_manifest(tiny_bge_art)

    model = parse(os.path.join(repo, f"{NAME}_model", "config.pbtxt"))
    assert model.name == f"{NAME}_model" and model.max_batch_size == 16
    assert [(i.name, i.data_type, list(i.dims)) for i in model.input] == [
        ("input_ids", mc.TYPE_INT64, [-1]), ("attention_mask", mc.TYPE_INT64, [-1])]
    assert [(o.name, o.data_type, list(o.dims)) for o in model.output] == [("dense", mc.TYPE_FP32, [32])]
    # 16384-token budget over buckets 16..512 → 1024..32 rows, capped at 16
    assert list(model.dynamic_batching.preferred_batch_size) == [16]
    assert model.dynamic_batching.max_queue_delay_microseconds == 300
    kind = mc.ModelInstanceGroup.KIND_GPU if device == "gpu" else mc.ModelInstanceGroup.KIND_CPU
    assert [(g.count, g.kind) for g in model.instance_group] == [(2, kind)]
    p = params(model)
    assert p["bgert_graph_sha256"] == manifest.raw["files"]["model.onnx"] and p["bgert_precision"] == "fp32"
    assert p["intra_op_thread_count"] == "1"
    version = os.path.join(repo, f"{NAME}_model", "1")
    with open(os.path.join(version, "model.onnx"), "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == p["bgert_graph_sha256"]
    if backend == "python":
        assert model.backend == "python" and p["graph_file"] == "model.onnx"
        assert os.path.isfile(os.path.join(version, "model.py"))
        assert os.path.isfile(os.path.join(version, "bgert", "runtime", "backends.py"))
    else:
        assert model.platform == "onnxruntime_onnx" and model.default_model_filename == "model.onnx"
    accels = model.optimization.execution_accelerators.gpu_execution_accelerator
    if backend == "tensorrt":
        assert [a.name for a in accels] == ["tensorrt"]
        assert accels[0].parameters["precision_mode"] == "FP16"
        assert int(accels[0].parameters["max_workspace_size_bytes"]) == 1 << 30
    else:
        assert not accels
    assert model.optimization.input_pinned_memory.enable == (backend == "onnxruntime" and device == "gpu")

    tok = parse(os.path.join(repo, f"{NAME}_tokenizer", "config.pbtxt"))
    assert tok.backend == "python" and tok.max_batch_size == 16
    assert [(i.name, i.data_type, list(i.dims)) for i in tok.input] == [("TEXT", mc.TYPE_STRING, [1])]
    assert [o.name for o in tok.output] == ["input_ids", "attention_mask"]
    assert [g.kind for g in tok.instance_group] == [mc.ModelInstanceGroup.KIND_CPU]
    assert params(tok)["max_length"] == "512"
    tok_dir = os.path.join(repo, f"{NAME}_tokenizer", "1")
    assert os.path.isfile(os.path.join(tok_dir, "tokenizer.json"))
    assert os.path.isfile(os.path.join(tok_dir, "bgert", "runtime", "tokenize.py"))

    ens = parse(os.path.join(repo, NAME, "config.pbtxt"))
    assert ens.platform == "ensemble" and ens.max_batch_size == 16
    assert [(i.name, i.data_type) for i in ens.input] == [("TEXT", mc.TYPE_STRING)]
    assert [(o.name, list(o.dims)) for o in ens.output] == [("dense", [32])]
    steps = ens.ensemble_scheduling.step
    assert [s.model_name for s in steps] == [f"{NAME}_tokenizer", f"{NAME}_model"]
    assert dict(steps[0].input_map) == {"TEXT": "TEXT"}
    assert dict(steps[0].output_map) == dict(steps[1].input_map) == {"input_ids": "input_ids",
                                                                     "attention_mask": "attention_mask"}
    assert dict(steps[1].output_map) == {"dense": "dense"}
    assert params(ens)["bgert_query_instruction"] == manifest.get("query_instruction")


def test_repository_options_and_errors(tiny_bge_art, tmp_path):
    repo = str(tmp_path / "repo")
    assert write_repository(tiny_bge_art, repo, ensemble=False) == [f"{NAME}_model"]
    assert sorted(os.listdir(repo)) == [f"{NAME}_model"]
    with pytest.raises(FileExistsError, match="--force"):
        write_repository(tiny_bge_art, repo, ensemble=False)
    write_repository(tiny_bge_art, repo, ensemble=False, max_batch_size=4, force=True)
    assert parse(os.path.join(repo, f"{NAME}_model", "config.pbtxt")).max_batch_size == 4
    # a second artifact (or the same one under another name) goes next to the first
    assert write_repository(tiny_bge_art, repo, name="other/name")[-1] == "other_name"
    with pytest.raises(ValueError, match="TensorRT accelerator needs --device gpu"):
        write_repository(tiny_bge_art, repo, backend="tensorrt", device="cpu", force=True)
    with pytest.raises(ValueError, match="backend must be one of"):
        write_repository(tiny_bge_art, repo, backend="tflite", force=True)
    with pytest.raises(ValueError, match="precision 'int4' is not in this artifact"):
        write_repository(tiny_bge_art, repo, precision="int4", force=True)
    with pytest.raises(ValueError, match="max_batch_size must be an int >= 1"):
        write_repository(tiny_bge_art, repo, max_batch_size=0, force=True)
    with pytest.raises(Exception, match="not a bgert artifact"):
        write_repository(str(tmp_path), repo)
    assert not [d for d in os.listdir(repo) if d.startswith(".")]  # no staging left behind


def test_reranker_repository_has_a_per_row_score(cross_art, tmp_path):
    repo = str(tmp_path / "repo")
    names = write_repository(cross_art, repo, backend="onnxruntime", device="gpu", ensemble=False)
    assert names == ["bge-reranker-v2-m3_model"]  # token ids in (ensembles: tests/test_triton_families.py)
    cfg = parse(os.path.join(repo, names[0], "config.pbtxt"))
    assert [i.name for i in cfg.input] == ["input_ids", "attention_mask"]
    (score,) = cfg.output
    assert (score.name, list(score.dims), score.HasField("reshape"), list(score.reshape.shape)) == (
        "score", [1], True, [])


def test_preferred_batch_sizes():
    assert preferred_batch_sizes([16, 32, 64, 128, 256, 512], 16384, 64) == [32, 64]
    assert preferred_batch_sizes([128, 512], 1024, 64) == [2, 8]
    assert preferred_batch_sizes([512], 100, 8) == [1]


def test_cli_triton_repo(tiny_bge_art, tmp_path, capsys):
    from bgert.cli import main

    repo = str(tmp_path / "repo")
    assert main(["triton-repo", tiny_bge_art, "--out", repo, "--backend", "tensorrt", "--instances", "3",
                 "--max-batch-size", "32", "--no-ensemble"]) == 0
    cfg = parse(os.path.join(repo, f"{NAME}_model", "config.pbtxt"))
    assert cfg.max_batch_size == 32 and cfg.instance_group[0].count == 3
    assert main(["triton-repo", tiny_bge_art, "--out", repo, "--backend", "tensorrt", "--device", "cpu"]) == 1
    assert "needs --device gpu" in capsys.readouterr().err


def test_backend_argument_errors(tiny_bge_art):
    with pytest.raises(ValueError, match="protocol must be 'grpc' or 'http'"):
        Embedder(tiny_bge_art, backend="triton", protocol="websocket").encode(["a"])


def test_connection_refused_is_a_clear_error(tiny_bge_art):
    model = Embedder(tiny_bge_art, backend="triton", url=f"127.0.0.1:{free_port()}", retries=1, backoff=0.01)
    with pytest.raises(TritonUnavailableError, match=r"cannot reach Triton .* after 2 attempts.*triton-serve"):
        model.encode(["a"])


# ---- a real tritonserver -----------------------------------------------------------------------
@pytest.fixture(scope="session")
def cross_ckpt(ckpt_root) -> str:
    import tiny_models

    return tiny_models.build_cross_encoder(os.path.join(ckpt_root, "triton"))


@pytest.fixture(scope="session")
def cross_art(cross_ckpt, tmp_path_factory) -> str:
    from bgert.export import export

    return export(cross_ckpt, str(tmp_path_factory.mktemp("triton_art") / "bge-reranker-v2-m3"), progress=False)


@pytest.fixture(scope="session")
def triton_server(tiny_bge_art, cross_art, tmp_path_factory):
    """The bundled tritonserver serving the tiny BGE (ensemble + model step, max_batch_size 8) and the
    tiny cross-encoder (model step, max_batch_size 4) through python-backend models."""
    repo = str(tmp_path_factory.mktemp("triton") / "repo")
    write_repository(tiny_bge_art, repo, backend="python", device="cpu", max_batch_size=8, queue_delay_us=2000,
                     threads=1)
    write_repository(cross_art, repo, backend="python", device="cpu", max_batch_size=4, threads=1, ensemble=False)
    server = start_or_skip(lambda: TritonServer(repo), "test_triton")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def local(tiny_bge_art) -> Embedder:
    return Embedder(tiny_bge_art)


@pytest.fixture(scope="module")
def flag_model(tiny_bge):
    from FlagEmbedding import FlagModel

    return FlagModel(tiny_bge, use_fp16=False, devices="cpu")


def _client(protocol: str, server: TritonServer):
    mod = tc_grpc if protocol == "grpc" else tc_http
    return mod, mod.InferenceServerClient(server.grpc_url if protocol == "grpc" else server.http_url)


def infer_texts(protocol: str, server: TritonServer, texts: list[str]) -> np.ndarray:
    mod, client = _client(protocol, server)
    try:
        data = np.array([[t.encode("utf-8")] for t in texts], dtype=object)
        inp = mod.InferInput("TEXT", list(data.shape), "BYTES")
        inp.set_data_from_numpy(data)
        return client.infer(NAME, [inp]).as_numpy("dense")
    finally:
        client.close()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_raw_text_ensemble_matches_local_and_pytorch(triton_server, local, flag_model, protocol):
    texts = TEXTS[:7]
    got = infer_texts(protocol, triton_server, texts)
    assert got.shape == (7, 32) and got.dtype == np.float32
    assert np.abs(got - local.encode(texts)).max() <= 1e-5
    assert cos_rows(got, flag_model.encode(texts)).min() >= 0.99999


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_token_id_requests_to_the_model_step(triton_server, local, protocol):
    seqs = local.tokenizer.encode(TEXTS[:4], 512)
    from bgert.runtime.batching import pad

    ids, mask = pad(seqs, max(map(len, seqs)), local.tokenizer.pad_token_id)
    mod, client = _client(protocol, triton_server)
    try:
        inputs = []
        for name, arr in (("input_ids", ids), ("attention_mask", mask)):
            inputs.append(mod.InferInput(name, list(arr.shape), "INT64"))
            inputs[-1].set_data_from_numpy(arr)
        got = client.infer(f"{NAME}_model", inputs).as_numpy("dense")
    finally:
        client.close()
    assert np.abs(got - local.encode(TEXTS[:4])).max() <= 1e-5


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_embedder_backend_triton_matches_local(triton_server, tiny_bge_art, local, protocol):
    url = triton_server.grpc_url if protocol == "grpc" else triton_server.http_url
    remote = Embedder(tiny_bge_art, backend="triton", url=url, protocol=protocol)
    got = remote.encode(TEXTS)  # 21 rows in several length buckets, split into requests of ≤ 8 rows
    assert got.shape == (21, 32) and np.abs(got - local.encode(TEXTS)).max() <= 1e-5
    assert np.abs(remote.encode_queries(TEXTS[:5]) - local.encode_queries(TEXTS[:5])).max() <= 1e-5
    single = remote.encode("what is panda?")
    assert single.shape == (32,)
    be = remote.backend_for(remote.graph())
    assert isinstance(be, TritonBackend) and be.max_batch_size == 8 and be.model_name == model_step_name(
        NAME, remote.graph())


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_reranker_backend_triton_matches_local_and_pytorch(triton_server, cross_art, cross_ckpt, protocol):
    from FlagEmbedding import FlagReranker

    from bgert.runtime import load

    pairs = [("what is panda?", "The giant panda is a bear species endemic to China."), ("what is panda?", "hi"),
             ("BM25", "panda " * 600), ("北京", "Москва — столица России. 🐼")] * 2  # 8 rows, max_batch_size 4
    url = triton_server.grpc_url if protocol == "grpc" else triton_server.http_url
    remote = load(cross_art, backend="triton", url=url, protocol=protocol)
    local = load(cross_art)
    got = remote.compute_score(pairs)
    assert isinstance(got, list) and len(got) == 8 and all(isinstance(x, float) for x in got)
    assert np.abs(np.array(got) - local.compute_score(pairs)).max() <= 1e-5
    ref = FlagReranker(cross_ckpt, use_fp16=False, devices="cpu").compute_score(pairs, normalize=True)
    assert np.abs(np.array(remote.compute_score(pairs, normalize=True)) - ref).max() <= 1e-5


def test_concurrent_requests_are_batched_by_the_dynamic_batcher(triton_server, local):
    client = tc_grpc.InferenceServerClient(triton_server.grpc_url)

    def executions() -> tuple[int, int]:
        s = client.get_inference_statistics(f"{NAME}_model", as_json=True)["model_stats"][0]
        return int(s.get("inference_count", 0)), int(s.get("execution_count", 0))

    inf0, exe0 = executions()
    n_threads, rounds = 12, 3
    barrier = threading.Barrier(n_threads)
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            for r in range(rounds):
                barrier.wait(timeout=60)
                text = TEXTS[(k + r) % 7]
                results[k * rounds + r] = (text, infer_texts("grpc", triton_server, [text])[0])
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    texts = [results[i][0] for i in sorted(results)]
    got = np.stack([results[i][1] for i in sorted(results)])
    assert np.abs(got - local.encode(texts)).max() <= 1e-5
    inf1, exe1 = executions()
    client.close()
    assert inf1 - inf0 == n_threads * rounds
    assert exe1 - exe0 < n_threads * rounds  # several requests ran in one execution


def test_server_side_errors_are_clear(triton_server, tiny_bge_art):
    with pytest.raises(TritonUnavailableError, match=r"model 'nope' is not ready.*bge-small-en-v1.5_model \(READY"):
        Embedder(tiny_bge_art, backend="triton", url=triton_server.grpc_url, model_name="nope").encode(["a"])
    with pytest.raises(TritonTimeoutError, match="timed out after"):
        Embedder(tiny_bge_art, backend="triton", url=triton_server.http_url, protocol="http",
                 timeout=1e-4, retries=0).encode(TEXTS)
    manifest = read_manifest(tiny_bge_art)
    manifest.raw["files"] = dict(manifest.raw["files"], **{"model.onnx": "0" * 64})  # another export's graph
    with pytest.raises(TritonError, match="does not run this artifact's fp32 graph"):
        TritonBackend(manifest, manifest.graphs[0], url=triton_server.grpc_url)
    # each request names its graph: the model step refuses one that expects another (a replaced repository)
    local_manifest = read_manifest(tiny_bge_art)
    for url, protocol in ((triton_server.grpc_url, "grpc"), (triton_server.http_url, "http")):
        be = TritonBackend(local_manifest, local_manifest.graphs[0], url=url, protocol=protocol)
        feeds = {"input_ids": np.array([[2, 5, 3]]), "attention_mask": np.ones((1, 3), np.int64)}
        assert be.run(feeds, ["dense"])[0].shape == (1, 32)
        be._sha256 = "0" * 64
        with pytest.raises(TritonError, match=r"rejected inference.*does not run this artifact's graph"):
            be.run(feeds, ["dense"])
    with pytest.raises(Exception, match="not valid UTF-8"):
        mod, client = _client("grpc", triton_server)
        inp = mod.InferInput("TEXT", [1, 1], "BYTES")
        inp.set_data_from_numpy(np.array([[b"\xff\xfe"]], dtype=object))
        client.infer(NAME, [inp])


def test_cli_triton_serve_prints_a_command_bound_to_localhost(triton_server, capsys):
    from bgert.cli import main

    assert main(["triton-serve", triton_server.repo, "--print-command", "--http-port", "18000"]) == 0
    out = capsys.readouterr().out
    assert "--http-address 127.0.0.1 --http-port 18000" in out and "--backend-directory" in out
    assert "VIRTUAL_ENV=" in out and "--allow-metrics false" in out
