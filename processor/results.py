"""Retained poll topics: ``polls/{poll}/results``, ``polls/{poll}/config`` and
``polls/{poll}/series`` (votes per minute over the last hour).

Rule: one results publish per poll per interval at most, and always the last; a config or
state change (announced by the CLI on Redis pub/sub, or reached by the clock) is published at
once; a deleted poll's retained topics are cleared.

Each publish re-reads the poll from Redis, and a restarted processor republishes every poll.
Otherwise only polls that changed are read: marked by commits, announced on pub/sub, or due by
the clock (a scheduled open or close, a new minute for a poll with votes in the last hour); a
poll nothing happens to costs nothing.

Several processors on one broker: one publishes at a time, the holder of the results lease (a
Redis key with its client id and a TTL, renewed as it publishes), so the version a dashboard
sees never goes back: MQTT keeps one connection's messages in order, not several's. The others
tell it on `RESULTS_CHANGED` which polls their commits changed. When the holder stops, it lets
go; when it dies, the lease expires and the next processor to look (every ``rescan_s``) takes
it and publishes every poll.

The lease is fenced where a message leaves: a holder that was paused (SIGSTOP, a stalled VM)
past its lease's time publishes nothing more until Redis gives it the lease again, and its
unacknowledged publishes are not re-sent after a reconnect (`may_publish`, asked by the MQTT
client before each send). The one pause no client can fence is between that last check and
the socket write; the version in every result lets a dashboard keep the newest.
"""

from __future__ import annotations

import asyncio
import heapq
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Final

from redis.asyncio import Redis

from processor.backoff import backoff_delays
from processor.errors import StoreUnavailable
from processor.keys import POLLS_CHANGED, RESULTS_CHANGED
from processor.metrics import Metrics
from processor.mqtt import Publish
from processor.poll import iso_time
from processor.poll_store import (
    SERIES_MINUTES,
    Snapshot,
    list_deleted,
    list_polls,
    note_states,
    read_series,
    read_snapshots,
)
from processor.store import redis_errors
from processor.topics import config_topic, results_topic, series_topic

__all__ = ["Lease", "ResultsPublisher"]

log = logging.getLogger(__name__)


# How long one wait for an announcement lasts before the listener looks again.
_LISTEN_WAIT_S: Final = 1.0
# A poll's series is published at most this often while votes flow (and at each rescan, so a
# quiet poll's hour moves on): a chart of minutes needs no more.
SERIES_EVERY_S: Final = 5.0

_HOLD: Final = """
local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""
_RELEASE: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass(frozen=True, slots=True)
class Lease:
    """The results lease: ``key`` (keys.results_lease), taken as ``holder`` for ``ttl_ms``."""

    key: str
    holder: str
    ttl_ms: int


class ResultsPublisher:
    """Publishes the retained results and config of polls marked as changed.

    Args:
        redis: where the tallies are.
        publish: sends one retained QoS 1 message, given topic and payload.
        interval_s: the coalescing interval of results.
        rescan_s: how often the lease is renewed, or taken when free (a rescan of every poll
            follows when it is taken, and after the announcements were not heard for a while).
        timeout_s: deadline of one Redis read.
        metrics: counts the publishes by poll, when given.
        pace: awaited between polls of a burst (every poll at a start or rescan), so that the
            broker takes them at its pace: amqtt reads our PUBACKs for votes only after it has
            handled what we sent before them, and gives up on a delivery after 5 s.
        lease: publish only while holding it (several processors on one broker); None:
            always publish.
    """

    def __init__(
        self,
        *,
        redis: Redis,
        publish: Publish,
        interval_s: float,
        rescan_s: float,
        timeout_s: float,
        metrics: Metrics | None = None,
        pace: Callable[[], Awaitable[None]] | None = None,
        lease: Lease | None = None,
    ) -> None:
        self._metrics = metrics
        self._lease = lease
        self._holding = lease is None
        self._renew_at = 0.0
        # Loop time until which the lease is surely ours: its TTL from before we asked.
        self._valid_until = 0.0
        self._pace = pace
        self._redis = redis
        self._publish = publish
        self._interval_s = interval_s
        self._rescan_s = rescan_s
        self._timeout_s = timeout_s
        self._dirty: set[str] = set()
        self._urgent: set[str] = set()
        self._published: dict[str, int] = {}
        self._config_sent: dict[str, bytes] = {}
        self._series_sent: dict[str, bytes] = {}
        self._series_due: dict[str, float] = {}
        # Polls whose results moved while their series was not due: published when it is.
        self._series_later: set[str] = set()
        self._cleared: set[str] = set()
        # The polls' next scheduled opens and closes: a heap of (ms, poll), and each poll's
        # current one (heap entries that differ from it are stale).
        self._schedule: list[tuple[int, str]] = []
        self._change_at: dict[str, int] = {}
        # Polls whose series holds a vote: their hour moves on every minute. The rest of the
        # polls cost nothing while nothing happens to them.
        self._series_live: set[str] = set()
        self._force_rescan = False
        self._wake = asyncio.Event()

    def mark(self, versions: dict[str, int]) -> None:
        """Note versions after a commit; changed polls are published within one interval."""
        for poll, version in versions.items():
            if self._published.get(poll) != version:
                self._dirty.add(poll)
        if self._dirty:
            self._wake.set()

    def changed(self, poll: str) -> None:
        """A poll's definition or state changed (or it was deleted): publish it now."""
        self._urgent.add(poll)
        self._wake.set()

    async def run(self) -> None:
        """Publish until cancelled: changed polls coalesced, announced changes at once, a poll
        at its scheduled open or close, and every poll at the start and at each rescan (the
        lease taken, the announcements heard again after a gap)."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._listen(), name="votebox.results.listen")
            await self._publish_loop()

    async def _publish_loop(self) -> None:
        loop = asyncio.get_running_loop()
        self._force_rescan = True  # every poll once, at the start
        next_lease = 0.0
        retry_rescan_at: float | None = None
        while True:
            if self._lease is not None and loop.time() >= next_lease:
                # Renewed while held (idle or not); taken when free: a holder that died is
                # replaced within its lease's time, and the new holder publishes every poll.
                try:
                    await self._hold()
                except StoreUnavailable as exc:
                    log.warning("results lease not renewed: %s", exc)
                next_lease = loop.time() + self._rescan_s
            if self._force_rescan and (retry_rescan_at is None or loop.time() >= retry_rescan_at):
                # Cleared first: a reason for another rescan that comes meanwhile stays.
                self._force_rescan = False
                try:
                    await self._rescan()
                    retry_rescan_at = None
                except StoreUnavailable as exc:
                    log.warning("results rescan postponed: %s", exc)
                    self._force_rescan = True
                    retry_rescan_at = loop.time() + self._rescan_s
            rescan_in = None
            if self._force_rescan:
                rescan_in = 0.0 if retry_rescan_at is None else retry_rescan_at - loop.time()
            await self._sleep_until_due(
                next_lease if self._lease is not None else None, rescan_in=rescan_in
            )
            try:
                if self._urgent:
                    urgent, self._urgent = self._urgent, set()
                    await self._publish_polls(urgent, deleted_too=True)
                await self.flush()
            except StoreUnavailable as exc:
                log.warning("results publish postponed: %s", exc)
                continue
            await asyncio.sleep(self._interval_s)

    async def _sleep_until_due(
        self, next_lease: float | None, *, rescan_in: float | None = None
    ) -> None:
        """Wait for a mark or an announcement, or until the clock makes something due: a
        scheduled open or close, a series whose time came, a new minute for the series of the
        polls that took votes in the last hour, the lease's renewal. Marks what came due."""
        loop = asyncio.get_running_loop()
        now_s = time.time()
        waits = [3600.0]
        if next_lease is not None:
            waits.append(next_lease - loop.time())
        if rescan_in is not None:
            waits.append(rescan_in)
        if self._schedule:
            waits.append(self._schedule[0][0] / 1000 - now_s + 0.001)
        if self._series_later:
            soonest = min(self._series_due.get(poll, 0.0) for poll in self._series_later)
            waits.append(soonest - loop.time())
        if self._series_live:
            waits.append(60.0 - now_s % 60.0 + 0.001)
        minute = int(now_s // 60)
        try:
            async with asyncio.timeout(max(0.0, min(waits))):
                await self._wake.wait()
        except TimeoutError:
            pass
        self._wake.clear()
        now_ms = int(time.time() * 1000)
        while self._schedule and self._schedule[0][0] <= now_ms:
            at_ms, poll = heapq.heappop(self._schedule)
            if self._change_at.get(poll) == at_ms:
                del self._change_at[poll]
                self._dirty.add(poll)  # it opens or closes now: publish its new state
        clock = loop.time()
        if now_ms // 60_000 > minute:
            # A new minute: the hour of every poll with votes in it moves on.
            for poll in self._series_live:
                self._series_due[poll] = clock
                self._series_later.add(poll)
        due = {p for p in self._series_later if clock >= self._series_due.get(p, 0.0)}
        if due:
            # The last votes' minute reaches the chart without waiting for the next vote.
            self._series_later -= due
            self._dirty |= due

    async def flush(self) -> None:
        """Publish every poll marked so far, now.

        Raises:
            StoreUnavailable: Redis could not be read; the polls stay marked.
        """
        if not self._dirty:
            return
        polls, self._dirty = self._dirty, set()
        try:
            await self._publish_polls(polls)
        except StoreUnavailable:
            self._dirty |= polls
            raise

    async def _listen(self) -> None:
        """Hear the CLI's announcements; reconnect with backoff, rescanning after a gap."""
        delays = backoff_delays(base_s=0.5, cap_s=10.0)
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                with redis_errors():
                    async with pubsub:
                        async with asyncio.timeout(self._timeout_s):
                            await pubsub.subscribe(POLLS_CHANGED, RESULTS_CHANGED)
                        delays = backoff_delays(base_s=0.5, cap_s=10.0)
                        # Anything announced while we were not listening: rescan everything.
                        self._force_rescan = True
                        self._wake.set()
                        while True:
                            # Never timeout=None: a task cancelled while it waits so can
                            # hang in "cancelling" for good (redis-py #2028, #2551).
                            message = await pubsub.get_message(timeout=_LISTEN_WAIT_S)
                            if message is not None:
                                self._heard(message["channel"], message["data"])
            except StoreUnavailable as exc:
                delay = next(delays)
                log.warning(
                    "poll change announcements unavailable (%s); retry in %.1fs", exc, delay
                )
                await asyncio.sleep(delay)

    def _heard(self, channel: bytes | str, data: bytes | str) -> None:
        text = data.decode() if isinstance(data, bytes) else str(data)
        name = channel.decode() if isinstance(channel, bytes) else channel
        if name == RESULTS_CHANGED:
            # Another processor's commits: worth a publish only here, at the lease holder.
            if self._holding:
                self._dirty.update(poll for poll in text.split(",") if poll)
                self._wake.set()
        else:
            self.changed(text)

    def may_publish(self) -> bool:
        """Whether a message may go out now: no lease, or ours and within its time. Asked
        before each publish and by the MQTT client before each (re)send of one."""
        if self._lease is None:
            return True
        return self._holding and asyncio.get_running_loop().time() < self._valid_until

    async def _keep_lease(self) -> bool:
        """Renew the lease when due, so that a long burst (every poll, at the broker's pace,
        can outlast the lease) renews as it goes; whether a message may go out now."""
        if self._lease is not None and asyncio.get_running_loop().time() >= self._renew_at:
            await self._hold()
        return self.may_publish()

    async def _hold(self) -> bool:
        """Take or renew the lease; whether we hold it. Gained: publish every poll afresh.

        Renewed once a third of its time has passed, not at every publish: a round trip per
        publish would buy nothing, since nobody else can take it before it expires."""
        if self._lease is None:
            return True
        asked = asyncio.get_running_loop().time()
        if self._holding and asked < self._renew_at:
            return True
        if self._holding and asked >= self._valid_until:
            # Paused past the lease: what we sent meanwhile was dropped (may_publish), so if
            # Redis gives it back, it is a new hold and every poll is published afresh.
            log.warning("results lease lapsed (this process was paused past its time)")
            self._holding = False
        with redis_errors():
            async with asyncio.timeout(self._timeout_s):
                held = bool(
                    await self._redis.eval(
                        _HOLD, 1, self._lease.key, self._lease.holder, self._lease.ttl_ms
                    )
                )
        if held and not self._holding:
            log.info("publishing the retained results (lease %s)", self._lease.key)
            self._published.clear()
            self._config_sent.clear()
            self._series_sent.clear()
            self._series_due.clear()
            self._force_rescan = True
        elif self._holding and not held:
            log.warning("another processor publishes the retained results now")
        self._holding = held
        # From before the ask: Redis counts its TTL from later, so this errs on the safe side.
        self._renew_at = asked + self._lease.ttl_ms / 3000
        self._valid_until = asked + self._lease.ttl_ms / 1000
        return held

    async def release(self) -> None:
        """Let go of the lease at a stop, so another processor publishes at once."""
        if self._lease is None or not self._holding:
            return
        with redis_errors():
            async with asyncio.timeout(self._timeout_s):
                await self._redis.eval(_RELEASE, 1, self._lease.key, self._lease.holder)
        self._holding = False

    async def _rescan(self) -> None:
        with redis_errors():
            async with asyncio.timeout(self._timeout_s):
                polls = await list_polls(self._redis)
        await self._publish_polls(polls, deleted_too=True, every=True)

    async def _publish_polls(
        self, polls: Iterable[str], *, deleted_too: bool = False, every: bool = False
    ) -> None:
        wanted = {poll for poll in polls if poll}
        if not await self._hold():
            if wanted and not deleted_too:
                # Our commits changed these: the holder publishes them.
                with redis_errors():
                    async with asyncio.timeout(self._timeout_s):
                        await self._redis.publish(RESULTS_CHANGED, ",".join(sorted(wanted)))
            return
        now_ms = int(time.time() * 1000)
        with redis_errors():
            async with asyncio.timeout(self._timeout_s):
                deleted = await list_deleted(self._redis) if deleted_too else []
                snapshots = await read_snapshots(self._redis, wanted, now_ms=now_ms)
                moved = {
                    poll: snap.results.state
                    for poll, snap in snapshots.items()
                    if snap.state_seen != snap.results.state
                }
                if moved:
                    await note_states(self._redis, moved, now_ms=now_ms)
                    snapshots |= await read_snapshots(self._redis, moved, now_ms=now_ms)
                clock = asyncio.get_running_loop().time()
                due = {
                    poll: snap.poll.shards
                    for poll, snap in snapshots.items()
                    if every or clock >= self._series_due.get(poll, 0.0)
                }
                series = await read_series(self._redis, due, now_ms=now_ms) if due else {}
        if not await self._keep_lease():
            # Paused past the lease while reading: all of it waits for the lease again.
            self._dirty |= wanted
            return
        for poll in deleted:
            if poll not in self._cleared and poll not in snapshots:
                self._clear(poll)
        self._series_later |= snapshots.keys() - series.keys()
        for poll, counts in series.items():
            self._series_due[poll] = clock + SERIES_EVERY_S
            self._series_later.discard(poll)
            if any(counts):
                self._series_live.add(poll)
            else:
                self._series_live.discard(poll)
            self._publish_series(poll, counts, now_ms)
        if every:
            self._schedule, self._change_at = [], {}
        for poll in wanted - snapshots.keys():
            self._change_at.pop(poll, None)  # deleted
            self._series_live.discard(poll)
        burst = list(snapshots.items())
        for i, (poll, snap) in enumerate(burst):
            if not await self._keep_lease():
                # Paused past the lease (in the pace below): the rest waits for it again.
                self._dirty.update(p for p, _ in burst[i:])
                break
            self._cleared.discard(poll)
            at_ms = snap.poll.next_change_ms(now_ms)
            if at_ms and self._change_at.get(poll) != at_ms:
                self._change_at[poll] = at_ms
                heapq.heappush(self._schedule, (at_ms, poll))
            elif not at_ms:
                self._change_at.pop(poll, None)
            self._publish_one(poll, snap, now_ms)
            if self._pace is not None:
                await self._pace()
        if len(self._schedule) > 2 * len(self._change_at) + 64:
            # Stale entries outnumber the live ones: rebuild, so the heap stays the polls' size.
            self._schedule = [(t, poll) for poll, t in self._change_at.items()]
            heapq.heapify(self._schedule)

    def _publish_one(self, poll: str, snap: Snapshot, now_ms: int) -> None:
        config = _json(snap.poll.config(now_ms))
        if self._config_sent.get(poll) != config:
            self._publish(config_topic(poll), config)
            self._config_sent[poll] = config
        if self._published.get(poll) != snap.results.version:
            self._publish(results_topic(poll), snap.results.to_json())
            self._published[poll] = snap.results.version
            if self._metrics is not None:
                self._metrics.results_published.labels(poll).inc()

    def _publish_series(self, poll: str, counts: list[int], now_ms: int) -> None:
        """docs/protocol.md, Votes per minute; sent only when it changed."""
        first_ms = (now_ms // 60_000 - SERIES_MINUTES + 1) * 60_000
        body = _json({"poll": poll, "every_s": 60, "start": iso_time(first_ms), "counts": counts})
        if self._series_sent.get(poll) != body:
            self._publish(series_topic(poll), body)
            self._series_sent[poll] = body

    def _clear(self, poll: str) -> None:
        # MQTT-3.3.1-10: a retained message with an empty payload removes the retained one.
        self._publish(results_topic(poll), b"")
        self._publish(config_topic(poll), b"")
        self._publish(series_topic(poll), b"")
        self._cleared.add(poll)
        self._published.pop(poll, None)
        self._config_sent.pop(poll, None)
        self._series_sent.pop(poll, None)
        self._series_due.pop(poll, None)
        self._series_later.discard(poll)
        log.info("poll %s was deleted: its retained topics are cleared", poll)


def _json(body: dict[str, object]) -> bytes:
    return json.dumps(body, separators=(",", ":"), sort_keys=True).encode()
