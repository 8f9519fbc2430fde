"""The `gateway bench` command: its options, read into one value object, resolved into a BenchConfig."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from loadtests.bench.config import DEFAULT_TARGETS, TARGETS, BenchConfig
from loadtests.bench.cpus import choose_cpus
from loadtests.bench.report import compare_report, format_routing, report, require_plotting, show, write_results
from loadtests.bench.summary import compare_summary

# `gateway bench` is how everyone calls it (gateway/cli/bench.py runs this module as a program).
PROG_NAME = "gateway bench"

EPILOG = """\b
Examples:
  gateway bench                                        # digits, every baseline, c=1,4,16,64, 3 repeats
  gateway bench --smoke --out /tmp/bench               # a few seconds: does everything work?
  gateway bench --model mlp --rows 8 --concurrency 1,16,64 --duration 3
  gateway bench --rates 500,1000,2000 --baselines bare,gateway   # open loop (Poisson arrivals)
  gateway bench --server-cpus 0-3 --client-cpus 4-7 --workers 4
  gateway bench --compare 1 2 --concurrency 1,16,64 --slo-ms 5   # two versions, same load, interleaved
  gateway bench --concurrency 1,16,64 --baselines gateway,gateway-rest-json,gateway-rest-binary  # gRPC vs REST
  gateway bench --model mlp --workers 2 --concurrency 64,256 --baselines gateway,gateway-exec  # executor on/off

\b
Shadow overhead on the primary at half load, in two runs (the second's --rates is half
the first's gateway req/s at c=16):
  gateway bench --baselines gateway,gateway-shadow --shadow 3 --concurrency 16 --duration 3
  gateway bench --baselines gateway,gateway-shadow --shadow 3 --concurrency '' --rates 1600 --duration 5
"""


def parse_numbers(text: str, kind: type[int] | type[float], name: str) -> list[Any]:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected comma-separated numbers", param_hint=name) from None
    if any(v <= 0 for v in values):
        raise click.BadParameter(f"{text!r}: every value must be > 0", param_hint=name)
    return values


@dataclass(frozen=True, slots=True, kw_only=True)
class BenchOptions:
    """The command line as given, one field per option (click fills it by name).

    The defaults are the command's (its options take them from DEFAULTS), so a program
    such as loadtests.gpu_bench names only what it changes and resolves it the same way.
    """

    models: Path = Path("models")
    model: str = "digits"
    version: str | None = None
    rows: int = 1
    concurrency: str = "1,4,16,64"
    rates: str = ""
    duration: float = 5.0
    warmup: float = 1.0
    repeats: int = 3
    processes: int | None = None
    channels: int = 4
    baselines: str = DEFAULT_TARGETS
    workers: int | None = None
    exec_workers: int | None = None
    intra_op_threads: int | None = None
    server_cpus: str | None = None
    client_cpus: str | None = None
    out: Path = Path("bench-results")
    provider: str = "cpu"
    shadow: str | None = None
    compare: tuple[str, str] | None = None
    slo_ms: float = 10.0
    smoke: bool = False

    def targets(self) -> list[str]:
        if self.compare:
            if self.compare[0] == self.compare[1]:
                raise click.BadParameter("compare two different versions", param_hint="--compare")
            return [f"v{self.compare[0]}", f"v{self.compare[1]}"]
        targets = [t.strip() for t in self.baselines.split(",") if t.strip()]
        if "gateway-shadow" in targets and not self.shadow:
            raise click.BadParameter("the gateway-shadow target needs --shadow VERSION", param_hint="--shadow")
        if any(t not in TARGETS for t in targets) or not targets or len(set(targets)) != len(targets):
            raise click.BadParameter(
                f"{self.baselines!r}: choose from {', '.join(TARGETS)}, each once", param_hint="--baselines"
            )
        return targets

    def resolve(self) -> BenchConfig:
        """Checked and completed: the sweep, --smoke's short run, CPUs, processes and onnxruntime threads."""
        options = self
        concurrency = parse_numbers(self.concurrency, int, "--concurrency")
        rates = parse_numbers(self.rates, float, "--rates") if self.rates.strip() else []
        targets = self.targets()
        if self.smoke:
            concurrency = [1, 8]
            options = dataclasses.replace(self, duration=0.5, warmup=0.2, repeats=1, processes=1)
        if not concurrency and not rates:
            raise click.BadParameter("nothing to run: give --concurrency or --rates", param_hint="--concurrency")
        try:
            cpus = choose_cpus(self.server_cpus, self.client_cpus)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None
        processes = options.processes or (len(cpus.client) if cpus.client else 1)
        intra_op_threads = self.intra_op_threads
        if intra_op_threads is None:
            # onnxruntime's default pool ignores the process's CPU mask (it pins a thread per core of the
            # machine), so an unpinned default would quietly spill onto the client cores.
            per_worker = len(cpus.server) // max(1, self.workers or 1) if cpus.server else 0
            intra_op_threads = max(1, per_worker) if cpus.server else 0
        # The executor alone runs the models of every worker: it gets the server's cores, as W in-process
        # workers get them together.
        exec_threads = self.intra_op_threads if self.intra_op_threads is not None else len(cpus.server or ())
        return BenchConfig(
            models=self.models,
            model=self.model,
            version=self.version,
            rows=self.rows,
            concurrency=concurrency,
            rates=rates,
            duration_s=options.duration,
            warmup_s=options.warmup,
            repeats=options.repeats,
            processes=processes,
            channels=self.channels,
            targets=targets,
            workers=self.workers,
            exec_workers=self.exec_workers,
            intra_op_threads=intra_op_threads,
            exec_intra_op_threads=exec_threads,
            out=self.out,
            smoke=self.smoke,
            server_cpus=cpus.server,
            client_cpus=cpus.client,
            pinning=cpus.how,
            request_timeout_s=max(2.0, options.duration),
            shadow=self.shadow,
            provider=self.provider,
        )


DEFAULTS = BenchOptions()


@click.command(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--models", type=click.Path(file_okay=False, path_type=Path), default=DEFAULTS.models, show_default=True)
@click.option("--model", default=DEFAULTS.model, show_default=True, help="Model to benchmark.")
@click.option("--version", "version", default=None, help="Pin a version. [default: release.stable, else highest]")
@click.option(
    "--rows", type=click.IntRange(min=1), default=DEFAULTS.rows, show_default=True, help="Rows (batch) per request."
)
@click.option(
    "--concurrency",
    default=DEFAULTS.concurrency,
    show_default=True,
    help="Closed-loop sweep: requests in flight ('' for none, with --rates).",
)
@click.option(
    "--rates", default=DEFAULTS.rates, help="Open-loop sweep in req/s (Poisson), e.g. 500,1000,2000. [default: none]"
)
@click.option(
    "--duration",
    type=click.FloatRange(min=0.1),
    default=DEFAULTS.duration,
    show_default=True,
    help="Seconds per point.",
)
@click.option(
    "--warmup", type=click.FloatRange(min=0.0), default=DEFAULTS.warmup, show_default=True, help="Seconds discarded."
)
@click.option(
    "--repeats", type=click.IntRange(min=1), default=DEFAULTS.repeats, show_default=True, help="Interleaved repeats."
)
@click.option("--processes", type=click.IntRange(min=1), default=None, help="Client processes. [default: client CPUs]")
@click.option(
    "--channels",
    type=click.IntRange(min=1),
    default=DEFAULTS.channels,
    show_default=True,
    help="gRPC channels per process.",
)
@click.option(
    "--baselines",
    default=DEFAULTS.baselines,
    show_default=True,
    help="Targets, run in this order each repeat: ort (in-process onnxruntime), bare (grpc.aio, no compute), "
    "naive (grpc.aio + protobuf + one onnxruntime session per request: the server you would write first), "
    "gateway-nobatch, gateway (in-process batching: --executors off), gateway-exec (one executor process "
    "batching for every worker: --executors 1; reports its busy share), gateway-shadow (a shadow at 100%: "
    "needs --shadow), gateway-rest-json and gateway-rest-binary (the gateway over its REST binding: JSON "
    "tensors, or Triton's binary extension).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=None,
    help="Passed to `gateway serve --workers`; bare and naive run as many processes.",
)
@click.option(
    "--exec-workers",
    type=click.IntRange(min=0),
    default=None,
    help="gateway-exec's `--workers`, where it should differ from the other targets'. [default: --workers]",
)
@click.option(
    "--intra-op-threads",
    type=click.IntRange(min=0),
    default=None,
    help="onnxruntime threads for the gateway, naive and ort. [default: server CPUs per worker when pinned]",
)
@click.option("--server-cpus", default=None, help="CPUs for the server, e.g. 0 or 0-3. [default: first half]")
@click.option("--client-cpus", default=None, help="CPUs for the clients, e.g. 1 or 4-7. [default: second half]")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=DEFAULTS.out, show_default=True)
@click.option(
    "--provider",
    type=click.Choice(["cpu", "cuda", "auto"]),
    default=DEFAULTS.provider,
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
    default=DEFAULTS.slo_ms,
    show_default=True,
    help="p99 objective for the --compare summary (throughput at this p99).",
)
@click.option("--smoke", is_flag=True, help="A few seconds in all (c=1,8; 0.5 s points; 1 repeat; 1 process), for CI.")
def bench(**given: Any) -> None:
    """Benchmark the gateway against its baselines, side by side, and write JSON plus a PNG plot.

    Closed loop sweeps concurrency; open loop (--rates) sends Poisson arrivals and
    measures latency from each request's scheduled time. Servers listen on
    127.0.0.1 only, pinned to --server-cpus; clients run on --client-cpus.
    Prints one line per point, then per-target medians and the ratios between
    targets; writes OUT/bench-MODEL-TIMESTAMP.json and .png.
    """
    from loadtests.bench.sweep import run_bench

    require_plotting()
    options = BenchOptions(**given)
    config = options.resolve()
    results = run_bench(config)
    if options.compare:
        results["compare"] = compare_summary(results["summary"], config.targets, options.slo_ms)
    show(report(results["summary"], results["ratios"], config.targets))
    click.echo(format_routing(results["routing"]))
    if options.compare:
        show(compare_report(results["compare"], options.slo_ms))
    for note in results["notes"]:
        click.echo(f"note: {note}")
    for path in write_results(results, options.out, options.model):
        click.echo(f"wrote {path}")


def main() -> None:
    bench.main(prog_name=PROG_NAME)
