"""The poll rules (docs/protocol.md, Polls) in the Redis tally: each rule on its own, then a
property test against a plain reference computation of all of them together."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from processor.codec import Vote
from processor.keys import POLLS_INDEX, PollKeys
from processor.poll import Poll, PollType
from processor.poll_store import create_poll, read_fates, read_results
from processor.reasons import Fate, Reason
from processor.tally import DEDUP_WINDOW, Tally
from tests.conftest import unique_id

A, D = int(Fate.ACCEPTED), int(Fate.DUPLICATE)
SUPERSEDED, SUPPRESSED = int(Fate.SUPERSEDED), int(Fate.SUPPRESSED)
CLOSED, NOT_OPEN = int(Reason.POLL_CLOSED), int(Reason.POLL_NOT_OPEN)
T0 = 1_800_000_000  # seconds: the polls here are created at T0 and open at T0 + 100


@pytest.fixture
async def tally(redis: Redis) -> Tally:
    t = Tally(redis, timeout_s=5)
    await t.load()
    return t


async def make(redis: Redis, request: pytest.FixtureRequest, **spec: object) -> Poll:
    poll = Poll(id=unique_id(request), **spec)  # type: ignore[arg-type]
    await create_poll(redis, poll, now_ms=T0 * 1000)
    return poll


async def test_multiple_choice_counts_each_option_and_one_total_per_vote(
    tally: Tally, redis: Redis, request: pytest.FixtureRequest
) -> None:
    poll = await make(
        redis, request, labels=("a", "b", "c", "d"), type=PollType.MULTIPLE, max_choices=2
    )
    batch = [
        Vote(poll.id, "k", (0, 2), 1),
        Vote(poll.id, "k", 3, 2),
        Vote(poll.id, "k", (0, 1, 2), 3),
        Vote(poll.id, "k", (1, 4), 4),
    ]
    codes = (await tally.commit(batch, now_ms=T0 * 1000)).codes
    assert codes == [A, A, int(Reason.TOO_MANY_CHOICES), int(Reason.UNKNOWN_OPTION)]
    results = (await read_results(redis, [poll.id]))[poll.id]
    assert results.counts == (1, 0, 1, 1) and results.total == 2
    assert results.figures()["percentages"] == [50.0, 0.0, 50.0, 50.0]


async def test_rating_votes_carry_the_value_and_give_a_mean(
    tally: Tally, redis: Redis, request: pytest.FixtureRequest
) -> None:
    poll = await make(redis, request, type=PollType.RATING, scale=(1, 5))
    batch = [Vote(poll.id, "k", value, seq) for seq, value in enumerate([5, 4, 4, 1, 0, 6], 1)]
    codes = (await tally.commit(batch, now_ms=T0 * 1000)).codes
    assert codes == [A, A, A, A, int(Reason.UNKNOWN_OPTION), int(Reason.UNKNOWN_OPTION)]
    results = (await read_results(redis, [poll.id]))[poll.id]
    assert results.labels == ("1", "2", "3", "4", "5")
    assert results.counts == (1, 0, 0, 2, 1)
    assert results.figures()["mean"] == 3.5


async def test_nps_score_is_promoters_minus_detractors(
    tally: Tally, redis: Redis, request: pytest.FixtureRequest
) -> None:
    poll = await make(redis, request, type=PollType.NPS)
    values = [10, 9, 9, 8, 7, 6, 0, 10, 5, 9]  # 5 promoters, 2 passives, 3 detractors
    batch = [Vote(poll.id, "k", value, seq) for seq, value in enumerate(values, 1)]
    assert (await tally.commit(batch, now_ms=T0 * 1000)).codes == [A] * 10
    figures = (await read_results(redis, [poll.id]))[poll.id].figures()
    assert figures["nps"] == 20.0
    assert (figures["promoters"], figures["passives"], figures["detractors"]) == (5, 2, 3)


async def test_windows_refuse_early_and_late_votes_but_not_an_offline_kiosks(
    tally: Tally, redis: Redis, request: pytest.FixtureRequest
) -> None:
    opens, closes = (T0 + 100) * 1000, (T0 + 200) * 1000
    poll = await make(
        redis, request, labels=("a", "b"), opens_ms=opens, closes_ms=closes, grace_s=60
    )

    async def vote(seq: int, now_s: int, ts: int | None) -> int:
        batch = [Vote(poll.id, "k", 0, seq, ts_s=ts)]
        return (await tally.commit(batch, now_ms=now_s * 1000)).codes[0]

    assert await vote(1, T0 + 50, T0 + 50) == NOT_OPEN
    assert await vote(1, T0 + 150, None) == A  # a refused seq may be used again
    assert await vote(2, T0 + 230, T0 + 190) == A  # cast while open, within the grace
    assert await vote(3, T0 + 230, None) == CLOSED  # no time: cast when it arrived
    assert await vote(4, T0 + 230, T0 + 210) == CLOSED  # cast after the close
    assert await vote(5, T0 + 270, T0 + 190) == CLOSED  # past the grace period
    assert await vote(6, T0 + 230, T0 + 50) == CLOSED  # cast before it opened
    assert (await read_results(redis, [poll.id]))[poll.id].total == 2


async def test_one_vote_per_voter_latest_counts_and_moves_atomically(
    tally: Tally, redis: Redis, request: pytest.FixtureRequest
) -> None:
    poll = await make(redis, request, labels=("a", "b", "c"), one_per_voter=True)
    now = (T0 + 10) * 1000
    alice, bob = b"alice", b"bob"
    first = [
        Vote(poll.id, "k1", 0, 1, ts_s=T0 + 5, voter=alice),
        Vote(poll.id, "k1", 1, 2, ts_s=T0 + 5, voter=bob),
        Vote(poll.id, "k2", 2, 1, ts_s=T0 + 7, voter=alice),  # later: alice moves to c
        Vote(poll.id, "k2", 0, 2, ts_s=T0 + 1, voter=bob),  # earlier: superseded
        Vote(poll.id, "k2", 0, 3),  # no voter token
    ]
    codes = (await tally.commit(first, now_ms=now)).codes
    assert codes == [A, A, A, SUPERSEDED, int(Reason.MISSING_VOTER)]
    results = (await read_results(redis, [poll.id]))[poll.id]
    assert results.counts == (0, 1, 1) and results.total == 2
    # Same time: the higher seq wins; a re-send of a superseded vote is a duplicate.
    again = [
        Vote(poll.id, "k1", 2, 9, ts_s=T0 + 5, voter=bob),
        Vote(poll.id, "k2", 0, 2, ts_s=T0 + 1, voter=bob),
    ]
    assert (await tally.commit(again, now_ms=now)).codes == [A, D]
    results = (await read_results(redis, [poll.id]))[poll.id]
    assert results.counts == (0, 0, 2) and results.total == 2


async def test_cooldown_suppresses_presses_and_records_them(
    tally: Tally, redis: Redis, request: pytest.FixtureRequest
) -> None:
    poll = await make(redis, request, labels=("a", "b"), cooldown_s=10)
    presses = [T0 + 1, T0 + 2, T0 + 5, T0 + 11, T0 + 30, T0 + 35]
    batch = [Vote(poll.id, "button", 0, seq, ts_s=t) for seq, t in enumerate(presses, 1)]
    batch.append(Vote(poll.id, "other", 0, 1, ts_s=T0 + 2))  # another device: its own cooldown
    codes = (await tally.commit(batch, now_ms=(T0 + 40) * 1000)).codes
    assert codes == [A, SUPPRESSED, SUPPRESSED, A, A, SUPPRESSED, A]
    assert (await read_results(redis, [poll.id]))[poll.id].total == 4
    fates, _ = await read_fates(redis, poll.id)
    assert fates["suppressed"] == 3
    recorded: list[tuple[bytes, dict[bytes, bytes]]] = await redis.xrange(  # type: ignore[assignment]
        PollKeys(poll.id).suppressed
    )
    assert [(e[b"s"], e[b"reason"]) for _, e in recorded] == [
        (b"2", b"cooldown"),
        (b"3", b"cooldown"),
        (b"6", b"cooldown"),
    ]


# -- the reference --------------------------------------------------------------------------


@dataclass
class _Reference:
    """docs/protocol.md, De-duplication and Polls, written plainly, one vote at a time."""

    poll: Poll
    created_s: int
    skew_s: int = 300
    epoch: dict[str, int] = field(default_factory=dict)
    top: dict[str, int] = field(default_factory=dict)
    seen: dict[str, set[int]] = field(default_factory=dict)
    presses: dict[str, int] = field(default_factory=dict)
    voters: dict[bytes, tuple[int, int, str, tuple[int, ...]]] = field(default_factory=dict)
    counts: Counter[int] = field(default_factory=Counter)
    total: int = 0

    def apply(self, vote: Vote, now_ms: int) -> int:
        p = self.poll
        options = vote.choice if isinstance(vote.choice, tuple) else (vote.choice,)
        options = tuple(o - p.scale_min for o in options)
        if any(not 0 <= o < len(p.labels) for o in options):
            return int(Reason.UNKNOWN_OPTION)
        if len(options) > (p.max_choices if p.type is PollType.MULTIPLE else 1):
            return int(Reason.TOO_MANY_CHOICES)
        device = vote.device
        if device in self.epoch and vote.epoch < self.epoch[device]:
            return int(Reason.STALE_EPOCH)
        # A new epoch starts an empty window, adopted only when the vote spends its seq.
        fresh = device not in self.epoch or vote.epoch > self.epoch[device]
        top = -1 if fresh else self.top[device]
        if top >= 0 and vote.seq <= top - DEDUP_WINDOW:
            return int(Reason.SEQ_TOO_OLD)
        if not fresh and vote.seq in self.seen[device]:
            return D
        now_s = now_ms // 1000
        plausible = (
            vote.ts_s is not None
            and self.created_s - self.skew_s <= vote.ts_s <= now_s + self.skew_s
        )
        ts = vote.ts_s if plausible and vote.ts_s is not None else now_s
        if p.opens_ms and now_ms < p.opens_ms:
            return NOT_OPEN
        if p.closes_ms and now_ms >= p.closes_ms:
            cast_in_time = plausible and p.opens_ms <= ts * 1000 < p.closes_ms
            if not (cast_in_time and now_ms <= p.closes_ms + p.grace_s * 1000):
                return CLOSED
        if p.one_per_voter and vote.voter is None:
            return int(Reason.MISSING_VOTER)
        if fresh:
            self.epoch[device], self.seen[device] = vote.epoch, set()
        self.seen[device].add(vote.seq)
        self.top[device] = max(top, vote.seq)
        last = self.presses.get(device)
        if p.cooldown_s and last is not None and abs(ts - last) < p.cooldown_s:
            return SUPPRESSED
        if p.one_per_voter:
            assert vote.voter is not None
            prior = self.voters.get(vote.voter)
            if prior is not None and (ts, vote.seq, device) <= prior[:3]:
                return SUPERSEDED
            if prior is not None:
                self.counts.subtract(prior[3])
            else:
                self.total += 1
            self.voters[vote.voter] = (ts, vote.seq, device, options)
        else:
            self.total += 1
        if p.cooldown_s:
            self.presses[device] = max(last, ts) if last is not None else ts
        self.counts.update(options)
        return A


_polls = st.builds(
    lambda kind, per_voter, cooldown, window: dict(
        labels=("a", "b", "c"),
        type=kind,
        max_choices=2 if kind is PollType.MULTIPLE else 1,
        one_per_voter=per_voter,
        cooldown_s=cooldown,
        opens_ms=(T0 + 100) * 1000 if window else 0,
        closes_ms=(T0 + 200) * 1000 if window else 0,
        grace_s=30,
    ),
    st.sampled_from([PollType.SINGLE, PollType.MULTIPLE]),
    st.booleans(),
    st.sampled_from([0, 5]),
    st.booleans(),
)
_votes = st.lists(
    st.tuples(
        st.sampled_from(["k1", "k2", "k3"]),
        st.integers(0, 1),  # epoch
        st.integers(0, 30),  # seq
        st.one_of(st.integers(0, 3), st.tuples(st.integers(0, 2), st.integers(0, 2))),
        st.one_of(st.none(), st.integers(T0 - 400, T0 + 260)),  # device time
        st.sampled_from([None, b"v1", b"v2"]),
        st.sampled_from([T0 + 50, T0 + 150, T0 + 190, T0 + 210, T0 + 240]),  # arrival
        st.booleans(),  # end the batch after this vote
    ),
    min_size=1,
    max_size=50,
)


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(spec=_polls, events=_votes)
async def test_tally_equals_the_reference_for_any_stream_of_votes(
    spec: dict[str, object],
    events: list[tuple[str, int, int, int | tuple[int, int], int | None, bytes | None, int, bool]],
    tally: Tally,
    redis: Redis,
) -> None:
    poll = Poll(id=f"rules-{abs(hash((repr(spec), repr(events)))) % 10**12}", **spec)  # type: ignore[arg-type]
    keys = PollKeys(poll.id)
    await redis.delete(*keys.every_key(), *[keys.window_prefix + d for d in ("k1", "k2", "k3")])
    await redis.delete(keys.definition)
    await create_poll(redis, poll, now_ms=T0 * 1000)
    reference = _Reference(poll, created_s=T0)
    arrivals = sorted(e[6] for e in events)  # time only moves forward
    batches: list[list[Vote]] = [[]]
    for device, epoch, seq, choice, ts, voter, _, cut in events:
        if isinstance(choice, tuple) and choice[0] == choice[1]:
            choice = choice[0]  # the codec refuses a repeated option before the tally sees it
        batches[-1].append(Vote(poll.id, device, choice, seq, epoch, ts, voter))
        if cut:
            batches.append([])
    expected: list[int] = []
    got: list[int] = []
    done = 0
    for batch in filter(None, batches):
        done += len(batch)
        now_ms = arrivals[done - 1] * 1000  # one commit, one clock reading
        expected += [reference.apply(vote, now_ms) for vote in batch]
        got += (await tally.commit(batch, now_ms=now_ms)).codes
    assert got == expected
    results = (await read_results(redis, [poll.id]))[poll.id]
    assert results.total == reference.total
    assert results.counts == tuple(reference.counts[o] for o in range(3))
    # Many examples, one shared Redis: each processor the later tests start would republish
    # every poll left behind.
    await redis.srem(POLLS_INDEX, poll.id)
    await redis.delete(*keys.every_key())
