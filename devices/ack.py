"""A minimal reader of the processor's acks, small enough for MicroPython (docs/protocol.md, Acks).

Rule: reads exactly what the processor writes, an array of ``[epoch, seq, code]`` where epoch
and seq are unsigned integers or null (``[epoch, seq, code, shard, entry]`` for a vote accepted
with a receipt), and refuses anything else; no cbor2, nothing beyond
bytes and ints, so a constrained device needs no CBOR library at all.
"""

from __future__ import annotations

__all__ = [
    "ACCEPTED",
    "CODE_NAMES",
    "DUPLICATE",
    "RATE_LIMITED",
    "STALE_EPOCH",
    "AckError",
    "code_name",
    "decode_ack",
    "read_ack",
]

_NULL = 0xF6

# docs/protocol.md, Codes, as a firmware keeps it: 0-15 what became of a vote, 16 and up why it
# was rejected. tests/test_device_side.py checks it against the processor's own table.
CODE_NAMES = {
    0: "accepted",
    1: "duplicate",
    2: "rejected",
    3: "superseded",
    4: "suppressed",
    16: "too_large",
    17: "malformed",
    18: "forbidden_item",
    19: "duplicate_key",
    20: "bad_schema",
    21: "out_of_range",
    22: "batch_too_large",
    23: "bad_topic",
    24: "unknown_poll",
    25: "unknown_option",
    26: "seq_too_old",
    27: "stale_epoch",
    28: "too_many_choices",
    29: "store_error",
    30: "poll_not_open",
    31: "poll_closed",
    32: "missing_voter",
    33: "rate_limited",
}
ACCEPTED, DUPLICATE = 0, 1
# The one code that is not a final answer for a vote: the message was not read; its votes stay
# in the outbox and go again after a pause.
RATE_LIMITED = 33
# Not counted: the processor knows a higher epoch of this device (docs/protocol.md, rule 2).
STALE_EPOCH = 27


def code_name(code: int) -> str:
    """The name of an ack code; a code this build does not know is still a final answer."""
    return CODE_NAMES.get(code, f"code {code}")


class AckError(ValueError):
    """The payload is not an ack; a device ignores it (the vote is sent again later)."""


def _uint(data: bytes, at: int, major: int) -> tuple[int, int]:
    """Read a head of ``major`` type at ``at``: its argument and the next offset."""
    if at >= len(data) or data[at] >> 5 != major:
        raise AckError(f"unexpected item at byte {at}")
    info = data[at] & 0x1F
    if info < 24:
        return info, at + 1
    size = {24: 1, 25: 2, 26: 4, 27: 8}.get(info)
    if size is None or at + 1 + size > len(data):
        raise AckError(f"bad length at byte {at}")
    return int.from_bytes(data[at + 1 : at + 1 + size], "big"), at + 1 + size


def _uint_or_null(data: bytes, at: int) -> tuple[int | None, int]:
    if at < len(data) and data[at] == _NULL:
        return None, at + 1
    return _uint(data, at, 0)


def decode_ack(payload: bytes) -> list[tuple[int | None, int | None, int]]:
    """The entries of one ack: ``(epoch, seq, code)``, epoch and seq None for a message the
    processor could not read.

    Raises:
        AckError: the payload is not an ack.
    """
    return [(epoch, seq, code) for epoch, seq, code, _ in read_ack(payload)]


def read_ack(
    payload: bytes,
) -> list[tuple[int | None, int | None, int, tuple[int, int] | None]]:
    """`decode_ack`, with each entry's receipt: ``(shard, entry)`` of a vote accepted with one
    (docs/protocol.md, Receipts), else None.

    Raises:
        AckError: the payload is not an ack.
    """
    count, at = _uint(payload, 0, 4)
    entries = []
    for _ in range(count):
        size, at = _uint(payload, at, 4)
        if size not in (3, 5):
            raise AckError("an ack entry has 3 items, or 5 with a receipt")
        epoch, at = _uint_or_null(payload, at)
        seq, at = _uint_or_null(payload, at)
        code, at = _uint(payload, at, 0)
        receipt = None
        if size == 5:
            shard, at = _uint(payload, at, 0)
            entry, at = _uint(payload, at, 0)
            receipt = (shard, entry)
        entries.append((epoch, seq, code, receipt))
    if at != len(payload):
        raise AckError("bytes after the ack")
    return entries
