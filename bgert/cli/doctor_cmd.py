"""``bgert doctor [ARTIFACT]``: what this machine can run, and whether an artifact is fit to serve.

Reports the installed execution providers, the CPU features that decide int8/bf16 speed (AVX2,
AVX-512, VNNI, AMX), GPUs and package versions; with an artifact it also checks the manifest's
schema, every file's sha256, the graphs' recorded quality gates, and runs a test inference
(finite outputs, the same result for a batch as for its items alone). Exit status 1 when an
artifact check fails, so it can gate a deployment.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from typing import Any, Callable

import numpy as np

from bgert.benchmarks.machine import cpu_info, gpu_info, package_versions

#: what we report -> the /proc/cpuinfo flags (any of them) that provide it
CPU_FEATURES = {
    "AVX2": ("avx2",),
    "AVX-512": ("avx512f",),
    "VNNI": ("avx512_vnni", "avx_vnni"),
    "AMX": ("amx_int8", "amx_bf16", "amx_tile"),
}
PROBE_TEXTS = ["what is a panda?", "The giant panda is a bear species endemic to China. " * 3]
PROBE_PAIRS = [("what is a panda?", "The giant panda is a bear species endemic to China."), ("hi", "hello there")]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", nargs="?", help="artifact directory to check (optional)")
    p.add_argument("--providers", default=None, help="comma-separated ORT providers for the test inference "
                                                     "(default: CPU)")
    p.add_argument("--precision", default=None, help="precision to test (default: the one the runtime picks)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


# ---- the machine -------------------------------------------------------------------------------
def cpu_features(cpu: dict[str, Any]) -> dict[str, bool | None]:
    """AVX2 / AVX-512 / VNNI / AMX present or not (None: unknown on this OS)."""
    simd = cpu.get("simd") or {}
    if not simd:
        return {name: None for name in CPU_FEATURES}
    return {name: any(simd.get(f, False) for f in flags) for name, flags in CPU_FEATURES.items()}


def environment() -> dict[str, Any]:
    """Versions, ONNX Runtime providers, CPU features and GPUs, with notes on what they imply."""
    versions = package_versions(("bgert", "numpy", "tokenizers", "onnxruntime", "onnxruntime-gpu", "tritonclient",
                                 "torch", "transformers", "onnx", "FlagEmbedding"))
    cpu = cpu_info()
    from bgert.runtime import FAMILIES

    report: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                              "packages": versions, "cpu": {**cpu, "features": cpu_features(cpu)},
                              "gpus": gpu_info(), "notes": [],
                              "families": {k: f.runtime_class.__name__ for k, f in FAMILIES.items()}}
    notes = report["notes"]
    try:
        import onnxruntime as ort

        report["onnxruntime"] = {"version": ort.__version__, "device": ort.get_device(),
                                 "providers": ort.get_available_providers()}
    except Exception as e:  # a broken install is exactly what doctor is for
        report["onnxruntime"] = {"error": f"{type(e).__name__}: {e}"}
        notes.append("onnxruntime cannot be imported: reinstall it (pip install --force-reinstall onnxruntime).")
    if versions.get("onnxruntime") and versions.get("onnxruntime-gpu"):
        notes.append("both onnxruntime and onnxruntime-gpu are installed; they share one module and the last "
                     "installed wins. Keep one: pip uninstall onnxruntime (for GPU) or onnxruntime-gpu (for CPU).")
    providers = report["onnxruntime"].get("providers", [])
    if "CUDAExecutionProvider" in providers and not report["gpus"]:
        notes.append("CUDAExecutionProvider is installed but nvidia-smi finds no GPU: sessions asking for CUDA "
                     "will fail (bgert raises ProviderError rather than falling back silently).")
    feats = report["cpu"]["features"]
    if feats["VNNI"] is False:
        notes.append("no VNNI: int8 matmuls run without the int8 dot-product instructions, so int8 gains less "
                     "over fp32 here; compare both with `bgert bench` before picking int8.")
    if feats["AVX2"] is False:
        notes.append("no AVX2: ONNX Runtime falls back to slower kernels on this CPU.")
    return report


# ---- the artifact ------------------------------------------------------------------------------
def _join(a: Any, b: Any) -> Any:
    """Results for [x] and for [y] put together as the result for [x, y] would be."""
    if a is None:
        return None
    if isinstance(a, np.ndarray):
        return np.concatenate([a, b])
    if isinstance(a, dict):
        return {k: _join(a[k], b[k]) for k in a}
    return list(a) + list(b)


def _numbers(x: Any) -> list[np.ndarray]:
    """Every number in a (nested) result, as flat float64 arrays in a fixed order."""
    if x is None or isinstance(x, str):
        return []
    if isinstance(x, dict):
        return [n for k in sorted(x, key=str) for n in _numbers(x[k])]
    if isinstance(x, (list, tuple)) and not all(isinstance(v, (int, float, np.number)) for v in x):
        return [n for v in x for n in _numbers(v)]
    return [np.asarray(x, dtype=np.float64).ravel()]


def _same(a: Any, b: Any, atol: float = 1e-4) -> bool:
    na, nb = _numbers(a), _numbers(b)
    return len(na) == len(nb) and all(x.shape == y.shape and np.allclose(x, y, atol=atol) for x, y in zip(na, nb))


def test_inference(model: Any) -> str:
    """Run a small request, check it, and describe it; AssertionError says what is wrong."""
    from bgert.runtime import family

    if family(model.manifest.kind).gives_scores():
        call: Callable[[list], Any] = model.compute_score
        items: list = PROBE_PAIRS
    else:
        call, items = model.encode, PROBE_TEXTS
    start = time.perf_counter()
    out = call(items)
    ms = (time.perf_counter() - start) * 1000
    nums = _numbers(out)
    assert nums and all(n.size for n in nums), f"{call.__name__} returned no numbers: {out!r:.200}"
    assert all(np.isfinite(n).all() for n in nums), f"{call.__name__} returned NaN or inf"
    alone = _join(call(items[:1]), call(items[1:]))
    assert _same(out, alone), f"{call.__name__} gives other numbers for a batch than for its items alone"
    if isinstance(out, np.ndarray) and out.ndim == 2 and getattr(model.manifest.section, "normalize", False):
        norms = np.linalg.norm(out, axis=1)
        assert np.allclose(norms, 1.0, atol=1e-3), f"vectors should be unit length, norms {norms}"
    shape = f"{out.shape} {out.dtype}" if isinstance(out, np.ndarray) else type(out).__name__
    return (f"{type(model).__name__}.{call.__name__} on {len(items)} inputs -> {shape}, finite, batch = alone "
            f"({model.precision} on {', '.join(map(str, getattr(model, 'providers', []))) or model.backend_name}, "
            f"first call incl. session start {ms:.0f} ms)")


def check_artifact(path: str, providers: list[str] | None = None, precision: str | None = None) -> dict[str, Any]:
    """Schema, sha256 of every file, quality gates and a test inference; each check ok or not."""
    from bgert.runtime import load
    from bgert.runtime.manifest import SCHEMA_VERSION, ArtifactError, file_problems, read_manifest

    checks: list[dict[str, Any]] = []

    def check(name: str, status: str, detail: str) -> None:
        checks.append({"name": name, "status": status, "detail": detail})

    report: dict[str, Any] = {"path": path, "checks": checks}
    try:
        m = read_manifest(path, verify=False)
    except ArtifactError as e:
        check("manifest", "fail", str(e))
    else:
        report.update(kind=m.kind, family=m.family)
        check("schema", "ok", f"version {m.raw['schema_version']} (this bgert reads up to {SCHEMA_VERSION}), "
                              f"kind {m.kind}")
        problems = file_problems(m)
        for rel in m.raw["files"]:
            check(f"sha256 {rel}", "fail" if rel in problems else "ok", problems.get(rel, "matches the manifest"))
        for g in m.graphs:
            q = ", ".join(f"{k} {v:.7g}" for k, v in g.quality.items() if isinstance(v, (int, float)))
            cut = f" cutoff {g.cutoff_layers}" if g.cutoff_layers else ""
            # a graph that missed its gate is served only when asked for by name: a warning, not a failure
            check(f"gate {g.precision}{cut}", "ok" if g.gate_passed else "warn",
                  f"{g.file}: {q or 'no quality recorded'}"
                  + ("" if g.gate_passed else " (missed its quality gate at export; used only if asked for)"))
        if not problems:
            from bgert.runtime.autotune import explain

            check("variant", "ok", explain(path))
            try:
                check("inference", "ok", test_inference(load(path, providers=providers, precision=precision,
                                                              verify=False)))
            except Exception as e:  # report any failure of the test inference, with its type
                check("inference", "fail", f"{type(e).__name__}: {e}")
        else:
            check("inference", "skip", "not run: the files do not match the manifest")
    report["ok"] = all(c["status"] != "fail" for c in checks)
    return report


def _yes(v: bool | None) -> str:
    return "unknown" if v is None else ("yes" if v else "no")


def render(report: dict[str, Any]) -> str:
    """The report for humans."""
    ort = report["onnxruntime"]
    v = report["packages"]
    cpu = report["cpu"]
    lines = [f"bgert        {v.get('bgert')}   Python {report['python']}   {report['platform']}",
             "packages     " + ", ".join(f"{k} {v[k] or '-'}" for k in v if k != "bgert"),
             "providers    " + (", ".join(ort["providers"]) + f"  (onnxruntime {ort['version']}, {ort['device']})"
                                if "providers" in ort else ort["error"]),
             f"cpu          {cpu['model']} ({cpu['arch']}, {cpu['usable_cores']} usable cores)",
             "cpu features " + ", ".join(f"{k} {_yes(x)}" for k, x in cpu["features"].items()),
             "gpus         " + (", ".join(f"{g['name']} ({g['memory']})" for g in report["gpus"]) or "none found"),
             "families     " + ", ".join(f"{k} ({c})" for k, c in report["families"].items())]
    lines += [f"note         {n}" for n in report["notes"]]
    art = report.get("artifact")
    if art:
        lines.append(f"artifact     {art['path']}" + (f"  ({art['kind']}, {art['family']})" if "kind" in art else ""))
        for c in art["checks"]:
            lines.append(f"  [{c['status'].upper() if c['status'] != 'ok' else 'ok':>4}] {c['name']:<24} {c['detail']}")
        lines.append("artifact OK" if art["ok"] else "artifact NOT OK: see [FAIL] above")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    report = environment()
    if args.artifact:
        providers = args.providers.split(",") if args.providers else None
        report["artifact"] = check_artifact(args.artifact, providers, args.precision)
    print(json.dumps(report, indent=2, default=str) if args.json else render(report))
    return 0 if report.get("artifact", {}).get("ok", True) else 1
