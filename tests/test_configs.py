"""The production files: mosquitto.conf runs on real Mosquitto, docker-compose.yml validates."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from harness.services import (
    HOST,
    MOSQUITTO_MAX_INFLIGHT_MESSAGES,
    MOSQUITTO_MAX_QUEUED_MESSAGES,
    ManagedProcess,
    free_port,
    mqtt_ready,
)
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


def test_production_mosquitto_conf_is_accepted_by_mosquitto(tmp_path: Path) -> None:
    mqtt_port, ws_port = free_port(), free_port()
    conf = CONF.replace("listener 1883", f"listener {mqtt_port} {HOST}")
    conf = conf.replace("listener 9001", f"listener {ws_port} {HOST}")
    conf = conf.replace("/mosquitto/data/", f"{tmp_path}/")
    assert conf.count(HOST) == 2
    (tmp_path / "mosquitto.conf").write_text(conf)
    proc = ManagedProcess(
        "mosquitto",
        ["mosquitto", "-c", str(tmp_path / "mosquitto.conf")],
        ready=lambda: mqtt_ready(mqtt_port),
        log_path=tmp_path / "mosquitto.log",
    )
    proc.start()
    try:
        assert "Error" not in proc.log_text()
    finally:
        assert proc.stop() == 0


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
