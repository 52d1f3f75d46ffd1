"""The service harness starts real servers, waits for them, and stops them by PID."""

from __future__ import annotations

import json
import os
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from harness.services import ManagedProcess, ServiceError, redis_server, require_binaries


def test_influxdb_accepts_a_v1_write_and_answers_a_query(influx_proc: ManagedProcess) -> None:
    base = influx_proc.url
    query = urllib.parse.urlencode({"q": "CREATE DATABASE harness"})
    create = urllib.request.Request(f"{base}/query?{query}", method="POST")
    # InfluxDB answers 200 with the error in the body when a statement fails (its meta store
    # busy, on a loaded machine): asked again until it is done, for 10 s at most.
    deadline, result = time.monotonic() + 10, {"error": "not asked"}
    while "error" in result and time.monotonic() < deadline:
        with urllib.request.urlopen(create, timeout=10) as reply:
            result = json.load(reply)["results"][0]
    assert "error" not in result, result
    write = urllib.request.Request(
        f"{base}/write?db=harness&precision=s",
        data=b"vote,poll=p,option=1 value=1i 1767225600",
        method="POST",
    )
    with urllib.request.urlopen(write, timeout=10) as reply:
        assert reply.status == 204
    select = urllib.parse.urlencode({"db": "harness", "q": "SELECT sum(value) FROM vote"})
    with urllib.request.urlopen(f"{base}/query?{select}", timeout=10) as reply:
        series = json.load(reply)["results"][0]["series"][0]
    assert series["values"][0][1] == 1


def test_servers_are_stopped_by_pid_when_the_block_ends(tmp_path: Path) -> None:
    with redis_server(tmp_path / "r") as proc:
        pid = proc.pid
        os.kill(pid, 0)  # running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_missing_binary_names_the_setup_step() -> None:
    with pytest.raises(ServiceError, match="scripts/setup"):
        require_binaries("votebox-no-such-server")
