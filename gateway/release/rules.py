"""Routing rules: a cohort of requests goes to a named role or version before the weighted split.

A rule holds one or more matches, on a request parameter (the OIP request's
`parameters`, e.g. `tenant`) or on transport metadata (gRPC metadata, REST
headers); all of a rule's matches must hold. A model's rules are tried in
order and the first that matches decides: the stable version, the canary, or
a pinned version. A rule for the canary while there is none falls through to
the split (see `resolve`). Requests no rule matches take the split as before.

Regular expressions are operators' text run against clients' text on the
request path, so they run on RE2 (google-re2): time linear in the value
whatever the pattern, so no pattern can be a ReDoS ((a+)+$ answers in
microseconds on 10,000 characters, where Python's backtracking `re` took
seconds on 40). Backreferences and lookaround, which no linear-time engine
has, are refused with the reason. The pattern's length (MAX_PATTERN_CHARS)
and the compiled program's memory (RE2_MAX_MEM) are capped, and so is the
text a pattern runs on (MAX_SUBJECT_CHARS: a longer value never matches a
regex). Every pattern is compiled once, when the rule is made (or read back
from the store), never per request.

Pure: no I/O, no clock; the release state holds the rules, and the store
keeps them with it (revisioned and audited like every release change).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import re2

from gateway.errors import InvalidInput
from gateway.types import HeaderSource

# Bounds on what one model's rules may hold: they are checked on every routed request
# of the model (first match wins), and stored and audited with each release change.
MAX_RULES = 32
MAX_MATCHES = 8  # per rule
MAX_NAME_CHARS = 64
MAX_KEY_CHARS = 128
MAX_VALUE_CHARS = 256  # an exact value, a prefix, a member of a set
MAX_VALUES = 64  # members of one `in` set
# A regex is refused past this length: a rule is a cohort test, not a program.
MAX_PATTERN_CHARS = 256
# A regex never matches a longer value: a request parameter can be as long as the message
# allows (megabytes), and even linear time on that is time taken from every request. Cohort
# values are short: an exact or prefix value is at most MAX_VALUE_CHARS too.
MAX_SUBJECT_CHARS = 1024
# The compiled program's memory: RE2 refuses a pattern whose automaton would be larger
# (a{1000}{1000} and the like) instead of building it.
RE2_MAX_MEM = 1 << 20
# What a compiled pattern offers the rules (re2's own type has no stubs).
Pattern = Any
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
    _pattern: Pattern | None = field(default=None, compare=False, repr=False)
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


def compile_pattern(pattern: str, where: str) -> Pattern:
    """The compiled pattern, or InvalidInput: empty, too long, or not a regex RE2 runs."""
    if not pattern:
        raise InvalidInput(f"{where}: the pattern is empty (it would match everything)")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise InvalidInput(f"{where}: the pattern is {len(pattern)} characters; the limit is {MAX_PATTERN_CHARS}")
    options = re2.Options()
    options.log_errors = False  # a refused pattern is the caller's error, not a line on the gateway's stderr
    options.max_mem = RE2_MAX_MEM
    try:
        return re2.compile(pattern, options)
    except re2.error as exc:
        reason = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        raise InvalidInput(
            f"{where}: {pattern[:60]!r} is not a regular expression this gateway runs ({reason}); "
            "rules run on RE2 (linear time): no backreferences or lookaround"
        ) from None


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
