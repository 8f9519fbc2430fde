"""Release operations refuse what would store nonsense, and reasons are bounded and log safely (#21 items 21-22)."""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.protocol.pb import release_pb2 as rpb
from gateway.protocol.pb import release_pb2_grpc as rgrpc
from gateway.release.operations import MAX_REASON_CHARS
from tests.support import ROOT, Running, gateway_command, gateway_in_thread


@pytest.fixture(scope="module")
def running(repo: Path) -> Iterator[Running]:
    with gateway_in_thread(repo, controller=False) as gateway:
        yield gateway


@pytest.fixture
def control(running: Running) -> rgrpc.ReleaseServiceStub:
    stub = rgrpc.ReleaseServiceStub(grpc.insecure_channel(running.control))
    # Every test starts from stable 1 and nothing else.
    release = stub.GetRelease(rpb.GetReleaseRequest(model="digits"))
    if release.canary:
        stub.SetTraffic(rpb.SetTrafficRequest(model="digits", canary="", weight_bp=0))
    return stub


def refused(call: object, request: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(request, timeout=10)  # type: ignore[operator]
    return caught.value


def revision(control: rgrpc.ReleaseServiceStub) -> int:
    return int(control.GetRelease(rpb.GetReleaseRequest(model="digits")).revision)


def test_a_rollout_of_no_candidate_is_refused(control: rgrpc.ReleaseServiceStub) -> None:
    before = revision(control)
    error = refused(control.StartRollout, rpb.StartRolloutRequest(model="digits", candidate=""))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "candidate" in (error.details() or "")
    release = control.GetRelease(rpb.GetReleaseRequest(model="digits"))
    assert release.phase in ("", "idle") and release.revision == before


def test_a_weight_for_no_canary_is_refused(control: rgrpc.ReleaseServiceStub) -> None:
    before = revision(control)
    error = refused(control.SetTraffic, rpb.SetTrafficRequest(model="digits", canary="", weight_bp=5000))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "canary" in (error.details() or "") and "weight" in (error.details() or "")
    release = control.GetRelease(rpb.GetReleaseRequest(model="digits"))
    assert release.canary_weight_bp == 0 and release.revision == before


def test_a_rollback_of_nothing_is_refused_and_keeps_the_revision(
    control: rgrpc.ReleaseServiceStub, running: Running
) -> None:
    before = revision(control)
    error = refused(control.Rollback, rpb.ModelActionRequest(model="digits", reason="oops"))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "nothing to roll back" in (error.details() or "")
    assert revision(control) == before
    records = control.GetAuditLog(rpb.GetAuditLogRequest(model="digits", limit=1000)).records
    assert (records[-1].action, records[-1].outcome) == ("rollback", "refused")
    # The CLI says so and exits 1.
    env = {**os.environ, "GATEWAY_CONTROL": running.control}
    env.pop("GATEWAY_TOKEN", None)
    result = subprocess.run(
        gateway_command("rollback", "digits"), capture_output=True, text=True, timeout=60, cwd=ROOT, env=env
    )
    assert result.returncode == 1, result
    assert "nothing to roll back" in result.stderr
    assert revision(control) == before
    # With a canary there is something to roll back: it goes through.
    control.SetTraffic(rpb.SetTrafficRequest(model="digits", canary="2", weight_bp=1000))
    after = control.Rollback(rpb.ModelActionRequest(model="digits", reason="back"))
    assert after.canary == "" and after.revision == before + 2


def test_a_reason_over_the_cap_is_refused_naming_reason(control: rgrpc.ReleaseServiceStub) -> None:
    before = revision(control)
    long = "x" * (MAX_REASON_CHARS + 1)
    requests = [
        (control.SetTraffic, rpb.SetTrafficRequest(model="digits", canary="2", weight_bp=100, reason=long)),
        (control.StartRollout, rpb.StartRolloutRequest(model="digits", candidate="2", reason=long)),
        (control.AddShadow, rpb.AddShadowRequest(model="digits", version="3", fraction=0.5, reason=long)),
        (control.Promote, rpb.ModelActionRequest(model="digits", reason=long)),
        (control.Rollback, rpb.ModelActionRequest(model="digits", reason=long)),
        (control.Pause, rpb.ModelActionRequest(model="digits", reason=long)),
    ]
    for call, request in requests:
        error = refused(call, request)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (call, error)
        assert "reason" in (error.details() or "") and str(MAX_REASON_CHARS) in (error.details() or "")
    assert revision(control) == before
    # A 4 MiB reason is refused the same way (and never stored).
    error = refused(
        control.SetTraffic, rpb.SetTrafficRequest(model="digits", canary="2", weight_bp=1, reason=long * 4000)
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    records = control.GetAuditLog(rpb.GetAuditLogRequest(model="digits", limit=1000)).records
    assert all(len(r.reason) <= MAX_REASON_CHARS + 200 for r in records)
    # At the cap it is accepted.
    control.SetTraffic(rpb.SetTrafficRequest(model="digits", canary="2", weight_bp=100, reason="y" * MAX_REASON_CHARS))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    reason=st.text(alphabet=st.characters(codec="utf-8"), max_size=80).map(
        lambda t: t + "\nFORGED gateway: line\r\x1b[2K"
    )
)
def test_a_reason_never_forges_a_log_line(
    reason: str, control: rgrpc.ReleaseServiceStub, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="gateway.release.operations"):
        weight = 1 + len(reason) % 9000
        control.SetTraffic(rpb.SetTrafficRequest(model="digits", canary="2", weight_bp=weight, reason=reason))
    messages = [r.getMessage() for r in caplog.records if r.name == "gateway.release.operations"]
    assert messages, "the change was not logged"
    for message in messages:
        assert message.isprintable(), repr(message)
    assert any("\\nFORGED" in m for m in messages)
    # The audit log keeps the reason as it was given.
    last = control.GetAuditLog(rpb.GetAuditLogRequest(model="digits", limit=1000)).records[-1]
    assert last.reason == reason


def test_a_load_reason_never_forges_a_log_line(
    control: rgrpc.ReleaseServiceStub, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="gateway.control.servicer"):
        control.LoadModel(rpb.ModelRequest(model="digits", reason="reload\nFORGED gateway: line"), timeout=60)
    messages = [r.getMessage() for r in caplog.records if r.name == "gateway.control.servicer"]
    assert any("\\nFORGED" in m for m in messages), messages
    assert all(m.isprintable() for m in messages), messages
