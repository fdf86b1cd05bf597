"""Artifact integrity: damaged, incomplete, foreign or future artifacts give clear errors, an export
killed half-way leaves no half artifact, and ``bgert doctor`` reports all of it.

Each test damages a copy of the tiny BGE artifact the way it happens in practice (a truncated
download, a flipped byte, a file swapped from another model, a lost tokenizer, a manifest from a
newer bgert, the wrong runtime class) and checks the error names the file and what to do. An
export is killed with SIGKILL at two points (mid-trace, and after the manifest was written,
while replacing an existing artifact); the destination must hold either nothing or a complete
artifact whose hashes verify, and the next export must clean what the killed one left behind.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from bgert.runtime import ArtifactError, Embedder, class_for_kind, load
from bgert.runtime.manifest import KINDS, read_manifest


@pytest.fixture
def art(tiny_bge_art, tmp_path):
    """A private copy of the tiny BGE artifact, free to damage."""
    return str(shutil.copytree(tiny_bge_art, tmp_path / "art"))


def edit_manifest(path: str, **changes) -> None:
    mpath = os.path.join(path, "manifest.json")
    with open(mpath, encoding="utf-8") as f:
        raw = json.load(f)
    raw.update(changes)
    with open(mpath, "w", encoding="utf-8") as f:
        json.dump(raw, f)


def bgert(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bgert.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, **kwargs)


# ---- damaged graph -----------------------------------------------------------------------------
def truncate(p: str) -> None:
    data = open(p, "rb").read()
    open(p, "wb").write(data[: len(data) // 2])


def flip_byte(p: str) -> None:
    with open(p, "r+b") as f:
        f.seek(os.path.getsize(p) // 2)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0xFF]))


def append_bytes(p: str) -> None:
    with open(p, "ab") as f:
        f.write(b"\0" * 16)


@pytest.mark.parametrize("damage", [truncate, flip_byte, append_bytes, "other_model"])
def test_damaged_graph_is_refused_naming_the_file(art, tiny_mean_art, damage):
    graph = os.path.join(art, "model.onnx")
    if damage == "other_model":  # a valid graph, from another model
        shutil.copy(os.path.join(tiny_mean_art, "model.onnx"), graph)
    else:
        damage(graph)
    for open_it in (Embedder, load):
        with pytest.raises(ArtifactError, match=r"model\.onnx does not match its sha256.*Re-export"):
            open_it(art).encode(["a"])


def test_truncated_graph_without_verification_fails_on_load_not_deep_in_a_run(art):
    truncate(os.path.join(art, "model.onnx"))
    model = Embedder(art, verify=False)  # sessions are made lazily
    with pytest.raises(RuntimeError, match=r"could not load .*model\.onnx"):
        model.encode(["a"])


# ---- tokenizer ---------------------------------------------------------------------------------
def test_missing_tokenizer_is_refused(art):
    os.remove(os.path.join(art, "tokenizer.json"))
    for verify in (True, False):
        with pytest.raises(ArtifactError, match=r"tokenizer\.json is listed in the manifest but missing"):
            Embedder(art, verify=verify)


def test_tokenizer_missing_from_the_manifest_too(art):
    os.remove(os.path.join(art, "tokenizer.json"))
    with open(os.path.join(art, "manifest.json"), encoding="utf-8") as f:
        files = json.load(f)["files"]
    files.pop("tokenizer.json")
    edit_manifest(art, files=files)
    with pytest.raises(ArtifactError, match=r"tokenizer\.json is missing; re-export"):
        Embedder(art)


@pytest.mark.parametrize("content", ['{"version": "1.0", "trunc', "{}", "\udcff"])
def test_damaged_tokenizer_without_verification(art, content):
    with open(os.path.join(art, "tokenizer.json"), "w", encoding="utf-8", errors="surrogateescape") as f:
        f.write(content)
    with pytest.raises(ArtifactError, match=r"tokenizer\.json does not match its sha256"):
        Embedder(art)
    with pytest.raises(ArtifactError, match=r"tokenizer\.json is not a readable tokenizer\.json"):
        Embedder(art, verify=False)


# ---- manifest ----------------------------------------------------------------------------------
@pytest.mark.parametrize("version,message", [(2, r"schema_version 2; this bgert reads version 1\. Upgrade bgert"),
                                             (99, r"schema_version 99.*Upgrade bgert"),
                                             (0, r"schema_version 0"), ("1", r"schema_version '1'"),
                                             (None, r"schema_version None")])
def test_unknown_schema_version_is_refused(art, version, message):
    edit_manifest(art, schema_version=version)
    for open_it in (Embedder, load):
        with pytest.raises(ArtifactError, match=message):
            open_it(art)


def test_manifest_without_schema_or_kind(art):
    with open(os.path.join(art, "manifest.json"), encoding="utf-8") as f:
        raw = json.load(f)
    with open(os.path.join(art, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump({k: v for k, v in raw.items() if k != "schema_version"}, f)
    with pytest.raises(ArtifactError, match="no schema_version: not a bgert manifest"):
        load(art)
    edit_manifest(art, schema_version=1, kind="sentence_piece_thing")
    with pytest.raises(ArtifactError, match="names kind 'sentence_piece_thing'; known kinds"):
        load(art)


def test_truncated_manifest_is_refused(art):
    truncate(os.path.join(art, "manifest.json"))
    with pytest.raises(ArtifactError, match=r"manifest\.json is not valid JSON.*Re-export"):
        load(art)


def test_manifest_missing_a_required_key(art):
    with open(os.path.join(art, "manifest.json"), encoding="utf-8") as f:
        raw = json.load(f)
    del raw["graphs"]
    with open(os.path.join(art, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(raw, f)
    with pytest.raises(ArtifactError, match="lacks the required key 'graphs'"):
        load(art)


# ---- wrong class -------------------------------------------------------------------------------
def registered_kinds() -> list[str]:
    out = []
    for kind in KINDS:
        try:
            class_for_kind(kind)
        except ArtifactError:
            continue
        out.append(kind)
    return out


@pytest.mark.parametrize("kind", [k for k in registered_kinds() if k != "embedder"])
def test_embedder_artifact_opened_with_another_class(tiny_bge_art, kind):
    cls = class_for_kind(kind)
    with pytest.raises(ArtifactError, match=rf"holds a 'embedder' model, which {cls.__name__} does not serve; "
                                            r"use bgert\.runtime\.Embedder"):
        cls(tiny_bge_art)


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "embedder"])
def test_other_kind_opened_with_embedder(art, kind):
    edit_manifest(art, kind=kind)
    if kind in registered_kinds():
        match = rf"holds a '{kind}' model, which Embedder does not serve; use bgert\.runtime\.{class_for_kind(kind).__name__}"
    else:
        match = rf"no runtime class for kind '{kind}'"
    with pytest.raises(ArtifactError, match=match):
        Embedder(art)


# ---- an export killed half-way ----------------------------------------------------------------
def work_dirs(parent: str, name: str) -> list[str]:
    return sorted(d for d in os.listdir(parent) if d.startswith(f".{name}.tmp-") or d.startswith(f".{name}.old-"))


def kill_export_when(src: str, out: str, ready, *extra: str, timeout: float = 300) -> bool:
    """Run `bgert export` in a subprocess and SIGKILL it once ``ready(work_dir)`` holds; True if killed."""
    parent, name = os.path.dirname(out), os.path.basename(out)
    proc = subprocess.Popen([sys.executable, "-m", "bgert.cli", "export", src, "--out", out, "-q", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            tmp = [d for d in work_dirs(parent, name) if ".tmp-" in d]
            if tmp and ready(os.path.join(parent, tmp[0])):
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return True
            time.sleep(0.005)
        return False
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def has(name: str):
    return lambda d: os.path.exists(os.path.join(d, name))


def assert_whole_or_absent(out: str) -> str | None:
    """The destination is absent, or a complete artifact whose every file matches its sha256."""
    if not os.path.exists(out):
        return None
    m = read_manifest(out, verify=True)
    assert Embedder(out, verify=False).encode("a").shape == (m.raw["dim"],)
    return m.raw["export"]["created"]


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL")
def test_killed_export_leaves_no_half_artifact(tiny_bge, tmp_path):
    from bgert.export import export

    out = str(tmp_path / "bge")
    # 1. killed while tracing: nothing at the destination, a hidden work directory stays behind
    assert kill_export_when(tiny_bge, out, has("model.onnx")), "export finished before it could be killed"
    assert not os.path.exists(out)
    assert len(work_dirs(str(tmp_path), "bge")) == 1
    # the next export completes and removes what the killed one left
    export(tiny_bge, out, progress=False)
    assert os.listdir(tmp_path) == ["bge"]
    created = assert_whole_or_absent(out)
    assert created
    # 2. killed while replacing that artifact (manifest written, parity running): the old one is intact
    killed = kill_export_when(tiny_bge, out, has("manifest.json"), "--force")
    after = assert_whole_or_absent(out)
    assert after is not None, "a killed --force export lost the existing artifact"
    if killed and after == created:  # normal case: killed before the rename
        assert len(work_dirs(str(tmp_path), "bge")) == 1
    export(tiny_bge, out, progress=False, force=True)
    assert os.listdir(tmp_path) == ["bge"]
    assert_whole_or_absent(out)


def test_stale_work_dirs_are_removed_only_when_their_export_is_gone(tmp_path):
    from bgert.export.exporter import _remove_stale

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    names = {f".bge.tmp-{host}-{dead.pid}-abc": False,      # killed export on this host: removed
             f".bge.old-{host}-{dead.pid}-def": False,      # artifact moved aside by a killed --force: removed
             f".bge.tmp-{host}-{os.getpid()}-ghi": True,    # a live export (this process): kept
             f".bge.tmp-other-host-{dead.pid}-jkl": True,   # another host's export: cannot tell, kept
             f".bge2.tmp-{host}-{dead.pid}-mno": True,      # another destination: kept
             ".bge.tmp-x1y2z3": True}                       # an older bgert's name without host/pid: kept
    for n in names:
        os.makedirs(tmp_path / n / "sub")
    _remove_stale(str(tmp_path / "bge"))
    assert {n: (tmp_path / n).exists() for n in names} == names


# ---- bgert doctor ------------------------------------------------------------------------------
def test_doctor_without_artifact_reports_the_machine():
    r = bgert("doctor")
    assert r.returncode == 0, r.stderr
    for word in ("CPUExecutionProvider", "cpu features AVX2", "AVX-512", "VNNI", "AMX", "onnxruntime", "tokenizers"):
        assert word in r.stdout
    rep = json.loads(bgert("doctor", "--json").stdout)
    assert set(rep["cpu"]["features"]) == {"AVX2", "AVX-512", "VNNI", "AMX"}
    assert "CPUExecutionProvider" in rep["onnxruntime"]["providers"]
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if flags:
        assert rep["cpu"]["features"]["AVX2"] == (" avx2" in flags)


def test_doctor_checks_a_good_artifact(tiny_bge_art):
    r = bgert("doctor", tiny_bge_art, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    art = json.loads(r.stdout)["artifact"]
    status = {c["name"]: c["status"] for c in art["checks"]}
    assert art["ok"] and status == {"schema": "ok", "sha256 model.onnx": "ok", "sha256 tokenizer.json": "ok",
                                    "gate fp32": "ok", "variant": "ok", "inference": "ok"}
    inference = next(c["detail"] for c in art["checks"] if c["name"] == "inference")
    assert "(2, 32) float32" in inference


def test_doctor_fails_a_damaged_artifact(art):
    flip_byte(os.path.join(art, "model.onnx"))
    r = bgert("doctor", art)
    assert r.returncode == 1
    assert "[FAIL] sha256 model.onnx" in r.stdout and "[  ok] sha256 tokenizer.json" in r.stdout
    assert "[SKIP] inference" in r.stdout and "artifact NOT OK" in r.stdout and "Traceback" not in r.stderr
    edit_manifest(art, schema_version=7)
    r = bgert("doctor", art)
    assert r.returncode == 1 and "[FAIL] manifest" in r.stdout and "Upgrade bgert" in r.stdout


def test_doctor_catches_a_graph_that_gives_wrong_numbers(art, monkeypatch):
    """The test inference fails when a batch disagrees with its items alone (e.g. a broken mask)."""
    from bgert.cli import doctor_cmd

    real = Embedder.encode

    def leaky(self, sentences, *a, **k):  # pretend padding leaks into the result
        out = real(self, sentences, *a, **k)
        if isinstance(sentences, list) and len(sentences) > 1:
            out = out + np.float32(0.01)
        return out

    monkeypatch.setattr(Embedder, "encode", leaky)
    rep = doctor_cmd.check_artifact(art)
    assert not rep["ok"]
    assert "other numbers for a batch" in next(c["detail"] for c in rep["checks"] if c["name"] == "inference")


# ---- hashing: once per export, cheap at load once verified ---------------------------------------
@pytest.fixture
def counted_hashes(monkeypatch, tmp_path):
    """{path: times hashed} by bgert.runtime.manifest, with stamps kept in a private cache directory and
    trusted however fresh the file (the 2 s guard against same-tick edits would otherwise apply)."""
    from bgert.runtime import manifest

    calls: dict[str, int] = {}
    real = manifest.sha256_file

    def counting(path, *a, **kw):
        calls[os.path.realpath(path)] = calls.get(os.path.realpath(path), 0) + 1
        return real(path, *a, **kw)

    monkeypatch.setattr(manifest, "sha256_file", counting)
    monkeypatch.setattr(manifest, "STAMP_MIN_AGE_NS", 0)
    monkeypatch.setattr(manifest, "_VERIFIED", set())
    monkeypatch.setenv("BGERT_CACHE_DIR", str(tmp_path / "cache"))
    return calls


def test_an_export_hashes_each_file_once(tiny_bge, tmp_path, counted_hashes):
    from bgert.export import export

    out = export(tiny_bge, str(tmp_path / "out"), progress=False, precisions=["int8"])
    files = read_manifest(out, verify=False).raw["files"]
    assert {"model.onnx", "model.int8.onnx", "tokenizer.json"} <= set(files)
    hashed = {os.path.basename(p): n for p, n in counted_hashes.items() if not p.startswith(os.path.realpath(tiny_bge))}
    assert hashed == {os.path.basename(f): 1 for f in files}, hashed


def test_load_check_is_a_stat_once_verified_and_still_refuses_a_change(art, counted_hashes, tmp_path):
    graph = os.path.realpath(os.path.join(art, "model.onnx"))
    Embedder(art)
    assert counted_hashes[graph] == 1
    Embedder(art)
    load(art)
    assert counted_hashes[graph] == 1  # verified and unchanged: not hashed again, in this process
    from bgert.runtime import manifest

    manifest._VERIFIED.clear()
    Embedder(art)
    assert counted_hashes[graph] == 1  # nor in another one (the stamp on disk)
    Embedder(art, verify="full")
    assert counted_hashes[graph] == 2  # unless asked for
    st = os.stat(graph)
    flip_byte(graph)
    os.utime(graph, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, mtime put back: the ctime still moved
    with pytest.raises(ArtifactError, match=r"model\.onnx does not match its sha256"):
        Embedder(art)
    with pytest.raises(ValueError, match="verify must be True, False or 'full'"):
        Embedder(art, verify="fast")


def test_load_check_works_without_a_writable_cache(art, counted_hashes, monkeypatch, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("BGERT_CACHE_DIR", str(blocker))  # makedirs under a file fails
    Embedder(art).encode(["a"])
    flip_byte(os.path.join(art, "model.onnx"))
    with pytest.raises(ArtifactError, match=r"model\.onnx does not match its sha256"):
        Embedder(art)
