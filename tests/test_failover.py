"""Redis with a replica behind Sentinel: a primary lost mid-stream loses no acknowledged vote.

The processor finds the primary through three Sentinels and, with VOTEBOX_REDIS_REPLICAS=1,
acknowledges a batch only once WAIT says a replica has it. There are two replicas, as
docs/operations.md advises for REPLICAS=1: when the primary is SIGKILLed while votes flow,
Sentinel promotes one and points the other at it, so there is a replica to WAIT for again
without the dead node. (With one replica, the promoted one has none until the old primary is
back, and Sentinel takes some 10 s to take it in: nothing is acknowledged meanwhile.)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.services import HOST, ManagedProcess, redis_sentinels, redis_server
from processor.codec import Vote
from processor.config import RedisTarget
from processor.errors import StoreUnavailable
from processor.poll import Poll
from processor.poll_store import create_poll, read_results
from processor.reasons import Fate
from processor.store import connect, open_redis
from processor.tally import Tally
from tests.conftest import eventually, redis_command, unique_id
from tests.fleet import Fleet
from tests.test_audit import audits_clean
from tests.test_cli import votebox
from tests.test_faults import resend_until_acked, send, settled_total
from tests.test_influx import influx_env
from tests.test_operations import readyz

pytestmark = pytest.mark.e2e

SERVICE = "votebox"


@dataclass(frozen=True)
class Replicated:
    primary: ManagedProcess
    replicas: tuple[ManagedProcess, ManagedProcess]
    sentinels: list[ManagedProcess]

    def target(self, replicas: int = 1) -> RedisTarget:
        return RedisTarget(
            url=f"redis://{HOST}:{self.primary.port}/0",
            sentinels=tuple((HOST, s.port) for s in self.sentinels),
            service=SERVICE,
            replicas=replicas,
        )

    def env(self) -> dict[str, str]:
        return {
            "VOTEBOX_REDIS_URL": f"redis://{HOST}:{self.primary.port}/0",
            "VOTEBOX_REDIS_SENTINELS": ",".join(f"{HOST}:{s.port}" for s in self.sentinels),
            "VOTEBOX_REDIS_SERVICE": SERVICE,
            "VOTEBOX_REDIS_REPLICAS": "1",
        }


async def _watching(replicated: Replicated) -> bool:
    """The replicas are in sync, and every Sentinel sees them and the two other Sentinels: a
    failover can happen."""
    for replica in replicated.replicas:
        if not await _in_sync(replica):
            return False
    for sentinel in replicated.sentinels:
        fields = await redis_command(sentinel.port, "SENTINEL", "MASTER", SERVICE)
        assert isinstance(fields, dict)  # redis-py parses the reply into a mapping
        if int(fields[b"num-slaves"]) < 2 or int(fields[b"num-other-sentinels"]) < 2:
            return False
    return True


async def _primary_port(replicated: Replicated) -> int:
    reply = await redis_command(
        replicated.sentinels[0].port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE
    )
    assert isinstance(reply, list | tuple), reply
    return int(reply[1])


@pytest.fixture
def replicated(tmp_path: Path) -> Iterator[Replicated]:
    with (
        redis_server(tmp_path / "primary") as primary,
        redis_server(tmp_path / "replica-1", replica_of=primary.port) as one,
        redis_server(tmp_path / "replica-2", replica_of=primary.port) as two,
        redis_sentinels(tmp_path / "sentinels", primary_port=primary.port, service=SERVICE) as s,
    ):
        yield Replicated(primary, (one, two), s)


async def test_a_primary_lost_mid_stream_loses_no_acknowledged_vote(
    mosquitto_proc: ManagedProcess,
    influx_proc: ManagedProcess,
    replicated: Replicated,
    spawn_processor: Callable[..., ManagedProcess],
    request: pytest.FixtureRequest,
) -> None:
    await eventually(lambda: _watching(replicated), timeout_s=30)
    poll = Poll(id=unique_id(request), labels=("red", "green", "blue"))
    # The operator's command finds the primary through the Sentinels and WAITs for a replica.
    created = await asyncio.to_thread(
        votebox,
        *("poll", "create", poll.id, "--option", "red", "--option", "green"),
        *("--option", "blue"),
        env=os.environ | replicated.env(),
    )
    assert created.returncode == 0, created.stderr
    influx = influx_env(influx_proc, poll.id)
    proc = spawn_processor(mosquitto_proc, **replicated.env(), **influx)
    reader = connect(replicated.target(), timeout_s=2, retry_once=True)
    try:
        with Fleet(mosquitto_proc, poll.id, 10) as fleet:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(send(fleet, poll, 3000))
                # Killed with some votes acknowledged and many not yet committed.
                await eventually(lambda: fleet.codes()[Fate.ACCEPTED] >= 300, timeout_s=60)
                replicated.primary.kill()
                acked_before = fleet.codes()[Fate.ACCEPTED]
            await eventually(lambda: _promoted(replicated), timeout_s=30)
            promoted_at = asyncio.get_running_loop().time()
            async with asyncio.TaskGroup() as tg:
                resending = tg.create_task(resend_until_acked(fleet, every_s=1, timeout_s=120))
                left_s = promoted_at + 15 - asyncio.get_running_loop().time()
                await eventually(lambda: readyz(proc)[0] == 200, timeout_s=left_s)
                await resending
            assert 0 < acked_before < 3000
            assert await settled_total(reader, poll, 3000) == 3000
    finally:
        await reader.aclose()
    # The chain was WAITed for with the counts: the promoted replica holds it whole.
    said = await asyncio.to_thread(audits_clean, poll.id, replicated.env() | influx)
    assert "OK: 3000 entries" in said


async def _promoted(replicated: Replicated) -> bool:
    return await _primary_port(replicated) in {r.port for r in replicated.replicas}


async def _in_sync(replica: ManagedProcess) -> bool:
    info = await redis_command(replica.port, "INFO", "replication")
    assert isinstance(info, dict)  # parsed by redis-py
    return info.get("master_link_status") == "up"


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[tuple[ManagedProcess, ManagedProcess]]:
    """A primary and its one replica, in sync (no Sentinel)."""
    with (
        redis_server(tmp_path / "primary") as primary,
        redis_server(tmp_path / "replica", replica_of=primary.port) as replica,
    ):
        await eventually(lambda: _in_sync(replica), timeout_s=30)
        yield primary, replica


@contextlib.contextmanager
def _stopped(process: ManagedProcess) -> Iterator[None]:
    """A process that stops answering (SIGSTOP), resumed whatever happens."""
    process.signal(signal.SIGSTOP)
    try:
        yield
    finally:
        process.signal(signal.SIGCONT)


async def test_a_batch_no_replica_confirms_is_not_acknowledged_and_its_retry_counts_once(
    pair: tuple[ManagedProcess, ManagedProcess], request: pytest.FixtureRequest
) -> None:
    primary, replica = pair
    redis = connect(primary.url, timeout_s=5)
    try:
        poll = Poll(id=unique_id(request), labels=("a", "b"))
        await create_poll(redis, poll)
        tally = Tally(redis, timeout_s=5, replicas=1, replica_timeout_ms=200)
        vote = [Vote(poll.id, "k1", choice=1, seq=1)]
        with _stopped(replica), pytest.raises(StoreUnavailable, match="only 0 of 1 Redis"):
            await tally.commit(vote, now_ms=1, token="batch-1")
        # The primary holds the batch, unacknowledged. Retried as the processor retries it,
        # until the replica confirms: answered as the first try would have been, counted once.
        codes: list[int] = []

        async def retried() -> bool:
            nonlocal codes
            with contextlib.suppress(StoreUnavailable):
                codes = (await tally.commit(vote, now_ms=2, token="batch-1")).codes
            return bool(codes)

        await eventually(retried, timeout_s=30, every_s=0.1)
        assert codes == [int(Fate.ACCEPTED)]
        assert (await read_results(redis, [poll.id]))[poll.id].counts == (0, 1)
    finally:
        await redis.aclose()


async def test_a_command_whose_writes_no_replica_confirms_says_so(
    pair: tuple[ManagedProcess, ManagedProcess], request: pytest.FixtureRequest
) -> None:
    primary, replica = pair
    target = RedisTarget(url=primary.url, replicas=1, replica_timeout_ms=200)
    # The poll is on the primary; the command fails rather than say it is safe.
    with _stopped(replica), pytest.raises(StoreUnavailable, match="only 0 of 1 Redis"):
        async with open_redis(target, timeout_s=5) as redis:
            await create_poll(redis, Poll(id=unique_id(request), labels=("a", "b")))
