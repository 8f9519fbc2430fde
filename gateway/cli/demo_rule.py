"""The routing-rule step of `gateway demo`: after v3's rollback, the internal tenant keeps
reaching v3 through a rule while everyone else stays on the stable version, and the report
counts that cohort apart from the split (docs/routing.md)."""

from __future__ import annotations

import grpc
import numpy as np
from rich.console import Console

from gateway.cli.rules_text import route_lines
from gateway.protocol.pb import inference_pb2 as pb
from gateway.protocol.pb import inference_pb2_grpc as pb_grpc
from gateway.protocol.pb import release_pb2 as rpb
from gateway.protocol.pb import release_pb2_grpc as rgrpc

COMMAND = "gateway route add digits internal --param tenant=internal --to 3"
REQUESTS = 20  # each way: with the internal tenant and without


def show_rule(console: Console, control: rgrpc.ReleaseServiceStub, address: str, pixels: np.ndarray) -> None:
    """Add the rule, send a few requests each way, and say where they went and how they are counted."""
    console.rule("a routing rule: the internal tenant keeps trying v3")
    match = rpb.RouteMatch(source="param", key="tenant", op="exact", values=["internal"])
    route = rpb.Route(name="internal", match=[match], to="version", version="3")
    request = rpb.AddRouteRequest(model="digits", route=route, reason="demo: v3 on internal traffic only")
    release = control.AddRoute(request, timeout=5)
    console.print(f"added (as `{COMMAND}` does), tried before the weighted split:", markup=False)
    for line in route_lines(release.routes):
        console.print(line, markup=False)
    infer = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(address))  # type: ignore[no-untyped-call]
    served: dict[str, set[str]] = {"internal": set(), "other": set()}
    for i in range(2 * REQUESTS):
        tenant = "internal" if i % 2 else "other"
        message = pb.ModelInferRequest(model_name="digits", id=f"demo-rule-{i}")
        message.parameters["tenant"].string_param = tenant
        message.inputs.add(name="pixels", datatype="FP32", shape=[1, 64])
        message.raw_input_contents.append(pixels[i % len(pixels) : i % len(pixels) + 1].tobytes())
        served[tenant].add(infer.ModelInfer(message, timeout=5).model_version)
    console.print(
        f"tenant=internal: {REQUESTS} requests served by v{', v'.join(sorted(served['internal']))}; "
        f"other tenants: {REQUESTS} requests served by v{', v'.join(sorted(served['other']))} (the split)",
        markup=False,
    )
    report = control.GetReport(rpb.GetReportRequest(model="digits"), timeout=5)
    for row in report.routed:
        console.print(
            f"counted apart: {row.role} -> v{row.version}: {row.requests} requests, in no canary comparison",
            markup=False,
        )
