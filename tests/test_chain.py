"""The chain on a real redis-server: tally.lua extends it in the commit's own step, a retried
batch adds no link, receipts name entries, and the log rebuilt from the points gives Redis's
heads; any single change to the rebuilt log is caught (processor/chain.py)."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from processor.chain import (
    GENESIS,
    Counts,
    Entry,
    Head,
    Log,
    check_counts,
    check_head,
    entry_text,
    first_finding,
    link_head,
    rebuild,
)
from processor.codec import Vote
from processor.commands.audit import redis_witness
from processor.influx.line_protocol import QueuedPoint
from processor.influx.queries import chain_points
from processor.keys import PollKeys
from processor.poll import Poll
from processor.poll_store import create_poll, delete_poll, read_results
from processor.reasons import Fate
from processor.store import redis_text
from processor.tally import Tally
from tests.conftest import unique_id

A = int(Fate.ACCEPTED)


async def _chain(redis: Redis, poll: str, shard: int = 0) -> Head:
    length, head = await redis.hmget(PollKeys(poll, shard).tally, "chain_length", "chain_head")
    return Head(shard, int(length or 0), redis_text(head) if head else GENESIS)


async def _logs(redis: Redis, poll: Poll) -> tuple[list[Log], list[QueuedPoint]]:
    points = await chain_points(redis, None, poll.id, poll.shards)
    up_to = {s: (await _chain(redis, poll.id, s)).length for s in range(poll.shards)}
    return rebuild(points, shards=poll.shards, up_to=up_to), points


@pytest.fixture
async def tally(redis: Redis) -> Tally:
    t = Tally(redis, timeout_s=5, points_max=100_000)
    await t.load()
    return t


async def test_a_batch_is_one_link_and_a_retried_batch_adds_none(
    tally: Tally, poll: Poll, redis: Redis
) -> None:
    assert await _chain(redis, poll.id) == Head(0, 0, GENESIS)
    batch = [Vote(poll.id, "k1", 1, 1, ts_s=None), Vote(poll.id, "k2", 2, 7),
             Vote(poll.id, "k1", 1, 1)]  # fmt: skip
    first = await tally.commit(batch, now_ms=1_765_000_000_000, token="t1")
    assert first.codes == [A, A, int(Fate.DUPLICATE)]
    after = await _chain(redis, poll.id)
    # The link by hand: the genesis head, then the entries of the accepted votes, in order.
    text = f"{GENESIS}\nk1\t0\t1\t1\t1765000000\tserver\t\nk2\t0\t7\t2\t1765000000\tserver\t"
    assert after == Head(0, 2, hashlib.sha1(text.encode()).hexdigest())
    # The same batch again (a lost reply): answered from memory, no link added.
    again = await tally.commit(batch, now_ms=1_765_000_000_500, token="t1")
    assert again.codes == first.codes and await _chain(redis, poll.id) == after
    # Only duplicates: no link either.
    await tally.commit(batch, now_ms=1_765_000_001_000, token="t2")
    assert await _chain(redis, poll.id) == after
    await tally.commit([Vote(poll.id, "k3", 0, 1)], now_ms=1_765_000_002_000, token="t3")
    logs, _ = await _logs(redis, poll)
    assert [e.number for e in logs[0].entries] == [1, 2, 3]
    assert [e.link for e in logs[0].entries] == [1, 1, 3]
    assert logs[0].heads[2] == after.head and logs[0].finding is None
    assert logs[0].heads[3] == (await _chain(redis, poll.id)).head


async def test_receipts_name_the_entries_of_the_votes_that_asked(
    tally: Tally, poll: Poll, redis: Redis
) -> None:
    await tally.commit([Vote(poll.id, "k0", 0, 1)], now_ms=1_765_000_000_000)
    batch = [
        Vote(poll.id, "k1", 1, 1, receipt=True),
        Vote(poll.id, "k1", 1, 1, receipt=True),  # a duplicate: no receipt
        Vote(poll.id, "k2", 9, 1, receipt=True),  # no such option: no receipt
        Vote(poll.id, "k3", 2, 1),  # accepted, did not ask
        Vote(poll.id, "k4", 0, 5, receipt=True),
    ]
    result = await tally.commit(batch, now_ms=1_765_000_001_000, token="r")
    assert result.receipts == {0: (0, 2), 4: (0, 4)}
    # A retry gets the same receipts: the answer remembered holds the chain's length.
    again = await tally.commit(batch, now_ms=1_765_000_001_500, token="r")
    assert again.receipts == result.receipts
    logs, _ = await _logs(redis, poll)
    assert logs[0].entries[1].device == "k1" and logs[0].entries[3].device == "k4"


async def test_each_shard_has_its_chain_and_the_results_carry_every_head(
    tally: Tally, redis: Redis, request: pytest.FixtureRequest
) -> None:
    poll = Poll(id=unique_id(request), labels=("a", "b"), shards=3)
    await create_poll(redis, poll)
    votes = [Vote(poll.id, f"k{d}", d % 2, seq) for d in range(12) for seq in range(1, 4)]
    result = await tally.commit(votes, now_ms=1_765_000_000_000)
    assert result.codes == [A] * len(votes)
    results = (await read_results(redis, [poll.id]))[poll.id]
    assert [Head(s, n, h) for s, (n, h) in enumerate(results.chain)] == [
        await _chain(redis, poll.id, s) for s in range(3)
    ]
    assert sum(n for n, _ in results.chain) == 36
    logs, _ = await _logs(redis, poll)
    assert first_finding(logs, [await redis_witness(redis, poll.id)]) is None


async def test_a_changed_vote_is_an_entry_that_names_what_it_replaced(
    tally: Tally, redis: Redis, request: pytest.FixtureRequest
) -> None:
    poll = Poll(id=unique_id(request), labels=("a", "b", "c"), one_per_voter=True)
    await create_poll(redis, poll)
    alice = b"\xa1"
    await tally.commit(
        [Vote(poll.id, "k1", 0, 1, ts_s=None, voter=alice)], now_ms=1_765_000_000_000
    )
    await tally.commit([Vote(poll.id, "k2", 2, 1, voter=alice)], now_ms=1_765_000_005_000)
    logs, _ = await _logs(redis, poll)
    second = logs[0].entries[1]
    assert second.replaced == ("k1", 0, 1, (0,))
    assert entry_text(second) == "k2\t0\t1\t2\t1765000005\tserver\tk1/0/1/0"
    witness = await redis_witness(redis, poll.id)
    assert witness.counts is not None and witness.counts.counts == (0, 0, 1)
    assert first_finding(logs, [witness]) is None


# A batch: votes as (device, seq, option, voter or None, device time offset or None), and how
# many times it is retried after a lost reply.
_Vote = tuple[str, int, int, bytes | None, int | None]
_VOTE = st.tuples(
    st.sampled_from(["d1", "d2", "d3"]),
    st.integers(0, 12),
    st.integers(0, 3),  # option 3 is not one: refused
    st.sampled_from([None, b"v1", b"v2"]),
    st.sampled_from([None, -5, 0, 5]),
)
_EXAMPLES = itertools.count()
_BATCHES = st.lists(st.tuples(st.lists(_VOTE, min_size=1, max_size=6), st.integers(0, 2)),
                    min_size=1, max_size=8)  # fmt: skip


def _mutations(points: Sequence[QueuedPoint]) -> list[tuple[str, list[QueuedPoint]]]:
    """Every kind of single change to a log's points, at a few places."""
    out: list[tuple[str, list[QueuedPoint]]] = []
    ordered = sorted(points, key=lambda p: (p.entry, p.withdrawn, p.option))
    for i in sorted({0, len(ordered) // 2, len(ordered) - 1}):
        p = ordered[i]
        rest = ordered[:i] + ordered[i + 1 :]
        out.append(("deleted", rest))
        out.append(("choice changed", [*rest, p._replace(option=(p.option + 1) % 3)]))
        out.append(("seq changed", [*rest, p._replace(seq=p.seq + 100)]))
        out.append(("inserted", [*ordered, p._replace(device="forged", option=0)]))
        out.append(("time changed", [*rest, p._replace(ts_s=p.ts_s + 1)]))
        other = next((q for q in ordered if q.entry != p.entry), None)
        if other is not None:
            swapped = [q for q in rest if q != other]
            swapped += [p._replace(entry=other.entry, link=other.link, head=other.head),
                        other._replace(entry=p.entry, link=p.link, head=p.head)]  # fmt: skip
            out.append(("swapped", swapped))
    return out


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(batches=_BATCHES, per_voter=st.booleans())
async def test_any_batches_give_a_chain_the_audit_accepts_and_any_change_is_caught(
    tally: Tally,
    redis: Redis,
    request: pytest.FixtureRequest,
    batches: list[tuple[list[_Vote], int]],
    per_voter: bool,
) -> None:
    poll = Poll(id=f"chain-{next(_EXAMPLES)}-{unique_id(request)[-8:]}", labels=("a", "b", "c"),
                one_per_voter=per_voter)  # fmt: skip
    now_ms = 1_765_000_000_000
    # Made a minute before the votes, so that their devices' times are plausible and kept.
    await create_poll(redis, poll, now_ms=now_ms - 60_000)
    try:
        await _batches_audited(tally, redis, poll, batches, now_ms)
    finally:
        await delete_poll(redis, poll.id)  # the suite's Redis is shared: leave no poll


async def _batches_audited(
    tally: Tally, redis: Redis, poll: Poll, batches: list[tuple[list[_Vote], int]], now_ms: int
) -> None:
    for n, (votes, retries) in enumerate(batches):
        batch = [
            Vote(
                poll.id,
                device,
                option,
                seq,
                0,
                None if offset is None else now_ms // 1000 + offset,
                voter,
            )  # fmt: skip
            for device, seq, option, voter, offset in votes
        ]
        # The same batch under the same token: a retry after a lost reply.
        for attempt in range(1 + retries):
            await tally.commit(batch, now_ms=now_ms + n * 1000 + attempt, token=f"{poll.id}.{n}")
    logs, points = await _logs(redis, poll)
    witness = await redis_witness(redis, poll.id)
    assert first_finding(logs, [witness]) is None
    if not points:
        return
    for name, changed in _mutations(points):
        up_to = {0: witness.heads[0].length}
        found = first_finding(rebuild(changed, shards=1, up_to=up_to), [witness])
        assert found is not None, f"{name} went unseen"


def test_a_head_is_checked_at_its_own_length_only_where_a_link_ends() -> None:
    entries = [
        Entry(1, 1, "k", 0, 1, (0,), 10, "device", None, ""),
        Entry(2, 1, "k", 0, 2, (1,), 10, "device", None, ""),
    ]
    head = link_head(GENESIS, entries)
    log = Log(0, list(entries), {0: GENESIS, 2: head})
    assert check_head([log], "w", Head(0, 2, head)) is None
    assert check_head([log], "w", Head(0, 1, head)) is not None  # no link ends at 1
    assert check_head([log], "w", Head(0, 3, head)) is not None  # longer than the log
    assert check_counts([log], "w", [Head(0, 2, head)], Counts((1, 1), 2)) is None
    assert check_counts([log], "w", [Head(0, 2, head)], Counts((2, 0), 2)) is not None
    assert check_counts([log], "w", [Head(0, 1, head)], Counts((1, 0), 1)) is None
