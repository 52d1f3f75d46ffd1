"""Three processors in one MQTT 5 share group on Mosquitto, one SIGKILLed and never started
again: every vote counted once after the devices' re-sends, the retained version never goes
back, and each point is written to InfluxDB once (docs/operations.md, Scale)."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from redis.asyncio import Redis

from harness.services import ManagedProcess
from processor.commands.watch import results_stream
from processor.poll import Poll
from processor.poll_store import read_results
from processor.reasons import Fate
from tests.conftest import eventually, unique_id
from tests.fleet import Fleet, results_url
from tests.test_audit import audits_clean
from tests.test_faults import resend_until_acked, send, settled_total
from tests.test_influx import influx_env, point_count

pytestmark = pytest.mark.e2e


def influx_points_written(influx: ManagedProcess) -> int:
    """Points InfluxDB has taken since it started, over every write request (/debug/vars)."""
    with urllib.request.urlopen(f"{influx.url}/debug/vars", timeout=10) as reply:
        stats = json.load(reply)
    return sum(
        int(entry["values"]["pointsWrittenOK"])
        for name, entry in stats.items()
        if name.startswith("httpd")
    )


async def test_three_processors_one_killed_for_good_count_exactly_and_write_points_once(
    mosquitto_proc: ManagedProcess,
    influx_proc: ManagedProcess,
    spawn_processor: Callable[..., ManagedProcess],
    poll: Poll,
    redis: Redis,
    redis_proc: ManagedProcess,
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    database = unique_id(request)
    batch = 100
    env = influx_env(influx_proc, database) | {
        "VOTEBOX_MQTT_SHARE_GROUP": f"{poll.id[:40]}-g",
        # What the dead member's session holds is dropped this soon, and re-sent by devices.
        "VOTEBOX_MQTT_SESSION_EXPIRY_S": "3",
        "VOTEBOX_INFLUX_BATCH_MAX": str(batch),
    }
    procs = [spawn_processor(mosquitto_proc, **env) for _ in range(3)]
    written_before = influx_points_written(influx_proc)
    versions: list[int] = []

    async def watch() -> None:
        async for document in results_stream(results_url(mosquitto_proc), poll.id):
            versions.append(int(document["version"]))

    async with asyncio.TaskGroup() as tg:
        watching = tg.create_task(watch())
        with Fleet(mosquitto_proc, poll.id, 10) as fleet:
            sending = tg.create_task(send(fleet, poll, 3000))
            await eventually(lambda: fleet.codes()[Fate.ACCEPTED] >= 500, timeout_s=60)
            procs[0].kill()  # and never started again
            await sending
            await resend_until_acked(fleet, every_s=2, timeout_s=120)
            assert await settled_total(redis, poll, 3000, timeout_s=60) == 3000
        final = (await read_results(redis, [poll.id]))[poll.id].version
        await eventually(lambda: bool(versions) and versions[-1] == final, timeout_s=30)
        # The dead drainer's unsettled points are taken over once idle (30 s).
        await eventually(lambda: point_count(influx_proc, database, poll.id) == 3000, timeout_s=90)
        watching.cancel()
    assert versions == sorted(versions), versions
    written = influx_points_written(influx_proc) - written_before
    # Once each, but for the batch the dead drainer may have written and not yet settled.
    assert 3000 <= written <= 3000 + batch, written
    # Three processors extended one chain, one of them killed mid-stream: it holds together.
    published = tmp_path / "result.json"
    published.write_bytes((await read_results(redis, [poll.id]))[poll.id].to_json())
    env |= {"VOTEBOX_REDIS_URL": redis_proc.url}
    said = await asyncio.to_thread(audits_clean, poll.id, env, "--result", str(published))
    assert "OK: 3000 entries in 1 shard" in said
