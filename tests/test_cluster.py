"""votebox on a Redis Cluster (three primaries, three replicas, redis-cli --cluster create):
polls whose keys live on different primaries, made and closed and deleted by the commands,
votes counted exactly through the processor, retained results and InfluxDB points as on one
node."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from redis.asyncio import RedisCluster

from bench.cluster import hot_poll_on_distinct_primaries, polls_on_distinct_primaries
from harness.services import ManagedProcess, redis_cluster
from processor.commands.watch import wait_for_results
from processor.config import RedisTarget
from processor.keys import PollKeys, shard_keys, shard_of
from processor.poll_store import list_polls, read_results
from processor.reasons import Fate
from processor.store import connect
from tests.conftest import eventually, redis_command, unique_id
from tests.fleet import Fleet, results_url
from tests.test_audit import audits_clean
from tests.test_cli import votebox
from tests.test_faults import resend_until_acked
from tests.test_influx import influx_env, point_count

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[ManagedProcess]]:
    with redis_cluster(tmp_path_factory.mktemp("cluster")) as nodes:
        yield nodes


def _env(cluster: list[ManagedProcess]) -> dict[str, str]:
    return {"VOTEBOX_REDIS_URL": cluster[0].url, "VOTEBOX_REDIS_CLUSTER": "1"}


async def _create(ids: list[str], env: dict[str, str]) -> None:
    """``votebox poll create`` each, as an operator does, on the cluster."""
    for poll_id in ids:
        args = ("poll", "create", poll_id, "--option", "a", "--option", "b")
        made = await asyncio.to_thread(votebox, *args, env=os.environ | env)
        assert made.returncode == 0, made.stderr


async def _on_three_primaries(cluster: list[ManagedProcess], prefix: str) -> list[str]:
    """Three poll ids whose keys live on three different primaries."""
    return await polls_on_distinct_primaries(RedisTarget(cluster[0].url, cluster=True), prefix)


async def test_polls_on_three_primaries_count_exactly_through_the_processor(
    cluster: list[ManagedProcess],
    mosquitto_proc: ManagedProcess,
    influx_proc: ManagedProcess,
    spawn_processor: Callable[..., ManagedProcess],
    request: pytest.FixtureRequest,
) -> None:
    env = _env(cluster)
    ids = await _on_three_primaries(cluster, unique_id(request)[:40])
    await _create(ids, env)
    database = unique_id(request)
    spawn_processor(mosquitto_proc, **env, **influx_env(influx_proc, database))
    redis = connect(RedisTarget(url=cluster[0].url, cluster=True), timeout_s=5)
    try:
        assert set(ids) <= set(await list_polls(redis))
        with Fleet(mosquitto_proc, "k", 6) as fleet:

            def send() -> None:
                last: dict[str, str] = {}
                for i in range(600):
                    kiosk = fleet.kiosks[i % 6]
                    kiosk.vote(ids[i % 3], i % 2)
                    last[kiosk.device] = ids[i % 3]
                for kiosk in fleet.kiosks:  # each re-sends its last vote: counted once
                    kiosk.vote(last[kiosk.device], 0, seq=kiosk.seq)

            await asyncio.to_thread(send)
            await eventually(lambda: fleet.unacked() == 0, timeout_s=60)
            assert fleet.codes() == {int(Fate.ACCEPTED): 600, int(Fate.DUPLICATE): 6}
        results = await read_results(redis, ids)
        assert [results[p].total for p in ids] == [200, 200, 200]
        for poll_id in ids:
            await wait_for_results(
                results_url(mosquitto_proc), poll_id, lambda d: d["total"] == 200, timeout_s=30
            )
            await eventually(
                lambda p=poll_id: point_count(influx_proc, database, p) == 200, timeout_s=60
            )
        closed = await asyncio.to_thread(votebox, "poll", "close", ids[1], env=os.environ | env)
        assert closed.returncode == 0, closed.stderr
        await wait_for_results(
            results_url(mosquitto_proc), ids[1], lambda d: d["state"] == "closed", timeout_s=30
        )
        gone = await asyncio.to_thread(
            votebox, "poll", "delete", ids[2], "--yes", env=os.environ | env
        )
        assert gone.returncode == 0, gone.stderr
        assert ids[2] not in await list_polls(redis)
        assert not await redis.exists(PollKeys(ids[2]).tally)
        devices = await asyncio.to_thread(votebox, "devices", "--json", env=os.environ | env)
        assert devices.returncode == 0 and devices.stdout.count("\n") >= 6, devices.stderr
    finally:
        await redis.aclose()


async def test_a_hot_poll_over_three_shards_on_three_primaries_counts_exactly(
    cluster: list[ManagedProcess],
    mosquitto_proc: ManagedProcess,
    influx_proc: ManagedProcess,
    spawn_processor: Callable[..., ManagedProcess],
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    """``votebox poll create --shards 3``: one poll whose votes three primaries count, each
    device on its shard; the retained result, the InfluxDB points and ``votebox recount``
    see the sums, exact after the devices' re-sends."""
    env = _env(cluster)
    target = RedisTarget(cluster[0].url, cluster=True)
    poll_id = await hot_poll_on_distinct_primaries(target, unique_id(request)[:40], 3)
    args = ("poll", "create", poll_id, "--option", "a", "--option", "b", "--shards", "3")
    made = await asyncio.to_thread(votebox, *args, env=os.environ | env)
    assert made.returncode == 0 and "spread over 3 shards" in made.stdout, made.stderr
    database = unique_id(request)
    influx = influx_env(influx_proc, database)
    spawn_processor(mosquitto_proc, **env, **influx)
    redis = connect(target, timeout_s=5)
    try:
        with Fleet(mosquitto_proc, "k", 12) as fleet:
            assert {shard_of(kiosk.device, 3) for kiosk in fleet.kiosks} == {0, 1, 2}

            def send() -> None:
                for i in range(600):
                    fleet.kiosks[i % 12].vote(poll_id, i % 2)
                for kiosk in fleet.kiosks:  # each re-sends its last vote: counted once
                    kiosk.vote(poll_id, 1, seq=kiosk.seq)

            await asyncio.to_thread(send)
            await eventually(lambda: fleet.unacked() == 0, timeout_s=60)
            assert fleet.codes() == {int(Fate.ACCEPTED): 600, int(Fate.DUPLICATE): 12}
        results = (await read_results(redis, [poll_id]))[poll_id]
        assert (results.total, results.counts) == (600, (300, 300))
        for keys in shard_keys(poll_id, 3):  # each shard counted its own devices' share
            assert int(await redis.hget(keys.tally, "total") or 0) == 50 * sum(
                1 for kiosk in fleet.kiosks if shard_of(kiosk.device, 3) == keys.shard
            )
        published = await wait_for_results(
            results_url(mosquitto_proc), poll_id, lambda d: d["total"] == 600, timeout_s=30
        )
        await eventually(lambda: point_count(influx_proc, database, poll_id) == 600, timeout_s=60)
        recounted = await asyncio.to_thread(
            votebox, "recount", poll_id, env=os.environ | env | influx
        )
        assert f"recount of {poll_id}: MATCH (redis total 600" in recounted.stdout, (
            recounted.stdout + recounted.stderr
        )
        # A chain per shard, each on its primary; the retained result witnesses all three.
        assert len(published["chain"]) == 3
        result = tmp_path / "result.json"
        result.write_text(json.dumps(published))
        said = await asyncio.to_thread(audits_clean, poll_id, env | influx, "--result", str(result))
        assert "OK: 600 entries in 3 shards" in said
        gone = await asyncio.to_thread(
            votebox, "poll", "delete", poll_id, "--yes", env=os.environ | env
        )
        assert gone.returncode == 0, gone.stderr
        for keys in shard_keys(poll_id, 3):
            assert not await redis.exists(keys.tally, keys.definition, keys.devices)
    finally:
        await redis.aclose()


async def _replicas_caught_up(node: ManagedProcess) -> bool:
    client = RedisCluster.from_url(node.url)
    try:
        await client.initialize()
        primary = client.get_node(host="127.0.0.1", port=node.port)
        assert primary is not None
        info = await client.info("replication", target_nodes=primary)
        offset = info["master_repl_offset"]
        return all(info[k]["offset"] == offset for k in info if k.startswith("slave"))
    finally:
        await client.aclose()


async def test_a_primary_sigkilled_is_replaced_and_the_processor_counts_on(
    tmp_path: Path,
    mosquitto_proc: ManagedProcess,
    spawn_processor: Callable[..., ManagedProcess],
    request: pytest.FixtureRequest,
) -> None:
    """The loss of a primary holds the votes for its polls, unacknowledged, until the cluster
    has promoted its replica (cluster-node-timeout 2 s here), then counts them once. Without
    VOTEBOX_REDIS_REPLICAS a vote acknowledged in the instant before the kill may not be on
    the replica yet, so the kill falls between batches; the test below asks for replicas."""
    with redis_cluster(tmp_path / "cluster") as nodes:
        env = _env(nodes)
        ids = await _on_three_primaries(nodes, unique_id(request)[:40])
        redis = connect(RedisTarget(url=nodes[0].url, cluster=True), timeout_s=5)
        try:
            await _create(ids, env)
            proc = spawn_processor(mosquitto_proc, **env)
            owner = await _owner(nodes[0], ids[0])
            victim = next(n for n in nodes if n.port == owner)
            with Fleet(mosquitto_proc, "k", 6) as fleet:

                def send(n: int) -> None:
                    for i in range(n):
                        fleet.kiosks[i % 6].vote(ids[i % 3], i % 2)

                await asyncio.to_thread(send, 300)
                await eventually(lambda: fleet.unacked() == 0, timeout_s=60)
                await eventually(lambda: _replicas_caught_up(victim), timeout_s=10)
                victim.kill()
                await asyncio.to_thread(send, 300)  # a third of them to the lost primary
                await wait_log_text(proc, "none acked")
                await eventually(lambda: fleet.unacked() == 0, timeout_s=90)
            results = await read_results(redis, ids)
            assert [results[p].total for p in ids] == [200, 200, 200]
            assert fleet.codes() == {int(Fate.ACCEPTED): 600}
        finally:
            await redis.aclose()


async def _owner(node: ManagedProcess, poll_id: str) -> int:
    client = RedisCluster.from_url(node.url)
    try:
        await client.initialize()
        owner = client.get_node_from_key(PollKeys(poll_id).definition)
        assert owner is not None
        return int(owner.port)
    finally:
        await client.aclose()


async def wait_log_text(proc: ManagedProcess, text: str) -> None:
    await eventually(lambda: text in proc.log_text(since_start=True), timeout_s=30)


async def test_a_polls_slot_moved_to_another_primary_mid_stream_counts_exactly(
    tmp_path: Path,
    mosquitto_proc: ManagedProcess,
    spawn_processor: Callable[..., ManagedProcess],
    request: pytest.FixtureRequest,
) -> None:
    """redis-cli --cluster reshard moves every slot of the poll's primary, its keys with them,
    while votes flow: the client follows ASK and MOVED, a script on a slot half moved is
    refused (TRYAGAIN: the store is away, the batch is retried), and every vote counts once."""
    with redis_cluster(tmp_path / "cluster") as nodes:
        env = _env(nodes)
        (poll_id, *_) = await _on_three_primaries(nodes, unique_id(request)[:40])
        await _create([poll_id], env)
        spawn_processor(mosquitto_proc, **env)
        owner = await _owner(nodes[0], poll_id)
        source = next(n for n in nodes if n.port == owner)
        primaries = [n for n in nodes if n is not source and await _is_primary(n)]
        target = primaries[0]
        redis = connect(RedisTarget(url=nodes[0].url, cluster=True), timeout_s=5)
        try:
            with Fleet(mosquitto_proc, "k", 20) as fleet:
                done = asyncio.Event()
                sent = 0

                async def keep_voting() -> None:
                    nonlocal sent
                    while not done.is_set():  # throughout the move, whichever slot is moving
                        await asyncio.to_thread(fleet.cast, poll_id, 60, lambda i: i % 2)
                        sent += 60
                        # Paced: a kiosk's re-sends stay inside its window of 4,096 seqs
                        # (docs/protocol.md), as a real kiosk's would.
                        await asyncio.sleep(0.1)

                async with asyncio.TaskGroup() as tg:
                    tg.create_task(keep_voting())
                    await eventually(lambda: fleet.codes()[Fate.ACCEPTED] >= 200, timeout_s=60)
                    moved = await asyncio.to_thread(_reshard_all, source, target)
                    done.set()
                assert moved.returncode == 0, moved.stdout[-2000:] + moved.stderr[-2000:]
                await resend_until_acked(fleet, timeout_s=120)
            assert await _owner(nodes[0], poll_id) == target.port  # it did move
            assert (await read_results(redis, [poll_id]))[poll_id].total == sent
            assert set(fleet.codes()) <= {int(Fate.ACCEPTED), int(Fate.DUPLICATE)}
        finally:
            await redis.aclose()


async def _is_primary(node: ManagedProcess) -> bool:
    role = await redis_command(node.port, "ROLE")
    return isinstance(role, list) and role[0] in (b"master", "master")


def _reshard_all(
    source: ManagedProcess, target: ManagedProcess
) -> subprocess.CompletedProcess[str]:
    def my_id(node: ManagedProcess) -> str:
        return subprocess.run(
            ["redis-cli", "-p", str(node.port), "CLUSTER", "MYID"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()

    return subprocess.run(
        ["redis-cli", "--cluster", "reshard", f"127.0.0.1:{source.port}"]
        + ["--cluster-from", my_id(source), "--cluster-to", my_id(target)]
        + ["--cluster-slots", "16384", "--cluster-yes", "--cluster-pipeline", "100"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


async def test_with_replicas_asked_a_primary_lost_mid_stream_loses_no_acknowledged_vote(
    tmp_path: Path,
    mosquitto_proc: ManagedProcess,
    spawn_processor: Callable[..., ManagedProcess],
    request: pytest.FixtureRequest,
) -> None:
    """VOTEBOX_REDIS_REPLICAS=1 on a cluster of three primaries with two replicas each: every
    batch waits until a replica of each primary it wrote to has it. A primary is SIGKILLed
    while votes flow; the cluster promotes one of its replicas and points the other at it;
    after the devices' re-sends every vote counts once, none acknowledged is missing."""
    with redis_cluster(tmp_path / "cluster", replicas=2) as nodes:
        env = _env(nodes) | {"VOTEBOX_REDIS_REPLICAS": "1"}
        (poll_id, *_) = await _on_three_primaries(nodes, unique_id(request)[:40])
        await _create([poll_id], env)  # and WAITed for
        spawn_processor(mosquitto_proc, **env)
        owner = await _owner(nodes[0], poll_id)
        victim = next(n for n in nodes if n.port == owner)
        redis = connect(RedisTarget(url=nodes[1].url, cluster=True), timeout_s=5)
        try:
            with Fleet(mosquitto_proc, "k", 10) as fleet:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(asyncio.to_thread(fleet.cast, poll_id, 3000, lambda i: i % 2))
                    await eventually(lambda: fleet.codes()[Fate.ACCEPTED] >= 300, timeout_s=60)
                    victim.kill()
                    acked_before = fleet.codes()[Fate.ACCEPTED]
                await resend_until_acked(fleet, every_s=2, timeout_s=120)
            assert 0 < acked_before < 3000
            assert await _owner(nodes[1], poll_id) != owner  # a replica took over
            assert (await read_results(redis, [poll_id]))[poll_id].total == 3000
        finally:
            await redis.aclose()
