"""``votebox device add|remove|list``: broker accounts, for devices, processors and dashboards.

Rule: the accounts file is the source of truth; Mosquitto's password file and ACL are written
from it on every change (broker/accounts.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from processor.commands import Commands, add_command
from processor.config import Settings

__all__ = ["register"]


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
    if args.device_command == "add":
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
