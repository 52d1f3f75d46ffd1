"""The hot path's records built field by field: ``tuple.__new__(Record, (fields in order))``
skips the NamedTuple's generated ``__new__`` (processor/codec.py, Vote). A field added or
moved in a record would go unseen there, so each such record built the fast way must equal
the one its constructor builds from the fields by name."""

from __future__ import annotations

import re

from devices.encoder import encode_vote
from processor.codec import AckEntry, Vote, decode_message
from processor.influx.line_protocol import QueuedPoint, points_of_entry
from processor.mqtt import Delivery
from processor.mqtt_packets import PUBLISH, Incoming, parse_packets, publish
from processor.triage import PENDING_CODE, triage
from tests.conftest import REPO

# Each place that builds a record the fast way, by the record it builds. A new one needs a
# case below.
FAST_PATHS = {
    "processor/codec.py": ["Vote"],
    "processor/mqtt_packets.py": ["Incoming"],
    "processor/mqtt.py": ["Delivery"],
    "processor/triage.py": ["AckEntry"],
    "processor/service.py": ["AckEntry"],
    "processor/influx/line_protocol.py": ["QueuedPoint"],
}


def test_every_fast_path_is_one_this_file_covers() -> None:
    found: dict[str, list[str]] = {}
    for path in sorted((REPO / "processor").rglob("*.py")):
        code = "\n".join(line.split("#")[0] for line in path.read_text().splitlines())
        # Not the one the docstrings show (``tuple.__new__(Record, ...)``).
        names = re.findall(r"(?<!``)tuple\.__new__\(\s*(\w+)\s*,", code)
        if names:
            found[str(path.relative_to(REPO))] = names
    assert found == FAST_PATHS


def test_the_field_orders_the_fast_paths_write() -> None:
    # The tuples in FAST_PATHS' places are written in these orders: a field moved or added in
    # a record fails here first, and the place must then be changed with it.
    assert Vote._fields == (
        "poll", "device", "choice", "seq", "epoch", "ts_s", "voter", "receipt",
    )  # fmt: skip
    assert AckEntry._fields == ("epoch", "seq", "code", "receipt")
    assert Incoming._fields == (
        "kind", "mid", "topic", "payload", "qos", "code", "session_present", "codes",
        "properties", "oversized", "skip",
    )  # fmt: skip
    assert Delivery._fields == (
        "topic", "payload", "mid", "qos", "generation", "received_s", "too_large",
    )  # fmt: skip
    assert QueuedPoint._fields == (
        "stream_id", "poll", "device", "epoch", "seq", "option", "ts_s", "source",
        "withdrawn", "site", "entry", "link", "head",
    )  # fmt: skip


def test_a_decoded_vote_equals_the_one_built_by_name() -> None:
    payload = encode_vote(choice=2, seq=7, epoch=3, ts=1_765_000_000, voter=b"v", receipt=True)
    (vote,) = decode_message(payload, poll="p", device="d")
    assert vote == Vote(poll="p", device="d", choice=2, seq=7, epoch=3, ts_s=1_765_000_000,
                        voter=b"v", receipt=True)  # fmt: skip
    assert isinstance(vote, Vote) and vote.ts_s == 1_765_000_000 and vote.receipt


def test_a_parsed_publish_equals_the_one_built_by_name() -> None:
    for v5 in (False, True):
        buffer = bytearray(publish("votes/p/d", b"xyz", qos=1, retain=False, mid=9, v5=v5))
        (packet,) = parse_packets(buffer, v5=v5)
        assert packet == Incoming(kind=PUBLISH, mid=9, topic=b"votes/p/d", payload=b"xyz", qos=1)


def test_a_triaged_ack_entry_equals_the_one_built_by_name() -> None:
    payload = encode_vote(choice=1, seq=5, epoch=2)
    delivery = Delivery(topic="votes/p/d", payload=payload, mid=1, qos=1, generation=0)
    out = triage([delivery])
    assert out.acks["d"] == [AckEntry(epoch=2, seq=5, code=PENDING_CODE, receipt=None)]


def test_a_queued_point_equals_the_one_built_by_name() -> None:
    packed = b"d\t3\t7\t1\t1765000000\tdevice\t1\thall"
    (point,) = points_of_entry("p", b"1-0", {b"n": b"1", b"p": packed})
    assert point == QueuedPoint(
        stream_id="1-0", poll="p", device="d", epoch=3, seq=7, option=1, ts_s=1_765_000_000,
        source="device", withdrawn=True, site="hall",
    )  # fmt: skip
    # The chain's fields: the link after entry 10 has 2 entries; this point starts the second.
    chained = b"x\t0\t1\t0\t1765000000\tdevice\t\thall\t+\n" + packed + b"\t+"
    head = b"ab" * 20
    fields = {b"n": b"2", b"p": chained, b"c": b"10", b"m": b"2", b"h": head}
    (_, point) = points_of_entry("p", b"1-0", fields)
    assert point == QueuedPoint(
        stream_id="1-0", poll="p", device="d", epoch=3, seq=7, option=1, ts_s=1_765_000_000,
        source="device", withdrawn=True, site="hall", entry=12, link=11, head="ab" * 20,
    )  # fmt: skip
