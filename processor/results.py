"""Retained live results. Rule: one publish per poll per interval at most, and always the last.

Each publish re-reads the poll from Redis, so whichever processor publishes last publishes the
newest state, and a restarted processor republishes every poll (its version never goes back).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

from redis.asyncio import Redis

from processor.errors import StoreUnavailable
from processor.metrics import Metrics
from processor.polls import list_polls, read_results
from processor.tally import redis_errors
from processor.topics import results_topic

__all__ = ["ResultsPublisher"]

log = logging.getLogger(__name__)

Publish = Callable[[str, bytes], None]


class ResultsPublisher:
    """Publishes ``polls/{poll}/results`` (retained) for polls marked as changed.

    Args:
        redis: where the tallies are.
        publish: sends one retained QoS 1 message, given topic and payload.
        interval_s: the coalescing interval.
        rescan_s: how often every poll is checked, to catch polls created or changed elsewhere.
        timeout_s: deadline of one Redis read.
        metrics: counts the publishes by poll, when given.
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
    ) -> None:
        self._metrics = metrics
        self._redis = redis
        self._publish = publish
        self._interval_s = interval_s
        self._rescan_s = rescan_s
        self._timeout_s = timeout_s
        self._dirty: set[str] = set()
        self._published: dict[str, int] = {}
        self._wake = asyncio.Event()

    def mark(self, versions: dict[str, int]) -> None:
        """Note versions after a commit; changed polls are published within one interval."""
        for poll, version in versions.items():
            if self._published.get(poll) != version:
                self._dirty.add(poll)
        if self._dirty:
            self._wake.set()

    async def run(self) -> None:
        """Publish changed polls, coalesced, until cancelled; rescan every poll now and then."""
        loop = asyncio.get_running_loop()
        next_rescan = 0.0
        while True:
            if loop.time() >= next_rescan:
                try:
                    await self._rescan()
                    next_rescan = loop.time() + self._rescan_s
                except StoreUnavailable as exc:
                    log.warning("results rescan skipped: %s", exc)
                    next_rescan = loop.time() + self._rescan_s
            try:
                async with asyncio.timeout(max(0.0, next_rescan - loop.time())):
                    await self._wake.wait()
            except TimeoutError:
                continue
            self._wake.clear()
            try:
                await self.flush()
            except StoreUnavailable as exc:
                log.warning("results publish postponed: %s", exc)
            await asyncio.sleep(self._interval_s)

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

    async def _rescan(self) -> None:
        with redis_errors():
            async with asyncio.timeout(self._timeout_s):
                polls = await list_polls(self._redis)
        await self._publish_polls(polls)

    async def _publish_polls(self, polls: Iterable[str]) -> None:
        with redis_errors():
            async with asyncio.timeout(self._timeout_s):
                snapshots = await read_results(self._redis, polls)
        for poll, results in snapshots.items():
            if self._published.get(poll) == results.version:
                continue
            self._publish(results_topic(poll), results.to_json())
            self._published[poll] = results.version
            if self._metrics is not None:
                self._metrics.results_published.labels(poll).inc()
