"""The processor service: intake -> decode -> one Redis round trip -> acks -> results.

Rule: a batch is acknowledged to the broker only after its fates are committed to Redis; a
stop (SIGTERM) is honoured between batches, never inside one.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import itertools
import logging
import secrets
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, Final

from redis.asyncio import Redis

from processor.backoff import backoff_delays
from processor.codec import (
    AckEntry,
    Vote,
    encode_ack,
)
from processor.config import Settings
from processor.endpoint import serve_endpoint
from processor.errors import StoreUnavailable
from processor.health import Health
from processor.influx.drainer import InfluxDrainer
from processor.influx.writers import make_writer
from processor.keys import results_lease
from processor.logs import RejectionLog
from processor.metrics import Metrics
from processor.mqtt import Delivery, MqttIntake
from processor.ratelimit import DeviceRateLimiter
from processor.reasons import Fate, Reason
from processor.results import Lease, ResultsPublisher
from processor.sites import Sites
from processor.stats import StatsPublisher
from processor.store import connect, redis_errors
from processor.supervise import EXIT_FAILED, Watchdog, supervised
from processor.tally import CommitResult, Tally
from processor.topics import (
    DEVICES_FILTER,
    VOTES_FILTER,
    acks_topic,
    probe_topic,
    shared,
)
from processor.triage import triage

__all__ = ["BatchProcessor", "run", "tune_collector"]

log = logging.getLogger(__name__)

# How long a process whose part failed may take to end by itself (the watchdog ends it then).
FAILED_EXIT_S: Final = 5.0
# How fresh a device's last-seen time (votebox/stats, silent devices) is at worst.
LAST_SEEN_EVERY_S: Final = 10.0
_SEEN_MEMORY_MAX: Final = 200_000
# The cyclic collector's first threshold: container objects allocated, net, between two young
# collections (CPython's default is 700). See tune_collector.
GC_YOUNG_THRESHOLD: Final = 20_000


def tune_collector() -> None:
    """Make the cyclic garbage collector fit a processor, once, before its loop starts.

    Every message builds a few short-lived tuples that reference counting frees, so with
    CPython's default thresholds the collector ran about 1,500 times per 200,000 messages and
    its full collections traversed the whole heap each time: 15-22% of the processor's CPU,
    and pauses of about 40 ms (docs/benchmarks.md). Freezing what start-up built (modules,
    clients) keeps it out of every later collection, and a higher first threshold lets
    reference counting do what it does anyway. Cycles are still collected, just in larger
    sweeps. A process-wide setting: the CLI calls it, not `run`, which tests also call
    in-process.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 20, 20)


class BatchProcessor:
    """Turns one batch of deliveries into committed fates, acks and marked results.

    Args:
        tally: the Redis tally.
        intake: acknowledges deliveries and publishes acks.
        results: told which polls changed.
        stop: set when the service should stop; an outage retry gives up then.
        metrics: counted once per batch.
        health: told when a batch is done, so that /readyz can tell a stalled intake.
        drainer: told how many points were queued for InfluxDB, when it is on.
        limiter: refuses a device's messages beyond its rate, before decoding them.
        sites: each device's site, stored with its votes' points.
    """

    def __init__(
        self,
        *,
        tally: Tally,
        intake: MqttIntake,
        results: ResultsPublisher,
        stop: asyncio.Event,
        metrics: Metrics,
        health: Health | None = None,
        drainer: InfluxDrainer | None = None,
        limiter: DeviceRateLimiter | None = None,
        sites: Sites | None = None,
    ) -> None:
        self._sites = sites
        self._limiter = limiter
        self._drainer = drainer
        self._metrics = metrics
        self._health = health
        self._tally = tally
        self._intake = intake
        self._results = results
        self._stop = stop
        self._rejections = RejectionLog(log)
        self._seen_written: dict[str, float] = {}
        # Names each batch for Redis, the same for all of its retries (Tally.commit).
        self._token_prefix = secrets.token_hex(6)
        self._batches = itertools.count()

    async def process(self, batch: list[Delivery], *, after: Awaitable[bool] | None = None) -> bool:
        """Commit, ack to devices, settle with the broker, mark results. Retries Redis outages.

        When a stop is requested during an outage the batch is left un-acked: the broker
        redelivers it to the next processor.

        Args:
            batch: the deliveries.
            after: the previous batch's processing, when it is still under way: this batch
                commits meanwhile, but is acknowledged only after that one was
                (MQTT-4.6.0-2: PUBACKs in the order of the PUBLISHes), and not at all if
                that one was not.

        Returns:
            Whether the batch was acknowledged.
        """
        limiter = self._limiter
        t = triage(batch, allow=limiter.allow if limiter is not None else None)
        for rejection in t.rejections:
            error = rejection.error
            self._rejections.rejected(error.reason.code, rejection.device, error.detail)
        votes, acks, reports = t.votes, t.acks, t.reports

        started = time.monotonic()
        result = await self._commit_until_done(
            votes,
            t.unattributed,
            self._due_seen(t.seen),
            reports.latest(now_ms=int(time.time() * 1000)),
        )
        acked_before = await after if after is not None else True
        if result is None or not acked_before:
            return False
        codes, versions, receipts = result.codes, result.versions, result.receipts
        committed_s, now_s = time.monotonic(), time.time()
        for (device, slot), vote, code in zip(t.slots, votes, codes, strict=True):
            # Every field in order, without the generated __new__ (see codec.Vote).
            acks[device][slot] = tuple.__new__(AckEntry, (vote.epoch, vote.seq, code, None))
            if code >= 16:
                self._rejections.rejected(Reason(code).code, device, f"poll {vote.poll}")
        for index, receipt in receipts.items():
            device, slot = t.slots[index]
            acks[device][slot] = acks[device][slot]._replace(receipt=receipt)

        for device, entries in acks.items():
            # QoS 0: a lost ack costs the device one re-send, answered "duplicate"
            # (docs/protocol.md, Acks); QoS 1 would double the broker's and our packet count.
            self._intake.publish(acks_topic(device), encode_ack(entries), qos=0)
        self._intake.settle(batch)
        self._results.mark(versions)
        if self._drainer is not None:
            self._drainer.notify(codes.count(int(Fate.ACCEPTED)))

        m = self._metrics
        m.messages.inc(len(batch) - reports.count)
        # Vote messages only: device reports are few, and ride in the same round trip.
        for (kind, outcome), n in reports.outcomes.items():
            m.device_reports.labels(kind, outcome).inc(n)
        m.batch_size.observe(len(batch) - reports.count)
        m.acks.inc(len(acks))
        fates = Counter(codes)
        fates.update({int(reason): n for reason, n in t.unattributed.items()})
        m.count_codes(fates)
        if votes:
            m.commit_seconds.observe(committed_s - started)
        # Loop time and time.monotonic() are the same clock (asyncio's default loop).
        m.receive_to_commit_seconds.observe(max(0.0, committed_s - batch[0].received_s))
        stamps = Counter(vote.ts_s for vote in votes if vote.ts_s is not None)
        if stamps:
            m.observe_ages(now_s, stamps)
        if self._health is not None:
            self._health.progressed()
        return True

    def _due_seen(self, seen: set[str]) -> set[str]:
        """The devices whose last-seen time is due for a write: each at most every
        `LAST_SEEN_EVERY_S`. Writing all of them every batch cost a quarter of the throughput
        (redis-py packs two arguments per device; docs/benchmarks.md)."""
        now = time.monotonic()
        if len(self._seen_written) > _SEEN_MEMORY_MAX:
            self._seen_written.clear()  # a flood of device names must not grow us without bound
        due = {
            d
            for d in seen
            if now - self._seen_written.get(d, -LAST_SEEN_EVERY_S) >= LAST_SEEN_EVERY_S
        }
        for device in due:
            self._seen_written[device] = now
        return due

    async def _commit_until_done(
        self,
        votes: list[Vote],
        unattributed: Counter[Reason],
        seen: set[str],
        reports: dict[str, dict[str, str]],
    ) -> CommitResult | None:
        if not votes and not unattributed and not seen and not reports:
            return CommitResult([], {})
        delays = backoff_delays(base_s=0.1, cap_s=5.0)
        token = f"{self._token_prefix}{next(self._batches):x}"
        while True:
            try:
                result = await self._tally.commit(
                    votes,
                    now_ms=int(time.time() * 1000),
                    unattributed=unattributed,
                    seen=seen,
                    reports=reports,
                    token=token,
                    sites=self._sites.current if self._sites is not None else None,
                )
                if self._health is not None:
                    self._health.store_answered()
                return result
            except StoreUnavailable as exc:
                self._metrics.commit_failures.inc()
                if self._health is not None:
                    self._health.store_failed(str(exc))
                if self._stop.is_set():
                    log.warning("stopping in a Redis outage: %d votes left un-acked", len(votes))
                    return None
                delay = next(delays)
                log.warning(
                    "commit of %d votes failed, %d deliveries held, none acked; retry in %.1fs: %s",
                    len(votes),
                    self._intake.held,
                    delay,
                    exc,
                )
                try:
                    async with asyncio.timeout(delay):
                        await self._stop.wait()
                except TimeoutError:
                    pass


async def consume_votes(
    intake: MqttIntake,
    processor: BatchProcessor,
    stop: asyncio.Event,
    *,
    batch_max: int,
    in_flight: int = 2,
) -> None:
    """Take batches and process them until ``stop`` is set; the batches in hand are finished.

    Up to ``in_flight`` batches at once: batch n+1 is decoded and sent to Redis while batch n's
    commit is on its way, so neither the processor nor Redis waits on the other's round trip.
    Each is still acknowledged only after its own commit, and in order (`BatchProcessor`).
    """

    async def interrupt_on_stop() -> None:
        await stop.wait()
        intake.interrupt()

    async with asyncio.TaskGroup() as tg:
        # One watcher for the whole run, not one per batch: waiting is on the hot path.
        watcher = tg.create_task(interrupt_on_stop(), name="votebox.stop_watch")
        flying: collections.deque[asyncio.Task[bool]] = collections.deque()
        while not stop.is_set():
            batch = await intake.next_batch(batch_max)
            if batch:
                log.debug("batch of %d deliveries (%d held)", len(batch), intake.held)
                previous = flying[-1] if flying else None
                flying.append(
                    tg.create_task(processor.process(batch, after=previous), name="votebox.batch")
                )
            while flying and (flying[0].done() or len(flying) >= in_flight):
                await flying.popleft()
        watcher.cancel()


async def drain_votes(
    intake: MqttIntake,
    processor: BatchProcessor,
    *,
    batch_max: int,
    quiet_s: float,
    deadline_s: float,
) -> None:
    """After a stop: commit and ack what was received and what is still arriving, until the
    intake is quiet for ``quiet_s`` or ``deadline_s`` has passed.

    A broker that does not resend un-acked messages to a resumed session (amqtt, #401) loses
    whatever it had in flight when we disconnect; draining first makes a planned stop lossless
    whenever the devices pause for a moment, and bounded when they do not.
    """
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    while (remaining := end - loop.time()) > 0:
        try:
            async with asyncio.timeout(min(quiet_s, remaining)):
                batch = await intake.next_batch(batch_max)
        except TimeoutError:
            return
        if batch:  # empty once, when the stop interrupted the wait
            await processor.process(batch)
    if intake.held:
        log.warning("stopping with %d deliveries un-acked; the broker keeps them", intake.held)


async def _wait_for_redis(
    tally: Tally, redis: Redis, stop: asyncio.Event, *, timeout_s: float
) -> bool:
    for delay in backoff_delays(base_s=0.2, cap_s=5.0):
        try:
            await tally.load()
            if redis is not tally.redis:
                # A cluster client learns the slots at its first command: before its readers
                # (pub/sub needs them) start.
                with redis_errors():
                    async with asyncio.timeout(timeout_s):
                        await redis.ping()
            return True
        except StoreUnavailable as exc:
            log.warning("waiting for Redis: %s", exc)
        try:
            async with asyncio.timeout(delay):
                await stop.wait()
                return False
        except TimeoutError:
            pass
    raise AssertionError("unreachable")  # pragma: no cover


async def run(settings: Settings, *, stop: asyncio.Event | None = None) -> None:
    """Run the processor until SIGINT/SIGTERM (or ``stop`` is set).

    Args:
        settings: the configuration.
        stop: an event that stops the service, for callers that run it in-process.

    Raises:
        BrokerUnavailable: the first connection to the broker failed.
        ConfigError: the metrics port cannot be bound.
    """
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    watchdog = Watchdog()
    # The drain and the final flush each get half of shutdown_timeout_s; closing the
    # connections a moment more. Past that the watchdog ends the process from its thread.
    stop_deadline_s = settings.shutdown_timeout_s + 3.0

    def on_signal(sig: signal.Signals) -> None:
        log.info("%s: stopping within %.0f s", sig.name, stop_deadline_s)
        stop.set()
        watchdog.arm(stop_deadline_s, sig.name)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)

    def failed(part: str, exc: BaseException) -> None:
        log.critical(
            "%s failed: %r; the processor exits (%d) for its supervisor to restart it",
            part,
            exc,
            EXIT_FAILED,
            exc_info=exc,
        )
        stop.set()
        watchdog.arm(FAILED_EXIT_S, f"{part} failed")

    try:
        await _run(settings, stop, failed)
    finally:
        watchdog.disarm()


async def _run(
    settings: Settings, stop: asyncio.Event, failed: Callable[[str, BaseException], None]
) -> None:
    loop = asyncio.get_running_loop()
    log.info("starting with %r", settings)
    target = settings.influx_target()
    if target is None:
        log.info("InfluxDB not configured (VOTEBOX_INFLUX_URL unset): tallying in Redis only")
    # A commit retried on a fresh connection is answered as its first try (Tally.commit).
    redis = connect(settings.redis_target(), timeout_s=settings.redis_timeout_s, retry_once=True)
    # On a cluster, WAIT on a primary covers only its own connection's writes: the commits get
    # a client of their own with one connection per node (store.wait_for_replicas).
    commits = (
        connect(settings.redis_target(), timeout_s=settings.redis_timeout_s, single_connection=True)
        if settings.redis_cluster and settings.redis_replicas
        else redis
    )
    writer = make_writer(target) if target else None
    metrics = Metrics()
    started = loop.time()
    # Set once connected; the endpoint answers (not ready) before that.
    live: list[MqttIntake] = []

    def about_me() -> dict[str, Any]:
        intake = live[0] if live else None
        return {
            "client_id": settings.mqtt_client_id,
            "uptime_s": round(loop.time() - started, 1),
            "held": intake.held if intake else 0,
            "connected": bool(intake and intake.connected),
        }

    health = Health(
        connected=lambda: bool(live and live[0].connected),
        held=lambda: live[0].held if live else 0,
        ping_redis=redis.ping,
        stall_s=settings.stall_s,
        facts=lambda: {**about_me(), "votes": metrics.fates()},
        clock=loop.time,
    )
    metrics.watch(metrics.intake_held, lambda: live[0].held if live else 0)
    metrics.watch(metrics.intake_stalled, lambda: float(health.stalled()))
    metrics.watch(metrics.mqtt_connected, lambda: float(bool(live and live[0].connected)))
    metrics.watch(metrics.up_seconds, lambda: loop.time() - started)
    try:
        tally = Tally(
            commits,
            timeout_s=settings.redis_timeout_s,
            points_max=settings.influx_queue_max if target else 0,
            clock_skew_s=settings.clock_skew_s,
            replicas=settings.redis_replicas,
            replica_timeout_ms=settings.redis_replica_timeout_ms,
        )
        drainer = (
            InfluxDrainer(
                redis=redis,
                writer=writer,
                batch_max=settings.influx_batch_max,
                flush_interval_s=settings.influx_flush_s,
                redis_timeout_s=settings.redis_timeout_s,
                metrics=metrics,
                consumer=settings.mqtt_client_id,
            )
            if writer
            else None
        )
        async with serve_endpoint(
            host=settings.metrics_host, port=settings.metrics_port, metrics=metrics, health=health
        ):
            if not await _wait_for_redis(tally, redis, stop, timeout_s=settings.redis_timeout_s):
                return
            async with MqttIntake(
                settings=settings,
                topic_filters=[
                    shared(VOTES_FILTER, settings.mqtt_share_group),
                    shared(DEVICES_FILTER, settings.mqtt_share_group),
                ],
                on_connect=lambda n: metrics.mqtt_reconnects.inc() if n > 1 else None,
                on_refused=lambda _topic, code: metrics.mqtt_publishes_refused.labels(
                    f"0x{code:02x}"
                ).inc(),
                on_takeover=metrics.mqtt_takeovers.inc,
                failed=failed,
                probe_topic=probe_topic(settings.mqtt_client_id),
            ) as intake:
                live.append(intake)
                await _serve(
                    settings, intake, redis, tally, drainer, metrics, health, stop, about_me, failed
                )
    finally:
        if writer is not None:
            writer.close()
        if commits is not redis:
            await commits.aclose()
        await redis.aclose()


async def _serve(
    settings: Settings,
    intake: MqttIntake,
    redis: Redis,
    tally: Tally,
    drainer: InfluxDrainer | None,
    metrics: Metrics,
    health: Health,
    stop: asyncio.Event,
    about_me: Callable[[], dict[str, Any]],
    failed: Callable[[str, BaseException], None],
) -> None:
    broken: list[str] = []  # the parts that failed

    def part_failed(part: str, exc: BaseException) -> None:
        broken.append(part)
        failed(part, exc)

    def publish_retained(topic: str, payload: bytes) -> None:
        intake.publish(topic, payload, qos=1, retain=True)

    def publish_results(topic: str, payload: bytes) -> None:
        # Fenced: not sent, nor re-sent after a reconnect, once the lease may have lapsed.
        intake.publish(topic, payload, qos=1, retain=True, fence=results.may_publish)

    results = ResultsPublisher(
        redis=redis,
        publish=publish_results,
        interval_s=settings.results_interval_s,
        rescan_s=settings.polls_rescan_s,
        timeout_s=settings.redis_timeout_s,
        metrics=metrics,
        pace=lambda: intake.wait_unacked_below(min(100, intake.send_quota), timeout_s=5.0),
        # One publisher of retained results per broker; lost within seconds if it dies.
        lease=Lease(
            key=results_lease(f"{settings.mqtt_url.host}:{settings.mqtt_url.port}"),
            holder=settings.mqtt_client_id,
            ttl_ms=max(5000, int(3000 * settings.polls_rescan_s)),
        ),
    )
    stats = StatsPublisher(
        redis=redis,
        publish=publish_retained,
        metrics=metrics,
        interval_s=settings.stats_interval_s,
        silent_after_s=settings.silent_after_s,
        timeout_s=settings.redis_timeout_s,
        about_me=about_me,
    )
    sites = Sites(redis, timeout_s=settings.redis_timeout_s)
    try:
        await sites.load()  # before the first vote: its point carries its site
    except StoreUnavailable as exc:
        log.warning("device sites not read yet (Redis unavailable): %s", exc)
    processor = BatchProcessor(
        sites=sites,
        tally=tally,
        intake=intake,
        results=results,
        stop=stop,
        metrics=metrics,
        health=health,
        drainer=drainer,
        limiter=DeviceRateLimiter(
            rate_per_s=settings.device_rate, burst=settings.device_burst, clock=time.monotonic
        ),
    )
    log.info("ready: consuming %s", shared(VOTES_FILTER, settings.mqtt_share_group))
    parts = {
        "votebox.results": results.run(),
        "votebox.stats": stats.run(),
        "votebox.sites": sites.run(),
    }
    if drainer is not None:
        log.info("writing every vote to %r", settings.influx_target())
        # Points still queued at a stop stay in Redis and are written by the next start.
        parts["votebox.influx"] = drainer.run()
    async with asyncio.TaskGroup() as tg:
        # Each part retries its own dependency outages; anything else ends the process.
        background = [
            tg.create_task(supervised(name, part, failed=part_failed), name=name)
            for name, part in parts.items()
        ]
        await supervised(
            "votebox.consume",
            consume_votes(
                intake,
                processor,
                stop,
                batch_max=settings.batch_max,
                # A cluster's commits WAITing on one connection per node go one at a time.
                in_flight=1 if tally.redis is not redis else 2,
            ),
            failed=part_failed,
        )
        log.info("stopping: draining what the broker has sent")
        await drain_votes(
            intake,
            processor,
            batch_max=settings.batch_max,
            quiet_s=0.25,
            deadline_s=settings.shutdown_timeout_s / 2,
        )
        for task in background:
            task.cancel()
    # Shutdown gets its own deadline: the final results and the acks already queued. After a
    # part failed, no final results or stats: the next start publishes every poll anyway, and
    # the failure's exit is due within FAILED_EXIT_S, before a flush of many polls could end.
    try:
        async with asyncio.timeout(settings.shutdown_timeout_s / 2):
            if not broken:
                await results.flush()
            await results.release()
            if not broken:
                await stats.publish_once()
            await intake.drain()
    except (TimeoutError, StoreUnavailable) as exc:
        log.warning("shutdown flush incomplete: %r", exc)
    log.info(
        "stopped after %d messages: %s",
        int(metrics.value("votebox_messages_total")),
        metrics.fates(),
    )
