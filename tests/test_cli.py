"""The votebox command as an operator runs it."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from redis.asyncio import Redis

from harness.services import ManagedProcess
from processor.codec import Vote
from processor.config import ENV_VARS
from processor.keys import DEVICES_HEALTH, DEVICES_ONLINE, DEVICES_SEEN, DEVICES_STATUS
from processor.poll_store import load_poll
from processor.tally import Tally
from tests.conftest import REPO, unique_id


def poll_cli(redis_proc: ManagedProcess, *args: str) -> str:
    """``votebox ARGS --redis-url ...`` that must succeed; returns what it printed."""
    result = votebox(*args, "--redis-url", redis_proc.url)
    assert result.returncode == 0, result.stderr
    return result.stdout


def votebox(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "processor.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=env,
    )


@pytest.mark.parametrize("command", [[], ["processor"], ["poll"]])
def test_help_lists_every_environment_variable(command: list[str]) -> None:
    result = votebox(*command, "--help")
    assert result.returncode == 0
    for var, _, _ in ENV_VARS:
        assert var in result.stdout


def test_every_processor_flag_says_what_it_does() -> None:
    shown = votebox("processor", "--help", env={"COLUMNS": "100"}).stdout
    options = shown.split("options:", 1)[1].split("environment", 1)[0]
    blocks = re.split(r"\n(?=  -)", options.strip("\n"))
    assert len(blocks) > 30
    for block in blocks:
        flag, *rest = block.strip().split("\n")
        described = " ".join([flag.split("  ", 1)[1] if "  " in flag else "", *rest])
        # What is left without the default and the variable that every setting's help gets.
        own = re.sub(r"\(env VOTEBOX_\w+\)|,? ?default [^()]*", "", described)
        assert re.search(r"[A-Za-z]{2}", own), f"{flag!r} says nothing of its own: {described!r}"


def test_bad_setting_exits_2_with_the_variable_named() -> None:
    result = votebox("poll", "show", "x", "--redis-url", "http://nope")
    assert result.returncode == 2
    assert "VOTEBOX_REDIS_URL must start with redis://" in result.stderr


async def test_poll_create_then_show(
    redis_proc: ManagedProcess, redis: Redis, request: pytest.FixtureRequest
) -> None:
    poll_id = unique_id(request)
    created = votebox(
        "poll",
        "create",
        poll_id,
        "--option",
        "Yes",
        "--option",
        "No",
        "--title",
        "Extend the break?",
        "--redis-url",
        redis_proc.url,
    )
    assert created.returncode == 0, created.stderr
    poll = await load_poll(redis, poll_id)
    assert poll is not None and poll.labels == ("Yes", "No") and poll.title == "Extend the break?"
    shown = votebox("poll", "show", poll_id, "--redis-url", redis_proc.url)
    assert shown.returncode == 0
    assert "Extend the break?" in shown.stdout and "total 0" in shown.stdout
    again = votebox(
        "poll", "create", poll_id, "--option", "A", "--option", "B", "--redis-url", redis_proc.url
    )
    assert again.returncode == 2 and "exists already" in again.stderr


def test_poll_create_refuses_invalid_definitions(redis_proc: ManagedProcess) -> None:
    one = votebox("poll", "create", "p1", "--option", "only", "--redis-url", redis_proc.url)
    assert one.returncode == 2 and "2 to 64 options" in one.stderr
    bad_id = votebox(
        "poll", "create", "a/b", "--option", "x", "--option", "y", "--redis-url", redis_proc.url
    )
    assert bad_id.returncode == 2 and "poll id" in bad_id.stderr


async def test_a_zero_given_as_a_flag_is_used_or_refused_never_replaced_by_the_default(
    redis_proc: ManagedProcess, redis: Redis, request: pytest.FixtureRequest
) -> None:
    poll_id = unique_id(request)
    poll_cli(
        redis_proc,
        "poll",
        "create",
        poll_id,
        "--option",
        "A",
        "--option",
        "B",
        "--grace-s",
        "0",
        "--cooldown-s",
        "0",
    )
    poll = await load_poll(redis, poll_id)
    assert poll is not None and poll.grace_s == 0 and poll.cooldown_s == 0
    shards = votebox(
        "poll",
        "create",
        f"{poll_id}s",
        "--option",
        "A",
        "--option",
        "B",
        "--shards",
        "0",
        "--redis-url",
        redis_proc.url,
    )
    assert shards.returncode == 2 and "shards is 1 to" in shards.stderr
    choices = votebox(
        "poll",
        "create",
        f"{poll_id}m",
        "--type",
        "multiple",
        "--option",
        "A",
        "--option",
        "B",
        "--max-choices",
        "0",
        "--redis-url",
        redis_proc.url,
    )
    assert choices.returncode == 2 and "max_choices 1 to 2" in choices.stderr
    assert await load_poll(redis, f"{poll_id}s") is None
    assert await load_poll(redis, f"{poll_id}m") is None


def test_show_unknown_poll_exits_1(redis_proc: ManagedProcess) -> None:
    result = votebox("poll", "show", "no-such-poll-here", "--redis-url", redis_proc.url)
    assert result.returncode == 1 and "no poll" in result.stderr


def test_processor_says_it_runs_without_influxdb_and_fails_clearly_without_a_broker(
    redis_proc: ManagedProcess,
) -> None:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("VOTEBOX_")}
    env |= {
        "VOTEBOX_REDIS_URL": redis_proc.url,
        "VOTEBOX_MQTT_URL": "mqtt://p@127.0.0.1:1",
        "VOTEBOX_LOG_LEVEL": "INFO",
    }
    result = votebox("processor", env=env)
    assert "InfluxDB not configured" in result.stderr
    assert result.returncode == 2 and "cannot reach mqtt://p@127.0.0.1:1" in result.stderr


def test_demo_runs_end_to_end_and_prints_the_tally() -> None:
    result = votebox("demo", "--duration", "4", "--devices", "4", "--rate", "25", timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Which snack should the stadium sell?" in result.stdout
    assert "Live results in a browser: http://127.0.0.1:" in result.stdout
    assert re.search(
        r"A touch kiosk in a browser \(the device tablet-01\): http://127\.0\.0\.1:\d+/"
        r"kiosk\.html#device=tablet-01&password=\S+&poll=demo",
        result.stdout,
    ), result.stdout
    match = re.search(
        r"sent (\d+): accepted (\d+), duplicate (\d+), rejected 0, still queued 0", result.stdout
    )
    assert match, result.stdout
    sent, accepted, duplicate = map(int, match.groups())
    # A duplicate is a vote counted once whose ack was lost to a kiosk's Wi-Fi outage.
    assert sent > 0 and accepted + duplicate == sent
    assert "1 devices went offline and came back" in result.stdout  # a quarter of 4 kiosks
    # The retained results reached every vote.
    assert f"-> {sent} (+{sent}); counted {sent}: agrees" in result.stdout
    # Every vote reached InfluxDB too, and the closing recount agrees with Redis.
    assert (
        f"recount of demo: MATCH (redis total {sent}, influxdb {sent}, queued 0)" in result.stdout
    )
    # And the chain rebuilt from InfluxDB gives the heads Redis and the retained result hold.
    assert (
        f"audit of demo: OK: {sent} entries in 1 shard, heads and counts agree with Redis, "
        "the retained polls/demo/results" in result.stdout
    ), result.stdout


def test_poll_create_refuses_what_the_type_does_not_allow(redis_proc: ManagedProcess) -> None:
    cases = [
        (["--type", "rating"], "needs a scale"),
        (["--type", "rating", "--scale", "5-1"], "0 <= min < max"),
        (
            ["--type", "multiple", "--option", "a", "--option", "b", "--max-choices", "3"],
            "max_choices 1 to 2",
        ),
        (["--option", "a", "--option", "b", "--max-choices", "2"], "only multiple-choice"),
        (["--option", "a", "--option", "b", "--opens-at", "2026-12-01T18:00:00"], "UTC offset"),
        (
            [
                "--option",
                "a",
                "--option",
                "b",
                "--opens-at",
                "2026-12-02T00:00:00Z",
                "--closes-at",
                "2026-12-01T00:00:00Z",
            ],
            "close after it opens",
        ),
    ]
    for flags, message in cases:
        result = votebox("poll", "create", "bad-poll", *flags, "--redis-url", redis_proc.url)
        assert result.returncode == 2 and message in result.stderr, (flags, result.stderr)


async def test_poll_apply_creates_then_updates_and_refuses_changes_that_would_alter_votes(
    redis_proc: ManagedProcess, redis: Redis, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    prefix = unique_id(request)[:40]
    doc = (REPO / "docs" / "polls.md").read_text()
    example = doc.split("```toml\n", 1)[1].split("```", 1)[0]
    example = example.replace("[polls.", f"[polls.{prefix}-")
    path = tmp_path / "polls.toml"
    path.write_text(example)
    first = votebox("poll", "apply", str(path), "--redis-url", redis_proc.url)
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("created poll") == 4
    snacks = await load_poll(redis, f"{prefix}-snacks")
    assert snacks is not None and snacks.type == "multiple" and snacks.max_choices == 2
    service = await load_poll(redis, f"{prefix}-service")
    assert service is not None and service.labels[-1] == "10" and service.cooldown_s == 10
    final = await load_poll(redis, f"{prefix}-final")
    assert final is not None and final.closes_ms == 1_796_148_000_000 and final.grace_s == 600

    again = votebox("poll", "apply", str(path), "--redis-url", redis_proc.url)
    assert again.returncode == 0 and again.stdout.count("unchanged") == 4

    await Tally(redis, timeout_s=5).commit(
        [Vote(f"{prefix}-board", "k", 0, 1, voter=b"x")], now_ms=int(time.time() * 1000)
    )
    path.write_text(
        example.replace('title = "Elect the board chair"', 'title = "Elect the chair"').replace(
            'options = ["Kim", "Lee"]', 'options = ["Kim", "Lee", "Max"]'
        )
    )
    path.write_text(path.read_text().replace("grace_s = 600", "grace_s = 900"))
    refused = votebox("poll", "apply", str(path), "--redis-url", redis_proc.url)
    assert refused.returncode == 2 and "labels cannot change" in refused.stderr
    board = await load_poll(redis, f"{prefix}-board")
    assert board is not None and board.labels == ("Kim", "Lee")
    final = await load_poll(redis, f"{prefix}-final")  # earlier in the file: not written either
    assert final is not None and final.grace_s == 600

    path.write_text(example.replace("[polls.", "[polls.x").replace("grace_s = 600", "grace = 1"))
    invalid = votebox("poll", "apply", str(path), "--redis-url", redis_proc.url)
    assert invalid.returncode == 2 and "unknown key(s) ['grace']" in invalid.stderr
    assert await load_poll(redis, f"x{prefix}-snacks") is None  # nothing written


async def test_poll_list_open_close_and_delete(
    redis_proc: ManagedProcess, redis: Redis, request: pytest.FixtureRequest
) -> None:
    poll_id = unique_id(request)
    url = ["--redis-url", redis_proc.url]
    assert (
        votebox("poll", "create", poll_id, "--option", "a", "--option", "b", *url).returncode == 0
    )
    listed = votebox("poll", "list", *url)
    line = next(x for x in listed.stdout.splitlines() if x.startswith(poll_id + " "))
    assert "open" in line and "single: 0=a, 1=b" in line
    assert votebox("poll", "close", poll_id, *url).returncode == 0
    listed = votebox("poll", "list", *url)
    assert "closed" in next(x for x in listed.stdout.splitlines() if x.startswith(poll_id + " "))
    assert votebox("poll", "open", poll_id, *url).returncode == 0
    poll = await load_poll(redis, poll_id)
    assert poll is not None and poll.state_at(int(time.time() * 1000)) == "open"
    deleted = votebox("poll", "delete", poll_id, "--yes", *url)
    assert deleted.returncode == 0 and "deleted poll" in deleted.stdout
    assert await load_poll(redis, poll_id) is None
    assert await redis.sismember("votebox:polls:deleted", poll_id)
    missing = votebox("poll", "close", poll_id, *url)
    assert missing.returncode == 2 and "no poll" in missing.stderr


async def test_a_deleted_poll_id_is_not_created_again_unless_the_operator_accepts_old_votes(
    redis_proc: ManagedProcess, redis: Redis, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Votes for a deleted poll may still wait in the broker's queue or in device outboxes;
    under a new poll of the same id they would count. So the id stays retired unless the
    operator says otherwise."""
    poll_id = unique_id(request)
    url = ["--redis-url", redis_proc.url]
    options = ["--option", "a", "--option", "b"]
    assert votebox("poll", "create", poll_id, *options, *url).returncode == 0
    assert votebox("poll", "delete", poll_id, "--yes", *url).returncode == 0
    again = votebox("poll", "create", poll_id, *options, *url)
    assert again.returncode == 2 and "--reuse-deleted-id" in again.stderr, again.stderr
    assert await load_poll(redis, poll_id) is None
    path = tmp_path / "polls.toml"
    path.write_text(f'[polls.{poll_id}]\noptions = ["a", "b"]\n')
    applied = votebox("poll", "apply", str(path), *url)
    assert applied.returncode == 2 and "deleted" in applied.stderr, applied.stderr
    assert await load_poll(redis, poll_id) is None
    reused = votebox("poll", "create", poll_id, *options, "--reuse-deleted-id", *url)
    assert reused.returncode == 0, reused.stderr
    assert not await redis.sismember("votebox:polls:deleted", poll_id)


async def test_devices_forget_takes_a_kiosk_out_of_the_table_and_the_silent_count(
    redis_proc: ManagedProcess, redis: Redis, request: pytest.FixtureRequest
) -> None:
    gone, kept = unique_id(request, "-gone"), unique_id(request, "-kept")
    for device in (gone, kept):
        await redis.zadd(DEVICES_SEEN, {device: 1000})
        await redis.zadd(DEVICES_ONLINE, {device: 1000})  # online, and quiet since: silent
        await redis.hset(DEVICES_STATUS, device, '{"state":"online","at_ms":1000}')
        await redis.hset(DEVICES_HEALTH, device, '{"uptime_s":5,"outbox":0,"at_ms":1000}')
    shown = poll_cli(redis_proc, "devices", "--forget", gone)
    assert kept in shown and gone not in shown
    assert await redis.zscore(DEVICES_ONLINE, gone) is None
    assert await redis.zscore(DEVICES_SEEN, gone) is None
    assert await redis.hget(DEVICES_STATUS, gone) is None
    assert await redis.hget(DEVICES_HEALTH, gone) is None
    assert await redis.zscore(DEVICES_ONLINE, kept) == 1000
    await redis.zrem(DEVICES_SEEN, kept)
    await redis.zrem(DEVICES_ONLINE, kept)
    await redis.hdel(DEVICES_STATUS, kept)
    await redis.hdel(DEVICES_HEALTH, kept)
