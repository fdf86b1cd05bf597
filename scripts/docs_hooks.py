"""MkDocs hooks (mkdocs.yml ``hooks:``): make ``build/docs-api/bgert``, the package laid out as it is
installed, before mkdocstrings starts, so the API pages can read its docstrings.

pyproject's package-dir puts bgert.runtime in runtime/, bgert.export in export/ and so on; griffe, which
reads the source without importing it, finds packages by their folders, so it needs them at their import
paths. A copy, not links: griffe does not walk into linked files and folders.
"""
from __future__ import annotations

import shutil
import tomllib
from pathlib import Path
from typing import Any

from mkdocs.plugins import event_priority

ROOT = Path(__file__).resolve().parent.parent
API_SRC = ROOT / "build" / "docs-api"


def api_source_tree() -> None:
    """Copy each package of pyproject's package-dir to its import path (runtime/ -> bgert/runtime/)."""
    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    shutil.rmtree(API_SRC, ignore_errors=True)
    for package, src in sorted(package_dir.items()):  # "bgert" before "bgert.runtime"
        shutil.copytree(ROOT / src, API_SRC.joinpath(*package.split(".")), dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "data", "results", "envs"))


@event_priority(100)  # before mkdocstrings reads its handler paths
def on_config(config: Any) -> Any:
    api_source_tree()
    return config
