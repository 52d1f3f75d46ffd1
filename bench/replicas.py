"""What WAIT costs: the tally's commit time acknowledged by the primary alone
(VOTEBOX_REDIS_REPLICAS=0) against once a replica has it (=1), in one run on this machine.

Rule: one primary and one replica on loopback, AOF as composed (appendfsync always), the same
batches as bench/fsync.py; the two settings alternate round by round, so drift in the
machine's load falls on both. Run: ``.venv/bin/python -m bench.replicas [--rounds N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import tempfile
import time
from pathlib import Path

import redis as sync_redis

from bench.fsync import commit_times, summary
from harness.services import redis_server

__all__ = ["measure"]


def measure(folder: Path, *, rounds: int, batches: int, batch_size: int) -> dict[int, list[float]]:
    """Commit times in seconds, by the number of replicas each commit waited for."""
    out: dict[int, list[float]] = {0: [], 1: []}
    with (
        redis_server(folder / "primary") as primary,
        redis_server(folder / "replica", replica_of=primary.port) as replica,
    ):
        link = sync_redis.Redis(port=replica.port)
        while link.info("replication").get("master_link_status") != "up":
            time.sleep(0.05)
        for n in range(rounds):
            for replicas in (0, 1):
                out[replicas] += asyncio.run(
                    commit_times(
                        primary.url,
                        batches=batches,
                        batch_size=batch_size,
                        poll_ids=[f"wait-{replicas}-{n}"],
                        replicas=replicas,
                    )
                )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=500)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        results = measure(
            Path(folder), rounds=args.rounds, batches=args.batches, batch_size=args.batch_size
        )
    print(
        f"{platform.node()}: {os.cpu_count()} cores, {platform.processor() or platform.machine()}"
    )
    print(f"{args.rounds} rounds of {args.batches} commits of {args.batch_size} votes each")
    for replicas, times in results.items():
        print(f"VOTEBOX_REDIS_REPLICAS={replicas}  {summary(times, args.batch_size)}")


if __name__ == "__main__":
    main()
