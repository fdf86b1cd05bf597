"""The bench and eval code paths: FLOP counts, exact search, BEIR loading, ir-measures metrics on a
tiny BEIR folder whose values can be derived by hand, and `bgert bench` / `bgert eval` end to end
on tiny models (timings are never asserted)."""
from __future__ import annotations

import gzip
import json
import math
import os

import numpy as np
import pytest

import tiny_models
from bgert.benchmarks.bench import flops_model, sequence_flops
from bgert.benchmarks.bench_families import EmbedderBench, RerankerBench
from bgert.benchmarks.eval import exact_search, load_beir, score_run
from bgert.benchmarks.machine import command_line, machine_info
from bgert.cli import main
from bgert.export import export

DOCS = [
    "The giant panda is a bear species endemic to China.",
    "BM25 is a bag-of-words retrieval function that ranks a set of documents.",
    "Moscow is the capital of Russia.",
    "Protein folding is the physical process by which a protein chain acquires its native structure.",
] + [f"Filler document number {i} about topic {i * 7 % 13} and nothing else in particular." for i in range(16)]


def test_flops_of_a_bert_layer_stack_by_hand():
    cfg = {"model_type": "bert", "hidden_size": 384, "intermediate_size": 1536, "num_attention_heads": 12}
    fm = flops_model(cfg, layers=6)
    assert fm["linear_macs_per_token_per_layer"] == 4 * 384 ** 2 + 2 * 384 * 1536 and not fm["gated_mlp"]
    # 2 FLOPs per MAC x 6 layers x (10 tokens x linear + QK^T and PV: 2 x 10^2 x 384)
    assert sequence_flops(fm, np.array([10]))[0] == 2 * 6 * (10 * 1769472 + 2 * 100 * 384)


def test_flops_of_a_gated_gqa_decoder_by_hand():
    cfg = {"model_type": "gemma", "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
           "num_key_value_heads": 1, "head_dim": 16}
    fm = flops_model(cfg, layers=2)
    # q 32x32, k and v 32x16 each, o 32x32, gate/up/down 3 x 32x64
    assert fm["linear_macs_per_token_per_layer"] == 1024 + 2 * 512 + 1024 + 3 * 2048 and fm["gated_mlp"]
    assert sequence_flops(fm, np.array([4]))[0] == 2 * 2 * (4 * 9216 + 2 * 16 * 32)


def _family(cls, gate: dict) -> object:
    from types import SimpleNamespace

    from bgert.runtime.manifest import Manifest

    graphs = [{"file": "model.onnx", "precision": "fp32"},
              {"file": "model.int8.onnx", "precision": "int8", "quality": {"cos_min": 0.98, "gate": gate}}]
    return cls(SimpleNamespace(manifest=Manifest("/nowhere", {"kind": "embedder", "graphs": graphs})))


def test_gates_follow_the_gate_the_export_recorded():
    fam = _family(EmbedderBench, {"cos_mean": 0.99, "cos_min": 0.97, "spearman": 0.98})
    ok = {"dense": {"cos_mean": 0.999999, "cos_min": 0.99999}}
    fp32 = fam.gate(ok, "fp32", {})
    assert [(g["metric"], g["threshold"], g["passed"]) for g in fp32] == [("cos_min", 0.99999, True)]
    got = fam.gate({"dense": {"cos_mean": 0.985, "cos_min": 0.98}}, "int8", {})
    assert {g["metric"]: (g["threshold"], g["passed"]) for g in got} == {"cos_min": (0.97, True),
                                                                          "cos_mean": (0.99, False)}
    assert fam.gate({"dense": {"cos_mean": 0.995, "cos_min": 0.98}}, "int8", {"int8": 0.985})[0]["passed"] is False
    rr = _family(RerankerBench, {"spearman": 0.995})
    assert rr.gate({"score": {"spearman": 0.99, "max_abs_diff": 0.5}}, "int8", {}) == [
        {"output": "score", "metric": "spearman", "value": 0.99, "op": ">=", "threshold": 0.995, "passed": False}]
    assert rr.gate({"score": {"spearman": 1.0, "max_abs_diff": 2e-3}}, "fp32", {})[0]["passed"] is False


def test_exact_search_orders_by_cosine():
    docs = np.array([[1, 0], [0, 1], [1, 1], [-1, 0]], dtype=np.float32)
    queries = np.array([[1, 0.1], [-0.1, -1]], dtype=np.float32)
    idx, scores = exact_search(queries, docs, top_k=3)
    assert idx.tolist() == [[0, 2, 1], [3, 0, 2]]
    assert scores[0, 0] == pytest.approx(1 / math.sqrt(1.01), abs=1e-6)
    assert np.all(np.diff(scores, axis=1) <= 0)


def write_beir(root, queries: dict[str, str], qrels: list[tuple[str, str]], gz: bool = False) -> str:
    """A BEIR folder with DOCS as d0..d19 (title empty for odd ids)."""
    os.makedirs(root / "qrels", exist_ok=True)
    lines = [json.dumps({"_id": f"d{i}", "title": "" if i % 2 else f"Doc {i}", "text": t}) for i, t in enumerate(DOCS)]
    data = "\n".join(lines) + "\n"
    if gz:
        with gzip.open(root / "corpus.jsonl.gz", "wt", encoding="utf-8") as f:
            f.write(data)
    else:
        (root / "corpus.jsonl").write_text(data, encoding="utf-8")
    (root / "queries.jsonl").write_text("".join(json.dumps({"_id": k, "text": v}) + "\n" for k, v in queries.items()),
                                        encoding="utf-8")
    rows = "".join(f"{q}\t{d}\t1\n" for q, d in qrels)
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + rows, encoding="utf-8")
    return str(root)


def doc_text(i: int) -> str:
    return (("" if i % 2 else f"Doc {i}") + " " + DOCS[i]).strip()


@pytest.fixture(scope="module")
def beir_dir(tmp_path_factory) -> str:
    """Each query is the exact text of its relevant document, so it ranks first (cosine 1); q3 also
    has a relevant document that is not in the corpus. By hand: nDCG@10 = (3 + 1/(1 + 1/log2 3)) / 4,
    R@100 = (3 + 1/2) / 4, RR@10 = 1. q9 has no qrels and is not evaluated."""
    queries = {f"q{i}": doc_text(i) for i in range(4)}
    queries["q9"] = "a query without judgements"
    qrels = [(f"q{i}", f"d{i}") for i in range(4)] + [("q3", "d-missing")]
    return write_beir(tmp_path_factory.mktemp("beir"), queries, qrels, gz=True)


EXPECTED = {"nDCG@10": (3 + 1 / (1 + 1 / math.log2(3))) / 4, "R@100": 3.5 / 4, "RR@10": 1.0}


def test_load_beir_reads_gzip_and_keeps_judged_queries(beir_dir):
    data = load_beir(beir_dir)
    assert len(data.docs) == 20 and data.query_ids == ["q0", "q1", "q2", "q3"]
    assert data.docs[0] == "Doc 0 " + DOCS[0] and data.docs[1] == DOCS[1]  # (title + " " + text).strip()
    assert data.qrels["q3"] == {"d3": 1, "d-missing": 1}


def test_score_run_matches_hand_values(beir_dir):
    data = load_beir(beir_dir)
    run = {q: {f"d{i}": 1.0, "d19": 0.5} for i, q in enumerate(data.query_ids)}
    got = score_run(data.qrels, run)
    assert got == pytest.approx(EXPECTED, abs=1e-9)
    # a relevant document at rank 2 instead of 1: RR 1/2 and DCG 1/log2(3) for that query
    run["q0"] = {"d19": 1.0, "d0": 0.5}
    assert score_run(data.qrels, run)["RR@10"] == pytest.approx(3.5 / 4)


def test_bundled_scifact_is_complete():
    data = load_beir("scifact")
    assert (len(data.docs), len(data.queries), sum(len(v) for v in data.qrels.values())) == (5183, 300, 339)


def test_bad_beir_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="qrels/test.tsv"):
        load_beir(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="neither a directory nor a bundled dataset"):
        load_beir("nosuchdataset")


@pytest.fixture(scope="module")
def cross_art(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("bench_cross")
    return export(tiny_models.build_cross_encoder(str(root / "ckpt")), str(root / "art"), progress=False)


def test_eval_cli_on_tiny_beir_with_reranker(tiny_mean_art, cross_art, beir_dir, tmp_path):
    rc = main(["eval", tiny_mean_art, "--beir", beir_dir, "--reranker", cross_art, "--top-k", "20",
               "--out", str(tmp_path), "-q"])
    assert rc == 0
    (js,) = tmp_path.glob("eval_*.json")
    result = json.loads(js.read_text())
    assert result["embedder"]["metrics"] == pytest.approx(EXPECTED, abs=1e-6)
    rr = result["reranker"]
    assert rr["pairs"] == 4 * 20 and rr["top_k"] == 20
    # the reranker reorders the same 20 candidates: recall at 100 cannot change
    assert rr["metrics"]["R@100"] == pytest.approx(EXPECTED["R@100"])
    assert "nDCG@10" in js.with_suffix(".md").read_text()


def test_bench_cli_writes_report_and_plots(tiny_mean_art, tmp_path):
    rc = main(["bench", tiny_mean_art, "--texts", "2", "--batch-sizes", "1,2", "--repeats", "1",
               "--latency-calls", "3", "--no-memory", "--out", str(tmp_path)])
    assert rc == 0
    stem = tmp_path / "bench_tiny-mean"
    result = json.loads(stem.with_suffix(".json").read_text())
    assert result["reference"]["library"] == "sentence-transformers"
    assert [v["name"] for v in result["variants"]] == ["PyTorch fp32", "bgert ort fp32"]
    assert len(result["throughput"]) == 3 * 2 * 2  # sets x batch sizes x variants
    assert all(r["texts_per_s"] > 0 and 0 < r["roofline"] for r in result["throughput"])
    assert {s: result["inputs"][s]["n"] for s in ("short", "mixed", "long")} == {"short": 8, "mixed": 2, "long": 1}
    assert result["inputs"]["long"]["mean_tokens"] == result["max_length"]  # truncated at max length
    assert set(result["latency"]) == {"PyTorch fp32", "bgert ort fp32"} and not result["memory"]
    assert result["roofline"]["gemm_peak"]["gflops"] > 0 and not result["failures"]
    for suffix in (".md", "_throughput.png", "_speed_quality.png"):
        assert os.path.getsize(f"{stem}{suffix}") > 0
    print(f"\nbench tiny-mean: wall {result['wall_s']}s, timings {result['timings_s']}")


def test_bench_a_reranker_with_memory_probes(cross_art, tmp_path):
    """Pairs in, scores out: the reranker family through every pass (pairs travel to the probes as JSON)."""
    rc = main(["bench", cross_art, "--texts", "1", "--batch-sizes", "2", "--repeats", "1", "--latency-calls", "2",
               "--out", str(tmp_path)])
    assert rc == 0
    result = json.loads((tmp_path / "bench_art.json").read_text())
    assert result["kind"] == "reranker" and result["reference"]["class"].startswith("FlagEmbedding FlagReranker")
    assert result["gates"]["bgert ort fp32"][0]["metric"] == "max_abs_diff"
    assert all(r["tokens_per_s"] > 0 for r in result["throughput"]) and len(result["throughput"]) == 3 * 2
    mem = result["memory"]
    assert mem["PyTorch fp32"]["after_imports_mb"] > mem["bgert ort fp32"]["after_imports_mb"] > 0  # no torch in ours
    assert all(m["peak_rss_mb"] >= m["after_imports_mb"] for m in mem.values()), mem


def test_bench_cli_fails_when_a_gate_is_missed(tiny_mean_art, tmp_path, capsys):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(DOCS), encoding="utf-8")
    rc = main(["bench", tiny_mean_art, "--quick", "--data", str(texts), "--texts", "1", "--batch-sizes", "1",
               "--latency-calls", "0", "--gate", "fp32=1.5", "--out", str(tmp_path)])
    assert rc == 1 and "parity gate missed" in capsys.readouterr().err
    result = json.loads((tmp_path / "bench_tiny-mean.json").read_text())
    assert "first 12 words" in result["inputs"]["short"]["source"] and result["failures"]


def test_bench_cli_rejects_a_missing_precision(tiny_mean_art, tmp_path, capsys):
    assert main(["bench", tiny_mean_art, "--precision", "int4", "--quick", "--out", str(tmp_path)]) == 1
    assert "int4" in capsys.readouterr().err


def test_machine_info_and_command_line():
    info = machine_info()
    assert info["cpu"]["usable_cores"] >= 1 and "numpy" in info["versions"]
    assert command_line(["/usr/bin/bgert", "bench", "a dir"]) == "bgert bench 'a dir'"


def test_lightweight_artifact_is_refused_with_the_reason(capsys, tmp_path):
    art = os.path.join(os.path.dirname(__file__), "data", "lightweight_artifact")
    if not os.path.isdir(art):
        pytest.skip("no stored lightweight artifact")
    assert main(["bench", art, "--quick", "--out", str(tmp_path)]) == 1
    assert "transformers <= 4.47" in capsys.readouterr().err
