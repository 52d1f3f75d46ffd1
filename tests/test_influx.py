"""Every vote in InfluxDB: the schema, the durable queue, outages, bad points, both APIs.

InfluxDB 1.6.7 (Debian's) is the real server here; the v2 API is checked against the request
its documentation specifies, served by a small HTTP server that answers as InfluxDB 2 does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar, cast

import pytest
from redis.asyncio import Redis

from harness.services import HOST, ManagedProcess, influxdb
from processor.codec import Vote
from processor.commands.recount import recount
from processor.config import InfluxTarget
from processor.influx.drainer import GROUP, InfluxDrainer
from processor.influx.line_protocol import QueuedPoint, line_for, points_of_entry
from processor.influx.writers import ExportRow, PointWriter, make_writer
from processor.keys import PollKeys
from processor.poll import Poll, PollType
from processor.poll_store import create_poll
from processor.tally import Tally
from tests.conftest import eventually, unique_id
from tests.fleet import Fleet

NOW_S = 1_767_225_600  # 2026-01-01T00:00:00Z


async def xrange(redis: Redis, key: str) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """XRANGE, typed as it answers without decode_responses."""
    return cast(list[tuple[bytes, dict[bytes, bytes]]], await redis.xrange(key))


def v1_target(influx: ManagedProcess, database: str) -> InfluxTarget:
    return InfluxTarget(url=influx.url, api="v1", database=database)


def influx_query(influx: ManagedProcess, database: str, q: str) -> list[Any]:
    params = urllib.parse.urlencode({"db": database, "q": q})
    with urllib.request.urlopen(f"{influx.url}/query?{params}", timeout=10) as reply:
        result = json.load(reply)["results"][0]
    return list(result.get("series", []))


def point_count(influx: ManagedProcess, database: str, poll: str) -> int:
    series = influx_query(influx, database, f"SELECT count(value) FROM vote WHERE poll='{poll}'")
    return int(series[0]["values"][0][1]) if series else 0


def test_line_protocol_of_a_vote() -> None:
    point = QueuedPoint("1-0", "final", "kiosk-7", 0, 17, 2, NOW_S, "device")
    assert line_for(point, "Ada, the Countess=1") == (
        b"vote,device=kiosk-7,label=Ada\\,\\ the\\ Countess\\=1,option=2,poll=final,site=- "
        b'value=1i,seq=17i,epoch=0i,ts_source="device" 1767225600000000017'
    )
    at_site = point._replace(site="North stand")
    assert line_for(at_site, "Ada").split(b" value=")[0] == (
        b"vote,device=kiosk-7,label=Ada,option=2,poll=final,site=North\\ stand"
    )


def test_two_votes_of_one_device_in_one_second_get_distinct_timestamps() -> None:
    a = line_for(QueuedPoint("1-0", "p", "k", 0, 17, 1, NOW_S, "device"), "x")
    b = line_for(QueuedPoint("1-1", "p", "k", 0, 18, 1, NOW_S, "device"), "x")
    assert a.split()[-1] != b.split()[-1]


def test_the_same_seq_second_and_option_in_two_epochs_are_two_points(
    influx_proc: ManagedProcess, request: pytest.FixtureRequest
) -> None:
    """A button reset (a new epoch, seqs from 0 again) and pressed at once: its vote must not
    overwrite the one of the epoch before, in InfluxDB's eyes the same series and time."""
    database = unique_id(request)
    writer = make_writer(v1_target(influx_proc, database))
    try:
        writer.write(
            [
                line_for(QueuedPoint(f"1-{e}", "p", "k", e, 0, 1, NOW_S, "device"), "x")
                for e in (0, 1, 2)
            ]
        )
    finally:
        writer.close()
    [series] = influx_query(influx_proc, database, 'SELECT sum("value") FROM "vote"')
    assert series["values"][0][1] == 3


async def test_points_are_queued_in_the_same_step_with_a_plausible_timestamp(
    redis: Redis, poll: Poll
) -> None:
    tally = Tally(redis, timeout_s=5, points_max=100, clock_skew_s=300)
    now_ms = int(time.time() * 1000)
    now_s = now_ms // 1000
    votes = [
        Vote(poll.id, "k1", 0, 1, ts_s=now_s - 60),  # plausible: kept
        Vote(poll.id, "k1", 1, 2, ts_s=now_s + 3600),  # an hour ahead: server time
        Vote(poll.id, "k1", 2, 3, ts_s=0),  # 1970: server time
        Vote(poll.id, "k1", 2, 4),  # no device time: server time
        Vote(poll.id, "k1", 2, 4, ts_s=now_s),  # a duplicate: no second point
    ]
    await tally.commit(votes, now_ms=now_ms)
    entries = await xrange(redis, PollKeys(poll.id).points)
    points = [p for sid, f in entries for p in points_of_entry(poll.id, sid, f)]
    got = [(p.seq, p.ts_s, p.source) for p in points]
    assert got == [
        (1, now_s - 60, "device"),
        (2, now_s, "server"),
        (3, now_s, "server"),
        (4, now_s, "server"),
    ]


async def test_a_full_queue_counts_the_vote_and_the_dropped_point(redis: Redis, poll: Poll) -> None:
    tally = Tally(redis, timeout_s=5, points_max=2)
    result = await tally.commit([Vote(poll.id, "k", 0, s) for s in (1, 2, 3)], now_ms=NOW_S * 1000)
    assert result.codes == [0, 0, 0]
    keys = PollKeys(poll.id)
    [(sid, fields)] = await xrange(redis, keys.points)  # one entry per batch
    assert [p.seq for p in points_of_entry(poll.id, sid, fields)] == [1, 2]
    assert await redis.hget(keys.tally, "queued_points") == b"2"
    assert await redis.hget(keys.fates, "point_dropped") == b"1"
    # The next batch finds the queue full too, until the drainer takes points off.
    await tally.commit([Vote(poll.id, "k", 0, 4)], now_ms=NOW_S * 1000)
    assert await redis.hget(keys.fates, "point_dropped") == b"2"


async def test_without_influxdb_nothing_is_queued(redis: Redis, poll: Poll) -> None:
    await Tally(redis, timeout_s=5).commit([Vote(poll.id, "k", 0, 1)], now_ms=NOW_S * 1000)
    assert await redis.xlen(PollKeys(poll.id).points) == 0


@contextlib.contextmanager
def _writer(target: InfluxTarget) -> Iterator[PointWriter]:
    writer = make_writer(target)
    try:
        yield writer
    finally:
        writer.close()


@contextlib.contextmanager
def _drainer(redis: Redis, target: InfluxTarget) -> Iterator[InfluxDrainer]:
    with _writer(target) as writer:
        yield InfluxDrainer(
            redis=redis, writer=writer, batch_max=5000, flush_interval_s=0.1, redis_timeout_s=5
        )


async def test_a_rewrite_after_a_crash_overwrites_instead_of_duplicating(
    redis: Redis, poll: Poll, influx_proc: ManagedProcess, request: pytest.FixtureRequest
) -> None:
    database = unique_id(request)
    await Tally(redis, timeout_s=5, points_max=100).commit(
        [Vote(poll.id, "k", s % 3, s, ts_s=int(time.time())) for s in range(1, 11)],
        now_ms=int(time.time() * 1000),
    )
    keys = PollKeys(poll.id)
    snapshot = await xrange(redis, keys.points)
    with _drainer(redis, v1_target(influx_proc, database)) as drainer:
        assert await drainer.drain_once([poll.id]) == 10
        # As if the processor died after InfluxDB accepted the batch, before XDEL: queued again.
        for _, fields in snapshot:
            await redis.xadd(keys.points, cast(Any, fields))
        assert await drainer.drain_once([poll.id]) == 10
    assert point_count(influx_proc, database, poll.id) == 10
    assert await redis.xlen(keys.points) == 0


async def test_a_bad_point_is_set_aside_and_the_rest_land(
    redis: Redis, poll: Poll, influx_proc: ManagedProcess, request: pytest.FixtureRequest
) -> None:
    database = unique_id(request)
    keys = PollKeys(poll.id)
    good = [f"k\t0\t{seq}\t1\t{NOW_S}\tdevice\t" for seq in range(1, 10)]
    # A timestamp past the year 2262 is beyond InfluxDB's range: it answers 400 for this point.
    await _queue(redis, keys, good[:5])
    await _queue(redis, keys, [*good[5:], f"k\t0\t99\t1\t{10**12}\tdevice\t"])
    with _drainer(redis, v1_target(influx_proc, database)) as drainer:
        assert await drainer.drain_once([poll.id]) == 10
    assert point_count(influx_proc, database, poll.id) == 9
    refused = await xrange(redis, keys.points_rejected)
    assert len(refused) == 1 and refused[0][1][b"s"] == b"99"
    assert b"value out of range" in refused[0][1][b"reason"]
    assert drainer.set_aside == 1 and await redis.xlen(keys.points) == 0
    assert await redis.hget(keys.tally, "queued_points") == b"0"


async def queued_points(redis: Redis, poll_id: str) -> int:
    """Points a poll (of one shard) has queued for InfluxDB (tally.lua counts them)."""
    return int(await redis.hget(PollKeys(poll_id).tally, "queued_points") or 0)


async def _queue(redis: Redis, keys: PollKeys, points: list[str]) -> None:
    """Queue points as tally.lua does: one entry, its points one per line, counted."""
    await redis.xadd(keys.points, {"n": len(points), "p": "\n".join(points)})
    await redis.hincrby(keys.tally, "queued_points", len(points))


@pytest.fixture(scope="module")
def tiny_influx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedProcess]:
    """An InfluxDB that refuses request bodies over 2,000 bytes (HTTP 413)."""
    with influxdb(tmp_path_factory.mktemp("tiny-influx"), max_body_size=2000) as proc:
        yield proc


async def test_a_batch_too_large_is_split_until_it_fits(
    redis: Redis, poll: Poll, tiny_influx: ManagedProcess
) -> None:
    keys = PollKeys(poll.id)
    # ~130 bytes a line: 13 KB in one write
    await _queue(redis, keys, [f"k\t0\t{seq}\t0\t{NOW_S}\tdevice\t" for seq in range(1, 101)])
    with _drainer(redis, v1_target(tiny_influx, "tiny")) as drainer:
        assert await drainer.drain_once([poll.id]) == 100
    assert point_count(tiny_influx, "tiny", poll.id) == 100
    assert drainer.set_aside == 0


class _InfluxV2(BaseHTTPRequestHandler):
    """Answers /api/v2/write as InfluxDB 2 documents it: 429 with Retry-After first, then 204."""

    requests: ClassVar[list[dict[str, Any]]] = []
    throttle: ClassVar[int] = 1

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        url = urllib.parse.urlsplit(self.path)
        type(self).requests.append(
            {
                "path": url.path,
                "query": urllib.parse.parse_qs(url.query),
                "headers": dict(self.headers),
                "body": body,
            }
        )
        if type(self).throttle > 0:
            type(self).throttle -= 1
            self.send_response(429)
            self.send_header("Retry-After", "1")
            self.send_header("Content-Type", "application/json")
            body = b'{"code":"too many requests","message":"slow down"}'
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


async def test_v2_writes_the_documented_request_and_honours_retry_after(
    redis: Redis, poll: Poll
) -> None:
    server = ThreadingHTTPServer((HOST, 0), _InfluxV2)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        keys = PollKeys(poll.id)
        await redis.xadd(
            keys.points, {"d": "k", "e": 0, "s": 5, "o": 2, "t": NOW_S, "src": "device"}
        )
        target = InfluxTarget(
            url=f"http://{HOST}:{server.server_address[1]}",
            api="v2",
            token="s3cret",
            org="stadium",
            bucket="votes",
        )
        started = time.monotonic()
        with _drainer(redis, target) as drainer:
            assert await drainer.drain_once([poll.id]) == 1
        assert time.monotonic() - started >= 0.9  # waited as Retry-After said
    finally:
        server.shutdown()
        server.server_close()
    first, second = _InfluxV2.requests
    assert first["body"] == second["body"]  # the same write, retried
    assert second["path"] == "/api/v2/write"
    assert second["query"] == {"org": ["stadium"], "bucket": ["votes"], "precision": ["ns"]}
    assert second["headers"]["Authorization"] == "Token s3cret"
    assert second["headers"]["Content-Type"].startswith("text/plain")
    assert second["body"] == line_for(
        QueuedPoint("", poll.id, "k", 0, 5, 2, NOW_S, "device"), "blue"
    )
    assert drainer.failures == 1 and await redis.xlen(keys.points) == 0


def influx_env(influx_proc: ManagedProcess, database: str) -> dict[str, str]:
    """Settings for a processor writing to InfluxDB 1.x."""
    return {
        "VOTEBOX_INFLUX_URL": influx_proc.url,
        "VOTEBOX_INFLUX_API": "v1",
        "VOTEBOX_INFLUX_DB": database,
        "VOTEBOX_INFLUX_FLUSH_S": "0.2",
    }


async def test_five_thousand_votes_through_an_influxdb_outage_land_once_and_recount_matches(
    mosquitto_proc: ManagedProcess,
    influx_proc: ManagedProcess,
    poll: Poll,
    redis: Redis,
    request: pytest.FixtureRequest,
    spawn_processor: Callable[..., ManagedProcess],
) -> None:
    database = unique_id(request)
    proc = spawn_processor(
        mosquitto_proc, **influx_env(influx_proc, database), VOTEBOX_INFLUX_BATCH_MAX="700"
    )
    with Fleet(mosquitto_proc, poll.id, 10) as fleet:

        def send(n: int) -> None:
            fleet.cast(poll.id, n, lambda i: i % 3)

        await asyncio.to_thread(send, 1500)
        await eventually(lambda: point_count(influx_proc, database, poll.id) == 1500, timeout_s=60)
        influx_proc.stop()
        await asyncio.to_thread(send, 2000)  # counted, acked, queued: InfluxDB is away
        await eventually(lambda: fleet.unacked() == 0, timeout_s=60)
        assert await queued_points(redis, poll.id) == 2000
        influx_proc.start()
        await asyncio.to_thread(send, 1500)
        await eventually(lambda: point_count(influx_proc, database, poll.id) >= 5000, timeout_s=90)
    assert point_count(influx_proc, database, poll.id) == 5000
    per_option = influx_query(
        influx_proc,
        database,
        f"SELECT count(value) FROM vote WHERE poll='{poll.id}' GROUP BY option",
    )
    assert {s["tags"]["option"]: s["values"][0][1] for s in per_option} == {
        "0": 1667,
        "1": 1667,
        "2": 1666,
    }
    assert "points stay queued in Redis" in proc.log_text()
    with _writer(v1_target(influx_proc, database)) as writer:
        result = await recount(redis, writer, poll.id)
    assert result.matches and result.influx == (1667, 1667, 1666)


async def test_sigkill_with_points_queued_loses_none(
    mosquitto_proc: ManagedProcess,
    influx_proc: ManagedProcess,
    poll: Poll,
    redis: Redis,
    request: pytest.FixtureRequest,
    spawn_processor: Callable[..., ManagedProcess],
) -> None:
    database = unique_id(request)
    proc = spawn_processor(mosquitto_proc, **influx_env(influx_proc, database))
    with Fleet(mosquitto_proc, poll.id, 5) as fleet:
        influx_proc.stop()
        await asyncio.to_thread(lambda: [fleet.kiosks[i % 5].vote(poll.id, 1) for i in range(500)])
        await eventually(lambda: fleet.unacked() == 0, timeout_s=60)
    assert await queued_points(redis, poll.id) == 500
    proc.kill()
    influx_proc.start()
    proc.start()
    await eventually(lambda: point_count(influx_proc, database, poll.id) >= 500, timeout_s=60)
    assert point_count(influx_proc, database, poll.id) == 500
    with _writer(v1_target(influx_proc, database)) as writer:
        result = await recount(redis, writer, poll.id)
    assert result.matches, result.report()


def _doc_queries() -> list[str]:
    """The InfluxQL examples of docs/analytics.md, one statement each."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "analytics.md").read_text()
    block = text.split("```sql\n", 1)[1].split("```", 1)[0]
    statements: list[str] = []
    current: list[str] = []
    for line in block.splitlines():
        if line.startswith("--"):
            if current:
                statements.append(" ".join(current))
            current = []
        else:
            current.append(line.strip())
    statements.append(" ".join(current))
    return statements


async def test_the_documented_influxql_examples_run_on_real_data(
    redis: Redis, poll: Poll, influx_proc: ManagedProcess, request: pytest.FixtureRequest
) -> None:
    database = unique_id(request)
    now = int(time.time())
    votes = [Vote(poll.id, f"k{s % 4}", s % 3, s, ts_s=now - s) for s in range(1, 31)]
    sites = {"k0": "North stand", "k1": "North stand", "k2": "South"}  # k3 has none
    await Tally(redis, timeout_s=5, points_max=100).commit(votes, now_ms=now * 1000, sites=sites)
    with _drainer(redis, v1_target(influx_proc, database)) as drainer:
        assert await drainer.drain_once([poll.id]) == 30
    queries = _doc_queries()
    assert len(queries) == 7
    per_option, per_hour, per_device, turnout, undated, per_site, site_results = (
        influx_query(influx_proc, database, q.replace("'final'", f"'{poll.id}'")) for q in queries
    )
    three_tens = {"red": 10, "green": 10, "blue": 10}
    assert {s["tags"]["label"]: s["values"][0][1] for s in per_option} == three_tens
    assert {s["tags"]["label"]: sum(v[1] for v in s["values"]) for s in per_hour} == three_tens
    assert {s["tags"]["device"]: s["values"][0][1] for s in per_device} == {
        "k0": 7,
        "k1": 8,
        "k2": 8,
        "k3": 7,
    }
    running = [v[1] for v in turnout[0]["values"]]
    assert running == sorted(running) and running[-1] == 30
    assert undated == []  # every vote here carried a plausible device time
    assert {s["tags"]["site"]: s["values"][0][1] for s in per_site} == {
        "North stand": 15,
        "South": 8,
        "-": 7,
    }
    by_site_label = {
        (s["tags"]["site"], s["tags"]["label"]): s["values"][0][1] for s in site_results
    }
    assert sum(by_site_label.values()) == 30
    assert sum(n for (site, _), n in by_site_label.items() if site == "South") == 8


async def test_changed_votes_and_multiple_choices_sum_to_the_tally_in_influxdb(
    redis: Redis, influx_proc: ManagedProcess, request: pytest.FixtureRequest
) -> None:
    database = unique_id(request)
    now = int(time.time())
    voters = Poll(id=unique_id(request, "-v"), labels=("a", "b", "c"), one_per_voter=True)
    multi = Poll(
        id=unique_id(request, "-m"), labels=("a", "b", "c"), type=PollType.MULTIPLE, max_choices=3
    )
    for poll in (voters, multi):
        await create_poll(redis, poll)
    tally = Tally(redis, timeout_s=5, points_max=100)
    await tally.commit(
        [
            Vote(voters.id, "k1", 0, 1, ts_s=now - 30, voter=b"ann"),
            Vote(voters.id, "k1", 1, 2, ts_s=now - 30, voter=b"bob"),
            Vote(voters.id, "k2", 2, 1, ts_s=now - 10, voter=b"ann"),  # ann: a -> c
            Vote(multi.id, "k1", (0, 2), 1, ts_s=now - 5),
            Vote(multi.id, "k2", (0, 1, 2), 1, ts_s=now - 5),
        ],
        now_ms=now * 1000,
    )
    await tally.commit(  # ann again, later, on k1: c -> b
        [Vote(voters.id, "k1", 1, 3, ts_s=now - 1, voter=b"ann")], now_ms=now * 1000
    )
    with _drainer(redis, v1_target(influx_proc, database)) as drainer:
        assert await drainer.drain_once([voters.id, multi.id]) == 4 + 2 + 5
    withdrawn = influx_query(
        influx_proc, database, "SELECT value, device, option FROM vote WHERE withdrawn='1'"
    )
    assert sorted((v[2], v[3], v[1]) for v in withdrawn[0]["values"]) == [
        ("k1", "0", -1),  # ann's first vote, from k1
        ("k2", "2", -1),  # ann's second, from k2
    ]
    with _writer(v1_target(influx_proc, database)) as writer:
        for poll, tallied in ((voters, (0, 2, 0)), (multi, (2, 1, 2))):
            result = await recount(redis, writer, poll.id)
            assert result.matches, result.report()
            assert result.redis == result.influx == tallied


class _Counting:
    """A real writer that counts the lines it was given, so a test sees every write."""

    def __init__(self, writer: PointWriter) -> None:
        self.lines = 0
        self._writer = writer

    def write(self, lines: Sequence[bytes]) -> None:
        self._writer.write(lines)
        self.lines += len(lines)

    def query_sums(self, poll: str, by: str, since_ns: int, until_ns: int) -> list[ExportRow]:
        return self._writer.query_sums(poll, by, since_ns, until_ns)

    def query_points(self, poll: str) -> Iterator[QueuedPoint]:
        return self._writer.query_points(poll)

    def close(self) -> None:
        self._writer.close()


async def test_drainers_of_several_processors_write_each_point_once(
    redis: Redis, poll: Poll, influx_proc: ManagedProcess, request: pytest.FixtureRequest
) -> None:
    database = unique_id(request)
    tally = Tally(redis, timeout_s=5, points_max=1000)
    for first in range(1, 301, 50):  # six batches: six entries to share
        await tally.commit(
            [
                Vote(poll.id, f"k{s % 7}", s % 3, s, ts_s=int(time.time()))
                for s in range(first, first + 50)
            ],
            now_ms=int(time.time() * 1000),
        )
    with (
        _writer(v1_target(influx_proc, database)) as one,
        _writer(v1_target(influx_proc, database)) as two,
    ):
        writers = [_Counting(one), _Counting(two)]
        drainers = [
            InfluxDrainer(
                redis=redis,
                writer=w,
                batch_max=50,
                flush_interval_s=0.1,
                redis_timeout_s=5,
                consumer=f"processor-{i}",
            )
            for i, w in enumerate(writers)
        ]
        moved = 0
        while moved < 300:
            counts = await asyncio.gather(*(d.drain_once([poll.id]) for d in drainers))
            assert sum(counts) > 0
            moved += sum(counts)
    assert moved == 300
    assert sum(w.lines for w in writers) == 300  # each point written by one drainer only
    assert all(w.lines for w in writers)  # and the work was shared
    assert point_count(influx_proc, database, poll.id) == 300
    assert await redis.xlen(PollKeys(poll.id).points) == 0


async def test_points_a_dead_drainer_read_are_taken_over_once_idle(
    redis: Redis, poll: Poll, influx_proc: ManagedProcess, request: pytest.FixtureRequest
) -> None:
    database = unique_id(request)
    await Tally(redis, timeout_s=5, points_max=1000).commit(
        [Vote(poll.id, "k", s % 3, s, ts_s=int(time.time())) for s in range(1, 21)],
        now_ms=int(time.time() * 1000),
    )
    keys = PollKeys(poll.id)
    with _writer(v1_target(influx_proc, database)) as writer:
        survivor = InfluxDrainer(
            redis=redis,
            writer=writer,
            batch_max=100,
            flush_interval_s=0.1,
            redis_timeout_s=5,
            consumer="survivor",
            claim_idle_ms=300,
        )
        assert await survivor.drain_once([poll.id]) == 20
        # Twenty more, read by a drainer that then died: not written, not settled.
        await Tally(redis, timeout_s=5, points_max=1000).commit(
            [Vote(poll.id, "k", s % 3, s, ts_s=int(time.time())) for s in range(21, 41)],
            now_ms=int(time.time() * 1000),
        )
        read: Any = await redis.xreadgroup(GROUP, "dead", {keys.points: ">"}, count=100)
        assert len(read[0][1]) == 1  # the batch's one entry, of twenty points
        assert await queued_points(redis, poll.id) == 20
        survivor._next_claim_s = 0.0  # its next claim round, without waiting 0.1 s for it
        assert await survivor.drain_once([poll.id]) == 0  # not idle long enough yet
        await asyncio.sleep(0.4)
        survivor._next_claim_s = 0.0
        assert await survivor.drain_once([poll.id]) == 20
    assert point_count(influx_proc, database, poll.id) == 40
    assert await redis.xlen(keys.points) == 0
    assert await queued_points(redis, poll.id) == 0
