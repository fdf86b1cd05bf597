"""The optimised-graph cache of CPU sessions (bgert.runtime.session_cache): sessions load a mapped copy
keyed by everything that decides it, give the reference's vectors from it, and fall back to the
artifact's own graph whenever a copy is missing, damaged, not writable or not safe to key."""
from __future__ import annotations

import json
import os
import threading

import numpy as np
import onnxruntime as ort
import pytest

from bgert.runtime import Embedder
from bgert.runtime import session_cache

TEXTS = ["what is panda?", "The giant panda is a bear species endemic to China.", "北京", "panda " * 900]


@pytest.fixture(scope="module")
def reference(tiny_bge):
    from FlagEmbedding import FlagModel

    return FlagModel(tiny_bge, use_fp16=False, devices="cpu").encode(TEXTS)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> str:
    monkeypatch.setenv("BGERT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("BGERT_SESSION_CACHE", raising=False)
    return os.path.join(str(tmp_path / "cache"), "ort")


def entries(root: str) -> list[str]:
    return sorted(e for e in os.listdir(root) if not e.startswith(".")) if os.path.isdir(root) else []


def loaded_from(model: Embedder) -> str:
    return model.backend_for(model.graph()).session._model_path


def cos_min(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(((a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))).min())


def test_sessions_load_the_cached_copy_and_match_the_reference(tiny_bge_art, cache, reference):
    first = Embedder(tiny_bge_art)
    assert cos_min(first.encode(TEXTS), reference) >= 0.99999
    [entry] = entries(cache)
    assert loaded_from(first) == os.path.join(cache, entry, "model.onnx")  # the first session loads the copy too
    meta = json.load(open(os.path.join(cache, entry, "meta.json")))
    assert meta["key"]["files"]["model.onnx"] == first.manifest.raw["files"]["model.onnx"]
    assert meta["key"]["onnxruntime"] == ort.__version__
    assert os.path.getsize(os.path.join(cache, entry, "model.onnx.data")) == meta["data_bytes"] > 0
    later = Embedder(tiny_bge_art)
    assert loaded_from(later) == loaded_from(first) and entries(cache) == [entry]
    assert cos_min(later.encode(TEXTS), reference) >= 0.99999


def test_another_optimisation_level_is_another_entry(tiny_bge_art, cache, reference):
    Embedder(tiny_bge_art).encode(TEXTS[:1])
    basic = Embedder(tiny_bge_art, graph_optimization_level="basic")
    assert cos_min(basic.encode(TEXTS), reference) >= 0.99999
    assert len(entries(cache)) == 2


def test_a_damaged_entry_is_rebuilt(tiny_bge_art, cache, reference):
    Embedder(tiny_bge_art).encode(TEXTS[:1])
    [entry] = entries(cache)
    data = os.path.join(cache, entry, "model.onnx.data")
    with open(data, "r+b") as f:
        f.truncate(os.path.getsize(data) // 2)  # e.g. a disk that filled up under a copy made elsewhere
    model = Embedder(tiny_bge_art)
    assert cos_min(model.encode(TEXTS), reference) >= 0.99999
    assert entries(cache) == [entry] and session_cache._complete(os.path.join(cache, entry),
                                                                 json.load(open(os.path.join(cache, entry, "meta.json")))["key"])


def test_an_unwritable_cache_falls_back_to_the_artifact(tiny_bge_art, tmp_path, monkeypatch, reference):
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file where the cache directory would be")
    monkeypatch.setenv("BGERT_CACHE_DIR", str(blocked))
    model = Embedder(tiny_bge_art)
    assert cos_min(model.encode(TEXTS), reference) >= 0.99999
    assert loaded_from(model) == os.path.join(tiny_bge_art, "model.onnx")


def test_the_cache_is_off_when_asked_or_with_the_callers_options(tiny_bge_art, cache, monkeypatch):
    Embedder(tiny_bge_art, session_cache=False).encode(TEXTS[:1])
    Embedder(tiny_bge_art, sess_options=ort.SessionOptions()).encode(TEXTS[:1])  # may hold graph-changing entries
    Embedder(tiny_bge_art, verify=False).encode(TEXTS[:1])  # the file may no longer be the one the key names
    monkeypatch.setenv("BGERT_SESSION_CACHE", "0")
    Embedder(tiny_bge_art).encode(TEXTS[:1])
    assert entries(cache) == []
    monkeypatch.delenv("BGERT_SESSION_CACHE")
    Embedder(tiny_bge_art, sess_options=ort.SessionOptions(), session_cache=True).encode(TEXTS[:1])
    assert len(entries(cache)) == 1


def test_sessions_made_at_once_share_one_whole_entry(tiny_bge_art, cache, reference):
    models = [Embedder(tiny_bge_art) for _ in range(3)]
    out: dict[int, np.ndarray] = {}
    threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, models[i].encode(TEXTS))) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(out) == [0, 1, 2] and all(cos_min(v, reference) >= 0.99999 for v in out.values())
    assert len(entries(cache)) == 1 and os.listdir(cache) == entries(cache)  # no temporary directory left


def test_a_copy_ort_cannot_load_is_recorded_and_the_artifact_loaded(tiny_bge_art, cache, reference, monkeypatch):
    """ORT can write an optimised copy it cannot read back (fp16 graphs with If nodes): the trial load
    when it is made fails, the entry records that, and every session loads the artifact's own graph."""
    real, trials = ort.InferenceSession, []

    def session(path, *args, **kwargs):
        if "/.tmp-" in str(path):
            trials.append(path)
            raise RuntimeError("[ONNXRuntimeError] : 10 : INVALID_GRAPH : simulated")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", session)
    for _ in range(2):
        model = Embedder(tiny_bge_art)
        assert cos_min(model.encode(TEXTS), reference) >= 0.99999
        assert loaded_from(model) == os.path.join(tiny_bge_art, "model.onnx")
    [entry] = entries(cache)
    assert len(trials) == 1 and os.listdir(os.path.join(cache, entry)) == ["meta.json"]
    assert "simulated" in json.load(open(os.path.join(cache, entry, "meta.json")))["unusable"]


def test_the_copy_is_made_without_the_optimizers_cpu_sessions_leave_out(tiny_bge_art, cache, reference):
    """CPU sessions run without SkipLayerNormFusion (ort_backend.CPU_DISABLED_OPTIMIZERS); the cached copy is
    optimised the same way (no SkipLayerNormalization in it) and the key says so."""
    import onnx

    from bgert.runtime.ort_backend import CPU_DISABLED_OPTIMIZERS

    model = Embedder(tiny_bge_art)
    assert cos_min(model.encode(TEXTS), reference) >= 0.99999
    [entry] = entries(cache)
    ops = {n.op_type for n in onnx.load(os.path.join(cache, entry, "model.onnx"), load_external_data=False).graph.node}
    assert "LayerNormalization" in ops and "SkipLayerNormalization" not in ops, ops
    meta = json.load(open(os.path.join(cache, entry, "meta.json")))
    assert meta["key"]["disabled_optimizers"] == sorted(CPU_DISABLED_OPTIMIZERS)
