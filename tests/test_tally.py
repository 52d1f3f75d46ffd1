"""The Redis tally on a real redis-server: exactly-once rules, the window, atomicity."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from harness.services import free_port
from processor.codec import MAX_UINT, Vote
from processor.errors import StoreUnavailable
from processor.keys import (
    DEVICES_ONLINE,
    DEVICES_SEEN,
    DEVICES_STATUS,
    POLLS_INDEX,
    SET_ASIDE,
    UNATTRIBUTED_FATES,
    PollKeys,
    batch_commit,
)
from processor.poll import Poll
from processor.poll_store import create_poll, read_results
from processor.reasons import Fate, Reason
from processor.tally import COMMIT_MEMORY_S, DEDUP_WINDOW, Tally
from tests.conftest import unique_id

A, D = int(Fate.ACCEPTED), int(Fate.DUPLICATE)


def votes(
    poll: Poll, device: str, seqs: Sequence[int], *, choice: int = 0, epoch: int = 0
) -> list[Vote]:
    return [Vote(poll.id, device, choice, seq, epoch) for seq in seqs]


@pytest.fixture
async def tally(redis: Redis) -> Tally:
    t = Tally(redis, timeout_s=5)
    await t.load()
    return t


async def test_repeat_counts_once_in_one_batch_and_across_batches(
    tally: Tally, poll: Poll, redis: Redis
) -> None:
    first = await tally.commit(votes(poll, "k1", [1, 2, 2, 1]), now_ms=1)
    assert first.codes == [A, A, D, D]
    again = await tally.commit(votes(poll, "k1", [2, 3]), now_ms=2)
    assert again.codes == [D, A]
    results = (await read_results(redis, [poll.id]))[poll.id]
    assert results.total == 3 and results.counts == (3, 0, 0)
    assert again.versions[poll.id] == results.version == 2


async def test_out_of_order_inside_the_window_each_counts_once(tally: Tally, poll: Poll) -> None:
    assert (await tally.commit(votes(poll, "k1", [10, 5, 7, 5, 10, 1]), now_ms=1)).codes == [
        A,
        A,
        A,
        D,
        D,
        A,
    ]


async def test_votes_in_order_keep_a_run_and_write_no_ring(
    tally: Tally, poll: Poll, redis: Redis
) -> None:
    keys = PollKeys(poll.id)
    for first in range(1, 1000, 100):
        batch = votes(poll, "k1", range(first, first + 100))
        assert (await tally.commit(batch, now_ms=1)).codes == [A] * 100
    assert await redis.hget(keys.devices, "k1") == b"0:1000:1"
    assert not await redis.exists(keys.window_prefix + "k1")  # the hot path's saving
    # A gap ends the run: its seqs go to the ring, and each still counts once.
    gap = await tally.commit(votes(poll, "k1", [1003, 1, 1001, 1000]), now_ms=2)
    assert gap.codes == [A, D, A, D]
    assert await redis.hget(keys.devices, "k1") == b"0:1003:1003"
    assert await redis.exists(keys.window_prefix + "k1")
    again = await tally.commit(votes(poll, "k1", [1, 999, 1001, 1002, 1003, 1004]), now_ms=3)
    assert again.codes == [D, D, D, A, D, A]
    assert await redis.hget(keys.devices, "k1") == b"0:1004:1002"
    assert (await read_results(redis, [poll.id]))[poll.id].total == 1004


async def test_two_votes_swapped_in_one_batch_write_no_ring(
    tally: Tally, poll: Poll, redis: Redis
) -> None:
    keys = PollKeys(poll.id)
    assert (await tally.commit(votes(poll, "k1", [1, 2, 3]), now_ms=1)).codes == [A, A, A]
    # 5 before 4: a gap for a moment, closed in the same batch, so the run goes on from 1.
    assert (await tally.commit(votes(poll, "k1", [5, 4, 3, 6]), now_ms=2)).codes == [A, A, D, A]
    assert await redis.hget(keys.devices, "k1") == b"0:6:1"
    assert not await redis.exists(keys.window_prefix + "k1")
    assert (await tally.commit(votes(poll, "k1", [1, 4, 5, 7]), now_ms=3)).codes == [D, D, D, A]


async def test_a_gap_clears_what_the_ring_held_for_seqs_a_window_ago(
    tally: Tally, poll: Poll
) -> None:
    # Seq 2 goes to the ring (below the run 4), then the window moves past it: seq W + 2 has
    # the same ring position and must not read seq 2's bit.
    assert (await tally.commit(votes(poll, "k1", [2, 4]), now_ms=1)).codes == [A, A]
    assert (await tally.commit(votes(poll, "k1", [DEDUP_WINDOW + 3]), now_ms=2)).codes == [A]
    late = await tally.commit(votes(poll, "k1", [DEDUP_WINDOW + 2, 4, 3]), now_ms=3)
    assert late.codes == [A, D, int(Reason.SEQ_TOO_OLD)]


async def test_state_stored_before_runs_is_read_as_a_ring_alone(
    tally: Tally, poll: Poll, redis: Redis
) -> None:
    # As earlier versions of the tally stored it: "epoch:max_seq", and a bit per counted seq.
    keys = PollKeys(poll.id)
    await redis.hset(keys.devices, "k1", "0:10")
    for seq in (1, 2, 3, 4, 6, 7, 8, 9, 10):
        await redis.setbit(keys.window_prefix + "k1", seq % DEDUP_WINDOW, 1)
    assert (await tally.commit(votes(poll, "k1", [5, 7, 11, 12, 10]), now_ms=1)).codes == [
        A,
        D,
        A,
        A,
        D,
    ]
    assert await redis.hget(keys.devices, "k1") == b"0:12:11"
    assert (await tally.commit(votes(poll, "k1", [5, 1, 11, 13]), now_ms=2)).codes == [D, D, D, A]


async def test_seq_older_than_the_window_is_never_counted(tally: Tally, poll: Poll) -> None:
    top = DEDUP_WINDOW + 100
    result = await tally.commit(votes(poll, "k1", [top, 100, 101, 99]), now_ms=1)
    assert result.codes == [A, int(Reason.SEQ_TOO_OLD), A, int(Reason.SEQ_TOO_OLD)]


async def test_new_epoch_restarts_seqs_and_old_epoch_is_stale(tally: Tally, poll: Poll) -> None:
    assert (await tally.commit(votes(poll, "k1", [1, 2]), now_ms=1)).codes == [A, A]
    assert (await tally.commit(votes(poll, "k1", [1, 2], epoch=1), now_ms=2)).codes == [A, A]
    assert (await tally.commit(votes(poll, "k1", [3], epoch=0), now_ms=3)).codes == [
        int(Reason.STALE_EPOCH)
    ]


async def test_a_new_epoch_forgets_the_ring_of_the_old_one(tally: Tally, poll: Poll) -> None:
    # Epoch 0 leaves seq 2 in the ring (below its run 4); in epoch 1, seq 2 is a new vote.
    assert (await tally.commit(votes(poll, "k1", [2, 4]), now_ms=1)).codes == [A, A]
    assert (await tally.commit(votes(poll, "k1", [4], epoch=1), now_ms=2)).codes == [A]
    assert (await tally.commit(votes(poll, "k1", [2, 4], epoch=1), now_ms=3)).codes == [A, D]


async def test_devices_are_independent(tally: Tally, poll: Poll) -> None:
    batch = votes(poll, "k1", [1]) + votes(poll, "k2", [1]) + votes(poll, "k1", [1])
    assert (await tally.commit(batch, now_ms=1)).codes == [A, A, D]


async def test_unknown_poll_and_option_are_rejected_without_state(
    tally: Tally, poll: Poll, redis: Redis
) -> None:
    unknown_before = int(await redis.hget(UNATTRIBUTED_FATES, "unknown_poll") or 0)
    batch = [
        Vote("no-such-poll", "k1", 0, 1),
        Vote(poll.id, "k1", 3, 1),  # three options: 0..2
        Vote(poll.id, "k1", (0, 1), 2),
        Vote(poll.id, "k1", (2,), 1),  # a list of one is that option; seq 1 is still unused
    ]
    result = await tally.commit(batch, now_ms=1)
    assert result.codes == [
        int(Reason.UNKNOWN_POLL),
        int(Reason.UNKNOWN_OPTION),
        int(Reason.TOO_MANY_CHOICES),
        A,
    ]
    assert (await read_results(redis, [poll.id]))[poll.id].counts == (0, 0, 1)
    fates = await redis.hgetall(PollKeys(poll.id).fates)
    assert fates == {b"accepted": b"1", b"unknown_option": b"1", b"too_many_choices": b"1"}
    # The made-up poll: no key under its id, its vote counted with the unattributed fates, and
    # no new version for the results publisher to publish.
    assert [key async for key in redis.scan_iter(match="*no-such-poll*")] == []
    assert int(await redis.hget(UNATTRIBUTED_FATES, "unknown_poll") or 0) == unknown_before + 1
    assert "no-such-poll" not in result.versions


async def test_a_retried_batch_counts_its_unknown_polls_once(tally: Tally, redis: Redis) -> None:
    before = int(await redis.hget(UNATTRIBUTED_FATES, "unknown_poll") or 0)
    batch = [Vote("made-up-a", "k1", 0, 1), Vote("made-up-b", "k1", 0, 2)]
    for _ in range(2):
        result = await tally.commit(batch, now_ms=1, token="retried-batch")
        assert result.codes == [int(Reason.UNKNOWN_POLL)] * 2 and result.versions == {}
    assert int(await redis.hget(UNATTRIBUTED_FATES, "unknown_poll") or 0) == before + 2
    assert [key async for key in redis.scan_iter(match="*made-up*")] == []


async def test_largest_seq_is_stored_exactly(tally: Tally, poll: Poll, redis: Redis) -> None:
    assert (await tally.commit(votes(poll, "k1", [MAX_UINT]), now_ms=1)).codes == [A]
    # "epoch:max_seq:run_start" (tally.lua): one seq is a run of one.
    state = PollKeys(poll.id).devices
    assert await redis.hget(state, "k1") == f"0:{MAX_UINT}:{MAX_UINT}".encode()
    assert (await tally.commit(votes(poll, "k1", [MAX_UINT, MAX_UINT - 1]), now_ms=2)).codes == [
        D,
        A,
    ]
    assert await redis.hget(state, "k1") == f"0:{MAX_UINT}:{MAX_UINT - 1}".encode()


async def test_dedup_state_per_device_stays_bounded(tally: Tally, poll: Poll, redis: Redis) -> None:
    # Each 500 seqs go as two batches, the even ones then the odd: every gap ends the run, so
    # the ring is written (seqs in order would keep a run and no ring at all), and over 3
    # windows its positions wrap around twice.
    starts = range(0, 3 * DEDUP_WINDOW, 500)
    keys = PollKeys(poll.id)
    ring = keys.window_prefix + "k1"
    lengths = []
    for start in starts:
        for first in (start, start + 1):
            result = await tally.commit(votes(poll, "k1", range(first, start + 500, 2)), now_ms=1)
            assert result.codes == [A] * 250
        lengths.append(await redis.strlen(ring))
    assert 0 < max(lengths) <= DEDUP_WINDOW // 8
    assert lengths[-1] == DEDUP_WINDOW // 8  # the whole ring in use, and no more
    assert await redis.hlen(keys.devices) == 1
    assert (await read_results(redis, [poll.id]))[poll.id].total == len(starts) * 500
    # And it still knows what it counted: a re-send of the last window is all duplicates.
    late = votes(poll, "k1", range(len(starts) * 500 - 1, len(starts) * 500 - 400, -1))
    assert (await tally.commit(late, now_ms=2)).codes == [D] * len(late)


async def test_a_lua_error_writes_nothing_and_sets_votes_aside(
    tally: Tally, poll: Poll, redis: Redis
) -> None:
    other = Poll(id=poll.id + "-ok", labels=("a", "b"))
    before = Poll(id=poll.id + "-before", labels=("a", "b"))
    await create_poll(redis, other)
    await create_poll(redis, before)
    keys = PollKeys(poll.id)
    await redis.hset(keys.devices, "broken", "garbage")  # tally.lua cannot parse this state
    await redis.delete(SET_ASIDE)
    # On one node the batch is one script call: the polls counted before and after the broken
    # one in that call keep their counts, the broken one writes nothing.
    batch = [Vote(before.id, "k", 0, 1)]
    batch += votes(poll, "fine", [1]) + votes(poll, "broken", [1]) + [Vote(other.id, "k", 1, 1)]
    result = await tally.commit(batch, now_ms=1)
    assert result.codes == [A] + [int(Reason.STORE_ERROR)] * 2 + [A]
    assert (await read_results(redis, [poll.id]))[poll.id].total == 0  # not even "fine" counted
    assert await redis.hget(keys.devices, "fine") is None
    assert (await read_results(redis, [other.id]))[other.id].total == 1
    assert (await read_results(redis, [before.id]))[before.id].total == 1
    aside: list[tuple[bytes, dict[bytes, bytes]]] = await redis.xrange(SET_ASIDE)  # type: ignore[assignment]
    assert [entry[b"device"] for _, entry in aside] == [b"fine", b"broken"]


async def test_a_retried_batch_gets_its_first_answer_and_counts_once(
    tally: Tally, poll: Poll, redis: Redis
) -> None:
    # A commit whose reply was lost is retried with the same token: the votes it counted are
    # "accepted" again, not "duplicate" of themselves; nothing is counted twice.
    batch = votes(poll, "k1", [1, 2, 2])
    first = await tally.commit(batch, now_ms=1, token="t-1")
    retried = await tally.commit(batch, now_ms=2, token="t-1")
    assert first.codes == retried.codes == [A, A, D]
    assert first.versions == retried.versions
    # A later, different batch carrying the same votes (a device's re-send) is a duplicate.
    assert (await tally.commit(batch, now_ms=3, token="t-2")).codes == [D, D, D]
    results = (await read_results(redis, [poll.id]))[poll.id]
    assert results.total == 2 and results.version == first.versions[poll.id]
    # On one node the batch's answer is one key for all its polls (tally.lua, the batch call),
    # kept for COMMIT_MEMORY_S; nothing is kept under the poll's own keys.
    [answer] = [key async for key in redis.scan_iter(match=batch_commit("t-1.*"))]
    assert 0 < await redis.pttl(answer) <= COMMIT_MEMORY_S * 1000
    assert await redis.exists(PollKeys(poll.id).commit("t-1")) == 0


async def test_script_cache_flush_is_survived(tally: Tally, poll: Poll, redis: Redis) -> None:
    await redis.script_flush()
    assert (await tally.commit(votes(poll, "k1", [1]), now_ms=1)).codes == [A]


async def test_unreachable_redis_raises_store_unavailable(poll: Poll) -> None:
    dead = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=1)
    try:
        with pytest.raises(StoreUnavailable):
            await Tally(dead, timeout_s=2).commit(votes(poll, "k1", [1]), now_ms=1)
    finally:
        await dead.aclose()


# A small window, so that the property test below reaches its wrap-around often; the script
# takes W as an argument, and its rules do not depend on W's size.
_W: Final = 8


@dataclass
class _Reference:
    """The rules of docs/protocol.md (De-duplication, Cooldown, One vote per voter), written
    plainly: the order of the checks, which refusals leave a seq unspent, and what counts."""

    options: int
    cooldown_s: int = 0
    per_voter: bool = False
    epoch: dict[str, int] = field(default_factory=dict)
    top: dict[str, int] = field(default_factory=dict)
    seen: dict[str, set[int]] = field(default_factory=dict)
    last_press: dict[str, int] = field(default_factory=dict)
    voters: dict[bytes, tuple[int, int, str, int]] = field(default_factory=dict)
    counts: Counter[int] = field(default_factory=Counter)

    def apply(self, vote: Vote) -> int:
        device, seq, ts = vote.device, vote.seq, vote.ts_s
        assert isinstance(vote.choice, int) and ts is not None
        if not 0 <= vote.choice < self.options:
            return int(Reason.UNKNOWN_OPTION)
        if device in self.epoch and vote.epoch < self.epoch[device]:
            return int(Reason.STALE_EPOCH)
        fresh = device not in self.epoch or vote.epoch > self.epoch[device]
        if not fresh:
            if self.top[device] >= 0 and seq <= self.top[device] - _W:
                return int(Reason.SEQ_TOO_OLD)
            if seq in self.seen[device]:
                return D
        if self.per_voter and not vote.voter:
            return int(Reason.MISSING_VOTER)  # refused: its seq is not spent
        if fresh:
            self.epoch[device], self.top[device], self.seen[device] = vote.epoch, -1, set()
        self.seen[device].add(seq)  # spent, whatever follows
        self.top[device] = max(self.top[device], seq)
        last = self.last_press.get(device)
        if self.cooldown_s and last is not None and abs(ts - last) < self.cooldown_s:
            return int(Fate.SUPPRESSED)
        if self.per_voter:
            assert vote.voter is not None
            prior = self.voters.get(vote.voter)
            if prior is not None and (ts, seq, device) <= prior[:3]:
                return int(Fate.SUPERSEDED)
            if prior is not None:
                self.counts[prior[3]] -= 1
            self.voters[vote.voter] = (ts, seq, device, vote.choice)
        if self.cooldown_s:
            self.last_press[device] = ts if last is None else max(last, ts)
        self.counts[vote.choice] += 1
        return A


_events = st.lists(
    st.tuples(
        st.sampled_from(["k1", "k2"]),
        # The epoch, from the device's last: mostly the same, sometimes its next (a device
        # that lost its store), sometimes its previous (a stale one).
        st.sampled_from([0, 0, 0, 0, 0, 0, 1, -1]),
        # A seq, or from the device's highest: -1 the next one (a run, which the script keeps
        # without bits), -2 one gap further (ends the run), -3 just below it, -4 the highest
        # the window no longer holds, -5 the lowest it still holds; from the lowest seq of
        # the unbroken block of counted seqs that ends at the highest: -6 one below it (joins
        # the block), -7 two below it (does not).
        st.integers(0, 3 * _W)
        | st.sampled_from([-1, -1, -1, -1, -2, -2, -3, -3, -4, -5, -6, -6, -7, -7]),
        st.booleans(),  # end the batch after this vote
        st.sampled_from([0, 1, 2, 0, 1, 2, 3]),  # 3 is no option (refused, seq unspent)
        st.integers(0, 8),  # seconds before now that the device cast it
        st.sampled_from([b"", b"v1", b"v2"]),  # the voter token, b"" for none
    ),
    min_size=1,
    max_size=60,
)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    events=_events,
    cooldown_s=st.sampled_from([0, 0, 3]),
    per_voter=st.booleans(),
)
async def test_tally_equals_the_reference_rules(
    events: list[tuple[str, int, int, bool, int, int, bytes]],
    cooldown_s: int,
    per_voter: bool,
    redis: Redis,
) -> None:
    tally = Tally(redis, timeout_s=5, dedup_window=_W)
    poll = Poll(
        id=f"ref-{abs(hash((tuple(events), cooldown_s, per_voter))) % 10**12}-{len(events)}",
        labels=("a", "b", "c"),
        cooldown_s=cooldown_s,
        one_per_voter=per_voter,
    )
    keys = PollKeys(poll.id)
    # Hypothesis replays an example (the same id): nothing of an earlier run may remain.
    every_key = (*keys.every_key(), *[keys.window_prefix + d for d in ("k1", "k2")])
    await redis.delete(*every_key)
    await create_poll(redis, poll)
    now_s = int(time.time())
    reference = _Reference(options=len(poll.labels), cooldown_s=cooldown_s, per_voter=per_voter)
    batch: list[Vote] = []
    expected: list[int] = []
    got: list[int] = []
    for device, epoch_step, relative, cut, choice, age_s, voter in events:
        top = reference.top.get(device, -1)
        epoch = max(0, reference.epoch.get(device, 0) + epoch_step)
        block_low = top
        while block_low - 1 in reference.seen.get(device, ()):
            block_low -= 1
        step = {-1: top + 1, -2: top + 2, -3: top - 1, -4: top - _W, -5: top + 1 - _W}
        step |= {-6: block_low - 1, -7: block_low - 2}
        seq = relative if relative >= 0 else max(0, step[relative])
        vote = Vote(poll.id, device, choice, seq, epoch, now_s - age_s, voter or None)
        batch.append(vote)
        expected.append(reference.apply(vote))
        if cut:
            got += (await tally.commit(batch, now_ms=now_s * 1000)).codes
            batch = []
    if batch:
        got += (await tally.commit(batch, now_ms=now_s * 1000)).codes
    assert got == expected
    results = (await read_results(redis, [poll.id]))[poll.id]
    assert list(results.counts) == [reference.counts[i] for i in range(len(poll.labels))]
    assert results.total == (len(reference.voters) if per_voter else expected.count(A))
    await redis.srem(POLLS_INDEX, poll.id)  # see tests/test_poll_rules.py: no poll left behind
    await redis.delete(*every_key)


async def test_a_retried_batch_counts_its_unattributed_rejections_once(
    tally: Tally, redis: Redis, request: pytest.FixtureRequest
) -> None:
    token = unique_id(request)  # tokens are unique per batch; the mark is global
    before = int(await redis.hget(UNATTRIBUTED_FATES, "bad_topic") or 0)
    rejected = Counter({Reason.BAD_TOPIC: 3})
    await tally.commit([], now_ms=1, unattributed=rejected, token=token)
    await tally.commit([], now_ms=2, unattributed=rejected, token=token)  # its reply was lost
    await tally.commit([], now_ms=3, unattributed=rejected, token=token + "-next")
    assert int(await redis.hget(UNATTRIBUTED_FATES, "bad_topic") or 0) == before + 6


async def test_a_tally_field_that_is_not_a_number_stops_the_share_before_any_write(
    tally: Tally, poll: Poll, redis: Redis
) -> None:
    keys = PollKeys(poll.id)
    await redis.hset(keys.tally, "c:1", "many")
    try:
        result = await tally.commit(votes(poll, "k1", [1], choice=1), now_ms=1)
        assert result.codes == [int(Reason.STORE_ERROR)]
        assert await redis.hget(keys.devices, "k1") is None  # its seq was not spent
        assert await redis.hget(keys.tally, "c:1") == b"many"
        assert await redis.xlen(keys.points) == 0
    finally:
        # The poll fixture's Redis is shared: a processor started by a later test would
        # read this field at its start-up scan and stop.
        await redis.hdel(keys.tally, "c:1")


async def test_load_makes_the_devices_online_from_their_statuses(
    redis: Redis, request: pytest.FixtureRequest
) -> None:
    """From a Redis of before DEVICES_ONLINE: a resumed MQTT session is not sent the retained
    statuses again, so the first start reads them from Redis."""
    on, off = unique_id(request, "-on"), unique_id(request, "-off")
    await redis.delete(DEVICES_ONLINE)
    await redis.hset(DEVICES_STATUS, on, '{"state":"online","at_ms":1000}')
    await redis.hset(DEVICES_STATUS, off, '{"state":"offline","at_ms":1000}')
    await redis.zadd(DEVICES_SEEN, {on: 5000, off: 5000})
    await Tally(redis, timeout_s=5).load()
    assert await redis.zscore(DEVICES_ONLINE, on) == 5000
    assert await redis.zscore(DEVICES_ONLINE, off) is None
    await redis.hdel(DEVICES_STATUS, on, off)
    await redis.zrem(DEVICES_SEEN, on, off)
