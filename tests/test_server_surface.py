"""``bgert serve``'s newer surface, on real servers on 127.0.0.1 (free ports, started and stopped here):
truncation (``--auto-truncate`` / ``--no-auto-truncate``, TEI Left/Right, Cohere END/START/NONE), BGE-M3 on
the rerank routes against the in-process ``compute_score`` (which tests/test_m3.py holds to FlagEmbedding),
Cohere v2 ``/v2/embed`` and ``/v2/rerank``, output types against sentence-transformers'
``quantize_embeddings``, Matryoshka ``dimensions``, OpenTelemetry spans received by an OTLP/HTTP
collector run here, readiness while a slow load is simulated, and bad input on every new route.
"""
from __future__ import annotations

import base64
import datetime as dt
import gzip
import http.server
import json
import os
import shutil
import threading
import time

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

import tiny_models  # noqa: E402
from bgert.runtime import load  # noqa: E402
from test_server import Server, _art, close, free_port  # noqa: E402

#: far beyond 512 tokens, with a start and an end that differ
LONG = " ".join(["the giant panda lives in china"] * 120 + ["bamboo is the food of a bear species"] * 120)
QUERY = "what is a panda?"
DOCS = ["hi", "The giant panda (Ailuropoda melanoleuca) is a bear species endemic to China.", "北京",
        "pandas eat bamboo", "BM25"]
MODES = ("dense", "sparse", "colbert", "sparse+dense", "colbert+sparse+dense")
TYPES = ("int8", "uint8", "binary", "ubinary")


@pytest.fixture(scope="module")
def arts(tiny_bge, tiny_bge_art, ckpt_root, art_root, tmp_path_factory) -> dict[str, str]:
    j = os.path.join
    m3_ckpt = tiny_models.build_m3(ckpt_root)
    nocal = str(tmp_path_factory.mktemp("nocal") / "bge-nocal")
    shutil.copytree(tiny_bge_art, nocal)
    manifest = json.load(open(j(nocal, "manifest.json")))
    manifest.pop("int8_ranges", None)  # an artifact exported before calibration existed
    json.dump(manifest, open(j(nocal, "manifest.json"), "w"))
    return {
        "bge": tiny_bge_art,
        "mat": _art(tiny_bge, j(art_root, "bge-matryoshka"), matryoshka_dims=[16, 8]),
        "nocal": nocal,
        "m3": _art(m3_ckpt, j(art_root, "serve-bge-m3")),
        "m3dense": _art(m3_ckpt, j(art_root, "serve-bge-m3-dense"), heads=["dense"]),
        "cross": _art(tiny_models.build_cross_encoder(ckpt_root), j(art_root, "surface-reranker-v2-m3")),
        "gemma": _art(tiny_models.build_gemma_reranker(ckpt_root), j(art_root, "surface-reranker-v2-gemma")),
    }


@pytest.fixture(scope="module")
def local(arts):
    return {n: load(p, intra_op_num_threads=1) for n, p in arts.items()}


@pytest.fixture(scope="module")
def server(arts):
    s = Server(list(arts), list(arts.values()))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


# ---- an OTLP/HTTP collector ------------------------------------------------------------------------
class Collector:
    """A tiny OTLP/HTTP trace receiver on 127.0.0.1: every span posted to /v1/traces, parsed with
    opentelemetry-proto's ExportTraceServiceRequest."""

    def __init__(self):
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

        self.spans: list = []
        self.lock = threading.Lock()
        collector = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                req = trace_service_pb2.ExportTraceServiceRequest()
                req.ParseFromString(body)
                with collector.lock:
                    for rs in req.resource_spans:
                        service = {a.key: a.value.string_value for a in rs.resource.attributes}.get("service.name")
                        for ss in rs.scope_spans:
                            collector.spans += [(service, s) for s in ss.spans]
                out = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200 if self.path == "/v1/traces" else 404)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def wait_for(self, name: str, status: int, timeout: float = 30) -> tuple:
        """The last span called ``name`` whose http.response.status_code is ``status``."""
        def status_of(span) -> int:
            return next((a.value.int_value for a in span.attributes if a.key == "http.response.status_code"), 0)

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                found = [(svc, s) for svc, s in self.spans if s.name == name and status_of(s) == status]
            if found:
                return found[-1]
            time.sleep(0.1)
        raise AssertionError(f"no span {name!r} arrived in {timeout} s; got {[s.name for _, s in self.spans]}")

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def collector():
    c = Collector()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def strict(arts, collector, tmp_path_factory):
    """A second server: --no-auto-truncate, --int8-calibration, traces to the collector."""
    calib = tmp_path_factory.mktemp("calib") / "texts.txt"
    calib.write_text("\n".join(DOCS + [QUERY, "bamboo forests of sichuan", "a bear that eats bamboo"]) + "\n")
    os.environ["OTEL_BSP_SCHEDULE_DELAY"] = "100"  # export spans within 0.1 s (read when the server starts)
    try:
        s = Server(["bge", "cross"], [arts["bge"], arts["cross"]], "--no-auto-truncate", "--int8-calibration",
                   str(calib), "--otlp-endpoint", collector.url, "--otlp-service-name", "bgert-test")
    finally:
        del os.environ["OTEL_BSP_SCHEDULE_DELAY"]
    s.calibration = calib.read_text().splitlines()
    yield s
    s.stop()


def cohere_error(r) -> str:
    body = r.json()
    assert set(body) == {"message"} and body["message"], body
    return body["message"]


def tei_error(r) -> str:
    body = r.json()
    assert set(body) == {"error", "error_type"} and body["error"], body
    return body["error"]


def openai_error(r) -> str:
    e = r.json()["error"]
    assert set(e) >= {"message", "type", "param", "code"} and e["message"]
    return e["message"]


def st_quantize(vectors, precision, **kw):
    from sentence_transformers.util.quantization import quantize_embeddings

    return quantize_embeddings(np.asarray(vectors, dtype=np.float32), precision, **kw)


# ---- truncation (issue #24 item 4) ---------------------------------------------------------------------
def test_over_long_input_is_truncated_by_default(client, local):
    bge = local["bge"]
    right, left = bge.encode_corpus([LONG]), bge.encode_corpus([LONG], truncation_side="left")
    assert not close(right, left, 1e-3)  # the two ends of LONG give different vectors
    r = client.post("/v1/embeddings", json={"model": "bge", "input": [LONG]})
    assert r.status_code == 200 and close([d["embedding"] for d in r.json()["data"]], right)
    assert close(client.post("/embed", json={"model": "bge", "inputs": LONG}).json(), right)
    assert close(client.post("/embed", json={"model": "bge", "inputs": LONG, "truncation_direction": "Left"}).json(),
                 left)
    r = client.post("/v1/embeddings", json={"model": "bge", "input": LONG, "truncation_direction": "left"})
    assert close([r.json()["data"][0]["embedding"]], left)
    r = client.post("/embed", json={"model": "bge", "inputs": LONG, "truncate": False})
    assert r.status_code == 413 and "truncate=true" in tei_error(r)


def test_start_keeps_the_tail(client, local, tiny_bge):
    """Cohere's START against the HF tokenizer truncated on the left (its ids run through the model) and
    against the in-process runtime; END against the right end."""
    from transformers import AutoTokenizer

    bge = local["bge"]
    hf_ids = AutoTokenizer.from_pretrained(tiny_bge, truncation_side="left")(
        [LONG], truncation=True, max_length=bge.max_length)["input_ids"]
    from_tokenizer = bge.encode_ids(hf_ids)
    r = client.post("/v2/embed", json={"model": "bge", "texts": [LONG], "truncate": "START"})
    got = r.json()["embeddings"]["float"]
    assert close(got, from_tokenizer) and close(got, bge.encode_corpus([LONG], truncation_side="left"))
    r = client.post("/v2/embed", json={"model": "bge", "texts": [LONG], "truncate": "END"})
    assert close(r.json()["embeddings"]["float"], bge.encode_corpus([LONG]))
    r = client.post("/v2/embed", json={"model": "bge", "texts": [LONG], "truncate": "NONE"})
    assert r.status_code == 413 and "END" in cohere_error(r)


def test_truncation_side_on_every_family(client, local):
    m3 = local["m3"]
    r = client.post("/m3/encode", json={"model": "m3", "input": [LONG], "truncation_direction": "Left"}).json()
    want = m3.encode_corpus([LONG], max_length=m3.max_length, truncation_side="left", return_sparse=True,
                            return_colbert_vecs=True)
    assert close([d["dense"] for d in r["data"]], want["dense_vecs"])
    assert close(r["data"][0]["colbert"], want["colbert_vecs"][0])
    pairs = [(QUERY, LONG), (QUERY, DOCS[1])]
    r = client.post("/rerank", json={"model": "cross", "query": QUERY, "texts": [LONG, DOCS[1]], "raw_scores": True,
                                     "truncation_direction": "Left"}).json()
    want = local["cross"].compute_score(pairs, truncation_side="left")
    assert close([g["score"] for g in sorted(r, key=lambda g: g["index"])], want)
    assert abs(want[0] - local["cross"].compute_score(pairs)[0]) > 1e-4  # the passage's end scores differently
    r = client.post("/v1/rerank", json={"model": "cross", "query": QUERY, "documents": [LONG], "truncate": "START"})
    assert abs(r.json()["results"][0]["relevance_score"] - 1 / (1 + np.exp(-want[0]))) <= 1e-6
    for path, body, error in (("/rerank", {"texts": [LONG], "truncation_direction": "Left"}, tei_error),
                              ("/v2/rerank", {"documents": [LONG], "truncate": "START"}, cohere_error)):
        r = client.post(path, json={"model": "gemma", "query": QUERY, **body})
        assert r.status_code == 400 and "passage marker" in error(r)


def test_no_auto_truncate_refuses_with_413_and_the_request_wins(strict, local):
    bge, cross = local["bge"], local["cross"]
    with httpx.Client(base_url=strict.url, timeout=60) as c:
        r = c.post("/v1/embeddings", json={"model": "bge", "input": [LONG]})
        assert r.status_code == 413 and "truncate" in openai_error(r)
        assert c.post("/embed", json={"model": "bge", "inputs": LONG}).status_code == 413
        r = c.post("/v2/embed", json={"model": "bge", "texts": [LONG]})
        assert r.status_code == 413 and cohere_error(r)
        r = c.post("/v1/rerank", json={"model": "cross", "query": QUERY, "documents": [LONG]})
        assert r.status_code == 413 and cohere_error(r)
        assert c.post("/rerank", json={"model": "cross", "query": QUERY, "texts": [LONG]}).status_code == 413
        # short inputs pass; a request's own truncate wins over the flag
        assert close(c.post("/embed", json={"model": "bge", "inputs": "short"}).json(), bge.encode_corpus(["short"]))
        assert close(c.post("/embed", json={"model": "bge", "inputs": LONG, "truncate": True}).json(),
                     bge.encode_corpus([LONG]))
        r = c.post("/v2/embed", json={"model": "bge", "texts": [LONG], "truncate": "START"})
        assert close(r.json()["embeddings"]["float"], bge.encode_corpus([LONG], truncation_side="left"))
        r = c.post("/rerank", json={"model": "cross", "query": QUERY, "texts": [LONG], "raw_scores": True,
                                    "truncate": True}).json()
        assert abs(r[0]["score"] - cross.compute_score([(QUERY, LONG)])[0]) <= 1e-6
        assert c.get("/info").json()["auto_truncate"] is False


# ---- BGE-M3 as a reranker ---------------------------------------------------------------------------
@pytest.mark.parametrize("weights", [None, [0.4, 0.2, 0.4]])
def test_m3_rerank_every_mode_equals_compute_score(client, local, weights):
    pairs = [(QUERY, d) for d in DOCS]
    want = local["m3"].compute_score(pairs, **({"weights_for_different_modes": weights} if weights else {}))
    extra = {"weights": weights} if weights else {}
    for mode in MODES + (None,):
        ref = np.asarray(want[mode or "colbert+sparse+dense"], np.float64)
        sel = {"mode": mode} if mode else {}
        got = client.post("/rerank", json={"model": "m3", "query": QUERY, "texts": DOCS, **sel, **extra}).json()
        assert [g["score"] for g in got] == sorted((g["score"] for g in got), reverse=True)
        assert close([g["score"] for g in sorted(got, key=lambda g: g["index"])], ref), mode
        for path in ("/v1/rerank", "/v2/rerank"):
            r = client.post(path, json={"model": "m3", "query": QUERY, "documents": DOCS, "top_n": 3, **sel, **extra})
            res = r.json()["results"]
            assert [x["index"] for x in res] == np.argsort(-ref, kind="stable")[:3].tolist(), (path, mode)
            assert close([x["relevance_score"] for x in res], ref[[x["index"] for x in res]])


def test_m3_rerank_refuses_a_mode_the_artifact_lacks(client):
    r = client.post("/rerank", json={"model": "m3dense", "query": QUERY, "texts": DOCS})
    assert r.status_code == 400 and "modes dense" in tei_error(r) and "colbert+sparse+dense" in tei_error(r)
    r = client.post("/v2/rerank", json={"model": "m3dense", "query": QUERY, "documents": DOCS, "mode": "sparse"})
    assert r.status_code == 400 and "modes dense" in cohere_error(r)
    r = client.post("/rerank", json={"model": "m3dense", "query": QUERY, "texts": DOCS, "mode": "dense"})
    assert r.status_code == 200


# ---- Cohere v2 ---------------------------------------------------------------------------------------
def test_v2_embed_every_type_against_quantize_embeddings(client, local, arts):
    texts = DOCS + [QUERY]
    ranges = np.asarray(json.load(open(os.path.join(arts["bge"], "manifest.json")))["int8_ranges"]["32"], np.float32)
    r = client.post("/v2/embed", json={"model": "bge", "texts": texts, "input_type": "search_document",
                                       "embedding_types": ["float", *TYPES, "base64"]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"id", "embeddings", "texts", "meta"} and body["texts"] == texts
    assert body["meta"]["billed_units"]["input_tokens"] == sum(len(s) for s in local["bge"].tokenizer.encode(texts, 512))
    emb = body["embeddings"]
    assert set(emb) == {"float", *TYPES, "base64"}
    floats = np.asarray(emb["float"], np.float32)
    assert close(floats, local["bge"].encode_corpus(texts))
    for t in TYPES:
        want = st_quantize(floats, t, ranges=ranges if t.endswith("int8") else None)
        assert np.array_equal(np.asarray(emb[t]), want.astype(np.int64)), t
    assert np.asarray(emb["binary"]).shape == (len(texts), 32 // 8)
    decoded = np.stack([np.frombuffer(base64.b64decode(b), dtype="<f4") for b in emb["base64"]])
    assert np.array_equal(decoded, floats)
    q = client.post("/v2/embed", json={"model": "bge", "texts": [QUERY], "input_type": "search_query"}).json()
    assert set(q["embeddings"]) == {"float"} and close(q["embeddings"]["float"], local["bge"].encode_queries([QUERY]))
    m3 = client.post("/v2/embed", json={"model": "m3", "texts": texts, "embedding_types": ["float"]}).json()
    want = local["m3"].encode_corpus(texts, max_length=local["m3"].max_length)["dense_vecs"]
    assert close(m3["embeddings"]["float"], want)


def test_export_calibrates_int8_ranges(arts, local):
    """The manifest's int8 ranges are the min and max of the calibration set's vectors (documents and queries)."""
    from bgert.export.precision import Settings, text_sets

    texts, _ = text_sets(Settings(), "embedder")
    bge = local["bge"]
    vecs = np.concatenate([bge.encode_corpus(texts), bge.encode_queries(texts)])
    got = np.asarray(json.load(open(os.path.join(arts["bge"], "manifest.json")))["int8_ranges"]["32"])
    assert close(got, np.stack([vecs.min(0), vecs.max(0)]))


def test_int8_calibration_flag(strict, local):
    bge = local["bge"]
    calib = np.concatenate([bge.encode_corpus(strict.calibration), bge.encode_queries(strict.calibration)])
    with httpx.Client(base_url=strict.url, timeout=60) as c:
        r = c.post("/v2/embed", json={"model": "bge", "texts": DOCS, "embedding_types": ["float", "uint8"]}).json()
    want = st_quantize(r["embeddings"]["float"], "uint8", calibration_embeddings=calib).astype(np.int64)
    diff = np.abs(np.asarray(r["embeddings"]["uint8"]) - want)
    assert diff.max() <= 1 and (diff == 0).mean() > 0.95  # ranges from the server's own run of the same texts


def test_v2_rerank_top_n_and_order(client, local):
    raw = np.asarray(local["cross"].compute_score([(QUERY, d) for d in DOCS]), np.float64)
    norm = 1 / (1 + np.exp(-raw))
    for top_n in (1, 3, None):
        body = {"model": "cross", "query": QUERY, "documents": DOCS, "return_documents": True}
        r = client.post("/v2/rerank", json=body | ({"top_n": top_n} if top_n else {})).json()
        res = r["results"]
        assert [x["index"] for x in res] == np.argsort(-norm, kind="stable")[:top_n or len(DOCS)].tolist()
        assert all(abs(x["relevance_score"] - norm[x["index"]]) <= 1e-6 and x["document"]["text"] == DOCS[x["index"]]
                   for x in res)
        assert r["meta"]["api_version"]["version"] == "2" and r["id"]
    r = client.post("/v2/rerank", json={"model": "cross", "query": QUERY, "documents": [{"text": d} for d in DOCS],
                                        "max_tokens_per_doc": 4096}).json()
    assert "document" not in r["results"][0] and len(r["results"]) == len(DOCS)


# ---- output types and Matryoshka on the OpenAI route ---------------------------------------------------
def test_openai_embedding_types_and_base64(client, arts):
    ranges = np.asarray(json.load(open(os.path.join(arts["bge"], "manifest.json")))["int8_ranges"]["32"], np.float32)
    floats = np.asarray([d["embedding"] for d in client.post("/v1/embeddings", json={
        "model": "bge", "input": DOCS}).json()["data"]], np.float32)
    for t in TYPES:
        want = st_quantize(floats, t, ranges=ranges if t.endswith("int8") else None)
        r = client.post("/v1/embeddings", json={"model": "bge", "input": DOCS, "embedding_type": t}).json()
        assert np.array_equal(np.asarray([d["embedding"] for d in r["data"]]), want.astype(np.int64)), t
        r = client.post("/v1/embeddings", json={"model": "bge", "input": DOCS, "embedding_type": t,
                                                "encoding_format": "base64"}).json()
        got = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype=want.dtype) for d in r["data"]])
        assert np.array_equal(got, want), t


def test_matryoshka_dimensions(client, local, arts):
    full = local["mat"].encode_corpus(DOCS)
    for d in (16, 8):
        cut = full[:, :d] / np.linalg.norm(full[:, :d], axis=1, keepdims=True)
        r = client.post("/v1/embeddings", json={"model": "mat", "input": DOCS, "dimensions": d}).json()
        assert close([x["embedding"] for x in r["data"]], cut)
        ranges = np.asarray(json.load(open(os.path.join(arts["mat"], "manifest.json")))["int8_ranges"][str(d)],
                            np.float32)
        r = client.post("/v2/embed", json={"model": "mat", "texts": DOCS, "output_dimension": d,
                                           "embedding_types": ["float", "int8"]}).json()["embeddings"]
        assert close(r["float"], cut)
        assert np.array_equal(np.asarray(r["int8"]), st_quantize(r["float"], "int8", ranges=ranges).astype(np.int64))
    r = client.post("/v1/embeddings", json={"model": "mat", "input": "x", "dimensions": 12})
    assert r.status_code == 400 and "16, 8" in openai_error(r)
    r = client.post("/v1/embeddings", json={"model": "bge", "input": "x", "dimensions": 16})
    assert r.status_code == 400 and "not trained for shortened embeddings (Matryoshka)" in openai_error(r)
    assert client.post("/v1/embeddings", json={"model": "bge", "input": "x", "dimensions": 32}).status_code == 200


# ---- OpenTelemetry ---------------------------------------------------------------------------------------
def test_otlp_spans_of_a_request(strict, collector):
    with httpx.Client(base_url=strict.url, timeout=60) as c:
        assert c.get("/health").status_code == 200
        r = c.post("/v1/embeddings", json={"model": "bge", "input": DOCS[:3]})
        assert c.post("/v1/embeddings", json={"model": "bge", "input": LONG}).status_code == 413
    assert r.status_code == 200
    tokens = r.json()["usage"]["prompt_tokens"]
    service, root = collector.wait_for("POST /v1/embeddings", 200)
    _, refused = collector.wait_for("POST /v1/embeddings", 413)  # refused spans name their model too
    assert {a.key: a.value.string_value for a in refused.attributes}["bgert.model"] == "bge"
    assert service == "bgert-test"
    attrs = {a.key: a.value for a in root.attributes}
    assert attrs["bgert.model"].string_value == "bge" and attrs["bgert.token_count"].int_value == tokens
    assert attrs["bgert.batch_size"].int_value >= 3 and attrs["http.response.status_code"].int_value == 200
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with collector.lock:
            children = {s.name: s for _, s in collector.spans
                        if s.trace_id == root.trace_id and s.parent_span_id == root.span_id}
        if len(children) == 3:
            break
        time.sleep(0.1)
    assert set(children) == {"tokenize", "queue_wait", "inference"}, set(children)
    t, q, i = children["tokenize"], children["queue_wait"], children["inference"]
    assert root.start_time_unix_nano <= t.start_time_unix_nano <= t.end_time_unix_nano <= q.end_time_unix_nano
    assert q.end_time_unix_nano <= i.end_time_unix_nano <= root.end_time_unix_nano
    inf = {a.key: a.value for a in i.attributes}
    assert inf["bgert.batch_size"].int_value >= 3 and inf["bgert.batch_tokens"].int_value >= tokens
    assert {a.key: a.value for a in t.attributes}["bgert.token_count"].int_value == tokens
    with collector.lock:
        assert not [s for _, s in collector.spans if s.name.endswith("/health")]  # probes are not traced


# ---- readiness --------------------------------------------------------------------------------------------
def test_health_is_503_until_loaded_and_warmed_up(tiny_bge_art, monkeypatch):
    """A slow load and a slow warm-up, simulated: /health answers 503 through both, /info says when
    the model became ready, and requests before then get 503."""
    import uvicorn

    from bgert.server import app as server_app

    loading, warming = threading.Event(), threading.Event()
    real_load, real_warm_up = server_app.load, server_app.warm_up
    monkeypatch.setattr(server_app, "load", lambda path, **kw: loading.wait(60) and real_load(path, **kw))
    monkeypatch.setattr(server_app, "warm_up", lambda s: warming.wait(60) and real_warm_up(s))
    state = server_app.ServerState([server_app.Served("bge", tiny_bge_art)], server_app.ServerOptions())
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(server_app.create_app(state), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="off"))
    serving = threading.Thread(target=server.run, daemon=True)
    serving.start()
    loader = threading.Thread(target=state.load_all, daemon=True)
    loader.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)

        def not_ready() -> None:
            r = httpx.get(url + "/health", timeout=10)
            assert r.status_code == 503 and "still loading" in tei_error(r)
            info = httpx.get(url + "/info", timeout=10).json()
            assert info["ready"] is False and info["models"][0]["ready_at"] is None
            r = httpx.post(url + "/embed", json={"inputs": "x"}, timeout=10)
            assert r.status_code == 503 and tei_error(r)

        not_ready()
        loading.set()
        deadline = time.monotonic() + 60
        while state.served[0].model is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert state.served[0].model is not None
        not_ready()  # loaded, not warmed up: still not ready
        released = time.time()
        warming.set()
        deadline = time.monotonic() + 60
        while httpx.get(url + "/health", timeout=10).status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert httpx.get(url + "/health", timeout=10).status_code == 200
        assert state.served[0].model.queue.stats()["calls"] >= 1  # the warm-up batch ran
        model = httpx.get(url + "/info", timeout=10).json()["models"][0]
        ready_at = dt.datetime.fromisoformat(model["ready_at"]).timestamp()
        assert model["ready"] and released - 0.01 <= ready_at <= time.time() and model["load_seconds"] > 0
    finally:
        loading.set()
        warming.set()
        server.should_exit = True
        serving.join(30)
        loader.join(30)
        state.close()


# ---- bad input on every new route: a 4xx in the route's API shape, never a 500 ------------------------------
BAD = [
    ("/v2/embed", {"model": "bge", "texts": []}, 400, "cohere"),
    ("/v2/embed", {"model": "bge", "texts": "one string"}, 400, "cohere"),
    ("/v2/embed", {"model": "bge"}, 400, "cohere"),
    ("/v2/embed", {"model": "bge", "texts": ["a", 3]}, 400, "cohere"),
    ("/v2/embed", {"model": "bge", "texts": ["a"], "embedding_types": ["int4"]}, 400, "cohere"),
    ("/v2/embed", {"model": "bge", "texts": ["a"], "embedding_types": []}, 400, "cohere"),
    ("/v2/embed", {"model": "bge", "texts": ["a"], "input_type": "image"}, 400, "cohere"),
    ("/v2/embed", {"model": "bge", "images": ["data:image/png;base64,AAAA"]}, 400, "cohere"),
    ("/v2/embed", {"model": "bge", "texts": ["a"], "truncate": "MIDDLE"}, 400, "cohere"),
    ("/v2/embed", {"model": "bge", "texts": ["a"], "output_dimension": 16}, 400, "cohere"),
    ("/v2/embed", {"model": "mat", "texts": ["a"], "output_dimension": 12}, 400, "cohere"),
    ("/v2/embed", {"model": "mat", "texts": ["a"], "output_dimension": 64}, 400, "cohere"),
    ("/v2/embed", {"model": "bge", "texts": ["a"], "max_tokens": 0}, 400, "cohere"),
    ("/v2/embed", {"model": "nocal", "texts": ["a"], "embedding_types": ["int8"]}, 400, "cohere"),
    ("/v2/embed", {"model": "nope", "texts": ["a"]}, 404, "cohere"),
    ("/v2/embed", {"model": "cross", "texts": ["a"]}, 400, "cohere"),
    ("/v2/embed", {"model": "bge", "texts": ["a"] * 600}, 413, "cohere"),
    ("/v2/rerank", {"model": "cross", "query": "q", "documents": []}, 400, "cohere"),
    ("/v2/rerank", {"model": "cross", "documents": ["a"]}, 400, "cohere"),
    ("/v2/rerank", {"model": "cross", "query": "q", "documents": ["a"], "top_n": 0}, 400, "cohere"),
    ("/v2/rerank", {"model": "cross", "query": "q", "documents": ["a"], "mode": "dense"}, 400, "cohere"),
    ("/v2/rerank", {"model": "cross", "query": "q", "documents": ["a"], "max_tokens_per_doc": 10}, 400, "cohere"),
    ("/v2/rerank", {"model": "cross", "query": "q", "documents": ["a"], "truncate": "both"}, 400, "cohere"),
    ("/v2/rerank", {"model": "bge", "query": "q", "documents": ["a"]}, 400, "cohere"),
    ("/v2/rerank", {"model": "m3", "query": "q", "documents": ["a"], "mode": "lexical"}, 400, "cohere"),
    ("/v2/rerank", {"model": "m3", "query": "q", "documents": ["a"], "weights": [1, 1]}, 400, "cohere"),
    ("/v2/rerank", {"model": "m3", "query": "q", "documents": ["a"], "weights": [0, 0, 0]}, 400, "cohere"),
    ("/v2/rerank", {"model": "m3", "query": "q", "documents": ["a"], "cutoff_layers": 2}, 400, "cohere"),
    ("/v1/rerank", {"model": "m3dense", "query": "q", "documents": ["a"], "mode": "colbert"}, 400, "cohere"),
    ("/v1/rerank", {"model": "cross", "query": "q", "documents": ["a"], "weights": [1, 1, 1]}, 400, "cohere"),
    ("/rerank", {"model": "m3", "query": "q", "texts": ["a"], "prompt": "p"}, 400, "tei"),
    ("/rerank", {"model": "m3", "query": "q", "texts": ["a"], "mode": "lexical"}, 422, "tei"),
    ("/rerank", {"model": "m3", "query": "q", "texts": ["a"], "mode": "sparse+dense", "weights": [1, 0, 5]}, 200,
     None),
    ("/rerank", {"model": "m3", "query": "q", "texts": ["a"], "mode": "sparse+dense", "weights": [0, 0, 5]}, 400,
     "tei"),
    ("/embed", {"model": "bge", "inputs": "x", "truncate": "yes please"}, 422, "tei"),
    ("/m3/encode", {"model": "m3", "input": "x", "truncation_direction": "Up"}, 422, "tei"),
    ("/v1/embeddings", {"model": "bge", "input": "x", "embedding_type": "int4"}, 400, "openai"),
    ("/v1/embeddings", {"model": "bge", "input": "x", "dimensions": 0}, 400, "openai"),
    ("/v1/embeddings", {"model": "nocal", "input": "x", "embedding_type": "uint8"}, 400, "openai"),
    ("/v1/embeddings", {"model": "mat", "input": "x", "dimensions": 64}, 400, "openai"),
]


@pytest.mark.parametrize("path,body,status,shape", BAD, ids=[f"{p}-{i}" for i, (p, *_) in enumerate(BAD)])
def test_bad_input_on_new_routes(client, path, body, status, shape):
    r = client.post(path, json=body)
    assert r.status_code == status, (r.status_code, r.text)
    if shape is not None:
        {"cohere": cohere_error, "tei": tei_error, "openai": openai_error}[shape](r)


@pytest.mark.parametrize("path", ["/v2/embed", "/v2/rerank"])
def test_malformed_json_on_v2(client, path):
    r = client.post(path, content=b'{"texts": [1, ', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "malformed JSON" in cohere_error(r)


def test_server_still_answers(client, local):
    r = client.post("/v2/embed", json={"model": "bge", "texts": ["still alive"]})
    assert r.status_code == 200 and close(r.json()["embeddings"]["float"], local["bge"].encode_corpus(["still alive"]))


def test_tracing_off_imports_no_sdk(tiny_bge_art):
    """Without an endpoint, tracing is off and neither the OpenTelemetry SDK nor its exporter is imported."""
    import subprocess
    import sys

    code = ("import sys; from bgert.server import app as A; "
            f"s = A.ServerState([A.Served('bge', {tiny_bge_art!r})], A.ServerOptions()); A.create_app(s); "
            "print(s.tracing, sorted(m for m in sys.modules if m.startswith(('opentelemetry.sdk', "
            "'opentelemetry.exporter'))))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.split() == ["None", "[]"], out.stdout + out.stderr
