"""MQTT 3.1.1 and 5 packets, just the ones the processor sends and reads. Rule: pure bytes.

Sources: MQTT 3.1.1 (OASIS, 2014) section 3 and MQTT 5.0 (OASIS, 2019) section 3. Only what a
QoS 1 subscriber that publishes QoS 0/1 needs: CONNECT, CONNACK, SUBSCRIBE, SUBACK, PUBLISH,
PUBACK, PINGREQ, PINGRESP, DISCONNECT.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from typing import Final, NamedTuple

__all__ = [
    "CONNACK",
    "DISCONNECT",
    "PINGREQ",
    "PINGRESP",
    "PUBACK",
    "PUBLISH",
    "SUBACK",
    "Incoming",
    "MAXIMUM_PACKET_SIZE",
    "RECEIVE_MAXIMUM",
    "REASON_STRING",
    "SERVER_KEEP_ALIVE",
    "TOPIC_ALIAS_MAXIMUM",
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
_ONE_BYTE: Final = tuple(bytes((n,)) for n in range(256))
_U16: Final = struct.Struct("!H")


class PacketError(Exception):
    """The broker sent bytes that are not a valid MQTT packet; the connection must close."""


class Incoming(NamedTuple):
    """One packet from the broker. For PUBLISH, ``topic``, ``payload``, ``qos`` and ``mid``
    are set; for PUBACK, ``mid`` and ``code`` (MQTT 5's reason, 0 on 3.1.1); for CONNACK,
    ``session_present``, ``code`` and ``properties``; for SUBACK, ``codes``.

    A NamedTuple: one is built per message received, and a frozen dataclass cost four times as
    much to build."""

    kind: int
    mid: int = 0
    topic: bytes = b""
    payload: bytes = b""
    qos: int = 0
    code: int = 0
    session_present: bool = False
    codes: bytes = b""
    # MQTT 5 properties of a CONNACK or DISCONNECT, by identifier; None on a PUBLISH, which
    # (the hot path) allocates nothing for it.
    properties: Mapping[int, int | bytes] | None = None
    # A PUBLISH over the maximum packet size, its payload not read: its remaining length, and
    # how many of its bytes the caller must still drop as they arrive (parse_packets).
    oversized: int = 0
    skip: int = 0


def _varint(n: int) -> bytes:
    if n < 0x80:
        return _ONE_BYTE[n]  # every ack and PUBACK: one byte
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(value: bytes) -> bytes:
    return _U16.pack(len(value)) + value


def _packet(first: int, body: bytes) -> bytes:
    return _ONE_BYTE[first] + _varint(len(body)) + body


def connect(
    *,
    client_id: str,
    v5: bool,
    keepalive_s: int,
    username: str | None,
    password: str | None,
    session_expiry_s: int,
    receive_maximum: int,
    maximum_packet_size: int | None = None,
) -> bytes:
    """CONNECT without clean start/session: the session persists (3.1.2.4, 3.1.2.11.2)."""
    flags = (0x80 if username is not None else 0) | (0x40 if password is not None else 0)
    body = _string(b"MQTT") + bytes([5 if v5 else 4, flags]) + _U16.pack(keepalive_s)
    if v5:
        # 0x11 Session Expiry Interval (four bytes), 0x21 Receive Maximum (two bytes), 0x27
        # Maximum Packet Size (four bytes): the broker drops, for us, what is larger.
        props = b"\x11" + struct.pack("!I", session_expiry_s) + b"\x21" + _U16.pack(receive_maximum)
        if maximum_packet_size is not None:
            props += b"\x27" + struct.pack("!I", maximum_packet_size)
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
    head = _string(topic.encode()) + (_U16.pack(mid) if qos else b"") + (b"\x00" if v5 else b"")
    return b"".join((_ONE_BYTE[first], _varint(len(head) + len(payload)), head, payload))


def puback(mid: int) -> bytes:
    """PUBACK; in MQTT 5 a remaining length of 2 means reason code 0, success (3.4.2.1)."""
    return b"\x40\x02" + _U16.pack(mid)


def disconnect() -> bytes:
    """DISCONNECT; in MQTT 5 a remaining length of 0 means reason 0, keeping the session."""
    return b"\xe0\x00"


# MQTT 5, 2.2.2.2: each property's identifier and the form of its value.
_BYTE, _TWO, _FOUR, _VARINT, _STRING, _BINARY, _PAIR = range(7)
_PROPERTY_FORMS: Final = {
    0x01: _BYTE, 0x02: _FOUR, 0x03: _STRING, 0x08: _STRING, 0x09: _BINARY, 0x0B: _VARINT,
    0x11: _FOUR, 0x12: _STRING, 0x13: _TWO, 0x15: _STRING, 0x16: _BINARY, 0x17: _BYTE,
    0x18: _FOUR, 0x19: _BYTE, 0x1A: _STRING, 0x1C: _STRING, 0x1F: _STRING, 0x21: _TWO,
    0x22: _TWO, 0x23: _TWO, 0x24: _BYTE, 0x25: _BYTE, 0x26: _PAIR, 0x27: _FOUR, 0x28: _BYTE,
    0x29: _BYTE, 0x2A: _BYTE,
}  # fmt: skip
# CONNACK properties the processor acts on (MQTT 5, 3.2.2.3).
SERVER_KEEP_ALIVE: Final = 0x13
RECEIVE_MAXIMUM: Final = 0x21
MAXIMUM_PACKET_SIZE: Final = 0x27
TOPIC_ALIAS_MAXIMUM: Final = 0x22
REASON_STRING: Final = 0x1F


def _varint_at(data: bytes, at: int, end: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if at >= end:
            raise PacketError("truncated variable byte integer")
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at
        shift += 7
        if shift > 21:
            raise PacketError("variable byte integer over four bytes")


def _properties(data: bytes, at: int) -> tuple[dict[int, int | bytes], int]:
    """Read a property block at ``at``; returns the properties (the last of a repeated one;
    user properties are dropped) and where the block ends."""
    length, at = _varint_at(data, at, len(data))
    end = at + length
    if end > len(data):
        raise PacketError("properties overrun the packet")
    found: dict[int, int | bytes] = {}
    while at < end:
        ident = data[at]
        at += 1
        form = _PROPERTY_FORMS.get(ident)
        if form is None:
            raise PacketError(f"unknown property 0x{ident:02x}")
        if form in (_BYTE, _TWO, _FOUR):
            size = (1, 2, 4)[form]
            if at + size > end:
                raise PacketError(f"property 0x{ident:02x} overruns its block")
            found[ident] = int.from_bytes(data[at : at + size], "big")
            at += size
        elif form == _VARINT:
            found[ident], at = _varint_at(data, at, end)
        else:
            value = b""
            for _ in range(2 if form == _PAIR else 1):
                if at + 2 > end:
                    raise PacketError(f"property 0x{ident:02x} overruns its block")
                (size,) = _U16.unpack_from(data, at)
                if at + 2 + size > end:
                    raise PacketError(f"property 0x{ident:02x} overruns its block")
                value = data[at + 2 : at + 2 + size]
                at += 2 + size
            if form != _PAIR:
                found[ident] = value
    return found, end


def _skip_properties(data: bytes, at: int) -> int:
    length, at = _varint_at(data, at, len(data))
    if at + length > len(data):
        raise PacketError("properties overrun the packet")
    return at + length


def _need(body: bytes, size: int, what: str) -> None:
    if len(body) < size:
        raise PacketError(f"{what} of {len(body)} bytes is too short")


def _decode(first: int, body: bytes, v5: bool) -> Incoming:
    kind, flags = first >> 4, first & 0x0F
    if kind == PUBLISH:
        # The hot path: one length check per field, no helper calls.
        qos = (flags >> 1) & 0x03
        if qos == 3:
            raise PacketError("PUBLISH with QoS 3 (MQTT-3.3.1-4)")
        size = len(body)
        if size < 2:
            raise PacketError(f"PUBLISH of {size} bytes is too short")
        at = 2 + ((body[0] << 8) | body[1])
        if size < at + (2 if qos else 0):
            raise PacketError(f"PUBLISH of {size} bytes is too short for its topic")
        topic = body[2:at]
        # An int is looked for byte by byte in C: several times faster than b"+" in topic.
        if at == 2 or 0x2B in topic or 0x23 in topic:
            raise PacketError("PUBLISH to an empty or wildcard topic (MQTT-3.3.2-2)")
        mid = 0
        if qos:
            mid = (body[at] << 8) | body[at + 1]
            at += 2
            if mid == 0:
                raise PacketError("PUBLISH with packet id 0 (MQTT-2.2.1-3)")
        if v5:
            at = _skip_properties(body, at)
        # Every field in order, without the generated __new__: 0.13 us instead of 0.25.
        return tuple.__new__(
            Incoming, (PUBLISH, mid, topic, body[at:], qos, 0, False, b"", None, 0, 0)
        )
    if flags:
        raise PacketError(f"packet type {kind} with reserved flags {flags:#x} (MQTT-2.2.2-2)")
    if kind == PUBACK:
        _need(body, 2, "PUBACK")
        if not v5 and len(body) != 2:
            raise PacketError("PUBACK is 2 bytes in MQTT 3.1.1")
        code = body[2] if len(body) > 2 else 0
        if len(body) > 3:
            _properties(body, 3)
        return Incoming(PUBACK, mid=_U16.unpack_from(body, 0)[0], code=code)
    if kind == CONNACK:
        _need(body, 3 if v5 else 2, "CONNACK")
        if body[0] & 0xFE:
            raise PacketError("CONNACK with reserved flags (MQTT-3.2.2-1)")
        props: dict[int, int | bytes] = {}
        if v5:
            props, end = _properties(body, 2)
            if end != len(body):
                raise PacketError("CONNACK with bytes after its properties")
        elif len(body) != 2:
            raise PacketError("CONNACK is 2 bytes in MQTT 3.1.1")
        return Incoming(CONNACK, session_present=bool(body[0] & 1), code=body[1], properties=props)
    if kind == SUBACK:
        at = 2 if not v5 else _skip_properties(body, 2)
        _need(body, max(3, at + 1), "SUBACK")
        return Incoming(SUBACK, mid=_U16.unpack_from(body, 0)[0], codes=body[at:])
    if kind == PINGRESP:
        if body:
            raise PacketError("PINGRESP with a body")
        return Incoming(PINGRESP)
    if kind == DISCONNECT and v5:
        code = body[0] if body else 0
        props = _properties(body, 1)[0] if len(body) > 1 else {}
        return Incoming(DISCONNECT, code=code, properties=props)
    # CONNECT, SUBSCRIBE, PINGREQ... come from clients; PUBREC & co. and UNSUBACK answer what
    # we never send; 0 and 15 (AUTH: we ask for no enhanced authentication) are reserved.
    raise PacketError(f"packet type {kind} is not one a broker sends us")


def parse_packets(
    buffer: bytearray, *, v5: bool, limit: int | None = None, max_bytes: int | None = None
) -> list[Incoming]:
    """Take every complete packet (at most ``limit``) off the front of ``buffer``, which keeps
    the rest.

    A packet whose remaining length is over ``max_bytes`` is not buffered: a PUBLISH among them
    comes out as soon as its header is in, with ``skip`` set to how many of its bytes are still
    to come (the caller drops them as they arrive) and an empty payload, so that it can be
    acknowledged and rejected as too large; it is the last packet of the list.

    Raises:
        PacketError: the bytes cannot be MQTT from a broker.
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
        if not complete:
            break
        if max_bytes is not None and length > max_bytes:
            oversized = _oversized(first, buffer, pos, length, v5)
            if oversized is None:
                break  # its header has not arrived yet
            del buffer[: min(end, pos + length)]
            return [*out, oversized]
        if pos + length > end:
            break  # the rest of this packet has not arrived yet
        body = bytes(buffer[pos : pos + length])
        at = pos + length
        try:
            out.append(_decode(first, body, v5))
        except (struct.error, IndexError) as exc:
            raise PacketError(f"malformed packet type {first >> 4}: {exc}") from None
    del buffer[:at]
    return out


def _oversized(first: int, buffer: bytearray, pos: int, length: int, v5: bool) -> Incoming | None:
    if first >> 4 != PUBLISH:
        raise PacketError(f"packet type {first >> 4} of {length} bytes: over our maximum")
    qos = (first >> 1) & 0x03
    if len(buffer) - pos < 2:
        return None
    (topic_len,) = _U16.unpack_from(buffer, pos)
    header = 2 + topic_len + (2 if qos else 0)
    if len(buffer) - pos < header:
        return None
    # Decoded as an empty message: the same checks, without the payload's bytes.
    head = _decode(first, bytes(buffer[pos : pos + header]) + (b"\x00" if v5 else b""), v5)
    here = len(buffer) - pos
    return Incoming(
        PUBLISH, mid=head.mid, topic=head.topic, qos=head.qos, skip=max(0, length - here),
        oversized=length,
    )  # fmt: skip
