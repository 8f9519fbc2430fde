"""Shadow mirroring: copies of live requests run on other versions, compared, never returned.

Fire-and-forget and bounded: a copy is queued only after the primary has its
answer, and a lane runs and compares its copies only while no primary request
is in flight, so shadow work never goes ahead of primary work. Past
`max_pending` copies (or `max_pending_bytes`) queued or running, copies are
dropped and counted, never waited for. A copy gets at most the primary's
remaining deadline. A shadow that keeps failing is cut off by a circuit
breaker and probed again after a backoff.

Copies gather for `gather_s` (20 ms) and run in batches of up to
`batch_rows`, each compared in one vectorised pass. A copy run and compared
on its own cost the loop ~70 us, which at half load raised the primary's
p99 by a fifth; batched, a copy costs a few microseconds plus its share of a
round (the README's shadow benchmark measures the primary's latency).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol, runtime_checkable

import numpy as np

from gateway.errors import DeadlineExceeded, QueueTimeout, ShadowLate, ShadowShed
from gateway.logthrottle import ThrottledLog, one_line
from gateway.serving.batcher import concat_feeds, shape_key
from gateway.serving.executor import Executor
from gateway.tracing import ShadowTrace, Tracing
from gateway.types import RequestRun, Tensors

log = logging.getLogger(__name__)


@dataclass(slots=True)
class CircuitBreaker:
    """Opens after `threshold` consecutive failures; lets one probe through after a backoff."""

    threshold: int = 5
    base_backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    clock: Callable[[], float] = time.monotonic
    failures: int = 0
    open_until: float = 0.0
    backoff_s: float = 0.0
    probing: bool = False
    opened: int = 0  # times the circuit opened
    # Told when the circuit opens (times opened, failures in a row): a notification, say.
    on_open: Callable[[int, int], None] | None = None

    @property
    def is_open(self) -> bool:
        return self.failures >= self.threshold

    def allow(self) -> bool:
        if not self.is_open:
            return True
        if self.probing or self.clock() < self.open_until:
            return False
        self.probing = True  # half-open: one probe at a time
        return True

    def success(self) -> None:
        self.failures = 0
        self.backoff_s = 0.0
        self.probing = False

    def failure(self) -> None:
        self.failures += 1
        self.probing = False
        if self.failures >= self.threshold:
            if self.failures == self.threshold:
                self.opened += 1
                if self.on_open is not None:
                    try:
                        self.on_open(self.opened, self.failures)
                    except Exception:  # the breaker protects the primary: a listener must not stop it
                        log.exception("the circuit-open hook failed")
            self.backoff_s = min(self.max_backoff_s, self.backoff_s * 2 or self.base_backoff_s)
            self.open_until = self.clock() + self.backoff_s


class PrimaryActivity(Protocol):
    def is_idle(self) -> bool: ...

    def wait_idle(self) -> Awaitable[None]: ...


@dataclass(slots=True)
class ShadowCounters:
    """What became of a lane's copies. The field names are the outcomes the metrics
    label them with: a new counter is a new outcome."""

    mirrored: int = 0
    dropped: int = 0  # queue bound reached, circuit open, or shed by a busy executor process
    failed: int = 0  # raised, or answered with the wrong shape
    timed_out: int = 0
    completed: int = 0


@dataclass(frozen=True, slots=True)
class ShadowReport:
    """One lane as a report shows it: its counters (a copy), what is pending, its circuit."""

    counters: ShadowCounters
    pending: int
    circuit_open: bool
    circuit_opened: int  # times the circuit opened


# A version's model run, called directly (not through its batcher): what a paired timing times.
ModelRun = Callable[[Tensors], list[np.ndarray]]


class CopySink(Protocol):
    def __call__(self, copies: Sequence[ShadowCopy], outputs: list[np.ndarray], seconds: float) -> bool:
        """Take a batch of copies' outputs (rows in copy order); False when they are unusable."""
        ...


@runtime_checkable
class PairedTiming(Protocol):
    """A sink that also wants each batch timed on the other version of its comparison."""

    def partner(self) -> ModelRun | None:
        """The other version of the comparison, run directly, for a paired timing of the same
        batch; None: no timing wanted now."""
        ...

    def timed(self, copies: Sequence[ShadowCopy], seconds: float, partner_seconds: float) -> None:
        """The batch's run time on this lane's version and on the partner's."""
        ...


@dataclass(slots=True, eq=False)
class ShadowCopy:
    """One mirrored request: the run it copies, whose outputs it is compared with."""

    primary: RequestRun
    until: float  # monotonic; the primary's deadline, or the lane's default timeout
    sink: CopySink
    nbytes: int  # the feeds' and the outputs', held until the copy is done


def _timed_run(run: ModelRun, feeds: Tensors) -> tuple[list[np.ndarray], float]:
    """`run(feeds)` and how long it took, both on the worker thread that runs it.

    Timed from the event loop, a run also held the hand-off to the thread and the wait for
    the loop to take the answer back: on a loop busy serving requests that wait was most of
    what a paired timing measured (a 70 us spin model's runs read as 0.8 ms, their
    differences spread four times wider), noise that no number of pairs averaged out soon
    enough for a step to pass."""
    start = time.perf_counter()
    outputs = run(feeds)
    return outputs, time.perf_counter() - start


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


@dataclass
class ShadowLane:
    """One version's mirrored copies: gathered, then run in batches in the primary's idle time.

    The circuit breaker counts runs, not copies: a failing batch is one strike.
    """

    executor: Executor
    max_rows: int = 1  # rows one run may carry (the version's max_batch_size; <= 1: a copy a run)
    # Rows per shadow run, and the queue size that ends a gather early: larger
    # batches save little more, while each is one stretch the loop is busy for.
    batch_rows: int = 64
    # Bounds on what is queued or running; past either, copies are dropped.
    max_pending: int = 1024
    max_pending_bytes: int = 64 << 20
    # How long copies gather before a round runs: long enough that a round's
    # fixed cost (a run, a comparison, ~100 us) is shared by many copies.
    gather_s: float = 0.02
    # A gather ends this long before the earliest queued copy's deadline, so
    # a copy with a short deadline still gets its run.
    deadline_margin_s: float = 0.005
    default_timeout_s: float = 5.0
    breaker: CircuitBreaker = field(default_factory=CircuitBreaker)
    counters: ShadowCounters = field(default_factory=ShadowCounters)
    primary: PrimaryActivity | None = None
    rng: random.Random = field(default_factory=random.Random)  # the order of a paired timing's two runs
    run_direct: ModelRun | None = None  # this version's model run, for paired timings (None: never timed)
    _queued: list[ShadowCopy] = field(default_factory=list)  # for the next round
    _round: list[ShadowCopy] = field(default_factory=list)  # this round's, not yet running
    _running: int = 0
    _queued_rows: int = 0
    _pending_bytes: int = 0
    _flusher: asyncio.Task[None] | None = None
    _full: asyncio.Future[None] | None = None  # set while gathering: resolving it ends the gather
    _gather_ends: float = 0.0  # monotonic
    # Who this lane runs, for its log lines.
    model: str = ""
    version: str = ""
    # A failing shadow fails every copy: at most a line per few seconds, with a count.
    failure_log: ThrottledLog = field(default_factory=lambda: ThrottledLog(log))
    # Set when tracing is on: a batch carrying traced requests' copies gets spans linked to them.
    tracing: Tracing | None = None

    @property
    def pending(self) -> int:
        """Copies queued or running."""
        return len(self._queued) + len(self._round) + self._running

    def report(self) -> ShadowReport:
        return ShadowReport(replace(self.counters), self.pending, self.breaker.is_open, self.breaker.opened)

    def mirror(self, primary: RequestRun, sink: CopySink, tasks: set[asyncio.Task[None]]) -> None:
        """Queue a copy of `primary` for `sink`, or drop it at once; never blocks the caller."""
        now = time.monotonic()
        deadline = primary.deadline
        until = now + self.default_timeout_s if deadline is None else min(deadline, now + self.default_timeout_s)
        nbytes = sum(a.nbytes for a in primary.feeds.values()) + sum(a.nbytes for a in primary.outputs)
        if (
            until <= now
            or self.pending >= self.max_pending
            or self._pending_bytes + nbytes > self.max_pending_bytes
            or not self.breaker.allow()  # last: a True here may have taken the one probe
        ):
            self.counters.dropped += 1
            return
        self._queued.append(ShadowCopy(primary, until, sink, nbytes))
        self._queued_rows += primary.rows
        self._pending_bytes += nbytes
        self.counters.mirrored += 1
        full = self._full
        # A full batch, or a copy that cannot wait out the gather, ends the gather now.
        if (
            full is not None
            and not full.done()
            and (self._queued_rows >= self._run_rows() or until - self.deadline_margin_s < self._gather_ends)
        ):
            full.set_result(None)
        if self._flusher is None:
            task = self._flusher = asyncio.get_running_loop().create_task(self._flush())
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    async def _flush(self) -> None:
        """Rounds until nothing is queued: gather, then run what came, a batch at a time.

        Copies that arrive during a round wait for the next one, so every
        round gathers afresh rather than running the stragglers one by one.
        A batch runs only while no primary request is in flight; copies
        whose deadline passes first time out (no mark against the shadow).
        """
        try:
            while self._queued:
                await self._gather()
                self._round, self._queued = self._queued, []
                self._queued_rows = 0
                while self._round:
                    await self._primary_idle(min(c.until for c in self._round))
                    self._expire(time.monotonic())
                    if self._round and self._primary_is_idle():
                        await self._run(self._take())
        finally:
            # Cancelled mid-round (shutdown): what this round did not run is still queued.
            self._queued[:0] = self._round
            self._queued_rows = sum(c.primary.rows for c in self._queued)
            self._round = []
            self._flusher = None

    def _run_rows(self) -> int:
        return max(1, min(self.max_rows, self.batch_rows))

    async def _gather(self) -> None:
        """Wait `gather_s`; less once a full batch is queued or a copy's deadline is near."""
        if self._queued_rows >= self._run_rows():
            return
        now = time.monotonic()
        ends = min(now + self.gather_s, min(c.until for c in self._queued) - self.deadline_margin_s)
        if ends <= now:
            return
        loop = asyncio.get_running_loop()
        full = self._full = loop.create_future()
        self._gather_ends = ends
        timer = loop.call_later(ends - now, _resolve, full)
        try:
            await full
        finally:
            timer.cancel()
            self._full = None

    def _primary_is_idle(self) -> bool:
        return self.primary is None or self.primary.is_idle()

    async def _primary_idle(self, until: float) -> None:
        """Wait until no primary request is in flight, or until `until` (monotonic) passes."""
        primary = self.primary
        if primary is None or primary.is_idle():
            return
        try:
            async with asyncio.timeout(max(0.0, until - time.monotonic())):
                await primary.wait_idle()
        except TimeoutError:
            pass  # the caller decides what a late copy means

    def _expire(self, now: float) -> None:
        """Copies whose time ran out while waiting: timed out, but no mark against the shadow."""
        kept = [c for c in self._round if c.until > now]
        if len(kept) < len(self._round):
            self.counters.timed_out += len(self._round) - len(kept)
            self._pending_bytes -= sum(c.nbytes for c in self._round if c.until <= now)
            self._round = kept
            # If one of them was the half-open circuit's probe, the next copy may probe instead.
            self.breaker.probing = False

    def _take(self) -> list[ShadowCopy]:
        """The head copy and every later one that fits in one run with it, in order."""
        queued = self._round
        head = queued[0]
        key = shape_key(head.primary.feeds)
        limit = self._run_rows()
        batch = [head]
        rows = head.primary.rows
        kept: list[ShadowCopy] = []
        for c in queued[1:]:
            if rows + c.primary.rows <= limit and c.sink is head.sink and shape_key(c.primary.feeds) == key:
                batch.append(c)
                rows += c.primary.rows
            else:
                kept.append(c)
        self._round = kept
        return batch

    def _log_failure(self, what: str, batch: Sequence[ShadowCopy], exc: Exception) -> None:
        ids = ", ".join(repr(c.primary.request_id) for c in batch[:3]) + (
            f" and {len(batch) - 3} more" if len(batch) > 3 else ""
        )
        self.failure_log.log(
            logging.WARNING,
            what,
            "shadow of model %s version %s: %s on %d copies (request ids %s): %s",
            self.model or "?",
            self.version or "?",
            what,
            len(batch),
            one_line(ids),
            one_line(exc),
        )

    async def _timed_pair(
        self, own: ModelRun, partner: ModelRun, feeds: Tensors
    ) -> tuple[list[np.ndarray], float, float | None]:
        """Run a batch on this lane's version and on `partner`, back to back and in random
        order (so that neither is always the one on warm caches), each the same way: the
        model itself on a worker thread. Not through the versions' batchers: a batcher's wait
        for more rows depends on its own traffic, which would time batching, not the versions.
        The partner's time is None when its run failed (not this shadow's failure)."""
        own_first = self.rng.random() < 0.5
        partner_s: float | None = None
        if not own_first:
            partner_s = await self._partner_run(partner, feeds)
        outputs, seconds = await asyncio.to_thread(_timed_run, own, feeds)
        if own_first:
            partner_s = await self._partner_run(partner, feeds)
        return outputs, seconds, partner_s

    async def _partner_run(self, partner: ModelRun, feeds: Tensors) -> float | None:
        try:
            _, seconds = await asyncio.to_thread(_timed_run, partner, feeds)
        except Exception:  # the partner's trouble shows in its own evidence, not this shadow's
            return None
        return seconds

    async def _run(self, batch: list[ShadowCopy]) -> None:
        n = len(batch)
        rows = sum(c.primary.rows for c in batch)
        until = min(c.until for c in batch)
        self._running += n
        start = time.monotonic()
        partner_s: float | None = None
        trace = None if self.tracing is None else self._trace(batch, rows)
        outcome = "cancelled"  # what the batch's span says, when it has one
        try:
            feeds = concat_feeds([c.primary.feeds for c in batch])
            sink = batch[0].sink
            partner = sink.partner() if self.run_direct is not None and isinstance(sink, PairedTiming) else None
            if trace is not None:
                trace.step("gateway.shadow.run", {"gateway.batch.size": rows, "gateway.paired": partner is not None})
            async with asyncio.timeout(max(0.0, until - start)):
                if partner is None or self.run_direct is None:
                    outputs = await self.executor.submit(feeds, rows, until, None)
                    own_s = time.monotonic() - start
                else:
                    outputs, own_s, partner_s = await self._timed_pair(self.run_direct, partner, feeds)
        except ShadowShed:
            # The executor process was busy with primaries (its own and other workers'): not
            # the shadow's failure, so no mark against it.
            outcome = "dropped"
            self.counters.dropped += n
            self.breaker.probing = False
        except ShadowLate:
            outcome = "timed_out"  # primaries kept the executor process busy to the deadline
            self.counters.timed_out += n
            self.breaker.probing = False
        except (TimeoutError, DeadlineExceeded, QueueTimeout):
            outcome = "timed_out"
            self.counters.timed_out += n
            self.breaker.failure()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a shadow's failure is data, never the caller's problem
            outcome = "failed"
            self._log_failure("run failed", batch, exc)
            self.counters.failed += n
            self.breaker.failure()
        else:
            seconds = own_s
            if trace is not None:
                trace.done()
            # Comparing is shadow work too: it waits for primary requests that came in meanwhile.
            await self._primary_idle(until)
            if not self._primary_is_idle():
                outcome = "timed_out"
                self.counters.timed_out += n  # the primary stayed busy to the deadline: not the shadow's fault
                self.breaker.probing = False
                return
            if trace is not None:
                trace.step("gateway.shadow.compare")
            try:
                usable = batch[0].sink(batch, outputs, seconds)
            except Exception as exc:  # outputs no comparison can use: the shadow's failure, not ours
                self._log_failure("outputs unusable", batch, exc)
                usable = False
            if usable:
                outcome = "completed"
                self.counters.completed += n
                self.breaker.success()
                if partner_s is not None and isinstance(batch[0].sink, PairedTiming):
                    batch[0].sink.timed(batch, seconds, partner_s)
            else:
                outcome = "failed"
                self.counters.failed += n
                self.breaker.failure()
        finally:
            self._running -= n
            self._pending_bytes -= sum(c.nbytes for c in batch)
            if trace is not None:
                trace.end(outcome)

    def _trace(self, batch: list[ShadowCopy], rows: int) -> ShadowTrace | None:
        """The batch's spans, linked to each traced request it carries a copy of; None when it carries none."""
        links = [c.primary.trace for c in batch if c.primary.trace is not None]
        if not links or self.tracing is None:
            return None
        return self.tracing.shadow(
            links,
            {
                "gateway.model": self.model,
                "gateway.version": self.version,
                "gateway.copies": len(batch),
                "gateway.rows": rows,
            },
        )
