"""External checks ([[policy.checks]]) on a real gateway, reading a real local HTTP server.

The source is an HTTP server on 127.0.0.1:0 in this process, answering as the
Prometheus API does (or with any JSON, for a web check); the gateway is `gateway
serve` with digits and real gRPC traffic. A Prometheus reading that crosses its
bound mid-rollout rolls the candidate back, and the audit names the check and the
value it read; a source that cannot be reached leaves the check inconclusive, so
the rollout never promotes, and status and the audit say why; a web check that
reads a passing value lets the rollout promote.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from gateway.protocol.pb import release_pb2 as rpb
from gateway.protocol.pb import release_pb2_grpc as rgrpc
from tests.integration.test_rollout_decisions import (
    DONE,
    audit,
    audit_lines,
    checks_of,
    cli,
    control_stub,
    digits_repo,
    wait_phase,
)
from tests.support import gateway_process
from tests.traffic import Load, digits_builder

# Short intervals; latency off (timing on a shared CI box is noise; this is about the external
# check), the error-rate check on, so the external verdict joins a built-in one.
POLICY = """
[policy]
interval_s = 0.5
step_weights = [{steps}]
step_min_duration_s = {step_s}
max_duration_s = {max_s}
max_latency_ratio = 0
min_samples = 100
step_min_samples = 50
"""
P99 = "p99-from-prometheus"
QUERY = 'histogram_quantile(0.99, sum by (le) (rate(request_seconds_bucket{version="2"}[1m])))'


def prometheus_check(url: str) -> str:
    return f"""
[[policy.checks]]
name = "{P99}"
kind = "prometheus"
url = "{url}"
query = '{QUERY}'
max = 0.25
timeout_s = 1
"""


def prometheus_answer(value: str) -> bytes:
    """An instant-query answer of one series, as Prometheus's HTTP API sends it."""
    sample = {"metric": {"version": "2"}, "value": [time.time(), value]}
    return json.dumps({"status": "success", "data": {"resultType": "vector", "result": [sample]}}).encode()


class Source:
    """A real HTTP server on 127.0.0.1:0 answering every GET with `body` (JSON), keeping what it was asked."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.asked: list[str] = []
        source = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                source.asked.append(self.path)
                body = source.body
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # one line a poll on stderr says nothing a test reads

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def queries(self) -> set[str]:
        return {q for path in self.asked for q in parse_qs(urlsplit(path).query).get("query", [])}

    @contextmanager
    def serving(self) -> Iterator[Source]:
        thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.server.shutdown()
            self.server.server_close()
            thread.join(10)


def wait_release(
    control: rgrpc.ReleaseServiceStub, done: Callable[[rpb.Release], bool], what: str, timeout: float
) -> rpb.Release:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        release = control.GetRelease(rpb.GetReleaseRequest(model="digits"), timeout=10)
        if done(release):
            return release
        time.sleep(0.1)
    raise AssertionError(f"{what} not within {timeout:g} s: {audit_lines(control, 'digits')}")


def closed_port() -> int:
    """A port nothing listens on (bound, then closed: connecting is refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_prometheus_reading_that_crosses_its_bound_mid_rollout_rolls_back(tmp_path: Path) -> None:
    with Source(prometheus_answer("0.12")).serving() as source:
        policy = POLICY.format(steps="20, 40, 60", step_s=2, max_s=90) + prometheus_check(source.url)
        digits_repo(tmp_path / "repo", policy)
        with gateway_process("--models", str(tmp_path / "repo"), "--workers", "1") as server:
            control = control_stub(server)
            with Load(server.address, server.control, "digits", digits_builder(), clients=1):
                control.StartRollout(rpb.StartRolloutRequest(model="digits", candidate="2", reason="v2"))
                wait_release(control, lambda r: r.phase == "progressing" and r.step >= 1, "step 2 of 3", 60)
                source.body = prometheus_answer("0.4")  # the candidate's p99 goes over 0.25 s
                done = wait_phase(control, "digits", DONE, timeout=30)
            records = audit(control, "digits")
            assert done.phase == "rolled_back" and done.stable == "1", audit_lines(control, "digits")

            # Before the change: each advance saw the reading pass, beside the built-in checks.
            advances = [r for r in records if r.action == "advance"]
            assert advances, audit_lines(control, "digits")
            for record in advances:
                checks = checks_of(record)
                assert checks[P99]["verdict"] == "pass" and checks[P99]["value"] == 0.12, checks[P99]
                assert checks["error_rate"]["verdict"] == "pass"
            # After it: a failed check (threshold 2), then the rollback, naming the check and the value.
            failed, rollback = records[-2], records[-1]
            assert (failed.action, rollback.action, rollback.actor) == ("failed_check", "rollback", "controller")
            assert f"{P99} (read 0.4, > max 0.25)" in rollback.reason, rollback.reason
            assert checks_of(rollback)[P99] == {
                "check": P99,
                "verdict": "fail",
                "value": 0.4,
                "low": 0.4,
                "high": 0.4,
                "bound": 0.25,
                "samples": 1,
                "needed": None,
                "kind": "prometheus",
                "reason": "read 0.4, > max 0.25",
            }
            # Asked the instant-query endpoint, with the query as configured.
            assert source.asked and all(urlsplit(p).path == "/api/v1/query" for p in source.asked)
            assert source.queries() == {QUERY}

            shown = cli(server, "audit", "digits")
            assert shown.returncode == 0, shown.stderr
            assert f"{P99} fail read 0.4, > max 0.25" in shown.stdout, shown.stdout


def test_an_unreachable_source_is_inconclusive_and_the_rollout_never_promotes_on_it(tmp_path: Path) -> None:
    down = f"http://127.0.0.1:{closed_port()}"
    # max_duration_s leaves status calls begun in the first 12 s another 12 s to answer before the
    # rollout pauses: each is a new process, and on a loaded machine one took 9.5 s to start.
    digits_repo(tmp_path / "repo", POLICY.format(steps="50", step_s=1, max_s=24) + prometheus_check(down))
    with gateway_process("--models", str(tmp_path / "repo"), "--workers", "1") as server:
        control = control_stub(server)
        with Load(server.address, server.control, "digits", digits_builder(), clients=1):
            control.StartRollout(rpb.StartRolloutRequest(model="digits", candidate="2", reason="v2"))
            # While it waits: status says the check is inconclusive, and why, and that it alone holds
            # the rollout (once error_rate has the samples to pass: under load the first status
            # naming the unreachable source could come before that).
            unreachable = f"{P99} inconclusive no usable reading: cannot reach {down}/api/v1/query"
            held_by_it = f"next: hold (inconclusive: {P99})"
            deadline = time.monotonic() + 12
            status = flat = ""
            while time.monotonic() < deadline and not (unreachable in flat and held_by_it in flat):
                time.sleep(0.5)
                status = cli(server, "status").stdout
                flat = " ".join(status.split())  # status wraps its lines at the terminal's width
            assert unreachable in flat, status
            assert held_by_it in flat, status
            # A pipeline's `rollout wait --json` sees the same: the external check it waits on, and why.
            waited = cli(server, "rollout", "wait", "digits", "--json", "--timeout", "1")
            assert waited.returncode == 5, (waited.stdout, waited.stderr)
            stream = [json.loads(line) for line in waited.stdout.splitlines()]
            assessed = [e for e in stream if e["event"] == "assessment"]
            assert assessed and P99 in assessed[-1]["waiting"], stream
            (seen,) = [c for c in assessed[-1]["checks"] if c["check"] == P99]
            assert (seen["verdict"], seen["kind"]) == ("inconclusive", "prometheus"), seen
            assert seen["reason"].startswith(f"no usable reading: cannot reach {down}"), seen
            # max_duration_s runs out with the check still inconclusive: on_timeout (pause), not a promotion.
            done = wait_phase(control, "digits", DONE, timeout=45)
        records = audit(control, "digits")
        assert done.phase == "paused" and done.stable == "1", audit_lines(control, "digits")
        assert not [r for r in records if r.action in ("advance", "promote", "finish")], audit_lines(control, "digits")
        paused = records[-1]
        assert (paused.action, paused.actor) == ("pause", "controller")
        assert f"inconclusive: {P99}: no usable reading: cannot reach {down}" in paused.reason, paused.reason
        checks = checks_of(paused)
        assert checks["error_rate"]["verdict"] == "pass", checks  # only the external check held it
        assert checks[P99]["verdict"] == "inconclusive" and checks[P99]["value"] is None
        assert checks[P99]["reason"].startswith(f"no usable reading: cannot reach {down}/api/v1/query")


def test_a_web_check_reading_a_passing_value_lets_the_rollout_promote(tmp_path: Path) -> None:
    answer = json.dumps({"model": "digits", "data": {"score": 0.97}}).encode()
    with Source(answer).serving() as source:
        check = f"""
[[policy.checks]]
name = "business-score"
kind = "web"
url = "{source.url}/scores/digits?window=5m"
json_path = "data.score"
min = 0.9
"""
        digits_repo(tmp_path / "repo", POLICY.format(steps="20, 50", step_s=1, max_s=60) + check)
        with gateway_process("--models", str(tmp_path / "repo"), "--workers", "1") as server:
            control = control_stub(server)
            with Load(server.address, server.control, "digits", digits_builder(), clients=1):
                control.StartRollout(rpb.StartRolloutRequest(model="digits", candidate="2", reason="v2"))
                done = wait_phase(control, "digits", DONE, timeout=45)
            records = audit(control, "digits")
            assert done.phase == "succeeded" and done.stable == "2", audit_lines(control, "digits")
            # Both steps advanced (the last one to 100 %) on the check's passing reading, then the promotion.
            decided = [r for r in records if r.action == "advance"]
            assert len(decided) == 2 and records[-1].action == "promote", audit_lines(control, "digits")
            for record in decided:
                score = checks_of(record)["business-score"]
                assert (score["verdict"], score["value"], score["bound"], score["kind"]) == ("pass", 0.97, 0.9, "web")
                assert score["reason"] == "read 0.97, ≥ min 0.9"
            assert source.asked and all(p == "/scores/digits?window=5m" for p in source.asked)
            # `rollout wait --json` on the ended rollout: each step's change carries the verdict and the value.
            waited = cli(server, "rollout", "wait", "digits", "--json")
            assert waited.returncode == 0, (waited.stdout, waited.stderr)
            changes = [json.loads(line) for line in waited.stdout.splitlines()]
            advanced = [e for e in changes if e["event"] == "change" and e["action"] == "advance"]
            assert len(advanced) == 2, changes
            for event in advanced:
                (score,) = [c for c in event["checks"] if c["check"] == "business-score"]
                assert (score["verdict"], score["value"], score["kind"]) == ("pass", 0.97, "web"), score
