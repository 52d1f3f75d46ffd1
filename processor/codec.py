"""Wire codec: payload bytes to votes, outcomes to ack bytes (docs/protocol.md).

Rule: pure functions only. No asyncio, no Redis, no logging; every bad input becomes VoteRejected.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

import cbor2

from processor.errors import VoteRejected
from processor.reasons import Reason

__all__ = [
    "MAX_BATCH_VOTES",
    "MAX_CHOICES",
    "MAX_PAYLOAD_BYTES",
    "MAX_UINT",
    "MAX_VOTER_BYTES",
    "AckEntry",
    "Heartbeat",
    "Vote",
    "decode_ack",
    "decode_heartbeat",
    "decode_status",
    "decode_message",
    "encode_ack",
]

# docs/protocol.md, Limits. Every one of these is part of the contract with firmware.
MAX_PAYLOAD_BYTES: Final = 4096
MAX_BATCH_VOTES: Final = 256
MAX_CHOICES: Final = 32
MAX_VOTER_BYTES: Final = 32
# Redis runs the tally script in Lua, whose numbers are doubles: integers are exact up to 2**53.
MAX_UINT: Final = 2**53 - 1

KEY_CHOICE: Final = 0
KEY_SEQ: Final = 1
KEY_TS: Final = 2
KEY_VOTER: Final = 3
KEY_EPOCH: Final = 4
# 1: answer an accepted vote with its place in the poll's chain (docs/protocol.md, Receipts).
KEY_RECEIPT: Final = 5
_KNOWN_KEYS: Final = frozenset({KEY_CHOICE, KEY_SEQ, KEY_TS, KEY_VOTER, KEY_EPOCH, KEY_RECEIPT})

# docs/protocol.md, Device health: a heartbeat is a map of small uints, far below this.
MAX_HEARTBEAT_BYTES: Final = 64
HEARTBEAT_UPTIME: Final = 0
HEARTBEAT_OUTBOX: Final = 1
HEARTBEAT_BATTERY: Final = 2
DEVICE_STATES: Final = frozenset({"online", "offline"})

# A batch is array -> map -> choice array: three containers deep, never more.
_MAX_DEPTH: Final = 3


class Vote(NamedTuple):
    """One vote, as a device cast it. The device id comes from the topic, never the payload.

    A NamedTuple, not a frozen dataclass: one is built per vote, and a frozen dataclass's
    __init__ cost four times as much. Where one of these records is built per
    message or vote, it is built as ``tuple.__new__(Record, (every field, in order))``: the
    NamedTuple's generated ``__new__`` is a Python function with defaults, 0.19 us a call
    against 0.07."""

    poll: str
    device: str
    choice: int | tuple[int, ...]
    seq: int
    epoch: int = 0
    ts_s: int | None = None
    voter: bytes | None = None
    # The device asked for a receipt: its ack entry, if accepted, says where the vote is in
    # the poll's chain.
    receipt: bool = False


class AckEntry(NamedTuple):
    """The fate of one vote, or of a whole message that could not be read (seq is None).

    ``code`` is a `Fate` below 16 or a `Reason` from 16 up (docs/protocol.md, Acks);
    ``receipt`` the (shard, entry) of an accepted vote whose device asked for it.
    """

    epoch: int | None
    seq: int | None
    code: int
    receipt: tuple[int, int] | None = None

    @classmethod
    def rejected(cls, error: VoteRejected) -> AckEntry:
        """The ack entry for a rejection, naming the vote when its seq was readable."""
        return cls(error.epoch, error.seq, int(error.reason), None)


class _Forbidden(Exception):
    """Raised from inside cbor2 when it meets a tag: a vote never carries one."""


def _refuse_tag(*_args: Any) -> Any:
    raise _Forbidden


class _RefuseAllTags(dict[int, Any]):
    """A semantic_decoders mapping that answers every tag number with a refusal.

    cbor2 builds objects for known tags before any hook runs: regex (35) and MIME (36) run
    parsers, shared references (28/29) build cycles, bignums (2/3) allocate. None are votes.
    """

    def __missing__(self, key: int) -> Any:
        return _refuse_tag

    def get(self, key: int, default: Any = None) -> Any:
        return _refuse_tag

    def __contains__(self, key: object) -> bool:
        return True


_NO_TAGS: Final = _RefuseAllTags()


def _strict_loads(payload: bytes) -> object:
    stream = io.BytesIO(payload)
    try:
        item = cbor2.CBORDecoder(
            stream,
            tag_hook=_refuse_tag,
            semantic_decoders=_NO_TAGS,
            max_depth=_MAX_DEPTH,
            allow_indefinite=False,
            allow_duplicate_keys=False,
        ).decode()
    except cbor2.CBORDecodeError as exc:
        if isinstance(exc.__cause__, _Forbidden) or "semantic tag" in str(exc):
            raise VoteRejected(Reason.FORBIDDEN_ITEM, "CBOR tags are not allowed") from None
        text = str(exc)
        if "Duplicate map key" in text or "duplicate" in text.lower():
            raise VoteRejected(Reason.DUPLICATE_KEY, "a map repeats a key") from None
        if "nesting depth" in text:
            raise VoteRejected(Reason.FORBIDDEN_ITEM, f"nested deeper than {_MAX_DEPTH}") from None
        if "indefinite" in text:
            raise VoteRejected(
                Reason.FORBIDDEN_ITEM, "indefinite lengths are not allowed"
            ) from None
        raise VoteRejected(Reason.MALFORMED, text[:80]) from None
    except (ValueError, TypeError, OverflowError, MemoryError, RecursionError) as exc:
        # cbor2 raises plain errors for a few shapes (an unhashable map key, for one).
        raise VoteRejected(Reason.MALFORMED, type(exc).__name__) from None
    if stream.tell() != len(payload):
        raise VoteRejected(Reason.MALFORMED, f"{len(payload) - stream.tell()} bytes after the item")
    return item


def _uint(value: object, what: str, *, seq: int | None = None, epoch: int | None = None) -> int:
    # bool is an int in Python, but CBOR true/false is not a number.
    if type(value) is not int:
        if isinstance(value, float):
            raise VoteRejected(Reason.FORBIDDEN_ITEM, f"{what} is a float", seq=seq, epoch=epoch)
        raise VoteRejected(
            Reason.BAD_SCHEMA, f"{what} must be an unsigned integer", seq=seq, epoch=epoch
        )
    if value < 0:
        raise VoteRejected(Reason.BAD_SCHEMA, f"{what} is negative", seq=seq, epoch=epoch)
    if value > MAX_UINT:
        raise VoteRejected(Reason.OUT_OF_RANGE, f"{what} exceeds 2**53-1", seq=seq, epoch=epoch)
    return value


def _peek_uint(fields: dict[object, object], key: int) -> int | None:
    value = fields.get(key)
    return value if type(value) is int and 0 <= value <= MAX_UINT else None


def _vote_from_map(item: object, poll: str, device: str) -> Vote:
    if not isinstance(item, dict):
        raise VoteRejected(Reason.BAD_SCHEMA, "a vote must be a CBOR map")
    seq_hint = _peek_uint(item, KEY_SEQ)
    epoch_hint = _peek_uint(item, KEY_EPOCH) if KEY_EPOCH in item else 0
    where = {"seq": seq_hint, "epoch": epoch_hint}
    for key in item:
        if type(key) is not int or key not in _KNOWN_KEYS:
            raise VoteRejected(Reason.BAD_SCHEMA, f"unknown key {key!r:.20}", **where)
    if KEY_CHOICE not in item or KEY_SEQ not in item:
        raise VoteRejected(Reason.BAD_SCHEMA, "keys 0 (choice) and 1 (seq) are required", **where)
    seq = _uint(item[KEY_SEQ], "seq", **where)
    epoch = _uint(item[KEY_EPOCH], "epoch", **where) if KEY_EPOCH in item else 0
    raw_choice = item[KEY_CHOICE]
    choice: int | tuple[int, ...]
    if isinstance(raw_choice, list):
        if not 1 <= len(raw_choice) <= MAX_CHOICES:
            raise VoteRejected(
                Reason.BAD_SCHEMA, f"a choice list holds 1 to {MAX_CHOICES} options", **where
            )
        choice = tuple(_uint(c, "choice", **where) for c in raw_choice)
        if len(set(choice)) != len(choice):
            raise VoteRejected(Reason.BAD_SCHEMA, "a choice list repeats an option", **where)
    else:
        choice = _uint(raw_choice, "choice", **where)
    ts_s = _uint(item[KEY_TS], "ts", **where) if KEY_TS in item else None
    receipt = _uint(item[KEY_RECEIPT], "receipt", **where) if KEY_RECEIPT in item else 0
    if receipt > 1:
        raise VoteRejected(Reason.BAD_SCHEMA, "receipt is 0 or 1", **where)
    voter = item.get(KEY_VOTER)
    if voter is not None or KEY_VOTER in item:
        if type(voter) is not bytes or not 1 <= len(voter) <= MAX_VOTER_BYTES:
            raise VoteRejected(
                Reason.BAD_SCHEMA, f"voter must be 1 to {MAX_VOTER_BYTES} bytes", **where
            )
    return Vote(poll, device, choice, seq, epoch, ts_s, voter, receipt == 1)


# CBOR initial bytes of the fast path's items (RFC 8949, 3.1): a map of 2 to 6 pairs; a uint
# in the initial byte, or in the 1, 2 or 4 bytes after it; a byte string of 1 to 23 bytes, or
# with its length in the next byte.
_MAP_2, _MAP_6 = 0xA2, 0xA6
_UINT_1, _UINT_2, _UINT_4 = 0x18, 0x19, 0x1A
_BYTES_1, _BYTES_23, _BYTES_LEN = 0x41, 0x57, 0x58


def _fast_vote(payload: bytes, poll: str, device: str) -> Vote | None:
    """The common vote, read without building a decoder: a map of known keys, each once, whose
    values are uints of at most 4 bytes (a voter: a byte string of 1 to 32 bytes), and nothing
    after it. None for anything else, which the strict decoder then reads and judges: this
    never accepts what it would refuse, nor reads a value otherwise (tests/test_codec.py checks
    both on generated input)."""
    n = len(payload)
    pairs = payload[0] - _MAP_2 + 2 if n else 0
    if not 2 <= pairs <= 6 or payload[0] > _MAP_6:
        return None
    values: list[int | bytes | None] = [None, None, None, None, None, None]
    at = 1
    for _ in range(pairs):
        if at + 1 >= n:
            return None
        key, head = payload[at], payload[at + 1]
        if key > KEY_RECEIPT or values[key] is not None:
            return None  # unknown or repeated: the strict decoder says which
        if key == KEY_VOTER:
            if _BYTES_1 <= head <= _BYTES_23:
                size, at = head - 0x40, at + 2
            elif head == _BYTES_LEN and at + 2 < n:
                size, at = payload[at + 2], at + 3
            else:
                return None
            if not 1 <= size <= MAX_VOTER_BYTES or at + size > n:
                return None
            values[key] = bytes(payload[at : at + size])
            at += size
        elif head < _UINT_1:
            values[key], at = head, at + 2
        elif head == _UINT_1 and at + 2 < n:
            values[key], at = payload[at + 2], at + 3
        elif head == _UINT_2 and at + 3 < n:
            values[key], at = (payload[at + 2] << 8) | payload[at + 3], at + 4
        elif head == _UINT_4 and at + 5 < n:
            values[key], at = int.from_bytes(payload[at + 2 : at + 6], "big"), at + 6
        else:
            return None
    choice, seq, ts, voter, epoch, receipt = values
    if at != n or choice is None or seq is None or (receipt is not None and receipt not in (0, 1)):
        return None
    assert isinstance(choice, int) and isinstance(seq, int)
    assert voter is None or isinstance(voter, bytes)
    assert ts is None or isinstance(ts, int)
    # Every field in order, without the generated __new__ (see Vote).
    return tuple.__new__(
        Vote,
        (poll, device, choice, seq, epoch if isinstance(epoch, int) else 0, ts, voter,
         receipt == 1),
    )  # fmt: skip


def decode_message(payload: bytes, *, poll: str, device: str) -> list[Vote | VoteRejected]:
    """Decode one MQTT payload: a single vote or a batch of them.

    Args:
        payload: the raw MQTT payload.
        poll: the poll id, from the topic.
        device: the device id, from the topic.

    Returns:
        One entry per vote in the message, in order: a `Vote`, or the `VoteRejected` that one
        vote of a batch earned (the rest of the batch still counts).

    Raises:
        VoteRejected: the message as a whole is unreadable (size, CBOR, shape).
    """
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise VoteRejected(Reason.TOO_LARGE, f"{len(payload)} bytes > {MAX_PAYLOAD_BYTES}")
    fast = _fast_vote(payload, poll, device)
    if fast is not None:
        return [fast]
    item = _strict_loads(payload)
    if isinstance(item, dict):
        return [_vote_from_map(item, poll, device)]
    if not isinstance(item, list):
        raise VoteRejected(Reason.BAD_SCHEMA, "a message is a vote map or an array of them")
    if not item:
        raise VoteRejected(Reason.BAD_SCHEMA, "an empty batch")
    if len(item) > MAX_BATCH_VOTES:
        raise VoteRejected(Reason.BATCH_TOO_LARGE, f"{len(item)} votes > {MAX_BATCH_VOTES}")
    out: list[Vote | VoteRejected] = []
    for element in item:
        try:
            out.append(_vote_from_map(element, poll, device))
        except VoteRejected as rejected:
            out.append(rejected)
    return out


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """A device's health report: how long it has run, how many votes wait in its outbox, and
    its battery (percent, None for a device on mains power)."""

    uptime_s: int
    outbox: int
    battery: int | None = None


def decode_heartbeat(payload: bytes) -> Heartbeat:
    """Decode ``devices/{device}/heartbeat``: a CBOR map ``{0: uptime_s, 1: outbox, 2: battery}``
    (battery optional, 0-100).

    Raises:
        VoteRejected: with the reason, as for a vote.
    """
    if len(payload) > MAX_HEARTBEAT_BYTES:
        raise VoteRejected(Reason.TOO_LARGE, f"{len(payload)} bytes > {MAX_HEARTBEAT_BYTES}")
    item = _strict_loads(payload)
    if not isinstance(item, dict):
        raise VoteRejected(Reason.BAD_SCHEMA, "a heartbeat is a CBOR map")
    known = {HEARTBEAT_UPTIME, HEARTBEAT_OUTBOX, HEARTBEAT_BATTERY}
    if any(type(key) is not int or key not in known for key in item):
        raise VoteRejected(Reason.BAD_SCHEMA, "a heartbeat has keys 0-2 only")
    if HEARTBEAT_UPTIME not in item or HEARTBEAT_OUTBOX not in item:
        raise VoteRejected(Reason.BAD_SCHEMA, "keys 0 (uptime) and 1 (outbox) are required")
    battery = None
    if HEARTBEAT_BATTERY in item:
        battery = _uint(item[HEARTBEAT_BATTERY], "battery")
        if battery > 100:
            raise VoteRejected(Reason.OUT_OF_RANGE, "battery is a percentage, 0-100")
    return Heartbeat(
        _uint(item[HEARTBEAT_UPTIME], "uptime"), _uint(item[HEARTBEAT_OUTBOX], "outbox"), battery
    )


def decode_status(payload: bytes) -> str:
    """Decode ``devices/{device}/status``: the ASCII text ``online`` or ``offline``.

    Raises:
        VoteRejected: `Reason.BAD_SCHEMA` for anything else.
    """
    text = payload.decode("ascii", "replace") if len(payload) <= 16 else ""
    if text not in DEVICE_STATES:
        raise VoteRejected(Reason.BAD_SCHEMA, "a status is 'online' or 'offline'")
    return text


def encode_ack(entries: Sequence[AckEntry]) -> bytes:
    """Encode the acks for one device: a CBOR array of ``[epoch, seq, code]`` arrays, and
    ``[epoch, seq, code, shard, entry]`` for an accepted vote with a receipt.

    Args:
        entries: the outcomes, in the order the votes arrived.

    Returns:
        The payload for ``acks/{device}``.
    """
    # Written out, not cbor2.dumps: one ack message per device per batch is on the hot path,
    # and these are only arrays of small uints and nulls (tests/test_codec.py checks the bytes
    # against cbor2's).
    parts = [_head(0x80, len(entries))]
    for epoch, seq, code, receipt in entries:
        parts.append(b"\x83" if receipt is None else b"\x85")
        parts.append(b"\xf6" if epoch is None else _head(0, epoch))
        parts.append(b"\xf6" if seq is None else _head(0, seq))
        parts.append(_head(0, code))
        if receipt is not None:
            parts.append(_head(0, receipt[0]))
            parts.append(_head(0, receipt[1]))
    return b"".join(parts)


_ONE_BYTE: Final = tuple(bytes((n,)) for n in range(256))


def _head(major: int, value: int) -> bytes:
    """A CBOR head (RFC 8949, 3.1) in its shortest form: major type ``major`` (0x00 uint,
    0x80 array) and ``value``."""
    if value < 24:
        return _ONE_BYTE[major | value]
    if value < 0x100:
        return bytes((major | 24, value))
    if value < 0x10000:
        return bytes((major | 25,)) + value.to_bytes(2, "big")
    if value < 0x100000000:
        return bytes((major | 26,)) + value.to_bytes(4, "big")
    return bytes((major | 27,)) + value.to_bytes(8, "big")


def decode_ack(payload: bytes) -> list[AckEntry]:
    """Decode an ack payload (the device side's view; used by the simulator and tests).

    Raises:
        ValueError: the payload is not an ack.
    """
    items = cbor2.loads(payload)
    if not isinstance(items, list):
        raise ValueError("an ack is a CBOR array")
    out = []
    for item in items:
        if not (isinstance(item, list) and len(item) in (3, 5) and type(item[2]) is int):
            raise ValueError(f"an ack entry is [epoch, seq, code, ...], got {item!r:.40}")
        receipt = (item[3], item[4]) if len(item) == 5 else None
        out.append(AckEntry(item[0], item[1], item[2], receipt))
    return out
