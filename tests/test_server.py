"""``bgert serve`` as a real process on 127.0.0.1 (a free port, started and stopped here): the official
``openai`` client, httpx against every endpoint and every family with results equal (1e-6) to the
in-process runtime, one family also against FlagEmbedding itself, 64 concurrent clients, every bad
input's status and error shape, /metrics through prometheus_client's parser, the API key, body and
batch limits, a full queue (429), and SIGTERM with requests in flight.

One server serves every family for the module; a second, small one has the limits switched on.
"""
from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import tiny_models  # noqa: E402
from bgert.runtime import load  # noqa: E402

TOL = 1e-6
TEXTS = ["what is a panda?", "The giant panda is a bear species endemic to China.", "北京是中华人民共和国的首都。",
         "", "BM25 is a bag-of-words retrieval function", "🐼 emoji 👩‍💻"]
PAIRS_Q = "what is a panda?"
DOCS = ["hi", "The giant panda (Ailuropoda melanoleuca) is a bear species endemic to China.", "北京",
        "pandas eat bamboo", "BM25"]
LIGHTWEIGHT = os.path.join(os.path.dirname(__file__), "data", "lightweight_artifact")


def _art(ckpt: str, out: str, **options) -> str:
    """The family test's artifact at ``out`` where this session made it already, else a fresh export beside it
    (``serve-<name>``: never at the family test's path, which its own fixture exports to later)."""
    from bgert.export import export

    if os.path.isdir(out):
        return out
    mine = os.path.join(os.path.dirname(out), "serve-" + os.path.basename(out))
    return mine if os.path.isdir(mine) else export(ckpt, mine, progress=False, **options)


@pytest.fixture(scope="module")
def arts(tiny_bge_art, ckpt_root, art_root) -> dict[str, str]:
    """One artifact per family (reusing the family tests' ones when this session made them)."""
    j = os.path.join
    cross_ckpt = tiny_models.build_cross_encoder(ckpt_root)
    return {
        "bge": tiny_bge_art,
        "m3": _art(tiny_models.build_m3(ckpt_root), j(art_root, "serve-bge-m3")),
        "cross": _art(cross_ckpt, j(art_root, "bge-reranker-v2-m3")),
        "gemma": _art(tiny_models.build_gemma_reranker(ckpt_root), j(art_root, "bge-reranker-v2-gemma")),
        "layerwise": _art(tiny_models.build_minicpm_layerwise(ckpt_root),
                          j(art_root, "bge-reranker-v2-minicpm-layerwise"), cutoff_layers=[4, 2, 3]),
        "lightweight": LIGHTWEIGHT,
        "gemma2": _art(tiny_models.build_gemma2_embedder(ckpt_root, sliding_window=16),
                       j(art_root, "bge-multilingual-gemma2")),
        "_cross_ckpt": cross_ckpt,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m bgert.cli serve ...`` on a free port; ``url``; stopped by ``stop()`` (SIGTERM)."""

    def __init__(self, names: list[str], paths: list[str], *flags: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "bgert.cli", "serve", *paths, *[a for n in names for a in ("--name", n)],
               "--host", "127.0.0.1", "--port", str(self.port), "--threads", "1", *flags]
        self.log = open(os.path.join(os.environ.get("TMPDIR", "/tmp"), f"bgert-serve-{self.port}.log"), "w+")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"bgert serve exited {self.proc.returncode}: {self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.proc.kill()
        raise RuntimeError(f"bgert serve was not ready in 300 s: {self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-4000:]

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def server(arts):
    names = [n for n in arts if not n.startswith("_")]
    s = Server(names, [arts[n] for n in names])
    yield s
    s.stop()


@pytest.fixture(scope="module")
def local(arts):
    """The same artifacts in-process (one thread, as the server's)."""
    return {n: load(p, intra_op_num_threads=1) for n, p in arts.items() if not n.startswith("_")}


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def close(a, b, tol=TOL) -> bool:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return a.shape == b.shape and float(np.abs(a - b).max(initial=0)) <= tol


# ---- OpenAI ----------------------------------------------------------------------------------------
def test_openai_client_embeddings(server, local):
    import openai

    c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    want = local["bge"].encode_corpus(TEXTS)
    got = c.embeddings.create(model="bge", input=TEXTS)  # the client asks for base64 and decodes it
    assert [d.index for d in got.data] == list(range(len(TEXTS))) and got.model == "bge"
    assert close([d.embedding for d in got.data], want)
    assert got.usage.prompt_tokens == sum(len(s) for s in local["bge"].tokenizer.encode(TEXTS, 512))
    one = c.embeddings.create(model="bge", input="what is a panda?", encoding_format="float")
    assert close(one.data[0].embedding, want[0])
    assert {m.id for m in c.models.list()} >= {"bge", "m3", "cross", "gemma2"}
    with pytest.raises(openai.NotFoundError):
        c.embeddings.create(model="nope", input="x")


def test_openai_embeddings_shapes(client, local):
    ids = local["bge"].tokenizer.encode(TEXTS[:3], 512)
    r = client.post("/v1/embeddings", json={"model": "bge", "input": ids})
    assert r.status_code == 200 and close([d["embedding"] for d in r.json()["data"]], local["bge"].encode(TEXTS[:3]))
    r = client.post("/v1/embeddings", json={"model": "bge", "input": ids[0], "encoding_format": "base64"})
    vec = np.frombuffer(base64.b64decode(r.json()["data"][0]["embedding"]), dtype="<f4")
    assert close(vec, local["bge"].encode(TEXTS[0]))
    r = client.post("/v1/embeddings", json={"input": "first model answers"})  # no model: the first one
    assert r.json()["model"] == "bge"
    r = client.post("/v1/embeddings", json={"model": "bge", "input": TEXTS[:2], "input_type": "query"})
    assert close([d["embedding"] for d in r.json()["data"]], local["bge"].encode_queries(TEXTS[:2]))
    dim = local["bge"].dim
    assert client.post("/v1/embeddings", json={"model": "bge", "input": "x", "dimensions": dim}).status_code == 200


# ---- TEI and bgert's own, every family ----------------------------------------------------------------
@pytest.mark.parametrize("name", ["bge", "m3", "gemma2"])
def test_embed_every_embedder(client, local, name):
    m = local[name]
    want = m.encode_corpus(TEXTS)
    want = want["dense_vecs"] if isinstance(want, dict) else want
    r = client.post("/embed", json={"model": name, "inputs": TEXTS})
    assert r.status_code == 200, r.text
    assert close(r.json(), want)
    r = client.post("/embed", json={"model": name, "inputs": TEXTS[1]})
    assert close(r.json(), want[1:2])
    r = client.post("/v1/embeddings", json={"model": name, "input": TEXTS})
    assert close([d["embedding"] for d in r.json()["data"]], want)


def test_m3_sparse_colbert_and_all_in_one(client, local):
    m3 = local["m3"]
    want = m3.encode_corpus(TEXTS, max_length=m3.max_length, return_dense=True, return_sparse=True,
                            return_colbert_vecs=True)
    sparse = client.post("/embed_sparse", json={"model": "m3", "inputs": TEXTS}).json()
    for got, ref in zip(sparse, want["lexical_weights"]):
        assert {str(x["index"]) for x in got} == set(ref)
        assert all(abs(x["value"] - float(ref[str(x["index"])])) <= TOL for x in got)
    colbert = client.post("/embed_all", json={"model": "m3", "inputs": TEXTS}).json()
    assert all(close(g, r) for g, r in zip(colbert, want["colbert_vecs"]))
    both = client.post("/m3/encode", json={"model": "m3", "input": TEXTS}).json()["data"]
    assert close([d["dense"] for d in both], want["dense_vecs"])
    assert all(close(d["colbert"], r) for d, r in zip(both, want["colbert_vecs"]))
    assert all(d["sparse"].keys() == r.keys() and close(list(d["sparse"].values()), [r[k] for k in d["sparse"]])
               for d, r in zip(both, want["lexical_weights"]))
    only = client.post("/m3/encode", json={"model": "m3", "input": "x", "return_dense": False,
                                            "return_colbert_vecs": False}).json()["data"][0]
    assert set(only) == {"index", "sparse"}


@pytest.mark.parametrize("name,extra", [("cross", {}), ("gemma", {}), ("gemma", {"prompt": "Is B relevant to A?"}),
                                        ("layerwise", {"cutoff_layers": 2}), ("layerwise", {"cutoff_layers": [2, 4]}),
                                        ("lightweight", {"cutoff_layers": 3})])
def test_rerank_every_reranker(client, local, name, extra):
    m = local[name]
    raw = m.compute_score([(PAIRS_Q, d) for d in DOCS], **extra)
    raw = np.asarray(raw, np.float64).reshape(-1, len(DOCS)).T  # [docs, cutoffs]
    norm = 1 / (1 + np.exp(-raw))
    r = client.post("/rerank", json={"model": name, "query": PAIRS_Q, "texts": DOCS, "raw_scores": True,
                                     "return_text": True, **extra})
    assert r.status_code == 200, r.text
    got = r.json()
    assert [g["score"] for g in got] == sorted((g["score"] for g in got), reverse=True)
    for g in got:
        assert g["text"] == DOCS[g["index"]] and abs(g["score"] - raw[g["index"], -1]) <= TOL
        if raw.shape[1] > 1:
            assert close(g["scores"], raw[g["index"]])
    r = client.post("/v1/rerank", json={"model": name, "query": PAIRS_Q, "documents": DOCS, "top_n": 3,
                                        "return_documents": True, **extra}).json()
    assert len(r["results"]) == 3
    best = np.argsort(-norm[:, -1], kind="stable")[:3]
    assert [x["index"] for x in r["results"]] == best.tolist()
    for x in r["results"]:
        assert abs(x["relevance_score"] - norm[x["index"], -1]) <= TOL and x["document"]["text"] == DOCS[x["index"]]


def test_cross_encoder_against_flagembedding(client, arts):
    """The server's scores against FlagReranker itself (the runtime's parity tolerance, fp32 ONNX vs torch)."""
    from FlagEmbedding import FlagReranker

    ref = FlagReranker(arts["_cross_ckpt"], use_fp16=False, devices="cpu").compute_score([(PAIRS_Q, d) for d in DOCS])
    got = client.post("/rerank", json={"model": "cross", "query": PAIRS_Q, "texts": DOCS, "raw_scores": True}).json()
    assert close([g["score"] for g in sorted(got, key=lambda g: g["index"])], ref, tol=1e-4)


def test_tokenize_info_health_models(client, local):
    toks = client.post("/tokenize", json={"model": "bge", "inputs": ["what is a panda?"]}).json()[0]
    enc = local["bge"].tokenizer.encodings(["what is a panda?"])[0]
    assert [t["id"] for t in toks] == enc.ids and toks[0]["special"] and not toks[1]["special"]
    assert TEXTS[0][toks[1]["start"]:toks[1]["stop"]] == "what"
    info = client.get("/info").json()
    by = {m["model_id"]: m for m in info["models"]}
    assert "/embed_sparse" in by["m3"]["endpoints"] and "/embed_sparse" not in by["bge"]["endpoints"]
    assert "/rerank" in by["cross"]["endpoints"] and "/embed" not in by["cross"]["endpoints"]
    assert "cutoff_layers" in by["layerwise"]["parameters"] and "prompt" in by["gemma"]["parameters"]
    assert info["model_id"] == "bge" and info["ready"]
    assert by["bge"]["backend"] == "ort" and by["bge"]["variant_chosen_by"].startswith("fixed order")  # BGERT_TUNE=off
    assert client.get("/health").status_code == 200
    assert [m["id"] for m in client.get("/v1/models").json()["data"]][:2] == ["bge", "m3"]


def test_64_concurrent_clients_get_their_own_results(server, local):
    texts = [f"client {i} asks about {'panda ' * (i % 9)}bamboo {i * 7919 % 1000}" for i in range(64 * 3)]
    want = local["bge"].encode_corpus(texts)

    def client_loop(k: int) -> list[tuple[int, list]]:
        out = []
        with httpx.Client(base_url=server.url, timeout=60) as c:
            for j in range(k, len(texts), 64):
                r = c.post("/embed", json={"model": "bge", "inputs": [texts[j]]})
                out.append((j, r.json()[0] if r.status_code == 200 else r.text))
        return out

    barrier = threading.Barrier(64)

    def start(k: int):
        barrier.wait()
        return client_loop(k)

    with ThreadPoolExecutor(64) as pool:
        results = [x for part in pool.map(start, range(64)) for x in part]
    assert len(results) == len(texts)
    wrong = [j for j, got in results if not (isinstance(got, list) and close(got, want[j]))]
    assert not wrong, f"{len(wrong)} clients got another's or no result, first: {wrong[:5]}"


# ---- bad input: status and the API's own error shape ----------------------------------------------------
def openai_error(r) -> dict:
    e = r.json()["error"]
    assert set(e) >= {"message", "type", "param", "code"} and e["message"]
    return e


def tei_error(r) -> dict:
    body = r.json()
    assert set(body) == {"error", "error_type"} and body["error"], body
    return body


BAD = [
    # (path, body, status, shape)
    ("/v1/embeddings", {"model": "bge", "input": []}, 400, "openai"),
    ("/v1/embeddings", {"model": "bge", "input": ["ok", 3]}, 400, "openai"),
    ("/v1/embeddings", {"model": "nope", "input": "x"}, 404, "openai"),
    ("/v1/embeddings", {"model": "bge", "input": "x", "dimensions": 3}, 400, "openai"),
    ("/v1/embeddings", {"model": "bge", "input": "x", "encoding_format": "int8"}, 400, "openai"),
    ("/v1/embeddings", {"model": "bge", "input": [[1, 2, 10 ** 9]]}, 400, "openai"),
    ("/v1/embeddings", {"model": "bge", "input": "panda " * 2000, "truncate": False}, 413, "openai"),
    ("/v1/embeddings", {"model": "cross", "input": "x"}, 400, "openai"),
    ("/v1/embeddings", {"model": "m3", "input": [[0, 5, 2]]}, 400, "openai"),
    ("/embed", {"model": "bge", "inputs": []}, 400, "tei"),
    ("/embed", {"model": "bge", "inputs": [1, 2]}, 422, "tei"),
    ("/embed", {"model": "bge", "inputs": "panda " * 2000, "truncate": False}, 413, "tei"),
    ("/embed", {"model": "bge", "inputs": "x", "normalize": False}, 400, "tei"),
    ("/embed", {"model": "bge", "inputs": "x", "truncation_direction": "Middle"}, 422, "tei"),
    ("/embed", {"model": "nope", "inputs": "x"}, 404, "tei"),
    ("/embed", {"model": "cross", "inputs": "x"}, 400, "tei"),
    ("/embed_sparse", {"model": "bge", "inputs": "x"}, 400, "tei"),
    ("/embed_all", {"model": "bge", "inputs": "x"}, 400, "tei"),
    ("/m3/encode", {"model": "bge", "input": "x"}, 400, "tei"),
    ("/m3/encode", {"model": "m3", "input": "x", "return_dense": False, "return_sparse": False,
                    "return_colbert_vecs": False}, 400, "tei"),
    ("/rerank", {"model": "bge", "query": "q", "texts": ["a"]}, 400, "tei"),
    ("/rerank", {"model": "cross", "query": "q", "texts": []}, 400, "tei"),
    ("/rerank", {"model": "cross", "query": "q", "texts": ["a"], "cutoff_layers": 2}, 400, "tei"),
    ("/rerank", {"model": "layerwise", "query": "q", "texts": ["a"], "cutoff_layers": 99}, 400, "tei"),
    ("/rerank", {"model": "cross", "query": "q", "texts": ["panda " * 2000], "truncate": False}, 413, "tei"),
    ("/rerank", {"model": "cross", "texts": ["a"]}, 422, "tei"),
    ("/tokenize", {"model": "nope", "inputs": "x"}, 404, "tei"),
    ("/v1/rerank", {"model": "cross", "query": "q", "documents": []}, 400, "cohere"),
    ("/v1/rerank", {"model": "bge", "query": "q", "documents": ["a"]}, 400, "cohere"),
    ("/v1/rerank", {"model": "cross", "query": "q", "documents": ["a"], "top_n": 0}, 400, "cohere"),
]


@pytest.mark.parametrize("path,body,status,shape", BAD, ids=[f"{p}-{i}" for i, (p, *_) in enumerate(BAD)])
def test_bad_input_status_and_shape(client, path, body, status, shape):
    r = client.post(path, json=body)
    assert r.status_code == status, (r.status_code, r.text)
    if shape == "openai":
        openai_error(r)
    elif shape == "tei":
        tei_error(r)
    else:
        assert set(r.json()) == {"message"} and r.json()["message"]


@pytest.mark.parametrize("path,status,shape", [("/v1/embeddings", 400, "openai"), ("/embed", 422, "tei"),
                                               ("/v1/rerank", 400, "cohere")])
def test_malformed_json(client, path, status, shape):
    r = client.post(path, content=b'{"input": [1, ', headers={"content-type": "application/json"})
    assert r.status_code == status
    msg = r.json()["error"]["message"] if shape == "openai" else r.json().get("error") or r.json()["message"]
    assert "malformed JSON" in msg


def test_server_survives_bad_input(client, local):
    """After every bad request above, the worker still answers correctly."""
    r = client.post("/embed", json={"model": "bge", "inputs": ["still alive"]})
    assert r.status_code == 200 and close(r.json(), local["bge"].encode(["still alive"]))


def test_metrics_parse(client):
    from prometheus_client.parser import text_string_to_metric_families

    client.post("/embed", json={"model": "bge", "inputs": ["for the metrics"]})
    r = client.get("/metrics")
    assert r.status_code == 200
    fams = {f.name: f for f in text_string_to_metric_families(r.text)}
    for name in ("bgert_requests", "bgert_request_duration_seconds", "bgert_queue_size", "bgert_batch_size",
                 "bgert_batch_tokens", "bgert_tokenization_seconds", "bgert_inference_seconds"):
        assert name in fams, sorted(fams)
    ok = [s for s in fams["bgert_requests"].samples
          if s.name == "bgert_requests_total" and s.labels == {"model": "bge", "endpoint": "/embed", "status": "200"}]
    assert ok and ok[0].value >= 1
    bad = [s for s in fams["bgert_requests"].samples if s.labels.get("status") == "413"]
    assert bad  # the bad-input tests were counted too
    tokens = [s for s in fams["bgert_batch_tokens"].samples if s.name.endswith("_count") and s.labels["model"] == "bge"]
    assert tokens and tokens[0].value >= 1


# ---- limits: API key, body size, client batch size, full queue ----------------------------------------
@pytest.fixture(scope="module")
def limited(arts):
    s = Server(["bge"], [arts["bge"]], "--api-key", "s3cret", "--max-request-bytes", "4000",
               "--max-client-batch-size", "4", "--max-queue-items", "1", "--max-batch-requests", "4")
    yield s
    s.stop()


def test_api_key(limited):
    ok = {"Authorization": "Bearer s3cret"}
    assert httpx.post(limited.url + "/embed", json={"inputs": "x"}, headers=ok).status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        r = httpx.post(limited.url + "/embed", json={"inputs": "x"}, headers=headers)
        assert r.status_code == 401 and tei_error(r)["error_type"] == "Unauthorized"
    r = httpx.post(limited.url + "/v1/embeddings", json={"input": "x"})
    assert r.status_code == 401 and openai_error(r)["type"] == "authentication_error"
    assert httpx.get(limited.url + "/health").status_code == 200  # probes need no key


def test_body_and_client_batch_limits(limited):
    h = {"Authorization": "Bearer s3cret"}
    r = httpx.post(limited.url + "/embed", json={"inputs": ["x" * 5000]}, headers=h)
    assert r.status_code == 413 and "max-request-bytes" in tei_error(r)["error"]

    def chunks():
        yield b'{"inputs": "'
        for _ in range(10):
            yield b"x" * 500
        yield b'"}'

    r = httpx.post(limited.url + "/embed", content=chunks(), headers={**h, "content-type": "application/json"})
    assert r.status_code == 413  # a chunked body without Content-Length is counted as it arrives
    r = httpx.post(limited.url + "/v1/embeddings", json={"input": ["a"] * 5}, headers=h)
    assert r.status_code == 413 and "max-client-batch-size" in openai_error(r)["message"]


def test_full_queue_answers_429(limited, local):
    h = {"Authorization": "Bearer s3cret"}
    texts = [f"busy {i} " + "panda " * 60 for i in range(4)]
    want = local["bge"].encode_corpus(texts)
    barrier = threading.Barrier(32)

    def one(_: int):
        barrier.wait()
        return httpx.post(limited.url + "/embed", json={"inputs": texts}, headers=h, timeout=60)

    with ThreadPoolExecutor(32) as pool:
        rs = list(pool.map(one, range(32)))
    codes = [r.status_code for r in rs]
    assert set(codes) <= {200, 429} and 429 in codes and 200 in codes, codes
    assert all(close(r.json(), want) for r in rs if r.status_code == 200)
    assert all(tei_error(r)["error_type"] == "Overloaded" for r in rs if r.status_code == 429)


# ---- lifecycle ---------------------------------------------------------------------------------------
def in_flight(url: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=10).text
    return next(s.value for f in text_string_to_metric_families(text) for s in f.samples
                if s.name == "bgert_requests_in_flight")


def test_sigterm_finishes_requests_in_flight(server, local):
    """Last in the module: SIGTERM while 16 clients wait for their results; every one gets its own,
    the server exits 0 and then refuses connections."""
    texts = [[f"in flight {i}.{j} " + "panda " * 600 for j in range(128)] for i in range(16)]

    def one(i: int):
        with httpx.Client(base_url=server.url, timeout=120) as c:
            return c.post("/embed", json={"model": "bge", "inputs": texts[i], "truncate": True})

    with ThreadPoolExecutor(16) as pool:
        futs = [pool.submit(one, i) for i in range(16)]
        deadline = time.monotonic() + 60
        while in_flight(server.url) < 16 and time.monotonic() < deadline and not all(f.done() for f in futs):
            time.sleep(0.02)
        assert not any(f.done() for f in futs), "the requests finished before SIGTERM; make them longer"
        server.proc.send_signal(signal.SIGTERM)
        rs = [f.result() for f in futs]
    assert [r.status_code for r in rs] == [200] * 16
    for r, t in zip(rs, texts):
        assert close(r.json(), local["bge"].encode_corpus(t))
    assert server.proc.wait(60) == 0, server.output()
    with pytest.raises(httpx.HTTPError):
        httpx.get(server.url + "/health", timeout=5)
