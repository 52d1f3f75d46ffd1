"""Real servers for the tests, session-scoped: redis-server, mosquitto, amqtt, influxd.

Each runs on a free 127.0.0.1 port with data under pytest's temporary folder, is probed until
ready, and is stopped by PID at the end. Tests isolate themselves by unique poll and client ids.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.remote.webdriver import WebDriver

from harness.services import (
    ManagedProcess,
    amqtt_broker,
    end_session,
    influxdb,
    mosquitto,
    processor,
    redis_server,
)
from processor.poll import Poll
from processor.poll_store import create_poll

# Test data kept in the repository (tests/data/README.md says where each file comes from).
DATA = Path(__file__).resolve().parent / "data"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def redis_proc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedProcess]:
    with redis_server(tmp_path_factory.mktemp("redis")) as proc:
        yield proc


@pytest.fixture(scope="session")
def mosquitto_proc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedProcess]:
    with mosquitto(tmp_path_factory.mktemp("mosquitto")) as proc:
        yield proc


@pytest.fixture(scope="session")
def amqtt_proc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedProcess]:
    with amqtt_broker(tmp_path_factory.mktemp("amqtt")) as proc:
        yield proc


@pytest.fixture(scope="session")
def influx_proc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedProcess]:
    with influxdb(tmp_path_factory.mktemp("influxdb")) as proc:
        yield proc


@pytest.fixture(params=["amqtt", "mosquitto"])
def broker(request: pytest.FixtureRequest) -> ManagedProcess:
    """Each broker in turn: the embedded default and the production one."""
    proc: ManagedProcess = request.getfixturevalue(f"{request.param}_proc")
    return proc


@pytest.fixture
async def redis(redis_proc: ManagedProcess) -> AsyncIterator[Redis]:
    # Retries: some tests restart redis-server under this client's pooled connections.
    client = Redis.from_url(
        redis_proc.url,
        retry=Retry(ExponentialBackoff(cap=1.0), retries=20),
        retry_on_error=[RedisConnectionError],
    )
    try:
        yield client
    finally:
        await client.aclose()


def unique_id(request: pytest.FixtureRequest, suffix: str = "") -> str:
    """A poll or client id derived from the test's name (1-64 chars of [A-Za-z0-9_-])."""
    name = re.sub(r"[^A-Za-z0-9_-]", "-", request.node.name.removeprefix("test_")) + suffix
    if len(name) > 56:  # keep it unique: parametrized names differ only at the end
        name = name[:47] + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]
    return name


@pytest.fixture
async def poll(request: pytest.FixtureRequest, redis: Redis) -> Poll:
    """A fresh three-option poll named after the test."""
    created = Poll(id=unique_id(request), labels=("red", "green", "blue"), title="colour?")
    await create_poll(redis, created)
    return created


def processor_env(
    broker: ManagedProcess, redis_proc: ManagedProcess, client_id: str
) -> dict[str, str]:
    """Environment for a processor on ``broker`` (MQTT 5 on mosquitto, 3.1.1 on amqtt)."""
    return {
        "VOTEBOX_MQTT_URL": f"mqtt://processor@127.0.0.1:{broker.port}",
        "VOTEBOX_MQTT_PROTOCOL": "3.1.1" if broker.name == "amqtt" else "5",
        "VOTEBOX_MQTT_CLIENT_ID": client_id,
        "VOTEBOX_REDIS_URL": redis_proc.url,
        "VOTEBOX_LOG_LEVEL": "DEBUG",
    }


@pytest.fixture
def processor_proc(
    request: pytest.FixtureRequest,
    broker: ManagedProcess,
    redis_proc: ManagedProcess,
    tmp_path: Path,
) -> Iterator[ManagedProcess]:
    """A running `votebox processor` subprocess with its own persistent session."""
    client_id = unique_id(request, "-proc")
    proc = processor(tmp_path, env=processor_env(broker, redis_proc, client_id))
    proc.start()
    try:
        yield proc
    finally:
        code = proc.stop()
        end_session(broker, client_id)  # or the broker queues every later test's votes for it
        if code not in (0, None):
            print(proc.log_text()[-5000:])


@pytest.fixture
def spawn_processor(
    request: pytest.FixtureRequest, redis_proc: ManagedProcess, tmp_path: Path
) -> Iterator[Callable[..., ManagedProcess]]:
    """Start processors on a given broker with extra ``VOTEBOX_*`` settings; all are stopped
    when the test ends, whatever happened to them meanwhile."""
    started: list[tuple[ManagedProcess, ManagedProcess, str]] = []

    def spawn(broker: ManagedProcess, **env: str) -> ManagedProcess:
        n = len(started)
        client_id = unique_id(request, f"-{n}")
        proc = processor(
            tmp_path / f"processor-{n}",
            env=processor_env(broker, redis_proc, client_id) | env,
        )
        started.append((proc, broker, client_id))
        proc.start()
        return proc

    yield spawn
    for proc, broker, client_id in started:
        proc.stop()
        end_session(broker, client_id)


async def eventually(check: object, *, timeout_s: float = 30.0, every_s: float = 0.05) -> None:
    """Await ``check()`` (sync or async, returning bool) until true, or fail with a timeout."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        result = check()  # type: ignore[operator]
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(every_s)


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    """Headless chromium through chromedriver, for the pages (tests/test_dashboard.py)."""
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and chromedriver, "scripts/setup installs chromium and chromium-driver"
    options = Options()
    options.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1280,900",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    try:
        yield driver
    finally:
        driver.quit()


async def redis_command(port: int, *command: str) -> object:
    """One command to the redis-server (or Sentinel, or cluster node) on ``port`` itself, as
    redis-py parses its reply."""
    client = Redis(host="127.0.0.1", port=port, socket_timeout=5)
    try:
        return await client.execute_command(*command)  # type: ignore[no-untyped-call]
    finally:
        await client.aclose()
