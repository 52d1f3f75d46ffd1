"""Readiness from its parts, with a hand-driven clock (the real servers are in
tests/test_operations.py)."""

from __future__ import annotations

import asyncio
import json

import pytest

from processor.health import Health


class Parts:
    def __init__(self) -> None:
        self.now = 100.0
        self.connected = True
        self.held = 0
        self.redis_error: Exception | None = None
        self.redis_hangs = False

    async def ping(self) -> bool:
        if self.redis_hangs:
            await asyncio.sleep(3600)
        if self.redis_error:
            raise self.redis_error
        return True

    def health(self) -> Health:
        return Health(
            connected=lambda: self.connected,
            held=lambda: self.held,
            ping_redis=self.ping,
            stall_s=30,
            facts=lambda: {"uptime_s": 1},
            clock=lambda: self.now,
        )


async def test_ready_when_connected_redis_answers_and_nothing_waits() -> None:
    readiness = await Parts().health().readiness()
    assert readiness.ready
    assert json.loads(readiness.to_json()) == {
        "ready": True,
        "checks": {"mqtt": "ok", "redis": "ok", "intake": "ok"},
        "held": 0,
        "uptime_s": 1,
    }


async def test_not_ready_without_the_broker_or_redis_and_says_which() -> None:
    parts = Parts()
    health = parts.health()
    parts.connected = False
    parts.redis_error = ConnectionError("Connection refused")
    readiness = await health.readiness()
    assert not readiness.ready
    assert readiness.checks["mqtt"] == "not connected to the broker"
    assert readiness.checks["redis"] == "Redis: Connection refused"


async def test_a_redis_that_hangs_is_not_ready_within_the_probe_deadline() -> None:
    parts = Parts()
    parts.redis_hangs = True
    async with asyncio.timeout(2):
        readiness = await parts.health().readiness(redis_timeout_s=0.05)
    assert "did not answer" in readiness.checks["redis"]


@pytest.mark.parametrize(
    ("held", "idle_s", "stalled"), [(5, 31, True), (5, 29, False), (0, 99, False)]
)
async def test_the_intake_is_stalled_when_messages_wait_past_stall_s_without_a_commit(
    held: int, idle_s: float, stalled: bool
) -> None:
    parts = Parts()
    health = parts.health()
    parts.held = held
    parts.now += idle_s
    readiness = await health.readiness()
    assert readiness.ready is not stalled
    if stalled:
        assert readiness.checks["intake"] == f"{held} messages held for {idle_s} s without a commit"
    health.progressed()
    assert (await health.readiness()).ready
