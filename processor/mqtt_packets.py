"""MQTT 3.1.1 and 5 packets, just the ones the processor sends and reads. Rule: pure bytes.

Sources: MQTT 3.1.1 (OASIS, 2014) section 3 and MQTT 5.0 (OASIS, 2019) section 3. Only what a
QoS 1 subscriber that publishes QoS 0/1 needs: CONNECT, CONNACK, SUBSCRIBE, SUBACK, PUBLISH,
PUBACK, PINGREQ, PINGRESP, DISCONNECT.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

__all__ = [
    "CONNACK",
    "DISCONNECT",
    "PINGREQ",
    "PINGRESP",
    "PUBACK",
    "PUBLISH",
    "SUBACK",
    "Incoming",
    "PacketError",
    "connect",
    "disconnect",
    "parse_packets",
    "puback",
    "publish",
    "subscribe",
]

CONNACK: Final = 2
PUBLISH: Final = 3
PUBACK: Final = 4
SUBACK: Final = 9
PINGRESP: Final = 13
DISCONNECT: Final = 14

PINGREQ: Final = b"\xc0\x00"
_U16: Final = struct.Struct("!H")


class PacketError(Exception):
    """The broker sent bytes that are not a valid MQTT packet; the connection must close."""


@dataclass(frozen=True, slots=True)
class Incoming:
    """One packet from the broker. For PUBLISH, ``topic``, ``payload``, ``qos`` and ``mid``
    are set; for acks, ``mid``; for CONNACK, ``session_present`` and ``code``; for SUBACK,
    ``codes``."""

    kind: int
    mid: int = 0
    topic: bytes = b""
    payload: bytes = b""
    qos: int = 0
    code: int = 0
    session_present: bool = False
    codes: bytes = b""


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(value: bytes) -> bytes:
    return _U16.pack(len(value)) + value


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + _varint(len(body)) + body


def connect(
    *,
    client_id: str,
    v5: bool,
    keepalive_s: int,
    username: str | None,
    password: str | None,
    session_expiry_s: int,
    receive_maximum: int,
) -> bytes:
    """CONNECT without clean start/session: the session persists (3.1.2.4, 3.1.2.11.2)."""
    flags = (0x80 if username is not None else 0) | (0x40 if password is not None else 0)
    body = _string(b"MQTT") + bytes([5 if v5 else 4, flags]) + _U16.pack(keepalive_s)
    if v5:
        # 0x11 Session Expiry Interval (four bytes), 0x21 Receive Maximum (two bytes).
        props = b"\x11" + struct.pack("!I", session_expiry_s) + b"\x21" + _U16.pack(receive_maximum)
        body += _varint(len(props)) + props
    body += _string(client_id.encode())
    if username is not None:
        body += _string(username.encode())
    if password is not None:
        body += _string(password.encode())
    return _packet(0x10, body)


def subscribe(mid: int, topic_filters: Sequence[str], *, v5: bool) -> bytes:
    """SUBSCRIBE to each filter at QoS 1, in one packet."""
    body = _U16.pack(mid) + (b"\x00" if v5 else b"")
    body += b"".join(_string(f.encode()) + b"\x01" for f in topic_filters)
    return _packet(0x82, body)


def publish(
    topic: str, payload: bytes, *, qos: int, retain: bool, mid: int, v5: bool, dup: bool = False
) -> bytes:
    """PUBLISH at QoS 0 or 1."""
    first = 0x30 | (0x08 if dup else 0) | (qos << 1) | (0x01 if retain else 0)
    body = _string(topic.encode()) + (_U16.pack(mid) if qos else b"") + (b"\x00" if v5 else b"")
    return _packet(first, body + payload)


def puback(mid: int) -> bytes:
    """PUBACK; in MQTT 5 a remaining length of 2 means reason code 0, success (3.4.2.1)."""
    return b"\x40\x02" + _U16.pack(mid)


def disconnect() -> bytes:
    """DISCONNECT; in MQTT 5 a remaining length of 0 means reason 0, keeping the session."""
    return b"\xe0\x00"


def _skip_properties(data: bytes, at: int) -> int:
    length, shift = 0, 0
    while True:
        if at >= len(data):
            raise PacketError("truncated properties")
        byte = data[at]
        at += 1
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return at + length
        shift += 7
        if shift > 21:
            raise PacketError("properties length over four bytes")


def _decode(first: int, body: bytes, v5: bool) -> Incoming | None:
    kind = first >> 4
    if kind == PUBLISH:
        qos = (first >> 1) & 0x03
        (topic_len,) = _U16.unpack_from(body, 0)
        at = 2 + topic_len
        topic = body[2:at]
        mid = 0
        if qos:
            (mid,) = _U16.unpack_from(body, at)
            at += 2
        if v5:
            at = _skip_properties(body, at)
        return Incoming(PUBLISH, mid=mid, topic=topic, payload=body[at:], qos=qos)
    if kind == PUBACK:
        return Incoming(PUBACK, mid=_U16.unpack_from(body, 0)[0])
    if kind == CONNACK:
        return Incoming(CONNACK, session_present=bool(body[0] & 1), code=body[1])
    if kind == SUBACK:
        at = 2 if not v5 else _skip_properties(body, 2)
        return Incoming(SUBACK, mid=_U16.unpack_from(body, 0)[0], codes=body[at:])
    if kind == PINGRESP:
        return Incoming(PINGRESP)
    if kind == DISCONNECT:
        return Incoming(DISCONNECT, code=body[0] if body else 0)
    return None  # PUBREC & co.: never asked for (we use QoS 1 at most)


def parse_packets(buffer: bytearray, *, v5: bool, limit: int | None = None) -> list[Incoming]:
    """Take every complete packet (at most ``limit``) off the front of ``buffer``, which keeps
    the rest.

    Raises:
        PacketError: the bytes cannot be MQTT.
    """
    out: list[Incoming] = []
    at, end = 0, len(buffer)
    while end - at >= 2 and (limit is None or len(out) < limit):
        first = buffer[at]
        length, shift, pos, complete = 0, 0, at + 1, False
        while pos < end:
            byte = buffer[pos]
            pos += 1
            length |= (byte & 0x7F) << shift
            if not byte & 0x80:
                complete = True
                break
            shift += 7
            if shift > 21:
                raise PacketError("remaining length over four bytes")
        if not complete or pos + length > end:
            break  # the rest of this packet has not arrived yet
        body = bytes(buffer[pos : pos + length])
        at = pos + length
        try:
            packet = _decode(first, body, v5)
        except (struct.error, IndexError) as exc:
            raise PacketError(f"malformed packet type {first >> 4}: {exc}") from None
        if packet is not None:
            out.append(packet)
    del buffer[:at]
    return out
