"""``votebox broker``: run the embedded amqtt broker (broker/embedded.py) in the foreground."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from processor.commands import Commands, add_command
from processor.config import Settings
from processor.errors import ConfigError

__all__ = ["register"]


def register(commands: Commands) -> None:
    """Add ``votebox broker``."""
    p = add_command(commands, "broker", _run, help="run the embedded amqtt broker")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=1883, help="port to listen on (default 1883)")
    p.add_argument(
        "--ws-port",
        type=int,
        default=9001,
        help="WebSockets port for browser dashboards (default 9001; 0: none)",
    )
    who = p.add_mutually_exclusive_group()
    who.add_argument(
        "--accounts",
        default="broker/accounts.json",
        help="let in only these accounts, each to its own topics (default broker/accounts.json,"
        " written by votebox device add)",
    )
    who.add_argument(
        "--open",
        action="store_true",
        help="development only: let in any client that sends a username, to any topic",
    )
    p.add_argument("--tls-port", type=int, default=0, help="a TLS listener's port (0: none)")
    p.add_argument("--certfile", default=None, help="the TLS listener's certificate (PEM)")
    p.add_argument("--keyfile", default=None, help="the TLS listener's private key (PEM)")


def _run(args: argparse.Namespace, settings: Settings) -> int:
    from broker.embedded import Tls, serve

    accounts = None if args.open else Path(args.accounts)
    tls = None
    if args.tls_port:
        if not (args.certfile and args.keyfile):
            raise ConfigError("--tls-port needs --certfile and --keyfile")
        tls = Tls(args.tls_port, Path(args.certfile), Path(args.keyfile))
    ws_port = args.ws_port or None
    asyncio.run(serve(host=args.host, port=args.port, ws_port=ws_port, accounts=accounts, tls=tls))
    return 0
