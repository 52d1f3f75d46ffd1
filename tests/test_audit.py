"""``votebox audit`` on real Redis and InfluxDB 1.6.7: a poll's log audits clean, from InfluxDB
and from an export with no Redis; each tampering with the points, the counters or the chain is
found and named at its entry; a receipt is found under a published head."""

from __future__ import annotations

import csv
import json
import os
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from redis.asyncio import Redis

from harness.services import ManagedProcess
from processor.chain import rebuild
from processor.codec import Vote
from processor.influx.drainer import InfluxDrainer
from processor.influx.line_protocol import QueuedPoint, line_for
from processor.influx.writers import V1Writer, make_writer
from processor.keys import PollKeys
from processor.poll import Poll
from processor.poll_store import create_poll, delete_poll, read_results
from processor.tally import Tally
from tests.conftest import unique_id
from tests.test_cli import votebox
from tests.test_influx import v1_target

NOW_S = int(time.time())


@dataclass
class Audited:
    """A poll counted and written to InfluxDB, and what a dashboard saw published."""

    poll: Poll
    database: str
    env: dict[str, str]
    writer: V1Writer
    published: Path  # the retained result as published at the end
    receipts: dict[tuple[int, int], tuple[int, int]]  # (batch, vote) -> (shard, entry)

    def audit(self, *args: str) -> tuple[int, str]:
        done = votebox("audit", self.poll.id, *args, env=self.env)
        assert "Traceback" not in done.stderr, done.stderr
        return done.returncode, (done.stdout + done.stderr).strip()

    def points(self) -> list[QueuedPoint]:
        return list(self.writer.query_points(self.poll.id))

    def write(self, *points: QueuedPoint) -> None:
        self.writer.write([line_for(p, self.poll.labels[p.option]) for p in points])

    def delete(self, point: QueuedPoint) -> None:
        """Deletes the point (its series, at its time) from InfluxDB."""
        t = point.ts_s * 1_000_000_000 + point.seq % 1_000_000_000
        withdrawn = " AND withdrawn = '1'" if point.withdrawn else ""
        q = (
            f"DELETE FROM vote WHERE poll = '{self.poll.id}' AND device = '{point.device}' "
            f"AND \"option\" = '{point.option}'{withdrawn} AND time >= {t} AND time <= {t}"
        )
        params = urllib.parse.urlencode({"db": self.database, "q": q})
        url = f"{self.env['VOTEBOX_INFLUX_URL']}/query?{params}"
        with urllib.request.urlopen(urllib.request.Request(url, method="POST"), timeout=10):
            pass


async def _counted(
    redis: Redis,
    redis_proc: ManagedProcess,
    influx: ManagedProcess,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    *,
    one_per_voter: bool = False,
) -> AsyncIterator[Audited]:
    database = unique_id(request)
    poll = Poll(id=unique_id(request), labels=("red", "green", "blue"), one_per_voter=one_per_voter)
    await create_poll(redis, poll)
    tally = Tally(redis, timeout_s=5, points_max=10_000)
    receipts: dict[tuple[int, int], tuple[int, int]] = {}
    # Five batches of kiosks' votes, some repeated, the last a link of one vote.
    for batch in range(4):
        votes = [
            Vote(
                poll.id,
                f"k{d}",
                (d + batch) % 3,
                batch + 1,
                ts_s=NOW_S - 60 + batch,
                voter=bytes([d % 3]) if one_per_voter else None,
                receipt=d == 1,
            )  # fmt: skip
            for d in range(5)
        ]
        done = await tally.commit(votes + votes[:2], now_ms=(NOW_S - 30 + batch) * 1000)
        receipts.update({(batch, i): r for i, r in done.receipts.items()})
    await tally.commit([Vote(poll.id, "k9", 2, 1, ts_s=NOW_S - 10)], now_ms=NOW_S * 1000)
    writer = V1Writer(v1_target(influx, database), timeout_s=10)
    drainer = InfluxDrainer(
        redis=redis, writer=make_writer(v1_target(influx, database)), batch_max=7,
        flush_interval_s=0.1, redis_timeout_s=5,
    )  # fmt: skip
    while await drainer.drain_once([poll.id]):
        pass
    published = tmp_path / "result.json"
    published.write_bytes((await read_results(redis, [poll.id]))[poll.id].to_json())
    env = os.environ | {
        "VOTEBOX_REDIS_URL": redis_proc.url,
        "VOTEBOX_INFLUX_URL": influx.url,
        "VOTEBOX_INFLUX_API": "v1",
        "VOTEBOX_INFLUX_DB": database,
    }
    try:
        yield Audited(poll, database, env, writer, published, receipts)
    finally:
        writer.close()


@pytest.fixture
async def counted(
    redis: Redis,
    redis_proc: ManagedProcess,
    influx_proc: ManagedProcess,
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> AsyncIterator[Audited]:
    async for audited in _counted(redis, redis_proc, influx_proc, request, tmp_path):
        yield audited


def audits_clean(poll: str, env: dict[str, str], *args: str) -> str:
    """Runs `votebox audit` as an operator would (``env``: where Redis and InfluxDB are) and
    returns its verdict, which must be OK."""
    done = votebox("audit", poll, *args, env=os.environ | env, timeout=120)
    assert done.returncode == 0 and " OK: " in done.stdout, done.stdout + done.stderr
    return done.stdout.strip().splitlines()[-1]


def _head_of(published: Path) -> str:
    link = json.loads(published.read_text())["chain"][0]
    return f"{link['length']}:{link['head']}"


async def test_a_counted_poll_audits_clean_against_redis_and_what_was_published(
    counted: Audited,
) -> None:
    code, said = counted.audit(
        "--result", str(counted.published), "--head", _head_of(counted.published)
    )
    assert code == 0, said
    assert said.endswith(
        "OK: 21 entries in 1 shard, heads and counts agree with Redis, the result in "
        f"{counted.published}, the heads given"
    )


async def test_an_export_alone_audits_with_no_redis(counted: Audited, tmp_path: Path) -> None:
    export = tmp_path / "votes.csv"
    done = votebox("export", counted.poll.id, "--by", "vote", "--out", str(export), env=counted.env)
    assert done.returncode == 0, done.stderr
    rows = export.read_text().splitlines()
    assert rows[0] == "poll,shard,entry,link,head,device,epoch,seq,option,withdrawn,ts,source,site"
    assert len(rows) == 1 + 21
    args = ("--no-redis", "--from-export", str(export), "--result", str(counted.published))
    code, said = counted.audit(*args)
    assert code == 0 and "OK: 21 entries" in said, said
    # The export altered: the vote of entry 7 moved to another option.
    table = list(csv.DictReader(rows))
    row = next(r for r in table if r["entry"] == "7")
    row["option"] = str((int(row["option"]) + 1) % 3)
    with export.open("w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    code, said = counted.audit(*args)
    assert code == 1 and "FAILED at shard 0, entry 6: altered: entries 6-10" in said, said


async def test_a_receipt_is_found_under_a_published_head(counted: Audited) -> None:
    shard, entry = counted.receipts[(2, 1)]  # kiosk k1's vote of batch 2 asked for one
    assert shard == 0
    point = next(p for p in counted.points() if p.entry == entry and not p.withdrawn)
    assert (point.device, point.seq) == ("k1", 3)
    # A subscriber's log (`mosquitto_sub -v`): the last document counts.
    log = counted.published.with_suffix(".log")
    topic = f"polls/{counted.poll.id}/results"
    log.write_text(f"{topic} {{}}\n{topic} {counted.published.read_text()}\n")
    code, said = counted.audit("--receipt", "k1:0:3", "--result", str(log))
    assert code == 0, said
    length, head = _head_of(counted.published).split(":")
    assert f"vote k1:0:3 is entry {entry} of shard 0, under the head {length}:{head}" in said
    code, said = counted.audit("--receipt", "k1:0:99")
    assert code == 1 and "vote k1:0:99 is not in the log" in said


def _at(points: list[QueuedPoint], entry: int) -> QueuedPoint:
    return next(p for p in points if p.entry == entry and not p.withdrawn)


async def test_a_deleted_point_is_missing_at_its_entry(counted: Audited) -> None:
    counted.delete(_at(counted.points(), 8))
    code, said = counted.audit()
    assert code == 1 and said.endswith("FAILED at shard 0, entry 8: missing: no point of this "
                                       "vote is in the log"), said  # fmt: skip


async def test_a_changed_choice_is_an_altered_link(counted: Audited) -> None:
    point = _at(counted.points(), 7)  # entry 7 is in the link of entries 6-10
    counted.delete(point)
    counted.write(point._replace(option=(point.option + 1) % 3))
    code, said = counted.audit()
    assert code == 1 and "FAILED at shard 0, entry 6: altered: entries 6-10" in said, said


async def test_an_inserted_point_is_added(counted: Audited) -> None:
    point = _at(counted.points(), 12)
    counted.write(point._replace(device="forged", option=0))
    code, said = counted.audit()
    assert code == 1 and "FAILED at shard 0, entry 12: added" in said, said


async def test_two_swapped_points_are_found(counted: Audited) -> None:
    points = counted.points()
    a, b = _at(points, 3), _at(points, 13)
    # Each keeps its series and time; their places in the chain are exchanged.
    counted.write(a._replace(entry=b.entry, link=b.link, head=b.head),
                  b._replace(entry=a.entry, link=a.link, head=a.head))  # fmt: skip
    code, said = counted.audit()
    assert code == 1 and "FAILED at shard 0, entry 3: reordered" in said, said


async def test_a_counter_changed_in_redis_is_found(counted: Audited, redis: Redis) -> None:
    await redis.hincrby(PollKeys(counted.poll.id).tally, "c:1", 1)
    code, said = counted.audit()
    assert code == 1 and "counter: Redis counts" in said and "option 1" in said, said


async def test_a_consistent_rewrite_of_the_chain_is_caught_by_a_published_head(
    counted: Audited, redis: Redis
) -> None:
    # An intruder takes the last vote out of InfluxDB and rewrites Redis to agree: the chain
    # one link shorter, its counters one vote fewer. Redis and InfluxDB then agree.
    points = counted.points()
    last = max(points, key=lambda p: p.entry)
    (log,) = rebuild(points, shards=1, up_to={0: last.entry})
    counted.delete(last)
    keys = PollKeys(counted.poll.id)
    await redis.hset(
        keys.tally,
        mapping={"chain_length": last.entry - 1, "chain_head": log.heads[last.entry - 1]},
    )
    await redis.hincrby(keys.tally, f"c:{last.option}", -1)
    await redis.hincrby(keys.tally, "total", -1)
    code, said = counted.audit()
    assert code == 0, said
    # The head a dashboard kept from the retained topic was not rewritten.
    code, said = counted.audit("--head", _head_of(counted.published))
    assert code == 1 and f"FAILED at shard 0, entry {last.entry}: missing" in said, said


async def test_a_poll_of_changed_votes_audits_clean_and_a_taken_back_point_is_bound(
    redis: Redis,
    redis_proc: ManagedProcess,
    influx_proc: ManagedProcess,
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    async for counted in _counted(
        redis, redis_proc, influx_proc, request, tmp_path, one_per_voter=True
    ):
        points = counted.points()
        withdrawn = [p for p in points if p.withdrawn]
        assert withdrawn  # three voters on five kiosks: votes changed in every batch
        code, said = counted.audit("--result", str(counted.published))
        assert code == 0 and " OK: " in said, said
        # Taking a changed vote back moved to another time: its entry no longer holds.
        moved = withdrawn[0]
        counted.delete(moved)
        counted.write(moved._replace(ts_s=moved.ts_s - 60))
        code, said = counted.audit()
        assert code == 1 and f"entry {moved.entry}: altered" in said, said


async def test_a_poll_made_again_under_its_id_audits_its_own_chain_only(
    redis: Redis, redis_proc: ManagedProcess, influx_proc: ManagedProcess,
    request: pytest.FixtureRequest,
) -> None:  # fmt: skip
    database = unique_id(request)
    poll = Poll(id=unique_id(request), labels=("a", "b"))
    writer = make_writer(v1_target(influx_proc, database))

    async def count(votes: list[Vote], now_s: int) -> None:
        await Tally(redis, timeout_s=5, points_max=100).commit(votes, now_ms=now_s * 1000)
        drainer = InfluxDrainer(
            redis=redis, writer=writer, batch_max=100, flush_interval_s=0.1, redis_timeout_s=5
        )
        while await drainer.drain_once([poll.id]):
            pass

    try:
        # Its first life, an hour ago: its votes dated by the server's clock then.
        await create_poll(redis, poll, now_ms=(NOW_S - 3600) * 1000)
        await count([Vote(poll.id, f"k{d}", d % 2, 1) for d in range(5)], NOW_S - 3600)
        await delete_poll(redis, poll.id)
        await create_poll(redis, poll, reuse_deleted=True)
        await count([Vote(poll.id, f"k{d}", 1, 1) for d in range(3)], NOW_S)
    finally:
        writer.close()
    env = os.environ | {
        "VOTEBOX_REDIS_URL": redis_proc.url, "VOTEBOX_INFLUX_URL": influx_proc.url,
        "VOTEBOX_INFLUX_API": "v1", "VOTEBOX_INFLUX_DB": database,
    }  # fmt: skip
    done = votebox("audit", poll.id, env=env)
    assert done.returncode == 0 and "OK: 3 entries" in done.stdout, done.stdout + done.stderr
