"""Every metric the dashboard and the alerts read is exported by a real gateway.

A gateway with two workers (prometheus_client's multiprocess mode, as in production)
serves digits with v3 as a shadow and v2 in a rollout, under labelled traffic; its
merged metrics endpoint is scraped until the controller has decided, and each metric
family a panel or a rule names must be there. Then an operator rolls back, and the
rollout metrics must say so once, not once per worker.
"""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from tritonclient.grpc import service_pb2, service_pb2_grpc

from deploy import queries
from gateway.protocol.pb import release_pb2 as rpb
from gateway.protocol.pb import release_pb2_grpc as rgrpc
from tests.integration.test_rollout_decisions import digits_repo
from tests.support import MODELS, Process, gateway_process, poll_until

pytestmark = pytest.mark.integration

# Decisions every half second; failed checks never roll back and the first step never
# ends on its own, so the rollout is still running when the metrics are read.
POLICY = """
[policy]
interval_s = 0.5
step_weights = [20, 50]
threshold = 1000
min_samples = 50
max_latency_ratio = 0
max_error_increase = 0.05
max_accuracy_drop = 0.02
alpha = 0.05
max_duration_s = 3600
step_min_samples = 1000000
step_min_duration_s = 600
"""
ROWS = 8
CHANNELS = 4  # separate connections, so the kernel spreads them over both workers


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return digits_repo(tmp_path / "repo", POLICY).parent


class Client:
    """Labelled digits traffic over several connections, and the control API."""

    def __init__(self, server: Process) -> None:
        data = np.load(MODELS / "digits" / "heldout.npz")
        self.x, self.y = data["X"], data["y"]
        self.rng = np.random.default_rng(7)
        self.count = 0
        self.channels = [
            grpc.insecure_channel(server.address, options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(CHANNELS)
        ]
        self.infer = [service_pb2_grpc.GRPCInferenceServiceStub(c) for c in self.channels]
        self.control = rgrpc.ReleaseServiceStub(grpc.insecure_channel(server.control))

    def burst(self, requests: int = 40) -> None:
        feedback = []
        for i in range(requests):
            rows = self.rng.integers(0, len(self.x), ROWS)
            request = service_pb2.ModelInferRequest(model_name="digits", id=f"r{self.count}")
            request.inputs.add(name="pixels", datatype="FP32", shape=[ROWS, 64])
            request.raw_input_contents.append(self.x[rows].tobytes())
            self.infer[i % CHANNELS].ModelInfer(request, timeout=10)
            feedback.append(rpb.Feedback(request_id=f"r{self.count}", labels=self.y[rows].astype(float).tolist()))
            self.count += 1
        self.control.SubmitFeedback(rpb.SubmitFeedbackRequest(model="digits", items=feedback), timeout=10)


def scrape(port: int) -> list[Sample]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def needed() -> set[str]:
    """The sample names the dashboard and the rules read; a histogram's _bucket also needs
    its _count and _sum (histogram_quantile reads buckets; means read the other two)."""
    names = set(queries.exported_names_needed())
    for name in list(names):
        if name.endswith("_bucket"):
            base = name.removesuffix("_bucket")
            names |= {f"{base}_count", f"{base}_sum"}
    return names


def where(samples: list[Sample], name: str, **labels: str) -> list[Sample]:
    return [s for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]


def value(samples: list[Sample], name: str, **labels: str) -> float:
    found = where(samples, name, **labels)
    assert len(found) == 1, (name, labels, found)
    return found[0].value


def current_phase(samples: list[Sample]) -> list[tuple[str, str]]:
    return [
        (s.labels["version"], s.labels["phase"])
        for s in where(samples, "gateway_rollout_phase", model="digits")
        if s.value == 1
    ]


def test_every_metric_the_dashboard_and_alerts_read_is_exported_by_a_multi_worker_gateway(repo: Path) -> None:
    args = ("--models", str(repo), "--workers", "2", "--metrics-port", "0")
    with gateway_process(*args) as server:
        port = server.launched.metrics_port
        assert port > 0
        client = Client(server)
        client.control.AddShadow(rpb.AddShadowRequest(model="digits", version="3", fraction=1.0, reason="t"))
        client.control.StartRollout(rpb.StartRolloutRequest(model="digits", candidate="2", reason="t"))
        want, deadline = needed(), time.monotonic() + 120
        while True:
            samples = scrape(port)
            missing = want - {s.name for s in samples}
            if not missing or time.monotonic() > deadline:
                break
            client.burst()
        read_by = queries.exported_names_needed()
        assert not missing, "\n".join(
            f"not exported: {m} (read by {read_by.get(m, 'a histogram panel')})" for m in missing
        )

        # One phase at a time, from one writer, though two workers export metrics.
        assert current_phase(samples) == [("2", "progressing")]
        assert value(samples, "gateway_rollout_step", model="digits", version="2") == 1.0
        # Each check has at most one verdict; those the last decision ran have exactly one.
        checks = {s.labels["check"] for s in where(samples, "gateway_rollout_check", model="digits", version="2")}
        assert "accuracy" in checks and "error_rate" in checks
        for check in checks:
            verdicts = where(samples, "gateway_rollout_check", model="digits", version="2", check=check)
            assert sorted(s.labels["verdict"] for s in verdicts) == ["fail", "inconclusive", "pass"]
            assert sum(s.value for s in verdicts) in (0.0, 1.0), check
        assert sum(s.value for s in where(samples, "gateway_rollout_check", check="error_rate")) == 1.0
        # The queue's capacity is each worker's batching.max_queue_size, summed like the depth.
        assert value(samples, "gateway_queue_capacity", model="digits", version="2") == 2 * 4096
        # Counters that alerts take increase() of are there at 0 before anything happened.
        rollback = {"model": "digits", "version": "2", "event": "rollback", "by": "operator"}
        assert value(samples, "gateway_rollout_events_total", **rollback) == 0.0
        assert value(samples, "gateway_rollout_events_total", **{**rollback, "event": "start_rollout"}) == 1.0
        shadow = {"model": "digits", "version": "3", "event": "add_shadow", "by": "operator"}
        assert value(samples, "gateway_rollout_events_total", **shadow) == 1.0

        client.control.Rollback(rpb.ModelActionRequest(model="digits", reason="operator says no"))
        samples = poll_until(
            lambda: scrape(port),
            lambda s: current_phase(s) == [("2", "rolled_back")],
            lambda: None,
            30,
            "the rolled_back phase",
        )
        # A rollback by a person is a rollback, counted once (not once per worker).
        assert value(samples, "gateway_rollout_events_total", **rollback) == 1.0
        assert sum(s.value for s in where(samples, "gateway_rollout_events_total", event="rollback")) == 1.0
        assert value(samples, "gateway_rollout_step", model="digits", version="2") == 0.0
        assert server.stop() == 0
