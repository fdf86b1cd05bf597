"""Streaming ``bgert encode``: txt/jsonl/parquet in, npy/jsonl/parquet out written window by window,
ids kept, M3 sparse/ColBERT columns, and a run killed mid-way that ``--resume`` completes to exactly
the output of an uninterrupted run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

import tiny_models
from bgert.export import export
from bgert.runtime import Embedder, M3Embedder
from test_windows import mixed_texts


def bgert(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bgert.cli", *args], input=stdin, capture_output=True, text=True,
                          timeout=300)


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bgert.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def read_output(path: str):
    """What a reader of the output sees: the array, the jsonl lines, or the parquet dataset as a table."""
    if path.endswith(".npy"):
        return np.load(path)
    if path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f]
    return pads.dataset(path, format="parquet").to_table()  # part files in row order


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    texts = [t.replace("\n", " ").replace("\r", " ") for t in mixed_texts(300, seed=7, long_words=300)]
    ids = [f"doc-{i}" for i in range(len(texts))]
    (d / "in.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    with open(d / "in.jsonl", "w", encoding="utf-8") as f:
        for i, t in zip(ids, texts):
            f.write(json.dumps({"_id": i, "body": t}) + "\n")
    pq.write_table(pa.table({"_id": ids, "body": texts, "year": list(range(len(texts)))}), d / "in.parquet",
                   row_group_size=64)
    return d, texts, ids


@pytest.fixture(scope="module")
def m3_art(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("m3cli")
    return export(tiny_models.build_m3(str(root / "ckpt")), str(root / "bge-m3"), progress=False)


def test_every_input_and_output_format_matches_encode(tiny_bge_art, corpus, tmp_path):
    d, texts, ids = corpus
    want = Embedder(tiny_bge_art).encode(texts)
    r = bgert("encode", tiny_bge_art, "-i", str(d / "in.txt"), "-o", str(tmp_path / "v.npy"), "--window-size", "64")
    assert r.returncode == 0, r.stderr
    assert "texts/s" in r.stderr  # the progress bar
    assert not os.path.exists(tmp_path / "v.npy.progress")
    assert np.abs(np.load(tmp_path / "v.npy") - want).max() < 1e-6
    r = bgert("encode", tiny_bge_art, "-i", str(d / "in.jsonl"), "--field", "body", "--id-field", "_id",
              "-o", str(tmp_path / "v.jsonl"), "--no-progress")
    assert r.returncode == 0, r.stderr
    rows = read_output(str(tmp_path / "v.jsonl"))
    assert [x["id"] for x in rows] == ids and np.abs(np.array([x["vector"] for x in rows]) - want).max() < 1e-6
    r = bgert("encode", tiny_bge_art, "-i", str(d / "in.parquet"), "--field", "body", "--id-field", "_id",
              "-o", str(tmp_path / "v.parquet"), "--window-size", "100", "--no-progress")
    assert r.returncode == 0, r.stderr
    parts = sorted(os.listdir(tmp_path / "v.parquet"))
    assert parts == [f"part-{i:012d}.parquet" for i in (0, 100, 200)]
    table = pads.dataset(str(tmp_path / "v.parquet"), format="parquet").to_table()
    assert table.column("id").to_pylist() == ids
    assert np.abs(np.array(table.column("vector").to_pylist()) - want).max() < 1e-6
    r = bgert("encode", tiny_bge_art, "-i", str(d / "in.jsonl"), "-o", str(tmp_path / "x.jsonl"))
    assert r.returncode == 1 and "--field" in r.stderr  # no 'text' key in these records
    assert not os.path.exists(tmp_path / "x.jsonl")
    r = bgert("encode", tiny_bge_art, "-i", str(d / "in.jsonl"), "--field", "body", "--id-field", "_id",
              "-o", str(tmp_path / "x.npy"))
    assert r.returncode == 1 and ".jsonl or .parquet" in r.stderr


def test_m3_writes_sparse_and_colbert(m3_art, corpus, tmp_path):
    d, texts, ids = corpus
    want = M3Embedder(m3_art).encode(texts[:40], return_sparse=True, return_colbert_vecs=True)
    with open(tmp_path / "in.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"_id": i, "text": t}) + "\n" for i, t in zip(ids[:40], texts[:40]))
    for out in ("m3.jsonl", "m3.parquet"):
        r = bgert("encode", m3_art, "-i", str(tmp_path / "in.jsonl"), "--id-field", "_id", "-o", str(tmp_path / out),
                  "--sparse", "--colbert", "--window-size", "16", "--no-progress")
        assert r.returncode == 0, r.stderr
        got = read_output(str(tmp_path / out))
        rows = got if isinstance(got, list) else got.to_pylist()
        assert [x["id"] for x in rows] == ids[:40]
        for x, dense, lex, col in zip(rows, want["dense_vecs"], want["lexical_weights"], want["colbert_vecs"]):
            assert np.abs(np.array(x["dense"]) - dense).max() < 1e-6
            sparse = dict(x["sparse"]) if isinstance(x["sparse"], dict) else {str(k): w for k, w in x["sparse"]}
            assert sparse == pytest.approx(dict(lex), rel=1e-5, abs=1e-6)  # float32 batch noise, jsonl rounding
            assert np.abs(np.array(x["colbert"]) - col).max() < 1e-6
    r = bgert("encode", m3_art, "-i", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "m3.npy"), "--sparse")
    assert r.returncode == 1 and ".jsonl or .parquet" in r.stderr


@pytest.mark.parametrize("out", ["v.jsonl", "v.parquet", "v.npy"])
def test_killed_run_leaves_a_readable_prefix_and_resume_completes_it(tiny_bge_art, corpus, tmp_path, out):
    d, texts, _ = corpus
    args = ["encode", tiny_bge_art, "-i", str(d / "in.jsonl"), "--field", "body", "--window-size", "4",
            "--batch-size", "2", "--no-progress"] + ([] if out.endswith(".npy") else ["--id-field", "_id"])
    full = str(tmp_path / ("full-" + out))
    assert bgert(*args, "-o", full).returncode == 0
    path = str(tmp_path / out)
    proc = start(*args, "-o", path)
    deadline = time.monotonic() + 120
    marker = path + ".progress" if out.endswith(".npy") else path
    while time.monotonic() < deadline and proc.poll() is None:  # wait for a few windows, then kill
        done = (json.load(open(marker))["rows"] if out.endswith(".npy") and os.path.exists(marker) else
                len(os.listdir(path)) * 4 if out.endswith(".parquet") and os.path.isdir(path) else
                os.path.getsize(path) // 400 if os.path.exists(path) else 0)
        if done >= 12:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    prefix = read_output(path)  # readable as it is
    if out.endswith(".npy"):
        n = json.load(open(path + ".progress"))["rows"]
        assert 0 < n < len(texts)
        assert np.array_equal(prefix[:n], np.load(full)[:n])
    else:
        assert 0 < len(prefix) < len(texts)
    r = bgert(*args, "-o", path, "--resume")
    assert r.returncode == 0, r.stderr
    assert "already written" in r.stderr
    a, b = read_output(path), read_output(full)
    assert (np.array_equal(a, b) if out.endswith(".npy") else a == b)
