"""Overload soak: offer several times the gateway's capacity and watch it hold.

    python -m loadtests.overload --model mlp --rows 16 --factor 3 --duration 60

1. Starts `gateway serve` (one worker, pinned to the first half of the CPUs
   when there are two or more) with the model's queue capped at --queue.
2. Measures capacity: closed-loop throughput at concurrency 64 for a few seconds.
3. Offers --factor x capacity open-loop (Poisson) for --duration seconds, and
   every 0.5 s samples the server's resident memory (/proc) and its queue
   depth (/metrics).
4. Reports: requests offered, answered OK, rejected (RESOURCE_EXHAUSTED),
   other errors, requests never answered (must be 0), the maximum queue depth
   seen (must stay <= --queue), and RSS at start, middle and end.

Traffic goes to 127.0.0.1 only; every loop is bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc

from gateway.server import launch
from loadtests.loadgen import arrival_times
from loadtests.signature import build_request, load_signature

METHOD = "/inference.GRPCInferenceService/ModelInfer"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def queue_depth(metrics_port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2).read().decode()
    values = [float(m.group(1)) for m in re.finditer(r"^gateway_queue_depth\{[^}]*\} (\S+)$", text, re.M)]
    return max(values, default=0.0)


async def closed_loop(address: str, request: bytes, concurrency: int, seconds: float) -> float:
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(METHOD, request_serializer=None, response_deserializer=None)
        done = 0
        end = time.monotonic() + seconds

        async def worker() -> None:
            nonlocal done
            while time.monotonic() < end:
                await call(request, timeout=10)
                done += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done / seconds


async def open_loop(
    address: str, request: bytes, *, rate: float, seconds: float, pid: int, metrics_port: int
) -> dict[str, object]:
    counts = {"offered": 0, "ok": 0, "rejected": 0, "other_errors": 0}
    codes: dict[str, int] = {}
    samples: list[tuple[float, float, float]] = []
    pending: set[asyncio.Task[None]] = set()
    channels = [grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(4)]
    calls = [c.unary_unary(METHOD, request_serializer=None, response_deserializer=None) for c in channels]

    async def one(i: int) -> None:
        try:
            await calls[i % len(calls)](request, timeout=30)
            counts["ok"] += 1
        except grpc.aio.AioRpcError as exc:
            key = "rejected" if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED else "other_errors"
            codes[exc.code().name] = codes.get(exc.code().name, 0) + 1
            counts[key] += 1

    async def sample() -> None:
        while True:
            samples.append((time.monotonic(), rss_mb(pid), await asyncio.to_thread(queue_depth, metrics_port)))
            await asyncio.sleep(0.5)

    sampler = asyncio.create_task(sample())
    start = time.monotonic()
    for i, next_at in enumerate(arrival_times(start, rate, seed=7)):
        if next_at >= start + seconds:
            break
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        task = asyncio.create_task(one(i))
        pending.add(task)
        task.add_done_callback(pending.discard)
        counts["offered"] += 1
    if pending:
        await asyncio.wait(pending, timeout=40)
    sampler.cancel()
    for channel in channels:
        await channel.close()
    answered = counts["ok"] + counts["rejected"] + counts["other_errors"]
    rss = [s[1] for s in samples]
    return {
        **counts,
        "never_answered": counts["offered"] - answered,
        "achieved_offer_rate": counts["offered"] / seconds,
        "max_queue_depth": max((s[2] for s in samples), default=0.0),
        "rss_mb_start": rss[0] if rss else float("nan"),
        "rss_mb_middle": rss[len(rss) // 2] if rss else float("nan"),
        "rss_mb_end": rss[-1] if rss else float("nan"),
        "samples": len(samples),
        "error_codes": codes,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--factor", type=float, default=3.0, help="offered load / measured capacity")
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--queue", type=int, default=256, help="max_queue_size for the run")
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    args = parser.parse_args()

    repo = Path(tempfile.mkdtemp(prefix="gateway-overload-"))
    shutil.copytree(args.models / args.model, repo / args.model)
    spec = repo / args.model / "model.toml"
    text = re.sub(r"^max_queue_size = \d+$", f"max_queue_size = {args.queue}", spec.read_text(), flags=re.M)
    spec.write_text(text)
    cpus = os.sched_getaffinity(0)
    pin = ["taskset", "-c", str(min(cpus))] if len(cpus) >= 2 and shutil.which("taskset") else []
    args_serve = [
        "--models",
        str(repo),
        "--port",
        "0",
        "--metrics-port",
        "0",
        "--control-port",
        "-1",
        "--dashboard-port",
        "-1",
        "--http-port",
        "-1",
        "--workers",
        "1",
        "--max-inflight",
        str(args.queue * 2),
        "--state-dir",
        str(repo / "state"),
        "--log-level",
        "INFO",
    ]
    try:
        launched = launch.serve(args_serve, prefix=pin)
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        return 2
    proc, address, metrics_port = launched.proc, launched.address, launched.metrics_port
    if pin and len(cpus) >= 2:
        os.sched_setaffinity(0, set(sorted(cpus)[1:]))
    try:
        request = build_request(load_signature(repo, args.model), args.rows, pin_version=False)
        capacity = asyncio.run(closed_loop(address, request, 64, 4.0))
        rate = capacity * args.factor
        print(
            f"capacity {capacity:.0f} req/s ({args.rows} rows each); offering {rate:.0f} req/s "
            f"for {args.duration:.0f} s, queue capped at {args.queue}",
            flush=True,
        )
        result = asyncio.run(
            open_loop(address, request, rate=rate, seconds=args.duration, pid=proc.pid, metrics_port=metrics_port)
        )
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        result["server_outcomes"] = {
            m.group(1): float(m.group(2))
            for m in re.finditer(r'^gateway_requests_total\{[^}]*outcome="(\w+)"[^}]*\} (\S+)$', text, re.M)
        }
    finally:
        proc.terminate()
        proc.wait(30)
    result.update(
        {
            "capacity_req_s": capacity,
            "factor": args.factor,
            "queue_cap": args.queue,
            "model": args.model,
            "rows": args.rows,
            "duration_s": args.duration,
        }
    )
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"overload-{args.model}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=2))
    for key, value in result.items():
        print(f"{key:>22}: {value:.1f}" if isinstance(value, float) else f"{key:>22}: {value}")
    print(f"wrote {out}")
    ok = result["never_answered"] == 0 and float(result["max_queue_depth"]) <= args.queue  # type: ignore[arg-type]
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
