"""``votebox bench``: the benchmark in bench/, against the broker's own limit."""

from __future__ import annotations

import argparse
from pathlib import Path

from processor.commands import Commands, add_command, needs_checkout
from processor.config import Settings

__all__ = ["register"]


def register(commands: Commands) -> None:
    """Add ``votebox bench``."""
    p = add_command(
        commands,
        "bench",
        _run,
        help="benchmark votebox against the broker's own limit (docs/benchmarks.md)",
    )
    p.add_argument("--smoke", action="store_true", help="a few seconds, to check it works")
    p.add_argument("--out", default="bench-results.json", help="where to write the figures")
    p.add_argument(
        "--soak",
        type=float,
        default=0,
        metavar="SECONDS",
        help="instead: one processor at a fixed rate this long, RSS every 10 s",
    )
    p.add_argument("--soak-rate", type=float, default=5000, help="messages/s for --soak")
    p.add_argument(
        "--chain",
        action="store_true",
        help="instead: only the chain's cost (the tally per vote, the audit of a million votes)",
    )
    p.add_argument(
        "--polls",
        action="store_true",
        help="instead: only the many-polls runs (a backlog over thousands of polls, idle polls)",
    )


def _run(args: argparse.Namespace, settings: Settings) -> int:
    # bench/ starts its own servers and load generators: loaded only when asked for.
    with needs_checkout("bench"):
        from bench.run import main as bench_main

    return bench_main(
        smoke=args.smoke,
        out=Path(args.out),
        soak_s=args.soak,
        soak_rate=args.soak_rate,
        polls=args.polls,
        chain=args.chain,
    )
