"""Real faults: SIGKILL, SIGTERM, outages, restarts (docs/operations.md, what each failure costs).

Each test checks the same three things: the tally equals the unique votes sent, nothing is
lost silently, nothing is counted twice.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable

import pytest
from redis.asyncio import Redis

from harness.services import ManagedProcess, end_session
from processor.commands.watch import wait_for_results
from processor.poll import Poll
from processor.poll_store import read_results
from tests.conftest import eventually, unique_id
from tests.fleet import Fleet, results_url
from tests.proxy import proxy_to
from tests.test_audit import audits_clean
from tests.test_influx import influx_env

pytestmark = pytest.mark.e2e


async def total_of(redis: Redis, poll: Poll) -> int:
    return (await read_results(redis, [poll.id]))[poll.id].total


async def settled_total(
    redis: Redis, poll: Poll, expected: int, *, timeout_s: float = 60, settle_s: float = 1.0
) -> int:
    """The total once it has reached ``expected`` and then stayed put for ``settle_s``: a
    double count that comes after the total first reaches ``expected`` shows."""

    async def reached() -> bool:
        return await total_of(redis, poll) >= expected

    await eventually(reached, timeout_s=timeout_s)
    last = await total_of(redis, poll)
    while True:
        await asyncio.sleep(settle_s)
        now = await total_of(redis, poll)
        if now == last:
            return now
        last = now


async def until_total(redis: Redis, poll: Poll, expected: int, timeout_s: float = 60) -> None:
    assert await settled_total(redis, poll, expected, timeout_s=timeout_s) == expected


async def wait_log(
    proc: ManagedProcess, text: str | Callable[[str], bool], timeout_s: float = 30
) -> None:
    found = text if callable(text) else (lambda log: text in log)
    await eventually(lambda: found(proc.log_text(since_start=True)), timeout_s=timeout_s)


async def send(fleet: Fleet, poll: Poll, n: int, *, choice: int = 1) -> None:
    def publish() -> None:
        fleet.cast(poll.id, n, choice)
        for kiosk in fleet.kiosks:
            assert kiosk.wait_published(60) == len(kiosk._infos)

    await asyncio.to_thread(publish)


@pytest.fixture
def paused_redis(redis_proc: ManagedProcess):  # type: ignore[no-untyped-def]
    """SIGSTOP/SIGCONT the shared redis-server; always resumed, even when the test fails."""
    paused = []

    def pause() -> None:
        redis_proc.signal(signal.SIGSTOP)
        paused.append(True)

    def resume() -> None:
        if paused:
            redis_proc.signal(signal.SIGCONT)
            paused.clear()

    yield pause, resume
    resume()


async def test_sigkill_between_receive_and_commit_counts_each_vote_once(
    broker: ManagedProcess,
    processor_proc: ManagedProcess,
    poll: Poll,
    redis: Redis,
    paused_redis: tuple[Callable[[], None], Callable[[], None]],
) -> None:
    pause, resume = paused_redis
    with Fleet(broker, poll.id, 5) as fleet:
        await send(fleet, poll, 10)
        await until_total(redis, poll, 10)
        pause()  # commits now hang: the processor holds what it receives, un-acked
        await send(fleet, poll, 300)
        await wait_log(processor_proc, "300 deliveries held")
        processor_proc.kill()
        resume()
        # At most the one batch already inside Redis's socket buffer can have landed.
        assert await total_of(redis, poll) < 310
        processor_proc.start()
        if broker.name == "amqtt":
            # amqtt 0.12.1 does not resend in-flight QoS 1 messages to a resumed session
            # (Yakifo/amqtt#401): the broker has dropped them. The kiosks still hold them,
            # un-acked, and send them again, as docs/protocol.md tells firmware to.
            await asyncio.sleep(2)
            assert await total_of(redis, poll) < 310, "amqtt resent after all: update the docs"
            resent = await asyncio.to_thread(fleet.resend_unacked)
            assert resent > 0
        await until_total(redis, poll, 310)
        await eventually(lambda: fleet.unacked() == 0)


async def test_random_sigkills_during_a_stream_count_exactly_once(
    mosquitto_proc: ManagedProcess,
    poll: Poll,
    redis: Redis,
    redis_proc: ManagedProcess,
    influx_proc: ManagedProcess,
    spawn_processor: Callable[..., ManagedProcess],
) -> None:
    influx = influx_env(influx_proc, poll.id)
    proc = spawn_processor(mosquitto_proc, **influx)
    with Fleet(mosquitto_proc, poll.id, 10) as fleet:
        async with asyncio.TaskGroup() as tg:  # the sender is awaited at the end
            tg.create_task(send(fleet, poll, 4000))
            for kill_at in (0.15, 0.3, 0.25, 0.4):
                await asyncio.sleep(kill_at)
                proc.kill()  # after a commit, before its PUBACK, or anywhere else
                proc.start()
        await until_total(redis, poll, 4000, timeout_s=90)
        await eventually(lambda: fleet.unacked() == 0, timeout_s=30)
    # Killed anywhere, the commit and its link were one step: the chain holds every vote.
    said = await asyncio.to_thread(
        audits_clean, poll.id, influx | {"VOTEBOX_REDIS_URL": redis_proc.url}
    )
    assert "OK: 4000 entries" in said


async def test_sigterm_mid_stream_finishes_the_batch_and_loses_nothing(
    broker: ManagedProcess, processor_proc: ManagedProcess, poll: Poll, redis: Redis
) -> None:
    with Fleet(broker, poll.id, 10) as fleet:
        async with asyncio.TaskGroup() as tg:  # the sender is awaited at the end
            tg.create_task(send(fleet, poll, 3000))
            await asyncio.sleep(0.3)
            started = time.monotonic()
            assert processor_proc.stop(timeout_s=15) == 0  # exits by itself, cleanly
            assert time.monotonic() - started < 12
        processor_proc.start()
        if broker.name == "amqtt":
            # The drain ends after 250 ms without a delivery; on a loaded machine amqtt can
            # pause that long with votes still in flight to us, and it does not resend them
            # to the resumed session (docs/brokers.md). The kiosks re-send what has no ack.
            await asyncio.sleep(3)
            await asyncio.to_thread(fleet.resend_unacked)
        await until_total(redis, poll, 3000, timeout_s=90)
        await eventually(lambda: fleet.unacked() == 0, timeout_s=30)


async def test_votes_sent_while_the_processor_is_down_all_arrive(
    broker: ManagedProcess, processor_proc: ManagedProcess, poll: Poll, redis: Redis
) -> None:
    with Fleet(broker, poll.id, 10) as fleet:
        await send(fleet, poll, 10)
        await until_total(redis, poll, 10)
        processor_proc.stop()
        await send(fleet, poll, 5000)  # queued by the broker for the persistent session
        assert await total_of(redis, poll) == 10
        processor_proc.start()
        await until_total(redis, poll, 5010, timeout_s=90)
        await eventually(lambda: fleet.unacked() == 0, timeout_s=30)


async def test_redis_restart_mid_stream_loses_and_doubles_nothing(
    broker: ManagedProcess,
    spawn_processor: Callable[..., ManagedProcess],
    redis_proc: ManagedProcess,
    influx_proc: ManagedProcess,
    poll: Poll,
    redis: Redis,
) -> None:
    influx = influx_env(influx_proc, poll.id)
    processor_proc = spawn_processor(broker, **influx)
    with Fleet(broker, poll.id, 10) as fleet:
        async with asyncio.TaskGroup() as tg:  # the sender is awaited at the end
            tg.create_task(send(fleet, poll, 2000))
            await asyncio.sleep(0.2)  # some committed, some in flight, some not sent yet
            redis_proc.stop()  # redis-server writes its AOF on SIGTERM
            try:
                # Votes still arriving meet the outage (on a fast machine all 2,000 may be in
                # before the stop: then these make sure some commit fails).
                await send(fleet, poll, 100)
                await wait_log(processor_proc, "none acked")
            finally:
                redis_proc.start()  # whatever happened: the later tests need Redis
        if broker.name == "amqtt":
            # If the outage outlasted amqtt's fixed 5 s PUBACK timeout, it dropped deliveries
            # (docs/brokers.md); kiosks re-send what has no ack, and nothing counts twice.
            await asyncio.sleep(3)
            await asyncio.to_thread(fleet.resend_unacked)
        await until_total(redis, poll, 2100, timeout_s=90)
        await eventually(lambda: fleet.unacked() == 0, timeout_s=30)
    said = await asyncio.to_thread(
        audits_clean, poll.id, influx | {"VOTEBOX_REDIS_URL": redis_proc.url}
    )
    assert "OK: 2100 entries" in said


async def test_restarted_processor_republishes_results_and_version_never_goes_back(
    broker: ManagedProcess, processor_proc: ManagedProcess, poll: Poll, redis: Redis
) -> None:
    with Fleet(broker, poll.id, 2) as fleet:
        await send(fleet, poll, 20)
        first = await wait_for_results(
            results_url(broker), poll.id, lambda d: d["total"] == 20, timeout_s=30
        )
        processor_proc.stop()
        # Wipe the retained message, as a broker that lost its store would have.
        fleet.kiosks[0]._client.publish(
            f"polls/{poll.id}/results", b"", qos=1, retain=True
        ).wait_for_publish(5)
        processor_proc.start()
        again = await wait_for_results(results_url(broker), poll.id, lambda d: True, timeout_s=30)
        assert again["version"] == first["version"] and again["counts"] == first["counts"]
        await send(fleet, poll, 1)
        later = await wait_for_results(
            results_url(broker), poll.id, lambda d: d["total"] == 21, timeout_s=30
        )
        assert later["version"] > first["version"]


async def test_mosquitto_restart_keeps_votes_queued_for_the_away_processor(
    mosquitto_proc: ManagedProcess,
    poll: Poll,
    redis: Redis,
    spawn_processor: Callable[..., ManagedProcess],
) -> None:
    proc = spawn_processor(mosquitto_proc)
    with Fleet(mosquitto_proc, poll.id, 4) as fleet:
        await send(fleet, poll, 8)
        await until_total(redis, poll, 8)
        proc.stop()
        await send(fleet, poll, 500)
    mosquitto_proc.stop()  # writes its persistence file on a clean stop
    mosquitto_proc.start()
    proc.start()
    await until_total(redis, poll, 508, timeout_s=60)


async def test_broker_restart_while_the_processor_runs_is_survived(
    broker: ManagedProcess, processor_proc: ManagedProcess, poll: Poll, redis: Redis
) -> None:
    with Fleet(broker, poll.id, 4) as fleet:
        await send(fleet, poll, 40)
        await until_total(redis, poll, 40)
        broker.stop()
        broker.start()
        # amqtt forgets every session and queue on restart: the processor must notice, resume
        # with a new session and subscribe again; kiosks reconnect and re-send what has no ack.
        await wait_log(processor_proc, lambda log: log.count("connected to") >= 2)
        await send(fleet, poll, 40)
        await asyncio.to_thread(fleet.resend_unacked)
        await until_total(redis, poll, 80, timeout_s=60)
        await eventually(lambda: fleet.unacked() == 0, timeout_s=30)


async def test_intake_stays_bounded_while_redis_is_stuck_and_loses_nothing(
    broker: ManagedProcess,
    poll: Poll,
    redis: Redis,
    paused_redis: tuple[Callable[[], None], Callable[[], None]],
    spawn_processor: Callable[..., ManagedProcess],
) -> None:
    pause, resume = paused_redis
    proc = spawn_processor(broker, VOTEBOX_MQTT_RECEIVE_MAX="50")
    try:
        with Fleet(broker, poll.id, 5) as fleet:
            pause()
            await send(fleet, poll, 1000)
            # Two failed commits logged: the intake has had time to fill up to its bound.
            await wait_log(proc, lambda log: log.count("none acked") >= 2, timeout_s=30)
            held = [
                int(line.split(" deliveries held")[0].rsplit(" ", 1)[1])
                for line in proc.log_text(since_start=True).splitlines()
                if " deliveries held" in line
            ]
            # MQTT 5 brokers stop at Receive Maximum (50); for amqtt, which ignores flow
            # control, the intake stops reading at twice that.
            assert 0 < max(held) <= 100
            resume()
            if broker.name == "amqtt":
                # amqtt 0.12.1 gives up on a QoS 1 delivery that has no PUBACK within 5 s
                # (a fixed timeout in its protocol handler): votes it had not yet written to
                # the stalled processor are dropped. Kiosks re-send what has no ack.
                await asyncio.sleep(3)
                await asyncio.to_thread(fleet.resend_unacked)
            await until_total(redis, poll, 1000, timeout_s=90)
            await eventually(lambda: fleet.unacked() == 0, timeout_s=30)
    finally:
        resume()


async def resend_until_acked(fleet: Fleet, *, every_s: float = 2.0, timeout_s: float = 60) -> None:
    """What a device does when no ack comes: send its outbox again, until all is answered."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while fleet.unacked():
        assert asyncio.get_running_loop().time() < deadline, f"{fleet.unacked()} never acked"
        await asyncio.sleep(every_s)
        await asyncio.to_thread(fleet.resend_unacked)


async def test_a_client_that_takes_the_processors_session_costs_no_vote_and_is_said(
    broker: ManagedProcess,
    poll: Poll,
    redis: Redis,
    spawn_processor: Callable[..., ManagedProcess],
    request: pytest.FixtureRequest,
) -> None:
    proc = spawn_processor(broker, VOTEBOX_MQTT_KEEPALIVE_S="2")
    with Fleet(broker, poll.id, 4) as fleet:
        await send(fleet, poll, 20)
        await until_total(redis, poll, 20)
        # Someone connects under the processor's client id with a clean session and leaves:
        # the broker drops the processor's session. Mosquitto disconnects the processor and
        # says why (MQTT 5); amqtt says nothing and stops routing to it, which the processor's
        # probe finds out within a keepalive.
        await asyncio.to_thread(end_session, broker, unique_id(request, "-0"))
        await wait_log(proc, "no session for")
        await send(fleet, poll, 20)
        await resend_until_acked(fleet)
        await until_total(redis, poll, 40)


async def test_a_partition_between_the_processor_and_redis_loses_and_doubles_nothing(
    mosquitto_proc: ManagedProcess,
    redis_proc: ManagedProcess,
    poll: Poll,
    redis: Redis,
    spawn_processor: Callable[..., ManagedProcess],
) -> None:
    """Redis stops answering the processor, and only the processor, without a closed socket:
    a commit in flight may reach Redis after the processor gave up on it; its retry gets the
    first answer (accepted), nothing is acked during the partition, all counted once."""
    async with proxy_to(redis_proc.port) as proxy:
        # Started from a thread: the proxy runs on this loop and must forward meanwhile.
        proc = await asyncio.to_thread(
            spawn_processor,
            mosquitto_proc,
            VOTEBOX_REDIS_URL=f"redis://127.0.0.1:{proxy.port}/0",
        )
        await wait_log(proc, "ready: consuming")
        with Fleet(mosquitto_proc, poll.id, 5) as fleet:
            await send(fleet, poll, 100)
            await until_total(redis, poll, 100)
            await eventually(lambda: fleet.unacked() == 0, timeout_s=30)
            proxy.hold()
            try:
                await send(fleet, poll, 200)
                await wait_log(proc, lambda log: log.count("none acked") >= 1, timeout_s=30)
                assert fleet.unacked() == 200  # nothing acked while Redis is away
            finally:
                proxy.release()
            await until_total(redis, poll, 300)
            await eventually(lambda: fleet.unacked() == 0, timeout_s=30)
            assert set(fleet.codes()) == {0}, fleet.codes()  # accepted, even after a retry


async def test_a_partition_between_the_processor_and_the_broker_loses_nothing(
    mosquitto_proc: ManagedProcess,
    poll: Poll,
    redis: Redis,
    spawn_processor: Callable[..., ManagedProcess],
) -> None:
    """The broker stops reaching the processor, and only it: the processor finds out by its
    keepalive, reconnects when it can, resumes its session, and the votes devices sent
    meanwhile (queued in the session) all count once."""
    async with proxy_to(mosquitto_proc.port) as proxy:
        proc = await asyncio.to_thread(
            spawn_processor,
            mosquitto_proc,
            VOTEBOX_MQTT_URL=f"mqtt://processor@127.0.0.1:{proxy.port}",
            VOTEBOX_MQTT_KEEPALIVE_S="2",
        )
        await wait_log(proc, "ready: consuming")
        with Fleet(mosquitto_proc, poll.id, 5) as fleet:
            await send(fleet, poll, 50)
            await until_total(redis, poll, 50)
            proxy.hold()
            try:
                await send(fleet, poll, 100)
                await wait_log(proc, "no PINGRESP", timeout_s=30)
            finally:
                proxy.release()
            await wait_log(proc, lambda log: log.count("connected to") >= 2, timeout_s=60)
            await resend_until_acked(fleet)
            await until_total(redis, poll, 150)


async def test_two_processors_with_one_client_id_are_said_loudly_and_count_exactly(
    broker: ManagedProcess,
    poll: Poll,
    redis: Redis,
    spawn_processor: Callable[..., ManagedProcess],
    request: pytest.FixtureRequest,
) -> None:
    """Started by mistake with the same client id, two processors push each other off the one
    session: each says so at error level (Mosquitto 2.0.15 and later tell with DISCONNECT 0x8E;
    before that, and on amqtt, the
    probe finds the session gone, or the broker closes connection after connection), and with
    the devices' re-sends every vote counts once."""
    same = {"VOTEBOX_MQTT_CLIENT_ID": unique_id(request, "-same"), "VOTEBOX_MQTT_KEEPALIVE_S": "2"}
    first = spawn_processor(broker, **same)
    second = spawn_processor(broker, **same)
    try:
        with Fleet(broker, poll.id, 4) as fleet:
            await send(fleet, poll, 40)

            def loud() -> bool:
                logs = first.log_text(since_start=True) + second.log_text(since_start=True)
                return "level=error" in logs and "another client is using our client id" in logs

            await eventually(loud, timeout_s=30)
            await resend_until_acked(fleet)
            await until_total(redis, poll, 40)
    finally:
        second.stop()
        first.stop()
        end_session(broker, same["VOTEBOX_MQTT_CLIENT_ID"])
