"""Routing rules as text: one line each, as `gateway route list` and `gateway status` show them."""

from __future__ import annotations

from collections.abc import Iterable

from gateway.protocol.pb import release_pb2 as rpb

_SYMBOLS = {"exact": "=", "prefix": "starts with", "regex": "~"}


def describe_match(m: rpb.RouteMatch) -> str:
    where = f"{m.source} {m.key}"
    if m.op == "in":
        return f"{where} in {{{', '.join(m.values)}}}"
    value = m.values[0] if m.values else ""
    return f"{where} {_SYMBOLS.get(m.op, m.op)} {value!r}"


def route_lines(routes: Iterable[rpb.Route]) -> list[str]:
    """One line per rule, numbered in the order they are tried. Plain text holding what
    clients and operators wrote: print it through `gateway.cli.release.markup`."""
    lines = []
    for number, r in enumerate(routes, 1):
        to = f"version {r.version}" if r.to == "version" else r.to
        conditions = " and ".join(describe_match(m) for m in r.match)
        lines.append(f"  rule {number}. {r.name}: {conditions} -> {to}")
    return lines
