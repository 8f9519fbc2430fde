"""Checking the http(s) URLs the gateway calls out to (notification receivers, external
checks' sources) when the config is read, so a URL that cannot be sent to is refused at
start with the field named, never found out at the first event or poll.

A problem is described without the URL itself: a Slack webhook's path is its secret,
and callers decide whether to show it.
"""

from __future__ import annotations

from urllib.parse import urlsplit

# httpx refuses URLs longer than 65,536 characters when it sends; real ones are far shorter.
MAX_URL_CHARS = 8192


def http_url_problem(url: str) -> str:
    """What is wrong with `url` as an http(s) URL to send to, in a few words; "" if nothing."""
    if len(url) > MAX_URL_CHARS:
        return f"is {len(url)} characters; the limit is {MAX_URL_CHARS}"
    if any(ch.isspace() or not ch.isprintable() for ch in url):
        return "holds a space or a control character (percent-encode it)"
    try:
        parts = urlsplit(url)
        port = parts.port  # raises for a port that is not a number in 0..65535
    except ValueError as exc:
        return f"does not parse ({exc})"
    if parts.scheme not in ("http", "https"):
        return "needs the http:// or https:// scheme"
    if not parts.hostname:
        return "has no host"
    if port == 0:
        return "has port 0, which nothing can be reached on"
    return ""
