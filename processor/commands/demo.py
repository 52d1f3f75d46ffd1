"""``votebox demo``: the whole pipeline on embedded defaults, on this machine, in one command.

Rule: every server it starts runs on a free loopback port with data in a temporary folder and
is stopped, by PID, when the demo ends.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path

from broker.accounts import AccountStore
from broker.acl import Role
from devices.simulator import SimulationSummary, fleet_ids, simulate
from processor.commands import Commands, add_command, needs_checkout
from processor.commands.audit import audit, result_witness
from processor.commands.dashboard import serve_dashboard
from processor.commands.recount import recount
from processor.commands.watch import wait_for_results, watch_polls
from processor.config import MqttUrl, Settings
from processor.errors import ConfigError, VoteboxError
from processor.influx.writers import make_writer
from processor.poll import Poll
from processor.poll_store import create_poll
from processor.store import connect, open_redis

__all__ = ["register", "run_demo"]

_KIOSKS = "kiosk"  # the kiosks' device ids: kiosk-0000 and up (fleet_ids)
# The touch kiosk page's device: a tablet whose votes a person presses in the browser.
_TABLET = "tablet-01"
_POLL = Poll(
    id="demo",
    title="Which snack should the stadium sell?",
    labels=("Pretzels", "Nachos", "Popcorn"),
)


async def _create_poll(redis_url: str) -> None:
    async with open_redis(redis_url) as redis:
        with contextlib.suppress(ConfigError):
            await create_poll(redis, _POLL)


async def _print_live(url: MqttUrl, stop: threading.Event) -> None:
    # The same view as `votebox watch demo`.
    await watch_polls(url, _POLL.id, out=sys.stdout, in_place=os.isatty(1), stop=stop.is_set)


def run_demo(*, duration_s: float | None, devices: int, rate: float) -> int:
    """Run the demo until Ctrl-C or ``duration_s``; returns the exit code."""
    # SIGTERM ends the demo like Ctrl-C, so its servers are stopped rather than left running.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    # harness/ starts the servers: in a checkout only, never in the installed package.
    with needs_checkout("demo"):
        from harness.services import amqtt_broker, influxdb, processor, redis_server
    with tempfile.TemporaryDirectory(prefix="votebox-demo-") as tmp:
        root = Path(tmp)
        accounts = _provision(root, devices)
        with (
            redis_server(root / "redis") as redis,
            amqtt_broker(root / "amqtt", accounts=root / "accounts.json") as broker,
            influxdb(root / "influxdb") as influx,
        ):
            asyncio.run(_create_poll(redis.url))
            env = {
                "VOTEBOX_MQTT_URL": (
                    f"mqtt://processor:{accounts['processor']}@127.0.0.1:{broker.port}"
                ),
                "VOTEBOX_MQTT_PROTOCOL": "3.1.1",
                "VOTEBOX_REDIS_URL": redis.url,
                "VOTEBOX_INFLUX_URL": influx.url,
                "VOTEBOX_INFLUX_API": "v1",
                "VOTEBOX_INFLUX_DB": "votebox",
            }
            proc = processor(root / "processor", env=env)
            proc.start()
            with contextlib.ExitStack() as stack:
                stack.callback(proc.stop)  # runs last: after the dashboard has stopped
                try:
                    dashboard_url = stack.enter_context(
                        serve_dashboard(
                            port=0, ws_url=broker.ws_url, password=accounts["dashboard"]
                        )
                    )
                except ConfigError as exc:  # npm's part of scripts/setup not done
                    dashboard_url = f"(not available: {exc})"
                kiosk_url = (
                    f"{dashboard_url}kiosk.html#device={_TABLET}&password={accounts[_TABLET]}"
                    f"&poll={_POLL.id}"
                    if dashboard_url.startswith("http")
                    else dashboard_url
                )
                query = f"SELECT sum(value) FROM vote WHERE poll='{_POLL.id}' GROUP BY label"
                print(
                    f"votebox demo: amqtt broker on mqtt://127.0.0.1:{broker.port}, Redis on "
                    f"{redis.url}, InfluxDB on {influx.url}, data in {root}"
                )
                print(
                    f"The broker lets in only the accounts in {root / 'accounts.json'} (the "
                    "processor, the dashboard, each kiosk), each to its own topics."
                )
                print(
                    f"{devices} kiosks vote {rate:g} times a second; results are read from the "
                    f"retained topic polls/{_POLL.id}/results. Ctrl-C stops."
                )
                print(f"Live results in a browser: {dashboard_url}")
                print(f"A touch kiosk in a browser (the device {_TABLET}): {kiosk_url}")
                print(
                    f"Operators: Prometheus metrics on {proc.url}/metrics, readiness on "
                    f"{proc.url}/readyz (or: votebox status --url {proc.url}); a retained "
                    "summary on the topic votebox/stats (docs/operations.md)."
                )
                print(
                    "Every vote is also a point in InfluxDB (docs/analytics.md). While the demo "
                    f"runs, try:\n  curl -sG {influx.url}/query --data-urlencode db=votebox "
                    f'--data-urlencode "q={query}"\n'
                )
                code = _vote_and_watch(
                    broker.port, duration_s, devices, rate, root / "kiosks", accounts
                )
                print(_recount(redis.url, env))
                dashboard = MqttUrl.parse(
                    f"mqtt://dashboard:{accounts['dashboard']}@127.0.0.1:{broker.port}"
                )
                print(_audit(env, dashboard))
                return code
    raise AssertionError("unreachable")  # pragma: no cover


def _recount(redis_url: str, env: dict[str, str]) -> str:
    """The demo's closing check: InfluxDB's points against Redis's tally."""
    target = Settings.from_env(env).influx_target()
    assert target is not None

    async def run() -> str:
        redis = connect(redis_url)
        writer = make_writer(target)
        try:
            for _ in range(50):  # the drainer writes within its flush interval
                result = await recount(redis, writer, _POLL.id)
                if result.matches and not any(result.queued):
                    break
                await asyncio.sleep(0.2)
            return result.report()
        except VoteboxError as exc:
            return f"recount failed: {exc}"
        finally:
            writer.close()
            await redis.aclose()

    return asyncio.run(run())


def _audit(env: dict[str, str], dashboard: MqttUrl) -> str:
    """The demo's other closing check: the chain rebuilt from InfluxDB, against Redis and the
    result the dashboard account reads from the retained topic (a witness of its own)."""

    async def run() -> str:
        try:
            published = await wait_for_results(dashboard, _POLL.id, lambda _: True, timeout_s=10)
            witness = result_witness(published, f"the retained polls/{_POLL.id}/results")
            # No wait for the drainer: the audit reads the points still queued too.
            found = await audit(Settings.from_env(env), _POLL.id, results=[witness])
            return found.verdict()
        except (VoteboxError, TimeoutError) as exc:
            return f"audit failed: {exc}"

    return asyncio.run(run())


def _provision(root: Path, devices: int) -> dict[str, str]:
    """The demo's broker accounts, the way an operator makes them (`votebox device add`):
    returns every password by username."""
    wanted: dict[str, tuple[Role, str | None]] = {
        "processor": ("processor", None),
        "dashboard": ("dashboard", None),
        _TABLET: ("device", None),
    }
    wanted |= {device: ("device", None) for device in fleet_ids(_KIOSKS, devices)}
    return AccountStore(root / "accounts.json", root / "mosquitto.passwd").add_all(wanted)


def _vote_and_watch(
    port: int,
    duration_s: float | None,
    devices: int,
    rate: float,
    store_dir: Path,
    accounts: dict[str, str],
) -> int:
    stop = threading.Event()
    summary: list[SimulationSummary] = []
    url = MqttUrl.parse(f"mqtt://dashboard:{accounts['dashboard']}@127.0.0.1:{port}")

    async def watch() -> None:
        loop = asyncio.get_running_loop()
        voted = asyncio.Event()

        def kiosks() -> None:
            try:
                summary.append(
                    simulate(
                        host="127.0.0.1",
                        port=port,
                        poll=_POLL.id,
                        n_options=len(_POLL.labels),
                        devices=devices,
                        rate=rate,
                        duration_s=duration_s or float("inf"),
                        weights=(5, 3, 2),
                        stop=stop,
                        # A quarter of the kiosks lose Wi-Fi for a while and catch up after.
                        offline_fraction=0.25,
                        store_dir=store_dir,
                        passwords=accounts,
                        prefix=_KIOSKS,
                        results_password=accounts["dashboard"],
                    )
                )
            finally:
                with contextlib.suppress(RuntimeError):  # the loop is gone after Ctrl-C
                    loop.call_soon_threadsafe(voted.set)

        # The kiosks are devices/client.py, run together by devices/fleet_loop.py; they stop
        # when `stop` is set.
        voter = threading.Thread(target=kiosks, name="votebox.demo.kiosks")
        voter.start()
        try:
            async with asyncio.TaskGroup() as tg:
                watcher = tg.create_task(_print_live(url, stop), name="votebox.demo.watch")
                await voted.wait()
                await asyncio.sleep(1.0)  # the results publish that follows the last ack
                watcher.cancel()
        finally:
            stop.set()
            await asyncio.to_thread(voter.join)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(watch())
    if summary:
        print("\n" + "\n".join(summary[0].lines()))
    return 0


def register(commands: Commands) -> None:
    """Add ``votebox demo``."""
    p = add_command(
        commands,
        "demo",
        _run,
        help="everything on embedded defaults: amqtt, Redis, the "
        "processor, a demo poll and simulated kiosks",
    )
    p.add_argument(
        "--duration", type=float, default=None, help="seconds to run (default: until Ctrl-C)"
    )
    p.add_argument("--devices", type=int, default=12, help="simulated kiosks (default 12)")
    p.add_argument("--rate", type=float, default=40.0, help="votes per second (default 40)")


def _run(args: argparse.Namespace, settings: Settings) -> int:
    return run_demo(duration_s=args.duration, devices=args.devices, rate=args.rate)
