"""``votebox recount POLL``: the tally recomputed from InfluxDB, compared with Redis.

Rule: a point still queued for InfluxDB counts as written (it will be); anything else that
differs is a mismatch, printed option by option.
"""

from __future__ import annotations

import argparse
import asyncio
from collections import Counter
from dataclasses import dataclass

from redis.asyncio import Redis

from processor.commands import Commands, add_command
from processor.config import Settings
from processor.errors import ConfigError
from processor.influx.queries import count_votes, queued_points
from processor.influx.writers import PointWriter
from processor.keys import shard_keys
from processor.poll_store import load_poll, point_queues, read_fates, read_results
from processor.store import redis_errors

__all__ = ["Recount", "recount", "register"]

_ATTEMPTS = 10


@dataclass(frozen=True, slots=True)
class Recount:
    """Per option: what Redis counted, what InfluxDB holds, what is still queued."""

    poll: str
    labels: tuple[str, ...]
    redis: tuple[int, ...]
    influx: tuple[int, ...]
    queued: tuple[int, ...]
    dropped: int
    refused: int

    @property
    def matches(self) -> bool:
        return all(i + q == r for r, i, q in zip(self.redis, self.influx, self.queued, strict=True))

    def report(self) -> str:
        width = max(len("label"), *(len(label) for label in self.labels))
        lines = [
            f"{'option':>6}  {'label':<{width}}  {'redis':>9}  {'influxdb':>9}  "
            f"{'queued':>7}  {'difference':>10}"
        ]
        for option, label in enumerate(self.labels):
            r, i, q = self.redis[option], self.influx[option], self.queued[option]
            lines.append(f"{option:>6}  {label:<{width}}  {r:>9}  {i:>9}  {q:>7}  {i + q - r:>+10}")
        lines.append(
            f"points dropped because the queue was full: {self.dropped}; "
            f"refused by InfluxDB and set aside: {self.refused}"
        )
        verdict = "MATCH" if self.matches else "MISMATCH"
        lines.append(
            f"recount of {self.poll}: {verdict} (redis total {sum(self.redis)}, "
            f"influxdb {sum(self.influx)}, queued {sum(self.queued)})"
        )
        return "\n".join(lines)


async def _queued_per_option(redis: Redis, poll: str, shards: int) -> Counter[int]:
    counts: Counter[int] = Counter()
    for keys in shard_keys(poll, shards):
        counts += await _queued_in(redis, poll, keys.points)
    return counts


async def _queued_in(redis: Redis, poll: str, key: str) -> Counter[int]:
    counts: Counter[int] = Counter()
    async for point in queued_points(redis, poll, key):
        # A withdrawn point (a voter's changed vote) takes one back.
        counts[point.option] += -1 if point.withdrawn else 1
    return counts


async def recount(redis: Redis, writer: PointWriter, poll: str) -> Recount:
    """Compare the poll's tally in Redis with its points in InfluxDB.

    Raises:
        ConfigError: there is no such poll.
        StoreUnavailable: Redis cannot be read.
        InfluxRejected, InfluxUnavailable: InfluxDB cannot be queried.
    """
    with redis_errors():
        definition = await load_poll(redis, poll)
        if definition is None:
            raise ConfigError(f"no poll {poll!r}")
        n = len(definition.labels)
        for _ in range(_ATTEMPTS):
            # A point leaves the queue only after it landed in InfluxDB. If the queue did not
            # move while InfluxDB and Redis were read, every point is in exactly one place.
            queued = await _queued_per_option(redis, poll, definition.shards)
            in_influx = await count_votes(writer, poll)
            results = (await read_results(redis, [poll]))[poll]
            if await _queued_per_option(redis, poll, definition.shards) == queued:
                break
            await asyncio.sleep(0.5)
        else:
            raise ConfigError(
                "votes or points kept moving while counting; recount once voting has paused"
            )
        fates, _ = await read_fates(redis, poll)
        refused = (await point_queues(redis, {poll: definition.shards}))[poll].refused
    return Recount(
        poll=poll,
        labels=definition.labels,
        redis=results.counts,
        influx=tuple(in_influx.get(o, 0) for o in range(n)),
        queued=tuple(queued[o] for o in range(n)),
        dropped=fates.get("point_dropped", 0),
        refused=int(refused),
    )


def register(commands: Commands) -> None:
    """Add ``votebox recount``."""
    p = add_command(
        commands,
        "recount",
        _run,
        env_epilog=True,
        help="recompute a poll's tally from InfluxDB and compare it with Redis (exit 1 if they "
        "differ)",
    )
    p.add_argument("poll")
    p.add_argument("--redis-url", dest="redis_url", metavar="VOTEBOX_REDIS_URL")
    p.add_argument("--influx-url", dest="influx_url", metavar="VOTEBOX_INFLUX_URL")


def _run(args: argparse.Namespace, settings: Settings) -> int:
    return asyncio.run(_recount(args.poll, settings))


async def _recount(poll: str, settings: Settings) -> int:
    from processor.influx.writers import make_writer
    from processor.store import connect

    target = settings.influx_target()
    if target is None:
        raise ConfigError("recount reads InfluxDB: set VOTEBOX_INFLUX_URL (and its friends)")
    redis = connect(settings.redis_target(), timeout_s=settings.redis_timeout_s)
    writer = make_writer(target)
    try:
        result = await recount(redis, writer, poll)
    finally:
        writer.close()
        await redis.aclose()
    print(result.report())
    return 0 if result.matches else 1
