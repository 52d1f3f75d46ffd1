"""The device client against a real broker and processor: offline buffering, a device killed
with a full outbox, the fleet simulator's summary, device health and the kiosk's screen."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import pytest
from redis.asyncio import Redis

from devices.client import DeviceClient, DeviceConfig
from devices.fleet_loop import running_together
from devices.outbox import Outbox
from harness.services import ManagedProcess
from processor.keys import DEVICES_HEALTH, DEVICES_STATUS, PollKeys
from processor.poll import Poll
from processor.poll_store import read_fates, read_results
from processor.store import redis_text
from tests.conftest import REPO, eventually

pytestmark = pytest.mark.e2e


def _config(broker: ManagedProcess, device: str, **overrides: Any) -> DeviceConfig:
    # Short timers, so that the test does not wait for a firmware's minute-long ones.
    base: dict[str, Any] = {
        "device": device,
        "port": broker.port,
        "heartbeat_s": 0.5,
        "backoff_base_s": 0.2,
        "backoff_cap_s": 1.0,
        "ack_timeout_s": 6.0,
        "tick_s": 0.1,
    }
    return DeviceConfig(**(base | overrides))


async def _report(redis: Redis, key: str, device: str) -> dict[str, Any]:
    raw = await redis.hget(key, device)
    return json.loads(redis_text(raw)) if raw is not None else {}


async def _total(redis: Redis, poll: str) -> int:
    return (await read_results(redis, [poll]))[poll].total


async def test_a_device_offline_for_the_first_half_counts_every_vote_once(
    broker: ManagedProcess, processor_proc: ManagedProcess, poll: Poll, redis: Redis, tmp_path: Path
) -> None:
    device = f"{poll.id[:50]}-k"
    outbox = Outbox(tmp_path / "kiosk.outbox")
    client = DeviceClient(_config(broker, device), outbox, battery=lambda: 77)
    expected: Counter[int] = Counter()
    client.drop_network()  # no Wi-Fi from the start
    with client.running():
        for i in range(30):
            client.press(poll.id, i % 3)
            expected[i % 3] += 1
            await asyncio.sleep(0.01)
        assert not client.connected and outbox.depth() == 30
        assert client.messages_sent == 0

        client.restore_network()
        assert await asyncio.to_thread(client.wait_connected, 30)
        for i in range(30):
            client.press(poll.id, (i * 7) % 3)
            expected[(i * 7) % 3] += 1
            await asyncio.sleep(0.01)
        assert await asyncio.to_thread(client.wait_drained, 60)
        # The thirty that waited went out as batches, not one message each.
        assert client.messages_sent < client.votes_sent

        async def heartbeat_says_empty() -> bool:
            beat = await _report(redis, DEVICES_HEALTH, device)
            return beat.get("outbox") == 0 and beat.get("battery") == 77

        await eventually(heartbeat_says_empty, timeout_s=20)
        assert (await _report(redis, DEVICES_STATUS, device))["state"] == "online"

    results = (await read_results(redis, [poll.id]))[poll.id]
    assert results.total == 60
    assert results.counts == (expected[0], expected[1], expected[2])
    fates, _ = await read_fates(redis, poll.id)
    assert fates["accepted"] == 60
    answered = outbox.fates()
    assert answered[0] + answered[1] == 60 and set(answered) <= {0, 1}

    async def says_offline() -> bool:
        # A clean stop publishes "offline" itself (a DISCONNECT suppresses the last will).
        return (await _report(redis, DEVICES_STATUS, device)).get("state") == "offline"

    await eventually(says_offline, timeout_s=20)
    outbox.close()


def _button(
    broker: ManagedProcess, device: str, poll: str, store: Path, *args: str
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "processor.cli", "button", device, "--poll", poll]
        + ["--option", "1", "--broker", f"mqtt://127.0.0.1:{broker.port}"]
        + ["--store", str(store), "--heartbeat", "1", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
    )


def _read_until(stream: IO[str], done: Callable[[list[str]], bool], timeout_s: float) -> list[str]:
    """Lines from a device process until ``done(lines)``; fails after ``timeout_s``."""
    lines: list[str] = []
    deadline = time.monotonic() + timeout_s
    while not done(lines):
        assert time.monotonic() < deadline, lines[-20:]
        line = stream.readline()
        assert line, f"the device process ended early: {lines[-20:]}"
        lines.append(line)
    return lines


def _seqs(lines: list[str], kind: str) -> list[int]:
    return [int(m.group(1)) for line in lines if (m := re.match(rf"{kind} .*seq=(\d+)", line))]


def _kill(proc: subprocess.Popen[str]) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.stdout is not None
    proc.stdout.close()


async def test_a_device_killed_with_a_full_outbox_loses_no_vote_and_repeats_no_seq(
    broker: ManagedProcess,
    spawn_processor: Callable[..., ManagedProcess],
    poll: Poll,
    redis: Redis,
    tmp_path: Path,
) -> None:
    device, store = f"{poll.id[:50]}-b", tmp_path / "button.outbox"
    # No processor yet: the broker takes the votes, nobody answers, the outbox keeps them.
    first = _button(broker, device, poll.id, store, "--presses", "5", "--drain", "600")
    assert first.stdout is not None
    lines = await asyncio.to_thread(
        _read_until, first.stdout, lambda ls: len(_seqs(ls, "stored")) == 5, 60
    )
    _kill(first)
    assert _seqs(lines, "stored") == [1, 2, 3, 4, 5]
    left = Outbox(store)
    assert left.depth() == 5
    left.close()

    spawn_processor(broker)
    second = _button(broker, device, poll.id, store, "--presses", "3", "--drain", "60")
    out, _ = await asyncio.to_thread(second.communicate, timeout=90)
    assert second.returncode == 0, out
    assert "5 votes waiting" in out
    assert _seqs(out.splitlines(), "stored") == [6, 7, 8]  # never 1-5 again
    assert sorted(_seqs(out.splitlines(), "answered")) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert await _total(redis, poll.id) == 8
    assert (await read_fates(redis, poll.id))[0]["accepted"] == 8


async def test_a_device_killed_at_any_moment_of_a_stream_counts_each_stored_vote_once(
    broker: ManagedProcess,
    processor_proc: ManagedProcess,
    poll: Poll,
    redis: Redis,
    tmp_path: Path,
) -> None:
    device, store = f"{poll.id[:50]}-s", tmp_path / "button.outbox"
    args = ("--presses", "400", "--interval", "0.002", "--drain", "600")

    def unanswered(lines: list[str]) -> bool:
        answered = _seqs(lines, "answered")
        return len(answered) >= 40 and bool(set(_seqs(lines, "stored")) - set(answered))

    waiting = 0
    for _ in range(5):  # until a kill lands while votes are on their way
        first = _button(broker, device, poll.id, store, *args)
        assert first.stdout is not None
        await asyncio.to_thread(_read_until, first.stdout, unanswered, 60)
        _kill(first)  # mid-stream: votes stored, some sent, some answered

        async def will_published() -> bool:
            # The broker saw the connection die without a DISCONNECT: its last will.
            return (await _report(redis, DEVICES_STATUS, device)).get("state") == "offline"

        await eventually(will_published, timeout_s=60)
        await redis.hdel(DEVICES_STATUS, device)
        left = Outbox(store)
        stored, waiting = left.last_seq, left.depth()
        left.close()
        if waiting:
            break
    assert waiting > 0, "every kill came after the outbox had drained"

    second = _button(broker, device, poll.id, store, "--presses", "0", "--drain", "60")
    out, _ = await asyncio.to_thread(second.communicate, timeout=90)
    assert second.returncode == 0, out
    assert await _total(redis, poll.id) == stored
    assert (await read_fates(redis, poll.id))[0]["accepted"] == stored


async def test_the_simulator_summary_agrees_with_the_results_and_redis(
    broker: ManagedProcess,
    redis_proc: ManagedProcess,
    processor_proc: ManagedProcess,
    poll: Poll,
    redis: Redis,
    tmp_path: Path,
) -> None:
    prefix = f"{poll.id[:40]}-sim"
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "processor.cli", "simulate"]
        + ["--mqtt-url", f"mqtt://127.0.0.1:{broker.port}", "--poll", poll.id]
        + ["--devices", "40", "--rate", "200", "--duration", "6", "--offline-fraction", "0.25"]
        + ["--seed", "3", "--prefix", prefix, "--store-dir", str(tmp_path / "fleet")]
        + ["--redis-url", redis_proc.url],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    match = re.search(
        r"sent (\d+): accepted (\d+), duplicate (\d+), rejected (\d+).*still queued (\d+)",
        result.stdout,
    )
    assert match, result.stdout
    sent, accepted, duplicate, rejected, queued = map(int, match.groups())
    assert (rejected, queued) == (0, 0) and sent == accepted + duplicate
    assert sent == 1200  # 200 a second for 6 s
    assert "10 devices went offline and came back" in result.stdout
    assert f"results topic: total 0 -> {sent} (+{sent}); counted {sent}: agrees" in result.stdout
    assert f"redis: total 0 -> {sent} (+{sent}); counted {sent}: agrees" in result.stdout
    assert await _total(redis, poll.id) == sent
    assert (await read_fates(redis, poll.id))[0]["accepted"] == sent

    listed = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "processor.cli", "devices", "--json"]
        + ["--redis-url", redis_proc.url],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert listed.returncode == 0, listed.stderr
    mine = [
        d
        for line in listed.stdout.splitlines()
        if (d := json.loads(line))["device"].startswith(prefix)
    ]
    assert len(mine) == 40
    # Every kiosk ended cleanly, and reported its health at least once on the way.
    assert {d["state"] for d in mine} == {"offline"}
    assert all(d["outbox"] is not None and 0 <= d["battery"] <= 100 for d in mine)


async def test_a_kiosk_shows_the_retained_poll_and_votes_what_is_typed(
    broker: ManagedProcess, processor_proc: ManagedProcess, poll: Poll, redis: Redis, tmp_path: Path
) -> None:
    device = f"{poll.id[:50]}-t"
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "processor.cli", "kiosk", device, "--poll", poll.id]
        + ["--broker", f"mqtt://127.0.0.1:{broker.port}", "--store", str(tmp_path / "k.outbox")],
        input="3\n7\nblue\n1\n",
        capture_output=True,
        text=True,
        timeout=90,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert f"{poll.title}   [open]" in out and "3) blue" in out
    refused = [line for line in out.splitlines() if line.startswith("? ")]
    assert len(refused) == 2  # 7 and "blue" are not options; nothing is sent for them
    assert _seqs(out.splitlines(), "stored") == [1, 2]
    assert "every vote answered" in out
    assert (await read_results(redis, [poll.id]))[poll.id].counts == (1, 0, 1)


async def test_one_loop_runs_devices_whose_sockets_select_cannot_watch(
    broker: ManagedProcess, processor_proc: ManagedProcess, poll: Poll, redis: Redis, tmp_path: Path
) -> None:
    # A big fleet's sockets are numbered beyond select()'s 1024: fill the low numbers first,
    # after a collection, so that no garbage of earlier tests frees a low number meanwhile.
    gc.collect()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    filler = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        clients = [
            DeviceClient(_config(broker, f"{poll.id[:50]}-f{i}"), Outbox(tmp_path / f"{i}.outbox"))
            for i in range(3)
        ]
        with running_together(clients, tick_s=0.1):
            for client in clients:
                assert await asyncio.to_thread(client.wait_connected, 15)
                assert client.mqtt.socket().fileno() >= 1024  # type: ignore[union-attr]
            for i, client in enumerate(clients):
                for _ in range(i + 1):
                    client.press(poll.id, i)
            for client in clients:
                assert await asyncio.to_thread(client.wait_drained, 30)
        assert (await read_results(redis, [poll.id]))[poll.id].counts[:3] == (1, 2, 3)

        async def all_offline() -> bool:  # each said so itself before its clean DISCONNECT
            reports = [await _report(redis, DEVICES_STATUS, c.config.device) for c in clients]
            return all(report.get("state") == "offline" for report in reports)

        await eventually(all_offline)
        for client in clients:
            client.outbox.close()
    finally:
        for fd in filler:
            os.close(fd)


async def test_a_day_of_offline_votes_replayed_with_a_batch_lost_is_never_seq_too_old(
    mosquitto_proc: ManagedProcess,
    spawn_processor: Callable[..., ManagedProcess],
    poll: Poll,
    redis: Redis,
    tmp_path: Path,
) -> None:
    """10,000 stored votes, more than the 4,096-seq de-duplication window; the first batch
    sent is lost on the way. The device never has a vote outstanding 4,096 or more above its
    oldest unanswered one (docs/protocol.md, De-duplication), so the lost batch, sent again
    after its ack timeout, is still inside the window: counted, not seq_too_old."""
    spawn_processor(mosquitto_proc)
    device = f"{poll.id[:50]}-k"
    outbox = Outbox(tmp_path / "kiosk.outbox")
    for i in range(10_000):
        outbox.add(poll.id, i % 3)
    client = DeviceClient(
        _config(mosquitto_proc, device, ack_timeout_s=3.0, in_flight_votes=1024), outbox
    )
    real_publish = client.mqtt.publish
    lost: list[str] = []

    def publish_losing_the_first_batch(topic: str, payload: bytes, **options: Any) -> Any:
        if topic.startswith("votes/") and not lost:
            lost.append(topic)  # it never reaches the broker; the device does not know
            return None
        return real_publish(topic, payload, **options)

    client.mqtt.publish = publish_losing_the_first_batch  # type: ignore[method-assign,assignment]
    with client.running():
        assert await asyncio.to_thread(client.wait_drained, 120)
    fates = outbox.fates()
    assert lost and fates == Counter({0: 10_000}), fates
    assert await _total(redis, poll.id) == 10_000


async def test_a_device_whose_epoch_the_processor_knows_higher_moves_past_it_and_counts(
    broker: ManagedProcess,
    processor_proc: ManagedProcess,
    poll: Poll,
    redis: Redis,
    tmp_path: Path,
) -> None:
    """Rule 2: a device whose clock was 12 days ahead when an earlier store was made. The
    processor knows that epoch, so the new store's votes are answered stale_epoch; the device
    keeps them, moves to higher epochs (steps doubling, one transaction each) and each vote
    counts once, its seqs never repeated within an epoch."""
    device = f"{poll.id[:50]}-k"
    ahead = int(time.time()) + 1_000_000
    await redis.hset(PollKeys(poll.id).devices, device, f"{ahead}:5")
    outbox = Outbox(tmp_path / "kiosk.outbox")
    client = DeviceClient(_config(broker, device), outbox)
    with client.running():
        for i in range(5):
            client.press(poll.id, i % 3)
        assert await asyncio.to_thread(client.wait_drained, 90)
    assert outbox.epoch > ahead
    assert outbox.fates()[27] == 0 and outbox.fates()[0] == 5
    results = (await read_results(redis, [poll.id]))[poll.id]
    assert results.total == 5 and results.counts == (2, 2, 1)
    reopened = Outbox(tmp_path / "kiosk.outbox")  # the epoch and its seqs survive a restart
    assert (reopened.epoch, reopened.last_seq) == (outbox.epoch, outbox.last_seq)
