"""Polls end to end: the CLI manages them, kiosks vote through a real broker, the processor
answers, and dashboards and kiosks read the retained topics."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import aiomqtt
import pytest
from redis.asyncio import Redis

from harness.services import ManagedProcess
from processor.commands.watch import wait_for_results
from processor.poll import Poll
from processor.poll_store import close_poll, create_poll
from processor.reasons import Fate, Reason
from processor.results import ResultsPublisher
from processor.topics import config_topic, results_topic, series_topic
from tests.conftest import eventually, unique_id
from tests.fleet import Fleet, first_message, results_url
from tests.test_cli import poll_cli, votebox

pytestmark = pytest.mark.e2e


@pytest.fixture
def broker_with_processor(
    mosquitto_proc: ManagedProcess, spawn_processor: Callable[..., ManagedProcess]
) -> ManagedProcess:
    """Mosquitto with a processor of the test's own (for tests that need one broker only)."""
    spawn_processor(mosquitto_proc)
    return mosquitto_proc


async def retained(broker: ManagedProcess, topic: str, client: str) -> dict[str, Any] | None:
    """The retained JSON a fresh subscriber gets on ``topic`` (None when it was cleared)."""
    is_retained, payload = await first_message(broker, topic, client)
    assert is_retained
    return json.loads(payload) if payload else None


async def test_a_kiosk_sees_the_poll_config_at_once_and_dashboards_the_type_figures(
    broker: ManagedProcess,
    processor_proc: ManagedProcess,
    redis_proc: ManagedProcess,
    request: pytest.FixtureRequest,
) -> None:
    poll_id = unique_id(request)
    poll_cli(redis_proc, "poll", "create", poll_id, "--type", "nps", "--title", "Recommend us?")
    config = await retained(broker, config_topic(poll_id), f"{poll_id}-kiosk")
    assert config is not None
    assert config["type"] == "nps" and config["scale"] == [0, 10]
    assert config["labels"] == [str(v) for v in range(11)] and config["state"] == "open"
    with Fleet(broker, poll_id, 2) as fleet:
        for seq, value in enumerate([10, 9, 8, 3, 10], 1):
            fleet.kiosks[seq % 2].vote(poll_id, value)
        await eventually(lambda: fleet.unacked() == 0)
    document = await wait_for_results(
        results_url(broker), poll_id, lambda d: d["total"] == 5, timeout_s=30
    )
    assert document["counts"][10] == 2 and document["nps"] == 40.0
    assert document["mean"] == 8.0 and document["type"] == "nps"


async def test_multiple_choice_and_rating_votes_through_the_broker(
    broker_with_processor: ManagedProcess,
    redis_proc: ManagedProcess,
    request: pytest.FixtureRequest,
) -> None:
    broker = broker_with_processor
    multi, rating = unique_id(request, "-m"), unique_id(request, "-r")
    poll_cli(redis_proc, "poll", "create", multi, "--type", "multiple", "--max-choices", "2",
        "--option", "pizza", "--option", "salad", "--option", "soup")  # fmt: skip
    poll_cli(redis_proc, "poll", "create", rating, "--type", "rating", "--scale", "1-5")
    with Fleet(broker, multi, 1) as fleet:
        kiosk = fleet.kiosks[0]
        kiosk.vote(multi, [0, 2])
        kiosk.vote(multi, [0, 1, 2])  # three of at most two
        kiosk.vote(rating, 4)
        kiosk.vote(rating, 9)  # not on the scale
        await eventually(lambda: fleet.unacked() == 0)
        codes = fleet.codes()
    assert codes == {0: 2, int(Reason.TOO_MANY_CHOICES): 1, int(Reason.UNKNOWN_OPTION): 1}
    document = await wait_for_results(
        results_url(broker), multi, lambda d: d["total"] == 1, timeout_s=30
    )
    assert document["counts"] == [1, 0, 1] and document["percentages"] == [100.0, 0.0, 100.0]
    document = await wait_for_results(
        results_url(broker), rating, lambda d: d["total"] == 1, timeout_s=30
    )
    assert document["counts"] == [0, 0, 0, 1, 0] and document["mean"] == 4.0


async def test_one_vote_per_voter_across_kiosks_counts_the_latest(
    broker_with_processor: ManagedProcess,
    redis_proc: ManagedProcess,
    request: pytest.FixtureRequest,
) -> None:
    broker = broker_with_processor
    poll_id = unique_id(request)
    poll_cli(redis_proc, "poll", "create", poll_id, "--one-per-voter",
        "--option", "yes", "--option", "no")  # fmt: skip
    now = int(time.time())
    with Fleet(broker, poll_id, 2) as fleet:
        k1, k2 = fleet.kiosks
        # One at a time: two kiosks' messages may overtake each other on the way.
        for kiosk, choice, ts, voter, code in (
            (k1, 0, now - 20, b"card-0001", int(Fate.ACCEPTED)),
            (k2, 1, now - 10, b"card-0001", int(Fate.ACCEPTED)),  # changed their mind: no
            (k1, 0, now - 30, b"card-0001", int(Fate.SUPERSEDED)),  # an older vote, late
            (k2, 0, now - 5, b"card-0002", int(Fate.ACCEPTED)),
            (k2, 0, None, None, int(Reason.MISSING_VOTER)),  # no card
        ):
            kiosk.vote(poll_id, choice, ts=ts, voter=voter)
            await eventually(lambda: fleet.unacked() == 0)
            assert fleet.acks[-1][2] == code, fleet.acks
    document = await wait_for_results(
        results_url(broker),
        poll_id,
        lambda d: d["total"] == 2 and d["counts"] == [1, 1],
        timeout_s=30,
    )
    assert document["percentages"] == [50.0, 50.0]


async def test_a_button_pressed_again_and_again_counts_once_per_cooldown(
    broker: ManagedProcess,
    processor_proc: ManagedProcess,
    redis_proc: ManagedProcess,
    redis: Redis,
    request: pytest.FixtureRequest,
) -> None:
    poll_id = unique_id(request)
    poll_cli(redis_proc, "poll", "create", poll_id, "--cooldown-s", "10",
        "--option", "happy", "--option", "unhappy")  # fmt: skip
    now = int(time.time())
    with Fleet(broker, poll_id, 1) as fleet:
        for offset in range(50):  # fifty presses in five seconds
            fleet.kiosks[0].vote(poll_id, 0, ts=now - 5 + offset // 10)
        await eventually(lambda: fleet.unacked() == 0)
        codes = fleet.codes()
    assert codes == {int(Fate.ACCEPTED): 1, int(Fate.SUPPRESSED): 49}
    shown = poll_cli(redis_proc, "poll", "show", poll_id)
    assert "suppressed=49" in shown and "accepted=1" in shown


async def test_closing_publishes_the_final_result_and_late_votes_get_their_reason(
    broker: ManagedProcess,
    processor_proc: ManagedProcess,
    redis_proc: ManagedProcess,
    request: pytest.FixtureRequest,
) -> None:
    poll_id = unique_id(request)
    poll_cli(redis_proc, "poll", "create", poll_id, "--hide-results-until-close", "--grace-s", "60",
        "--option", "red", "--option", "blue")  # fmt: skip
    with Fleet(broker, poll_id, 1) as fleet:
        kiosk = fleet.kiosks[0]
        kiosk.vote(poll_id, 0)
        kiosk.vote(poll_id, 1)
        await eventually(lambda: fleet.unacked() == 0)
        hidden = await wait_for_results(
            results_url(broker), poll_id, lambda d: d["total"] == 2, timeout_s=30
        )
        assert hidden["hidden"] is True and hidden["counts"] is None
        cast_while_open = int(time.time()) - 1
        poll_cli(redis_proc, "poll", "close", poll_id)
        final = await wait_for_results(
            results_url(broker), poll_id, lambda d: d["state"] == "closed", timeout_s=30
        )
        assert final["counts"] == [1, 1] and final["version"] > hidden["version"]
        config = await retained(broker, config_topic(poll_id), f"{poll_id}-kiosk")
        assert config is not None and config["state"] == "closed"
        kiosk.vote(poll_id, 0, ts=cast_while_open)  # an offline kiosk's vote, within the grace
        kiosk.vote(poll_id, 0, ts=int(time.time()) + 1)  # cast after the close
        await eventually(lambda: fleet.unacked() == 0)
        assert fleet.codes()[int(Reason.POLL_CLOSED)] == 1
    document = await wait_for_results(
        results_url(broker), poll_id, lambda d: d["total"] == 3, timeout_s=30
    )
    assert document["counts"] == [2, 1] and document["state"] == "closed"


def iso(t: float) -> str:
    """ISO 8601 UTC with milliseconds, as an operator would type it."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


async def test_a_scheduled_poll_opens_and_closes_by_itself(
    broker_with_processor: ManagedProcess,
    redis_proc: ManagedProcess,
    request: pytest.FixtureRequest,
) -> None:
    broker = broker_with_processor
    poll_id = unique_id(request)
    start = time.time()
    opens, closes = start + 2, start + 4
    poll_cli(redis_proc, "poll", "create", poll_id, "--option", "a", "--option", "b",
        "--opens-at", iso(opens), "--closes-at", iso(closes), "--grace-s", "0")  # fmt: skip
    states: list[str] = []

    async def follow() -> None:
        from processor.commands.watch import results_stream

        async for document in results_stream(results_url(broker), poll_id):
            if not states or states[-1] != document["state"]:
                states.append(document["state"])
            if document["state"] == "closed":
                return

    with Fleet(broker, poll_id, 1) as fleet:
        fleet.kiosks[0].vote(poll_id, 0)  # too early
        await eventually(lambda: fleet.unacked() == 0)
        assert fleet.codes() == {int(Reason.POLL_NOT_OPEN): 1}
        async with asyncio.timeout(30):
            await follow()
    assert states == ["scheduled", "open", "closed"]


async def test_deleting_a_poll_clears_its_retained_topics(
    broker: ManagedProcess,
    processor_proc: ManagedProcess,
    redis_proc: ManagedProcess,
    request: pytest.FixtureRequest,
) -> None:
    poll_id = unique_id(request)
    poll_cli(redis_proc, "poll", "create", poll_id, "--option", "a", "--option", "b")
    assert await retained(broker, config_topic(poll_id), f"{poll_id}-k1") is not None
    assert await retained(broker, results_topic(poll_id), f"{poll_id}-d1") is not None
    refused = votebox("poll", "delete", poll_id, "--redis-url", redis_proc.url)
    assert refused.returncode == 2 and "--yes" in refused.stderr
    client = f"{poll_id}-watch"
    async with aiomqtt.Client("127.0.0.1", broker.port, identifier=client, username=client) as c:
        await c.subscribe(f"polls/{poll_id}/+", qos=1)
        cleared: set[str] = set()
        deleted = False
        async with asyncio.timeout(20):
            async for message in c.messages:
                if message.payload == b"":
                    cleared.add(str(message.topic))
                if not deleted:  # both retained documents arrived first
                    deleted = True
                    await asyncio.to_thread(
                        poll_cli, redis_proc, "poll", "delete", poll_id, "--yes"
                    )
                if cleared == {
                    config_topic(poll_id),
                    results_topic(poll_id),
                    series_topic(poll_id),
                }:
                    break


async def test_a_close_is_published_at_once_not_at_the_next_rescan(
    redis: Redis, request: pytest.FixtureRequest
) -> None:
    """In process, with rescans an hour apart: only the pub/sub announcement can do it."""
    poll = Poll(id=unique_id(request), labels=("a", "b"))
    await create_poll(redis, poll)
    sent: list[tuple[str, bytes]] = []
    publisher = ResultsPublisher(
        redis=redis,
        publish=lambda topic, payload: sent.append((topic, payload)),
        interval_s=0.05,
        rescan_s=3600,
        timeout_s=5,
    )

    def closed() -> bool:
        return any(
            topic == results_topic(poll.id) and json.loads(payload)["state"] == "closed"
            for topic, payload in sent
        )

    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(publisher.run())
        await eventually(lambda: any(t == config_topic(poll.id) for t, _ in sent))
        await asyncio.sleep(0.2)  # subscribed to announcements by now
        await close_poll(redis, poll.id)
        await eventually(closed, timeout_s=10)
        task.cancel()


async def test_the_retained_series_counts_the_votes_of_the_last_minutes(
    broker_with_processor: ManagedProcess, redis: Redis, poll: Poll
) -> None:
    """docs/protocol.md, Votes per minute: sixty minutes, oldest first, summing to the votes."""
    broker = broker_with_processor
    with Fleet(broker, poll.id, 3) as fleet:
        await asyncio.to_thread(fleet.cast, poll.id, 45, lambda i: i % 3)
        for kiosk in fleet.kiosks:  # duplicates are not activity
            kiosk.vote(poll.id, 0, seq=kiosk.seq)
        await eventually(lambda: fleet.unacked() == 0, timeout_s=60)
    # One subscriber: the retained document first, then each one published after it, until
    # one has counted every vote (published at most every 5 s).
    seen: dict[str, Any] = {}
    client = f"{poll.id[:40]}-series"
    async with aiomqtt.Client("127.0.0.1", broker.port, identifier=client, username=client) as c:
        await c.subscribe(series_topic(poll.id), qos=1)
        async with asyncio.timeout(30):
            async for message in c.messages:
                if message.topic.value != series_topic(poll.id) or not message.payload:
                    continue
                assert isinstance(message.payload, bytes)
                seen = json.loads(message.payload)
                if sum(seen["counts"]) == 45:
                    break
    assert seen["poll"] == poll.id and seen["every_s"] == 60
    assert len(seen["counts"]) == 60
    # The votes were cast in the last minute or two: the newest buckets hold them.
    assert sum(seen["counts"][-2:]) == 45
    start = seen["start"]
    started = time.mktime(time.strptime(start[:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
    assert 59 * 60 <= time.time() - started < 61 * 60
