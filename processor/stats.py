"""The retained ``votebox/stats`` summary. Rule: its numbers come from Redis, so every
processor publishes the same totals and the last one to publish is right.

Dashboards that speak only MQTT subscribe to it; Prometheus reads the same numbers as gauges.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from redis.asyncio import Redis

from processor.changes import SWEEP_S, ChangeFeed
from processor.errors import StoreUnavailable
from processor.keys import (
    DEVICES_ONLINE,
    DEVICES_SEEN,
    POLLS_INDEX,
    QUEUED_POINTS,
    UNATTRIBUTED_FATES,
    PollKeys,
    shard_keys,
)
from processor.metrics import Metrics
from processor.mqtt import Publish
from processor.poll_store import list_polls, shards_of
from processor.reasons import Fate
from processor.store import redis_errors, redis_text
from processor.topics import STATS_TOPIC

__all__ = ["SILENT_LISTED_MAX", "Stats", "StatsPublisher", "StatsReader", "read_stats"]

log = logging.getLogger(__name__)

# The stats message names the devices that fell silent most recently (a kiosk that just died is
# news; one silent for days was probably packed away), not all of them: it must stay small.
SILENT_LISTED_MAX: Final = 50
_FATES: Final = frozenset(f.name.lower() for f in Fate)


@dataclass(frozen=True, slots=True)
class Stats:
    """Totals over all polls, from Redis, at ``ts_ms``."""

    ts_ms: int
    votes: dict[str, int]
    rejected: dict[str, int]
    polls: dict[str, dict[str, int]]
    influx_queue: int
    devices_known: int
    # Points never queued because a poll's queue was full (the polls' point_dropped).
    influx_dropped: int = 0
    # (device, last seen ms), the most recently silent first.
    silent: list[tuple[str, int]] = field(default_factory=list)
    silent_count: int = 0
    # `polls` as JSON, when the reader kept each poll's part of it (so that a message listing
    # 10,000 polls costs a join, not an encoding of every poll).
    polls_json: str | None = field(default=None, repr=False, compare=False)

    def to_json(self, **extra: Any) -> bytes:
        """The ``votebox/stats`` payload (docs/operations.md, The stats topic)."""
        body = {
            "ts_ms": self.ts_ms,
            "votes": self.votes,
            "rejected": self.rejected,
            "polls": self.polls if self.polls_json is None else _POLLS_HERE,
            "influx_queue": self.influx_queue,
            "influx_dropped": self.influx_dropped,
            "devices": {
                "known": self.devices_known,
                "silent": self.silent_count,
                "silent_recent": [
                    {"device": device, "last_seen_ms": ms} for device, ms in self.silent
                ],
            },
            **extra,
        }
        text = json.dumps(body, separators=(",", ":"), sort_keys=True)
        if self.polls_json is not None:
            text = text.replace(json.dumps(_POLLS_HERE), self.polls_json, 1)
        return text.encode()


# Stands for the polls' JSON in the message until it is put in (no poll id or number has a NUL).
_POLLS_HERE: Final = "\x00polls\x00"


def _blank() -> dict[str, int]:
    return {name: 0 for name in sorted(_FATES)} | {"devices": 0}


class StatsReader:
    """Reads the totals incrementally: only the poll shards the change feed names, the ones
    with points still queued (the drainer takes them off, unannounced) and, every `SWEEP_S`
    or when the feed cannot say, every poll. Its cost follows the votes, not the polls.

    Args:
        redis: where the tallies are.
    """

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._feed = ChangeFeed(redis)
        self._shards: dict[str, int] = {}  # poll -> shards, of every poll in the index
        # shard name -> (its fate counts by name, its devices, its queued points)
        self._per_shard: dict[str, tuple[dict[str, int], int, int]] = {}
        self._queued: set[str] = set()  # shard names with points queued at the last read
        self._sweep_at = 0.0
        # poll -> its entry of the message and that entry as JSON, kept until one of its
        # shards is read again
        self._poll_rows: dict[str, tuple[dict[str, int], str]] = {}
        self._order: list[str] | None = None  # the polls, sorted

    async def read(self, *, now_ms: int, silent_after_s: float) -> Stats:
        """The totals now.

        Raises:
            redis.RedisError: mapped by the caller's `redis_errors`.
        """
        changes = await self._feed.read()
        clock = time.monotonic()
        if changes is None or clock >= self._sweep_at:
            polls = await list_polls(self._redis)
            self._shards = await shards_of(self._redis, polls)
            self._per_shard.clear()
            self._poll_rows.clear()
            self._order = None
            names = {k.name for p, n in self._shards.items() for k in shard_keys(p, n)}
            self._sweep_at = clock + SWEEP_S
        else:
            names = set(self._queued)
            if changes.polls:
                # Made, changed or deleted by an operator: its shards may differ now.
                ids = sorted(changes.polls)
                async with self._redis.pipeline(transaction=False) as pipe:
                    for poll in ids:
                        pipe.sismember(POLLS_INDEX, poll)
                    present = await pipe.execute()
                shards = await shards_of(self._redis, ids)
                for poll, there in zip(ids, present, strict=True):
                    for name in [n for n in self._per_shard if n.split(":")[0] == poll]:
                        del self._per_shard[name]
                    self._poll_rows.pop(poll, None)
                    self._order = None
                    if there:
                        self._shards[poll] = shards[poll]
                        names |= {k.name for k in shard_keys(poll, shards[poll])}
                    else:
                        self._shards.pop(poll, None)
            names |= {n for n in changes.shards if n.split(":")[0] in self._shards}
        await self._read_shards(sorted(names))
        async with self._redis.pipeline(transaction=False) as pipe:
            cutoff = now_ms - int(silent_after_s * 1000)
            pipe.hgetall(UNATTRIBUTED_FATES)
            pipe.zcard(DEVICES_SEEN)
            # Silent: says it is online, and nothing (vote, heartbeat, status) came since.
            pipe.zcount(DEVICES_ONLINE, "-inf", f"({cutoff}")
            pipe.zrevrangebyscore(
                DEVICES_ONLINE,
                f"({cutoff}",
                "-inf",
                start=0,
                num=SILENT_LISTED_MAX,
                withscores=True,
            )
            unattributed, known, silent_count, silent = await pipe.execute()
        return self._stats(now_ms, unattributed, known, silent_count, silent)

    async def _read_shards(self, names: Sequence[str]) -> None:
        if not names:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for name in names:
                keys = PollKeys.named(name)
                pipe.hgetall(keys.fates)
                pipe.hlen(keys.devices)
                pipe.hget(keys.tally, QUEUED_POINTS)
            replies = await pipe.execute()
        for i, name in enumerate(names):
            fates, devices, queued = replies[3 * i : 3 * i + 3]
            counts = {redis_text(k): int(v) for k, v in fates.items()}
            self._per_shard[name] = (counts, int(devices), int(queued or 0))
            if queued and int(queued):
                self._queued.add(name)
            else:
                self._queued.discard(name)
            poll = name.split(":")[0]
            self._poll_rows.pop(poll, None)

    def _row(self, poll: str) -> tuple[dict[str, int], str]:
        kept = self._poll_rows.get(poll)
        if kept is None:
            row = _blank()
            for keys in shard_keys(poll, self._shards.get(poll, 1)):
                # A poll over several shards: a device votes on one of them, so sums are exact.
                fates, devices, _ = self._per_shard.get(keys.name, ({}, 0, 0))
                for name, n in fates.items():
                    if name in _FATES:
                        row[name] += n
                    elif name != "point_dropped":  # a point's fate, not a vote's
                        row["rejected"] += n
                row["devices"] += devices
            part = f"{json.dumps(poll)}:{json.dumps(row, separators=(',', ':'), sort_keys=True)}"
            kept = self._poll_rows[poll] = (row, part)
        return kept

    def _stats(
        self,
        now_ms: int,
        unattributed: dict[bytes, bytes],
        known: int,
        silent_count: int,
        silent: list[tuple[bytes, float]],
    ) -> Stats:
        votes = {name: 0 for name in sorted(_FATES)}
        rejected: dict[str, int] = {}
        queue = dropped = 0
        for fates, _, queued in self._per_shard.values():
            queue += queued
            dropped += fates.get("point_dropped", 0)
            for reason, n in fates.items():
                if reason not in _FATES and reason != "point_dropped":
                    rejected[reason] = rejected.get(reason, 0) + n
        if self._order is None:
            self._order = sorted(self._shards)
        per_poll, parts = {}, []
        for poll in self._order:
            row, part = self._row(poll)
            per_poll[poll] = row
            parts.append(part)
            for name in _FATES:
                votes[name] += row[name]
        for key, value in unattributed.items():
            votes["rejected"] += int(value)
            rejected[redis_text(key)] = rejected.get(redis_text(key), 0) + int(value)
        return Stats(
            ts_ms=now_ms,
            votes=votes,
            rejected=dict(sorted(rejected.items())),
            polls=per_poll,
            influx_queue=queue,
            influx_dropped=dropped,
            devices_known=int(known),
            silent=[(redis_text(d), int(ms)) for d, ms in silent],
            silent_count=int(silent_count),
            polls_json="{" + ",".join(parts) + "}",
        )


async def read_stats(redis: Redis, *, now_ms: int, silent_after_s: float) -> Stats:
    """Read the totals of every poll, the InfluxDB queue and the devices' last-seen times
    (every poll: `StatsReader` reads only what changed since its last read)."""
    return await StatsReader(redis).read(now_ms=now_ms, silent_after_s=silent_after_s)


class StatsPublisher:
    """Every ``interval_s``: read the stats from Redis, set the gauges, publish them retained.

    Args:
        redis: where the tallies are.
        publish: sends one retained QoS 1 message, given topic and payload.
        metrics: the gauges fed from Redis.
        interval_s: how often.
        silent_after_s: a device is silent after this long without a message.
        timeout_s: deadline of one Redis read.
        about_me: this processor's own facts, added to the message under ``processor``.
    """

    def __init__(
        self,
        *,
        redis: Redis,
        publish: Publish,
        metrics: Metrics,
        interval_s: float,
        silent_after_s: float,
        timeout_s: float,
        about_me: Callable[[], dict[str, Any]],
    ) -> None:
        self._redis = redis
        self._publish = publish
        self._metrics = metrics
        self._interval_s = interval_s
        self._silent_after_s = silent_after_s
        self._timeout_s = timeout_s
        self._about_me = about_me
        self._reader = StatsReader(redis)

    async def run(self) -> None:
        """Publish until cancelled; a Redis outage skips a round (logged once per outage)."""
        failing = False
        while True:
            try:
                await self.publish_once()
                failing = False
            except StoreUnavailable as exc:
                if not failing:
                    log.warning("stats skipped while Redis is unavailable: %s", exc)
                failing = True
            await asyncio.sleep(self._interval_s)

    async def publish_once(self) -> Stats:
        """Read, set the gauges, publish; returns what was published.

        Raises:
            StoreUnavailable: Redis could not be read; nothing was published.
        """
        with redis_errors():
            async with asyncio.timeout(self._timeout_s):
                stats = await self._reader.read(
                    now_ms=int(time.time() * 1000),
                    silent_after_s=self._silent_after_s,
                )
        m = self._metrics
        m.influx_queue_points.set(stats.influx_queue)
        m.influx_points_dropped.set(stats.influx_dropped)
        m.devices_known.set(stats.devices_known)
        m.devices_silent.set(stats.silent_count)
        m.polls.set(len(stats.polls))
        self._publish(STATS_TOPIC, stats.to_json(processor=self._about_me()))
        return stats
