"""Precision variants of an exported artifact (fp16, int8 dynamic, int8 static QDQ), each with a measured
quality gate.

``add_variant`` is called by the exporter once per requested precision after the fp32 graphs passed
their parity gate. For every fp32 graph (one, or one per layerwise cutoff) it writes the variant graph
beside it, measures it and records the result in the manifest entry of the graph:

- ``fp16``: ORT's transformer optimizer with the family's model type, then float16 with fp32 inputs and
  outputs; norm statistics (Pow, ReduceMean, Sqrt), reductions and Softmax stay fp32.
- ``int8``: dynamic quantization for CPUs, per-channel signed weights, smoothed activations and the most
  sensitive nodes in fp32 (bgert.export.quantize): as few as the calibration text allows (FP32_NODE_LADDER,
  each fp32 MatMul is a fp32 GEMM in an int8 graph). Two graphs: ``int8`` with 7-bit weights
  (reduce_range), which holds its gate on every CPU, and ``int8-vnni`` with full-range weights, which is
  better but saturates in u8×s8 products on CPUs without VNNI: the runtime picks it only on VNNI CPUs.
- ``int8-static``: QDQ with activation ranges calibrated on real text (TensorRT's form, also run by the
  CPU provider); MatMul outputs stay float.
- ``bf16``: no new file: the entry names the fp32 graph with ``backend: openvino`` (OpenVINO reads it with
  ``INFERENCE_PRECISION_HINT bf16``) and ``requires_cpu_flags`` amx_bf16/avx512_bf16. It is measured
  against fp32 only on a CPU with one of them and OpenVINO installed; elsewhere it is recorded as not
  measured (gate_passed false, never a default) and the export goes on.
- ``ov-int8``: OpenVINO IR (``model.ov-int8.xml`` + ``.bin``) quantized by NNCF (``nncf.quantize``,
  ModelType.TRANSFORMER, SmoothQuant on the MatMuls) on the same calibration documents and queries as
  ``int8``, gated with int8's gates on the held-out documents and queries; ``backend: openvino``.

Quality is measured on held-out text (SciFact sample documents and queries shipped with bgert, and the
parity texts) against the fp32 graph, output by output as its family types it (bgert.runtime.registry,
statistics from bgert.quality): cosine (mean, min) for vectors, token vectors and lexical weights,
Spearman correlation and top-k agreement for scores. int8 graphs are measured twice: as this CPU runs them and
with exact integer arithmetic (what a VNNI / AMX / ARM-dot CPU computes), and the gate must hold for
both. The family's own parity against PyTorch (``spec.parity``) is recorded too. A variant that misses
its gate fails the export (ExportError) unless ``keep_failed``; a kept one is marked failed and never
chosen by default.

Options (``bgert.export.export(..., **options)``): ``keep_failed``, ``gates`` ({precision: {metric:
value}}), ``calibration`` (a .jsonl with text/title fields or a .txt with one text per line),
``calibration_size``, ``quality_size``, ``calibration_method`` ("minmax" or "percentile"),
``calibration_percentile``, ``int8_smooth`` ("auto", an alpha, or None), ``int8_fp32_nodes`` ("auto": for the
dynamic graphs the fewest of FP32_NODE_LADDER that clears the gate on the calibration text with a margin, for
int8-static a quarter; or a fraction or count of quantizable nodes kept fp32), ``int8_isa_variant`` (write int8-vnni, default True),
``static_activations`` ("uint8", or "int8" symmetric for TensorRT).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np

from bgert.quality import GATE_METRICS, PRECISION_GATES, compare_output, gate_failures, summarize
from bgert.runtime.base import cpu_int8_dot_exact
from bgert.runtime.batching import pad, plan_batches
from bgert.runtime.manifest import list_files, write_manifest
from bgert.runtime.registry import family

from . import quantize as q
from .errors import ExportError
from .onnx_io import fuse, fusion_name
from .parity import PARITY_PAIRS, PARITY_TEXTS

log = logging.getLogger("bgert.export")

VARIANTS = ("fp16", "int8", "int8-static", "bf16", "ov-int8")
VNNI = "int8-vnni"
#: ops float16 conversion leaves in fp32 (besides ORT's own list): norm statistics, reductions, softmax
FP16_KEEP_FP32 = ("Pow", "ReduceMean", "ReduceSum", "ReduceL2", "Sqrt", "Softmax")
#: x86 flags with non-saturating u8×s8 dot products; graphs needing them carry this list
VNNI_FLAGS = ["avx512_vnni", "avx_vnni", "amx_int8"]
STANDARD_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
BUNDLED_DOCS, BUNDLED_QUERIES = "scifact_sample.jsonl", "scifact_queries_sample.jsonl"
HELD_OUT_START = 100  # bundled documents [0, 100) calibrate, [100, 200) are held out
#: degenerate inputs every calibration set includes: static ranges must cover a sequence of specials only
SHORT_CALIBRATION = ["", "ok", "see above"]


@dataclass
class Settings:
    """The options this module reads, with defaults."""

    keep_failed: bool = False
    gates: dict[str, dict[str, float]] | None = None
    calibration: str | None = None
    calibration_size: int = 32
    quality_size: int = 16
    calibration_method: str = "minmax"
    calibration_percentile: float = 99.99
    int8_smooth: str | float | None = "auto"
    int8_fp32_nodes: float | str = "auto"
    int8_isa_variant: bool = True
    static_activations: str = "uint8"

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> "Settings":
        s = cls(**{k: options[k] for k in cls.__dataclass_fields__ if options.get(k) is not None})
        if s.calibration_method not in ("minmax", "percentile"):
            raise ExportError(f"calibration_method must be 'minmax' or 'percentile', got {s.calibration_method!r}")
        if s.int8_fp32_nodes != "auto" and (not isinstance(s.int8_fp32_nodes, (int, float)) or s.int8_fp32_nodes < 0) \
                or s.calibration_size < 1 or s.quality_size < 1:
            raise ExportError(f"int8_fp32_nodes must be 'auto' or >= 0 (a fraction < 1 or a count) and calibration_size, "
                              f"quality_size >= 1; got {s.int8_fp32_nodes}, {s.calibration_size}, {s.quality_size}")
        if not 50 < s.calibration_percentile <= 100:
            raise ExportError(f"calibration_percentile must lie in (50, 100], got {s.calibration_percentile}")
        if s.static_activations not in ("uint8", "int8"):
            raise ExportError(f"static_activations must be 'uint8' or 'int8', got {s.static_activations!r}")
        if s.calibration is not None and not os.path.isfile(s.calibration):
            raise ExportError(f"calibration file {s.calibration!r} not found (a .jsonl with 'text' fields or a "
                              ".txt with one text per line)")
        unknown = set(s.gates or {}) - set(PRECISION_GATES)
        if unknown:
            raise ExportError(f"gates given for unknown precision(s) {sorted(unknown)}; known: {list(PRECISION_GATES)}")
        return s

    def gate(self, precision: str) -> dict[str, float]:
        g = dict(PRECISION_GATES[precision])
        g.update((self.gates or {}).get(precision, {}))
        if precision == VNNI and self.gates and "int8" in self.gates and VNNI not in self.gates:
            g.update(self.gates["int8"])  # a gate given for int8 holds for both int8 graphs
        return g


# ---- text --------------------------------------------------------------------------------------
def read_texts(path: str) -> list[str]:
    """Texts from a .jsonl (``title`` + ``text`` fields, or ``text``) or a plain file (one per line)."""
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    if path.endswith(".jsonl"):
        out = []
        for i, line in enumerate(lines):
            try:
                d = json.loads(line)
            except ValueError as e:
                raise ExportError(f"{path}:{i + 1} is not JSON ({e})") from e
            out.append((str(d.get("title") or "") + " " + str(d.get("text") or "")).strip())
        return [t for t in out if t]
    return lines


def _bundled(name: str) -> list[str]:
    from importlib.resources import as_file, files

    with as_file(files("bgert.benchmarks") / "data" / name) as p:
        return read_texts(str(p))


def text_sets(s: Settings, kind: str) -> tuple[list[Any], list[Any]]:
    """(calibration, held-out) inputs: texts, or (query, passage) pairs for rerankers."""
    docs, queries = _bundled(BUNDLED_DOCS), _bundled(BUNDLED_QUERIES)
    half = len(queries) // 2
    calib = (read_texts(s.calibration) if s.calibration else docs[:HELD_OUT_START])[:s.calibration_size]
    calib = SHORT_CALIBRATION + calib
    calib_q, held_q = queries[:half], queries[half:]
    held = docs[HELD_OUT_START:HELD_OUT_START + s.quality_size]
    if family(kind).gives_scores():  # rerankers: (query, passage) pairs in
        pair = lambda qs, ds: [(qs[i % len(qs)], d) for i, d in enumerate(ds)]  # noqa: E731
        return pair(calib_q, calib), pair(held_q, held) + pair(held_q[::-1], held[:len(held_q)]) + PARITY_PAIRS
    return calib + calib_q, held + held_q + PARITY_TEXTS


def token_ids(hf_tok: Any, items: Sequence[Any], max_length: int) -> list[list[int]]:
    """Token ids of texts or pairs, truncated like the family's tokenizer does by default."""
    if items and isinstance(items[0], tuple):
        enc = hf_tok([a for a, _ in items], [b for _, b in items], truncation=True, max_length=max_length)
    else:
        enc = hf_tok(list(items), truncation=True, max_length=max_length)
    return [list(x) for x in enc["input_ids"]]


def feeds(seqs: Sequence[Sequence[int]], input_names: Sequence[str], pad_id: int, side: str,
          budget: int = 8192) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
    """Length-sorted padded batches as graph feeds (standard encoder/decoder inputs only)."""
    for b in plan_batches([len(x) for x in seqs], [], budget, 32):
        ids, mask = pad([seqs[i] for i in b.indices], b.length, pad_id, side)
        f = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in input_names:
            f["token_type_ids"] = np.zeros_like(ids)
        if "position_ids" in input_names:
            f["position_ids"] = np.maximum(np.cumsum(mask, 1) - 1, 0)
        yield f, mask


# ---- sessions and comparison -------------------------------------------------------------------
def _session(path: str, exact: bool = False) -> Any:
    """A CPU session; ``exact`` turns graph optimisations off so fake-quant nodes run as written."""
    import onnxruntime as ort

    from bgert.runtime.backends import session_options

    so = session_options(graph_optimization_level="disable" if exact else "all")
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def input_names(path: str) -> list[str]:
    """The graph's inputs, read from the ONNX file without its weights (no session is built for this)."""
    import onnx

    graph = onnx.load(path, load_external_data=False).graph
    weights = {i.name for i in graph.initializer}
    return [i.name for i in graph.input if i.name not in weights]


def graph_outputs(path: str, batches: Sequence[dict[str, np.ndarray]], exact: bool = False) -> dict[str, list]:
    sess = _session(path, exact)
    names = [o.name for o in sess.get_outputs()]
    inputs = {i.name for i in sess.get_inputs()}
    out: dict[str, list] = {n: [] for n in names}
    for f in batches:
        for n, v in zip(names, sess.run(names, {k: v for k, v in f.items() if k in inputs})):
            out[n].append(np.asarray(v, dtype=np.float32))
    return out


def compare(ref: dict[str, list], got: dict[str, list], types: dict[str, str]) -> dict[str, Any]:
    """Per graph output, its quality by its type (``types``: output name → bgert.runtime.registry
    OUTPUT_TYPES, from the artifact's family): cosine stats, or score stats of each score column."""
    return {name: compare_output(types[name], chunks, got[name]) for name, chunks in ref.items()}


def output_types(kind: str, names: Sequence[str]) -> dict[str, str]:
    """The quality type of each graph output of a ``kind`` artifact (its family's ``outputs``)."""
    fam = family(kind)
    return {n: fam.output_type(n) for n in names}


# ---- variant builders --------------------------------------------------------------------------
def variant_file(fp32_file: str, precision: str) -> str:
    root, ext = os.path.splitext(fp32_file)
    return f"{root}.{precision}{ext}"


def make_fp16(src: str, dst: str, model_type: Any) -> None:
    """Fusions for ``model_type`` (when ORT has them), then float16 with fp32 I/O and FP16_KEEP_FP32 in fp32."""
    import onnx
    from onnxruntime.transformers import float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    model = fuse(src, model_type) if model_type else OnnxModel(onnx.load(src))
    with contextlib.redirect_stdout(io.StringIO()):
        block = list(float16.DEFAULT_OP_BLOCK_LIST) + list(FP16_KEEP_FP32)
        model.convert_float_to_float16(keep_io_types=True, op_block_list=block,
                                       node_block_list=rotary_nodes(model.model))
    q.save(model.model, dst)


def rotary_nodes(model: Any) -> list[str]:
    """Names of the nodes computing rotary angles (everything upstream of Cos and Sin): in fp16 an angle
    position × frequency near position 500 is off by up to 0.25 rad, so these stay fp32."""
    producer = {o: n for n in model.graph.node for o in n.output}
    keep: dict[str, None] = {}
    todo = [i for n in model.graph.node if n.op_type in ("Cos", "Sin") for i in n.output]
    while todo:
        n = producer.get(todo.pop())
        if n is not None and n.name not in keep:
            keep[n.name] = None
            todo.extend(n.input)
    return list(keep)


def _int8_source(tmp_dir: str, graph: dict[str, Any], hf_tok: Any, raw: dict[str, Any],
                 calib: Sequence[Any]) -> tuple[Any, list[q.Target], Any]:
    """The fp32 graph, its quantizable nodes and a factory of calibration feeds."""
    path = os.path.join(tmp_dir, graph["file"])
    model = q.load(path)
    tgts = q.targets(model)
    if not tgts:
        raise ExportError(f"{graph['file']} has no MatMul with a constant weight to quantize")
    names = input_names(path)
    if not set(names) <= set(STANDARD_INPUTS):
        raise ExportError(f"{graph['file']} takes inputs {names}; int8 calibration feeds only "
                          f"{', '.join(STANDARD_INPUTS)}")
    seqs = token_ids(hf_tok, calib, raw["max_length"])
    return model, tgts, lambda: feeds(seqs, names, *_pad(raw))


def _pad(raw: dict[str, Any]) -> tuple[int, str]:
    tok = raw.get("tokenizer", {})
    return int(tok.get("pad_token_id") or 0), str(raw.get("padding_side") or tok.get("padding_side") or "right")


def _cached(spec: Any, key: tuple, make: Any) -> Any:
    """A value computed once per export (fp32 statistics and outputs shared by every variant)."""
    cache = spec.__dict__.setdefault("_precision_cache", {})
    if key not in cache:
        cache[key] = make()
    return cache[key]


def _copy_model(model: Any) -> Any:
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    return m


# ---- the exporter's hook -----------------------------------------------------------------------
def add_variant(tmp_dir: str, raw: dict[str, Any], spec: Any, hf_tokenizer: Any, precision: str,
                options: dict[str, Any]) -> None:
    """Write the ``precision`` variant of every fp32 graph into ``tmp_dir``, measure and gate it, and
    append its entries to ``raw['graphs']`` (quality, gate_passed, the fp32 graph's extra fields)."""
    if precision not in VARIANTS:
        raise ExportError(f"unknown precision {precision!r}; choose from fp32, {', '.join(VARIANTS)}")
    s = Settings.from_options(options)
    sources = [g for g in raw["graphs"] if g["precision"] == "fp32"]
    calib, held = text_sets(s, raw["kind"])
    if precision == "bf16":
        return _add_bf16(tmp_dir, raw, spec, hf_tokenizer, sources, held, s)
    if precision == "ov-int8":
        return _add_ov_int8(tmp_dir, raw, spec, hf_tokenizer, sources, calib, held, s)
    work = tempfile.mkdtemp(prefix=f".{os.path.basename(tmp_dir)}.{precision}-", dir=os.path.dirname(tmp_dir))
    try:
        made: dict[str, list[tuple[dict[str, Any], dict[str, Any], str | None]]] = {}
        t0 = time.perf_counter()
        for g in sources:
            for p, entry, exact in _build(tmp_dir, g, work, spec, hf_tokenizer, raw, precision, calib, s):
                made.setdefault(p, []).append((g, entry, exact))
        log.info("export: %s graph(s) built in %.1fs", precision, time.perf_counter() - t0)
        failures = []
        for p, items in made.items():
            t0 = time.perf_counter()
            raw["graphs"].extend(e for _, e, _ in items)
            raw["files"] = list_files(tmp_dir, raw["files"])
            write_manifest(tmp_dir, raw)  # the runtime can now load the variant for spec.parity
            failures += _measure(tmp_dir, raw, spec, hf_tokenizer, p, items, held, s)
            log.info("export: %s measured in %.1fs: %s", p, time.perf_counter() - t0,
                     ", ".join(f"{k} {v:.5f}" for k, v in items[0][1]["quality"].items() if k in GATE_METRICS))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if failures and not s.keep_failed:
        raise ExportError("precision variant(s) missed their quality gate:\n  " + "\n  ".join(failures) +
                          "\nKeep them marked failed with --keep-failed (keep_failed=True), or set other gates "
                          "(gates={precision: {metric: value}}).")
    for f in failures:
        log.warning("kept (marked failed, never chosen by default): %s", f)


def bf16_runs_here() -> str | None:
    """None when this machine can run and measure the bf16 variant, else why not."""
    from bgert.runtime.base import BF16_FLAGS, cpu_flags
    from bgert.runtime.openvino_backend import openvino_available

    if not set(BF16_FLAGS) & cpu_flags():
        return f"this CPU has none of {', '.join(BF16_FLAGS)}"
    if not openvino_available():
        return "openvino is not installed (pip install 'bgert[openvino]')"
    return None


def openvino_outputs(path: str, precision: str, batches: Sequence[dict[str, np.ndarray]]) -> dict[str, list]:
    """Every output of ``path`` run by OpenVINO with ``precision``'s inference hint, batch by batch."""
    from bgert.runtime.openvino_backend import OpenVinoBackend

    be = OpenVinoBackend(path, precision)
    out: dict[str, list] = {n: [] for n in be.output_names}
    for f in batches:
        for n, v in zip(be.output_names, be.run(f, be.output_names)):
            out[n].append(np.asarray(v, dtype=np.float32))
    return out


def _gate_on_openvino(entry: dict[str, Any], path: str, ref: dict[str, list], batches: Sequence[dict[str, np.ndarray]],
                      held_out: dict[str, Any], scores: bool, gate: dict[str, float], raw: dict[str, Any],
                      source: str, only_graph: bool) -> list[str]:
    """Measure ``entry``'s graph at ``path`` on OpenVINO (its precision's hint) against the outputs ``ref``
    of the fp32 graph ``source``; fill in its quality and gate_passed and the manifest's parity; return
    its gate failures."""
    p = entry["precision"]
    sections = {"vs_fp32": compare(ref, openvino_outputs(path, p, batches), output_types(raw["kind"], ref)),
                "held_out": held_out}
    summary = summarize(sections)
    missed = gate_failures(summary, gate)
    entry["quality"] = {**summary, "gate": gate, "measured_on": _host(cpu_int8_dot_exact()), **sections}
    entry["gate_passed"] = not missed
    raw.setdefault("parity", {})[p if only_graph else f"{p}:{source}"] = summary
    return [f"{p} ({source}): " + "; ".join(missed)] if missed else []


def _add_bf16(tmp_dir: str, raw: dict[str, Any], spec: Any, hf_tok: Any, sources: list[dict[str, Any]],
              held: Sequence[Any], s: Settings) -> None:
    """bf16 entries for every fp32 graph (the same file, read by OpenVINO with the bf16 hint), gated against
    the fp32 graph on ORT where this CPU runs bf16; elsewhere recorded as not measured."""
    from bgert.runtime.base import BF16_FLAGS

    why_not = bf16_runs_here()
    scores = family(raw["kind"]).gives_scores()
    seqs = token_ids(hf_tok, held, raw["max_length"])
    failures = []
    for g in sources:
        base = {k: v for k, v in g.items() if k not in ("file", "precision", "quality", "gate_passed")}
        entry = {"file": g["file"], "precision": "bf16", **base, "backend": "openvino",
                 "requires_cpu_flags": list(BF16_FLAGS),
                 "recipe": {"inference_precision_hint": "bf16", "graph": g["file"] + " (the fp32 graph)"}}
        gate = s.gate("bf16")
        if why_not:
            entry["quality"] = {"measured": False, "reason": why_not, "gate": gate}
            entry["gate_passed"] = False
            log.warning("export: bf16 recorded but not measured (%s): never chosen by default", why_not)
        else:
            path = os.path.join(tmp_dir, g["file"])
            names = input_names(path)
            batches = [f for f, _ in feeds(seqs, names, *_pad(raw))]
            ref = _cached(spec, ("fp32 outputs", g["file"]), lambda: graph_outputs(path, batches))
            failures += _gate_on_openvino(entry, path, ref, batches, {"texts" if not scores else "pairs": len(seqs)},
                                          scores, gate, raw, g["file"], len(sources) == 1)
        raw["graphs"].append(entry)
    if failures and not s.keep_failed:
        raise ExportError("precision variant(s) missed their quality gate:\n  " + "\n  ".join(failures))
    raw["files"] = list_files(tmp_dir, raw["files"])


def _add_ov_int8(tmp_dir: str, raw: dict[str, Any], spec: Any, hf_tok: Any, sources: list[dict[str, Any]],
                 calib: Sequence[Any], held: Sequence[Any], s: Settings) -> None:
    """An NNCF-quantized OpenVINO IR of every fp32 graph, gated against the fp32 graph on held-out text."""
    try:
        import nncf
        import openvino as ov
    except ImportError as e:
        raise ExportError("--precision ov-int8 needs openvino and nncf: pip install 'bgert[openvino]'") from e
    from bgert.runtime.openvino_backend import take_else_branches

    scores = family(raw["kind"]).gives_scores()
    failures = []
    for g in sources:
        path = os.path.join(tmp_dir, g["file"])
        names = input_names(path)
        calib_batches = [f for f, _ in feeds(token_ids(hf_tok, calib, raw["max_length"]), names, *_pad(raw),
                                             budget=4096)]
        model = ov.Core().read_model(path)
        take_else_branches(model)
        t0 = time.perf_counter()
        smooth = nncf.AdvancedSmoothQuantParameters(matmul=0.95)
        quantized = nncf.quantize(model, nncf.Dataset(calib_batches), model_type=nncf.ModelType.TRANSFORMER,
                                  preset=nncf.QuantizationPreset.MIXED, subset_size=len(calib_batches),
                                  advanced_parameters=nncf.AdvancedQuantizationParameters(
                                      smooth_quant_alphas=smooth))
        dst = os.path.splitext(g["file"])[0] + ".ov-int8.xml"
        ov.save_model(quantized, os.path.join(tmp_dir, dst), compress_to_fp16=False)
        log.info("export: ov-int8 of %s quantized by NNCF in %.1fs", g["file"], time.perf_counter() - t0)
        base = {k: v for k, v in g.items() if k not in ("file", "precision", "quality", "gate_passed")}
        entry = {"file": dst, "precision": "ov-int8", **base, "backend": "openvino",
                 "recipe": {"tool": f"nncf {nncf.__version__}", "model_type": "TRANSFORMER", "preset": "MIXED",
                            "smooth_quant_alpha_matmul": 0.95, "calibration_batches": len(calib_batches),
                            "calibration_texts": len(calib), "format": "OpenVINO IR"}}
        seqs = token_ids(hf_tok, held, raw["max_length"])
        batches = [f for f, _ in feeds(seqs, names, *_pad(raw))]
        ref = _cached(spec, ("fp32 outputs", g["file"]), lambda: graph_outputs(path, batches))
        failures += _gate_on_openvino(entry, os.path.join(tmp_dir, dst), ref, batches,
                                      {"texts" if not scores else "pairs": len(seqs),
                                       "source": "bundled SciFact sample (documents 100+, queries) + parity texts"},
                                      scores, s.gate("ov-int8"), raw, g["file"], len(sources) == 1)
        raw["graphs"].append(entry)
    raw["files"] = list_files(tmp_dir, raw["files"])
    if failures and not s.keep_failed:
        raise ExportError("precision variant(s) missed their quality gate:\n  " + "\n  ".join(failures))
    for f in failures:
        log.warning("kept (marked failed, never chosen by default): %s", f)


def _build(tmp_dir: str, g: dict[str, Any], work: str, spec: Any, hf_tok: Any, raw: dict[str, Any],
           precision: str, calib: Sequence[Any], s: Settings) -> list[tuple[str, dict[str, Any], str | None]]:
    """Make the variant graph(s) of fp32 graph ``g``: [(precision, manifest entry, exact-arithmetic graph)]."""
    base = {k: v for k, v in g.items() if k not in ("file", "precision", "quality", "gate_passed")}
    src = os.path.join(tmp_dir, g["file"])
    if precision == "fp16":
        dst = variant_file(g["file"], "fp16")
        make_fp16(src, os.path.join(tmp_dir, dst), spec.optimizer_model_type)
        return [("fp16", {"file": dst, "precision": "fp16", **base,
                          "recipe": {"fusions": fusion_name(spec.optimizer_model_type), "io": "float32",
                                     "kept_fp32_ops": list(FP16_KEEP_FP32)}}, None)]
    static = precision == "int8-static"
    model, tgts, calib_feeds = _int8_source(tmp_dir, g, hf_tok, raw, calib)
    stats = _cached(spec, ("stats", g["file"]), lambda: q.activation_stats(src, tgts, calib_feeds()))
    out = []
    flavours = [("int8-static", True)] if static else [("int8", True)] + ([(VNNI, False)] if s.int8_isa_variant else [])
    ladder = ((STATIC_FP32_NODES,) if static else FP32_NODE_LADDER) if s.int8_fp32_nodes == "auto" \
        else (float(s.int8_fp32_nodes),)
    calib_batches = [f for f, _ in calib_feeds()]
    for p, reduce_range in flavours:
        tried = []
        for i, fraction in enumerate(ladder):
            entry, exact = _int8_graph(tmp_dir, g, work, model, tgts, stats, calib_feeds, base, p, reduce_range,
                                       fraction, len(calib), s)
            if i == len(ladder) - 1:
                break
            # the fewest fp32 nodes whose int8 error on the calibration text clears the gate with a margin (the
            # held-out gate in _measure decides); exact arithmetic for a graph this CPU would run saturated
            run_exact = exact is not None and (static or (not reduce_range and not cpu_int8_dot_exact()))
            ref = _cached(spec, ("fp32 calibration outputs", g["file"]), lambda: graph_outputs(src, calib_batches))
            got = graph_outputs(exact if run_exact else os.path.join(tmp_dir, entry["file"]), calib_batches,
                                exact=run_exact)
            summary = summarize({"calibration": compare(ref, got, output_types(raw["kind"], list(ref)))})
            tried.append({"fp32_nodes": len(entry["recipe"]["fp32_nodes"]), **summary})
            if not gate_failures(summary, _with_margin(s.gate(p))):
                break
        entry["recipe"]["fp32_node_search"] = tried
        out.append((p, entry, exact))
    return out


#: fractions of the quantizable nodes kept fp32 (largest int8 error first) that ``int8_fp32_nodes="auto"`` tries,
#: fewest first: each fp32 MatMul costs a fp32 GEMM where int8 runs several times faster
FP32_NODE_LADDER = (0.0, 0.05, 0.1, 0.25)
#: int8-static keeps a quarter fp32 under "auto": its ranges are calibrated, and text unlike the calibration
#: set clips where dynamic ranges would not (BGE-M3's ColBERT rows on repeated tokens: mean 0.985 with none
#: kept, tests/test_m3.py), so the calibration text cannot tell how few it may keep
STATIC_FP32_NODES = 0.25
#: the calibration-text quality a rung of the ladder must reach: this share of each gate's distance to 1
GATE_MARGIN = 0.7


def _with_margin(gate: dict[str, float]) -> dict[str, float]:
    return {k: 1 - (1 - v) * GATE_MARGIN for k, v in gate.items()}


def _int8_graph(tmp_dir: str, g: dict[str, Any], work: str, model: Any, tgts: list[q.Target], stats: q.ActStats,
                calib_feeds: Any, base: dict[str, Any], p: str, reduce_range: bool, fp32_nodes: float,
                n_calib: int, s: Settings) -> tuple[dict[str, Any], str | None]:
    """One int8 graph of fp32 graph ``g`` (dynamic, or static QDQ for int8-static) with ``fp32_nodes`` kept fp32:
    (its manifest entry, its exact-arithmetic graph or None)."""
    static = p == "int8-static"
    qmax = q.QMAX_REDUCED if reduce_range else q.QMAX_FULL
    chosen = q.plan(model, tgts, stats, qmax, s.int8_smooth, fp32_nodes)
    pre_model = q.apply_smoothing(_copy_model(model), tgts, chosen.smooth)
    pre = q.save(pre_model, os.path.join(work, f"{p}-{os.path.basename(g['file'])}"))
    dst = variant_file(g["file"], p)
    recipe: dict[str, Any] = {"weights": "int8 per-channel symmetric" + (", 7-bit (reduce_range)" if reduce_range
                                                                       else ", full range"),
                              "calibration_texts": n_calib, **chosen.summary()}
    if static:
        smoothed = q.targets(pre_model)  # the same nodes, reading the smoothed activations
        pre_stats = q.activation_stats(pre, smoothed, calib_feeds(), keep_values=s.calibration_method == "percentile")
        ranges = q.activation_ranges(pre_stats, {t.act for t in smoothed}, s.calibration_method,
                                     s.calibration_percentile)
        q.quantize_static(pre_model, os.path.join(tmp_dir, dst), smoothed, chosen.excluded, ranges, reduce_range,
                          s.static_activations == "int8")
        recipe.update(format="QDQ", activations=s.static_activations + " per tensor, calibrated",
                      calibration_method=s.calibration_method, matmul_outputs="float")
        exact = os.path.join(tmp_dir, dst)  # a QDQ graph run without fusions is exact arithmetic
    else:
        q.quantize_dynamic(pre, os.path.join(tmp_dir, dst), tgts, chosen.excluded, reduce_range)
        recipe.update(activations="uint8 per tensor, dynamic")
        emu = q.exact_int8_graph(q.load(pre), q.load(os.path.join(tmp_dir, dst)), tgts)
        exact = q.save(emu, os.path.join(work, f"{p}-exact-{os.path.basename(g['file'])}")) if emu else None
    entry = {"file": dst, "precision": p, **base, "recipe": recipe}
    if not reduce_range:
        entry["requires_cpu_flags"] = VNNI_FLAGS
    return entry, exact


def _measure(tmp_dir: str, raw: dict[str, Any], spec: Any, hf_tok: Any, precision: str,
             items: list[tuple[dict[str, Any], dict[str, Any], str | None]], held: Sequence[Any],
             s: Settings) -> list[str]:
    """Fill quality and gate_passed of each new entry; return the gate failures."""
    scores = family(raw["kind"]).gives_scores()
    host_exact = cpu_int8_dot_exact()
    vs_torch = None
    if not (precision == VNNI and not host_exact):  # the runtime would run it saturated here
        try:
            vs_torch = spec.parity(tmp_dir, hf_tok, precision)
        except Exception as e:  # recorded, the gate below decides
            vs_torch = {"error": f"{type(e).__name__}: {e}"}
    seqs = token_ids(hf_tok, held, raw["max_length"])
    failures = []
    for g, entry, exact in items:
        sections: dict[str, Any] = {}
        names = input_names(os.path.join(tmp_dir, g["file"]))
        if set(names) <= set(STANDARD_INPUTS):
            batches = [f for f, _ in feeds(seqs, names, *_pad(raw))]
            ref = _cached(spec, ("fp32 outputs", g["file"]),
                          lambda: graph_outputs(os.path.join(tmp_dir, g["file"]), batches))
            types = output_types(raw["kind"], list(ref))
            if not (precision == VNNI and not host_exact):
                try:
                    sections["vs_fp32"] = compare(ref, graph_outputs(os.path.join(tmp_dir, entry["file"]), batches),
                                                  types)
                except Exception as e:  # e.g. an op without a CPU kernel for this type
                    sections["vs_fp32"] = {"error": f"{type(e).__name__}: {e}"}
            if exact:
                sections["vs_fp32_exact_int8"] = compare(ref, graph_outputs(exact, batches, exact=True), types)
            sections["held_out"] = {"texts" if not scores else "pairs": len(seqs),
                                    "source": "bundled SciFact sample (documents 100+, queries) + parity texts"}
        if vs_torch is not None:
            sections["vs_torch"] = vs_torch
        summary = summarize({k: v for k, v in sections.items() if k != "vs_torch"} or sections)
        errors = [f"{k}: {v['error']}" for k, v in sections.items() if isinstance(v, dict) and "error" in v]
        gate = s.gate(precision)
        missed = gate_failures(summary, gate) + errors + ([] if summary else ["no quality could be measured"])
        entry["quality"] = {**summary, "gate": gate, "measured_on": _host(host_exact), **sections}
        entry["gate_passed"] = not missed
        raw.setdefault("parity", {})[precision if len(items) == 1 else f"{precision}:{entry['file']}"] = summary
        if missed:
            failures.append(f"{precision} ({entry['file']}): " + "; ".join(missed))
    return failures


def _host(exact: bool) -> str:
    from bgert.runtime.base import cpu_flags

    flags = cpu_flags()
    simd = [f for f in ("avx2", "avx512f", *VNNI_FLAGS) if f in flags]
    return f"{'+'.join(simd) or 'cpu'} ({'non-saturating' if exact else 'saturating'} u8xs8 int8 dot products)"
