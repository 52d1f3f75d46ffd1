"""``votebox bench``: votebox against the broker's own limit, measured in one run.

Rule: every figure comes from real servers on loopback started here, with the load generator
in its own process; every votebox run also checks that the count is exact.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import redis as sync_redis
from redis.asyncio import Redis

from bench.chain import chain_table, run_chain_bench
from bench.cluster import (
    hot_poll_on_distinct_primaries,
    polls_on_distinct_primaries,
    script_cpu_s,
)
from harness.services import (
    ManagedProcess,
    amqtt_broker,
    end_session,
    influxdb,
    mosquitto,
    processor,
    redis_cluster,
    redis_server,
    rss_mb,
)
from processor.commands.watch import results_stream
from processor.config import InfluxTarget, MqttUrl, RedisTarget
from processor.keys import PollKeys, shard_keys
from processor.poll import Poll
from processor.poll_store import create_poll, read_results
from processor.store import connect

__all__ = ["COUNTING_RUNS", "BenchConfig", "main", "run_bench"]

# The sum of the polls' totals (KEYS: their tally hashes), read in one call while a backlog over
# thousands of polls drains.
_SUM_TOTALS = """
local n = 0
for _, key in ipairs(KEYS) do n = n + tonumber(redis.call('HGET', key, 'total') or '0') end
return n
"""

_REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True, slots=True)
class BenchConfig:
    """Sizes of one benchmark run."""

    messages: int = 200_000
    devices: int = 10_000
    amqtt_messages: int = 30_000
    latency_seconds: float = 10.0
    dup_share: float = 0.05
    batch_share: float = 0.05
    # The many-polls runs (docs/benchmarks.md, Many polls): a backlog spread over this many
    # polls beside the same backlog in one, and this many open polls with nothing happening.
    spread_polls: int = 2000
    idle_polls: int = 10_000
    idle_seconds: float = 30.0

    @classmethod
    def smoke(cls) -> BenchConfig:
        return cls(
            messages=3000,
            devices=50,
            amqtt_messages=1500,
            latency_seconds=2.0,
            spread_polls=20,
            idle_polls=50,
            idle_seconds=2.0,
        )


def _loadgen(
    port: int,
    *,
    poll: str,
    messages: int,
    devices: int,
    rate: float | None = None,
    connections: int = 4,
    dup: float = 0.0,
    batch: float = 0.0,
    chunk: int = 100,
) -> subprocess.Popen[str]:
    argv = [
        sys.executable,
        "-m",
        "bench.loadgen",
        "--port",
        str(port),
        "--poll",
        poll,
        "--messages",
        str(messages),
        "--devices",
        str(devices),
        "--connections",
        str(connections),
        "--dup-share",
        str(dup),
        "--batch-share",
        str(batch),
        "--chunk",
        str(chunk),
    ]
    if rate:
        argv += ["--rate", str(rate)]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd=_REPO)


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _CpuMeter:
    """CPU seconds of running processes over a measurement, from /proc: who used the cores."""

    def __init__(self, pids: dict[str, list[int]]) -> None:
        self._pids = pids
        self._before = {name: sum(map(_cpu_s, p)) for name, p in pids.items()}

    def cores(self, elapsed_s: float, **finished_cpu_s: float) -> dict[str, float]:
        """Cores used by each process group (and by finished ones, given their CPU seconds)."""
        used = {
            name: (sum(map(_cpu_s, pids)) - self._before[name]) / elapsed_s
            for name, pids in self._pids.items()
        }
        used |= {name: cpu / elapsed_s for name, cpu in finished_cpu_s.items()}
        used["all"] = sum(used.values())
        return {name: round(value, 3) for name, value in used.items()}


class _CpuSampler:
    """Every 100 ms, each process group's CPU seconds so far: to see who was busy when the
    slowest votes waited (a latency profile across processes, not a guess)."""

    def __init__(self, pids: dict[str, list[int]], every_s: float = 0.1) -> None:
        self._pids = pids
        self._every_s = every_s
        self.samples: list[tuple[float, dict[str, float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench.cpu_sampler", daemon=True)

    def __enter__(self) -> _CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.time()
            with contextlib.suppress(OSError):
                reading = {name: sum(map(_cpu_s, pids)) for name, pids in self._pids.items()}
                self.samples.append((now, reading))
            self._stop.wait(self._every_s)

    def cores_between(self, start: float, end: float) -> dict[str, float]:
        """Cores each group used from ``start`` to ``end`` (the samples around them)."""
        before = [s for s in self.samples if s[0] <= start] or self.samples[:1]
        after = [s for s in self.samples if s[0] >= end] or self.samples[-1:]
        (t0, c0), (t1, c1) = before[-1], after[0]
        span = max(t1 - t0, 1e-3)
        return {name: (c1[name] - c0[name]) / span for name in c0}


def _wait_rusage_cpu_s(proc: subprocess.Popen[Any]) -> float:
    """Reap ``proc`` and return the CPU seconds it used (gone from /proc once reaped)."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_utime + usage.ru_stime


@dataclass(frozen=True, slots=True)
class Store:
    """Where a run's processors count: one Redis node, or a cluster's primaries."""

    name: str
    target: RedisTarget
    nodes: tuple[ManagedProcess, ...]
    # Each commit waits for this many replicas (VOTEBOX_REDIS_REPLICAS).
    replicas: int = 0


class Bench:
    """The servers of one benchmark run, and the measurements on them."""

    def __init__(self, root: Path, stack: ExitStack, config: BenchConfig) -> None:
        self.root = root
        self.config = config
        self._stack = stack
        self.redis = stack.enter_context(redis_server(root / "redis"))
        self.single = Store("one Redis node", RedisTarget(self.redis.url), (self.redis,))
        self.mosquitto = stack.enter_context(mosquitto(root / "mosquitto"))
        self.amqtt = stack.enter_context(amqtt_broker(root / "amqtt"))
        self.influx = stack.enter_context(influxdb(root / "influxdb"))
        self._cluster: Store | None = None
        self._replicated: Store | None = None
        self._runs = 0
        self._sessions: dict[ManagedProcess, tuple[ManagedProcess, str]] = {}

    def cluster(self) -> Store:
        """A Redis Cluster of three primaries without replicas, started on first use."""
        if self._cluster is None:
            nodes = self._stack.enter_context(redis_cluster(self.root / "cluster", replicas=0))
            target = RedisTarget(nodes[0].url, cluster=True)
            self._cluster = Store("Redis Cluster, 3 primaries", target, tuple(nodes))
        return self._cluster

    def replicated(self) -> Store:
        """A Redis primary with one replica, each commit waiting for it, started on first
        use: what WAIT costs."""
        if self._replicated is None:
            primary = self._stack.enter_context(redis_server(self.root / "primary"))
            replica = self._stack.enter_context(
                redis_server(self.root / "replica", replica_of=primary.port)
            )
            link = sync_redis.Redis(port=replica.port)
            deadline = time.monotonic() + 30
            while link.info("replication").get("master_link_status") != "up":
                if time.monotonic() > deadline:
                    raise TimeoutError("the bench's Redis replica did not sync in 30 s")
                time.sleep(0.05)
            link.close()
            target = RedisTarget(primary.url)
            # The replica's CPU is not the tally's: only the primary is metered.
            self._replicated = Store("one node, WAIT 1 replica", target, (primary,), replicas=1)
        return self._replicated

    def _poll(self, name: str) -> str:
        return self._polls(name, self.single)[0]

    def _polls(self, name: str, store: Store, *, polls: int = 1, shards: int = 1) -> list[str]:
        """New polls: ``polls`` of them on as many primaries, or one over ``shards`` shards
        on as many primaries (on one node: anywhere)."""
        self._runs += 1
        prefix = f"{name}-{self._runs}"

        async def create() -> list[str]:
            if shards > 1:
                ids = [await hot_poll_on_distinct_primaries(store.target, prefix, shards)]
            elif polls > 1:
                ids = await polls_on_distinct_primaries(store.target, prefix, polls)
            else:
                ids = [prefix]
            redis = connect(store.target, timeout_s=10)
            try:
                for poll_id in ids:
                    poll = Poll(id=poll_id, labels=("a", "b", "c", "d"), shards=shards)
                    await create_poll(redis, poll)
            finally:
                await redis.aclose()
            return ids

        return asyncio.run(create())

    def processors(
        self, broker: ManagedProcess, n: int = 1, share: bool = False, store: Store | None = None
    ) -> list[ManagedProcess]:
        store = store or self.single
        procs = []
        for _ in range(n):
            self._runs += 1
            env = {
                "VOTEBOX_MQTT_URL": f"mqtt://processor@127.0.0.1:{broker.port}",
                "VOTEBOX_MQTT_PROTOCOL": "3.1.1" if broker.name == "amqtt" else "5",
                "VOTEBOX_MQTT_CLIENT_ID": f"bench-proc-{self._runs}",
                "VOTEBOX_REDIS_URL": store.target.url,
                "VOTEBOX_REDIS_CLUSTER": "1" if store.target.cluster else "0",
                "VOTEBOX_REDIS_REPLICAS": str(store.replicas),
                "VOTEBOX_INFLUX_URL": self.influx.url,
                "VOTEBOX_INFLUX_API": "v1",
                "VOTEBOX_INFLUX_DB": "bench",
                "VOTEBOX_LOG_LEVEL": "INFO",
            }
            if share:
                env["VOTEBOX_MQTT_SHARE_GROUP"] = "bench"
            proc = processor(self.root / f"proc-{self._runs}", env=env)
            self._stack.callback(proc.stop)  # stopped even when a measurement fails
            proc.start()
            procs.append(proc)
            self._sessions[proc] = (broker, env["VOTEBOX_MQTT_CLIENT_ID"])
        return procs

    def retire(self, procs: Sequence[ManagedProcess]) -> None:
        """Stop processors and end their sessions: a stopped processor's persistent session
        would otherwise make the broker queue every later run's votes for it (up to its
        queue limit), and later runs would measure that work too."""
        for proc in procs:
            proc.stop()
            end_session(*self._sessions.pop(proc))

    def baseline(self, broker: ManagedProcess, messages: int) -> dict[str, Any]:
        """mosquitto_sub receiving the load from the same broker: the broker's own limit."""
        poll = self._poll("base")
        sub = subprocess.Popen(
            [
                "mosquitto_sub",
                "-h",
                "127.0.0.1",
                "-p",
                str(broker.port),
                "-t",
                f"votes/{poll}/#",
                "-q",
                "1",
                "-C",
                str(messages),
                "-i",
                f"bench-sub-{self._runs}",
                "-u",
                "bench",
            ],
            stdout=subprocess.DEVNULL,
        )
        time.sleep(0.5)  # subscribed
        meter = self._meter(broker)
        gen = _loadgen(broker.port, poll=poll, messages=messages, devices=self.config.devices)
        out, _ = gen.communicate()
        sub_cpu = _wait_rusage_cpu_s(sub)
        done = time.time()
        load = json.loads(out)
        elapsed = done - load["started"]
        return {
            "messages": messages,
            "rate": messages / elapsed,
            "cores": meter.cores(elapsed, loadgen=load["cpu_s"], subscriber=sub_cpu),
        }

    def backlog(self, broker: ManagedProcess, *, messages: int, devices: int) -> dict[str, Any]:
        """A backlog queued in a persistent session while its subscriber was away, then
        drained: ``mosquitto_sub`` and votebox, each from its own session on the same broker,
        timed from the reconnect to the last message received (the last vote committed)."""
        dup, batch = self.config.dup_share, self.config.batch_share
        poll = self._poll("backlog-base")
        sub_id = f"bench-backlog-sub-{self._runs}"
        argv = [
            "mosquitto_sub", "-h", "127.0.0.1", "-p", str(broker.port), "-u", "bench",
            "-t", f"votes/{poll}/#", "-q", "1", "-c", "-i", sub_id,
        ]  # fmt: skip
        subprocess.run([*argv, "-E"], check=True, timeout=30)  # its session, subscribed, away
        gen = _loadgen(
            broker.port, poll=poll, messages=messages, devices=devices, dup=dup, batch=batch
        )
        gen.communicate()
        started = time.time()
        sub = subprocess.Popen([*argv, "-C", str(messages)], stdout=subprocess.DEVNULL)
        sub_cpu = _wait_rusage_cpu_s(sub)
        base_rate = messages / (time.time() - started)
        end_session(broker, sub_id)

        poll = self._poll("backlog")
        [proc] = self.processors(broker)
        proc.stop()  # its session stays: the votes queue in it
        gen = _loadgen(
            broker.port, poll=poll, messages=messages, devices=devices, dup=dup, batch=batch
        )
        load = json.loads(gen.communicate()[0])
        proc.start(wait=False)
        drained = asyncio.run(self._watch_drain(proc, broker, [poll], load["unique_votes"]))
        asyncio.run(self._wait_points_drained([poll], self.single, 1))
        self.retire([proc])
        # From the first vote counted: the process's start (imports) is not the drain.
        votes = drained["total"] - drained["first_total"]
        elapsed = drained["done"] - drained["first"]
        rate = messages * votes / load["unique_votes"] / elapsed
        total = drained["total"]
        return {
            "messages": messages,
            "devices": devices,
            "baseline_rate": base_rate,
            "baseline_subscriber_cpu_s": sub_cpu,
            "rate": rate,
            "ratio": rate / base_rate,
            "processor_us_per_message": drained["cpu_s"]
            / (messages * votes / load["unique_votes"])
            * 1e6,
            "cores": drained["cores"],
            "counted": total,
            "unique_votes": load["unique_votes"],
            "exact": total == load["unique_votes"],
        }

    async def _watch_drain(
        self, proc: ManagedProcess, broker: ManagedProcess, polls: Sequence[str], unique: int
    ) -> dict[str, Any]:
        """When the first vote of a backlog was counted, and the last; the processor's CPU
        and every process's cores between. The polls' totals are summed in one script call,
        so that watching 2,000 polls costs Redis about what watching one does."""
        redis = connect(self.single.target, timeout_s=10)
        tallies = [PollKeys(poll).tally for poll in polls]
        first: tuple[float, int, float, _CpuMeter] | None = None
        deadline = time.monotonic() + 600
        try:
            while time.monotonic() < deadline:
                total = int(await redis.eval(_SUM_TOTALS, len(tallies), *tallies))
                now = time.time()
                if first is None and total > 0:
                    first = (now, total, _cpu_s(proc.pid), self._meter(broker, [proc]))
                if first is not None and total >= unique:
                    return {
                        "first": first[0],
                        "first_total": first[1],
                        "done": now,
                        "total": total,
                        "cpu_s": _cpu_s(proc.pid) - first[2],
                        "cores": first[3].cores(now - first[0]),
                    }
                await asyncio.sleep(0.005)
        finally:
            await redis.aclose()
        raise TimeoutError(f"the backlog over {len(polls)} poll(s) was not counted in 600 s")

    def _load(
        self, broker: ManagedProcess, polls: Sequence[str], *, messages: int, devices: int
    ) -> subprocess.Popen[str]:
        """The load generator with the run's repeats and batches: device d votes in poll d
        mod len(polls)."""
        return _loadgen(
            broker.port,
            poll=",".join(polls),
            messages=messages,
            devices=devices,
            dup=self.config.dup_share,
            batch=self.config.batch_share,
        )

    def _meter(
        self,
        broker: ManagedProcess,
        procs: Sequence[ManagedProcess] = (),
        store: Store | None = None,
    ) -> _CpuMeter:
        return _CpuMeter(
            {
                "broker": [broker.pid],
                "redis": [node.pid for node in (store or self.single).nodes],
                "influxdb": [self.influx.pid],
                "processor": [p.pid for p in procs],
            }
        )

    def throughput(
        self,
        broker: ManagedProcess,
        *,
        messages: int,
        devices: int,
        n_processors: int = 1,
        store: Store | None = None,
        polls: int = 1,
        shards: int = 1,
    ) -> dict[str, Any]:
        """votebox flat out: from the first publish to the last vote committed. The votes go
        to ``polls`` polls (device d to poll d mod polls), or one poll over ``shards``."""
        store = store or self.single
        ids = self._polls("tput", store, polls=polls, shards=shards)
        procs = self.processors(broker, n_processors, share=n_processors > 1, store=store)
        cpu_before = [_cpu_s(p.pid) for p in procs]
        meter = self._meter(broker, procs, store)
        per_node = _CpuMeter({node.name: [node.pid] for node in store.nodes})
        script_before = asyncio.run(script_cpu_s(store.target))
        gen = self._load(broker, ids, messages=messages, devices=devices)
        load, done, total = asyncio.run(self._wait_total(gen, ids, store))
        elapsed = done - load["started"]
        cpu = sum(_cpu_s(p.pid) - b for p, b in zip(procs, cpu_before, strict=True))
        cores = meter.cores(elapsed, loadgen=load["cpu_s"])
        node_cores = per_node.cores(elapsed)
        script_s = asyncio.run(script_cpu_s(store.target)) - script_before
        rss = max(rss_mb(p.pid, peak=True) for p in procs)
        memory = (
            asyncio.run(self._dedup_bytes_per_device(ids[0], devices))
            if store is self.single and polls == shards == 1
            else None
        )
        # Let InfluxDB catch up before the next run, so that its writes do not compete with it.
        drained = asyncio.run(self._wait_points_drained(ids, store, shards))
        self.retire(procs)
        return {
            "store": store.name,
            "polls": len(ids),
            "shards": shards,
            "redis_us_per_vote": cores["redis"] * elapsed / load["votes"] * 1e6,
            # The tally script's own time (INFO commandstats), without the network, parsing,
            # AOF and the drainer's reads that the process's CPU above includes.
            "script_us_per_vote": script_s / load["votes"] * 1e6,
            "redis_node_cores": [node_cores[node.name] for node in store.nodes],
            "messages": messages,
            "devices": devices,
            "processors": n_processors,
            "votes": load["votes"],
            "unique_votes": load["unique_votes"],
            "counted": total,
            "exact": total == load["unique_votes"],
            "rate": messages / elapsed,
            "votes_rate": load["votes"] / elapsed,
            "processor_cpu_s": cpu,
            "cores": cores,
            "processor_cpu_share": cpu / elapsed,
            "processor_peak_rss_mb": rss,
            "redis_dedup_bytes_per_device": memory,
            "influx_drained_after_s": drained - done,
        }

    async def _wait_points_drained(
        self, polls: Sequence[str], store: Store, shards: int, timeout_s: float = 300
    ) -> float:
        redis = connect(store.target, timeout_s=10)
        queues = [keys.points for poll in polls for keys in shard_keys(poll, shards)]
        deadline = time.monotonic() + timeout_s
        try:
            for queue in queues:
                while await redis.xlen(queue):
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{queue} not written to InfluxDB in {timeout_s} s")
                    await asyncio.sleep(0.05)
            return time.time()
        finally:
            await redis.aclose()

    async def _wait_total(
        self,
        gen: subprocess.Popen[str],
        polls: Sequence[str],
        store: Store | None = None,
        timeout_s: float = 600,
    ) -> tuple[dict[str, Any], float, int]:
        redis = connect((store or self.single).target, timeout_s=10)
        load: dict[str, Any] | None = None
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                results = await read_results(redis, polls)
                total = sum(r.total for r in results.values())
                if load is None and gen.poll() is not None:
                    load = json.loads(gen.communicate()[0])
                if load is not None and total >= load["unique_votes"]:
                    return load, time.time(), total
                await asyncio.sleep(0.005)
        finally:
            await redis.aclose()
        raise TimeoutError(f"polls {polls}: the votes were not all counted in {timeout_s} s")

    async def _dedup_bytes_per_device(self, poll: str, devices: int) -> float:
        redis = Redis.from_url(self.redis.url)
        keys = PollKeys(poll)
        try:
            total = await redis.memory_usage(keys.devices) or 0
            sample = [
                f"{keys.window_prefix}dev-{d:05d}"
                for d in range(0, devices, max(1, devices // 100))
            ]
            sizes = [await redis.memory_usage(key) or 0 for key in sample]
            return total / devices + statistics.mean(sizes)
        finally:
            await redis.aclose()

    def polls_backlog(
        self, broker: ManagedProcess, *, messages: int, devices: int, polls: int
    ) -> dict[str, Any]:
        """A backlog of ``messages`` votes from ``devices`` devices over ``polls`` polls
        (device d votes in poll d mod polls), queued while the processor was away, then
        drained: votes/s from the first vote counted to the last, how long InfluxDB took to
        have the last point after that, and whether every poll's retained result is right."""
        ids = self._polls(f"spread{polls}", self.single, polls=polls)
        [proc] = self.processors(broker)
        proc.stop()  # its session stays: the votes queue in it
        gen = self._load(broker, ids, messages=messages, devices=devices)
        load = json.loads(gen.communicate()[0])
        proc.start(wait=False)
        drained = asyncio.run(self._watch_drain(proc, broker, ids, load["unique_votes"]))
        points_at = asyncio.run(self._wait_points_drained(ids, self.single, 1))
        retained = asyncio.run(self._retained_totals(broker, ids))
        counted = asyncio.run(self._totals(ids))
        self.retire([proc])
        votes = drained["total"] - drained["first_total"]
        elapsed = drained["done"] - drained["first"]
        return {
            "polls": polls,
            "messages": messages,
            "devices": devices,
            "votes_rate": votes / elapsed,
            "rate": messages * votes / load["unique_votes"] / elapsed,
            "processor_us_per_message": drained["cpu_s"]
            / (messages * votes / load["unique_votes"])
            * 1e6,
            "cores": drained["cores"],
            "influx_last_point_after_s": max(0.0, points_at - drained["done"]),
            "counted": drained["total"],
            "unique_votes": load["unique_votes"],
            "exact": drained["total"] == load["unique_votes"],
            "retained_right": retained == counted,
        }

    async def _totals(self, polls: Sequence[str]) -> dict[str, int]:
        redis = connect(self.single.target, timeout_s=10)
        try:
            return {poll: r.total for poll, r in (await read_results(redis, polls)).items()}
        finally:
            await redis.aclose()

    async def _retained_totals(
        self, broker: ManagedProcess, polls: Sequence[str], timeout_s: float = 30
    ) -> dict[str, int]:
        """Each poll's total as a new subscriber to ``polls/+/results`` sees it (retained),
        once every poll is there and its total stopped moving."""
        wanted = set(polls)
        seen: dict[str, int] = {}
        async with aiomqtt.Client(
            "127.0.0.1", broker.port, username="bench-watch", identifier=f"bench-ret-{self._runs}"
        ) as client:
            await client.subscribe("polls/+/results", qos=1)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    async for message in client.messages:
                        poll = str(message.topic).split("/")[1]
                        if poll in wanted and message.payload:
                            seen[poll] = int(json.loads(bytes(message.payload))["total"])
                        if len(seen) == len(wanted) and seen == await self._totals(polls):
                            break
        return seen

    def idle(self, *, polls: int, seconds: float) -> dict[str, Any]:
        """``polls`` open polls and nothing happening, in an emptied Redis (this run comes
        last): CPU of the processor (InfluxDB on) and of Redis over ``seconds``, after its
        start-up publish of every poll settled; and the CPU of one sweep (processor/changes.py,
        SWEEP_S) over all of them, timed here."""
        # From an empty Redis: the runs before leave thousands of polls with votes in their
        # last hour, whose series move on every minute: work that follows votes, not polls.
        flush = sync_redis.Redis(port=self.redis.port)
        flush.flushall()
        flush.close()
        ids = self._polls("idle", self.single, polls=polls)
        [proc] = self.processors(self.mosquitto)
        settle_until = time.monotonic() + 120
        last = _cpu_s(proc.pid)
        time.sleep(5)
        while time.monotonic() < settle_until:  # the start-up publish of every poll is done
            time.sleep(2)
            now = _cpu_s(proc.pid)
            if now - last < 0.02:
                break
            last = now
        meter = _CpuMeter({"processor": [proc.pid], "redis": [self.redis.pid]})
        time.sleep(seconds)
        cores = meter.cores(seconds)
        sweep = asyncio.run(self._sweep_cost())
        self.retire([proc])
        return {
            "polls": len(ids),
            "seconds": seconds,
            "processor_cores": cores["processor"],
            "redis_cores": cores["redis"],
            **sweep,
        }

    async def _sweep_cost(self) -> dict[str, float]:
        """The CPU of one drainer sweep and one full stats read, here and in Redis."""
        from processor.influx.drainer import InfluxDrainer
        from processor.influx.writers import make_writer
        from processor.stats import StatsReader

        redis = connect(self.single.target, timeout_s=30)
        redis_before = _cpu_s(self.redis.pid)
        here_before = time.process_time()
        try:
            writer = make_writer(InfluxTarget(url=self.influx.url, api="v1", database="bench"))
            drainer = InfluxDrainer(
                redis=redis, writer=writer, batch_max=5000, flush_interval_s=1, redis_timeout_s=30
            )
            await drainer.drain_once()  # its first round sweeps every poll
            await StatsReader(redis).read(now_ms=int(time.time() * 1000), silent_after_s=300)
            writer.close()
        finally:
            await redis.aclose()
        return {
            "sweep_here_cpu_s": time.process_time() - here_before,
            "sweep_redis_cpu_s": _cpu_s(self.redis.pid) - redis_before,
        }

    def latency(self, broker: ManagedProcess, rate: float) -> dict[str, Any]:
        """Publish-to-retained-result latency at a fixed rate, from per-vote timestamps."""
        poll = self._poll("lat")
        procs = self.processors(broker)
        messages = max(50, int(rate * self.config.latency_seconds))
        seen: list[tuple[float, int]] = []
        sampler = _CpuSampler(
            {
                "broker": [broker.pid],
                "redis": [self.redis.pid],
                "influxdb": [self.influx.pid],
                "processor": [p.pid for p in procs],
            }
        )

        async def watch_and_send() -> dict[str, Any]:
            url = MqttUrl.parse(f"mqtt://bench-watch@127.0.0.1:{broker.port}")

            async def watch() -> None:
                async for document in results_stream(url, poll):
                    seen.append((time.time(), document["total"]))
                    if document["total"] >= messages:
                        return

            async with asyncio.TaskGroup() as tg:
                watcher = tg.create_task(watch())
                await asyncio.sleep(0.5)
                gen = _loadgen(
                    broker.port,
                    poll=poll,
                    messages=messages,
                    devices=100,
                    rate=rate,
                    connections=1,
                    chunk=max(1, int(rate / 200)),
                )
                out = await asyncio.to_thread(lambda: gen.communicate()[0])
                async with asyncio.timeout(60):
                    await watcher
            return dict(json.loads(out))

        with sampler:
            load = asyncio.run(watch_and_send())
        self.retire(procs)
        latencies: list[tuple[float, float, float]] = []  # (ms, sent at, seen at)
        index = 0
        for sent_at, sent_so_far in load["send_log"]:
            while seen[index][1] < sent_so_far:
                index += 1
            latencies.append(((seen[index][0] - sent_at) * 1000, sent_at, seen[index][0]))
        q = statistics.quantiles([ms for ms, _, _ in latencies], n=100)
        # Who was busy while the slowest 1% waited, against the whole run.
        slow = [(s, e) for ms, s, e in latencies if ms >= q[98]]
        whole = sampler.cores_between(latencies[0][1], latencies[-1][2])
        during: dict[str, float] = {}
        for start, end in slow:
            for name, cores in sampler.cores_between(start, end).items():
                during[name] = during.get(name, 0.0) + cores / len(slow)
        return {
            "rate": rate,
            "messages": messages,
            "p50_ms": q[49],
            "p95_ms": q[94],
            "p99_ms": q[98],
            "cores_whole_run": {k: round(v, 3) for k, v in whole.items()},
            "cores_while_slowest_1pct_waited": {k: round(v, 3) for k, v in during.items()},
        }


def run_soak(seconds: float, rate: float, *, log: Any = print) -> dict[str, Any]:
    """One processor on Mosquitto at a fixed rate for ``seconds``; its RSS every 10 s."""
    config = BenchConfig()
    with tempfile.TemporaryDirectory(prefix="votebox-soak-") as tmp, ExitStack() as stack:
        bench = Bench(Path(tmp), stack, config)
        poll = bench._poll("soak")
        [proc] = bench.processors(bench.mosquitto)
        gen = _loadgen(
            bench.mosquitto.port,
            poll=poll,
            messages=int(seconds * rate),
            devices=config.devices,
            rate=rate,
            dup=config.dup_share,
            batch=config.batch_share,
        )
        samples: list[tuple[float, float]] = []
        started = time.monotonic()
        while gen.poll() is None:
            samples.append((time.monotonic() - started, rss_mb(proc.pid)))
            log(f"  {samples[-1][0]:5.0f} s  RSS {samples[-1][1]:.1f} MB")
            time.sleep(10)
        load, _, total = asyncio.run(bench._wait_total(gen, [poll]))
        peak = rss_mb(proc.pid, peak=True)
        proc.stop()
    return {
        "seconds": seconds,
        "rate": rate,
        "exact": total == load["unique_votes"],
        "rss_mb": samples,
        "peak_rss_mb": peak,
    }


def _machine() -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "mosquitto": subprocess.run(
            ["mosquitto", "-h"], capture_output=True, text=True, check=False
        ).stdout.splitlines()[0],
    }


def run_bench(config: BenchConfig, *, log: Any = print) -> dict[str, Any]:
    """Run every measurement; returns the figures (also printed as they come)."""
    with tempfile.TemporaryDirectory(prefix="votebox-bench-") as tmp, ExitStack() as stack:
        bench = Bench(Path(tmp), stack, config)
        c = config
        out: dict[str, Any] = {"machine": _machine(), "config": dataclasses.asdict(c)}
        log("mosquitto_sub baseline ...")
        out["mosquitto_baseline"] = bench.baseline(bench.mosquitto, c.messages)
        log(f"  {out['mosquitto_baseline']['rate']:,.0f} msg/s")
        log(f"votebox on mosquitto, {c.devices} devices ...")
        out["votebox"] = bench.throughput(bench.mosquitto, messages=c.messages, devices=c.devices)
        log(f"  {out['votebox']['rate']:,.0f} msg/s, exact={out['votebox']['exact']}")
        log("votebox on mosquitto, 10 devices ...")
        out["votebox_10_devices"] = bench.throughput(
            bench.mosquitto, messages=c.messages, devices=10
        )
        log(f"  {out['votebox_10_devices']['rate']:,.0f} msg/s")
        log("two votebox processors, shared subscription ...")
        out["votebox_two_processors"] = bench.throughput(
            bench.mosquitto, messages=c.messages, devices=c.devices, n_processors=2
        )
        log(
            f"  {out['votebox_two_processors']['rate']:,.0f} msg/s, "
            f"exact={out['votebox_two_processors']['exact']}"
        )
        log(f"a backlog of {c.messages} votes from 200 devices, drained ...")
        out["backlog"] = bench.backlog(bench.mosquitto, messages=c.messages, devices=200)
        log(
            f"  mosquitto_sub {out['backlog']['baseline_rate']:,.0f} msg/s, votebox "
            f"{out['backlog']['rate']:,.0f} msg/s, exact={out['backlog']['exact']}"
        )
        rate = max(100.0, out["votebox"]["rate"] / 5)
        log(f"latency at {rate:,.0f} msg/s ...")
        out["latency"] = bench.latency(bench.mosquitto, rate)
        log(f"  p50 {out['latency']['p50_ms']:.0f} ms, p99 {out['latency']['p99_ms']:.0f} ms")
        log("amqtt baseline ...")
        out["amqtt_baseline"] = bench.baseline(bench.amqtt, c.amqtt_messages)
        log(f"  {out['amqtt_baseline']['rate']:,.0f} msg/s")
        log("votebox on amqtt ...")
        out["votebox_amqtt"] = bench.throughput(
            bench.amqtt, messages=c.amqtt_messages, devices=min(c.devices, 1000)
        )
        log(f"  {out['votebox_amqtt']['rate']:,.0f} msg/s, exact={out['votebox_amqtt']['exact']}")
        for key, store, polls, shards in (
            ("redis_replica_wait", bench.replicated(), 1, 1),
            ("redis_single_3_polls", bench.single, 3, 1),
            ("redis_cluster_3_polls", bench.cluster(), 3, 1),
            ("redis_cluster_hot_poll", bench.cluster(), 1, 1),
            ("redis_cluster_hot_poll_3_shards", bench.cluster(), 1, 3),
        ):
            log(f"votebox on mosquitto, {store.name}, {polls} poll(s), {shards} shard(s) ...")
            out[key] = bench.throughput(
                bench.mosquitto,
                messages=c.messages,
                devices=c.devices,
                store=store,
                polls=polls,
                shards=shards,
            )
            log(f"  {out[key]['rate']:,.0f} msg/s, exact={out[key]['exact']}")
        # Last: their thousands of polls stay in Redis, and every later processor would
        # publish them all at its start.
        out |= _polls_runs(bench, c, log)
        return out


def _polls_runs(bench: Bench, c: BenchConfig, log: Any) -> dict[str, Any]:
    """The many-polls runs: the same backlog in one poll and over `spread_polls`, one after
    the other in the same run; then `idle_polls` open polls with nothing happening."""
    out: dict[str, Any] = {}
    for key, polls in (("polls_backlog_1", 1), ("polls_backlog_spread", c.spread_polls)):
        log(f"a backlog of {c.messages} votes from {c.devices} devices over {polls} poll(s) ...")
        out[key] = run = bench.polls_backlog(
            bench.mosquitto, messages=c.messages, devices=c.devices, polls=polls
        )
        log(
            f"  {run['votes_rate']:,.0f} votes/s, InfluxDB's last point "
            f"{run['influx_last_point_after_s']:.1f} s after the last vote, "
            f"exact={run['exact']}, retained results right={run['retained_right']}"
        )
    for key, polls in (("idle_1_poll", 1), ("idle_many_polls", c.idle_polls)):
        log(f"{polls} open poll(s), nothing happening, {c.idle_seconds:.0f} s ...")
        out[key] = run = bench.idle(polls=polls, seconds=c.idle_seconds)
        log(
            f"  processor {run['processor_cores']:.2%} of a core, Redis "
            f"{run['redis_cores']:.2%}; a sweep {run['sweep_here_cpu_s'] * 1000:.0f} ms here, "
            f"{run['sweep_redis_cpu_s'] * 1000:.0f} ms in Redis"
        )
    return out


def run_polls_bench(config: BenchConfig, *, log: Any = print) -> dict[str, Any]:
    """Only the many-polls runs (``votebox bench --polls``)."""
    with tempfile.TemporaryDirectory(prefix="votebox-bench-") as tmp, ExitStack() as stack:
        bench = Bench(Path(tmp), stack, config)
        out: dict[str, Any] = {"machine": _machine(), "config": dataclasses.asdict(config)}
        return out | _polls_runs(bench, config, log)


# The runs of `run_bench` on each kind of Redis (its second table).
REDIS_RUNS = (
    "redis_replica_wait",
    "redis_single_3_polls",
    "redis_cluster_3_polls",
    "redis_cluster_hot_poll",
    "redis_cluster_hot_poll_3_shards",
)
# The runs of `run_bench` that count votes, each checked exact.
COUNTING_RUNS = (
    "votebox",
    "backlog",
    "votebox_10_devices",
    "votebox_two_processors",
    "votebox_amqtt",
    *REDIS_RUNS,
    "polls_backlog_1",
    "polls_backlog_spread",
)


def table(result: dict[str, Any]) -> str:
    """The summary table of docs/benchmarks.md."""
    mb, ab = result["mosquitto_baseline"]["rate"], result["amqtt_baseline"]["rate"]
    rows = [
        ("mosquitto_sub baseline (mosquitto)", mb, mb),
        (f"votebox, {result['votebox']['devices']} devices", result["votebox"]["rate"], mb),
        ("votebox, 10 devices", result["votebox_10_devices"]["rate"], mb),
        ("votebox, two processors ($share)", result["votebox_two_processors"]["rate"], mb),
        ("mosquitto_sub baseline (amqtt)", ab, ab),
        ("votebox on amqtt", result["votebox_amqtt"]["rate"], ab),
    ]
    runs = [
        result["mosquitto_baseline"],
        result["votebox"],
        result["votebox_10_devices"],
        result["votebox_two_processors"],
        result["amqtt_baseline"],
        result["votebox_amqtt"],
    ]
    groups = ("broker", "processor", "subscriber", "loadgen", "redis", "influxdb", "all")
    lines = [
        "| run | messages/s | votebox / baseline | cores: " + " / ".join(groups) + " |",
        "|---|---:|---:|---|",
    ]
    for (name, rate, base), run in zip(rows, runs, strict=True):
        cores = run.get("cores", {})
        shown = " / ".join(f"{cores[g]:.2f}" if g in cores else "-" for g in groups)
        lines.append(f"| {name} | {rate:,.0f} | {rate / base:.0%} | {shown} |")
    backlog = result["backlog"]
    lines.append(
        f"| backlog drain, {backlog['messages']:,} votes queued: mosquitto_sub "
        f"{backlog['baseline_rate']:,.0f} / votebox | {backlog['rate']:,.0f} "
        f"| {backlog['ratio']:.0%} | processor {backlog['processor_us_per_message']:.1f} µs "
        f"per message |"
    )
    lat, v = result["latency"], result["votebox"]
    lines += [
        "",
        f"Latency publish -> retained result at {lat['rate']:,.0f} msg/s: "
        f"p50 {lat['p50_ms']:.0f} ms, "
        f"p95 {lat['p95_ms']:.0f} ms, p99 {lat['p99_ms']:.0f} ms.",
        "Cores used, whole latency run / while the slowest 1% of votes waited: "
        + ", ".join(
            f"{name} {lat['cores_whole_run'][name]:.2f} / "
            f"{lat['cores_while_slowest_1pct_waited'].get(name, 0):.2f}"
            for name in lat["cores_whole_run"]
        )
        + ".",
        f"Processor: {v['processor_cpu_share']:.0%} of a core, peak RSS "
        f"{v['processor_peak_rss_mb']:.0f} MB; Redis de-duplication state "
        f"{v['redis_dedup_bytes_per_device']:.0f} bytes per device and poll.",
        "",
        "| Redis | polls | shards | messages/s | votebox / baseline | Redis µs per vote "
        "(process / script) | cores of each Redis node | exact |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for key in ("votebox", *REDIS_RUNS):
        run = result[key]
        nodes = " / ".join(f"{c:.2f}" for c in run["redis_node_cores"])
        lines.append(
            f"| {run['store']} | {run['polls']} | {run['shards']} | {run['rate']:,.0f} "
            f"| {run['rate'] / mb:.0%} | {run['redis_us_per_vote']:.1f} / "
            f"{run['script_us_per_vote']:.1f} | {nodes} "
            f"| {run['exact']} |"
        )
    return "\n".join(lines + ["", polls_table(result)])


def polls_table(result: dict[str, Any]) -> str:
    """The many-polls table of docs/benchmarks.md."""
    one, spread = result["polls_backlog_1"], result["polls_backlog_spread"]
    lines = [
        "| backlog drained | votes/s | / one poll | processor µs per message "
        "| InfluxDB's last point after the last vote | exact | retained results right |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for run in (one, spread):
        lines.append(
            f"| {run['messages']:,} messages, {run['devices']:,} devices, {run['polls']:,} "
            f"poll(s) | {run['votes_rate']:,.0f} | {run['votes_rate'] / one['votes_rate']:.0%} "
            f"| {run['processor_us_per_message']:.1f} | {run['influx_last_point_after_s']:.1f} s "
            f"| {run['exact']} | {run['retained_right']} |"
        )
    lines += [
        "",
        "| open polls, nothing happening | processor | Redis | one sweep: processor / Redis |",
        "|---|---:|---:|---:|",
    ]
    for key in ("idle_1_poll", "idle_many_polls"):
        run = result[key]
        lines.append(
            f"| {run['polls']:,} for {run['seconds']:.0f} s | {run['processor_cores']:.2%} "
            f"| {run['redis_cores']:.2%} | {run['sweep_here_cpu_s'] * 1000:.0f} ms / "
            f"{run['sweep_redis_cpu_s'] * 1000:.0f} ms |"
        )
    return "\n".join(lines)


def main(
    *,
    smoke: bool,
    out: Path,
    soak_s: float = 0,
    soak_rate: float = 5000,
    polls: bool = False,
    chain: bool = False,
) -> int:
    """Run the benchmark (or only the soak, the many-polls runs or the chain's), print the
    table, write the JSON."""
    if chain:
        with tempfile.TemporaryDirectory(prefix="votebox-bench-chain-") as folder:
            costs = run_chain_bench(Path(folder), smoke=smoke)
        costs["machine"] = _machine()
        out.write_text(json.dumps(costs, indent=2))
        print()
        print(f"{costs['machine']['cpu']}, {costs['machine']['cores']} cores")
        print(chain_table(costs))
        print(f"\nfigures written to {out}")
        return 0
    if polls:
        result = run_polls_bench(BenchConfig.smoke() if smoke else BenchConfig())
        out.write_text(json.dumps(result, indent=2))
        print()
        print(polls_table(result))
        print(f"\nfigures written to {out}")
        runs = [result[k] for k in COUNTING_RUNS[-2:]]
        return 0 if all(run["exact"] and run["retained_right"] for run in runs) else 1
    if soak_s:
        soak = run_soak(soak_s, soak_rate)
        out.write_text(json.dumps(soak, indent=2))
        rss = [mb for _, mb in soak["rss_mb"]]
        print(
            f"\nsoak: {soak_s:.0f} s at {soak_rate:,.0f} msg/s, RSS {rss[0]:.0f} -> {rss[-1]:.0f} "
            f"MB (peak {soak['peak_rss_mb']:.0f} MB), exact={soak['exact']}"
        )
        return 0 if soak["exact"] else 1
    result = run_bench(BenchConfig.smoke() if smoke else BenchConfig())
    # The chain's cost (bench/chain.py), beside the figures it adds to.
    with tempfile.TemporaryDirectory(prefix="votebox-bench-chain-") as folder:
        result["chain"] = run_chain_bench(Path(folder), smoke=smoke)
    out.write_text(json.dumps(result, indent=2))
    print()
    print(table(result))
    print(chain_table(result["chain"]))
    print(f"\nfigures written to {out}")
    exact = all(result[k]["exact"] for k in COUNTING_RUNS)
    return 0 if exact else 1
