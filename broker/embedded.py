"""Run the embedded amqtt broker. Rule: the config lives in broker/amqtt.yaml, not in code;
code only binds the listeners and plugs in the accounts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from processor.errors import ConfigError

__all__ = ["Tls", "embedded_broker", "load_config", "serve"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Tls:
    """A TLS listener: its port and the server's certificate and key (PEM)."""

    port: int
    certfile: Path
    keyfile: Path


def load_config(
    *,
    host: str,
    port: int,
    ws_port: int | None = None,
    accounts: Path | None = None,
    tls: Tls | None = None,
) -> dict[str, Any]:
    """broker/amqtt.yaml with its listener bound to ``host:port``, its WebSockets listener (for
    browser dashboards) to ``host:ws_port`` or left out when ``ws_port`` is None, and a TLS
    listener when ``tls`` is given.

    With ``accounts`` (the file `votebox device add` writes), only its accounts get in and
    each only to its topics (broker/amqtt_plugins.py); without, any client that sends a
    username gets in and may use any topic: a development broker.

    Raises:
        ConfigError: ``accounts`` does not exist.
    """
    text = resources.files("broker").joinpath("amqtt.yaml").read_text()
    config: dict[str, Any] = yaml.safe_load(text)
    bind_host = f"[{host}]" if ":" in host else host
    listeners = config["listeners"]
    listeners["default"]["bind"] = f"{bind_host}:{port}"
    if ws_port is None:
        del listeners["websockets"]
    else:
        listeners["websockets"]["bind"] = f"{bind_host}:{ws_port}"
    if tls is None:
        del listeners["tls"]
    else:
        listeners["tls"] |= {
            "bind": f"{bind_host}:{tls.port}",
            "certfile": str(tls.certfile),
            "keyfile": str(tls.keyfile),
        }
    if accounts is not None:
        if not accounts.exists():
            raise ConfigError(
                f"{accounts}: no accounts file. Create accounts with votebox device add (the"
                " processor's, the dashboard's, each device's), or run --open for a development"
                " broker that lets in anyone"
            )
        plugin_config = {"accounts_file": str(accounts.resolve())}
        config["plugins"] = {
            "broker.amqtt_plugins.AccountsAuthPlugin": plugin_config,
            "broker.amqtt_plugins.AccountsTopicPlugin": plugin_config,
        }
    return config


@contextlib.asynccontextmanager
async def embedded_broker(
    *,
    host: str = "127.0.0.1",
    port: int = 1883,
    ws_port: int | None = None,
    accounts: Path | None = None,
    tls: Tls | None = None,
) -> AsyncIterator[None]:
    """An amqtt broker listening on ``host:port`` (and WebSockets on ``ws_port``, TLS as
    ``tls`` says) for the duration of the block; see `load_config` for ``accounts``."""
    from broker.amqtt_broker import AuthenticateFirstBroker  # amqtt is slow to import

    config = load_config(host=host, port=port, ws_port=ws_port, accounts=accounts, tls=tls)
    broker = AuthenticateFirstBroker(config)
    await broker.start()
    try:
        yield
    finally:
        await broker.shutdown()


async def serve(
    *,
    host: str,
    port: int,
    ws_port: int | None = None,
    accounts: Path | None = None,
    tls: Tls | None = None,
) -> None:
    """Run the broker until SIGINT/SIGTERM."""
    # amqtt and its state machine library log every session transition at INFO.
    for noisy in ("amqtt", "transitions"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with embedded_broker(host=host, port=port, ws_port=ws_port, accounts=accounts, tls=tls):
        log.info(
            "amqtt broker listening on %s:%d (WebSockets: %s, TLS: %s); %s",
            host,
            port,
            ws_port,
            tls.port if tls else None,
            f"accounts from {accounts}" if accounts else "OPEN: any username, any topic",
        )
        await stop.wait()
