"""The parity gate CI runs: every family's tiny model and the bundled real all-MiniLM-L6-v2,
through the bench engine's ``parity()`` against the PyTorch reference (FlagEmbedding 1.4.2 or
sentence-transformers, fp32 CPU). A missed gate fails the test; timings are printed, never asserted."""
from __future__ import annotations

import os
import time

import pytest

import tiny_models
from bgert.benchmarks.bench import BenchError, parity
from bgert.export import export

SIZES = {"short": 8, "mixed": 4, "long": 2}


@pytest.fixture(scope="module")
def gate_root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("gate"))


def _export(builder, root: str, **options) -> str:
    ckpt = builder(os.path.join(root, "ckpt"))
    return export(ckpt, os.path.join(root, "art", os.path.basename(ckpt)), progress=False, **options)


@pytest.fixture(scope="module")
def m3_art(gate_root) -> str:
    return _export(tiny_models.build_m3, gate_root)


@pytest.fixture(scope="module")
def cross_art(gate_root) -> str:
    return _export(tiny_models.build_cross_encoder, gate_root)


@pytest.fixture(scope="module")
def gemma_art(gate_root) -> str:
    return _export(tiny_models.build_gemma_reranker, gate_root)


@pytest.fixture(scope="module")
def layerwise_art(gate_root) -> str:
    return _export(tiny_models.build_minicpm_layerwise, gate_root, cutoff_layers=[2, 3, 4])


@pytest.fixture(scope="module")
def gemma2_emb_art(gate_root) -> str:
    return _export(tiny_models.build_gemma2_embedder, gate_root)


@pytest.fixture(scope="module")
def icl_art(gate_root) -> str:
    return _export(tiny_models.build_mistral_embedder, gate_root)


def run_gate(artifact: str, **kw) -> dict:
    t = time.perf_counter()
    result = parity(artifact, sizes=SIZES, threads=2, **kw)
    outputs = {out: {k: f"{v:.3g}" for k, v in s.items() if k in ("cos_min", "max_abs_diff", "spearman")}
               for v in result["parity"].values() for out, s in v["all"].items()}
    print(f"\nparity gate {result['model']} ({result['kind']}, reference {result['reference']['class']}): "
          f"{time.perf_counter() - t:.1f}s {outputs}")
    return result


# (fixture, expected reference class, expected outputs)
CASES = [
    ("tiny_bge_art", "FlagModel", {"dense"}),
    ("tiny_mean_art", "SentenceTransformer", {"dense"}),
    ("minilm_art", "SentenceTransformer", {"dense"}),
    ("gemma2_emb_art", "FlagLLMModel", {"dense"}),
    ("icl_art", "FlagICLModel", {"dense"}),
    ("m3_art", "BGEM3FlagModel", {"dense", "sparse", "colbert"}),
    ("cross_art", "FlagReranker", {"score"}),
    ("gemma_art", "FlagLLMReranker", {"score"}),
    ("layerwise_art", "LayerWiseFlagLLMReranker", {"score@layer2", "score@layer3", "score@layer4"}),
]


@pytest.mark.parametrize("fixture,ref_class,outputs", CASES, ids=[c[0] for c in CASES])
def test_parity_gate(request, fixture, ref_class, outputs):
    result = run_gate(request.getfixturevalue(fixture))
    assert not result["failures"], result["failures"]
    assert ref_class in result["reference"]["class"]
    gates = result["gates"]["bgert ort fp32"]
    assert {g["output"] for g in gates} == outputs and all(g["passed"] for g in gates)
    per_set = result["parity"]["bgert ort fp32"]
    assert set(per_set) == {"edge", "short", "mixed", "long", "all"}
    n = sum(result["inputs"][s]["n"] for s in ("edge", "short", "mixed", "long"))
    first = sorted(outputs)[0]
    assert result["parity"]["bgert ort fp32"]["all"][first]["n"] >= n  # colbert counts token rows


def test_gate_fails_against_the_wrong_reference(tiny_bge_art, tiny_mean):
    """The gate can fail: the tiny BGE artifact compared with another checkpoint's weights."""
    result = run_gate(tiny_bge_art, reference="flagembedding", reference_model=tiny_mean)
    assert result["failures"] and "cos_min" in result["failures"][0]


def test_missing_reference_checkpoint_is_a_clear_error(tiny_bge_art, tmp_path):
    with pytest.raises(BenchError, match="--reference-model"):
        parity(tiny_bge_art, reference_model=str(tmp_path / "nowhere"), sizes=SIZES)
