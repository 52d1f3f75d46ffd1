"""The production files: mosquitto.conf runs on real Mosquitto, docker-compose.yml validates."""

from __future__ import annotations

import asyncio
import getpass
import json
import re
import shutil
import socket
import ssl
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import yaml
from redis.asyncio import Redis

from devices.encoder import encode_vote
from harness.services import (
    HOST,
    MOSQUITTO_MAX_INFLIGHT_MESSAGES,
    MOSQUITTO_MAX_QUEUED_MESSAGES,
    ManagedProcess,
    free_port,
    port_open,
)
from processor.codec import AckEntry, decode_ack
from processor.metrics import Metrics
from processor.polls import Poll, read_results
from tests.conftest import REPO

CONF = (REPO / "mosquitto.conf").read_text()


def _setting(name: str) -> str:
    match = re.search(rf"^{name} (.+)$", CONF, re.M)
    assert match, f"mosquitto.conf has no {name}"
    return match.group(1).strip()


def test_mosquitto_conf_sizes_the_queue_for_an_away_processor() -> None:
    assert _setting("persistence") == "true"
    assert int(_setting("max_queued_messages")) == MOSQUITTO_MAX_QUEUED_MESSAGES > 1000
    assert int(_setting("max_inflight_messages")) == MOSQUITTO_MAX_INFLIGHT_MESSAGES
    assert int(_setting("max_packet_size")) > 4096  # over-size votes reach the processor


@pytest.fixture
def production_mosquitto(tmp_path: Path) -> Iterator[ManagedProcess]:
    """The production mosquitto.conf and broker/mosquitto.acl on real Mosquitto, on loopback,
    with a password file made the way docs/operations.md says."""
    mqtt_port, ws_port, tls_port = free_port(), free_port(), free_port()
    conf = CONF.replace("listener 1883", f"listener {mqtt_port} {HOST}")
    conf = conf.replace("listener 9001", f"listener {ws_port} {HOST}")
    conf = conf.replace("listener 8883", f"listener {tls_port} {HOST}")
    conf = conf.replace("/mosquitto/data/", f"{tmp_path}/")
    conf = conf.replace("/mosquitto/config/", f"{tmp_path}/")
    conf = conf.replace("/mosquitto/certs/", f"{_make_certs(tmp_path / 'certs')}/")
    assert conf.count(HOST) == 3 and "/mosquitto/" not in conf
    # Started as root, Mosquitto drops to user "mosquitto", who cannot read pytest's folders.
    conf += f"\nuser {getpass.getuser()}\n"
    (tmp_path / "mosquitto.conf").write_text(conf)
    shutil.copy(REPO / "broker" / "mosquitto.acl", tmp_path / "mosquitto.acl")
    passwd = tmp_path / "mosquitto.passwd"
    for i, user in enumerate(["processor", "dashboard", "kiosk-a", "kiosk-b"]):
        create = ["-c"] if i == 0 else []
        subprocess.run(
            ["mosquitto_passwd", *create, "-b", str(passwd), user, f"pw-{user}"], check=True
        )
    proc = ManagedProcess(
        "mosquitto",
        ["mosquitto", "-c", str(tmp_path / "mosquitto.conf")],
        ready=lambda: port_open(mqtt_port),
        log_path=tmp_path / "mosquitto.log",
        port=mqtt_port,
        url=f"mqtts://{HOST}:{tls_port}",
    )
    proc.start()
    try:
        yield proc
    finally:
        assert proc.stop() == 0


def _make_certs(folder: Path) -> Path:
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


def _client(broker: ManagedProcess, user: str | None, password: str | None = None) -> Any:
    return aiomqtt.Client(
        HOST,
        broker.port,
        identifier=f"acl-test-{user}",
        username=user,
        password=password if password is not None else f"pw-{user}",
        protocol=aiomqtt.ProtocolVersion.V5,
    )


async def test_production_mosquitto_refuses_anonymous_and_wrong_passwords(
    production_mosquitto: ManagedProcess,
) -> None:
    assert "Error" not in production_mosquitto.log_text()
    for user, password in ((None, ""), ("processor", "wrong")):
        with pytest.raises(aiomqtt.MqttError):
            async with _client(production_mosquitto, user, password):
                pass


async def test_production_acl_lets_a_device_vote_only_under_its_own_name(
    production_mosquitto: ManagedProcess,
) -> None:
    async with (
        _client(production_mosquitto, "processor") as processor,
        _client(production_mosquitto, "kiosk-a") as kiosk,
        _client(production_mosquitto, "dashboard") as dashboard,
    ):
        await processor.subscribe("votes/#", qos=1)
        await dashboard.subscribe("votes/#", qos=1)  # granted nothing: sees no vote
        await kiosk.subscribe("acks/#", qos=1)  # only its own acks reach it
        await dashboard.subscribe("polls/+/results", qos=1)
        await kiosk.publish("votes/p/kiosk-b", b"forged", qos=1)
        await kiosk.publish("votes/p/kiosk-a", b"mine", qos=1)
        await processor.publish("acks/kiosk-b", b"not yours", qos=1)
        await processor.publish("acks/kiosk-a", b"yours", qos=1)
        await processor.publish("polls/p/results", b"{}", qos=1, retain=True)
        await dashboard.publish("polls/p/results", b"forged", qos=1, retain=True)
        async with asyncio.timeout(10):
            received = await anext(aiter(processor.messages))
            assert (str(received.topic), received.payload) == ("votes/p/kiosk-a", b"mine")
            received = await anext(aiter(kiosk.messages))
            assert (str(received.topic), received.payload) == ("acks/kiosk-a", b"yours")
            received = await anext(aiter(dashboard.messages))
            assert (str(received.topic), received.payload) == ("polls/p/results", b"{}")
        # The forgeries were published before what arrived; Mosquitto keeps order per client,
        # so had they passed, they would have arrived first. Nothing else is waiting either.
        await asyncio.sleep(0.3)
        for client in (processor, kiosk, dashboard):
            assert len(client.messages) == 0


def test_docker_compose_file_validates() -> None:
    result = subprocess.run(
        ["docker-compose", "-f", str(REPO / "docker-compose.yml"), "config"],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    assert "VOTEBOX_REDIS_URL: redis://redis:6379/0" in result.stdout
    assert "VOTEBOX_INFLUX_URL: http://influxdb:8086" in result.stdout
    assert "DOCKER_INFLUXDB_INIT_BUCKET: votes" in result.stdout
    assert "./mosquitto.conf" in (REPO / "docker-compose.yml").read_text()
    compose = yaml.safe_load(result.stdout)
    services = compose["services"]
    assert {"mosquitto", "redis", "influxdb", "processor", "prometheus", "grafana"} <= set(services)
    mounts = " ".join(str(v) for v in services["mosquitto"]["volumes"])
    assert "mosquitto.acl" in mounts and "mosquitto.passwd" in mounts
    assert services["redis"]["command"][1:3] == ["--appendonly", "yes"]
    processor_env = services["processor"]["environment"]
    assert processor_env["VOTEBOX_MQTT_URL"].startswith("mqtt://processor:")
    # Prometheus scrapes the port the processor serves on, by its compose name.
    prometheus = yaml.safe_load((REPO / "ops/prometheus/prometheus.yml").read_text())
    targets = [
        t
        for job in prometheus["scrape_configs"]
        for c in job["static_configs"]
        for t in c["targets"]
    ]
    assert targets == [f"processor:{processor_env['VOTEBOX_METRICS_PORT']}"]
    assert processor_env["VOTEBOX_METRICS_HOST"] == "0.0.0.0"


GRAFANA = REPO / "ops" / "grafana"


def _dashboard_queries() -> list[dict[str, Any]]:
    dashboard = json.loads((GRAFANA / "dashboards" / "votebox.json").read_text())
    return [target for panel in dashboard["panels"] for target in panel["targets"]]


def test_grafana_dashboard_uses_only_metrics_the_processor_exports() -> None:
    exported = Metrics().names()
    used = {
        name
        for target in _dashboard_queries()
        for name in re.findall(r"\bvotebox_[a-z_]+", target.get("expr", ""))
    }
    assert len(used) >= 10
    assert used <= exported, used - exported
    other = {
        name
        for target in _dashboard_queries()
        for name in re.findall(r"\b([a-z_]+)\{", target.get("expr", ""))
    }
    assert other <= {"up"}  # Prometheus's own series


def test_grafana_data_sources_are_provisioned_for_every_panel() -> None:
    provisioned = yaml.safe_load((GRAFANA / "provisioning/datasources/votebox.yml").read_text())
    uids = {source["uid"] for source in provisioned["datasources"]}
    used = {target["datasource"]["uid"] for target in _dashboard_queries()}
    assert used == uids
    compose = (REPO / "docker-compose.yml").read_text()
    influx_queries = [t["query"] for t in _dashboard_queries() if "query" in t]
    # The bucket and measurement the processor writes (docs/analytics.md).
    assert "DOCKER_INFLUXDB_INIT_BUCKET: votes" in compose
    assert influx_queries and all('from(bucket: "votes")' in q for q in influx_queries)
    assert all('r._measurement == "vote"' in q for q in influx_queries)
    providers = yaml.safe_load((GRAFANA / "provisioning/dashboards/votebox.yml").read_text())
    assert providers["providers"][0]["options"]["path"] in compose


def test_operations_doc_lists_exactly_the_metrics_the_processor_exports() -> None:
    doc = (REPO / "docs" / "operations.md").read_text()
    table = doc.split("### Metrics", 1)[1].split("What to alert on", 1)[0]
    documented = set(re.findall(r"^\| `(votebox_[a-z_]+)", table, re.M))
    families = {
        f"{family.name}_total" if family.type == "counter" else family.name
        for family in Metrics().registry.collect()
    }
    assert documented == families
    alerts = doc.split("What to alert on", 1)[1].split("## Scale", 1)[0]
    assert set(re.findall(r"\bvotebox_[a-z_]+", alerts)) <= Metrics().names()


async def test_a_device_with_the_ca_votes_over_tls_and_the_processor_counts_it_over_tls(
    production_mosquitto: ManagedProcess,
    spawn_processor: Callable[..., ManagedProcess],
    poll: Poll,
    redis: Redis,
) -> None:
    broker = production_mosquitto
    ca = production_mosquitto.log_path.parent / "certs" / "ca.crt"
    tls_port = int(broker.url.rsplit(":", 1)[1])
    spawn_processor(
        broker,
        VOTEBOX_MQTT_URL=f"mqtts://processor:pw-processor@{HOST}:{tls_port}",
        VOTEBOX_MQTT_CA_FILE=str(ca),
    )
    tls = ssl.create_default_context(cafile=str(ca))
    async with aiomqtt.Client(
        HOST, tls_port, identifier="tls-kiosk-a", username="kiosk-a", password="pw-kiosk-a",
        tls_context=tls,
    ) as kiosk:  # fmt: skip
        await kiosk.subscribe("acks/kiosk-a", qos=1)
        await kiosk.publish(f"votes/{poll.id}/kiosk-a", encode_vote(2, 1), qos=1)
        async with asyncio.timeout(20):
            message = await anext(aiter(kiosk.messages))
        assert isinstance(message.payload, bytes)
        assert decode_ack(message.payload) == [AckEntry(0, 1, 0)]  # accepted
    assert (await read_results(redis, [poll.id]))[poll.id].counts == (0, 0, 1)
    # Without the CA (the system's trust store), the broker's certificate is refused.
    with socket.create_connection((HOST, tls_port), timeout=5) as raw:
        with pytest.raises(ssl.SSLCertVerificationError):
            ssl.create_default_context().wrap_socket(raw, server_hostname=HOST)
