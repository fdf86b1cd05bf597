"""Write a Triton model repository for a bgert artifact (``bgert triton-repo``).

For an artifact named N it writes, next to any models already in the repository:

- ``N_model``: the graph (version 1), token ids in, graph outputs out. ``--backend onnxruntime``
  uses Triton's ONNX Runtime backend, ``tensorrt`` the same backend with the TensorRT accelerator
  (FP16, workspace size), ``python`` a python-backend model running onnxruntime
  (triton_models/onnx_model.py; what the nvidia-pytriton server used by the tests can run).
  max_batch_size, dynamic batching (preferred sizes from the length buckets and token budget,
  a queue delay) and instance groups are set; parameters record the graph's sha256 and precision
  so ``TritonBackend`` refuses a model that is not the artifact's.
- ``N_tokenizer`` (python backend, triton_models/tokenizer_model.py) and the ensemble ``N``:
  raw strings (TEXT, TYPE_STRING) → tokenizer → model, so any Triton client can send text.

Python models import bgert.runtime's own tokenizer/batching/backend modules: the installed
package's files are copied into each python model's version directory (``1/bgert/runtime``),
so the repository is self-contained and the server needs only numpy, tokenizers and onnxruntime.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any, Sequence

from bgert.runtime.base import CPU_PREFERENCE, GPU_PREFERENCE
from bgert.runtime.batching import DEFAULT_TOKEN_BUDGET
from bgert.runtime.manifest import ArtifactError, Graph, Manifest, read_manifest
from bgert.runtime.triton_backend import (PARAM_PRECISION, PARAM_SHA256, default_repo_name, model_step_name,
                                          sanitize_name)

from .pbtxt import Sym, dumps

log = logging.getLogger("bgert")

BACKENDS = ("onnxruntime", "tensorrt", "python")
DEVICES = ("gpu", "cpu")
TEXT_INPUT = "TEXT"
#: kinds whose raw-text ensemble (tokenizer → model) is written; others get the model step(s) only
ENSEMBLE_KINDS = ("embedder",)
_HERE = os.path.dirname(os.path.abspath(__file__))
_TRITON_TYPES = {"tensor(float)": "TYPE_FP32", "tensor(float16)": "TYPE_FP16", "tensor(int64)": "TYPE_INT64",
                 "tensor(int32)": "TYPE_INT32", "tensor(bool)": "TYPE_BOOL", "tensor(double)": "TYPE_FP64"}


def choose_graphs(manifest: Manifest, precision: str | None, device: str) -> list[Graph]:
    """The graphs to serve: of ``precision``, else of the first gate-passed precision preferred on ``device``."""
    have = manifest.precisions()
    if precision is None:
        passed = {g.precision for g in manifest.graphs if g.gate_passed}
        prefs = GPU_PREFERENCE if device == "gpu" else CPU_PREFERENCE
        precision = next((p for p in (*prefs, *have) if p in passed), None)
        if precision is None:
            raise ArtifactError(f"{manifest.root}: no graph passed its quality gate; re-export the artifact.")
    elif precision not in have:
        raise ValueError(f"precision {precision!r} is not in this artifact; it has: {', '.join(have)}.")
    return [g for g in manifest.graphs if g.precision == precision]


def graph_io(path: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Inputs and outputs of an ONNX graph as Triton tensor specs (batch axis dropped, symbolic dims -1)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(path, sess_options=so, providers=["CPUExecutionProvider"])

    def spec(v: Any) -> dict[str, Any]:
        if v.type not in _TRITON_TYPES:
            raise ArtifactError(f"{path}: tensor {v.name!r} has type {v.type}, which has no Triton mapping here")
        dims = [d if isinstance(d, int) and d > 0 else -1 for d in v.shape[1:]]
        out = {"name": v.name, "data_type": Sym(_TRITON_TYPES[v.type]), "dims": dims or [1]}
        if not dims:  # one value per row ([batch]): Triton needs dims [1] reshaped to a scalar
            out["reshape"] = {"shape": []}
        return out

    return [spec(v) for v in sess.get_inputs()], [spec(v) for v in sess.get_outputs()]


def preferred_batch_sizes(buckets: Sequence[int], token_budget: int, max_batch_size: int) -> list[int]:
    """Rows that fill the token budget at each length bucket, capped at max_batch_size."""
    return sorted({max(1, min(max_batch_size, token_budget // b)) for b in buckets})


def _params(values: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"key": k, "value": {"string_value": str(v)}} for k, v in values.items()]


def _instance_group(kind: str, count: int) -> list[dict[str, Any]]:
    return [{"count": count, "kind": Sym(f"KIND_{kind.upper()}")}]


def model_step_config(name: str, graph: Graph, manifest: Manifest, inputs: list, outputs: list, *, backend: str,
                      device: str, instances: int, max_batch_size: int, queue_delay_us: int, token_budget: int,
                      threads: int | None, workspace_bytes: int) -> dict[str, Any]:
    """config.pbtxt fields of the model step (the graph itself)."""
    params = {PARAM_SHA256: manifest.raw["files"][graph.file], PARAM_PRECISION: graph.precision}
    cfg: dict[str, Any] = {"name": name}
    if backend == "python":
        cfg["backend"] = "python"
        params["graph_file"] = os.path.basename(graph.file)
    else:
        cfg["platform"] = "onnxruntime_onnx"
        cfg["default_model_filename"] = os.path.basename(graph.file)
    if threads:
        params["intra_op_thread_count"] = threads
    cfg.update({
        "max_batch_size": max_batch_size,
        "input": inputs,
        "output": outputs,
        "dynamic_batching": {
            "preferred_batch_size": preferred_batch_sizes(manifest.length_buckets, token_budget, max_batch_size),
            "max_queue_delay_microseconds": queue_delay_us,
        },
        "instance_group": _instance_group(device, instances),
    })
    if backend == "tensorrt":
        cfg["optimization"] = {"execution_accelerators": {"gpu_execution_accelerator": [{
            "name": "tensorrt",
            "parameters": [{"key": k, "value": str(v)} for k, v in {  # a map<string, string> here
                "precision_mode": "FP16", "max_workspace_size_bytes": workspace_bytes,
                "trt_engine_cache_enable": 1, "trt_engine_cache_path": "/tmp/bgert-trt-cache"}.items()],
        }]}}
    elif backend == "onnxruntime" and device == "gpu":
        cfg["optimization"] = {"input_pinned_memory": {"enable": True}, "output_pinned_memory": {"enable": True}}
    cfg["parameters"] = _params(params)
    return cfg


def tokenizer_config(name: str, manifest: Manifest, graph_inputs: list, *, instances: int, max_batch_size: int,
                     queue_delay_us: int) -> dict[str, Any]:
    """config.pbtxt fields of the python tokenizer model (TEXT in, the graph's id inputs out)."""
    return {
        "name": name,
        "backend": "python",
        "max_batch_size": max_batch_size,
        "input": [{"name": TEXT_INPUT, "data_type": Sym("TYPE_STRING"), "dims": [1]}],
        "output": [{"name": i["name"], "data_type": i["data_type"], "dims": [-1]} for i in graph_inputs],
        "dynamic_batching": {"max_queue_delay_microseconds": queue_delay_us},
        "instance_group": _instance_group("cpu", instances),
        "parameters": _params({"tokenizer_info": json.dumps(manifest.tokenizer_info),
                               "max_length": manifest.max_length,
                               "length_buckets": json.dumps(manifest.length_buckets)}),
    }


def ensemble_config(name: str, tokenizer: str, model: str, manifest: Manifest, graph_inputs: list, outputs: list,
                    max_batch_size: int) -> dict[str, Any]:
    """config.pbtxt fields of the ensemble TEXT → tokenizer → model; parameters tell clients the query instruction."""
    def maps(names: Sequence[str]) -> list[dict[str, str]]:
        return [{"key": n, "value": n} for n in names]

    ids = [i["name"] for i in graph_inputs]
    out_names = [o["name"] for o in outputs]
    extra = {k: manifest.get(k) for k in ("kind", "query_instruction", "query_instruction_format", "normalize",
                                          "dim", "max_length") if manifest.get(k) is not None}
    return {
        "name": name,
        "platform": "ensemble",
        "max_batch_size": max_batch_size,
        "input": [{"name": TEXT_INPUT, "data_type": Sym("TYPE_STRING"), "dims": [1]}],
        "output": outputs,
        "ensemble_scheduling": {"step": [
            {"model_name": tokenizer, "model_version": -1, "input_map": maps([TEXT_INPUT]), "output_map": maps(ids)},
            {"model_name": model, "model_version": -1, "input_map": maps(ids), "output_map": maps(out_names)},
        ]},
        "parameters": _params({f"bgert_{k}": v if isinstance(v, str) else json.dumps(v) for k, v in extra.items()}),
    }


def vendor_runtime(dest: str) -> None:
    """Copy the installed bgert.runtime modules into ``dest/bgert/runtime`` for python models to import.

    The package ``__init__`` files are replaced by empty ones, so a model imports only the modules it
    names (the tokenizer needs just ``tokenizers``, not onnxruntime).
    """
    import bgert.runtime

    src = os.path.dirname(os.path.abspath(bgert.runtime.__file__))
    pkg = os.path.join(dest, "bgert", "runtime")
    os.makedirs(pkg, exist_ok=True)
    for f in sorted(os.listdir(src)):
        if f.endswith(".py") and f != "__init__.py":
            shutil.copy2(os.path.join(src, f), pkg)
    for d in (os.path.join(dest, "bgert"), pkg):
        with open(os.path.join(d, "__init__.py"), "w", encoding="utf-8") as fh:
            fh.write('"""bgert.runtime modules vendored by `bgert triton-repo` for the python-backend models."""\n')


def _write_config(model_dir: str, cfg: dict[str, Any]) -> None:
    os.makedirs(os.path.join(model_dir, "1"), exist_ok=True)
    with open(os.path.join(model_dir, "config.pbtxt"), "w", encoding="utf-8") as f:
        f.write(f"# written by bgert triton-repo\n{dumps(cfg)}\n")


def _python_model(model_dir: str, source: str) -> None:
    version = os.path.join(model_dir, "1")
    os.makedirs(version, exist_ok=True)
    shutil.copy2(os.path.join(_HERE, source), os.path.join(version, "model.py"))
    vendor_runtime(version)


def _copy_graph(manifest: Manifest, graph: Graph, version_dir: str) -> None:
    """The graph file and its external data (``<file>.data``) side by side, under their own names."""
    os.makedirs(version_dir, exist_ok=True)
    for rel in (graph.file, graph.file + ".data"):
        if rel in manifest.raw["files"]:
            src, dst = manifest.path(rel), os.path.join(version_dir, os.path.basename(rel))
            try:
                os.link(src, dst)  # same filesystem: no copy of a multi-GB graph
            except OSError:
                shutil.copy2(src, dst)


def write_repository(artifact: str, out: str, *, backend: str = "onnxruntime", device: str = "gpu",
                     instances: int = 1, max_batch_size: int = 64, precision: str | None = None,
                     ensemble: bool = True, name: str | None = None, queue_delay_us: int = 500,
                     token_budget: int = DEFAULT_TOKEN_BUDGET, threads: int | None = None,
                     workspace_bytes: int = 1 << 30, force: bool = False) -> list[str]:
    """Add the models of ``artifact`` to the repository ``out``; returns the model names written.

    Raises FileExistsError when one of those model directories exists (``force`` replaces it),
    ValueError for bad options, ArtifactError for a damaged artifact.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if backend == "tensorrt" and device != "gpu":
        raise ValueError("the TensorRT accelerator needs --device gpu")
    for what, v in (("instances", instances), ("max_batch_size", max_batch_size), ("token_budget", token_budget)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{what} must be an int >= 1, got {v!r}")
    if queue_delay_us < 0:
        raise ValueError(f"queue_delay_us must be >= 0, got {queue_delay_us}")
    manifest = read_manifest(artifact)
    base = sanitize_name(name) if name else default_repo_name(manifest)
    graphs = choose_graphs(manifest, precision, device)
    with_ensemble = ensemble and manifest.kind in ENSEMBLE_KINDS and len(graphs) == 1
    if ensemble and not with_ensemble:
        log.warning("bgert: no raw-text ensemble for %s artifacts with %d graph(s) yet; writing the model step(s) "
                    "only (clients send token ids, e.g. backend='triton')", manifest.kind, len(graphs))
    names = [model_step_name(base, g) for g in graphs]
    if with_ensemble:
        names += [f"{base}_tokenizer", base]
    out = os.path.abspath(out)
    clash = [n for n in names if os.path.exists(os.path.join(out, n))]
    if clash and not force:
        raise FileExistsError(f"{out} already has model(s) {', '.join(clash)}; pass --force to replace them, "
                              "or --name to add the artifact under another name")
    os.makedirs(out, exist_ok=True)
    staging = os.path.join(out, f".bgert-tmp-{os.getpid()}")  # not a model: Triton ignores dot-directories
    shutil.rmtree(staging, ignore_errors=True)
    try:
        for g, step in zip(graphs, names):
            inputs, outputs = graph_io(manifest.path(g.file))
            d = os.path.join(staging, step)
            _copy_graph(manifest, g, os.path.join(d, "1"))
            if backend == "python":
                _python_model(d, "onnx_model.py")
            _write_config(d, model_step_config(
                step, g, manifest, inputs, outputs, backend=backend, device=device, instances=instances,
                max_batch_size=max_batch_size, queue_delay_us=queue_delay_us, token_budget=token_budget,
                threads=threads, workspace_bytes=workspace_bytes))
        if with_ensemble:
            tok = f"{base}_tokenizer"
            d = os.path.join(staging, tok)
            _python_model(d, "tokenizer_model.py")
            shutil.copy2(manifest.tokenizer_file, os.path.join(d, "1", "tokenizer.json"))
            _write_config(d, tokenizer_config(tok, manifest, inputs, instances=instances,
                                              max_batch_size=max_batch_size, queue_delay_us=queue_delay_us))
            _write_config(os.path.join(staging, base), ensemble_config(
                base, tok, names[0], manifest, inputs, outputs, max_batch_size))
        for n in names:
            target = os.path.join(out, n)
            if os.path.exists(target):
                shutil.rmtree(target)
            os.replace(os.path.join(staging, n), target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return names
