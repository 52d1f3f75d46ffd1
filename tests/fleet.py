"""Kiosks for the end-to-end tests, remembering what they sent and every ack they got."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import aiomqtt
import cbor2
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from devices.encoder import encode_vote
from harness.services import ManagedProcess
from processor.config import MqttUrl


def _published(info: paho.MQTTMessageInfo) -> bool:
    """Whether the broker acked it. A message published while disconnected is kept by paho and
    sent after the reconnect, but its info raises instead of telling; the outbox covers it."""
    try:
        return info.is_published()
    except (RuntimeError, ValueError):
        return True


class Kiosk:
    """A test device that publishes whatever it is told, over its own MQTT connection, and
    keeps its outbox in memory (the real client is devices/client.py): tests use it for
    malformed payloads, chosen seqs and re-sends on cue.

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

    def report(self, kind: str, payload: bytes) -> None:
        """Publish this kiosk's ``status`` (retained) or ``heartbeat`` (docs/protocol.md, Device
        health)."""
        topic = f"devices/{self.device}/{kind}"
        self._infos.append(self._client.publish(topic, payload, qos=1, retain=kind == "status"))

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


def results_url(broker: ManagedProcess) -> MqttUrl:
    """Where a dashboard would connect to read retained results."""
    return MqttUrl.parse(f"mqtt://dashboard@127.0.0.1:{broker.port}")


class Fleet:
    """Kiosks that remember every ack they were sent."""

    def __init__(self, broker: ManagedProcess, prefix: str, n: int) -> None:
        self.acks: list[list[Any]] = []
        self.kiosks = [
            Kiosk(f"{prefix}-{i:02d}", host="127.0.0.1", port=broker.port, on_ack=self.acks.append)
            for i in range(n)
        ]

    def __enter__(self) -> Fleet:
        for kiosk in self.kiosks:
            kiosk.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        for kiosk in self.kiosks:
            kiosk.close()

    def codes(self) -> Counter[int]:
        return Counter(entry[2] for entry in list(self.acks))

    def unacked(self) -> int:
        """Votes still waiting in the kiosks' outboxes."""
        return sum(len(kiosk.outbox) for kiosk in self.kiosks)

    def resend_unacked(self) -> int:
        """What a kiosk does when acks do not come: send its outbox again, same seqs."""
        return sum(kiosk.resend_outbox() for kiosk in self.kiosks)

    def cast(self, poll: str, n: int, choice: int | Callable[[int], int] = 1) -> None:
        """Cast ``n`` votes in ``poll``, the kiosks in turn, without waiting for the broker;
        ``choice`` is the option, or gives the option of the i-th vote."""
        for i in range(n):
            option = choice(i) if callable(choice) else choice
            self.kiosks[i % len(self.kiosks)].vote(poll, option)


async def first_message(broker: ManagedProcess, topic: str, client: str) -> tuple[bool, bytes]:
    """What a fresh subscriber to ``topic`` gets first (the retained message, if there is
    one): its retain flag and payload. Messages on other topics are skipped (docs/brokers.md:
    amqtt may hand a subscriber another client's retained message)."""
    async with aiomqtt.Client("127.0.0.1", broker.port, identifier=client, username=client) as c:
        await c.subscribe(topic, qos=1)
        async with asyncio.timeout(10):
            async for message in c.messages:
                if message.topic.value == topic:
                    assert isinstance(message.payload, bytes)
                    return message.retain, message.payload
    raise AssertionError("unreachable")
