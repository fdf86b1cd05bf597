"""The family registry is the one map of model kinds: every list of kinds reads it, sections are typed,
detection goes by evidence strength, and precision gates follow each output's declared type."""
from __future__ import annotations

import argparse
import ast
import json
import os
import pathlib
import shutil
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pytest

import bgert.runtime as rt
from bgert import quality
from bgert.runtime import registry
from bgert.runtime.manifest import KINDS, ArtifactError, Manifest, read_manifest
from bgert.runtime.registry import OUTPUT_TYPES, Checkpoint, Family

ROOT = pathlib.Path(__file__).resolve().parents[1]
KIND_NAMES = set(registry.FAMILIES)


def test_every_list_of_kinds_is_the_registry():
    from bgert.cli import export_cmd

    p = argparse.ArgumentParser()
    export_cmd.add_arguments(p)
    kind_action = next(a for a in p._actions if a.dest == "kind")
    assert list(kind_action.choices) == ["auto", *registry.kinds()]
    assert KINDS == registry.kinds()
    assert all(getattr(rt, rt.class_for_kind(k).__name__) is rt.class_for_kind(k) for k in KINDS)
    assert rt.FAMILY_MODULES  # the one registration line per family


def _string_constants(path: pathlib.Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [(n.lineno, n.value) for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def test_no_kind_is_listed_outside_its_family():
    """A kind name as a string literal may appear only in its family's own description (``name = ...``),
    never in a list, a switch or a comparison elsewhere in the product."""
    allowed = set()
    for fam in registry.FAMILIES.values():
        allowed.add((pathlib.Path(sys.modules[fam.__module__].__file__).resolve(), fam.name))
    offenders = []
    for d in ("runtime", "export", "triton_models", "benchmarks", "bgert"):
        for path in (ROOT / d).rglob("*.py"):
            for line, value in _string_constants(path):
                if value in KIND_NAMES and (path.resolve(), value) not in allowed:
                    offenders.append(f"{path.relative_to(ROOT)}:{line} {value!r}")
    # names that are not kinds: `bgert eval`'s result roles "embedder" / "reranker", `bgert serve`'s route
    # capability "m3" (/m3/encode, from the model's heads)
    exempt = {"benchmarks/eval.py": {"embedder", "reranker"}, "bgert/cli/eval_cmd.py": {"embedder", "reranker"},
              "bgert/server/app.py": {"m3"}}
    offenders = [o for o in offenders
                 if o.split(" ")[1].strip("'") not in exempt.get(o.split(":")[0], set())]
    assert not offenders, "kinds listed outside the registry:\n" + "\n".join(offenders)


def test_families_are_complete():
    for kind, fam in registry.FAMILIES.items():
        assert fam.name == kind and fam.runtime_class.__module__.startswith("bgert.runtime.")
        assert fam.export_spec.startswith("bgert.export.") and ":" in fam.export_spec
        assert fam.outputs and set(fam.outputs.values()) <= set(OUTPUT_TYPES)
        assert fam.bench_adapter or fam.bench_not_covered
        registry.parse_dataclass(fam.section, _minimal_section(fam.section))


def _minimal_section(cls: type) -> dict:
    """Values for the required fields of a section dataclass (whatever fits their annotations)."""
    import dataclasses
    import typing

    sample = {int: 1, str: "x", bool: True, float: 1.0}
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            tp = hints[f.name]
            origin = typing.get_origin(tp)
            out[f.name] = [] if origin is list else {} if origin is dict or tp is dict else sample[tp]
    return out


def test_export_specs_resolve():
    pytest.importorskip("torch")
    from bgert.export.specs import ExportSpec, spec_class

    for kind in registry.kinds():
        spec = spec_class(kind)
        assert issubclass(spec, ExportSpec)
        assert set(spec.outputs) == set(registry.family(kind).outputs), kind


def test_bench_adapters_resolve():
    from bgert.benchmarks.bench_families import BenchAdapter

    for fam in registry.FAMILIES.values():
        if fam.bench_adapter:
            assert issubclass(registry.load_object(fam.bench_adapter), BenchAdapter)


# ---- typed sections --------------------------------------------------------------------------------
def _edit(art: str, **changes) -> None:
    path = os.path.join(art, "manifest.json")
    raw = json.load(open(path, encoding="utf-8"))
    for k, v in changes.items():
        if v is None:
            raw.pop(k, None)
        else:
            raw[k] = v
    json.dump(raw, open(path, "w", encoding="utf-8"))


def test_section_fields_are_checked_when_read(tiny_bge_art, tmp_path):
    art = str(shutil.copytree(tiny_bge_art, tmp_path / "art"))
    sec = read_manifest(art).section
    assert sec.dim > 0 and sec.output_name == "dense" and isinstance(sec.normalize, bool)
    _edit(art, dim=None)
    with pytest.raises(ArtifactError, match=r"lacks the field 'dim'"):
        read_manifest(art, verify=False)
    _edit(art, dim="384")
    with pytest.raises(ArtifactError, match=r"field 'dim' = '384', which is not int"):
        read_manifest(art, verify=False)
    with pytest.raises(ArtifactError, match=r"field 'dim'"):
        rt.load(art)


def test_section_defaults_live_in_the_dataclass():
    from bgert.runtime.reranker import DEFAULT_MAX_LENGTH, LLMRerankerSection

    sec = registry.parse_dataclass(LLMRerankerSection, {"prompt": "p"})
    assert sec.default_max_length == DEFAULT_MAX_LENGTH and sec.separator == "\n" and sec.truncation_side == "right"
    with pytest.raises(registry.SectionError, match="lacks the field 'prompt'"):
        registry.parse_dataclass(LLMRerankerSection, {})
    with pytest.raises(registry.SectionError, match="'bos_prefix_id'"):
        registry.parse_dataclass(LLMRerankerSection, {"prompt": "p", "bos_prefix_id": True})  # a bool is no id


# ---- detection -------------------------------------------------------------------------------------
def _ck(tmp_path, name: str, config: dict, files: tuple[str, ...] = ()) -> str:
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    for f in files:
        (d / f).write_text("{}" if f.endswith(".json") else "")
    return str(d)


def test_detection_does_not_trust_directory_names(tmp_path):
    from bgert.export.detect import detect_kind, checkpoint

    bert = {"model_type": "bert", "architectures": ["BertModel"]}
    # a fine-tuned cross-encoder saved as ./bge-m3-finetune-reranker: its architecture decides
    cross = _ck(tmp_path, "my-layerwise-thing", {"model_type": "xlm-roberta",
                                                 "architectures": ["XLMRobertaForSequenceClassification"]})
    assert detect_kind(checkpoint(cross)) == "reranker"
    assert detect_kind(checkpoint(_ck(tmp_path, "my-model", bert))) == "embedder"
    m3 = _ck(tmp_path, "my-model-2", {"model_type": "xlm-roberta", "architectures": ["XLMRobertaModel"]},
             ("colbert_linear.pt", "sparse_linear.pt", "modules.json"))
    assert detect_kind(checkpoint(m3)) == "m3"  # its head files beat the sentence-transformers layout
    remote = _ck(tmp_path, "renamed", {"model_type": "whatever", "auto_map": {
        "AutoModelForCausalLM": "modeling_minicpm_reranker.LayerWiseMiniCPMForCausalLM"}})
    assert detect_kind(checkpoint(remote)) == "layerwise_reranker"  # auto_map counts as an architecture
    with pytest.raises(ValueError, match="pass --kind"):
        detect_kind(checkpoint(_ck(tmp_path, "mystery", {"model_type": "t5"})))


def test_ambiguous_checkpoint_lists_the_candidates(tmp_path):
    from bgert.export.detect import checkpoint, detect_kind

    both = _ck(tmp_path, "x", {"model_type": "bert",
                               "architectures": ["BertForSequenceClassification", "LayerWiseBert"]})
    with pytest.raises(ValueError, match=r"could be any of reranker, layerwise_reranker .*--kind "
                                         r"reranker\|layerwise_reranker"):
        detect_kind(checkpoint(both))


# ---- gating by output type (the silent reranker gate) ---------------------------------------------------
@dataclass(kw_only=True)
class _ToySection:
    output_name: str = "score"


class ToyScorer(Family):
    """A new reranker-like kind that nobody added to a separate list of reranker kinds."""

    name = "toy_scorer"
    runtime_class = object
    section = _ToySection
    export_spec = "bgert.export.reranker_spec:CrossEncoderSpec"
    outputs = {"score": "scores"}


@pytest.fixture
def toy_family():
    registry.register(ToyScorer)
    yield ToyScorer
    registry.FAMILIES.pop(ToyScorer.name)


def test_garbage_scores_fail_the_gate_of_any_score_family(toy_family):
    """[n] scores compared as [n, 1] vectors have cosines of ±1, so any fp16/int8 variant passed; gated
    as the family's declared scores, garbage fails every precision's gate."""
    from bgert.export import precision as prec

    rng = np.random.default_rng(0)
    ref = [rng.normal(size=40).astype(np.float32)]
    garbage = [np.abs(rng.normal(size=40)).astype(np.float32)]  # same sign as cosines would see: all +1
    for kind in [k for k, f in registry.FAMILIES.items() if f.gives_scores()]:
        assert kind in ("toy_scorer", "reranker", "llm_reranker", "layerwise_reranker", "lightweight_reranker")
        name = next(iter(registry.family(kind).outputs))
        out = prec.compare({name: ref}, {name: garbage}, prec.output_types(kind, [name]))
        summary = prec.summarize(out)
        assert "spearman" in summary and "cos_min" not in summary
        for precision in quality.PRECISION_GATES:
            assert prec.gate_failures(summary, prec.Settings().gate(precision)), (kind, precision, summary)
    # the old vector path, for contrast: every "cosine" is 1 and the gate passes
    vec = quality.compare_output("vectors", [np.abs(ref[0])[:, None]], [garbage[0][:, None]])
    assert vec["cos_min"] == pytest.approx(1.0)
    calib, held = prec.text_sets(prec.Settings(), "toy_scorer")
    assert isinstance(held[0], tuple)  # a score family is calibrated and measured on pairs


def test_unknown_output_is_an_error():
    with pytest.raises(KeyError, match="does not describe graph output 'logits'"):
        registry.family("reranker").output_type("logits")


# ---- the runtime half imports no torch ---------------------------------------------------------------
def test_registry_and_family_modules_need_no_torch():
    code = ("import sys; import bgert.runtime, bgert.runtime.registry, bgert.quality; "
            "bad = [m for m in ('torch', 'transformers', 'bgert.export', 'scipy') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_manifest_without_section_is_lazy():
    m = Manifest("/nowhere", {"kind": "embedder", "graphs": []})
    with pytest.raises(ArtifactError, match="lacks the field 'dim'"):
        m.section  # noqa: B018


def test_checkpoint_architectures_include_auto_map():
    ck = Checkpoint(path="p", name="n", config={"architectures": ["A"], "auto_map": {"AutoModel": "mod.B"}},
                    files=frozenset())
    assert ck.architectures == ["A", "B"]
