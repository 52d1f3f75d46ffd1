"""The ``votebox`` command. Rule: parse flags, build Settings, call asyncio.run; nothing more."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from processor.config import DEFAULT_MQTT_URL, ENV_VARS, MqttUrl, Settings
from processor.errors import ConfigError, VoteboxError
from processor.logs import configure_logging

if TYPE_CHECKING:
    from devices.simulator import ResultsSnapshot

__all__ = ["main"]

log = logging.getLogger("votebox")

_ENV_HELP = "environment (flags override them):\n" + "\n".join(
    f"  {var:<28} {text}" for var, _, text in ENV_VARS
)


def _add_processor_flags(parser: argparse.ArgumentParser) -> None:
    for var, name, text in ENV_VARS:
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, dest=name, metavar=var, help=f"{text} (env {var})")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="votebox",
        description="Physical voting over MQTT: CBOR votes in, exact tallies in Redis, "
        "live retained results out.",
        epilog=_ENV_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "processor",
        help="run the vote processor",
        epilog=_ENV_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_processor_flags(p)

    p = sub.add_parser(
        "device",
        help="broker accounts: add, remove, list (writes the Mosquitto password file)",
        description="The accounts file is the source of truth; the Mosquitto password file is "
        "rewritten from it on every change (then: docker-compose kill -s HUP mosquitto). A "
        "device's username is its device id; the processor and dashboards have accounts of "
        "their own (--role).",
    )
    device_sub = p.add_subparsers(dest="device_command", required=True, metavar="ACTION")
    a = device_sub.add_parser("add", help="add or replace an account; prints its password once")
    a.add_argument("username")
    a.add_argument("--role", default="device", choices=["device", "processor", "dashboard"])
    a.add_argument(
        "--password",
        default=None,
        help="the password (default: a random one, printed once)",
    )
    r = device_sub.add_parser("remove", help="remove an account")
    r.add_argument("username")
    device_sub.add_parser("list", help="every account and its role")
    for action in device_sub.choices.values():
        action.add_argument(
            "--accounts", default="broker/accounts.json", help="the accounts file (JSON)"
        )
        action.add_argument(
            "--passwd", default="broker/mosquitto.passwd", help="the Mosquitto password file"
        )
        action.add_argument(
            "--acl", default="broker/mosquitto.acl", help="the Mosquitto ACL file (rewritten)"
        )

    p = sub.add_parser(
        "status",
        help="ask a running processor whether it is ready (exit 0 ready, 1 not ready, 2 no answer)",
    )
    p.add_argument(
        "--url",
        default=None,
        help="its endpoint, default http://VOTEBOX_METRICS_HOST:VOTEBOX_METRICS_PORT "
        "(127.0.0.1:9100)",
    )

    p = sub.add_parser("broker", help="run the embedded amqtt broker")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=1883, help="port to listen on (default 1883)")
    p.add_argument(
        "--ws-port",
        type=int,
        default=9001,
        help="WebSockets port for browser dashboards (default 9001; 0: none)",
    )
    who = p.add_mutually_exclusive_group()
    who.add_argument(
        "--accounts",
        default="broker/accounts.json",
        help="let in only these accounts, each to its own topics (default broker/accounts.json,"
        " written by votebox device add)",
    )
    who.add_argument(
        "--open",
        action="store_true",
        help="development only: let in any client that sends a username, to any topic",
    )
    p.add_argument("--tls-port", type=int, default=0, help="a TLS listener's port (0: none)")
    p.add_argument("--certfile", default=None, help="the TLS listener's certificate (PEM)")
    p.add_argument("--keyfile", default=None, help="the TLS listener's private key (PEM)")

    p = sub.add_parser(
        "poll",
        help="create, open, close, list, show, delete polls; apply a TOML file of polls",
        epilog=_ENV_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    poll_sub = p.add_subparsers(dest="poll_command", required=True, metavar="ACTION")
    c = poll_sub.add_parser(
        "create",
        help="create a poll (open for votes now, unless --opens-at is later)",
        description="Types: single (one option), multiple (up to --max-choices options), "
        "rating (a value of --scale, such as 1-5), nps (a rating 0-10 with its Net Promoter "
        "Score). Times are ISO 8601 with a UTC offset, e.g. 2026-12-01T18:00:00Z.",
    )
    c.add_argument("poll", help="poll id: 1-64 chars of A-Z a-z 0-9 _ -")
    c.add_argument(
        "--reuse-deleted-id",
        action="store_true",
        help="take the id of a deleted poll: votes cast for the deleted one that are still "
        "queued (broker, device outboxes) count into this one",
    )
    c.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="LABEL",
        help="an option label; repeat for each option, in order (index 0 first); not for "
        "rating and nps polls",
    )
    c.add_argument("--title", default="", help="the question shown on kiosks")
    c.add_argument("--type", default="single", choices=["single", "multiple", "rating", "nps"])
    c.add_argument("--max-choices", type=int, default=None, help="multiple: options per vote")
    c.add_argument("--scale", default=None, metavar="MIN-MAX", help="rating: e.g. 1-5")
    c.add_argument("--opens-at", default=None, metavar="TIME", help="opens then, not now")
    c.add_argument("--closes-at", default=None, metavar="TIME", help="closes by itself then")
    c.add_argument(
        "--grace-s",
        type=int,
        default=None,
        help="after the close, votes cast while open still count if they arrive within this "
        "(default 300)",
    )
    c.add_argument(
        "--one-per-voter",
        action="store_true",
        help="votes carry a voter token; each voter's latest vote counts",
    )
    c.add_argument(
        "--cooldown-s",
        type=int,
        default=None,
        help="presses of one device this close together count once (the rest: suppressed)",
    )
    c.add_argument(
        "--hide-results-until-close",
        action="store_true",
        help="retained results carry totals only while the poll is open",
    )
    for name, text in (
        ("open", "open a poll now (reopens a closed one)"),
        ("close", "close a poll now; it publishes its final result at once"),
        ("show", "print a poll, its tally and the fates of its votes"),
    ):
        a = poll_sub.add_parser(name, help=text)
        a.add_argument("poll")
    poll_sub.add_parser("list", help="every poll, a line each")
    d = poll_sub.add_parser(
        "delete", help="delete a poll and its tally; its retained topics are cleared"
    )
    d.add_argument("poll")
    d.add_argument("--yes", action="store_true", help="yes, delete its votes too")
    f = poll_sub.add_parser(
        "apply",
        help="create or update the polls a TOML file declares (docs/polls.md); all or nothing",
    )
    f.add_argument("file")
    for action in poll_sub.choices.values():
        action.add_argument("--redis-url", dest="redis_url", metavar="VOTEBOX_REDIS_URL")

    p = sub.add_parser(
        "recount",
        help="recompute a poll's tally from InfluxDB and compare it with Redis (exit 1 if they "
        "differ)",
        epilog=_ENV_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("poll")
    p.add_argument("--redis-url", dest="redis_url", metavar="VOTEBOX_REDIS_URL")
    p.add_argument("--influx-url", dest="influx_url", metavar="VOTEBOX_INFLUX_URL")

    p = sub.add_parser("simulate", help="simulated kiosks voting through the broker")
    p.add_argument(
        "--mqtt-url",
        default=os.environ.get("VOTEBOX_MQTT_URL", DEFAULT_MQTT_URL),
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
        default=os.environ.get("VOTEBOX_REDIS_URL"),
        help="also check the summary against Redis's tally (env VOTEBOX_REDIS_URL)",
    )
    p.add_argument(
        "--dashboard-password",
        default=os.environ.get("VOTEBOX_DASHBOARD_PASSWORD"),
        help="the dashboard account's password, to read the results topic"
        " (env VOTEBOX_DASHBOARD_PASSWORD)",
    )

    for name, text in (
        ("kiosk", "a text-mode kiosk: shows the poll, each line you type is a vote"),
        ("button", "a button with one option: each line (or --presses) is a press"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("device", help="the device id (its MQTT client id and username)")
        p.add_argument("--poll", required=True, help="the poll to vote in")
        if name == "button":
            p.add_argument("--option", type=int, required=True, help="the choice it sends")
            p.add_argument("--presses", type=int, default=None, help="press this many times")
            p.add_argument("--interval", type=float, default=0.0, help="seconds between --presses")
        p.add_argument(
            "--broker",
            default="mqtt://127.0.0.1:1883",
            help="the broker, mqtt:// or mqtts:// (default mqtt://127.0.0.1:1883)",
        )
        p.add_argument(
            "--password",
            default=os.environ.get("VOTEBOX_DEVICE_PASSWORD"),
            help="the device's password (env VOTEBOX_DEVICE_PASSWORD)",
        )
        p.add_argument("--ca-file", default=None, help="CA to verify an mqtts:// broker")
        p.add_argument("--store", default=None, help="the outbox file (default ./DEVICE.outbox)")
        p.add_argument(
            "--drain", type=float, default=30.0, help="seconds to wait for answers at the end"
        )
        p.add_argument("--heartbeat", type=float, default=60.0, help="seconds between heartbeats")

    p = sub.add_parser(
        "devices", help="every device: last seen, online or not, outbox depth, battery"
    )
    p.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    p.add_argument("--redis-url", dest="redis_url", metavar="VOTEBOX_REDIS_URL")

    p = sub.add_parser(
        "dashboard",
        help="serve the live results web page (it reads the broker's WebSockets listener)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port to serve on (default 8080)")
    p.add_argument(
        "--ws-url",
        default="ws://127.0.0.1:9001",
        help="the broker's WebSockets listener as browsers reach it (default ws://127.0.0.1:9001)",
    )
    p.add_argument("--username", default="dashboard", help="MQTT account of the page")
    p.add_argument(
        "--password",
        default=os.environ.get("VOTEBOX_DASHBOARD_PASSWORD"),
        help="its password (env VOTEBOX_DASHBOARD_PASSWORD); every browser gets it, so give "
        "the account read access only",
    )

    p = sub.add_parser("watch", help="live results in the terminal, updated in place")
    p.add_argument("poll", nargs="?", default=None, help="one poll (default: every poll)")
    p.add_argument(
        "--mqtt-url",
        default=os.environ.get("VOTEBOX_MQTT_URL", DEFAULT_MQTT_URL),
        help="broker URL (env VOTEBOX_MQTT_URL); the user name defaults to dashboard",
    )

    p = sub.add_parser(
        "bench", help="benchmark votebox against the broker's own limit (docs/benchmarks.md)"
    )
    p.add_argument("--smoke", action="store_true", help="a few seconds, to check it works")
    p.add_argument("--out", default="bench-results.json", help="where to write the figures")
    p.add_argument(
        "--soak",
        type=float,
        default=0,
        metavar="SECONDS",
        help="instead: one processor at a fixed rate this long, RSS every 10 s",
    )
    p.add_argument("--soak-rate", type=float, default=5000, help="messages/s for --soak")

    p = sub.add_parser(
        "demo",
        help="everything on embedded defaults: amqtt, Redis, the "
        "processor, a demo poll and simulated kiosks",
    )
    p.add_argument(
        "--duration", type=float, default=None, help="seconds to run (default: until Ctrl-C)"
    )
    p.add_argument("--devices", type=int, default=12, help="simulated kiosks (default 12)")
    p.add_argument("--rate", type=float, default=40.0, help="votes per second (default 40)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``votebox``; returns the exit code."""
    args = _build_parser().parse_args(argv)
    try:
        settings = Settings.from_env(os.environ)
        if args.command == "processor":
            settings = settings.with_overrides(
                {name: getattr(args, name) for _, name, _ in ENV_VARS}
            )
        else:
            settings = settings.with_overrides(
                {name: getattr(args, name, None) for name in ("redis_url", "influx_url")}
            )
        configure_logging(settings.log_level, settings.log_format)
        return _dispatch(args, settings)
    except VoteboxError as exc:
        print(f"votebox: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "processor":
        from processor.service import run
        from processor.supervise import EXIT_FAILED

        try:
            asyncio.run(run(settings))
        except VoteboxError:
            raise
        except Exception as exc:
            logging.getLogger("processor").critical("the processor ended: %r", exc, exc_info=exc)
            return EXIT_FAILED
        return 0
    if args.command == "device":
        return _device(args)
    if args.command == "status":
        from processor.commands.status import print_status

        url = args.url or f"http://{settings.metrics_host}:{settings.metrics_port}"
        return print_status(url)
    if args.command == "broker":
        return _broker(args)
    if args.command == "poll":
        return asyncio.run(_poll_command(args, settings))
    if args.command == "simulate":
        return _simulate(args)
    if args.command in ("kiosk", "button"):
        return _run_device(args)
    if args.command == "devices":
        from processor.commands.devices import print_devices

        return asyncio.run(print_devices(settings, as_json=args.json))
    if args.command == "recount":
        return asyncio.run(_recount(args.poll, settings))
    if args.command == "dashboard":
        return _dashboard(args)
    if args.command == "watch":
        from processor.commands.watch import watch_polls

        url = MqttUrl.parse(args.mqtt_url)
        asyncio.run(watch_polls(url, args.poll, out=sys.stdout, in_place=sys.stdout.isatty()))
        return 0
    if args.command == "bench":
        from pathlib import Path

        from bench.run import main as bench_main

        return bench_main(
            smoke=args.smoke, out=Path(args.out), soak_s=args.soak, soak_rate=args.soak_rate
        )
    if args.command == "demo":
        from processor.commands.demo import run_demo

        return run_demo(duration_s=args.duration, devices=args.devices, rate=args.rate)
    raise AssertionError(args.command)  # pragma: no cover


async def _poll_command(args: argparse.Namespace, settings: Settings) -> int:
    from processor.commands import poll as manage
    from processor.store import open_redis

    async with open_redis(settings.redis_url, timeout_s=settings.redis_timeout_s) as redis:
        return await manage.run_poll_command(redis, args.poll_command, vars(args))


async def _recount(poll: str, settings: Settings) -> int:
    from processor.commands.recount import recount
    from processor.influx import make_writer
    from processor.store import connect

    target = settings.influx_target()
    if target is None:
        raise ConfigError("recount reads InfluxDB: set VOTEBOX_INFLUX_URL (and its friends)")
    redis = connect(settings.redis_url, timeout_s=settings.redis_timeout_s)
    writer = make_writer(target)
    try:
        result = await recount(redis, writer, poll)
    finally:
        writer.close()
        await redis.aclose()
    print(result.report())
    return 0 if result.matches else 1


def _device(args: argparse.Namespace) -> int:
    from pathlib import Path

    from broker.accounts import AccountStore

    store = AccountStore(Path(args.accounts), Path(args.passwd), Path(args.acl))
    written = f"{args.passwd} and {args.acl} rewritten"
    if args.device_command == "add":
        password = store.add(args.username, args.role, args.password)
        shown = "" if args.password else f" with password {password} (shown once: keep it)"
        print(f"account {args.username} ({args.role}){shown}; {written}")
    elif args.device_command == "remove":
        store.remove(args.username)
        print(f"removed {args.username}; {written}")
    else:
        accounts = store.load()
        for name, account in accounts.items():
            print(f"{name:<24} {account.role}")
        if not accounts:
            print("no accounts yet; votebox device add NAME")
    return 0


def _dashboard(args: argparse.Namespace) -> int:
    from processor.commands.dashboard import serve_dashboard

    with serve_dashboard(
        host=args.host,
        port=args.port,
        ws_url=args.ws_url,
        username=args.username,
        password=args.password,
    ) as url:
        print(f"votebox dashboard on {url} (broker {args.ws_url}); Ctrl-C stops", flush=True)
        threading.Event().wait()
    return 0  # pragma: no cover (Ctrl-C ends it)


def _broker(args: argparse.Namespace) -> int:
    from broker.embedded import Tls, serve

    accounts = None if args.open else Path(args.accounts)
    tls = None
    if args.tls_port:
        if not (args.certfile and args.keyfile):
            raise ConfigError("--tls-port needs --certfile and --keyfile")
        tls = Tls(args.tls_port, Path(args.certfile), Path(args.keyfile))
    ws_port = args.ws_port or None
    asyncio.run(serve(host=args.host, port=args.port, ws_port=ws_port, accounts=accounts, tls=tls))
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from devices.simulator import fleet_ids, simulate

    url = MqttUrl.parse(args.mqtt_url)
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
    redis_before = _redis_tally(args.redis_url, args.poll) if args.redis_url else None
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
            results_password=args.dashboard_password,
        )
    except KeyboardInterrupt:
        stop.set()
        return 130
    if args.redis_url:
        # Every ack the kiosks got followed its commit: Redis already holds what they were told.
        summary.redis_before = redis_before
        summary.redis_after = _redis_tally(args.redis_url, args.poll)
    print("\n".join(summary.lines()))
    return 0 if summary.agrees() and not summary.queued else 1


def _redis_tally(redis_url: str, poll: str) -> ResultsSnapshot:
    """A poll's total and counts in Redis: the tally itself, not its retained copy."""
    from devices.simulator import ResultsSnapshot

    async def read() -> ResultsSnapshot:
        from processor.polls import read_results
        from processor.store import open_redis

        async with open_redis(redis_url) as redis:
            found = (await read_results(redis, [poll])).get(poll)
        return ResultsSnapshot(found.total, found.counts) if found else ResultsSnapshot()

    return asyncio.run(read())


def _run_device(args: argparse.Namespace) -> int:
    from devices.client import DeviceConfig
    from devices.kiosk import run_button, run_kiosk
    from devices.outbox import Outbox

    url = MqttUrl.parse(args.broker, variable="--broker")
    config = DeviceConfig(
        device=args.device,
        host=url.host,
        port=url.port,
        password=args.password,
        ca_file=args.ca_file if url.tls else None,
        heartbeat_s=args.heartbeat,
    )
    if url.tls and args.ca_file is None:
        raise ConfigError("an mqtts:// broker needs --ca-file (the CA that signed its certificate)")
    outbox = Outbox(Path(args.store or f"{args.device}.outbox"))
    print(f"{args.device}: epoch {outbox.epoch}, {outbox.depth()} votes waiting", flush=True)
    try:
        if args.command == "kiosk":
            return run_kiosk(
                config, outbox, args.poll, lines=sys.stdin, out=sys.stdout, drain_s=args.drain
            )
        return run_button(
            config,
            outbox,
            args.poll,
            args.option,
            presses=args.presses,
            interval_s=args.interval,
            lines=sys.stdin,
            out=sys.stdout,
            drain_s=args.drain,
        )
    finally:
        outbox.close()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
