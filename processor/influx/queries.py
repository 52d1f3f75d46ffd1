"""Questions about a poll's points, in InfluxDB and still queued for it: ``votebox recount``
counts with them, ``votebox audit`` rebuilds the chain from them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Final, cast

from redis.asyncio import Redis

from processor.influx.line_protocol import QueuedPoint, points_of_entry
from processor.influx.writers import PointWriter
from processor.keys import shard_keys

__all__ = ["chain_points", "count_votes", "queued_points"]

_CHUNK: Final = 10_000
_Entries = list[tuple[bytes, dict[bytes, bytes]]]

# Every time InfluxDB can store (1677-2262 is its range; no vote is dated before 1970).
_ALL_TIME_NS: Final = (0, 9_223_372_036_854_775_806)


async def count_votes(writer: PointWriter, poll: str) -> dict[int, int]:
    """The sum of ``poll``'s point values in InfluxDB per option index: its votes, changed
    votes taken back (for ``votebox recount``)."""
    rows = await asyncio.to_thread(writer.query_sums, poll, "option", *_ALL_TIME_NS)
    counts: dict[int, int] = {}
    for row in rows:
        counts[row.option] = counts.get(row.option, 0) + row.votes
    return counts


async def queued_points(redis: Redis, poll: str, key: str) -> AsyncIterator[QueuedPoint]:
    """The points in one of ``poll``'s queues (``key``), oldest first, read in chunks."""
    start = "-"
    while True:
        # redis-py types stream replies loosely; without decode_responses they are bytes.
        entries = cast(_Entries, await redis.xrange(key, min=start, count=_CHUNK))
        for sid, fields in entries:
            for point in points_of_entry(poll, sid, fields):
                yield point
        if len(entries) < _CHUNK:
            return
        start = "(" + entries[-1][0].decode()


async def chain_points(
    redis: Redis | None,
    writer: PointWriter | None,
    poll: str,
    shards: int,
    *,
    since_ms: int = 0,
) -> list[QueuedPoint]:
    """Every point of ``poll`` dated from ``since_ms`` (`poll_store.earliest_point_ms`): those
    still queued in Redis, then those in InfluxDB (a point drained meanwhile is in one or
    both: the chain's rebuild counts it once). Read after the witness's lengths, so that each
    entry up to them is found in one place or the other."""
    points: list[QueuedPoint] = []
    if redis is not None:
        for keys in shard_keys(poll, shards):
            points += [p async for p in queued_points(redis, poll, keys.points)]
    if writer is not None:
        points += await asyncio.to_thread(lambda: list(writer.query_points(poll)))
    since_s = since_ms // 1000
    return [p for p in points if p.ts_s >= since_s] if since_s else points
