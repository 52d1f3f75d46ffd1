"""The processor's MQTT packets, byte for byte against the specifications' layouts."""

from __future__ import annotations

import pytest

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
