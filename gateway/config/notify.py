"""`[[notify]]` targets in the gateway config: where rollout events are sent, and which.

Only the shape is checked here; the secret itself is read when the gateway starts
(gateway/release/notify/secrets.py), so a settings object never holds it and cannot
print it. See the README's "Notifications" section for an example.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from gateway.config._parse import check_choices, check_number
from gateway.config.urls import http_url_problem
from gateway.errors import ConfigError

NotifyKind = Literal["webhook", "slack"]

# The events a target can ask for (its `events` filter; empty: all of them). Payloads carry
# these names, so receivers match on them: never rename one.
EVENT_NAMES = (
    "rollout_started",
    "step_advanced",
    "awaiting_approval",
    "approved",
    "promoted",
    "rolled_back",
    "gate_failed",
    "shadow_circuit_opened",
)
# A delivery attempt longer than this is a receiver that is down, not a slow one.
MAX_TIMEOUT_S = 60.0
# Ten retries with backoff capped at 30 s is minutes of trying: more only delays the queue behind.
MAX_RETRIES = 10
MAX_NAME_CHARS = 64


@dataclass(frozen=True, slots=True)
class NotifyTarget:
    """One receiver: a generic webhook (JSON, HMAC-signed) or a Slack-compatible incoming webhook."""

    url: str = field(default="", repr=False)  # not in a repr: a Slack webhook's path is its secret
    kind: NotifyKind = "webhook"
    # How logs and metrics name the target (its URL may hold a secret, as Slack's do).
    # Empty: the URL's host and port.
    name: str = ""
    events: tuple[str, ...] = ()  # empty: every event
    models: tuple[str, ...] = ()  # empty: every model
    # The HMAC key: the name of an environment variable, or a file holding it (one of them;
    # a webhook needs one, a Slack target may have one).
    secret_env: str = ""
    secret_file: Path | None = None
    timeout_s: float = 5.0  # per attempt
    max_retries: int = 3  # attempts after the first

    def __post_init__(self) -> None:
        check_choices(self)
        problem = http_url_problem(self.url)
        if problem:
            # The URL is not repeated: a Slack webhook's path is its secret.
            raise ConfigError(
                f"url: expected http(s)://HOST[:PORT]/PATH of the receiver (with its scheme); it {problem}"
            )
        parts = urlsplit(self.url)
        if not self.name:
            # object.__setattr__: the one way to fill in a default on a frozen dataclass.
            object.__setattr__(self, "name", parts.netloc.rsplit("@", 1)[-1])
        if len(self.name) > MAX_NAME_CHARS:
            raise ConfigError(f"name: at most {MAX_NAME_CHARS} characters, got {len(self.name)}")
        for event in self.events:
            if event not in EVENT_NAMES:
                close = difflib.get_close_matches(event, EVENT_NAMES, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"events: {event!r} is not an event{hint}; known: {', '.join(EVENT_NAMES)}")
        if self.secret_env and self.secret_file is not None:
            raise ConfigError("secret_env and secret_file: set one of them, not both")
        if self.kind == "webhook" and not self.secret_env and self.secret_file is None:
            raise ConfigError(
                "secret_env or secret_file: a webhook signs every payload (X-Gateway-Signature); "
                'name the environment variable (secret_env = "NAME") or the file (secret_file = "path") '
                "holding its key"
            )
        check_number("timeout_s", self.timeout_s, 0, MAX_TIMEOUT_S, above=True)
        check_number("max_retries", self.max_retries, 0, MAX_RETRIES)

    def wants(self, event: str, model: str) -> bool:
        return (not self.events or event in self.events) and (not self.models or model in self.models)


def check_targets(targets: tuple[NotifyTarget, ...]) -> None:
    """Names must differ: they label the metrics and the delivery log."""
    seen: dict[str, int] = {}
    for index, target in enumerate(targets):
        if target.name in seen:
            raise ConfigError(
                f"notify: targets [{seen[target.name]}] and [{index}] are both named {target.name!r}: "
                'give each target its own name = "..."'
            )
        seen[target.name] = index
