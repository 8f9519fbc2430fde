"""Routing rules (gateway.release.rules): matching, first match wins, validation that names the
field, the regex bounds, and how rules live in the release state and the store."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
import pytest

from gateway.config.spec import CompareSpec
from gateway.errors import InvalidInput
from gateway.release.evidence import ModelEvidence, routed_report, routed_role
from gateway.release.rules import (
    MAX_PATTERN_CHARS,
    MAX_RULES,
    MAX_SUBJECT_CHARS,
    Rule,
    Target,
    first_match,
    make_match,
    make_rule,
    resolve,
    rule_from_dict,
    with_rule,
    without_rule,
)
from gateway.release.state import ReleaseState, check
from gateway.release.store.base import StoredRelease, state_from


def param(key: str, op: str, *values: str) -> Any:
    return make_match("param", key, op, values, "route.match[0]")


def header(key: str, op: str, *values: str) -> Any:
    return make_match("header", key, op, values, "route.match[0]")


def rule(name: str, *matches: Any, to: str = "canary", version: str = "") -> Rule:
    return make_rule(name, list(matches), to, version)


def headers(*pairs: tuple[str, Any]) -> Any:
    return lambda: pairs


def no_headers() -> Iterable[tuple[str, Any]]:
    raise AssertionError("the headers were read, though no rule tried reads them")


# -- matching -------------------------------------------------------------------------------


def test_each_operator_matches_what_it_says_and_nothing_else() -> None:
    assert param("t", "exact", "internal").holds("internal")
    assert not param("t", "exact", "internal").holds("internal2")
    assert param("t", "prefix", "int").holds("internal")
    assert not param("t", "prefix", "int").holds("xint")
    assert param("t", "regex", "^int(ern)?al$").holds("internal")
    assert param("t", "regex", "ern").holds("internal")  # searched, not anchored
    assert not param("t", "regex", "^ern").holds("internal")
    assert param("t", "in", "a", "b").holds("b")
    assert not param("t", "in", "a", "b").holds("c")


def test_the_first_matching_rule_wins_in_order() -> None:
    rules = [
        rule("qa", param("tenant", "exact", "qa"), to="stable"),
        rule("internal", param("tenant", "prefix", "int"), to="canary"),
        rule("any-internal", param("tenant", "regex", "^in"), to="version", version="3"),
    ]
    found = first_match(rules, {"tenant": "internal"}, no_headers)
    assert found is not None and found.name == "internal"
    assert first_match(rules, {"tenant": "qa"}, no_headers).name == "qa"  # type: ignore[union-attr]
    assert first_match(rules, {"tenant": "outside"}, no_headers) is None
    assert first_match(rules, {}, no_headers) is None


def test_all_of_a_rules_matches_must_hold() -> None:
    both = [rule("eu-beta", param("tenant", "exact", "beta"), header("x-region", "exact", "eu"))]
    assert first_match(both, {"tenant": "beta"}, headers(("x-region", "eu"))) is not None
    assert first_match(both, {"tenant": "beta"}, headers(("x-region", "us"))) is None
    assert first_match(both, {"tenant": "alpha"}, headers(("x-region", "eu"))) is None


def test_headers_are_read_only_when_a_rule_tried_needs_them() -> None:
    rules = [rule("p", param("tenant", "exact", "a")), rule("h", header("x-cohort", "exact", "beta"))]
    assert first_match(rules, {"tenant": "a"}, no_headers) is not None  # decided before the header rule
    with pytest.raises(AssertionError, match="headers were read"):
        first_match(rules, {"tenant": "b"}, no_headers)


def test_header_names_are_lower_case_any_value_counts_and_binary_metadata_is_ignored() -> None:
    rules = [rule("h", header("X-Cohort", "regex", "^beta"))]
    assert rules[0].matches[0].key == "x-cohort"
    assert first_match(rules, {}, headers(("x-cohort", "alpha"), ("x-cohort", "beta-2"))) is not None
    assert first_match(rules, {}, headers(("x-cohort", b"beta"))) is None
    assert first_match(rules, {}, None) is None  # a caller without metadata


def test_parameters_of_other_types_compare_as_text() -> None:
    rules = [rule("n", param("shard", "in", "3", "4")), rule("b", param("debug", "exact", "true"))]
    assert first_match(rules, {"shard": 4}, no_headers).name == "n"  # type: ignore[union-attr]
    assert first_match(rules, {"debug": True}, no_headers).name == "b"  # type: ignore[union-attr]
    assert first_match(rules, {"debug": False}, no_headers) is None


def test_a_value_longer_than_the_subject_cap_never_matches_a_regex() -> None:
    m = param("t", "regex", "a")
    assert m.holds("a" * MAX_SUBJECT_CHARS)
    assert not m.holds("a" * (MAX_SUBJECT_CHARS + 1))


def test_a_canary_rule_without_a_canary_falls_back_to_the_split() -> None:
    canary = rule("c", param("t", "exact", "x"), to="canary")
    assert resolve(canary, "1", "2") == "2"
    assert resolve(canary, "1", "") == ""  # the caller takes the split
    assert resolve(rule("s", param("t", "exact", "x"), to="stable"), "1", "2") == "1"
    assert resolve(rule("v", param("t", "exact", "x"), to="version", version="3"), "1", "2") == "3"


# -- validation names the field --------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: param("t", "regex", "(unclosed"), "is not a regular expression this gateway runs (missing )"),
        (lambda: param("t", "regex", "a" * (MAX_PATTERN_CHARS + 1)), "the limit is 256"),
        (lambda: param("t", "regex", r"(a)\1"), "no backreferences or lookaround"),
        (lambda: param("t", "regex", "(?=a)b"), "no backreferences or lookaround"),
        (lambda: param("t", "regex", "a{1000}{1000}"), "route.match[0].values"),
        (lambda: param("t", "regex", ""), "pattern is empty"),
        (lambda: param("t", "like", "x"), "route.match[0].op"),
        (lambda: make_match("cookie", "t", "exact", ["x"], "route.match[0]"), "route.match[0].source"),
        (lambda: param("", "exact", "x"), "route.match[0].key"),
        (lambda: param("t", "in"), "route.match[0].values is empty"),
        (lambda: param("t", "exact", "a", "b"), "takes exactly one"),
        (lambda: param("t", "prefix", ""), "empty prefix"),
        (lambda: header("auth-bin", "exact", "x"), "binary metadata"),
        (lambda: make_rule("r", [], "canary"), "has no match"),
        (lambda: rule("r", param("t", "exact", "x"), to="shadow"), "route.to"),
        (lambda: rule("r", param("t", "exact", "x"), to="version"), "route.version is empty"),
        (lambda: rule("r", param("t", "exact", "x"), to="stable", version="2"), "route.version is set"),
        (lambda: rule("bad name", param("t", "exact", "x")), "route.name"),
        (lambda: rule("", param("t", "exact", "x")), "route.name is empty"),
    ],
)
def test_invalid_rules_are_refused_naming_the_field(build: Any, field: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        build()
    assert field in str(caught.value)


def test_ordinary_patterns_compile() -> None:
    for pattern in (r"^beta(-\d+)?$", r"^[a-z0-9-]+\.internal$", r"(?:v|ver)\d{1,3}", r"^(eu|us)-", r"a{2,5}b+"):
        assert param("t", "regex", pattern).holds({"^(eu|us)-": "eu-west"}.get(pattern, "")) in (True, False)
    assert param("t", "regex", r"^beta(-\d+)?$").holds("beta-12")
    assert not param("t", "regex", r"^beta(-\d+)?$").holds("beta-x")


@pytest.mark.parametrize(
    ("pattern", "forty_as"),
    [
        # Each took Python's backtracking `re` from seconds to minutes on these values: RE2 runs in
        # time linear in the value whatever the pattern, so they are accepted and answer at once.
        ("(a+)+$", True),
        ("(a{2,5})+$", True),
        ("^(a?){40}a{40}$", True),
        ("((a?){5}){5}b", False),
        ("(?:x|xy){20}z", False),
        (".*.*.*x", False),
        (r"^\d+-\d+-\d+-\d+$", False),
    ],
)
def test_patterns_that_backtrack_exponentially_in_python_answer_at_once(pattern: str, forty_as: bool) -> None:
    m = param("t", "regex", pattern)
    for subject in ("a" * MAX_SUBJECT_CHARS, "a" * (MAX_SUBJECT_CHARS - 1) + "b", "1" * MAX_SUBJECT_CHARS, "x" * 40):
        start = time.perf_counter()
        m.holds(subject)
        assert time.perf_counter() - start < 0.05, (pattern, subject[:10])
    assert m.holds("a" * 40) is forty_as


def test_a_value_longer_than_the_cap_never_matches_a_regex() -> None:
    m = param("t", "regex", "a+$")
    assert m.holds("a" * MAX_SUBJECT_CHARS)
    assert not m.holds("a" * (MAX_SUBJECT_CHARS + 1))


def test_positions_names_and_the_count_limit() -> None:
    a, b, c = (rule(n, param("t", "exact", n)) for n in "abc")
    rules = with_rule((a, b), c, 1)
    assert [r.name for r in rules] == ["c", "a", "b"]
    assert [r.name for r in with_rule(rules, rule("d", param("t", "exact", "d")))] == ["c", "a", "b", "d"]
    with pytest.raises(InvalidInput, match="is taken"):
        with_rule(rules, rule("a", param("t", "exact", "other")))
    with pytest.raises(InvalidInput, match="position is 9"):
        with_rule(rules, rule("z", param("t", "exact", "z")), 9)
    many = tuple(rule(f"r{i}", param("t", "exact", str(i))) for i in range(MAX_RULES))
    with pytest.raises(InvalidInput, match=f"{MAX_RULES} routing rules"):
        with_rule(many, rule("one-more", param("t", "exact", "x")))
    assert [r.name for r in without_rule(rules, "a") or ()] == ["c", "b"]
    assert without_rule(rules, "nope") is None


# -- in the release state and the store ------------------------------------------------------


def test_rules_round_trip_through_the_stored_form_with_their_patterns_compiled() -> None:
    original = rule("beta", header("x-cohort", "regex", "^beta"), param("tenant", "in", "a", "b"), to="stable")
    again = rule_from_dict(json.loads(json.dumps(original.to_dict())))
    assert again == original
    assert first_match([again], {"tenant": "a"}, headers(("x-cohort", "beta1"))) is again
    state = ReleaseState("digits", "1", "2", 3000, rules=(original,), revision=4)
    stored = json.loads(json.dumps(StoredRelease(state).to_dict()))
    rollout = stored.pop("rollout")
    assert state_from(stored, rollout).state == state


def test_a_release_without_rules_is_stored_as_before() -> None:
    assert "rules" not in ReleaseState("digits", "1").to_dict()


def test_the_release_check_refuses_a_rule_pinned_to_a_version_that_is_not_loaded() -> None:
    pinned = rule("pin", param("t", "exact", "x"), to="version", version="9")
    with pytest.raises(InvalidInput, match=r"route 'pin': route.version '9' is not a loaded version"):
        check(ReleaseState("digits", "1", rules=(pinned,)), {"1", "2"})
    check(ReleaseState("digits", "1", rules=(pinned,)), {"1", "9"})
    assert pinned.target is Target.VERSION


# -- evidence: a cohort is counted apart ------------------------------------------------------


def probabilities(label: int) -> list[np.ndarray]:
    out = np.zeros((1, 10), np.float32)
    out[0, label] = 1.0
    return [out]


def test_rule_routed_requests_and_their_labels_stay_out_of_the_arms() -> None:
    evidence = ModelEvidence("m", CompareSpec(), 0)
    evidence.begin_rollout("1", "2", "k")
    evidence.record_request("2", True, 0.01, 1)
    evidence.record_prediction("split", "2", "canary", probabilities(3))
    for i in range(5):
        evidence.record_routed("internal", "2", i != 4, 0.5, 1)
        evidence.record_prediction(f"cohort-{i}", "2", routed_role("internal"), probabilities(7))
    for i in range(5):
        assert evidence.feedback(f"cohort-{i}", [7.0])
    assert evidence.feedback("split", [0.0])
    _, candidate, _ = evidence.rollout_windows()
    assert (candidate.requests, candidate.labelled, candidate.correct) == (1, 1, 0)
    assert (evidence.window("2").requests, evidence.window("2").labelled) == (1, 1)
    (row,) = routed_report(evidence)
    assert (row.version, row.role, row.requests, row.errors, row.labelled, row.accuracy) == (
        "2",
        "rule internal",
        5,
        1,
        5,
        1.0,
    )
    merged = evidence.merged_with([evidence.snapshot()])  # another worker with the same counts
    assert merged.routed["internal"]["2"].requests == 10
