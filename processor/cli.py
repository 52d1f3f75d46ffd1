"""The ``votebox`` command. Rule: assemble the commands' parsers, build Settings from the
environment and the chosen command's flags, run the command; nothing more.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence

from processor.commands import (
    ENV_EPILOG,
    audit,
    bench,
    broker,
    dashboard,
    demo,
    device,
    devices,
    export,
    kiosk,
    poll,
    processor,
    recount,
    simulate,
    status,
    watch,
)
from processor.config import SETTING_NAMES, Settings
from processor.errors import VoteboxError
from processor.logs import configure_logging

__all__ = ["main"]

# In the order `votebox --help` lists them.
_COMMANDS = (
    processor,
    device,
    status,
    broker,
    poll,
    recount,
    audit,
    export,
    simulate,
    kiosk,
    devices,
    dashboard,
    watch,
    bench,
    demo,
)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="votebox",
        description="Physical voting over MQTT: CBOR votes in, exact tallies in Redis, "
        "live retained results out.",
        epilog=ENV_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in _COMMANDS:
        command.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``votebox``; returns the exit code."""
    args = _build_parser().parse_args(argv)
    try:
        # The command's own flags that name a setting (--redis-url...) override the environment.
        settings = Settings.from_env(os.environ).with_overrides(
            {name: getattr(args, name, None) for name in SETTING_NAMES}
        )
        configure_logging(settings.log_level, settings.log_format)
        code: int = args.run(args, settings)
        return code
    except VoteboxError as exc:
        print(f"votebox: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
