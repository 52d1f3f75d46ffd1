"""A fleet of simulated kiosks in one process: the real device client, many times over.

Rule: every simulated kiosk is a `DeviceClient` with its own MQTT session and its own outbox
file, exactly what a firmware author would run; the simulator only presses their buttons, cuts
and restores their network, and checks at the end that the retained results grew by exactly
the votes the processor said it counted.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import resource
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from devices.ack import ACCEPTED, DUPLICATE, code_name
from devices.client import DeviceClient, DeviceConfig
from devices.fleet_loop import running_together
from devices.outbox import Outbox, Pending

__all__ = ["ResultsSnapshot", "SimulationSummary", "fleet_ids", "read_results", "simulate"]


@dataclass(frozen=True, slots=True)
class ResultsSnapshot:
    """The retained result of a poll: its total and counts (empty before the first one)."""

    total: int = 0
    counts: tuple[int, ...] = ()

    def minus(self, before: ResultsSnapshot) -> tuple[int, list[int]]:
        """How much the total and each count grew since ``before``."""
        width = max(len(self.counts), len(before.counts))
        old = list(before.counts) + [0] * (width - len(before.counts))
        new = list(self.counts) + [0] * (width - len(self.counts))
        return self.total - before.total, [b - a for a, b in zip(old, new, strict=True)]


@dataclass(slots=True)
class SimulationSummary:
    """What a simulation pressed, what the processor answered, and what the results say."""

    sent: int = 0
    fates: Counter[str] = field(default_factory=Counter)
    queued: int = 0
    counted_per_option: Counter[int] = field(default_factory=Counter)
    went_offline: int = 0
    reconnects: int = 0
    results_before: ResultsSnapshot = ResultsSnapshot()
    results_after: ResultsSnapshot | None = None
    # Redis's tally, when whoever runs the simulation can read it (votebox simulate --redis-url).
    redis_before: ResultsSnapshot | None = None
    redis_after: ResultsSnapshot | None = None

    @property
    def counted(self) -> int:
        """Votes the processor counted: accepted now, or answered duplicate (counted before)."""
        return self.fates["accepted"] + self.fates["duplicate"]

    @property
    def rejected(self) -> int:
        return sum(self.fates.values()) - self.counted

    def agrees(self) -> bool:
        """Whether the retained results (and Redis's tally, when read) grew by exactly what was
        counted, option by option."""
        if self.results_after is None:
            return False
        grew = [self._grew_by_counted(self.results_before, self.results_after)]
        if self.redis_before is not None and self.redis_after is not None:
            grew.append(self._grew_by_counted(self.redis_before, self.redis_after))
        return all(grew)

    def _grew_by_counted(self, before: ResultsSnapshot, after: ResultsSnapshot) -> bool:
        total, counts = after.minus(before)
        return total == self.counted and all(
            counts[i] == self.counted_per_option.get(i, 0) for i in range(len(counts))
        )

    def lines(self) -> list[str]:
        others = ", ".join(
            f"{name} {n}"
            for name, n in sorted(self.fates.items())
            if name not in ("accepted", "duplicate")
        )
        out = [
            f"sent {self.sent}: accepted {self.fates['accepted']}, duplicate "
            f"{self.fates['duplicate']}, rejected {self.rejected}"
            + (f" ({others})" if others else "")
            + f", still queued {self.queued}",
            f"{self.went_offline} devices went offline and came back; {self.reconnects} reconnects",
        ]
        sources = [("results topic", self.results_before, self.results_after)]
        sources.append(("redis", self.redis_before or ResultsSnapshot(), self.redis_after))
        for name, before, after in sources:
            if after is not None:
                total, _ = after.minus(before)
                verdict = "agrees" if self._grew_by_counted(before, after) else "DISAGREES"
                out.append(
                    f"{name}: total {before.total} -> {after.total} (+{total}); "
                    f"counted {self.counted}: {verdict}"
                )
        return out


def read_results(
    *,
    host: str,
    port: int,
    poll: str,
    username: str = "dashboard",
    password: str | None = None,
    timeout_s: float = 3.0,
) -> ResultsSnapshot:
    """The retained ``polls/{poll}/results`` as a dashboard sees it on connecting."""
    topic = f"polls/{poll}/results"
    got = threading.Event()
    found: list[ResultsSnapshot] = []

    def on_message(client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        # amqtt may hand a subscriber another topic's retained message (docs/brokers.md).
        if msg.topic == topic and msg.payload:
            document = json.loads(msg.payload)
            found.append(
                ResultsSnapshot(int(document["total"]), tuple(document.get("counts") or ()))
            )
            got.set()

    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        # The dashboard account may use only dashboard client ids (broker/acl.py).
        client_id=f"votebox-watch-sim-{random.randrange(1 << 32):08x}",
        protocol=paho.MQTTv311,
    )
    client.username_pw_set(username, password)
    client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
    client.on_message = on_message
    client.connect(host, port, keepalive=30)
    client.loop_start()
    try:
        got.wait(timeout_s)
    finally:
        client.disconnect()
        client.loop_stop()
    return found[-1] if found else ResultsSnapshot()


@dataclass(frozen=True, slots=True)
class _Outage:
    device: int
    starts_s: float
    ends_s: float


def fleet_ids(prefix: str, devices: int) -> list[str]:
    """The simulated kiosks' device ids: ``{prefix}-0000`` and up (what to give accounts)."""
    return [f"{prefix}-{i:04d}" for i in range(devices)]


def _raise_open_files_limit(devices: int) -> None:
    # Each device holds a socket, paho's wake-up pair and an SQLite file with its WAL and
    # shared-memory files: six descriptors.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, 8 * devices + 256))
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def simulate(
    *,
    host: str,
    port: int,
    poll: str,
    n_options: int,
    devices: int,
    rate: float,
    duration_s: float,
    offline_fraction: float = 0.0,
    weights: Sequence[float] | None = None,
    stop: threading.Event | None = None,
    drain_s: float = 30.0,
    seed: int | None = None,
    store_dir: Path | None = None,
    passwords: Mapping[str, str] | None = None,
    prefix: str = "kiosk",
    results_password: str | None = None,
    heartbeat_s: float = 10.0,
) -> SimulationSummary:
    """Run ``devices`` kiosks that vote ``rate`` times a second in total for ``duration_s``.

    Args:
        host: broker host.
        port: broker port.
        poll: the poll to vote in.
        n_options: how many options it has.
        devices: how many kiosks.
        rate: votes per second, all kiosks together.
        duration_s: how long to vote.
        offline_fraction: the share of kiosks that lose their network once, for 20-40 % of
            the run, starting in its first half; they keep voting into their outbox.
        weights: relative popularity of each option (uniform when None).
        stop: ends the voting early when set.
        drain_s: how long to wait at the end for every outbox to empty.
        seed: makes choices and outages repeatable.
        store_dir: where the outbox files live (a temporary folder when None: the kiosks are
            new devices each run).
        passwords: each device's password, by device id (a broker with accounts).
        prefix: device ids are ``{prefix}-0000`` and up.
        results_password: the ``dashboard`` account's password, to read the results topic.
        heartbeat_s: how often each kiosk reports its health.

    Returns:
        The summary, with the retained results read before and after.
    """
    rng = random.Random(seed)
    _raise_open_files_limit(devices)
    summary = SimulationSummary()
    summary.results_before = read_results(
        host=host, port=port, poll=poll, password=results_password
    )
    lock = threading.Lock()
    choices: dict[tuple[int, int, int], int] = {}

    def on_ack_of(index: int) -> Any:
        def on_ack(entry: Pending, code: int) -> None:
            with lock:
                summary.fates[code_name(code)] += 1
                choice = choices.pop((index, entry.epoch, entry.seq), None)
                # Counted now, or counted before (its first ack was lost).
                if code in (ACCEPTED, DUPLICATE) and choice is not None:
                    summary.counted_per_option[choice] += 1

        return on_ack

    stop = stop or threading.Event()
    options = list(range(n_options))
    n_offline = round(devices * offline_fraction)
    # An endless run (the demo) has its outages in its first two minutes.
    span = duration_s if math.isfinite(duration_s) else 120.0
    outages = [
        _Outage(
            i,
            starts_s=(start := rng.uniform(0, span / 2)),
            ends_s=start + rng.uniform(0.2, 0.4) * span,
        )
        for i in rng.sample(range(devices), n_offline)
    ]
    summary.went_offline = len(outages)
    with contextlib.ExitStack() as stack:
        folder = store_dir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        folder.mkdir(parents=True, exist_ok=True)
        clients = []
        for i, device in enumerate(fleet_ids(prefix, devices)):
            outbox = Outbox(folder / f"{device}.outbox", durable=False)
            stack.callback(outbox.close)
            battery = _Battery(rng.randint(40, 100))
            config = DeviceConfig(
                device=device,
                host=host,
                port=port,
                password=(passwords or {}).get(device),
                heartbeat_s=heartbeat_s,
                ack_timeout_s=10.0,
                backoff_base_s=0.5,
                backoff_cap_s=5.0,
            )
            client = DeviceClient(
                config,
                outbox,
                on_ack=on_ack_of(i),
                battery=battery.level,
                rng=random.Random(rng.random()),
            )
            clients.append(client)
        stack.enter_context(running_together(clients))
        # A broker given new accounts may take a moment to let them in (Mosquitto: a SIGHUP).
        for client in clients:
            if not client.wait_connected(30):
                raise TimeoutError(f"{client.config.device}: no connection to {host}:{port}")
        _vote(
            poll,
            clients,
            outages,
            summary,
            choices,
            lock,
            rng,
            options,
            weights,
            rate,
            duration_s,
            stop,
        )
        for outage in outages:
            clients[outage.device].restore_network()
        deadline = time.monotonic() + drain_s
        while time.monotonic() < deadline and not stop.is_set():
            if all(client.outbox.depth() == 0 for client in clients):
                break
            time.sleep(0.1)
        summary.queued = sum(client.outbox.depth() for client in clients)
        summary.reconnects = sum(max(0, client.connections - 1) for client in clients)
    summary.results_after = _settled_results(
        host, port, poll, results_password, summary.results_before.total + summary.counted
    )
    return summary


def _vote(
    poll: str,
    clients: list[DeviceClient],
    outages: list[_Outage],
    summary: SimulationSummary,
    choices: dict[tuple[int, int, int], int],
    lock: threading.Lock,
    rng: random.Random,
    options: list[int],
    weights: Sequence[float] | None,
    rate: float,
    duration_s: float,
    stop: threading.Event,
) -> None:
    pending_outages = sorted(outages, key=lambda o: o.starts_s)
    returns = sorted(outages, key=lambda o: o.ends_s)
    # Exactly rate * duration votes, however late the last of them: the summary is checkable.
    total = rate * duration_s
    started = time.monotonic()
    while not stop.is_set() and summary.sent < total:
        elapsed = time.monotonic() - started
        while pending_outages and pending_outages[0].starts_s <= elapsed:
            clients[pending_outages.pop(0).device].drop_network()
        while returns and returns[0].ends_s <= elapsed:
            clients[returns.pop(0).device].restore_network()
        due = min(total, int(elapsed * rate) + 1)
        while summary.sent < due:
            index = rng.randrange(len(clients))
            choice = rng.choices(options, weights=weights)[0]
            with lock:
                # Under the lock: the ack may come back before press() returns.
                entry = clients[index].press(poll, choice)
                choices[(index, entry.epoch, entry.seq)] = choice
            summary.sent += 1
        stop.wait(min(0.05, max(0.0, (summary.sent / rate) - elapsed)))


def _settled_results(
    host: str, port: int, poll: str, password: str | None, expected_total: int
) -> ResultsSnapshot:
    """The retained result once it shows ``expected_total`` (results are published at most
    every 100 ms), or the last one seen after a few seconds."""
    deadline = time.monotonic() + 10
    while True:
        snapshot = read_results(host=host, port=port, poll=poll, password=password, timeout_s=1)
        if snapshot.total >= expected_total or time.monotonic() > deadline:
            return snapshot
        time.sleep(0.2)


class _Battery:
    """A battery that loses a little with every reading: the heartbeat shows it draining."""

    def __init__(self, level: int) -> None:
        self._level = float(level)

    def level(self) -> int:
        self._level = max(0.0, self._level - 0.05)
        return int(self._level)
