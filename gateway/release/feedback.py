"""Labels for earlier predictions: checked whole before any is joined, joined where the
prediction was made (in any worker process, on any replica), and counted by what became of each.

With several workers, the control API runs on worker 0 and each prediction is logged
by the worker that served it; with several replicas, labels reach whichever replica's
control API the load balancer picked. The process that receives a label set joins what
it can, shares the rest through the store (named by its origin), and waits (a bounded
time) for every other live process to say what it made of each, so the caller learns true
counts, not "0 joined" while they join elsewhere. Every process but the origin joins
what is shared: the predictions stay where they were made (a label set is a few hundred
bytes; a logged prediction with its inputs is kilobytes, so labels travel, not predictions).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from gateway.errors import InvalidInput, StoreUnavailable
from gateway.release.evidence import ALREADY, JOINED, UNKNOWN
from gateway.release.plane import ReleasePlane
from gateway.release.store import Store

log = logging.getLogger(__name__)

# Label sets per SubmitFeedback call. Each is joined on the event loop: 10,000 take
# tens of milliseconds, so one call cannot stall inference for long. `gateway feedback
# send` splits a file into batches under this and under the control API's message cap.
MAX_FEEDBACK_ITEMS = 10_000
# How long a call waits for the other workers to answer for the label sets it shared;
# what is not answered by then is reported as pending (it still joins when they read it).
FEEDBACK_WAIT_S = 10.0
# How often the other workers look for shared labels, and worker 0 for their answers.
FEEDBACK_POLL_S = 0.1
# A worker counts as running (and is waited for) if it published its evidence this
# recently. It does so twice a second, but a busy loop or a store held by another
# writer can delay that by seconds; a worker missed here would have its labels
# reported "unknown" although it joins them, so err on the side of waiting.
PEER_SEEN_WITHIN_S = 30.0
REJECTED = "rejected"
ERRORS_REPORTED = 10


@dataclass(slots=True)
class FeedbackTally:
    joined: int = 0
    unknown: int = 0
    already_labelled: int = 0
    rejected: int = 0
    pending: int = 0
    errors: list[str] = field(default_factory=list)

    def count(self, outcome: str, detail: str = "") -> None:
        if outcome == JOINED:
            self.joined += 1
        elif outcome == ALREADY:
            self.already_labelled += 1
        elif outcome == REJECTED:
            self.rejected += 1
            if len(self.errors) < ERRORS_REPORTED:
                self.errors.append(detail)
        else:
            self.unknown += 1


def check_count(count: int, max_items: int = MAX_FEEDBACK_ITEMS) -> None:
    if count > max_items:
        raise InvalidInput(
            f"items: {count} label sets in one call; the limit is {max_items}: send them in batches "
            "(`gateway feedback send` does)"
        )


def check_items(items: Sequence[tuple[str, Sequence[float]]], max_items: int = MAX_FEEDBACK_ITEMS) -> None:
    """Refuse the whole call, before any label is joined, for any item no worker could use."""
    check_count(len(items), max_items)
    for i, (request_id, labels) in enumerate(items):
        if not request_id:
            raise InvalidInput(f"items[{i}].request_id is empty: feedback needs the id the prediction was made for")
        if not labels:
            raise InvalidInput(f"items[{i}].labels is empty (request id {request_id[:80]!r}): send one label per row")
        if not all(math.isfinite(v) for v in labels):
            raise InvalidInput(
                f"items[{i}].labels holds a value that is not a finite number (request id {request_id[:80]!r})"
            )


@dataclass(frozen=True, slots=True)
class Sharing:
    """Where labels unknown here go: the shared store, and this process's name there (replica/worker)."""

    store: Store
    member: str


async def submit(
    plane: ReleasePlane,
    sharing: Sharing | None,
    model: str,
    items: Sequence[tuple[str, Sequence[float]]],
    wait_s: float = FEEDBACK_WAIT_S,
) -> FeedbackTally:
    """Join label sets here; with `sharing` (several workers or replicas), share those unknown
    here and count what the other processes made of them."""
    plane.table.get(model)  # NOT_FOUND for an unknown model
    check_items(items)
    evidence = plane.evidence[model]
    tally = FeedbackTally()
    elsewhere: list[tuple[str, list[float]]] = []
    for request_id, labels in items:
        try:
            outcome = evidence.join(request_id, labels)
        except InvalidInput as exc:  # labels that do not fit: the prediction stays for a resend
            tally.count(REJECTED, str(exc))
            continue
        if outcome == UNKNOWN and sharing is not None:
            elsewhere.append((request_id, list(labels)))
        else:
            tally.count(outcome)
    if elsewhere:
        assert sharing is not None
        await _shared(sharing, model, elsewhere, wait_s, tally)
    return tally


async def _shared(
    sharing: Sharing, model: str, items: list[tuple[str, list[float]]], wait_s: float, tally: FeedbackTally
) -> None:
    store = sharing.store
    first, last = await asyncio.to_thread(store.add_feedback, model, items, sharing.member)
    peers = await asyncio.to_thread(store.live_workers, PEER_SEEN_WITHIN_S)
    peers.discard(sharing.member)
    deadline = time.monotonic() + wait_s
    while True:
        progress, answers = await asyncio.to_thread(store.feedback_answers, first, last)
        if all(progress.get(w, 0) >= last for w in peers) or time.monotonic() >= deadline:
            break
        await asyncio.sleep(FEEDBACK_POLL_S)
    by_id: dict[int, dict[str, str]] = {}
    for feedback_id, _worker, outcome, detail in answers:
        by_id.setdefault(feedback_id, {})[outcome] = detail
    for feedback_id in range(first, last + 1):
        said = by_id.get(feedback_id, {})
        for outcome in (JOINED, REJECTED, ALREADY):  # one worker joining it is what counts
            if outcome in said:
                tally.count(outcome, said[outcome])
                break
        else:
            if all(progress.get(w, 0) >= feedback_id for w in peers):
                tally.count(UNKNOWN)
            else:
                tally.pending += 1


async def join_shared(plane: ReleasePlane, store: Store, worker: str, last: int) -> None:
    """Join the labels other processes shared after id `last` (read before this process
    served: gateway.release.sync), and say what became of each (joined, already labelled
    or rejected; unknown goes unsaid). Its own shares it skips: it found them unknown."""
    while True:
        await asyncio.sleep(FEEDBACK_POLL_S)
        try:
            rows = await asyncio.to_thread(store.feedback_after, last)
            if not rows:
                continue
            outcomes: list[tuple[int, str, str]] = []
            for row_id, model, origin, request_id, labels in rows:
                last = row_id  # never joined twice, whatever happens below
                if origin == worker:
                    continue
                evidence = plane.evidence.get(model)
                if evidence is None:
                    continue
                try:
                    outcome = evidence.join(request_id, labels, received=False)
                except InvalidInput as exc:
                    outcomes.append((row_id, REJECTED, str(exc)))
                    continue
                if outcome != UNKNOWN:
                    outcomes.append((row_id, outcome, ""))
            await asyncio.to_thread(store.record_feedback_outcomes, worker, last, outcomes)
        except StoreUnavailable:
            pass  # the store logs its failures itself, rate-limited
        except Exception:  # the loop must outlive any one bad row
            log.exception("joining shared labels failed")
