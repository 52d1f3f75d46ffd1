"""The retained ``votebox/stats`` summary. Rule: its numbers come from Redis, so every
processor publishes the same totals and the last one to publish is right.

Dashboards that speak only MQTT subscribe to it; Prometheus reads the same numbers as gauges.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from redis.asyncio import Redis

from processor.errors import StoreUnavailable
from processor.keys import DEVICES_SEEN, QUEUED_POINTS, UNATTRIBUTED_FATES, shard_keys
from processor.metrics import Metrics
from processor.mqtt import Publish
from processor.poll_store import list_polls, shards_of
from processor.reasons import Fate
from processor.store import redis_errors, redis_text
from processor.topics import STATS_TOPIC

__all__ = ["SILENT_LISTED_MAX", "Stats", "StatsPublisher", "read_stats"]

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
    # (device, last seen ms), the most recently silent first.
    silent: list[tuple[str, int]] = field(default_factory=list)
    silent_count: int = 0

    def to_json(self, **extra: Any) -> bytes:
        """The ``votebox/stats`` payload (docs/operations.md, The stats topic)."""
        body = {
            "ts_ms": self.ts_ms,
            "votes": self.votes,
            "rejected": self.rejected,
            "polls": self.polls,
            "influx_queue": self.influx_queue,
            "devices": {
                "known": self.devices_known,
                "silent": self.silent_count,
                "silent_recent": [
                    {"device": device, "last_seen_ms": ms} for device, ms in self.silent
                ],
            },
            **extra,
        }
        return json.dumps(body, separators=(",", ":"), sort_keys=True).encode()


async def read_stats(redis: Redis, *, now_ms: int, silent_after_s: float) -> Stats:
    """Read the totals of every poll, the InfluxDB queue and the devices' last-seen times.

    Three round trips: the poll list, their shards, then everything else in one pipeline.
    """
    polls = await list_polls(redis)
    shards = await shards_of(redis, polls)
    queues = [(poll, keys) for poll in polls for keys in shard_keys(poll, shards[poll])]
    async with redis.pipeline(transaction=False) as pipe:
        for _, keys in queues:
            pipe.hgetall(keys.fates)
            pipe.hlen(keys.devices)
            pipe.hget(keys.tally, QUEUED_POINTS)
        pipe.hgetall(UNATTRIBUTED_FATES)
        pipe.hgetall(DEVICES_SEEN)
        replies = await pipe.execute()
    votes = {name: 0 for name in sorted(_FATES)}
    rejected: dict[str, int] = {}
    per_poll: dict[str, dict[str, int]] = {}
    queue = 0
    for i, (poll, _) in enumerate(queues):
        fates, devices, queued = replies[3 * i : 3 * i + 3]
        # A poll over several shards: a device votes on one of them, so their sums are exact.
        mine = per_poll.setdefault(poll, {name: 0 for name in sorted(_FATES)} | {"devices": 0})
        for key, value in fates.items():
            name, n = redis_text(key), int(value)
            if name in _FATES:
                mine[name] += n
            elif name != "point_dropped":  # a point's fate, not a vote's
                mine["rejected"] += n
                rejected[name] = rejected.get(name, 0) + n
        mine["devices"] += int(devices)
        queue += int(queued or 0)
    for mine in per_poll.values():
        for name in _FATES:
            votes[name] += mine[name]
    for key, value in replies[-2].items():
        votes["rejected"] += int(value)
        rejected[redis_text(key)] = rejected.get(redis_text(key), 0) + int(value)
    seen = {redis_text(k): int(v) for k, v in replies[-1].items()}
    cutoff = now_ms - int(silent_after_s * 1000)
    silent = sorted(
        ((d, ms) for d, ms in seen.items() if ms < cutoff), key=lambda x: x[1], reverse=True
    )
    return Stats(
        ts_ms=now_ms,
        votes=votes,
        rejected=dict(sorted(rejected.items())),
        polls=per_poll,
        influx_queue=queue,
        devices_known=len(seen),
        silent=silent[:SILENT_LISTED_MAX],
        silent_count=len(silent),
    )


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
                stats = await read_stats(
                    self._redis,
                    now_ms=int(time.time() * 1000),
                    silent_after_s=self._silent_after_s,
                )
        m = self._metrics
        m.influx_queue_points.set(stats.influx_queue)
        m.devices_known.set(stats.devices_known)
        m.devices_silent.set(stats.silent_count)
        m.polls.set(len(stats.polls))
        self._publish(STATS_TOPIC, stats.to_json(processor=self._about_me()))
        return stats
