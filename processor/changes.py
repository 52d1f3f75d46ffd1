"""The change feed: which poll shards changed, so that periodic readers touch only those.

Rule: an entry is written after the writes it announces (in the same round trip, never before),
and a reader reads from its cursor; one that fell behind what the feed still holds is told to
rescan everything, once.

A commit writes one entry naming the shards its tally scripts ran on (``t``); the poll commands
write one naming the poll they made, changed or deleted (``d``). The feed is a Redis stream
capped at `FEED_MAXLEN` entries, outside any poll's slot: on a Redis Cluster the scripts cannot
write it, so the entry travels beside them in the pipeline. A processor killed between a script
and the entry leaves a change unannounced; the readers' slow sweep (`SWEEP_S`) finds it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

import redis.exceptions
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from processor.keys import CHANGES
from processor.store import redis_text

__all__ = ["FEED_MAXLEN", "SWEEP_S", "ChangeFeed", "Changes", "announce", "announce_polls"]

# Entries the feed keeps, about (trimmed with MAXLEN ~): at a commit of 500 votes each, minutes
# of a full load, while a reader reads every few seconds. A reader further behind rescans.
FEED_MAXLEN: Final = 100_000
# How often a reader also looks at every poll, for a change whose entry was lost (a processor
# killed between its scripts and the entry, a Redis failover that lost the entry but not the
# write). At 10,000 polls one sweep of the drainer and one of the stats cost 1.7 s of CPU
# (docs/benchmarks.md, Many polls): every 15 minutes, 0.2% of a core.
SWEEP_S: Final = 900.0
# Entries read per round trip while catching up.
_READ_COUNT: Final = 10_000


def announce(pipe: Pipeline | Redis, shards: Iterable[str]) -> None:
    """Queue, on ``pipe``, the entry saying that the named shards (`PollKeys.name`) changed."""
    names = ",".join(shards)
    if names:
        pipe.xadd(CHANGES, {"t": names}, maxlen=FEED_MAXLEN, approximate=True)


async def announce_polls(redis: Redis, polls: Iterable[str]) -> None:
    """Say that an operator made, changed or deleted these polls."""
    await redis.xadd(CHANGES, {"d": ",".join(polls)}, maxlen=FEED_MAXLEN, approximate=True)


@dataclass(slots=True)
class Changes:
    """What the feed said since the last read: shards that took votes, polls an operator
    touched."""

    shards: set[str] = field(default_factory=set)
    polls: set[str] = field(default_factory=set)


class ChangeFeed:
    """One reader's cursor in the change feed.

    Args:
        redis: where the feed is.
    """

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._cursor = "0-0"
        # The feed's entries-added at the cursor; None before the first read.
        self._added: int | None = None

    async def read(self) -> Changes | None:
        """What changed since the last read; None when the reader must look at everything
        (its first read, or it fell behind the trimmed feed, or the feed was lost). After None,
        the next read starts from now: look at everything after this call, not before.

        Raises:
            redis.RedisError: mapped by the caller's `redis_errors`.
        """
        try:
            info = await self._redis.xinfo_stream(CHANGES)
        except redis.exceptions.ResponseError as exc:
            if "no such key" not in str(exc).lower():
                raise
            info = None
        last = redis_text(info["last-generated-id"]) if info else "0-0"
        added = int(info["entries-added"]) if info else 0
        length = int(info["length"]) if info else 0
        behind = added - self._added if self._added is not None else -1
        # entries-added counts every entry ever added (Redis 7): more new ones than the feed
        # holds means some were trimmed before we read them; fewer than before, a new feed.
        if behind < 0 or behind > length:
            self._cursor, self._added = last, added
            return None
        changes = Changes()
        cursor = self._cursor
        while behind > 0:
            entries = await self._redis.xrange(
                CHANGES, f"({cursor}", last, count=min(behind, _READ_COUNT)
            )
            if not entries:
                break
            for entry_id, fields in entries:
                for key, value in (fields or {}).items():
                    names = redis_text(value).split(",")
                    (changes.shards if redis_text(key) == "t" else changes.polls).update(names)
                cursor = redis_text(entry_id)
            behind -= len(entries)
        self._cursor, self._added = last, added
        return changes
