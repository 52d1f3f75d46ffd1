"""The results publishers of several processors: one publishes at a time (the lease holder),
so the retained version never goes back, and another takes over when it dies."""

from __future__ import annotations

import asyncio
import json

import pytest
from redis.asyncio import Redis

from processor.codec import Vote
from processor.keys import results_lease
from processor.poll import Poll
from processor.poll_store import create_poll
from processor.results import Lease, ResultsPublisher
from processor.tally import Tally
from processor.topics import results_topic
from tests.conftest import eventually, unique_id


def _publisher(
    redis: Redis, key: str, holder: str, sent: list[int], poll: Poll
) -> ResultsPublisher:
    def publish(topic: str, payload: bytes) -> None:
        if topic == results_topic(poll.id) and payload:
            sent.append(int(json.loads(payload)["version"]))

    return ResultsPublisher(
        redis=redis,
        publish=publish,
        interval_s=0.05,
        rescan_s=0.2,
        timeout_s=5,
        lease=Lease(key, holder, ttl_ms=1000),
    )


async def test_one_processor_publishes_results_and_another_takes_over_when_it_dies(
    redis: Redis, request: pytest.FixtureRequest
) -> None:
    poll = Poll(id=unique_id(request), labels=("a", "b"))
    await create_poll(redis, poll)
    key = results_lease(unique_id(request, "-broker"))
    by_a: list[int] = []
    by_b: list[int] = []
    a = _publisher(redis, key, "a", by_a, poll)
    b = _publisher(redis, key, "b", by_b, poll)
    tally = Tally(redis, timeout_s=5)
    version = 0

    async def vote_at_b(n: int) -> None:
        nonlocal version
        for i in range(n):
            result = await tally.commit([Vote(poll.id, f"k{version}-{i}", 0, 1)], now_ms=1)
            version = result.versions[poll.id]
            b.mark(result.versions)  # committed by b, which does not hold the lease
            await asyncio.sleep(0.01)

    async with asyncio.TaskGroup() as tg:
        running_a = tg.create_task(a.run())
        await eventually(lambda: bool(by_a))  # a holds the lease
        running_b = tg.create_task(b.run())
        await asyncio.sleep(0.3)  # b is listening for what to forward
        await vote_at_b(20)
        await eventually(lambda: bool(by_a) and by_a[-1] == version, timeout_s=10)
        assert not by_b  # b forwarded its polls to a instead of publishing them
        running_a.cancel()  # a dies, holding the lease
        await vote_at_b(5)
        await eventually(lambda: bool(by_b) and by_b[-1] == version, timeout_s=10)
        running_b.cancel()
    assert by_a == sorted(by_a) and by_b == sorted(by_b)
    assert by_a[-1] <= by_b[0]  # the version never went back
