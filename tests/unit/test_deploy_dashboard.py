"""deploy/grafana/gateway-dashboard.json: what the generator writes, in the SDK's typed
model, every query valid PromQL over the chosen model and versions, laid out without overlaps."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from deploy import queries
from deploy.grafana import dashboard
from gateway.release.confidence import Verdict
from gateway.release.policy import Phase

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def board() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(dashboard.OUTPUT.read_text())
    return data


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in board["panels"] if p["type"] != "row"]


def test_the_committed_json_is_the_generators_output() -> None:
    assert dashboard.OUTPUT.read_text() == dashboard.render(), (
        "deploy/grafana/gateway-dashboard.json is stale: run python deploy/grafana/dashboard.py"
    )


def test_the_dashboard_is_a_fixed_point_of_the_sdks_typed_model(board: dict[str, Any]) -> None:
    # Decoding drops any key the SDK's model of a dashboard, panel type or query does not know.
    assert dashboard.typed_round_trip(board) == board
    broken = json.loads(json.dumps(board))
    broken["panels"][1]["options"]["legend"]["placment"] = "bottom"
    assert dashboard.typed_round_trip(broken) != broken


def test_every_query_parses_as_promql() -> None:
    found = queries.dashboard_queries() + queries.rule_queries()
    assert len(found) > 30
    failures = []
    for query in found:
        try:
            queries.metric_names(query)
        except ValueError as exc:
            failures.append(f"{query.where}: {exc}")
    assert not failures, "\n".join(failures)


def test_a_query_that_is_not_promql_is_caught() -> None:
    with pytest.raises(ValueError):
        queries.metric_names(queries.Query("test", "sum by (version (rate(x[$__rate_interval]))"))
    with pytest.raises(ValueError, match="unknown Grafana variable"):
        _ = queries.Query("test", "x{model=~'$modle'}").promql


def test_every_panel_reads_the_chosen_model_and_versions_from_the_chosen_data_source(board: dict[str, Any]) -> None:
    names = [v["name"] for v in board["templating"]["list"]]
    assert names == ["datasource", "model", "version"]
    for panel in panels(board):
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        for target in panel["targets"]:
            assert 'model="$model"' in target["expr"], (panel["title"], target["expr"])
            assert target["datasource"]["uid"] == "${datasource}"
    per_version = [p["title"] for p in panels(board) if any("$version" in t["expr"] for t in p["targets"])]
    assert len(per_version) >= len(panels(board)) - 4  # all but model-wide ones (phase, step, events, labels)


def test_panels_have_unique_ids_and_do_not_overlap(board: dict[str, Any]) -> None:
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for panel in board["panels"]:
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24, panel["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_the_issues_figures_each_have_a_panel(board: dict[str, Any]) -> None:
    exprs = " ".join(t["expr"] for p in panels(board) for t in p["targets"])
    for metric in (
        "gateway_traffic_weight",
        "gateway_request_seconds_bucket",
        "gateway_requests_total",
        "gateway_compare_agreement",
        "gateway_compare_accuracy",
        "gateway_compare_labelled",
        "gateway_shadow_requests_total",
        "gateway_shadow_circuit_open",
        "gateway_queue_depth",
        "gateway_batch_size_bucket",
        "gateway_rollout_phase",
        "gateway_rollout_step",
        "gateway_rollout_check",
    ):
        assert re.search(rf"\b{metric}\b", exprs), metric
    latency = next(p for p in panels(board) if p["title"].startswith("Request latency"))
    assert [re.match(r"histogram_quantile\(([\d.]+),", t["expr"])[1] for t in latency["targets"]] == [  # type: ignore[index]
        "0.5",
        "0.9",
        "0.99",
    ]


def test_phase_and_verdict_panels_name_every_phase_and_verdict_of_the_code(board: dict[str, Any]) -> None:
    def mapped(title: str) -> set[str]:
        panel = next(p for p in panels(board) if p["title"] == title)
        options = panel["fieldConfig"]["defaults"]["mappings"][0]["options"]
        return {o["text"] for o in options.values()}

    assert mapped("Rollout phase") == {p.value for p in Phase}
    assert mapped("Check verdicts") == {v.value for v in Verdict} | {"not run"}
    phase_expr = next(p for p in panels(board) if p["title"] == "Rollout phase")["targets"][0]["expr"]
    assert {m for m in re.findall(r'phase="(\w+)"', phase_expr)} == {p.value for p in Phase}
