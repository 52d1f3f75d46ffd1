"""The device client firmware authors can copy: a paho-mqtt superloop around a persistent outbox.

Rule: "press the button, the vote counts" whatever the network does. A press is stored before
anything is sent (devices/outbox.py); everything stored is sent until the processor's ack names
it; after a reconnect, whatever waits goes out in batches. The loop is the one a firmware main
loop runs: connect (backoff with jitter), service the socket, flush, heartbeat, repeat.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from devices.ack import RATE_LIMITED, STALE_EPOCH, AckError, decode_ack
from devices.encoder import encode_batch, encode_heartbeat
from devices.outbox import Outbox, Pending

__all__ = ["SEQ_WINDOW", "DeviceClient", "DeviceConfig"]

log = logging.getLogger(__name__)

# docs/protocol.md, Limits: a message is at most 4096 bytes; a batch's array head takes 3.
_MAX_PAYLOAD: Final = 4096 - 3
_MAX_BATCH: Final = 256
# docs/protocol.md, De-duplication: the processor remembers the last 4096 seqs of a device.
SEQ_WINDOW: Final = 4096


@dataclass(frozen=True, slots=True)
class DeviceConfig:
    """How one device reaches the broker and paces itself.

    Attributes:
        device: the device id: its MQTT client id, its username and the last level of its
            vote topic (docs/protocol.md, Topics).
        host: the broker.
        port: the broker's port.
        password: the device's password (`votebox device add`); None on a broker without
            accounts.
        ca_file: verify the broker's TLS certificate against this CA; None for plain TCP.
        keepalive_s: MQTT keepalive; the broker publishes the last will after 1.5 times it.
        ack_timeout_s: send a vote again when its ack has not come within this time.
        heartbeat_s: how often to report uptime, outbox depth and battery.
        backoff_base_s: the first reconnect delay's ceiling (full jitter).
        backoff_cap_s: the largest reconnect delay's ceiling.
        batch_votes: the most votes in one message (a batch, docs/protocol.md, Batches).
        in_flight_votes: the most votes sent and not yet answered.
        polls: polls whose retained config (polls/{poll}/config) the device follows.
        tick_s: the loop's longest sleep; bounds how late a press is sent, and a heartbeat
            or a re-send.
    """

    device: str
    host: str = "127.0.0.1"
    port: int = 1883
    password: str | None = None
    ca_file: str | None = None
    keepalive_s: int = 30
    ack_timeout_s: float = 30.0
    heartbeat_s: float = 60.0
    backoff_base_s: float = 1.0
    backoff_cap_s: float = 60.0
    batch_votes: int = 64
    in_flight_votes: int = 256
    polls: tuple[str, ...] = ()
    tick_s: float = 0.2


class DeviceClient:
    """One device: its MQTT session, its outbox and its loop.

    Use ``with client.running():`` to run the loop in a thread of its own, or call `run` from a
    main loop. `press` may be called from any thread.

    Args:
        config: where and how to connect.
        outbox: the device's persistent outbox.
        on_ack: called with each vote the processor answered and the code.
        on_config: called with a poll id and its config (None when the poll was deleted).
        battery: reads the battery level (percent); None for a device on mains power.
        rng: jitter source (seeded in tests).
    """

    def __init__(
        self,
        config: DeviceConfig,
        outbox: Outbox,
        *,
        on_ack: Callable[[Pending, int], None] | None = None,
        on_config: Callable[[str, dict[str, Any] | None], None] | None = None,
        battery: Callable[[], int] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.outbox = outbox
        self._on_ack = on_ack
        self._on_config = on_config
        self._battery = battery
        self._rng = rng or random.Random()
        self._started = time.monotonic()
        # (epoch, seq) -> when it was last sent on this connection; cleared on a reconnect so
        # that everything unanswered goes again.
        self._sent_at: dict[tuple[int, int], float] = {}
        self._hold_until = 0.0
        self._next_heartbeat = 0.0
        self._connected = threading.Event()
        self._network = threading.Event()
        self._network.set()
        self._ever_connected = False
        # The loop's connection state: the next attempt's backoff, and when it is due.
        self._failures = 0  # connection attempts failed in a row: the backoff's exponent
        self._retry_at = 0.0
        self._connecting_since: float | None = None
        self.configs: dict[str, dict[str, Any]] = {}
        # Counters for operators and tests: connections made, vote messages and votes sent.
        self.connections = 0
        self.messages_sent = 0
        self.votes_sent = 0
        self.status_topic = f"devices/{config.device}/status"
        self._acks_topic = f"acks/{config.device}"

        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=config.device,
            protocol=paho.MQTTv311,
            # The outbox, not the broker, keeps what is unanswered: no session state to lose.
            clean_session=True,
        )
        client.username_pw_set(config.device, config.password)
        if config.ca_file is not None:
            client.tls_set(ca_certs=config.ca_file)
        # If the device vanishes (power, Wi-Fi), the broker tells everyone it is offline.
        client.will_set(self.status_topic, b"offline", qos=1, retain=True)
        client.max_inflight_messages_set(64)
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        self._client = client

    # -- what the device's user does ------------------------------------------------------

    def press(self, poll: str, choice: int | list[int], *, voter: bytes | None = None) -> Pending:
        """Cast a vote: stored first (it survives anything from here on); the loop sends it on
        its next turn, within ``tick_s``. Safe from any thread: only the loop touches MQTT.

        Returns:
            The stored vote, with its epoch and seq.
        """
        return self.outbox.add(poll, choice, ts=int(time.time()), voter=voter)

    @property
    def mqtt(self) -> paho.Client:
        """The paho client, for a loop that services many devices' sockets at once
        (devices/fleet_loop.py)."""
        return self._client

    @property
    def connected(self) -> bool:
        """Whether the session is up (CONNACK received, not lost since)."""
        return self._connected.is_set()

    def wait_connected(self, timeout_s: float) -> bool:
        """Wait until connected; False on timeout."""
        return self._connected.wait(timeout_s)

    def wait_drained(self, timeout_s: float) -> bool:
        """Wait until every stored vote has been answered; False on timeout."""
        deadline = time.monotonic() + timeout_s
        while self.outbox.depth():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    # -- simulated network loss (the simulator and tests) ---------------------------------

    def drop_network(self) -> None:
        """Lose the network: the connection dies without a DISCONNECT (so the broker publishes
        the last will) and reconnects fail until `restore_network`."""
        self._network.clear()
        sock = self._client.socket()
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def restore_network(self) -> None:
        """Get the network back; the loop reconnects on its next attempt."""
        self._network.set()

    # -- the loop ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def running(self) -> Iterator[DeviceClient]:
        """Run the loop in a thread until the block ends; then go offline cleanly."""
        stop = threading.Event()
        thread = threading.Thread(
            target=self.run, args=(stop,), name=f"device-{self.config.device}", daemon=True
        )
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()

    def run(self, stop: threading.Event) -> None:
        """The device's main loop, until ``stop`` is set."""
        while not stop.is_set():
            wait_s = self.connect_if_due()
            if wait_s > 0:
                stop.wait(wait_s)
                continue
            self.serviced(self._client.loop(timeout=self.config.tick_s))
        self._close()

    def connect_if_due(self) -> float:
        """Open the connection if it is down and the backoff allows it.

        Returns:
            0 when a connection is open or opening; else the seconds until the next attempt.
        """
        if self._client.socket() is not None:
            return 0.0
        now = time.monotonic()
        if now < self._retry_at:
            return self._retry_at - now
        try:
            self._open()
        except OSError as exc:
            delay = self._next_delay()
            log.debug("%s: connect failed (%s); retry in %.1fs", self.config.device, exc, delay)
            self._retry_at = now + delay
            return delay
        self._connecting_since = now
        return 0.0

    def serviced(self, rc: MQTTErrorCode) -> None:
        """The loop's turn after the socket was serviced with result ``rc``: on a failure
        (lost, refused, a wrong password) schedule the next attempt; else flush and heartbeat."""
        now = time.monotonic()
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._retry_at = now + self._next_delay()
            return
        if self._connected.is_set():
            if self._connecting_since is not None:
                self._failures, self._connecting_since = 0, None
            self._flush()
            self._heartbeat_if_due()
        elif self._connecting_since is not None and now - self._connecting_since > 10:
            self._cut()  # no CONNACK: treat as a lost connection

    def say_offline(self) -> paho.MQTTMessageInfo | None:
        """Publish the retained "offline" a clean DISCONNECT would otherwise suppress (it
        suppresses the last will); None when not connected."""
        if not self._connected.is_set():
            return None
        return self._client.publish(self.status_topic, b"offline", qos=1, retain=True)

    def disconnect(self) -> None:
        """Send DISCONNECT and close the socket."""
        if self._client.socket() is not None:
            self._client.disconnect()
        self._connected.clear()

    def _next_delay(self) -> float:
        """Capped exponential backoff with full jitter: U(0, min(cap, base * 2**failures)).
        The jitter spreads a fleet's reconnects after a broker restart instead of stampeding
        it (AWS Architecture Blog, "Exponential Backoff And Jitter")."""
        cfg = self.config
        ceiling = min(cfg.backoff_cap_s, cfg.backoff_base_s * 2 ** min(self._failures, 30))
        self._failures += 1
        return self._rng.uniform(0, ceiling)

    def _open(self) -> None:
        if not self._network.is_set():
            raise OSError("network down (simulated)")
        # Whatever paho still holds from the last connection is in the outbox too.
        self._client.drop_out_messages()
        if self._ever_connected:
            self._client.reconnect()
        else:
            self._client.connect(self.config.host, self.config.port, self.config.keepalive_s)
            self._ever_connected = True

    def _cut(self) -> None:
        sock = self._client.socket()
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _close(self) -> None:
        info = self.say_offline()
        deadline = time.monotonic() + 2
        while info is not None and not info.is_published() and time.monotonic() < deadline:
            if self._client.loop(timeout=0.1) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                break
        self.disconnect()

    # -- paho callbacks (the loop's thread) -----------------------------------------------

    def _handle_connect(
        self, client: paho.Client, userdata: Any, flags: Any, rc: Any, properties: Any
    ) -> None:
        if rc.is_failure:
            log.warning("%s: the broker refused the connection: %s", self.config.device, rc)
            return
        # acks first, so that no answer to what we send next can be missed.
        client.subscribe(
            [(self._acks_topic, 1)] + [(f"polls/{p}/config", 1) for p in self.config.polls]
        )
        client.publish(self.status_topic, b"online", qos=1, retain=True)
        self._sent_at.clear()
        self._next_heartbeat = 0.0
        self.connections += 1
        self._connected.set()

    def _handle_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, rc: Any, properties: Any
    ) -> None:
        self._connected.clear()

    def _handle_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        if msg.topic == self._acks_topic:
            self._settle(bytes(msg.payload))
            return
        poll = msg.topic.split("/")[1]
        try:
            config = json.loads(msg.payload) if msg.payload else None
        except ValueError:
            return
        if isinstance(config, dict):
            self.configs[poll] = config
        else:
            config = None
            self.configs.pop(poll, None)
        if self._on_config is not None:
            self._on_config(poll, config)

    def _settle(self, payload: bytes) -> None:
        try:
            entries = decode_ack(payload)
        except AckError:
            return  # not an ack: the votes go again after ack_timeout_s
        stale: list[tuple[int, int]] = []
        for epoch, seq, code in entries:
            if epoch is None or seq is None:
                if code == RATE_LIMITED:
                    # Which votes were refused is unknown: pause, then send everything again.
                    pause = self._rng.uniform(1.0, 3.0)
                    self._hold_until = time.monotonic() + pause
                    self._sent_at.clear()
                continue
            self._sent_at.pop((epoch, seq), None)
            if code == STALE_EPOCH:
                stale.append((epoch, seq))  # not counted: kept, in a higher epoch
                continue
            entry = self.outbox.settle(epoch, seq, code)
            if entry is not None and self._on_ack is not None:
                self._on_ack(entry, code)
        if stale:
            refused = [p for p in self.outbox.pending() if (p.epoch, p.seq) in stale]
            higher = any(epoch == self.outbox.epoch for epoch, _ in stale)
            self.outbox.store_again(refused, higher=higher)

    # -- sending ----------------------------------------------------------------------------

    def _flush(self) -> None:
        """Send what is stored and not in flight (or in flight for too long), in batches."""
        now = time.monotonic()
        if now < self._hold_until:
            return
        cfg = self.config
        waiting = now - cfg.ack_timeout_s
        flying = sum(1 for at in self._sent_at.values() if at > waiting)
        room = cfg.in_flight_votes - flying
        if room <= 0:
            return
        due = [
            p
            for p in _inside_window(self.outbox.pending())
            if self._sent_at.get((p.epoch, p.seq), waiting - 1) <= waiting
        ][:room]
        for poll, group in _batches(due, cfg.batch_votes):
            payload = (
                group[0].payload if len(group) == 1 else encode_batch([p.payload for p in group])
            )
            self._client.publish(f"votes/{poll}/{cfg.device}", payload, qos=1)
            for p in group:
                self._sent_at[(p.epoch, p.seq)] = now
            self.messages_sent += 1
            self.votes_sent += len(group)

    def _heartbeat_if_due(self) -> None:
        now = time.monotonic()
        if now < self._next_heartbeat:
            return
        self._next_heartbeat = now + self.config.heartbeat_s
        battery = self._battery() if self._battery is not None else None
        payload = encode_heartbeat(int(now - self._started), self.outbox.depth(), battery)
        # QoS 0: a lost heartbeat is replaced by the next one.
        self._client.publish(f"devices/{self.config.device}/heartbeat", payload, qos=0)


def _inside_window(pending: list[Pending]) -> Iterator[Pending]:
    """The votes that may go now: in each epoch, those less than the processor's de-duplication
    window above the oldest one still unanswered (docs/protocol.md, the device's rule 5). A
    lost batch then always comes back inside the window, however long the replay."""
    oldest: dict[int, int] = {}
    for p in pending:
        oldest[p.epoch] = min(p.seq, oldest.get(p.epoch, p.seq))
    for p in pending:
        if p.seq - oldest[p.epoch] < SEQ_WINDOW:
            yield p


def _batches(entries: list[Pending], most: int) -> Iterator[tuple[str, list[Pending]]]:
    """Consecutive votes of the same poll, at most ``most`` and 4 KiB per message."""
    group: list[Pending] = []
    size = 0
    for entry in entries:
        if group and (
            entry.poll != group[0].poll
            or len(group) >= min(most, _MAX_BATCH)
            or size + len(entry.payload) > _MAX_PAYLOAD
        ):
            yield group[0].poll, group
            group, size = [], 0
        group.append(entry)
        size += len(entry.payload)
    if group:
        yield group[0].poll, group
