"""The run: every repeat runs every target in turn over the same sweep of points.

Interleaving the targets within each repeat means the machine's noise hits all
of them alike; each point's server-side numbers (CPU, batch sizes, shadow
copies) are sampled over exactly the clients' measurement window.
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import os
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click

from gateway.errors import GatewayError
from loadtests.bench.config import EXECUTOR_TARGETS, REST_TARGETS, TARGETS, BenchConfig
from loadtests.bench.cpus import busy_cpu_seconds, format_cpus, pinning_tool
from loadtests.bench.environment import environment
from loadtests.bench.report import progress_line
from loadtests.bench.routing import routing_cost
from loadtests.bench.summary import compute_ratios, label, summarize
from loadtests.bench.targets import (
    ServerProcess,
    StatsProbe,
    StatsSample,
    bare_command,
    gateway_command,
    naive_command,
    server_process,
    shadow_repo,
)
from loadtests.loadgen import ClientPool, LoadSpec, Mode, PointResult, ort_points, pin_current_process
from loadtests.restcall import RestCall, build_rest_call
from loadtests.signature import ModelSignature, build_request, load_signature

Observer = Callable[[float, float], dict[str, Any]]


def _sleep_until(when: float) -> None:
    time.sleep(max(0.0, when - time.monotonic()))


@dataclass
class Bench:
    config: BenchConfig
    signature: ModelSignature
    payload: bytes
    notes: list[str] = field(default_factory=list)
    points: list[dict[str, Any]] = field(default_factory=list)
    # `--compare A B`: targets "vA" and "vB", the gateway with requests pinned to each version.
    version_payloads: dict[str, bytes] = field(default_factory=dict)
    # The REST targets' request, built once per body format: the same inputs as `payload`.
    rest_calls: dict[str, RestCall] = field(default_factory=dict)

    def run_target(self, target: str, repeat: int, pool: ClientPool) -> None:
        if target == "ort":
            self.run_ort(repeat)
            return
        with tempfile.TemporaryDirectory(prefix="gateway-bench-") as scratch:
            self._run_server_target(target, repeat, pool, Path(scratch))

    def _command(self, target: str, scratch: Path) -> list[str]:
        if target == "bare":
            return bare_command(self.config, self.signature.version)
        if target == "naive":
            return naive_command(self.config, self.signature.version)
        if target == "gateway-shadow":
            models = shadow_repo(self.config, self.signature.version, scratch / "models")
            return gateway_command(self.config, batching=True, state_dir=scratch / "state", models=models)
        if target in REST_TARGETS:
            return gateway_command(self.config, batching=True, state_dir=scratch / "state", http=True)
        if target in EXECUTOR_TARGETS:
            return gateway_command(self.config, batching=True, state_dir=scratch / "state", executor=True)
        batching = target == "gateway" or target in self.version_payloads
        return gateway_command(self.config, batching=batching, state_dir=scratch / "state")

    def _run_server_target(self, target: str, repeat: int, pool: ClientPool, scratch: Path) -> None:
        pinned = target in self.version_payloads
        shadow = self.config.shadow if target == "gateway-shadow" else None
        version = target[1:] if pinned else self.signature.version
        rest = self.rest_calls.get(target)
        with server_process(target, self._command(target, scratch), self.config.server_cpus) as server:
            if rest is not None and not server.http:
                raise click.ClickException(f"{target} announced no REST address ('http on'):\n{server.tail()}")
            # The baselines have no ModelStatistics (so no mean batch: naive runs every request alone).
            probe = StatsProbe(server.address, self.config.model) if target not in ("bare", "naive") else None
            try:
                for index, (mode, offered) in enumerate(self.sweep()):
                    # Same seed for every target at a point: they all face the same arrival sequence.
                    spec = self.spec(server.address, mode, offered, seed=repeat * 1000 + index)
                    if pinned:
                        spec = dataclasses.replace(spec, payload=self.version_payloads[target])
                    if rest is not None:
                        spec = dataclasses.replace(spec, address=server.http, payload=b"", rest=rest)
                    observer = self.observer(server, probe, version, shadow, executor=target in EXECUTOR_TARGETS)
                    point = pool.run(spec, observer)
                    self.record(target, repeat, point)
                    if server.exited():
                        raise click.ClickException(f"{target} exited during the run:\n{server.tail()}")
                    if point.extra.get("shadow_rows_per_row") == 0.0:
                        raise click.ClickException(
                            f"{target}: v{shadow} ran no shadow copies while v{version} answered "
                            f"{point.completed} requests; the release did not mirror"
                        )
            finally:
                if probe:
                    probe.close()

    def sweep(self) -> list[tuple[Mode, float]]:
        closed: list[tuple[Mode, float]] = [("closed", float(c)) for c in self.config.concurrency]
        return closed + [("open", r) for r in self.config.rates]

    def spec(self, address: str, mode: Mode, offered: float, seed: int) -> LoadSpec:
        c = self.config
        return LoadSpec(
            address=address,
            payload=self.payload,
            rows=c.rows,
            outputs=self.signature.outputs,
            mode=mode,
            offered=offered,
            duration_s=c.duration_s,
            warmup_s=c.warmup_s,
            channels=c.channels,
            request_timeout_s=c.request_timeout_s,
            seed=seed,
        )

    def server_cores(self) -> int:
        return len(self.config.server_cpus or os.sched_getaffinity(0))

    def observer(
        self,
        server: ServerProcess,
        probe: StatsProbe | None,
        version: str,
        shadow: str | None = None,
        *,
        executor: bool = False,
    ) -> Observer:
        """What the server did over a point's window: its CPU, the machine's, mean batch, shadow copies run,
        and with an executor process the share of the window it spent running the model.

        Mean batch is rows run per model run, both from the process that runs the model: with an
        executor its counts cover every worker's requests (a worker's `inference_count` covers only
        its own, so dividing that by the executor's runs would understate the batch W times); without
        one, the probe's single connection reads one worker throughout, whose rows and runs go together.
        """
        cores = self.server_cores()
        watched = self.watched_cpus()

        def sample() -> tuple[StatsSample | None, StatsSample | None]:
            if probe is None:
                return None, None
            return probe.sample(version), probe.sample(shadow) if shadow else None

        def on_window(start: float, end: float) -> dict[str, Any]:
            _sleep_until(start)
            busy0, cpu0, (stats0, shadow0) = busy_cpu_seconds(watched), server.cpu_seconds(), sample()
            _sleep_until(end)
            busy1, cpu1, (stats1, shadow1) = busy_cpu_seconds(watched), server.cpu_seconds(), sample()
            extra: dict[str, Any] = {
                "server_cpu_s": cpu1 - cpu0,
                "server_cpu_share": (cpu1 - cpu0) / ((end - start) * cores),
                "machine_busy_s": busy1 - busy0,
            }
            if stats0 and stats1 and stats1.executions > stats0.executions and stats1.rows_run >= stats0.rows_run:
                # (Counts that went down: the executor restarted within the window; no figure then.)
                runs = stats1.executions - stats0.executions
                extra["mean_batch"] = (stats1.rows_run - stats0.rows_run) / runs
                if executor and stats1.compute_ns >= stats0.compute_ns:
                    # The executor's time in model runs over the window's wall time: near 1, the model
                    # (the device) is the bottleneck; well below, the front ends or the transport are.
                    extra["executor_busy_share"] = (stats1.compute_ns - stats0.compute_ns) / ((end - start) * 1e9)
            if stats0 and stats1 and shadow0 and shadow1 and stats1.rows_run > stats0.rows_run:
                # 1.0: every primary row was mirrored and run; less: the shadow lane dropped copies.
                extra["shadow_rows_per_row"] = (shadow1.rows_run - shadow0.rows_run) / (
                    stats1.rows_run - stats0.rows_run
                )
            return extra

        return on_window

    def watched_cpus(self) -> list[int]:
        """The CPUs this bench uses: anything else busy on them is noise in its numbers."""
        c = self.config
        if c.server_cpus and c.client_cpus:
            return sorted({*c.server_cpus, *c.client_cpus})
        return sorted(os.sched_getaffinity(0) | set(c.server_cpus or ()) | set(c.client_cpus or ()))

    def run_ort(self, repeat: int) -> None:
        """The in-process onnxruntime baseline, in a process pinned to the server's CPUs."""
        c = self.config
        batches = [c.rows * concurrency for concurrency in c.ort_concurrency()]
        with ProcessPoolExecutor(
            max_workers=1,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=pin_current_process,
            initargs=(c.server_cpus,),
        ) as executor:
            future = executor.submit(
                ort_points,
                self.signature,
                batches,
                warmup_s=c.warmup_s,
                duration_s=c.duration_s,
                intra_op_threads=c.intra_op_threads,
            )
            results = future.result(timeout=len(batches) * (c.warmup_s + c.duration_s) + 120)
        for concurrency, result in zip(c.ort_concurrency(), results, strict=True):
            self.record("ort", repeat, self._ort_point(concurrency, result))

    def _ort_point(self, concurrency: int, result: dict[str, Any]) -> PointResult:
        c = self.config
        return PointResult(
            mode="closed",
            offered=float(concurrency),
            duration_s=c.duration_s,
            completed=result["runs"] * concurrency,
            errors={},
            warmup_errors={},
            throughput_rps=result["rows_per_s"] / c.rows,
            rows_per_s=result["rows_per_s"],
            p50_ms=result["p50_ms"],
            p90_ms=result["p90_ms"],
            p99_ms=result["p99_ms"],
            max_ms=result["max_ms"],
            mean_ms=result["mean_ms"],
            client_cpu_s=0.0,
            client_cpu_share=0.0,
            processes=0,
            channels=0,
            extra={
                "batch": result["batch"],
                "runs_per_s": result["runs_per_s"],
                "server_cpu_share": result["server_cpu_s"] / (c.duration_s * self.server_cores()),
            },
        )

    def record(self, target: str, repeat: int, point: PointResult) -> None:
        row = {"target": target, "repeat": repeat, **asdict(point)}
        extra = row.pop("extra")
        row.update(extra)
        if "machine_busy_s" in row and not math.isnan(row["machine_busy_s"]):
            # Busy time on our CPUs that neither the server nor the clients account for: other processes.
            other = row["machine_busy_s"] - row["server_cpu_s"] - row["client_cpu_s"]
            row["other_cpu_share"] = max(0.0, other) / (point.duration_s * len(self.watched_cpus()))
        if "server_cpu_s" in row and point.completed:
            # The server's CPU (every core, every worker) per 1,000 requests answered in the window, in ms.
            row["server_cpu_ms_per_1k"] = row["server_cpu_s"] / point.completed * 1e6
        self.points.append(row)
        click.echo(progress_line(row, self.config.repeats))
        problem = extra.get("response_problem")
        if problem:
            raise click.ClickException(f"{target} answered a wrong response: {problem}")


def _signature(config: BenchConfig, version: str | None, what: str = "") -> ModelSignature:
    try:
        return load_signature(config.models, config.model, version)
    except (GatewayError, ValueError) as exc:
        raise click.ClickException(f"{what}{exc}") from None


def check_shadow(config: BenchConfig, stable: str) -> None:
    """--shadow names another version of the model; requests must not be pinned (pinned ones are never mirrored)."""
    if config.version is not None:
        raise click.UsageError(
            "gateway-shadow mirrors the stable version's traffic, and --version pins requests (never mirrored): "
            "leave --version out, or set [release] stable in model.toml"
        )
    if config.shadow == stable:
        raise click.BadParameter(f"v{stable} is the stable version being benchmarked", param_hint="--shadow")
    _signature(config, config.shadow, "--shadow: ")


def _announce(config: BenchConfig, signature: ModelSignature, notes: list[str]) -> None:
    echo = click.echo
    echo(f"model {config.model} v{signature.version} ({signature.path}), rows/request {config.rows}")
    echo(f"targets {', '.join(config.targets)}; {config.repeats} repeat(s), interleaved")
    sweep = [f"closed loop c={','.join(map(str, config.concurrency))}"] if config.concurrency else []
    sweep += [f"open loop r={','.join(label(r) for r in config.rates)}/s"] if config.rates else []
    echo(f"{'; '.join(sweep)}; {config.duration_s:g} s per point after {config.warmup_s:g} s warm-up")
    echo(
        f"cpus: server {format_cpus(config.server_cpus) if config.server_cpus else 'any'}, "
        f"clients {format_cpus(config.client_cpus) if config.client_cpus else 'any'} ({config.pinning}); "
        f"{config.processes} client process(es) x {config.channels} channel(s); "
        f"onnxruntime intra-op threads {config.intra_op_threads or 'default'}"
    )
    if "gateway-shadow" in config.targets:
        echo(f"gateway-shadow: stable v{signature.version}, v{config.shadow} mirrored at 100% (a copy of the model)")
    if EXECUTOR_TARGETS & set(config.targets):
        workers = config.exec_workers if config.exec_workers is not None else config.workers
        echo(
            f"gateway-exec: one executor process for {workers if workers is not None else 'the default'} "
            f"worker(s) (--executors 1), onnxruntime threads {config.exec_intra_op_threads or 'default'}; "
            "the other gateway targets run --executors off"
        )
    echo(f"expected run time about {config.estimate_s():.0f} s")
    for note in notes:
        echo(f"note: {note}")


def run_bench(config: BenchConfig) -> dict[str, Any]:
    """Run every repeat of every target; the results as `gateway bench` writes them to JSON."""
    signature = _signature(config, config.version)
    payload = build_request(signature, config.rows, pin_version=config.version is not None)
    bench = Bench(config, signature, payload)
    for target in config.targets:
        if target not in TARGETS:  # "vA" from --compare: requests pinned to version A
            pinned = _signature(config, target[1:])
            bench.version_payloads[target] = build_request(pinned, config.rows, pin_version=True)
        elif target in REST_TARGETS:
            pin = config.version is not None
            bench.rest_calls[target] = build_rest_call(signature, config.rows, REST_TARGETS[target], pin_version=pin)
    if "gateway-shadow" in config.targets:
        check_shadow(config, signature.version)
    env = environment()
    started = time.time()
    _announce(config, signature, bench.notes)
    previous_affinity = os.sched_getaffinity(0)
    if config.client_cpus:
        # The orchestrating process sleeps through the points, but keep even that off the server's cores.
        os.sched_setaffinity(0, config.client_cpus)
    try:
        with ClientPool(config.processes, config.client_cpus) as pool:
            for repeat in range(config.repeats):
                for target in config.targets:
                    bench.run_target(target, repeat, pool)
    finally:
        os.sched_setaffinity(0, previous_affinity)
    summary = summarize(bench.points)
    ratios = compute_ratios(summary, config.concurrency, config.rates)
    env["machine"]["loadavg_end"] = os.getloadavg()
    config_record = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}
    return {
        "config": {**config_record, "version_resolved": signature.version, "signature": _signature_record(signature)},
        **env,
        "cpus": {
            "server": format_cpus(config.server_cpus) if config.server_cpus else None,
            "client": format_cpus(config.client_cpus) if config.client_cpus else None,
            "how": config.pinning,
            "server_pinning_tool": pinning_tool(),
        },
        "notes": bench.notes,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "wall_s": time.time() - started,
        "points": bench.points,
        "summary": summary,
        "ratios": ratios,
        "routing": routing_cost(),
    }


def _signature_record(signature: ModelSignature) -> dict[str, Any]:
    return {
        "inputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in signature.inputs],
        "outputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in signature.outputs],
    }
