"""The GPU benchmark says plainly that it needs a GPU where there is none (CI)."""

from __future__ import annotations

import subprocess
import sys

from tests.support import ROOT


def test_gpu_bench_without_a_gpu_exits_2_with_the_reason() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "loadtests.gpu_bench"], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert result.returncode == 2
    assert "gpu_bench: no usable CUDA GPU here:" in result.stderr
