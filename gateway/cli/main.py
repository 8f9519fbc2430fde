"""The `gateway` command line."""

from __future__ import annotations

import asyncio
import dataclasses
import sys
from pathlib import Path
from typing import Any

import click

from gateway.config.settings import load_settings, resolved_replica_id
from gateway.errors import GatewayError
from gateway.logformat import configure_logging

EPILOG = """\b
Examples:
  gateway serve --models models --port 8001
  gateway serve --models models --port 0 --metrics-port -1   # any free port, no metrics
  gateway serve --models models --http-port -1                # gRPC only, no REST
  gateway serve --models models --workers 4 --executors 1     # 4 front ends, one executor batching for all
  GATEWAY_PROVIDER=cpu gateway serve --config gateway.toml
  gateway serve --config gateway.toml   # with [[notify]] targets: rollout events to webhooks/Slack
"""


MAIN_EPILOG = """\b
Examples:
  gateway serve --models models
  gateway demo
  gateway rollout start digits 2 --reason 'new MLP' && gateway report digits --watch 2
  gateway COMMAND --help      # each command's options and examples
"""

DEMO_EPILOG = """\b
Example:
  gateway demo                 # about a minute; prints the policy, the story and the audit trail
"""


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}, epilog=MAIN_EPILOG)
@click.version_option(package_name="release-gateway")
def main() -> None:
    """A release-aware model-serving gateway (Open Inference Protocol over gRPC and REST).

    \b
    Start it:        gateway serve --models models
    Try a rollout:   gateway demo
    Release work:    gateway status | traffic set | shadow add | rollout start | report | audit
    Exit codes:      0 done, 1 refused, 2 usage, 3 auth, 4 gateway unreachable
    """


@main.command(epilog=EPILOG)
@click.option(
    "--models", type=click.Path(path_type=Path), help="Model repository: <name>/<version>/model.onnx. [default: models]"
)
@click.option("--host", help="Address to listen on. [default: 127.0.0.1]")
@click.option("--port", type=int, help="Inference port; 0 picks a free one. [default: 8001]")
@click.option(
    "--http-port", type=int, help="OIP REST (KServe v2 HTTP/JSON) port; 0 picks one, -1: off. [default: 8000]"
)
@click.option("--metrics-port", type=int, help="Prometheus /metrics port; 0 picks one, -1: off. [default: 8002]")
@click.option("--control-host", help="Address of the release-engineering API. [default: 127.0.0.1]")
@click.option(
    "--control-port", type=int, help="Port of the release-engineering API; 0 picks one, -1: off. [default: 8003]"
)
@click.option(
    "--dashboard-port",
    type=int,
    help="Port of the browser dashboard (on --control-host, control tokens); 0 picks one, -1: off. [default: 8004]",
)
@click.option(
    "--provider",
    type=click.Choice(["auto", "cuda", "cpu"]),
    help="auto: CUDA when usable, else CPU; cuda: refuse to start without CUDA. [default: auto]",
)
@click.option(
    "--workers",
    type=int,
    help="Serving processes sharing the port (SO_REUSEPORT); 0: one per core on CPU, one per GPU. [default: 0]",
)
@click.option(
    "--executors",
    help="auto|N|off: model runs in N executor processes fed by every worker through shared memory, "
    "batching across workers (N is 1 so far); auto: one on a GPU host, off on a CPU host. [default: auto]",
)
@click.option("--batching", type=click.Choice(["spec", "off"]), help="off: one model run per request. [default: spec]")
@click.option("--tokens-file", type=click.Path(path_type=Path), help="Control API tokens (TOML [[tokens]]).")
@click.option("--tls-cert", type=click.Path(path_type=Path), help="Server certificate (PEM): TLS on both ports.")
@click.option("--tls-key", type=click.Path(path_type=Path), help="Server private key (PEM).")
@click.option("--tls-client-ca", type=click.Path(path_type=Path), help="CA for client certificates: mutual TLS.")
@click.option("--capture-dir", type=click.Path(file_okay=False, path_type=Path), help="Capture live requests here.")
@click.option("--capture-fraction", type=click.FloatRange(0, 1, min_open=True), help="Share captured. [default: 0.01]")
@click.option(
    "--state-dir", type=click.Path(path_type=Path), help="Release state and audit log. [default: .gateway-state]"
)
@click.option(
    "--state-url",
    help="postgresql://USER@HOST:PORT/DB: release state shared by several replicas (else SQLite in --state-dir).",
)
@click.option(
    "--replica-id",
    help="This replica's name in a shared --state-url store (evidence, the controller lease); unique per "
    "replica, e.g. the pod name. [default: HOST-PID]",
)
@click.option("--controller/--no-controller", default=None, help="Run the promotion controller. [default: on]")
@click.option("--cuda-device", type=int, help="GPU to use. [default: 0]")
@click.option(
    "--cuda-graphs/--no-cuda-graphs", default=None, help="CUDA graphs per preferred batch size. [default: off]"
)
@click.option("--load", "load", multiple=True, help="Load only this model (repeatable). [default: every model]")
@click.option("--max-message-bytes", type=int, help="Largest request/response accepted. [default: 64 MiB]")
@click.option(
    "--max-inflight",
    type=int,
    help="Inference calls in flight per process; more are refused at once (RESOURCE_EXHAUSTED). [default: 1024]",
)
@click.option("--max-streams", type=int, help="Open streams per process, apart from --max-inflight. [default: 256]")
@click.option(
    "--stream-idle", "stream_idle_s", type=float, help="End a stream idle this many seconds; 0: never. [default: 300]"
)
@click.option("--grace", "grace_s", type=float, help="Seconds to answer in-flight requests on SIGTERM. [default: 10]")
@click.option("--intra-op-threads", type=int, help="onnxruntime threads per session; 0 lets it decide. [default: 0]")
@click.option("--loop", type=click.Choice(["uvloop", "asyncio"]), help="Event loop. [default: uvloop]")
@click.option(
    "--log-level",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    help="Least severe log lines written (to stderr). [default: INFO]",
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    help="text: one line for people; json: one JSON object a line (time, level, logger, message, extras). "
    "[default: text]",
)
@click.option(
    "--otlp-endpoint",
    help="OpenTelemetry traces to this OTLP/gRPC collector, e.g. http://127.0.0.1:4317 (OTEL_* honoured). "
    "[default: off]",
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="TOML file with these settings (top level or a [serve] table) and [[notify]] targets (README: Notifications).",
)
def serve(config_file: Path | None, **flags: Any) -> None:
    """Serve every model in the repository over gRPC and REST (HTTP/JSON).

    Prints `listening on HOST:PORT` once every model is loaded and warm.
    Each setting can also come from GATEWAY_<NAME> (e.g. GATEWAY_PORT) or the
    config file; flags win over the environment, which wins over the file.
    """
    if flags.get("load") == ():
        flags["load"] = None
    try:
        settings = load_settings(config_file, overrides=flags)
    except GatewayError as exc:
        # One line naming the source, setting, value and what was expected; the
        # usage text click would add says nothing about a config file's mistake.
        click.echo(f"gateway: {exc}", err=True)
        sys.exit(2)
    configure_logging(settings.log_level, settings.log_format)
    # Named once here, so every worker of this replica shares the name.
    settings = dataclasses.replace(settings, replica_id=resolved_replica_id(settings))
    from gateway.server import gateway as server
    from gateway.server.workers import executor_count, serve_workers, worker_count

    try:
        count = worker_count(settings)
        # An executor process is started and restarted by the supervisor, even for one worker.
        if count > 1 or executor_count(settings):
            sys.exit(serve_workers(settings, count))
        if settings.loop == "uvloop":
            import uvloop

            uvloop.run(server.run(settings))
        else:
            asyncio.run(server.run(settings))
    except GatewayError as exc:
        click.echo(f"gateway: {exc}", err=True)
        sys.exit(2)


def _add_commands() -> None:
    from gateway.cli.bench import bench
    from gateway.cli.demo import demo
    from gateway.cli.drift import drift
    from gateway.cli.release import COMMANDS
    from gateway.cli.replay import replay_command
    from gateway.cli.route import route

    for command in COMMANDS:
        main.add_command(command)
    if not demo.epilog:  # demo.py's own examples win once it has some
        demo.epilog = DEMO_EPILOG
    main.add_command(demo)
    main.add_command(replay_command, "replay")
    main.add_command(bench)
    main.add_command(drift)
    main.add_command(route)


_add_commands()


if __name__ == "__main__":
    main()
