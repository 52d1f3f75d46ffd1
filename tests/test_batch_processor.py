"""The batch processor between a scripted broker on a real socket and a real Redis: what it
acks to the broker and answers the devices, in which order, and what it holds back."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import cbor2
from redis.asyncio import Redis

from devices.encoder import encode_vote
from processor.codec import Vote
from processor.metrics import Metrics
from processor.mqtt import Delivery, MqttIntake
from processor.poll import Poll
from processor.poll_store import read_results
from processor.results import ResultsPublisher
from processor.service import BatchProcessor, consume_votes
from processor.tally import CommitResult, Tally
from tests.conftest import eventually
from tests.test_mqtt_intake import Packet, Peer, scripted_broker, settings


def _processor(intake: MqttIntake, redis: Redis, stop: asyncio.Event) -> BatchProcessor:
    tally = Tally(redis, timeout_s=2)
    results = ResultsPublisher(
        redis=redis, publish=lambda t, p: None, interval_s=0.1, rescan_s=60, timeout_s=2
    )
    return BatchProcessor(tally=tally, intake=intake, results=results, stop=stop, metrics=Metrics())


async def test_a_batch_is_committed_then_answered_then_acked_in_order(
    poll: Poll, redis: Redis
) -> None:
    got: list[Packet] = []

    async def script(peer: Peer, n: int) -> None:
        await peer.handshake()
        await asyncio.sleep(0.2)
        peer.publish(f"votes/{poll.id}/k1", encode_vote(0, 1), 11)
        peer.publish(f"votes/{poll.id}/k1", b"\xff", 12)
        peer.publish(f"votes/{poll.id}/k1", encode_vote(2, 2), 13)
        while len(got) < 4:
            packet = await peer.read()
            if packet.kind == 12:
                peer.send(b"\xd0\x00")
            else:
                got.append(packet)

    async with scripted_broker(script) as (port, _):
        async with MqttIntake(settings=settings(port, mqtt_receive_max=10),
                              topic_filters=["votes/#"]) as intake:  # fmt: skip
            batch: list[Delivery] = []
            while len(batch) < 3:
                batch += await intake.next_batch(10)
            await _processor(intake, redis, asyncio.Event()).process(batch)
            await eventually(lambda: len(got) == 4, timeout_s=10)
    # The device's answer first (QoS 0), then the PUBACKs, in the order of the PUBLISHes
    # (MQTT-4.6.0-2).
    answer, *pubacks = got
    assert answer.kind == 3 and b"acks/k1" in answer.body
    assert cbor2.loads(answer.body[2 + len(b"acks/k1") :]) == [
        [0, 1, 0],
        [None, None, 17],
        [0, 2, 0],
    ]
    assert [(p.kind, p.mid) for p in pubacks] == [(4, 11), (4, 12), (4, 13)]
    assert (await read_results(redis, [poll.id]))[poll.id].counts == (1, 0, 1)


async def test_nothing_is_acked_when_the_commit_cannot_be_made(poll: Poll) -> None:
    got: list[Packet] = []

    async def script(peer: Peer, n: int) -> None:
        await peer.handshake()
        await asyncio.sleep(0.2)
        peer.publish(f"votes/{poll.id}/k1", encode_vote(0, 1), 21)
        while True:
            packet = await peer.read(30)
            if packet.kind == 12:
                peer.send(b"\xd0\x00")
            else:
                got.append(packet)

    dead = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5)
    stop = asyncio.Event()
    try:
        async with scripted_broker(script) as (port, _):
            async with MqttIntake(settings=settings(port), topic_filters=["votes/#"]) as intake:
                batch = await intake.next_batch(10)
                processing = asyncio.create_task(_processor(intake, dead, stop).process(batch))
                await asyncio.sleep(1.0)  # retrying: Redis refuses
                assert not processing.done() and intake.held == 1
                stop.set()  # a stop during the outage leaves the batch un-acked
                await asyncio.wait_for(processing, 10)
                await asyncio.sleep(0.3)
                assert intake.held == 1
    finally:
        await dead.aclose()
    # No answer to the device, no PUBACK: only the DISCONNECT of the intake's close.
    assert [p.kind for p in got] == [14]


class _HeldFirstCommit(Tally):
    """A real Tally whose first commit reaches Redis only after the second one has come back:
    the order a slow round trip can give two batches in flight."""

    def __init__(self, redis: Redis) -> None:
        super().__init__(redis, timeout_s=2)
        self.calls = 0
        self.finished: list[int] = []
        self._second_done = asyncio.Event()

    async def commit(self, votes: Sequence[Vote], **kwargs: Any) -> CommitResult:
        self.calls += 1
        call = self.calls
        if call == 1:
            await self._second_done.wait()
        result = await super().commit(votes, **kwargs)
        self.finished.append(call)
        if call == 2:
            self._second_done.set()
        return result


async def test_the_next_batch_commits_while_one_is_in_flight_and_pubacks_keep_their_order(
    poll: Poll, redis: Redis
) -> None:
    got: list[Packet] = []

    async def script(peer: Peer, n: int) -> None:
        await peer.handshake()
        await asyncio.sleep(0.2)
        peer.publish(f"votes/{poll.id}/k1", encode_vote(0, 1), 31)
        await asyncio.sleep(0.3)  # the first batch is in flight: the next one is another
        peer.publish(f"votes/{poll.id}/k2", encode_vote(1, 1), 32)
        while True:
            packet = await peer.read(30)
            if packet.kind == 12:
                peer.send(b"\xd0\x00")
            elif packet.kind == 4:
                got.append(packet)

    tally = _HeldFirstCommit(redis)
    stop = asyncio.Event()
    async with scripted_broker(script) as (port, _):
        async with MqttIntake(settings=settings(port), topic_filters=["votes/#"]) as intake:
            results = ResultsPublisher(
                redis=redis, publish=lambda t, p: None, interval_s=0.1, rescan_s=60, timeout_s=2
            )
            processor = BatchProcessor(
                tally=tally, intake=intake, results=results, stop=stop, metrics=Metrics()
            )
            consuming = asyncio.create_task(
                consume_votes(intake, processor, stop, batch_max=10, in_flight=2)
            )
            await eventually(lambda: len(got) == 2, timeout_s=10)
            stop.set()
            await asyncio.wait_for(consuming, 10)
    # The second batch was committed first, and still acknowledged second (MQTT-4.6.0-2).
    assert tally.finished == [2, 1]
    assert [p.mid for p in got] == [31, 32]
    assert (await read_results(redis, [poll.id]))[poll.id].counts[:2] == (1, 1)
