"""The processor's MQTT packets, byte for byte against the specifications' layouts."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from processor import mqtt_packets as p


def test_connect_3_1_1_keeps_the_session_and_sends_credentials() -> None:
    packet = p.connect(
        client_id="proc",
        v5=False,
        keepalive_s=30,
        username="u",
        password="pw",
        session_expiry_s=0,
        receive_maximum=1000,
    )
    # 0x10, remaining length, "MQTT", level 4, flags user+password (clean session off), 30 s
    assert packet[:12] == bytes.fromhex("10 17 0004 4d515454 04 c0 001e".replace(" ", ""))
    assert packet.endswith(b"\x00\x04proc\x00\x01u\x00\x02pw")


def test_connect_5_sets_session_expiry_and_receive_maximum() -> None:
    packet = p.connect(
        client_id="c",
        v5=True,
        keepalive_s=30,
        username=None,
        password=None,
        session_expiry_s=604800,
        receive_maximum=1000,
    )
    assert bytes.fromhex("05 00 001e 08 11 00093a80 21 03e8".replace(" ", "")) in packet


def test_publish_and_puback() -> None:
    assert p.publish("a/b", b"xy", qos=1, retain=True, mid=7, v5=False) == bytes.fromhex(
        "33 09 0003 612f62 0007 7879".replace(" ", "")
    )
    assert p.publish("a", b"", qos=0, retain=False, mid=0, v5=True) == bytes.fromhex(
        "30 04 0001 61 00".replace(" ", "")
    )
    assert p.puback(258) == b"\x40\x02\x01\x02"


def test_parse_takes_complete_packets_and_keeps_the_rest() -> None:
    publish = bytes.fromhex("32 09 0003 612f62 0009 00 a2".replace(" ", ""))  # v5, props 0
    buffer = bytearray(publish + b"\x40\x02\x00\x05" + b"\xd0\x00" + publish[:5])
    out = p.parse_packets(buffer, v5=True)
    assert [x.kind for x in out] == [p.PUBLISH, p.PUBACK, p.PINGRESP]
    assert (out[0].topic, out[0].mid, out[0].qos, out[0].payload) == (b"a/b", 9, 1, b"\xa2")
    assert out[1].mid == 5
    assert bytes(buffer) == publish[:5]


def test_parse_waits_for_a_split_remaining_length() -> None:
    body = b"\x00\x01t" + b"x" * 200  # remaining length 203: two bytes, 0xcb 0x01
    packet = b"\x30\xcb\x01" + body
    buffer = bytearray(packet[:2])
    assert p.parse_packets(buffer, v5=False) == [] and bytes(buffer) == packet[:2]
    buffer += packet[2:]
    [publish] = p.parse_packets(buffer, v5=False)
    assert publish.payload == b"x" * 200 and not buffer


def test_connack_and_suback() -> None:
    [connack, suback] = p.parse_packets(
        bytearray(b"\x20\x02\x01\x00\x90\x03\x00\x01\x80"), v5=False
    )
    assert connack.session_present and connack.code == 0
    assert suback.codes == b"\x80"


def test_garbage_raises_packet_error() -> None:
    with pytest.raises(p.PacketError):
        p.parse_packets(bytearray(b"\x30\xff\xff\xff\xff\x01"), v5=False)


def test_parse_takes_at_most_limit_packets_and_leaves_the_rest_buffered() -> None:
    one = p.publish("votes/p/k", b"\x01", qos=1, retain=False, mid=3, v5=False)
    buffer = bytearray(one * 5)
    assert len(p.parse_packets(buffer, v5=False, limit=2)) == 2
    assert buffer == one * 3
    assert len(p.parse_packets(buffer, v5=False, limit=0)) == 0 and buffer == one * 3
    assert len(p.parse_packets(buffer, v5=False)) == 3 and not buffer


@given(st.binary(max_size=300), st.booleans(), st.none() | st.integers(0, 400))
def test_any_bytes_give_packets_need_more_or_a_protocol_error(
    data: bytes, v5: bool, max_bytes: int | None
) -> None:
    buffer = bytearray(data)
    try:
        out = p.parse_packets(buffer, v5=v5, max_bytes=max_bytes)
    except p.PacketError:
        return
    assert all(isinstance(x, p.Incoming) for x in out)
    assert len(buffer) <= len(data)  # what is left is the unfinished tail, never more


@pytest.mark.parametrize(
    ("data", "v5"),
    [
        (b"\x36\x05\x00\x01t\x00\x01", False),  # PUBLISH QoS 3 (MQTT-3.3.1-4)
        (b"\x32\x04\x00\x09tt", False),  # topic length overruns the packet
        (b"\x32\x05\x00\x01t\x00\x00", False),  # QoS 1 with packet id 0
        (b"\x30\x03\x00\x01#", False),  # a wildcard topic
        (b"\x30\x02\x00\x00", False),  # an empty topic
        (b"\x00\x00", False),  # reserved type 0
        (b"\xf0\x00", True),  # AUTH: no enhanced authentication was asked for
        (b"\x10\x00", False),  # CONNECT comes from clients
        (b"\xc0\x00", False),  # PINGREQ comes from clients
        (b"\x50\x02\x00\x01", False),  # PUBREC: we never publish at QoS 2
        (b"\xb0\x02\x00\x01", False),  # UNSUBACK: we never unsubscribe
        (b"\xe0\x00", False),  # DISCONNECT from a 3.1.1 broker
        (b"\x42\x02\x00\x01", False),  # PUBACK with reserved flags (MQTT-2.2.2-2)
        (b"\x40\x03\x00\x01\x00", False),  # a 3.1.1 PUBACK is two bytes
        (b"\x20\x02\x02\x00", False),  # CONNACK with reserved flags
        (b"\x20\x03\x00\x00\x05", True),  # CONNACK properties overrun
        (b"\x20\x05\x00\x00\x02\x7f\x00", True),  # an unknown property
        (b"\xd0\x01\x00", False),  # PINGRESP with a body
        (b"\x90\x02\x00\x01", False),  # SUBACK without a code
    ],
)
def test_a_packet_that_breaks_the_protocol_is_an_error(data: bytes, v5: bool) -> None:
    with pytest.raises(p.PacketError):
        p.parse_packets(bytearray(data), v5=v5)


def test_connack_properties_and_puback_reasons_are_read() -> None:
    # Session present, success; Receive Maximum 20, Server Keep Alive 15, Maximum Packet Size
    # 1024, a reason string and a user property (dropped).
    props = b"\x21\x00\x14\x13\x00\x0f\x27\x00\x00\x04\x00\x1f\x00\x02ok\x26\x00\x01k\x00\x01v"
    body = b"\x01\x00" + bytes([len(props)]) + props
    buffer = bytearray(bytes([0x20, len(body)]) + body + b"\x40\x03\x00\x07\x87")
    connack, puback = p.parse_packets(buffer, v5=True)
    assert connack.session_present and connack.code == 0
    assert connack.properties == {
        p.RECEIVE_MAXIMUM: 20,
        p.SERVER_KEEP_ALIVE: 15,
        p.MAXIMUM_PACKET_SIZE: 1024,
        p.REASON_STRING: b"ok",
    }
    assert (puback.mid, puback.code) == (7, 0x87)


def test_an_oversized_publish_comes_out_headed_with_the_rest_to_skip() -> None:
    packet = p.publish("votes/p/k", b"x" * 500, qos=1, retain=False, mid=4, v5=False)
    buffer = bytearray(packet[:100])
    [big] = p.parse_packets(buffer, v5=False, max_bytes=200)
    assert (big.kind, big.mid, big.topic, big.payload) == (p.PUBLISH, 4, b"votes/p/k", b"")
    assert big.oversized == len(packet) - 3 and big.skip == len(packet) - 100
    assert not buffer
    # Only a PUBLISH may be that large.
    with pytest.raises(p.PacketError):
        p.parse_packets(bytearray(b"\x90\xff\x01" + b"\x00" * 10), v5=False, max_bytes=100)


def test_connect_5_asks_for_a_maximum_packet_size() -> None:
    packet = p.connect(
        client_id="c",
        v5=True,
        keepalive_s=30,
        username=None,
        password=None,
        session_expiry_s=1,
        receive_maximum=10,
        maximum_packet_size=65536,
    )
    assert b"\x27\x00\x01\x00\x00" in packet
