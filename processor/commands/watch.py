"""Read retained results the way a dashboard does: subscribe to polls/{poll}/results (aiomqtt).

Rule: only the MQTT topics, never Redis, so what it shows is what every subscriber sees.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, TextIO

import aiomqtt

from processor.commands import Commands, add_command
from processor.config import MqttUrl, Settings
from processor.poll_results import format_results
from processor.topics import results_topic

__all__ = [
    "register",
    "results_stream",
    "results_updates",
    "wait_for_results",
    "watch_polls",
]


async def results_updates(
    url: MqttUrl, poll: str | None = None
) -> AsyncIterator[tuple[str, dict[str, Any] | None]]:
    """Yield ``(poll, document)`` for each results message of ``poll`` (or of every poll),
    starting with the retained ones; the document is None when a poll was deleted."""
    async with (
        aiomqtt.Client(
            url.host,
            url.port,
            username=url.username or "dashboard",  # the read-only account
            password=url.password,
            identifier=f"votebox-watch-{uuid.uuid4().hex[:8]}",
            protocol=aiomqtt.ProtocolVersion.V311,
        ) as client
    ):
        await client.subscribe(results_topic(poll or "+"), qos=1)
        async for message in client.messages:
            parts = message.topic.value.split("/")
            if len(parts) != 3 or parts[2] != "results" or (poll and parts[1] != poll):
                continue  # amqtt 0.12.1 may hand us another client's retained message
            payload = message.payload
            if isinstance(payload, bytes | bytearray):
                yield parts[1], json.loads(payload) if payload else None


async def results_stream(url: MqttUrl, poll: str) -> AsyncIterator[dict[str, Any]]:
    """Yield each results document published for ``poll``, starting with the retained one."""
    async for _, document in results_updates(url, poll):
        if document is not None:
            yield document


async def watch_polls(
    url: MqttUrl,
    poll: str | None = None,
    *,
    out: TextIO,
    in_place: bool,
    stop: Callable[[], bool] = lambda: False,
) -> None:
    """Draw the live results of ``poll`` (or of every poll) until ``stop()`` says so after an
    update: in place on a terminal, one block per update otherwise (a log, a pipe)."""
    documents: dict[str, dict[str, Any]] = {}
    drawn = 0
    async for poll_id, document in results_updates(url, poll):
        if document is None:
            documents.pop(poll_id, None)
        elif document.get("version", 0) >= documents.get(poll_id, {}).get("version", -1):
            documents[poll_id] = document
        screen = "\n".join(format_results(documents[p]) for p in sorted(documents)) or (
            "no polls yet"
        )
        if in_place and drawn:
            out.write(f"\x1b[{drawn}F\x1b[J")  # up to where the last screen began; clear
        out.write(screen + "\n")
        out.flush()
        drawn = screen.count("\n") + 1
        if stop():
            return


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


def register(commands: Commands) -> None:
    """Add ``votebox watch``."""
    p = add_command(commands, "watch", _run, help="live results in the terminal, updated in place")
    p.add_argument("poll", nargs="?", default=None, help="one poll (default: every poll)")
    p.add_argument(
        "--mqtt-url",
        dest="mqtt_url",
        metavar="MQTT_URL",
        help="broker URL (env VOTEBOX_MQTT_URL); the user name defaults to dashboard",
    )


def _run(args: argparse.Namespace, settings: Settings) -> int:
    asyncio.run(
        watch_polls(settings.mqtt_url, args.poll, out=sys.stdout, in_place=sys.stdout.isatty())
    )
    return 0
