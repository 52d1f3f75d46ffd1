"""``votebox device add|remove|list|site``: broker accounts, for devices, processors and
dashboards; and a device's site (in Redis, processor/sites.py).

Rule: the accounts file is the source of truth; Mosquitto's password file and ACL are written
from it on every change (broker/accounts.py).
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from processor.commands import Commands, add_command
from processor.config import Settings
from processor.errors import ConfigError
from processor.sites import clear_site, set_site
from processor.store import open_redis, redis_errors
from processor.topics import is_valid_id

__all__ = ["register"]


async def _set_site(settings: Settings, device: str, site: str | None, *, clear: bool) -> int:
    if clear == (site is not None):
        raise ConfigError("give a site, or --clear to take it away (not both)")
    if not is_valid_id(device):
        raise ConfigError(f"device id {device!r} must be 1-64 chars of A-Z a-z 0-9 _ -")
    async with open_redis(settings.redis_target(), timeout_s=settings.redis_timeout_s) as redis:
        with redis_errors():
            if site is not None:
                await set_site(redis, device, site)
                print(f"device {device} is at site {site!r}; its next votes carry it")
            elif await clear_site(redis, device):
                print(f"device {device} has no site now")
            else:
                print(f"device {device} had no site")
    return 0


def register(commands: Commands) -> None:
    """Add ``votebox device`` and its actions."""
    parser = add_command(
        commands,
        "device",
        _run,
        help="broker accounts: add, remove, list (writes the Mosquitto password file)",
        description="The accounts file is the source of truth; the Mosquitto password file is "
        "rewritten from it on every change (then: docker-compose kill -s HUP mosquitto). A "
        "device's username is its device id; the processor and dashboards have accounts of "
        "their own (--role).",
    )
    actions = parser.add_subparsers(dest="device_command", required=True, metavar="ACTION")
    a = actions.add_parser("add", help="add or replace an account; prints its password once")
    a.add_argument("username")
    a.add_argument("--role", default="device", choices=["device", "processor", "dashboard"])
    a.add_argument(
        "--password",
        default=None,
        help="the password (default: a random one, printed once)",
    )
    a.add_argument(
        "--site",
        default=None,
        help="where the device stands (a tag of its votes' InfluxDB points; in Redis)",
    )
    s = actions.add_parser(
        "site",
        help="set or change a device's site (in Redis: its next votes carry it)",
        description="A device's site tags its votes' points in InfluxDB (docs/analytics.md, "
        "Sites). The processors read it again within 5 s; votes counted before keep theirs.",
    )
    s.add_argument("username", metavar="DEVICE")
    s.add_argument("site", nargs="?", default=None, help="the site; leave out with --clear")
    s.add_argument("--clear", action="store_true", help="take the device's site away")
    r = actions.add_parser("remove", help="remove an account")
    r.add_argument("username")
    actions.add_parser("list", help="every account and its role")
    for action in actions.choices.values():
        action.add_argument(
            "--accounts", default="broker/accounts.json", help="the accounts file (JSON)"
        )
        action.add_argument(
            "--passwd", default="broker/mosquitto.passwd", help="the Mosquitto password file"
        )
        action.add_argument(
            "--acl", default="broker/mosquitto.acl", help="the Mosquitto ACL file (rewritten)"
        )


def _run(args: argparse.Namespace, settings: Settings) -> int:
    from broker.accounts import AccountStore

    store = AccountStore(Path(args.accounts), Path(args.passwd), Path(args.acl))
    written = f"{args.passwd} and {args.acl} rewritten"
    if args.device_command == "site":
        return asyncio.run(_set_site(settings, args.username, args.site, clear=args.clear))
    if args.device_command == "add":
        if args.site is not None:
            if args.role != "device":
                raise ConfigError("only a device has a site (--role device)")
            # In Redis first: if it is away, nothing has changed yet.
            asyncio.run(_set_site(settings, args.username, args.site, clear=False))
        password = store.add(args.username, args.role, args.password)
        shown = "" if args.password else f" with password {password} (shown once: keep it)"
        print(f"account {args.username} ({args.role}){shown}; {written}")
    elif args.device_command == "remove":
        store.remove(args.username)
        print(f"removed {args.username}; {written}")
    else:
        accounts = store.load()
        for name, account in accounts.items():
            print(f"{name:<24} {account.role}")
        if not accounts:
            print("no accounts yet; votebox device add NAME")
    return 0
