"""The GPU benchmark without a GPU: it refuses in one line with exit code 2, and its machinery
(in-process IO binding, the gateway under load, the table) runs end to end with --provider cpu.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.serving.providers import cuda_prerequisites
from loadtests.gpu_bench import NoCuda, _session, format_table
from tests.support import MODELS, ROOT

without_cuda = pytest.mark.skipif(cuda_prerequisites().usable, reason="for machines without CUDA (CI)")


def run_bench(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "loadtests.gpu_bench", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


@without_cuda
def test_without_a_gpu_it_exits_2_with_one_line_saying_why() -> None:
    result = run_bench("--models", "models")
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("gpu_bench: no usable CUDA GPU here: ") and len(lines[0]) > 40


@without_cuda
def test_a_cuda_session_that_falls_back_is_refused_the_same_way() -> None:
    with pytest.raises(NoCuda, match="provider cuda: CUDA is not usable: "):
        _session(MODELS / "mlp" / "1" / "model.onnx", "cuda", graphs=False)


def test_the_table_has_a_line_per_model_and_concurrency() -> None:
    def entry(target: str, c: int, rps: float, p99: float, batch: float, busy: float = 0.0) -> dict[str, object]:
        return {
            "target": target,
            "mode": "closed",
            "offered": float(c),
            "throughput_rps": {"median": rps},
            "p99_ms": {"median": p99},
            "mean_batch": {"median": batch},
            **({"executor_busy_share": {"median": busy}} if busy else {}),
        }

    results = {
        "concurrency": [1, 16],
        "workers": 1,
        "exec_workers": 12,
        "models": {
            "mlp": {
                "ort": [{"batch": 1, "rows_per_s": 10_000.0, "p99_ms": 0.1}, {"batch": 16, "rows_per_s": 160_000.0}],
                "gateway": [
                    entry("gateway-nobatch", 1, 2_000, 1.0, 1),
                    entry("gateway", 1, 2_000, 1.0, 1),
                    entry("gateway-nobatch", 16, 4_000, 5.0, 1),
                    entry("gateway", 16, 12_000, 4.0, 8.5),
                    entry("gateway-exec", 16, 36_000, 2.0, 15.5, busy=0.42),
                ],
            }
        },
    }
    lines = format_table(results).splitlines()
    assert lines[0].split()[:4] == ["model", "c", "ort", "rows/s"]
    assert "graphs" not in lines[0]  # no --cuda-graphs column unless it was measured
    assert all(f"exec {column}" in lines[0] for column in ("req/s", "p99", "batch", "busy"))
    one, sixteen = lines[1].split(), lines[2].split()
    assert one[:3] == ["mlp", "1", "10,000"] and one[9:11] == ["1.00", "0.20"]
    assert one[-5:] == ["-"] * 5  # no executor point at c=1: missing, not zero
    assert sixteen[:3] == ["mlp", "16", "160,000"] and sixteen[8:11] == ["8.5", "3.00", "0.07"]
    # exec req/s, p99, mean batch, busy share, and exec over in-process batching
    assert sixteen[-5:] == ["36,000", "2.00", "15.5", "42%", "3.00"]
    assert sixteen[3] == "-"  # no p99 measured for that batch: shown as missing, not as zero
    text = "\n".join(lines)
    assert "(--workers 1, --executors off)" in text and "fed by 12 front-end worker(s)" in text


def test_the_machinery_runs_end_to_end_on_the_cpu(tmp_path: Path) -> None:
    result = run_bench(
        *("--provider", "cpu", "--model", "mlp", "--concurrency", "1,2", "--cuda-graphs", "--exec-workers", "2"),
        *("--duration", "0.3", "--warmup", "0.1", "--repeats", "1", "--out", str(tmp_path)),
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    table = lines[next(i for i, line in enumerate(lines) if line.startswith("model ") and "ort rows/s" in line) :]
    assert "graphs rows/s" in table[0]
    assert [line.split()[:2] for line in table[1:3]] == [["mlp", "1"], ["mlp", "2"]]
    assert "-" not in table[1].split()  # every column measured
    (written,) = tmp_path.glob("gpu-bench-*.json")
    record = json.loads(written.read_text())
    assert record["provider"] == "cpu" and record["versions"]["onnxruntime"]
    mlp = record["models"]["mlp"]
    assert [p["batch"] for p in mlp["ort"]] == [1, 2] == [p["batch"] for p in mlp["graphs"]]
    assert {(e["target"], e["offered"]) for e in mlp["gateway"]} == {
        (target, c) for target in ("gateway-nobatch", "gateway", "gateway-exec") for c in (1.0, 2.0)
    }
    executor = [e for e in mlp["gateway"] if e["target"] == "gateway-exec"]
    assert all(e["mean_batch"]["median"] >= 1 and 0 < e["executor_busy_share"]["median"] <= 1.05 for e in executor)
    assert record["exec_workers"] == 2 and record["workers"] == 1
