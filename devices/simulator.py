"""Simulated kiosks: many paho-mqtt devices in one process, voting at a steady total rate.

Rule: the way firmware does it. Each kiosk has its own MQTT session (client id = device id),
numbers its votes with a strictly increasing seq, publishes at QoS 1 to votes/{poll}/{device}
and listens on acks/{device}. paho's network threads are fine here; the processor has none.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import cbor2
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from devices.encoder import encode_vote

__all__ = ["Kiosk", "SimulationSummary", "simulate"]

# docs/protocol.md, Acks: codes below 16 are fates, 16 and up are rejection reasons.
_ACCEPTED, _DUPLICATE = 0, 1


@dataclass(slots=True)
class SimulationSummary:
    """What a simulation sent and what the processor answered."""

    sent: int = 0
    published: int = 0
    acks: Counter[str] = field(default_factory=Counter)
    per_option: Counter[int] = field(default_factory=Counter)

    def line(self) -> str:
        acked = sum(self.acks.values())
        return (
            f"sent {self.sent} votes ({self.published} acknowledged by the broker); processor "
            f"answered {acked}: accepted {self.acks['accepted']}, duplicate "
            f"{self.acks['duplicate']}, rejected {self.acks['rejected']}"
        )


def _published(info: paho.MQTTMessageInfo) -> bool:
    """Whether the broker acked it. A message published while disconnected is kept by paho and
    sent after the reconnect, but its info raises instead of telling; the outbox covers it."""
    try:
        return info.is_published()
    except (RuntimeError, ValueError):
        return True


class Kiosk:
    """One voting device with its own MQTT connection.

    Args:
        device: the device id (also its client id and username).
        host: broker host.
        port: broker port.
        on_ack: called with each ack entry ``[epoch, seq, code]`` from ``acks/{device}``.
    """

    def __init__(
        self,
        device: str,
        *,
        host: str,
        port: int,
        on_ack: Callable[[list[Any]], None] | None = None,
    ) -> None:
        self.device = device
        self.seq = 0
        self._on_ack = on_ack
        self._connected = threading.Event()
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=device,
            protocol=paho.MQTTv311,
            clean_session=False,
        )
        self._client.username_pw_set(device)
        self._client.max_inflight_messages_set(100)
        self._client.on_connect = self._handle_connect
        self._client.on_message = self._handle_message
        self._host, self._port = host, port
        self._infos: list[paho.MQTTMessageInfo] = []
        # Votes sent and not yet answered on acks/{device}, by (epoch, seq): a vote leaves only
        # when the processor says it is counted, a duplicate, or rejected (docs/protocol.md).
        self.outbox: dict[tuple[int, int], tuple[str, bytes]] = {}
        self._lock = threading.Lock()

    def connect(self, timeout_s: float = 10.0) -> None:
        self._client.connect(self._host, self._port, keepalive=30)
        self._client.loop_start()
        if not self._connected.wait(timeout_s):
            raise TimeoutError(f"{self.device}: no CONNACK from {self._host}:{self._port}")

    def _handle_connect(
        self, client: paho.Client, userdata: Any, flags: Any, rc: Any, properties: Any
    ) -> None:
        if not rc.is_failure:
            client.subscribe(f"acks/{self.device}", qos=1)
            self._connected.set()

    def _handle_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        try:
            entries = cbor2.loads(msg.payload)
        except cbor2.CBORDecodeError:
            return
        for entry in entries:
            with self._lock:
                self.outbox.pop((entry[0], entry[1]), None)
            if self._on_ack is not None:
                self._on_ack(entry)

    def publish_raw(self, poll: str, payload: bytes) -> None:
        """Publish any payload to this kiosk's vote topic (tests use it for malformed input)."""
        self._infos.append(self._client.publish(f"votes/{poll}/{self.device}", payload, qos=1))

    def vote(
        self,
        poll: str,
        choice: int | list[int],
        *,
        seq: int | None = None,
        ts: int | None = None,
        voter: bytes | None = None,
    ) -> int:
        """Cast a vote with the next seq (or a given one, to repeat a vote); returns the seq.

        ``choice`` is an option index, a list of them (multiple choice) or a rating's value;
        ``ts`` defaults to now; ``voter`` is the voter token of a one-vote-per-voter poll.
        """
        if seq is None:
            self.seq += 1
            seq = self.seq
        payload = encode_vote(choice, seq, ts=int(time.time()) if ts is None else ts, voter=voter)
        with self._lock:
            self.outbox[(0, seq)] = (poll, payload)
        self.publish_raw(poll, payload)
        return seq

    def resend_outbox(self, limit: int | None = None) -> int:
        """Publish every unanswered vote (or the oldest ``limit``) again with its own seq;
        returns how many."""
        with self._lock:
            pending = list(self.outbox.values())[:limit]
        for poll, payload in pending:
            self.publish_raw(poll, payload)
        return len(pending)

    def wait_published(self, timeout_s: float = 30.0) -> int:
        """Wait for the broker's PUBACK of everything published; returns how many arrived."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(_published(info) for info in self._infos):
                break
            time.sleep(0.01)
        return sum(1 for info in self._infos if _published(info))

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def simulate(
    *,
    host: str,
    port: int,
    poll: str,
    n_options: int,
    devices: int,
    rate: float,
    duration_s: float,
    weights: Sequence[float] | None = None,
    stop: threading.Event | None = None,
    ack_wait_s: float = 5.0,
    seed: int | None = None,
) -> SimulationSummary:
    """Run ``devices`` kiosks that vote ``rate`` times a second in total for ``duration_s``.

    Args:
        host: broker host.
        port: broker port.
        poll: the poll to vote in.
        n_options: how many options it has.
        devices: how many kiosks.
        rate: votes per second, all kiosks together.
        duration_s: how long to vote.
        weights: relative popularity of each option (uniform when None).
        stop: ends the voting early when set.
        ack_wait_s: how long to wait for the processor's acks at the end.
        seed: makes the choices repeatable.

    Returns:
        The summary of what was sent and answered.
    """
    rng = random.Random(seed)
    summary = SimulationSummary()
    lock = threading.Lock()

    def on_ack(entry: list[Any]) -> None:
        code = entry[2]
        fate = (
            "accepted" if code == _ACCEPTED else "duplicate" if code == _DUPLICATE else "rejected"
        )
        with lock:
            summary.acks[fate] += 1

    kiosks = [Kiosk(f"kiosk-{i:04d}", host=host, port=port, on_ack=on_ack) for i in range(devices)]
    for kiosk in kiosks:
        kiosk.connect()
    stop = stop or threading.Event()
    options = list(range(n_options))
    started = time.monotonic()
    try:
        while not stop.is_set():
            elapsed = time.monotonic() - started
            if elapsed >= duration_s:
                break
            due = int(elapsed * rate) + 1
            while summary.sent < due:
                kiosk = kiosks[summary.sent % len(kiosks)]
                choice = rng.choices(options, weights=weights)[0]
                kiosk.vote(poll, choice)
                summary.per_option[choice] += 1
                summary.sent += 1
            stop.wait(min(0.05, max(0.0, (summary.sent / rate) - elapsed)))
        summary.published = sum(kiosk.wait_published() for kiosk in kiosks)
        deadline = time.monotonic() + ack_wait_s
        while time.monotonic() < deadline and sum(summary.acks.values()) < summary.sent:
            time.sleep(0.05)
    finally:
        for kiosk in kiosks:
            kiosk.close()
    return summary
