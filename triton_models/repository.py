"""Write a Triton model repository for a bgert artifact (``bgert triton-repo``).

For an artifact named N it writes, next to any models already in the repository:

- ``N_model``: the graph (version 1), token ids in, graph outputs out. ``--backend onnxruntime``
  uses Triton's ONNX Runtime backend, ``tensorrt`` the same backend with the TensorRT accelerator
  (FP16, workspace size), ``python`` a python-backend model running onnxruntime
  (triton_models/onnx_model.py; what the nvidia-pytriton server used by the tests can run).
  max_batch_size, dynamic batching (preferred sizes from the length buckets and token budget,
  a queue delay) and instance groups are set; parameters record the graph's sha256 and precision
  so ``TritonBackend`` refuses a model that is not the artifact's.
- ``N_tokenizer`` (python backend, triton_models/tokenizer_model.py), for BGE-M3 and rerankers
  ``N_postprocess`` (python backend, triton_models/postprocess_model.py), and the ensemble ``N``:
  raw strings (TYPE_STRING) → tokenizer → model → post-processing, so any Triton client can send
  text. Embedders and BGE-M3 take ``TEXT``; cross-encoder and LLM rerankers ``QUERY`` and
  ``PASSAGE`` (one pair per row). Outputs: embedders ``dense``; BGE-M3 ``dense_vecs``, lexical
  weights and ColBERT vectors as padded arrays with per-text counts (see postprocess_model.py);
  rerankers ``score`` (the logit) and ``normalized_score`` (its sigmoid). Texts are truncated as
  the runtime class truncates them by default, or to ``max_length`` tokens.

Python models import bgert.runtime's own tokenizer, batching, pair assembly, M3 post-processing
and ORT backend modules: the installed package's files are copied into each python model's
version directory (``1/bgert/runtime``), so the repository is self-contained and the server
needs only numpy, tokenizers and onnxruntime.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any, Sequence

from bgert.runtime.base import default_precision
from bgert.runtime.batching import DEFAULT_TOKEN_BUDGET
from bgert.runtime.m3 import sparse_drop_ids
from bgert.runtime.manifest import ArtifactError, Graph, Manifest, read_manifest
from bgert.runtime.registry import family
from bgert.runtime.reranker import default_query_max_length
from bgert.runtime.tokenize import check_max_length
from bgert.runtime.triton_backend import (PARAM_PRECISION, PARAM_SHA256, default_repo_name, model_step_name,
                                          sanitize_name)


log = logging.getLogger("bgert")

BACKENDS = ("onnxruntime", "tensorrt", "python")
DEVICES = ("gpu", "cpu")
#: BGE-M3 graph outputs → the ensemble outputs the post-processing step makes of them
M3_POSTPROCESS = {"sparse": ("lexical_ids", "lexical_weights", "lexical_lengths"),
                  "colbert": ("colbert_vecs", "colbert_lengths")}
_HERE = os.path.dirname(os.path.abspath(__file__))


def choose_graphs(manifest: Manifest, precision: str | None, device: str) -> list[Graph]:
    """The graphs to serve: of ``precision``, else of the first gate-passed precision preferred on ``device``."""
    have = manifest.precisions()
    if precision is None:
        precision = default_precision(manifest, device == "gpu")
        if precision is None:
            raise ArtifactError(f"{manifest.root}: no graph passed its quality gate; re-export the artifact.")
    elif precision not in have:
        raise ValueError(f"precision {precision!r} is not in this artifact; it has: {', '.join(have)}.")
    return [g for g in manifest.graphs if g.precision == precision]


def graph_io(path: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Inputs and outputs of an ONNX graph as Triton tensor specs (batch axis dropped, symbolic dims -1)."""
    import onnxruntime as ort

    from bgert.runtime.backends import ORT_NUMPY_TYPES

    np_to_triton_dtype = _tritonclient().utils.np_to_triton_dtype

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(path, sess_options=so, providers=["CPUExecutionProvider"])

    def spec(v: Any) -> dict[str, Any]:
        wire = np_to_triton_dtype(ORT_NUMPY_TYPES[v.type]) if v.type in ORT_NUMPY_TYPES else None
        if wire is None:
            raise ArtifactError(f"{path}: tensor {v.name!r} has type {v.type}, which has no Triton mapping here")
        dims = [d if isinstance(d, int) and d > 0 else -1 for d in v.shape[1:]]
        out = {"name": v.name, "data_type": f"TYPE_{wire}", "dims": dims or [1]}
        if not dims:  # one value per row ([batch]): Triton needs dims [1] reshaped to a scalar
            out["reshape"] = {"shape": []}
        return out

    return [spec(v) for v in sess.get_inputs()], [spec(v) for v in sess.get_outputs()]


def preferred_batch_sizes(buckets: Sequence[int], token_budget: int, max_batch_size: int) -> list[int]:
    """Rows that fill the token budget at each length bucket, capped at max_batch_size."""
    return sorted({max(1, min(max_batch_size, token_budget // b)) for b in buckets})


def _params(values: dict[str, Any]) -> dict[str, dict[str, str]]:
    return {k: {"string_value": str(v)} for k, v in values.items()}


def _instance_group(kind: str, count: int) -> list[dict[str, Any]]:
    return [{"count": count, "kind": f"KIND_{kind.upper()}"}]


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
            "parameters": {k: str(v) for k, v in {  # a map<string, string> here
                "precision_mode": "FP16", "max_workspace_size_bytes": workspace_bytes,
                "trt_engine_cache_enable": 1, "trt_engine_cache_path": "/tmp/bgert-trt-cache"}.items()},
        }]}}
    elif backend == "onnxruntime" and device == "gpu":
        cfg["optimization"] = {"input_pinned_memory": {"enable": True}, "output_pinned_memory": {"enable": True}}
    cfg["parameters"] = _params(params)
    return cfg


def text_max_length(manifest: Manifest, max_length: int | None = None) -> int:
    """Tokens a text (a pair, for rerankers) is truncated to: ``max_length``, else the runtime class's
    default (its family's ``default_text_length``: embedders the model's max length, BGE-M3 512 as
    BGEM3FlagModel, rerankers the manifest's default_max_length), capped at the model's max length."""
    if max_length is None:
        max_length = family(manifest.kind).default_text_length(manifest)
    return check_max_length(max_length, manifest.max_length)


def text_inputs(manifest: Manifest) -> tuple[str, ...]:
    """The ensemble's raw-text inputs (TEXT, or QUERY and PASSAGE), from the artifact's family."""
    return family(manifest.kind).triton_text_inputs or ()


def _python_step(name: str, inputs: list, outputs: list, *, instances: int, max_batch_size: int,
                 queue_delay_us: int, params: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "backend": "python",
        "max_batch_size": max_batch_size,
        "input": inputs,
        "output": outputs,
        "dynamic_batching": {"max_queue_delay_microseconds": queue_delay_us},
        "instance_group": _instance_group("cpu", instances),
        "parameters": _params(params),
    }


def _strings(names: Sequence[str]) -> list[dict[str, Any]]:
    return [{"name": n, "data_type": "TYPE_STRING", "dims": [1]} for n in names]


def _renamed(spec: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    """``spec`` under ``name``, without a reshape: ensemble tensors between steps carry the config dims."""
    return {**{k: v for k, v in spec.items() if k != "reshape"}, "name": name or spec["name"]}


def tokenizer_config(name: str, manifest: Manifest, graph_inputs: list, *, instances: int, max_batch_size: int,
                     queue_delay_us: int, max_length: int | None = None) -> dict[str, Any]:
    """config.pbtxt fields of the python tokenizer model (TEXT, or QUERY and PASSAGE, in; the graph's id inputs out)."""
    length = text_max_length(manifest, max_length)
    params: dict[str, Any] = {"tokenizer_info": json.dumps(manifest.tokenizer_info), "max_length": length,
                              "length_buckets": json.dumps(manifest.length_buckets)}
    assembly = family(manifest.kind).triton_assembly(manifest)
    if assembly is not None:
        s = manifest.section
        params.update({"assembly": json.dumps(assembly),
                       "pad_to_multiple_of": s.pad_to_multiple_of,
                       "query_max_length": default_query_max_length(length),
                       "model_max_length": manifest.max_length,
                       "truncation_side": s.truncation_side,
                       "instructions": json.dumps({"query": s.query_instruction_for_rerank,
                                                   "passage": s.passage_instruction_for_rerank})})
    return _python_step(name, _strings(text_inputs(manifest)),
                        [{"name": i["name"], "data_type": i["data_type"], "dims": [-1]} for i in graph_inputs],
                        instances=instances, max_batch_size=max_batch_size, queue_delay_us=queue_delay_us,
                        params=params)


def postprocess_config(name: str, manifest: Manifest, graph_inputs: list, graph_outputs: list, *, instances: int,
                       max_batch_size: int, queue_delay_us: int) -> dict[str, Any] | None:
    """config.pbtxt fields of the python post-processing model, or None when the kind needs none
    (embedders, BGE-M3 with the dense head only)."""
    specs = {o["name"]: o for o in graph_outputs}
    fam = family(manifest.kind)
    step = fam.triton_postprocess
    if step is None:
        return None
    if fam.gives_scores():  # the sigmoid of the score
        score = specs[manifest.section.output_name]
        return _python_step(name, [_renamed(score)], [_renamed(score, "normalized_score")], instances=instances,
                            max_batch_size=max_batch_size, queue_delay_us=queue_delay_us, params={"kind": step})
    heads = [h for h in M3_POSTPROCESS if h in specs]  # BGE-M3's lexical weights and ColBERT vectors
    if not heads:
        return None
    dim = specs["colbert"]["dims"][-1] if "colbert" in specs else None
    out_specs = {"lexical_ids": ("TYPE_INT64", [-1]), "lexical_weights": ("TYPE_FP32", [-1]),
                 "lexical_lengths": ("TYPE_INT32", [1]), "colbert_vecs": ("TYPE_FP32", [-1, dim]),
                 "colbert_lengths": ("TYPE_INT32", [1])}
    outputs = [{"name": n, "data_type": out_specs[n][0], "dims": out_specs[n][1]}
               for h in heads for n in M3_POSTPROCESS[h]]
    ids = [{"name": i["name"], "data_type": i["data_type"], "dims": [-1]} for i in graph_inputs
           if i["name"] in ("input_ids", "attention_mask")]
    return _python_step(name, ids + [specs[h] for h in heads], outputs, instances=instances,
                        max_batch_size=max_batch_size, queue_delay_us=queue_delay_us,
                        params={"kind": step, "sparse_drop_ids": json.dumps(sparse_drop_ids(manifest).tolist())})


def ensemble_config(name: str, tokenizer: str, model: str, manifest: Manifest, graph_inputs: list,
                    graph_outputs: list, max_batch_size: int, postprocess: dict[str, Any] | None = None
                    ) -> dict[str, Any]:
    """config.pbtxt fields of the ensemble text → tokenizer → model (→ post-processing, whose config
    ``postprocess`` is); parameters tell clients the query instruction."""
    def maps(names: Sequence[str], to: dict[str, str] | None = None) -> dict[str, str]:
        return {n: (to or {}).get(n, n) for n in names}

    fam = family(manifest.kind)
    texts = list(text_inputs(manifest))
    ids = [i["name"] for i in graph_inputs]
    out_names = [o["name"] for o in graph_outputs]
    rename = fam.triton_renames
    outputs = [_renamed(o, rename.get(o["name"], o["name"])) for o in graph_outputs
               if postprocess is None or fam.gives_scores() or o["name"] not in M3_POSTPROCESS]
    steps = [{"model_name": tokenizer, "model_version": -1, "input_map": maps(texts), "output_map": maps(ids)},
             {"model_name": model, "model_version": -1, "input_map": maps(ids),
              "output_map": maps(out_names, rename)}]
    if postprocess is not None:
        post_out = [o["name"] for o in postprocess["output"]]
        steps.append({"model_name": postprocess["name"], "model_version": -1,
                      "input_map": maps([i["name"] for i in postprocess["input"]]), "output_map": maps(post_out)})
        outputs += postprocess["output"]
    extra = {k: manifest.get(k) for k in ("kind", "query_instruction", "query_instruction_format", "normalize",
                                          "dim", "max_length") if manifest.get(k) is not None}
    return {
        "name": name,
        "platform": "ensemble",
        "max_batch_size": max_batch_size,
        "input": _strings(texts),
        "output": outputs,
        "ensemble_scheduling": {"step": steps},
        "parameters": _params({f"bgert_{k}": v if isinstance(v, str) else json.dumps(v) for k, v in extra.items()}),
    }


def vendor_runtime(dest: str) -> None:
    """Copy the installed bgert.runtime modules into ``dest/bgert/runtime`` (and the python models' shared
    config reader into ``dest/bgert/triton_models``) for python models to import.

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
    models = os.path.join(dest, "bgert", "triton_models")
    os.makedirs(models, exist_ok=True)
    shutil.copy2(os.path.join(_HERE, "python_model.py"), models)
    for d in (os.path.join(dest, "bgert"), pkg, models):
        with open(os.path.join(d, "__init__.py"), "w", encoding="utf-8") as fh:
            fh.write('"""bgert modules vendored by `bgert triton-repo` for the python-backend models."""\n')


def _tritonclient() -> Any:
    """tritonclient (its dtype names and Triton's ModelConfig protobuf), or an ImportError saying how to get it."""
    try:
        import tritonclient.grpc.model_config_pb2  # noqa: F401
        import tritonclient.utils  # noqa: F401
    except ImportError as e:
        raise ImportError(f"bgert triton-repo needs tritonclient ({e}); install it with "
                          "pip install 'bgert[triton]'") from e
    return tritonclient


def config_text(cfg: dict[str, Any]) -> str:
    """``cfg`` (model config fields in protobuf's JSON mapping) as config.pbtxt text: checked against
    Triton's ModelConfig message (tritonclient's model_config_pb2) and written by protobuf itself."""
    from google.protobuf import json_format, text_format

    try:
        msg = json_format.ParseDict(cfg, _tritonclient().grpc.model_config_pb2.ModelConfig())
    except json_format.ParseError as e:  # a bug here, not the user's: say which config
        raise ValueError(f"bgert built an invalid config.pbtxt for {cfg.get('name')!r}: {e}") from e
    return text_format.MessageToString(msg)


def _write_config(model_dir: str, cfg: dict[str, Any]) -> None:
    os.makedirs(os.path.join(model_dir, "1"), exist_ok=True)
    with open(os.path.join(model_dir, "config.pbtxt"), "w", encoding="utf-8") as f:
        f.write(f"# written by bgert triton-repo\n{config_text(cfg)}")


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
                     workspace_bytes: int = 1 << 30, max_length: int | None = None,
                     force: bool = False) -> list[str]:
    """Add the models of ``artifact`` to the repository ``out``; returns the model names written.

    ``max_length``: tokens the ensemble's tokenizer truncates a text (a pair) to; default: the
    runtime class's default (see text_max_length).

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
    with_ensemble = ensemble and bool(text_inputs(manifest)) and len(graphs) == 1
    if ensemble and not with_ensemble:
        log.warning("bgert: no raw-text ensemble for %s artifacts with %d graph(s) yet; writing the model step(s) "
                    "only (clients send token ids, e.g. backend='triton')", manifest.kind, len(graphs))
    if with_ensemble:
        text_max_length(manifest, max_length)  # a bad max_length fails before anything is written
    names = [model_step_name(base, g) for g in graphs]
    io = [graph_io(manifest.path(g.file)) for g in graphs]
    post = None
    if with_ensemble:
        post = postprocess_config(f"{base}_postprocess", manifest, *io[0], instances=instances,
                                  max_batch_size=max_batch_size, queue_delay_us=queue_delay_us)
        names += [f"{base}_tokenizer", *([post["name"]] if post else []), base]
    out = os.path.abspath(out)
    clash = [n for n in names if os.path.exists(os.path.join(out, n))]
    if clash and not force:
        raise FileExistsError(f"{out} already has model(s) {', '.join(clash)}; pass --force to replace them, "
                              "or --name to add the artifact under another name")
    os.makedirs(out, exist_ok=True)
    staging = os.path.join(out, f".bgert-tmp-{os.getpid()}")  # not a model: Triton ignores dot-directories
    shutil.rmtree(staging, ignore_errors=True)
    try:
        for g, step, (inputs, outputs) in zip(graphs, names, io):
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
            _write_config(d, tokenizer_config(tok, manifest, inputs, instances=instances, max_batch_size=max_batch_size,
                                              queue_delay_us=queue_delay_us, max_length=max_length))
            if post is not None:
                d = os.path.join(staging, post["name"])
                _python_model(d, "postprocess_model.py")
                _write_config(d, post)
            _write_config(os.path.join(staging, base), ensemble_config(
                base, tok, names[0], manifest, inputs, outputs, max_batch_size, post))
        for n in names:
            target = os.path.join(out, n)
            if os.path.exists(target):
                shutil.rmtree(target)
            os.replace(os.path.join(staging, n), target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return names
