"""Liveness and readiness. Rule: ready means votes that arrive now will be committed and acked:
connected to the broker, Redis answering, and the intake moving.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["Health", "Readiness"]


@dataclass(frozen=True, slots=True)
class Readiness:
    """The checks by name: "ok", or what is wrong in words an operator can act on."""

    checks: dict[str, str]
    facts: dict[str, Any]

    @property
    def ready(self) -> bool:
        return all(state == "ok" for state in self.checks.values())

    def to_json(self) -> bytes:
        """The ``/readyz`` body, also what ``votebox status`` prints."""
        return json.dumps({"ready": self.ready, "checks": self.checks, **self.facts}).encode()


class Health:
    """Tracks the intake's progress and answers readiness from live probes.

    Args:
        connected: whether the MQTT connection is up.
        held: messages received and not yet acked.
        ping_redis: raises when Redis does not answer (it gets its own deadline here).
        stall_s: messages held this long with no batch committed: the intake is stalled.
        facts: extra numbers for the body (uptime, counts), read at each probe.
        clock: monotonic seconds.
    """

    def __init__(
        self,
        *,
        connected: Callable[[], bool],
        held: Callable[[], int],
        ping_redis: Callable[[], Awaitable[object]],
        stall_s: float,
        facts: Callable[[], dict[str, Any]],
        clock: Callable[[], float],
    ) -> None:
        self._connected = connected
        self._held = held
        self._ping_redis = ping_redis
        self._stall_s = stall_s
        self._facts = facts
        self._clock = clock
        self._last_progress = clock()
        self._store_failure: str | None = None

    def progressed(self) -> None:
        """A batch was committed and acked."""
        self._last_progress = self._clock()

    def store_failed(self, why: str) -> None:
        """A commit failed because Redis is away (it may still answer PING: READONLY, OOM...)."""
        self._store_failure = why

    def store_answered(self) -> None:
        """A commit went through: Redis takes writes again."""
        self._store_failure = None

    def stalled(self) -> bool:
        """Messages are held and no batch was committed for ``stall_s``: what /readyz and the
        `votebox_intake_stalled` gauge say."""
        return bool(self._held()) and self._clock() - self._last_progress > self._stall_s

    async def readiness(self, *, redis_timeout_s: float = 1.0) -> Readiness:
        """Probe Redis, look at the broker connection and the intake."""
        checks: dict[str, str] = {}
        checks["mqtt"] = "ok" if self._connected() else "not connected to the broker"
        try:
            async with asyncio.timeout(redis_timeout_s):
                await self._ping_redis()
            failure = self._store_failure
            checks["redis"] = "ok" if failure is None else f"the last commit failed: {failure}"
        except TimeoutError:
            checks["redis"] = f"Redis did not answer a PING within {redis_timeout_s} s"
        except Exception as exc:  # any failure of the probe is "not ready", with its words
            checks["redis"] = f"Redis: {exc}"
        held, idle_s = self._held(), self._clock() - self._last_progress
        checks["intake"] = (
            f"{held} messages held for {idle_s:.0f} s without a commit" if self.stalled() else "ok"
        )
        return Readiness(checks=checks, facts={"held": held, **self._facts()})
