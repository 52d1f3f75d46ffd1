"""Logging set-up and rate-limited warnings. Rule: one line per event worth a human's
attention, never one per accepted vote.

Lines are structured, logfmt (``key=value``) or JSON, so that Loki, Elasticsearch or ``grep``
can pick out ``event=rejected reason=unknown_option``. Facts beyond the message travel as
``extra={...}`` on the logging call and become keys of their own.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Final

__all__ = ["JsonFormatter", "LogfmtFormatter", "RejectionLog", "configure_logging"]

# Attributes every LogRecord has; anything else on a record came in through ``extra``.
_STANDARD: Final = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
        "level": record.levelname.lower(),
        "logger": record.name,
        "msg": record.getMessage(),
    }
    fields.update((k, v) for k, v in vars(record).items() if k not in _STANDARD)
    if record.exc_info:
        fields["exc"] = logging.Formatter().formatException(record.exc_info)
    return fields


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(_fields(record), default=str)


class LogfmtFormatter(logging.Formatter):
    """``key=value`` pairs, values quoted when they hold spaces, quotes or ``=``."""

    def format(self, record: logging.LogRecord) -> str:
        return " ".join(f"{k}={_logfmt_value(v)}" for k, v in _fields(record).items())


def _logfmt_value(value: object) -> str:
    text = "" if value is None else str(value)
    if text and not any(c in text for c in ' "=\\\n\t'):
        return text
    return json.dumps(text)  # quotes and escapes newlines: the event stays on one line


def configure_logging(level: str, fmt: str = "logfmt") -> None:
    """Structured lines to stderr at ``level``; ``fmt`` is "logfmt" or "json"."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else LogfmtFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


class RejectionLog:
    """Logs a rejection reason at most once per ``every_s``, with how many were not logged.

    A flood of one bad kiosk must not flood the log; the counts in Redis keep the exact numbers.
    """

    def __init__(
        self,
        logger: logging.Logger,
        *,
        every_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self._every_s = every_s
        self._clock = clock
        self._last: dict[str, float] = {}
        self._quiet: Counter[str] = Counter()

    def rejected(self, reason: str, device: str | None, detail: str) -> None:
        now = self._clock()
        if now - self._last.get(reason, -self._every_s) < self._every_s:
            self._quiet[reason] += 1
            return
        self._last[reason] = now
        skipped = self._quiet.pop(reason, 0)
        self._log.warning(
            "rejected %s from %s: %s%s",
            reason,
            device or "?",
            detail,
            f" (and {skipped} more since the last line)" if skipped else "",
            extra={"event": "rejected", "reason": reason, "device": device, "unlogged": skipped},
        )
