"""The votebox command as an operator runs it."""

from __future__ import annotations

import subprocess
import sys

import pytest
from redis.asyncio import Redis

from harness.services import ManagedProcess
from processor.config import ENV_VARS
from processor.polls import load_poll
from tests.conftest import unique_id


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
    summary = next(line for line in result.stdout.splitlines() if line.startswith("sent "))
    assert "rejected 0" in summary
    sent = int(summary.split()[1])
    assert sent > 0 and f"accepted {sent}," in summary
    assert f"total {sent} " in result.stdout  # the retained results reached every vote
    # Every vote reached InfluxDB too, and the closing recount agrees with Redis.
    assert (
        f"recount of demo: MATCH (redis total {sent}, influxdb {sent}, queued 0)" in result.stdout
    )
