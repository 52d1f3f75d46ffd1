"""The triage of one batch, from a table of cases: no broker, no Redis."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from devices.encoder import encode_batch, encode_heartbeat, encode_vote
from processor.mqtt import Delivery
from processor.reasons import Reason
from processor.triage import PENDING_CODE, triage

P = PENDING_CODE


def d(topic: str, payload: bytes = b"", *, too_large: int = 0) -> Delivery:
    return Delivery(topic, payload, mid=1, qos=1, generation=1, too_large=too_large)


@dataclass(frozen=True)
class Case:
    name: str
    batch: list[Delivery]
    # (poll, device, seq) of each vote, in order.
    votes: list[tuple[str, str, int]] = field(default_factory=list)
    # Per device: (epoch, seq, code) in arrival order; P marks a vote's slot.
    acks: dict[str, list[tuple[int | None, int | None, int]]] = field(default_factory=dict)
    unattributed: dict[Reason, int] = field(default_factory=dict)
    seen: set[str] = field(default_factory=set)
    reports: dict[tuple[str, str], int] = field(default_factory=dict)
    limited: frozenset[str] = frozenset()


CASES = [
    Case(
        "one vote",
        [d("votes/p/k1", encode_vote(2, 17))],
        votes=[("p", "k1", 17)],
        acks={"k1": [(0, 17, P)]},
        seen={"k1"},
    ),
    Case(
        "a batch keeps its order, and a bad vote inside it gets its own entry in place",
        [d("votes/p/k1", encode_batch([encode_vote(0, 1), b"\xa1\x00\x02", encode_vote(1, 3)]))],
        votes=[("p", "k1", 1), ("p", "k1", 3)],
        acks={"k1": [(0, 1, P), (0, None, int(Reason.BAD_SCHEMA)), (0, 3, P)]},
        unattributed={Reason.BAD_SCHEMA: 1},
        seen={"k1"},
    ),
    Case(
        "devices are kept apart, slots follow arrival",
        [
            d("votes/p/k1", encode_vote(0, 1)),
            d("votes/q/k2", encode_vote(1, 9)),
            d("votes/p/k1", b"\xff"),
            d("votes/p/k1", encode_vote(0, 2)),
        ],
        votes=[("p", "k1", 1), ("q", "k2", 9), ("p", "k1", 2)],
        acks={
            "k1": [(0, 1, P), (None, None, int(Reason.MALFORMED)), (0, 2, P)],
            "k2": [(0, 9, P)],
        },
        unattributed={Reason.MALFORMED: 1},
        seen={"k1", "k2"},
    ),
    Case(
        "a topic outside the contract: answered when a device can be named",
        [d("votes/bad poll/k1", encode_vote(0, 1)), d("votes/p/bad device", b"")],
        acks={"k1": [(None, None, int(Reason.BAD_TOPIC))]},
        unattributed={Reason.BAD_TOPIC: 2},
    ),
    Case(
        "an account of votebox's own is no device: refused, unanswered, unseen",
        [d("votes/p/dashboard", encode_vote(0, 1)), d("devices/processor/status", b"online")],
        unattributed={Reason.BAD_TOPIC: 1},
        reports={("status", "refused"): 1},
    ),
    Case(
        "over the rate: not read, and the device is still heard from",
        [d("votes/p/k1", encode_vote(0, 1)), d("votes/p/k2", encode_vote(0, 1))],
        votes=[("p", "k2", 1)],
        acks={"k1": [(None, None, int(Reason.RATE_LIMITED))], "k2": [(0, 1, P)]},
        unattributed={Reason.RATE_LIMITED: 1},
        seen={"k1", "k2"},
        limited=frozenset({"k1"}),
    ),
    Case(
        "a message read past for its size",
        [d("votes/p/k1", too_large=70_000)],
        acks={"k1": [(None, None, int(Reason.TOO_LARGE))]},
        unattributed={Reason.TOO_LARGE: 1},
        seen={"k1"},
    ),
    Case(
        "device reports: recorded, refused, and a cleared status ignored",
        [
            d("devices/k1/status", b"online"),
            d("devices/k1/heartbeat", encode_heartbeat(60, 2, 80)),
            d("devices/k2/heartbeat", b"\xff"),
            d("devices/k3/status", b""),
        ],
        reports={
            ("status", "recorded"): 1,
            ("heartbeat", "recorded"): 1,
            ("heartbeat", "refused"): 1,
        },  # fmt: skip
        seen={"k1"},  # a recorded report is a sign of life; a refused one is not
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_triage(case: Case) -> None:
    t = triage(case.batch, allow=lambda device: device not in case.limited)
    assert [(v.poll, v.device, v.seq) for v in t.votes] == case.votes
    assert {dev: [(e.epoch, e.seq, e.code) for e in es] for dev, es in t.acks.items()} == (
        case.acks
    )
    for (device, slot), vote in zip(t.slots, t.votes, strict=True):
        assert (t.acks[device][slot].seq, t.acks[device][slot].code) == (vote.seq, P)
    assert dict(t.unattributed) == case.unattributed
    assert t.seen == case.seen
    assert dict(t.reports.outcomes) == case.reports
    assert t.reports.count == sum(1 for x in case.batch if x.topic.startswith("devices/"))


def test_reports_keep_each_devices_latest_as_the_json_votebox_devices_reads() -> None:
    t = triage(
        [
            d("devices/k1/heartbeat", encode_heartbeat(10, 5, 90)),
            d("devices/k1/heartbeat", encode_heartbeat(20, 0, 89)),
            d("devices/k1/status", b"offline"),
        ]
    )
    assert t.reports.latest(now_ms=7) == {
        "votebox:devices:status": {"k1": '{"state":"offline","at_ms":7}'},
        "votebox:devices:health": {"k1": '{"uptime_s":20,"outbox":0,"battery":89,"at_ms":7}'},
    }
