"""External checks ([[policy.checks]]): reading a Prometheus or JSON answer, the verdict on a
reading, how verdicts join `decide`, the config's refusals, and the poller's handling of
slow, oversized and failing sources (through httpx's MockTransport: no sockets here; the
integration tests use a real local HTTP server)."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import re
from pathlib import Path

import httpx
import orjson
import pytest

from gateway.config.spec import ExternalCheckSpec, PolicySpec, load_model_spec
from gateway.errors import ConfigError
from gateway.release.confidence import Verdict
from gateway.release.external import BadAnswer, Reading, json_path_value, judge, prometheus_value
from gateway.release.external_poll import ExternalChecks, request_url
from gateway.release.policy import Event, Phase, RolloutEvidence, RolloutState, decide, enabled_checks

PROM = ExternalCheckSpec(name="p99", kind="prometheus", url="http://prom:9090", query="up", max=0.25)
WEB = ExternalCheckSpec(name="score", kind="web", url="http://scores/now", json_path="data.score", min=0.9)


def vector(*values: str) -> dict[str, object]:
    result = [{"metric": {"pod": str(i)}, "value": [1764270000.123, v]} for i, v in enumerate(values)]
    return {"status": "success", "data": {"resultType": "vector", "result": result}}


# ---------------------------------------------------------------- answers


def test_a_prometheus_vector_of_one_series_gives_its_number() -> None:
    assert prometheus_value(vector("0.187")) == 0.187
    assert prometheus_value({"status": "success", "data": {"resultType": "scalar", "result": [1.0, "3"]}}) == 3.0
    assert math.isnan(prometheus_value(vector("NaN")))  # judged inconclusive, below
    assert prometheus_value(vector("+Inf")) == math.inf  # histogram_quantile beyond the last bucket


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (vector(), "no series (empty result)"),
        (vector("1", "2"), "2 series, not one"),
        ({"status": "error", "errorType": "bad_data", "error": "parse error at char 3"}, "parse error at char 3"),
        ({"status": "success", "data": {"resultType": "matrix", "result": []}}, "not an instant vector"),
        ({"status": "success", "data": {"resultType": "vector", "result": [{"value": "0.1"}]}}, "not a [time, value]"),
        (vector("fast"), "'fast', not a number"),
        ([1, 2], "a list, not a Prometheus API object"),
        ({"status": "success"}, "no data object"),
    ],
)
def test_a_prometheus_answer_without_one_number_says_why(answer: object, reason: str) -> None:
    with pytest.raises(BadAnswer, match=re.escape(reason)):
        prometheus_value(answer)


def test_a_json_path_finds_nested_numbers_and_list_items() -> None:
    answer = {"value": 3, "data": {"score": "0.95", "items": [{"v": 1.5}, {"v": 2.5}]}}
    assert json_path_value(answer, "value") == 3.0
    assert json_path_value(answer, "data.score") == 0.95
    assert json_path_value(answer, "data.items.1.v") == 2.5
    with pytest.raises(BadAnswer, match=re.escape("no 'data.p99'")):
        json_path_value(answer, "data.p99")
    with pytest.raises(BadAnswer, match=re.escape("list at 'data.items.5' has 2 items")):
        json_path_value(answer, "data.items.5.v")
    with pytest.raises(BadAnswer, match="a boolean, not a number"):
        json_path_value({"value": True}, "value")
    with pytest.raises(BadAnswer, match="an object, not a number"):
        json_path_value(answer, "data")


# ---------------------------------------------------------------- verdicts


def verdict(spec: ExternalCheckSpec, reading: Reading | None, now: float = 100.0) -> tuple[Verdict, str]:
    result = judge(spec, reading, since=50.0, now=now, max_age=5.0)
    return result.verdict, result.to_dict()["reason"]  # type: ignore[return-value]


def test_the_bound_decides_a_reading_and_the_bound_itself_passes() -> None:
    assert verdict(PROM, Reading(PROM, 99.0, 0.25)) == (Verdict.PASS, "read 0.25, ≤ max 0.25")
    assert verdict(PROM, Reading(PROM, 99.0, 0.31)) == (Verdict.FAIL, "read 0.31, > max 0.25")
    assert verdict(WEB, Reading(WEB, 99.0, 0.95)) == (Verdict.PASS, "read 0.95, ≥ min 0.9")
    assert verdict(WEB, Reading(WEB, 99.0, 0.5)) == (Verdict.FAIL, "read 0.5, < min 0.9")
    assert verdict(PROM, Reading(PROM, 99.0, math.inf))[0] is Verdict.FAIL


def test_anything_that_leaves_the_number_unknown_is_inconclusive_with_its_reason() -> None:
    assert verdict(PROM, None) == (Verdict.INCONCLUSIVE, "no reading yet in this rollout")
    assert verdict(PROM, Reading(PROM, 40.0, 0.1)) == (Verdict.INCONCLUSIVE, "no reading yet in this rollout")
    assert verdict(PROM, Reading(PROM, 90.0, 0.1)) == (
        Verdict.INCONCLUSIVE,
        "the latest reading is 10 s old (read again each interval)",
    )
    down = Reading(PROM, 99.0, problem="cannot reach http://prom:9090/api/v1/query: connection refused")
    assert verdict(PROM, down) == (
        Verdict.INCONCLUSIVE,
        "no usable reading: cannot reach http://prom:9090/api/v1/query: connection refused",
    )
    assert verdict(PROM, Reading(PROM, 99.0, math.nan))[0] is Verdict.INCONCLUSIVE
    # An infinity never passes: +Inf for a min (a ratio over zero), -Inf for a max.
    assert verdict(WEB, Reading(WEB, 99.0, math.inf)) == (
        Verdict.INCONCLUSIVE,
        "the reading is inf (a division by zero?), not a number",
    )
    assert verdict(PROM, Reading(PROM, 99.0, -math.inf))[0] is Verdict.INCONCLUSIVE
    assert verdict(WEB, Reading(WEB, 99.0, -math.inf))[0] is Verdict.FAIL
    # A reading of the check before its spec changed (a reloaded model.toml) is not used.
    tighter = ExternalCheckSpec(name="p99", kind="prometheus", url="http://prom:9090", query="up", max=0.1)
    assert verdict(tighter, Reading(PROM, 99.0, 0.2))[0] is Verdict.INCONCLUSIVE


def test_the_evidence_dict_carries_kind_value_bound_and_reason() -> None:
    result = judge(PROM, Reading(PROM, 99.0, 0.31), since=0.0, now=100.0, max_age=5.0)
    assert result.to_dict() == {
        "check": "p99",
        "verdict": "fail",
        "value": 0.31,
        "low": 0.31,
        "high": 0.31,
        "bound": 0.25,
        "samples": 1,
        "needed": None,
        "kind": "prometheus",
        "reason": "read 0.31, > max 0.25",
    }
    unknown = judge(PROM, None, since=0.0, now=100.0, max_age=5.0).to_dict()
    assert (unknown["value"], unknown["samples"]) == (None, 0)


# ---------------------------------------------------------------- in the decision

# Every built-in check off and no exposure needed: the external check alone decides.
ONLY_EXTERNAL = PolicySpec(
    step_weights=(10.0, 50.0),
    threshold=1,
    max_latency_ratio=0.0,
    max_error_increase=-1.0,
    step_min_samples=0,
    step_min_duration_s=0.0,
    max_duration_s=60.0,
    checks=(PROM,),
)
PROGRESSING = RolloutState(Phase.PROGRESSING, step=0, candidate="2", started_at=0.0)


def decided(reading: Reading | None, state: RolloutState = PROGRESSING, now: float = 10.0) -> tuple[Event, str]:
    external = [judge(PROM, reading, since=0.0, now=now, max_age=5.0)]
    decision = decide(state, RolloutEvidence(external=external), ONLY_EXTERNAL, now)
    return decision.event, decision.reason


def test_a_failing_reading_rolls_back_naming_the_check_and_the_value() -> None:
    assert decided(Reading(PROM, 9.0, 0.4)) == (Event.ROLLBACK, "failed checks: p99 (read 0.4, > max 0.25)")
    held = decide(
        PROGRESSING,
        RolloutEvidence(external=[judge(PROM, Reading(PROM, 9.0, 0.4), since=0.0, now=10.0, max_age=5.0)]),
        dataclasses.replace(ONLY_EXTERNAL, threshold=2),
        10.0,
    )
    assert held.event is Event.HOLD and held.reason.startswith("failed checks (1/2): p99")


def test_a_passing_reading_lets_the_step_advance_and_an_inconclusive_one_holds_it() -> None:
    assert decided(Reading(PROM, 9.0, 0.1))[0] is Event.ADVANCE
    event, reason = decided(Reading(PROM, 9.0, problem="cannot reach it"))
    assert event is Event.HOLD and reason == "inconclusive: p99: no usable reading: cannot reach it"
    # Past max_duration_s, on_timeout applies (the default: pause for a person), saying what waited.
    event, reason = decided(None, now=61.0)
    assert event is Event.PAUSE and "inconclusive: p99: no reading yet in this rollout" in reason


def test_external_checks_wait_for_traffic_and_spend_no_alpha() -> None:
    shadowing = RolloutState(Phase.SHADOWING, candidate="2", started_at=0.0)
    decision = decide(
        shadowing,
        RolloutEvidence(external=[judge(PROM, Reading(PROM, 9.0, 0.4), since=0.0, now=10.0, max_age=5.0)]),
        ONLY_EXTERNAL,
        10.0,
    )
    assert all(c.name != "p99" for c in decision.checks) and decision.event is not Event.ROLLBACK
    assert "p99" not in enabled_checks(ONLY_EXTERNAL, with_traffic=True)  # so not in check_alpha's questions


# ---------------------------------------------------------------- config


def spec_error(tmp_path: Path, checks: str) -> str:
    path = tmp_path / "model.toml"
    path.write_text("[policy]\ninterval_s = 1\n" + checks)
    with pytest.raises(ConfigError) as caught:
        load_model_spec(path)
    return str(caught.value)


GOOD = 'name = "p99"\nkind = "prometheus"\nurl = "http://prom:9090"\nquery = "up"\n'
NO_QUERY = GOOD.replace('query = "up"', "")


def test_model_toml_reads_an_array_of_checks(tmp_path: Path) -> None:
    path = tmp_path / "model.toml"
    path.write_text(
        f'[[policy.checks]]\n{GOOD}max = 0.25\n[[policy.checks]]\nname = "s"\nkind = "web"\n'
        'url = "https://scores.example/api"\njson_path = "data.score"\nmin = 1\ntimeout_s = 0.5\n'
    )
    checks = load_model_spec(path).policy.checks
    assert checks[0] == PROM
    assert (checks[1].kind, checks[1].min, checks[1].max, checks[1].timeout_s) == ("web", 1.0, None, 0.5)
    assert request_url(checks[0]) == "http://prom:9090/api/v1/query"
    assert request_url(checks[1]) == "https://scores.example/api"


@pytest.mark.parametrize(
    ("checks", "message"),
    [
        (f"[[policy.checks]]\n{GOOD}", "policy.checks[0].max, min: set exactly one of them, got neither"),
        (f"[[policy.checks]]\n{GOOD}max = 1\nmin = 0", "policy.checks[0].max, min: set exactly one of them, got both"),
        (
            f"[[policy.checks]]\n{GOOD}max = 1\n[[policy.checks]]\n{GOOD.replace('prometheus', 'graphite')}max = 1",
            "policy.checks[1].kind: must be one of prometheus, web, got 'graphite'",
        ),
        (
            f"[[policy.checks]]\n{GOOD.replace('http://prom:9090', 'ftp://prom')}max = 1",
            "policy.checks[0].url: must be an http:// or https:// URL with a host, got 'ftp://prom'",
        ),
        (f"[[policy.checks]]\n{NO_QUERY}max = 1", "policy.checks[0].query: a prometheus"),
        (
            '[[policy.checks]]\nname = "w"\nkind = "web"\nurl = "http://w"\nquery = "up"\nmax = 1',
            "policy.checks[0].query: only for kind = prometheus",
        ),
        (f"[[policy.checks]]\n{GOOD}max = 1\nmaxx = 2", "unknown setting policy.checks[0].maxx"),
        (f"[[policy.checks]]\n{GOOD}max = '1'", "policy.checks[0].max: expected a number, got '1'"),
        (f"[[policy.checks]]\n{GOOD}max = 1\ntimeout_s = 0", "policy.checks[0].timeout_s: must be in (0, 60]"),
        (
            f"[[policy.checks]]\n{GOOD.replace('p99', 'error_rate')}max = 1",
            "policy.checks[0].name: 'error_rate' is the name of a built-in check",
        ),
        (f"[[policy.checks]]\n{GOOD.replace('p99', 'a b')}max = 1", "policy.checks[0].name: must be 1-63 letters"),
        (f"[[policy.checks]]\n{GOOD}max = 1\n[[policy.checks]]\n{GOOD}min = 1", "two checks are named 'p99'"),
        ("checks = 3", "policy.checks: expected an array of tables"),
        # URLs that parse wrong, or that the HTTP client refuses at each poll (never a reading).
        (f"[[policy.checks]]\n{GOOD.replace('http://prom:9090', 'http://[::1')}max = 1", "it does not parse"),
        (f"[[policy.checks]]\n{GOOD.replace('prom:9090', 'prom:99999')}max = 1", "it does not parse (Port out of"),
        (f"[[policy.checks]]\n{GOOD.replace('prom:9090', 'prom:9090/' + 'x' * 9000)}max = 1", "limit is 8192"),
    ],
)
def test_a_bad_check_is_refused_naming_its_place_and_field(tmp_path: Path, checks: str, message: str) -> None:
    assert message in spec_error(tmp_path, checks)


def test_no_built_in_check_name_can_be_taken() -> None:
    everything = PolicySpec(max_accuracy_drop=0.01, min_agreement=0.9, max_drift=0.1)
    names = enabled_checks(everything, with_traffic=True)
    names += ["step_" + n for n in names] + ["step_requests", "step_duration_s", "gate_agreement"]
    for name in names:
        with pytest.raises(ConfigError, match="built-in check"):
            ExternalCheckSpec(name=name, kind="web", url="http://x", max=1)


# ---------------------------------------------------------------- the poller


def poll_once(spec: ExternalCheckSpec, handler: httpx.MockTransport) -> Reading | None:
    async def run() -> Reading | None:
        checks = ExternalChecks(clock=lambda: 100.0, transport=handler)
        checks.poll("m", [spec])
        await checks.settle()
        reading = checks.latest("m", spec.name)
        await checks.close()
        return reading

    return asyncio.run(run())


def test_the_poller_asks_prometheus_its_query_and_keeps_the_number() -> None:
    seen: list[httpx.URL] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.url)
        return httpx.Response(200, content=orjson.dumps(vector("0.12")))

    reading = poll_once(PROM, httpx.MockTransport(answer))
    assert reading is not None and (reading.value, reading.problem, reading.taken_at) == (0.12, "", 100.0)
    assert seen[0].path == "/api/v1/query" and seen[0].params["query"] == "up"


@pytest.mark.parametrize(
    ("spec", "response", "problem"),
    [
        (WEB, httpx.Response(503, content=b"<html>down</html>"), "HTTP 503, and the answer is not JSON"),
        (WEB, httpx.Response(500, json={"data": {"score": 1}}), "HTTP 500"),
        (WEB, httpx.Response(200, json={"data": {}}), "the answer has no 'data.score'"),
        (PROM, httpx.Response(400, json={"status": "error", "error": "bad query"}), "refused the query: 'bad query'"),
        (WEB, httpx.Response(200, content=b"[" + b"1," * 600_000 + b"1]"), "larger than 1 MiB"),
    ],
)
def test_the_poller_records_why_an_answer_is_unusable(
    spec: ExternalCheckSpec, response: httpx.Response, problem: str
) -> None:
    reading = poll_once(spec, httpx.MockTransport(lambda request: response))
    assert reading is not None and math.isnan(reading.value) and problem in reading.problem


def test_a_source_that_cannot_be_reached_or_answers_too_late_is_recorded_as_such() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    reading = poll_once(PROM, httpx.MockTransport(refuse))
    assert reading is not None and reading.problem == ("cannot reach http://prom:9090/api/v1/query: connection refused")

    async def stall(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(30)
        return httpx.Response(200, json={"data": {"score": 1}})

    slow = ExternalCheckSpec(name="s", kind="web", url="http://slow/", min=0.5, timeout_s=0.2)
    reading = poll_once(slow, httpx.MockTransport(stall))
    assert reading is not None and reading.problem == "no answer from http://slow/ within 0.2 s"


def test_one_read_in_flight_per_check_and_forget_drops_a_models_readings() -> None:
    async def run() -> None:
        release = asyncio.Event()
        asked: list[httpx.Request] = []

        async def held(request: httpx.Request) -> httpx.Response:
            asked.append(request)
            await release.wait()
            return httpx.Response(200, content=orjson.dumps(vector("0.1")))

        checks = ExternalChecks(clock=lambda: 100.0, transport=httpx.MockTransport(held))
        checks.poll("m", [PROM])
        await asyncio.sleep(0.05)
        checks.poll("m", [PROM])  # the first read is still waiting: no second request
        await asyncio.sleep(0.05)
        release.set()
        await checks.settle()
        assert len(asked) == 1
        results = checks.results("m", [PROM], since=0.0, now=101.0, interval_s=1.0)
        assert results[0].verdict is Verdict.PASS
        checks.forget("m")
        assert checks.latest("m", "p99") is None
        assert checks.results("m", [PROM], since=0.0, now=101.0, interval_s=1.0)[0].verdict is Verdict.INCONCLUSIVE
        await checks.close()
        checks.poll("m", [PROM])  # after close: nothing starts
        await checks.settle()
        assert len(asked) == 1 and checks.latest("m", "p99") is None

    asyncio.run(run())
