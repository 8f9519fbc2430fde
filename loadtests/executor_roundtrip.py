"""Executor round trip: what running a request in the executor process adds over running it in-process.

    python -m loadtests.executor_roundtrip [--models models] [--requests 3000] [--repeats 5]

For digits and mlp (one row a request): the same DynamicBatcher in this process
against RemoteExecutor to an executor process (python -m gateway.serving.remote.executor),
closed loop at concurrency 1 and 16, the two modes interleaved within each repeat
(this machine is shared and noisy: interleaving keeps the comparison fair, and the
medians over repeats are reported). Prints per-request p50 and p99 and the added
microseconds at p50 (the median over repeats of each repeat's difference).

Then, unless --no-batch: two front-end processes at concurrency 128 each (256 in all)
on mlp against one executor, and the executor's mean batch (rows per batch, from the
batch sizes the replies carry).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gateway.config.settings import GatewaySettings
from gateway.percentiles import quantile
from gateway.serving.builder import ModelBuilder
from gateway.serving.executor import Executor
from gateway.serving.remote.client import RemoteConnection
from gateway.serving.remote.executor import load

MODELS = ("digits", "mlp")
CONCURRENCY = (1, 16)


@dataclass
class Point:
    model: str
    concurrency: int
    mode: str
    p50_us: float
    p99_us: float


async def closed_loop(executor: Executor, name: str, row: np.ndarray, concurrency: int, requests: int) -> list[float]:
    """`requests` one-row requests from `concurrency` callers, each waiting for its answer; latencies in s."""
    latencies: list[float] = []
    each = max(1, requests // concurrency)
    feeds = {name: row}

    async def caller() -> None:
        for _ in range(each):
            start = time.perf_counter()
            await executor.submit(feeds, 1, None, None)
            latencies.append(time.perf_counter() - start)

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return latencies


def start_executor(models: Path, names: tuple[str, ...], threads: int) -> tuple[subprocess.Popen[str], str]:
    address = f"@gateway-roundtrip-{uuid.uuid4().hex}"
    loads = [arg for name in names for arg in ("--load", name)]
    command = [sys.executable, "-m", "gateway.serving.remote.executor", "--listen", address, "--models", str(models)]
    process = subprocess.Popen(
        [*command, "--provider", "cpu", "--intra-op-threads", str(threads), *loads],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline().strip()
    if line != f"ready {address}":
        process.kill()
        raise SystemExit(f"the executor did not start: {line!r}")
    return process, address


async def latency_points(models: Path, requests: int, repeats: int, address: str) -> list[list[Point]]:
    settings = GatewaySettings(models=models, load=MODELS, provider="cpu")
    with ThreadPoolExecutor(max_workers=8, thread_name_prefix="ort") as pool:
        loaded = load(ModelBuilder.from_settings(settings, pool, metrics=None))
        local = {s.model: s for s in loaded if s.version == "1"}
        connection = await RemoteConnection.connect(address)
        rounds: list[list[Point]] = []
        for repeat in range(repeats):
            points: list[Point] = []
            for model in MODELS:
                served = local[model]
                spec = served.inputs[0]
                row = np.random.default_rng(repeat).random((1, spec.shape[1]), dtype=np.float32)
                modes: dict[str, Executor] = {"in-process": served.executor, "remote": connection.executor(model, "1")}
                for concurrency in CONCURRENCY:
                    order = list(modes.items()) if repeat % 2 == 0 else list(modes.items())[::-1]
                    for mode, executor in order:
                        await closed_loop(executor, spec.name, row, concurrency, requests // 10)  # warm
                        times = sorted(await closed_loop(executor, spec.name, row, concurrency, requests))
                        p50, p99 = quantile(times, 0.5) * 1e6, quantile(times, 0.99) * 1e6
                        points.append(Point(model, concurrency, mode, p50, p99))
            rounds.append(points)
            print(f"repeat {repeat + 1}/{repeats} done", file=sys.stderr)
        await connection.close()
        for served in loaded:
            await served.executor.close()
    return rounds


FRONT_END = """
import asyncio, json, sys, time
import numpy as np
from gateway.serving.remote.client import RemoteConnection
from gateway.types import RunTiming

async def main(address, concurrency, seconds):
    connection = await RemoteConnection.connect(address, slots=max(256, concurrency))
    mlp = connection.executor("mlp", "1")
    name = mlp.version.inputs[0].name
    feeds = {name: np.ones((1, mlp.version.inputs[0].shape[1]), np.float32)}
    shares, rows, answered = 0.0, 0.0, 0
    end = time.monotonic() + seconds
    async def caller():
        nonlocal shares, rows, answered
        while time.monotonic() < end:
            timing = RunTiming()
            await mlp.submit(feeds, 1, None, None, timing)
            # Each request is 1/requests of its batch: summed, the batches; with rows, the rows run.
            shares += 1 / timing.requests
            rows += timing.rows / timing.requests
            answered += 1
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    print(json.dumps({"batches": shares, "rows": rows, "answered": answered}))

asyncio.run(main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3])))
"""


def mean_batch(address: str, front_ends: int, concurrency: int, seconds: float) -> dict[str, float]:
    """Front-end processes at `concurrency` each on mlp: the executor's rows per batch and req/s."""
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", FRONT_END, address, str(concurrency), str(seconds)], stdout=subprocess.PIPE
        )
        for _ in range(front_ends)
    ]
    totals = {"batches": 0.0, "rows": 0.0, "answered": 0.0}
    for process in processes:
        out, _ = process.communicate(timeout=seconds + 120)
        for key, value in json.loads(out).items():
            totals[key] += value
    return {"mean_batch": totals["rows"] / totals["batches"], "req_per_s": totals["answered"] / seconds}


def median(values: list[float]) -> float:
    return statistics.median(values)


def pick(points: list[Point], model: str, concurrency: int, mode: str) -> Point:
    return next(p for p in points if (p.model, p.concurrency, p.mode) == (model, concurrency, mode))


def report(rounds: list[list[Point]]) -> list[dict[str, float | str]]:
    rows: list[dict[str, float | str]] = []
    for model in MODELS:
        for concurrency in CONCURRENCY:
            local = [pick(r, model, concurrency, "in-process") for r in rounds]
            remote = [pick(r, model, concurrency, "remote") for r in rounds]
            added = [b.p50_us - a.p50_us for a, b in zip(local, remote, strict=True)]
            rows.append(
                {
                    "model": model,
                    "concurrency": concurrency,
                    "in_process_p50_us": median([p.p50_us for p in local]),
                    "in_process_p99_us": median([p.p99_us for p in local]),
                    "remote_p50_us": median([p.p50_us for p in remote]),
                    "remote_p99_us": median([p.p99_us for p in remote]),
                    "added_p50_us": median(added),
                    "added_p50_min_us": min(added),
                    "added_p50_max_us": max(added),
                }
            )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("--requests", type=int, default=3000, help="requests a point (a mode, model, concurrency)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-batch", action="store_true", help="skip the two-front-end mean batch run")
    parser.add_argument("--batch-seconds", type=float, default=10.0)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument(
        "--executor-threads", type=int, default=0, help="the executor's onnxruntime threads a session (0: its cores)"
    )
    args = parser.parse_args()
    process, address = start_executor(args.models, MODELS, args.executor_threads)
    try:
        rounds = asyncio.run(latency_points(args.models, args.requests, args.repeats, address))
        rows = report(rounds)
        header = f"{'model':8} {'c':>3} {'in-proc p50':>12} {'p99':>8} {'remote p50':>11} {'p99':>8}"
        print(f"{header} {'added p50 (min..max)':>24}")
        for r in rows:
            print(
                f"{r['model']:8} {r['concurrency']:>3} {r['in_process_p50_us']:>12.1f} {r['in_process_p99_us']:>8.1f}"
                f" {r['remote_p50_us']:>11.1f} {r['remote_p99_us']:>8.1f}"
                f" {r['added_p50_us']:>8.1f} ({r['added_p50_min_us']:.1f}..{r['added_p50_max_us']:.1f})"
            )
        result: dict[str, object] = {"latency_us": rows}
        if not args.no_batch:
            batch = mean_batch(address, 2, 128, args.batch_seconds)
            print(
                f"mlp, 2 front ends x c=128: mean batch {batch['mean_batch']:.1f} rows, {batch['req_per_s']:.0f} req/s"
            )
            result["two_front_ends_mlp_c256"] = batch
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
    finally:
        process.terminate()
        process.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
