"""Where bgert keeps what it learns about a machine: ``$BGERT_CACHE_DIR`` (default ``~/.cache/bgert``).

One directory per kind of entry: ``verified`` (file stamps), ``tune`` (variant measurements), ``ort``
(optimised graphs), ``tensorrt`` (engines)."""
from __future__ import annotations

import os


def cache_dir(name: str) -> str:
    """``$BGERT_CACHE_DIR/<name>`` (default ``~/.cache/bgert/<name>``), read at each call so tests and
    processes can point it elsewhere."""
    root = os.environ.get("BGERT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "bgert")
    return os.path.join(root, name)
