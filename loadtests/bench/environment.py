"""The record of where a run happened: the machine, its load, the versions of what was measured."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from loadtests.bench.cpus import format_cpus

# The source checkout this bench runs from: its commit is part of the record.
CHECKOUT = Path(__file__).resolve().parents[2]


def _version(*names: str) -> str | None:
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=CHECKOUT, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=CHECKOUT, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def versions() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "grpcio": _version("grpcio"),
        "protobuf": _version("protobuf"),
        "onnxruntime": _version("onnxruntime-gpu", "onnxruntime"),
        "numpy": _version("numpy"),
        "uvloop": _version("uvloop"),
        "release-gateway": _version("release-gateway"),
        "git_commit": _git_commit(),
    }


def environment() -> dict[str, Any]:
    return {
        "machine": {
            "cpu_count": os.cpu_count(),
            "cpus_available": format_cpus(sorted(os.sched_getaffinity(0))),
            "cpu_model": _cpu_model(),
            "platform": platform.platform(),
            "loadavg_start": os.getloadavg(),
        },
        "versions": versions(),
    }
