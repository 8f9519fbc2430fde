"""Reading external checks' sources in the background, and keeping the latest reading.

The controller asks for a poll each analysis interval and decides on the readings
it already has: a request never runs inside a decision, so a slow or dead source
delays no decision (and no lease renewal) at all. Each source has at most one
request in flight, bounded by its spec's `timeout_s` (httpx's timeout and
asyncio's, both); a reading older than a couple of intervals counts as none.
gateway/release/external.py turns readings into verdicts.

httpx is imported when the first poll starts: the CLI imports this package too,
and never polls.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import orjson

from gateway.config.spec import ExternalCheckSpec
from gateway.logthrottle import ThrottledLog, one_line
from gateway.release.external import BadAnswer, Reading, json_path_value, judge, prometheus_value
from gateway.release.policy import CheckResult

if TYPE_CHECKING:
    import httpx

log = logging.getLogger(__name__)

# An answer is one number with some wrapping: more than this is not what was asked for,
# and is not read into memory.
MAX_ANSWER_BYTES = 1 << 20
PROMETHEUS_QUERY_PATH = "/api/v1/query"


def max_age(spec: ExternalCheckSpec, interval_s: float) -> float:
    """How old a reading may be and still stand for now: the poll a decision asks for
    lands by the next one (within timeout_s), with an interval to spare."""
    return 2 * interval_s + spec.timeout_s


def request_url(spec: ExternalCheckSpec) -> str:
    """Where a check's source is asked: a Prometheus server's instant-query endpoint under
    its base URL (a path prefix, as behind a proxy, is kept), or a web check's URL as given."""
    if spec.kind == "prometheus":
        return spec.url.rstrip("/") + PROMETHEUS_QUERY_PATH
    return spec.url


class ExternalChecks:
    """The latest reading of every model's external checks, and the polls that refresh them.

    Lives on the release plane, so the controller (which polls) and `gateway status`
    (which only reads) see the same readings; in a process that is not the
    controller's there are none, and its status says so."""

    def __init__(self, clock: Callable[[], float] = time.time, transport: httpx.AsyncBaseTransport | None = None):
        self._clock = clock
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._readings: dict[tuple[str, str], Reading] = {}
        self._inflight: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._closed = False
        # A dead source fails every interval: one line per check every few seconds is enough.
        self._log = ThrottledLog(log)

    def poll(self, model: str, specs: Sequence[ExternalCheckSpec]) -> None:
        """Start reading each check's source, unless a read of it is still in flight. Returns at once."""
        if self._closed:
            return  # shutting down: the controller may tick once more before it is cancelled
        loop = asyncio.get_running_loop()
        for spec in specs:
            key = (model, spec.name)
            task = self._inflight.get(key)
            if task is None or task.done():
                self._inflight[key] = loop.create_task(self._read(key, spec), name=f"external-check {spec.name}")

    def results(
        self, model: str, specs: Sequence[ExternalCheckSpec], *, since: float, now: float, interval_s: float
    ) -> list[CheckResult]:
        """Each check's verdict on its latest reading taken since `since` (the rollout's start)."""
        return [
            judge(spec, self._readings.get((model, spec.name)), since=since, now=now, max_age=max_age(spec, interval_s))
            for spec in specs
        ]

    def latest(self, model: str, name: str) -> Reading | None:
        """The latest reading of one check, whatever its age."""
        return self._readings.get((model, name))

    async def settle(self) -> None:
        """Wait for the reads in flight now to land (or fail)."""
        await asyncio.gather(*self._inflight.values(), return_exceptions=True)

    def forget(self, model: str) -> None:
        """Drop a model's readings and stop its polls (its rollout ended)."""
        for key in [k for k in self._inflight if k[0] == model]:
            self._inflight.pop(key).cancel()
        for key in [k for k in self._readings if k[0] == model]:
            del self._readings[key]

    async def close(self) -> None:
        self._closed = True
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._inflight.clear()
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _read(self, key: tuple[str, str], spec: ExternalCheckSpec) -> None:
        import httpx

        url = request_url(spec)
        try:
            # asyncio's timeout bounds the whole exchange; httpx's alone bounds each
            # network operation, so a source trickling bytes could outlast it.
            async with asyncio.timeout(spec.timeout_s):
                value = await self._fetch(spec, url)
            reading = Reading(spec, self._clock(), value)
        except TimeoutError:
            reading = Reading(spec, self._clock(), problem=f"no answer from {url} within {spec.timeout_s:g} s")
        except httpx.HTTPError as exc:
            reading = Reading(spec, self._clock(), problem=f"cannot reach {url}: {_error(exc)}")
        except BadAnswer as exc:
            reading = Reading(spec, self._clock(), problem=f"{url}: {exc}")
        if reading.problem:
            self._log.log(
                logging.WARNING, key, "external check %s of %s: %s", spec.name, key[0], one_line(reading.problem)
            )
        self._readings[key] = reading

    async def _fetch(self, spec: ExternalCheckSpec, url: str) -> float:
        client = self._http()
        params = {"query": spec.query} if spec.kind == "prometheus" else None
        headers = {"Accept": "application/json"}
        async with client.stream("GET", url, params=params, headers=headers, timeout=spec.timeout_s) as response:
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_ANSWER_BYTES:
                    raise BadAnswer(f"the answer is larger than {MAX_ANSWER_BYTES >> 20} MiB")
        try:
            answer = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise BadAnswer(f"HTTP {response.status_code}, and the answer is not JSON") from None
        if spec.kind == "prometheus":
            # Prometheus answers a bad query with 400 and a JSON error: prometheus_value says which.
            return prometheus_value(answer)
        if not response.is_success:
            raise BadAnswer(f"HTTP {response.status_code}")
        return json_path_value(answer, spec.path)

    def _http(self) -> httpx.AsyncClient:
        import httpx

        if self._client is None:
            # One client for the process's life: its connection pool keeps a source's
            # connection between polls, and building its TLS context costs milliseconds.
            self._client = httpx.AsyncClient(transport=self._transport, follow_redirects=False)
        return self._client


def _error(exc: Exception) -> str:
    """An httpx error in a few words: its message, or its class where it has none."""
    text = str(exc).strip()
    return text[:200] if text else type(exc).__name__
