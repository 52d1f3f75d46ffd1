"""Kiosks for the end-to-end tests, remembering what they sent and every ack they got."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import aiomqtt

from devices.simulator import Kiosk
from harness.services import ManagedProcess
from processor.config import MqttUrl


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
