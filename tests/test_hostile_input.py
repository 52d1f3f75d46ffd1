"""Hostile payloads at the running pipeline: 10,000 and more, with valid votes interleaved."""

from __future__ import annotations

import asyncio
import random
import struct
import time
from collections import Counter
from collections.abc import Callable

import pytest
from redis.asyncio import Redis

from devices.encoder import encode_vote
from harness.services import ManagedProcess, rss_mb
from processor.codec import MAX_PAYLOAD_BYTES
from processor.poll import Poll
from processor.poll_store import read_fates, read_results
from processor.reasons import Reason
from tests.conftest import eventually
from tests.fleet import Fleet

pytestmark = pytest.mark.e2e


def hostile_payloads(rng: random.Random) -> list[tuple[str, bytes]]:
    """(kind, payload) pairs that are never a valid vote, of every kind docs/protocol.md lists."""
    vote = encode_vote(1, 7, ts=1_767_225_600)
    kinds: list[tuple[str, Callable[[], bytes]]] = [
        ("truncated", lambda: vote[: rng.randint(1, len(vote) - 1)]),
        # A byte string, an array and a map declaring 2^63 items or bytes: a decoder that
        # believes them allocates or loops forever.
        (
            "huge byte string",
            lambda: b"\xa2\x00" + b"\x5b" + struct.pack(">Q", 2**63) + b"\x01\x01",
        ),
        ("huge array", lambda: b"\x9b" + struct.pack(">Q", 2**63 - 1) + b"\x00"),
        ("huge map", lambda: b"\xbb" + struct.pack(">Q", 2**62) + b"\x00\x00"),
        ("10,000-deep nesting", lambda: b"\x81" * 10_000 + b"\x00"),
        ("4,000-deep nesting", lambda: b"\x81" * 4_000 + b"\x00"),
        ("invalid UTF-8", lambda: b"\xa2\x00\x63\xff\xfe\xfd\x01\x01"),
        ("duplicate key", lambda: b"\xa3\x00\x01\x01\x02\x00\x02"),
        ("NaN", lambda: b"\xa2\x00\xf9\x7e\x00\x01\x11"),
        ("bignum", lambda: b"\xa2\x00\xc2\x49" + bytes(9) + b"\x01\x11"),
        ("unknown tag", lambda: b"\xd8\xff" + vote),
        ("self-describe tag", lambda: b"\xd9\xd9\xf7" + vote),
        ("text choice", lambda: b"\xa2\x00\x61\x61\x01\x11"),
        ("float seq", lambda: b"\xa2\x00\x01\x01\xfb" + struct.pack(">d", 1.5)),
        ("negative seq", lambda: b"\xa2\x00\x01\x01\x20"),
        ("indefinite map", lambda: b"\xbf\x00\x01\x01\x11\xff"),
        ("oversize", lambda: b"\x81" + bytes(MAX_PAYLOAD_BYTES + rng.randint(1, 2000))),
        ("break code first", lambda: b"\xff" + rng.randbytes(rng.randint(0, 60))),
        ("empty", lambda: b""),
        ("batch of 300", lambda: b"\x99\x01\x2c" + vote * 300),
    ]
    return [(name, make()) for name, make in kinds]


async def test_ten_thousand_hostile_payloads_are_each_rejected_and_valid_votes_count_exactly(
    broker: ManagedProcess, processor_proc: ManagedProcess, poll: Poll, redis: Redis
) -> None:
    rng = random.Random(2026)
    rss_before = rss_mb(processor_proc.pid)
    _, unattributed_before = await read_fates(redis, poll.id)
    sent_bad: Counter[str] = Counter()
    valid = 0
    with Fleet(broker, poll.id, 6) as fleet:
        attackers, kiosks = fleet.kiosks[:3], fleet.kiosks[3:]

        def send() -> None:
            nonlocal valid
            for round_ in range(500):
                for name, payload in hostile_payloads(rng):
                    attackers[round_ % 3].publish_raw(poll.id, payload)
                    sent_bad[name] += 1
                for kiosk in kiosks:  # valid votes interleaved, from devices of their own
                    kiosk.vote(poll.id, round_ % 3)
                    valid += 1
                attackers[round_ % 3].vote(poll.id, 2)  # and from the attackers too
                valid += 1
            for kiosk in fleet.kiosks:
                kiosk.wait_published(120)

        await asyncio.to_thread(send)
        n_bad = sum(sent_bad.values())
        assert n_bad >= 10_000

        await eventually(lambda: sum(fleet.codes().values()) >= n_bad + valid, timeout_s=120)
        codes = fleet.codes()
        assert fleet.unacked() == 0  # every valid vote was answered
    assert codes[0] == valid  # counted, exactly
    rejected = {Reason(c).code: n for c, n in codes.items() if c >= 16}
    assert sum(rejected.values()) == n_bad, rejected  # each hostile payload: a reason
    assert set(rejected) <= {
        "too_large",
        "malformed",
        "forbidden_item",
        "duplicate_key",
        "bad_schema",
        "out_of_range",
        "batch_too_large",
    }
    results = (await read_results(redis, [poll.id]))[poll.id]
    assert results.total == valid
    _, unattributed = await read_fates(redis, poll.id)
    grew = sum(unattributed.values()) - sum(unattributed_before.values())
    assert grew == n_bad  # and each was counted in Redis, by reason
    # Memory stays bounded: the hostile stream passed through without piling up.
    assert processor_proc.proc is not None and processor_proc.proc.poll() is None
    assert rss_mb(processor_proc.pid) - rss_before < 60


async def test_a_flooding_device_is_rate_limited_and_others_are_untouched(
    mosquitto_proc: ManagedProcess,
    spawn_processor: Callable[..., ManagedProcess],
    poll: Poll,
    redis: Redis,
) -> None:
    spawn_processor(mosquitto_proc, VOTEBOX_DEVICE_RATE="200", VOTEBOX_DEVICE_BURST="100")
    with Fleet(mosquitto_proc, poll.id, 4) as fleet:
        flood, others = fleet.kiosks[0], fleet.kiosks[1:]

        def send() -> None:
            for i in range(2000):
                flood.vote(poll.id, 0)
                if i % 40 == 0:
                    for kiosk in others:
                        kiosk.vote(poll.id, 1)  # 50 each, well inside the rate
            for kiosk in fleet.kiosks:
                kiosk.wait_published(60)

        await asyncio.to_thread(send)
        await eventually(lambda: sum(fleet.codes().values()) >= 2000 + 150, timeout_s=60)
        codes = fleet.codes()
        limited = codes[int(Reason.RATE_LIMITED)]
        assert limited >= 1000  # most of the flood was refused unread ...
        assert all(not kiosk.outbox for kiosk in others)  # ... and nobody else was
        assert len(flood.outbox) == limited  # the refused votes wait in the flood's outbox

        # Sent again at a pace the rate allows, every one counts, once.
        def resend_slowly() -> None:
            while flood.outbox:
                flood.resend_outbox(limit=150)
                time.sleep(1.0)

        await asyncio.wait_for(asyncio.to_thread(resend_slowly), timeout=120)
    results = (await read_results(redis, [poll.id]))[poll.id]
    assert results.counts == (2000, 150, 0)
