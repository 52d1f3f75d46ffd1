"""What operators run: one module per ``votebox`` command, each registering its own flags.

Rule: a command module adds its parser in ``register(commands)`` and names its runner with
``set_defaults(run=...)``; processor/cli.py only assembles them and calls the one chosen.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Final, TypeAlias

from processor.config import ENV_VARS, Settings
from processor.errors import ConfigError

__all__ = ["Commands", "ENV_EPILOG", "Runner", "add_command", "needs_checkout"]

Runner: TypeAlias = Callable[[argparse.Namespace, Settings], int]
Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"

ENV_EPILOG: Final = "environment (flags override them):\n" + "\n".join(
    f"  {var:<28} {text}" for var, _, text in ENV_VARS
)


def add_command(
    commands: Commands, name: str, run: Runner, *, env_epilog: bool = False, **kwargs: Any
) -> argparse.ArgumentParser:
    """Add the parser of command ``name``, whose runner is ``run``.

    Args:
        commands: the subparsers of ``votebox``.
        name: the command's name.
        run: what runs it, given the parsed flags and the settings they override.
        env_epilog: list the ``VOTEBOX_*`` variables under its ``--help``.
        **kwargs: passed to ``add_parser`` (help, description...).

    Returns:
        The command's parser, to add its flags to.
    """
    if env_epilog:
        kwargs.update(epilog=ENV_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser = commands.add_parser(name, **kwargs)
    parser.set_defaults(run=run)
    return parser


@contextlib.contextmanager
def needs_checkout(command: str) -> Iterator[None]:
    """Around the import of the repository's harness/ or bench/, which the installed package
    (the wheel, the Docker image) leaves out: they start servers and load generators, no part
    of a production deployment.

    Raises:
        ConfigError: they are not there; says where the command runs.
    """
    try:
        yield
    except ModuleNotFoundError as exc:
        if exc.name not in ("harness", "bench"):
            raise
        raise ConfigError(
            f"votebox {command} runs from a checkout of the repository (it needs its "
            f"{exc.name}/, which the installed package leaves out): clone it and run "
            "scripts/setup there"
        ) from None
