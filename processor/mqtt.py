"""MQTT intake and output. Rule: a delivery is acknowledged only through `settle`, after commit.

A small MQTT client on an asyncio Protocol (packets in processor/mqtt_packets.py). Why our own:
aiomqtt acknowledges a QoS 1 message when it queues it, before we could commit it, and drops
acknowledged messages when its queue is full (aiomqtt#345); paho-mqtt has manual acks, but
under load it spent 57% of the processor's CPU reading packets byte by byte and writing each
PUBACK with its own system call (docs/benchmarks.md, Profile); gmqtt acks on receipt under MQTT
3.1.1, which the embedded amqtt broker speaks. Here a read parses every packet that arrived,
and all PUBACKs and acks of a batch leave in one write.

Backpressure: the broker sends at most Receive Maximum un-acked messages (MQTT 5, 3.3.4); for an
MQTT 3.1.1 broker that ignores flow control (amqtt), reading pauses while too many deliveries are
held, and TCP holds back the rest.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import ssl
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Final, NamedTuple, Self

from processor import mqtt_packets as packets
from processor.backoff import backoff_delays
from processor.config import Settings
from processor.errors import BrokerUnavailable
from processor.supervise import supervised

__all__ = ["Delivery", "Fence", "MqttIntake", "Publish"]

log = logging.getLogger(__name__)

# What the results and stats publishers are handed: a retained QoS 1 publish of the intake.
Publish = Callable[[str, bytes], None]
# Asked before each send of a message, the first and any resend after a reconnect: False
# drops it. A message that may no longer go out (the results lease lapsed) is not sent late.
Fence = Callable[[], bool]

_SUBSCRIBE_MID: Final = 1
# The largest packet we take whole (MQTT 5 tells the broker so in CONNECT; on 3.1.1 a larger
# PUBLISH is read past, acked and rejected as too_large). Votes are at most 4096 bytes of
# payload; Mosquitto as composed refuses packets over 16 KiB anyway.
MAX_PACKET_BYTES: Final = 65536
# MQTT 5 reason codes we act on (MQTT 5, 2.4): a PUBACK or DISCONNECT from 0x80 up is a refusal.
_SESSION_TAKEN_OVER: Final = 0x8E
_PACKET_TOO_LARGE: Final = 0x95
# A connection the broker closes within this time of making it is a short one; this many
# short ones within the window are a tug of war over our client id.
_SHORT_CONNECTION_S: Final = 5.0
_FLAPPING_COUNT: Final = 3
_FLAPPING_WINDOW_S: Final = 60.0
# Keepalives to wait for a probe that has never come back on this broker.
_UNPROVEN_PROBE_KEEPALIVES: Final = 3


class Delivery(NamedTuple):
    """One received MQTT message, still owed an acknowledgement if ``qos`` > 0. A NamedTuple:
    one is built per message (see codec.Vote)."""

    topic: str
    payload: bytes
    mid: int
    qos: int
    # Which connection it came on: a packet id means nothing on a later connection, where the
    # broker resends the message itself.
    generation: int
    # Loop time when its bytes arrived (one clock read per read from the socket, not per message).
    received_s: float = 0.0
    # A message over MAX_PACKET_BYTES: its size; its payload was not read (too_large).
    too_large: int = 0


class _Protocol(asyncio.Protocol):
    """One TCP connection to the broker; hands parsed packets to the intake."""

    def __init__(self, intake: MqttIntake, generation: int, v5: bool) -> None:
        self._intake = intake
        self._generation = generation
        self._v5 = v5
        self._buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self._out: list[bytes] = []
        self.closed = asyncio.get_running_loop().create_future()
        self.paused = False
        # Bytes of an oversized PUBLISH still to arrive, dropped unread (parse_packets).
        self._skip = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self._skip:
            dropped = min(self._skip, len(data))
            self._skip -= dropped
            data = data[dropped:]
        self._buffer += data
        self.take_packets()

    def take_packets(self) -> None:
        """Hand over the complete packets buffered, as many as the intake has room for; the
        rest wait in the buffer (and reading pauses) until `MqttIntake.settle` makes room."""
        room = self._intake._room()
        if room == 0:
            return
        try:
            incoming = packets.parse_packets(
                self._buffer, v5=self._v5, limit=room, max_bytes=MAX_PACKET_BYTES
            )
        except packets.PacketError as exc:
            # A broker that breaks the protocol: nothing it says next can be trusted.
            log.error("protocol error from the broker, reconnecting: %s", exc)
            self.close()
            return
        if incoming:
            self._skip = incoming[-1].skip
            now = asyncio.get_running_loop().time()
            for packet in incoming:
                self._intake._handle(packet, self._generation, now)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        self._intake._connection_lost(self._generation, exc)

    def send(self, data: bytes) -> None:
        """Queue bytes; everything queued in one loop iteration leaves in one write."""
        if not self._out:
            asyncio.get_running_loop().call_soon(self._flush)
        self._out.append(data)

    def _flush(self) -> None:
        if self._out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(self._out))
        self._out.clear()

    def close(self) -> None:
        self._flush()
        if self.transport is not None:
            self.transport.close()


class MqttIntake:
    """A persistent MQTT session that yields batches of deliveries and acks them on demand.

    Use as ``async with MqttIntake(settings=s, topic_filters=["votes/#"]) as intake:``; it returns
    once connected (and subscribed, on a new session) and keeps reconnecting with backoff until
    closed.

    Args:
        settings: broker URL, client id, protocol, receive maximum, keepalive.
        topic_filters: what to subscribe to, at QoS 1, in one SUBSCRIBE.
        on_connect: called with the number of connections so far after each one (1: the first).
        on_refused: called with the topic and reason code of each of our QoS 1 publishes the
            broker refused (MQTT 5 PUBACK reason 0x80 and up), or that was too large to send.
        on_takeover: called when the broker says another client took our session over.
        probe_topic: a topic only this client reads (processor/topics.py). Subscribed to with
            the filters; a message sent there whenever nothing has arrived for half a
            keepalive shows that the broker still routes to our session. Once it has come back
            on this broker, a keepalive with neither it nor anything else arriving means the
            session was lost or taken over without a word (amqtt does that): reconnect.
        failed: told when a background loop (keepalive, reconnect) fails, before the failure
            ends the intake (processor/supervise.py).
    """

    def __init__(
        self,
        *,
        settings: Settings,
        topic_filters: Sequence[str],
        on_connect: Callable[[int], object] | None = None,
        on_refused: Callable[[str, int], object] | None = None,
        on_takeover: Callable[[], object] | None = None,
        failed: Callable[[str, BaseException], None] | None = None,
        probe_topic: str | None = None,
    ) -> None:
        self._probe_topic = probe_topic
        self._probe_bytes = probe_topic.encode() if probe_topic else b""
        # Loop time of the last PUBLISH from the broker, and of the probe in flight (if any);
        # whether a probe ever came back here (a broker whose ACL withholds it is not judged).
        self._last_delivery = 0.0
        self._probe_sent: float | None = None
        self._probe_works = False
        self._on_connect = on_connect
        self._on_refused = on_refused
        self._on_takeover = on_takeover
        self._failed = failed
        self._settings = settings
        self._filters = tuple(topic_filters) + ((probe_topic,) if probe_topic else ())
        self._v5 = settings.mqtt_protocol == "5"
        self._loop = asyncio.get_running_loop()
        self._pending: list[Delivery] = []
        self._has_pending = asyncio.Event()
        self._held = 0
        self._max_held = settings.mqtt_receive_max * 2
        # While connecting, reading never pauses: CONNACK and SUBACK must get through even when
        # a broker replays a long offline queue first (amqtt does) and nobody consumes yet.
        self._handshaking = False
        self._generation = 0
        self._protocol: _Protocol | None = None
        self._connected = asyncio.Event()
        self._disconnected = asyncio.Event()
        self._connack: asyncio.Future[bool] | None = None
        self._suback: asyncio.Future[None] | None = None
        self._pingresp_due: float | None = None
        # Our QoS 1 publishes not yet acknowledged by the broker: resent after a reconnect.
        self._unacked_out: dict[int, tuple[str, bytes, bool, Fence | None]] = {}
        # Of those, the ones sent on this connection, and the ones waiting for room: the broker
        # takes at most its Receive Maximum un-acked at once (MQTT-4.9.0-1).
        self._in_flight: set[int] = set()
        self._waiting: collections.deque[int] = collections.deque()
        self._sent_before: set[int] = set()
        # What the broker said in its CONNACK (MQTT 5, 3.2.2.3); 3.1.1 says nothing.
        self._keepalive_s = settings.mqtt_keepalive_s
        self._send_quota = 65535
        self._broker_max_packet: int | None = None
        self._connack_properties: Mapping[int, int | bytes] = {}
        self._next_mid = 1
        self._drained = asyncio.Event()
        self._drained.set()
        self._closing = False
        self._tasks: list[asyncio.Task[None]] = []
        self._stack = contextlib.AsyncExitStack()
        self._interrupted = False
        # Successful connections so far; more than one means reconnects (a metric).
        self.connections = 0
        # Times another client with our client id was found (DISCONNECT 0x8E, or the broker
        # closing connection after connection): two processors with one client id.
        self.takeovers = 0
        self._connected_at = 0.0
        self._short_connections: collections.deque[float] = collections.deque()

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self._connect()
        group = await self._stack.enter_async_context(asyncio.TaskGroup())
        loops = {
            "votebox.mqtt.keepalive": self._keepalive_loop(),
            "votebox.mqtt.reconnect": self._reconnect_loop(),
        }
        self._tasks = [
            group.create_task(
                supervised(name, loop, failed=self._failed) if self._failed else loop, name=name
            )
            for name, loop in loops.items()
        ]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._closing = True
        try:
            protocol = self._protocol
            if protocol is not None and self._connected.is_set():
                protocol.send(packets.disconnect())
                protocol.close()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(2):
                        await protocol.closed
        finally:
            for task in self._tasks:
                task.cancel()
            await self._stack.aclose()

    # -- intake ----------------------------------------------------------------------------

    async def next_batch(self, max_size: int) -> list[Delivery]:
        """Wait for at least one delivery, then return every pending one, up to ``max_size``.

        Batches grow by themselves under load: whatever arrived while the last batch was being
        committed forms the next one, so there is no timer and no added latency.

        Returns an empty batch, once, after `interrupt`.
        """
        while not self._pending:
            if self._interrupted:
                self._interrupted = False
                return []
            self._has_pending.clear()
            await self._has_pending.wait()
        batch, self._pending = self._pending[:max_size], self._pending[max_size:]
        return batch

    def interrupt(self) -> None:
        """Wake a waiting `next_batch` with an empty batch (to notice a stop request)."""
        self._interrupted = True
        self._has_pending.set()

    def settle(self, batch: list[Delivery]) -> None:
        """Acknowledge deliveries whose fate is committed, and release their hold on the intake.

        A delivery from an earlier connection is not acknowledged (its packet id is void); the
        broker resends it and the tally counts that copy as a duplicate.
        """
        protocol = self._protocol
        if protocol is not None:
            acks = [
                packets.puback(d.mid)
                for d in batch
                if d.qos > 0 and d.generation == self._generation
            ]
            if acks:
                protocol.send(b"".join(acks))
        self._held -= len(batch)
        if protocol is not None and protocol.paused and self._held < self._max_held:
            protocol.paused = False
            assert protocol.transport is not None
            protocol.transport.resume_reading()
            protocol.take_packets()  # what one read brought beyond the bound is still buffered

    @property
    def held(self) -> int:
        """Deliveries received and not yet settled."""
        return self._held

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    # -- output ----------------------------------------------------------------------------

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        fence: Fence | None = None,
    ) -> None:
        """Send a message. QoS 1 ones are kept until the broker acks them, across reconnects,
        and sent as the broker's Receive Maximum allows; ``fence``, if given, is asked before
        each send, and False drops the message."""
        if qos:
            mid = self._take_mid()
            self._unacked_out[mid] = (topic, payload, retain, fence)
            self._drained.clear()
            self._waiting.append(mid)
            self._send_waiting()
        elif fence is not None and not fence():
            return
        elif self._protocol is not None and self._connected.is_set():
            packet = packets.publish(topic, payload, qos=0, retain=retain, mid=0, v5=self._v5)
            if self._fits(topic, packet):
                self._protocol.send(packet)

    def _send_waiting(self) -> None:
        protocol = self._protocol
        if protocol is None or not self._connected.is_set():
            return
        while self._waiting and len(self._in_flight) < self._send_quota:
            mid = self._waiting.popleft()
            if mid not in self._unacked_out:
                continue
            topic, payload, retain, fence = self._unacked_out[mid]
            if fence is not None and not fence():
                self._settled_out(mid)
                continue
            packet = packets.publish(
                topic,
                payload,
                qos=1,
                retain=retain,
                mid=mid,
                v5=self._v5,
                dup=mid in self._sent_before,  # MQTT-3.3.1-1: a resend says so
            )
            if not self._fits(topic, packet):
                self._settled_out(mid)
                continue
            self._in_flight.add(mid)
            self._sent_before.add(mid)
            protocol.send(packet)

    def _fits(self, topic: str, packet: bytes) -> bool:
        limit = self._broker_max_packet
        if limit is None or len(packet) <= limit:
            return True
        log.error(
            "not sent to %s: %d bytes, over the broker's Maximum Packet Size %d",
            topic,
            len(packet),
            limit,
        )
        if self._on_refused is not None:
            self._on_refused(topic, _PACKET_TOO_LARGE)
        return False

    def _settled_out(self, mid: int) -> None:
        self._unacked_out.pop(mid, None)
        self._in_flight.discard(mid)
        self._sent_before.discard(mid)
        if not self._unacked_out:
            self._drained.set()

    async def wait_unacked_below(self, limit: int, *, timeout_s: float) -> None:
        """Wait until fewer than ``limit`` of our QoS 1 publishes await the broker's PUBACK
        (or ``timeout_s`` passes): a burst of publishes goes at the broker's pace."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while len(self._unacked_out) >= limit and self.connected:
                    self._drained.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(0.05):
                            await self._drained.wait()

    async def drain(self) -> None:
        """Wait until every QoS 1 publish so far was acknowledged (or the connection is gone)."""
        while self._unacked_out and self.connected:
            self._drained.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.1):
                    await self._drained.wait()

    def _take_mid(self) -> int:
        # Packet ids 2..65535 for our publishes; 1 is the subscription's.
        for _ in range(65534):
            mid = self._next_mid
            self._next_mid = mid + 1 if mid < 65535 else 2
            if mid != _SUBSCRIBE_MID and mid not in self._unacked_out:
                return mid
        raise BrokerUnavailable("65,534 publishes waiting for the broker's PUBACK")

    # -- connection ------------------------------------------------------------------------

    async def _connect(self) -> None:
        s = self._settings
        self._generation += 1
        generation = self._generation
        self._connack = self._loop.create_future()
        self._suback = self._loop.create_future()
        self._handshaking = True
        protocol: _Protocol | None = None
        try:
            async with asyncio.timeout(s.mqtt_connect_timeout_s):
                _, protocol = await self._loop.create_connection(
                    lambda: _Protocol(self, generation, self._v5),
                    s.mqtt_url.host,
                    s.mqtt_url.port,
                    # mqtts:// verifies the broker against the system's CAs, or against
                    # VOTEBOX_MQTT_CA_FILE for a private CA.
                    ssl=ssl.create_default_context(cafile=s.mqtt_ca_file)
                    if s.mqtt_url.tls
                    else None,
                )
                self._protocol = protocol
                protocol.send(
                    packets.connect(
                        client_id=s.mqtt_client_id,
                        v5=self._v5,
                        keepalive_s=s.mqtt_keepalive_s,
                        username=s.mqtt_url.username,
                        password=s.mqtt_url.password,
                        session_expiry_s=s.session_expiry_s(),
                        receive_maximum=s.mqtt_receive_max,
                        maximum_packet_size=MAX_PACKET_BYTES if self._v5 else None,
                    )
                )
                session_present = await self._connack
                # Subscribe on a resumed session too (harmless, and it repairs a broker that
                # kept the session but lost its subscriptions). Wait for the SUBACK only on a
                # new session: amqtt answers a resumed session's SUBSCRIBE only after its
                # offline queue is acked, and acks come from the consumer, which starts when
                # this returns. A resumed session is subscribed already.
                protocol.send(packets.subscribe(_SUBSCRIBE_MID, self._filters, v5=self._v5))
                if session_present:
                    self._suback = None  # nobody waits; a refusal is still logged
                else:
                    await self._suback
        except TimeoutError:
            if protocol is not None:
                protocol.close()
            hint = (
                " An MQTT 3.1.1-only broker (amqtt) never answers an MQTT 5 CONNECT: "
                "set VOTEBOX_MQTT_PROTOCOL=3.1.1."
                if self._v5
                else ""
            )
            raise BrokerUnavailable(
                f"no CONNACK/SUBACK from {s.mqtt_url} within {s.mqtt_connect_timeout_s} s.{hint}"
            ) from None
        except OSError as exc:
            if protocol is not None:
                protocol.close()
            raise BrokerUnavailable(f"cannot reach {s.mqtt_url}: {exc}") from None
        except BrokerUnavailable:
            if protocol is not None:
                protocol.close()
            raise
        finally:
            self._handshaking = False
        self._pingresp_due = self._probe_sent = None
        self._last_delivery = self._connected_at = self._loop.time()
        self._take_connack_properties()
        if not session_present and self.connections:
            log.warning(
                "the broker had no session for %s: whatever it held for us is gone (the "
                "devices send it again, unacknowledged); subscribed again",
                s.mqtt_client_id,
            )
        self._disconnected.clear()
        self._connected.set()
        self.connections += 1
        if self._on_connect is not None:
            self._on_connect(self.connections)
        # MQTT-4.4.0-1: on a resumed session, resend un-acked QoS 1 publishes (DUP set), as
        # many as the broker takes at once; the rest as its PUBACKs come.
        self._in_flight.clear()
        self._waiting = collections.deque(self._unacked_out)
        self._send_waiting()
        self._pause_if_full(protocol)
        # At once, whatever arrives: that the broker routes the probe is learnt early.
        self._probe_if_quiet(protocol, self._loop.time(), now_too=True)
        log.info(
            "connected to %s as %s (session %s)",
            s.mqtt_url,
            s.mqtt_client_id,
            "resumed" if session_present else "new",
        )

    def _take_connack_properties(self) -> None:
        """Honour the broker's CONNACK (MQTT 5, 3.2.2.3): its keepalive replaces ours
        (MQTT-3.2.2-21), its Receive Maximum bounds our un-acked publishes, its Maximum Packet
        Size bounds what we send. We send no topic aliases, so its Topic Alias Maximum asks
        nothing of us."""
        props = self._connack_properties
        keepalive = props.get(packets.SERVER_KEEP_ALIVE)
        # 0 turns the broker's side of keepalive off; our own checks still need a period.
        self._keepalive_s = (
            keepalive
            if isinstance(keepalive, int) and keepalive > 0
            else self._settings.mqtt_keepalive_s
        )
        quota = props.get(packets.RECEIVE_MAXIMUM)
        self._send_quota = quota if isinstance(quota, int) and quota > 0 else 65535
        size = props.get(packets.MAXIMUM_PACKET_SIZE)
        self._broker_max_packet = size if isinstance(size, int) and size > 0 else None
        if self._keepalive_s != self._settings.mqtt_keepalive_s:
            log.info("the broker sets the keepalive to %d s", self._keepalive_s)

    @property
    def send_quota(self) -> int:
        """How many of our QoS 1 publishes the broker takes un-acked at once."""
        return self._send_quota

    async def _reconnect_loop(self) -> None:
        while True:
            await self._disconnected.wait()
            if self._closing:
                return
            for delay in backoff_delays(base_s=0.2, cap_s=10.0):
                await asyncio.sleep(delay)
                try:
                    await self._connect()
                    break
                except BrokerUnavailable as exc:
                    log.warning("reconnect failed: %s; retrying", exc)

    async def _keepalive_loop(self) -> None:
        # MQTT-3.1.2-24: the broker drops us after 1.5 keepalives of silence; a PINGREQ every
        # half keepalive is well inside that. No PINGRESP within a keepalive: the link is dead.
        while True:
            await asyncio.sleep(max(0.5, self._keepalive_s / 2))
            protocol = self._protocol
            if protocol is None or not self._connected.is_set():
                continue
            now = self._loop.time()
            if self._held:
                # Deliveries wait for a commit (Redis may be stalled): the broker has served
                # the session; whether it still does is judged once they are settled.
                self._last_delivery, self._probe_sent = now, None
            if protocol.paused:
                # Reading is held back (Redis stalled, intake full), so a PINGRESP cannot be
                # read: keep the broker's keepalive with PINGREQs, judge the link once reading
                # resumes. Nothing can be committed meanwhile, so nothing is lost by waiting.
                self._pingresp_due = self._probe_sent = None
            elif self._pingresp_due is not None and now > self._pingresp_due:
                log.warning("no PINGRESP within %d s: reconnecting", self._keepalive_s)
                protocol.close()
                continue
            elif self._session_lost(now):
                log.error(
                    "nothing from the broker for %.0f s, not even our probe on %s: it no longer "
                    "routes to our session (taken over by a client with our id?%s); reconnecting",
                    now - self._last_delivery,
                    self._probe_topic,
                    ""
                    if self._probe_works
                    else " or the broker's ACL does not let the processor read votebox/probe/+:"
                    " render it again with `votebox device add`",
                )
                self._note_short_connection()
                protocol.close()
                continue
            if self._pingresp_due is None and not protocol.paused:
                self._pingresp_due = now + max(1, self._keepalive_s)
            protocol.send(packets.PINGREQ)
            if not protocol.paused:
                self._probe_if_quiet(protocol, now)

    def _session_lost(self, now: float) -> bool:
        sent = self._probe_sent
        if sent is None:
            return False
        # A probe that never came back here may be the ACL's doing (an old one without
        # votebox/probe/+ for the processor): judged more slowly, and the log says so.
        limit = self._keepalive_s * (1 if self._probe_works else _UNPROVEN_PROBE_KEEPALIVES)
        return now - sent > limit and now - self._last_delivery > limit

    def _probe_if_quiet(self, protocol: _Protocol, now: float, *, now_too: bool = False) -> None:
        # Under load deliveries show the session is served; a probe only when it is quiet.
        if self._probe_topic is None or self._probe_sent is not None:
            return
        if not now_too and now - self._last_delivery < self._keepalive_s / 2:
            return
        self._probe_sent = now
        protocol.send(
            packets.publish(self._probe_topic, b"", qos=0, retain=False, mid=0, v5=self._v5)
        )

    # -- packets ---------------------------------------------------------------------------

    def _handle(self, packet: packets.Incoming, generation: int, now: float) -> None:
        if generation != self._generation:
            return
        kind = packet.kind
        if kind == packets.PUBLISH:
            self._last_delivery = now
            if packet.topic == self._probe_bytes:
                self._probe_sent = None
                if not self._probe_works:
                    self._probe_works = True
                    log.info(
                        "the broker routes our probe: a lost session is found within %d s",
                        self._keepalive_s,
                    )
                return
            try:
                topic = packet.topic.decode()
            except UnicodeDecodeError:
                topic = ""  # MQTT-1.5.3-1 forbids it; parse_vote_topic rejects it as bad_topic
            # Every field in order, without the generated __new__ (see codec.Vote).
            self._pending.append(
                tuple.__new__(
                    Delivery,
                    (
                        topic,
                        packet.payload,
                        packet.mid,
                        packet.qos,
                        generation,
                        now,
                        packet.oversized,
                    ),
                )
            )
            self._held += 1
            self._has_pending.set()
            if self._protocol is not None:
                self._pause_if_full(self._protocol)
        elif kind == packets.PUBACK:
            if packet.code >= 0x80:
                topic = self._unacked_out.get(packet.mid, ("?", b"", False, None))[0]
                log.warning(
                    "the broker refused our publish to %s (reason 0x%02x)", topic, packet.code
                )
                if self._on_refused is not None:
                    self._on_refused(topic, packet.code)
            self._settled_out(packet.mid)
            self._send_waiting()
        elif kind == packets.PINGRESP:
            self._pingresp_due = None
        elif kind == packets.CONNACK:
            self._resolve_connack(packet)
        elif kind == packets.SUBACK:
            self._resolve_suback(packet)
        elif kind == packets.DISCONNECT:
            if packet.code == _SESSION_TAKEN_OVER:
                self._said_taken_over("the broker said so: DISCONNECT 0x8E, session taken over")
            else:
                log.warning("the broker disconnected us (reason 0x%02x)", packet.code)

    def _room(self) -> int | None:
        """How many more packets to take now; None while handshaking (never held back)."""
        if self._handshaking:
            return None
        return max(0, self._max_held - self._held)

    def _pause_if_full(self, protocol: _Protocol) -> None:
        if self._held >= self._max_held and not self._handshaking and not protocol.paused:
            protocol.paused = True
            assert protocol.transport is not None
            protocol.transport.pause_reading()

    def _resolve_connack(self, packet: packets.Incoming) -> None:
        future = self._connack
        if future is None or future.done():
            return
        self._connack_properties = packet.properties or {}
        if packet.code:
            future.set_exception(
                BrokerUnavailable(f"broker refused the connection (CONNACK code {packet.code})")
            )
        else:
            future.set_result(packet.session_present)

    def _resolve_suback(self, packet: packets.Incoming) -> None:
        refused = [f for f, code in zip(self._filters, packet.codes, strict=False) if code >= 0x80]
        if refused:
            log.error(
                "subscription to %s refused (SUBACK codes %s): grant the processor's account "
                "read access (broker/mosquitto.acl)",
                refused,
                list(packet.codes),
            )
        future = self._suback
        if future is None or future.done():
            return
        # Only the first filter (the votes) is essential: without the others the processor still
        # counts votes, and the error above says what is missing.
        if self._filters[0] in refused:
            future.set_exception(
                BrokerUnavailable(f"subscription to {self._filters[0]} refused: {refused}")
            )
        else:
            future.set_result(None)

    def _connection_lost(self, generation: int, exc: Exception | None) -> None:
        if generation != self._generation:
            return
        self._protocol = None
        was_connected = self._connected.is_set()
        self._connected.clear()
        self._drained.set()  # nobody can ack now; drain() must not wait for it
        for future in (self._connack, self._suback):
            if future is not None and not future.done():
                future.set_exception(BrokerUnavailable(f"connection lost: {exc}"))
        if was_connected:
            self._disconnected.set()
            if not self._closing:
                log.warning(
                    "disconnected from the broker (%s); un-acked votes will be resent",
                    exc or "closed by the broker",
                )
                self._note_short_connection()

    def _note_short_connection(self) -> None:
        """A broker that closes one connection after another moments after they are made is
        most often handing our session to another client with our client id, and back:
        Mosquitto before 2.0.15 and amqtt say nothing else of a takeover."""
        now = self._loop.time()
        if now - self._connected_at > _SHORT_CONNECTION_S:
            return
        recent = self._short_connections
        recent.append(now)
        while recent and now - recent[0] > _FLAPPING_WINDOW_S:
            recent.popleft()
        if len(recent) >= _FLAPPING_COUNT:
            recent.clear()
            self._said_taken_over(
                f"the broker closed {_FLAPPING_COUNT} connections within "
                f"{_FLAPPING_WINDOW_S:.0f} s, each moments after it was made"
            )

    def _said_taken_over(self, evidence: str) -> None:
        log.error(
            "another client is using our client id %s (%s): two processors with one "
            "VOTEBOX_MQTT_CLIENT_ID fight over one session. Give each processor its own client "
            "id (and the same VOTEBOX_MQTT_SHARE_GROUP to share the votes)",
            self._settings.mqtt_client_id,
            evidence,
        )
        self.takeovers += 1
        if self._on_takeover is not None:
            self._on_takeover()
