"""The secure setup on both brokers: accounts, the topic table, client ids, TLS.

The production mosquitto.conf on real Mosquitto, and `votebox broker --accounts` (amqtt with
broker/amqtt_plugins.py), both from the same accounts file, written the way
docs/operations.md says; certificates are made at test time with openssl.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from redis.asyncio import Redis
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from broker.accounts import AccountStore
from devices.encoder import encode_heartbeat, encode_vote
from harness.services import HOST, ManagedProcess, amqtt_broker, free_port, port_open
from processor.codec import AckEntry, decode_ack
from processor.commands.dashboard import serve_dashboard
from processor.keys import DEVICES_HEALTH, DEVICES_SEEN, DEVICES_STATUS
from processor.poll import Poll
from processor.poll_store import read_results
from tests.conftest import REPO, unique_id
from tests.test_cli import poll_cli
from tests.test_dashboard import wait_for

pytestmark = pytest.mark.e2e

ACCOUNTS = {"processor": "processor", "dashboard": "dashboard", "kiosk-a": "device"}
ACCOUNTS |= {"kiosk-b": "device"}


@dataclass(frozen=True, slots=True)
class Secured:
    """A broker with accounts: devices and dashboards use ``broker.port``, processors
    ``processor_port`` (Mosquitto's own listener for them), anyone ``tls_port``."""

    broker: ManagedProcess
    processor_port: int
    tls_port: int
    ca: Path
    accounts: Path  # the accounts file; Mosquitto's password file and ACL beside it

    @property
    def v311(self) -> bool:
        return self.broker.name == "amqtt"

    def client(
        self,
        user: str | None,
        *,
        password: str | None = None,
        identifier: str | None = None,
        port: int | None = None,
        **options: Any,
    ) -> aiomqtt.Client:
        """A client of ``user`` (password pw-{user}) under the client id its role may use."""
        if identifier is None:
            identifier = "votebox-dashboard-t" if user == "dashboard" else f"{user}"
        return aiomqtt.Client(
            HOST,
            port or self.broker.port,
            identifier=identifier,
            username=user,
            password=password if password is not None else f"pw-{user}",
            protocol=aiomqtt.ProtocolVersion.V311,
            **options,
        )


@pytest.fixture(params=["mosquitto", "amqtt"])
def secured(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Secured]:
    certs = make_certs(tmp_path / "certs")
    store = AccountStore(tmp_path / "accounts.json", tmp_path / "mosquitto.passwd")
    for user, role in ACCOUNTS.items():
        store.add(user, role, f"pw-{user}")  # type: ignore[arg-type]
    if request.param == "amqtt":
        tls = (certs / "server.crt", certs / "server.key")
        with amqtt_broker(tmp_path / "amqtt", accounts=store.path, tls=tls) as proc:
            yield Secured(proc, proc.port, proc.tls_port, certs / "ca.crt", store.path)
        return
    with production_mosquitto(tmp_path, certs) as (proc, processor_port, tls_port):
        yield Secured(proc, processor_port, tls_port, certs / "ca.crt", store.path)


@contextlib.contextmanager
def production_mosquitto(folder: Path, certs: Path) -> Iterator[tuple[ManagedProcess, int, int]]:
    """The production mosquitto.conf and broker/mosquitto.acl on real Mosquitto, on loopback,
    with the password file `votebox device add` wrote in ``folder``; yields the broker, the
    processors' port and the TLS port."""
    ports = {n: free_port() for n in (1883, 1884, 8883, 9001)}
    conf = (REPO / "mosquitto.conf").read_text()
    for standard, port in ports.items():
        conf = conf.replace(f"listener {standard}\n", f"listener {port} {HOST}\n")
    conf = conf.replace("/mosquitto/data/", f"{folder}/")
    conf = conf.replace("/mosquitto/config/", f"{folder}/")
    conf = conf.replace("/mosquitto/certs/", f"{certs}/")
    assert conf.count(HOST) == 4 and "/mosquitto/" not in conf
    # Started as root, Mosquitto drops to user "mosquitto", who cannot read our folders.
    conf += f"\nuser {getpass.getuser()}\n"
    (folder / "mosquitto.conf").write_text(conf)
    (folder / "mosquitto.acl").write_text((REPO / "broker" / "mosquitto.acl").read_text())
    proc = ManagedProcess(
        "mosquitto",
        ["mosquitto", "-c", str(folder / "mosquitto.conf")],
        ready=lambda: all(port_open(p) for p in ports.values()),
        log_path=folder / "mosquitto.log",
        port=ports[1883],
        url=f"mqtt://{HOST}:{ports[1883]}",
        ws_url=f"ws://{HOST}:{ports[9001]}",
        tls_port=ports[8883],
    )
    proc.start()
    try:
        assert "Error" not in proc.log_text()
        yield proc, ports[1884], ports[8883]
    finally:
        assert proc.stop() == 0


def make_certs(folder: Path) -> Path:
    """A test CA and a server certificate for 127.0.0.1 signed by it, made with openssl."""
    folder.mkdir()

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key",
            "-out", "ca.crt", "-days", "2", "-subj", "/CN=votebox test CA")  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key",
            "-out", "server.csr", "-subj", f"/CN={HOST}")  # fmt: skip
    (folder / "san.ext").write_text(f"subjectAltName=IP:{HOST}\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "server.crt", "-days", "2",
            "-extfile", "san.ext")  # fmt: skip
    return folder


async def _next(client: aiomqtt.Client) -> tuple[str, bytes]:
    async with asyncio.timeout(10):
        message = await anext(aiter(client.messages))
    assert isinstance(message.payload, bytes)
    return str(message.topic), message.payload


async def test_strangers_and_wrong_passwords_are_refused(secured: Secured) -> None:
    for user, password in ((None, ""), ("processor", "wrong"), ("nobody", "pw-nobody")):
        with pytest.raises(aiomqtt.MqttError):
            async with secured.client(user, password=password, identifier=f"x-{user}"):
                pass
    async with secured.client("kiosk-a"):
        pass  # the right password gets in


async def test_a_device_votes_only_as_itself_and_writes_no_results_config_acks_or_status(
    secured: Secured,
) -> None:
    async with (
        secured.client("processor", port=secured.processor_port) as processor,
        secured.client("kiosk-a") as kiosk,
        secured.client("dashboard") as dashboard,
    ):
        await processor.subscribe("votes/#", qos=1)
        await processor.subscribe("devices/+/+", qos=1)
        await kiosk.subscribe("acks/kiosk-a", qos=1)
        await dashboard.subscribe("polls/+/results", qos=1)
        await dashboard.subscribe("polls/+/config", qos=1)
        await dashboard.subscribe("polls/+/series", qos=1)
        # Forgeries first: had any got through, it would arrive before what is expected.
        await kiosk.publish("votes/p/kiosk-b", b"forged", qos=1)
        await kiosk.publish("devices/kiosk-b/status", b"offline", qos=1, retain=True)
        await kiosk.publish("polls/p/results", b"forged", qos=1, retain=True)
        await kiosk.publish("polls/p/config", b"forged", qos=1, retain=True)
        await kiosk.publish("polls/p/series", b"forged", qos=1, retain=True)
        await kiosk.publish("acks/kiosk-a", b"forged", qos=1)
        await dashboard.publish("polls/p/results", b"forged", qos=1, retain=True)
        await dashboard.publish("polls/p/series", b"forged", qos=1, retain=True)
        await processor.publish("acks/kiosk-b", b"not yours", qos=1)
        await kiosk.publish("votes/p/kiosk-a", b"mine", qos=1)
        await processor.publish("acks/kiosk-a", b"yours", qos=1)
        await processor.publish("polls/p/results", b"{}", qos=1, retain=True)
        await processor.publish("polls/p/series", b"[]", qos=1, retain=True)

        assert await _next(processor) == ("votes/p/kiosk-a", b"mine")
        assert await _next(kiosk) == ("acks/kiosk-a", b"yours")
        assert await _next(dashboard) == ("polls/p/results", b"{}")
        assert await _next(dashboard) == ("polls/p/series", b"[]")
        await asyncio.sleep(0.5)
        for client in (processor, kiosk, dashboard):
            assert len(client.messages) == 0
    # A device may not even subscribe to every ack: Mosquitto grants the subscription and
    # delivers none of them, amqtt refuses it. The control, its own ack published after the
    # other's, arrives: had the other's got through, it would have come first.
    async with secured.client("kiosk-a") as kiosk, secured.client("processor") as processor:
        await kiosk.subscribe("acks/#", qos=1)
        await kiosk.subscribe("acks/kiosk-a", qos=1)
        await processor.publish("acks/kiosk-b", b"not yours", qos=1)
        await processor.publish("acks/kiosk-a", b"yours", qos=1)
        assert await _next(kiosk) == ("acks/kiosk-a", b"yours")
        await asyncio.sleep(0.2)  # a second copy through acks/# (Mosquitto) is harmless
        rest = [await _next(kiosk) for _ in range(len(kiosk.messages))]
        assert all(topic == "acks/kiosk-a" for topic, _ in rest), rest


async def test_no_account_but_a_device_votes_or_reports_and_nothing_of_theirs_is_counted(
    secured: Secured,
    spawn_processor: Callable[..., ManagedProcess],
    poll: Poll,
    redis: Redis,
) -> None:
    """Mosquitto applies the device patterns (votes/+/%u) to every user; the public dashboard
    account could vote as "dashboard". Both brokers refuse it, and the processor would not
    count it if one let it through (tests/test_topics.py)."""
    url = f"mqtt://processor:pw-processor@{HOST}:{secured.processor_port}"
    spawn_processor(secured.broker, VOTEBOX_MQTT_URL=url)
    forgeries = []
    for user in ("processor", "dashboard"):
        forgeries += [
            (user, f"votes/{poll.id}/{user}", encode_vote(1, 1)),
            (user, f"devices/{user}/status", b"online"),
            (user, f"devices/{user}/heartbeat", encode_heartbeat(5, 0, 90)),
        ]
    async with (
        secured.client("processor", identifier="x-observer", port=secured.processor_port) as spy,
        secured.client("processor", identifier="x-forger", port=secured.processor_port) as proc,
        secured.client("dashboard") as dashboard,
        secured.client("kiosk-a") as kiosk,
    ):
        await spy.subscribe("votes/#", qos=1)
        await spy.subscribe("devices/+/+", qos=1)
        await kiosk.subscribe("acks/kiosk-a", qos=1)
        accounts = {"processor": proc, "dashboard": dashboard}
        for user, topic, payload in forgeries:
            with contextlib.suppress(aiomqtt.MqttError):  # MQTT 5 may answer 0x87
                await accounts[user].publish(topic, payload, qos=1)
        # The control: a device's vote, sent after every forgery on other connections,
        # reaches the observer and the processor; the forgeries would have been seen first.
        await kiosk.publish(f"votes/{poll.id}/kiosk-a", encode_vote(2, 1), qos=1)
        assert await _next(spy) == (f"votes/{poll.id}/kiosk-a", encode_vote(2, 1))
        assert decode_ack((await _next(kiosk))[1]) == [AckEntry(0, 1, 0)]
        assert len(spy.messages) == 0 and len(kiosk.messages) == 0
    results = (await read_results(redis, [poll.id]))[poll.id]
    assert (results.total, results.counts) == (1, (0, 0, 1))
    for key in (DEVICES_STATUS, DEVICES_HEALTH):
        assert await redis.hmget(key, ["processor", "dashboard"]) == [None, None], key
    assert await redis.zmscore(DEVICES_SEEN, ["processor", "dashboard"]) == [None, None]


async def test_no_device_pushes_another_off_by_taking_its_client_id(secured: Secured) -> None:
    async with (
        secured.client("kiosk-b") as victim,
        secured.client("processor", port=secured.processor_port) as processor,
    ):
        await victim.subscribe("acks/kiosk-b", qos=1)
        if secured.v311:  # amqtt: refused outright
            with pytest.raises(aiomqtt.MqttError):
                async with secured.client("kiosk-a", identifier="kiosk-b"):
                    pass
            with pytest.raises(aiomqtt.MqttError):
                async with secured.client("dashboard", identifier="kiosk-b"):
                    pass
        else:  # Mosquitto: let in, under its own username as client id
            async with secured.client("kiosk-a", identifier="kiosk-b"):
                pass
        await processor.publish("acks/kiosk-b", b"still here", qos=1)
        assert await _next(victim) == ("acks/kiosk-b", b"still here")


async def test_a_refused_connect_under_the_processors_id_costs_no_queued_vote(
    secured: Secured,
) -> None:
    def processor(**options: Any) -> aiomqtt.Client:
        return secured.client(
            "processor", identifier="votebox-processor", port=secured.processor_port, **options
        )

    async with processor(clean_session=False) as p:
        await p.subscribe("votes/#", qos=1)
    async with secured.client("kiosk-a") as kiosk:
        await kiosk.publish("votes/p/kiosk-a", b"while away", qos=1)
    # amqtt 0.12.1 itself would delete the session this names before checking the password.
    with pytest.raises(aiomqtt.MqttError):
        async with processor(password="wrong", clean_session=True):
            pass
    async with processor(clean_session=False) as p:
        assert await _next(p) == ("votes/p/kiosk-a", b"while away")


def _vanish_with_a_will(port: int, device: str, will_topic: str, payload: bytes) -> None:
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=device, protocol=paho.MQTTv311)
    client.username_pw_set(device, f"pw-{device}")
    client.will_set(will_topic, payload, qos=1, retain=True)
    answered: list[bool] = []
    client.on_connect = lambda c, u, f, rc, p: answered.append(not rc.is_failure)
    client.connect(HOST, port)
    deadline = time.monotonic() + 10
    while not answered and time.monotonic() < deadline:
        client.loop(timeout=0.1)
    assert answered, "no CONNACK"
    sock = client.socket()
    if isinstance(sock, socket.socket):  # vanish without DISCONNECT: the will is due
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()


def test_a_last_will_on_a_topic_the_device_may_not_write_never_lands(secured: Secured) -> None:
    port = secured.broker.port
    _vanish_with_a_will(port, "kiosk-a", "polls/p/results", b"poisoned")
    # The control: a will the device may leave, on its own status, vanishing after the rogue.
    _vanish_with_a_will(port, "kiosk-b", "devices/kiosk-b/status", b"offline")

    async def retained() -> list[tuple[str, bytes]]:
        async with secured.client("dashboard") as dashboard:
            await dashboard.subscribe("devices/kiosk-b/status", qos=1)
            assert await _next(dashboard) == ("devices/kiosk-b/status", b"offline")
            await dashboard.subscribe("polls/p/results", qos=1)
            await asyncio.sleep(0.5)
            return [await _next(dashboard) for _ in range(len(dashboard.messages))]

    # The broker publishes both wills once it notices the lost connections; the control shows
    # it has (the dashboard waits for it), and the poisoned one is not there.
    deadline = time.monotonic() + 10
    while True:
        try:
            assert asyncio.run(retained()) == []
            break
        except TimeoutError:  # the control's will not out yet
            assert time.monotonic() < deadline, "the control will never landed"


async def test_a_device_with_the_ca_votes_over_tls(
    secured: Secured,
    spawn_processor: Callable[..., ManagedProcess],
    poll: Poll,
    redis: Redis,
) -> None:
    spawn_processor(
        secured.broker,
        VOTEBOX_MQTT_URL=f"mqtts://processor:pw-processor@{HOST}:{secured.tls_port}",
        VOTEBOX_MQTT_CA_FILE=str(secured.ca),
    )
    tls = ssl.create_default_context(cafile=str(secured.ca))
    async with secured.client("kiosk-a", port=secured.tls_port, tls_context=tls) as kiosk:
        await kiosk.subscribe("acks/kiosk-a", qos=1)
        await kiosk.publish(f"votes/{poll.id}/kiosk-a", encode_vote(2, 1), qos=1)
        assert decode_ack((await _next(kiosk))[1]) == [AckEntry(0, 1, 0)]  # accepted
    assert (await read_results(redis, [poll.id]))[poll.id].counts == (0, 0, 1)
    # Without the CA (the system's trust store), the broker's certificate is refused.
    with socket.create_connection((HOST, secured.tls_port), timeout=5) as raw:
        with pytest.raises(ssl.SSLCertVerificationError):
            ssl.create_default_context().wrap_socket(raw, server_hostname=HOST)


async def test_the_simulator_gives_its_kiosks_accounts_and_votes_through_them(
    secured: Secured,
    spawn_processor: Callable[..., ManagedProcess],
    poll: Poll,
    redis: Redis,
) -> None:
    url = f"mqtt://processor:pw-processor@{HOST}:{secured.processor_port}"
    spawn_processor(secured.broker, VOTEBOX_MQTT_URL=url)
    accounts = secured.accounts
    argv = [sys.executable, "-m", "processor.cli", "simulate", "--poll", poll.id]
    argv += ["--mqtt-url", f"mqtt://{HOST}:{secured.broker.port}", "--accounts", str(accounts)]
    argv += ["--dashboard-password", "pw-dashboard", "--prefix", "sim", "--seed", "5"]
    argv += ["--devices", "5", "--rate", "50", "--duration", "2"]
    simulator = _spawn(argv)
    assert simulator.stdout is not None
    first = await asyncio.to_thread(simulator.stdout.readline)
    assert first.startswith(f"5 kiosk accounts written to {accounts}"), first
    if not secured.v311:
        secured.broker.signal(signal.SIGHUP)  # Mosquitto reads its password file again
    rest, _ = await asyncio.to_thread(simulator.communicate, timeout=120)
    assert simulator.returncode == 0, first + rest
    assert "sent 100: accepted 100" in rest and "agrees" in rest, rest
    assert (await read_results(redis, [poll.id]))[poll.id].total == 100
    # Accounts are per device: a stranger's name still gets nothing in.
    with pytest.raises(aiomqtt.MqttError):
        async with secured.client("sim-0000", password="guess"):
            pass


def test_the_web_dashboard_reads_with_the_dashboard_account_and_nothing_else(
    secured: Secured,
    spawn_processor: Callable[..., ManagedProcess],
    redis_proc: ManagedProcess,
    browser: WebDriver,
    request: pytest.FixtureRequest,
) -> None:
    poll_id = unique_id(request)
    poll_cli(redis_proc, "poll", "create", poll_id, "--option", "Yes", "--option", "No")
    url = f"mqtt://processor:pw-processor@{HOST}:{secured.processor_port}"
    spawn_processor(secured.broker, VOTEBOX_MQTT_URL=url)
    ws_url = secured.broker.ws_url
    with serve_dashboard(port=0, ws_url=ws_url, password="pw-dashboard") as page:
        browser.get(page)
        wait_for(browser, "#connection", "data-state", "connected")
        wait_for(browser, f'[data-poll="{poll_id}"]', "data-state", "open")
    with serve_dashboard(port=0, ws_url=ws_url, password="wrong") as page:
        browser.get(page)
        WebDriverWait(browser, 30, poll_frequency=0.1).until(
            lambda d: "not authorized" in d.find_element(By.ID, "connection").text.lower(),
            message="the page never showed the broker's refusal",
        )
        assert not browser.find_elements(By.CSS_SELECTOR, f'[data-poll="{poll_id}"]')


def _spawn(argv: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, text=True)
