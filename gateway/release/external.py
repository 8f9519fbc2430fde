"""External checks: a number the gateway does not compute, held to a bound.

A `[[policy.checks]]` entry names a source (a Prometheus instant query, or any
HTTP endpoint answering JSON) and a bound (`max` or `min`). The poller
(gateway/release/external_poll.py) reads each source once an analysis interval
and keeps the latest `Reading`; this module turns an answer into a number and a
reading into a verdict, with no I/O of its own.

A reading is a point value, not a sample: there is no interval around it and it
spends none of the policy's alpha. It passes or fails on the bound alone, and
anything that leaves the number unknown is inconclusive, never a pass: a source
that cannot be reached, an answer that is not JSON, an empty Prometheus result,
a NaN, or a reading too old to stand for now. A failing reading counts toward
`threshold` like a failing built-in check; an inconclusive one holds the step,
and `on_timeout` applies as it does to any check still waiting.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from gateway.config.spec import ExternalCheckSpec
from gateway.release.confidence import Verdict
from gateway.release.policy import CheckResult


class BadAnswer(ValueError):
    """An answer that holds no usable number; the message says why, for the audit."""


@dataclass(frozen=True, slots=True)
class Reading:
    """The outcome of one poll of one check's source."""

    spec: ExternalCheckSpec  # what was asked: a reading of an earlier spec is not used for a changed one
    taken_at: float  # unix seconds, when the answer (or the failure) came
    value: float = math.nan
    problem: str = ""  # why there is no value ("" when there is one)


@dataclass(frozen=True, slots=True)
class ExternalResult(CheckResult):
    """A check result read from outside: the evidence dict adds its kind and, in words, what
    was read against what bound, or why nothing usable was."""

    kind: str = ""
    reason: str = ""

    def to_dict(self) -> dict[str, object]:
        return {**CheckResult.to_dict(self), "kind": self.kind, "reason": self.reason}

    def describe(self) -> str:
        return f"{self.name}: {self.reason}"

    def failure(self) -> str:
        return f"{self.name} ({self.reason})"


def number(value: object, where: str) -> float:
    """A JSON number, or a string holding one (Prometheus sends samples as strings)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise BadAnswer(f"{where} is {_kind(value)}, not a number")
    try:
        return float(value)
    except ValueError:
        raise BadAnswer(f"{where} is {_shown(value)}, not a number") from None


def prometheus_value(answer: object) -> float:
    """The one number of a Prometheus instant-query answer (GET /api/v1/query).

    A vector must hold exactly one series: an empty result means the query matched
    nothing (no traffic yet, a wrong label), and several would leave it to us to pick
    one; aggregate in the query (sum, max, histogram_quantile over a sum by le)."""
    if not isinstance(answer, Mapping):
        raise BadAnswer(f"the answer is {_kind(answer)}, not a Prometheus API object")
    if answer.get("status") != "success":
        detail = answer.get("error") or answer.get("errorType") or f"status {_shown(answer.get('status'))}"
        raise BadAnswer(f"Prometheus refused the query: {_shown(detail)}")
    data = answer.get("data")
    if not isinstance(data, Mapping):
        raise BadAnswer("the answer has no data object")
    kind, result = data.get("resultType"), data.get("result")
    if kind == "scalar":
        return _sample(result, "the scalar")
    if kind != "vector":
        raise BadAnswer(f"the query gave a {_shown(kind)}, not an instant vector or scalar (use an instant query)")
    if not isinstance(result, Sequence) or isinstance(result, str):
        raise BadAnswer("the vector's result is not a list")
    if not result:
        raise BadAnswer("the query returned no series (empty result)")
    if len(result) > 1:
        raise BadAnswer(f"the query returned {len(result)} series, not one (aggregate it, e.g. with max or sum)")
    series = result[0]
    if not isinstance(series, Mapping):
        raise BadAnswer("the series is not an object")
    return _sample(series.get("value"), "the series' value")


def _sample(sample: object, where: str) -> float:
    """[<unix time>, "<number>"]: the number."""
    if not isinstance(sample, Sequence) or isinstance(sample, str) or len(sample) != 2:
        raise BadAnswer(f"{where} is not a [time, value] pair")
    return number(sample[1], where)


def json_path_value(answer: object, path: str) -> float:
    """The number at a dotted path in a JSON answer: `value`, `data.p99`, `items.0.latency`
    (a part that is all digits indexes a list)."""
    here = answer
    walked: list[str] = []
    for part in path.split("."):
        walked.append(part)
        at = ".".join(walked)
        if isinstance(here, Mapping):
            if part not in here:
                raise BadAnswer(f"the answer has no {at!r}")
            here = here[part]
        elif isinstance(here, list) and part.isdigit():
            if int(part) >= len(here):
                raise BadAnswer(f"the answer's list at {at!r} has {len(here)} items")
            here = here[int(part)]
        else:
            raise BadAnswer(f"cannot look up {at!r}: the answer there is {_kind(here)}")
    return number(here, repr(path))


def judge(spec: ExternalCheckSpec, reading: Reading | None, *, since: float, now: float, max_age: float) -> CheckResult:
    """One external check's verdict on its latest reading.

    No reading, one taken before `since` (the rollout began) or for another spec, one
    older than `max_age` seconds, or one without a usable number: inconclusive, with
    the reason. Otherwise the bound decides: above `max` (below `min`) fails, and a
    reading at the bound passes, as a built-in check's interval on its bound does."""
    bound = spec.bound
    op, fail_op = ("≤", ">") if spec.max is not None else ("≥", "<")
    value = math.nan
    if reading is None or reading.taken_at < since or reading.spec != spec:
        verdict, reason = Verdict.INCONCLUSIVE, "no reading yet in this rollout"
    elif now - reading.taken_at > max_age:
        age = now - reading.taken_at
        verdict, reason = Verdict.INCONCLUSIVE, f"the latest reading is {age:.0f} s old (read again each interval)"
    elif reading.problem:
        verdict, reason = Verdict.INCONCLUSIVE, f"no usable reading: {reading.problem}"
    elif math.isnan(reading.value):
        verdict, reason = Verdict.INCONCLUSIVE, "the reading is NaN (no data behind it, or 0/0)"
    elif math.isinf(reading.value) and (reading.value < 0) == (spec.max is not None):
        # An infinity on the passing side (+Inf for a min, -Inf for a max) is a division by
        # zero or "1e999", not a good number; one past the bound (histogram_quantile's +Inf:
        # beyond the last bucket) fails below.
        verdict, reason = Verdict.INCONCLUSIVE, f"the reading is {reading.value} (a division by zero?), not a number"
    else:
        value = reading.value
        within = value <= bound if spec.max is not None else value >= bound
        verdict = Verdict.PASS if within else Verdict.FAIL
        reason = f"read {value:.6g}, {op if within else fail_op} {'max' if spec.max is not None else 'min'} {bound:g}"
    usable = not math.isnan(value)
    return ExternalResult(
        spec.name, verdict, value, value, value, bound, int(usable), None, kind=spec.kind, reason=reason
    )


def _kind(value: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), type(value).__name__
    )


def _shown(value: object, limit: int = 80) -> str:
    """A value from a remote answer for a reason: cut short, as the audit keeps it."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
