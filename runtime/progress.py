"""Progress bars for long work, with tqdm when it is installed and silence otherwise."""
from __future__ import annotations

from typing import Iterable, TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], enabled: bool = True, **kwargs) -> Iterable[T]:
    """Wrap ``items`` in a tqdm bar when enabled and tqdm is importable (the runtime does not need it)."""
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return items
    return tqdm(items, **kwargs)
