"""A minimal CBOR encoder for votes, small enough for MicroPython (docs/protocol.md, Votes).

Rule: byte for byte what docs/protocol.md specifies; no cbor2 and nothing beyond bytes and
ints, so the functions can be copied onto a microcontroller (drop the annotations there).
"""

from __future__ import annotations

__all__ = ["encode_batch", "encode_heartbeat", "encode_vote"]


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
) -> bytes:
    """One vote as a CBOR map with keys in ascending order; optional keys only when set.

    ``choice`` is an option index, or a list of them for a multiple-choice poll.
    """
    fields: list[tuple[int, object]] = [(0, choice), (1, seq)]
    if ts is not None:
        fields.append((2, ts))
    if voter is not None:
        fields.append((3, voter))
    if epoch:
        fields.append((4, epoch))
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
