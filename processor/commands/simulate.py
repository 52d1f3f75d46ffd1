"""``votebox simulate``: a fleet of simulated kiosks voting through the broker (devices/).

Rule: it meets the processor only on the wire; with ``--redis-url`` it also checks what the
kiosks were told against Redis's tally.
"""

from __future__ import annotations

import argparse
import asyncio
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from processor.commands import Commands, add_command
from processor.config import RedisTarget, Settings

if TYPE_CHECKING:
    from devices.simulator import ResultsSnapshot

__all__ = ["register"]


def register(commands: Commands) -> None:
    """Add ``votebox simulate``."""
    p = add_command(commands, "simulate", _run, help="simulated kiosks voting through the broker")
    p.add_argument(
        "--mqtt-url",
        dest="mqtt_url",
        metavar="MQTT_URL",
        help="broker URL (env VOTEBOX_MQTT_URL)",
    )
    p.add_argument("--poll", default="demo", help="poll to vote in (default demo)")
    p.add_argument("--options", type=int, default=3, help="how many options it has (default 3)")
    p.add_argument("--devices", type=int, default=20, help="number of kiosks (default 20)")
    p.add_argument("--rate", type=float, default=50.0, help="votes per second, all kiosks")
    p.add_argument("--duration", type=float, default=10.0, help="seconds to vote (default 10)")
    p.add_argument(
        "--offline-fraction",
        type=float,
        default=0.0,
        help="share of kiosks that lose their network once for a while (default 0)",
    )
    p.add_argument(
        "--drain", type=float, default=30.0, help="seconds to wait for outboxes to empty"
    )
    p.add_argument("--seed", type=int, default=None, help="repeatable choices and outages")
    p.add_argument(
        "--store-dir", default=None, help="keep the kiosks' outbox files here (default: temp)"
    )
    p.add_argument(
        "--prefix", default="kiosk", help="device ids are PREFIX-0000 and up (default kiosk)"
    )
    p.add_argument(
        "--accounts",
        default=None,
        help="on a broker with accounts: give each kiosk an account with a fresh password in"
        " this accounts file, and rewrite the Mosquitto password file and ACL beside it"
        " (votebox broker reads them at once; send Mosquitto a SIGHUP)",
    )
    p.add_argument(
        "--redis-url",
        dest="redis_url",
        metavar="REDIS_URL",
        help="also check the summary against Redis's tally (env VOTEBOX_REDIS_URL)",
    )
    p.add_argument(
        "--dashboard-password",
        dest="dashboard_password",
        metavar="DASHBOARD_PASSWORD",
        help="the dashboard account's password, to read the results topic"
        " (env VOTEBOX_DASHBOARD_PASSWORD)",
    )


def _run(args: argparse.Namespace, settings: Settings) -> int:
    from devices.simulator import fleet_ids, simulate

    url = settings.mqtt_url
    # Checked against Redis only when the operator named a Redis (flag or environment).
    named = {"redis_url", "redis_sentinels"} & settings.given
    check_at = settings.redis_target() if named else None
    passwords = None
    if args.accounts:
        from broker.accounts import AccountStore

        accounts = Path(args.accounts)
        store = AccountStore(
            accounts, accounts.with_name("mosquitto.passwd"), accounts.with_name("mosquitto.acl")
        )
        kiosks = fleet_ids(args.prefix, args.devices)
        passwords = store.add_all(dict.fromkeys(kiosks, ("device", None)))
        print(
            f"{len(kiosks)} kiosk accounts written to {accounts} (and the Mosquitto password"
            " file beside it: send Mosquitto a SIGHUP now; votebox broker reads them at once)",
            flush=True,
        )
    redis_before = _redis_tally(check_at, args.poll) if check_at else None
    stop = threading.Event()
    try:
        summary = simulate(
            host=url.host,
            port=url.port,
            poll=args.poll,
            n_options=args.options,
            devices=args.devices,
            rate=args.rate,
            duration_s=args.duration,
            offline_fraction=args.offline_fraction,
            drain_s=args.drain,
            seed=args.seed,
            store_dir=Path(args.store_dir) if args.store_dir else None,
            prefix=args.prefix,
            stop=stop,
            passwords=passwords,
            results_password=settings.dashboard_password,
        )
    except KeyboardInterrupt:
        stop.set()
        return 130
    if check_at:
        # Every ack the kiosks got followed its commit: Redis already holds what they were told.
        summary.redis_before = redis_before
        summary.redis_after = _redis_tally(check_at, args.poll)
    print("\n".join(summary.lines()))
    return 0 if summary.agrees() and not summary.queued else 1


def _redis_tally(target: RedisTarget, poll: str) -> ResultsSnapshot:
    """A poll's total and counts in Redis: the tally itself, not its retained copy."""
    from devices.simulator import ResultsSnapshot

    async def read() -> ResultsSnapshot:
        from processor.poll_store import read_results
        from processor.store import open_redis

        async with open_redis(target) as redis:
            found = (await read_results(redis, [poll])).get(poll)
        return ResultsSnapshot(found.total, found.counts) if found else ResultsSnapshot()

    return asyncio.run(read())
