"""What a Redis Cluster adds to the tally: commits against one Redis node and against three
primaries, in one run on this machine.

Rule: the same batches (500 votes from 500 devices, points for InfluxDB queued) committed one
after another, as the processor commits them, on loopback, AOF fsynced always: three polls on
one node; three polls on three primaries (one each); one hot poll on a cluster (one primary
takes it all). Run: ``.venv/bin/python -m bench.cluster [--batches N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import tempfile
from pathlib import Path

from redis.asyncio import RedisCluster

from bench.fsync import commit_times, summary
from harness.services import redis_cluster, redis_server
from processor.config import RedisTarget
from processor.keys import PollKeys

__all__ = ["measure", "polls_on_distinct_primaries"]


async def polls_on_distinct_primaries(target: RedisTarget, prefix: str, n: int = 3) -> list[str]:
    """``n`` poll ids (``prefix-K``) whose keys live on ``n`` different primaries of the
    cluster ``target`` (on one node: any ``n``)."""
    if not target.cluster:
        return [f"{prefix}-{k}" for k in range(n)]
    client = RedisCluster.from_url(target.url)
    try:
        await client.initialize()
        chosen: dict[str, str] = {}
        k = 0
        while len(chosen) < n:
            node = client.get_node_from_key(PollKeys(f"{prefix}-{k}").definition)
            assert node is not None
            chosen.setdefault(node.name, f"{prefix}-{k}")
            k += 1
        return list(chosen.values())
    finally:
        await client.aclose()


async def _commit_times(
    target: RedisTarget, *, polls: int, batches: int, batch_size: int
) -> list[float]:
    ids = (await polls_on_distinct_primaries(target, f"bench-{polls}"))[:polls]
    return await commit_times(target, batches=batches, batch_size=batch_size, poll_ids=ids)


def measure(folder: Path, *, batches: int, batch_size: int) -> dict[str, list[float]]:
    """Commit times in seconds, by setup."""
    out: dict[str, list[float]] = {}
    with redis_server(folder / "single") as node:
        out["one node, 3 polls"] = asyncio.run(
            _commit_times(RedisTarget(node.url), polls=3, batches=batches, batch_size=batch_size)
        )
    with redis_cluster(folder / "cluster", replicas=0) as nodes:
        target = RedisTarget(nodes[0].url, cluster=True)
        for polls, name in ((3, "cluster, 3 polls on 3 primaries"), (1, "cluster, 1 hot poll")):
            out[name] = asyncio.run(
                _commit_times(target, polls=polls, batches=batches, batch_size=batch_size)
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=500)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        results = measure(Path(folder), batches=args.batches, batch_size=args.batch_size)
    print(
        f"{platform.node()}: {os.cpu_count()} cores, {platform.processor() or platform.machine()}"
    )
    print(f"{args.batches} commits of {args.batch_size} votes each, one after another")
    for name, times in results.items():
        print(f"{name:34}  {summary(times, args.batch_size)}")


if __name__ == "__main__":
    main()
