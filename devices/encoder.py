"""A minimal CBOR encoder for votes, small enough for MicroPython (docs/protocol.md, Votes).

Rule: byte for byte what docs/protocol.md specifies; no cbor2 and nothing beyond bytes and
ints, so the functions can be copied onto a microcontroller (drop the annotations there).
"""

from __future__ import annotations

__all__ = ["encode_batch", "encode_heartbeat", "encode_vote", "vote_again"]


def _head(major: int, value: int) -> bytes:
    # RFC 8949 3.1: the shortest form of the argument (preferred serialization, 4.2.1).
    if value < 24:
        return bytes([major << 5 | value])
    if value < 0x100:
        return bytes([major << 5 | 24, value])
    if value < 0x10000:
        return bytes([major << 5 | 25]) + value.to_bytes(2, "big")
    if value < 0x100000000:
        return bytes([major << 5 | 26]) + value.to_bytes(4, "big")
    return bytes([major << 5 | 27]) + value.to_bytes(8, "big")


def encode_vote(
    choice: int | list[int] | tuple[int, ...],
    seq: int,
    ts: int | None = None,
    voter: bytes | None = None,
    epoch: int = 0,
    receipt: bool = False,
) -> bytes:
    """One vote as a CBOR map with keys in ascending order; optional keys only when set.

    ``choice`` is an option index, or a list of them for a multiple-choice poll; ``receipt``
    asks the processor to answer an accepted vote with its place in the poll's chain.
    """
    fields: list[tuple[int, object]] = [(0, choice), (1, seq)]
    if ts is not None:
        fields.append((2, ts))
    if voter is not None:
        fields.append((3, voter))
    if epoch:
        fields.append((4, epoch))
    if receipt:
        fields.append((5, 1))
    out = _head(5, len(fields))
    for key, value in fields:
        out += _head(0, key)
        if isinstance(value, (list, tuple)):
            out += _head(4, len(value))
            for item in value:
                out += _head(0, item)
        elif isinstance(value, (bytes, bytearray)):
            out += _head(2, len(value)) + bytes(value)
        elif isinstance(value, int):
            out += _head(0, value)
        else:
            raise TypeError("choice, seq, ts and epoch are unsigned integers")
    return out


def encode_batch(encoded_votes: list[bytes]) -> bytes:
    """A batch: a CBOR array of already-encoded votes (at most 256)."""
    return _head(4, len(encoded_votes)) + b"".join(encoded_votes)


def encode_heartbeat(uptime_s: int, outbox: int, battery: int | None = None) -> bytes:
    """A heartbeat (docs/protocol.md, Device health): ``{0: uptime_s, 1: outbox, 2: battery}``,
    battery (0-100) only on a device that runs on one."""
    out = _head(5, 2 if battery is None else 3)
    out += _head(0, 0) + _head(0, uptime_s) + _head(0, 1) + _head(0, outbox)
    if battery is not None:
        out += _head(0, 2) + _head(0, battery)
    return out


def _read_head(data: bytes, at: int) -> tuple[int, int, int]:
    """The head at ``at`` of bytes this module wrote: major type, argument, next offset."""
    major, info = data[at] >> 5, data[at] & 0x1F
    if info < 24:
        return major, info, at + 1
    size = {24: 1, 25: 2, 26: 4, 27: 8}[info]
    return major, int.from_bytes(data[at + 1 : at + 1 + size], "big"), at + 1 + size


def vote_again(payload: bytes, seq: int, epoch: int) -> bytes:
    """A vote `encode_vote` wrote, under another seq and epoch, the rest as it was: a vote
    refused as `stale_epoch` is stored again in a higher epoch (docs/protocol.md, rule 2)."""
    fields: dict[int, object] = {}
    major, n, at = _read_head(payload, 0)
    for _ in range(n):
        _, key, at = _read_head(payload, at)
        major, value, at = _read_head(payload, at)
        if major == 4:  # an array of option indexes
            items = []
            for _ in range(value):
                _, item, at = _read_head(payload, at)
                items.append(item)
            fields[key] = items
        elif major == 2:  # the voter token
            fields[key] = payload[at : at + value]
            at += value
        else:
            fields[key] = value
    choice = fields[0]
    ts, voter = fields.get(2), fields.get(3)
    assert isinstance(choice, (int, list))
    assert ts is None or isinstance(ts, int)
    assert voter is None or isinstance(voter, bytes)
    return encode_vote(choice, seq, ts=ts, voter=voter, epoch=epoch, receipt=fields.get(5) == 1)
