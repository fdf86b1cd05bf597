"""Which variant (backend × precision) is fastest on this machine: the cache of what was measured.

The measurement itself is bgert.runtime.autotune: a short one on the first default load of an artifact on a
machine (``BGERT_TUNE``), a longer one by ``bgert tune ART``. Either times every gated variant that runs here
(ORT's precisions, and OpenVINO's where the openvino extra is installed), each in its own process (ORT's and
OpenMP's worker threads spin after a run and would slow a neighbour in the same process), on synthetic
documents and queries. The result is cached per (artifact, CPU model + flags, threads) in
``$BGERT_CACHE_DIR/tune`` (default ``~/.cache/bgert/tune``); where that cannot be written it is kept for the
life of the process. The runtime classes then default to the fastest variant measured; where nothing was
measured (``BGERT_TUNE=off``, or every variant failed) they fall back to ORT and the fixed order in
bgert.runtime.base (``cpu_preference()``).

Speed alone decides among variants that passed their quality gate; a variant whose gate was not
measured (bf16 exported on a CPU without bf16) is never timed, so never chosen.

Environment:

- ``BGERT_TUNE``: ``auto`` (default: measure on the first default load when nothing is cached), ``off``
  (never measure at load; ``bgert tune`` still does).
- ``BGERT_TUNE_SECONDS``: timed seconds per variant at first load (default 1.0), ``BGERT_TUNE_BUDGET``: the
  most seconds the whole first-load measurement may take, process start and compile included (default 60).
- ``BGERT_VARIANT``: ``backend:precision`` (``openvino:bf16``), or a precision alone (``int8``): the default
  for every load that names neither, whatever was measured.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from typing import Any, Callable, Iterator, Sequence

from .cache_dir import cache_dir
from .cpu import cpu_flags, cpu_model

log = logging.getLogger("bgert")

#: flags that change which kernels run (int8 dot products, bf16, AVX-512)
RELEVANT_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16", "avx512_bf16", "asimddp")
BACKENDS = ("ort", "openvino")
#: first-load measurement: timed seconds per variant, and the most the whole measurement may take
FIRST_LOAD_SECONDS, FIRST_LOAD_BUDGET = 1.0, 60.0
#: measurements kept for this process when the cache directory cannot be written (cache path → result)
_IN_PROCESS: dict[str, dict[str, Any]] = {}


def machine_key(threads: int | None) -> str:
    """CPU model, the kernel-relevant flags it has, and the thread count."""
    flags = "+".join(f for f in RELEVANT_FLAGS if f in cpu_flags()) or "none"
    return f"{cpu_model()} | {flags} | threads={threads or os.cpu_count()}"


def cache_root() -> str:
    return cache_dir("tune")


def cache_path(model_dir: str, threads: int | None) -> str:
    """Where the measurement for this artifact (its manifest's sha256) and machine is kept."""
    from .manifest import MANIFEST_FILE, sha256_file

    key = hashlib.sha256((sha256_file(os.path.join(model_dir, MANIFEST_FILE)) + machine_key(threads)).encode())
    return os.path.join(cache_root(), key.hexdigest()[:24] + ".json")


def read_tuning(model_dir: str, threads: int | None) -> dict[str, Any] | None:
    """The cached measurement for this artifact and machine, or None."""
    path = cache_path(model_dir, threads)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return _IN_PROCESS.get(path)


def write_tuning(model_dir: str, threads: int | None, result: dict[str, Any]) -> str | None:
    """Cache ``result`` (atomically); where the cache cannot be written, keep it for this process and return
    None (with one warning naming the directory)."""
    path = cache_path(model_dir, threads)
    _IN_PROCESS[path] = result
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
        os.replace(tmp, path)
    except OSError as e:
        log.warning("bgert: cannot write the variant measurement to %s (%s); it holds for this process only. "
                    "Set BGERT_CACHE_DIR to a writable directory to keep it.", os.path.dirname(path), e)
        return None
    return path


def tune_mode() -> str:
    """``auto`` or ``off`` (BGERT_TUNE); anything else is refused with the values it takes."""
    mode = os.environ.get("BGERT_TUNE", "auto").strip().lower() or "auto"
    if mode in ("0", "false", "no", "none"):
        mode = "off"
    if mode not in ("auto", "off"):
        raise ValueError(f"BGERT_TUNE must be 'auto' or 'off', got {mode!r}")
    return mode


def env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    try:
        value = float(raw) if raw else default
    except ValueError:
        raise ValueError(f"{name} must be a number of seconds, got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {raw!r}")
    return value


def variant_override() -> tuple[str | None, str | None]:
    """(backend, precision) from BGERT_VARIANT (either may be None); ValueError for a malformed value."""
    raw = os.environ.get("BGERT_VARIANT", "").strip()
    if not raw:
        return None, None
    backend, sep, precision = raw.rpartition(":")
    if sep and backend not in BACKENDS:
        raise ValueError(f"BGERT_VARIANT={raw!r}: the backend must be one of {', '.join(BACKENDS)} "
                         "(e.g. 'openvino:bf16', or a precision alone: 'int8')")
    return (backend or None), precision


def fastest(tuning: dict[str, Any] | None, backend: str | None, allowed: Sequence[str]) -> dict[str, Any] | None:
    """The fastest measured variant on ``backend`` (None: any) whose precision is in ``allowed``."""
    rows = [r for r in (tuning or {}).get("variants", []) if "score" in r and r["precision"] in allowed
            and (backend is None or r["backend"] == backend)]
    return max(rows, key=lambda r: r["score"], default=None)


def measure(model_dir: str, cands: Sequence[tuple[str, str]], threads: int | None = None, rounds: int = 3,
            seconds: float = 2.0, budget: float | None = None, how: str = "bgert tune") -> dict[str, Any]:
    """Time every candidate (backend, precision), each in its own process (bgert.runtime.autotune's ``__main__``),
    rounds interleaved; cache and return the result.

    ``budget``: the most seconds the whole measurement may take; variants not reached in time are recorded as
    not measured (never chosen), and a variant's process is stopped at the budget's end.
    """
    model_dir = os.path.abspath(model_dir)
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {c: [] for c in cands}
    deadline = None if budget is None else time.monotonic() + budget
    env = {**os.environ, "BGERT_TUNE": "off"}
    env.pop("BGERT_VARIANT", None)
    for _ in range(rounds):  # interleaved: a slow spell of a shared machine hits every variant
        for b, p in cands:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left < 1:
                runs[(b, p)].append({"error": f"not measured: the {budget:.0f}s budget was spent"})
                continue
            cmd = [sys.executable, "-m", "bgert.runtime.autotune", model_dir, b, p, str(threads or 0), str(seconds)]
            try:
                r = subprocess.run(cmd, capture_output=True, text=True, env=env,
                                   timeout=900 if left is None else max(left, 1))
            except subprocess.TimeoutExpired:
                runs[(b, p)].append({"error": f"not measured: stopped at the {budget:.0f}s budget"})
                continue
            if r.returncode != 0:
                runs[(b, p)].append({"error": (r.stderr.strip().splitlines() or ["failed"])[-1]})
            else:
                runs[(b, p)].append(json.loads(r.stdout.strip().splitlines()[-1]))
    variants = []
    for (b, p), rs in runs.items():
        ok = [r for r in rs if "score" in r]
        if not ok:
            variants.append({"backend": b, "precision": p, "error": rs[-1].get("error") if rs else "not run"})
            continue
        variants.append({"backend": b, "precision": p,
                         **{k: max(r[k] for r in ok) for k in ("documents_per_s", "queries_per_s", "score")}})
    result = {"machine": machine_key(threads), "threads": threads, "rounds": rounds, "seconds": seconds,
              "how": how, "variants": variants, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    best = fastest(result, None, [v["precision"] for v in variants])
    result["choice"] = {"backend": best["backend"], "precision": best["precision"]} if best else None
    result["cache"] = write_tuning(model_dir, threads, result)
    return result


@contextlib.contextmanager
def _exclusive(path: str, wait: float) -> Iterator[bool]:
    """An advisory lock beside the cache file: True when held, False when another process held it for ``wait``
    seconds (or no lock file can be made: then measure anyway)."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield True
        return
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        f = open(path + ".lock", "a+")
    except OSError:
        yield True
        return
    with f:
        end = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.monotonic() > end:
                    yield False
                    return
                time.sleep(0.2)
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def measure_once(model_dir: str, threads: int | None,
                 candidates: Callable[[], Sequence[tuple[str, str]]]) -> dict[str, Any] | None:
    """The measurement a default load uses: the cached one, else a short one now (BGERT_TUNE_SECONDS per variant,
    BGERT_TUNE_BUDGET in all), made once per artifact and machine; None when BGERT_TUNE=off. Where another
    process is measuring the same artifact, this one waits for its result (up to the budget)."""
    cached = read_tuning(model_dir, threads)
    if cached is not None or tune_mode() == "off":
        return cached
    seconds = env_float("BGERT_TUNE_SECONDS", FIRST_LOAD_SECONDS)
    budget = env_float("BGERT_TUNE_BUDGET", FIRST_LOAD_BUDGET)
    with _exclusive(cache_path(model_dir, threads), budget) as mine:
        cached = read_tuning(model_dir, threads)  # measured by the process that held the lock
        if cached is not None or not mine:
            return cached
        log.warning("bgert: measuring which variant of %s is fastest on this machine (once, at most %.0fs; "
                    "BGERT_TUNE=off skips it, `bgert tune` measures longer)", model_dir, budget)
        t0 = time.monotonic()
        result = measure(model_dir, candidates(), threads, rounds=1, seconds=seconds, budget=budget, how="first load")
        log.info("bgert: measured in %.1fs: %s", time.monotonic() - t0, ", ".join(
            f"{v['backend']} {v['precision']} {v['score']:.0f}/s" if "score" in v else
            f"{v['backend']} {v['precision']} {v['error']}" for v in result["variants"]))
        return result
