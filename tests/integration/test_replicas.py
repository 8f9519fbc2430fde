"""Several gateway replicas (separate processes, separate ports) on one PostgreSQL database,
a real one (tests/postgres.py): a release change made through one replica is served by the
others within a second, and one controller leads them all, replaced within two analysis
intervals when it is killed."""

from __future__ import annotations

import json
import shutil
import signal
import statistics
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import grpc
import numpy as np
import psycopg
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from gateway.protocol.pb import release_pb2 as rpb
from gateway.protocol.pb import release_pb2_grpc as rgrpc
from gateway.release.controller import LEASE
from tests.integration.test_rollout_decisions import DONE, audit, audit_lines, checks_of, wait_phase
from tests.postgres import PostgresServer
from tests.support import MODELS, Process, gateway_command, gateway_process
from tests.traffic import Load, digits_builder

pytest_plugins = ("tests.postgres",)

INTERVAL_S = 2.0


@pytest.fixture
def replica_repo(tmp_path: Path) -> Path:
    """The digits model with a short analysis interval (the failover bound is two of them)."""
    root = tmp_path / "repo"
    shutil.copytree(MODELS / "digits", root / "digits")
    spec = root / "digits" / "model.toml"
    spec.write_text(spec.read_text() + f"\n[policy]\ninterval_s = {INTERVAL_S}\n")
    return root


def start_replicas(stack: ExitStack, repo: Path, state_url: str, count: int) -> list[Process]:
    """Replicas r0, r1, ...: one serving process each (its controller's lease holder is `rN/0 pid P`)."""
    args = ("--models", str(repo), "--state-url", state_url, "--workers", "1")
    return [stack.enter_context(gateway_process(*args, "--replica-id", f"r{i}")) for i in range(count)]


def control(replica: Process) -> rgrpc.ReleaseServiceStub:
    return rgrpc.ReleaseServiceStub(grpc.insecure_channel(replica.control))


@pytest.fixture
def replicas(replica_repo: Path, state_url: str) -> Iterator[list[Process]]:
    with ExitStack() as stack:
        yield start_replicas(stack, replica_repo, state_url, 2)


def lease_holder(state_url: str) -> tuple[str, int] | None:
    with psycopg.connect(state_url) as conn:
        row = conn.execute(f"SELECT holder, epoch FROM leases WHERE name = '{LEASE}'").fetchone()
    return None if row is None else (str(row[0]), int(row[1]))


def test_a_weight_change_through_one_replica_is_served_by_the_other_within_a_second(
    replicas: list[Process],
) -> None:
    a, b = (control(r) for r in replicas)
    waits = []
    for weight in (100, 2500, 5000, 10, 0, 7500, 1, 9999):
        a.SetTraffic(rpb.SetTrafficRequest(model="digits", canary="2", weight_bp=weight, reason="test"), timeout=10)
        changed = time.monotonic()
        while True:
            waited = time.monotonic() - changed
            release = b.GetRelease(rpb.GetReleaseRequest(model="digits"), timeout=10)
            if release.canary == "2" and release.canary_weight_bp == weight:
                break
            assert waited < 1.0, f"replica B still serves {release.canary_weight_bp} bp after {waited:.2f} s"
            time.sleep(0.01)
        waits.append(waited)
    # NOTIFY wakes B at once; the half-second poll alone would average ~0.25 s.
    assert statistics.median(waits) < 0.2, waits


def test_one_controller_leads_and_another_takes_over_within_two_intervals_of_a_kill_9(
    replicas: list[Process], state_url: str
) -> None:
    pids = {f"r{i}/0 pid {r.proc.pid}": r for i, r in enumerate(replicas)}
    deadline = time.monotonic() + 10
    while (held := lease_holder(state_url)) is None or held[0] not in pids:
        assert time.monotonic() < deadline, f"no replica took the controller lease: {held}"
        time.sleep(0.1)
    holder, epoch = held
    leader = pids[holder]
    (survivor_holder,) = set(pids) - {holder}
    time.sleep(2.0)
    assert lease_holder(state_url) == (holder, epoch), "the lease moved while its holder ran"
    leader.proc.send_signal(signal.SIGKILL)
    leader.proc.wait(10)
    killed = time.monotonic()
    while (now := lease_holder(state_url)) != (survivor_holder, epoch + 1):
        assert time.monotonic() - killed < 2 * INTERVAL_S, f"no takeover {2 * INTERVAL_S:g} s after the kill: {now}"
        time.sleep(0.05)
    # The survivor, now leading, still serves and changes releases.
    survivor = control(pids[survivor_holder])
    survivor.SetTraffic(rpb.SetTrafficRequest(model="digits", canary="2", weight_bp=300, reason="t"), timeout=10)
    assert survivor.GetRelease(rpb.GetReleaseRequest(model="digits"), timeout=10).canary_weight_bp == 300


# One 50 % step, decided on errors only (latency off: its paired check needs thousands of
# rows an arm to pass an A/A, which is not what these tests are about).
ONE_STEP = """
[policy]
interval_s = 0.5
max_latency_ratio = 0
max_accuracy_drop = 0.25
step_weights = [50]
min_samples = 450
step_min_samples = 450
step_min_duration_s = 2
max_duration_s = 120
"""


def aa_repo(tmp_path: Path, policy: str) -> Path:
    """digits with v4 a byte-identical copy of v1 (an A/A rollout) under `policy`."""
    repo = tmp_path / "repo"
    shutil.copytree(MODELS / "digits", repo / "digits")
    shutil.copytree(repo / "digits" / "1", repo / "digits" / "4")
    spec = repo / "digits" / "model.toml"
    spec.write_text(spec.read_text() + policy)
    return repo


def versions_served(address: str, keys: list[str]) -> list[str]:
    """The version each routing key's request was answered by, from one replica (16 calls in flight)."""
    data = np.load(MODELS / "digits" / "heldout.npz")["X"][:1]
    with grpc.insecure_channel(address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        answers: list[str] = []
        for start in range(0, len(keys), 16):
            calls = []
            for key in keys[start : start + 16]:
                request = service_pb2.ModelInferRequest(model_name="digits")
                request.parameters["routing_key"].string_param = key
                request.inputs.add(name="pixels", datatype="FP32", shape=[1, 64])
                request.raw_input_contents.append(data.tobytes())
                calls.append(stub.ModelInfer.future(request, timeout=30))
            answers += [call.result().model_version for call in calls]
    return answers


def test_three_replicas_route_alike_merge_their_evidence_and_labels_and_decide_on_everyones(
    tmp_path: Path, state_url: str
) -> None:
    repo = aa_repo(tmp_path, ONE_STEP)
    with ExitStack() as stack:
        replicas = start_replicas(stack, repo, state_url, 3)
        controls = [control(r) for r in replicas]
        controls[0].SetTraffic(
            rpb.SetTrafficRequest(model="digits", canary="4", weight_bp=3000, reason="t"), timeout=10
        )
        changed = time.monotonic()
        for c in controls:  # a weight change through one replica is served by the others within a second
            while c.GetRelease(rpb.GetReleaseRequest(model="digits"), timeout=10).canary_weight_bp != 3000:
                assert time.monotonic() - changed < 1.0
                time.sleep(0.01)
        # 3,000 routing keys: the same version from every replica, and the split as set.
        keys = [f"user-{i}" for i in range(3000)]
        served = [versions_served(r.address, keys) for r in replicas]
        assert served[0] == served[1] == served[2]
        assert 0.27 < served[0].count("4") / len(keys) < 0.33

        # Labelled traffic on every replica, its labels sent to the next one: each label set
        # reaches a replica that did not make the prediction. Every replica's report counts
        # everyone's requests and joins.
        loads = [
            Load(
                r.address,
                replicas[(i + 1) % 3].control,
                "digits",
                digits_builder(seed=i),
                clients=1,
                label_delay_s=0.2,
                prefix=f"r{i}-",
                max_requests=150,
            )
            for i, r in enumerate(replicas)
        ]
        for load in loads:
            load.start()
        for load in loads:
            load.stop_when_done(60)
        sent = sum(load.sent for load in loads)
        assert sent == 450 and not any(load.failed for load in loads)
        routed = 9000 + sent  # the routing-key probes above count too

        def merged(c: rgrpc.ReleaseServiceStub) -> tuple[int, int]:
            report = c.GetReport(rpb.GetReportRequest(model="digits"), timeout=10)
            return sum(v.requests for v in report.versions), report.feedback_joined

        deadline = time.monotonic() + 10
        while any(merged(c) != (routed, sent) for c in controls):
            assert time.monotonic() < deadline, [merged(c) for c in controls]
            time.sleep(0.2)
        report = controls[2].GetReport(rpb.GetReportRequest(model="digits"), timeout=10)
        assert report.deployment.replicas == 3 and report.deployment.store.startswith("postgresql ")
        assert report.deployment.leader.split("/")[0] in {"r0", "r1", "r2"}, report.deployment
        status = subprocess.run(
            [*gateway_command("status"), "--control", replicas[1].control], capture_output=True, text=True, timeout=30
        )
        assert status.returncode == 0, status.stderr
        assert f"leader: {report.deployment.leader}; evidence merged from 3 replica(s)" in status.stdout, status.stdout
        assert "store: postgresql postgresql://" in status.stdout, status.stdout

        # A rollout decided on the merged evidence: 400 labelled requests a replica, half of them
        # on the canary, each label sent to another replica, and checks that need 450 requests
        # and 450 labelled rows an arm: no replica alone could pass them.
        controls[0].SetTraffic(rpb.SetTrafficRequest(model="digits", canary="", weight_bp=0, reason="t"), timeout=10)
        while controls[1].GetRelease(rpb.GetReleaseRequest(model="digits"), timeout=10).canary:
            time.sleep(0.05)  # a change through a replica that has not installed the last one is refused
        controls[1].StartRollout(rpb.StartRolloutRequest(model="digits", candidate="4", reason="A/A"), timeout=10)
        loads = [
            Load(
                r.address,
                replicas[(i + 1) % 3].control,
                "digits",
                digits_builder(seed=10 + i),
                clients=1,
                label_delay_s=0.2,
                prefix=f"b{i}-",
                max_requests=400,
            )
            for i, r in enumerate(replicas)
        ]
        for load in loads:
            load.start()
        for load in loads:
            load.stop_when_done(60)
        assert sum(load.sent for load in loads) == 3 * 400
        done = wait_phase(controls[2], "digits", DONE, timeout=60)
        records = audit(controls[0], "digits")
        assert done.phase == "succeeded", audit_lines(controls[0], "digits")
        promoted = next(r for r in records if r.action == "promote")
        canary_requests = checks_of(promoted)["step_requests"]["value"]
        on_each = [load.roles.get("canary", 0) for load in loads]
        assert canary_requests == sum(on_each) >= 450 > 400, (canary_requests, on_each)
        accuracy = checks_of(promoted)["accuracy"]
        assert accuracy["verdict"] == "pass" and accuracy["samples"] >= 450, accuracy  # labelled rows an arm


def metric(replica: Process, name: str) -> float:
    url = f"http://127.0.0.1:{replica.launched.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")]
    assert values, f"{name} not exported"
    return values[0]


def store_up_becomes(replicas: list[Process], value: float, within_s: float = 6.0) -> bool:
    """Each replica's follower looks at the store twice a second; a busy machine can delay one look."""
    deadline = time.monotonic() + within_s
    while not all(metric(r, "gateway_release_store_up") == value for r in replicas):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_a_ten_second_database_outage_under_traffic_loses_no_request_and_no_evidence(
    replica_repo: Path, own_postgres_server: PostgresServer
) -> None:
    state_url = own_postgres_server.new_database()
    with ExitStack() as stack:
        args = ("--models", str(replica_repo), "--state-url", state_url, "--workers", "1", "--metrics-port", "0")
        replicas = [stack.enter_context(gateway_process(*args, "--replica-id", f"r{i}")) for i in range(2)]
        a, b = (control(r) for r in replicas)
        loads = [
            stack.enter_context(
                Load(r.address, r.control, "digits", digits_builder(seed=i), clients=1, prefix=f"o{i}-")
            )
            for i, r in enumerate(replicas)
        ]
        time.sleep(1.0)
        own_postgres_server.stop()
        stopped = time.monotonic()
        assert store_up_becomes(replicas, 0)  # each replica has found it down (a metric says so)
        # Release changes fail fast, with a message naming the store and the fix.
        began = time.monotonic()
        with pytest.raises(grpc.RpcError) as refused:
            a.SetTraffic(rpb.SetTrafficRequest(model="digits", canary="2", weight_bp=500, reason="t"), timeout=10)
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE, refused.value.details()
        assert time.monotonic() - began < 2.0
        assert "state_url" in (refused.value.details() or "") and "database server" in (refused.value.details() or "")
        # Status and metrics say so; reads keep answering from what was installed.
        status = subprocess.run(
            [*gateway_command("status"), "--control", replicas[1].control], capture_output=True, text=True, timeout=30
        )
        assert status.returncode == 0 and "UNREACHABLE" in status.stdout, status.stdout + status.stderr
        assert b.GetRelease(rpb.GetReleaseRequest(model="digits"), timeout=10).stable == "1"
        time.sleep(max(0.0, 10.0 - (time.monotonic() - stopped)))
        own_postgres_server.start()
        back = time.monotonic()
        while True:
            try:
                a.SetTraffic(rpb.SetTrafficRequest(model="digits", canary="2", weight_bp=500, reason="t"), timeout=10)
                break
            except grpc.RpcError as exc:
                assert exc.code() is grpc.StatusCode.UNAVAILABLE, exc.details()
                assert time.monotonic() - back < 5, "release changes still refused 5 s after the database returned"
                time.sleep(0.2)
        recovered = time.monotonic() - back
        for load in loads:
            load.stop()
        sent = sum(load.sent for load in loads)
        assert sum(load.failed for load in loads) == 0 and sent > 0
        # Each replica's counts grew through the outage and reached the store once it returned.
        deadline = time.monotonic() + 10
        while (merged := sum(v.requests for v in b.GetReport(rpb.GetReportRequest(model="digits")).versions)) != sent:
            assert time.monotonic() < deadline, (merged, sent)
            time.sleep(0.2)
        assert store_up_becomes(replicas, 1)
        print(f"outage: {sent} requests, 0 failed; release changes accepted {recovered:.1f} s after the restart")


THREE_STEPS = f"""
[policy]
interval_s = {INTERVAL_S}
max_latency_ratio = 0
step_weights = [10, 25, 50]
min_samples = 50
step_min_samples = 50
step_min_duration_s = 1
max_duration_s = 120
"""


def test_the_leader_killed_mid_rollout_is_replaced_and_the_rollout_completes_with_each_decision_once(
    tmp_path: Path, state_url: str
) -> None:
    repo = aa_repo(tmp_path, THREE_STEPS)
    with ExitStack() as stack:
        replicas = start_replicas(stack, repo, state_url, 3)
        controls = [control(r) for r in replicas]
        deadline = time.monotonic() + 10
        while not (leader := controls[0].GetReport(rpb.GetReportRequest(model="digits")).deployment.leader):
            assert time.monotonic() < deadline, "no replica took the controller lease"
            time.sleep(0.1)
        first = int(leader.split("/")[0][1:])  # "r1/0 pid 123" -> 1
        others = [i for i in range(3) if i != first]
        for i in others:  # traffic on the replicas that survive: their evidence decides throughout
            stack.enter_context(
                Load(replicas[i].address, replicas[i].control, "digits", digits_builder(seed=i), prefix=f"k{i}-")
            )
        survivor = controls[others[0]]
        survivor.StartRollout(rpb.StartRolloutRequest(model="digits", candidate="4", reason="A/A"), timeout=10)
        deadline = time.monotonic() + 60
        while not any(r.action == "advance" for r in audit(survivor, "digits")):
            assert time.monotonic() < deadline, audit_lines(survivor, "digits")
            time.sleep(0.1)
        replicas[first].proc.send_signal(signal.SIGKILL)
        replicas[first].proc.wait(10)
        killed = time.monotonic()
        while (now := survivor.GetReport(rpb.GetReportRequest(model="digits")).deployment.leader).startswith(
            f"r{first}/"
        ) or not now:
            assert time.monotonic() - killed < 2 * INTERVAL_S, f"no takeover {2 * INTERVAL_S:g} s after the kill"
            time.sleep(0.05)
        done = wait_phase(survivor, "digits", DONE, timeout=60)
        records = audit(survivor, "digits")
        assert done.phase == "succeeded" and done.stable == "4", audit_lines(survivor, "digits")
        # A complete audit: every step once, one promotion, no decision made twice.
        decisions = [(r.action, json.loads(r.after_json).get("canary_weight_bp")) for r in records]
        rollout = decisions[[a for a, _ in decisions].index("start_rollout") :]
        steps = [("start_rollout", 1000), ("advance", 2500), ("advance", 5000), ("advance", 10_000), ("promote", 0)]
        assert rollout == steps, decisions  # the last step's pass moves all traffic, then promotes
