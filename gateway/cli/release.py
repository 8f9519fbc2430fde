"""The release engineer's commands: status, traffic, shadows, rollouts, reports, audit, feedback, models.

They talk only to the control API (never to the data plane) and print one
line per error, with exit codes from gateway.control.client.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import re
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import click
from google.protobuf.json_format import MessageToDict  # type: ignore[import-untyped]
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from gateway.control.client import EXIT_REFUSED, CommandFailed, ControlClient
from gateway.logthrottle import one_line
from gateway.protocol.pb import release_pb2 as rpb
from gateway.release.assessment import ROLLOUT_METADATA_KEY
from gateway.release.policy import ACTIVE, Phase
from gateway.release.store import AuditOutcome

F = TypeVar("F", bound=Callable[..., Any])
console = Console(highlight=False)


# Every string the gateway sends back may have been chosen by one of its clients
# (reasons, actors, request ids, and values echoed in error messages) or come from
# its repository (model and version names). Printed raw, a line break forges an
# output line and an escape sequence reaches the operator's terminal, so each one
# goes through `plain` (one line, every non-printable character escaped) and,
# where rich reads markup, `markup` (its brackets too).
def plain(text: object) -> str:
    return one_line(text)


def markup(text: object) -> str:
    """`text` on one line, for rich markup: shown as it is, never read as markup.

    rich.markup.escape escapes a `[` that opens something tag-like; rich also turns
    every other backslash-bracket into a bare `[`, so a name such as a backslash
    followed by `[` lost its backslash. Each such `[` gets one backslash to lose."""
    return _PLAIN_BRACKET.sub(r"\\[", escape(one_line(text)))


# A `[` that rich does not read as the start of a tag (its RE_TAGS pattern).
_PLAIN_BRACKET = re.compile(r"\[(?![a-z#/@][^[]*?\])")


def connection_options(func: F) -> F:
    """--control/--token/TLS flags on every client command; the client lands in `client`."""

    @click.option(
        "--control", "address", metavar="HOST:PORT", help="Control API. [env GATEWAY_CONTROL; 127.0.0.1:8003]"
    )
    @click.option("--token", help="Bearer token. [env GATEWAY_TOKEN]")
    @click.option("--tls-ca", type=click.Path(exists=True, path_type=Path), help="CA that signed the server (TLS).")
    @click.option("--tls-cert", type=click.Path(exists=True, path_type=Path), help="Client certificate (mutual TLS).")
    @click.option("--tls-key", type=click.Path(exists=True, path_type=Path), help="Client key (mutual TLS).")
    @functools.wraps(func)
    def wrapper(
        address: str | None,
        token: str | None,
        tls_ca: Path | None,
        tls_cert: Path | None,
        tls_key: Path | None,
        **kwargs: Any,
    ) -> Any:
        client = ControlClient.from_env(address, token, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key)
        try:
            return func(client=client, **kwargs)
        except CommandFailed as exc:
            click.echo(f"gateway: {plain(exc)}", err=True)
            sys.exit(exc.code)
        finally:
            client.close()

    return wrapper  # type: ignore[return-value]


def _pct(bp: int) -> str:
    return f"{bp / 100:g}%"


def _release_line(r: rpb.Release) -> str:
    parts = [f"[bold]{markup(r.model)}[/]  stable {markup(r.stable)}"]
    if r.canary:
        parts.append(f"canary {markup(r.canary)} at {_pct(r.canary_weight_bp)}")
    if r.shadows:
        parts.append("shadows " + ", ".join(f"{markup(v)} ({f:.0%})" for v, f in sorted(r.shadows.items())))
    if r.phase and r.phase != Phase.IDLE:
        parts.append(f"rollout {markup(r.phase)}" + (f" step {r.step + 1}" if r.phase == Phase.PROGRESSING else ""))
    parts.append(f"revision {r.revision}")
    return "  ·  ".join(parts)


def _num(value: float, fmt: str = "{:.3f}") -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt.format(value)


def report_table(report: rpb.Report) -> Table:
    table = Table(title=_release_line(report.release), title_justify="left")
    for column in (
        "version",
        "role",
        "requests",
        "errors",
        "p50 ms",
        "p99 ms",
        "accuracy [95% CI]",
        "labelled",
        "agreement",
        "compared",
        "Δ latency ms",
    ):
        table.add_column(column, justify="left" if column in ("version", "role") else "right", overflow="fold")
    for v in report.versions:
        accuracy = "—" if math.isnan(v.accuracy) else f"{v.accuracy:.4f} [{v.accuracy_low:.3f}, {v.accuracy_high:.3f}]"
        table.add_row(
            markup(v.version),
            markup(v.role),
            str(v.requests),
            f"{v.error_rate:.2%}" if v.requests else "—",
            _num(v.p50_ms),
            _num(v.p99_ms),
            accuracy,
            str(v.labelled),
            _num(v.agreement, "{:.4f}") if v.compared_rows else "—",
            str(v.compared_rows),
            _num(v.latency_diff_ms, "{:+.3f}") if v.compared_rows else "—",
        )
    shadows = ", ".join(
        f"{markup(version)}: {c.mirrored} mirrored, {c.dropped} dropped, {c.failed} failed, {c.timed_out} timed out"
        + (" (circuit open)" if c.circuit_open else "")
        for version, c in sorted(report.shadows.items())
    )
    table.caption = (
        f"window {report.window_s:.0f} s · feedback joined {report.feedback_joined}, unknown "
        f"{report.feedback_unknown}" + (f" · shadows {shadows}" if shadows else "")
    )
    return table


def rollout_view(trailers: dict[str, str | bytes]) -> dict[str, Any] | None:
    """The rollout view the gateway sends with GetRelease and GetReport during a rollout."""
    raw = trailers.get(ROLLOUT_METADATA_KEY)
    if not raw:
        return None
    view: dict[str, Any] = json.loads(raw)
    return view


def _figure(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, int | float) else "—"


def rollout_lines(view: dict[str, Any]) -> list[str]:
    """A rollout view as plain lines: why it is in its phase, what comes next, and each check
    that is not passing (estimate, interval, bound, samples and roughly how many more it needs)."""
    lines = []
    last = view.get("last_change")
    if last:
        stamp = datetime.fromtimestamp(last["at"], UTC).strftime("%H:%M:%S")
        lines.append(f"  {plain(last['action'])} by {plain(last['actor'])} at {stamp} UTC: {plain(last['reason'])}")
    for key, label in (("next", "next"), ("if_resumed", "if resumed now")):
        if key in view:
            lines.append(f"  {label}: {plain(view[key])} ({plain(view.get('reason', ''))})")
    for c in view.get("checks", []):
        if c["verdict"] == "pass":
            continue
        if c["check"] == "step_duration_s":
            lasted = f"{_figure(c.get('value'))} s of {c['bound']:g} s"
            lines.append(f"    {'step_duration_s':<18} {plain(c['verdict']):<12} {lasted}")
            continue
        needed = c.get("needed")
        more = "" if c["verdict"] != "inconclusive" else f", ~{needed} more" if needed is not None else ", more"
        lines.append(
            f"    {plain(c['check']):<18} {plain(c['verdict']):<12} {_figure(c.get('value'))} "
            f"[{_figure(c.get('low'))}, {_figure(c.get('high'))}] vs {_figure(c.get('bound'))}, "
            f"{c.get('samples', 0)} samples{more}"
        )
    return lines


@click.command()
@connection_options
def status(client: ControlClient) -> None:
    """Every model's release: stable, canary and weight, shadows, rollout phase; during a
    rollout, why it is where it is and which checks it waits for (with what they still need)."""
    releases = client.call(client.stub.ListReleases, rpb.ListReleasesRequest()).releases
    for release in releases:
        console.print(_release_line(release))
        if release.phase in ACTIVE:
            _, trailers = client.call_with_trailers(client.stub.GetRelease, rpb.GetReleaseRequest(model=release.model))
            view = rollout_view(trailers)
            for line in rollout_lines(view) if view else []:
                click.echo(line)  # one line each, never wrapped: scripts grep these


@click.group()
def traffic() -> None:
    """Split live traffic between the stable version and a canary."""


@traffic.command(
    "set",
    epilog="\b\nExamples:\n  gateway traffic set digits --canary 2 --weight 10\n"
    "  gateway traffic set digits --weight 0      # everything back to stable",
)
@click.argument("model")
@click.option("--canary", default=None, help="Canary version. [default: the current canary]")
@click.option("--weight", type=click.FloatRange(0, 100), required=True, help="Percent of traffic on the canary.")
@click.option("--reason", default="", help="Recorded in the audit log.")
@connection_options
def traffic_set(client: ControlClient, model: str, canary: str | None, weight: float, reason: str) -> None:
    """Send WEIGHT percent of MODEL's traffic (sticky by routing key) to the canary."""
    if canary is None:
        canary = client.call(client.stub.GetRelease, rpb.GetReleaseRequest(model=model)).canary
        if not canary and weight > 0:
            raise CommandFailed(f"{model} has no canary: pass --canary VERSION", EXIT_REFUSED)
    release = client.call(
        client.stub.SetTraffic,
        rpb.SetTrafficRequest(
            model=model, canary=canary if weight > 0 else "", weight_bp=round(weight * 100), reason=reason
        ),
    )
    console.print(_release_line(release))


@click.group()
def shadow() -> None:
    """Mirror copies of live traffic to a version; its answers are compared, never returned."""


@shadow.command("add")
@click.argument("model")
@click.argument("version")
@click.option("--fraction", type=click.FloatRange(0, 1), default=1.0, show_default=True, help="Share mirrored.")
@click.option("--reason", default="")
@connection_options
def shadow_add(client: ControlClient, model: str, version: str, fraction: float, reason: str) -> None:
    """Mirror FRACTION of MODEL's stable traffic to VERSION."""
    request = rpb.AddShadowRequest(model=model, version=version, fraction=fraction, reason=reason)
    console.print(_release_line(client.call(client.stub.AddShadow, request)))


@shadow.command("remove")
@click.argument("model")
@click.argument("version")
@click.option("--reason", default="")
@connection_options
def shadow_remove(client: ControlClient, model: str, version: str, reason: str) -> None:
    """Stop mirroring to VERSION."""
    request = rpb.RemoveShadowRequest(model=model, version=version, reason=reason)
    console.print(_release_line(client.call(client.stub.RemoveShadow, request)))


@click.group()
def rollout() -> None:
    """Automatic, evidence-based rollouts (the model's [policy] decides each step)."""


@rollout.command("start", epilog="\b\nExample:\n  gateway rollout start digits 2 --reason 'new MLP'")
@click.argument("model")
@click.argument("candidate")
@click.option("--reason", default="")
@connection_options
def rollout_start(client: ControlClient, model: str, candidate: str, reason: str) -> None:
    """Start moving CANDIDATE through the policy's traffic steps."""
    request = rpb.StartRolloutRequest(model=model, candidate=candidate, reason=reason)
    console.print(_release_line(client.call(client.stub.StartRollout, request)))


def _action(name: str, method: str, doc: str) -> click.Command:
    @click.argument("model")
    @click.option("--reason", default="", help="Recorded in the audit log.")
    @connection_options
    def command(client: ControlClient, model: str, reason: str) -> None:
        request = rpb.ModelActionRequest(model=model, reason=reason)
        console.print(_release_line(client.call(getattr(client.stub, method), request)))

    command.__doc__ = doc
    return click.command(name)(command)


rollout.add_command(_action("pause", "Pause", "Hold the rollout where it is (no automatic steps)."))
rollout.add_command(_action("resume", "Resume", "Let a paused rollout go on."))
promote = _action("promote", "Promote", "Make the canary (or the rollout's candidate) the stable version now.")
rollback = _action("rollback", "Rollback", "Send all traffic back to stable and stop mirroring to the candidate.")


@click.command(
    epilog="\b\nExamples:\n  gateway report digits\n  gateway report digits --watch 2\n"
    "  gateway report digits --json | jq .versions\n  gateway report digits --plot rollout.png"
)
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--watch", type=float, default=None, metavar="SECONDS", help="Refresh every SECONDS until Ctrl-C.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), help="Write the rollout over time as PNG.")
@connection_options
def report(client: ControlClient, model: str, as_json: bool, watch: float | None, plot: Path | None) -> None:
    """Per version: latency, errors, accuracy with CI, agreement with stable, samples, phase."""
    request = rpb.GetReportRequest(model=model)

    def fetch() -> tuple[rpb.Report, dict[str, Any] | None]:
        answer, trailers = client.call_with_trailers(client.stub.GetReport, request)
        return answer, rollout_view(trailers)

    if plot is not None:
        from gateway.cli.plot import plot_rollout

        records = list(_audit_pages(client, model, 0.0, 0.0))
        plot_rollout(model, records, fetch()[0], plot)
        console.print(f"wrote {markup(plot)}")
        return
    if as_json:
        answer, view = fetch()
        data = MessageToDict(answer, always_print_fields_with_no_presence=True)
        if view is not None:
            data["rollout"] = view
        click.echo(json.dumps(data, indent=2))
        return
    if watch is None:
        console.print(_report_with_rollout(*fetch()))
        return
    try:
        with Live(_report_with_rollout(*fetch()), console=console, refresh_per_second=4) as live:
            while True:
                time.sleep(watch)
                live.update(_report_with_rollout(*fetch()))
    except KeyboardInterrupt:
        pass


def _report_with_rollout(report: rpb.Report, view: dict[str, Any] | None) -> Table:
    table = report_table(report)
    if view is not None:
        table.caption = "\n".join([str(table.caption), *(markup(line) for line in rollout_lines(view))])
        table.caption_justify = "left"
    return table


def _audit_pages(client: ControlClient, model: str, since: float, until: float) -> Iterator[rpb.AuditRecord]:
    offset = 0
    while True:
        page = client.call(
            client.stub.GetAuditLog,
            rpb.GetAuditLogRequest(model=model, since=since, until=until, limit=500, offset=offset),
        )
        yield from page.records
        if not page.next_offset:
            return
        offset = page.next_offset


def _when(text: str | None) -> float:
    if not text:
        return 0.0
    try:
        return datetime.fromisoformat(text).replace(tzinfo=datetime.fromisoformat(text).tzinfo or UTC).timestamp()
    except ValueError:
        raise click.BadParameter(f"{text!r} is not an ISO time (e.g. 2026-11-26T18:00)") from None


def describe_audit(r: rpb.AuditRecord) -> str:
    """One line per record, printed without markup: every server-sent string through `plain`."""
    after = json.loads(r.after_json) if r.after_json else {}
    change = ""
    if after:
        change = f"stable {plain(after.get('stable'))}"
        if after.get("canary"):
            change += f", canary {plain(after['canary'])} {_pct(after.get('canary_weight_bp', 0))}"
        phase = after.get("rollout", {}).get("phase", "")
        if phase and phase != Phase.IDLE:
            change += f", {plain(phase)}"
    checks = ""
    if r.evidence_json:
        checks = (
            "  ["
            + "; ".join(
                f"{plain(c['check'])} {plain(c['verdict'])}"
                + (f" {c['value']:.4g}" if c.get("value") is not None else "")
                + (f" (~{c['needed']} more)" if c.get("needed") is not None else "")
                for c in json.loads(r.evidence_json)
            )
            + "]"
        )
    stamp = datetime.fromtimestamp(r.at, UTC).strftime("%Y-%m-%d %H:%M:%S")
    outcome = "" if r.outcome == AuditOutcome.APPLIED else " REFUSED"
    who = f"{plain(r.model):<10} {plain(r.action):<14}{outcome} by {plain(r.actor)}"
    return f"{stamp}  #{r.id:<4} {who}: {plain(r.reason)}  → {change}{checks}"


@click.command(epilog="\b\nExamples:\n  gateway audit digits\n  gateway audit --since 2026-11-26T09:00 --json")
@click.argument("model", required=False, default="")
@click.option("--since", help="ISO time (UTC unless it says otherwise).")
@click.option("--until", help="ISO time.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per record.")
@connection_options
def audit(client: ControlClient, model: str, since: str | None, until: str | None, as_json: bool) -> None:
    """The audit log: every change and refusal, who asked, why, and the evidence."""
    for record in _audit_pages(client, model, _when(since), _when(until)):
        if as_json:
            click.echo(json.dumps(MessageToDict(record, always_print_fields_with_no_presence=True)))
        else:
            console.print(describe_audit(record), markup=False)


# A SubmitFeedback message stays under this many bytes: the control API takes messages
# up to gRPC's default 4 MiB, and a file must never fail partway on an oversized batch.
FEEDBACK_BATCH_BYTES = 3 << 20
# Label sets per call: the server's cap (gateway.release.feedback.MAX_FEEDBACK_ITEMS).
FEEDBACK_BATCH_ITEMS = 10_000


def _number(value: object, where: str) -> float:
    """A label: a JSON number, or a string holding one (as CSV exports often write them)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise click.BadParameter(f"{where}: a label must be a number, got {json.dumps(value)[:40]}")
    try:
        number = float(value)
    except ValueError:
        raise click.BadParameter(f"{where}: a label must be a number, got {json.dumps(value)[:40]}") from None
    if not math.isfinite(number):
        raise click.BadParameter(f"{where}: a label must be a finite number, got {value!r}")
    return number


def _json_item(line: str, where: str) -> tuple[str, list[float]]:
    try:
        item = json.loads(line)
    except ValueError as exc:
        raise click.BadParameter(f"{where}: not JSON ({exc})") from None
    if not isinstance(item, dict) or "request_id" not in item or not ("label" in item or "labels" in item):
        raise click.BadParameter(f'{where}: expected {{"request_id": ..., "label": 7}} or "labels": [7, 3]')
    request_id = str(item["request_id"])
    if not request_id:
        raise click.BadParameter(f"{where}: request_id is empty")
    if "labels" in item:
        labels = item["labels"]
        if not isinstance(labels, list) or not labels:
            # A string is iterable: "12" would otherwise become the labels 1 and 2.
            raise click.BadParameter(
                f'{where}: "labels" must be a non-empty JSON array, one number per row, e.g. [1, 2]; '
                f'got {json.dumps(labels)[:40]} (for one label write "label": 12)'
            )
        return request_id, [_number(v, where) for v in labels]
    return request_id, [_number(item["label"], where)]


def read_feedback(path: Path) -> Iterator[tuple[str, list[float]]]:
    """JSON lines ({"request_id", "label" or "labels"}) or CSV (request_id,label[,label...])."""
    with path.open() as handle:
        if path.suffix == ".csv":
            for n, row in enumerate(csv.reader(handle), 1):
                if not row or (n == 1 and row[0] == "request_id"):
                    continue
                if not row[0] or len(row) < 2:
                    raise click.BadParameter(f"{path}:{n}: expected request_id,label[,label...]")
                yield row[0], [_number(v, f"{path}:{n}") for v in row[1:]]
            return
        for n, line in enumerate(handle, 1):
            if line.strip():
                yield _json_item(line, f"{path}:{n}")


def feedback_batches(
    items: list[rpb.Feedback], max_items: int, max_bytes: int = FEEDBACK_BATCH_BYTES
) -> Iterator[list[rpb.Feedback]]:
    """Consecutive batches of at most `max_items` label sets and `max_bytes` encoded."""
    batch: list[rpb.Feedback] = []
    size = 0
    for item in items:
        cost = item.ByteSize() + 8  # the field's tag and length prefix
        if batch and (len(batch) >= max_items or size + cost > max_bytes):
            yield batch
            batch, size = [], 0
        batch.append(item)
        size += cost
    if batch:
        yield batch


@click.group()
def feedback() -> None:
    """Ground truth for earlier predictions, joined by request id."""


@feedback.command(
    "send",
    epilog='\b\nFILE formats:\n  labels.jsonl  {"request_id": "r1", "label": 7}\n'
    '                {"request_id": "r2", "labels": [7, 3]}   (one per row)\n  labels.csv    request_id,label',
)
@click.argument("model")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--batch",
    type=click.IntRange(1, FEEDBACK_BATCH_ITEMS),
    default=2000,
    show_default=True,
    help="Label sets per call (fewer when they would pass 3 MiB).",
)
@connection_options
def feedback_send(client: ControlClient, model: str, file: Path, batch: int) -> None:
    """Send labels from FILE for MODEL's predictions.

    The whole file is read and checked first: a mistake on any line sends nothing.
    Exit status 1 when the gateway rejected labels (they do not fit their prediction).
    """
    items: list[rpb.Feedback] = []
    for request_id, labels in read_feedback(file):
        item = rpb.Feedback(request_id=request_id, labels=labels)
        if item.ByteSize() + 64 > FEEDBACK_BATCH_BYTES:
            raise click.BadParameter(
                f"{file}: the labels for request {request_id[:80]!r} take {item.ByteSize()} bytes, over the "
                f"{FEEDBACK_BATCH_BYTES} a message may carry"
            )
        items.append(item)
    totals = dict.fromkeys(("joined", "already_labelled", "unknown", "pending", "rejected"), 0)
    errors: list[str] = []
    for part in feedback_batches(items, batch):
        reply = client.call(client.stub.SubmitFeedback, rpb.SubmitFeedbackRequest(model=model, items=part))
        for name in totals:
            totals[name] += getattr(reply, name)
        errors += list(reply.errors)
        console.print(f"sent {sum(totals.values())} labels ({totals['joined']} joined)", end="\r")
    summary = (
        f"sent {sum(totals.values())} labels: {totals['joined']} joined, {totals['unknown']} unknown or expired, "
        f"{totals['already_labelled']} already labelled"
    )
    if totals["pending"]:
        summary += f", {totals['pending']} pending (other workers still joining them)"
    if totals["rejected"]:
        summary += f", {totals['rejected']} rejected"
    console.print(summary)
    if totals["rejected"]:
        for error in errors[:10]:
            click.echo(f"gateway: rejected: {plain(error)}", err=True)
        sys.exit(EXIT_REFUSED)


@click.group()
def models() -> None:
    """Load or unload models from the gateway's repository (by name only)."""


@models.command("load")
@click.argument("model")
@click.option("--reason", default="")
@connection_options
def models_load(client: ControlClient, model: str, reason: str) -> None:
    """Load MODEL (or reload it: the old versions serve until the new ones are warm)."""
    status = client.call(client.stub.LoadModel, rpb.ModelRequest(model=model, reason=reason))
    versions = ", ".join(markup(v) for v in status.versions)
    console.print(f"{markup(status.model)}: serving versions {versions}{_on_workers(status)}")


@models.command("unload")
@click.argument("model")
@click.option("--reason", default="")
@connection_options
def models_unload(client: ControlClient, model: str, reason: str) -> None:
    """Stop serving MODEL (requests in flight are answered)."""
    status = client.call(client.stub.UnloadModel, rpb.ModelRequest(model=model, reason=reason))
    console.print(f"{markup(model)}: unloaded{_on_workers(status)}")


def _on_workers(status: rpb.ModelStatus) -> str:
    """How many worker processes applied a load/unload (a partial one is an error, not this)."""
    if status.workers <= 0:
        return ""  # an older gateway: it does not say
    notes = f"; {markup(status.notes)}" if status.notes else ""
    return f" on {status.workers_applied} of {status.workers} worker{'s' if status.workers != 1 else ''}{notes}"


COMMANDS = [status, traffic, shadow, rollout, promote, rollback, report, audit, feedback, models]
