"""The routing-rule CLI's parsing and renderings, from text and protobuf messages (no gateway)."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from gateway.cli.release import describe_audit, markup, report_json, report_table
from gateway.cli.route import parse_condition, parse_target
from gateway.cli.rules_text import route_lines
from gateway.control.client import CommandFailed
from gateway.protocol.pb import release_pb2 as rpb


@pytest.mark.parametrize(
    ("text", "key", "op", "values"),
    [
        ("tenant=internal", "tenant", "exact", ["internal"]),
        ("tenant:exact=a=b", "tenant", "exact", ["a=b"]),
        ("tenant:prefix=int", "tenant", "prefix", ["int"]),
        ("x-cohort:regex=^beta(-\\d+)?$", "x-cohort", "regex", ["^beta(-\\d+)?$"]),
        ("tenant:in=staff,qa", "tenant", "in", ["staff", "qa"]),
        ("ns:tenant=a", "ns:tenant", "exact", ["a"]),  # no operator after the colon: part of the name
        ("tenant=", "tenant", "exact", [""]),
    ],
)
def test_conditions_parse_into_matches(text: str, key: str, op: str, values: list[str]) -> None:
    match = parse_condition(text, "param")
    assert (match.source, match.key, match.op, list(match.values)) == ("param", key, op, values)


def test_a_condition_without_a_value_is_refused_with_exit_1() -> None:
    with pytest.raises(CommandFailed) as caught:
        parse_condition("x-cohort", "header")
    assert caught.value.code == 1 and "--header 'x-cohort': expected NAME=VALUE" in str(caught.value)


@pytest.mark.parametrize(
    ("text", "meant"), [("tenant:regx=^a", "regex"), ("tenant:Prefix=a", "prefix"), ("t:IN=a", "in")]
)
def test_a_misspelt_operator_is_refused_not_taken_as_part_of_the_name(text: str, meant: str) -> None:
    with pytest.raises(CommandFailed) as caught:
        parse_condition(text, "param")
    assert caught.value.code == 1 and f"(did you mean {meant!r}?)" in str(caught.value), str(caught.value)
    # A name holding a colon and a word like an operator is still written with one.
    assert parse_condition("ns:regx:exact=a", "param").key == "ns:regx"


def test_set_members_are_trimmed_and_an_empty_one_is_refused() -> None:
    assert list(parse_condition("tenant:in=staff, qa ,ops", "param").values) == ["staff", "qa", "ops"]
    for text in ("tenant:in=", "tenant:in=a,,b", "tenant:in=a,b,"):
        with pytest.raises(CommandFailed) as caught:
            parse_condition(text, "param")
        assert caught.value.code == 1 and "an empty member in the set" in str(caught.value), text


def test_targets_are_roles_or_versions() -> None:
    assert parse_target("canary") == ("canary", "")
    assert parse_target("stable") == ("stable", "")
    assert parse_target("3") == ("version", "3")
    assert parse_target("version:canary") == ("version", "canary")


def rules() -> list[rpb.Route]:
    return [
        rpb.Route(
            name="staff",
            match=[
                rpb.RouteMatch(source="param", key="tenant", op="in", values=["staff", "qa"]),
                rpb.RouteMatch(source="header", key="x-region", op="prefix", values=["eu"]),
            ],
            to="stable",
        ),
        rpb.Route(
            name="beta",
            match=[rpb.RouteMatch(source="header", key="x-c", op="regex", values=["^b"])],
            to="version",
            version="3",
        ),
    ]


def test_rules_render_one_numbered_line_each() -> None:
    assert route_lines(rules()) == [
        "  rule 1. staff: param tenant in {staff, qa} and header x-region starts with 'eu' -> stable",
        "  rule 2. beta: header x-c ~ '^b' -> version 3",
    ]


def test_a_hostile_value_stays_on_one_escaped_line() -> None:
    hostile = rpb.Route(
        name="r", match=[rpb.RouteMatch(source="param", key="t", op="exact", values=["a\nb\x1b[31m"])], to="canary"
    )
    (line,) = route_lines([hostile])
    shown = markup(line)
    assert "\n" not in shown and "\x1b" not in shown


def test_the_report_lists_rule_routed_traffic_apart_and_its_json_has_the_rules() -> None:
    release = rpb.Release(model="digits", stable="1", canary="2", canary_weight_bp=3000, revision=5, routes=rules())
    routed = rpb.VersionReport(version="2", role="rule internal", requests=1000, errors=10, error_rate=0.01)
    report = rpb.Report(
        release=release,
        versions=[rpb.VersionReport(version="1", role="stable", requests=2800)],
        routed=[routed],
    )
    out = io.StringIO()
    Console(file=out, width=200, highlight=False).print(report_table(report))
    assert "rule internal -> 2: 1000 requests, 1.00% errors (not in the comparison)" in out.getvalue()
    document = report_json(report, None)
    assert document["routed"][0]["role"] == "rule internal" and document["routed"][0]["requests"] == 1000
    assert [r["name"] for r in document["release"]["routes"]] == ["staff", "beta"]
    assert document["release"]["routes"][0]["version"] is None and document["release"]["routes"][1]["version"] == "3"
    json.dumps(document, allow_nan=False)


def test_an_audit_line_counts_the_rules_after_the_change() -> None:
    after = {"stable": "1", "canary": "", "canary_weight_bp": 0, "rules": [{"name": "a"}, {"name": "b"}]}
    record = rpb.AuditRecord(id=3, at=0.0, actor="alice", action="add_route", model="digits", outcome="applied")
    record.after_json = json.dumps(after)
    assert "stable 1, 2 routing rules" in describe_audit(record)
