"""Per-device rate limits. Rule: a device's messages beyond its rate are refused before they
are decoded or reach Redis, so a flooding device costs the pipeline almost nothing.

Messages, not votes, are counted: an offline kiosk replaying 4,096 votes sends them as 16
batches, and must get through.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

__all__ = ["DeviceRateLimiter"]

# Devices remembered at most; beyond it the table starts afresh, so that a flood of invented
# device ids cannot grow it without bound (each id it forgets gets a full bucket back).
_DEVICES_MAX: Final = 200_000


class DeviceRateLimiter:
    """A token bucket per device: ``rate_per_s`` messages a second, bursts up to ``burst``.

    Args:
        rate_per_s: sustained messages per second per device; 0 turns the limit off.
        burst: messages a device may send at once after being quiet.
        clock: monotonic seconds.
    """

    def __init__(self, *, rate_per_s: float, burst: float, clock: Callable[[], float]) -> None:
        self._rate = rate_per_s
        self._burst = burst
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # device -> (tokens, at)

    def allow(self, device: str) -> bool:
        """Take one token from ``device``'s bucket; False when it has none."""
        if self._rate <= 0:
            return True
        now = self._clock()
        tokens, at = self._buckets.get(device, (self._burst, now))
        tokens = min(self._burst, tokens + (now - at) * self._rate)
        if tokens < 1:
            self._buckets[device] = (tokens, now)
            return False
        if len(self._buckets) >= _DEVICES_MAX and device not in self._buckets:
            self._buckets.clear()
        self._buckets[device] = (tokens - 1, now)
        return True
