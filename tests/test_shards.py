"""A hot poll spread over several shards (``votebox poll create --shards K``), on a real Redis:
each device's votes on one shard, counted once; results, fates and queues summed; the
definition on every shard; a processor that guessed the shards wrong routes again and counts
nothing twice."""

from __future__ import annotations

import zlib

import pytest
from redis.asyncio import Redis

from processor.codec import Vote
from processor.errors import ConfigError
from processor.keys import PollKeys, shard_keys, shard_of
from processor.poll import Poll
from processor.poll_store import (
    close_poll,
    create_poll,
    delete_poll,
    load_poll,
    read_fates,
    read_results,
    update_poll,
)
from processor.reasons import Fate, Reason
from processor.tally import Tally
from tests.conftest import unique_id


def _votes(poll: str, devices: int, seq: int = 1, options: int = 2) -> list[Vote]:
    return [Vote(poll, f"dev-{d}", d % options, seq) for d in range(devices)]


def test_a_device_has_one_shard_by_the_crc_of_its_id() -> None:
    # Stored data depends on this function: it may never change.
    assert shard_of("kiosk-7", 3) == zlib.crc32(b"kiosk-7") % 3
    assert shard_of("kiosk-7", 1) == 0
    assert {shard_of(f"dev-{d}", 3) for d in range(30)} == {0, 1, 2}
    assert [keys.tag for keys in shard_keys("hot", 3)] == ["{hot}", "{hot:1}", "{hot:2}"]


def test_a_one_vote_per_voter_poll_cannot_be_spread() -> None:
    with pytest.raises(ConfigError, match="voters on one shard"):
        Poll(id="board", labels=("a", "b"), one_per_voter=True, shards=2)
    with pytest.raises(ConfigError, match="shards is 1 to 64"):
        Poll(id="hot", labels=("a", "b"), shards=0)


async def test_a_poll_over_three_shards_counts_each_vote_once_and_sums_its_results(
    redis: Redis, request: pytest.FixtureRequest
) -> None:
    poll = Poll(id=unique_id(request), labels=("a", "b", "c"), shards=3)
    await create_poll(redis, poll)
    tally = Tally(redis, timeout_s=5, points_max=1000)  # knows nothing of the shards yet
    first = await tally.commit(_votes(poll.id, 60, options=3), now_ms=1000, token="b1")
    assert first.codes == [int(Fate.ACCEPTED)] * 60
    again = await tally.commit(_votes(poll.id, 60, options=3), now_ms=1001, token="b2")
    assert again.codes == [int(Fate.DUPLICATE)] * 60
    # The first batch retried after a lost reply, by a processor that must learn the shards
    # again: answered as the first attempt was, not "duplicate" of itself.
    retried = await Tally(redis, timeout_s=5, points_max=1000).commit(
        _votes(poll.id, 60, options=3), now_ms=1002, token="b1"
    )
    assert retried.codes == first.codes

    for keys in shard_keys(poll.id, 3):
        # Each shard holds its own devices' windows and the definition it checks votes by.
        devices = {
            d.decode() if isinstance(d, bytes) else d for d in await redis.hkeys(keys.devices)
        }
        assert devices == {f"dev-{d}" for d in range(60) if shard_of(f"dev-{d}", 3) == keys.shard}
        assert await redis.hget(keys.definition, "shards") == b"3"
        assert await redis.xlen(keys.points) == 1  # one entry per batch and shard
        assert int(await redis.hget(keys.tally, "queued_points") or 0) == len(devices)
    results = (await read_results(redis, [poll.id]))[poll.id]
    assert results.total == 60
    assert results.counts == (20, 20, 20)
    fates, _ = await read_fates(redis, poll.id)
    assert fates["accepted"] == 60 and fates["duplicate"] == 60


async def test_the_published_version_only_grows_across_shards(
    redis: Redis, request: pytest.FixtureRequest
) -> None:
    poll = Poll(id=unique_id(request), labels=("a", "b"), shards=3)
    await create_poll(redis, poll)
    tally = Tally(redis, timeout_s=5)
    versions = []
    for seq in range(1, 6):
        await tally.commit(_votes(poll.id, 9, seq), now_ms=1000 + seq)
        versions.append((await read_results(redis, [poll.id]))[poll.id].version)
    await close_poll(redis, poll.id)
    versions.append((await read_results(redis, [poll.id]))[poll.id].version)
    assert versions == sorted(set(versions))


async def test_a_processor_that_knew_other_shards_routes_again_and_counts_once(
    redis: Redis, request: pytest.FixtureRequest
) -> None:
    poll_id = unique_id(request)
    await create_poll(redis, Poll(id=poll_id, labels=("a", "b"), shards=3))
    tally = Tally(redis, timeout_s=5)
    await tally.commit(_votes(poll_id, 12), now_ms=1000)  # learns three shards
    # The poll is deleted and made again on one shard while the processor runs.
    await delete_poll(redis, poll_id)
    await create_poll(redis, Poll(id=poll_id, labels=("a", "b")), reuse_deleted=True)
    result = await tally.commit(_votes(poll_id, 12, seq=2), now_ms=2000)
    assert result.codes == [int(Fate.ACCEPTED)] * 12
    assert (await read_results(redis, [poll_id]))[poll_id].total == 12
    assert await redis.hlen(PollKeys(poll_id).devices) == 12
    # And back: a poll unknown to the processor, on three shards.
    other = unique_id(request, "-b")
    await create_poll(redis, Poll(id=other, labels=("a", "b"), shards=3))
    result = await Tally(redis, timeout_s=5).commit(_votes(other, 12), now_ms=3000)
    assert result.codes == [int(Fate.ACCEPTED)] * 12
    assert await redis.hlen(PollKeys(other).devices) < 12  # the rest on shards 1 and 2


async def test_votes_for_a_shard_without_a_definition_are_an_unknown_poll(
    redis: Redis, request: pytest.FixtureRequest
) -> None:
    """A poll deleted under a processor that knew its shards: nothing counts anywhere."""
    poll_id = unique_id(request)
    await create_poll(redis, Poll(id=poll_id, labels=("a", "b"), shards=3))
    tally = Tally(redis, timeout_s=5)
    await tally.commit(_votes(poll_id, 12), now_ms=1000)
    await delete_poll(redis, poll_id)
    result = await tally.commit(_votes(poll_id, 12, seq=2), now_ms=2000)
    assert result.codes == [int(Reason.UNKNOWN_POLL)] * 12
    left = [key async for key in redis.scan_iter(match=f"votebox:{{{poll_id}*")]
    assert [key for key in left if not key.endswith(b":fates")] == []


async def test_updates_write_every_shard_and_never_change_the_shards(
    redis: Redis, request: pytest.FixtureRequest
) -> None:
    poll = Poll(id=unique_id(request), labels=("a", "b"), shards=2)
    await create_poll(redis, poll)
    await update_poll(redis, Poll(id=poll.id, labels=("a", "b"), title="new", shards=2))
    for keys in shard_keys(poll.id, 2):
        assert await redis.hget(keys.definition, "title") == b"new"
    with pytest.raises(ConfigError, match="shards is fixed at creation"):
        await update_poll(redis, Poll(id=poll.id, labels=("a", "b"), shards=3))
    assert (await load_poll(redis, poll.id)) == Poll(
        id=poll.id, labels=("a", "b"), title="new", shards=2
    )
    with pytest.raises(ConfigError, match="exists already"):
        await create_poll(redis, Poll(id=poll.id, labels=("x", "y"), shards=2))
    assert await redis.hget(PollKeys(poll.id, 1).definition, "labels") == b'["a", "b"]'


async def test_deleting_a_spread_poll_removes_every_shard(
    redis: Redis, request: pytest.FixtureRequest
) -> None:
    poll_id = unique_id(request)
    await create_poll(redis, Poll(id=poll_id, labels=("a", "b"), shards=3))
    await Tally(redis, timeout_s=5, points_max=100).commit(_votes(poll_id, 30), now_ms=1)
    assert await delete_poll(redis, poll_id) == 30  # points still queued, over all shards
    assert [key async for key in redis.scan_iter(match=f"votebox:{{{poll_id}*")] == []
