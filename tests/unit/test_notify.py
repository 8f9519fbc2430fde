"""Notifications without sockets: signing, the retry schedule, events from audit rows, the
config's refusals, and a sender's attempts through httpx's in-memory transport."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry

from gateway.config.notify import NotifyTarget
from gateway.config.settings import load_settings
from gateway.errors import ConfigError
from gateway.release.notify import signing
from gateway.release.notify.backoff import Backoff
from gateway.release.notify.events import from_audit
from gateway.release.notify.metrics import NotifyMetrics
from gateway.release.notify.payloads import slack_body
from gateway.release.notify.secrets import Secret, load_secret
from gateway.release.notify.sender import Notifier, TargetSender
from gateway.release.shadow import CircuitBreaker
from gateway.release.store import AuditEntry, AuditOutcome

# -- signing ----------------------------------------------------------------------------


def test_the_signature_is_hmac_sha256_of_timestamp_dot_body_in_hex() -> None:
    # Computed apart, with `printf '%s' '1700000000.{"a":1}' | openssl dgst -sha256 -hmac k3y`.
    expected = "sha256=fd5a70e965043f7df6309c2c3b5ff5a8ffa99b1f5175e9a311459e73c4634d4a"
    assert signing.signature(b"k3y", 1700000000, b'{"a":1}') == expected
    sent = signing.headers(b"k3y", 1700000000, b'{"a":1}')
    assert sent == {"X-Gateway-Timestamp": "1700000000", "X-Gateway-Signature": expected}


def test_verify_refuses_another_body_another_key_and_a_stale_timestamp() -> None:
    body, stamp = b'{"event":"promoted"}', 1700000000
    sent = signing.signature(b"key", stamp, body)
    assert signing.verify(b"key", str(stamp), sent, body, now=stamp + 10)
    assert not signing.verify(b"key", str(stamp), sent, body + b" ", now=stamp)
    assert not signing.verify(b"other", str(stamp), sent, body, now=stamp)
    assert not signing.verify(b"key", str(stamp), sent, body, now=stamp + signing.MAX_AGE_S + 1)
    assert not signing.verify(b"key", "soon", sent, body, now=stamp)


# -- the retry schedule -----------------------------------------------------------------


def test_backoff_doubles_with_equal_jitter_up_to_its_cap() -> None:
    backoff = Backoff(base_s=0.5, cap_s=4.0)
    rng = random.Random(7)
    for retry, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 4.0), (200, 4.0)]:
        waits = [backoff.delay(retry, rng) for _ in range(200)]
        assert all(ceiling / 2 <= w <= ceiling for w in waits), (retry, min(waits), max(waits))
        assert max(waits) - min(waits) > ceiling / 4  # jittered, not one fixed wait
    assert backoff.schedule(3, random.Random(1)) == backoff.schedule(3, random.Random(1))
    assert len(backoff.schedule(3, rng)) == 3
    with pytest.raises(ValueError):
        backoff.delay(0, rng)


# -- events from audit rows ------------------------------------------------------------


def entry(action: str, outcome: AuditOutcome = AuditOutcome.APPLIED, evidence: object = None) -> AuditEntry:
    after = {
        "model": "digits",
        "stable": "1",
        "canary": "2",
        "canary_weight_bp": 2500,
        "rollout": {"phase": "progressing", "step": 1, "candidate": "2"},
    }
    return AuditEntry(
        actor="controller",
        action=action,
        model="digits",
        reason="checks pass",
        outcome=outcome,
        after=after if outcome is AuditOutcome.APPLIED else None,
        before=after,
        evidence=evidence,
        revision=7 if outcome is AuditOutcome.APPLIED else None,
        at=1700000000.5,
    )


def test_audit_rows_name_their_events_and_other_rows_none() -> None:
    names = {
        action: (e.event if (e := from_audit(entry(action))) else None)
        for action in ("start_rollout", "advance", "await_approval", "approve", "promote", "rollback")
    }
    assert names == {
        "start_rollout": "rollout_started",
        "advance": "step_advanced",
        "await_approval": "awaiting_approval",
        "approve": "approved",
        "promote": "promoted",
        "rollback": "rolled_back",
    }
    for quiet in ("init", "set_traffic", "failed_check", "add_shadow"):
        assert from_audit(entry(quiet)) is None
    failed_gate = [{"check": "gate_agreement", "verdict": "fail", "value": 0.5}]
    refused = from_audit(entry("start_rollout", AuditOutcome.REFUSED, failed_gate))
    assert refused is not None and refused.event == "gate_failed" and refused.checks == failed_gate
    assert from_audit(entry("start_rollout", AuditOutcome.REFUSED)) is None  # an illegal start: no gate
    advanced = from_audit(entry("advance"))
    assert advanced is not None
    assert advanced.to_dict()["release"] == {
        "stable": "1",
        "canary": "2",
        "canary_weight_pct": 25.0,
        "phase": "progressing",
        "step": 1,
        "candidate": "2",
    }
    assert advanced.id == from_audit(entry("advance")).id  # type: ignore[union-attr]  # the same row, the same id


def test_the_slack_payload_has_text_and_blocks() -> None:
    event = from_audit(entry("advance"))
    assert event is not None
    body = json.loads(slack_body(event))
    assert "digits: v2 advanced to 25 %" in body["text"]
    assert body["blocks"][0]["text"]["text"] == body["text"]
    assert event.id in body["blocks"][1]["elements"][0]["text"]


# -- config ---------------------------------------------------------------------------


def settings_from(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> object:
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    return load_settings(path, env=env or {})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[notify]]\nurl = "hooks.example.com/x"\nsecret_env = "K"\n', "notify[0].url: expected http(s)://"),
        ('[[notify]]\nurl = "http://h/x"\n', "notify[0].secret_env or secret_file: a webhook signs"),
        # URLs that parse wrong, or that the HTTP client would refuse only when the first event is sent.
        ('[[notify]]\nurl = "http://[::1/h"\nsecret_env = "K"\n', "notify[0].url: expected http(s)://"),
        ('[[notify]]\nurl = "http://h/' + "x" * 70_000 + '"\nsecret_env = "K"\n', "the limit is 8192"),
        ('[[notify]]\nurl = "http://a b/h"\nsecret_env = "K"\n', "holds a space or a control character"),
        (
            '[[notify]]\nurl = "http://h/x"\nsecret_env = "K"\nevents = ["promote"]\n',
            "notify[0].events: 'promote' is not an event (did you mean 'promoted'?)",
        ),
        ('[[notify]]\nurl = "http://h/x"\nsecret_env = "K"\ntimeout_s = 0\n', "notify[0].timeout_s: must be in (0"),
        (
            '[[notify]]\nurl = "http://h/x"\nsecret_env = "K"\nretries = 2\n',
            "unknown setting notify[0].retries (known: events",
        ),
        ('[[notify]]\nurl = "http://h/x"\nkind = "pagerduty"\n', "notify[0].kind: 'pagerduty' is not one of"),
        (
            '[[notify]]\nurl = "http://h/a"\nkind = "slack"\n[[notify]]\nurl = "http://h/b"\nkind = "slack"\n',
            "notify: targets [0] and [1] are both named 'h'",
        ),
        ('notify = "http://h/x"\n', "notify: expected an array of tables"),
    ],
)
def test_bad_targets_are_refused_naming_the_file_the_target_and_the_field(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        settings_from(tmp_path, text)
    assert str(caught.value).startswith(f"{tmp_path / 'gateway.toml'}: ")
    assert message in str(caught.value)


def test_targets_beside_a_serve_table_and_defaults(tmp_path: Path) -> None:
    text = '[serve]\nport = 0\n\n[[notify]]\nurl = "https://hooks.slack.com/services/T/B/XyZzY"\nkind = "slack"\n'
    settings = settings_from(tmp_path, text)
    (target,) = settings.notify  # type: ignore[attr-defined]
    assert (target.name, target.kind, target.events, target.timeout_s, target.max_retries) == (
        "hooks.slack.com",
        "slack",
        (),
        5.0,
        3,
    )
    assert "XyZzY" not in repr(target)  # a Slack URL's path is its key: never in a repr
    assert target.wants("promoted", "digits")


def test_a_secret_comes_from_the_environment_or_a_file_and_is_never_shown(tmp_path: Path) -> None:
    from_env = NotifyTarget(url="http://h/x", secret_env="HOOK_KEY")
    secret = load_secret(0, from_env, {"HOOK_KEY": "s3cret\n"})
    assert secret == Secret(b"s3cret") and "s3cret" not in repr(secret)
    with pytest.raises(ConfigError, match=r"notify\[0\] \(h\): secret_env: the environment variable HOOK_KEY is not"):
        load_secret(0, from_env, {})
    key_file = tmp_path / "key"
    key_file.write_text("filekey\n")
    assert load_secret(1, NotifyTarget(url="http://h/x", secret_file=key_file), {}) == Secret(b"filekey")
    with pytest.raises(ConfigError, match="secret_file: cannot read"):
        load_secret(1, NotifyTarget(url="http://h/x", secret_file=tmp_path / "missing"), {})


# -- a sender's attempts (httpx's in-memory transport: no sockets) ------------------------


def sender_with(
    answers: list[int | Exception], **target: object
) -> tuple[TargetSender, list[httpx.Request], list[float]]:
    seen: list[httpx.Request] = []
    waits: list[float] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        reply = answers.pop(0)
        if isinstance(reply, Exception):
            raise reply
        return httpx.Response(reply)

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    client = httpx.AsyncClient(transport=httpx.MockTransport(answer))
    settings = NotifyTarget(url="http://receiver/hook", name="r", secret_env="K", **target)  # type: ignore[arg-type]
    sender = TargetSender(
        settings,
        Secret(b"key"),
        client,
        NotifyMetrics(CollectorRegistry()),
        backoff=Backoff(0.5, 4.0),
        rng=random.Random(3),
        clock=lambda: 1700000000.0,
        sleep=sleep,
    )
    return sender, seen, waits


def test_failures_are_retried_with_the_backoff_schedule_then_delivered_signed() -> None:
    refused = httpx.ConnectError("connection refused")
    sender, seen, waits = sender_with([refused, 503, 200], max_retries=3)
    event = from_audit(entry("promote"))
    assert event is not None
    delivery = asyncio.run(sender.deliver(event))
    assert (delivery.outcome, delivery.attempts, delivery.result) == ("delivered", 3, "2xx")
    assert waits == Backoff(0.5, 4.0).schedule(2, random.Random(3))
    for request in seen:
        stamp, sent = request.headers["X-Gateway-Timestamp"], request.headers["X-Gateway-Signature"]
        assert signing.verify(b"key", stamp, sent, request.content, now=1700000000.0)
        assert json.loads(request.content)["event"] == "promoted"


def test_retries_stop_at_max_retries_and_a_client_error_is_not_retried() -> None:
    sender, seen, waits = sender_with([500, 502, 504], max_retries=2)
    event = from_audit(entry("rollback"))
    assert event is not None
    delivery = asyncio.run(sender.deliver(event))
    assert (delivery.outcome, delivery.attempts, delivery.result, len(waits), len(seen)) == ("failed", 3, "504", 2, 3)
    sender, seen, waits = sender_with([404, 200], max_retries=5)
    delivery = asyncio.run(sender.deliver(event))
    assert (delivery.outcome, delivery.attempts, delivery.result, waits, len(seen)) == ("failed", 1, "404", [], 1)


def test_a_full_queue_drops_and_counts_without_waiting() -> None:
    async def offer_many() -> TargetSender:
        sender, _, _ = sender_with([])
        sender.queue = asyncio.Queue(2)
        event = from_audit(entry("advance"))
        assert event is not None
        for _ in range(5):
            sender.offer(event)  # returns at once: nothing consumes the queue
        return sender

    sender = asyncio.run(offer_many())
    assert sender.queue.qsize() == 2
    dropped = sender._metrics.notifications.labels("r", "step_advanced", "dropped")._value.get()
    assert dropped == 3


def test_a_target_gets_only_the_events_and_models_it_asks_for() -> None:
    async def offer() -> int:
        sender, _, _ = sender_with([], events=("promoted",), models=("digits",))
        for action in ("advance", "promote", "rollback"):
            event = from_audit(entry(action))
            assert event is not None
            sender.offer(event)
        return sender.queue.qsize()

    assert asyncio.run(offer()) == 1


# -- the shadow circuit's event -------------------------------------------------------------


def test_a_shadow_circuit_is_announced_each_time_it_opens() -> None:
    opened: list[tuple[int, int]] = []
    breaker = CircuitBreaker(threshold=3, clock=lambda: 0.0, on_open=lambda n, failures: opened.append((n, failures)))
    for _ in range(5):
        breaker.failure()
    assert opened == [(1, 3)]  # failures past the threshold keep it open: no new event
    breaker.success()
    for _ in range(3):
        breaker.failure()
    assert opened == [(1, 3), (2, 3)]


def test_the_notifier_sends_a_circuit_event_from_its_queue_and_drains_on_close() -> None:
    async def run() -> list[httpx.Request]:
        sender, seen, _ = sender_with([200])
        notifier = Notifier([sender], sender._client, clock=lambda: 1700000000.0)
        notifier.start()
        notifier.circuit_opened("digits", "3", 1, 5)
        await notifier.close(grace_s=5)
        return seen

    (request,) = asyncio.run(run())
    body = json.loads(request.content)
    assert (body["event"], body["model"], body["version"]) == ("shadow_circuit_opened", "digits", "3")
    assert "failed 5 runs in a row" in body["reason"]
