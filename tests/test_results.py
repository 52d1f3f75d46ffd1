"""The results publishers of several processors: one publishes at a time (the lease holder),
so the retained version never goes back, and another takes over when it dies."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from redis import Redis as SyncRedis
from redis.asyncio import Redis

from harness.services import redis_server
from processor.codec import Vote
from processor.keys import results_lease
from processor.poll import Poll
from processor.poll_store import create_poll
from processor.results import Lease, ResultsPublisher
from processor.tally import Tally
from processor.topics import results_topic
from tests.conftest import eventually, unique_id


@pytest.fixture
async def own_redis(tmp_path: Path) -> AsyncIterator[Redis]:
    """A redis-server of the test's own: a paced burst visits every poll there is, so in the
    suite's shared server it would last as long as all the polls earlier tests left."""
    with redis_server(tmp_path / "redis") as server:
        client = Redis.from_url(server.url)
        try:
            yield client
        finally:
            await client.aclose()


def _leased(
    redis: Redis,
    key: str,
    holder: str,
    publish: Callable[[str, bytes], None],
    *,
    pace: Callable[[], Awaitable[None]] | None = None,
    rescan_s: float = 0.2,
) -> ResultsPublisher:
    """A publisher that holds the 1 s lease ``key`` as ``holder`` when it can."""
    return ResultsPublisher(
        redis=redis,
        publish=publish,
        interval_s=0.05,
        rescan_s=rescan_s,
        timeout_s=5,
        pace=pace,
        lease=Lease(key, holder, ttl_ms=1000),
    )


def _publisher(
    redis: Redis, key: str, holder: str, sent: list[int], poll: Poll
) -> ResultsPublisher:
    def publish(topic: str, payload: bytes) -> None:
        if topic == results_topic(poll.id) and payload:
            sent.append(int(json.loads(payload)["version"]))

    return _leased(redis, key, holder, publish)


async def _results_sent(
    redis: Redis, request: pytest.FixtureRequest, n: int
) -> tuple[set[str], list[str], Callable[[str, bytes], None]]:
    """``n`` new polls: their results topics, the list of those published, and the publish
    function that fills it."""
    polls = [Poll(id=unique_id(request, f"-{i}"), labels=("a", "b")) for i in range(n)]
    for poll in polls:
        await create_poll(redis, poll)
    topics = {results_topic(p.id) for p in polls}
    sent: list[str] = []

    def publish(topic: str, payload: bytes) -> None:
        if payload and topic in topics:
            sent.append(topic)

    return topics, sent, publish


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


async def test_a_holder_paused_past_its_lease_publishes_nothing_until_it_holds_it_again(
    own_redis: Redis, request: pytest.FixtureRequest
) -> None:
    """What a SIGSTOP does to a holder, in process: the event loop stops (here, in the pace
    between two polls of a burst) while the clock goes on, past the lease; meanwhile another
    processor takes the lease. Resumed, the holder publishes nothing it read before, nor
    anything else while the other holds it; given the lease back, it publishes every poll."""
    redis = own_redis
    _, sent, publish = await _results_sent(redis, request, 3)
    key = results_lease(unique_id(request, "-broker"))
    paused = False

    async def pace() -> None:
        nonlocal paused
        if not paused and sent:
            paused = True
            time.sleep(1.3)  # noqa: ASYNC251 - the whole process stops, past the 1 s lease
            other.set(key, "b", px=60_000)  # and another processor has taken it

    publisher = _leased(redis, key, "a", publish, pace=pace)
    other = SyncRedis.from_url(
        f"redis://127.0.0.1:{redis.connection_pool.connection_kwargs['port']}"
    )
    try:
        async with asyncio.TaskGroup() as tg:
            running = tg.create_task(publisher.run())
            await eventually(lambda: paused)
            # It renews every 0.2 s and so would have published the other two by now.
            await asyncio.sleep(1.0)
            assert len(sent) == 1 and not publisher.may_publish()
            other.delete(key)  # the other processor stops and lets go
            await eventually(lambda: len(set(sent)) == 3, timeout_s=10)
            running.cancel()
    finally:
        other.delete(key)
        other.close()
    assert sent.count(sent[0]) == 2  # published afresh once held again


async def test_a_burst_longer_than_the_lease_renews_it_and_publishes_every_poll(
    own_redis: Redis, request: pytest.FixtureRequest
) -> None:
    """Every poll at the broker's pace can outlast the lease (1,000 polls after a restart):
    the holder renews as it goes, so the fence never stops a holder that is only busy."""
    redis = own_redis
    topics, sent, publish = await _results_sent(redis, request, 8)

    async def pace() -> None:
        await asyncio.sleep(0.3)  # the broker takes its time: 8 polls, 2.4 s, a 1 s lease

    key = results_lease(unique_id(request, "-broker"))
    publisher = _leased(redis, key, "a", publish, pace=pace, rescan_s=3600)
    async with asyncio.TaskGroup() as tg:
        running = tg.create_task(publisher.run())
        await eventually(lambda: set(sent) == topics, timeout_s=60)
        await asyncio.sleep(3)  # a lease taken as lost would publish every poll again here
        running.cancel()
    assert len(sent) == len(topics), sent  # each once: the lease never lapsed
