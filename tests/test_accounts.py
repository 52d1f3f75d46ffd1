"""Broker accounts: the accounts file, and the Mosquitto password file written from it, on a
real Mosquitto."""

from __future__ import annotations

import asyncio
import getpass
import re
import signal
import subprocess
import sys
from pathlib import Path

import aiomqtt
import pytest

from broker.accounts import AccountStore, mosquitto_hash, verify_mosquitto_hash
from broker.acl import client_id_allowed, filter_covers, permitted, render_mosquitto_acl
from harness.services import HOST, ManagedProcess, free_port, port_open
from processor.errors import ConfigError
from tests.conftest import REPO
from tests.test_cli import votebox


def test_hashes_verify_and_differ_by_salt() -> None:
    first, second = mosquitto_hash("s3cret"), mosquitto_hash("s3cret")
    assert first.startswith("$7$101$") and first != second
    assert verify_mosquitto_hash("s3cret", first) and not verify_mosquitto_hash("nope", first)


@pytest.mark.parametrize(
    ("username", "role", "message"),
    [
        ("processor", "device", "an account of its own"),
        ("kiosk/1", "device", "device id"),
        ("ops", "processor", "named 'processor'"),
        ("votebox-processor", "device", "may not start with 'votebox-'"),
    ],
)
def test_invalid_accounts_are_refused(
    tmp_path: Path, username: str, role: str, message: str
) -> None:
    store = AccountStore(tmp_path / "accounts.json", tmp_path / "passwd")
    with pytest.raises(ConfigError, match=message):
        store.add(username, role, "pw")  # type: ignore[arg-type]
    assert not (tmp_path / "passwd").exists()


def test_the_mosquitto_acl_file_is_rendered_from_the_one_table() -> None:
    assert (REPO / "broker" / "mosquitto.acl").read_text() == render_mosquitto_acl()


def test_the_acl_denies_the_named_accounts_what_the_device_patterns_would_give_them() -> None:
    # Mosquitto applies `pattern` lines to every user (security_default.c); a user's deny
    # lines are checked first.
    blocks = render_mosquitto_acl().split("\nuser ")[1:]
    denied = {
        b.split("\n")[0]: {x for x in b.split("\n") if x.startswith("topic deny ")} for b in blocks
    }
    for user in ("processor", "dashboard"):
        assert denied[user] == {
            f"topic deny votes/+/{user}",
            f"topic deny devices/{user}/+",
            f"topic deny acks/{user}",
        }


@pytest.mark.parametrize(
    ("allowed", "requested", "covers"),
    [
        ("votes/#", "votes/p/k", True),
        ("votes/#", "votes/+/+", True),
        ("votes/#", "votes/#", True),
        ("votes/#", "votes", True),  # as in MQTT, "#" matches its parent level too
        ("acks/k", "acks/k", True),
        ("acks/k", "acks/+", False),
        ("acks/k", "acks/#", False),
        ("acks/k", "acks/k/x", False),
        ("polls/+/results", "polls/p/results", True),
        ("polls/+/results", "polls/+/results", True),
        ("polls/+/results", "polls/#", False),
        ("polls/+/results", "polls/p/config", False),
        ("devices/+/+", "devices/k/status", True),
        ("devices/+/+", "devices/k", False),
    ],
)
def test_a_grant_covers_a_request_only_when_it_covers_every_topic_the_request_matches(
    allowed: str, requested: str, covers: bool
) -> None:
    assert filter_covers(allowed, requested) is covers


def test_each_role_gets_exactly_its_topics() -> None:
    # A device: its own votes, status and acks; nobody else's; no results, configs or acks out.
    assert permitted("device", "k1", "write", "votes/p/k1")
    assert not permitted("device", "k1", "write", "votes/p/k2")
    assert permitted("device", "k1", "write", "devices/k1/heartbeat")
    assert not permitted("device", "k1", "write", "devices/k2/status")
    assert not permitted("device", "k1", "write", "polls/p/results")
    assert not permitted("device", "k1", "write", "polls/p/config")
    assert not permitted("device", "k1", "write", "acks/k1")
    assert permitted("device", "k1", "read", "acks/k1")
    assert not permitted("device", "k1", "read", "acks/k2")
    assert not permitted("device", "k1", "read", "acks/#")
    assert not permitted("device", "k1", "read", "votes/#")
    assert permitted("device", "k1", "read", "polls/p/results")
    # A device's name never widens its own patterns.
    assert not permitted("device", "+", "write", "votes/p/k2")
    # The dashboard reads and never writes.
    assert permitted("dashboard", "dashboard", "read", "polls/+/results")
    assert not permitted("dashboard", "dashboard", "write", "polls/p/results")
    assert not permitted("dashboard", "dashboard", "read", "acks/k1")
    # The processor, also through a shared subscription.
    assert permitted("processor", "processor", "read", "$share/votebox/votes/+/+")
    assert permitted("processor", "processor", "write", "polls/p/results")
    assert not permitted("processor", "processor", "write", "votes/p/k1")


def test_only_the_processor_picks_its_client_id() -> None:
    assert client_id_allowed("device", "k1", "k1")
    assert not client_id_allowed("device", "k1", "k2")
    assert not client_id_allowed("device", "k1", "votebox-processor")
    assert client_id_allowed("dashboard", "dashboard", "votebox-dashboard-1f2e")
    assert not client_id_allowed("dashboard", "dashboard", "votebox-processor")
    assert not client_id_allowed("dashboard", "dashboard", "k1")
    assert client_id_allowed("processor", "processor", "votebox-processor-2")


async def test_mosquitto_accepts_the_password_file_votebox_device_writes(tmp_path: Path) -> None:
    files = ["--accounts", str(tmp_path / "accounts.json"), "--passwd", str(tmp_path / "passwd")]
    files += ["--acl", str(tmp_path / "acl")]
    made = votebox(
        "device", "add", "processor", "--role", "processor", "--password", "p-pw", *files
    )
    assert made.returncode == 0, made.stderr
    kiosk = votebox("device", "add", "kiosk-7", *files)
    found = re.search(r"with password (\S+) \(shown once", kiosk.stdout)
    assert found, kiosk.stdout
    password = found.group(1)
    assert password not in (tmp_path / "accounts.json").read_text()  # hashes only
    listed = votebox("device", "list", *files)
    assert "kiosk-7" in listed.stdout and "processor" in listed.stdout
    assert (tmp_path / "passwd").stat().st_mode & 0o077 == 0  # private
    assert (tmp_path / "acl").read_text() == render_mosquitto_acl()

    port = free_port()
    (tmp_path / "mosquitto.conf").write_text(
        f"listener {port} {HOST}\nallow_anonymous false\npassword_file {tmp_path}/passwd\n"
        f"acl_file {tmp_path}/acl\n"
        f"user {getpass.getuser()}\n"
    )
    broker = ManagedProcess(
        "mosquitto",
        ["mosquitto", "-c", str(tmp_path / "mosquitto.conf")],
        ready=lambda: port_open(port),
        log_path=tmp_path / "mosquitto.log",
        port=port,
    )
    broker.start()
    try:

        async def login(user: str, pw: str) -> bool:
            try:
                async with aiomqtt.Client(HOST, port, identifier=user, username=user, password=pw):
                    return True
            except aiomqtt.MqttError:
                return False

        assert await login("kiosk-7", password)
        assert await login("processor", "p-pw")
        assert not await login("kiosk-7", "guess")
        removed = votebox("device", "remove", "kiosk-7", *files)
        assert removed.returncode == 0
        broker.signal(signal.SIGHUP)  # Mosquitto re-reads its password file
        for _ in range(50):
            if not await login("kiosk-7", password):
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the removed account can still log in")
        assert await login("processor", "p-pw")
    finally:
        assert broker.stop() == 0
    gone = votebox("device", "remove", "kiosk-7", *files)
    assert gone.returncode == 2 and "no account" in gone.stderr


def test_parallel_adds_and_removes_lose_no_account_and_keep_both_files_alike(
    tmp_path: Path,
) -> None:
    """Provisioning scripts run `votebox device add` in parallel: each read-change-write holds
    the accounts file's lock, so none writes over another's account."""
    files = ["--accounts", str(tmp_path / "accounts.json"), "--passwd", str(tmp_path / "passwd")]
    files += ["--acl", str(tmp_path / "acl")]

    def run_all(*commands: list[str]) -> None:
        started = [
            subprocess.Popen(
                [sys.executable, "-m", "processor.cli", "device", *command, *files],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for command in commands
        ]
        for proc in started:
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err

    run_all(*(["add", f"kiosk-{i}", "--password", f"pw-{i}"] for i in range(12)))
    store = AccountStore(tmp_path / "accounts.json", tmp_path / "passwd")
    assert sorted(store.load()) == sorted(f"kiosk-{i}" for i in range(12))
    run_all(*(["remove", f"kiosk-{i}"] for i in range(0, 12, 2)))
    kept = {f"kiosk-{i}" for i in range(1, 12, 2)}
    accounts = store.load()
    assert set(accounts) == kept
    lines = dict(line.split(":", 1) for line in (tmp_path / "passwd").read_text().splitlines())
    assert set(lines) == kept
    for name in kept:
        assert lines[name] == accounts[name].mosquitto
        assert verify_mosquitto_hash(f"pw-{name.removeprefix('kiosk-')}", lines[name])
    assert not list(tmp_path.glob("*.tmp")), "no temporary file is left behind"
