"""``votebox kiosk`` and ``votebox button``: one device from the terminal (devices/kiosk.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from processor.commands import Commands, add_command
from processor.config import MqttUrl, Settings
from processor.errors import ConfigError

__all__ = ["register"]


def register(commands: Commands) -> None:
    """Add ``votebox kiosk`` and ``votebox button``."""
    for name, text in (
        ("kiosk", "a text-mode kiosk: shows the poll, each line you type is a vote"),
        ("button", "a button with one option: each line (or --presses) is a press"),
    ):
        p = add_command(commands, name, _run, help=text)
        p.add_argument("device", help="the device id (its MQTT client id and username)")
        p.add_argument("--poll", required=True, help="the poll to vote in")
        if name == "button":
            p.add_argument("--option", type=int, required=True, help="the choice it sends")
            p.add_argument("--presses", type=int, default=None, help="press this many times")
            p.add_argument("--interval", type=float, default=0.0, help="seconds between --presses")
        p.add_argument(
            "--broker",
            default="mqtt://127.0.0.1:1883",
            help="the broker, mqtt:// or mqtts:// (default mqtt://127.0.0.1:1883)",
        )
        p.add_argument(
            "--password",
            dest="device_password",
            metavar="PASSWORD",
            help="the device's password (env VOTEBOX_DEVICE_PASSWORD)",
        )
        p.add_argument("--ca-file", default=None, help="CA to verify an mqtts:// broker")
        p.add_argument("--store", default=None, help="the outbox file (default ./DEVICE.outbox)")
        p.add_argument(
            "--drain", type=float, default=30.0, help="seconds to wait for answers at the end"
        )
        p.add_argument("--heartbeat", type=float, default=60.0, help="seconds between heartbeats")


def _run(args: argparse.Namespace, settings: Settings) -> int:
    from devices.client import DeviceConfig
    from devices.kiosk import run_button, run_kiosk
    from devices.outbox import Outbox

    url = MqttUrl.parse(args.broker, variable="--broker")
    config = DeviceConfig(
        device=args.device,
        host=url.host,
        port=url.port,
        password=settings.device_password,
        ca_file=args.ca_file if url.tls else None,
        heartbeat_s=args.heartbeat,
    )
    if url.tls and args.ca_file is None:
        raise ConfigError("an mqtts:// broker needs --ca-file (the CA that signed its certificate)")
    outbox = Outbox(Path(args.store or f"{args.device}.outbox"))
    print(f"{args.device}: epoch {outbox.epoch}, {outbox.depth()} votes waiting", flush=True)
    try:
        if args.command == "kiosk":
            return run_kiosk(
                config, outbox, args.poll, lines=sys.stdin, out=sys.stdout, drain_s=args.drain
            )
        return run_button(
            config,
            outbox,
            args.poll,
            args.option,
            presses=args.presses,
            interval_s=args.interval,
            lines=sys.stdin,
            out=sys.stdout,
            drain_s=args.drain,
        )
    finally:
        outbox.close()
