"""The executor process: `python -m gateway.serving.remote.executor --listen @NAME [--models DIR] ...`.

Loads the models with the same builder the workers use (providers, warm-up, batching
specs), listens for front ends on a Unix SEQPACKET socket, prints `ready ADDRESS` on
stdout once it accepts them, and serves until SIGTERM or SIGINT: then it disconnects
the front ends and lets each version's executor finish what it runs.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gateway.config.settings import GatewaySettings
from gateway.serving.builder import LoadedSessions, ModelBuilder
from gateway.serving.metrics import GatewayMetrics
from gateway.serving.remote.catalog import Build, Catalog, fingerprint
from gateway.serving.remote.server import ExecutorServer, Served, listen, slot_bytes_for

log = logging.getLogger(__name__)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m gateway.serving.remote.executor", description=__doc__)
    parser.add_argument("--listen", required=True, help="socket path, or @NAME in the abstract namespace")
    parser.add_argument("--models", type=Path, default=Path("models"), help="the model repository")
    parser.add_argument("--load", action="append", default=[], help="a model to load (repeat); default all")
    parser.add_argument("--provider", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--intra-op-threads", type=int, default=0, help="onnxruntime threads a session (0: cores)")
    parser.add_argument("--slot-bytes", type=int, default=0, help="slot size offered to front ends (0: from specs)")
    return parser.parse_args(argv)


def load(builder: ModelBuilder) -> list[Served]:
    """Every version of every model to load, numbered in load order (the ids front ends use)."""
    served: list[Served] = []
    for name in builder.model_names():
        served += versions_of(builder, builder.sessions(name), len(served))
    return served


def versions_of(builder: ModelBuilder, sessions: LoadedSessions, first_id: int) -> list[Served]:
    """A built model's versions with executors attached (on the loop), numbered from `first_id`."""
    entry = builder.assemble(sessions)
    served: list[Served] = []
    for version in entry.sorted_versions():
        loaded = entry.versions[version]
        model = loaded.model
        served.append(
            Served(
                first_id + len(served),
                sessions.name,
                version,
                model.inputs,
                model.outputs,
                loaded.executor,
                loaded.stats,
            )
        )
    return served


def run_time_builder(builder: ModelBuilder) -> Build:
    """Loads at run time: sessions built and warmed on a thread (the loop keeps serving), then
    executors attached on the loop (the catalog numbers the versions)."""

    async def build(name: str) -> list[Served]:
        return versions_of(builder, await asyncio.to_thread(builder.sessions, name), 0)

    return build


def settings_of(args: argparse.Namespace) -> GatewaySettings:
    return GatewaySettings(
        models=args.models, load=tuple(args.load), provider=args.provider, intra_op_threads=args.intra_op_threads
    )


async def serve(
    settings: GatewaySettings,
    address: str,
    on_ready: Callable[[], None],
    slot_bytes: int = 0,
    metrics: GatewayMetrics | None = None,
) -> None:
    """Load, listen at `address`, call `on_ready`, and serve until SIGTERM or SIGINT.

    `metrics`: the batchers' Prometheus collectors (batch sizes, queue and compute
    times); under `gateway serve` they land in the supervisor's multiprocess
    directory and are merged with the front ends' own."""
    with ThreadPoolExecutor(max_workers=64, thread_name_prefix="ort") as pool:
        builder = ModelBuilder.from_settings(settings, pool, metrics=metrics)
        repository = builder.repository
        # Fingerprints before the builds: a file changed meanwhile makes the next load rebuild.
        fingerprints = {name: fingerprint(repository.model_dir(name)) for name in builder.model_names()}
        versions = load(builder)
        builder.note_provider()
        catalog = Catalog(versions, fingerprints, run_time_builder(builder), repository.model_dir)
        slot_bytes = slot_bytes or max(
            slot_bytes_for(
                v.inputs,
                v.outputs,
                max(1, repository.spec(v.model).max_batch_size),
                repository.spec(v.model).limits.max_request_bytes,
            )
            for v in versions
        )
        server = ExecutorServer(catalog, slot_bytes)
        listener = listen(address)
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        accepting = loop.create_task(server.serve(listener))
        log.info("executor serving %d versions at %s, slots of %d bytes", len(versions), address, slot_bytes)
        on_ready()
        await stop.wait()
        log.info("executor draining")
        accepting.cancel()
        listener.close()
        await server.close()
        await catalog.close()
        shadows = server.gate.counts
        log.info("shadow requests: %d run, %d shed, %d late", shadows.run, shadows.shed, shadows.late)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s executor %(levelname)s %(message)s", stream=sys.stderr)
    args = parse(argv)
    asyncio.run(
        serve(settings_of(args), args.listen, lambda: print(f"ready {args.listen}", flush=True), args.slot_bytes)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
