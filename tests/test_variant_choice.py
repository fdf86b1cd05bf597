"""Which variant a machine gets: the fixed order with faked CPU flags (AVX2, VNNI, AMX), the measured choice
(bgert tune's cache) over it, bf16 only where its gate was measured, and the bf16 entry of an export."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import bgert.runtime.base as base
from bgert.runtime import load
from bgert.runtime.base import BF16_FLAGS, default_precision
from bgert.runtime.manifest import Manifest
from bgert.runtime.autotune import explain
from bgert.runtime.tuning import cache_path, fastest

AVX2 = {"sse4_2", "avx2", "fma"}
VNNI = AVX2 | {"avx512f", "avx512_vnni"}
AMX = VNNI | {"amx_int8", "amx_bf16", "avx512_bf16"}


def manifest(bf16_passed: bool = True) -> Manifest:
    graphs = [{"file": "model.onnx", "precision": "fp32"},
              {"file": "model.int8.onnx", "precision": "int8"},
              {"file": "model.int8-vnni.onnx", "precision": "int8-vnni",
               "requires_cpu_flags": ["avx512_vnni", "avx_vnni", "amx_int8"]},
              {"file": "model.onnx", "precision": "bf16", "backend": "openvino",
               "requires_cpu_flags": list(BF16_FLAGS), "gate_passed": bf16_passed}]
    return Manifest(root="/nonexistent", raw={"kind": "embedder", "max_length": 512, "graphs": graphs, "files": {}})


@pytest.fixture
def flags(monkeypatch):
    monkeypatch.delenv("BGERT_INT8_DOT", raising=False)

    def fake(names: set[str]) -> None:
        monkeypatch.setattr(base, "cpu_flags", lambda: frozenset(names))
    return fake


def tuning(*rows: tuple[str, str, float]) -> dict:
    return {"machine": "test", "measured_at": "now",
            "variants": [{"backend": b, "precision": p, "score": s, "documents_per_s": s, "queries_per_s": s}
                         for b, p, s in rows]}


def test_fixed_order_by_cpu_flags(flags):
    m = manifest()
    flags(AVX2)
    assert default_precision(m, False) == "fp32"  # int8 does not beat fp32 without int8 dot products; int8-vnni saturates
    assert default_precision(manifest(), False, tuning=tuning(("ort", "int8", 2.0), ("ort", "fp32", 1.0))) == "int8"
    assert default_precision(m, False, "openvino") == "fp32"  # bf16 is not offered without bf16 flags
    flags(VNNI)
    assert default_precision(m, False) == "int8-vnni"
    assert default_precision(m, False, "openvino") == "fp32"
    flags(AMX)
    assert default_precision(m, False, "openvino") == "bf16"
    assert default_precision(m, False, "ort") == "int8-vnni"  # bf16 is never an ORT graph
    assert default_precision(manifest(bf16_passed=False), False, "openvino") == "fp32"  # gate not measured
    assert default_precision(m, True) == "fp32"  # GPU order, no bf16 there


def test_measured_choice_beats_the_order(flags):
    m = manifest()
    flags(VNNI)  # the order says int8-vnni; the measurement on this CPU says int8 is faster
    t = tuning(("ort", "int8-vnni", 90.0), ("ort", "int8", 100.0), ("ort", "fp32", 60.0), ("openvino", "fp32", 80.0))
    assert default_precision(m, False, "ort", t) == "int8"
    assert default_precision(m, False, "openvino", t) == "fp32"
    assert fastest(t, None, ["fp32", "int8", "int8-vnni"])["precision"] == "int8"
    flags(AVX2)  # a measurement of a variant that does not run well here is never taken
    t = tuning(("ort", "int8-vnni", 500.0), ("ort", "fp32", 60.0))
    assert default_precision(m, False, "ort", t) == "fp32"
    flags(AMX)  # bf16 measured fastest, but its gate failed: not taken
    t = tuning(("openvino", "bf16", 500.0), ("openvino", "fp32", 60.0))
    assert default_precision(manifest(bf16_passed=False), False, "openvino", t) == "fp32"
    assert default_precision(m, False, "openvino", t) == "bf16"


def write_tuning(art: str, rows: list[tuple[str, str, float]], threads=None) -> None:
    path = cache_path(art, threads)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(tuning(*rows), f)


def test_auto_backend_follows_the_measurement(tiny_bge_art, tmp_path, monkeypatch):
    pytest.importorskip("openvino")
    monkeypatch.setenv("BGERT_CACHE_DIR", str(tmp_path))
    assert load(tiny_bge_art, backend="auto").backend_name == "ort"  # nothing measured: ORT
    assert "nothing measured" in explain(tiny_bge_art)
    write_tuning(tiny_bge_art, [("ort", "fp32", 50.0), ("openvino", "fp32", 70.0)])
    model = load(tiny_bge_art, backend="auto")
    assert (model.backend_name, model.precision) == ("openvino", "fp32")
    assert "openvino fp32: the fastest gated variant measured" in explain(tiny_bge_art)
    write_tuning(tiny_bge_art, [("ort", "fp32", 90.0), ("openvino", "fp32", 70.0)])
    assert load(tiny_bge_art, backend="auto").backend_name == "ort"
    assert load(tiny_bge_art, backend="auto", intra_op_num_threads=1).backend_name == "ort"  # other key: default


def test_tune_command_measures_and_info_says_why(tiny_bge_art, tmp_path):
    pytest.importorskip("openvino")
    env = {**os.environ, "BGERT_CACHE_DIR": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "bgert.cli", "tune", tiny_bge_art, "--rounds", "1", "--threads", "1",
                        "--json"], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    got = {(v["backend"], v["precision"]) for v in result["variants"]}
    assert got == {("ort", "fp32"), ("openvino", "fp32")}
    assert all(v["documents_per_s"] > 0 and v["queries_per_s"] > 0 for v in result["variants"])
    assert result["choice"] in [{"backend": b, "precision": p} for b, p in got]
    assert os.path.isfile(result["cache"]) and result["cache"].startswith(str(tmp_path))
    info = subprocess.run([sys.executable, "-m", "bgert.cli", "info", tiny_bge_art], capture_output=True, text=True,
                          timeout=120, env=env)
    assert "this machine gets: ort fp32: nothing measured" in info.stdout  # tuned for 1 thread, info asks default


@pytest.fixture(scope="module")
def bf16_art(tiny_bge, tmp_path_factory) -> str:
    from bgert.export import export

    return export(tiny_bge, str(tmp_path_factory.mktemp("bf16") / "bge"), progress=False, precisions=["bf16"])


def test_bf16_entry_reads_the_fp32_graph_with_openvino(bf16_art):
    entry = next(g for g in load(bf16_art).manifest.graphs if g.precision == "bf16")
    assert entry.file == "model.onnx" and entry.extra["backend"] == "openvino"
    assert entry.extra["requires_cpu_flags"] == list(BF16_FLAGS)
    with pytest.raises(ValueError, match="backend='openvino'"):
        load(bf16_art, backend="ort", precision="bf16")
    assert load(bf16_art).precision == "fp32"
    pytest.importorskip("openvino")
    assert load(bf16_art, precision="bf16").backend_name == "openvino"  # only OpenVINO runs it: no need to say so


@pytest.mark.skipif(bool(set(BF16_FLAGS) & base.cpu_flags()), reason="this CPU runs bf16: its gate is measured")
def test_bf16_not_measured_here_is_never_a_default(bf16_art):
    entry = next(g for g in load(bf16_art).manifest.graphs if g.precision == "bf16")
    assert entry.gate_passed is False and entry.quality["measured"] is False
    assert "amx_bf16" in entry.quality["reason"]
    pytest.importorskip("openvino")
    assert load(bf16_art, backend="openvino").precision == "fp32"
    assert "bf16 is not offered here" in explain(bf16_art)


@pytest.mark.skipif(not set(BF16_FLAGS) & base.cpu_flags(), reason="needs a CPU with amx_bf16 or avx512_bf16 "
                                                                     "(this one has neither): bf16 gate not measured")
def test_bf16_gate_measured_where_the_cpu_has_it(bf16_art, tiny_bge):
    from FlagEmbedding import FlagModel

    entry = next(g for g in load(bf16_art).manifest.graphs if g.precision == "bf16")
    assert entry.gate_passed and entry.quality["cos_mean"] >= 0.9999 and entry.quality["cos_min"] >= 0.999
    model = load(bf16_art, backend="openvino")
    assert model.precision == "bf16"
    texts = ["what is panda?", "The giant panda is a bear species endemic to China."]
    ref = FlagModel(tiny_bge, use_fp16=False, devices="cpu").encode(texts)
    got = model.encode(texts)
    assert float(((ref * got).sum(-1) / np.linalg.norm(ref, axis=-1) / np.linalg.norm(got, axis=-1)).min()) >= 0.999


# ---------------------------------------------------------------- the first default load measures
@pytest.fixture
def measuring(monkeypatch, tmp_path):
    """First-load measurement on (conftest turns it off), short, into a fresh cache."""
    monkeypatch.setenv("BGERT_TUNE", "auto")
    monkeypatch.setenv("BGERT_TUNE_SECONDS", "0.2")
    monkeypatch.setenv("BGERT_CACHE_DIR", str(tmp_path / "cache"))
    import bgert.runtime.tuning as tuning

    monkeypatch.setattr(tuning, "_IN_PROCESS", {})
    calls = []
    real = tuning.measure

    def counted(*a, **kw):
        calls.append(a[1])
        return real(*a, **kw)

    monkeypatch.setattr(tuning, "measure", counted)
    return calls


def test_first_default_load_measures_once_and_caches(tiny_bge_art, measuring):
    model = load(tiny_bge_art)
    assert len(measuring) == 1 and ("ort", "fp32") in measuring[0]
    assert model.chosen_by.startswith("measured here (first load")
    result = json.load(open(cache_path(tiny_bge_art, None), encoding="utf-8"))
    best = fastest(result, None, ["fp32"])
    assert (model.backend_name, model.precision) == (best["backend"], best["precision"])
    assert all(v["documents_per_s"] > 0 and v["queries_per_s"] > 0 for v in result["variants"])
    assert "chosen_by='measured here" in repr(model) and "first load" in explain(tiny_bge_art)
    load(tiny_bge_art)
    load(tiny_bge_art, backend="ort")
    assert len(measuring) == 1  # cached: measured once per artifact and machine
    assert load(tiny_bge_art, precision="fp32").chosen_by == "asked"
    assert len(measuring) == 1


def test_first_load_measurement_without_a_writable_cache(tiny_bge_art, measuring, monkeypatch, tmp_path, caplog):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("BGERT_CACHE_DIR", str(blocker))
    with caplog.at_level("WARNING", logger="bgert"):
        model = load(tiny_bge_art)
    assert model.chosen_by.startswith("measured here") and model.encode(["a"]).shape[0] == 1
    assert "cannot write the variant measurement" in caplog.text
    load(tiny_bge_art)
    assert len(measuring) == 1  # kept for the process


def test_first_load_measurement_is_bounded(tiny_bge_art, measuring, monkeypatch):
    import time

    monkeypatch.setenv("BGERT_TUNE_BUDGET", "0.3")  # less than a variant's process takes to start
    t0 = time.monotonic()
    model = load(tiny_bge_art)
    assert time.monotonic() - t0 < 20
    assert (model.backend_name, model.precision) == ("ort", "fp32") and model.chosen_by.startswith("fixed order")
    result = json.load(open(cache_path(tiny_bge_art, None), encoding="utf-8"))
    assert all("budget" in v["error"] for v in result["variants"])


def test_variant_env_overrides_and_bad_values_say_what_they_take(tiny_bge_art, measuring, monkeypatch):
    monkeypatch.setenv("BGERT_VARIANT", "ort:fp32")
    model = load(tiny_bge_art)
    assert (model.backend_name, model.precision, model.chosen_by) == ("ort", "fp32", "BGERT_VARIANT")
    assert not measuring
    monkeypatch.setenv("BGERT_VARIANT", "int8")
    with pytest.raises(ValueError, match="precision 'int8' is not in this artifact"):
        load(tiny_bge_art)
    monkeypatch.setenv("BGERT_VARIANT", "tensorflow:fp32")
    with pytest.raises(ValueError, match="BGERT_VARIANT.*ort, openvino"):
        load(tiny_bge_art)
    monkeypatch.delenv("BGERT_VARIANT")
    monkeypatch.setenv("BGERT_TUNE", "sometimes")
    with pytest.raises(ValueError, match="BGERT_TUNE must be 'auto' or 'off'"):
        load(tiny_bge_art)
