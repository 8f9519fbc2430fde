"""GPU benchmark: in-process IO-binding onnxruntime against the gateway end to end.

    python -m loadtests.gpu_bench --models models --model mlp --model convnet

On a GPU host, prints one compact table per model: onnxruntime in-process
with IO binding at batch 1, 16, 64 (the compute limit), and the gateway on
CUDA (`gateway serve --provider cuda --workers 1`), batching off and on, over
concurrency 1, 16, 64 (driven by `gateway bench`, same load generator), with
the card's name and the versions. A ResNet-50-class model is not bundled:
add one to a repository and name it with --model.

Without a usable CUDA GPU it says why and exits 2.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from gateway.providers import CUDA, ProviderChooser, cuda_prerequisites


def card_name() -> str:
    if shutil.which("nvidia-smi"):
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=30
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    return "unknown NVIDIA GPU"


def iobinding_rows_per_s(path: Path, batch: int, seconds: float = 2.0) -> float:
    from gateway.runtime import OnnxModel

    model = OnnxModel(path, ProviderChooser("cuda"))
    if model.provider != CUDA:
        raise SystemExit(f"{path}: the CUDA provider did not take the model ({model.providers})")
    feeds = {
        s.name: np.random.default_rng(0).random([batch if d < 0 else d for d in s.shape]).astype(s.dtype)
        for s in model.inputs
    }
    for _ in range(20):
        model.run(feeds)
    runs = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        model.run(feeds)
        runs += 1
    return runs * batch / (time.perf_counter() - start)


def gateway_points(models: Path, model: str, out: Path) -> list[dict[str, object]]:
    command = [
        sys.executable,
        "-m",
        "gateway",
        "bench",
        "--models",
        str(models),
        "--model",
        model,
        "--provider",
        "cuda",
        "--baselines",
        "gateway-nobatch,gateway",
        "--concurrency",
        "1,16,64",
        "--duration",
        "3",
        "--repeats",
        "2",
        "--workers",
        "1",
        "--out",
        str(out),
    ]
    subprocess.run(command, check=True)
    result = json.loads(sorted(out.glob(f"bench-{model}-*.json"))[-1].read_text())
    summary: list[dict[str, object]] = result["summary"]
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("--model", action="append", default=None, help="repeatable [mlp, convnet]")
    args = parser.parse_args()
    check = cuda_prerequisites()
    if not check.usable:
        print(f"gpu_bench: no usable CUDA GPU here: {check.reason}", file=sys.stderr)
        return 2
    import onnxruntime

    print(f"card: {card_name()}; onnxruntime {onnxruntime.__version__}; python {sys.version.split()[0]}")
    for model in args.model or ["mlp", "convnet"]:
        path = sorted((args.models / model).glob("*/model.onnx"))[-1]
        print(f"\n{model} ({path})")
        for batch in (1, 16, 64):
            print(f"  in-process IO binding, batch {batch:>3}: {iobinding_rows_per_s(path, batch):12,.0f} rows/s")
        with tempfile.TemporaryDirectory() as tmp:
            for row in gateway_points(args.models, model, Path(tmp)):
                rps, p99 = row["throughput_rps"], row["p99_ms"]
                assert isinstance(rps, dict) and isinstance(p99, dict)
                print(
                    f"  {row['target']:<16} c={row['offered']:<4} {rps['median']:10,.0f} req/s"
                    f"  p99 {p99['median']:.2f} ms"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
