"""Routing rules: a cohort of requests goes to a named role or version before the weighted split.

A rule holds one or more matches, on a request parameter (the OIP request's
`parameters`, e.g. `tenant`) or on transport metadata (gRPC metadata, REST
headers); all of a rule's matches must hold. A model's rules are tried in
order and the first that matches decides: the stable version, the canary, or
a pinned version. A rule for the canary while there is none falls through to
the split (see `resolve`). Requests no rule matches take the split as before.

Regular expressions are operators' text run against clients' text on the
request path, so they are bounded three ways: the pattern's length
(MAX_PATTERN_CHARS), its shape (no part that matches in several ways
repeated many times over, like (a+)+ or (a{2,5})+ or (a|ab)*: backtracking
exponential in the input, the usual ReDoS; and at most MAX_LONG_REPEATS
unbounded repetitions, each of which multiplies the cost by the input's
length), and the text they run on (MAX_SUBJECT_CHARS: a longer value never
matches a regex). Every pattern is compiled once, when
the rule is made (or read back from the store), never per request.

Pure: no I/O, no clock; the release state holds the rules, and the store
keeps them with it (revisioned and audited like every release change).
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from gateway.errors import InvalidInput
from gateway.types import HeaderSource

with warnings.catch_warnings():
    # The regular-expression parser is public only under these (deprecated) names; its
    # structure is what the shape check below reads. typeshed types both modules.
    warnings.simplefilter("ignore", DeprecationWarning)
    import sre_constants
    import sre_parse

# Bounds on what one model's rules may hold: they are checked on every routed request
# of the model (first match wins), and stored and audited with each release change.
MAX_RULES = 32
MAX_MATCHES = 8  # per rule
MAX_NAME_CHARS = 64
MAX_KEY_CHARS = 128
MAX_VALUE_CHARS = 256  # an exact value, a prefix, a member of a set
MAX_VALUES = 64  # members of one `in` set
# A regex is refused past this length: a rule is a cohort test, not a program, and the
# shape check below walks the parsed pattern whole.
MAX_PATTERN_CHARS = 256
# A regex never matches a longer value: the cost of a search grows with the text (as its
# square, for a pattern with two unbounded repetitions), and a request parameter can be as
# long as the message allows (megabytes). Cohort values are short: an exact or prefix
# value is at most MAX_VALUE_CHARS too.
MAX_SUBJECT_CHARS = 256
# Repetitions above this count are "large" for the shape check: a part that can match in
# several ways, run more often than this, is refused ({2,5} inside + is not fine: 5 s on
# 40 characters).
_LARGE_REPEAT = 10
# Unbounded repetitions (`.*`, `\\d+`, `{1,50}`) one pattern may hold: each multiplies the
# worst case of a failing search by the value's length (two: 10 ms on 256 characters).
MAX_LONG_REPEATS = 2
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class Source(StrEnum):
    """Where a match looks: stored and sent by the control API as these strings."""

    PARAM = "param"  # the OIP request's parameters
    HEADER = "header"  # gRPC metadata / HTTP headers (names in lower case)


class Op(StrEnum):
    EXACT = "exact"
    PREFIX = "prefix"
    REGEX = "regex"  # re.search: unanchored unless the pattern says ^ or $
    IN = "in"  # the value is one of a set


class Target(StrEnum):
    STABLE = "stable"
    CANARY = "canary"
    VERSION = "version"  # a pinned version, named in Rule.version


@dataclass(frozen=True, slots=True)
class Match:
    source: Source
    key: str
    op: Op
    values: tuple[str, ...]  # one, except for `in`
    # Made once from `values` (compare=False: two equal rules are equal whatever they hold).
    _pattern: re.Pattern[str] | None = field(default=None, compare=False, repr=False)
    _members: frozenset[str] = field(default=frozenset(), compare=False, repr=False)

    def holds(self, value: str) -> bool:
        op = self.op
        if op is Op.EXACT:
            return value == self.values[0]
        if op is Op.PREFIX:
            return value.startswith(self.values[0])
        if op is Op.IN:
            return value in self._members
        assert self._pattern is not None  # made with every regex match
        return len(value) <= MAX_SUBJECT_CHARS and self._pattern.search(value) is not None

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source.value, "key": self.key, "op": self.op.value, "values": list(self.values)}


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    matches: tuple[Match, ...]  # all must hold
    target: Target
    version: str = ""  # the pinned version when target is VERSION, else empty

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "match": [m.to_dict() for m in self.matches],
            "to": self.target.value,
            "version": self.version,
        }


# -- building (and validating) rules ----------------------------------------------------------


def make_match(source: str, key: str, op: str, values: Sequence[str], where: str) -> Match:
    """A match from its parts, or InvalidInput naming the field (`where`, e.g. route.match[0])."""
    try:
        src = Source(source)
    except ValueError:
        raise InvalidInput(f"{where}.source is {source[:40]!r}: use param or header") from None
    try:
        kind = Op(op)
    except ValueError:
        raise InvalidInput(f"{where}.op is {op[:40]!r}: use exact, prefix, regex or in") from None
    if not key:
        raise InvalidInput(f"{where}.key is empty: name the {src.value} to match")
    if len(key) > MAX_KEY_CHARS:
        raise InvalidInput(f"{where}.key is {len(key)} characters; the limit is {MAX_KEY_CHARS}")
    if src is Source.HEADER:
        # gRPC metadata and HTTP/2 header names are lower case on the wire; both edges give them so.
        key = key.lower()
        if key.endswith("-bin"):
            raise InvalidInput(f"{where}.key {key[:40]!r} is binary metadata (-bin), which a rule cannot match")
    values = tuple(values)
    if kind is Op.IN:
        if not values:
            raise InvalidInput(f"{where}.values is empty: an `in` match needs at least one value")
        if len(values) > MAX_VALUES:
            raise InvalidInput(f"{where}.values has {len(values)} members; the limit is {MAX_VALUES}")
    elif len(values) != 1:
        raise InvalidInput(f"{where}.values has {len(values)} values: {kind.value} takes exactly one")
    limit = MAX_PATTERN_CHARS if kind is Op.REGEX else MAX_VALUE_CHARS
    for value in values:
        if len(value) > limit:
            raise InvalidInput(f"{where}.values: {value[:40]!r}... is {len(value)} characters; the limit is {limit}")
    if kind is Op.PREFIX and not values[0]:
        raise InvalidInput(f"{where}.values: an empty prefix matches everything; use exact or a real prefix")
    if kind is Op.REGEX:
        return Match(src, key, kind, values, _pattern=compile_pattern(values[0], f"{where}.values"))
    return Match(src, key, kind, values, _members=frozenset(values) if kind is Op.IN else frozenset())


def compile_pattern(pattern: str, where: str) -> re.Pattern[str]:
    """The compiled pattern, or InvalidInput: too long, not a regex, or a shape that backtracks."""
    if not pattern:
        raise InvalidInput(f"{where}: the pattern is empty (it would match everything)")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise InvalidInput(f"{where}: the pattern is {len(pattern)} characters; the limit is {MAX_PATTERN_CHARS}")
    try:
        compiled = re.compile(pattern)
        parsed = sre_parse.parse(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        raise InvalidInput(f"{where}: {pattern[:60]!r} is not a valid regular expression ({exc})") from None
    problem = _backtracking(parsed, outer=1)
    long_repeats = _long_repeats(parsed)
    if not problem and long_repeats > MAX_LONG_REPEATS:
        problem = f"{long_repeats} unbounded repetitions (like .*.*.*; at most {MAX_LONG_REPEATS})"
    if problem:
        raise InvalidInput(
            f"{where}: {pattern[:60]!r} has {problem}, which can take exponential time on a hostile value; "
            "rewrite it without the nesting (a character class, or a prefix or `in` match)"
        )
    return compiled


def _backtracking(items: Any, outer: float) -> str:
    """The first exponential-backtracking shape in a parsed pattern, described; "" if none.

    `outer` is how many times the enclosing repetitions may run this part, together
    (their upper bounds multiplied; inf when one is unbounded). A part that can match in
    more than one way (a repetition of variable count, an alternation) run more than
    _LARGE_REPEAT times over gives the engine that many choices to retry on a mismatch:
    (a+)+, but also (a{2,5})+ and (a?){40}, which are small repetitions inside large ones."""
    for op, av in items:
        if op in (sre_constants.MAX_REPEAT, sre_constants.MIN_REPEAT):
            low, high, body = av
            count = math.inf if high == sre_constants.MAXREPEAT else high
            if low != high and outer > _LARGE_REPEAT:
                return "a repetition inside a repetition (like (a+)+)"
            if outer * count > _LARGE_REPEAT and any(sub_op == sre_constants.BRANCH for sub_op, _ in _flat(body)):
                return "a repeated alternation (like (a|ab)+)"
            found = _backtracking(body, outer * count)
        elif op == sre_constants.SUBPATTERN:
            found = _backtracking(av[-1], outer)
        elif op == sre_constants.BRANCH:
            found = next((f for branch in av[1] if (f := _backtracking(branch, outer))), "")
        elif op in (sre_constants.ASSERT, sre_constants.ASSERT_NOT):
            found = _backtracking(av[1], outer)
        elif op == sre_constants.GROUPREF_EXISTS:
            found = next((f for part in av[1:] if part and (f := _backtracking(part, outer))), "")
        else:
            found = ""
        if found:
            return found
    return ""


def _long_repeats(items: Any) -> int:
    """How many repetitions of large or unbounded variable count a parsed pattern holds:
    k of them in a row (.*.*.*) make a failing search take time growing as the value's
    length to the power k, polynomial but not small (56 s for k = 3 on 1,024 characters)."""
    count = 0
    for op, av in items:
        if op in (sre_constants.MAX_REPEAT, sre_constants.MIN_REPEAT):
            low, high, body = av
            large = high == sre_constants.MAXREPEAT or high > _LARGE_REPEAT
            count += int(large and low != high) + _long_repeats(body)
        elif op == sre_constants.SUBPATTERN:
            count += _long_repeats(av[-1])
        elif op == sre_constants.BRANCH:
            count += sum(_long_repeats(branch) for branch in av[1])
        elif op in (sre_constants.ASSERT, sre_constants.ASSERT_NOT):
            count += _long_repeats(av[1])
        elif op == sre_constants.GROUPREF_EXISTS:
            count += sum(_long_repeats(part) for part in av[1:] if part)
    return count


def _flat(items: Any) -> Iterable[tuple[Any, Any]]:
    """A parsed pattern's items, looking through groups (not into repetitions)."""
    for op, av in items:
        if op == sre_constants.SUBPATTERN:
            yield from _flat(av[-1])
        else:
            yield op, av


def make_rule(name: str, matches: Sequence[Match], target: str, version: str = "") -> Rule:
    """A rule, or InvalidInput naming the field. Versions are checked against the loaded
    ones where the release is (gateway.release.state.check), not here."""
    if not name:
        raise InvalidInput("route.name is empty: name the rule (it is how `gateway route remove` finds it)")
    if len(name) > MAX_NAME_CHARS or not _NAME.fullmatch(name):
        raise InvalidInput(
            f"route.name {name[:40]!r}: use up to {MAX_NAME_CHARS} letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    if not matches:
        raise InvalidInput(
            f"route {name!r} has no match: it would send every request; give it a --param or --header "
            "(or change the split with `gateway traffic set`)"
        )
    if len(matches) > MAX_MATCHES:
        raise InvalidInput(f"route {name!r} has {len(matches)} matches; the limit is {MAX_MATCHES}")
    try:
        kind = Target(target)
    except ValueError:
        raise InvalidInput(f"route {name!r}: route.to is {target[:40]!r}: use stable, canary or version") from None
    if kind is Target.VERSION and not version:
        raise InvalidInput(f"route {name!r}: route.version is empty: name the version to pin (route.to is version)")
    if kind is not Target.VERSION and version:
        raise InvalidInput(f"route {name!r}: route.version is set but route.to is {kind.value}; set to = version")
    return Rule(name, tuple(matches), kind, version)


def rule_from_dict(data: Mapping[str, Any]) -> Rule:
    """A rule as `Rule.to_dict` stored it (validated again: the store may be old or edited)."""
    name = str(data.get("name", ""))
    matches = [
        make_match(
            str(m.get("source", "")),
            str(m.get("key", "")),
            str(m.get("op", "")),
            [str(v) for v in m.get("values", ())],
            f"route {name!r} match[{i}]",
        )
        for i, m in enumerate(data.get("match", ()))
    ]
    return make_rule(name, matches, str(data.get("to", "")), str(data.get("version", "")))


def check_rules(rules: Sequence[Rule]) -> None:
    """Rules that may stand together: few enough, names unique."""
    if len(rules) > MAX_RULES:
        raise InvalidInput(f"a model may have {MAX_RULES} routing rules; remove one first")
    seen: set[str] = set()
    for rule in rules:
        if rule.name in seen:
            raise InvalidInput(f"route.name {rule.name!r} is taken: remove that rule first, or pick another name")
        seen.add(rule.name)


def with_rule(rules: Sequence[Rule], rule: Rule, position: int = 0) -> tuple[Rule, ...]:
    """`rules` with `rule` added at `position` (1-based; 0: last), checked together."""
    if position < 0 or position > len(rules) + 1:
        raise InvalidInput(f"position is {position}: use 1..{len(rules) + 1}, or 0 for the end")
    index = len(rules) if position == 0 else position - 1
    added = (*rules[:index], rule, *rules[index:])
    check_rules(added)
    return added


def without_rule(rules: Sequence[Rule], name: str) -> tuple[Rule, ...] | None:
    """`rules` without the one named `name`; None when there is none."""
    kept = tuple(r for r in rules if r.name != name)
    return None if len(kept) == len(rules) else kept


# -- the request path -----------------------------------------------------------------------


def param_text(value: bool | int | float | str) -> str:
    """A request parameter as rules compare it: strings as they are, booleans as true/false."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, str) else str(value)


def _header_values(source: HeaderSource | None) -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    if source is None:
        return values
    for key, value in source() or ():
        if isinstance(value, str):  # binary (-bin) metadata arrives as bytes: no rule reads it
            values.setdefault(key, []).append(value)
    return values


def first_match(
    rules: Sequence[Rule], parameters: Mapping[str, bool | int | float | str], headers: HeaderSource | None
) -> Rule | None:
    """The first rule all of whose matches hold for this request, or None."""
    header_values: dict[str, list[str]] | None = None  # read at the first header condition reached
    for rule in rules:
        for m in rule.matches:
            if m.source is Source.PARAM:
                raw = parameters.get(m.key)
                if raw is None or not m.holds(param_text(raw)):
                    break
            else:
                if header_values is None:
                    header_values = _header_values(headers)
                if not any(m.holds(v) for v in header_values.get(m.key, ())):
                    break
        else:
            return rule
    return None


def resolve(rule: Rule, stable: str, canary: str) -> str:
    """The version a matched rule sends to; "" when it names the canary and there is none,
    in which case the request takes the weighted split, as if no rule had matched (a rule
    for the canary outlives the canary: rolled back or promoted, it routes nothing)."""
    if rule.target is Target.STABLE:
        return stable
    if rule.target is Target.CANARY:
        return canary
    return rule.version
