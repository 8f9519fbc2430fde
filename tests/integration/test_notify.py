"""Notifications on a real gateway (issue 18): signed payloads at a real local receiver for
every event of a rollout, while a receiver that is down and one that is slow delay nothing.

`gateway serve --workers 2` reads three [[notify]] targets from its config file: "good"
(a webhook at a local HTTP server), "chat" (the Slack form, at the same server, for two
events only), "down" (a port nobody listens on) and "slow" (a server that answers after
5 s, with a 3 s timeout). An identical copy of v1 is rolled out and promoted under live
traffic, then another rollout is rolled back by hand. The good receiver gets each event
once (two workers, one sender), in order, signed with the key from the environment; the
controller's steps keep their pace (step gaps bounded well below what one slow delivery
in the decision path would add); the StartRollout and Rollback calls answer at once;
and /metrics counts the down and slow targets' failures.
"""

from __future__ import annotations

import itertools
import json
import shutil
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest

from gateway.protocol.pb import release_pb2 as rpb
from gateway.release.notify import signing
from tests.integration.test_rollout_decisions import audit, audit_lines, control_stub, digits_repo, wait_phase
from tests.support import gateway_process
from tests.traffic import Load, digits_builder

POLICY = """
[policy]
interval_s = 0.5
step_weights = [20, 50]
threshold = 1
max_latency_ratio = 0          # every check off: a step advances on its own exposure alone,
max_error_increase = -1        # so its length is the policy's (1 s, decided within an interval),
step_min_samples = 20          # not how long a check takes to gather evidence
step_min_duration_s = 1
max_duration_s = 120
"""
KEY = "notify-test-key-0123456789"
SLOW_S = 5.0
# A step lasts step_min_duration_s (1 s) plus up to an interval and the workers' evidence
# sharing (0.5 s each): 1.0-1.6 s measured here, with and without these targets, and up to
# 3.3 s on a busy machine. One slow delivery in the decision path would add its two
# attempts' timeouts and the backoff between them (3 s + 0.25 s + 3 s) to every step.
MAX_STEP_GAP_S = 5.0
# The good receiver hears of each event within this (the slow target's 6 s of attempts
# would show if the targets shared one sender).
MAX_NEWS_DELAY_S = 5.0


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float  # unix seconds, when it arrived


@dataclass
class Receiver:
    """A real HTTP server on 127.0.0.1:0 recording every POST; `delay_s` before answering 200."""

    delay_s: float = 0.0
    got: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    port: int = 0

    def handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver.lock:
                    receiver.got.append(Received(self.path, dict(self.headers.items()), body, time.time()))
                time.sleep(receiver.delay_s)
                try:
                    self.send_response(200)
                    self.end_headers()
                except OSError:
                    pass  # the gateway gave up waiting: that is the point of the slow one

            def log_message(self, *args: Any) -> None:
                pass

        return Handler

    def bodies(self, path: str) -> list[tuple[Received, dict[str, Any]]]:
        with self.lock:
            return [(r, json.loads(r.body)) for r in self.got if r.path == path]


@contextmanager
def receiving(delay_s: float = 0.0) -> Iterator[Receiver]:
    receiver = Receiver(delay_s)
    server = ThreadingHTTPServer(("127.0.0.1", 0), receiver.handler())
    server.daemon_threads = True
    receiver.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def config(tmp_path: Path, good: int, down: int, slow: int) -> Path:
    key_file = tmp_path / "down.key"
    key_file.write_text("another key\n")
    path = tmp_path / "gateway.toml"
    path.write_text(f"""
[[notify]]
name = "good"
url = "http://127.0.0.1:{good}/hook"
secret_env = "NOTIFY_TEST_KEY"

[[notify]]
name = "chat"
kind = "slack"
url = "http://127.0.0.1:{good}/slack"
events = ["promoted", "rolled_back"]

[[notify]]
name = "down"
url = "http://127.0.0.1:{down}/hook"
secret_file = "{key_file}"
timeout_s = 1
max_retries = 1

[[notify]]
name = "slow"
url = "http://127.0.0.1:{slow}/hook"
secret_env = "NOTIFY_TEST_KEY"
timeout_s = 3
max_retries = 1
""")
    return path


def counted(metrics_port: int) -> dict[tuple[str, str, str], float]:
    """gateway_notifications_total by (target, event, outcome), as /metrics shows it."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    counts: dict[tuple[str, str, str], float] = {}
    for line in text.splitlines():
        if line.startswith("gateway_notifications_total{"):
            labels = dict(part.split("=", 1) for part in line[line.index("{") + 1 : line.index("}")].split(","))
            key = (labels["target"].strip('"'), labels["event"].strip('"'), labels["outcome"].strip('"'))
            counts[key] = counts.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


def failed(counts: dict[tuple[str, str, str], float], target: str) -> float:
    return sum(v for (t, _, outcome), v in counts.items() if t == target and outcome == "failed")


def test_a_rollout_notifies_signed_events_once_while_down_and_slow_receivers_delay_nothing(tmp_path: Path) -> None:
    model_dir = digits_repo(tmp_path / "repo", POLICY)
    shutil.copytree(model_dir / "1", model_dir / "4")  # byte-identical to v1: promoted
    with receiving() as good, receiving(SLOW_S) as slow:
        path = config(tmp_path, good.port, closed_port(), slow.port)
        args = ["--models", str(tmp_path / "repo"), "--workers", "2", "--metrics-port", "0", "--config", str(path)]
        args += ["--log-format", "json"]  # the delivery log's lines, as collectors read them
        with gateway_process(*args, env={"NOTIFY_TEST_KEY": KEY}) as server:
            control = control_stub(server)
            with Load(server.address, server.control, "digits", digits_builder(), clients=2):
                began = time.monotonic()
                control.StartRollout(rpb.StartRolloutRequest(model="digits", candidate="4", reason="A/A"))
                start_s = time.monotonic() - began
                done = wait_phase(control, "digits", ("succeeded", "rolled_back", "paused"), timeout=90)
            assert done.phase == "succeeded" and done.stable == "4", audit_lines(control, "digits")
            began = time.monotonic()
            control.StartRollout(rpb.StartRolloutRequest(model="digits", candidate="1", reason="v1 again"))
            control.Rollback(rpb.ModelActionRequest(model="digits", reason="changed my mind"))
            by_hand_s = time.monotonic() - began
            records = audit(control, "digits")

            # The decisions kept their pace, and calls that announce something answered at once.
            steps = [r for r in records if r.action in ("start_rollout", "advance")][:3]
            gaps = [b.at - a.at for a, b in itertools.pairwise(steps)]
            assert len(gaps) == 2 and all(1.0 <= gap <= MAX_STEP_GAP_S for gap in gaps), gaps
            assert start_s < 2.0 and by_hand_s < 2.0, (start_s, by_hand_s)

            expected = ["rollout_started", "step_advanced", "step_advanced", "promoted", "rollout_started"]
            expected.append("rolled_back")
            deadline = time.monotonic() + 30
            while len(good.bodies("/hook")) < len(expected) and time.monotonic() < deadline:
                time.sleep(0.2)
            time.sleep(1.0)  # a duplicate (another worker sending too) would arrive meanwhile
            hooks = good.bodies("/hook")
            assert [body["event"] for _, body in hooks] == expected, [body["event"] for _, body in hooks]
            for received, body in hooks:
                headers = {k.lower(): v for k, v in received.headers.items()}
                stamp, sent = headers["x-gateway-timestamp"], headers["x-gateway-signature"]
                assert signing.verify(KEY.encode(), stamp, sent, received.body, now=time.time()), body
                assert not signing.verify(b"another key", stamp, sent, received.body, now=time.time())
                assert body["model"] == "digits" and body["revision"] > 0
                # Sent as it happened: the slow and down targets held up none of it.
                assert received.at - body["at"] < MAX_NEWS_DELAY_S, (body["event"], received.at - body["at"])
            assert len({body["id"] for _, body in hooks}) == len(expected)
            by_event = {body["event"]: body for _, body in hooks}
            assert by_event["promoted"]["release"]["stable"] == "4"
            assert by_event["promoted"]["actor"] == "controller"
            assert [c["check"] for c in by_event["promoted"]["checks"]]  # the decision's evidence
            assert by_event["rolled_back"]["release"]["canary"] == ""
            advanced = [body["release"]["canary_weight_pct"] for _, body in hooks if body["event"] == "step_advanced"]
            assert advanced == [50, 100]

            chat = good.bodies("/slack")
            assert [body["text"] for _, body in chat] == [
                ":tada: digits: v4 promoted: now stable (all steps passed)",
                ":rewind: digits: v1 rolled back; stable stays v4 (changed my mind)",
            ]
            assert all(body["blocks"][0]["text"]["text"] == body["text"] for _, body in chat)

            # The down and slow targets' failures are counted, in the only sender's metrics.
            port = server.launched.metrics_port
            deadline = time.monotonic() + 30
            counts = counted(port)
            while (
                failed(counts, "down") < len(expected) or failed(counts, "slow") < 1
            ) and time.monotonic() < deadline:
                time.sleep(0.5)
                counts = counted(port)
            assert failed(counts, "down") == len(expected), counts
            assert failed(counts, "slow") >= 1, counts
            assert counts[("good", "promoted", "delivered")] == 1
            assert sum(v for (t, _, o), v in counts.items() if t == "good" and o == "delivered") == len(expected)
            assert counts[("chat", "rolled_back", "delivered")] == 1
            assert len(slow.got) >= 2  # it was tried (and retried), just never in time
            # The delivery log: a structured line per event and target, from worker 0 alone.
            lines = [json.loads(line) for line in server.lines if line.startswith("{")]
            deliveries = [line for line in lines if line.get("logger") == "gateway.release.notify.sender"]
            good_ids = [line["event_id"] for line in deliveries if line["target"] == "good"]
            assert good_ids == [body["id"] for _, body in hooks], deliveries
            down = [line for line in deliveries if line["target"] == "down"]
            assert {(d["outcome"], d["attempts"], d["result"]) for d in down} == {("failed", 2, "error: ConnectError")}
            assert {line["worker"] for line in deliveries} == {0}
            log = "\n".join(server.lines)
            assert KEY not in log and "another key" not in log


def test_a_missing_secret_stops_the_gateway_naming_the_target_and_the_variable(tmp_path: Path) -> None:
    path = config(tmp_path, 1, 2, 3)
    model_dir = digits_repo(tmp_path / "repo", "")
    args = ("--models", str(model_dir.parent), "--workers", "1", "--config", str(path))
    starting = gateway_process(*args, env={"NOTIFY_TEST_KEY": ""}, timeout=60)
    with pytest.raises(AssertionError, match="gateway did not start") as caught, starting:
        pass
    message = str(caught.value)
    assert "notify[0] (good): secret_env: the environment variable NOTIFY_TEST_KEY is not set or empty" in message


def test_approval_gates_and_a_failed_load_test_gate_are_announced(tmp_path: Path) -> None:
    """The events the approval gates' audit rows announce (awaiting approval, approved) and a
    start the load-test gate refuses (gate failed) reach a real receiver, signed, as they happen."""
    repo = tmp_path / "repo"
    digits_repo(repo, '\n[policy]\napprove_before = ["start"]\n', name="held")
    # A latency bound no candidate meets (p99 at a millionth of the stable's): the gate refuses.
    refused_gate = "\n[policy]\ngate = true\ngate_requests = 20\ngate_max_latency_ratio = 0.000001\n"
    digits_repo(repo, refused_gate, name="gated")
    with receiving() as good:
        path = tmp_path / "gateway.toml"
        path.write_text(f'[[notify]]\nname = "good"\nurl = "http://127.0.0.1:{good.port}/hook"\nsecret_env = "K"\n')
        args = ("--models", str(repo), "--workers", "1", "--config", str(path))
        with gateway_process(*args, env={"K": KEY}) as server:
            control = control_stub(server)
            started = control.StartRollout(rpb.StartRolloutRequest(model="held", candidate="2", reason="v2"))
            assert started.awaiting_approval == "start"
            control.Approve(rpb.ModelActionRequest(model="held", reason="looks good"))
            control.Rollback(rpb.ModelActionRequest(model="held", reason="enough"))
            with pytest.raises(grpc.RpcError) as caught:
                control.StartRollout(rpb.StartRolloutRequest(model="gated", candidate="2", reason="v2"))
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION, caught.value.details()
            expected = [
                ("held", "rollout_started"),
                ("held", "awaiting_approval"),
                ("held", "approved"),
                ("held", "rolled_back"),
                ("gated", "gate_failed"),
            ]
            deadline = time.monotonic() + 20
            while len(good.bodies("/hook")) < len(expected) and time.monotonic() < deadline:
                time.sleep(0.1)
            hooks = good.bodies("/hook")
    assert [(body["model"], body["event"]) for _, body in hooks] == expected, hooks
    for received, body in hooks:
        headers = {k.lower(): v for k, v in received.headers.items()}
        signed = (headers["x-gateway-timestamp"], headers["x-gateway-signature"], received.body)
        assert signing.verify(KEY.encode(), *signed, now=time.time()), body
    by_event = {body["event"]: body for _, body in hooks}
    waiting = by_event["awaiting_approval"]
    assert (waiting["actor"], waiting["release"]["canary"], waiting["release"]["canary_weight_pct"]) == (
        "controller",
        "2",
        0,
    )
    assert "awaiting approval before the first traffic step" in waiting["reason"]
    approved = by_event["approved"]
    assert (approved["reason"], approved["release"]["canary_weight_pct"]) == ("looks good", 1)
    failed = by_event["gate_failed"]
    assert "fail" in {c["verdict"] for c in failed["checks"] if c["check"] == "gate_latency_p99_ratio"}, failed
