"""`gateway demo`: a whole release cycle on the bundled digits models, in about a minute.

It starts a gateway on a copy of the digits model (with a quick demo policy),
sends labelled traffic from the held-out split with the labels arriving a
little later (as real ground truth does), and rolls out v2 (more accurate:
promoted step by step), then v3 (deliberately worse: rolled back). It reads as a
story: the policy in words first, then for each rollout what is being tried, a
line of evidence per decision as the controller makes it (each check's estimate
and interval against its bound), and why it ended as it did. The live report
shows each step; the audit trail is printed at the end.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import click
import grpc
import numpy as np
from rich.console import Console
from rich.live import Live

from gateway.cli.demo_notify import demo_config
from gateway.cli.demo_notify import describe as describe_notifications
from gateway.cli.demo_rule import show_rule
from gateway.cli.release import describe_audit, report_table
from gateway.config.spec import PolicySpec, load_model_spec
from gateway.protocol.pb import inference_pb2 as pb
from gateway.protocol.pb import inference_pb2_grpc as pb_grpc
from gateway.protocol.pb import release_pb2 as rpb
from gateway.protocol.pb import release_pb2_grpc as rgrpc
from gateway.release.policy import Phase
from gateway.server import launch
from gateway.server.launch import Launched

DEMO_POLICY = """
# Added by `gateway demo`: a quick policy so the demo finishes in about a minute.
[policy]
interval_s = 1.0
step_weights = [10, 25, 50]
threshold = 1
min_samples = 100
max_latency_ratio = 0
max_error_increase = 0.05
max_accuracy_drop = 0.02
alpha = 0.05
max_duration_s = 120
step_min_samples = 100
step_min_duration_s = 2
"""
ROWS = 16
LABEL_DELAY_S = 0.5
# What each rollout tries, told before it starts.
TRYING = {
    "2": "v2, an MLP more accurate than v1. If the evidence agrees, it climbs every step and is promoted.",
    "3": "v3, a linear model trained on corrupted labels: deliberately worse. The checks should catch it "
    "at the first step and roll it back, with only a small share of traffic ever on it.",
}
# Checks that pass while the estimate stays at or below the bound; the others need it at or above.
AT_MOST = ("error_rate", "latency_")
# Differences of two proportions (candidate - stable), told in percentage points.
IN_POINTS = ("error_rate", "accuracy", "accuracy_paired")


class LabelledTraffic(threading.Thread):
    """Sends requests of held-out rows; their labels follow LABEL_DELAY_S later."""

    def __init__(self, address: str, control: rgrpc.ReleaseServiceStub, models: Path) -> None:
        super().__init__(daemon=True)
        data = np.load(models / "digits" / "heldout.npz")
        self.x, self.y = data["X"], data["y"]
        self.infer = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(address))  # type: ignore[no-untyped-call]
        self.control = control
        self.stop = threading.Event()
        self.sent = 0
        self.errors = 0
        self._pending: deque[tuple[float, rpb.Feedback]] = deque()

    def run(self) -> None:
        rng = np.random.default_rng(0)
        while not self.stop.is_set():
            rows = rng.integers(0, len(self.x), ROWS)
            request = pb.ModelInferRequest(model_name="digits", id=f"demo-{self.sent}")
            request.inputs.add(name="pixels", datatype="FP32", shape=[ROWS, 64])
            request.raw_input_contents.append(self.x[rows].tobytes())
            try:
                self.infer.ModelInfer(request, timeout=5)
            except grpc.RpcError:
                self.errors += 1
                continue
            self._pending.append(
                (
                    time.monotonic() + LABEL_DELAY_S,
                    rpb.Feedback(request_id=request.id, labels=self.y[rows].astype(float).tolist()),
                )
            )
            self.sent += 1
            self._send_due_labels()
            time.sleep(0.002)

    def _send_due_labels(self) -> None:
        now = time.monotonic()
        due = []
        while self._pending and self._pending[0][0] <= now:
            due.append(self._pending.popleft()[1])
        if due:
            self.control.SubmitFeedback(rpb.SubmitFeedbackRequest(model="digits", items=due), timeout=5)


def _start_gateway(repo: Path, state: Path, config: Path) -> Launched:
    args = [
        "--config",
        str(config),
        "--models",
        str(repo),
        "--port",
        "0",
        "--control-port",
        "0",
        "--metrics-port",
        "-1",
        # The demo speaks gRPC only: no REST port, so 8000 being taken elsewhere cannot stop it.
        "--http-port",
        "-1",
        # The dashboard on a free port (its URL is printed): the rollouts can be watched in a browser.
        "--dashboard-port",
        "0",
        "--workers",
        "1",
        "--state-dir",
        str(state),
    ]
    try:
        return launch.serve(args)
    except RuntimeError as exc:
        raise click.ClickException(f"the demo gateway did not start: {exc}") from None


def describe_policy(policy: PolicySpec) -> list[str]:
    """The policy in words: steps, exposure, bounds, confidence and pace, a line each."""
    checks = []
    if policy.max_error_increase >= 0:
        checks.append(f"error rate at most {policy.max_error_increase * 100:g} points above the stable's")
    if policy.max_latency_ratio > 0:
        checks.append(f"p{policy.latency_quantile * 100:g} latency at most {policy.max_latency_ratio:g}x the stable's")
    if policy.max_accuracy_drop >= 0:
        checks.append(f"accuracy on labelled rows at most {policy.max_accuracy_drop * 100:g} points below")
    if policy.min_agreement > 0:
        checks.append(f"answers agree with the stable's on at least {policy.min_agreement:.0%} of rows")
    steps = " → ".join(f"{w:g} %" for w in policy.step_weights)
    failures = "one failed check rolls back" if policy.threshold == 1 else f"{policy.threshold} failed checks roll back"
    return [
        f"  steps       {steps} of the traffic to the candidate, then 100 % (promoted)",
        f"  each step   {policy.step_min_samples} candidate requests and {policy.step_min_duration_s:g} s of its own, "
        "and every check passing on the whole rollout's evidence",
        f"  bounds      {'; '.join(checks) or 'none (no checks enabled)'}",
        f"  confidence  {1 - policy.alpha:.0%} for all checks together (alpha {policy.alpha:g}); "
        f"no check decides before {policy.min_samples} samples an arm",
        f"  interval    the controller decides every {policy.interval_s:g} s; {failures}; "
        f"no decision in {policy.max_duration_s:g} s: {policy.on_timeout}",
    ]


def _bound_op(name: str) -> str:
    return "≤" if name.removeprefix("step_").startswith(AT_MOST) else "≥"


def _figures(check: dict[str, Any]) -> tuple[str, str]:
    """A check's estimate [interval] and its bound, in the check's own unit."""
    value, bound = check["value"], check["bound"]
    low = check["low"] if check.get("low") is not None else value
    high = check["high"] if check.get("high") is not None else value
    base = check["check"].removeprefix("step_")
    if base in IN_POINTS:
        return f"{value * 100:+.1f} [{low * 100:+.1f}, {high * 100:+.1f}] pts", f"{bound * 100:+g} pts"
    if base.startswith("latency_"):
        return f"{value:.2f}x [{low:.2f}, {high:.2f}]", f"{bound:g}x"
    return f"{value:.3g} [{low:.3g}, {high:.3g}]", f"{bound:g}"


def describe_check(check: dict[str, Any]) -> str:
    """One check of a decision's evidence: estimate [interval] against its bound, and its verdict."""
    name, verdict = check["check"], check["verdict"]
    if check.get("value") is None:
        return f"{name} {verdict} (no estimate yet)"
    if name == "step_requests":
        return f"{name} {check['value']:.0f} of {check['bound']:g}"
    if name == "step_duration_s":
        return f"{name} {check['value']:.1f} s of {check['bound']:g} s"
    estimate, bound = _figures(check)
    return f"{name} {estimate} {_bound_op(name)} {bound} {verdict}"


def _evidence(record: rpb.AuditRecord) -> list[dict[str, Any]]:
    return list(json.loads(record.evidence_json)) if record.evidence_json else []


def _weight(record: rpb.AuditRecord) -> str:
    after = json.loads(record.after_json) if record.after_json else {}
    if not after.get("canary"):
        return f"v{after.get('stable', '?')} stable" if record.action == "promote" else "0 %"
    return f"{after.get('canary_weight_bp', 0) / 100:g} %"


def describe_decision(record: rpb.AuditRecord, started: float, weight_before: str) -> tuple[str, str]:
    """A decision in two parts: what was decided with the controller's reason, and its evidence.

    The evidence shows the whole rollout's checks (what a step advances on) and the step's
    exposure; a check on the step's evidence alone only where it failed ("" if none)."""
    checks = _evidence(record)
    exposure = ("step_requests", "step_duration_s")
    shown = [c for c in checks if not c["check"].startswith("step_") or c["check"] in exposure]
    shown += [c for c in checks if c["check"].startswith("step_") and c not in shown and c["verdict"] == "fail"]
    head = f"  +{record.at - started:5.1f} s  {record.action} at {weight_before} → {_weight(record)}: {record.reason}"
    return head, "; ".join(describe_check(c) for c in shown)


def why_rolled_back(record: rpb.AuditRecord, weight: str) -> str:
    """The failing checks of a rollback, each with how its interval lies against the bound."""
    failed = [c for c in _evidence(record) if c["verdict"] == "fail" and c.get("value") is not None]
    if not failed:
        return f"why: {record.reason}"
    reasons = []
    for c in failed:
        estimate, bound = _figures(c)
        side = "above" if _bound_op(c["check"]) == "≤" else "below"
        reasons.append(f"{c['check']} failed: {estimate}, the whole interval {side} the bound {bound}")
    return f"why: at {weight} of the traffic, " + "; ".join(reasons)


def why_promoted(records: list[rpb.AuditRecord]) -> str:
    steps = sum(1 for r in records if r.action == "advance")
    return (
        f"why: every check passed on the whole rollout's evidence at each of its {steps} steps, "
        "and each step had its own requests and time"
    )


class Story:
    """The decisions of one rollout, told as the controller makes them (read from the audit log)."""

    def __init__(self, console: Console, control: rgrpc.ReleaseServiceStub, after_id: int) -> None:
        self.console, self.control, self.seen = console, control, after_id
        self.records: list[rpb.AuditRecord] = []
        self.started = time.time()
        self.weight = "0 %"
        self.evidence = ""  # the evidence last told, so a decision on the same evidence says "as above"

    def tell_new(self) -> None:
        answer = self.control.GetAuditLog(rpb.GetAuditLogRequest(model="digits", limit=1000), timeout=5)
        for record in answer.records:
            if record.id <= self.seen:
                continue
            self.seen = record.id
            self.records.append(record)
            if record.action == "start_rollout":
                self.started, self.weight = record.at, _weight(record)
                self.console.print(f"  +  0.0 s  start at {self.weight} of the traffic: {record.reason}", markup=False)
                continue
            head, evidence = describe_decision(record, self.started, self.weight)
            self.console.print(head, markup=False)
            if evidence:
                # A promotion follows the last step's decision on the same evidence: not told twice.
                same = evidence == self.evidence
                self.console.print(f"            evidence: {'as above' if same else evidence}", markup=False)
                self.evidence = evidence
            self.weight = _weight(record)


def _watch(console: Console, story: Story, done: Phase, timeout: float) -> rpb.Release:
    deadline = time.monotonic() + timeout
    with Live(console=console, refresh_per_second=4) as live:
        while time.monotonic() < deadline:
            report = story.control.GetReport(rpb.GetReportRequest(model="digits"), timeout=5)
            story.tell_new()
            live.update(report_table(report))
            if report.release.phase == done:
                release: rpb.Release = report.release
                story.tell_new()  # the final decision, if it landed after the line above
                break
            time.sleep(0.5)
        else:
            raise click.ClickException(f"the rollout did not reach {done} in {timeout:.0f} s")
    console.line()  # a plain newline after the live table, also when output is not a terminal
    return release


def _last_id(control: rgrpc.ReleaseServiceStub) -> int:
    records = control.GetAuditLog(rpb.GetAuditLogRequest(model="digits", limit=1000), timeout=5).records
    return max((r.id for r in records), default=0)


@click.command()
@click.option(
    "--models",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=Path("models"),
    show_default=True,
    help="Repository holding the bundled digits model.",
)
@click.option(
    "--keep-files",
    is_flag=True,
    help="Keep the demo's work folder (its model copy, state store and audit) instead of removing it at the end.",
)
def demo(models: Path, keep_files: bool) -> None:
    """Roll out digits v2 (promoted step by step) and v3 (rolled back) under labelled live traffic."""
    console = Console(highlight=False)
    workdir = Path(tempfile.mkdtemp(prefix="gateway-demo-"))
    repo = workdir / "models"
    shutil.copytree(models / "digits", repo / "digits")
    spec = repo / "digits" / "model.toml"
    spec.write_text(spec.read_text() + DEMO_POLICY)
    # Told from the file the gateway reads, so the words cannot drift from what it does.
    policy = load_model_spec(spec).policy
    console.print("gateway demo: a release cycle of the digits model, under live labelled traffic", markup=False)
    console.print(f"the policy ([policy] added to a copy of {models / 'digits' / 'model.toml'}):", markup=False)
    for line in describe_policy(policy):
        console.print(line, markup=False)
    console.print(f"starting a gateway on a copy of {models / 'digits'} (state in {workdir / 'state'}) ...")
    config, receiver = demo_config(workdir)  # [[notify]]: a local webhook receiver
    launched = _start_gateway(repo, workdir / "state", config)
    proc, address, control_address = launched.proc, launched.address, launched.control
    control = rgrpc.ReleaseServiceStub(grpc.insecure_channel(control_address))  # type: ignore[no-untyped-call]
    traffic = LabelledTraffic(address, control, models)
    try:
        console.print(f"gateway on {address}, control API on {control_address}")
        console.print(f"watch it live in a browser: {launched.dashboard}")
        console.print(
            f"sending labelled traffic: {ROWS} held-out rows a request, each request's labels "
            f"{LABEL_DELAY_S:g} s later (as ground truth arrives late)"
        )
        traffic.start()
        console.rule("rollout of digits v2 (an MLP, more accurate than v1)")
        console.print(f"trying: {TRYING['2']}", markup=False)
        story = Story(console, control, _last_id(control))
        control.StartRollout(rpb.StartRolloutRequest(model="digits", candidate="2", reason="demo: new MLP"))
        release = _watch(console, story, Phase.SUCCEEDED, 120)
        console.print(f"[green]v2 promoted[/]: stable is now {release.stable}")
        console.print(why_promoted(story.records), markup=False)
        console.rule("rollout of digits v3 (trained on corrupted labels)")
        console.print(f"trying: {TRYING['3']}", markup=False)
        story = Story(console, control, story.seen)
        control.StartRollout(rpb.StartRolloutRequest(model="digits", candidate="3", reason="demo: suspicious model"))
        release = _watch(console, story, Phase.ROLLED_BACK, 120)
        console.print(f"[red]v3 rolled back[/]: stable stays {release.stable}, no traffic on v3")
        rollback = next((r for r in reversed(story.records) if r.action == "rollback"), None)
        if rollback is not None:
            before = [r for r in story.records if r.id < rollback.id]
            console.print(why_rolled_back(rollback, _weight(before[-1]) if before else "?"), markup=False)
        show_rule(console, control, address, traffic.x)
        console.rule("notifications")
        deadline = time.monotonic() + 5  # deliveries run beside the decisions: the last may be on its way
        while len(receiver.received()) < 4 and time.monotonic() < deadline:
            time.sleep(0.1)
        console.print(f"a local webhook receiver ([[notify]] in {config}) got, signed with its key:", markup=False)
        for line in describe_notifications(receiver.received()):
            console.print(line, markup=False)
        console.rule("audit trail")
        for record in control.GetAuditLog(rpb.GetAuditLogRequest(model="digits", limit=1000)).records:
            console.print(describe_audit(record), markup=False)
        kept = f"work files kept in {workdir}" if keep_files else "work files removed (--keep-files keeps them)"
        console.print(f"{traffic.sent} requests sent ({traffic.errors} errors); {kept}")
    finally:
        traffic.stop.set()
        proc.terminate()
        proc.wait(20)
        receiver.stop()
        if not keep_files:
            # Every run made a new folder under the temporary directory; nothing else uses it.
            shutil.rmtree(workdir, ignore_errors=True)
