"""The outbox to InfluxDB. Rule: a point leaves the Redis queue only after InfluxDB accepted it,
or after InfluxDB refused it as bad and it was set aside with the reason.

The tally script queues each accepted vote in the poll's ``points`` stream in the same atomic
step that counts it. The drainer here reads those streams, writes line protocol in batches (off
the MQTT hot path), and deletes what landed.

Several processors share the work through one Redis consumer group per stream (`GROUP`): each
point goes to one drainer, and a point a drainer read but never settled (it died, or hangs) is
claimed by another once it has been idle for `CLAIM_IDLE_MS`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any, Final

from redis.asyncio import Redis

from processor.backoff import backoff_delays
from processor.errors import InfluxRejected, InfluxUnavailable, StoreUnavailable
from processor.influx.line_protocol import QueuedPoint, counted_points, line_for, points_of_entry
from processor.influx.writers import PointWriter
from processor.keys import QUEUED_POINTS, PollKeys, shard_keys
from processor.metrics import Metrics
from processor.poll_store import list_polls, load_poll, point_queues, shards_of
from processor.store import raise_if_away, redis_errors

__all__ = ["CLAIM_IDLE_MS", "GROUP", "InfluxDrainer"]

log = logging.getLogger(__name__)

# The consumer group of every points stream; each drainer is a consumer named for its processor.
GROUP: Final = "votebox-drainers"
# A point read and neither written nor set aside for this long is taken by another drainer. Far
# above a write's time (a batch of 5000 lands in well under a second), so taking over a live
# drainer's point is rare, and then harmless: the rewrite overwrites itself.
CLAIM_IDLE_MS: Final = 30_000
# Points in one queued entry, about: a commit's batch for one poll (VOTEBOX_BATCH_MAX's default).
# Entries are read batch_max // this at a time, so a write holds about batch_max points; a
# read that came back full is followed by the next at once, so small entries do not slow it.
_POINTS_PER_ENTRY: Final = 500


# KEYS[1] a poll's points stream, KEYS[2] its tally; ARGV[1] the tally's field counting queued
# points (keys.QUEUED_POINTS), then entry id, points it holds, ...
_SETTLE: Final = """
local n = 0
for i = 2, #ARGV, 2 do
  if redis.call('XDEL', KEYS[1], ARGV[i]) == 1 then n = n + tonumber(ARGV[i + 1]) end
end
if n > 0 then redis.call('HINCRBY', KEYS[2], ARGV[1], -n) end
return n
"""


class InfluxDrainer:
    """Moves queued points from Redis to InfluxDB, in batches, until cancelled.

    Args:
        redis: where the queues are.
        writer: the InfluxDB client.
        batch_max: points per write at most.
        flush_interval_s: a point waits at most about this long when votes trickle in.
        redis_timeout_s: deadline of one Redis call.
        metrics: counts points written and refused, and failed writes, when given.
        consumer: this drainer's name in the consumer groups: the processor's client id, the
            same across its restarts.
        claim_idle_ms: a point read by a drainer and not settled this long is taken over.
    """

    def __init__(
        self,
        *,
        redis: Redis,
        writer: PointWriter,
        batch_max: int,
        flush_interval_s: float,
        redis_timeout_s: float,
        metrics: Metrics | None = None,
        consumer: str = "votebox-processor",
        claim_idle_ms: int = CLAIM_IDLE_MS,
    ) -> None:
        self._metrics = metrics
        self._consumer = consumer
        self._claim_idle_ms = claim_idle_ms
        self._grouped: set[str] = set()
        self._next_claim_s = 0.0
        self._redis = redis
        self._writer = writer
        self._batch_max = batch_max
        self._flush_interval_s = flush_interval_s
        self._redis_timeout_s = redis_timeout_s
        self._wake = asyncio.Event()
        self._pending_hint = 0
        self._labels: dict[str, tuple[str, ...]] = {}
        self._entries_max = max(1, batch_max // _POINTS_PER_ENTRY)
        self._more = False
        self.set_aside = 0
        self.failures = 0

    def notify(self, queued: int) -> None:
        """Tell the drainer that a commit queued ``queued`` points; a full batch wakes it."""
        self._pending_hint += queued
        if self._pending_hint >= self._batch_max:
            self._wake.set()

    async def run(self) -> None:
        """Drain forever: a batch whenever one is full, or every flush interval."""
        while True:
            try:
                moved = await self.drain_once()
            except StoreUnavailable as exc:
                log.warning("points drain paused, Redis unavailable: %s", exc)
                moved = 0
            if moved < self._batch_max and not self._more:
                try:
                    async with asyncio.timeout(self._flush_interval_s):
                        await self._wake.wait()
                except TimeoutError:
                    pass
            self._wake.clear()
            self._pending_hint = 0

    async def drain_once(self, polls: Sequence[str] | None = None) -> int:
        """Write one batch from every poll (or those given) that has queued points.

        Returns:
            How many points left the queues (landed, or refused and set aside).
        """
        with redis_errors():
            async with asyncio.timeout(self._redis_timeout_s):
                queues = await self._queues(polls)
                await self._ensure_groups(queues)
                batches = await self._read(queues)
        moved = 0
        for keys, entries in batches:
            points = [p for sid, f in entries for p in points_of_entry(keys.poll, sid, f)]
            ids = [(sid, counted_points(f)) for sid, f in entries]
            moved += await self._deliver(keys, points, ids)
        return moved

    async def _queues(self, polls: Sequence[str] | None) -> list[PollKeys]:
        """The keys of every shard of every poll (or of those given): one queue each."""
        if polls is None:
            polls = await list_polls(self._redis)
        shards = await shards_of(self._redis, polls)
        return [keys for poll in polls for keys in shard_keys(poll, shards[poll])]

    async def _ensure_groups(self, queues: Sequence[PollKeys]) -> None:
        new = [keys for keys in queues if keys.points not in self._grouped]
        if not new:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for keys in new:
                # From id 0: points queued before any drainer had a group are drained too.
                pipe.xgroup_create(keys.points, GROUP, id="0", mkstream=True)
            replies = await pipe.execute(raise_on_error=False)
        raise_if_away(replies)
        for keys, reply in zip(new, replies, strict=True):
            if isinstance(reply, Exception) and not str(reply).startswith("BUSYGROUP"):
                raise reply
            self._grouped.add(keys.points)

    async def _read(self, queues: Sequence[PollKeys]) -> list[tuple[PollKeys, list[Any]]]:
        """Up to a batch per queue: new points, and now and then points idle past their time."""
        claim = asyncio.get_running_loop().time() >= self._next_claim_s
        async with self._redis.pipeline(transaction=False) as pipe:
            for keys in queues:
                points = keys.points
                pipe.xreadgroup(GROUP, self._consumer, {points: ">"}, count=self._entries_max)
                if claim:
                    pipe.xautoclaim(
                        points, GROUP, self._consumer, self._claim_idle_ms, count=self._entries_max
                    )
            replies = await pipe.execute(raise_on_error=False)
        raise_if_away(replies)
        if claim:
            self._next_claim_s = asyncio.get_running_loop().time() + self._claim_idle_ms / 3000
        step = 2 if claim else 1
        self._more = False
        batches: list[tuple[PollKeys, list[Any]]] = []
        for i, keys in enumerate(queues):
            read = replies[i * step]
            if isinstance(read, Exception):
                # NOGROUP: the poll was deleted and made again since; its group next round.
                self._grouped.discard(keys.points)
                continue
            entries = [e for _, stream in (read or []) for e in stream]
            self._more = self._more or len(entries) >= self._entries_max
            if claim and not isinstance(replies[i * step + 1], Exception):
                # [next id, claimed entries, ids deleted meanwhile]: only what still exists.
                entries += [e for e in replies[i * step + 1][1] if e[1] is not None]
            if entries:
                batches.append((keys, entries))
        return batches

    async def queue_depth(self) -> int:
        """Points waiting in all polls' queues."""
        with redis_errors():
            async with asyncio.timeout(self._redis_timeout_s):
                polls = await list_polls(self._redis)
                queues = await point_queues(self._redis, await shards_of(self._redis, polls))
                return sum(queue.queued for queue in queues.values())

    async def _labels_of(self, poll: str) -> tuple[str, ...]:
        if poll not in self._labels:
            definition = await load_poll(self._redis, poll)
            self._labels[poll] = definition.labels if definition else ()
        return self._labels[poll]

    async def _deliver(
        self, keys: PollKeys, points: list[QueuedPoint], ids: list[tuple[bytes, int]]
    ) -> int:
        """Write ``points`` (from the entries ``ids``: id, and how many of the tally's
        queued_points it holds), set the refused ones aside, take the entries off the queue."""
        labels = await self._labels_of(keys.poll)
        n = len(labels)
        lines = [line_for(p, labels[p.option] if p.option < n else "") for p in points]
        landed, refused = await self._write_until_done(lines, points)
        with redis_errors():
            async with asyncio.timeout(self._redis_timeout_s):
                async with self._redis.pipeline(transaction=False) as pipe:
                    for point, reason in refused:
                        pipe.xadd(
                            keys.points_rejected,
                            {
                                "d": point.device,
                                "e": point.epoch,
                                "s": point.seq,
                                "o": point.option,
                                "t": point.ts_s,
                                "reason": reason[:300],
                            },
                        )
                    pipe.xack(keys.points, GROUP, *(sid for sid, _ in ids))
                    # Deleted and uncounted together, and only what this call deleted: a
                    # drainer that took over an entry another one also settled counts it once.
                    pipe.eval(
                        _SETTLE,
                        2,
                        keys.points,
                        keys.tally,
                        QUEUED_POINTS,
                        *(x for entry in ids for x in entry),
                    )
                    await pipe.execute()
        self.set_aside += len(refused)
        if self._metrics is not None:
            self._metrics.influx_points_refused.inc(len(refused))
        if refused:
            log.error(
                "InfluxDB refused %d points of poll %s; set aside in %s: %s",
                len(refused),
                keys.poll,
                keys.points_rejected,
                refused[0][1][:200],
            )
        return len(points)

    async def _write_until_done(
        self, lines: list[bytes], points: list[QueuedPoint]
    ) -> tuple[int, list[tuple[QueuedPoint, str]]]:
        """Write, retrying outages forever; split on 413, bisect a 400 down to the bad points.

        Returns the number of points that landed and the (point, reason) pairs refused as bad.
        """
        delays = backoff_delays(base_s=0.5, cap_s=30.0)
        while True:
            try:
                await asyncio.to_thread(self._writer.write, lines)
                if self._metrics is not None:
                    self._metrics.influx_points_written.inc(len(lines))
                return len(lines), []
            except InfluxRejected as exc:
                if exc.status == 413 and len(lines) > 1:
                    return await self._split(lines, points)
                if exc.status == 400:
                    if len(lines) == 1:
                        return 0, [(points[0], exc.body)]
                    # Some points are bad, InfluxDB may have written the rest ("partial write");
                    # rewriting those is harmless (same series, same timestamp).
                    return await self._split(lines, points)
                delay = exc.retry_after_s if exc.retry_after_s is not None else next(delays)
                await self._log_failure(f"HTTP {exc.status}: {exc.body[:200]}", delay)
                await asyncio.sleep(delay)
            except InfluxUnavailable as exc:
                delay = next(delays)
                await self._log_failure(str(exc), delay)
                await asyncio.sleep(delay)

    async def _split(
        self, lines: list[bytes], points: list[QueuedPoint]
    ) -> tuple[int, list[tuple[QueuedPoint, str]]]:
        half = len(lines) // 2
        first = await self._write_until_done(lines[:half], points[:half])
        second = await self._write_until_done(lines[half:], points[half:])
        return first[0] + second[0], first[1] + second[1]

    async def _log_failure(self, why: str, delay: float) -> None:
        self.failures += 1
        if self._metrics is not None:
            self._metrics.influx_write_failures.inc()
        try:
            depth: int | str = await self.queue_depth()
        except StoreUnavailable:
            depth = "?"
        log.warning(
            "InfluxDB write failed (%s); %s points stay queued in Redis; retry in %.1fs",
            why,
            depth,
            delay,
        )
