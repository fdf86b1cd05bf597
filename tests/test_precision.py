"""Precision variants (fp16, int8, int8-vnni, int8-static): built, gated, measured, chosen.

Quality is checked here independently of what the exporter recorded: the variant's vectors are
compared with the fp32 graph's through the runtime, and the int8 graphs must really be integer graphs.
"""
from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest

import tiny_models
from bgert.export import ExportError, export
from bgert.export import precision as prec
from bgert.runtime import Embedder, load

ALL = ["fp16", "int8", "int8-static"]
FAST = {"calibration_size": 8, "quality_size": 4}  # held-out: 4 documents + 25 queries + parity texts
TEXTS = ["what is a panda?", "", "The giant panda is a bear species endemic to China. " * 8,
         "北京是中华人民共和国的首都。", "BM25 ranks documents by term frequency."]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("precision"))


@pytest.fixture(scope="module")
def bge_ckpt(root) -> str:
    return tiny_models.build_bge(os.path.join(root, "ckpt"))


@pytest.fixture(scope="module")
def bge_all(bge_ckpt, root) -> str:
    return export(bge_ckpt, os.path.join(root, "bge-all"), progress=False, precisions=ALL, **FAST)


@pytest.fixture(scope="module")
def minilm_int8(minilm_dir, root) -> str:
    return export(minilm_dir, os.path.join(root, "minilm"), progress=False, precisions=["int8"], **FAST)


def manifest(art: str) -> dict:
    with open(os.path.join(art, "manifest.json"), encoding="utf-8") as f:
        return json.load(f)


def cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_every_variant_written_with_its_gate(bge_all):
    graphs = {g["precision"]: g for g in manifest(bge_all)["graphs"]}
    assert set(graphs) == {"fp32", "fp16", "int8", "int8-vnni", "int8-static"}
    for p, g in graphs.items():
        assert g["gate_passed"] is True, (p, g["quality"])
        assert os.path.isfile(os.path.join(bge_all, g["file"]))
        if p != "fp32":
            q = g["quality"]
            assert q["gate"] == prec.Settings().gate(p)
            assert q["cos_mean"] >= q["gate"]["cos_mean"] and q["cos_min"] >= q["gate"]["cos_min"]
    for p in ("int8", "int8-static"):  # measured as run here and as exact integer arithmetic (VNNI)
        assert {"vs_fp32", "vs_fp32_exact_int8", "vs_torch"} <= set(graphs[p]["quality"])
    assert graphs["int8-vnni"]["requires_cpu_flags"] and "vs_fp32_exact_int8" in graphs["int8-vnni"]["quality"]
    assert graphs["int8"]["recipe"]["weights"].endswith("(reduce_range)")


def test_graphs_are_what_they_claim(bge_all):
    ops = lambda f: {n.op_type for n in onnx.load(os.path.join(bge_all, f)).graph.node}  # noqa: E731
    assert {"MatMulInteger", "QAttention"} & ops("model.int8.onnx")
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops("model.int8-static.onnx")
    fp16 = onnx.load(os.path.join(bge_all, "model.fp16.onnx"))
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in fp16.graph.initializer)
    assert fp16.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert fp16.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # fp32 I/O


@pytest.mark.parametrize("precision,mean,low", [("fp16", 0.9999, 0.999), ("int8", 0.99, 0.97),
                                                ("int8-vnni", 0.99, 0.97), ("int8-static", 0.99, 0.97)])
def test_variant_quality_against_flagembedding(bge_ckpt, bge_all, precision, mean, low):
    from FlagEmbedding import FlagModel

    ref = FlagModel(bge_ckpt, use_fp16=False, devices="cpu").encode(TEXTS)
    got = Embedder(bge_all, precision=precision).encode(TEXTS)
    c = cos(ref, got)
    assert c.mean() >= mean and c.min() >= low, c
    if precision != "fp16":
        assert c.min() < 0.999999, "int8 output identical to fp32: nothing was quantized"


def test_default_precision_by_cpu(bge_all, monkeypatch):
    monkeypatch.setenv("BGERT_INT8_DOT", "saturating")  # AVX2 without VNNI: int8 no faster than fp32, unmeasured
    assert Embedder(bge_all).precision == "fp32"
    monkeypatch.setenv("BGERT_INT8_DOT", "exact")  # VNNI / AMX / ARM: full-range weights
    m = Embedder(bge_all)
    assert m.precision == "int8-vnni" and m.graph().file == "model.int8-vnni.onnx"


def test_precision_argument_selects(bge_all):
    for p in ("fp32", "fp16", "int8-static"):
        m = load(bge_all, precision=p)
        assert m.precision == p and m.graph().file == ("model.onnx" if p == "fp32" else f"model.{p}.onnx")
    with pytest.raises(ValueError, match="not in this artifact"):
        Embedder(bge_all, precision="int4")


def test_vnni_graph_asked_for_on_a_saturating_cpu_warns(bge_all, monkeypatch, caplog):
    monkeypatch.setenv("BGERT_INT8_DOT", "saturating")
    with caplog.at_level("WARNING", logger="bgert"):
        assert Embedder(bge_all, precision="int8-vnni").precision == "int8-vnni"
    assert "VNNI" in caplog.text


def test_missed_gate_fails_export_and_leaves_nothing(tiny_bge, root):
    out = os.path.join(root, "failed")
    with pytest.raises(ExportError, match=r"int8 \(model.int8.onnx\): cos_mean .* < 1.01"):
        export(tiny_bge, out, progress=False, precisions=["int8"], gates={"int8": {"cos_mean": 1.01}},
               int8_isa_variant=False, **FAST)
    assert not os.path.exists(out)


def test_keep_failed_marks_and_never_chooses(tiny_bge, root, monkeypatch):
    monkeypatch.setenv("BGERT_INT8_DOT", "saturating")
    out = export(tiny_bge, os.path.join(root, "kept"), progress=False, precisions=["int8"], keep_failed=True,
                 gates={"int8": {"cos_min": 1.01}}, **FAST)
    graphs = {g["precision"]: g for g in manifest(out)["graphs"]}
    assert graphs["int8"]["gate_passed"] is False and graphs["int8-vnni"]["gate_passed"] is False
    assert Embedder(out).precision == "fp32"
    from bgert.cli.info_cmd import describe

    assert "FAILED GATE" in describe(out)


def test_bad_options(tiny_bge, root):
    with pytest.raises(ExportError, match="unknown precision"):
        export(tiny_bge, os.path.join(root, "bad1"), progress=False, precisions=["int4"])
    with pytest.raises(ExportError, match="int8_fp32_nodes must be 'auto' or >= 0"):
        export(tiny_bge, os.path.join(root, "bad3"), progress=False, precisions=["int8"], int8_fp32_nodes=-1)
    with pytest.raises(ExportError, match="calibration_percentile"):
        export(tiny_bge, os.path.join(root, "bad4"), progress=False, precisions=["int8-static"],
               calibration_percentile=101)
    with pytest.raises(ExportError, match="calibration file"):
        export(tiny_bge, os.path.join(root, "bad2"), progress=False, precisions=["int8"], calibration="/nope.txt")


def test_calibration_file_from_the_cli(tiny_bge, root, tmp_path):
    import subprocess
    import sys

    cal = tmp_path / "cal.txt"
    cal.write_text("\n".join(TEXTS * 2), encoding="utf-8")
    out = os.path.join(root, "cal")
    r = subprocess.run([sys.executable, "-m", "bgert.cli", "export", tiny_bge, "--out", out, "-q",
                        "--precision", "fp32,int8-static", "--calibration", str(cal), "--calibration-method",
                        "percentile", "--int8-fp32-nodes", "2"], capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    assert "int8-static" in r.stdout and "[ok]" in r.stdout
    g = [g for g in manifest(out)["graphs"] if g["precision"] == "int8-static"][0]
    assert g["gate_passed"] and g["recipe"]["calibration_method"] == "percentile"
    assert len(g["recipe"]["fp32_nodes"]) == 2
    queries = len(prec._bundled(prec.BUNDLED_QUERIES)) // 2  # the other half is held out
    assert g["recipe"]["calibration_texts"] == len(prec.SHORT_CALIBRATION) + 8 + queries  # 8 non-empty lines


def test_no_smoothing_mul_before_an_fp32_matmul(minilm_int8):
    """A smoothing scale is worth its run-time Mul only before a quantized node: activations whose every user
    stays fp32 are not smoothed (MiniLM int8: 6 of 23 smoothing Muls fed fp32 MatMuls only)."""
    for f in ("model.int8.onnx", "model.int8-vnni.onnx"):
        g = onnx.load(os.path.join(minilm_int8, f)).graph
        users: dict[str, list[str]] = {}
        for n in g.node:
            for i in n.input:
                users.setdefault(i, []).append(n.op_type)
        smooth = [n for n in g.node if n.op_type == "Mul" and n.name.endswith("_bgert_smooth")]
        assert smooth, f"{f}: no smoothing at all"
        assert all(set(users[n.output[0]]) != {"MatMul"} for n in smooth), f


def test_int8_keeps_the_fewest_fp32_nodes_the_calibration_text_allows(minilm_int8):
    """int8_fp32_nodes='auto': rungs of FP32_NODE_LADDER, fewest fp32 MatMuls first, until the calibration text's
    quality clears the gate with a margin (each fp32 MatMul is a fp32 GEMM inside the int8 graph)."""
    graphs = {g["precision"]: g for g in manifest(minilm_int8)["graphs"]}
    n_targets = 24  # MiniLM-L6: 6 layers × (QKV Attention, attention output, FFN in, FFN out)
    for p in ("int8", "int8-vnni"):
        recipe = graphs[p]["recipe"]
        search, kept = recipe["fp32_node_search"], len(recipe["fp32_nodes"])
        assert kept <= round(0.25 * n_targets) and search[0]["fp32_nodes"] == 0
        margin = prec._with_margin(prec.Settings().gate(p))
        for rung in search[:-1]:  # the rungs passed over missed the margin
            assert prec.gate_failures(rung, margin), (p, rung)
        if search[-1]["fp32_nodes"] == kept and kept < round(0.25 * n_targets):
            assert not prec.gate_failures(search[-1], margin), (p, search[-1])
    assert len(graphs["int8-vnni"]["recipe"]["fp32_nodes"]) <= len(graphs["int8"]["recipe"]["fp32_nodes"])


def test_graphs_run_without_skip_layer_norm_on_cpu(minilm_int8, tmp_path):
    """The exported graphs hold Add + LayerNormalization instead of SkipLayerNormalization (slower in ORT's CPU
    kernel), and the runtime's CPU sessions do not fuse it back; attention stays fused."""
    import onnxruntime as ort

    for p, f in (("fp32", "model.onnx"), ("int8", "model.int8.onnx"), ("int8-vnni", "model.int8-vnni.onnx")):
        ops = {n.op_type for n in onnx.load(os.path.join(minilm_int8, f)).graph.node}
        assert "LayerNormalization" in ops and "SkipLayerNormalization" not in ops, f
        assert ops & {"Attention", "QAttention"}, f
        so = ort.SessionOptions()
        so.optimized_model_filepath = str(tmp_path / f"optimized-{p}.onnx")
        Embedder(minilm_int8, precision=p, sess_options=so).encode(["a panda"])
        ran = {n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node}
        assert "LayerNormalization" in ran and "SkipLayerNormalization" not in ran, f
    fused = manifest(minilm_int8)["graphs"][0]["fused_ops"]
    assert fused["LayerNormalization (from SkipLayerNormalization)"] == 12 and "SkipLayerNormalization" not in fused


def test_minilm_int8_holds_its_gates(minilm_int8):
    """The real all-MiniLM-L6-v2: int8 variants hold their gates on this CPU and in exact integer arithmetic."""
    graphs = {g["precision"]: g for g in manifest(minilm_int8)["graphs"]}
    for p in ("int8", "int8-vnni"):
        assert graphs[p]["gate_passed"], graphs[p]["quality"]
        assert graphs[p]["quality"]["cos_mean"] >= 0.99
    from bgert.benchmarks.samples import sample_texts

    docs, queries = sample_texts(12)
    texts = docs[-6:] + queries[:6]
    ref = Embedder(minilm_int8, precision="fp32").encode(texts)
    c = cos(ref, Embedder(minilm_int8, precision="int8").encode(texts))
    assert c.mean() >= 0.99 and c.min() >= 0.97, c


def test_compare_handles_every_output_shape():
    rng = np.random.default_rng(0)
    ref = {"dense": [rng.normal(size=(3, 8))], "tokens": [rng.normal(size=(2, 5, 4)), rng.normal(size=(1, 7, 4))],
           "weights": [np.abs(rng.normal(size=(2, 5))), np.abs(rng.normal(size=(1, 9)))]}
    got = {k: [c + 1e-3 for c in v] for k, v in ref.items()}
    out = prec.compare(ref, got, {"dense": "vectors", "tokens": "token_vectors", "weights": "lexical_weights"})
    assert out["tokens"]["n"] == 17 and out["weights"]["n"] == 3
    assert all(0.99 < out[k]["cos_min"] <= 1.0 for k in ref)
    s = prec.compare({"score": [np.arange(6.0)[:, None]]}, {"score": [np.arange(6.0)[::-1, None]]}, {"score": "scores"})
    assert s["score"]["spearman"] == pytest.approx(-1.0)
    assert prec.gate_failures(prec.summarize({"a": s}), {"spearman": 0.98})


def test_precision_profile_benchmark(bge_all, tmp_path):
    """benchmarks/precision_profile on the tiny artifact: GEMMs in every precision, every variant profiled."""
    from bgert.benchmarks import precision_profile

    assert precision_profile.main(["--artifact", bge_all, "--tokens", "64", "--rounds", "1", "--texts", "4",
                                   "--threads", "1", "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "precision_profile.json").read_text())
    assert {g["precision"] for g in r["gemm"]} == set(precision_profile.GEMM_KINDS)
    assert all(g["gflops"] > 0 for g in r["gemm"])
    variants = {v["precision"]: v for v in r["variants"]}
    assert {"fp32", "fp16", "int8", "int8-static"} <= set(variants)
    assert abs(sum(variants["int8"]["op_share_documents"].values()) - 1) < 1e-6
    assert "DynamicQuantizeMatMul" in variants["int8"]["op_share_documents"] or \
        "MatMulInteger" in variants["int8"]["op_share_documents"]
    assert "| int8 |" in (tmp_path / "precision_profile.md").read_text()
