"""Mosquitto losing what it holds: SIGKILLed between saves, with the processor away and with
it running, and its queue for an away processor overflowing. What the broker loses was never
acked to a device, so the devices' re-sends bring every vote back, and each counts once.

Each test runs a Mosquitto of its own, since each kills it or changes its limits.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from harness.services import MOSQUITTO_MAX_QUEUED_MESSAGES, ManagedProcess, mosquitto
from processor.poll import Poll
from tests.fleet import Fleet
from tests.test_faults import resend_until_acked, until_total, wait_log

pytestmark = pytest.mark.e2e


@pytest.fixture
def own_mosquitto(tmp_path: Path) -> Iterator[ManagedProcess]:
    with mosquitto(tmp_path / "mosquitto") as proc:
        yield proc


def _restart_with_queue_limit(proc: ManagedProcess, limit: int) -> None:
    conf = Path(proc.argv[-1])
    text = conf.read_text()
    default = f"max_queued_messages {MOSQUITTO_MAX_QUEUED_MESSAGES}"
    assert default in text
    conf.write_text(text.replace(default, f"max_queued_messages {limit}"))
    proc.stop()
    proc.start()


async def test_mosquitto_sigkilled_while_votes_flow_loses_no_vote(
    own_mosquitto: ManagedProcess,
    poll: Poll,
    redis: Redis,
    spawn_processor: Callable[..., ManagedProcess],
) -> None:
    proc = spawn_processor(own_mosquitto)
    with Fleet(own_mosquitto, poll.id, 5) as fleet:
        fleet.cast(poll.id, 200)
        await until_total(redis, poll, 200)
        await asyncio.to_thread(fleet.cast, poll.id, 1000)
        own_mosquitto.kill()  # mid-stream, between saves: what it held in memory is gone
        own_mosquitto.start()
        await wait_log(proc, lambda log: log.count("connected to") >= 2, timeout_s=60)
        await resend_until_acked(fleet, timeout_s=90)
        await until_total(redis, poll, 1200)


async def test_mosquitto_sigkilled_while_the_processor_is_away_loses_no_vote(
    own_mosquitto: ManagedProcess,
    poll: Poll,
    redis: Redis,
    spawn_processor: Callable[..., ManagedProcess],
) -> None:
    proc = spawn_processor(own_mosquitto)
    with Fleet(own_mosquitto, poll.id, 5) as fleet:
        fleet.cast(poll.id, 100)
        await until_total(redis, poll, 100)
        proc.stop()
        await asyncio.to_thread(fleet.cast, poll.id, 500)  # queued for the away processor
        await asyncio.sleep(0.5)
        own_mosquitto.kill()  # the queue was only in memory: gone
        own_mosquitto.start()
        proc.start()
        await resend_until_acked(fleet, timeout_s=90)
        await until_total(redis, poll, 600)


async def test_a_queue_that_overflows_while_the_processor_is_away_loses_no_vote(
    own_mosquitto: ManagedProcess,
    poll: Poll,
    redis: Redis,
    spawn_processor: Callable[..., ManagedProcess],
) -> None:
    """Mosquitto drops, silently, what is queued for an offline client past
    max_queued_messages (mosquitto#1593); docs/operations.md says how to size it."""
    _restart_with_queue_limit(own_mosquitto, 50)
    proc = spawn_processor(own_mosquitto)
    with Fleet(own_mosquitto, poll.id, 5) as fleet:
        fleet.cast(poll.id, 20)
        await until_total(redis, poll, 20)
        proc.stop()
        await asyncio.to_thread(fleet.cast, poll.id, 300)  # 250 of them dropped by the broker
        await asyncio.sleep(0.5)
        proc.start()
        await until_total(redis, poll, 70)  # what the queue held: 50
        assert fleet.unacked() == 250
        await resend_until_acked(fleet, timeout_s=90)
        await until_total(redis, poll, 320)
