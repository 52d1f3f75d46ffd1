"""``votebox export`` on real Redis and InfluxDB 1.6.7: every grouping adds up to the votes
``votebox recount`` finds in InfluxDB, which equal the tally; the time bounds filter."""

from __future__ import annotations

import csv
import io
import json
import os
import time

import pytest
from redis.asyncio import Redis

from harness.services import ManagedProcess
from processor.codec import Vote
from processor.commands.recount import recount
from processor.influx.drainer import InfluxDrainer
from processor.influx.writers import make_writer
from processor.poll import Poll
from processor.poll_store import create_poll, read_results
from processor.tally import Tally
from tests.conftest import unique_id
from tests.test_cli import votebox
from tests.test_influx import v1_target


def _export(redis_proc: ManagedProcess, influx: ManagedProcess, database: str, *args: str) -> str:
    env = os.environ | {
        "VOTEBOX_REDIS_URL": redis_proc.url,
        "VOTEBOX_INFLUX_URL": influx.url,
        "VOTEBOX_INFLUX_API": "v1",
        "VOTEBOX_INFLUX_DB": database,
    }
    done = votebox("export", *args, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _csv(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


async def test_every_grouping_adds_up_to_the_recount(
    redis: Redis,
    redis_proc: ManagedProcess,
    influx_proc: ManagedProcess,
    request: pytest.FixtureRequest,
) -> None:
    database = unique_id(request)
    poll = Poll(id=unique_id(request), labels=("red", "green", "blue"))
    await create_poll(redis, poll)
    # 60 votes from 6 kiosks at two sites, dated over three minutes ending now.
    minute = int(time.time()) // 60 * 60
    votes = [
        Vote(poll.id, f"k{i % 6}", i % 3, i // 6 + 1, ts_s=minute - 120 + (i % 3) * 60)
        for i in range(60)
    ]
    sites = {f"k{d}": ("North" if d < 4 else "South") for d in range(6)}
    await Tally(redis, timeout_s=5, points_max=1000).commit(
        votes, now_ms=int(time.time() * 1000), sites=sites
    )
    writer = make_writer(v1_target(influx_proc, database))
    try:
        drainer = InfluxDrainer(
            redis=redis, writer=writer, batch_max=1000, flush_interval_s=0.1, redis_timeout_s=5
        )
        assert await drainer.drain_once([poll.id]) == 60
        recounted = await recount(redis, writer, poll.id)
    finally:
        writer.close()
    assert recounted.matches and recounted.influx == (20, 20, 20)
    assert (await read_results(redis, [poll.id]))[poll.id].counts == recounted.influx

    by_option = _csv(_export(redis_proc, influx_proc, database, poll.id))
    assert [(r["option"], r["label"], r["votes"]) for r in by_option] == [
        ("0", "red", "20"),
        ("1", "green", "20"),
        ("2", "blue", "20"),
    ]
    assert all(r["poll"] == poll.id for r in by_option)
    for by in ("site", "device", "minute", "hour"):
        rows = _csv(_export(redis_proc, influx_proc, database, poll.id, "--by", by))
        for label in poll.labels:
            assert sum(int(r["votes"]) for r in rows if r["label"] == label) == 20, (by, rows)
            assert all(int(r["option"]) == poll.labels.index(r["label"]) for r in rows)
    per_site = _csv(_export(redis_proc, influx_proc, database, poll.id, "--by", "site"))
    assert {
        s: sum(int(r["votes"]) for r in per_site if r["site"] == s) for s in ("North", "South")
    } == {
        "North": 40,
        "South": 20,
    }
    per_minute = json.loads(
        _export(redis_proc, influx_proc, database, poll.id, "--by", "minute", "--format", "json")
    )
    assert len({r["time"] for r in per_minute}) == 3  # the three minutes the votes were cast in
    assert sum(r["votes"] for r in per_minute) == 60
    assert set(per_minute[0]) == {"poll", "time", "option", "label", "votes"}
    # The last minute alone: --since its start.
    last = _csv(
        _export(
            redis_proc, influx_proc, database, poll.id, "--since", str(minute), "--by", "option"
        )
    )
    assert sum(int(r["votes"]) for r in last) == 20
    # And before it: --until its start.
    before = _csv(_export(redis_proc, influx_proc, database, poll.id, "--until", str(minute)))
    assert sum(int(r["votes"]) for r in before) == 40


def test_export_says_what_is_missing(redis_proc: ManagedProcess) -> None:
    env = os.environ | {"VOTEBOX_REDIS_URL": redis_proc.url}
    env.pop("VOTEBOX_INFLUX_URL", None)
    done = votebox("export", "nope", env=env)
    assert done.returncode == 2 and "set VOTEBOX_INFLUX_URL" in done.stderr


async def test_recount_and_export_say_what_a_missing_influx_database_means(
    redis_proc: ManagedProcess, influx_proc: ManagedProcess, redis: Redis, poll: Poll
) -> None:
    env = os.environ | {
        "VOTEBOX_REDIS_URL": redis_proc.url,
        "VOTEBOX_INFLUX_URL": influx_proc.url,
        "VOTEBOX_INFLUX_API": "v1",
        "VOTEBOX_INFLUX_DB": "never_written",
    }
    for command in ("recount", "export"):
        done = votebox(command, poll.id, env=env)
        assert done.returncode != 0, done.stdout
        assert "has no database 'never_written'" in done.stderr, done.stderr
        assert "no processor has written a point there yet" in done.stderr
