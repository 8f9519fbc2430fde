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
import textwrap
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import click
from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from gateway.cli.rules_text import route_lines
from gateway.config.spec import describe_gate
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


def examples(*lines: str) -> str:
    """A click epilog: `Example:` or `Examples:` and the command lines, kept as written (\\b)."""
    title = "Example:" if len(lines) == 1 else "Examples:"
    return "\b\n" + title + "\n" + "\n".join(f"  {line}" for line in lines)


REASON_HELP = "Why: recorded in the audit log with your name."


def connection_options(func: F) -> F:
    """--control/--token/TLS flags on every client command; the client lands in `client`."""

    @click.option(
        "--control",
        "address",
        metavar="HOST:PORT",
        help="Control API. [env var: GATEWAY_CONTROL; default: 127.0.0.1:8003]",
    )
    @click.option("--token", help="Bearer token (a read or write token from --tokens-file). [env var: GATEWAY_TOKEN]")
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


# Phases in which a rollout sits at one of the policy's traffic steps.
_AT_A_STEP = frozenset({Phase.PROGRESSING, Phase.PAUSED, Phase.PROMOTING})


def shown_step(phase: str, step: int) -> int | None:
    """The step as the text shows it (1-based), or None when the rollout is at no step."""
    return step + 1 if phase in _AT_A_STEP else None


def _release_line(r: rpb.Release) -> str:
    parts = [f"[bold]{markup(r.model)}[/] stable {markup(r.stable)}"]
    if r.canary:
        parts.append(f"canary {markup(r.canary)} at {_pct(r.canary_weight_bp)}")
    if r.shadows:
        parts.append("shadows " + ", ".join(f"{markup(v)} ({f:.0%})" for v, f in sorted(r.shadows.items())))
    if r.phase and r.phase != Phase.IDLE:
        step = shown_step(r.phase, r.step)
        parts.append(f"rollout {markup(r.phase)}" + (f" step {step}" if step is not None else ""))
    if r.awaiting_approval:
        parts.append(f"awaiting approval {markup(describe_gate(r.awaiting_approval))}")
    parts.append(f"revision {r.revision}")
    # " · " rather than a wider separator: the line fits 80 columns for ordinary names.
    return " · ".join(parts)


def _num(value: float, fmt: str = "{:.3f}") -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt.format(value)


# Below this many columns the report turns on its side: one column per version, one row per
# figure. Eleven figures side by side need about 140 columns; versions are few (2-4), so the
# turned table fits 80 columns and a pipe (rich assumes 80 columns when not on a terminal).
WIDE_REPORT_COLUMNS = 140
UNITS_NOTE = "requests/rows: calls, and the rows they carried; labelled and compared: rows too"


def _figures(v: rpb.VersionReport) -> list[tuple[str, str]]:
    """One version's figures, labelled, in the order both layouts show them."""
    return [
        ("requests/rows", f"{v.requests}/{v.rows}"),
        ("errors", f"{v.error_rate:.2%}" if v.requests else "—"),
        ("p50 ms", _num(v.p50_ms)),
        ("p99 ms", _num(v.p99_ms)),
        ("accuracy", _num(v.accuracy, "{:.4f}")),
        ("95% CI", "—" if math.isnan(v.accuracy) else f"[{v.accuracy_low:.3f}, {v.accuracy_high:.3f}]"),
        ("labelled rows", str(v.labelled)),
        ("agreement", _num(v.agreement, "{:.4f}") if v.compared_rows else "—"),
        ("compared rows", str(v.compared_rows)),
        ("Δ latency ms", _num(v.latency_diff_ms, "{:+.3f}") if v.compared_rows else "—"),
    ]


def report_table(report: rpb.Report, width: int | None = None) -> RenderableType:
    """The release line over a table: a row per version on a wide terminal, else a column per
    version, in as many tables as it takes to fit (no figure is ever folded across lines).

    `width`: the columns to fit (default: the terminal's, or 80 when output is not a terminal)."""
    width = console.width if width is None else width
    rows = [(v, _figures(v)) for v in report.versions]
    labels = [label for label, _ in _figures(rpb.VersionReport())]
    tables: list[Table] = []
    if width >= WIDE_REPORT_COLUMNS:
        table = _report_grid()
        table.add_column("version")
        table.add_column("role")
        for label in labels:
            table.add_column(label, justify="right", overflow="fold")
        for v, figures in rows:
            table.add_row(markup(v.version), markup(v.role), *(value for _, value in figures))
        tables.append(table)
    else:
        for group in _fitting(rows, width - max(map(len, labels)) - 1):
            table = _report_grid()
            table.add_column("")
            for v, _ in group:
                table.add_column(f"{markup(v.version)}\n{markup(v.role)}", justify="right", no_wrap=True)
            for i, label in enumerate(labels):
                table.add_row(label, *(figures[i][1] for _, figures in group))
            tables.append(table)
    shadows = [
        f"shadow {markup(version)}: {c.mirrored} mirrored, {c.dropped} dropped, {c.failed} failed, "
        f"{c.timed_out} timed out" + (" (circuit open)" if c.circuit_open else "")
        for version, c in sorted(report.shadows.items())
    ]
    # Rule-routed traffic: a cohort, counted apart from the split's rows above (docs/routing.md).
    routed = [
        f"{markup(r.role)} -> {markup(r.version)}: {r.requests} requests, "
        + (f"{r.error_rate:.2%} errors" if r.requests else "no errors")
        + (f", accuracy {r.accuracy:.4f} on {r.labelled} labelled rows" if r.labelled else "")
        + " (not in the comparison)"
        for r in report.routed
    ]
    notes = [
        f"window {report.window_s:.0f} s · feedback joined {report.feedback_joined}, unknown {report.feedback_unknown}",
        *shadows,
        *routed,
        UNITS_NOTE,
    ]
    # Under the table rather than its caption: a caption is folded to the table's width.
    return Group(_release_line(report.release), *tables, *notes)


def _report_grid() -> Table:
    # No outer edge or edge padding: two columns more for figures in a narrow terminal.
    return Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)


def _fitting(
    rows: list[tuple[rpb.VersionReport, list[tuple[str, str]]]], width: int
) -> Iterator[list[tuple[rpb.VersionReport, list[tuple[str, str]]]]]:
    """Versions in runs whose columns (widest figure or name, padding and divider) fit `width`."""
    group: list[tuple[rpb.VersionReport, list[tuple[str, str]]]] = []
    used = 0
    for row in rows:
        v, figures = row
        # A space each side and the column divider before it.
        need = max(len(one_line(v.version)), len(one_line(v.role)), *(len(value) for _, value in figures)) + 3
        if group and used + need > width:
            yield group
            group, used = [], 0
        group.append(row)
        used += need
    if group:
        yield group


def rollout_view(trailers: dict[str, str | bytes]) -> dict[str, Any] | None:
    """The rollout view the gateway sends with GetRelease and GetReport during a rollout."""
    raw = trailers.get(ROLLOUT_METADATA_KEY)
    if not raw:
        return None
    view: dict[str, Any] = json.loads(raw)
    return view


def _figure(value: object) -> str:
    return f"{value:.3g}" if isinstance(value, int | float) and math.isfinite(value) else "—"


def check_phrase(c: dict[str, Any]) -> str:
    """A check as `name verdict estimate [low, high] vs bound`: what it saw against what it needs."""
    if c["check"] == "step_duration_s":
        return f"{_figure(c.get('value'))} s of {_figure(c.get('bound'))} s"
    if c.get("kind"):  # an external check ([[policy.checks]]): what it read against its bound, or why nothing
        return plain(c.get("reason", ""))
    return f"{_figure(c.get('value'))} [{_figure(c.get('low'))}, {_figure(c.get('high'))}] vs {_figure(c.get('bound'))}"


def _samples(c: dict[str, Any]) -> str:
    """Samples so far and, while it cannot decide, about how many more it needs."""
    if c["check"] == "step_duration_s" or c.get("kind"):
        return ""  # a duration, or an external check's single reading: no samples to count
    needed = c.get("needed")
    more = ""
    if c["verdict"] == "inconclusive":
        more = f", ~{needed} more" if needed is not None else ", more"
    return f", {c.get('samples', 0)} samples{more}"


def _waiting(view: dict[str, Any]) -> str:
    """The checks the next decision waits on, by verdict: `inconclusive: error_rate, accuracy`."""
    by_verdict: dict[str, list[str]] = {}
    for c in view.get("checks", []):
        if c["verdict"] != "pass":
            by_verdict.setdefault(plain(c["verdict"]), []).append(plain(c["check"]))
    return "; ".join(f"{verdict}: {', '.join(names)}" for verdict, names in by_verdict.items())


def wrap(line: str, width: int) -> list[str]:
    """`line` cut at spaces to `width` columns, later pieces indented under its first word."""
    indent = " " * (len(line) - len(line.lstrip()) + 2)
    return textwrap.wrap(line, width, subsequent_indent=indent, break_long_words=True, break_on_hyphens=False) or [""]


def rollout_lines(view: dict[str, Any]) -> list[str]:
    """A rollout view as plain lines: why it is in its phase (the last change's reason, one line
    per clause), what comes next and what it waits on, then every check: its verdict, estimate,
    interval and bound, samples so far and roughly how many more it needs."""
    lines = []
    gate = view.get("awaiting_approval")
    if gate:
        model = plain(view.get("model", "MODEL"))
        lines.append(
            f"  awaiting approval {plain(describe_gate(str(gate)))}: gateway rollout approve {model} --reason '...'"
        )
    last = view.get("last_change")
    if last:
        stamp = datetime.fromtimestamp(last["at"], UTC).strftime("%H:%M:%S")
        lines.append(f"  {plain(last['action'])} by {plain(last['actor'])} at {stamp} UTC:")
        # A dash before each clause: the reason names checks too, and a line that starts with a
        # check's name is that check's current state, below.
        lines += [f"    - {plain(clause)}" for clause in str(last["reason"]).split("; ") if clause]
    for key, label in (("next", "next"), ("if_resumed", "if resumed now")):
        if key in view:
            waiting = _waiting(view)
            lines.append(f"  {label}: {plain(view[key])}" + (f" ({waiting})" if waiting else ""))
    for c in view.get("checks", []):
        lines.append(f"  {plain(c['check']):<15} {plain(c['verdict']):<12} {check_phrase(c)}{_samples(c)}")
    return lines


def wrapped(lines: list[str], width: int) -> list[str]:
    return [piece for line in lines for piece in wrap(line, width)]


@click.command(epilog=examples("gateway status", "GATEWAY_CONTROL=10.0.0.5:8003 GATEWAY_TOKEN=... gateway status"))
@connection_options
def status(client: ControlClient) -> None:
    """Every model's release: stable, canary and weight, shadows, rollout phase; during a
    rollout, why it is where it is and which checks it waits for (with what they still need)."""
    answer = client.call(client.stub.ListReleases, rpb.ListReleasesRequest())
    for line in deployment_lines(answer.deployment):
        click.echo(line)
    for release in answer.releases:
        console.print(_release_line(release))
        for line in route_lines(release.routes):  # routing rules, tried before the split
            console.print(markup(line))
        if release.phase in ACTIVE:
            _, trailers = client.call_with_trailers(client.stub.GetRelease, rpb.GetReleaseRequest(model=release.model))
            view = rollout_view(trailers)
            # Cut at spaces to the terminal's width (80 in a pipe), each clause of a reason on
            # a line of its own, so a phrase a script greps for stays whole on one line.
            for line in wrapped(rollout_lines(view), console.width) if view else []:
                click.echo(line)


@click.group(epilog=examples("gateway traffic set digits --canary 2 --weight 10 --reason 'try v2'"))
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
@click.option("--reason", default="", help=REASON_HELP)
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


@click.group(epilog=examples("gateway shadow add digits 3 --fraction 0.5", "gateway shadow remove digits 3"))
def shadow() -> None:
    """Mirror copies of live traffic to a version; its answers are compared, never returned."""


@shadow.command("add", epilog=examples("gateway shadow add digits 3 --fraction 0.5 --reason 'compare v3 offline'"))
@click.argument("model")
@click.argument("version")
@click.option(
    "--fraction", type=click.FloatRange(0, 1), default=1.0, show_default=True, help="Share of requests mirrored."
)
@click.option("--reason", default="", help=REASON_HELP)
@connection_options
def shadow_add(client: ControlClient, model: str, version: str, fraction: float, reason: str) -> None:
    """Mirror FRACTION of MODEL's stable traffic to VERSION."""
    request = rpb.AddShadowRequest(model=model, version=version, fraction=fraction, reason=reason)
    console.print(_release_line(client.call(client.stub.AddShadow, request)))


@shadow.command("remove", epilog=examples("gateway shadow remove digits 3 --reason 'seen enough'"))
@click.argument("model")
@click.argument("version")
@click.option("--reason", default="", help=REASON_HELP)
@connection_options
def shadow_remove(client: ControlClient, model: str, version: str, reason: str) -> None:
    """Stop mirroring to VERSION."""
    request = rpb.RemoveShadowRequest(model=model, version=version, reason=reason)
    console.print(_release_line(client.call(client.stub.RemoveShadow, request)))


@click.group(
    epilog=examples(
        "gateway rollout start digits 2 --reason 'new MLP'",
        "gateway rollout start digits 2 --wait --timeout 1800   # a CI/CD step",
        "gateway rollout approve digits --reason 'dashboards look fine'",
        "gateway rollout pause digits",
        "gateway status",
    )
)
def rollout() -> None:
    """Automatic, evidence-based rollouts (the model's [policy] decides each step)."""


WAIT_CODES = (
    "\b\nExit status with --wait: 0 promoted, 1 rolled back (or refused), 5 --timeout ran out\n"
    "(the rollout goes on), 3 authentication, 4 gateway unreachable. A rollout awaiting\n"
    "approval keeps the command waiting."
)


def wait_options(func: F) -> F:
    """--timeout/--json/--poll of a command that follows a rollout to its end."""
    func = click.option(
        "--poll",
        "poll_s",
        type=click.FloatRange(0.05, 60),
        default=0.5,
        show_default=True,
        metavar="SECONDS",
        help="How often to look at the gateway.",
    )(func)
    func = click.option(
        "--json", "as_json", is_flag=True, help="One JSON event a line: change, assessment, result (docs/cli.md)."
    )(func)
    return click.option(
        "--timeout",
        "timeout_s",
        type=click.FloatRange(0, min_open=True),
        default=None,
        metavar="SECONDS",
        help="Give up waiting after this long: exit 5. [default: wait until the rollout ends]",
    )(func)


@rollout.command(
    "start",
    epilog=examples(
        "gateway rollout start digits 2 --reason 'new MLP'",
        'gateway rollout start digits 2 --reason "$CI_COMMIT_SHA" --wait --timeout 1800',
        "gateway rollout start digits 2 --wait --json | tee rollout.jsonl",
    )
    + "\n\n"
    + WAIT_CODES,
)
@click.argument("model")
@click.argument("candidate")
@click.option("--reason", default="", help=REASON_HELP)
@click.option("--wait", "wait", is_flag=True, help="Stay until the rollout is promoted or rolled back.")
@wait_options
@connection_options
def rollout_start(
    client: ControlClient,
    model: str,
    candidate: str,
    reason: str,
    wait: bool,
    timeout_s: float | None,
    as_json: bool,
    poll_s: float,
) -> None:
    """Start moving CANDIDATE through the policy's traffic steps; with --wait, follow it to its end."""
    if not wait and (timeout_s is not None or as_json):
        raise click.UsageError("--timeout and --json go with --wait (or use `gateway rollout wait`)")
    request = rpb.StartRolloutRequest(model=model, candidate=candidate, reason=reason)
    release = client.call(client.stub.StartRollout, request)
    if not wait:
        console.print(_release_line(release))
        return
    from gateway.cli.wait import watch

    if not as_json:
        console.print(_release_line(release))
    sys.exit(watch(client, model, release=release, as_json=as_json, poll_s=poll_s, timeout_s=timeout_s))


@rollout.command(
    "wait",
    epilog=examples(
        "gateway rollout wait digits",
        "gateway rollout wait digits --timeout 1800 --json",
    )
    + "\n\n"
    + WAIT_CODES.replace(" with --wait", ""),
)
@click.argument("model")
@wait_options
@connection_options
def rollout_wait(client: ControlClient, model: str, timeout_s: float | None, as_json: bool, poll_s: float) -> None:
    """Follow MODEL's rollout until it is promoted or rolled back, printing each change.

    A rollout that has ended already answers at once (its exit status and changes)."""
    from gateway.cli.wait import watch

    sys.exit(watch(client, model, as_json=as_json, poll_s=poll_s, timeout_s=timeout_s))


@rollout.command(
    "approve",
    epilog=examples("gateway rollout approve digits --reason 'checked the 25% dashboards with the on-call'"),
)
@click.argument("model")
@click.option("--reason", required=True, help="Why you approve: recorded in the audit log with your name.")
@connection_options
def rollout_approve(client: ControlClient, model: str, reason: str) -> None:
    """Let MODEL's rollout go past the approval gate it waits at (policy.approve_before).

    Its next move still needs every check to pass; a failing check still rolls it back."""
    request = rpb.ModelActionRequest(model=model, reason=reason)
    console.print(_release_line(client.call(client.stub.Approve, request)))


def _action(name: str, method: str, doc: str, example: str) -> click.Command:
    @click.argument("model")
    @click.option("--reason", default="", help=REASON_HELP)
    @connection_options
    def command(client: ControlClient, model: str, reason: str) -> None:
        request = rpb.ModelActionRequest(model=model, reason=reason)
        console.print(_release_line(client.call(getattr(client.stub, method), request)))

    command.__doc__ = doc
    return click.command(name, epilog=examples(example))(command)


rollout.add_command(
    _action(
        "pause",
        "Pause",
        "Hold the rollout where it is (no automatic steps).",
        "gateway rollout pause digits --reason 'look at the errors first'",
    )
)
rollout.add_command(
    _action(
        "resume", "Resume", "Let a paused rollout go on.", "gateway rollout resume digits --reason 'errors explained'"
    )
)
promote = _action(
    "promote",
    "Promote",
    "Make the canary (or the rollout's candidate) the stable version now.",
    "gateway promote digits --reason 'accuracy +1.2 points on 3,000 labelled rows'",
)
rollback = _action(
    "rollback",
    "Rollback",
    "Send all traffic back to stable and stop mirroring to the candidate.",
    "gateway rollback digits --reason 'p99 doubled'",
)


@click.command(
    epilog="\b\nExamples:\n  gateway report digits\n  gateway report digits --watch 2\n"
    "  gateway report digits --json | jq .versions\n  gateway report digits --plot rollout.png"
)
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (shape in docs/cli.md).")
@click.option(
    "--watch", type=float, default=None, metavar="SECONDS", help="Refresh every SECONDS until Ctrl-C. [default: once]"
)
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
        click.echo(json.dumps(report_json(*fetch()), indent=2, allow_nan=False))
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


def deployment_lines(d: rpb.Deployment) -> list[str]:
    """Where the state lives, who decides, whose evidence is merged (status and report)."""
    if not d.store:
        return []  # a gateway older than these fields
    if not d.store_reachable:
        return [
            f"store: {d.store} is UNREACHABLE: serving the last installed release; "
            "decisions and release changes wait for it"
        ]
    processes = f" ({d.processes} processes)" if d.processes != d.replicas else ""
    leader = d.leader or "none now (a controller takes the lease within a few seconds)"
    return [f"store: {d.store}", f"leader: {leader}; evidence merged from {d.replicas} replica(s){processes}"]


def _report_with_rollout(report: rpb.Report, view: dict[str, Any] | None) -> RenderableType:
    table = report_table(report)
    lines = deployment_lines(report.deployment)
    if view is not None:
        lines += wrapped(rollout_lines(view), console.width)
    return Group(table, *(markup(line) for line in lines)) if lines else table


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
    """One line per record, printed without markup: every server-sent string through `plain`.
    Each check of the evidence shows its verdict, estimate, interval and bound, e.g.
    `accuracy fail -0.0939 [-0.12, -0.07] vs -0.005`."""
    after = json.loads(r.after_json) if r.after_json else {}
    change = ""
    if after:
        change = f"stable {plain(after.get('stable'))}"
        if after.get("canary"):
            change += f", canary {plain(after['canary'])} {_pct(after.get('canary_weight_bp', 0))}"
        if after.get("rules"):
            change += f", {len(after['rules'])} routing rule{'s' if len(after['rules']) != 1 else ''}"
        phase = after.get("rollout", {}).get("phase", "")
        if phase and phase != Phase.IDLE:
            change += f", {plain(phase)}"
    checks = ""
    if r.evidence_json:
        checks = (
            "  ["
            + "; ".join(
                f"{plain(c['check'])} {plain(c['verdict'])} {check_phrase(c)}"
                + (f" (~{c['needed']} more)" if c.get("needed") is not None else "")
                for c in json.loads(r.evidence_json)
            )
            + "]"
        )
    stamp = datetime.fromtimestamp(r.at, UTC).strftime("%Y-%m-%d %H:%M:%S")
    outcome = "" if r.outcome == AuditOutcome.APPLIED else " REFUSED"
    who = f"{plain(r.model):<10} {plain(r.action):<14}{outcome} by {plain(r.actor)}"
    return f"{stamp}  #{r.id:<4} {who}: {plain(r.reason)}  → {change}{checks}"


# -- JSON output (report --json, audit --json); the shape is in docs/cli.md ---------------


def rfc3339(at: float) -> str | None:
    """A Unix time as RFC 3339 in UTC with milliseconds (2026-11-27T17:30:00.123Z); 0 means unset."""
    if not at:
        return None
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _finite(value: float) -> float | None:
    """NaN and infinities (no value yet, or unbounded) as JSON null."""
    return value if math.isfinite(value) else None


def _percent(bp: int) -> float:
    return bp / 100


def _state_json(state: dict[str, Any]) -> dict[str, Any]:
    """A stored release state (audit before/after) in the CLI's units: weight in percent, the
    step as the text numbers it, times in RFC 3339."""
    out = {k: v for k, v in state.items() if k != "canary_weight_bp"}
    if "canary_weight_bp" in state:
        out["canary_weight_percent"] = _percent(int(state["canary_weight_bp"]))
    rollout = state.get("rollout")
    if isinstance(rollout, dict):
        rollout = dict(rollout)
        rollout["step"] = shown_step(str(rollout.get("phase", "")), int(rollout.get("step", 0)))
        for key in ("started_at", "timed_from"):
            if isinstance(rollout.get(key), int | float):
                rollout[key] = rfc3339(rollout[key])
        out["rollout"] = rollout
    return out


def _check_json(c: dict[str, Any]) -> dict[str, Any]:
    return {k: (_finite(v) if isinstance(v, float) else v) for k, v in c.items()}


def release_json(r: rpb.Release) -> dict[str, Any]:
    return {
        "model": r.model,
        "stable": r.stable,
        "canary": r.canary or None,
        "canary_weight_percent": _percent(r.canary_weight_bp),
        "canary_compare_fraction": r.canary_compare_fraction,
        "shadows": dict(sorted(r.shadows.items())),
        "phase": r.phase or Phase.IDLE.value,
        "step": shown_step(r.phase, r.step),
        "revision": r.revision,
        "awaiting_approval": r.awaiting_approval or None,
        "routes": [
            {
                "name": route.name,
                "match": [
                    {"source": m.source, "key": m.key, "op": m.op, "values": list(m.values)} for m in route.match
                ],
                "to": route.to,
                "version": route.version or None,
            }
            for route in r.routes
        ],
    }


def _version_json(v: rpb.VersionReport) -> dict[str, Any]:
    return {
        "version": v.version,
        "role": v.role,
        "requests": v.requests,
        "rows": v.rows,
        "errors": v.errors,
        "error_rate": _finite(v.error_rate) if v.requests else None,
        "p50_ms": _finite(v.p50_ms) if v.requests else None,
        "p99_ms": _finite(v.p99_ms) if v.requests else None,
        "labelled_rows": v.labelled,
        "accuracy": _finite(v.accuracy),
        "accuracy_low": _finite(v.accuracy_low) if v.labelled else None,
        "accuracy_high": _finite(v.accuracy_high) if v.labelled else None,
        "mean_abs_error": _finite(v.mean_abs_error),
        "compared_rows": v.compared_rows,
        "agreement": _finite(v.agreement) if v.compared_rows else None,
        "within_tolerance": _finite(v.within_tolerance) if v.compared_rows else None,
        "max_abs_diff": _finite(v.max_abs_diff) if v.compared_rows else None,
        "mean_abs_diff": _finite(v.mean_abs_diff) if v.compared_rows else None,
        "relative_l2": _finite(v.relative_l2) if v.compared_rows else None,
        "latency_diff_ms": _finite(v.latency_diff_ms) if v.compared_rows else None,
    }


def rollout_json(view: dict[str, Any]) -> dict[str, Any]:
    """The rollout view with the step numbered as the text shows it and RFC 3339 times."""
    out = dict(view)
    out["step"] = shown_step(str(view.get("phase", "")), int(view.get("step", 0)))
    if isinstance(view.get("last_change"), dict):
        out["last_change"] = {**view["last_change"], "at": rfc3339(view["last_change"]["at"])}
    if "checks" in view:
        out["checks"] = [_check_json(c) for c in view["checks"]]
    return out


def report_json(report: rpb.Report, view: dict[str, Any] | None) -> dict[str, Any]:
    """`report --json`: counts as numbers, absent figures null, weights in percent."""
    return {
        "release": release_json(report.release),
        "window_s": report.window_s,
        "units": {
            "requests": "calls",
            "errors": "calls",
            "rows": "rows",
            "labelled_rows": "rows",
            "compared_rows": "rows",
        },
        "versions": [_version_json(v) for v in report.versions],
        "routed": [_version_json(v) for v in report.routed],
        "predictions_logged": report.predictions_logged,
        "feedback": {"joined": report.feedback_joined, "unknown": report.feedback_unknown},
        "shadows": {
            version: {
                "mirrored": c.mirrored,
                "completed": c.completed,
                "dropped": c.dropped,
                "failed": c.failed,
                "timed_out": c.timed_out,
                "pending": c.pending,
                "circuit_open": c.circuit_open,
                "circuit_opened": c.circuit_opened,
            }
            for version, c in sorted(report.shadows.items())
        },
        "rollout": rollout_json(view) if view is not None else None,
        "deployment": {
            "store": report.deployment.store,
            "store_reachable": report.deployment.store_reachable,
            "leader": report.deployment.leader or None,
            "replicas": report.deployment.replicas,
            "processes": report.deployment.processes,
        },
    }


def audit_json(r: rpb.AuditRecord) -> dict[str, Any]:
    """`audit --json`, one record: the before/after states and the evidence as nested JSON."""
    return {
        "id": r.id,
        "at": rfc3339(r.at),
        "model": r.model,
        "action": r.action,
        "outcome": r.outcome,
        "actor": r.actor,
        "reason": r.reason,
        "revision": r.revision,
        "before": _state_json(json.loads(r.before_json)) if r.before_json else None,
        "after": _state_json(json.loads(r.after_json)) if r.after_json else None,
        "evidence": [_check_json(c) for c in json.loads(r.evidence_json)] if r.evidence_json else None,
    }


@click.command(epilog="\b\nExamples:\n  gateway audit digits\n  gateway audit --since 2026-11-26T09:00 --json")
@click.argument("model", required=False, default="")
@click.option("--since", help="Records from this ISO time on (UTC unless it says otherwise). [default: the first]")
@click.option("--until", help="Records before this ISO time (UTC unless it says otherwise). [default: now]")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per record (shape in docs/cli.md).")
@connection_options
def audit(client: ControlClient, model: str, since: str | None, until: str | None, as_json: bool) -> None:
    """The audit log: every change and refusal, who asked, why, and the evidence."""
    for record in _audit_pages(client, model, _when(since), _when(until)):
        if as_json:
            click.echo(json.dumps(audit_json(record), allow_nan=False))
        else:
            # One record a line, never folded: a log that scripts grep and cut.
            console.print(describe_audit(record), markup=False, soft_wrap=True)


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


@click.group(epilog=examples("gateway feedback send digits labels.jsonl"))
def feedback() -> None:
    """Ground truth for earlier predictions, joined by request id."""


@feedback.command(
    "send",
    epilog='\b\nFILE formats:\n  labels.jsonl  {"request_id": "r1", "label": 7}\n'
    '                {"request_id": "r2", "labels": [7, 3]}   (one per row)\n  labels.csv    request_id,label\n'
    + examples("gateway feedback send digits labels.jsonl", "gateway feedback send digits labels.csv --batch 500"),
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
        # On a terminal each update overwrites the last; in a pipe or a file, one line each.
        progress_end = "\r" if console.is_terminal else "\n"
        console.print(f"sent {sum(totals.values())} labels ({totals['joined']} joined)", end=progress_end)
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


@click.group(epilog=examples("gateway models load digits", "gateway models unload digits"))
def models() -> None:
    """Load or unload models from the gateway's repository (by name only)."""


@models.command("load", epilog=examples("gateway models load digits --reason 'v4 copied in'"))
@click.argument("model")
@click.option("--reason", default="", help=REASON_HELP)
@connection_options
def models_load(client: ControlClient, model: str, reason: str) -> None:
    """Load MODEL (or reload it: the old versions serve until the new ones are warm)."""
    status = client.call(client.stub.LoadModel, rpb.ModelRequest(model=model, reason=reason))
    versions = ", ".join(markup(v) for v in status.versions)
    console.print(f"{markup(status.model)}: serving versions {versions}{_on_workers(status)}")


@models.command("unload", epilog=examples("gateway models unload digits --reason 'retired'"))
@click.argument("model")
@click.option("--reason", default="", help=REASON_HELP)
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
