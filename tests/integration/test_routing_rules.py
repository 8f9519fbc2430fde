"""Routing rules on real gateways (issue 18): a cohort always reaches its target while the
rest split by weight, rule-routed traffic is counted apart from the split's evidence, rules
survive a restart and replicate through the store, and invalid rules are refused with exit
status 1 and the field named (the CLI as a subprocess)."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from gateway.protocol.pb import release_pb2 as rpb
from gateway.protocol.pb import release_pb2_grpc as rgrpc
from gateway.release.routing import route_point
from tests.integration.rest_support import infer_body, tensor
from tests.integration.test_cli_release import cli
from tests.integration.test_deploy_metrics import scrape, where
from tests.support import MODELS, Process, gateway_process

pytest_plugins = ("tests.postgres",)

PIXELS = np.load(MODELS / "digits" / "heldout.npz")["X"][:1].astype(np.float32)
WEIGHT_BP = 3000


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    shutil.copytree(MODELS / "digits", root / "digits")
    return root


def control(server: Process) -> rgrpc.ReleaseServiceStub:
    return rgrpc.ReleaseServiceStub(grpc.insecure_channel(server.control))


def request(key: str, tenant: str | None = None) -> service_pb2.ModelInferRequest:
    message = service_pb2.ModelInferRequest(model_name="digits", id=key)
    message.parameters["routing_key"].string_param = key
    if tenant is not None:
        message.parameters["tenant"].string_param = tenant
    message.inputs.add(name="pixels", datatype="FP32", shape=[1, 64])
    message.raw_input_contents.append(PIXELS.tobytes())
    return message


def internal_rule(name: str = "internal", to: str = "canary") -> rpb.Route:
    match = rpb.RouteMatch(source="param", key="tenant", op="exact", values=["internal"])
    return rpb.Route(name=name, match=[match], to=to)


def served(server: Process, messages: list[service_pb2.ModelInferRequest], clients: int = 4) -> list[tuple[str, str]]:
    """Send every message (from `clients` threads); (version, role) of each answer, in order."""
    answers: list[tuple[str, str]] = [("", "")] * len(messages)

    def send(part: range) -> None:
        with grpc.insecure_channel(server.address) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            for i in part:
                reply = stub.ModelInfer(messages[i], timeout=30)
                answers[i] = (reply.model_version, reply.parameters["role"].string_param)

    threads = [threading.Thread(target=send, args=(range(c, len(messages), clients),)) for c in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    return answers


def test_a_tenant_always_reaches_the_canary_while_the_rest_split_by_weight(repo: Path) -> None:
    rng = random.Random(18)
    keys = [f"user-{rng.getrandbits(64):016x}" for _ in range(5000)]
    # Every fifth request comes from the internal tenant; the others from two other tenants or none.
    tenants = [("internal" if i % 5 == 0 else rng.choice(["acme", "globex", None])) for i in range(5000)]
    args = ("--models", str(repo), "--workers", "1", "--no-controller", "--metrics-port", "0")
    with gateway_process(*args) as server:
        stub = control(server)
        stub.SetTraffic(rpb.SetTrafficRequest(model="digits", canary="2", weight_bp=WEIGHT_BP, reason="canary"))
        release = stub.AddRoute(rpb.AddRouteRequest(model="digits", route=internal_rule(), reason="dogfood"))
        assert [r.name for r in release.routes] == ["internal"]
        answers = served(server, [request(k, t) for k, t in zip(keys, tenants, strict=True)])
        report = stub.GetReport(rpb.GetReportRequest(model="digits"), timeout=10)
        # Prometheus has the cohort in its own counter (synced from the report every sample period).
        labels = {"model": "digits", "version": "2", "rule": "internal", "outcome": "ok"}
        counted = 0.0
        deadline = time.monotonic() + 20
        while counted != 1000:
            assert time.monotonic() < deadline, f"gateway_rule_routed_requests_total is {counted}, not 1000"
            time.sleep(0.5)
            samples = where(scrape(server.launched.metrics_port), "gateway_rule_routed_requests_total", **labels)
            counted = samples[0].value if samples else 0.0
    internal = [a for a, t in zip(answers, tenants, strict=True) if t == "internal"]
    others = [(a, k) for a, k, t in zip(answers, keys, tenants, strict=True) if t != "internal"]
    assert len(internal) == 1000 and set(internal) == {("2", "rule")}
    share = sum(version == "2" for (version, _), _ in others) / len(others)
    assert abs(share - WEIGHT_BP / 10_000) <= 0.02, share
    # The split is the sticky one: each key's side is where its point falls.
    assert all((version == "2") == (route_point(k) * 10_000 < WEIGHT_BP) for (version, _), k in others)
    # The cohort is counted apart: the canary's row (the comparison's arm) holds split traffic only.
    by_version = {v.version: v for v in report.versions}
    split_canary = sum(version == "2" for (version, _), _ in others)
    assert by_version["2"].requests == split_canary
    assert by_version["1"].requests == len(others) - split_canary
    (routed,) = report.routed
    assert (routed.version, routed.role, routed.requests) == ("2", "rule internal", 1000)


def test_header_rules_route_grpc_metadata_and_rest_headers_and_a_rule_without_a_canary_falls_to_the_split(
    repo: Path,
) -> None:
    with gateway_process("--models", str(repo), "--workers", "1", "--no-controller") as server:
        stub = control(server)
        beta = rpb.RouteMatch(source="header", key="X-Cohort", op="regex", values=["^beta"])
        stub.AddRoute(
            rpb.AddRouteRequest(model="digits", route=rpb.Route(name="beta", match=[beta], to="version", version="3"))
        )
        stub.AddRoute(rpb.AddRouteRequest(model="digits", route=internal_rule()))  # no canary yet
        with grpc.insecure_channel(server.address) as channel:
            infer = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            reply = infer.ModelInfer(request("k1"), metadata=(("x-cohort", "beta-7"),), timeout=30)
            assert (reply.model_version, reply.parameters["rule"].string_param) == ("3", "beta")
            assert infer.ModelInfer(request("k1"), metadata=(("x-cohort", "alpha"),), timeout=30).model_version == "1"
            # The canary rule matches, but there is no canary: the split (all stable) serves it.
            reply = infer.ModelInfer(request("k2", tenant="internal"), timeout=30)
            assert (reply.model_version, reply.parameters["role"].string_param) == ("1", "stable")
        body = infer_body(tensor("pixels", PIXELS), parameters={"routing_key": "k3"})
        url = f"http://{server.http}/v2/models/digits/infer"
        beta_reply = httpx.post(url, json=body, headers={"X-Cohort": "beta"}, timeout=30).json()
        assert (beta_reply["model_version"], beta_reply["parameters"]["rule"]) == ("3", "beta")
        assert httpx.post(url, json=body, timeout=30).json()["model_version"] == "1"


def test_rules_survive_a_restart_on_the_same_state_dir(repo: Path, tmp_path: Path) -> None:
    state = str(tmp_path / "state")
    args = ("--models", str(repo), "--state-dir", state, "--workers", "1", "--no-controller")
    with gateway_process(*args) as server:
        stub = control(server)
        stub.SetTraffic(rpb.SetTrafficRequest(model="digits", canary="2", weight_bp=0, reason="dark launch"))
        stub.AddRoute(rpb.AddRouteRequest(model="digits", route=internal_rule(), reason="dogfood"))
    with gateway_process(*args) as server:
        routes = control(server).ListRoutes(rpb.ListRoutesRequest(model="digits"), timeout=10).routes
        assert [(r.name, r.to, list(r.match[0].values)) for r in routes] == [("internal", "canary", ["internal"])]
        # A canary at 0 % serves the cohort only.
        answers = served(server, [request(f"k{i}", "internal" if i % 2 else None) for i in range(40)], clients=1)
        assert answers[1::2] == [("2", "rule")] * 20 and answers[::2] == [("1", "stable")] * 20


def test_a_rule_added_through_one_replica_is_applied_by_the_other(repo: Path, state_url: str) -> None:
    with ExitStack() as stack:
        a, b = (
            stack.enter_context(gateway_process("--models", str(repo), "--state-url", state_url, "--workers", "1"))
            for _ in range(2)
        )
        control(a).SetTraffic(rpb.SetTrafficRequest(model="digits", canary="2", weight_bp=0, reason="dark"))
        control(a).AddRoute(rpb.AddRouteRequest(model="digits", route=internal_rule(), reason="dogfood"))
        deadline = time.monotonic() + 10
        while not control(b).ListRoutes(rpb.ListRoutesRequest(model="digits"), timeout=10).routes:
            assert time.monotonic() < deadline, "replica B never saw the rule"
            time.sleep(0.05)
        assert served(b, [request("k", "internal")], clients=1) == [("2", "rule")]
        control(a).RemoveRoute(rpb.RemoveRouteRequest(model="digits", name="internal", reason="done"))
        while control(b).ListRoutes(rpb.ListRoutesRequest(model="digits"), timeout=10).routes:
            assert time.monotonic() < deadline + 10, "replica B never dropped the rule"
            time.sleep(0.05)
        assert served(b, [request("k", "internal")], clients=1) == [("1", "stable")]


@pytest.fixture(scope="module")
def cli_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    root = tmp_path_factory.mktemp("routes-cli")
    shutil.copytree(MODELS / "digits", root / "digits")
    with gateway_process("--models", str(root), "--workers", "1", "--no-controller") as running:
        yield running


def route_cli(server: Process, *args: str) -> subprocess.CompletedProcess[str]:
    return cli(server, "route", *args, token=None)


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (("--param", "tenant:regex=(unclosed", "--to", "canary"), "route 'bad' match[0].values"),
        (("--param", "tenant:regex=^(a)\\1$", "--to", "canary"), "no backreferences or lookaround"),
        (("--param", "tenant=x", "--to", "9"), "route.version '9' is not a loaded version"),
        (("--param", "tenant=x", "--to", "canry"), "route to stable, canary or a loaded version"),
        (("--to", "canary"), "has no match"),
        (("--header", "x-cohort", "--to", "canary"), "expected NAME=VALUE"),
    ],
    ids=["bad-regex", "backreference-regex", "unknown-version", "unknown-role", "empty-match", "no-value"],
)
def test_invalid_rules_are_refused_with_exit_1_and_the_field(
    cli_server: Process, args: tuple[str, ...], named: str
) -> None:
    result = route_cli(cli_server, "add", "digits", "bad", *args)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert named in result.stderr and result.stderr.startswith("gateway: "), result.stderr
    assert "bad" not in route_cli(cli_server, "list", "digits").stdout


def test_the_cli_adds_lists_shows_and_removes_rules_and_the_audit_has_them(cli_server: Process) -> None:
    add = route_cli(
        cli_server, "add", "digits", "staff", "--param", "tenant:in=staff,qa", "--header", "x-region:prefix=eu",
        "--to", "stable", "--reason", "staff on stable",
    )  # fmt: skip
    assert add.returncode == 0, add.stderr
    first = route_cli(cli_server, "add", "digits", "pinned", "--param", "tenant=beta", "--to", "3", "--position", "1")
    assert first.returncode == 0, first.stderr
    listed = route_cli(cli_server, "list", "digits")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines() == [
        "  rule 1. pinned: param tenant = 'beta' -> version 3",
        "  rule 2. staff: param tenant in {staff, qa} and header x-region starts with 'eu' -> stable",
    ]
    status = cli(cli_server, "status", token=None)
    assert "rule 1. pinned" in status.stdout and "rule 2. staff" in status.stdout, status.stdout
    taken = route_cli(cli_server, "add", "digits", "staff", "--param", "tenant=x", "--to", "stable")
    assert taken.returncode == 1 and "is taken" in taken.stderr
    for name in ("pinned", "staff"):
        removed = route_cli(cli_server, "remove", "digits", name, "--reason", "over")
        assert removed.returncode == 0, removed.stderr
    missing = route_cli(cli_server, "remove", "digits", "staff")
    assert missing.returncode == 1 and "no routing rule named 'staff'" in missing.stderr
    assert "no routing rules" in route_cli(cli_server, "list", "digits").stdout
    records = control(cli_server).GetAuditLog(rpb.GetAuditLogRequest(model="digits", limit=1000)).records
    actions = [(r.action, r.outcome) for r in records if "route" in r.action]
    assert ("add_route", "applied") in actions and ("remove_route", "applied") in actions
    assert ("add_route", "refused") in actions  # the refusals above are audited too
    helped = route_cli(cli_server, "add", "--help")
    assert helped.returncode == 0 and "gateway route add digits internal --param tenant=internal" in helped.stdout


def test_adding_and_removing_rules_takes_the_write_role_and_listing_the_read_role(repo: Path) -> None:
    write, read = "w" * 24, "r" * 24
    tokens = {"GATEWAY_CONTROL_TOKENS": f"alice:write:{write},bob:read:{read}"}
    with gateway_process("--models", str(repo), "--workers", "1", "--no-controller", env=tokens) as server:
        args = ("route", "add", "digits", "internal", "--param", "tenant=internal", "--to", "canary")
        refused = cli(server, *args, token=read)
        assert refused.returncode == 3 and "write role" in refused.stderr, refused.stderr
        assert cli(server, *args, token=write).returncode == 0
        listed = cli(server, "route", "list", "digits", token=read)
        assert listed.returncode == 0 and "internal: param tenant = 'internal' -> canary" in listed.stdout
        assert cli(server, "route", "remove", "digits", "internal", token=read).returncode == 3
        audit = control(server).GetAuditLog(
            rpb.GetAuditLogRequest(model="digits"), metadata=(("authorization", f"Bearer {read}"),)
        )
        (added,) = [r for r in audit.records if r.action == "add_route"]
        assert added.actor == "alice" and '"rules"' in added.after_json and '"rules"' not in added.before_json


@pytest.mark.parametrize(
    "route",
    [
        rpb.Route(name="r", match=[rpb.RouteMatch(source="param", key="t", op="regex", values=["(("])], to="canary"),
        rpb.Route(name="r", match=[rpb.RouteMatch(source="param", key="t", op="exact", values=["x"])], to="somewhere"),
        rpb.Route(name="r", match=[rpb.RouteMatch(source="param", key="t", op="exact", values=["x"])], to="version"),
        rpb.Route(name="r", to="canary"),
    ],
    ids=["bad-regex", "unknown-role", "no-version", "empty-match"],
)
def test_invalid_rules_are_invalid_argument_on_the_control_api(cli_server: Process, route: rpb.Route) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        control(cli_server).AddRoute(rpb.AddRouteRequest(model="digits", route=route), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert "route" in (caught.value.details() or "")


def test_a_cohort_routed_to_the_canary_during_a_rollout_is_no_evidence_for_its_steps(tmp_path: Path) -> None:
    """In a real rollout: a thousand requests the rule sends to the canary count for the rule
    alone; the step's exposure (candidate requests) and the comparison see only the split's."""
    repo = tmp_path / "repo"
    shutil.copytree(MODELS / "digits", repo / "digits")
    spec = repo / "digits" / "model.toml"
    # One step at 10 % that needs more canary requests than this test sends: it stays there.
    policy = "\n[policy]\ninterval_s = 0.3\nstep_weights = [10]\nstep_min_samples = 100000\nmax_latency_ratio = 0\n"
    spec.write_text(spec.read_text() + policy)
    with gateway_process("--models", str(repo), "--workers", "1") as server:
        stub = control(server)
        stub.AddRoute(rpb.AddRouteRequest(model="digits", route=internal_rule(), reason="dogfood"))
        stub.StartRollout(rpb.StartRolloutRequest(model="digits", candidate="2", reason="v2"))
        answers = served(server, [request(f"k{i}", "internal") for i in range(1000)])
        assert set(answers) == {("2", "rule")}
        deadline = time.monotonic() + 20
        while True:  # the controller's view is the report's: wait for an assessment after the traffic
            shown = cli(server, "report", "digits", "--json", token=None)
            assert shown.returncode == 0, shown.stderr
            data = json.loads(shown.stdout)
            checks = {c["check"]: c for c in data.get("rollout", {}).get("checks", [])}
            if "step_requests" in checks and data["routed"]:
                break
            assert time.monotonic() < deadline, shown.stdout
            time.sleep(0.3)
        release = stub.GetRelease(rpb.GetReleaseRequest(model="digits"), timeout=10)
    assert (release.phase, release.canary, release.canary_weight_bp) == ("progressing", "2", 1000)
    assert checks["step_requests"]["value"] == 0, checks["step_requests"]  # not the cohort's 1,000
    assert checks["error_rate"]["samples"] == 0, checks["error_rate"]
    assert [(r["version"], r["role"], r["requests"]) for r in data["routed"]] == [("2", "rule internal", 1000)]


def test_a_reason_holding_nul_is_invalid_not_a_store_outage_on_postgresql(repo: Path, state_url: str) -> None:
    """PostgreSQL text cannot hold NUL: such a reason (any client can send one over gRPC) was
    written as it came, the write failed, and the caller was told the store was unavailable."""
    with gateway_process("--models", str(repo), "--state-url", state_url, "--workers", "1") as server:
        stub = control(server)
        calls = [
            lambda: stub.AddRoute(rpb.AddRouteRequest(model="digits", route=internal_rule(), reason="a\x00b")),
            lambda: stub.SetTraffic(rpb.SetTrafficRequest(model="digits", canary="2", weight_bp=0, reason="\x00")),
            lambda: stub.Approve(rpb.ModelActionRequest(model="digits", reason="ok\x00")),
        ]
        for call in calls:
            with pytest.raises(grpc.RpcError) as caught:
                call()
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
            assert "reason holds a NUL character" in (caught.value.details() or "")
        added = stub.AddRoute(rpb.AddRouteRequest(model="digits", route=internal_rule(), reason="plain"), timeout=10)
        assert [r.name for r in added.routes] == ["internal"]
