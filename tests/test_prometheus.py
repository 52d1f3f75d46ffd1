"""Prometheus as operators run it: the composed config and alert rules pass promtool, the
rules' unit tests pass, and a real Prometheus scraping a running processor reads back the
exact number of accepted votes through its HTTP query API."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from harness.services import ManagedProcess, free_port, prometheus, require_binaries
from processor.poll import Poll
from tests.conftest import eventually
from tests.fleet import Fleet

REPO = Path(__file__).resolve().parents[1]
OPS = REPO / "ops" / "prometheus"


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    require_binaries("promtool")
    return subprocess.run(
        ["promtool", *args], capture_output=True, text=True, timeout=60, check=False, cwd=OPS
    )


def test_the_composed_prometheus_config_and_its_rules_pass_promtool() -> None:
    checked = _promtool("check", "config", "prometheus.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "1 rule files found" in checked.stdout
    rules = _promtool("check", "rules", "alerts.yml")
    assert rules.returncode == 0, rules.stdout + rules.stderr


def test_the_alert_rules_unit_tests_pass() -> None:
    tested = _promtool("test", "rules", "alerts_test.yml")
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_every_alert_docs_operations_md_names_is_a_rule() -> None:
    doc = (REPO / "docs" / "operations.md").read_text()
    rules = yaml.safe_load((OPS / "alerts.yml").read_text())
    names = {rule["alert"] for group in rules["groups"] for rule in group["rules"]}
    assert {"VoteboxProcessorDown", "VoteboxCommitStalled", "VoteboxInfluxQueueGrowing"} <= names
    assert "VoteboxDevicesSilent" in names
    assert all(f"`{name}`" in doc for name in names), names


def _api(server: ManagedProcess, path: str) -> Any:
    """The ``data`` of an answer of Prometheus's HTTP API."""
    with urllib.request.urlopen(f"{server.url}/api/v1/{path}", timeout=5) as reply:
        body = json.load(reply)
    assert body["status"] == "success", body
    return body["data"]


def _query(server: ManagedProcess, expr: str) -> list[dict[str, Any]]:
    return list(_api(server, "query?" + urllib.parse.urlencode({"query": expr}))["result"])


def _value(server: ManagedProcess, expr: str) -> float | None:
    result = _query(server, expr)
    return float(result[0]["value"][1]) if result else None


async def test_a_real_prometheus_reads_the_exact_accepted_count_from_a_processor(
    tmp_path: Path,
    mosquitto_proc: ManagedProcess,
    spawn_processor: Callable[..., ManagedProcess],
    poll: Poll,
) -> None:
    proc = spawn_processor(mosquitto_proc)
    target = f"127.0.0.1:{proc.port}"
    with prometheus(
        tmp_path / "prometheus", targets=[target], rule_files=[OPS / "alerts.yml"]
    ) as server:
        await eventually(lambda: _value(server, 'up{job="votebox"}') == 1.0, timeout_s=30)
        with Fleet(mosquitto_proc, poll.id, 4) as fleet:
            await asyncio.to_thread(fleet.cast, poll.id, 137, lambda i: i % 3)
            for kiosk in fleet.kiosks:  # a re-send each: duplicates, not accepted
                kiosk.vote(poll.id, 0, seq=kiosk.seq)
            await eventually(lambda: fleet.unacked() == 0, timeout_s=60)
        accepted = 'sum(votebox_votes_total{job="votebox", fate="accepted"})'
        await eventually(lambda: _value(server, accepted) == 137.0, timeout_s=30)
        duplicate = 'sum(votebox_votes_total{job="votebox", fate="duplicate"})'
        assert _value(server, duplicate) == 4.0
        # The rules are loaded and evaluated against the live series: nothing fires.
        groups = _api(server, "rules")["groups"]
        assert {rule["name"] for rule in groups[0]["rules"]} >= {"VoteboxProcessorDown"}
        assert all(rule["health"] == "ok" for rule in groups[0]["rules"])
        assert _query(server, 'ALERTS{alertstate="firing"}') == []


def _rule(name: str) -> str:
    """The expression of alert ``name`` in ops/prometheus/alerts.yml, as Prometheus runs it."""
    rules = yaml.safe_load((OPS / "alerts.yml").read_text())
    (expr,) = [r["expr"] for g in rules["groups"] for r in g["rules"] if r.get("alert") == name]
    return str(expr)


async def test_a_real_prometheus_sees_each_fault_in_its_alerts_expression(
    tmp_path: Path,
    mosquitto_proc: ManagedProcess,
    redis_proc: ManagedProcess,
    spawn_processor: Callable[..., ManagedProcess],
    poll: Poll,
) -> None:
    """Faults made on real servers, read by a real Prometheus through the rules' own
    expressions (their ``for:`` is promtool's to test, ops/prometheus/alerts_test.yml):
    InfluxDB unreachable makes every write fail; a full queue drops points; a stopped Redis
    stalls the intake, and the stall ends with the first commit after it."""
    proc = spawn_processor(
        mosquitto_proc,
        VOTEBOX_INFLUX_URL=f"http://127.0.0.1:{free_port()}",  # nothing listens there
        VOTEBOX_INFLUX_API="v1",
        VOTEBOX_INFLUX_QUEUE_MAX="10",
        VOTEBOX_STATS_INTERVAL_S="0.5",
        VOTEBOX_STALL_S="1",
    )
    writes_failing = _rule("VoteboxInfluxWritesFailing")
    dropped = _rule("VoteboxInfluxPointsDropped")
    stalled = _rule("VoteboxCommitStalled")
    with (
        prometheus(
            tmp_path / "prometheus",
            targets=[f"127.0.0.1:{proc.port}"],
            rule_files=[OPS / "alerts.yml"],
        ) as server,
        Fleet(mosquitto_proc, poll.id, 2) as fleet,
    ):
        await eventually(lambda: _value(server, 'up{job="votebox"}') == 1.0, timeout_s=30)
        assert _query(server, stalled) == []
        # All polls' in the shared Redis: other tests' drops are in it too.
        dropped_total = "max(votebox_influx_points_dropped)"
        await eventually(lambda: _value(server, dropped_total) is not None, timeout_s=30)
        before = _value(server, dropped_total)
        assert before is not None
        await asyncio.to_thread(fleet.cast, poll.id, 15)
        await eventually(lambda: fleet.unacked() == 0, timeout_s=60)
        # 10 of the 15 points queue, 5 are dropped; no write gets through.
        await eventually(lambda: _query(server, writes_failing) != [], timeout_s=60)
        await eventually(lambda: _query(server, dropped) != [], timeout_s=60)
        await eventually(lambda: _value(server, dropped_total) == before + 5, timeout_s=30)
        assert _query(server, stalled) == []

        redis_proc.signal(signal.SIGSTOP)
        try:
            for kiosk in fleet.kiosks:
                kiosk.vote(poll.id, 1)
            await eventually(lambda: _query(server, stalled) != [], timeout_s=30)
        finally:
            redis_proc.signal(signal.SIGCONT)
        await eventually(lambda: fleet.unacked() == 0, timeout_s=60)
        await eventually(lambda: _query(server, stalled) == [], timeout_s=30)
