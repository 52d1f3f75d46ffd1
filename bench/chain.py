"""What the chain costs: the tally's time per vote with it, and ``votebox audit`` of a poll of a
million votes.

Rule: real servers on loopback (Redis with AOF fsynced every second, as deployed; InfluxDB 1.x);
the same batches as the processor commits them (500 votes from 10,000 devices, points queued,
bench/fsync.py's commit_times);
the processor's side measured as this process's CPU time. Run: ``.venv/bin/votebox bench
--chain`` (``--smoke`` for a small one).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.cluster import script_cpu_s
from bench.fsync import commit_times
from harness.services import influxdb, redis_server
from processor.commands.audit import audit
from processor.config import InfluxTarget, RedisTarget, Settings
from processor.influx.drainer import InfluxDrainer
from processor.influx.writers import make_writer
from processor.store import connect

__all__ = ["run_chain_bench", "chain_table"]

_BATCH = 500
_DEVICES = 10_000


async def _tally_cost(target: RedisTarget, votes: int) -> dict[str, float]:
    """The tally's script and client time per vote over ``votes`` unique votes, committed as
    bench/fsync.py commits them."""
    cpu_s: list[float] = []
    script_before = await script_cpu_s(target)
    times = await commit_times(
        target,
        batches=votes // _BATCH,
        batch_size=_BATCH,
        poll_ids=(f"chain-cost-{int(time.time() * 1000)}",),
        devices=_DEVICES,
        cpu_s=cpu_s,
    )
    script_s = await script_cpu_s(target) - script_before
    return {
        "votes": votes,
        "script_us_per_vote": script_s / votes * 1e6,
        "client_us_per_vote": sum(cpu_s) / votes * 1e6,
        "votes_per_s": votes / sum(times),
    }


async def _audit_cost(
    redis_target: RedisTarget, influx: InfluxTarget, votes: int, log: Callable[[str], None]
) -> dict[str, float]:
    """A poll of ``votes`` votes, every point in InfluxDB, then audited as an operator would."""
    poll = "audited"
    await commit_times(
        redis_target, batches=votes // _BATCH, batch_size=_BATCH, poll_ids=(poll,),
        devices=_DEVICES,
    )  # fmt: skip
    redis = connect(redis_target, timeout_s=60)
    writer = make_writer(influx, timeout_s=120)
    try:
        log(f"bench: {votes:,} votes committed; writing their points to InfluxDB")
        drainer = InfluxDrainer(
            redis=redis, writer=writer, batch_max=20_000, flush_interval_s=0.1,
            redis_timeout_s=60,
        )  # fmt: skip
        while await drainer.drain_once([poll]):
            pass
    finally:
        writer.close()
        await redis.aclose()
    settings = Settings.from_env(
        {
            "VOTEBOX_REDIS_URL": redis_target.url,
            "VOTEBOX_INFLUX_URL": influx.url,
            "VOTEBOX_INFLUX_API": "v1",
            "VOTEBOX_INFLUX_DB": influx.database or "votebox",
        }
    )
    log("bench: auditing")
    started, cpu = time.perf_counter(), time.process_time()
    found = await audit(settings, poll)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    assert found.finding is None, found.verdict()
    assert found.entries == votes, found.verdict()
    return {"entries": found.entries, "audit_s": elapsed, "audit_cpu_s": cpu}


def run_chain_bench(
    folder: Path, *, smoke: bool, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """The tally's cost per vote (three runs), and the audit of a large poll."""
    tally_votes = 20_000 if smoke else 200_000
    audit_votes = 20_000 if smoke else 1_000_000
    with redis_server(folder / "redis") as node:
        target = RedisTarget(node.url)
        runs = [asyncio.run(_tally_cost(target, tally_votes)) for _ in range(1 if smoke else 3)]
    with redis_server(folder / "redis-audit") as node, influxdb(folder / "influx") as influx:
        audited = asyncio.run(
            _audit_cost(
                RedisTarget(node.url),
                InfluxTarget(url=influx.url, api="v1", database="votebox"),
                audit_votes,
                log,
            )
        )
    return {"tally": runs, "audit": audited}


def chain_table(result: dict[str, Any]) -> str:
    """The figures, as docs/benchmarks.md shows them."""
    lines = [
        "| run | votes | script µs/vote | client µs/vote | votes/s |",
        "|---|---:|---:|---:|---:|",
    ]
    for n, run in enumerate(result["tally"], 1):
        lines.append(
            f"| tally {n} | {run['votes']:,} | {run['script_us_per_vote']:.2f} | "
            f"{run['client_us_per_vote']:.2f} | {run['votes_per_s']:,.0f} |"
        )
    a = result["audit"]
    lines.append(
        f"\naudit: {a['entries']:,} entries in {a['audit_s']:.1f} s "
        f"({a['audit_cpu_s']:.1f} s of the auditor's CPU), from InfluxDB and Redis"
    )
    return "\n".join(lines)
