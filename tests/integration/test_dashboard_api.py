"""The dashboard's JSON on real gateways: snapshots during a rollout, worker 0 serving it, refusals at start."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from gateway.config.settings import GatewaySettings
from gateway.errors import ConfigError
from gateway.protocol.pb import release_pb2 as rpb
from gateway.protocol.pb import release_pb2_grpc as rgrpc
from gateway.server.ports import check_ports
from tests.support import gateway_in_thread, gateway_process
from tests.traffic import Load, digits_builder

pytestmark = pytest.mark.integration


def test_a_rollouts_snapshot_has_each_check_and_version_and_the_history_grows() -> None:
    with gateway_in_thread(dashboard_port=0, load=("digits",)) as server:
        base = f"http://127.0.0.1:{server.gateway.dashboard_port}"
        control = rgrpc.ReleaseServiceStub(grpc.insecure_channel(server.control))
        with Load(server.address, server.control, "digits", digits_builder(), clients=2, label_delay_s=0.2):
            control.StartRollout(rpb.StartRolloutRequest(model="digits", candidate="2", reason="dashboard"), timeout=10)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                body = httpx.get(f"{base}/api/models/digits", timeout=10).json()
                snapshot = body["snapshot"]
                if snapshot["checks"] and snapshot["versions"][-1]["requests"] > 0 and len(body["points"]) >= 3:
                    break
                time.sleep(0.5)
        assert snapshot["phase"] == "progressing" and snapshot["candidate"] == "2" and snapshot["step"] == 1
        assert snapshot["weight_pct"] == 1.0  # the default policy's first step, in percent
        check = next(c for c in snapshot["checks"] if c["check"] == "error_rate")
        assert set(check) >= {"verdict", "value", "low", "high", "bound", "samples", "needed"}
        versions = {v["version"]: v for v in snapshot["versions"]}
        assert versions["2"]["role"] == "canary" and versions["1"]["role"] == "stable"
        assert versions["1"]["p99_ms"] > 0 and versions["1"]["labelled"] > 0
        assert 0 <= versions["1"]["accuracy_low"] <= versions["1"]["accuracy"] <= versions["1"]["accuracy_high"] <= 1
        points = body["points"]
        assert len(points) >= 3 and [p["seq"] for p in points] == sorted(p["seq"] for p in points)
        assert any(p["checks"] for p in points)
        later = httpx.get(f"{base}/api/models/digits", params={"since": points[-1]["seq"]}, timeout=10).json()
        assert all(p["seq"] > points[-1]["seq"] for p in later["points"])
        assert [a["action"] for a in body["audit"]][:2] == ["start_rollout", "init"]  # newest first
        overview = httpx.get(f"{base}/api/overview", timeout=10).json()
        assert [(m["model"], m["phase"], m["canary"]) for m in overview["models"]] == [("digits", "progressing", "2")]
        assert httpx.get(f"{base}/api/models/nothing", timeout=10).status_code == 404


def test_without_tokens_the_dashboard_is_refused_beyond_loopback() -> None:
    settings: dict[str, Any] = {"dashboard_port": 0, "control_port": -1, "control_host": "0.0.0.0", "load": ("digits",)}
    with pytest.raises(ConfigError, match="without tokens"), gateway_in_thread(**settings):
        pass


def test_a_dashboard_port_given_to_another_listener_is_refused_naming_both_flags() -> None:
    settings = GatewaySettings(models=Path("models"), port=0, http_port=-1, metrics_port=-1, control_port=18_555,
                               dashboard_port=18_555)  # fmt: skip
    with pytest.raises(ConfigError, match="given to both --control-port and --dashboard-port"):
        check_ports(settings)


def test_with_workers_worker_zero_serves_the_dashboard_and_the_start_line_names_it() -> None:
    with gateway_process("--load", "digits", "--workers", "2", "--dashboard-port", "0") as server:
        assert server.dashboard.startswith("http://127.0.0.1:"), server.lines
        overview = httpx.get(server.dashboard + "api/overview", timeout=10).json()
        assert [m["model"] for m in overview["models"]] == ["digits"]
        assert any("2 workers serving" in line and "dashboard on http://" in line for line in server.lines)
