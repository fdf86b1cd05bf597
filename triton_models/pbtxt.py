"""A tiny writer of protobuf text format, enough for Triton's config.pbtxt (no protobuf import needed).

Values: dict → a message block; list of dicts → a repeated message (one block each); list of
scalars → ``[a, b]``; ``Sym("KIND_GPU")`` → a bare enum name; str → a quoted, escaped string.
Map fields (``parameters``, ``input_map``) are lists of ``{"key": …, "value": …}`` dicts.
The tests parse every generated file with tritonclient's model_config protobuf.
"""
from __future__ import annotations

from typing import Any


class Sym(str):
    """An enum value, written without quotes (TYPE_FP32, KIND_GPU)."""


def _scalar(v: Any) -> str:
    if isinstance(v, Sym):
        return str(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        out = []
        for ch in v:
            if ch in '"\\':
                out.append("\\" + ch)
            elif ch == "\n":
                out.append("\\n")
            elif ch == "\t":
                out.append("\\t")
            elif ord(ch) < 0x20:
                out.append(f"\\{ord(ch):03o}")
            else:
                out.append(ch)
        return '"' + "".join(out) + '"'
    raise TypeError(f"cannot write {type(v).__name__} to pbtxt")


def dumps(msg: dict[str, Any], indent: int = 0) -> str:
    """Text format of ``msg`` (field order kept; None values skipped)."""
    pad = "  " * indent
    lines = []
    for key, v in msg.items():
        if v is None:
            continue
        if isinstance(v, dict):
            lines += [f"{pad}{key} {{", dumps(v, indent + 1), f"{pad}}}"]
        elif isinstance(v, (list, tuple)) and v and all(isinstance(x, dict) for x in v):
            for item in v:
                lines += [f"{pad}{key} {{", dumps(item, indent + 1), f"{pad}}}"]
        elif isinstance(v, (list, tuple)):
            lines.append(f"{pad}{key}: [{', '.join(_scalar(x) for x in v)}]")
        else:
            lines.append(f"{pad}{key}: {_scalar(v)}")
    return "\n".join(line for line in lines if line)
