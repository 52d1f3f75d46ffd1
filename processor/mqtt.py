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
import contextlib
import logging
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Final, Self

from processor import mqtt_packets as packets
from processor.backoff import backoff_delays
from processor.config import Settings
from processor.errors import BrokerUnavailable
from processor.supervise import supervised

__all__ = ["Delivery", "MqttIntake"]

log = logging.getLogger(__name__)

_SUBSCRIBE_MID: Final = 1


@dataclass(frozen=True, slots=True)
class Delivery:
    """One received MQTT message, still owed an acknowledgement if ``qos`` > 0."""

    topic: str
    payload: bytes
    mid: int
    qos: int
    # Which connection it came on: a packet id means nothing on a later connection, where the
    # broker resends the message itself.
    generation: int
    # Loop time when its bytes arrived (one clock read per read from the socket, not per message).
    received_s: float = 0.0


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

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        self.take_packets()

    def take_packets(self) -> None:
        """Hand over the complete packets buffered, as many as the intake has room for; the
        rest wait in the buffer (and reading pauses) until `MqttIntake.settle` makes room."""
        room = self._intake._room()
        if room == 0:
            return
        try:
            incoming = packets.parse_packets(self._buffer, v5=self._v5, limit=room)
        except packets.PacketError as exc:
            log.error("closing the connection: %s", exc)
            self.close()
            return
        if incoming:
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
        failed: told when a background loop (keepalive, reconnect) fails, before the failure
            ends the intake (processor/supervise.py).
    """

    def __init__(
        self,
        *,
        settings: Settings,
        topic_filters: Sequence[str],
        on_connect: Callable[[int], object] | None = None,
        failed: Callable[[str, BaseException], None] | None = None,
    ) -> None:
        self._on_connect = on_connect
        self._failed = failed
        self._settings = settings
        self._filters = tuple(topic_filters)
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
        self._unacked_out: dict[int, tuple[str, bytes, bool]] = {}
        self._next_mid = 1
        self._drained = asyncio.Event()
        self._drained.set()
        self._closing = False
        self._tasks: list[asyncio.Task[None]] = []
        self._stack = contextlib.AsyncExitStack()
        self._interrupted = False
        # Successful connections so far; more than one means reconnects (a metric).
        self.connections = 0

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

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        """Send a message. QoS 1 ones are kept until the broker acks them, across reconnects."""
        mid = 0
        if qos:
            mid = self._take_mid()
            self._unacked_out[mid] = (topic, payload, retain)
            self._drained.clear()
        if self._protocol is not None and self._connected.is_set():
            self._protocol.send(
                packets.publish(topic, payload, qos=qos, retain=retain, mid=mid, v5=self._v5)
            )

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
                        session_expiry_s=s.mqtt_session_expiry_s,
                        receive_maximum=s.mqtt_receive_max,
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
        self._pingresp_due = None
        self._disconnected.clear()
        self._connected.set()
        self.connections += 1
        if self._on_connect is not None:
            self._on_connect(self.connections)
        # MQTT-4.4.0-1: on a resumed session, resend un-acked QoS 1 publishes with DUP set.
        for mid, (topic, payload, retain) in list(self._unacked_out.items()):
            protocol.send(
                packets.publish(
                    topic, payload, qos=1, retain=retain, mid=mid, v5=self._v5, dup=True
                )
            )
        self._pause_if_full(protocol)
        log.info(
            "connected to %s as %s (session %s)",
            s.mqtt_url,
            s.mqtt_client_id,
            "resumed" if session_present else "new",
        )

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
        interval = self._settings.mqtt_keepalive_s / 2
        while True:
            await asyncio.sleep(interval)
            protocol = self._protocol
            if protocol is None or not self._connected.is_set():
                continue
            now = self._loop.time()
            if self._pingresp_due is not None and now > self._pingresp_due:
                log.warning(
                    "no PINGRESP within %d s: reconnecting", self._settings.mqtt_keepalive_s
                )
                protocol.close()
                continue
            if self._pingresp_due is None:
                self._pingresp_due = now + self._settings.mqtt_keepalive_s
            protocol.send(packets.PINGREQ)

    # -- packets ---------------------------------------------------------------------------

    def _handle(self, packet: packets.Incoming, generation: int, now: float) -> None:
        if generation != self._generation:
            return
        kind = packet.kind
        if kind == packets.PUBLISH:
            try:
                topic = packet.topic.decode()
            except UnicodeDecodeError:
                topic = ""  # MQTT-1.5.3-1 forbids it; parse_vote_topic rejects it as bad_topic
            self._pending.append(
                Delivery(topic, packet.payload, packet.mid, packet.qos, generation, now)
            )
            self._held += 1
            self._has_pending.set()
            if self._protocol is not None:
                self._pause_if_full(self._protocol)
        elif kind == packets.PUBACK:
            self._unacked_out.pop(packet.mid, None)
            if not self._unacked_out:
                self._drained.set()
        elif kind == packets.PINGRESP:
            self._pingresp_due = None
        elif kind == packets.CONNACK:
            self._resolve_connack(packet)
        elif kind == packets.SUBACK:
            self._resolve_suback(packet)
        elif kind == packets.DISCONNECT:
            log.warning("the broker disconnected us (reason %d)", packet.code)

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
