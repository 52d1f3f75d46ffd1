"""Redis away in every way a real redis-server says it, mid-stream (restarted, refusing writes,
stuck): nothing acknowledged while it lasts, not ready, no vote answered `store_error`, and
afterwards every vote counted exactly once.

Each case runs on a redis-server of its own, since each bends the server's state.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis as sync_redis
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from harness.services import ManagedProcess, free_port, redis_server
from processor.codec import Vote
from processor.errors import StoreUnavailable
from processor.poll import Poll
from processor.poll_store import create_poll, read_results
from processor.reasons import Fate, Reason
from processor.store import redis_errors, store_is_away
from processor.tally import Tally
from tests.conftest import eventually, unique_id
from tests.fleet import Fleet
from tests.test_faults import send, settled_total, wait_log

pytestmark = pytest.mark.e2e


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[ManagedProcess]:
    with redis_server(tmp_path / "redis") as proc:
        yield proc


def _client(proc: ManagedProcess) -> sync_redis.Redis:
    return sync_redis.Redis.from_url(proc.url, socket_timeout=30)


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def _wait_for(check: Callable[[], bool], timeout_s: float = 10.0) -> None:
    for _ in range(int(timeout_s / 0.01)):
        if check():
            return
        threading.Event().wait(0.01)
    raise AssertionError("Redis never got there")


class _Busy:
    """A script of another client's that runs for a while: Redis answers BUSY meanwhile."""

    def __init__(self, proc: ManagedProcess) -> None:
        self._proc = proc
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        r = _client(self._proc)
        r.config_set("busy-reply-threshold", 100)
        script = "local t = redis.call('TIME')[1] while redis.call('TIME')[1] - t < 4 do end"
        self._thread = threading.Thread(target=r.eval, args=(script, 0), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._thread.join(30)  # the script ends by itself after 4 s


def _away(kind: str, proc: ManagedProcess) -> tuple[Callable[[], object], Callable[[], object]]:
    """How to make ``proc`` refuse writes as ``kind``, and how to end it."""
    r = _client(proc)
    if kind == "READONLY":  # a primary demoted to a replica (of a master that is not there)
        return (lambda: r.replicaof("127.0.0.1", "1")), (lambda: r.replicaof("NO", "ONE"))
    if kind == "OOM":  # maxmemory reached with the default noeviction policy
        return (lambda: r.config_set("maxmemory", 1)), (lambda: r.config_set("maxmemory", 0))
    if kind == "NOREPLICAS":
        return (
            lambda: r.config_set("min-replicas-to-write", 1),
            lambda: r.config_set("min-replicas-to-write", 0),
        )
    if kind == "MISCONF":  # a failed background save with stop-writes-on-bgsave-error yes

        def fail_a_save() -> None:
            r.config_set("save", "3600 1")  # Redis refuses writes so only when it saves RDBs
            r.set("filler", "x")
            r.config_set("rdb-key-save-delay", 2_000_000)  # the child takes its time
            _wait_for(lambda: not _children(proc.pid))  # e.g. the AOF rewrite at start
            r.bgsave()
            _wait_for(lambda: r.info("persistence")["rdb_bgsave_in_progress"] == 1)
            # Our server's save dies: it refuses writes until a save succeeds (once it has
            # reaped the child, at its next cron tick).
            for child in _children(proc.pid):
                os.kill(child, signal.SIGKILL)
            _wait_for(lambda: r.info("persistence")["rdb_last_bgsave_status"] == "err")

        def save_again() -> None:
            r.config_set("rdb-key-save-delay", 0)
            for _ in range(100):
                try:
                    r.bgsave()
                    break
                except sync_redis.ResponseError:  # the killed save is still being reaped
                    threading.Event().wait(0.05)
            _wait_for(lambda: r.info("persistence")["rdb_last_bgsave_status"] == "ok")

        return fail_a_save, save_again
    if kind == "BUSY":
        busy = _Busy(proc)
        return busy.start, busy.stop
    if kind == "LOADING":  # a restart that loads a large data set, slowly

        def restart_loading() -> None:
            r.eval("for i = 1, 20000 do redis.call('SET', 'fill:' .. i, 'x') end", 0)
            proc.stop()
            proc.argv += ["--key-load-delay", "100"]
            proc.start(wait=False)

        def loaded() -> None:
            proc.argv = proc.argv[:-2]
            proc.wait_ready()  # PING answers PONG once loading is done

        return restart_loading, loaded
    raise AssertionError(kind)


def _readiness(port: int) -> dict[str, object]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as answer:
            body: dict[str, object] = json.loads(answer.read())
    except urllib.error.HTTPError as refused:
        body = json.loads(refused.read())
    return body


@pytest.mark.parametrize("kind", ["READONLY", "LOADING", "OOM", "MISCONF", "BUSY", "NOREPLICAS"])
async def test_redis_refusing_writes_mid_stream_acks_nothing_and_loses_nothing(
    kind: str,
    mosquitto_proc: ManagedProcess,
    own_redis: ManagedProcess,
    spawn_processor: Callable[..., ManagedProcess],
    request: pytest.FixtureRequest,
) -> None:
    # The test's own reads ride out the restart of the LOADING case.
    redis = Redis.from_url(
        own_redis.url,
        retry=Retry(ExponentialBackoff(cap=1.0), retries=30),
        retry_on_error=[RedisConnectionError],
    )
    try:
        poll = Poll(id=unique_id(request), labels=("red", "green", "blue"))
        await create_poll(redis, poll)
        metrics_port = free_port()
        proc = spawn_processor(
            mosquitto_proc,
            VOTEBOX_REDIS_URL=own_redis.url,
            VOTEBOX_METRICS_PORT=str(metrics_port),
        )
        start, end = _away(kind, own_redis)
        with Fleet(mosquitto_proc, poll.id, 5) as fleet:
            await send(fleet, poll, 100)
            assert await settled_total(redis, poll, 100) == 100
            await asyncio.to_thread(start)
            try:
                await send(fleet, poll, 200)
                await wait_log(proc, lambda log: log.count("none acked") >= 2)
                assert fleet.unacked() > 0  # the votes sent meanwhile: no ack yet
                body = await asyncio.to_thread(_readiness, metrics_port)
                assert body["ready"] is False, body
            finally:
                await asyncio.to_thread(end)
            assert await settled_total(redis, poll, 300, timeout_s=60) == 300
            await eventually(lambda: fleet.unacked() == 0, timeout_s=30)
            codes = fleet.codes()
            assert int(Reason.STORE_ERROR) not in codes, codes
            assert set(codes) <= {int(Fate.ACCEPTED), int(Fate.DUPLICATE)}, codes
            assert codes[int(Fate.ACCEPTED)] == 300
            await eventually(lambda: _readiness(metrics_port)["ready"] is True, timeout_s=30)
        log = proc.log_text(since_start=True)
        assert "Traceback" not in log, log[-3000:]
        assert (await read_results(redis, [poll.id]))[poll.id].counts == (0, 300, 0)
    finally:
        await redis.aclose()


@pytest.mark.parametrize("kind", ["READONLY", "OOM", "NOREPLICAS", "MISCONF", "BUSY"])
async def test_each_refusal_is_the_store_being_away_and_writes_nothing(
    kind: str, own_redis: ManagedProcess, request: pytest.FixtureRequest
) -> None:
    """The seam's vocabulary, reply by reply, on the tally's own path (no processor)."""
    redis = Redis.from_url(own_redis.url, socket_timeout=10)
    try:
        poll = Poll(id=unique_id(request), labels=("a", "b"))
        await create_poll(redis, poll)
        tally = Tally(redis, timeout_s=10)
        await tally.load()
        start, end = _away(kind, own_redis)
        await asyncio.to_thread(start)
        try:
            if kind == "BUSY":
                await asyncio.sleep(0.3)  # past busy-reply-threshold
            with pytest.raises(StoreUnavailable) as caught:
                await tally.commit([Vote(poll.id, "k1", 1, 1)], now_ms=1, token="t")
            assert store_is_away(caught.value.__cause__)  # type: ignore[arg-type]
            with pytest.raises(StoreUnavailable), redis_errors():
                await redis.hset("some-hash", "f", "v")
        finally:
            await asyncio.to_thread(end)
        assert (await read_results(redis, [poll.id]))[poll.id].total == 0
        assert (await tally.commit([Vote(poll.id, "k1", 1, 1)], now_ms=2, token="t")).codes == [
            int(Fate.ACCEPTED)
        ]
    finally:
        await redis.aclose()
