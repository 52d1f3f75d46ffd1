"""MQTT intake and output. Rule: a delivery is acknowledged only through `settle`, after commit.

paho-mqtt runs on the asyncio loop here (no threads): its socket is read when readable, written
when it has bytes queued, and its keepalive runs once a second, the way aiomqtt drives it. We do
not use aiomqtt for the intake because it acknowledges a QoS 1 message when it queues it, before
we could commit it, and drops acknowledged messages when its queue is full (aiomqtt#345).

Backpressure: the broker sends at most Receive Maximum un-acked messages (MQTT 5, 3.3.4); for an
MQTT 3.1.1 broker that ignores flow control (amqtt), reading pauses while too many deliveries are
held, and TCP holds back the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import threading
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Self

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from processor.backoff import backoff_delays
from processor.config import Settings
from processor.errors import BrokerUnavailable

__all__ = ["Delivery", "MqttIntake"]

log = logging.getLogger(__name__)

# Packets read per readable event before yielding to the loop: large enough to amortise the
# wake-up, small enough that one busy socket cannot starve the rest of the loop.
_READS_PER_WAKEUP: Final = 200


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


class MqttIntake:
    """A persistent MQTT session that yields batches of deliveries and acks them on demand.

    Use as ``async with MqttIntake(settings=s, topic_filter="votes/#") as intake:``; it returns
    once subscribed and keeps reconnecting (with backoff) until closed.

    Args:
        settings: broker URL, client id, protocol, receive maximum, keepalive.
        topic_filter: what to subscribe to, at QoS 1.
    """

    def __init__(self, *, settings: Settings, topic_filter: str) -> None:
        self._settings = settings
        self._filter = topic_filter
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._pending: list[Delivery] = []
        self._has_pending = asyncio.Event()
        self._held = 0
        self._max_held = settings.mqtt_receive_max * 2
        self._reading_paused = False
        # While connecting, reading never pauses: CONNACK and SUBACK must get through even when
        # a broker replays a long offline queue first (amqtt does) and nobody consumes yet.
        self._handshaking = False
        self._generation = 0
        self._connected = asyncio.Event()
        self._disconnected = asyncio.Event()
        self._connack: asyncio.Future[bool] | None = None
        self._suback: asyncio.Future[None] | None = None
        self._sock: Any = None
        self._publishes: set[paho.MQTTMessageInfo] = set()
        self._closing = False
        self._tasks: list[asyncio.Task[None]] = []
        self._stack = contextlib.AsyncExitStack()
        self.reconnects = 0
        self._client = self._make_client()

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self._connect()
        group = await self._stack.enter_async_context(asyncio.TaskGroup())
        self._tasks = [
            group.create_task(self._keepalive_loop(), name="votebox.mqtt.keepalive"),
            group.create_task(self._reconnect_loop(), name="votebox.mqtt.reconnect"),
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
            if self._connected.is_set():
                self._client.disconnect()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(2):
                        await self._disconnected.wait()
        finally:
            self._drop_socket()
            for task in self._tasks:
                task.cancel()
            await self._stack.aclose()

    # -- intake ----------------------------------------------------------------------------

    async def next_batch(self, max_size: int) -> list[Delivery]:
        """Wait for at least one delivery, then return every pending one, up to ``max_size``.

        Batches grow by themselves under load: whatever arrived while the last batch was being
        committed forms the next one, so there is no timer and no added latency.
        """
        while not self._pending:
            self._has_pending.clear()
            await self._has_pending.wait()
        batch, self._pending = self._pending[:max_size], self._pending[max_size:]
        return batch

    def settle(self, batch: list[Delivery]) -> None:
        """Acknowledge deliveries whose fate is committed, and release their hold on the intake.

        A delivery from an earlier connection is not acknowledged (its packet id is void); the
        broker resends it and the tally counts that copy as a duplicate.
        """
        for delivery in batch:
            if delivery.qos > 0 and delivery.generation == self._generation:
                self._client.ack(delivery.mid, delivery.qos)
        self._held -= len(batch)
        if self._reading_paused and self._held < self._max_held and self._sock is not None:
            self._reading_paused = False
            self._loop.add_reader(self._sock, self._on_readable)

    @property
    def held(self) -> int:
        """Deliveries received and not yet settled."""
        return self._held

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    # -- output ----------------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        """Queue a publish; paho sends it now or after a reconnect (QoS 1 is kept until acked)."""
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if qos > 0 and info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
            # Published while disconnected (rc NO_CONN), paho keeps the message and sends it
            # after the reconnect, but its info object can no longer tell when: not tracked.
            self._publishes.add(info)
            if len(self._publishes) > 1000:
                self._publishes = {i for i in self._publishes if not i.is_published()}

    async def drain(self) -> None:
        """Wait until every tracked QoS 1 publish was acknowledged by the broker."""
        while True:
            self._publishes = {i for i in self._publishes if not i.is_published()}
            if not self._publishes or not self.connected:
                return
            await asyncio.sleep(0.01)

    # -- connection ------------------------------------------------------------------------

    def _make_client(self) -> paho.Client:
        s = self._settings
        v5 = s.mqtt_protocol == "5"
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=s.mqtt_client_id,
            protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
            # MQTT 3.1.1: a clean session would discard votes queued while we are away.
            clean_session=None if v5 else False,
            manual_ack=True,
        )
        if s.mqtt_url.username:
            client.username_pw_set(s.mqtt_url.username, s.mqtt_url.password)
        if s.mqtt_url.tls:
            client.tls_set_context(ssl.create_default_context())
        # Results and acks may pile up while disconnected; paho's default caps would hold them
        # back in batches of 20.
        client.max_inflight_messages_set(0)
        client.max_queued_messages_set(0)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_socket_register_write
        client.on_socket_unregister_write = self._on_socket_unregister_write
        return client

    async def _connect(self) -> None:
        s = self._settings
        self._connack = self._loop.create_future()
        self._suback = self._loop.create_future()
        properties = None
        if s.mqtt_protocol == "5":
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = s.mqtt_session_expiry_s
            properties.ReceiveMaximum = s.mqtt_receive_max
        self._handshaking = True
        try:
            async with asyncio.timeout(s.mqtt_connect_timeout_s):
                # connect() resolves and opens the TCP socket, which blocks: off the loop.
                await self._loop.run_in_executor(
                    None,
                    lambda: self._client.connect(
                        s.mqtt_url.host,
                        s.mqtt_url.port,
                        keepalive=s.mqtt_keepalive_s,
                        clean_start=False
                        if s.mqtt_protocol == "5"
                        else paho.MQTT_CLEAN_START_FIRST_ONLY,
                        properties=properties,
                    ),
                )
                self._attach_socket()
                session_present = await self._connack
                # Subscribe on a resumed session too (harmless, and it repairs a broker that
                # kept the session but lost its subscriptions). Wait for the SUBACK only on a
                # new session: amqtt answers a resumed session's SUBSCRIBE only after its
                # offline queue is acked, and acks come from the consumer, which starts when
                # this returns. A resumed session is subscribed already.
                if s.mqtt_protocol == "5":
                    self._client.subscribe(self._filter, options=SubscribeOptions(qos=1))
                else:
                    self._client.subscribe(self._filter, qos=1)
                if not session_present:
                    await self._suback
        except TimeoutError:
            self._drop_socket()
            hint = (
                " An MQTT 3.1.1-only broker (amqtt) never answers an MQTT 5 CONNECT: "
                "set VOTEBOX_MQTT_PROTOCOL=3.1.1."
                if s.mqtt_protocol == "5"
                else ""
            )
            raise BrokerUnavailable(
                f"no CONNACK/SUBACK from {s.mqtt_url} within {s.mqtt_connect_timeout_s} s.{hint}"
            ) from None
        except OSError as exc:
            self._drop_socket()
            raise BrokerUnavailable(f"cannot reach {s.mqtt_url}: {exc}") from None
        finally:
            self._handshaking = False
        if self._held >= self._max_held and self._sock is not None:
            self._loop.remove_reader(self._sock)
            self._reading_paused = True
        self._disconnected.clear()
        self._connected.set()
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
                    self.reconnects += 1
                    break
                except BrokerUnavailable as exc:
                    log.warning("reconnect failed: %s; retrying", exc)

    async def _keepalive_loop(self) -> None:
        while True:
            await asyncio.sleep(1)
            if self._sock is not None:
                self._client.loop_misc()

    # -- paho callbacks (all on the loop thread once connected) ----------------------------

    def _attach_socket(self) -> None:
        sock = self._client.socket()
        if sock is None:
            raise OSError("paho returned no socket")
        self._sock = sock
        self._reading_paused = False
        self._loop.add_reader(sock, self._on_readable)
        if self._client.want_write():
            self._loop.add_writer(sock, self._on_writable)

    def _drop_socket(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._sock)
                self._loop.remove_writer(self._sock)
            self._sock = None

    def _on_readable(self) -> None:
        for _ in range(_READS_PER_WAKEUP):
            before = self._received
            rc = self._client.loop_read()
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or self._sock is None:
                return
            if self._received == before:
                return  # no complete PUBLISH read: the socket is drained or held a control packet
            if self._held >= self._max_held and not self._handshaking:
                self._loop.remove_reader(self._sock)
                self._reading_paused = True
                return

    _received = 0

    def _on_writable(self) -> None:
        self._client.loop_write()

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        pass  # connect() runs in an executor thread; _attach_socket() registers on the loop.

    def _on_socket_close(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        if self._on_loop_thread():
            self._drop_socket()

    def _on_socket_register_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        if self._on_loop_thread() and self._sock is not None:
            self._loop.add_writer(self._sock, self._on_writable)

    def _on_socket_unregister_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        if self._on_loop_thread() and self._sock is not None:
            self._loop.remove_writer(self._sock)

    def _on_loop_thread(self) -> bool:
        return threading.get_ident() == self._loop_thread

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason_code: Any,
        properties: Any,
    ) -> None:
        future = self._connack
        if future is None or future.done():
            return
        if reason_code.is_failure:
            future.set_exception(BrokerUnavailable(f"broker refused the connection: {reason_code}"))
        else:
            future.set_result(bool(flags.session_present))

    def _on_subscribe(
        self, client: paho.Client, userdata: Any, mid: int, reason_codes: Any, properties: Any
    ) -> None:
        future = self._suback
        if future is None or future.done():
            return
        failed = [rc for rc in reason_codes if rc.is_failure]
        if failed:
            future.set_exception(
                BrokerUnavailable(f"subscription to {self._filter} refused: {failed}")
            )
        else:
            future.set_result(None)

    def _on_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any
    ) -> None:
        self._generation += 1
        self._connected.clear()
        self._disconnected.set()
        self._drop_socket()
        if not self._closing:
            log.warning(
                "disconnected from the broker (%s); un-acked votes will be resent", reason_code
            )

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        self._received += 1
        try:
            topic = message.topic
        except UnicodeDecodeError:
            topic = ""  # MQTT-1.5.4-1 forbids it; parse_vote_topic rejects it as bad_topic
        self._pending.append(
            Delivery(topic, bytes(message.payload), message.mid, message.qos, self._generation)
        )
        self._held += 1
        self._has_pending.set()
