"""Rate-limited log lines, for failures that a client can repeat at will.

A failing model version answers every request with the same error; one log
line per request would let any client flood the log (and slow the loop
writing it). `ThrottledLog` writes at most one line per key (e.g. a model
version) per interval and says, on the next line it writes, how many it
held back meanwhile. The clock is injected so tests need not sleep.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

# One line per key per this many seconds.
FAILURE_LOG_INTERVAL_S = 5.0
# Client-supplied text (request ids, runtime messages that echo values) is
# cut to this many characters and kept on one line in a log record.
LOG_TEXT_LIMIT = 1000


def one_line(text: object, limit: int = LOG_TEXT_LIMIT) -> str:
    """`text` on one line, cut to `limit`: every character that is not printable (line
    breaks, terminal escapes) is written as its escape, so a client's string can never
    forge a log line or move an operator's cursor."""
    s = str(text)
    if not s.isprintable():
        s = "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)
    return s if len(s) <= limit else f"{s[:limit]}... ({len(s)} chars)"


@dataclass(slots=True)
class _KeyState:
    last: float
    suppressed: int = 0


@dataclass(slots=True)
class ThrottledLog:
    logger: logging.Logger
    interval_s: float = FAILURE_LOG_INTERVAL_S
    clock: Callable[[], float] = time.monotonic
    _keys: dict[Hashable, _KeyState] = field(default_factory=dict)

    def log(self, level: int, key: Hashable, msg: str, *args: object) -> bool:
        """Write `msg % args` unless a line for `key` was written within the interval; True if written."""
        now = self.clock()
        state = self._keys.get(key)
        if state is not None and now - state.last < self.interval_s:
            state.suppressed += 1
            return False
        held = state.suppressed if state is not None else 0
        self._keys[key] = _KeyState(now)
        if held:
            msg += " (%d more like it suppressed since the last line)"
            args = (*args, held)
        self.logger.log(level, msg, *args)
        return True
