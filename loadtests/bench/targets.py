"""The servers the bench measures: `gateway serve` as configured and without batching, with a
shadow, the bare grpc.aio baseline and the naive server; each started on its CPUs and always stopped.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import click

from gateway.server import launch
from loadtests.bench.config import BenchConfig
from loadtests.bench.cpus import pinning, process_cpu_seconds

START_TIMEOUT_S = 120.0
# Lines of a server's output kept for the message when it fails.
TAIL_LINES = 60


@dataclass
class ServerProcess:
    name: str
    launched: launch.Launched

    @property
    def address(self) -> str:
        return self.launched.address

    @property
    def http(self) -> str:
        """HOST:PORT of its REST binding; empty when it has none."""
        return self.launched.http

    def cpu_seconds(self) -> float:
        return process_cpu_seconds(self.launched.proc.pid)

    def exited(self) -> bool:
        return self.launched.proc.poll() is not None

    def tail(self) -> str:
        return self.launched.output.tail(TAIL_LINES)


@contextlib.contextmanager
def server_process(name: str, command: Sequence[str], cpus: Sequence[int] | None) -> Iterator[ServerProcess]:
    """Start a server on 127.0.0.1:0 pinned to `cpus`, wait for `listening on`, always stop it."""
    prefix, preexec = pinning(cpus)
    try:
        launched = launch.start(
            [*prefix, *command],
            preexec_fn=preexec,  # only without taskset
            # Its own session: Ctrl-C on the bench reaches only the bench, which then stops it.
            new_session=True,
            timeout_s=START_TIMEOUT_S,
            keep_lines=TAIL_LINES,
        )
    except launch.LaunchError as exc:
        raise click.ClickException(f"{name} did not start: {exc}") from None
    try:
        yield ServerProcess(name, launched)
    finally:
        launched.stop()


def gateway_command(
    config: BenchConfig,
    *,
    batching: bool,
    state_dir: Path,
    models: Path | None = None,
    http: bool = False,
    executor: bool = False,
) -> list[str]:
    """`gateway serve` for one target: on 127.0.0.1, a port the OS picks, no metrics, no control API.

    `http`: the REST binding on a port the OS picks too (REST's fixed default would collide
    like the control API's); without it, REST is off. `executor`: one executor process runs
    the models for every worker (`--executors 1`, with `exec_workers` workers when given);
    without it `--executors off`, so `auto` never turns one on behind a target's back on a GPU host.
    """
    c = config
    args = ["--models", str(models or c.models), "--load", c.model, "--host", "127.0.0.1", "--port", "0"]
    # The REST address is announced only in the INFO line before `listening on` (launch reads it
    # there); nothing logs at INFO per request, so the level costs the REST targets nothing.
    args += ["--metrics-port", "-1", "--provider", c.provider, "--log-level", "INFO" if http else "WARNING"]
    args += ["--http-port", "0" if http else "-1"]
    # A fresh store per server: a stored release (say, from `gateway traffic set` in this checkout)
    # would otherwise replace model.toml's, and gateway-shadow would quietly run without its shadow.
    args += ["--state-dir", str(state_dir)]
    # The control API's and the dashboard's fixed default ports would collide with anything
    # else on the machine (a gateway already running there: the bench failed to start).
    args += ["--control-port", "-1", "--dashboard-port", "-1"]
    threads = c.exec_intra_op_threads if executor else c.intra_op_threads
    if threads:
        args += ["--intra-op-threads", str(threads)]
    workers = c.exec_workers if executor and c.exec_workers is not None else c.workers
    if workers is not None:
        args += ["--workers", str(workers)]
    args += ["--executors", "1" if executor else "off"]
    if not batching:
        args += ["--batching", "off"]
    return launch.serve_command(args)


def bare_command(config: BenchConfig, version: str) -> list[str]:
    """The bare grpc.aio server answering `version`'s outputs for `rows` rows, as many processes as the gateway."""
    c = config
    command = [sys.executable, "-m", "loadtests.bare_server", "--models", str(c.models), "--model", c.model]
    command += ["--version", version, "--rows", str(c.rows), "--host", "127.0.0.1", "--port", "0"]
    workers = bare_workers(config)
    if workers > 1:
        command += ["--workers", str(workers)]
    return command


def naive_command(config: BenchConfig, version: str) -> list[str]:
    """The naive server (loadtests.naive_server) on `version`, with the gateway's onnxruntime threads and processes."""
    c = config
    command = [sys.executable, "-m", "loadtests.naive_server", "--models", str(c.models), "--model", c.model]
    command += ["--version", version, "--host", "127.0.0.1", "--port", "0"]
    if c.intra_op_threads:
        command += ["--intra-op-threads", str(c.intra_op_threads)]
    workers = bare_workers(config)
    if workers > 1:
        command += ["--workers", str(workers)]
    return command


def bare_workers(config: BenchConfig) -> int:
    if config.workers == 0:  # the gateway's "one per core": match it on the cores the server has
        return len(config.server_cpus or os.sched_getaffinity(0))
    return config.workers or 1


def shadow_repo(config: BenchConfig, stable: str, root: Path) -> Path:
    """A copy of the model under `root` whose release mirrors every `stable` request to --shadow."""
    c = config
    assert c.shadow is not None
    shutil.copytree(c.models / c.model, root / c.model)
    spec = root / c.model / "model.toml"
    try:
        text = spec.read_text() if spec.exists() else ""
        spec.write_text(with_shadow_release(text, stable, c.shadow))
    except ValueError as exc:
        raise click.ClickException(f"{c.models / c.model / 'model.toml'}: {exc}") from None
    return root


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


@dataclass(frozen=True, slots=True)
class StatsSample:
    inferences: int  # rows answered to clients
    executions: int  # model runs
    rows_run: int  # rows the model computed, shadow copies included (from the per-batch-size counts)
    compute_ns: int  # time spent in model runs (the executor's, in executor mode)


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
            compute_ns=sum(s.inference_stats.compute_infer.ns for s in stats),
        )

    def close(self) -> None:
        self._channel.close()
