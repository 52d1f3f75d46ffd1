"""What an operator sees: metrics, readiness, ``votebox status`` and the ``votebox/stats`` topic,
from a real processor on real servers."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import aiomqtt
import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from devices.encoder import encode_heartbeat
from harness.services import HOST, ManagedProcess, free_port
from processor.keys import DEVICES_ONLINE
from processor.poll import Poll
from processor.poll_store import read_fates, read_results
from processor.stats import Stats
from processor.topics import STATS_TOPIC
from tests.conftest import eventually
from tests.fleet import Fleet, first_message

pytestmark = pytest.mark.e2e


def scrape(proc: ManagedProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the processor's /metrics, keyed by name and sorted labels."""
    with urllib.request.urlopen(f"{proc.url}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def readyz(proc: ManagedProcess) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"{proc.url}/readyz", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


def healthz(proc: ManagedProcess) -> int:
    with urllib.request.urlopen(f"{proc.url}/healthz", timeout=5) as response:
        return int(response.status)


def votebox_status(url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "processor.cli", "status", "--url", url],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def fate(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), -1.0)


async def test_metrics_report_exactly_the_accepted_duplicate_and_rejected_votes_sent(
    broker: ManagedProcess, processor_proc: ManagedProcess, poll: Poll
) -> None:
    with Fleet(broker, poll.id, 3) as fleet:

        def send() -> None:
            for kiosk in fleet.kiosks:
                for _ in range(20):
                    kiosk.vote(poll.id, 1)  # 60 accepted
                for seq in (1, 2, 3, 4):
                    kiosk.vote(poll.id, 1, seq=seq)  # 12 duplicates
                kiosk.vote(poll.id, 7)  # 3 unknown_option
                kiosk.publish_raw(poll.id, b"\xff\x00")  # 3 malformed
            for kiosk in fleet.kiosks:
                kiosk.wait_published(30)

        await asyncio.to_thread(send)
        async with aiomqtt.Client(
            "127.0.0.1", broker.port, identifier="bad-topic", username="bad-topic"
        ) as c:
            await c.publish(f"votes/{poll.id}", b"\x00", qos=1)  # 1 bad_topic, no device
        await eventually(lambda: sum(fleet.codes().values()) == 60 + 12 + 3 + 3)

        def counted() -> bool:
            return fate(scrape(processor_proc), "votebox_messages_total") == 79

        def published() -> bool:
            samples = scrape(processor_proc)
            return fate(samples, "votebox_results_published_total", poll=poll.id) >= 1

        await eventually(counted)
        await eventually(published)  # within one results interval of the last commit
        samples = scrape(processor_proc)
    assert fate(samples, "votebox_votes_total", fate="accepted") == 60
    assert fate(samples, "votebox_votes_total", fate="duplicate") == 12
    assert fate(samples, "votebox_votes_total", fate="rejected") == 7
    assert fate(samples, "votebox_votes_rejected_total", reason="unknown_option") == 3
    assert fate(samples, "votebox_votes_rejected_total", reason="malformed") == 3
    assert fate(samples, "votebox_votes_rejected_total", reason="bad_topic") == 1
    assert fate(samples, "votebox_votes_rejected_total", reason="seq_too_old") == 0
    assert fate(samples, "votebox_mqtt_connected") == 1
    assert fate(samples, "votebox_intake_held_messages") == 0
    assert fate(samples, "votebox_acks_published_total") >= 3
    batches = fate(samples, "votebox_batch_messages_count")
    assert 1 <= batches <= 79
    assert fate(samples, "votebox_batch_messages_sum") == 79
    # Every vote the kiosks sent carries a timestamp (the 3 malformed ones are not votes).
    assert fate(samples, "votebox_publish_to_commit_seconds_count") == 60 + 12 + 3
    assert fate(samples, "votebox_receive_to_commit_seconds_count") == batches


async def test_the_processor_reports_its_cpu_and_memory_and_rarely_runs_the_collector(
    mosquitto_proc: ManagedProcess, spawn_processor: Callable[..., ManagedProcess], poll: Poll
) -> None:
    proc = spawn_processor(mosquitto_proc)
    before = scrape(proc)
    with Fleet(mosquitto_proc, poll.id, 4) as fleet:
        await asyncio.to_thread(fleet.cast, poll.id, 9000, lambda i: i % 3)
        await eventually(lambda: fleet.unacked() == 0, timeout_s=120)
    after = scrape(proc)
    assert fate(after, "votebox_votes_total", fate="accepted") == 9000
    young = [fate(s, "python_gc_collections_total", generation="0") for s in (before, after)]
    # With CPython's default threshold (700) the young collection ran about 20 times for these
    # votes (processor/service.py, tune_collector).
    assert 0 <= young[1] - young[0] <= 3, young
    assert fate(after, "process_cpu_seconds_total") > fate(before, "process_cpu_seconds_total")
    assert fate(after, "process_resident_memory_bytes") > 10_000_000


async def test_readiness_turns_false_while_redis_is_stopped_and_true_after_it_restarts(
    mosquitto_proc: ManagedProcess,
    redis_proc: ManagedProcess,
    spawn_processor: Callable[..., ManagedProcess],
) -> None:
    proc = spawn_processor(mosquitto_proc)
    status, body = readyz(proc)
    assert status == 200 and body["ready"] is True, body
    assert body["checks"] == {"mqtt": "ok", "redis": "ok", "intake": "ok"}
    shown = votebox_status(proc.url)
    assert shown.returncode == 0 and "READY" in shown.stdout, shown
    assert healthz(proc) == 200

    redis_proc.stop()
    try:
        status, body = readyz(proc)
        assert status == 503 and body["ready"] is False
        assert body["checks"]["redis"] != "ok" and body["checks"]["mqtt"] == "ok"
        shown = votebox_status(proc.url)
        assert shown.returncode == 1 and "NOT READY" in shown.stdout, shown
        assert "redis" in shown.stdout
        assert healthz(proc) == 200  # alive: a restart would not bring Redis back
    finally:
        redis_proc.start()

    def ready_again() -> bool:
        return readyz(proc)[0] == 200

    await eventually(ready_again, timeout_s=30)
    assert votebox_status(proc.url).returncode == 0


def test_votebox_status_exits_2_and_says_where_it_looked_when_nothing_answers() -> None:
    url = f"http://{HOST}:{free_port()}"
    shown = votebox_status(url)
    assert shown.returncode == 2
    assert f"{url}/readyz" in shown.stderr and "VOTEBOX_METRICS_PORT" in shown.stderr


async def _retained_stats(broker: ManagedProcess, client: str) -> tuple[bool, dict[str, Any]]:
    """A fresh subscriber's first ``votebox/stats`` message: (its retain flag, its body)."""
    is_retained, payload = await first_message(broker, STATS_TOPIC, client)
    return is_retained, json.loads(payload)


async def test_stats_topic_is_retained_and_current(
    broker: ManagedProcess,
    spawn_processor: Callable[..., ManagedProcess],
    poll: Poll,
    redis: Redis,
) -> None:
    spawn_processor(broker, VOTEBOX_STATS_INTERVAL_S="0.2", VOTEBOX_SILENT_AFTER_S="1.5")
    with Fleet(broker, poll.id, 2) as fleet:

        def send() -> None:
            for kiosk in fleet.kiosks:
                kiosk.report("status", b"online")
                for _ in range(5):
                    kiosk.vote(poll.id, 0)
                kiosk.vote(poll.id, 0, seq=1)
                kiosk.vote(poll.id, 9)
                kiosk.wait_published(30)

        await asyncio.to_thread(send)
        await eventually(lambda: sum(fleet.codes().values()) == 14)

    async def current() -> bool:
        retained, body = await _retained_stats(broker, f"{poll.id}-stats")
        return retained and body["polls"].get(poll.id, {}).get("accepted") == 10

    await eventually(current, timeout_s=20)
    retained, body = await _retained_stats(broker, f"{poll.id}-stats2")
    assert retained
    assert body["polls"][poll.id] == {
        "accepted": 10,
        "duplicate": 2,
        "rejected": 2,
        "superseded": 0,
        "suppressed": 0,
        "devices": 2,
    }
    assert body["rejected"]["unknown_option"] >= 2  # other tests' polls count too
    assert abs(body["ts_ms"] / 1000 - time.time()) < 5
    assert body["processor"]["connected"] is True

    # Both kiosks went quiet: after VOTEBOX_SILENT_AFTER_S they are listed as silent.
    kiosks = {kiosk.device for kiosk in fleet.kiosks}

    async def silent() -> bool:
        _, later = await _retained_stats(broker, f"{poll.id}-stats3")
        recent = [entry["device"] for entry in later["devices"]["silent_recent"]]
        return set(recent[:2]) == kiosks  # nobody else voted since: they went silent last

    await eventually(silent, timeout_s=20)


async def test_silent_means_says_online_and_nothing_came_not_quiet_or_switched_off(
    broker: ManagedProcess,
    spawn_processor: Callable[..., ManagedProcess],
    poll: Poll,
    redis: Redis,
) -> None:
    """docs/operations.md: a device is silent when it says it is online and nothing (vote,
    heartbeat, status) came from it for VOTEBOX_SILENT_AFTER_S. A kiosk that only heartbeats
    is not silent, nor is one that said offline; one that says online and goes quiet is."""
    # Last-seen times are written at most every 10 s a device (LAST_SEEN_EVERY_S): silence is
    # only told apart above that, as docs/operations.md says to set it.
    proc = spawn_processor(broker, VOTEBOX_STATS_INTERVAL_S="0.2", VOTEBOX_SILENT_AFTER_S="12")
    with Fleet(broker, poll.id, 3) as fleet:
        beating, switched_off, quiet = fleet.kiosks
        for kiosk in fleet.kiosks:
            kiosk.report("status", b"online")
            kiosk.vote(poll.id, 0)
        switched_off.report("status", b"offline")
        for kiosk in fleet.kiosks:
            kiosk.wait_published(30)
        mine = {k.device for k in fleet.kiosks}

        async def listed() -> set[str]:
            _, body = await _retained_stats(broker, f"{poll.id}-silent-{time.monotonic_ns()}")
            return {e["device"] for e in body["devices"]["silent_recent"]} & mine

        deadline = time.monotonic() + 60
        while await listed() != {quiet.device}:
            assert time.monotonic() < deadline, await listed()
            beating.report("heartbeat", encode_heartbeat(1, 0, 90))  # once a second
            await asyncio.sleep(1.0)
        # The gauge counts the same devices as the list (other tests' kiosks said no status).
        assert scrape(proc)[("votebox_devices_silent", ())] >= 1
        assert await redis.zscore(DEVICES_ONLINE, switched_off.device) is None
        assert await redis.zscore(DEVICES_ONLINE, beating.device) is not None


async def test_two_processors_share_the_votes_and_count_them_exactly(
    mosquitto_proc: ManagedProcess,
    spawn_processor: Callable[..., ManagedProcess],
    poll: Poll,
    redis: Redis,
) -> None:
    group = f"{poll.id[:40]}-g"
    procs = [spawn_processor(mosquitto_proc, VOTEBOX_MQTT_SHARE_GROUP=group) for _ in range(2)]
    with Fleet(mosquitto_proc, poll.id, 10) as fleet:

        def send() -> None:
            for i in range(2700):
                fleet.kiosks[i % 10].vote(poll.id, i % 3)
                if i % 9 == 8:
                    kiosk = fleet.kiosks[i % 10]
                    kiosk.vote(poll.id, 0, seq=kiosk.seq)  # a re-send: counted once
            for kiosk in fleet.kiosks:
                kiosk.wait_published(60)

        await asyncio.to_thread(send)
        await eventually(lambda: fleet.unacked() == 0, timeout_s=60)
    stored = (await read_results(redis, [poll.id]))[poll.id]
    assert stored.total == 2700
    fates, _ = await read_fates(redis, poll.id)
    assert (fates["accepted"], fates["duplicate"]) == (2700, 300)
    # Each processor took a share (Mosquitto round-robins a share group), and together
    # they saw every message once.
    shares = [fate(scrape(proc), "votebox_messages_total") for proc in procs]
    assert all(share > 0 for share in shares) and sum(shares) == 3000, shares


def test_the_stats_message_with_its_polls_kept_as_json_is_the_same_message() -> None:
    polls = {
        f"p-{k}": {"accepted": k, "devices": 1, "duplicate": 0, "rejected": 2, "superseded": 0,
                   "suppressed": 0}
        for k in (3, 1, 2)
    }  # fmt: skip
    stats = Stats(
        ts_ms=1,
        votes={"accepted": 6},
        rejected={"bad_topic": 1},
        polls=polls,
        influx_queue=0,
        devices_known=2,
        silent=[("k", 5)],
        silent_count=1,
    )
    kept = "{" + ",".join(
        f"{json.dumps(p)}:{json.dumps(polls[p], separators=(',', ':'), sort_keys=True)}"
        for p in sorted(polls)
    ) + "}"  # fmt: skip
    plain = stats.to_json(processor={"client_id": "x"})
    assert (
        dataclasses.replace(stats, polls_json=kept).to_json(processor={"client_id": "x"}) == plain
    )
    assert json.loads(plain)["polls"] == polls
