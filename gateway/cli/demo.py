"""`gateway demo`: a whole release cycle on the bundled digits models, in about a minute.

It starts a gateway on a copy of the digits model (with a quick demo policy),
sends labelled traffic from the held-out split with the labels arriving a
little later (as real ground truth does), and rolls out v2 (more accurate:
promoted step by step), then v3 (deliberately worse: rolled back). The live
report shows each step; the audit trail is printed at the end.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

import click
import grpc
import numpy as np
from rich.console import Console
from rich.live import Live

from gateway.cli.release import describe_audit, report_table
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


def _start_gateway(repo: Path, state: Path) -> Launched:
    args = [
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
        "--workers",
        "1",
        "--state-dir",
        str(state),
    ]
    try:
        return launch.serve(args)
    except RuntimeError as exc:
        raise click.ClickException(f"the demo gateway did not start: {exc}") from None


def _watch(console: Console, control: rgrpc.ReleaseServiceStub, done: Phase, timeout: float) -> rpb.Release:
    deadline = time.monotonic() + timeout
    with Live(console=console, refresh_per_second=4) as live:
        while time.monotonic() < deadline:
            report = control.GetReport(rpb.GetReportRequest(model="digits"), timeout=5)
            live.update(report_table(report))
            if report.release.phase == done:
                release: rpb.Release = report.release
                break
            time.sleep(0.5)
        else:
            raise click.ClickException(f"the rollout did not reach {done} in {timeout:.0f} s")
    console.line()  # a plain newline after the live table, also when output is not a terminal
    return release


@click.command()
@click.option(
    "--models",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=Path("models"),
    show_default=True,
    help="Repository holding the bundled digits model.",
)
def demo(models: Path) -> None:
    """Roll out digits v2 (promoted step by step) and v3 (rolled back) under labelled live traffic."""
    console = Console(highlight=False)
    workdir = Path(tempfile.mkdtemp(prefix="gateway-demo-"))
    repo = workdir / "models"
    shutil.copytree(models / "digits", repo / "digits")
    spec = repo / "digits" / "model.toml"
    spec.write_text(spec.read_text() + DEMO_POLICY)
    console.print(f"starting a gateway on a copy of {models / 'digits'} (state in {workdir / 'state'}) ...")
    launched = _start_gateway(repo, workdir / "state")
    proc, address, control_address = launched.proc, launched.address, launched.control
    control = rgrpc.ReleaseServiceStub(grpc.insecure_channel(control_address))  # type: ignore[no-untyped-call]
    traffic = LabelledTraffic(address, control, models)
    try:
        console.print(f"gateway on {address}, control API on {control_address}; sending labelled traffic")
        traffic.start()
        console.rule("rollout of digits v2 (an MLP, more accurate than v1)")
        control.StartRollout(rpb.StartRolloutRequest(model="digits", candidate="2", reason="demo: new MLP"))
        release = _watch(console, control, Phase.SUCCEEDED, 120)
        console.print(f"[green]v2 promoted[/]: stable is now {release.stable}")
        console.rule("rollout of digits v3 (trained on corrupted labels)")
        control.StartRollout(rpb.StartRolloutRequest(model="digits", candidate="3", reason="demo: suspicious model"))
        release = _watch(console, control, Phase.ROLLED_BACK, 120)
        console.print(f"[red]v3 rolled back[/]: stable stays {release.stable}, no traffic on v3")
        console.rule("audit trail")
        for record in control.GetAuditLog(rpb.GetAuditLogRequest(model="digits", limit=1000)).records:
            console.print(describe_audit(record), markup=False)
        console.print(f"{traffic.sent} requests sent ({traffic.errors} errors); work files in {workdir}")
    finally:
        traffic.stop.set()
        proc.terminate()
        proc.wait(20)
