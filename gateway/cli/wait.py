"""Following one rollout to its end: `gateway rollout wait` and `gateway rollout start --wait`.

A CI/CD pipeline step is one command whose exit status says how the rollout
ended: 0 promoted, 1 rolled back (or ended some other way), 5 still going when
--timeout ran out (the rollout itself goes on: the pipeline decides what next).
A rollout waiting at an approval gate keeps the command waiting (it prints
that it does, and what to run); the timeout still applies.

The control API has no streaming call, so the watcher polls: the release (and
the rollout view that rides with it), then the audit log from the last record
it printed. Each audited change is printed once, in order, and the assessment
(what the controller would do next, and which checks it waits on) whenever it
changes. A rollout is known by the time it began (`rollout_started_at`), so a
rollout started by someone else afterwards is never taken for this one. A
gateway that cannot be reached for a while (a restart, a rolling deploy) is
waited for, up to UNREACHABLE_GRACE_S at a time: the rollout resumes where it
was stored, and a pipeline should not fail because its gateway restarted.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import click

from gateway.cli.release import audit_json, check_phrase, describe_audit, plain, rfc3339, rollout_json, rollout_view
from gateway.config.spec import describe_gate
from gateway.control.client import EXIT_REFUSED, EXIT_UNREACHABLE, CommandFailed, ControlClient
from gateway.protocol.pb import release_pb2 as rpb
from gateway.release.policy import ACTIVE, Phase

EXIT_PROMOTED = 0
EXIT_ROLLED_BACK = 1
EXIT_TIMEOUT = 5
DEFAULT_POLL_S = 0.5
# How long the control API may stay unreachable before the command gives up (exit 4).
UNREACHABLE_GRACE_S = 60.0
# The audit actions that end a rollout, and what the command then exits with.
_ENDS = {"promote": ("promoted", EXIT_PROMOTED), "rollback": ("rolled_back", EXIT_ROLLED_BACK)}


@dataclass
class Watch:
    """One rollout being followed; `run` returns the exit status."""

    client: ControlClient
    model: str
    started_at: float  # the rollout's rollout_started_at, as the server stored it
    as_json: bool = False
    poll_s: float = DEFAULT_POLL_S
    timeout_s: float | None = None
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    out: Callable[[str], None] = click.echo
    err: Callable[[str], None] = field(default=lambda line: click.echo(line, err=True))
    _last_id: int = 0
    _seen_rows: int = 0  # audit records of this rollout read so far: where the next read starts
    _unreachable_since: float | None = None
    _assessment: tuple[Any, ...] = ()
    _ended_by: str = ""  # the action that ended this rollout (promote/rollback), once printed
    _began: float = field(default=0.0)

    def run(self) -> int:
        self._began = self.clock()
        deadline = None if self.timeout_s is None else self._began + self.timeout_s
        while True:
            # The release first, then the audit: every change up to the phase read is printed
            # before the command says how the rollout ended.
            try:
                release, view = self._release()
                self._changes()
            except CommandFailed as exc:
                self._unreachable(exc)
                if deadline is not None and self.clock() >= deadline:
                    raise
                self.sleep(self.poll_s)
                continue
            if self._unreachable_since is not None:
                self._unreachable_since = None
                self.err("gateway: the control API answers again")
            ours = release.rollout_started_at == self.started_at
            if ours and release.phase not in ACTIVE:
                return self._result(release, *_outcome(release.phase))
            if not ours:
                # Ended, and another rollout began since: its last audited ending says how.
                return self._result(release, *_ENDS.get(self._ended_by, ("ended", EXIT_ROLLED_BACK)))
            if view is not None:
                self._assess(release, view)
            if deadline is not None and self.clock() >= deadline:
                return self._result(release, "timeout", EXIT_TIMEOUT)
            pause = self.poll_s if deadline is None else max(0.0, min(self.poll_s, deadline - self.clock()))
            self.sleep(pause)

    def _unreachable(self, exc: CommandFailed) -> None:
        """Ride out an unreachable control API for UNREACHABLE_GRACE_S; anything else ends the wait."""
        if exc.code != EXIT_UNREACHABLE:
            raise exc
        now = self.clock()
        if self._unreachable_since is None:
            self._unreachable_since = now
            self.err(f"gateway: {plain(exc)}; retrying for up to {UNREACHABLE_GRACE_S:g} s")
        elif now - self._unreachable_since > UNREACHABLE_GRACE_S:
            raise exc

    # -- reading -----------------------------------------------------------------------

    def _release(self) -> tuple[rpb.Release, dict[str, Any] | None]:
        release, trailers = self.client.call_with_trailers(
            self.client.stub.GetRelease, rpb.GetReleaseRequest(model=self.model)
        )
        return release, rollout_view(trailers)

    def _records(self) -> Iterator[rpb.AuditRecord]:
        """The model's audit records of this rollout not printed yet, oldest first. The log is
        append-only and read in id order, so the records read before are a prefix: reading
        resumes after them."""
        while True:
            request = rpb.GetAuditLogRequest(model=self.model, since=self.started_at, limit=500, offset=self._seen_rows)
            page = self.client.call(self.client.stub.GetAuditLog, request)
            self._seen_rows += len(page.records)
            yield from (r for r in page.records if r.id > self._last_id)
            if not page.next_offset:
                return

    # -- printing ----------------------------------------------------------------------

    def _changes(self) -> None:
        # Printed page by page as read: a failure on a later page loses none of the earlier ones.
        for record in self._records():
            self._last_id = record.id
            if self._ended_by:
                continue  # a later rollout's records: not this one's story
            if record.outcome == "applied" and record.action in _ENDS:
                self._ended_by = record.action
            if self.as_json:
                self._emit(_change_event(audit_json(record)))
            else:
                self.out(describe_audit(record))

    def _assess(self, release: rpb.Release, view: dict[str, Any]) -> None:
        """Print what the controller would do next whenever that (or what it waits on) changes."""
        waiting = [c for c in view.get("checks", []) if c["verdict"] != "pass"]
        key = (
            view.get("phase"),
            view.get("step"),
            view.get("next") or view.get("if_resumed"),
            view.get("awaiting_approval"),
            tuple((c["check"], c["verdict"]) for c in waiting),
        )
        if key == self._assessment:
            return
        self._assessment = key
        if self.as_json:
            shown = rollout_json(view)
            self._emit(
                {
                    "event": "assessment",
                    "at": _now(),
                    "model": self.model,
                    "phase": shown["phase"],
                    "step": shown["step"],
                    "canary_weight_percent": release.canary_weight_bp / 100,
                    "next": shown.get("next") or shown.get("if_resumed"),
                    "awaiting_approval": shown.get("awaiting_approval"),
                    "reason": shown.get("reason"),
                    "waiting": [c["check"] for c in waiting],
                    "checks": shown.get("checks", []),
                }
            )
            return
        gate = view.get("awaiting_approval")
        if gate:
            self.out(
                f"  awaiting approval {describe_gate(str(gate))}: run `gateway rollout approve {plain(self.model)} "
                "--reason ...` (still waiting)"
            )
        upcoming = view.get("next") or view.get("if_resumed")
        if upcoming:
            label = "next" if "next" in view else "if resumed now"
            self.out(f"  {label}: {plain(upcoming)}")
        for c in waiting:
            self.out(f"    {plain(c['check'])} {plain(c['verdict'])} {check_phrase(c)}")

    def _result(self, release: rpb.Release, result: str, code: int) -> int:
        waited = self.clock() - self._began
        if self.as_json:
            self._emit(
                {
                    "event": "result",
                    "at": _now(),
                    "model": self.model,
                    "result": result,
                    "exit_code": code,
                    "phase": release.phase or Phase.IDLE.value,
                    "stable": release.stable,
                    "candidate": release.candidate or None,
                    "awaiting_approval": release.awaiting_approval or None,
                    "waited_s": round(waited, 3),
                }
            )
            return code
        model, candidate = plain(self.model), plain(release.candidate)
        if result == "promoted":
            self.out(f"promoted: {model} stable {plain(release.stable)}")
        elif result == "rolled_back":
            self.out(f"rolled back: {model} stable {plain(release.stable)} (candidate {candidate})")
        elif result == "timeout":
            where = f"rollout {plain(release.phase)}"
            if release.awaiting_approval:
                where += f", awaiting approval {describe_gate(release.awaiting_approval)}"
            click.echo(
                f"gateway: timed out after {waited:.0f} s waiting for {model} ({where}); the rollout goes on",
                err=True,
            )
        else:
            self.out(f"ended: {model} rollout {plain(release.phase or Phase.IDLE.value)} (not promoted)")
        return code

    def _emit(self, event: dict[str, Any]) -> None:
        self.out(json.dumps(event, allow_nan=False))


def _outcome(phase: str) -> tuple[str, int]:
    if phase == Phase.SUCCEEDED:
        return "promoted", EXIT_PROMOTED
    if phase == Phase.ROLLED_BACK:
        return "rolled_back", EXIT_ROLLED_BACK
    return "ended", EXIT_ROLLED_BACK  # e.g. reset to idle when its version went away


def _change_event(record: dict[str, Any]) -> dict[str, Any]:
    """An audit record (as `audit --json` shows it) as a flat `change` event."""
    after = record.get("after") or {}
    rollout = after.get("rollout") or {}
    return {
        "event": "change",
        "at": record["at"],
        "model": record["model"],
        "id": record["id"],
        "action": record["action"],
        "outcome": record["outcome"],
        "actor": record["actor"],
        "reason": record["reason"],
        "revision": record["revision"],
        "phase": rollout.get("phase"),
        "step": rollout.get("step"),
        "stable": after.get("stable"),
        "canary": after.get("canary") or None,
        "canary_weight_percent": after.get("canary_weight_percent"),
        "awaiting_approval": rollout.get("awaiting") or None,
        "checks": record.get("evidence") or [],
    }


def _now() -> str:
    return rfc3339(time.time()) or ""


def watch(
    client: ControlClient,
    model: str,
    *,
    release: rpb.Release | None = None,
    as_json: bool = False,
    poll_s: float = DEFAULT_POLL_S,
    timeout_s: float | None = None,
) -> int:
    """Follow `model`'s current (or last) rollout until it ends or `timeout_s` passes; the exit
    status. `release`: the answer of the StartRollout call that began it, if this command did."""
    if release is None:
        release = client.call(client.stub.GetRelease, rpb.GetReleaseRequest(model=model))
    if not release.rollout_started_at:
        raise CommandFailed(
            f"{model} has had no rollout to wait for: start one with `gateway rollout start {model} VERSION --wait`",
            EXIT_REFUSED,
        )
    return Watch(client, model, release.rollout_started_at, as_json, poll_s, timeout_s).run()
