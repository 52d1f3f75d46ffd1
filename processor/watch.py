"""Read retained results the way a dashboard does: subscribe to polls/{poll}/results (aiomqtt).

Rule: only the MQTT topics, never Redis, so what it shows is what every subscriber sees.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiomqtt

from processor.config import MqttUrl
from processor.topics import results_topic

__all__ = ["format_results", "results_stream", "wait_for_results"]


async def results_stream(url: MqttUrl, poll: str) -> AsyncIterator[dict[str, Any]]:
    """Yield each results document published for ``poll``, starting with the retained one."""
    async with aiomqtt.Client(
        url.host,
        url.port,
        username=url.username or "watcher",
        password=url.password,
        identifier=f"votebox-watch-{uuid.uuid4().hex[:8]}",
        protocol=aiomqtt.ProtocolVersion.V311,
    ) as client:
        topic = results_topic(poll)
        await client.subscribe(topic, qos=1)
        async for message in client.messages:
            if message.topic.value != topic:
                continue  # amqtt 0.12.1 may hand us another client's retained message
            payload = message.payload
            if isinstance(payload, bytes | bytearray) and payload:  # empty: a deleted poll
                yield json.loads(payload)


async def wait_for_results(
    url: MqttUrl, poll: str, until: Callable[[dict[str, Any]], bool], *, timeout_s: float
) -> dict[str, Any]:
    """The first results document of ``poll`` that satisfies ``until``.

    Raises:
        TimeoutError: none did within ``timeout_s``; the message holds the last one seen.
    """
    last: dict[str, Any] | None = None
    try:
        async with asyncio.timeout(timeout_s):
            async for document in results_stream(url, poll):
                last = document
                if until(document):
                    return document
    except TimeoutError:
        raise TimeoutError(f"results of {poll} never matched; last seen: {last}") from None
    raise TimeoutError(f"results stream of {poll} ended; last seen: {last}")


def format_results(document: dict[str, Any], *, width: int = 30) -> str:
    """A few lines of text bars for one results document."""
    total = document.get("total", 0)
    lines = [
        f"{document.get('title') or document['poll']}  [{document['state']}]  "
        f"total {total}  v{document['version']}  {document['updated_at']}"
    ]
    if document.get("counts") is None:
        lines.append("  results hidden until the poll closes")
        return "\n".join(lines)
    label_width = max((len(label) for label in document["labels"]), default=0)
    for label, count in zip(document["labels"], document["counts"], strict=True):
        share = count / total if total else 0.0
        bar = "#" * round(share * width)
        lines.append(f"  {label:<{label_width}} {bar:<{width}} {count:>7} {share:6.1%}")
    return "\n".join(lines)
