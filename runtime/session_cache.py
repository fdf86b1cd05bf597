"""The optimised-graph cache of the ORT CPU provider: a graph as ORT leaves it after optimising it,
with its weights (and their pre-packed copies) in a page-aligned external file that later sessions
memory-map instead of parsing and copying.

Creating a session from an artifact's graph parses the whole protobuf, copies every initializer onto
the heap, runs the graph optimisers and pre-packs the MatMul weights: for all-MiniLM-L6-v2 about
0.2 s and twice the weights' size at its peak. The first session of a graph on a machine therefore
also writes (``optimized_model_filepath`` with ``session.optimized_model_external_initializers_file_name``
and ``session.save_external_prepacked_constant_initializers``) a copy into
``$BGERT_CACHE_DIR/ort/<key>/`` (default ``~/.cache/bgert/ort``), and every session, that first one
included, loads the copy: ORT maps its data file, so creating a session takes a fraction of the time,
the weights are file-backed pages that replicas on one machine share, and nothing is copied at load.

The key is everything that decides the optimised graph: the sha256 of the graph's files (from the
verified manifest), the ORT version, the optimisation level and the optimizers left out, and the machine and CPU flags (ORT's
level-3 optimisations and pre-packed layouts are specific to the CPU they were made on). Only
sessions on the CPU provider alone, of artifacts whose files were verified against the manifest
(``verify=False`` could load a changed file under the old hash), with bgert's own SessionOptions are
cached (a caller's options may hold config entries or custom ops that change the graph, which ORT
does not let us read).
Entries are written into a temporary directory and renamed into place, so a reader never sees a half
one; a missing, damaged or unwritable cache falls back to the artifact's own graph, and so does a graph
whose copy ORT cannot load back (ORT 1.2x writes fp16 graphs with If nodes, BGE-M3's, with duplicated
casts): each copy is loaded once when made, and one that fails is recorded as unusable in its entry,
so it is not made again. ``session_cache=False``
(or ``BGERT_SESSION_CACHE=0``) turns it off; delete the directory to reclaim the disk (an entry is
about 1.5x the graph: the weights plus their packed copies).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
from typing import Any, Sequence

import onnxruntime as ort

from .cache_dir import cache_dir
from .cpu import cpu_flags

log = logging.getLogger("bgert")

MODEL = "model.onnx"
DATA = "model.onnx.data"
META = "meta.json"
#: initializers at least this large go to the mapped data file (smaller ones stay in the graph)
MIN_EXTERNAL_BYTES = 1024


def cache_root() -> str:
    """``$BGERT_CACHE_DIR/ort`` (default ``~/.cache/bgert/ort``)."""
    return cache_dir("ort")


def enabled(asked: bool | None) -> bool:
    """``session_cache=`` as asked, else on unless ``BGERT_SESSION_CACHE=0``."""
    if asked is not None:
        return bool(asked)
    return os.environ.get("BGERT_SESSION_CACHE", "1").strip().lower() not in ("0", "false", "no", "off")


def graph_digests(manifest: Any, graph_file: str) -> dict[str, str]:
    """sha256 of the graph file and of its external data files, as the manifest lists them."""
    files = manifest.raw.get("files", {})
    return {name: digest for name, digest in sorted(files.items())
            if name == graph_file or name.startswith(graph_file + ".")}


def cache_key(digests: dict[str, str], options: ort.SessionOptions, disabled: Sequence[str] = ()) -> dict[str, Any]:
    """What decides the optimised graph, as a JSON-able dict (its hash names the entry); ``disabled``: the
    ORT optimizers the session runs without (ort_backend.CPU_DISABLED_OPTIMIZERS)."""
    return {"files": digests, "onnxruntime": ort.__version__, "level": int(options.graph_optimization_level),
            "disabled_optimizers": sorted(disabled),
            "machine": platform.machine(), "cpu_flags": hashlib.sha256(" ".join(sorted(cpu_flags())).encode()).hexdigest()}


def _meta(entry: str, key: dict[str, Any]) -> dict[str, Any] | None:
    """The entry's meta.json where it was made for ``key``, else None."""
    try:
        with open(os.path.join(entry, META), encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("key") == key else None


def _complete(entry: str, key: dict[str, Any]) -> bool:
    """Whether ``entry`` holds a whole copy made for ``key`` (its meta matches, its files have their sizes),
    or the record that ORT could not load the copy it made for ``key``."""
    meta = _meta(entry, key)
    if meta is None:
        return False
    if meta.get("unusable"):
        return True
    try:
        return (os.path.getsize(os.path.join(entry, MODEL)) == meta["model_bytes"]
                and os.path.getsize(os.path.join(entry, DATA)) == meta["data_bytes"])
    except (OSError, KeyError, TypeError):
        return False


def _build(path: str, entry: str, key: dict[str, Any], options: ort.SessionOptions, disabled: Sequence[str]) -> None:
    """Write the optimised copy of ``path`` into a temporary directory beside ``entry``, then rename it there."""
    root = os.path.dirname(entry)
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=root)
    try:
        so = ort.SessionOptions()
        so.graph_optimization_level = options.graph_optimization_level
        so.intra_op_num_threads = 1  # the session only writes the copy; no pool of spinning workers for it
        so.log_severity_level = 3  # not ORT's warning that level-3 graphs are for this machine: the key says so
        so.optimized_model_filepath = os.path.join(tmp, MODEL)
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", DATA)
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                    str(MIN_EXTERNAL_BYTES))
        so.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
        ort.InferenceSession(path, sess_options=so, providers=["CPUExecutionProvider"],
                             disabled_optimizers=list(disabled) or None)
        if not os.path.isfile(os.path.join(tmp, DATA)):
            raise OSError("ORT wrote no external data file (nothing large enough to map)")
        meta: dict[str, Any] = {"key": key, "source": os.path.abspath(path),
                                "model_bytes": os.path.getsize(os.path.join(tmp, MODEL)),
                                "data_bytes": os.path.getsize(os.path.join(tmp, DATA))}
        try:  # ORT may write a copy it cannot read back (fp16 graphs with If nodes: duplicated casts)
            trial = ort.SessionOptions()
            trial.graph_optimization_level, trial.intra_op_num_threads, trial.log_severity_level = \
                options.graph_optimization_level, 1, 3
            ort.InferenceSession(os.path.join(tmp, MODEL), sess_options=trial, providers=["CPUExecutionProvider"],
                                 disabled_optimizers=list(disabled) or None)
        except Exception as e:  # ORT's own Fail/InvalidGraph types: remember it, so no later load makes it again
            for name in (MODEL, DATA):
                os.remove(os.path.join(tmp, name))
            meta = {"key": key, "source": os.path.abspath(path), "unusable": str(e).splitlines()[0][:500]}
        with open(os.path.join(tmp, META), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)
        for name in os.listdir(tmp):
            with open(os.path.join(tmp, name), "rb") as f:
                os.fsync(f.fileno())
        try:
            os.rename(tmp, entry)
        except OSError:  # another process put its copy there first (or a damaged one is in the way)
            if not _complete(entry, key):
                shutil.rmtree(entry, ignore_errors=True)
                os.rename(tmp, entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cached_graph(path: str, manifest: Any, graph_file: str, options: ort.SessionOptions,
                 disabled: Sequence[str] = ()) -> str:
    """The path a CPU session of ``path`` should load: its optimised copy in the cache (made now if
    missing, with the optimizers ``disabled`` left out, as the session runs), or ``path`` itself where no
    copy can be made or kept (the reason logged)."""
    digests = graph_digests(manifest, graph_file)
    if graph_file not in digests:
        return path  # a manifest without the graph's hash: nothing safe to key a copy by
    key = cache_key(digests, options, disabled)
    entry = os.path.join(cache_root(), hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32])
    if not _complete(entry, key):
        try:
            _build(path, entry, key, options, disabled)
        except Exception as e:  # a read-only or full disk, or a graph ORT cannot save: run the artifact's own graph
            log.info("bgert: no optimised-graph cache for %s (%s); loading it directly", path, e)
            return path
    meta = _meta(entry, key) if _complete(entry, key) else None
    if meta is None or meta.get("unusable"):
        return path
    return os.path.join(entry, MODEL)


def refuse(model_path: str, error: BaseException) -> None:
    """Record that the copy at ``model_path`` (from ``cached_graph``) failed to load, so later sessions load
    the artifact's graph without trying it (a copy made by another version of this module, say)."""
    entry = os.path.dirname(model_path)
    log.info("bgert: the optimised copy %s does not load (%s); loading the artifact's graph", model_path, error)
    try:
        with open(os.path.join(entry, META), encoding="utf-8") as f:
            meta = json.load(f)
        meta["unusable"] = str(error).splitlines()[0][:500]
        tmp = os.path.join(entry, META + f".{os.getpid()}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)
        os.replace(tmp, os.path.join(entry, META))
        for name in (MODEL, DATA):
            os.remove(os.path.join(entry, name))
    except (OSError, ValueError):
        pass
