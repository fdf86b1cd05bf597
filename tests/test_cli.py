"""The ``bgert`` command line: export, info, encode, run as a user would (subprocesses)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from bgert.runtime import Embedder


def bgert(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bgert.cli", *args], input=stdin, capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_export_info_encode_roundtrip(tiny_mean, tmp_path):
    out = tmp_path / "art"
    r = bgert("export", tiny_mean, "--out", str(out), "--max-length", "64", "-q")
    assert r.returncode == 0, r.stderr
    assert "kind       embedder" in r.stdout
    r = bgert("export", tiny_mean, "--out", str(out), "-q")
    assert r.returncode == 1 and "--force" in r.stderr
    info = bgert("info", str(out), "--verify")
    assert info.returncode == 0 and "max_length 64" in info.stdout and "all sha256 match" in info.stdout

    texts = ["what is panda?", "北京", "", "hi there"]
    (tmp_path / "in.txt").write_text("\n".join(texts), encoding="utf-8")
    r = bgert("encode", str(out), "--input", str(tmp_path / "in.txt"), "--output", str(tmp_path / "v.npy"))
    assert r.returncode == 0, r.stderr
    got = np.load(tmp_path / "v.npy")
    want = Embedder(str(out)).encode(texts)
    assert got.shape == (4, 32) and np.abs(got - want).max() < 1e-6

    jsonl = "\n".join(json.dumps({"text": t}) for t in texts)
    r = bgert("encode", str(out), "--input", "-", "--output", str(tmp_path / "v.jsonl"), stdin=jsonl)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in (tmp_path / "v.jsonl").read_text().splitlines()]
    assert np.abs(np.array(rows) - want).max() < 1e-6


def test_info_on_non_artifact_is_a_clear_error(tmp_path):
    r = bgert("info", str(tmp_path))
    assert r.returncode == 1 and "manifest.json" in r.stderr and "Traceback" not in r.stderr
