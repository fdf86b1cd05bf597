"""Ray Data: the map_batches callable classes of bgert.integrations.ray and ``bgert encode --ray``, on one
local cluster (127.0.0.1, 2 CPUs) started by this module; results equal the in-process runtime's, and
an actor killed mid-run is restarted by Ray with every row in the output exactly once."""
from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

ray = pytest.importorskip("ray")

import tiny_models  # noqa: E402
from bgert.export import export  # noqa: E402
from bgert.integrations.ray import Embed, EmbedM3, Score  # noqa: E402
from bgert.runtime import Embedder, M3Embedder, Reranker  # noqa: E402
from test_windows import mixed_texts  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    ctx = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # loopback: see conftest.py
    assert ctx.address_info["node_ip_address"] == "127.0.0.1", ctx.address_info
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ctx
    ray.shutdown()


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return mixed_texts(60, seed=11, long_words=200)


def run(ds, cls, **kw):
    return ds.map_batches(cls, concurrency=2, batch_size=16, num_cpus=1, **kw).to_pandas()


def test_embedder_m3_and_reranker_actors_equal_in_process(cluster, tiny_bge_art, tmp_path_factory, texts):
    ds = ray.data.from_items([{"id": i, "text": t, "extra": i * 2} for i, t in enumerate(texts)])
    df = run(ds, Embed, fn_constructor_kwargs={"artifact": tiny_bge_art}).sort_values("id")
    assert list(df.columns) == ["id", "text", "extra", "vector"] and list(df["extra"]) == [2 * i for i in range(60)]
    assert np.abs(np.stack(df["vector"]) - Embedder(tiny_bge_art).encode(texts)).max() < 1e-6

    root = tmp_path_factory.mktemp("ray")
    m3 = export(tiny_models.build_m3(str(root / "ckpt")), str(root / "m3"), progress=False)
    df = run(ds, EmbedM3, fn_constructor_kwargs={"artifact": m3, "return_colbert_vecs": True},
             batch_format="pyarrow").sort_values("id")
    want = M3Embedder(m3).encode(texts, return_sparse=True, return_colbert_vecs=True)
    assert np.abs(np.stack(df["dense"]) - want["dense_vecs"]).max() < 1e-6
    for got, lex in zip(df["sparse"], want["lexical_weights"]):
        assert {str(k): w for k, w in got} == pytest.approx(dict(lex), rel=1e-5)
    for got, col in zip(df["colbert"], want["colbert_vecs"]):
        assert np.abs(np.stack(got) - col).max() < 1e-6

    rr = export(tiny_models.build_cross_encoder(str(root / "ckpt")), str(root / "rr"), progress=False)
    pairs = ray.data.from_items([{"id": i, "q": t[:40], "p": t} for i, t in enumerate(texts)])
    df = run(pairs, Score, fn_constructor_kwargs={"artifact": rr, "query_column": "q", "passage_column": "p"})
    df = df.sort_values("id")
    want = Reranker(rr).compute_score([(t[:40], t) for t in texts])
    assert np.abs(df["score"].to_numpy() - np.float32(want)).max() < 1e-6


def test_killed_actor_is_restarted_and_every_row_appears_once(cluster, tiny_bge_art, tmp_path, texts):
    marker = str(tmp_path / "crashed")

    class CrashOnce(Embed):
        """Dies (os._exit, like an OOM kill) in its third batch, once across all actors."""

        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.calls = 0

        def __call__(self, batch):
            self.calls += 1
            if self.calls == 3 and not os.path.exists(marker):
                open(marker, "w").close()
                os._exit(1)
            return super().__call__(batch)

    ds = ray.data.from_items([{"id": i, "text": t} for i, t in enumerate(texts)], override_num_blocks=12)
    df = ds.map_batches(CrashOnce, fn_constructor_kwargs={"artifact": tiny_bge_art}, concurrency=2, batch_size=5,
                        num_cpus=1, max_restarts=2, max_task_retries=2).to_pandas()
    assert os.path.exists(marker)  # it did die
    assert sorted(df["id"]) == list(range(len(texts)))  # every row exactly once
    df = df.sort_values("id")
    assert np.abs(np.stack(df["vector"]) - Embedder(tiny_bge_art).encode(texts)).max() < 1e-6


def test_cli_encodes_parquet_through_ray(cluster, tiny_bge_art, tmp_path, texts):
    """``bgert encode --ray auto`` in this process, so it joins the module's cluster (a second driver
    process would start or join one of its own)."""
    from bgert.cli import main

    pq.write_table(pa.table({"doc": [f"d{i}" for i in range(60)], "body": texts}), tmp_path / "in.parquet")
    assert main(["encode", tiny_bge_art, "-i", str(tmp_path / "in.parquet"), "-o", str(tmp_path / "out"),
                 "--field", "body", "--ray", "auto", "--concurrency", "1", "--window-size", "16"]) == 0
    table = pads.dataset(str(tmp_path / "out"), format="parquet").to_table().sort_by("doc")
    order = sorted(range(60), key=lambda i: f"d{i}")
    assert table.column("doc").to_pylist() == [f"d{i}" for i in order]
    want = Embedder(tiny_bge_art).encode([texts[i] for i in order])
    assert np.abs(np.array(table.column("vector").to_pylist()) - want).max() < 1e-6
