"""Writing a benchmark's result: ``<name>.json`` and ``<name>.md`` in one folder (plots go beside them)."""
from __future__ import annotations

import json
import os
from typing import Any


def write_report(out_dir: str, name: str, result: dict[str, Any], markdown: str) -> str:
    """Write the result as JSON and its Markdown table; return the path stem (for a PNG beside them)."""
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, name)
    with open(stem + ".json", "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    with open(stem + ".md", "w", encoding="utf-8") as f:
        f.write(markdown)
    return stem
