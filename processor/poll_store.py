"""Polls in Redis: their definitions, lifecycle and result snapshots.

Rule: definitions are written here and by nothing else; the tally script only reads them. Every
change bumps the poll's version and is announced on `POLLS_CHANGED`, so processors republish
its config and results at once.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, Final

from redis.asyncio import Redis

from processor.chain import GENESIS
from processor.changes import announce_polls
from processor.errors import ConfigError
from processor.keys import (
    POLLS_CHANGED,
    POLLS_DELETED,
    POLLS_INDEX,
    QUEUED_POINTS,
    UNATTRIBUTED_FATES,
    PollKeys,
    shard_keys,
)
from processor.poll import POLL_FIELDS, Poll
from processor.poll_results import Results
from processor.store import redis_text

__all__ = [
    "Snapshot",
    "close_poll",
    "create_poll",
    "delete_poll",
    "deleted_id_message",
    "earliest_point_ms",
    "list_deleted",
    "list_polls",
    "load_poll",
    "load_polls",
    "note_states",
    "point_queues",
    "open_poll",
    "plan_update",
    "read_fates",
    "read_results",
    "read_series",
    "read_snapshots",
    "shards_of",
    "update_poll",
]


def _now_ms() -> int:
    return int(time.time() * 1000)


async def create_poll(
    redis: Redis, poll: Poll, *, now_ms: int | None = None, reuse_deleted: bool = False
) -> None:
    """Store a new poll.

    Args:
        redis: where polls live.
        poll: the new poll.
        now_ms: its creation time (default now).
        reuse_deleted: take an id of a deleted poll, accepting that votes cast for the deleted
            one, still in the broker's queue or in device outboxes, count into this one.

    Raises:
        ConfigError: a poll with that id exists (its votes would no longer match its options),
            or existed and was deleted (unless ``reuse_deleted``).
    """
    if not reuse_deleted and await redis.sismember(POLLS_DELETED, poll.id):
        raise ConfigError(deleted_id_message(poll.id))
    keys = PollKeys(poll.id)
    now_ms = now_ms if now_ms is not None else _now_ms()
    stored = [item for pair in poll.to_hash().items() for item in pair]
    if poll.shards > 1:
        if await redis.hexists(keys.definition, "labels"):
            raise ConfigError(f"poll {poll.id!r} exists already; pick another id")
        # Shards 1.. first: the poll exists once shard 0 has its definition, and a create
        # that died half-way is made whole by running it again.
        for shard in shard_keys(poll.id, poll.shards)[1:]:
            await redis.eval(_CREATE_SHARD, 2, shard.definition, shard.tally, now_ms, *stored)
    # One script on the poll's slot: the poll is made whole or not at all.
    created = await redis.eval(
        _CREATE, 2, keys.definition, keys.tally, now_ms, poll.state_at(now_ms), *stored
    )
    # Outside the poll's slot, and each idempotent: done again by a retry if they were lost.
    async with redis.pipeline(transaction=False) as pipe:
        pipe.sadd(POLLS_INDEX, poll.id)
        if created:
            pipe.srem(POLLS_DELETED, poll.id)
        await pipe.execute()
    if created:
        await _announce(redis, poll.id)
    if not created:
        raise ConfigError(f"poll {poll.id!r} exists already; pick another id")


# A definition without labels is one the old two-step create left half-made: made whole now.
_CREATE: Final = """
if redis.call('HEXISTS', KEYS[1], 'labels') == 1 then return 0 end
redis.call('HSET', KEYS[1], 'created_ms', ARGV[1], unpack(ARGV, 3))
redis.call('HSETNX', KEYS[2], 'version', 0)
redis.call('HSETNX', KEYS[2], 'updated_ms', ARGV[1])
redis.call('HSET', KEYS[2], 'state_seen', ARGV[2])
return 1
"""


# Shard 1.. of a poll (keys.py): its own copy of the definition, which its tally script reads.
_CREATE_SHARD: Final = """
redis.call('HSET', KEYS[1], 'created_ms', ARGV[1], unpack(ARGV, 2))
redis.call('HSETNX', KEYS[2], 'version', 0)
return 1
"""


async def _announce(redis: Redis, poll_id: str) -> None:
    # The change feed for the periodic readers (durable), then pub/sub for the results
    # publishers (at once).
    await announce_polls(redis, [poll_id])
    await redis.publish(POLLS_CHANGED, poll_id)


def deleted_id_message(poll_id: str) -> str:
    """Why a deleted poll's id is not taken again, and what to do."""
    return (
        f"poll {poll_id!r} was deleted; votes cast for it may still wait in the broker's queue "
        "or in device outboxes, and would count into a new poll of that id. Pick another id, "
        "or accept that with `votebox poll create --reuse-deleted-id`"
    )


# Fields a poll with votes may not change: its votes would no longer mean what they meant.
_FIXED_ONCE_VOTED: Final = tuple(f.name for f in POLL_FIELDS if f.fixed_once_voted)
_FIXED: Final = tuple(f.name for f in POLL_FIELDS if f.fixed)


async def plan_update(redis: Redis, poll: Poll) -> list[str]:
    """The names of the fields an update to ``poll`` would change; writes nothing.

    Raises:
        ConfigError: there is no such poll, or it has votes and the change would alter what
            they mean (options, type, scale, one vote per voter).
    """
    old = await load_poll(redis, poll.id)
    if old is None:
        raise ConfigError(f"no poll {poll.id!r}; create it first")
    changed = [f.name for f in fields(Poll) if getattr(old, f.name) != getattr(poll, f.name)]
    if not changed:
        return []
    fixed = [name for name in changed if name in _FIXED]
    if fixed:
        raise ConfigError(
            f"poll {poll.id}: its {', '.join(fixed)} is fixed at creation (make a new poll instead)"
        )
    async with redis.pipeline(transaction=False) as pipe:
        for keys in shard_keys(poll.id, old.shards):
            pipe.hget(keys.tally, "total")
        total = sum(int(n or 0) for n in await pipe.execute())
    frozen = [name for name in changed if name in _FIXED_ONCE_VOTED]
    if total and frozen:
        raise ConfigError(
            f"poll {poll.id} has {total} votes: its {', '.join(frozen)} cannot change "
            "(make a new poll instead)"
        )
    return changed


async def update_poll(redis: Redis, poll: Poll, *, now_ms: int | None = None) -> list[str]:
    """Change an existing poll's definition; returns the names of the fields that changed.

    Raises:
        ConfigError: as `plan_update`; then nothing is written.
    """
    changed = await plan_update(redis, poll)
    if changed:
        await _store(redis, poll, now_ms if now_ms is not None else _now_ms())
    return changed


async def _store(redis: Redis, poll: Poll, now_ms: int) -> None:
    definition = poll.to_hash()
    # Shards 1.. first, shard 0 (whose version dashboards see move) last; between the writes
    # a shard may take a vote by the old definition, as it would have a moment earlier.
    for shard in shard_keys(poll.id, poll.shards)[1:]:
        await redis.hset(shard.definition, mapping=definition)
    keys = PollKeys(poll.id)
    # One transaction on the poll's slot; the announcement is not a key, so it follows.
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hset(keys.definition, mapping=definition)
        # A new state or definition is a new result: dashboards see a higher version.
        pipe.hincrby(keys.tally, "version", 1)
        pipe.hset(keys.tally, mapping={"state_seen": poll.state_at(now_ms), "updated_ms": now_ms})
        await pipe.execute()
    await _announce(redis, poll.id)


async def open_poll(redis: Redis, poll_id: str, *, now_ms: int | None = None) -> Poll:
    """Open a poll now (also reopens a closed one); returns the new definition.

    Raises:
        ConfigError: there is no such poll.
    """
    now_ms = now_ms if now_ms is not None else _now_ms()
    poll = await _must_load(redis, poll_id)
    opens = poll.opens_ms if poll.opens_ms and poll.opens_ms <= now_ms else now_ms
    closes = poll.closes_ms if poll.closes_ms > now_ms else 0
    opened = replace(poll, opens_ms=opens, closes_ms=closes)
    await _store(redis, opened, now_ms)
    return opened


async def close_poll(redis: Redis, poll_id: str, *, now_ms: int | None = None) -> Poll:
    """Close a poll now; votes cast before now may still arrive within its grace period.

    Raises:
        ConfigError: there is no such poll, or it never opened.
    """
    now_ms = now_ms if now_ms is not None else _now_ms()
    poll = await _must_load(redis, poll_id)
    if poll.state_at(now_ms) == "scheduled":
        raise ConfigError(f"poll {poll_id} has not opened yet; nothing to close")
    if poll.state_at(now_ms) == "closed":
        return poll
    closed = replace(poll, closes_ms=now_ms)
    await _store(redis, closed, now_ms)
    return closed


async def delete_poll(redis: Redis, poll_id: str) -> int:
    """Delete a poll and everything stored about it; processors clear its retained topics.

    Returns:
        How many points were still queued for InfluxDB and are dropped with it.

    Raises:
        ConfigError: there is no such poll.
    """
    poll = await _must_load(redis, poll_id)
    shards = shard_keys(poll_id, poll.shards)
    queued = (await point_queues(redis, {poll_id: poll.shards}))[poll_id].queued
    # Marked deleted first (outside the poll's slot, idempotent): a delete that dies before
    # its keys are gone is done by running it again, and processors clear the topics already.
    async with redis.pipeline(transaction=False) as pipe:
        pipe.srem(POLLS_INDEX, poll_id)
        pipe.sadd(POLLS_DELETED, poll_id)
        await pipe.execute()
    # Shard 0 last: while it has the definition, running the delete again finishes it.
    for keys in reversed(shards):
        # Every device with a window has its entry in the devices hash (tally.lua writes
        # both): the poll's own keys, found without scanning the keyspace or every node.
        devices = await redis.hkeys(keys.devices)
        windows = [keys.window_prefix + redis_text(device) for device in devices]
        await redis.delete(*keys.every_key(), *windows)  # one command, one slot: all at once
    await _announce(redis, poll_id)
    return queued


def _definition(poll_id: str, stored: Mapping[Any, Any]) -> Poll | None:
    return Poll.from_hash(poll_id, {redis_text(k): redis_text(v) for k, v in stored.items()})


async def _must_load(redis: Redis, poll_id: str) -> Poll:
    poll = await load_poll(redis, poll_id)
    if poll is None:
        raise ConfigError(f"no poll {poll_id!r}; votebox poll list shows the polls there are")
    return poll


async def load_poll(redis: Redis, poll_id: str) -> Poll | None:
    """The poll's definition, or None when there is no such poll."""
    return _definition(poll_id, await redis.hgetall(PollKeys(poll_id).definition))


async def load_polls(redis: Redis, poll_ids: Iterable[str]) -> dict[str, Poll]:
    """Several definitions in one round trip; polls that do not exist are left out."""
    ids = list(poll_ids)
    async with redis.pipeline(transaction=False) as pipe:
        for poll_id in ids:
            pipe.hgetall(PollKeys(poll_id).definition)
        replies = await pipe.execute()
    out = {}
    for poll_id, stored in zip(ids, replies, strict=True):
        poll = _definition(poll_id, stored)
        if poll is not None:
            out[poll_id] = poll
    return out


async def shards_of(redis: Redis, poll_ids: Iterable[str]) -> dict[str, int]:
    """How many shards each poll has (1 for a poll that does not exist), in one round trip."""
    ids = list(poll_ids)
    async with redis.pipeline(transaction=False) as pipe:
        for poll_id in ids:
            pipe.hget(PollKeys(poll_id).definition, "shards")
        replies = await pipe.execute()
    return {poll_id: int(k or 1) for poll_id, k in zip(ids, replies, strict=True)}


@dataclass(frozen=True, slots=True)
class PointQueue:
    """A poll's points for InfluxDB, over its shards: still queued, and refused and set aside."""

    queued: int
    refused: int


async def point_queues(redis: Redis, polls: Mapping[str, int]) -> dict[str, PointQueue]:
    """The point queues of each poll (by id, with its shards), in one round trip."""
    async with redis.pipeline(transaction=False) as pipe:
        for poll_id, shards in polls.items():
            for keys in shard_keys(poll_id, shards):
                pipe.hget(keys.tally, QUEUED_POINTS)
                pipe.xlen(keys.points_rejected)
        replies = iter(await pipe.execute())
    out = {}
    for poll_id, shards in polls.items():
        queued = refused = 0
        for _ in range(max(shards, 1)):
            queued += int(next(replies) or 0)
            refused += int(next(replies))
        out[poll_id] = PointQueue(queued, refused)
    return out


async def list_polls(redis: Redis) -> list[str]:
    """Every poll id, sorted."""
    members = await redis.smembers(POLLS_INDEX)
    return sorted(redis_text(m) for m in members)


async def list_deleted(redis: Redis) -> list[str]:
    """Ids of deleted polls (whose retained topics processors clear), sorted."""
    members = await redis.smembers(POLLS_DELETED)
    return sorted(redis_text(m) for m in members)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A poll's definition and results read together, and the state its version last counted."""

    poll: Poll
    results: Results
    state_seen: str | None


async def read_snapshots(
    redis: Redis, poll_ids: Iterable[str], *, now_ms: int | None = None
) -> dict[str, Snapshot]:
    """Definitions and results of several polls in one round trip; missing polls left out."""
    now_ms = now_ms if now_ms is not None else _now_ms()
    ids: Sequence[str] = list(poll_ids)
    async with redis.pipeline(transaction=False) as pipe:
        for poll_id in ids:
            keys = PollKeys(poll_id)
            pipe.hgetall(keys.definition)
            pipe.hgetall(keys.tally)
        replies = await pipe.execute()
    polls: dict[str, Poll] = {}
    tallies: dict[str, list[Any]] = {}
    for i, poll_id in enumerate(ids):
        if (definition := _definition(poll_id, replies[2 * i])) is not None:
            polls[poll_id] = definition
            tallies[poll_id] = [replies[2 * i + 1]]
    spread = [poll for poll in polls.values() if poll.shards > 1]
    if spread:
        # A poll over several shards: its results are the sums of theirs. Each shard's version
        # only grows, so their sum does too: the published version never goes back.
        async with redis.pipeline(transaction=False) as pipe:
            for poll in spread:
                for keys in shard_keys(poll.id, poll.shards)[1:]:
                    pipe.hgetall(keys.tally)
            more = iter(await pipe.execute())
        for poll in spread:
            tallies[poll.id] += [next(more) for _ in range(poll.shards - 1)]
    out: dict[str, Snapshot] = {}
    for poll_id, poll in polls.items():
        tally = _sum_tallies(tallies[poll_id])
        state = poll.state_at(now_ms)
        # Each shard's chain, as it is: its length and head (tally.lua, The chain).
        chain = tuple(
            (int(shard.get(b"chain_length", 0)), redis_text(shard.get(b"chain_head", GENESIS)))
            for shard in tallies[poll_id]
        )
        results = Results(
            poll=poll_id,
            title=poll.title,
            state=state,
            version=int(tally.get(b"version", 0)),
            total=int(tally.get(b"total", 0)),
            counts=tuple(tally.get(f"c:{i}".encode(), 0) for i in range(len(poll.labels))),
            labels=poll.labels,
            updated_ms=int(tally.get(b"updated_ms", 0)),
            type=poll.type,
            scale=poll.scale,
            hidden=poll.hide_results_until_close and state != "closed",
            opens_ms=poll.opens_ms,
            closes_ms=poll.closes_ms,
            chain=chain,
        )
        seen = tallies[poll_id][0].get(b"state_seen")
        out[poll_id] = Snapshot(poll, results, redis_text(seen) if seen is not None else None)
    return out


_NOT_SUMMED: Final = frozenset({b"state_seen", b"chain_head"})


def _sum_tallies(shards: Sequence[Mapping[bytes, bytes]]) -> dict[bytes, int]:
    """The numbers of a poll's tally hashes (one per shard), summed; updated_ms is the latest."""
    out: dict[bytes, int] = {}
    for tally in shards:
        for field, value in tally.items():
            if field in _NOT_SUMMED:
                continue
            n = int(value)
            out[field] = (
                max(out.get(field, 0), n) if field == b"updated_ms" else out.get(field, 0) + n
            )
    return out


async def read_results(
    redis: Redis, poll_ids: Iterable[str], *, now_ms: int | None = None
) -> dict[str, Results]:
    """Results of several polls in one round trip; polls that do not exist are left out."""
    snapshots = await read_snapshots(redis, poll_ids, now_ms=now_ms)
    return {poll_id: snap.results for poll_id, snap in snapshots.items()}


# Minutes in a poll's retained series (docs/protocol.md, Votes per minute).
SERIES_MINUTES: Final = 60


async def read_series(
    redis: Redis, polls: Mapping[str, int], *, now_ms: int
) -> dict[str, list[int]]:
    """Votes accepted per minute over the last `SERIES_MINUTES` minutes, oldest first, of each
    poll (by id, with its shards), the current minute last. Minutes older than those are
    deleted as they are read: the tally only adds."""
    now_minute = now_ms // 60_000
    first = now_minute - SERIES_MINUTES + 1
    ids = list(polls)
    async with redis.pipeline(transaction=False) as pipe:
        for poll_id in ids:
            for keys in shard_keys(poll_id, polls[poll_id]):
                pipe.hgetall(keys.minutes)
        replies = iter(await pipe.execute())
    out: dict[str, list[int]] = {}
    stale: list[tuple[str, list[bytes]]] = []
    for poll_id in ids:
        counts = [0] * SERIES_MINUTES
        for keys in shard_keys(poll_id, polls[poll_id]):
            old = []
            for field, value in next(replies).items():
                minute = int(field)
                if minute < first:
                    old.append(field)
                elif minute <= now_minute:
                    counts[minute - first] += int(value)
            if old:
                stale.append((keys.minutes, old))
        out[poll_id] = counts
    if stale:
        async with redis.pipeline(transaction=False) as pipe:
            for key, fields in stale:
                pipe.hdel(key, *fields)
            await pipe.execute()
    return out


_STATE_BUMP: Final = """
if redis.call('HGET', KEYS[1], 'state_seen') == ARGV[1] then return false end
redis.call('HSET', KEYS[1], 'state_seen', ARGV[1], 'updated_ms', ARGV[2])
return redis.call('HINCRBY', KEYS[1], 'version', 1)
"""


async def note_states(redis: Redis, states: Mapping[str, str], *, now_ms: int) -> None:
    """Bump the version of each poll whose state (by its times) is not the one its version
    last counted: a scheduled open or close is a new result, and dashboards go by version.
    Several processors may race here; the script makes only the first bump count."""
    async with redis.pipeline(transaction=False) as pipe:
        for poll_id, state in states.items():
            pipe.eval(_STATE_BUMP, 1, PollKeys(poll_id).tally, state, now_ms)
        await pipe.execute()


def _counts(stored: dict[Any, Any]) -> dict[str, int]:
    return {redis_text(k): int(v) for k, v in stored.items()}


async def earliest_point_ms(redis: Redis, poll_id: str, *, clock_skew_s: int) -> int:
    """The earliest time a point of the poll can carry: its creation less the clock skew
    allowed (tally.lua dates a point by the device's clock only when plausible; docs/
    analytics.md, Timestamps). A point dated before is another poll's: one deleted before this
    one was made under its id."""
    created_ms = int(await redis.hget(PollKeys(poll_id).definition, "created_ms") or 0)
    return max(0, created_ms - clock_skew_s * 1000)


async def read_fates(redis: Redis, poll_id: str) -> tuple[dict[str, int], dict[str, int]]:
    """How many votes of the poll met each fate, and how many messages naming no valid poll
    were rejected, by reason code (docs/protocol.md, Acks)."""
    shards = (await shards_of(redis, [poll_id]))[poll_id]
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(UNATTRIBUTED_FATES)
        for keys in shard_keys(poll_id, shards):
            pipe.hgetall(keys.fates)
        unattributed, *per_shard = await pipe.execute()
    per_poll: dict[str, int] = {}
    for fates in per_shard:
        for reason, n in _counts(fates).items():
            per_poll[reason] = per_poll.get(reason, 0) + n
    return per_poll, _counts(unattributed)
