"""bge-reranker-v2.5-gemma2-lightweight: the runtime on a stored tiny exported artifact against
LightWeightFlagLLMReranker's stored scores.

FlagEmbedding's lightweight reranker runs only under transformers <= 4.47 and exports only there,
so CI (transformers 4.57) cannot rebuild the artifact or rerun the reference. Both were made once
by tests/data/make_lightweight_reference.py in the env of benchmarks/envs/make_lightweight_env.sh
(versions in the JSON); this test checks every stored case with the CI runtime.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from bgert.runtime import LightweightReranker, load

DATA = os.path.join(os.path.dirname(__file__), "data")
ART = os.path.join(DATA, "lightweight_artifact")
TOL = 1e-4


@pytest.fixture(scope="module")
def reference() -> dict:
    with open(os.path.join(DATA, "lightweight_reference.json"), encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def model() -> LightweightReranker:
    return load(ART)


def test_stored_reference_parity(model, reference):
    assert type(model) is LightweightReranker
    pairs = [tuple(p) for p in reference["pairs"]]
    worst = 0.0
    for case in reference["cases"]:
        ref = case["scores"]
        got = model.compute_score(pairs, **case["kwargs"])
        assert np.shape(got) == np.shape(ref), case["kwargs"]
        flat = got if isinstance(got[0], float) else [x for row in got for x in row]
        assert all(type(x) is float for x in flat)
        diff = float(np.abs(np.asarray(ref, np.float64) - np.asarray(got, np.float64)).max())
        worst = max(worst, diff)
        assert diff < TOL, (case["kwargs"], diff)
    print(f"lightweight: {len(reference['cases'])} cases, max |diff| vs LightWeightFlagLLMReranker = {worst:.2e}")


def test_softcap_and_compression_matter(model, reference):
    pairs = [tuple(p) for p in reference["pairs"]]
    plain = np.asarray(model.compute_score(pairs, cutoff_layers=3))
    compressed = np.asarray(model.compute_score(pairs, cutoff_layers=[3], compress_ratio=2, compress_layers=[1, 2]))
    assert np.abs(plain - compressed).max() > 1e-3
    assert np.abs(plain).max() < 30 and np.abs(compressed).max() < 30


def test_equivalent_spellings_and_invariance(model, reference):
    pairs = [tuple(p) for p in reference["pairs"]]
    kw = {"cutoff_layers": [3], "compress_ratio": 2, "compress_layers": [1, 2]}
    base = np.asarray(model.compute_score(pairs, **kw))
    # compress layers >= the cutoff are never reached, layer 0 is skipped: same graph
    assert np.array_equal(base, model.compute_score(pairs, cutoff_layers=3, compress_ratio=2,
                                                    compress_layers=[0, 2, 1, 3, 9]))
    assert np.abs(base - np.asarray(model.compute_score(pairs, batch_size=1, **kw))).max() < 1e-5
    rev = np.asarray(model.compute_score(pairs[::-1], batch_size=3, **kw))
    assert np.abs(base - rev[::-1]).max() < 1e-5
    # ratio 1 switches compression off whatever the layers
    assert np.array_equal(model.compute_score(pairs, cutoff_layers=[4], compress_layers=[1, 2]),
                          model.compute_score(pairs))


def test_not_exported_combination(model):
    with pytest.raises(ValueError, match="was not exported; this artifact has"):
        model.compute_score([("q", "p")], cutoff_layers=[3], compress_ratio=4, compress_layers=[2])
    with pytest.raises(ValueError, match="outside"):
        model.compute_score([("q", "p")], cutoff_layers=[1])
    assert model.compute_score([]) == []
    assert model.compute_score([], cutoff_layers=[2, 4]) == [[], []]


def test_the_tokenizer_keeps_its_padding_side(model):
    """Right padding (what the reference forces) is the model's, passed per call: the tokenizer is not changed."""
    assert model.padding_side == "right"
    assert model.tokenizer.padding_side == model.manifest.tokenizer_info["padding_side"] == "left"


def test_misspelt_keyword_arguments_are_refused(model):
    with pytest.raises(TypeError, match=r"unknown keyword argument\(s\) compress_ration; it takes .*compress_ratio"):
        model.compute_score([("q", "p")], compress_ration=2)
