"""Thousands of polls at once: every poll exact, and a poll nothing happens to costs nothing.

The everyday deployment is many quiet polls (one per site, customer or room), not one hot one
(docs/benchmarks.md, Many polls). These run the pipeline on real servers with a poll set of
1,000 polls, through a processor SIGKILLed mid-stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import aiomqtt
import pytest
from redis.asyncio import Redis

from harness.services import ManagedProcess, redis_server
from processor.changes import ChangeFeed
from processor.influx.drainer import InfluxDrainer
from processor.influx.writers import make_writer
from processor.keys import CHANGES, UNATTRIBUTED_FATES, PollKeys
from processor.poll import Poll
from processor.poll_store import create_poll, read_results
from processor.reasons import Fate, Reason
from tests.conftest import eventually, unique_id
from tests.fleet import Fleet
from tests.test_influx import influx_env, influx_query, v1_target

pytestmark = pytest.mark.e2e

POLLS = 1000


@pytest.fixture(scope="module")
def own_redis_proc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedProcess]:
    """A Redis of this module's own: its thousands of polls would otherwise be published by
    every later test's processor at its start."""
    with redis_server(tmp_path_factory.mktemp("redis-many-polls")) as proc:
        yield proc


@pytest.fixture
async def own_redis(own_redis_proc: ManagedProcess) -> AsyncIterator[Redis]:
    client = Redis.from_url(own_redis_proc.url)
    try:
        yield client
    finally:
        await client.aclose()


def _metrics_text(proc: ManagedProcess) -> str:
    with urllib.request.urlopen(f"{proc.url}/metrics", timeout=10) as reply:
        return str(reply.read().decode())


async def _make_polls(redis: Redis, prefix: str, n: int) -> list[str]:
    ids = [f"{prefix}-{k:04d}" for k in range(n)]
    for poll_id in ids:
        await create_poll(redis, Poll(id=poll_id, labels=("a", "b", "c")))
    return ids


async def _retained_totals(broker: ManagedProcess, polls: list[str]) -> dict[str, int]:
    """Each poll's total as a new dashboard sees it: the retained ``polls/+/results``."""
    wanted, seen = set(polls), {}
    async with aiomqtt.Client(
        "127.0.0.1", broker.port, username="dashboard", identifier=f"{polls[0]}-watch"
    ) as client:
        await client.subscribe("polls/+/results", qos=1)
        async with asyncio.timeout(30):
            async for message in client.messages:
                poll = message.topic.value.split("/")[1]
                if poll in wanted and isinstance(message.payload, bytes) and message.payload:
                    seen[poll] = int(json.loads(message.payload)["total"])
                if len(seen) == len(wanted):
                    break
    return seen


@pytest.mark.timeout(300)
async def test_a_thousand_polls_stay_exact_in_redis_retained_results_and_influxdb_through_a_sigkill(
    mosquitto_proc: ManagedProcess,
    influx_proc: ManagedProcess,
    own_redis_proc: ManagedProcess,
    own_redis: Redis,
    request: pytest.FixtureRequest,
    spawn_processor: Callable[..., ManagedProcess],
) -> None:
    redis = own_redis
    prefix = unique_id(request)[:40]
    database = prefix.replace("-", "_")
    polls = await _make_polls(redis, prefix, POLLS)
    proc = spawn_processor(
        mosquitto_proc, **influx_env(influx_proc, database), VOTEBOX_REDIS_URL=own_redis_proc.url
    )
    cast: Counter[str] = Counter()
    with Fleet(mosquitto_proc, f"{prefix}-k", 20) as fleet:

        def send(start: int, n: int) -> None:
            # Vote i goes to poll i mod 1000, from kiosk i mod 20: every poll takes votes from
            # several kiosks, and every batch spreads over hundreds of polls.
            for i in range(start, start + n):
                poll = polls[i % POLLS]
                fleet.kiosks[i % len(fleet.kiosks)].vote(poll, i % 3)
                cast[poll] += 1

        await asyncio.to_thread(send, 0, 2500)
        proc.kill()  # mid-stream: some batches committed and not acked, some not committed
        await asyncio.to_thread(send, 2500, 1500)  # queued in the processor's session
        proc.start()
        await asyncio.to_thread(send, 4000, 2000)

        await asyncio.sleep(3)  # the acks of what just went out

        async def settled() -> bool:
            if fleet.unacked():
                await asyncio.to_thread(fleet.resend_unacked)  # what kiosks do: same seqs
                return False
            return True

        await eventually(settled, timeout_s=120, every_s=2.0)
    assert sum(cast.values()) == 6000 and len(cast) == POLLS
    counted = {poll: r.total for poll, r in (await read_results(redis, polls)).items()}
    assert counted == dict(cast)

    # The retained results follow Redis within moments (coalesced, at the broker's pace: after
    # the restart every poll is published afresh); a dashboard's view must reach them.
    async def retained_exact() -> bool:
        return await _retained_totals(mosquitto_proc, polls) == dict(cast)

    await eventually(retained_exact, timeout_s=60, every_s=1.0)

    def points_per_poll() -> dict[str, int]:
        series = influx_query(
            influx_proc,
            database,
            f"SELECT sum(value) FROM vote WHERE poll =~ /^{prefix}-/ GROUP BY poll",
        )
        return {s["tags"]["poll"]: int(s["values"][0][1]) for s in series}

    await eventually(lambda: points_per_poll() == dict(cast), timeout_s=60, every_s=0.5)

    # Every stream ends empty. An entry the killed drainer wrote and had not yet deleted is
    # taken over once idle (CLAIM_IDLE_MS, 30 s), written again identically, then deleted.
    async def streams_empty() -> bool:
        async with redis.pipeline(transaction=False) as pipe:
            for poll in polls:
                pipe.xlen(PollKeys(poll).points)
            return not any(await pipe.execute())

    await eventually(streams_empty, timeout_s=90, every_s=1.0)
    assert points_per_poll() == dict(cast)  # the entry written again overwrote itself


async def test_one_influxdb_write_carries_the_points_of_many_polls(
    influx_proc: ManagedProcess, own_redis: Redis, request: pytest.FixtureRequest
) -> None:
    """The drain rate must not depend on how points spread over polls (Telegraf's
    metric_batch_size): 300 polls with a point each go out in one write, not 300."""
    from processor.codec import Vote
    from processor.tally import Tally

    redis = own_redis
    prefix = unique_id(request)[:40]
    polls = await _make_polls(redis, prefix, 300)
    tally = Tally(redis, timeout_s=5, points_max=10_000)
    await tally.load()
    votes = [Vote(poll, f"dev-{i}", 1, 1) for i, poll in enumerate(polls)]
    assert (await tally.commit(votes, now_ms=1_767_225_600_000)).codes == [0] * 300

    class Counting:
        def __init__(self) -> None:
            self.inner = make_writer(v1_target(influx_proc, prefix.replace("-", "_")))
            self.writes: list[int] = []

        def write(self, lines: list[bytes]) -> None:
            self.writes.append(len(lines))
            self.inner.write(lines)

    writer = Counting()
    drainer = InfluxDrainer(
        redis=redis,
        writer=writer,  # type: ignore[arg-type]
        batch_max=5000,
        flush_interval_s=1,
        redis_timeout_s=5,
    )
    assert await drainer.drain_once(polls) == 300
    writer.inner.close()
    assert sum(writer.writes) == 300 and len(writer.writes) == 1
    for poll in polls:
        assert await redis.xlen(PollKeys(poll).points) == 0


async def test_the_drainer_reads_only_the_streams_the_change_feed_named(
    influx_proc: ManagedProcess, own_redis: Redis, request: pytest.FixtureRequest
) -> None:
    """After its first sweep, a drainer with 200 quiet polls reads nothing per round; one vote
    makes it read that poll's stream, and only it."""
    from processor.codec import Vote
    from processor.tally import Tally

    redis = own_redis
    prefix = unique_id(request)[:40]
    polls = await _make_polls(redis, prefix, 200)
    tally = Tally(redis, timeout_s=5, points_max=10_000)
    await tally.load()
    writer = make_writer(v1_target(influx_proc, prefix.replace("-", "_")))
    drainer = InfluxDrainer(
        redis=redis, writer=writer, batch_max=5000, flush_interval_s=1, redis_timeout_s=5
    )
    read: list[list[str]] = []
    inner_read = drainer._read

    async def spy(queues: Sequence[PollKeys]) -> tuple[list[tuple[PollKeys, list[Any]]], set[str]]:
        read.append([keys.name for keys in queues])
        return await inner_read(queues)

    drainer._read = spy  # type: ignore[method-assign]
    while await drainer.drain_once():  # the first round sweeps (other tests' points too)
        pass
    await drainer.drain_once()  # every stream it read is empty now, and leaves the due set
    read.clear()
    await drainer.drain_once()
    assert read == [[]]  # nothing announced: no stream read at all
    await tally.commit([Vote(polls[7], "dev-1", 0, 1)], now_ms=1_767_225_600_000)
    assert await drainer.drain_once() == 1
    assert [name for name in read[-1] if name.startswith(prefix)] == [polls[7]]
    await drainer.drain_once()  # the stream is found empty and leaves the due set
    read.clear()
    await drainer.drain_once()
    assert read == [[]]
    writer.close()


async def test_the_change_feed_says_a_reader_fell_behind_when_entries_were_trimmed(
    own_redis: Redis,
) -> None:
    redis = own_redis
    feed = ChangeFeed(redis)
    assert await feed.read() is None  # the first read: look at everything
    await redis.xadd(CHANGES, {"t": "p1"})
    await redis.xadd(CHANGES, {"d": "p2"})
    changes = await feed.read()
    assert changes is not None and "p1" in changes.shards and "p2" in changes.polls
    for i in range(5):
        await redis.xadd(CHANGES, {"t": f"q{i}"})
    await redis.xtrim(CHANGES, maxlen=2, approximate=False)
    assert await feed.read() is None  # three entries gone before they were read
    await redis.xadd(CHANGES, {"t": "p3"})
    changes = await feed.read()
    assert changes is not None and changes.shards == {"p3"}


async def test_votes_for_made_up_poll_ids_write_no_key_and_publish_nothing(
    broker: ManagedProcess,
    processor_proc: ManagedProcess,
    poll: Poll,
    redis: Redis,
    request: pytest.FixtureRequest,
) -> None:
    """docs/security.md, filling Redis: any device account may name any poll id in its topic.
    Five made-up ids cost no key, no retained topic and no results publish; their votes are
    answered unknown_poll and counted with the unattributed fates."""
    made_up = [unique_id(request, f"-nope{k}") for k in range(5)]
    before = int(await redis.hget(UNATTRIBUTED_FATES, "unknown_poll") or 0)
    with Fleet(broker, f"{poll.id}-k", 1) as fleet:
        kiosk = fleet.kiosks[0]
        for poll_id in made_up:
            kiosk.vote(poll_id, 0)
        kiosk.vote(poll.id, 1)  # the control: after them on the same connection
        await eventually(lambda: len(fleet.acks) == 6, timeout_s=30)
        assert fleet.codes() == Counter({int(Reason.UNKNOWN_POLL): 5, int(Fate.ACCEPTED): 1})
    assert int(await redis.hget(UNATTRIBUTED_FATES, "unknown_poll") or 0) == before + 5
    for poll_id in made_up:
        assert [key async for key in redis.scan_iter(match=f"*{poll_id}*")] == []
    # Nothing retained under them: a fresh subscriber to their topics gets nothing, while the
    # real poll's result is there.
    async with aiomqtt.Client(
        "127.0.0.1", broker.port, username="dashboard", identifier=f"{poll.id}-spy"
    ) as client:
        await client.subscribe("polls/+/results", qos=1)
        seen: set[str] = set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(3):
                async for message in client.messages:
                    seen.add(message.topic.value.split("/")[1])
    assert poll.id in seen and not seen & set(made_up)
    metrics = await asyncio.to_thread(_metrics_text, processor_proc)
    assert f'poll="{poll.id}"' in metrics  # its results publishes are counted by poll
    assert not [p for p in made_up if f'poll="{p}"' in metrics]
