"""The artifact manifest: the only contract between bgert.export and bgert.runtime.

An artifact directory holds ``manifest.json``, ``tokenizer.json`` and one or more ONNX graphs.
The manifest names every file with its sha256, the model kind, the graphs (one per precision
and, for layerwise rerankers, per cutoff), their inputs/outputs, pooling, normalisation, max
length, instructions, special-token ids, length buckets and the parity measured at export.
This module reads and checks it; it never imports torch or the exporter.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

from . import registry
from .cache_dir import cache_dir

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"



def __getattr__(name: str) -> Any:
    """``KINDS``: the model kinds a manifest may name, read from the family registry (bgert.runtime.registry)."""
    if name == "KINDS":
        return registry.kinds()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class ArtifactError(RuntimeError):
    """An artifact directory that cannot be served as it is (missing, damaged, or unknown)."""


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks so multi-GB external data does not fill memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


#: a file's hash is remembered as verified only once its last change is this old: a change within the
#: same timestamp tick as the one before (1-2 s on some filesystems) would keep size, mtime and ctime
STAMP_MIN_AGE_NS = 2_000_000_000
#: files whose sha256 this process verified, by stamp (see _stamp)
_VERIFIED: set[str] = set()


def verified_dir() -> str:
    """Where verified-file stamps are kept: ``$BGERT_CACHE_DIR/verified`` (default ``~/.cache/bgert``),
    outside the artifact, so read-only artifact directories are checked the same way."""
    return cache_dir("verified")


def _stamp(st: os.stat_result, sha256: str) -> str:
    """A name for "this file, unchanged since, hashes to sha256": device, inode, size, mtime and ctime
    (ctime cannot be set back, so restoring an mtime after an edit still changes the stamp)."""
    key = f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{sha256}"
    return hashlib.sha256(key.encode()).hexdigest()


def _remember(st: os.stat_result, sha256: str) -> None:
    """Record that the file of ``st`` hashed to ``sha256`` (in this process and, where it can, on disk)."""
    if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) < STAMP_MIN_AGE_NS:
        return  # too fresh to tell a later same-tick change apart
    stamp = _stamp(st, sha256)
    _VERIFIED.add(stamp)
    try:
        os.makedirs(verified_dir(), exist_ok=True)
        os.close(os.open(os.path.join(verified_dir(), stamp), os.O_CREAT | os.O_WRONLY, 0o644))
    except OSError:  # a read-only or missing cache directory: the check stays a full one next time
        pass


def _remembered(st: os.stat_result, sha256: str) -> bool:
    stamp = _stamp(st, sha256)
    if stamp in _VERIFIED:
        return True
    if os.path.exists(os.path.join(verified_dir(), stamp)):
        _VERIFIED.add(stamp)
        return True
    return False


def file_sha256(path: str) -> str:
    """sha256 of ``path`` (``sha256_file``), remembered as verified for later cheap checks."""
    before = os.stat(path)
    digest = sha256_file(path)
    if _stamp(os.stat(path), digest) == _stamp(before, digest):  # not changed while it was read
        _remember(before, digest)
    return digest


@dataclass
class Graph:
    """One ONNX graph of an artifact: a precision variant (and, for layerwise, a cutoff)."""

    file: str
    precision: str = "fp32"
    cutoff_layers: list[int] | None = None
    quality: dict[str, Any] = field(default_factory=dict)
    gate_passed: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Graph":
        known = {"file", "precision", "cutoff_layers", "quality", "gate_passed"}
        return cls(
            file=d["file"],
            precision=d.get("precision", "fp32"),
            cutoff_layers=d.get("cutoff_layers"),
            quality=d.get("quality", {}),
            gate_passed=d.get("gate_passed", True),
            extra={k: v for k, v in d.items() if k not in known},
        )

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"file": self.file, "precision": self.precision,
                             "quality": self.quality, "gate_passed": self.gate_passed}
        if self.cutoff_layers is not None:
            d["cutoff_layers"] = self.cutoff_layers
        d.update(self.extra)
        return d


@dataclass
class Manifest:
    """Parsed manifest.json. ``raw`` keeps every key, including family-specific ones."""

    root: str
    raw: dict[str, Any]
    _section: Any = field(default=None, repr=False, compare=False)

    # ---- common fields -------------------------------------------------------------
    @property
    def kind(self) -> str:
        return self.raw["kind"]

    @property
    def family(self) -> str:
        return self.raw.get("family", "")

    @property
    def max_length(self) -> int:
        return int(self.raw["max_length"])

    @property
    def graphs(self) -> list[Graph]:
        return [Graph.from_dict(g) for g in self.raw.get("graphs", [])]

    @property
    def tokenizer_file(self) -> str:
        return os.path.join(self.root, self.raw.get("tokenizer", {}).get("file", "tokenizer.json"))

    @property
    def tokenizer_info(self) -> dict[str, Any]:
        return self.raw.get("tokenizer", {})

    @property
    def length_buckets(self) -> list[int]:
        return list(self.raw.get("length_buckets") or default_buckets(self.max_length))

    @property
    def section(self) -> Any:
        """The kind's typed manifest section (its family's dataclass), checked once: ArtifactError
        naming a missing or mistyped field."""
        if self._section is None:
            try:
                fam = registry.family(self.kind)
            except KeyError as e:
                raise ArtifactError(f"{os.path.join(self.root, MANIFEST_FILE)}: {e.args[0]}") from None
            try:
                self._section = fam.parse_section(self.raw)
            except registry.SectionError as e:
                raise ArtifactError(f"{os.path.join(self.root, MANIFEST_FILE)} ({self.kind}) {e}. "
                                    "Re-export the artifact with this bgert.") from None
        return self._section

    def get(self, key: str, default: Any = None) -> Any:
        return self.raw.get(key, default)

    def path(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    def precisions(self) -> list[str]:
        seen: list[str] = []
        for g in self.graphs:
            if g.precision not in seen:
                seen.append(g.precision)
        return seen


def default_buckets(max_length: int, smallest: int = 16) -> list[int]:
    """Powers of two from ``smallest`` up to ``max_length``, with ``max_length`` itself last."""
    out, b = [], smallest
    while b < max_length:
        out.append(b)
        b *= 2
    out.append(max_length)
    return out


def read_manifest(artifact_dir: str, verify: bool | str = True, section: bool = True) -> Manifest:
    """Load ``manifest.json`` from ``artifact_dir`` and check its files; with ``section``, check the kind's
    typed section now (else on first use of ``Manifest.section``).

    ``verify=True`` checks every file's sha256, hashing only files not verified before in their
    present state (same device, inode, size, mtime and ctime: see ``verified_dir``), so loading a
    multi-GB artifact again costs a ``stat`` per file; ``verify="full"`` hashes every file;
    ``verify=False`` only checks that they exist. Raises ArtifactError naming the file and what to
    do when the directory is not an artifact, the schema version is unknown, a listed file is
    missing, or a hash does not match.
    """
    if verify not in (True, False, "full"):
        raise ValueError(f"verify must be True, False or 'full', got {verify!r}")
    artifact_dir = os.fspath(artifact_dir)
    if not os.path.isdir(artifact_dir):
        raise ArtifactError(f"{artifact_dir!r} is not a directory. Pass the directory written by "
                            "`bgert export SRC --out DIR`.")
    mpath = os.path.join(artifact_dir, MANIFEST_FILE)
    if not os.path.isfile(mpath):
        raise ArtifactError(f"{mpath} not found: {artifact_dir!r} is not a bgert artifact. "
                            "Create one with `bgert export SRC --out DIR`.")
    try:
        with open(mpath, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{mpath} is not valid JSON ({e}). Re-export the artifact.") from e
    if not isinstance(raw, dict) or "schema_version" not in raw:
        raise ArtifactError(f"{mpath} has no schema_version: not a bgert manifest.")
    version = raw["schema_version"]
    if not isinstance(version, int) or version > SCHEMA_VERSION or version < 1:
        raise ArtifactError(
            f"{mpath} has schema_version {version!r}; this bgert reads version {SCHEMA_VERSION}. "
            "Upgrade bgert (pip install -U bgert) or re-export the artifact with this version.")
    if raw.get("kind") not in registry.FAMILIES:
        raise ArtifactError(f"{mpath} names kind {raw.get('kind')!r}; known kinds: {', '.join(registry.kinds())}.")
    for key in ("max_length", "graphs", "files"):
        if key not in raw:
            raise ArtifactError(f"{mpath} lacks the required key {key!r}. Re-export the artifact.")
    m = Manifest(root=artifact_dir, raw=raw)
    if section:
        m.section  # noqa: B018 (checks the typed section)
    if verify:
        verify_files(m, full=verify == "full")
    else:
        for rel in raw["files"]:
            if not os.path.isfile(m.path(rel)):
                raise ArtifactError(f"{m.path(rel)} is listed in the manifest but missing. Re-export the artifact.")
    return m


def file_problems(m: Manifest, full: bool = True) -> dict[str, str]:
    """What is wrong with each listed file that is missing or does not match its sha256 (empty: all good).

    ``full=False`` skips the hashing of files verified before and unchanged since (see read_manifest).
    """
    problems = {}
    for rel, expected in m.raw["files"].items():
        p = m.path(rel)
        if not os.path.isfile(p):
            problems[rel] = (f"{p} is listed in the manifest but missing. The artifact is incomplete: "
                             "re-export it (bgert export ... --force).")
            continue
        if not full and _remembered(os.stat(p), expected):
            continue
        got = file_sha256(p)
        if got != expected:
            problems[rel] = (f"{p} does not match its sha256 in the manifest (expected {expected[:12]}…, "
                             f"got {got[:12]}…): the file was changed or damaged. Re-export the artifact.")
    return problems


def verify_files(m: Manifest, full: bool = True) -> None:
    """Check that every file the manifest lists exists and matches its sha256 (ArtifactError otherwise);
    ``full=False`` as in ``file_problems``."""
    problems = file_problems(m, full)
    if problems:
        raise ArtifactError(next(iter(problems.values())))


def list_files(artifact_dir: str, known: dict[str, str] | None = None) -> dict[str, str]:
    """Every file under ``artifact_dir`` but the manifest, as ``write_manifest`` expects ``raw['files']``:
    relative path -> its sha256 from ``known`` (files hashed earlier in the same export), else ""."""
    out = {}
    for d, _, files in os.walk(artifact_dir):
        for f in files:
            rel = os.path.relpath(os.path.join(d, f), artifact_dir)
            if rel != MANIFEST_FILE:
                out[rel] = (known or {}).get(rel, "")
    return out


def write_manifest(artifact_dir: str, raw: dict[str, Any]) -> str:
    """Write ``manifest.json``. Files of ``raw['files']`` without a hash are hashed, and their hashes
    filled into ``raw['files']`` itself, so an export hashes each file once however often it writes."""
    for rel in sorted(raw["files"]):
        if not raw["files"][rel]:
            raw["files"][rel] = file_sha256(os.path.join(artifact_dir, rel))
    raw = dict(raw)
    raw["schema_version"] = SCHEMA_VERSION
    raw["files"] = dict(sorted(raw["files"].items()))
    path = os.path.join(artifact_dir, MANIFEST_FILE)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(raw, f, indent=2, sort_keys=False, ensure_ascii=False)
        f.write("\n")
    return path
