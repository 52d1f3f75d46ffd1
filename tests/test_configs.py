"""The production files: mosquitto.conf's limits, docker-compose.yml validates, Grafana and
the operations doc match the metrics. Mosquitto running this file: tests/test_security.py."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from harness.services import (
    MOSQUITTO_MAX_INFLIGHT_MESSAGES,
    MOSQUITTO_MAX_QUEUED_MESSAGES,
    free_port,
)
from processor.metrics import Metrics
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
    documented = set(re.findall(r"`((?:votebox|process|python_gc)_[a-z_]+)", table))
    families = {
        f"{family.name}_total" if family.type == "counter" else family.name
        for family in Metrics().registry.collect()
    }
    assert documented == families
    alerts = doc.split("What to alert on", 1)[1].split("## Scale", 1)[0]
    assert set(re.findall(r"\bvotebox_[a-z_]+", alerts)) <= Metrics().names()


def test_the_image_copies_every_package_and_dashboard_file_the_wheel_needs() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    wheel = project["tool"]["hatch"]["build"]["targets"]["wheel"]
    dockerfile = (REPO / "Dockerfile").read_text()
    copied = set(re.findall(r"^COPY (?:--from=\S+ )?(.+?) \S+$", dockerfile, re.M))
    sources = {word for line in copied for word in line.split()}
    for package in wheel["packages"]:
        assert package in sources, f"the Dockerfile does not COPY {package}/"
    for source in wheel["force-include"]:
        assert source in sources, f"the Dockerfile does not COPY {source}"
    # The build hook puts the npm build in, from the image's npm ci stage.
    assert "hatch_build.py" in sources, "the Dockerfile does not COPY the build hook"
    assert "/dashboard/node_modules" in sources, "the Dockerfile copies no node_modules"


def test_the_replicated_overlay_validates_and_leaves_a_replica_after_a_failover() -> None:
    result = subprocess.run(
        ["docker-compose", "-f", "docker-compose.yml", "-f", "docker-compose.replicated.yml"]
        + ["config"],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    env = services["processor"]["environment"]
    sentinels = env["VOTEBOX_REDIS_SENTINELS"].split(",")
    assert {s.split(":")[0] for s in sentinels} <= set(services)
    replicas = [name for name, s in services.items() if "--replicaof" in s.get("command", [])]
    # One more replica than WAIT asks for: the promoted one's place is not needed.
    assert len(replicas) == int(env["VOTEBOX_REDIS_REPLICAS"]) + 1
    for name in replicas:
        assert services[name]["command"][1:5] == ["--appendonly", "yes", "--appendfsync", "always"]
    monitor = services["sentinel-1"]["command"][-1]
    quorum = int(re.search(r"sentinel monitor votebox redis 6379 (\d+)", monitor).group(1))  # type: ignore[union-attr]
    assert quorum == len(sentinels) // 2 + 1


def test_the_composed_results_page_serves_its_config_from_the_environment(tmp_path: Path) -> None:
    """The compose file's dashboard service, as composed (its command line and environment
    after docker-compose fills them from .env), run here for real on a free port."""
    (tmp_path / ".env").write_text(
        "DASHBOARD_WS_URL=wss://votes.stadium.example:9001\nMQTT_DASHBOARD_PASSWORD=s3cret\n"
    )
    composed = subprocess.run(
        ["docker-compose", "-f", str(REPO / "docker-compose.yml"), "--env-file",
         str(tmp_path / ".env"), "config"],
        capture_output=True, text=True, check=False, cwd=REPO,
    )  # fmt: skip
    assert composed.returncode == 0, composed.stderr
    service = yaml.safe_load(composed.stdout)["services"]["dashboard"]
    assert service["command"][:5] == ["dashboard", "--host", "0.0.0.0", "--port", "8080"]
    assert any(str(p).endswith("8080") or "8080" in str(p) for p in service["ports"])
    argv = list(service["command"])
    argv[argv.index("--port") + 1] = str(free_port())
    argv[argv.index("--host") + 1] = "127.0.0.1"
    env = os.environ | {k: str(v) for k, v in service["environment"].items()}
    page = subprocess.Popen(
        [sys.executable, "-m", "processor.cli", *argv],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert page.stdout is not None
        first = page.stdout.readline()  # "votebox dashboard on http://...": it is serving
        url = first.split(" on ", 1)[1].split(" ", 1)[0]
        with urllib.request.urlopen(f"{url}config.json", timeout=5) as reply:
            config = json.load(reply)
        with urllib.request.urlopen(url, timeout=5) as reply:
            assert b"<html" in reply.read().lower()
    finally:
        page.terminate()
        page.communicate(timeout=10)  # reaped, its pipe closed
    assert config == {
        "ws_url": "wss://votes.stadium.example:9001",
        "username": "dashboard",
        "password": "s3cret",
    }
