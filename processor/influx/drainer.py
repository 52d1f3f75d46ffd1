"""The outbox to InfluxDB. Rule: a point leaves the Redis queue only after InfluxDB accepted it,
or after InfluxDB refused it as bad and it was set aside with the reason.

The tally script queues each accepted vote in the poll's ``points`` stream in the same atomic
step that counts it. The drainer here reads those streams, writes line protocol in batches (off
the MQTT hot path), and deletes what landed.

Its work follows the points, not the polls: it reads only the streams the change feed
(processor/changes.py) said took points, until it finds them empty, and one write carries the
points of many polls (line protocol holds any number of series), as Telegraf's outputs send
``metric_batch_size`` points whatever series they belong to. Every `SWEEP_S` it also looks at
every poll's stream, for points whose announcement was lost.

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
from processor.changes import SWEEP_S, ChangeFeed
from processor.errors import InfluxRejected, InfluxUnavailable, StoreUnavailable
from processor.influx.line_protocol import QueuedPoint, counted_points, line_for, points_of_entry
from processor.influx.writers import PointWriter
from processor.keys import QUEUED_POINTS, PollKeys, shard_keys
from processor.metrics import Metrics
from processor.poll_store import list_polls, load_polls, shards_of
from processor.store import raise_if_away, redis_errors

__all__ = ["CLAIM_IDLE_MS", "GROUP", "InfluxDrainer"]

log = logging.getLogger(__name__)

# The consumer group of every points stream; each drainer is a consumer named for its processor.
GROUP: Final = "votebox-drainers"
# A point read and neither written nor set aside for this long is taken by another drainer. Far
# above a write's time (a batch of 5000 lands in well under a second), so taking over a live
# drainer's point is rare, and then harmless: the rewrite overwrites itself.
CLAIM_IDLE_MS: Final = 30_000
# Points in one queued entry before any was read: a commit's batch for one poll
# (VOTEBOX_BATCH_MAX's default). Then the drainer learns the size from what it reads: a batch
# spread over many polls leaves entries of a point or two in each poll's stream, and reading
# them two at a time took a cycle over every stream per two entries.
_POINTS_PER_ENTRY: Final = 500
# Entries read from one stream in a round: at least two (so that a stream with more says so),
# at most this many.
_ENTRIES_PER_READ_MAX: Final = 100
# Streams read in one round; the rest follow in the next rounds of the same cycle (a cycle
# visits every stream with points once, then waits for the flush interval unless some stream
# had more than one round's worth). Bounds a round's memory when thousands of polls have
# points queued at once: at most this many times two entries of one commit's batch each.
_STREAMS_PER_ROUND: Final = 250


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
        # The mean points per entry read lately: a round reads about batch_max points.
        self._entry_points = float(_POINTS_PER_ENTRY)
        self._more = False
        self._feed = ChangeFeed(redis)
        # Shards (keys.PollKeys.name) whose points stream may hold entries: announced in the
        # feed or found by a sweep, until a read finds the stream empty.
        self._due: set[str] = set()
        self._sweep_at = 0.0
        self._cycle: list[str] = []  # due shards not yet visited in this cycle
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
        """Write what is queued in the streams that took points (or every shard of the polls
        given), in writes of up to ``batch_max`` points whatever poll they belong to.

        Returns:
            How many points left the queues (landed, or refused and set aside).
        """
        with redis_errors():
            async with asyncio.timeout(self._redis_timeout_s):
                if polls is None:
                    await self._learn()
                    names = self._this_round()
                else:
                    shards = await shards_of(self._redis, polls)
                    names = [keys.name for poll in polls for keys in shard_keys(poll, shards[poll])]
                queues = await self._known([PollKeys.named(name) for name in names])
                await self._ensure_groups(queues)
                batches, empty = await self._read(queues)
        self._due.difference_update(empty)
        if not batches:
            return 0
        return await self._deliver(batches)

    async def _learn(self) -> None:
        """Add the shards the feed announced since the last round (all, at a sweep)."""
        changes = await self._feed.read()
        clock = asyncio.get_running_loop().time()
        if changes is None or clock >= self._sweep_at:
            self._due |= await self._sweep()
            self._sweep_at = clock + SWEEP_S
        if changes is not None:
            for poll in changes.polls:
                self._labels.pop(poll, None)  # made, changed or deleted: read its labels again
            self._due |= changes.shards

    async def _sweep(self) -> set[str]:
        """Every shard of every poll whose points stream holds entries."""
        polls = await list_polls(self._redis)
        shards = await shards_of(self._redis, polls)
        queues = [keys for poll in polls for keys in shard_keys(poll, shards[poll])]
        async with self._redis.pipeline(transaction=False) as pipe:
            for keys in queues:
                pipe.xlen(keys.points)
            lengths = await pipe.execute()
        return {keys.name for keys, n in zip(queues, lengths, strict=True) if n}

    def _this_round(self) -> list[str]:
        if not self._cycle:
            self._cycle = sorted(self._due)
        names, self._cycle = self._cycle[:_STREAMS_PER_ROUND], self._cycle[_STREAMS_PER_ROUND:]
        return names

    async def _known(self, queues: list[PollKeys]) -> list[PollKeys]:
        """The queues of polls that exist (their labels learnt); the others are forgotten, and
        nothing is created for them."""
        new = sorted({keys.poll for keys in queues} - self._labels.keys())
        if new:
            for poll, definition in (await load_polls(self._redis, new)).items():
                self._labels[poll] = definition.labels
        known = [keys for keys in queues if keys.poll in self._labels]
        self._due.difference_update(keys.name for keys in queues if keys.poll not in self._labels)
        return known

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

    async def _read(
        self, queues: Sequence[PollKeys]
    ) -> tuple[list[tuple[PollKeys, list[Any]]], set[str]]:
        """New points of each queue (and now and then points idle past their time), about
        ``batch_max`` in all; and the names of the queues found empty."""
        self._more = False
        if not queues:
            return [], set()
        claim = asyncio.get_running_loop().time() >= self._next_claim_s
        # About a write's worth of points over the streams read, by the entries' size of late.
        count = int(self._batch_max / (len(queues) * self._entry_points))
        count = min(_ENTRIES_PER_READ_MAX, max(2, count))
        async with self._redis.pipeline(transaction=False) as pipe:
            for keys in queues:
                points = keys.points
                pipe.xreadgroup(GROUP, self._consumer, {points: ">"}, count=count)
                if claim:
                    pipe.xautoclaim(points, GROUP, self._consumer, self._claim_idle_ms, count=count)
                # Empty now: a point queued later is announced later, so it is not missed.
                pipe.xlen(points)
            replies = await pipe.execute(raise_on_error=False)
        raise_if_away(replies)
        if claim:
            self._next_claim_s = asyncio.get_running_loop().time() + self._claim_idle_ms / 3000
        step = 3 if claim else 2
        self._more = bool(self._cycle)
        batches: list[tuple[PollKeys, list[Any]]] = []
        empty: set[str] = set()
        for i, keys in enumerate(queues):
            read, length = replies[i * step], replies[i * step + step - 1]
            if isinstance(read, Exception):
                # NOGROUP: the poll was deleted and made again since; its group next round.
                self._grouped.discard(keys.points)
                continue
            if length == 0:
                empty.add(keys.name)
            entries = [e for _, stream in (read or []) for e in stream]
            self._more = self._more or len(entries) >= count
            if claim and not isinstance(replies[i * step + 1], Exception):
                # [next id, claimed entries, ids deleted meanwhile]: only what still exists.
                entries += [e for e in replies[i * step + 1][1] if e[1] is not None]
            if entries:
                batches.append((keys, entries))
        read_entries = sum(len(entries) for _, entries in batches)
        if read_entries:
            read_points = sum(counted_points(f) for _, es in batches for _, f in es)
            mean = max(1.0, read_points / read_entries)
            self._entry_points = 0.5 * self._entry_points + 0.5 * mean
        return batches, empty

    async def queue_depth(self) -> int:
        """Points waiting in the queues that took points (every queue is one of them, or
        is found by the next sweep)."""
        names = sorted(self._due)
        with redis_errors():
            async with asyncio.timeout(self._redis_timeout_s):
                async with self._redis.pipeline(transaction=False) as pipe:
                    for name in names:
                        pipe.hget(PollKeys.named(name).tally, QUEUED_POINTS)
                    return sum(int(n or 0) for n in await pipe.execute())

    async def _deliver(self, batches: list[tuple[PollKeys, list[Any]]]) -> int:
        """Write the points of ``batches`` (each queue's entries) in writes of up to
        ``batch_max`` points, set the refused ones aside, take the entries off their queues."""
        lines: list[bytes] = []
        owned: list[tuple[int, QueuedPoint]] = []
        for i, (keys, entries) in enumerate(batches):
            labels = self._labels.get(keys.poll, ())
            n = len(labels)
            for sid, fields in entries:
                for p in points_of_entry(keys.poll, sid, fields):
                    lines.append(line_for(p, labels[p.option] if p.option < n else ""))
                    owned.append((i, p))
        refused: list[tuple[tuple[int, QueuedPoint], str]] = []
        for start in range(0, len(lines), self._batch_max):
            end = start + self._batch_max
            refused += await self._write_until_done(lines[start:end], owned[start:end])
        with redis_errors():
            async with asyncio.timeout(self._redis_timeout_s):
                async with self._redis.pipeline(transaction=False) as pipe:
                    for (i, point), reason in refused:
                        pipe.xadd(
                            batches[i][0].points_rejected,
                            {
                                "d": point.device,
                                "e": point.epoch,
                                "s": point.seq,
                                "o": point.option,
                                "t": point.ts_s,
                                "reason": reason[:300],
                            },
                        )
                    for keys, entries in batches:
                        ids = [(sid, counted_points(f)) for sid, f in entries]
                        pipe.xack(keys.points, GROUP, *(sid for sid, _ in ids))
                        # Deleted and uncounted together, and only what this call deleted: a
                        # drainer that took over an entry another one also settled counts it
                        # once.
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
        for (i, point), reason in refused[:1]:
            log.error(
                "InfluxDB refused %d points (of poll %s and others); set aside in each poll's "
                "points_rejected, such as %s: %s",
                len(refused),
                point.poll,
                batches[i][0].points_rejected,
                reason[:200],
            )
        return len(lines)

    async def _write_until_done(
        self, lines: list[bytes], owned: list[tuple[int, QueuedPoint]]
    ) -> list[tuple[tuple[int, QueuedPoint], str]]:
        """Write, retrying outages forever; split on 413, bisect a 400 down to the bad points.

        Returns the points refused as bad (as given in ``owned``), each with the reason.
        """
        delays = backoff_delays(base_s=0.5, cap_s=30.0)
        while True:
            try:
                await asyncio.to_thread(self._writer.write, lines)
                if self._metrics is not None:
                    self._metrics.influx_points_written.inc(len(lines))
                return []
            except InfluxRejected as exc:
                if exc.status == 413 and len(lines) > 1:
                    return await self._split(lines, owned)
                if exc.status == 400:
                    if len(lines) == 1:
                        return [(owned[0], exc.body)]
                    # Some points are bad, InfluxDB may have written the rest ("partial write");
                    # rewriting those is harmless (same series, same timestamp).
                    return await self._split(lines, owned)
                delay = exc.retry_after_s if exc.retry_after_s is not None else next(delays)
                await self._log_failure(f"HTTP {exc.status}: {exc.body[:200]}", delay)
                await asyncio.sleep(delay)
            except InfluxUnavailable as exc:
                delay = next(delays)
                await self._log_failure(str(exc), delay)
                await asyncio.sleep(delay)

    async def _split(
        self, lines: list[bytes], owned: list[tuple[int, QueuedPoint]]
    ) -> list[tuple[tuple[int, QueuedPoint], str]]:
        half = len(lines) // 2
        first = await self._write_until_done(lines[:half], owned[:half])
        return first + await self._write_until_done(lines[half:], owned[half:])

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
