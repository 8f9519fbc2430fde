"""The serving processes' log lines: text for people, or one JSON object a line for collectors.

A leaf module, so the CLI (one process) and the worker supervisor (each worker
process configures its own logging) format lines the same way.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

# What every LogRecord carries; anything else on a record came from `extra=` and is kept.
_RECORD_FIELDS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


def text_format(worker: int | None = None) -> str:
    """The text line's layout; a worker's lines say which worker wrote them (w0, w1, ...)."""
    tag = "" if worker is None else f"w{worker} "
    return f"%(asctime)s %(levelname)s {tag}%(name)s: %(message)s"


class JsonLogFormatter(logging.Formatter):
    """One JSON object a line: time (RFC 3339, UTC), level, logger, message, the worker that
    wrote it (with --workers), the `extra=` fields and, for an exception, its traceback."""

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        line: dict[str, object] = {
            "time": stamp.replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.worker is not None:
            line["worker"] = self.worker
        line.update((k, v) for k, v in vars(record).items() if k not in _RECORD_FIELDS)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure_logging(level: str, log_format: str, worker: int | None = None) -> None:
    """This process's log lines on stderr, as text or JSON (`log_format`)."""
    handler = logging.StreamHandler(sys.stderr)
    formatter = JsonLogFormatter(worker) if log_format == "json" else logging.Formatter(text_format(worker))
    handler.setFormatter(formatter)
    logging.basicConfig(level=level.upper(), handlers=[handler])
