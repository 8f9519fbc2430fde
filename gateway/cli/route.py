"""`gateway route add|list|remove`: routing rules, tried in order before the weighted split.

A condition is written `NAME=VALUE` (exact), or with the operator after the name:
`NAME:prefix=VALUE`, `NAME:regex=PATTERN`, `NAME:in=A,B,C` (`NAME:exact=VALUE` too).
The gateway validates the rule (and audits a refusal); this module only splits the
text, so a mistake anywhere is refused the same way, with exit status 1 and the field.
"""

from __future__ import annotations

import difflib

import click

from gateway.cli.release import REASON_HELP, connection_options, console, markup
from gateway.cli.rules_text import route_lines
from gateway.control.client import EXIT_REFUSED, CommandFailed, ControlClient
from gateway.protocol.pb import release_pb2 as rpb

OPS = ("exact", "prefix", "regex", "in")
ROLES = ("stable", "canary")
_VERSION_PREFIX = "version:"

SYNTAX = """\b
Conditions (all must hold; at least one):
  --param tenant=internal          parameter equals a value
  --param tenant:prefix=int        starts with
  --param tenant:regex=^int(ern)?$ regular expression (searched; 256 characters at most)
  --param tenant:in=internal,staff one of a set (comma-separated)
  --header x-cohort:regex=^beta    the same on a gRPC metadata key / HTTP header
Targets: --to stable | canary | VERSION (version:NAME for a version named stable or canary).
A rule --to canary while there is no canary leaves its requests to the split."""


def parse_condition(text: str, source: str) -> rpb.RouteMatch:
    """`NAME[:op]=VALUE` as a RouteMatch; the gateway checks the rest."""
    name, equals, value = text.partition("=")
    if not equals:
        raise CommandFailed(
            f"--{source} {text[:60]!r}: expected NAME=VALUE or NAME:OP=VALUE (OP: {', '.join(OPS)})", EXIT_REFUSED
        )
    key, colon, op = name.rpartition(":")
    if colon and op not in OPS:
        close = difflib.get_close_matches(op.lower(), OPS, n=1, cutoff=0.6)
        if close:
            # A misspelt operator would otherwise make an exact match on a parameter named
            # `tenant:regx`, which no request has: a rule that silently never matches.
            raise CommandFailed(
                f"--{source} {text[:60]!r}: unknown operator {op[:20]!r} (did you mean {close[0]!r}?); "
                f"use NAME:OP=VALUE with OP one of {', '.join(OPS)}, or NAME:exact=VALUE for a name holding ':'",
                EXIT_REFUSED,
            )
    if not colon or op not in OPS:
        # No operator (a name may hold a colon itself): an exact match on the whole name.
        key, op = name, "exact"
    values = [value]
    if op == "in":
        # `in=staff, qa` means qa, not " qa" (a member no request would ever carry); an empty
        # member (`a,,b`, a trailing comma) is a slip, not a wish to match the empty string.
        values = [member.strip() for member in value.split(",")]
        if "" in values:
            raise CommandFailed(
                f"--{source} {text[:60]!r}: an empty member in the set; list the values as A,B,C", EXIT_REFUSED
            )
    return rpb.RouteMatch(source=source, key=key, op=op, values=values)


def parse_target(text: str) -> tuple[str, str]:
    """--to as (to, version): a role, or a version pinned."""
    if text in ROLES:
        return text, ""
    return "version", text.removeprefix(_VERSION_PREFIX)


@click.group(
    epilog="\b\nExamples:\n  gateway route add digits internal --param tenant=internal --to canary\n"
    "  gateway route list digits\n  gateway route remove digits internal"
)
def route() -> None:
    """Routing rules: send a cohort of requests to a role or version before the weighted split."""


@route.command(
    "add",
    epilog=SYNTAX
    + "\n\n\b\nExamples:\n"
    + "  gateway route add digits internal --param tenant=internal --to canary\n"
    + "  gateway route add digits beta --header x-cohort:regex=^beta --to 3 --reason 'beta testers on v3'\n"
    + "  gateway route add digits staff --param tenant:in=staff,qa --header x-region=eu --to stable --position 1",
)
@click.argument("model")
@click.argument("name")
@click.option("--param", "params", multiple=True, metavar="NAME[:OP]=VALUE", help="A request parameter condition.")
@click.option("--header", "headers", multiple=True, metavar="NAME[:OP]=VALUE", help="A metadata/header condition.")
@click.option("--to", "target", required=True, metavar="stable|canary|VERSION", help="Where matching requests go.")
@click.option("--position", type=click.IntRange(min=0), default=0, help="Place in the order, from 1. [default: last]")
@click.option("--reason", default="", help=REASON_HELP)
@connection_options
def route_add(
    client: ControlClient,
    model: str,
    name: str,
    params: tuple[str, ...],
    headers: tuple[str, ...],
    target: str,
    position: int,
    reason: str,
) -> None:
    """Add rule NAME to MODEL: requests meeting every condition go to the target (first rule wins)."""
    matches = [parse_condition(p, "param") for p in params] + [parse_condition(h, "header") for h in headers]
    to, version = parse_target(target)
    request = rpb.AddRouteRequest(
        model=model,
        route=rpb.Route(name=name, match=matches, to=to, version=version),
        position=position,
        reason=reason,
    )
    release = client.call(client.stub.AddRoute, request)
    console.print(f"{markup(release.model)}: added rule {markup(name)} · revision {release.revision}")
    for line in route_lines(release.routes):
        console.print(markup(line))


@route.command("list", epilog="\b\nExample:\n  gateway route list digits")
@click.argument("model")
@connection_options
def route_list(client: ControlClient, model: str) -> None:
    """MODEL's routing rules, in the order they are tried."""
    answer = client.call(client.stub.ListRoutes, rpb.ListRoutesRequest(model=model))
    if not answer.routes:
        console.print(f"{markup(answer.model)}: no routing rules (every request takes the split)")
        return
    for line in route_lines(answer.routes):
        console.print(markup(line))


@route.command("remove", epilog="\b\nExample:\n  gateway route remove digits internal --reason 'test over'")
@click.argument("model")
@click.argument("name")
@click.option("--reason", default="", help=REASON_HELP)
@connection_options
def route_remove(client: ControlClient, model: str, name: str, reason: str) -> None:
    """Remove rule NAME from MODEL."""
    release = client.call(client.stub.RemoveRoute, rpb.RemoveRouteRequest(model=model, name=name, reason=reason))
    console.print(f"{markup(release.model)}: removed rule {markup(name)} · revision {release.revision}")
