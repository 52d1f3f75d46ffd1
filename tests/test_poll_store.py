"""Polls in Redis: a create is whole or nothing, and a retried one repairs what was lost."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from processor.codec import Vote
from processor.errors import ConfigError
from processor.keys import POLLS_INDEX, PollKeys
from processor.poll import Poll
from processor.poll_store import create_poll, delete_poll, list_polls, load_poll, read_results
from processor.tally import Tally
from tests.conftest import unique_id


async def test_a_poll_a_crashed_create_left_half_made_is_made_whole_by_the_next(
    redis: Redis, request: pytest.FixtureRequest
) -> None:
    poll = Poll(id=unique_id(request), labels=("a", "b"), title="half?")
    # What the two-step create of before left when it died between its steps: an id that
    # said "exists already" for ever, and a poll nobody could load.
    await redis.hset(PollKeys(poll.id).definition, "n_options", 2)
    assert await load_poll(redis, poll.id) is None
    await create_poll(redis, poll, now_ms=1000)
    assert await load_poll(redis, poll.id) == poll
    assert poll.id in await list_polls(redis)
    assert (await read_results(redis, [poll.id], now_ms=1000))[poll.id].total == 0


async def test_creating_a_poll_again_says_it_exists_and_leaves_it_listed(
    redis: Redis, request: pytest.FixtureRequest
) -> None:
    poll = Poll(id=unique_id(request), labels=("a", "b"))
    await create_poll(redis, poll)
    await redis.srem(POLLS_INDEX, poll.id)  # as if the index write after the script was lost
    with pytest.raises(ConfigError, match="exists already"):
        await create_poll(redis, Poll(id=poll.id, labels=("x", "y")))
    assert await load_poll(redis, poll.id) == poll  # untouched
    assert poll.id in await list_polls(redis)


async def test_deleting_a_poll_removes_every_key_of_it_and_nothing_else(
    redis: Redis, request: pytest.FixtureRequest
) -> None:
    poll, other = (Poll(id=unique_id(request, s), labels=("a", "b")) for s in ("", "-other"))
    for p in (poll, other):
        await create_poll(redis, p)
        # Seq 1, then 3: a gap, so that each device has a window key besides its run.
        await Tally(redis, timeout_s=5, points_max=10).commit(
            [Vote(p.id, f"k{i}", 0, seq) for i in range(5) for seq in (1, 3)], now_ms=1
        )
    await delete_poll(redis, poll.id)
    left = [key async for key in redis.scan_iter(match=f"votebox:{{{poll.id}}}*")]
    assert left == []
    windows = PollKeys(other.id).window_prefix + "*"
    assert len([key async for key in redis.scan_iter(match=windows)]) == 5
    assert (await read_results(redis, [other.id]))[other.id].total == 10
