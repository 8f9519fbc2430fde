"""Writes deploy/grafana/gateway-dashboard.json: the gateway's Grafana dashboard.

    python deploy/grafana/dashboard.py           # write the JSON beside this file
    python deploy/grafana/dashboard.py --check   # exit 1 if the committed JSON differs

Built with grafana-foundation-sdk's typed builders rather than written by hand: a
panel, a query or a variable is a typed call (a misspelt option is a type error,
not a panel Grafana silently ignores), layout is computed, and the codes behind
the phase and verdict panels come from the gateway's own enums (Phase, Verdict),
so a phase added to the code reaches the dashboard on the next run. A test keeps
the committed JSON equal to this script's output (tests/unit/test_deploy_dashboard.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from grafana_foundation_sdk.builders import common as common_builder
from grafana_foundation_sdk.builders import dashboard as dash
from grafana_foundation_sdk.builders import heatmap, stat, statetimeline, table, timeseries
from grafana_foundation_sdk.builders import prometheus as prom
from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.cog import plugins
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as model
from grafana_foundation_sdk.models import prometheus as prom_model

from gateway.release.confidence import Verdict
from gateway.release.policy import Phase
from gateway.serving.metrics import VERSION_FAULTS

OUTPUT = Path(__file__).with_name("gateway-dashboard.json")
UID = "release-gateway"
DATASOURCE = model.DataSourceRef(type_val="prometheus", uid="${datasource}")
# Every query is for the chosen model and versions.
SEL = 'model="$model", version=~"$version"'
RATE = "$__rate_interval"
FAULTS = "|".join(sorted(VERSION_FAULTS))

# A phase as one number, so a state timeline shows a rollout's history on one row. The
# gauge is a state set (one series per phase, 1 for the current one): multiplying each
# phase's series by its code and taking the largest leaves the current phase's code.
PHASE_CODES = {phase: code for code, phase in enumerate(Phase)}
# A check's verdict likewise; 0: the check was not run at the controller's last decision.
VERDICT_CODES = {Verdict.PASS: 1, Verdict.INCONCLUSIVE: 2, Verdict.FAIL: 3}
PHASE_COLOURS = {
    Phase.IDLE: "text",
    Phase.SHADOWING: "blue",
    Phase.PROGRESSING: "yellow",
    Phase.PROMOTING: "purple",
    Phase.SUCCEEDED: "green",
    Phase.PAUSED: "orange",
    Phase.ROLLED_BACK: "red",
}
VERDICT_COLOURS = {Verdict.PASS: "green", Verdict.INCONCLUSIVE: "yellow", Verdict.FAIL: "red"}


def coded(metric: str, label: str, codes: dict[str, int], selector: str, by: str) -> str:
    parts = [f'{metric}{{{selector}, {label}="{value}"}} * {code}' for value, code in codes.items()]
    return f"max by ({by}) (\n  " + "\n  or ".join(parts) + "\n)"


def phase_query() -> str:
    codes = {p.value: c for p, c in PHASE_CODES.items()}
    return coded("gateway_rollout_phase", "phase", codes, 'model="$model"', "model")


def verdict_query() -> str:
    return coded("gateway_rollout_check", "verdict", {v.value: c for v, c in VERDICT_CODES.items()}, SEL, "check")


def error_ratio(by: str) -> str:
    faults = f'sum by ({by}) (rate(gateway_requests_total{{{SEL}, outcome=~"{FAULTS}"}}[{RATE}]))'
    return f"{faults}\n/\nsum by ({by}) (rate(gateway_requests_total{{{SEL}}}[{RATE}]))"


def quantile(metric: str, q: float) -> str:
    return f"histogram_quantile({q}, sum by (version, le) (rate({metric}_bucket{{{SEL}}}[{RATE}])))"


def weighted(metric: str, weight: str) -> str:
    """A per-worker figure averaged over workers, weighted by what it was measured on
    (workers each report their own window: gateway_compare_* carry a pid label)."""
    return (
        f"sum by (version) (gateway_compare_{metric}{{{SEL}}} * gateway_compare_{weight}{{{SEL}}})\n"
        f"/\nsum by (version) (gateway_compare_{weight}{{{SEL}}})"
    )


def query(expr: str, legend: str = "", ref: str = "A", instant: bool = False) -> prom.Dataquery:
    q = prom.Dataquery().expr(expr).ref_id(ref).datasource(DATASOURCE)
    if legend:
        q = q.legend_format(legend)
    if instant:
        q = q.instant().format(prom_model.PromQueryFormat.TABLE)
    return q


def series(
    title: str, description: str, queries: Sequence[prom.Dataquery], unit: str, w: int = 8, h: int = 8
) -> timeseries.Panel:
    panel = timeseries.Panel().title(title).description(description).datasource(DATASOURCE).unit(unit)
    panel = panel.span(w).height(h).fill_opacity(10).show_points(common.VisibilityMode.NEVER)
    legend = common_builder.VizLegendOptions().display_mode(common.LegendDisplayMode.LIST)
    panel = panel.legend(legend.placement(common.LegendPlacement.BOTTOM).show_legend(True))
    for q in queries:
        panel = panel.with_target(q)
    return panel


def value_mappings(codes: dict[int, tuple[str, str]]) -> list[model.ValueMapping]:
    options = {
        str(code): model.ValueMappingResult(text=text, color=colour, index=i)
        for i, (code, (text, colour)) in enumerate(sorted(codes.items()))
    }
    return [model.ValueMap(options=options)]


def timeline(
    title: str, description: str, expr: str, legend: str, codes: dict[int, tuple[str, str]], w: int, h: int
) -> statetimeline.Panel:
    panel = statetimeline.Panel().title(title).description(description).datasource(DATASOURCE)
    panel = panel.with_target(query(expr, legend)).mappings(value_mappings(codes))
    panel = panel.span(w).height(h).show_value(common.VisibilityMode.AUTO).merge_values(True)
    legend_options = common_builder.VizLegendOptions().show_legend(False).display_mode(common.LegendDisplayMode.HIDDEN)
    return panel.legend(legend_options.placement(common.LegendPlacement.BOTTOM))


def traffic_row() -> dash.Row:
    shares = (
        f"sum by (version) (rate(gateway_requests_total{{{SEL}}}[{RATE}]))\n/ ignoring(version) group_left()\n"
        f'sum(rate(gateway_requests_total{{model="$model"}}[{RATE}]))'
    )
    return (
        dash.Row("Traffic")
        .with_panel(
            series(
                "Configured traffic share",
                "The release's weights: the stable's and canary's share of live traffic; a shadow's "
                "share of requests mirrored to it (gateway_traffic_weight).",
                [query(f"max by (version, role) (gateway_traffic_weight{{{SEL}}})", "{{version}} ({{role}})")],
                "percentunit",
            )
        )
        .with_panel(
            series(
                "Served traffic share",
                "Each version's share of the model's answered requests, as served (all outcomes).",
                [query(shares, "{{version}}")],
                "percentunit",
            )
        )
        .with_panel(
            series(
                "Requests by outcome",
                "Requests per second by outcome. error, timeout and rejected count against the version "
                "(its error rate); invalid, deadline, client_timeout, cancelled and unavailable do not.",
                [
                    query(
                        f"sum by (version, outcome) (rate(gateway_requests_total{{{SEL}}}[{RATE}]))",
                        "{{version}} {{outcome}}",
                    )
                ],
                "reqps",
            )
        )
    )


def latency_row() -> dash.Row:
    quantiles = [
        query(quantile("gateway_request_seconds", q), f"{{{{version}}}} p{round(q * 100)}", ref)
        for q, ref in ((0.5, "A"), (0.9, "B"), (0.99, "C"))
    ]
    parts = [
        query(quantile("gateway_queue_seconds", 0.9), "{{version}} queue wait p90", "A"),
        query(quantile("gateway_compute_seconds", 0.9), "{{version}} model run p90", "B"),
    ]
    return (
        dash.Row("Latency and errors")
        .with_panel(
            series(
                "Request latency p50 / p90 / p99",
                "Time from decode to answer (gateway_request_seconds), by version, from the histogram.",
                quantiles,
                "s",
            )
        )
        .with_panel(
            series(
                "Queue wait and model run (p90)",
                "Where the time goes: waiting for a batch to run, and the batch's run itself.",
                parts,
                "s",
            )
        )
        .with_panel(
            series(
                "Error rate (version faults)",
                f"Share of requests that failed by the version's fault ({', '.join(sorted(VERSION_FAULTS))}): "
                "the figure the rollout's error_rate check compares, and GatewayErrorRateJump watches.",
                [query(error_ratio("version"), "{{version}}")],
                "percentunit",
            )
        )
    )


def quality_row() -> dash.Row:
    return (
        dash.Row("Candidate vs stable")
        .with_panel(
            series(
                "Agreement with stable",
                "Share of compared rows on which the version's answer matches the stable's (canary "
                "requests run on both, and shadow copies), over the gateway's report window.",
                [query(weighted("agreement", "compared_rows"), "{{version}}")],
                "percentunit",
                w=6,
            )
        )
        .with_panel(
            series(
                "Accuracy (labelled traffic)",
                "Share of labelled rows answered correctly, over the report window. Labels arrive "
                "later through `gateway feedback send`.",
                [query(weighted("accuracy", "labelled"), "{{version}}")],
                "percentunit",
                w=6,
            )
        )
        .with_panel(
            series(
                "Labelled rows",
                "Rows with a label joined to their prediction, in the report window: what the accuracy "
                "figure stands on.",
                [query(f"sum by (version) (gateway_compare_labelled{{{SEL}}})", "{{version}}")],
                "short",
                w=6,
            )
        )
        .with_panel(
            series(
                "Labels received",
                "Labels per second: joined to a logged prediction, or unknown (expired, or never served).",
                [
                    query(
                        f'sum by (outcome) (rate(gateway_feedback_total{{model="$model"}}[{RATE}]))',
                        "{{outcome}}",
                    )
                ],
                "short",
                w=6,
            )
        )
    )


def shadow_row() -> dash.Row:
    circuit = {0: ("closed", "green"), 1: ("open", "red")}
    return (
        dash.Row("Shadows")
        .with_panel(
            series(
                "Shadow copies by outcome",
                "Copies mirrored to each shadow per second: completed, failed, timed_out, and dropped "
                "(the shadow's queue was full, or its circuit open).",
                [
                    query(
                        f"sum by (version, outcome) (rate(gateway_shadow_requests_total{{{SEL}}}[{RATE}]))",
                        "{{version}} {{outcome}}",
                    )
                ],
                "reqps",
                w=16,
            )
        )
        .with_panel(
            timeline(
                "Shadow circuit",
                "Open: the shadow failed repeatedly and gets no copies until a probe succeeds.",
                f"max by (version) (gateway_shadow_circuit_open{{{SEL}}})",
                "{{version}}",
                circuit,
                w=8,
                h=8,
            )
        )
    )


def queue_row() -> dash.Row:
    fill = f"sum by (version) (gateway_queue_depth{{{SEL}}})\n/\nsum by (version) (gateway_queue_capacity{{{SEL}}})"
    buckets = f"sum by (le) (increase(gateway_batch_size_bucket{{{SEL}}}[{RATE}]))"
    mean = (
        f"sum by (version) (rate(gateway_batch_size_sum{{{SEL}}}[{RATE}]))\n/\n"
        f"sum by (version) (rate(gateway_batch_size_count{{{SEL}}}[{RATE}]))"
    )
    batches = (
        heatmap.Panel()
        .title("Batch sizes")
        .description("Rows per model run (gateway_batch_size), all chosen versions together.")
        .datasource(DATASOURCE)
        .with_target(query(buckets, "{{le}}").format(prom_model.PromQueryFormat.HEATMAP).interval_factor(1))
        .calculate(False)
        .show_tooltip()
        .span(8)
        .height(8)
    )
    return (
        dash.Row("Queues and batches")
        .with_panel(
            series(
                "Queue depth",
                "Requests waiting to run, summed over workers.",
                [query(f"sum by (version) (gateway_queue_depth{{{SEL}}})", "{{version}}")],
                "short",
                w=5,
            )
        )
        .with_panel(
            series(
                "Queue fill",
                "Waiting requests over the queue's capacity (batching.max_queue_size); at 100 % new "
                "requests are refused (outcome rejected). GatewayQueueNearFull fires above 80 %.",
                [query(fill, "{{version}}")],
                "percentunit",
                w=5,
            )
        )
        .with_panel(batches)
        .with_panel(
            series(
                "Mean batch size",
                "Rows per model run, on average.",
                [query(mean, "{{version}}")],
                "short",
                w=6,
            )
        )
    )


def rollout_row() -> dash.Row:
    phases = {code: (phase.value, PHASE_COLOURS[phase]) for phase, code in PHASE_CODES.items()}
    verdicts = {0: ("not run", "text")} | {code: (v.value, VERDICT_COLOURS[v]) for v, code in VERDICT_CODES.items()}
    figures = ("value", "low", "high", "bound", "samples")
    checks = (
        table.Panel()
        .title("Checks at the last decision")
        .description(
            "Each check's estimate, its confidence interval [low, high], the bound it is held to, "
            "and the samples it stands on (gateway_rollout_check_*). NaN: not run at the last decision."
        )
        .datasource(DATASOURCE)
        .show_header(True)
        .span(12)
        .height(9)
    )
    for i, figure in enumerate(figures):
        expr = f"max by (version, check) (gateway_rollout_check_{figure}{{{SEL}}})"
        checks = checks.with_target(query(expr, figure, chr(ord("A") + i), instant=True))
    checks = checks.with_transformation(model.DataTransformerConfig(id_val="merge", options={}))
    checks = checks.with_transformation(
        model.DataTransformerConfig(
            id_val="organize",
            options={
                "excludeByName": {"Time": True},
                "renameByName": {f"Value #{chr(ord('A') + i)}": figure for i, figure in enumerate(figures)},
            },
        )
    )
    step = (
        stat.Panel()
        .title("Step")
        .description("The traffic step the rollout is at, from 1; 0 outside the steps (shadowing, done).")
        .datasource(DATASOURCE)
        .with_target(query('max(gateway_rollout_step{model="$model"})', "step"))
        .graph_mode(common.BigValueGraphMode.NONE)
        .color_mode(common.BigValueColorMode.NONE)
        .reduce_options(common_builder.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .span(4)
        .height(5)
    )
    events = f'sum by (event, by) (increase(gateway_rollout_events_total{{model="$model"}}[{RATE}])) > 0'
    return (
        dash.Row("Rollout")
        .with_panel(
            timeline(
                "Rollout phase",
                "The model's rollout phase over time (gateway_rollout_phase).",
                phase_query(),
                "phase",
                phases,
                w=20,
                h=5,
            )
        )
        .with_panel(step)
        .with_panel(
            timeline(
                "Check verdicts",
                "Each check's verdict at the controller's last decision: pass, inconclusive (more "
                "evidence needed), fail (counts toward the policy's threshold), or not run.",
                verdict_query(),
                "{{check}}",
                verdicts,
                w=12,
                h=9,
            )
        )
        .with_panel(checks)
        .with_panel(
            series(
                "Rollout events",
                "Release changes applied, by the controller or an operator (rollback, promote, advance, "
                "pause, ...): GatewayRollbackHappened fires on a rollback.",
                [query(events, "{{event}} ({{by}})")],
                "short",
                w=24,
            ).draw_style(common.GraphDrawStyle.BARS)
        )
    )


def variables() -> list[cogbuilder.Builder[model.VariableModel]]:
    source = dash.DatasourceVariable("datasource").label("Data source").type("prometheus")
    models = (
        dash.QueryVariable("model")
        .label("Model")
        .datasource(DATASOURCE)
        .query("label_values(gateway_queue_capacity, model)")
        .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(model.VariableSort.ALPHABETICAL_ASC)
    )
    versions = (
        dash.QueryVariable("version")
        .label("Version")
        .datasource(DATASOURCE)
        .query('label_values(gateway_queue_capacity{model="$model"}, version)')
        .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(model.VariableSort.NUMERICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(".*")
    )
    return [source, models, versions]


def build() -> dict[str, object]:
    """The dashboard as Grafana's JSON model."""
    board = (
        dash.Dashboard("Release gateway")
        .uid(UID)
        .description(
            "Per model and version: traffic, latency, errors, agreement and accuracy, shadows, queues and "
            "batches, and the rollout's phase, step and checks (release-gateway; deploy/README.md)."
        )
        .tags(["release-gateway"])
        .editable()
        .tooltip(model.DashboardCursorSync.CROSSHAIR)
        .time("now-1h", "now")
        .refresh("30s")
        .timezone("browser")
        .variables(variables())
        .with_row(traffic_row())
        .with_row(latency_row())
        .with_row(quality_row())
        .with_row(shadow_row())
        .with_row(queue_row())
        .with_row(rollout_row())
        .build()
    )
    data: dict[str, object] = json.loads(json.dumps(board, cls=JSONEncoder))
    # In the SDK's own form (its defaults filled in), so the committed JSON is a fixed
    # point of typed_round_trip: the test that checks it against the SDK's model.
    return typed_round_trip(expand_rows(data))


def typed_round_trip(data: dict[str, object]) -> dict[str, object]:
    """`data` decoded into the SDK's typed dashboard model and encoded again: a key the
    model does not know (a misspelt option, a field of the wrong panel type) is lost."""
    plugins.register_default_plugins()  # the SDK's panel and query types, for decoding
    decoded = model.Dashboard.from_json(data)
    result: dict[str, object] = json.loads(json.dumps(decoded, cls=JSONEncoder))
    return result


def expand_rows(data: dict[str, object]) -> dict[str, object]:
    """Rows open, and every panel numbered. The builder nests a row's panels in the row,
    which is Grafana's form for a collapsed row; an open row's panels follow it at the
    top level (the form Grafana itself saves)."""
    panels: list[dict[str, object]] = []
    rows = data["panels"]
    assert isinstance(rows, list)
    for row in rows:
        inner = row.pop("panels", [])
        panels.append({**row, "collapsed": False, "panels": []})
        panels += inner
    for number, panel in enumerate(panels, start=1):
        panel["id"] = number
    data["panels"] = panels
    return data


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed JSON is not this output")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if OUTPUT.read_text() != text:
            print(f"{OUTPUT} is stale: run python {Path(__file__).as_posix()}", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
