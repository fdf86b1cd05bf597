"""The export pipeline: checkpoint → ONNX graph(s) + tokenizer.json + manifest.json, atomically.

Every artifact is built in a temporary directory beside the destination and renamed into place
only after the graphs were traced, optimised, hashed and checked for parity against the PyTorch
model. An interrupted export leaves nothing at the destination.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import logging
import os
import shutil
import socket
import tempfile
from collections import Counter
from typing import Any, Sequence

from bgert.quality import FP32_COS_MIN, FP32_MAX_ABS_DIFF
from bgert.runtime.manifest import default_buckets, list_files, sha256_file, write_manifest

from .detect import detect
from .errors import ExportError
from .onnx_io import DEFAULT_OPSET, export_onnx, optimize
from .output_fields import output_fields
from .specs import spec_for

log = logging.getLogger("bgert.export")

WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".json", ".model", ".txt")


def resolve_source(src: str) -> str:
    """A local checkpoint directory as is; otherwise a hub id, downloaded when the network allows."""
    if os.path.isdir(src):
        return os.path.abspath(src)
    if os.path.exists(src):
        raise ExportError(f"{src!r} is a file, not a checkpoint directory")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(src)
    except Exception as e:  # offline, unknown id, auth…
        raise ExportError(f"{src!r} is not a local directory and could not be fetched from the hub ({e}). "
                          "Pass a local checkpoint directory.") from e


def checkpoint_hash(path: str) -> str:
    """sha256 over the names and hashes of the checkpoint's weight/config/tokenizer files."""
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(path)):
        for f in sorted(files):
            if f.endswith(WEIGHT_FILES):
                full = os.path.join(root, f)
                h.update(os.path.relpath(full, path).encode())
                h.update(sha256_file(full).encode())
    return h.hexdigest()


def tokenizer_info(tok: Any, max_length: int) -> dict[str, Any]:
    """Special-token ids and padding side the runtime's post-processing needs."""
    ids = {f"{name}_token_id": getattr(tok, f"{name}_token_id", None)
           for name in ("pad", "cls", "sep", "bos", "eos", "unk", "mask")}
    return {"file": "tokenizer.json", **{k: v for k, v in ids.items() if v is not None},
            "padding_side": getattr(tok, "padding_side", "right"), "model_max_length": max_length,
            "class": type(tok).__name__}


class _Steps:
    """A progress bar over the named export steps (tqdm when installed)."""

    def __init__(self, names: Sequence[str], enabled: bool):
        self.bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=len(names), desc="export", unit="step")
            except ImportError:
                pass

    def __call__(self, name: str) -> None:
        log.info("export: %s", name)
        if self.bar is not None:
            self.bar.set_postfix_str(name)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def export(src: str, out: str, *, kind: str = "auto", max_length: int | None = None, force: bool = False,
           opset: int = DEFAULT_OPSET, optimize_graph: bool = True, precisions: Sequence[str] = ("fp32",),
           progress: bool = True, fp32_gate: float = FP32_COS_MIN, **options: Any) -> str:
    """Export the checkpoint ``src`` into the artifact directory ``out`` and return its path.

    ``options`` go to the family spec (e.g. normalize, query_instruction, heads, cutoff_layers).
    Raises FileExistsError when ``out`` exists and ``force`` is false, ExportError when the
    exported graph misses the fp32 parity gate (cosine or score agreement with PyTorch).
    """
    import torch
    from transformers import AutoTokenizer

    out = os.path.abspath(out)
    if os.path.exists(out) and not force:
        raise FileExistsError(f"{out} exists; pass --force (force=True) to replace it")
    src = resolve_source(src)
    info = detect(src, kind)
    if max_length is not None:
        if max_length < 2:
            raise ExportError(f"max_length must be >= 2, got {max_length}")
        if max_length > info.max_length:
            log.warning("max_length %d is above the model's limit %d; using %d", max_length, info.max_length,
                        info.max_length)
        info.max_length = min(max_length, info.max_length)
    precisions = list(dict.fromkeys(["fp32", *precisions]))
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    _remove_stale(out)
    tmp = tempfile.mkdtemp(prefix=_work_prefix(out, "tmp"), dir=parent)
    steps = _Steps(["load", "trace", "optimize", "tokenizer", "parity", *precisions[1:], "write"], progress)
    try:
        torch.manual_seed(0)
        spec = spec_for(info, options)
        hf_tok = AutoTokenizer.from_pretrained(src)
        plans = spec.graph_plans()
        steps("load")
        for plan in plans:
            export_onnx(plan.module, spec.sample_inputs(hf_tok), os.path.join(tmp, plan.file), spec.inputs,
                        spec.outputs if plan.output_names is None else
                        {k: v for k, v in spec.outputs.items() if k in plan.output_names}, opset)
        steps("trace")
        fused: dict[str, dict[str, int]] = {}  # per graph file: each graph has its own fusions
        if optimize_graph:
            for plan in plans:
                fused[plan.file] = optimize(os.path.join(tmp, plan.file), spec.optimizer_model_type)
        steps("optimize")
        hf_tok.backend_tokenizer.save(os.path.join(tmp, "tokenizer.json"))
        steps("tokenizer")
        raw: dict[str, Any] = {
            "kind": info.kind,
            "family": info.family,
            "source": {"path": src, "name": os.path.basename(os.path.normpath(src)), "sha256": checkpoint_hash(src),
                       "architectures": info.config.get("architectures"), "model_type": info.family},
            "max_length": info.max_length,
            "tokenizer": tokenizer_info(hf_tok, info.max_length),
            "inputs": [{"name": k, "dtype": "int64", "axes": {str(a): n for a, n in v.items()}}
                       for k, v in spec.inputs.items()],
            "outputs": [{"name": k, "dtype": "float32", "axes": {str(a): n for a, n in v.items()}}
                        for k, v in spec.outputs.items()],
            "length_buckets": default_buckets(info.max_length),
            "opset": opset,
            "fused_ops": dict(sum(map(Counter, fused.values()), Counter())),  # all graphs' (each has its own)
            **spec.manifest_fields(hf_tok),
            "graphs": [{"file": p.file, "precision": "fp32", **p.fields,
                        **({"fused_ops": fused[p.file]} if fused.get(p.file) else {})} for p in plans],
            "export": {"bgert_version": _version(), "torch": torch.__version__, "transformers": _pkg("transformers"),
                       "onnx": _pkg("onnx"), "onnxruntime": _pkg("onnxruntime"),
                       "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")},
        }
        raw["files"] = list_files(tmp)
        write_manifest(tmp, raw)
        parity = spec.parity(tmp, hf_tok, "fp32")
        steps("parity")
        _gate_fp32(parity, fp32_gate)
        for g in raw["graphs"]:
            g["quality"] = parity
            g["gate_passed"] = True
        raw["parity"] = {"fp32": parity}
        raw.update(output_fields(tmp, info.kind, raw.get("dim"), options))
        for precision in precisions[1:]:
            from .precision import add_variant  # only needed for fp16/int8 variants

            add_variant(tmp, raw, spec, hf_tok, precision, options)
            steps(precision)
        raw["files"] = list_files(tmp, raw["files"])
        write_manifest(tmp, raw)
        steps("write")
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        steps.close()
    return out


def _gate_fp32(parity: dict[str, Any], gate: float) -> None:
    if "cos_min" in parity and parity["cos_min"] < gate:
        raise ExportError(f"fp32 export misses its parity gate: min cosine against PyTorch {parity['cos_min']:.6f} "
                          f"< {gate}. This is a bug: please report it with the model's config.json.")
    if "cos_min" not in parity and parity.get("max_abs_diff", 0.0) > FP32_MAX_ABS_DIFF:
        raise ExportError(f"fp32 export misses its parity gate: max |score diff| against PyTorch "
                          f"{parity['max_abs_diff']:.2e} > {FP32_MAX_ABS_DIFF}.")


def _replace(tmp: str, out: str) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` is moved aside first and removed after."""
    old = None
    if os.path.exists(out):
        old = tempfile.mkdtemp(prefix=_work_prefix(out, "old"), dir=os.path.dirname(out))
        os.rmdir(old)
        os.rename(out, old)
    os.rename(tmp, out)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def _work_prefix(out: str, what: str) -> str:
    """Name prefix of a hidden work directory beside ``out``: ``.NAME.tmp-HOST-PID-`` (or ``.old-``).

    Host and pid let a later export tell whether the export that made it is still running.
    """
    return f".{os.path.basename(out)}.{what}-{socket.gethostname()}-{os.getpid()}-"


def _remove_stale(out: str) -> None:
    """Delete work directories beside ``out`` left by exports on this host whose process is gone.

    A SIGKILL, OOM kill or power cut skips the cleanup in ``export``; the hidden directory would
    otherwise keep a whole model's worth of disk. Directories of live exports are left alone.
    """
    parent, host = os.path.dirname(out), socket.gethostname()
    for what in ("tmp", "old"):
        prefix = f".{os.path.basename(out)}.{what}-{host}-"
        for name in os.listdir(parent):
            pid = name[len(prefix):].split("-", 1)[0] if name.startswith(prefix) else ""
            if pid.isdigit() and not _alive(int(pid)):
                log.warning("removing %s, left behind by an interrupted export", os.path.join(parent, name))
                shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (always true off POSIX, where we cannot ask safely)."""
    if os.name != "posix":
        return True  # os.kill(pid, 0) would send CTRL_C_EVENT on Windows
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _pkg(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _version() -> str:
    return _pkg("bgert") or "0+unknown"
