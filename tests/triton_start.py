"""Starting the bundled tritonserver in the real-server tests: they skip only when it cannot start here."""
from __future__ import annotations

import sys
from typing import Callable

import pytest

from bgert.triton_models.server import ServerUnavailable, TritonServer


def start_or_skip(server: TritonServer | Callable[[], TritonServer], who: str, timeout: float = 180) -> TritonServer:
    """Start ``server`` (or the one ``server()`` makes) and return it; when tritonserver cannot start here,
    its environment missing included, print why and skip ``who``'s tests."""
    try:
        return (server if isinstance(server, TritonServer) else server()).start(timeout=timeout)
    except ServerUnavailable as e:
        reason = f"tritonserver cannot start here: {e}"
        print(f"\n[{who}] SKIP: {reason}", file=sys.__stderr__)
        pytest.skip(reason)
