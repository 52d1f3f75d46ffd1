"""What an fsync per commit costs: the tally's commit time with Redis's ``appendfsync
everysec`` against ``always``, in one run on this machine's disk.

Rule: the same batches (500 votes from 500 devices, one poll, InfluxDB points queued) against a
fresh redis-server per setting, on loopback, data in a temporary folder on the disk being
measured. Run: ``.venv/bin/python -m bench.fsync [--batches N] [--dir DIR]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import redis as sync_redis

from harness.services import redis_server
from processor.codec import Vote
from processor.config import RedisTarget
from processor.poll import Poll
from processor.poll_store import create_poll
from processor.store import connect
from processor.tally import Tally

__all__ = ["commit_times", "measure", "summary"]


async def commit_times(
    target: RedisTarget | str,
    *,
    batches: int,
    batch_size: int,
    poll_ids: Sequence[str] = ("fsync",),
    replicas: int = 0,
    devices: int | None = None,
    shards: int = 1,
    cpu_s: list[float] | None = None,
) -> list[float]:
    """Seconds per commit of ``batches`` batches of ``batch_size`` votes from ``devices``
    devices (default: as many as a batch has) in turn, spread over new polls ``poll_ids`` of
    ``shards`` shards each; with ``replicas``, each commit WAITs for them (1 s at most). With
    ``cpu_s``, each commit's CPU seconds in this process are appended to it."""
    devices = devices or batch_size
    redis = connect(target, timeout_s=10)
    try:
        for poll_id in poll_ids:
            await create_poll(redis, Poll(id=poll_id, labels=("a", "b", "c"), shards=shards))
        tally = Tally(
            redis, timeout_s=10, points_max=10_000_000, replicas=replicas, replica_timeout_ms=1000
        )
        await tally.load()
        times: list[float] = []
        for n in range(batches):
            first = n * batch_size
            votes = [
                Vote(
                    poll_ids[i % len(poll_ids)],
                    f"d{(first + i) % devices}",
                    i % 3,
                    (first + i) // devices + 1,
                    ts_s=int(time.time()),
                )
                for i in range(batch_size)
            ]
            started, cpu = time.perf_counter(), time.process_time()
            await tally.commit(votes, now_ms=int(time.time() * 1000), token=f"b{n}")
            times.append(time.perf_counter() - started)
            if cpu_s is not None:
                cpu_s.append(time.process_time() - cpu)
        return times
    finally:
        await redis.aclose()


def measure(folder: Path, *, batches: int, batch_size: int) -> dict[str, list[float]]:
    """Commit times in seconds, by appendfsync setting."""
    out: dict[str, list[float]] = {}
    for setting in ("everysec", "always"):
        with redis_server(folder / setting) as proc:
            # Set at run time, as an operator can, whatever the harness started it with.
            sync_redis.Redis(port=proc.port).config_set("appendfsync", setting)
            out[setting] = asyncio.run(
                commit_times(proc.url, batches=batches, batch_size=batch_size)
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--dir", default=None, help="where Redis keeps its AOF (default: /tmp)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        results = measure(Path(folder), batches=args.batches, batch_size=args.batch_size)
    print(
        f"{platform.node()}: {os.cpu_count()} cores, {platform.processor() or platform.machine()}"
    )
    print(f"{args.batches} commits of {args.batch_size} votes each, data in {args.dir or '/tmp'}")
    for setting, times in results.items():
        print(f"appendfsync {setting:8}  {summary(times, args.batch_size)}")


def summary(times: list[float], batch_size: int) -> str:
    """p50, p99 and votes/s of commit times in seconds."""
    ms = sorted(t * 1000 for t in times)
    p50, p99 = statistics.median(ms), ms[int(len(ms) * 0.99) - 1]
    rate = batch_size * len(ms) / (sum(ms) / 1000)
    return f"p50 {p50:6.2f} ms  p99 {p99:6.2f} ms  {rate:8.0f} votes/s"


if __name__ == "__main__":
    main()
