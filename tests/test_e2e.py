"""End to end through each broker: kiosks -> broker -> processor -> Redis -> retained results."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from redis.asyncio import Redis

from harness.services import ManagedProcess
from processor.commands.watch import results_stream, wait_for_results
from processor.poll import Poll
from processor.poll_store import read_fates, read_results
from tests.fleet import Fleet, results_url

pytestmark = pytest.mark.e2e


async def test_ten_thousand_votes_with_repeats_and_garbage_are_counted_exactly(
    broker: ManagedProcess, processor_proc: ManagedProcess, poll: Poll, redis: Redis
) -> None:
    rng = random.Random(7)
    expected = Counter[int]()
    repeats = garbage = 0
    cast: dict[tuple[str, int], int] = {}  # (device, seq) -> choice
    with Fleet(broker, poll.id, 20) as fleet:

        def send() -> int:
            nonlocal repeats, garbage
            for i in range(10_000):
                kiosk = fleet.kiosks[i % 20]
                roll = rng.random()
                if roll < 0.1 and kiosk.seq > 0:
                    # A re-send, as a device makes it: the same vote again. (Whichever copy
                    # arrives first counts: a broker may redeliver out of order.)
                    seq = rng.randint(1, kiosk.seq)
                    kiosk.vote(poll.id, cast[(kiosk.device, seq)], seq=seq)
                    repeats += 1
                elif roll < 0.13:
                    kiosk.publish_raw(poll.id, rng.randbytes(rng.randint(1, 40)) + b"\xff")
                    garbage += 1
                else:
                    choice = rng.choices([0, 1, 2], weights=[5, 3, 2])[0]
                    cast[(kiosk.device, kiosk.vote(poll.id, choice))] = choice
                    expected[choice] += 1
            return sum(kiosk.wait_published(60) for kiosk in fleet.kiosks)

        assert await asyncio.to_thread(send) == 10_000
        total = sum(expected.values())
        # A fresh subscriber, as a dashboard: the retained result must reach the exact counts.
        document = await wait_for_results(
            results_url(broker), poll.id, lambda d: d["total"] >= total, timeout_s=90
        )
        assert document["counts"] == [expected[0], expected[1], expected[2]]
        assert document["total"] == total
        assert document["labels"] == list(poll.labels) and document["state"] == "open"
        stored = (await read_results(redis, [poll.id]))[poll.id]
        assert stored.counts == (expected[0], expected[1], expected[2])
        assert stored.version == document["version"]

        # Every message got its ack: garbage is rejected (it may by chance decode as a vote for
        # option 0..2 with a fresh seq, so count by fate, not by kind of message).
        async def all_acked() -> bool:
            return sum(fleet.codes().values()) >= 10_000

        deadline = asyncio.get_running_loop().time() + 60
        while not await all_acked():
            assert asyncio.get_running_loop().time() < deadline, fleet.codes()
            await asyncio.sleep(0.1)
        codes = fleet.codes()
        assert fleet.unacked() == 0
        assert codes[0] == total
        # amqtt may deliver a vote twice (docs/brokers.md: its 5 s PUBACK timeout): how often
        # is its own affair, and each such copy must be answered "duplicate" and counted once
        # (codes[0] above, the fates below). Mosquitto delivers each once.
        redelivered = codes[1] - repeats
        if broker.name == "mosquitto":
            assert redelivered == 0
        assert sum(n for code, n in codes.items() if code >= 16) == garbage
        fates, unattributed = await read_fates(redis, poll.id)
        assert fates["accepted"] == total and fates["duplicate"] == repeats + redelivered
        assert sum(unattributed.values()) >= garbage  # other tests add theirs


async def test_results_are_retained_for_a_late_subscriber(
    broker: ManagedProcess, processor_proc: ManagedProcess, poll: Poll
) -> None:
    with Fleet(broker, poll.id, 1) as fleet:
        fleet.kiosks[0].vote(poll.id, 2)
        document = await wait_for_results(
            results_url(broker), poll.id, lambda d: d["total"] == 1, timeout_s=30
        )
    # A second, later subscriber gets the same document at once, from the retained message.
    again = await wait_for_results(results_url(broker), poll.id, lambda d: True, timeout_s=5)
    assert again == document and again["counts"] == [0, 0, 1]


async def test_results_are_coalesced_and_versions_only_grow(
    broker: ManagedProcess,
    poll: Poll,
    spawn_processor: Callable[..., ManagedProcess],
) -> None:
    spawn_processor(broker, VOTEBOX_RESULTS_INTERVAL_S="0.5")
    seen: list[dict[str, Any]] = []
    with Fleet(broker, poll.id, 5) as fleet:

        async def collect() -> None:
            async for document in results_stream(results_url(broker), poll.id):
                seen.append(document)
                if document["total"] == 1000:
                    return

        async with asyncio.timeout(60):
            async with asyncio.TaskGroup() as tg:
                collector = tg.create_task(collect())
                await asyncio.sleep(0.5)  # subscribed before the burst
                started = asyncio.get_running_loop().time()

                def burst() -> None:
                    for i in range(1000):
                        fleet.kiosks[i % 5].vote(poll.id, i % 3)
                        if i % 100 == 99:
                            time.sleep(0.2)  # ~2 s of steady voting

                await asyncio.to_thread(burst)
                await collector
                elapsed = asyncio.get_running_loop().time() - started
    live = [d for d in seen if d["total"] > 0]
    # One publish per 0.5 s interval at most, plus the one that follows the last vote.
    assert 1 <= len(live) <= elapsed / 0.5 + 2, [d["total"] for d in live]
    versions = [d["version"] for d in live]
    assert versions == sorted(set(versions))
    assert live[-1]["counts"] == [334, 333, 333]
