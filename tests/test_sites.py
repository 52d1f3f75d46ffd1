"""Device sites, end to end on real servers: set with ``votebox device add --site`` and
``votebox device site``, shown by ``votebox devices``, and the ``site`` tag of every point in
InfluxDB 1.6.7, summed per site by InfluxQL to the tally's totals."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from redis.asyncio import Redis

from harness.services import ManagedProcess
from processor.errors import ConfigError
from processor.keys import DEVICES_SITE
from processor.poll import Poll
from processor.sites import check_site
from tests.conftest import eventually, unique_id
from tests.fleet import Fleet
from tests.test_cli import votebox
from tests.test_influx import influx_env, influx_query, point_count


def _env(redis_proc: ManagedProcess) -> dict[str, str]:
    return os.environ | {"VOTEBOX_REDIS_URL": redis_proc.url}


def _per_site(influx: ManagedProcess, database: str, poll: str) -> dict[str, int]:
    series = influx_query(
        influx,
        database,
        f"SELECT sum(value) FROM vote WHERE poll='{poll}' GROUP BY site",
    )
    return {s["tags"]["site"]: int(s["values"][0][1]) for s in series}


@pytest.mark.parametrize("site", ["", " north", "a\tb", "x" * 65, "north/2"])
def test_a_site_is_a_plain_name(site: str) -> None:
    with pytest.raises(ConfigError, match="a site is 1-64"):
        check_site(site)


def test_a_site_is_given_to_devices_only_and_checked_before_anything_is_written(
    tmp_path: Path, redis_proc: ManagedProcess
) -> None:
    files = ["--accounts", str(tmp_path / "a.json"), "--passwd", str(tmp_path / "p")]
    files += ["--acl", str(tmp_path / "acl")]
    refused = votebox(
        "device", "add", "dash", "--role", "dashboard", "--site", "x", *files,
        env=_env(redis_proc),
    )  # fmt: skip
    assert refused.returncode == 2 and "only a device has a site" in refused.stderr
    bad = votebox("device", "add", "k1", "--site", "a\tb", *files, env=_env(redis_proc))
    assert bad.returncode == 2 and "a site is 1-64" in bad.stderr
    assert not (tmp_path / "a.json").exists()  # nothing written


async def test_points_carry_the_site_of_their_device_and_sum_per_site(
    tmp_path: Path,
    redis: Redis,
    redis_proc: ManagedProcess,
    mosquitto_proc: ManagedProcess,
    influx_proc: ManagedProcess,
    spawn_processor: Callable[..., ManagedProcess],
    poll: Poll,
    request: pytest.FixtureRequest,
) -> None:
    prefix = unique_id(request)[:30]
    devices = [f"{prefix}-{i:02d}" for i in range(3)]
    files = ["--accounts", str(tmp_path / "a.json"), "--passwd", str(tmp_path / "p")]
    files += ["--acl", str(tmp_path / "acl")]
    env = _env(redis_proc)
    added = votebox("device", "add", devices[0], "--site", "North stand", *files, env=env)
    assert added.returncode == 0, added.stderr
    assert "is at site 'North stand'" in added.stdout
    for device, site in ((devices[1], "North stand"), (devices[2], "South")):
        moved = votebox("device", "site", device, site, *files, env=env)
        assert moved.returncode == 0, moved.stderr
    assert await redis.hget(DEVICES_SITE, devices[2]) == b"South"

    database = unique_id(request)
    spawn_processor(mosquitto_proc, **influx_env(influx_proc, database))
    with Fleet(mosquitto_proc, prefix, 3) as fleet:
        assert [k.device for k in fleet.kiosks] == devices
        await asyncio.to_thread(fleet.cast, poll.id, 30, lambda i: i % 3)
        await eventually(lambda: fleet.unacked() == 0, timeout_s=60)
        await eventually(lambda: point_count(influx_proc, database, poll.id) == 30, timeout_s=60)
        assert _per_site(influx_proc, database, poll.id) == {"North stand": 20, "South": 10}

        # The third kiosk moves: its next votes carry the new site, its counted ones keep theirs.
        moved = votebox("device", "site", devices[2], "East", *files, env=env)
        assert moved.returncode == 0, moved.stderr
        sent = 30

        def votes_reach_east() -> bool:
            nonlocal sent
            fleet.kiosks[2].vote(poll.id, 0)
            sent += 1
            return "East" in _per_site(influx_proc, database, poll.id)

        await eventually(votes_reach_east, timeout_s=30, every_s=0.5)
        await eventually(lambda: fleet.unacked() == 0, timeout_s=30)
        await eventually(lambda: point_count(influx_proc, database, poll.id) == sent)
    per_site = _per_site(influx_proc, database, poll.id)
    assert per_site["North stand"] == 20 and per_site["South"] >= 10
    assert sum(per_site.values()) == sent  # every point once, in one site

    listed = votebox("devices", env=env)
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if line.startswith(devices[2]))
    assert "East" in row
    cleared = votebox("device", "site", devices[2], "--clear", *files, env=env)
    assert cleared.returncode == 0 and "has no site now" in cleared.stdout
