"""GPU benchmark: in-process IO-binding onnxruntime against the gateway end to end, on one card.

    python -m loadtests.gpu_bench --models models

For `mlp` and `convnet` (repeat --model for others): onnxruntime in-process
through IO binding (gateway.serving.cuda.runner) at batch 1, 16 and 64, the compute
limit; then `gateway serve --provider cuda --workers 1` on 127.0.0.1, batching
off and on (in-process: `--executors off`), and `gateway serve --executors 1
--workers 12` (twelve front ends feeding one executor process that batches for
all of them; `--exec-workers` changes the twelve, and `--workers 12
--exec-workers 12` compares the two modes at the same worker count), under
closed-loop load at concurrency 1, 16, 64 and 256 (one row per request), driven
by `gateway bench`'s own machinery (loadtests.bench and loadtests.loadgen:
client processes, interleaved repeats, medians). Each gateway point reports its
mean batch (rows per model run) and the executor's busy share (its time in
model runs over the point's wall time). Prints the card, the versions, and one
compact table; writes the numbers as JSON.

ResNet-50-class models are not bundled (the repository stays small): add one
to a model repository and name it with --model.

Without a usable CUDA GPU it prints one line saying why and exits 2.
`--provider cpu` runs the same machinery on the CPU (a dry run of the
benchmark itself, for machines without a GPU; its numbers are CPU numbers).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

MODELS = ("mlp", "convnet")
NO_GPU_EXIT = 2


class NoCuda(Exception):
    """CUDA is not usable here; the message says why, in one line."""


# --------------------------------------------------------------------------- the card and versions


def card_description() -> str:
    """The GPU's name (and driver) from nvidia-smi; else what onnxruntime knows of its device."""
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
            )
        except (OSError, subprocess.TimeoutExpired):
            out = None
        if out is not None and out.returncode == 0 and out.stdout.strip():
            name, _, driver = out.stdout.strip().splitlines()[0].partition(",")
            return f"{name.strip()} (driver {driver.strip()})" if driver.strip() else name.strip()
    import onnxruntime as ort

    for ep_device in getattr(ort, "get_ep_devices", list)():
        hardware = ep_device.device
        if str(hardware.type).endswith("GPU"):
            return f"{hardware.vendor} GPU {hardware.device_id:#06x} (from onnxruntime; nvidia-smi not found)"
    return f"unknown (nvidia-smi not found; onnxruntime device {ort.get_device()})"


def versions() -> dict[str, Any]:
    import onnxruntime as ort

    from loadtests.bench.environment import versions as bench_versions

    found: dict[str, Any] = bench_versions()
    found["onnxruntime_cuda_build"] = getattr(ort, "cuda_version", None) or None
    return found


# --------------------------------------------------------------------------- in-process onnxruntime


def _session(path: Path, provider: str, graphs: bool) -> Any:
    import onnxruntime as ort

    from gateway.config.settings import GatewaySettings
    from gateway.errors import ConfigError
    from gateway.serving.cuda.runner import cuda_provider_options
    from gateway.serving.providers import CPU, ProviderChooser

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if provider == "cpu":
        return ort.InferenceSession(str(path), sess_options=options, providers=[CPU])
    # The gateway's own provider choice, so a fallback to the CPU is caught and explained the same way.
    chooser = ProviderChooser("cuda", cuda_provider_options(GatewaySettings(cuda_graphs=graphs)))
    try:
        requested = chooser.candidates()
        session = ort.InferenceSession(str(path), sess_options=options, providers=chooser.with_options(requested))
        chooser.accept(requested, session.get_providers())
    except ConfigError as exc:
        raise NoCuda(str(exc)) from None
    return session


def in_process_points(
    models: Path, model: str, *, provider: str, batches: Sequence[int], warmup_s: float, duration_s: float, graphs: bool
) -> list[dict[str, Any]]:
    """One IO-bound run after another at each batch size: rows/s and per-run latency.

    Runs in a process of its own (see `measure_in_process`), so its CUDA context is gone before
    the gateway starts on the same card.
    """
    from gateway.serving.cuda.runner import CudaRunner, IoBindingRunner
    from loadtests.loadgen import latency_summary_ms
    from loadtests.signature import feeds, load_signature

    signature = load_signature(models, model)
    session = _session(signature.path, provider, graphs)
    runner: IoBindingRunner
    if provider == "cuda":
        runner = CudaRunner(session, buckets=batches)
    else:
        runner = IoBindingRunner(session, device="cpu", buckets=batches, graphs=graphs)
    try:
        runner.warm_up()  # with graphs: every bucket captured before timing
        points = []
        for batch in batches:
            values = feeds(signature, batch)
            until = time.perf_counter() + warmup_s
            while time.perf_counter() < until:
                runner.run(values)
            samples: list[float] = []
            begin = time.perf_counter()
            while (start := time.perf_counter()) - begin < duration_s:
                runner.run(values)
                samples.append(time.perf_counter() - start)
            busy = sum(samples)
            points.append(
                {
                    "batch": batch,
                    "runs": len(samples),
                    "rows_per_s": len(samples) * batch / busy if busy else 0.0,
                    "pinned": runner.pinned,
                    **latency_summary_ms(np.sort(np.asarray(samples))),
                }
            )
        return points
    finally:
        runner.close()


def measure_in_process(args: argparse.Namespace, model: str, *, graphs: bool) -> list[dict[str, Any]]:
    """`in_process_points` at batches = the concurrency list, in a process of its own."""
    import multiprocessing

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as executor:
        future = executor.submit(
            in_process_points,
            args.models,
            model,
            provider=args.provider,
            batches=list(args.concurrency),
            warmup_s=args.warmup,
            duration_s=args.duration,
            graphs=graphs,
        )
        return future.result(timeout=600)


# --------------------------------------------------------------------------- the gateway end to end


def gateway_summary(args: argparse.Namespace, model: str) -> list[dict[str, Any]]:
    """`gateway bench`'s gateway-nobatch, gateway and gateway-exec targets: `gateway serve --workers W`,
    batching off and on in process, and `--executors 1` with `--exec-workers` front ends."""
    from loadtests.bench.cli import BenchOptions
    from loadtests.bench.sweep import run_bench

    config = BenchOptions(
        models=args.models,
        model=model,
        concurrency=",".join(map(str, args.concurrency)),
        duration=args.duration,
        warmup=args.warmup,
        repeats=args.repeats,
        baselines="gateway-nobatch,gateway,gateway-exec",
        # In process, one worker per GPU (each process holds its own CUDA context); with an
        # executor, many front ends and the one context in the executor.
        workers=args.workers,
        exec_workers=args.exec_workers,
        out=args.out,
        provider=args.provider,
    ).resolve()
    summary: list[dict[str, Any]] = run_bench(config)["summary"]
    return summary


# --------------------------------------------------------------------------- the table


def _median(summary: Sequence[dict[str, Any]], target: str, offered: int, metric: str) -> float | None:
    for entry in summary:
        if entry["target"] == target and entry["mode"] == "closed" and entry["offered"] == offered:
            value = entry.get(metric)
            return float(value["median"]) if value else None
    return None


def _num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _ratio(top: float | None, bottom: float | None) -> str:
    return "-" if top is None or not bottom else f"{top / bottom:.2f}"


def format_table(results: dict[str, Any]) -> str:
    """One line per model and concurrency; rows/s = req/s here (one row per request)."""
    from loadtests.bench.report import table, to_text

    graphs = any("graphs" in r for r in results["models"].values())
    head = ["model", "c", "ort rows/s", "ort p99"]
    head += ["graphs rows/s", "graphs p99"] if graphs else []
    head += ["off req/s", "off p99", "on req/s", "on p99", "on batch", "on/off", "on/ort"]
    head += ["exec req/s", "exec p99", "exec batch", "exec busy", "exec/on"]
    rows = []
    for model, result in results["models"].items():
        ort_by_batch = {p["batch"]: p for p in result["ort"]}
        graph_by_batch = {p["batch"]: p for p in result.get("graphs", [])}
        for c in results["concurrency"]:
            ort = ort_by_batch.get(c, {})
            graph = graph_by_batch.get(c, {})
            off = _median(result["gateway"], "gateway-nobatch", c, "throughput_rps")
            on = _median(result["gateway"], "gateway", c, "throughput_rps")
            line = [model, str(c), _num(ort.get("rows_per_s")), _num(ort.get("p99_ms"), 3)]
            line += [_num(graph.get("rows_per_s")), _num(graph.get("p99_ms"), 3)] if graphs else []
            line += [
                _num(off),
                _num(_median(result["gateway"], "gateway-nobatch", c, "p99_ms"), 2),
                _num(on),
                _num(_median(result["gateway"], "gateway", c, "p99_ms"), 2),
                _num(_median(result["gateway"], "gateway", c, "mean_batch"), 1),
                _ratio(on, off),
                _ratio(on, ort.get("rows_per_s")),
            ]
            executor = _median(result["gateway"], "gateway-exec", c, "throughput_rps")
            busy = _median(result["gateway"], "gateway-exec", c, "executor_busy_share")
            line += [
                _num(executor),
                _num(_median(result["gateway"], "gateway-exec", c, "p99_ms"), 2),
                _num(_median(result["gateway"], "gateway-exec", c, "mean_batch"), 1),
                "-" if busy is None else f"{busy:.0%}",
                _ratio(executor, on),
            ]
            rows.append(line)
    notes = [
        "ort: in-process onnxruntime, IO binding, one run after another at batch = c; p99 in ms per run",
        f"off/on: the gateway (--workers {results['workers']}, --executors off) with batching off/on, "
        "c requests of one row in flight; p99 in ms; batch: rows per model run",
        "on/ort: gateway rows/s over in-process rows/s at the same batch",
        f"exec: the gateway with one executor process (--executors 1) fed by {results['exec_workers']} "
        "front-end worker(s); busy: the executor's time in model runs over wall time; exec/on: req/s ratio",
    ]
    return "\n".join([to_text(table(None, head, rows, plain=True)), "", *notes])


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.gpu_bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", type=Path, default=Path("models"), help="model repository [models]")
    parser.add_argument("--model", action="append", default=None, help=f"repeatable [{', '.join(MODELS)}]")
    parser.add_argument(
        "--concurrency", default="1,16,64,256", help="requests in flight; also the in-process batches [1,16,64,256]"
    )
    parser.add_argument("--workers", type=int, default=1, help="front-end workers, in-process targets [1]")
    parser.add_argument(
        "--exec-workers", type=int, default=12, help="front-end workers feeding the one executor process [12]"
    )
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per point [3]")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds discarded before each point [1]")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats of the gateway sweep [2]")
    parser.add_argument("--cuda-graphs", action="store_true", help="also time in-process runs with CUDA graphs")
    parser.add_argument("--provider", choices=["cuda", "cpu"], default="cuda", help="cpu: a dry run without a GPU")
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="where the JSON goes [bench-results]")
    args = parser.parse_args(argv)
    try:
        args.concurrency = sorted({int(c) for c in args.concurrency.split(",") if c.strip()})
    except ValueError:
        parser.error(f"--concurrency: {args.concurrency!r} is not a list of integers")
    if not args.concurrency or min(args.concurrency) < 1:
        parser.error("--concurrency: give positive integers, e.g. 1,16,64")
    if args.duration <= 0 or args.warmup < 0 or args.repeats < 1:
        parser.error("--duration must be > 0, --warmup >= 0, --repeats >= 1")
    if args.workers < 1 or args.exec_workers < 1:
        parser.error("--workers and --exec-workers: give a number of processes >= 1, e.g. --exec-workers 12")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.provider == "cuda":
        from gateway.serving.providers import cuda_prerequisites

        check = cuda_prerequisites()
        if not check.usable:
            print(f"gpu_bench: no usable CUDA GPU here: {check.reason}", file=sys.stderr)
            return NO_GPU_EXIT
    models = list(args.model or MODELS)
    results: dict[str, Any] = {
        "provider": args.provider,
        "concurrency": args.concurrency,
        "workers": args.workers,
        "exec_workers": args.exec_workers,
        "models": {},
    }
    try:
        for model in models:
            result: dict[str, Any] = {}
            result["ort"] = measure_in_process(args, model, graphs=False)
            if args.cuda_graphs:
                try:
                    result["graphs"] = measure_in_process(args, model, graphs=True)
                except NoCuda:
                    raise
                except Exception as exc:  # e.g. a model with nodes off the CUDA EP: no graphs for it, the rest goes on
                    result["graphs_error"] = f"{type(exc).__name__}: {exc}"
                    print(f"gpu_bench: {model}: no CUDA graphs ({result['graphs_error']})", file=sys.stderr)
            results["models"][model] = result
    except NoCuda as exc:
        print(f"gpu_bench: no usable CUDA GPU here: {exc}", file=sys.stderr)
        return NO_GPU_EXIT
    results["card"] = card_description() if args.provider == "cuda" else "none (--provider cpu: CPU numbers)"
    results["versions"] = versions()
    print(f"card: {results['card']}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items() if v))
    print("note: ResNet-50-class models are not bundled; add one to --models and pass --model NAME")
    import click

    for model in models:
        try:
            results["models"][model]["gateway"] = gateway_summary(args, model)
        except click.ClickException as exc:
            print(f"gpu_bench: {model}: the gateway run failed: {exc.format_message()}", file=sys.stderr)
            return 1
    print()
    print(format_table(results))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"gpu-bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    # Run the imported module's main, not this __main__ copy's: what the measuring process raises
    # (NoCuda) and runs must be pickled under loadtests.gpu_bench, the name it imports them by.
    from loadtests.gpu_bench import main as _main

    raise SystemExit(_main())
