"""Every accepted vote as a point in InfluxDB. Rule: a point leaves the Redis queue only after
InfluxDB accepted it, or after InfluxDB refused it as bad and it was set aside with the reason.

The tally script queues each accepted vote in the poll's ``points`` stream in the same atomic
step that counts it. The drainer here reads those streams, writes line protocol in batches (off
the MQTT hot path), and deletes what landed. A point's series and timestamp are fixed when it is
queued, so a write retried after a crash overwrites itself instead of adding a second point.

Several processors share the work through one Redis consumer group per stream (`GROUP`): each
point goes to one drainer, and a point a drainer read but never settled (it died, or hangs) is
claimed by another once it has been idle for `CLAIM_IDLE_MS`.

Two APIs: InfluxDB 1.x ``/write`` (database, retention policy, user, password), and InfluxDB
2.x/3.x or 1.8+ through influxdb-client (token, org, bucket). Both are blocking HTTP clients;
they run in a worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import logging
import urllib.parse
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final, NamedTuple, Protocol

import urllib3
from redis.asyncio import Redis

from processor.backoff import backoff_delays
from processor.config import InfluxTarget
from processor.errors import InfluxRejected, InfluxUnavailable, StoreUnavailable
from processor.keys import QUEUED_POINTS, PollKeys, shard_keys
from processor.metrics import Metrics
from processor.poll_store import list_polls, load_poll, point_queues, shards_of
from processor.store import raise_if_away, redis_errors

__all__ = [
    "CLAIM_IDLE_MS",
    "EXPORT_BUCKETS",
    "EXPORT_BY",
    "EXPORT_TAGS",
    "ExportRow",
    "GROUP",
    "InfluxDrainer",
    "PointWriter",
    "QueuedPoint",
    "count_votes",
    "counted_points",
    "line_for",
    "make_writer",
    "points_of_entry",
]

log = logging.getLogger(__name__)

MEASUREMENT: Final = "vote"
# A point's timestamp is the vote's second plus its seq in the nanoseconds, so two votes of one
# device in one second (same series) never share a timestamp and never overwrite each other.
_NS: Final = 1_000_000_000
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


class QueuedPoint(NamedTuple):
    """One entry of a poll's points stream (written by tally.lua). A NamedTuple: one is built
    per vote (see codec.Vote)."""

    stream_id: str
    poll: str
    device: str
    epoch: int
    seq: int
    option: int
    ts_s: int
    source: str
    # A voter changed their vote: this point takes the old one back (value -1).
    withdrawn: bool = False
    # The device's site when the vote was counted ("" for none): fixed with the point, so a
    # point written twice is the same point.
    site: str = ""


def points_of_entry(
    poll: str, stream_id: bytes | str, fields: Mapping[bytes, bytes]
) -> list[QueuedPoint]:
    """The points of one entry of a poll's stream, as tally.lua queues them: ``n`` points in
    ``p``, one per line, "device, epoch, seq, option, ts, source, withdrawn, site"
    tab-separated; or, as queued before 2026-12-03, one point with a field each."""
    sid = stream_id.decode() if isinstance(stream_id, bytes) else stream_id
    packed = fields.get(b"p")
    if packed is None:
        return [
            QueuedPoint(
                sid,
                poll,
                fields[b"d"].decode(),
                int(fields[b"e"]),
                int(fields[b"s"]),
                int(fields[b"o"]),
                int(fields[b"t"]),
                fields[b"src"].decode(),
                fields.get(b"w") == b"1",
            )
        ]
    out = []
    for line in packed.decode().split("\n"):
        # device, epoch, seq, option, ts, source, withdrawn, and the site from 2026-12-03
        device, epoch, seq, option, ts, source, withdrawn, *site = line.split("\t")
        # Every field in order, without the generated __new__ (see codec.Vote).
        point = (sid, poll, device, int(epoch), int(seq), int(option), int(ts), source,
                 withdrawn == "1", site[0] if site else "")  # fmt: skip
        out.append(tuple.__new__(QueuedPoint, point))
    return out


def counted_points(fields: Mapping[bytes, bytes]) -> int:
    """How many of the tally's ``queued_points`` an entry holds (entries queued before they
    were counted hold none)."""
    return int(fields.get(b"n", 0))


@functools.lru_cache(maxsize=4096)  # labels and sites: a few per poll, one per point
def _escape_tag(value: str) -> str:
    # Line protocol: commas, equals signs and spaces in tag values are escaped with a backslash.
    return value.replace("\\", "\\\\").replace(",", r"\,").replace("=", r"\=").replace(" ", r"\ ")


def line_for(point: QueuedPoint, label: str) -> bytes:
    """The line protocol of one vote (docs/analytics.md, Schema); tags in key order."""
    _, poll, device, epoch, seq, option, ts_s, source, withdrawn, site = point  # one unpacking
    tags = (
        f"device={device},label={_escape_tag(label) or '-'},option={option},"
        f"poll={poll},site={_escape_tag(site) or '-'}"
    )
    value = 1
    if withdrawn:
        # Its own series (tag withdrawn=1), so it never overwrites a vote's point.
        tags, value = tags + ",withdrawn=1", -1
    fields = f'value={value}i,seq={seq}i,epoch={epoch}i,ts_source="{source}"'
    timestamp = ts_s * _NS + seq % _NS
    return f"{MEASUREMENT},{tags} {fields} {timestamp}".encode()


class PointWriter(Protocol):
    """Writes line protocol; blocking (run it in a thread)."""

    def write(self, lines: Sequence[bytes]) -> None:
        """Raises InfluxRejected (4xx, 5xx with a status) or InfluxUnavailable (no answer)."""

    def query_sums(self, poll: str, by: str, since_ns: int, until_ns: int) -> list[ExportRow]:
        """``poll``'s votes (sums of point values) per option and per ``by`` (`EXPORT_BY`),
        dated from ``since_ns`` (inclusive) to ``until_ns`` (exclusive)."""

    def close(self) -> None: ...


# What `votebox export --by` groups votes by, besides the option: a tag of the points, or a
# time bucket (its duration in InfluxQL and in Flux).
EXPORT_TAGS: Final = ("site", "device")
EXPORT_BUCKETS: Final = {"minute": "1m", "hour": "1h"}
EXPORT_BY: Final = ("option", *EXPORT_TAGS, *EXPORT_BUCKETS)


class ExportRow(NamedTuple):
    """One row of ``votebox export``: the votes for one option in one group."""

    group: str  # the site, the device, the bucket's start (RFC 3339), or "" by option
    option: int
    label: str
    votes: int


def _retry_after(headers: Mapping[str, str] | None) -> float | None:
    if not headers:
        return None
    value = headers.get("Retry-After") or headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


class V1Writer:
    """InfluxDB 1.x: ``POST /write?db=&rp=&precision=ns`` and ``/query`` (InfluxQL)."""

    def __init__(self, target: InfluxTarget, *, timeout_s: float) -> None:
        self._target = target
        self._http = urllib3.PoolManager(
            timeout=urllib3.Timeout(total=timeout_s), retries=False, maxsize=2
        )
        self._headers: dict[str, str] = {"Content-Type": "text/plain; charset=utf-8"}
        if target.username:
            token = base64.b64encode(f"{target.username}:{target.password or ''}".encode())
            self._headers["Authorization"] = f"Basic {token.decode()}"
        self._database_ready = False

    def _request(
        self, method: str, path: str, params: dict[str, str], body: bytes | None = None
    ) -> Any:
        url = f"{self._target.url.rstrip('/')}{path}?{urllib.parse.urlencode(params)}"
        try:
            return self._http.request(method, url, body=body, headers=self._headers)
        except urllib3.exceptions.HTTPError as exc:
            raise InfluxUnavailable(f"InfluxDB at {self._target.url}: {exc}") from exc

    def _ensure_database(self) -> None:
        # Idempotent in InfluxQL; needs admin rights, so a refusal is only logged.
        reply = self._request("POST", "/query", {"q": f'CREATE DATABASE "{self._target.database}"'})
        if reply.status >= 300:
            log.warning(
                "could not create InfluxDB database %s: %s", self._target.database, reply.data[:200]
            )
        self._database_ready = True

    def write(self, lines: Sequence[bytes]) -> None:
        if not self._database_ready:
            self._ensure_database()
        params = {"db": self._target.database, "precision": "ns"}
        if self._target.retention_policy:
            params["rp"] = self._target.retention_policy
        reply = self._request("POST", "/write", params, b"\n".join(lines))
        if reply.status != 204:
            raise InfluxRejected(
                reply.status,
                reply.data.decode(errors="replace")[:500],
                retry_after_s=_retry_after(reply.headers),
            )

    def _query(self, query: str) -> list[Any]:
        """The series of one InfluxQL statement's result, times in ns."""
        params = {"db": self._target.database, "q": query, "epoch": "ns"}
        reply = self._request("GET", "/query", params)
        if reply.status != 200:
            raise InfluxRejected(reply.status, reply.data.decode(errors="replace")[:500])
        result = reply.json()["results"][0]
        if "error" in result:
            raise InfluxRejected(400, result["error"])
        return list(result.get("series", []))

    def query_sums(self, poll: str, by: str, since_ns: int, until_ns: int) -> list[ExportRow]:
        group = ['"option"', '"label"']
        if by in EXPORT_BUCKETS:
            group.append(f"time({EXPORT_BUCKETS[by]}) fill(none)")
        elif by in EXPORT_TAGS:
            group.append(f'"{by}"')
        query = (
            f'SELECT sum("value") FROM "{MEASUREMENT}" WHERE "poll" = \'{poll}\' '
            f"AND time >= {since_ns} AND time < {until_ns} GROUP BY {', '.join(group)}"
        )
        rows = []
        for series in self._query(query):
            tags = series["tags"]
            for when, total in series["values"]:
                if by in EXPORT_BUCKETS:
                    key = _rfc3339(int(when))
                else:
                    key = tags.get(by, "") if by in EXPORT_TAGS else ""
                rows.append(ExportRow(key, int(tags["option"]), tags["label"], int(total)))
        return rows

    def close(self) -> None:
        self._http.clear()


class V2Writer:
    """InfluxDB 2.x/3.x and 1.8+: influxdb-client's synchronous write API (its batching writer
    loses buffered points on close or crash; our queue in Redis is the buffer instead)."""

    def __init__(self, target: InfluxTarget, *, timeout_s: float) -> None:
        from influxdb_client.client.influxdb_client import InfluxDBClient
        from influxdb_client.client.write_api import SYNCHRONOUS

        assert target.token and target.org and target.bucket  # InfluxTarget checks it
        self._target = target
        self._org, self._bucket = target.org, target.bucket
        self._client = InfluxDBClient(
            url=target.url, token=target.token, org=target.org, timeout=int(timeout_s * 1000)
        )
        self._write_api = self._client.write_api(write_options=SYNCHRONOUS)

    def write(self, lines: Sequence[bytes]) -> None:
        from influxdb_client.domain.write_precision import WritePrecision
        from influxdb_client.rest import ApiException
        from urllib3.exceptions import HTTPError

        try:
            self._write_api.write(
                bucket=self._bucket,
                org=self._org,
                record=b"\n".join(lines),
                write_precision=WritePrecision.NS,  # type: ignore[arg-type]  # a str constant
            )
        except ApiException as exc:
            raise InfluxRejected(
                int(exc.status or 0), str(exc.body)[:500], retry_after_s=_retry_after(exc.headers)
            ) from exc
        except HTTPError as exc:
            raise InfluxUnavailable(f"InfluxDB at {self._target.url}: {exc}") from exc

    def query_sums(self, poll: str, by: str, since_ns: int, until_ns: int) -> list[ExportRow]:
        # Not run by the tests here: there is no InfluxDB 2 to run it on (docs/analytics.md).
        flux = (
            f'from(bucket: "{self._target.bucket}") '
            f"|> range(start: time(v: {since_ns}), stop: time(v: {until_ns})) "
            f'|> filter(fn: (r) => r._measurement == "{MEASUREMENT}" and r.poll == "{poll}" '
            'and r._field == "value") '
        )
        if by in EXPORT_BUCKETS:
            flux += (
                '|> group(columns: ["option", "label"]) '
                f"|> aggregateWindow(every: {EXPORT_BUCKETS[by]}, fn: sum, createEmpty: false)"
            )
        else:
            tag = (by,) if by in EXPORT_TAGS else ()
            columns = ", ".join(f'"{c}"' for c in ("option", "label", *tag))
            flux += f"|> group(columns: [{columns}]) |> sum()"
        rows = []
        for table in self._client.query_api().query(flux, org=self._org):
            for record in table.records:
                values = record.values
                if by in EXPORT_BUCKETS:
                    key = _rfc3339(int(values["_time"].timestamp() * 1_000_000_000))
                else:
                    key = str(values.get(by, "")) if by in EXPORT_TAGS else ""
                total = int(record.get_value())  # type: ignore[no-untyped-call]
                rows.append(ExportRow(key, int(values["option"]), str(values["label"]), total))
        return rows

    def close(self) -> None:
        self._client.close()  # type: ignore[no-untyped-call]


def _rfc3339(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1_000_000_000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def make_writer(target: InfluxTarget, *, timeout_s: float = 10.0) -> PointWriter:
    """The writer for the target's API."""
    return (
        V1Writer(target, timeout_s=timeout_s)
        if target.api == "v1"
        else V2Writer(target, timeout_s=timeout_s)
    )


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
