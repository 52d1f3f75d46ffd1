"""``votebox processor``: run the vote processor until SIGTERM or a part fails for good.

Rule: every setting has a flag of its own, derived from the one table in processor/config.py.
"""

from __future__ import annotations

import argparse
import asyncio
import logging

from processor.commands import Commands, add_command
from processor.config import ENV_VARS, Settings
from processor.errors import VoteboxError

__all__ = ["register"]


def register(commands: Commands) -> None:
    """Add ``votebox processor`` and a flag for each ``VOTEBOX_*`` setting."""
    parser = add_command(
        commands, "processor", _run, env_epilog=True, help="run the vote processor"
    )
    for var, name, text in ENV_VARS:
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, dest=name, metavar=var, help=f"{text} (env {var})")


def _run(args: argparse.Namespace, settings: Settings) -> int:
    from processor.service import run, tune_collector
    from processor.supervise import EXIT_FAILED

    tune_collector()
    try:
        asyncio.run(run(settings))
    except VoteboxError:
        raise
    except Exception as exc:
        logging.getLogger("processor").critical("the processor ended: %r", exc, exc_info=exc)
        return EXIT_FAILED
    return 0
