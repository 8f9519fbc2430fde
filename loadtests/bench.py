"""`gateway bench`: the gateway against its baselines, side by side, in one run.

Targets (see the team's performance notes):
  ort              session.run in a loop, in-process: the compute limit
  bare             grpc.aio answering a fixed response: the Python gRPC limit
  gateway-nobatch  the gateway, one model run per request
  gateway          the gateway as configured (dynamic batching)

Every repeat runs every target in turn (interleaved), so the machine's noise
hits all of them alike; the report is the median per point with the min/max
spread, and the ratios between targets from this one run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import queue
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import click

from loadtests.loadgen import (
    ClientPool,
    LoadSpec,
    Mode,
    ModelSignature,
    PointResult,
    build_request,
    load_signature,
    ort_point,
    pin_current_process,
)

TARGETS = ("ort", "bare", "gateway-nobatch", "gateway", "gateway-shadow")
DEFAULT_TARGETS = "ort,bare,gateway-nobatch,gateway"
LISTENING = re.compile(r"listening on (\S+):(\d+)")
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 20.0
SUMMARY_METRICS = (
    "throughput_rps",
    "rows_per_s",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "max_ms",
    "client_cpu_share",
    "server_cpu_share",
    "mean_batch",
    "success_ratio",
    "shadow_rows_per_row",
    "other_cpu_share",
)
# Other processes busy on the bench's CPUs for this share of a point's window: its numbers are suspect.
NOISY_SHARE = 0.05

EPILOG = """\b
Examples:
  gateway bench                                        # digits, every baseline, c=1,4,16,64, 3 repeats
  gateway bench --smoke --out /tmp/bench               # a few seconds: does everything work?
  gateway bench --model mlp --rows 8 --concurrency 1,16,64 --duration 3
  gateway bench --rates 500,1000,2000 --baselines bare,gateway   # open loop (Poisson arrivals)
  gateway bench --server-cpus 0-3 --client-cpus 4-7 --workers 4
  gateway bench --compare 1 2 --concurrency 1,16,64 --slo-ms 5   # two versions, same load, interleaved

\b
Shadow overhead on the primary at half load, in two runs (the second's --rates is half
the first's gateway req/s at c=16):
  gateway bench --baselines gateway,gateway-shadow --shadow 3 --concurrency 16 --duration 3
  gateway bench --baselines gateway,gateway-shadow --shadow 3 --concurrency '' --rates 1600 --duration 5
"""


# --------------------------------------------------------------------------- parsing helpers


def parse_cpus(text: str) -> list[int]:
    """`0-3,6` -> [0, 1, 2, 3, 6] (the taskset/cpuset list syntax)."""
    cpus: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        low, _, high = part.partition("-")
        first, last = int(low), int(high) if high else int(low)
        if first < 0 or last < first:
            raise ValueError(f"bad CPU range {part!r}")
        cpus.update(range(first, last + 1))
    if not cpus:
        raise ValueError(f"no CPUs in {text!r}")
    return sorted(cpus)


def format_cpus(cpus: Sequence[int]) -> str:
    ordered = sorted(set(cpus))
    ranges: list[str] = []
    start = prev = ordered[0]
    for cpu in [*ordered[1:], -2]:
        if cpu != prev + 1:
            ranges.append(str(start) if start == prev else f"{start}-{prev}")
            start = cpu
        prev = cpu
    return ",".join(ranges)


def parse_numbers(text: str, kind: type[int] | type[float], name: str) -> list[Any]:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected comma-separated numbers", param_hint=name) from None
    if any(v <= 0 for v in values):
        raise click.BadParameter(f"{text!r}: every value must be > 0", param_hint=name)
    return values


def label(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


# --------------------------------------------------------------------------- configuration


@dataclass(slots=True)
class BenchConfig:
    models: Path
    model: str
    version: str | None
    rows: int
    concurrency: list[int]
    rates: list[float]
    duration_s: float
    warmup_s: float
    repeats: int
    processes: int
    channels: int
    targets: list[str]
    workers: int | None
    intra_op_threads: int
    out: Path
    smoke: bool
    server_cpus: list[int] | None
    client_cpus: list[int] | None
    pinning: str
    request_timeout_s: float
    shadow: str | None = None
    provider: str = "cpu"

    def estimate_s(self) -> float:
        point = self.warmup_s + self.duration_s + 0.15
        servers = [t for t in self.targets if t != "ort"]
        ort = (len(self.ort_concurrency()) * point + 0.5) if "ort" in self.targets else 0.0
        per_repeat = ort + len(servers) * ((len(self.concurrency) + len(self.rates)) * point + 1.0)
        return self.repeats * per_repeat + 2.0

    def ort_concurrency(self) -> list[int]:
        # Batch `rows` (c=1) is the per-request compute limit; keep it even if the sweep skips c=1.
        return sorted({1, *self.concurrency})


def choose_cpus(server: str | None, client: str | None) -> tuple[list[int] | None, list[int] | None, str]:
    available = sorted(os.sched_getaffinity(0))
    if server or client:
        server_cpus = parse_cpus(server) if server else None
        client_cpus = parse_cpus(client) if client else None
        how = "as given"
    elif len(available) >= 2:
        half = len(available) // 2
        server_cpus, client_cpus = available[:half], available[half:]
        how = "server on the first half of the cores, clients on the rest"
    else:
        return None, None, "none (fewer than 2 cores: server and clients share the CPU)"
    for cpus in (server_cpus, client_cpus):
        if cpus and not set(cpus) <= set(available):
            raise click.BadParameter(f"CPUs {format_cpus(cpus)} are not all available (have {format_cpus(available)})")
    if server_cpus and client_cpus and set(server_cpus) & set(client_cpus):
        how += "; WARNING: server and client CPU sets overlap"
    return server_cpus, client_cpus, how


def gateway_serve_flags() -> set[str]:
    """The flags this checkout's `gateway serve` has (some land later than the bench)."""
    from gateway.cli.main import serve

    return {opt for param in serve.params for opt in param.opts}


# --------------------------------------------------------------------------- server subprocesses


def _proc_cpu_seconds(pid: int) -> float:
    """User+system CPU of a process and its live descendants, from /proc (workers are children)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total, stack, seen = 0.0, [pid], set()
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        try:
            with open(f"/proc/{current}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as f:
                    stack.extend(int(c) for c in f.read().split())
        except (OSError, IndexError, ValueError):
            continue
    return total


def _busy_cpu_seconds(cpus: Iterable[int]) -> float:
    """Time these CPUs spent busy (user, nice, system, irq, softirq, steal), from /proc/stat; NaN without it."""
    ticks = os.sysconf("SC_CLK_TCK")
    wanted = {f"cpu{cpu}" for cpu in cpus}
    total = 0
    try:
        with open("/proc/stat") as f:
            for line in f:
                fields = line.split()
                if fields and fields[0] in wanted:
                    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[1:9])
                    total += user + nice + system + irq + softirq + steal
    except (OSError, ValueError):
        return math.nan
    return total / ticks


@dataclass
class ServerProcess:
    name: str
    proc: subprocess.Popen[str]
    address: str
    tail: deque[str]

    def cpu_seconds(self) -> float:
        return _proc_cpu_seconds(self.proc.pid)

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                return None
        return self.proc.returncode


@contextlib.contextmanager
def server_process(name: str, command: list[str], cpus: list[int] | None) -> Iterator[ServerProcess]:
    """Start a server on 127.0.0.1:0, wait for `listening on`, always stop it."""
    prefix: list[str] = []
    preexec: Callable[[], None] | None = None
    if cpus:
        if shutil.which("taskset"):
            prefix = ["taskset", "-c", format_cpus(cpus)]
        else:
            pinned = list(cpus)

            def preexec() -> None:
                os.sched_setaffinity(0, pinned)

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [*prefix, *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        preexec_fn=preexec,  # only without taskset
        # Its own session: Ctrl-C on the bench reaches only the bench, which then stops it.
        start_new_session=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()
    tail: deque[str] = deque(maxlen=60)

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail.append(line.rstrip())
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, name=f"{name}-output", daemon=True).start()
    deadline = time.monotonic() + START_TIMEOUT_S
    address = None
    while address is None:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            line = None
        if line is None:
            proc.kill()
            proc.wait(10)
            shown = "\n".join(tail) or "(no output)"
            raise click.ClickException(f"{name} did not start ({' '.join(command)}):\n{shown}")
        match = LISTENING.search(line)
        if match:
            address = f"{match.group(1)}:{match.group(2)}"
    server = ServerProcess(name, proc, address, tail)
    try:
        yield server
    finally:
        server.stop()


@dataclass(frozen=True, slots=True)
class StatsSample:
    inferences: int  # rows answered to clients
    executions: int  # model runs
    rows_run: int  # rows the model computed, shadow copies included (from the per-batch-size counts)


class StatsProbe:
    """The gateway's own ModelStatistics: how many rows each model run carried, per version."""

    def __init__(self, address: str, model: str) -> None:
        import grpc

        from gateway.protocol.pb import inference_pb2 as pb

        self._pb = pb
        self._model = model
        self._channel = grpc.insecure_channel(address)
        self._statistics = self._channel.unary_unary(
            "/inference.GRPCInferenceService/ModelStatistics",
            request_serializer=pb.ModelStatisticsRequest.SerializeToString,
            response_deserializer=pb.ModelStatisticsResponse.FromString,
        )

    def sample(self, version: str) -> StatsSample | None:
        request = self._pb.ModelStatisticsRequest(name=self._model, version=version)
        try:
            response = self._statistics(request, timeout=2.0)
        except Exception:  # statistics are a bonus; a server without them still benchmarks
            return None
        stats = list(response.model_stats)
        return StatsSample(
            inferences=sum(s.inference_count for s in stats),
            executions=sum(s.execution_count for s in stats),
            rows_run=sum(b.batch_size * b.compute_infer.count for s in stats for b in s.batch_stats),
        )

    def close(self) -> None:
        self._channel.close()


def _sleep_until(when: float) -> None:
    time.sleep(max(0.0, when - time.monotonic()))


# --------------------------------------------------------------------------- the run


@dataclass
class Bench:
    config: BenchConfig
    signature: ModelSignature
    payload: bytes
    notes: list[str] = field(default_factory=list)
    points: list[dict[str, Any]] = field(default_factory=list)
    serve_flags: set[str] = field(default_factory=set)
    # `--compare A B`: targets "vA" and "vB", the gateway with requests pinned to each version.
    version_payloads: dict[str, bytes] = field(default_factory=dict)

    def echo(self, message: str) -> None:
        click.echo(message)

    # --- commands

    def gateway_command(self, batching: bool, state_dir: Path, models: Path | None = None) -> list[str]:
        c = self.config
        command = [sys.executable, "-m", "gateway", "serve", "--models", str(models or c.models), "--load", c.model]
        command += ["--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1", "--provider", c.provider]
        command += ["--log-level", "WARNING"]
        if "--state-dir" in self.serve_flags:
            # A fresh store per server: a stored release (say, from `gateway traffic set` in this checkout)
            # would otherwise replace model.toml's, and gateway-shadow would quietly run without its shadow.
            command += ["--state-dir", str(state_dir)]
        if "--control-port" in self.serve_flags:
            # The control API's fixed default port would collide with anything else on the machine.
            command += ["--control-port", "-1"]
        if c.intra_op_threads:
            command += ["--intra-op-threads", str(c.intra_op_threads)]
        if c.workers is not None:
            command += ["--workers", str(c.workers)]
        if not batching and "--batching" in self.serve_flags:
            command += ["--batching", "off"]
        return command

    def shadow_repo(self, root: Path) -> Path:
        """A copy of the model under `root` whose release mirrors every stable request to --shadow."""
        c = self.config
        assert c.shadow is not None
        shutil.copytree(c.models / c.model, root / c.model)
        spec = root / c.model / "model.toml"
        try:
            text = spec.read_text() if spec.exists() else ""
            spec.write_text(with_shadow_release(text, self.signature.version, c.shadow))
        except ValueError as exc:
            raise click.ClickException(f"{c.models / c.model / 'model.toml'}: {exc}") from None
        return root

    def bare_command(self) -> list[str]:
        c = self.config
        command = [sys.executable, "-m", "loadtests.bare_server", "--models", str(c.models), "--model", c.model]
        command += ["--version", self.signature.version, "--rows", str(c.rows), "--host", "127.0.0.1", "--port", "0"]
        workers = self.bare_workers()
        if workers > 1:
            command += ["--workers", str(workers)]
        return command

    def bare_workers(self) -> int:
        workers = self.config.workers
        if workers == 0:  # the gateway's "one per core": match it on the cores the server has
            return len(self.config.server_cpus or os.sched_getaffinity(0))
        return workers or 1

    # --- one target

    def run_target(self, target: str, repeat: int, pool: ClientPool) -> None:
        if target == "ort":
            self.run_ort(repeat)
            return
        with contextlib.ExitStack() as scratch:
            self._run_server_target(target, repeat, pool, Path(scratch.enter_context(_scratch_dir())))

    def _run_server_target(self, target: str, repeat: int, pool: ClientPool, scratch: Path) -> None:
        pinned = target in self.version_payloads
        shadow = self.config.shadow if target == "gateway-shadow" else None
        if target == "bare":
            command = self.bare_command()
        elif shadow:
            command = self.gateway_command(True, scratch / "state", models=self.shadow_repo(scratch / "models"))
        else:
            command = self.gateway_command(target == "gateway" or pinned, scratch / "state")
        version = target[1:] if pinned else self.signature.version
        with server_process(target, command, self.config.server_cpus) as server:
            probe = StatsProbe(server.address, self.config.model) if target != "bare" else None
            try:
                for index, (mode, offered) in enumerate(self.sweep()):
                    # Same seed for every target at a point: they all face the same arrival sequence.
                    spec = self.spec(server.address, mode, offered, seed=repeat * 1000 + index)
                    if pinned:
                        spec = dataclasses.replace(spec, payload=self.version_payloads[target])
                    point = pool.run(spec, self.observer(server, probe, version, shadow))
                    self.record(target, repeat, point)
                    if server.proc.poll() is not None:
                        raise click.ClickException(f"{target} exited during the run:\n" + "\n".join(server.tail))
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

    def observer(
        self, server: ServerProcess, probe: StatsProbe | None, version: str, shadow: str | None = None
    ) -> Callable[[float, float], dict[str, Any]]:
        cores = len(self.config.server_cpus or os.sched_getaffinity(0))
        watched = self.watched_cpus()

        def sample() -> tuple[StatsSample | None, StatsSample | None]:
            if probe is None:
                return None, None
            return probe.sample(version), probe.sample(shadow) if shadow else None

        def on_window(start: float, end: float) -> dict[str, Any]:
            _sleep_until(start)
            busy0, cpu0, (stats0, shadow0) = _busy_cpu_seconds(watched), server.cpu_seconds(), sample()
            _sleep_until(end)
            busy1, cpu1, (stats1, shadow1) = _busy_cpu_seconds(watched), server.cpu_seconds(), sample()
            extra: dict[str, Any] = {
                "server_cpu_s": cpu1 - cpu0,
                "server_cpu_share": (cpu1 - cpu0) / ((end - start) * cores),
                "machine_busy_s": busy1 - busy0,
            }
            if stats0 and stats1 and stats1.executions > stats0.executions:
                extra["mean_batch"] = (stats1.inferences - stats0.inferences) / (stats1.executions - stats0.executions)
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
        c = self.config
        with ProcessPoolExecutor(
            max_workers=1,
            mp_context=_spawn(),
            initializer=pin_current_process,
            initargs=(c.server_cpus,),
        ) as executor:
            for concurrency in c.ort_concurrency():
                batch = c.rows * concurrency
                args = (self.signature, batch, c.warmup_s, c.duration_s, c.intra_op_threads)
                result = executor.submit(ort_point, *args).result(timeout=c.warmup_s + c.duration_s + 120)
                cores = len(c.server_cpus or os.sched_getaffinity(0))
                point = PointResult(
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
                        "batch": batch,
                        "runs_per_s": result["runs_per_s"],
                        "server_cpu_share": result["server_cpu_s"] / (c.duration_s * cores),
                    },
                )
                self.record("ort", repeat, point)

    # --- results

    def record(self, target: str, repeat: int, point: PointResult) -> None:
        row = {"target": target, "repeat": repeat, **asdict(point)}
        extra = row.pop("extra")
        row.update(extra)
        if "machine_busy_s" in row and not math.isnan(row["machine_busy_s"]):
            # Busy time on our CPUs that neither the server nor the clients account for: other processes.
            other = row["machine_busy_s"] - row["server_cpu_s"] - row["client_cpu_s"]
            row["other_cpu_share"] = max(0.0, other) / (point.duration_s * len(self.watched_cpus()))
        self.points.append(row)
        self.echo(progress_line(row, self.config.repeats))
        problem = extra.get("response_problem")
        if problem:
            raise click.ClickException(f"{target} answered a wrong response: {problem}")


def with_shadow_release(text: str, stable: str, shadow: str) -> str:
    """model.toml text whose [release] is only `stable`, with `shadow` mirrored at 100%; the rest kept as is."""
    import tomllib

    # The [release] table and any [release.*] sub-table, each up to the next table header.
    header = r"^[ \t]*\[[ \t]*release[ \t]*(?:\.[^\]\n]*)?\][^\n]*(?:\n|\Z)"
    kept = re.sub(header + r"(?s:.*?)(?=^[ \t]*\[|\Z)", "", text, flags=re.M)
    result = kept.rstrip("\n") + f'\n\n[release]\nstable = "{stable}"\nshadows = {{ "{shadow}" = 1.0 }}\n'
    try:
        parsed = tomllib.loads(result)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"cannot set its [release] for the shadow run: {exc}") from None
    if parsed.get("release") != {"stable": stable, "shadows": {shadow: 1.0}}:
        raise ValueError(f"cannot set its [release] for the shadow run (got {parsed.get('release')!r})")
    return result.lstrip("\n")


def _scratch_dir() -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix="gateway-bench-")


def _spawn() -> Any:
    import multiprocessing

    return multiprocessing.get_context("spawn")


def fmt_ms(value: float) -> str:
    # Three significant digits or so: the ort baseline runs in microseconds, servers in milliseconds.
    if math.isnan(value):
        return "-"
    return f"{value:.3f}" if value < 1 else f"{value:.2f}" if value < 100 else f"{value:.0f}"


def fmt_ratio(value: float) -> str:
    return f"{value:.2f}" if value >= 0.1 else f"{value:.2g}"


def progress_line(row: dict[str, Any], repeats: int) -> str:
    offered = f"c={label(row['offered'])}" if row["mode"] == "closed" else f"r={label(row['offered'])}/s"
    errors = sum(row["errors"].values())
    parts = [
        f"[{row['repeat'] + 1}/{repeats}] {row['target']:<15} {offered:<9}",
        f"{row['throughput_rps']:9.0f} req/s {row['rows_per_s']:10.0f} rows/s",
        f"p50 {fmt_ms(row['p50_ms']):>6} ms  p99 {fmt_ms(row['p99_ms']):>6} ms",
        f"err {errors}" + (f" {row['errors']}" if errors else ""),
    ]
    if row["warmup_errors"]:
        parts.append(f"warm-up errors {row['warmup_errors']}")
    if row["target"] == "ort":
        parts.append(f"batch {row['batch']}")
    else:
        parts.append(f"cli-cpu {row['client_cpu_share']:4.0%}")
    if "server_cpu_share" in row:
        parts.append(f"srv-cpu {row['server_cpu_share']:4.0%}")
    if "mean_batch" in row:
        parts.append(f"batch {row['mean_batch']:.1f}")
    if "shadow_rows_per_row" in row:
        parts.append(f"mirrored {row['shadow_rows_per_row']:.2f}")
    if row["mode"] == "open":
        parts.append(f"ok {row['success_ratio']:.1%} dropped {row['dropped']} lag {row['send_lag_ms']:.2f} ms")
    if row.get("other_cpu_share", 0.0) >= NOISY_SHARE:
        parts.append(f"NOISY: other processes used {row['other_cpu_share']:.0%} of the CPUs")
    return "  ".join(parts)


def summarize(points: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median and min/max per (target, mode, offered) over the repeats."""
    groups: dict[tuple[str, str, float], list[dict[str, Any]]] = {}
    for point in points:
        groups.setdefault((point["target"], point["mode"], point["offered"]), []).append(point)
    summary = []
    for (target, mode, offered), rows in groups.items():
        entry: dict[str, Any] = {"target": target, "mode": mode, "offered": offered, "repeats": len(rows)}
        for metric in SUMMARY_METRICS:
            values = [r[metric] for r in rows if isinstance(r.get(metric), int | float) and not math.isnan(r[metric])]
            if values:
                entry[metric] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
        errors: dict[str, int] = {}
        for r in rows:
            for code, count in r["errors"].items():
                errors[code] = errors.get(code, 0) + count
        entry["errors"] = errors
        entry["completed"] = sum(r["completed"] for r in rows)
        if target == "ort":
            entry["batch"] = rows[0]["batch"]
        summary.append(entry)
    return summary


def _median(summary: Sequence[dict[str, Any]], target: str, mode: str, offered: float, metric: str) -> float | None:
    for entry in summary:
        if (entry["target"], entry["mode"], entry["offered"]) == (target, mode, offered) and metric in entry:
            value: float = entry[metric]["median"]
            return value
    return None


def _peak(summary: Sequence[dict[str, Any]], target: str, metric: str) -> float | None:
    values = [e[metric]["median"] for e in summary if e["target"] == target and e["mode"] == "closed" and metric in e]
    return max(values) if values else None


def _ratio(top: float | None, bottom: float | None) -> float | None:
    return top / bottom if top is not None and bottom else None


def compute_ratios(
    summary: Sequence[dict[str, Any]], concurrency: Sequence[int], rates: Sequence[float]
) -> dict[str, Any]:
    """The claims this run supports, each a ratio of medians measured side by side."""

    def per_c(top: tuple[str, str], bottom: tuple[str, str], bottom_at_one: bool = False) -> dict[str, float]:
        out: dict[str, float] = {}
        for c in concurrency:
            low = float(1 if bottom_at_one else c)
            value = _ratio(
                _median(summary, top[0], "closed", float(c), top[1]),
                _median(summary, bottom[0], "closed", low, bottom[1]),
            )
            if value is not None:
                out[str(c)] = value
        return out

    ratios: dict[str, Any] = {
        "gateway_over_bare_rps": per_c(("gateway", "throughput_rps"), ("bare", "throughput_rps")),
        "gateway_nobatch_over_bare_rps": per_c(("gateway-nobatch", "throughput_rps"), ("bare", "throughput_rps")),
        # ort at concurrency c ran batch rows*c: what a perfect batcher would hand the model.
        "gateway_over_ort_rows": per_c(("gateway", "rows_per_s"), ("ort", "rows_per_s")),
        "gateway_nobatch_over_ort_batch1_rows": per_c(
            ("gateway-nobatch", "rows_per_s"), ("ort", "rows_per_s"), bottom_at_one=True
        ),
        "batching_speedup_rps": per_c(("gateway", "throughput_rps"), ("gateway-nobatch", "throughput_rps")),
        "batching_p99_ratio": per_c(("gateway", "p99_ms"), ("gateway-nobatch", "p99_ms")),
        "peak": {
            name: value
            for name, value in {
                "gateway_over_bare_rps": _ratio(
                    _peak(summary, "gateway", "throughput_rps"), _peak(summary, "bare", "throughput_rps")
                ),
                "gateway_nobatch_over_bare_rps": _ratio(
                    _peak(summary, "gateway-nobatch", "throughput_rps"), _peak(summary, "bare", "throughput_rps")
                ),
                "batching_speedup_rps": _ratio(
                    _peak(summary, "gateway", "throughput_rps"), _peak(summary, "gateway-nobatch", "throughput_rps")
                ),
            }.items()
            if value is not None
        },
    }
    # Shadow overhead on the primary: the same gateway, same offered load, with a shadow mirrored at 100%.
    # Keys: "16" for closed loop c=16, "r=1600" for open loop at 1600 req/s.
    for metric in ("p50_ms", "p99_ms", "throughput_rps"):
        closed = per_c(("gateway-shadow", metric), ("gateway", metric))
        opened = {
            f"r={label(r)}": v
            for r in rates
            if (
                v := _ratio(
                    _median(summary, "gateway-shadow", "open", r, metric),
                    _median(summary, "gateway", "open", r, metric),
                )
            )
            is not None
        }
        if closed or opened:
            ratios[f"shadow_over_gateway_{metric.split('_')[0]}"] = {**closed, **opened}
    # How much of the primary's traffic the shadow actually ran (1.0: all of it; the lane drops past its bound).
    mirrored = {
        (str(int(offered)) if mode == "closed" else f"r={label(offered)}"): value
        for mode, points in (("closed", [float(c) for c in concurrency]), ("open", list(rates)))
        for offered in points
        if (value := _median(summary, "gateway-shadow", mode, offered, "shadow_rows_per_row")) is not None
    }
    if mirrored:
        ratios["shadow_rows_per_primary_row"] = mirrored
    if rates:
        open_ratios: dict[str, float] = {}
        for r in rates:
            value = _ratio(
                _median(summary, "gateway", "open", r, "p99_ms"), _median(summary, "bare", "open", r, "p99_ms")
            )
            if value is not None:
                open_ratios[label(r)] = value
        ratios["open_gateway_over_bare_p99"] = open_ratios
    return {k: v for k, v in ratios.items() if v}


RATIO_TITLES = {
    "shadow_over_gateway_p50": "gateway-shadow / gateway, p50",
    "shadow_over_gateway_p99": "gateway-shadow / gateway, p99",
    "shadow_over_gateway_throughput": "gateway-shadow / gateway, req/s",
    "shadow_rows_per_primary_row": "shadow rows run / primary rows (mirrored)",
    "gateway_over_bare_rps": "gateway / bare, req/s",
    "gateway_nobatch_over_bare_rps": "gateway-nobatch / bare, req/s",
    "gateway_over_ort_rows": "gateway / ort at batch rows*c, rows/s",
    "gateway_nobatch_over_ort_batch1_rows": "gateway-nobatch / ort at batch rows, rows/s",
    "batching_speedup_rps": "gateway / gateway-nobatch, req/s",
    "batching_p99_ratio": "gateway / gateway-nobatch, p99",
    "open_gateway_over_bare_p99": "gateway / bare, p99 (open loop, per rate)",
}


def compare_summary(summary: Sequence[dict[str, Any]], targets: Sequence[str], slo_ms: float) -> dict[str, Any]:
    """Per version: the highest throughput whose p99 met the objective, latencies, error rate."""
    result: dict[str, Any] = {}
    for target in targets:
        rows = [r for r in summary if r["target"] == target]
        within = [r for r in rows if r["p99_ms"]["median"] <= slo_ms]
        best = max(within, key=lambda r: r["throughput_rps"]["median"], default=None)
        errors = sum(sum(r.get("errors", {}).values()) for r in rows)
        result[target] = {
            "throughput_at_slo_rps": best["throughput_rps"]["median"] if best else 0.0,
            "at_offered": best["offered"] if best else None,
            "p50_ms": {label(r["offered"]): r["p50_ms"]["median"] for r in rows},
            "p99_ms": {label(r["offered"]): r["p99_ms"]["median"] for r in rows},
            "errors": errors,
            "error_rate": max((1.0 - r["success_ratio"]["median"] for r in rows), default=0.0),
        }
    a, b = targets
    if result[a]["throughput_at_slo_rps"]:
        result["b_over_a_throughput_at_slo"] = result[b]["throughput_at_slo_rps"] / result[a]["throughput_at_slo_rps"]
    return result


def format_compare(compare: dict[str, Any], slo_ms: float) -> str:
    lines = ["", f"version comparison (p99 objective {slo_ms:g} ms):"]
    for target, entry in compare.items():
        if not isinstance(entry, dict):
            continue
        p99 = "  ".join(f"@{k}: {v:.2f}" for k, v in entry["p99_ms"].items())
        lines.append(
            f"  {target:<6} throughput at objective {entry['throughput_at_slo_rps']:8.0f} req/s   "
            f"errors {entry['errors']} ({entry['error_rate']:.2%})   p99 ms {p99}"
        )
    if "b_over_a_throughput_at_slo" in compare:
        lines.append(f"  ratio (second / first) at objective: {compare['b_over_a_throughput_at_slo']:.2f}")
    return "\n".join(lines)


def _point_label(ratio: str, key: str) -> str:
    """A ratio's per-point key as printed: "16" -> "c=16"; open-loop keys say "r=" already."""
    if key.startswith("r="):
        return key
    return ("r=" if ratio == "open_gateway_over_bare_p99" else "c=") + key


def format_report(summary: Sequence[dict[str, Any]], ratios: dict[str, Any], targets: Sequence[str]) -> str:
    def spread(entry: dict[str, Any], metric: str, fmt: Callable[[float], str]) -> str:
        if metric not in entry:
            return "-"
        m = entry[metric]
        if entry["repeats"] == 1:
            return fmt(m["median"])
        return f"{fmt(m['median'])} [{fmt(m['min'])}-{fmt(m['max'])}]"

    def plain(entry: dict[str, Any], metric: str, fmt: Callable[[float], str]) -> str:
        return fmt(entry[metric]["median"]) if metric in entry else "-"

    def count(value: float) -> str:
        return f"{value:.0f}"

    def share(value: float) -> str:
        return f"{value:.0%}"

    lines = []
    header = (
        f"{'point':>10} {'req/s [min-max]':>26} {'rows/s':>10} {'p50 ms':>7} {'p90 ms':>7} "
        f"{'p99 ms [min-max]':>24} {'errors':>6} {'cli-cpu':>7} {'srv-cpu':>7} {'batch':>6}"
    )
    for target in targets:
        entries = [e for e in summary if e["target"] == target]
        if not entries:
            continue
        what = " (model runs; latency per batch run)" if target == "ort" else ""
        lines += ["", f"{target}{what}: median of {entries[0]['repeats']} repeat(s)", header]
        for e in entries:
            point = f"c={label(e['offered'])}" if e["mode"] == "closed" else f"r={label(e['offered'])}/s"
            batch = str(e["batch"]) if target == "ort" else plain(e, "mean_batch", lambda v: f"{v:.1f}")
            cli = "-" if target == "ort" else plain(e, "client_cpu_share", share)
            lines.append(
                f"{point:>10} {spread(e, 'throughput_rps', count):>26} {plain(e, 'rows_per_s', count):>10} "
                f"{plain(e, 'p50_ms', fmt_ms):>7} {plain(e, 'p90_ms', fmt_ms):>7} {spread(e, 'p99_ms', fmt_ms):>24} "
                f"{sum(e['errors'].values()):>6} {cli:>7} {plain(e, 'server_cpu_share', share):>7} {batch:>6}"
            )
    noisy = [
        f"{e['target']} {'c=' if e['mode'] == 'closed' else 'r='}{label(e['offered'])} "
        f"(up to {e['other_cpu_share']['max']:.0%})"
        for e in summary
        if e["target"] in targets and e.get("other_cpu_share", {}).get("max", 0.0) >= NOISY_SHARE
    ]
    if noisy:
        lines += [
            "",
            f"WARNING: other processes were busy on the bench's CPUs during {len(noisy)} point(s), in at least one "
            f"repeat: {', '.join(noisy)}. Rerun on a quiet machine before trusting those.",
        ]
    if ratios:
        lines += ["", "ratios (medians of this run):"]
        for key, title in RATIO_TITLES.items():
            if key in ratios:
                cells = "  ".join(f"{_point_label(key, k)}: {fmt_ratio(v)}" for k, v in ratios[key].items())
                lines.append(f"  {title:<46} {cells}")
        for key, value in ratios.get("peak", {}).items():
            lines.append(f"  {'peak ' + RATIO_TITLES[key]:<46} {fmt_ratio(value)}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- environment record


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
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def environment() -> dict[str, Any]:
    return {
        "machine": {
            "cpu_count": os.cpu_count(),
            "cpus_available": format_cpus(sorted(os.sched_getaffinity(0))),
            "cpu_model": _cpu_model(),
            "platform": platform.platform(),
            "loadavg_start": os.getloadavg(),
        },
        "versions": {
            "python": platform.python_version(),
            "grpcio": _version("grpcio"),
            "protobuf": _version("protobuf"),
            "onnxruntime": _version("onnxruntime-gpu", "onnxruntime"),
            "numpy": _version("numpy"),
            "uvloop": _version("uvloop"),
            "release-gateway": _version("release-gateway"),
            "git_commit": _git_commit(),
        },
    }


# --------------------------------------------------------------------------- orchestration


def check_shadow(config: BenchConfig, stable: str) -> None:
    """--shadow names another version of the model; requests must not be pinned (pinned ones are never mirrored)."""
    from gateway.errors import GatewayError

    if config.version is not None:
        raise click.UsageError(
            "gateway-shadow mirrors the stable version's traffic, and --version pins requests (never mirrored): "
            "leave --version out, or set [release] stable in model.toml"
        )
    if config.shadow == stable:
        raise click.BadParameter(f"v{stable} is the stable version being benchmarked", param_hint="--shadow")
    try:
        load_signature(config.models, config.model, config.shadow)
    except (GatewayError, ValueError) as exc:
        raise click.ClickException(f"--shadow: {exc}") from None


def run_bench(config: BenchConfig) -> dict[str, Any]:
    from gateway.errors import GatewayError

    try:
        signature = load_signature(config.models, config.model, config.version)
    except (GatewayError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    payload = build_request(signature, config.rows, pin_version=config.version is not None)
    bench = Bench(config, signature, payload, serve_flags=gateway_serve_flags())
    for target in config.targets:
        if target not in TARGETS:  # "vA" from --compare: requests pinned to version A
            try:
                pinned = load_signature(config.models, config.model, target[1:])
            except (GatewayError, ValueError) as exc:
                raise click.ClickException(str(exc)) from None
            bench.version_payloads[target] = build_request(pinned, config.rows, pin_version=True)
    if "gateway-shadow" in config.targets:
        check_shadow(config, signature.version)
    if config.workers is not None and "--workers" not in bench.serve_flags:
        raise click.UsageError("this gateway's `serve` has no --workers flag yet")
    if "gateway-nobatch" in config.targets and "--batching" not in bench.serve_flags:
        bench.notes.append(
            "`gateway serve` has no --batching flag yet: gateway-nobatch ran the same server as gateway "
            "(whatever it does by default)"
        )
    env = environment()
    started = time.time()
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
    echo(f"expected run time about {config.estimate_s():.0f} s")
    for note in bench.notes:
        echo(f"note: {note}")
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
            "server_pinning_tool": "taskset" if shutil.which("taskset") else "sched_setaffinity",
        },
        "notes": bench.notes,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "wall_s": time.time() - started,
        "points": bench.points,
        "summary": summary,
        "ratios": ratios,
        "routing": routing_cost(),
    }


def routing_cost(keys: int = 100_000, repeats: int = 5) -> dict[str, Any]:
    """Microseconds per routing decision and per key hash alone: medians of `repeats` passes over `keys` keys.

    The split is a sticky 10% canary (so every call hashes its key); each key is a distinct string.
    Includes the Python loop around each call (about 0.02 us), as the request path pays it too.
    """
    import random as _random

    from gateway.release.routing import Split, route_point

    names = [f"user-{i}" for i in range(keys)]
    split = Split("1", "2", 1000)
    rng = _random.Random(0)
    choose, hash_only = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        for key in names:
            split.choose(key, rng)
        choose.append((time.perf_counter() - start) / keys * 1e6)
        start = time.perf_counter()
        for key in names:
            route_point(key)
        hash_only.append((time.perf_counter() - start) / keys * 1e6)
    canary = sum(split.choose(key, rng)[1] == "canary" for key in names)
    return {
        "choose_us": statistics.median(choose),
        "route_point_us": statistics.median(hash_only),
        "choose_us_range": [min(choose), max(choose)],
        "route_point_us_range": [min(hash_only), max(hash_only)],
        "keys": keys,
        "repeats": repeats,
        "canary_weight_bp": split.canary_weight_bp,
        "canary_share": canary / keys,
    }


def format_routing(routing: dict[str, Any]) -> str:
    low, high = routing["choose_us_range"]
    return (
        f"routing: {routing['choose_us']:.2f} us per decision [{low:.2f}-{high:.2f}] "
        f"({routing['route_point_us']:.2f} us of it the key hash; median of {routing['repeats']} passes "
        f"over {routing['keys']:,} keys, {routing['canary_share']:.1%} on the canary)"
    )


def _signature_record(signature: ModelSignature) -> dict[str, Any]:
    return {
        "inputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in signature.inputs],
        "outputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in signature.outputs],
    }


def require_plotting() -> None:
    """Refuse at once when the plot cannot be drawn, not after the whole run (as `report --plot` does)."""
    try:
        import matplotlib  # noqa: F401  (only whether it imports)
    except ImportError:
        raise click.ClickException(
            "gateway bench draws a PNG plot and needs matplotlib: "
            "pip install matplotlib (or pip install 'release-gateway[test]')"
        ) from None


@click.command(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--models", type=click.Path(file_okay=False, path_type=Path), default=Path("models"), show_default=True)
@click.option("--model", default="digits", show_default=True, help="Model to benchmark.")
@click.option("--version", "version", default=None, help="Pin a version. [default: release.stable, else highest]")
@click.option("--rows", type=click.IntRange(min=1), default=1, show_default=True, help="Rows (batch) per request.")
@click.option(
    "--concurrency",
    default="1,4,16,64",
    show_default=True,
    help="Closed-loop sweep: requests in flight ('' for none, with --rates).",
)
@click.option("--rates", default="", help="Open-loop sweep in req/s (Poisson), e.g. 500,1000,2000. [default: none]")
@click.option("--duration", type=click.FloatRange(min=0.1), default=5.0, show_default=True, help="Seconds per point.")
@click.option("--warmup", type=click.FloatRange(min=0.0), default=1.0, show_default=True, help="Seconds discarded.")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True, help="Interleaved repeats.")
@click.option("--processes", type=click.IntRange(min=1), default=None, help="Client processes. [default: client CPUs]")
@click.option("--channels", type=click.IntRange(min=1), default=4, show_default=True, help="gRPC channels per process.")
@click.option(
    "--baselines",
    default=DEFAULT_TARGETS,
    show_default=True,
    help="Targets, run in this order each repeat: ort (in-process onnxruntime), bare (grpc.aio, no compute), "
    "gateway-nobatch, gateway, gateway-shadow (a shadow at 100%: needs --shadow).",
)
@click.option("--workers", type=click.IntRange(min=0), default=None, help="Passed to `gateway serve --workers`.")
@click.option(
    "--intra-op-threads",
    type=click.IntRange(min=0),
    default=None,
    help="onnxruntime threads for the gateway and the ort baseline. [default: server CPUs per worker when pinned]",
)
@click.option("--server-cpus", default=None, help="CPUs for the server, e.g. 0 or 0-3. [default: first half]")
@click.option("--client-cpus", default=None, help="CPUs for the clients, e.g. 1 or 4-7. [default: second half]")
@click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), default=Path("bench-results"), show_default=True
)
@click.option(
    "--provider",
    type=click.Choice(["cpu", "cuda", "auto"]),
    default="cpu",
    show_default=True,
    help="Passed to `gateway serve --provider` (loadtests/gpu_bench.py uses cuda).",
)
@click.option(
    "--shadow",
    default=None,
    metavar="VERSION",
    help="For gateway-shadow: the version mirrored at 100% (a temporary copy of the model whose [release] "
    "has the stable version and this shadow; the report says how much of the traffic it ran).",
)
@click.option(
    "--compare",
    nargs=2,
    default=None,
    metavar="A B",
    help="Versions A and B of --model under the same load, interleaved (replaces --baselines).",
)
@click.option(
    "--slo-ms",
    type=click.FloatRange(min=0, min_open=True),
    default=10.0,
    show_default=True,
    help="p99 objective for the --compare summary (throughput at this p99).",
)
@click.option("--smoke", is_flag=True, help="A few seconds in all (c=1,8; 0.5 s points; 1 repeat; 1 process), for CI.")
def bench(
    models: Path,
    model: str,
    version: str | None,
    rows: int,
    concurrency: str,
    rates: str,
    duration: float,
    warmup: float,
    repeats: int,
    processes: int | None,
    channels: int,
    baselines: str,
    workers: int | None,
    intra_op_threads: int | None,
    server_cpus: str | None,
    client_cpus: str | None,
    out: Path,
    provider: str,
    shadow: str | None,
    compare: tuple[str, str] | None,
    slo_ms: float,
    smoke: bool,
) -> None:
    """Benchmark the gateway against its baselines, side by side, and write JSON plus a PNG plot.

    Closed loop sweeps concurrency; open loop (--rates) sends Poisson arrivals and
    measures latency from each request's scheduled time. Servers listen on
    127.0.0.1 only, pinned to --server-cpus; clients run on --client-cpus.
    Prints one line per point, then per-target medians and the ratios between
    targets; writes OUT/bench-MODEL-TIMESTAMP.json and .png.
    """
    require_plotting()
    concurrency_list = parse_numbers(concurrency, int, "--concurrency")
    rate_list = parse_numbers(rates, float, "--rates") if rates.strip() else []
    targets = [t.strip() for t in baselines.split(",") if t.strip()]
    if compare:
        if compare[0] == compare[1]:
            raise click.BadParameter("compare two different versions", param_hint="--compare")
        targets = [f"v{compare[0]}", f"v{compare[1]}"]
    unknown = [t for t in targets if t not in TARGETS and not compare]
    if "gateway-shadow" in targets and not shadow:
        raise click.BadParameter("the gateway-shadow target needs --shadow VERSION", param_hint="--shadow")
    if unknown or not targets or len(set(targets)) != len(targets):
        raise click.BadParameter(
            f"{baselines!r}: choose from {', '.join(TARGETS)}, each once", param_hint="--baselines"
        )
    if smoke:
        concurrency_list, duration, warmup, repeats, processes = [1, 8], 0.5, 0.2, 1, 1
    if not concurrency_list and not rate_list:
        raise click.BadParameter("nothing to run: give --concurrency or --rates", param_hint="--concurrency")
    try:
        server_set, client_set, how = choose_cpus(server_cpus, client_cpus)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    if processes is None:
        processes = len(client_set) if client_set else 1
    if intra_op_threads is None:
        # onnxruntime's default pool ignores the process's CPU mask (it pins a thread per core of the
        # machine), so an unpinned default would quietly spill onto the client cores.
        per_worker = len(server_set) // max(1, workers or 1) if server_set else 0
        intra_op_threads = max(1, per_worker) if server_set else 0
    config = BenchConfig(
        models=models,
        model=model,
        version=version,
        rows=rows,
        concurrency=concurrency_list,
        rates=rate_list,
        duration_s=duration,
        warmup_s=warmup,
        repeats=repeats,
        processes=processes,
        channels=channels,
        targets=targets,
        workers=workers,
        intra_op_threads=intra_op_threads,
        out=out,
        smoke=smoke,
        server_cpus=server_set,
        client_cpus=client_set,
        pinning=how,
        request_timeout_s=max(2.0, duration),
        shadow=shadow,
        provider=provider,
    )
    results = run_bench(config)
    if compare:
        results["compare"] = compare_summary(results["summary"], targets, slo_ms)
    click.echo(format_report(results["summary"], results["ratios"], targets))
    routing = results["routing"]
    click.echo(format_routing(routing))
    if compare:
        click.echo(format_compare(results["compare"], slo_ms))
    for note in results["notes"]:
        click.echo(f"note: {note}")
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"bench-{model}-{time.strftime('%Y%m%d-%H%M%S')}"
    json_path = stem.with_suffix(".json")
    json_path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    click.echo(f"wrote {json_path}")
    from loadtests.plot import plot_results

    png_path = stem.with_suffix(".png")
    plot_results(results, png_path)
    click.echo(f"wrote {png_path}")
