"""The package's import graph (built by grimp): no cycles between modules, the sub-packages layered
(cli > benchmarks > export, triton_models > runtime), the runtime free of torch and transformers, and
the Triton python-backend models needing only what tritonserver's own environment has.

What counts as an import: every ``import`` statement, at module level or inside a function. A lazy
import of a bgert module still couples the two modules, so it counts for cycles and layers. The
only imports treated apart are function-level imports of *external* packages in code the Triton
python models never call at module level (``tritonclient`` in runtime/triton_backend.py): those are
optional dependencies, and the server-environment check follows module-level imports only. The
runtime's external packages are checked over every import, lazy ones included.

bgert's sub-packages live in top-level directories (pyproject's package-dir), which grimp cannot map;
the graph is built in a subprocess over a tree of links laid out as the installed package.
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import tomllib
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: which bgert sub-packages each may import (lower layers never import higher ones)
LAYERS = {
    "bgert": set(),
    "cli": {"benchmarks", "export", "server", "triton_models", "integrations", "runtime", "quality"},
    "benchmarks": {"export", "triton_models", "integrations", "runtime", "quality"},
    "integrations": {"runtime"},
    "export": {"runtime", "quality"},
    "triton_models": {"runtime"},
    "server": {"runtime"},
    "runtime": set(),
    "quality": set(),  # bgert/quality.py: statistics and gates for export and bench (numpy; scipy when scoring)
}
#: external packages the runtime may import (besides the standard library): the base install and
#: the optional Triton client, OpenVINO backend and progress bars
RUNTIME_EXTERNAL = {"numpy", "onnxruntime", "tokenizers", "tritonclient", "openvino", "tenacity", "tqdm"}
#: what scripts/make_triton_env.sh installs for tritonserver's python backend, plus its own module
SERVER_EXTERNAL = {"numpy", "onnxruntime", "tokenizers", "triton_python_backend_utils"}
SERVER_MODELS = ("bgert.triton_models.onnx_model", "bgert.triton_models.tokenizer_model",
                 "bgert.triton_models.postprocess_model")

_BUILD = """
import json, sys
import grimp
g = grimp.build_graph("bgert", include_external_packages=True, cache_dir=None)
out = []
for m in sorted(g.modules):
    for b in sorted(g.find_modules_directly_imported_by(m)):
        for d in g.get_import_details(importer=m, imported=b) or [{"line_number": 0}]:
            out.append([m, b, d["line_number"]])
json.dump({"modules": sorted(m for m in g.modules if m.split(".")[0] == "bgert"), "imports": out}, sys.stdout)
"""


def package_dirs() -> dict[str, Path]:
    """{package name: its source directory}, from pyproject.toml as setuptools installs it."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = cfg.get("package-dir", {})
    out = {}
    for name in cfg["packages"]:
        if name in mapped:
            out[name] = ROOT / mapped[name]
        else:
            parent, _, tail = name.rpartition(".")
            out[name] = out[parent] / tail
    return out


@pytest.fixture(scope="module")
def imports(tmp_path_factory) -> list[tuple[str, str, int, bool]]:
    """[(importer, imported, line, lazy)]: every import of every bgert module; ``lazy`` when inside a function."""
    tree = tmp_path_factory.mktemp("import-tree")
    sources = {}
    for name, src in package_dirs().items():
        dst = tree.joinpath(*name.split("."))
        dst.mkdir(parents=True)
        for f in src.glob("*.py"):
            (dst / f.name).symlink_to(f)
            mod = name if f.stem == "__init__" else f"{name}.{f.stem}"
            sources[mod] = f
    env = {**os.environ, "PYTHONPATH": str(tree)}
    proc = subprocess.run([sys.executable, "-c", _BUILD], cwd=tree, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout)
    assert set(found["modules"]) == set(sources), "grimp did not see the same modules as the package holds"
    lazy = {mod: function_level_lines(path) for mod, path in sources.items()}
    return [(m, b, line, line in lazy.get(m, ())) for m, b, line in found["imports"]]


def function_level_lines(path: Path) -> set[int]:
    """Line numbers of the import statements inside a function of ``path``."""
    lines = set()
    for fn in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines |= {n.lineno for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))}
    return lines


def internal(imports) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for m, b, _, _ in imports:
        if b.split(".")[0] == "bgert":
            graph[m].add(b)
    return graph


def reaches(graph: dict[str, set[str]], start: str, goal: str) -> list[str] | None:
    """A path start -> ... -> goal, or None."""
    todo, came = [start], {start: None}
    while todo:
        node = todo.pop()
        if node == goal:
            path = [node]
            while came[path[-1]] is not None:
                path.append(came[path[-1]])
            return path[::-1]
        for nxt in graph.get(node, ()):
            if nxt not in came:
                came[nxt] = node
                todo.append(nxt)
    return None


def subpackage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "bgert"


def top(module: str) -> str:
    return module.split(".")[0]


def test_no_import_cycles(imports):
    graph = internal(imports)
    cycles = sorted({" -> ".join([m, *path]) for m, targets in graph.items() for b in targets
                     if (path := reaches(graph, b, m))})
    assert not cycles, "import cycles:\n  " + "\n  ".join(cycles)


def test_subpackages_are_layered(imports):
    bad = sorted(f"{m} imports {b} (line {line})" for m, b, line, _ in imports
                 if top(b) == "bgert" and subpackage(b) != subpackage(m)
                 and subpackage(b) not in LAYERS[subpackage(m)])
    assert not bad, "\n".join(bad)


def test_runtime_imports_only_its_dependencies(imports):
    std = set(sys.stdlib_module_names)
    bad = sorted(f"{m} imports {b} (line {line})" for m, b, line, _ in imports
                 if subpackage(m) == "runtime" and top(b) != "bgert" and top(b) not in std | RUNTIME_EXTERNAL)
    assert not bad, "\n".join(bad)


def test_triton_python_models_need_only_the_server_env(imports):
    std = set(sys.stdlib_module_names)
    eager: dict[str, set[str]] = defaultdict(set)
    for m, b, _, lazy in imports:
        if not lazy:
            eager[m].add(b)
    seen, todo = set(SERVER_MODELS), list(SERVER_MODELS)
    while todo:
        for b in eager.get(todo.pop(), ()):
            if b not in seen:
                seen.add(b)
                todo.append(b)
    bad = sorted(b for b in seen if top(b) != "bgert" and top(b) not in std | SERVER_EXTERNAL)
    assert not bad, f"tritonserver's python models would import {bad} at load, which its env lacks"


def test_the_checks_can_fail():
    """The walkers find a cycle, a layer breach and a forbidden dependency when there is one."""
    fake = [("bgert.runtime.a", "bgert.runtime.b", 1, True), ("bgert.runtime.b", "bgert.runtime.a", 2, False),
            ("bgert.runtime.a", "bgert.export.x", 3, True), ("bgert.runtime.b", "torch", 4, True)]
    graph = internal(fake)
    assert reaches(graph, "bgert.runtime.b", "bgert.runtime.a") == ["bgert.runtime.b", "bgert.runtime.a"]
    for check in (test_no_import_cycles, test_subpackages_are_layered, test_runtime_imports_only_its_dependencies):
        with pytest.raises(AssertionError):
            check(fake)


# ---- what the running runtime imports ----------------------------------------------------------
#: packages of export, bench and the PyTorch reference that serving and encoding must never load
HEAVY = ("torch", "transformers", "sentence_transformers", "FlagEmbedding", "onnx", "bgert.export")

_RUN = """
import json, sys
art, work = sys.argv[1], sys.argv[2]
from bgert.runtime import load
m = load(art)
m.encode(["what is panda?", "panda " * 900])
m.encode_queries(["what is panda?"])
from bgert.cli import main
with open(work + "/in.txt", "w") as f:
    f.write("what is panda?\\nhello\\n")
assert main(["encode", art, "-i", work + "/in.txt", "-o", work + "/out.npy", "--no-progress"]) == 0
if sys.argv[3] == "serve":
    from starlette.testclient import TestClient
    from bgert.server.app import ServerOptions, ServerState, Served, create_app
    state = ServerState([Served("m", art)], ServerOptions())
    app = create_app(state)
    state.load_all()
    with TestClient(app) as client:
        r = client.post("/v1/embeddings", json={"model": "m", "input": ["what is panda?"]})
        assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == m.dim, r.text
    state.close()
print(json.dumps(sorted(sys.modules)))
"""


def heavy_modules(modules: list[str]) -> list[str]:
    return sorted(m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY))


@pytest.mark.parametrize("path", ["encode", "serve"])
def test_load_encode_and_serve_import_neither_torch_nor_transformers(tiny_bge_art, tmp_path, path):
    """In a fresh interpreter: load() + encode(), `bgert encode` and (serve) the HTTP app answering a
    request, then nothing of torch, transformers, the references, onnx or bgert.export is loaded."""
    if path == "serve":
        pytest.importorskip("fastapi")
    r = subprocess.run([sys.executable, "-c", _RUN, tiny_bge_art, str(tmp_path), path], capture_output=True,
                       text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    modules = json.loads(r.stdout.strip().splitlines()[-1])
    assert "bgert.runtime.embedder" in modules and "onnxruntime" in modules  # it did run the runtime
    assert heavy_modules(modules) == [], heavy_modules(modules)


def test_the_heavy_module_check_can_fail():
    assert heavy_modules(["numpy", "torch.nn", "transformers", "bgert.export.exporter", "torchvision"]) == \
        ["bgert.export.exporter", "torch.nn", "transformers"]
