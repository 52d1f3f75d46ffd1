"""What a Redis Cluster adds to the tally: commits against one Redis node and against three
primaries, in one run on this machine.

Rule: the same batches (500 votes, points for InfluxDB queued) committed one after another, as
the processor commits them, on loopback, AOF fsynced always: three polls on one node; three
polls on three primaries (one each); one hot poll on a cluster (one primary takes it all); the
hot poll with 10,000 devices on one shard and spread over three (``--shards 3``), each shard on
its own primary. Redis CPU per vote is the sum over the nodes of the script's time
(``INFO commandstats``). Run: ``.venv/bin/python -m bench.cluster [--batches N]``.
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
from processor.keys import PollKeys, shard_keys
from processor.store import connect

__all__ = [
    "hot_poll_on_distinct_primaries",
    "measure",
    "polls_on_distinct_primaries",
    "script_cpu_s",
]


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


async def hot_poll_on_distinct_primaries(target: RedisTarget, prefix: str, shards: int = 3) -> str:
    """A poll id (``prefix-K``) whose ``shards`` shards live on as many different primaries of
    the cluster ``target`` (on one node: any)."""
    if not target.cluster:
        return f"{prefix}-0"
    client = RedisCluster.from_url(target.url)
    try:
        await client.initialize()
        for k in range(10_000):
            poll = f"{prefix}-{k}"
            nodes = {client.get_node_from_key(keys.definition) for keys in shard_keys(poll, shards)}
            if len({node.name for node in nodes if node is not None}) == shards:
                return poll
        raise ValueError(f"the cluster has fewer than {shards} primaries")
    finally:
        await client.aclose()


async def _commit_times(
    target: RedisTarget,
    *,
    polls: int,
    batches: int,
    batch_size: int,
    devices: int | None = None,
    shards: int = 1,
) -> tuple[list[float], float]:
    """Commit times, and the Redis CPU (s) the tally script used over every node."""
    prefix = f"bench-{polls}-{shards}-{devices}"
    if shards > 1:
        ids = [await hot_poll_on_distinct_primaries(target, prefix, shards)]
    else:
        ids = (await polls_on_distinct_primaries(target, prefix))[:polls]
    before = await script_cpu_s(target)
    times = await commit_times(
        target,
        batches=batches,
        batch_size=batch_size,
        poll_ids=ids,
        devices=devices,
        shards=shards,
    )
    return times, await script_cpu_s(target) - before


async def script_cpu_s(target: RedisTarget) -> float:
    """Seconds Redis has spent in scripts (EVAL, EVALSHA) since it started, over every primary."""
    client = connect(target, timeout_s=10)
    try:
        if isinstance(client, RedisCluster):
            stats = await client.info("commandstats", target_nodes=RedisCluster.PRIMARIES)
            per_node = list(stats.values())
        else:
            per_node = [await client.info("commandstats")]
        return sum(
            float(node.get(f"cmdstat_{name}", {}).get("usec", 0)) / 1e6
            for node in per_node
            for name in ("evalsha", "eval")
        )
    finally:
        await client.aclose()


def measure(folder: Path, *, batches: int, batch_size: int) -> dict[str, tuple[list[float], float]]:
    """Commit times in seconds and the script's Redis CPU seconds, by setup."""
    out: dict[str, tuple[list[float], float]] = {}
    with redis_server(folder / "single") as node:
        out["one node, 3 polls"] = asyncio.run(
            _commit_times(RedisTarget(node.url), polls=3, batches=batches, batch_size=batch_size)
        )
    with redis_cluster(folder / "cluster", replicas=0) as nodes:
        target = RedisTarget(nodes[0].url, cluster=True)
        for name, polls, devices, shards in (
            ("cluster, 3 polls on 3 primaries", 3, None, 1),
            ("cluster, 1 hot poll", 1, None, 1),
            ("cluster, hot poll, 10k devices, 1 shard", 1, 10_000, 1),
            ("cluster, hot poll, 10k devices, 3 shards", 1, 10_000, 3),
        ):
            out[name] = asyncio.run(
                _commit_times(
                    target,
                    polls=polls,
                    batches=batches,
                    batch_size=batch_size,
                    devices=devices,
                    shards=shards,
                )
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
    for name, (times, script_s) in results.items():
        per_vote = script_s / (len(times) * args.batch_size) * 1e6
        print(f"{name:42}  {summary(times, args.batch_size)}  Redis {per_vote:5.1f} µs/vote")


if __name__ == "__main__":
    main()
