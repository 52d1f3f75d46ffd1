"""Run the embedded amqtt broker. Rule: the config lives in broker/amqtt.yaml, not in code."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

import yaml

__all__ = ["embedded_broker", "load_config", "serve"]

log = logging.getLogger(__name__)


def load_config(*, host: str, port: int, ws_port: int | None = None) -> dict[str, Any]:
    """broker/amqtt.yaml with its listener bound to ``host:port``, and its WebSockets listener
    (for browser dashboards) to ``host:ws_port``, or left out when ``ws_port`` is None."""
    text = resources.files("broker").joinpath("amqtt.yaml").read_text()
    config: dict[str, Any] = yaml.safe_load(text)
    bind_host = f"[{host}]" if ":" in host else host
    config["listeners"]["default"]["bind"] = f"{bind_host}:{port}"
    if ws_port is None:
        del config["listeners"]["websockets"]
    else:
        config["listeners"]["websockets"]["bind"] = f"{bind_host}:{ws_port}"
    return config


@contextlib.asynccontextmanager
async def embedded_broker(
    *, host: str = "127.0.0.1", port: int = 1883, ws_port: int | None = None
) -> AsyncIterator[None]:
    """An amqtt broker listening on ``host:port`` (and WebSockets on ``ws_port``) for the
    duration of the block."""
    from amqtt.broker import Broker  # imported late: amqtt is slow to import

    broker = Broker(load_config(host=host, port=port, ws_port=ws_port))
    await broker.start()
    try:
        yield
    finally:
        await broker.shutdown()


async def serve(*, host: str, port: int, ws_port: int | None = None) -> None:
    """Run the broker until SIGINT/SIGTERM."""
    # amqtt and its state machine library log every session transition at INFO.
    for noisy in ("amqtt", "transitions"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with embedded_broker(host=host, port=port, ws_port=ws_port):
        log.info("amqtt broker listening on %s:%d (WebSockets: %s)", host, port, ws_port)
        await stop.wait()
