"""The processor's own MQTT client against a scripted broker on a real socket: keepalive while
reading is paused, session resume, a broker that never answers, the broker's CONNACK
properties, refused publishes, oversized messages and a session taken over.

The scripted broker speaks just enough MQTT for each case and records what it was sent; the
real brokers are in the end-to-end tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import struct
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from processor import mqtt_packets as packets
from processor.config import MqttUrl, Settings
from processor.errors import BrokerUnavailable
from processor.mqtt import MAX_PACKET_BYTES, Delivery, MqttIntake
from tests.conftest import eventually


@dataclasses.dataclass
class Packet:
    kind: int
    flags: int
    body: bytes

    @property
    def mid(self) -> int:
        return int(struct.unpack_from("!H", self.body, 0)[0])


class Peer:
    """The broker's end of one connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def read(self, timeout_s: float = 10.0) -> Packet:
        async with asyncio.timeout(timeout_s):
            first = (await self.reader.readexactly(1))[0]
            length, shift = 0, 0
            while True:
                byte = (await self.reader.readexactly(1))[0]
                length |= (byte & 0x7F) << shift
                shift += 7
                if not byte & 0x80:
                    break
            return Packet(first >> 4, first & 0x0F, await self.reader.readexactly(length))

    async def expect(self, kind: int, timeout_s: float = 10.0) -> Packet:
        """The next packet of ``kind``; PINGREQs before it are answered."""
        while True:
            packet = await self.read(timeout_s)
            if packet.kind == 12 and kind != 12:
                self.send(b"\xd0\x00")
                continue
            assert packet.kind == kind, packet
            return packet

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def handshake(
        self, *, session_present: bool = False, connack: bytes | None = None
    ) -> None:
        await self.expect(1)  # CONNECT
        self.send(connack or bytes([0x20, 2, int(session_present), 0]))
        subscribe = await self.expect(8)
        self.send(b"\x90\x03" + subscribe.body[:2] + b"\x01")

    def publish(self, topic: str, payload: bytes, mid: int) -> None:
        self.send(packets.publish(topic, payload, qos=1, retain=False, mid=mid, v5=False))


Script = Callable[[Peer, int], Awaitable[None]]


@contextlib.asynccontextmanager
async def scripted_broker(script: Script) -> AsyncIterator[tuple[int, list[Peer]]]:
    """A broker on a free loopback port that runs ``script(peer, n)`` for its n-th connection."""
    peers: list[Peer] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = Peer(reader, writer)
        peers.append(peer)
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            await script(peer, len(peers))
            await reader.read()  # hold the connection until the client closes it
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield port, peers
    finally:
        for peer in peers:
            peer.writer.close()
        for peer in peers:
            # Closed and awaited here: a transport left to the garbage collector warns
            # (ResourceWarning, an error under pytest's filter) in whichever test runs then.
            with contextlib.suppress(ConnectionError, TimeoutError):
                await asyncio.wait_for(peer.writer.wait_closed(), 5)
        server.close()
        await server.wait_closed()


def settings(port: int, **overrides: object) -> Settings:
    base = Settings(
        mqtt_url=MqttUrl.parse(f"mqtt://processor@127.0.0.1:{port}"),
        mqtt_protocol="3.1.1",
        mqtt_client_id="votebox-test",
        mqtt_keepalive_s=1,
        mqtt_connect_timeout_s=2.0,
        mqtt_receive_max=1,
    )
    return dataclasses.replace(base, **overrides)  # type: ignore[arg-type]


async def test_a_paused_intake_keeps_a_healthy_connection_past_its_keepalive() -> None:
    async def script(peer: Peer, n: int) -> None:
        await peer.handshake()
        await asyncio.sleep(0.2)  # past the handshake, while which reading is never held back
        for mid in range(1, 7):
            peer.publish("votes/p/k", bytes([mid]), mid)
        while True:  # answer every PINGREQ at once, as a healthy broker does
            packet = await peer.read(30)
            if packet.kind == 12:
                peer.send(b"\xd0\x00")

    async with scripted_broker(script) as (port, peers):
        async with MqttIntake(settings=settings(port), topic_filters=["votes/#"]) as intake:
            first = await intake.next_batch(10)
            assert [d.payload for d in first] == [b"\x01", b"\x02"]  # held: 2, reading paused
            await asyncio.sleep(3.5)  # over three keepalives with reading paused
            assert intake.connected and intake.connections == 1 and len(peers) == 1
            intake.settle(first)
            rest = await intake.next_batch(10)
            assert rest[0].payload == b"\x03" and rest[0].generation == first[0].generation


async def test_a_broker_that_never_answers_connect_is_given_up_in_time() -> None:
    async def script(peer: Peer, n: int) -> None:
        await peer.read()  # CONNECT, never answered
        await asyncio.sleep(30)

    async with scripted_broker(script) as (port, _):
        started = asyncio.get_running_loop().time()
        with pytest.raises(BrokerUnavailable, match="no CONNACK"):
            async with MqttIntake(settings=settings(port), topic_filters=["votes/#"]):
                pass
        assert asyncio.get_running_loop().time() - started < 10


async def test_after_a_lost_connection_the_session_resumes_and_old_packet_ids_are_void() -> None:
    acked: list[int] = []
    resent: list[Packet] = []

    async def script(peer: Peer, n: int) -> None:
        if n == 1:
            await peer.handshake()
            peer.publish("votes/p/k", b"first", 7)
            await peer.expect(3)  # our own QoS 1 publish, never acked here
            peer.writer.close()  # the link drops before anything is acked
            return
        await peer.handshake(session_present=True)
        resent.append(await peer.expect(3))  # MQTT-4.4.0-1: our publish again, DUP set
        peer.send(b"\x40\x02" + resent[0].body[2 + resent[0].body[1] : 4 + resent[0].body[1]])
        peer.publish("votes/p/k", b"first", 9)  # the broker resends with its own new id
        acked.append((await peer.expect(4)).mid)

    async with scripted_broker(script) as (port, peers):
        intake_settings = settings(port)
        async with MqttIntake(settings=intake_settings, topic_filters=["votes/#"]) as intake:
            [old] = await intake.next_batch(10)
            intake.publish("polls/p/results", b"{}", qos=1, retain=True)
            [new] = await intake.next_batch(10)
            assert new.generation > old.generation and intake.connections == 2
            intake.settle([old, new])  # only the copy from this connection is acked
            await intake.drain()
            await eventually(lambda: not (not acked), timeout_s=10)
    assert acked == [9]
    assert resent[0].flags & 0x08  # DUP


async def test_a_fenced_publish_is_not_resent_once_its_fence_says_no() -> None:
    """The results lease's fence (processor/results.py): a retained result sent before the
    holder lost its lease is not re-sent after the reconnect, where it would replace the new
    holder's newer one; an unfenced publish is re-sent as MQTT-4.4.0-1 says."""
    allowed = True
    resent: list[bytes] = []

    async def script(peer: Peer, n: int) -> None:
        nonlocal allowed
        if n == 1:
            await peer.handshake()
            for _ in range(2):
                await peer.expect(3)  # both publishes, never acked here
            allowed = False  # the lease lapses while the link is down
            peer.writer.close()
            return
        await peer.handshake(session_present=True)
        while (publish := await peer.read()).kind != 14:  # until DISCONNECT
            if publish.kind == 12:
                peer.send(b"\xd0\x00")
                continue
            topic_len = struct.unpack_from("!H", publish.body, 0)[0]
            resent.append(publish.body[2 : 2 + topic_len])
            peer.send(b"\x40\x02" + publish.body[2 + topic_len : 4 + topic_len])

    async with scripted_broker(script) as (port, peers):
        async with MqttIntake(settings=settings(port), topic_filters=["votes/#"]) as intake:
            intake.publish("polls/p/results", b"{}", qos=1, retain=True, fence=lambda: allowed)
            intake.publish("votebox/stats", b"{}", qos=1, retain=True)
            await eventually(lambda: not (len(peers) < 2), timeout_s=10)
            await intake.drain()
            intake.publish("polls/p/results", b"{}", qos=1, retain=True, fence=lambda: allowed)
            intake.publish("votebox/other", b"{}", qos=1, retain=True)
            await eventually(lambda: not (len(resent) < 2), timeout_s=10)
            await intake.drain()
    assert resent == [b"votebox/stats", b"votebox/other"]


def _v5_connack(props: bytes) -> bytes:
    body = b"\x00\x00" + bytes([len(props)]) + props
    return bytes([0x20, len(body)]) + body


async def test_the_brokers_receive_maximum_bounds_our_unacked_publishes() -> None:
    seen: list[int] = []
    release = asyncio.Event()

    async def script(peer: Peer, n: int) -> None:
        # Receive Maximum 2, Server Keep Alive 5 s.
        await peer.expect(1)
        peer.send(_v5_connack(b"\x21\x00\x02\x13\x00\x05"))
        subscribe = await peer.expect(8)
        peer.send(b"\x90\x04" + subscribe.body[:2] + b"\x00\x01")
        first_two = [await peer.expect(3) for _ in range(2)]
        seen.extend(p.flags for p in first_two)
        with pytest.raises(TimeoutError):
            await peer.read(0.5)  # a third would break MQTT-4.9.0-1
        await release.wait()
        for publish in first_two:  # room again: the rest follow, two at a time
            topic_len = struct.unpack_from("!H", publish.body, 0)[0]
            peer.send(b"\x40\x02" + publish.body[2 + topic_len : 4 + topic_len])
        for _ in range(5):
            publish = await peer.expect(3)
            topic_len = struct.unpack_from("!H", publish.body, 0)[0]
            peer.send(b"\x40\x02" + publish.body[2 + topic_len : 4 + topic_len])
            seen.append(publish.flags)

    async with scripted_broker(script) as (port, peers):
        s = settings(port, mqtt_protocol="5")
        async with MqttIntake(settings=s, topic_filters=["votes/#"]) as intake:
            assert intake.send_quota == 2 and intake._keepalive_s == 5
            for i in range(7):
                intake.publish(f"polls/p{i}/results", b"{}", qos=1, retain=True)
            await asyncio.sleep(1.0)
            release.set()
            # Two went out and wait for PUBACKs; the other five follow as they come.
            await eventually(lambda: not (len(seen) < 7), timeout_s=10)


async def test_a_refused_publish_and_a_taken_over_session_are_reported() -> None:
    refused: list[tuple[str, int]] = []
    takeovers: list[bool] = []

    async def script(peer: Peer, n: int) -> None:
        await peer.expect(1)
        peer.send(_v5_connack(b""))
        subscribe = await peer.expect(8)
        peer.send(b"\x90\x04" + subscribe.body[:2] + b"\x00\x01")
        publish = await peer.expect(3)
        topic_len = struct.unpack_from("!H", publish.body, 0)[0]
        mid = publish.body[2 + topic_len : 4 + topic_len]
        peer.send(b"\x40\x03" + mid + b"\x87")  # 0x87 not authorized
        if n == 1:
            peer.send(b"\xe0\x01\x8e")  # DISCONNECT, 0x8E session taken over
            peer.writer.close()

    async with scripted_broker(script) as (port, _):
        async with MqttIntake(
            settings=settings(port, mqtt_protocol="5"),
            topic_filters=["votes/#"],
            on_refused=lambda topic, code: refused.append((topic, code)),
            on_takeover=lambda: takeovers.append(True),
        ) as intake:
            intake.publish("polls/p/results", b"{}", qos=1, retain=True)
            await eventually(lambda: not (not takeovers or not refused), timeout_s=10)
            assert intake.takeovers == 1
    assert refused[0] == ("polls/p/results", 0x87)


async def test_an_oversized_message_is_read_past_acked_and_marked_too_large() -> None:
    big = b"x" * (MAX_PACKET_BYTES + 10_000)
    acked: list[int] = []

    async def script(peer: Peer, n: int) -> None:
        await peer.handshake()
        packet = packets.publish("votes/p/k", big, qos=1, retain=False, mid=5, v5=False)
        for at in range(0, len(packet), 4096):  # in pieces, as TCP delivers it
            peer.send(packet[at : at + 4096])
            await peer.writer.drain()
        peer.publish("votes/p/k", b"after", 6)
        for _ in range(2):
            acked.append((await peer.expect(4)).mid)

    async with scripted_broker(script) as (port, _):
        s = settings(port, mqtt_receive_max=10)
        async with MqttIntake(settings=s, topic_filters=["votes/#"]) as intake:
            got: list[Delivery] = []
            async with asyncio.timeout(10):
                while len(got) < 2:
                    batch = await intake.next_batch(10)
                    got += batch
                    intake.settle(batch)
            assert (got[0].too_large, got[0].payload, got[0].mid) == (len(big) + 13, b"", 5)
            assert (got[1].too_large, got[1].payload) == (0, b"after")
            await eventually(lambda: not (len(acked) < 2), timeout_s=10)
    assert acked == [5, 6]


async def test_a_malformed_packet_from_the_broker_drops_the_connection() -> None:
    async def script(peer: Peer, n: int) -> None:
        await peer.handshake()
        if n == 1:
            await asyncio.sleep(0.2)  # after the handshake
            peer.send(b"\x36\x05\x00\x01t\x00\x01")  # PUBLISH with QoS 3

    async with scripted_broker(script) as (port, peers):
        async with MqttIntake(settings=settings(port), topic_filters=["votes/#"]) as intake:
            await eventually(lambda: not (intake.connections < 2), timeout_s=10)
            assert len(peers) == 2


async def test_deliveries_held_for_a_stalled_commit_are_not_taken_for_a_lost_session() -> None:
    """Our probe stops coming back while a delivery waits for its commit (a broker may hold
    what it would send us behind it): that is our stall, not a lost session."""

    async def script(peer: Peer, n: int) -> None:
        await peer.handshake()
        probe = await peer.expect(3)  # the first probe, at connect: echoed
        peer.send(bytes([0x30, len(probe.body)]) + probe.body)
        await asyncio.sleep(0.2)
        peer.publish("votes/p/k", b"\x01", 1)
        while True:  # PINGREQs answered; later probes swallowed
            packet = await peer.read(30)
            if packet.kind == 12:
                peer.send(b"\xd0\x00")

    async with scripted_broker(script) as (port, peers):
        s = settings(port, mqtt_receive_max=10)
        async with MqttIntake(
            settings=s, topic_filters=["votes/#"], probe_topic="votebox/probe/test"
        ) as intake:
            [held] = await intake.next_batch(10)
            await asyncio.sleep(4.0)  # over three keepalives, the delivery still held
            assert intake.connections == 1 and len(peers) == 1
            intake.settle([held])
