"""The REST binding served by uvicorn on the gateway's own event loop, beside grpc.aio.

One loop serves both edges, so a REST request and a gRPC one reach the same data
plane, batchers and release plane without crossing threads. uvicorn gets a socket
already bound by the composition root (so the port is known, clashes are refused
with the flag's name, and workers share it through SO_REUSEPORT) and never
touches signals: the Gateway owns SIGTERM and the drain order.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from starlette.applications import Starlette

from gateway.errors import ConfigError

# How often the start looks whether uvicorn is listening yet (it takes a few milliseconds).
_START_POLL_S = 0.005


@dataclass(frozen=True, slots=True)
class HttpOptions:
    max_connections: int  # connections and requests in flight; past it uvicorn answers 503 at once
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # set: clients must present a certificate it signed


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn would replace the process's SIGTERM/SIGINT handlers with its own.
        yield


class HttpServer:
    """uvicorn on a bound socket: `start` returns once it listens, `stop` drains it within a grace period."""

    def __init__(self, app: Starlette, sock: socket.socket, options: HttpOptions) -> None:
        tls = options.tls_cert is not None
        config = uvicorn.Config(
            app,
            lifespan="off",
            log_config=None,
            log_level="warning",  # its per-start and per-stop lines; errors still log
            access_log=False,
            server_header=False,
            limit_concurrency=options.max_connections,
            ssl_certfile=str(options.tls_cert) if tls else None,
            ssl_keyfile=str(options.tls_key) if tls else None,
            ssl_ca_certs=str(options.tls_client_ca) if tls and options.tls_client_ca else None,
            ssl_cert_reqs=ssl.CERT_REQUIRED if tls and options.tls_client_ca else ssl.CERT_NONE,
        )
        self._server = _Server(config)
        self._sock = sock
        self._task: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        return int(self._sock.getsockname()[1])

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[self._sock]))
        while not self._server.started:
            if self._task.done():
                error = self._task.exception()
                raise ConfigError(f"http_port: the REST server did not start: {error!r}")
            await asyncio.sleep(_START_POLL_S)

    async def stop(self, grace_s: float) -> None:
        """Stop listening, let requests in flight finish (up to `grace_s`), close the connections."""
        if self._task is None:
            return
        # Whole seconds (uvicorn's type); the data plane is idle by now, so little is left to wait for.
        self._server.config.timeout_graceful_shutdown = max(1, math.ceil(grace_s))
        self._server.should_exit = True
        try:
            await self._task
        finally:
            self._sock.close()
