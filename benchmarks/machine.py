"""The machine a benchmark ran on: CPU model, SIMD flags, cores, memory, GPU, package versions.

Every benchmark result records this, so a number can be read next to what produced it:

>>> from bgert.benchmarks.machine import machine_info, command_line
>>> result = {"machine": machine_info(), "command": command_line(), ...}

Only the standard library is imported (versions come from package metadata), so recording the
machine never pulls torch into a runtime-only environment.
"""
from __future__ import annotations

import os
import platform
import shlex
import shutil
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import Any

#: /proc/cpuinfo flag -> the name we report (what decides int8/bf16 speed on CPU)
SIMD_FLAGS = {
    "avx2": "avx2",
    "fma": "fma",
    "f16c": "f16c",
    "avx512f": "avx512f",
    "avx512bw": "avx512bw",
    "avx512_vnni": "avx512_vnni",
    "avx_vnni": "avx_vnni",
    "avx512_bf16": "avx512_bf16",
    "avx512_fp16": "avx512_fp16",
    "amx_tile": "amx_tile",
    "amx_int8": "amx_int8",
    "amx_bf16": "amx_bf16",
}

#: packages whose versions change the numbers (missing ones are reported as None)
PACKAGES = ("bgert", "numpy", "onnxruntime", "onnxruntime-gpu", "tokenizers", "torch", "transformers",
            "FlagEmbedding", "sentence-transformers", "onnx", "tritonclient")


def _cpuinfo() -> dict[str, str]:
    """The first processor block of /proc/cpuinfo as a dict (empty off Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            block = f.read().split("\n\n", 1)[0]
    except OSError:
        return {}
    out = {}
    for line in block.splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            out[k.strip()] = v.strip()
    return out


def cpu_info() -> dict[str, Any]:
    """CPU model, vendor, the SIMD features that matter for inference, and core counts."""
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    return {
        "model": info.get("model name") or platform.processor() or platform.machine(),
        "vendor": info.get("vendor_id"),
        "arch": platform.machine(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "simd": {name: flag in flags for flag, name in SIMD_FLAGS.items()} if flags else {},
        "hypervisor": "hypervisor" in flags,
    }


def memory_gb() -> float | None:
    """Total physical memory in GiB (None where it cannot be read)."""
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def gpu_info() -> list[dict[str, str]]:
    """NVIDIA GPUs as nvidia-smi reports them (name, memory, driver); empty without one."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    try:
        out = subprocess.run([smi, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3:
            gpus.append({"name": parts[0], "memory": parts[1], "driver": parts[2]})
    return gpus


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Installed versions from package metadata, without importing the packages."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def machine_info() -> dict[str, Any]:
    """Everything a result needs to say about where it was measured."""
    return {
        "cpu": cpu_info(),
        "memory_gb": memory_gb(),
        "gpus": gpu_info(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": package_versions(),
    }


def command_line(argv: list[str] | None = None) -> str:
    """The exact command that is running, quoted so it can be pasted back into a shell."""
    argv = sys.argv if argv is None else argv
    if not argv:
        return ""
    cli = os.path.join("bgert", "cli", "__main__.py")  # `python -m bgert.cli` is `bgert`
    prog = "bgert" if os.path.basename(argv[0]) == "bgert" or argv[0].endswith(cli) else f"python {argv[0]}"
    return " ".join([prog, *map(shlex.quote, argv[1:])])


def describe(info: dict[str, Any]) -> str:
    """One line for a Markdown report: CPU, flags present, cores, memory, GPUs."""
    cpu = info["cpu"]
    flags = [k for k, v in cpu.get("simd", {}).items() if v and k in ("avx2", "avx512f", "avx512_vnni", "avx_vnni",
                                                                      "amx_int8", "amx_bf16")]
    gpus = ", ".join(g["name"] for g in info.get("gpus", [])) or "no GPU"
    return (f"{cpu['model']} ({', '.join(flags) or 'no AVX2'}; "
            f"{'no VNNI' if not any('vnni' in f for f in flags) else 'VNNI'}), "
            f"{cpu['usable_cores']} usable cores, {info.get('memory_gb')} GiB, {gpus}, Python {info['python']}")


if __name__ == "__main__":
    import json

    json.dump(machine_info(), sys.stdout, indent=2)
    print()
