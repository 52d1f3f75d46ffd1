"""The codec alone: limits, hostile shapes, RFC 8949 Appendix A, and the fuzz property."""

from __future__ import annotations

import base64
import json
from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.encoder import encode_batch, encode_vote
from processor.codec import (
    MAX_BATCH_VOTES,
    MAX_PAYLOAD_BYTES,
    MAX_UINT,
    AckEntry,
    Vote,
    _fast_vote,
    _strict_loads,
    _vote_from_map,
    decode_ack,
    decode_message,
    encode_ack,
)
from processor.errors import VoteRejected
from processor.reasons import Reason
from tests.conftest import DATA


def reason_of(payload: bytes) -> Reason:
    with pytest.raises(VoteRejected) as caught:
        decode_message(payload, poll="p", device="d")
    return caught.value.reason


def test_decode_rejects_payload_over_limit_before_decoding() -> None:
    # Valid CBOR, but one byte too long: the size check must win.
    payload = cbor2.dumps({0: 1, 1: 2, 3: b"x" * 10}) + b"\x00" * MAX_PAYLOAD_BYTES
    assert reason_of(payload[: MAX_PAYLOAD_BYTES + 1]) is Reason.TOO_LARGE


def test_decode_accepts_largest_legal_batch() -> None:
    payload = encode_batch([encode_vote(1, seq) for seq in range(MAX_BATCH_VOTES)])
    assert len(payload) <= MAX_PAYLOAD_BYTES
    votes = decode_message(payload, poll="p", device="d")
    assert [v.seq for v in votes if isinstance(v, Vote)] == list(range(MAX_BATCH_VOTES))


def test_decode_rejects_batch_of_257() -> None:
    payload = encode_batch([encode_vote(1, seq) for seq in range(MAX_BATCH_VOTES + 1)])
    assert reason_of(payload) is Reason.BATCH_TOO_LARGE


def test_batch_with_one_bad_vote_keeps_the_others() -> None:
    payload = cbor2.dumps([{0: 1, 1: 1}, {0: -1, 1: 2}, {0: 2, 1: 3}])
    items = decode_message(payload, poll="p", device="d")
    assert isinstance(items[0], Vote) and isinstance(items[2], Vote)
    assert isinstance(items[1], VoteRejected)
    assert items[1].reason is Reason.BAD_SCHEMA
    assert items[1].seq == 2  # the ack can name the vote


def test_rejection_names_seq_and_epoch_when_readable() -> None:
    with pytest.raises(VoteRejected) as caught:
        decode_message(cbor2.dumps({0: "x", 1: 9, 4: 3}), poll="p", device="d")
    assert (caught.value.seq, caught.value.epoch) == (9, 3)
    assert AckEntry.rejected(caught.value) == AckEntry(3, 9, int(Reason.BAD_SCHEMA))


@pytest.mark.parametrize(
    ("vote", "reason"),
    [
        ({0: 1}, Reason.BAD_SCHEMA),
        ({1: 1}, Reason.BAD_SCHEMA),
        ({0: 1, 1: True}, Reason.BAD_SCHEMA),
        ({0: 1, 1: None}, Reason.BAD_SCHEMA),
        ({0: 1.5, 1: 1}, Reason.FORBIDDEN_ITEM),
        ({0: 1, 1: -3}, Reason.BAD_SCHEMA),
        ({0: 1, 1: MAX_UINT + 1}, Reason.OUT_OF_RANGE),
        ({0: [], 1: 1}, Reason.BAD_SCHEMA),
        ({0: [1, 1], 1: 1}, Reason.BAD_SCHEMA),
        ({0: list(range(33)), 1: 1}, Reason.BAD_SCHEMA),
        ({0: 1, 1: 1, 3: b""}, Reason.BAD_SCHEMA),
        ({0: 1, 1: 1, 3: b"x" * 33}, Reason.BAD_SCHEMA),
        ({0: 1, 1: 1, 3: "text"}, Reason.BAD_SCHEMA),
        ({0: 1, 1: 1, 2: -1}, Reason.BAD_SCHEMA),
        ({0: 1, 1: 1, "x": 1}, Reason.BAD_SCHEMA),
        ({0: 1, 1: 1, 4: 2**64}, Reason.FORBIDDEN_ITEM),  # cbor2 writes a bignum tag
        ([[{0: 1, 1: 1}]], Reason.BAD_SCHEMA),
    ],
)
def test_decode_rejects_wrong_shapes(vote: Any, reason: Reason) -> None:
    items = None
    with pytest.raises(VoteRejected) as caught:
        items = decode_message(cbor2.dumps(vote), poll="p", device="d")
        for item in items:
            if isinstance(item, VoteRejected):
                raise item
    assert caught.value.reason is reason, items


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", Reason.MALFORMED),
        (b"\x81" * 4_000 + b"\x00", Reason.FORBIDDEN_ITEM),  # 4,000-deep nesting
        (b"\x81" * 10_000 + b"\x00", Reason.TOO_LARGE),  # 10,000-deep: the size cap stops it
        (bytes.fromhex("5bffffffffffffffff00"), Reason.MALFORMED),  # 2**64-byte string declared
        (bytes.fromhex("9bffffffffffffffff00"), Reason.MALFORMED),  # 2**64-item array declared
        (bytes.fromhex("bbffffffffffffffff00"), Reason.MALFORMED),  # 2**64-pair map declared
        (bytes.fromhex("d81c81d81d00"), Reason.FORBIDDEN_ITEM),  # shareable + sharedref (cycle)
        (bytes.fromhex("d82463616263"), Reason.FORBIDDEN_ITEM),  # MIME (36)
        (bytes.fromhex("d9d9f7a200020111"), Reason.FORBIDDEN_ITEM),  # self-describe tag
        (bytes.fromhex("a2000201f7"), Reason.BAD_SCHEMA),  # undefined
        (bytes.fromhex("a2000201f0"), Reason.BAD_SCHEMA),  # simple value 16
        (bytes.fromhex("ff"), Reason.MALFORMED),  # a lone break
        (bytes.fromhex("1c"), Reason.MALFORMED),  # reserved additional info
        (bytes.fromhex("a20002a1"), Reason.MALFORMED),
    ],
)
def test_decode_maps_hostile_cbor_to_its_reason(payload: bytes, reason: Reason) -> None:
    assert reason_of(payload) is reason


def test_decode_rejects_unhashable_map_key() -> None:
    # {[1]: 1}: cbor2 would need a list as a dict key.
    assert reason_of(bytes.fromhex("a1810101")) in (Reason.MALFORMED, Reason.BAD_SCHEMA)


APPENDIX_A = json.loads((DATA / "cbor-appendix-a.json").read_text())


@pytest.mark.parametrize("vector", APPENDIX_A, ids=[v["hex"][:24] for v in APPENDIX_A])
def test_rfc8949_appendix_a_is_never_a_vote(vector: dict[str, Any]) -> None:
    payload = base64.b64decode(vector["cbor"])
    try:
        items = list(decode_message(payload, poll="p", device="d"))
    except VoteRejected:
        return  # the whole message refused
    # Or each item refused: a message with one vote in it and one refusal is a vote.
    assert items and all(isinstance(item, VoteRejected) for item in items), items


def _plain(vector: dict[str, Any]) -> bool:
    """Vectors our strict layer must read exactly as the RFC says: no tags, floats, simple
    values, or indefinite lengths (which a vote never has)."""
    if "decoded" not in vector:
        return False

    def ok(value: Any) -> bool:
        if isinstance(value, bool) or value is None or isinstance(value, float):
            return False
        if isinstance(value, list):
            return all(ok(v) for v in value)
        if isinstance(value, dict):
            return all(ok(v) for v in value.values())
        return isinstance(value, int | str)

    raw = bytes.fromhex(vector["hex"])
    indefinite = any(b in raw for b in (0x5F, 0x7F, 0x9F, 0xBF))
    return ok(vector["decoded"]) and raw[0] >> 5 != 6 and not indefinite


PLAIN = [v for v in APPENDIX_A if _plain(v)]


@pytest.mark.parametrize("vector", PLAIN, ids=[v["hex"][:24] for v in PLAIN])
def test_strict_layer_reads_plain_appendix_a_items_as_the_rfc_says(vector: dict[str, Any]) -> None:
    value = _strict_loads(bytes.fromhex(vector["hex"]))
    if isinstance(value, dict):  # JSON keys are strings
        value = {str(k): v for k, v in value.items()}
    assert value == vector["decoded"]


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=MAX_PAYLOAD_BYTES + 16))
def test_any_bytes_give_votes_or_a_rejection(payload: bytes) -> None:
    try:
        items = decode_message(payload, poll="p", device="d")
    except VoteRejected:
        return
    assert items and all(isinstance(i, Vote | VoteRejected) for i in items)


_cbor_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.binary(max_size=40)
    | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.integers(0, 6), children, max_size=5)
    ),
    max_leaves=20,
)


@settings(max_examples=3000, deadline=None)
@given(_cbor_values, st.data())
def test_mutated_cbor_gives_votes_or_a_rejection(value: Any, data: st.DataObject) -> None:
    payload = bytearray(cbor2.dumps(value))
    for _ in range(data.draw(st.integers(0, 3))):
        if payload:
            index = data.draw(st.integers(0, len(payload) - 1))
            payload[index] = data.draw(st.integers(0, 255))
    try:
        items = decode_message(bytes(payload), poll="p", device="d")
    except VoteRejected:
        return
    for item in items:
        assert isinstance(item, Vote | VoteRejected)


@given(
    st.lists(
        st.tuples(
            st.one_of(
                st.integers(0, 63),
                st.lists(st.integers(0, 63), min_size=1, max_size=4, unique=True),
            ),
            st.integers(0, MAX_UINT),
            st.one_of(st.none(), st.integers(0, 2**40)),
            st.one_of(st.none(), st.binary(min_size=1, max_size=32)),
            st.integers(0, 2**32),
        ),
        min_size=1,
        max_size=20,
    )
)
def test_device_encoder_equals_cbor2_and_decodes_back(votes: list[Any]) -> None:
    encoded = []
    for choice, seq, ts, voter, epoch in votes:
        fields: dict[int, Any] = {0: choice, 1: seq}
        if ts is not None:
            fields[2] = ts
        if voter is not None:
            fields[3] = voter
        if epoch:
            fields[4] = epoch
        one = encode_vote(choice, seq, ts=ts, voter=voter, epoch=epoch)
        assert one == cbor2.dumps(fields)
        encoded.append(one)
    batch = encode_batch(encoded)
    assert batch == cbor2.dumps([cbor2.loads(e) for e in encoded])
    decoded = decode_message(batch, poll="p", device="d") if len(batch) <= MAX_PAYLOAD_BYTES else []
    for item, (choice, seq, ts, voter, epoch) in zip(decoded, votes, strict=False):
        assert isinstance(item, Vote)
        assert (item.choice, item.seq, item.ts_s, item.voter, item.epoch) == (
            tuple(choice) if isinstance(choice, list) else choice,
            seq,
            ts,
            voter,
            epoch,
        )


def test_ack_round_trip() -> None:
    entries = [AckEntry(0, 1, 0), AckEntry(2, 9, 25), AckEntry(None, None, 17)]
    assert decode_ack(encode_ack(entries)) == entries


def _strict(payload: bytes) -> Vote | VoteRejected:
    """What the strict decoder alone says of one vote's payload."""
    try:
        return _vote_from_map(_strict_loads(payload), "p", "d")
    except VoteRejected as rejected:
        return rejected


# Near a vote: uints at the edges of each encoding, now and then a value of another kind.
_edge_uint = st.integers(0, 2**33) | st.sampled_from(
    [23, 24, 255, 256, 2**16 - 1, 2**16, 2**32 - 1, 2**32, MAX_UINT, MAX_UINT + 1, 2**64 - 1]
)
_odd = (
    st.integers(-3, -1)
    | st.booleans()
    | st.floats(allow_nan=False)
    | st.none()
    | st.lists(st.integers(0, 70), max_size=3)
    | st.text(max_size=3)
)
_uintish = st.one_of(_edge_uint, _edge_uint, _edge_uint, _odd)
_voterish = st.one_of(
    st.integers(0, 40).flatmap(lambda n: st.binary(min_size=n, max_size=n)),
    st.integers(28, 40).flatmap(lambda n: st.binary(min_size=n, max_size=n)),
    _uintish,
)
_vote_maps = st.fixed_dictionaries(
    {0: _uintish, 1: _uintish},
    optional={2: _uintish, 3: _voterish, 4: _uintish, 5: _odd},
) | st.dictionaries(st.integers(0, 6), _uintish, max_size=6)


@settings(max_examples=3000, deadline=None)
@given(_vote_maps, st.data())
def test_the_fast_path_reads_only_what_the_strict_decoder_accepts_and_reads_it_alike(
    fields: dict[int, Any], data: st.DataObject
) -> None:
    payload = bytearray(cbor2.dumps(fields))
    if data.draw(st.integers(0, 3)) == 0:  # now and then mutated: lengths, heads, trailing bytes
        payload[data.draw(st.integers(0, len(payload) - 1))] = data.draw(st.integers(0, 255))
        payload += data.draw(st.binary(max_size=2))
    fast = _fast_vote(bytes(payload), "p", "d")
    if fast is not None:
        assert _strict(bytes(payload)) == fast


@pytest.mark.parametrize(
    "hex_payload",
    [
        "a3 00 01 01 02 03 58 21" + "78" * 33,  # a voter of 33 bytes
        "a3 00 01 01 02 03 40",  # an empty voter
        "a3 00 01 01 02 00 03",  # key 0 twice
        "a2 00 01 01 1b 0000000000000005",  # an 8-byte uint: the strict decoder reads it
        "a2 00 01 01 02 00",  # a byte after the map
        "a2 00 01 01",  # a pair short
        "a2 00 01 06 02",  # an unknown key
        "a3 00 01 01 02 05 02",  # a receipt that is neither 0 nor 1
        "a2 00 20 01 02",  # a negative choice
        "a2 00 f5 01 02",  # true is not a number
        "a2 00 fa 3f800000 01 02",  # a float
        "a2 00 81 01 01 02",  # a choice list: the strict decoder reads it
        "a2 01 02 02 03",  # no choice
        "a7 00 01 01 02 02 03 03 41 78 04 00 05 00 06 00",  # seven pairs
    ],
)
def test_the_fast_path_leaves_the_rest_to_the_strict_decoder(hex_payload: str) -> None:
    assert _fast_vote(bytes.fromhex(hex_payload.replace(" ", "")), "p", "d") is None


@pytest.mark.parametrize(
    "payload",
    [
        encode_vote(2, 7),
        encode_vote(63, 2**32 - 1, ts=1_764_000_000, voter=b"\x01" * 32, epoch=3),
        encode_vote(0, 23, voter=b"v"),
        bytes.fromhex("a2 00 18 05 01 01".replace(" ", "")),  # a uint not in its shortest form
    ],
)
def test_the_fast_path_reads_the_common_votes(payload: bytes) -> None:
    fast = _fast_vote(payload, "p", "d")
    assert fast is not None and fast == _strict(payload)


@given(
    st.lists(
        st.tuples(
            st.one_of(st.none(), st.integers(0, MAX_UINT)),
            st.one_of(st.none(), st.integers(0, MAX_UINT)),
            st.integers(0, 255),
        ),
        max_size=300,
    )
)
def test_acks_are_encoded_as_cbor2_encodes_them(entries: list[tuple[Any, Any, int]]) -> None:
    acks = [AckEntry(*entry) for entry in entries]
    assert encode_ack(acks) == cbor2.dumps([list(entry) for entry in entries])
