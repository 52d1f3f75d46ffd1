"""Logging set-up and rate-limited warnings. Rule: no log line per accepted vote."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable

__all__ = ["RejectionLog", "configure_logging"]


def configure_logging(level: str) -> None:
    """One line per event, key facts first, to stderr."""
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


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
        )
