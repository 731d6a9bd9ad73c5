"""Where code runs and what it runs with: device selection and the provenance recorded
with every result."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Optional

import torch

from .errors import ReIDBenchError


def resolve_device(device: str) -> str:
    """``auto`` picks the GPU when there is one; asking for CUDA without one is a user error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ReIDBenchError(f"device '{device}' requested but no CUDA GPU is available")
    if not (device == "cpu" or device.startswith("cuda")):
        raise ReIDBenchError(f"unknown device '{device}' (auto, cpu, cuda or cuda:N)")
    return device


def _git_commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# Read once, when the process loads this code: an editable install keeps running the code it
# imported while commits land, and a commit read per cell named code the run never executed.
_COMMIT_AT_IMPORT = _git_commit()


def environment() -> dict:
    """Provenance recorded with every result."""
    commit = _COMMIT_AT_IMPORT
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in ("reidbench", "torch", "torchvision", "timm", "numpy"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return {"versions": versions, "git_commit": commit, "python": platform.python_version(),
            "platform": platform.platform(terse=True), "cpu_count": os.cpu_count(),
            "cpu_capability": cpu_capability(), "cpu_model": cpu_model(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def cpu_model() -> Optional[str]:
    """The CPU's model name (Linux: /proc/cpuinfo; elsewhere what the platform says, or None).
    The instruction set alone does not pin CPU training: two AVX512 hosts, one of them an AMD
    EPYC, trained the Market baseline to different weights (market-imagenet.md), plausibly
    because the math libraries pick their kernels by vendor as well."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip() or None
    except OSError:
        pass
    return platform.processor() or None


def cpu_capability() -> str:
    """The vector instruction set torch's CPU kernels dispatch to (e.g. AVX2, AVX512). Kernels
    for different sets round differently, so the same CPU training on two hosts can give
    different weights; recording it lets a reader tell such a difference from a code change."""
    return torch.backends.cpu.get_cpu_capability()
