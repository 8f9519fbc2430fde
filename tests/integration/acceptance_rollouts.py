"""Issue 22's acceptance runs on real gateways, with numbers for docs/promotion.md.

    .venv/bin/python -m tests.integration.acceptance_rollouts --aa-runs 10 --accuracy-runs 10

Each run starts `gateway serve` on port 0 on a fresh copy of digits, drives it
with 3 client threads (one held-out row a request, or 16 with labels 3.5 s
later for the accuracy run) and rolls out a candidate under the default policy
but for short intervals (interval_s 0.5, step_min_duration_s 1, max_duration_s
300). It prints one line per run: the outcome, the time it took, the
candidate's requests (and labelled rows) when it was decided, and any failed
checks. Not a test (it takes minutes): the tests in test_rollout_decisions.py
check the same behaviours once each.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gateway.protocol.pb import release_pb2 as rpb
from tests.integration.test_rollout_decisions import (
    DONE,
    audit,
    checks_of,
    control_stub,
    digits_repo,
    test_a_candidate_thirty_percent_slower_at_p99_is_rolled_back_on_latency,
    test_an_identical_copy_is_promoted_through_every_default_step_each_held_for_its_minimum,
    wait_phase,
)
from tests.onnx_models import write_less_accurate_copy
from tests.support import MODELS, gateway_process
from tests.traffic import Load, digits_builder

POLICY = "\n[policy]\ninterval_s = 0.5\nstep_min_duration_s = 1\nmax_duration_s = 300\n"


@dataclass
class Outcome:
    phase: str
    seconds: float
    canary_requests: int
    step_labelled: int
    failed: list[str]
    note: str = ""

    def line(self, name: str) -> str:
        failed = f" failed checks: {', '.join(self.failed)}" if self.failed else ""
        labelled = f", {self.step_labelled} labelled canary rows in its step" if self.step_labelled else ""
        requests = f"{self.canary_requests} canary requests{labelled}"
        return f"{name}: {self.phase} in {self.seconds:.1f} s, {requests}{failed}{self.note}"


Prepare = Callable[[Path, Path], str] | None  # (model folder, scratch folder) -> a note


def rollout(
    policy: str, candidate: str, prepare: Prepare, rows: int = 1, label_delay_s: float | None = None
) -> Outcome:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = digits_repo(root / "repo", policy)
        note = prepare(model_dir, root) if prepare is not None else ""
        with gateway_process("--models", str(root / "repo"), "--workers", "1") as server:
            control = control_stub(server)
            build = digits_builder(rows=rows, seed=int(time.time()))
            with Load(server.address, server.control, "digits", build, clients=3, label_delay_s=label_delay_s):
                started = time.monotonic()
                control.StartRollout(rpb.StartRolloutRequest(model="digits", candidate=candidate, reason="acceptance"))
                done = wait_phase(control, "digits", DONE, timeout=600)
                took = time.monotonic() - started
            records = audit(control, "digits")
            last = records[-1]
            checks = checks_of(last)
            failed = sorted(
                {
                    name
                    for r in records
                    if r.action in ("failed_check", "rollback")
                    for name, c in checks_of(r).items()
                    if c["verdict"] == "fail"
                }
            )
            requests = int(checks.get("error_rate", {}).get("samples") or 0)
            labelled = int(checks.get("step_accuracy", checks.get("accuracy", {})).get("samples") or 0)
            if not labelled and "accuracy" in checks:
                labelled = int(checks["accuracy"]["samples"])
            return Outcome(done.phase, took, requests, labelled, failed, f" {note}" if note else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--aa-runs", type=int, default=10)
    parser.add_argument("--accuracy-runs", type=int, default=1, help="rollouts of the -2-point candidate")
    parser.add_argument("--skip", nargs="*", default=[], help="aa, v2, slower, accuracy")
    args = parser.parse_args()

    if "aa" not in args.skip:
        for i in range(args.aa_runs):
            with tempfile.TemporaryDirectory() as tmp:
                print(f"A/A run {i + 1}: ", end="", flush=True)
                try:
                    test_an_identical_copy_is_promoted_through_every_default_step_each_held_for_its_minimum(Path(tmp))
                except AssertionError as exc:
                    print(f"NOT PROMOTED: {str(exc)[:600]}", flush=True)
    if "v2" not in args.skip:
        print(rollout(POLICY, "2", None).line("v2"), flush=True)
    if "slower" not in args.skip:
        with tempfile.TemporaryDirectory() as tmp:
            print("30% slower at p99: ", flush=True)
            test_a_candidate_thirty_percent_slower_at_p99_is_rolled_back_on_latency(Path(tmp))
    if "accuracy" not in args.skip:

        def less_accurate(model_dir: Path, _: Path) -> str:
            v1, v6 = model_dir / "1" / "model.onnx", model_dir / "6" / "model.onnx"
            drop = write_less_accurate_copy(v1, v6, 2.0, MODELS / "digits" / "heldout.npz")
            return f"(held-out accuracy {drop * 100:.1f} points lower)"

        policy = POLICY + "max_accuracy_drop = 0.005\n"
        for i in range(args.accuracy_runs):
            outcome = rollout(policy, "6", less_accurate, rows=16, label_delay_s=3.5)
            print(outcome.line(f"-2 points, run {i + 1}"), flush=True)


if __name__ == "__main__":
    main()
