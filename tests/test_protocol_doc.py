"""docs/protocol.md is the contract: its example tables are checked here byte for byte, both by
the processor's codec and by the device side's minimal encoder."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import cbor2
import pytest

from devices.ack import decode_ack, read_ack
from devices.encoder import encode_batch, encode_heartbeat, encode_vote
from processor.codec import AckEntry, Heartbeat, Vote, decode_heartbeat, decode_message, encode_ack
from processor.errors import VoteRejected
from processor.reasons import Fate, Reason

DOC = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"


def _table(heading: str) -> list[list[str]]:
    """The rows of the first table under ``### heading`` (or ``## heading``), cells stripped."""
    text = DOC.read_text()
    match = re.search(rf"^#+ {re.escape(heading)}\n(.*?)(?=^#)", text, re.S | re.M)
    assert match, f"no section {heading!r} in {DOC}"
    rows = [line for line in match.group(1).splitlines() if line.startswith("|")]
    return [[cell.strip().strip("`") for cell in row.strip("|").split("|")] for row in rows[2:]]


def _hex(cell: str) -> bytes:
    return bytes.fromhex(cell.replace(" ", ""))


VOTES = _table("Vote examples")
ACKS = _table("Ack examples")
REJECTIONS = _table("Rejection examples")
CODES = _table("Codes")
HEARTBEATS = _table("Heartbeat examples")


def test_doc_has_the_examples_it_promises() -> None:
    assert len(VOTES) >= 6 and len(ACKS) >= 3 and len(REJECTIONS) >= 15
    assert len(HEARTBEATS) >= 2


@pytest.mark.parametrize(("name", "value", "hex_"), VOTES, ids=[row[0] for row in VOTES])
def test_vote_example_matches_cbor2_and_the_device_encoder(
    name: str, value: str, hex_: str
) -> None:
    literal = ast.literal_eval(value)
    expected = _hex(hex_)
    assert cbor2.dumps(literal) == expected
    maps = literal if isinstance(literal, list) else [literal]
    encoded = [
        encode_vote(m[0], m[1], ts=m.get(2), voter=m.get(3), epoch=m.get(4, 0), receipt=5 in m)
        for m in maps
    ]
    device_bytes = encode_batch(encoded) if isinstance(literal, list) else encoded[0]
    assert device_bytes == expected


@pytest.mark.parametrize(("name", "value", "hex_"), VOTES, ids=[row[0] for row in VOTES])
def test_vote_example_decodes_to_the_documented_vote(name: str, value: str, hex_: str) -> None:
    literal = ast.literal_eval(value)
    maps = literal if isinstance(literal, list) else [literal]
    decoded = decode_message(_hex(hex_), poll="p", device="d")
    expected = [
        Vote(
            "p",
            "d",
            tuple(m[0]) if isinstance(m[0], list) else m[0],
            m[1],
            m.get(4, 0),
            m.get(2),
            m.get(3),
            m.get(5) == 1,
        )
        for m in maps
    ]
    assert decoded == expected


def test_single_vote_example_is_five_bytes() -> None:
    assert encode_vote(2, 17) == bytes.fromhex("a2 00 02 01 11")


@pytest.mark.parametrize(("name", "value", "hex_"), ACKS, ids=[row[0] for row in ACKS])
def test_ack_example_matches_encode_ack(name: str, value: str, hex_: str) -> None:
    items = ast.literal_eval(value)
    entries = [AckEntry(item[0], item[1], item[2], tuple(item[3:]) or None) for item in items]
    assert encode_ack(entries) == _hex(hex_)
    # The device's minimal reader reads it back, a receipt with its entry.
    assert decode_ack(_hex(hex_)) == [tuple(item[:3]) for item in items]
    assert read_ack(_hex(hex_)) == [(*item[:3], tuple(item[3:]) or None) for item in items]


@pytest.mark.parametrize(("name", "value", "hex_"), HEARTBEATS, ids=[r[0] for r in HEARTBEATS])
def test_heartbeat_example_matches_cbor2_the_device_encoder_and_the_decoder(
    name: str, value: str, hex_: str
) -> None:
    fields = ast.literal_eval(value)
    assert cbor2.dumps(fields) == _hex(hex_)
    assert encode_heartbeat(fields[0], fields[1], fields.get(2)) == _hex(hex_)
    assert decode_heartbeat(_hex(hex_)) == Heartbeat(fields[0], fields[1], fields.get(2))


@pytest.mark.parametrize(("name", "hex_", "code"), REJECTIONS, ids=[r[0] for r in REJECTIONS])
def test_rejection_example_gets_its_documented_code(name: str, hex_: str, code: str) -> None:
    with pytest.raises(VoteRejected) as caught:
        items = decode_message(_hex(hex_), poll="p", device="d")
        # A batch whose only vote is bad is not rejected as a whole: its one entry is.
        for item in items:
            if isinstance(item, VoteRejected):
                raise item
    assert caught.value.reason.code == code


def test_code_table_lists_every_fate_and_reason_with_its_number() -> None:
    documented = {name: int(number) for number, name, _ in CODES}
    in_code = {fate.name.lower(): int(fate) for fate in Fate if fate is not Fate.REJECTED}
    in_code |= {reason.code: int(reason) for reason in Reason}
    assert documented == in_code
