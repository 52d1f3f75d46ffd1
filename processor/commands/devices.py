"""``votebox devices``: every device's last sign of life, online state, outbox and battery.

Rule: only what the processor recorded in Redis (keys.DEVICES_SEEN, DEVICES_STATUS,
DEVICES_HEALTH), read in one round trip; it never asks the devices or the broker.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, TextIO

from redis.asyncio import Redis

from processor.commands import Commands, add_command
from processor.config import Settings
from processor.keys import (
    DEVICES_HEALTH,
    DEVICES_ONLINE,
    DEVICES_SEEN,
    DEVICES_SITE,
    DEVICES_STATUS,
)
from processor.store import open_redis, redis_errors, redis_text

__all__ = [
    "DeviceHealth",
    "forget_devices",
    "format_devices",
    "print_devices",
    "read_devices",
    "register",
]


@dataclass(frozen=True, slots=True)
class DeviceHealth:
    """What is known of one device.

    ``state`` is its retained status (``online``, ``offline``; ``unknown`` for a device that
    never sent one), or ``silent`` when it says online but nothing came from it for
    VOTEBOX_SILENT_AFTER_S (a broker that missed its death, or a hung device).
    """

    device: str
    state: str
    last_seen_ms: int | None
    uptime_s: int | None
    outbox: int | None
    battery: int | None
    heartbeat_ms: int | None
    site: str | None = None


def _json(value: object) -> dict[str, Any]:
    try:
        document = json.loads(redis_text(value))
    except ValueError:
        return {}
    return document if isinstance(document, dict) else {}


async def read_devices(redis: Redis, *, now_ms: int, silent_after_s: float) -> list[DeviceHealth]:
    """Every device that ever sent a vote, a status or a heartbeat, or was given a site, by id.

    Raises:
        StoreUnavailable: Redis is down.
    """
    with redis_errors():
        async with redis.pipeline(transaction=False) as pipe:
            pipe.zrange(DEVICES_SEEN, 0, -1, withscores=True)
            pipe.hgetall(DEVICES_STATUS)
            pipe.hgetall(DEVICES_HEALTH)
            pipe.hgetall(DEVICES_SITE)
            seen_raw, status_raw, health_raw, site_raw = await pipe.execute()
    seen = {redis_text(k): int(v) for k, v in seen_raw}
    status = {redis_text(k): _json(v) for k, v in status_raw.items()}
    health = {redis_text(k): _json(v) for k, v in health_raw.items()}
    sites = {redis_text(k): redis_text(v) for k, v in site_raw.items()}
    cutoff = now_ms - int(silent_after_s * 1000)
    out = []
    for device in sorted(seen.keys() | status.keys() | health.keys() | sites.keys()):
        st, hb = status.get(device, {}), health.get(device, {})
        times = [t for t in (seen.get(device), st.get("at_ms"), hb.get("at_ms")) if t]
        last = max(times) if times else None
        state = str(st.get("state", "unknown"))
        if state == "online" and (last is None or last < cutoff):
            state = "silent"
        out.append(
            DeviceHealth(
                device=device,
                state=state,
                last_seen_ms=last,
                uptime_s=hb.get("uptime_s"),
                outbox=hb.get("outbox"),
                battery=hb.get("battery"),
                heartbeat_ms=hb.get("at_ms"),
                site=sites.get(device),
            )
        )
    return out


def _ago(ms: int | None, now_ms: int) -> str:
    if ms is None:
        return "never"
    seconds = max(0, (now_ms - ms) // 1000)
    if seconds < 120:
        return f"{seconds}s ago"
    if seconds < 7200:
        return f"{seconds // 60}m ago"
    return f"{seconds // 3600}h ago"


def format_devices(devices: list[DeviceHealth], *, now_ms: int) -> str:
    """The table ``votebox devices`` prints."""
    if not devices:
        return "no devices yet: none has sent a vote, a status or a heartbeat"
    rows = [("DEVICE", "SITE", "STATE", "LAST SEEN", "UPTIME", "OUTBOX", "BATTERY")]
    for d in devices:
        rows.append(
            (
                d.device,
                d.site or "-",
                d.state,
                _ago(d.last_seen_ms, now_ms),
                "-" if d.uptime_s is None else f"{d.uptime_s}s",
                "-" if d.outbox is None else str(d.outbox),
                "-" if d.battery is None else f"{d.battery}%",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    states = sorted({d.state for d in devices})
    counts = ", ".join(f"{sum(d.state == s for d in devices)} {s}" for s in states)
    return "\n".join([line.rstrip() for line in lines] + [f"{len(devices)} devices: {counts}"])


async def forget_devices(redis: Redis, devices: list[str]) -> int:
    """Forget what is known of ``devices`` (a kiosk taken out of service): last seen, status,
    heartbeat; not their site, nor their votes. How many were known.

    Raises:
        StoreUnavailable: Redis is down.
    """
    with redis_errors():
        async with redis.pipeline(transaction=True) as pipe:
            pipe.zrem(DEVICES_SEEN, *devices)
            pipe.zrem(DEVICES_ONLINE, *devices)
            pipe.hdel(DEVICES_STATUS, *devices)
            pipe.hdel(DEVICES_HEALTH, *devices)
            seen, *_ = await pipe.execute()
    return int(seen)


async def print_devices(
    settings: Settings, *, as_json: bool, forget: list[str] | None = None, out: TextIO = sys.stdout
) -> int:
    """Print every device, after forgetting ``forget``; returns the exit code."""
    async with open_redis(settings.redis_target(), timeout_s=settings.redis_timeout_s) as redis:
        if forget:
            known = await forget_devices(redis, forget)
            print(
                f"forgot {known} of {len(forget)} devices; clear their retained status too, or a "
                "processor starting a new session hears it again: mosquitto_pub -r -n -t "
                "devices/ID/status",
                file=sys.stderr,
            )
        now_ms = int(time.time() * 1000)
        devices = await read_devices(redis, now_ms=now_ms, silent_after_s=settings.silent_after_s)
    if as_json:
        for d in devices:
            print(json.dumps(asdict(d), separators=(",", ":")), file=out)
    else:
        print(format_devices(devices, now_ms=now_ms), file=out)
    return 0


def register(commands: Commands) -> None:
    """Add ``votebox devices``."""
    p = add_command(
        commands,
        "devices",
        _run,
        help="every device: last seen, online or not, outbox depth, battery",
    )
    p.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    p.add_argument(
        "--forget",
        action="append",
        default=[],
        metavar="DEVICE",
        help="first forget this device's last seen time, status and heartbeat (a kiosk taken "
        "out of service: it is no longer listed, nor counted silent); repeat for more",
    )
    p.add_argument("--redis-url", dest="redis_url", metavar="VOTEBOX_REDIS_URL")


def _run(args: argparse.Namespace, settings: Settings) -> int:
    return asyncio.run(print_devices(settings, as_json=args.json, forget=args.forget))
