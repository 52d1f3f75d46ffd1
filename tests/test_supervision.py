"""Never a live process that does nothing: a part that fails ends the process for its
supervisor; SIGTERM ends it within its deadline whatever state
Redis or the broker is in."""

from __future__ import annotations

import asyncio
import re
import signal
import threading
import time
from collections.abc import Callable

import pytest
from redis.asyncio import Redis

from harness.services import ManagedProcess
from processor.keys import POLLS_CHANGED, PollKeys
from processor.poll import Poll
from processor.supervise import EXIT_FAILED, EXIT_STUCK, Watchdog, supervised
from tests.test_faults import wait_log

# The processor's default shutdown_timeout_s (10) and the watchdog's margin (3).
STOP_DEADLINE_S = 13.0


def test_the_watchdog_ends_the_process_at_the_earliest_deadline_unless_disarmed() -> None:
    ended: list[tuple[int, float]] = []
    fired = threading.Event()
    started = time.monotonic()

    def end(code: int) -> None:
        ended.append((code, time.monotonic() - started))
        fired.set()

    dog = Watchdog(exit=end)
    dog.arm(30.0, "a late deadline")
    dog.arm(0.2, "an early one")  # the earlier wins
    dog.arm(60.0, "a later one")  # and stays
    assert fired.wait(10)
    assert ended[0][0] == EXIT_STUCK and ended[0][1] < 30

    quiet = Watchdog(exit=end)
    quiet.arm(0.2, "a deadline")
    quiet.disarm()
    assert not quiet.armed
    time.sleep(0.5)
    assert len(ended) == 1


async def test_a_failing_part_is_reported_and_re_raised_and_cancellation_is_not() -> None:
    reported: list[tuple[str, BaseException]] = []

    async def broken() -> None:
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        await supervised("votebox.part", broken(), failed=lambda n, e: reported.append((n, e)))
    assert [(name, type(exc)) for name, exc in reported] == [("votebox.part", KeyError)]

    task = asyncio.create_task(
        supervised("votebox.idle", asyncio.sleep(60), failed=lambda n, e: reported.append((n, e)))
    )
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(reported) == 1


@pytest.mark.e2e
async def test_a_part_that_fails_ends_the_processor_with_its_cause_logged(
    mosquitto_proc: ManagedProcess,
    spawn_processor: Callable[..., ManagedProcess],
    poll: Poll,
    redis: Redis,
) -> None:
    proc = spawn_processor(mosquitto_proc)
    await wait_log(proc, "ready: consuming")
    # A tally that is not a hash, and its poll announced as changed: the results publisher
    # and the stats reader cannot read it (whichever looks first fails), and no retry will
    # change that.
    keys = PollKeys(poll.id)
    await redis.delete(keys.tally)
    await redis.set(keys.tally, "not a hash")
    try:
        await redis.publish(POLLS_CHANGED, poll.id)
        assert proc.proc is not None
        code = await asyncio.to_thread(proc.proc.wait, 30)
    finally:
        await redis.delete(keys.tally)  # or every later processor would fail the same way
    assert code == EXIT_FAILED
    log = proc.log_text(since_start=True)
    assert re.search(r"votebox\.(results|stats) failed", log) and "WRONGTYPE" in log, log[-3000:]


@pytest.mark.e2e
@pytest.mark.parametrize("frozen", ["redis", "broker"])
async def test_sigterm_ends_the_processor_in_time_whatever_redis_or_the_broker_does(
    frozen: str,
    mosquitto_proc: ManagedProcess,
    redis_proc: ManagedProcess,
    spawn_processor: Callable[..., ManagedProcess],
    poll: Poll,
) -> None:
    proc = spawn_processor(mosquitto_proc)
    await wait_log(proc, "ready: consuming")
    server = redis_proc if frozen == "redis" else mosquitto_proc
    server.signal(signal.SIGSTOP)  # answers nothing and closes nothing: a partition
    try:
        await asyncio.sleep(0.5)
        assert proc.proc is not None
        proc.signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.proc.wait, STOP_DEADLINE_S + 10)
    finally:
        server.signal(signal.SIGCONT)
    assert code in (0, EXIT_STUCK), proc.log_text(since_start=True)[-3000:]
