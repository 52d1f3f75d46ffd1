"""Supervision of the processor's long-running parts.

Rule: never a live process that does nothing. A part that fails for a reason it does not retry
itself ends the process with a non-zero exit, so that its supervisor (systemd, Docker, k8s)
restarts it; and a process told to end (SIGTERM, or such a failure) ends within its deadline
even if a task will not cancel (redis-py #2028, #2551: a pub/sub read can hang in
"cancelling"), because the deadline is kept by a thread, not by the event loop.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Final

__all__ = ["EXIT_FAILED", "EXIT_STUCK", "Watchdog", "supervised"]

log = logging.getLogger(__name__)

# A part failed and the process ended as it should (sysexits.h: EX_SOFTWARE).
EXIT_FAILED: Final = 70
# The process did not end by itself within its deadline and was ended from outside the loop.
EXIT_STUCK: Final = 75


class Watchdog:
    """Ends the process with `EXIT_STUCK` when a deadline passes before `disarm`.

    Args:
        exit: how to end the process; `os._exit` (no cleanup can hang it), or a test's stand-in.
    """

    def __init__(self, *, exit: Callable[[int], object] = os._exit) -> None:
        self._exit = exit
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._due: float | None = None

    def arm(self, deadline_s: float, why: str) -> None:
        """End the process in ``deadline_s`` unless it ends first. The earliest deadline wins."""
        with self._lock:
            due = time.monotonic() + deadline_s
            if self._due is not None and self._due <= due:
                return
            if self._timer is not None:
                self._timer.cancel()
            self._due = due
            self._timer = threading.Timer(deadline_s, self._fire, args=(why, deadline_s))
            self._timer.daemon = True
            self._timer.name = "votebox.watchdog"
            self._timer.start()

    def disarm(self) -> None:
        """The process is ending by itself."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self._due = None

    @property
    def armed(self) -> bool:
        return self._timer is not None

    def _fire(self, why: str, deadline_s: float) -> None:
        # Written straight to stderr: the logging machinery may be what the loop is stuck in.
        message = (
            f"votebox: still running {deadline_s:.1f} s after {why}; ending the process "
            f"(exit {EXIT_STUCK}). Un-acked votes stay with the broker and are redelivered.\n"
        )
        os.write(2, message.encode())
        self._exit(EXIT_STUCK)


async def supervised(
    name: str, part: Awaitable[None], *, failed: Callable[[str, BaseException], None]
) -> None:
    """Run ``part``; if it raises (cancellation aside), tell ``failed`` and re-raise.

    A part retries what it can retry (a dependency that is away) by itself; what reaches here
    is a bug or a state it cannot leave, and the process must end.
    """
    try:
        await part
    except Exception as exc:
        failed(name, exc)
        raise
