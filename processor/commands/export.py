"""``votebox export POLL``: a poll's votes from InfluxDB as CSV or JSON, for spreadsheets.

Rule: every row is a sum of point values (a changed vote's withdrawn point is -1), so the rows
of any grouping add up to the poll's total in InfluxDB, which ``votebox recount`` compares with
the tally.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import sys
import time
from collections.abc import Sequence
from typing import TextIO

from processor.commands import Commands, add_command
from processor.commands.audit import EXPORT_COLUMNS, vote_rows
from processor.config import Settings
from processor.errors import ConfigError
from processor.influx.queries import chain_points
from processor.influx.writers import EXPORT_BUCKETS, EXPORT_BY, ExportRow, make_writer
from processor.poll import parse_time_ms
from processor.poll_store import earliest_point_ms, load_poll
from processor.store import open_redis, redis_errors

__all__ = ["export_rows", "register"]


def _columns(by: str) -> tuple[str, ...]:
    """The columns of an export grouped ``by``: the group's (a time bucket's is "time")."""
    if by == "option":
        return ("poll", "option", "label", "votes")
    return ("poll", "time" if by in EXPORT_BUCKETS else by, "option", "label", "votes")


def register(commands: Commands) -> None:
    """Add ``votebox export``."""
    p = add_command(
        commands,
        "export",
        _run,
        env_epilog=True,
        help="a poll's votes from InfluxDB as CSV or JSON, per option and per minute, hour, "
        "site or device",
        description="Votes are sums of points (docs/analytics.md): the rows of any grouping add "
        "up to the poll's votes in InfluxDB, which `votebox recount` checks against the tally.",
    )
    p.add_argument("poll")
    p.add_argument("--format", choices=["csv", "json"], default="csv")
    p.add_argument(
        "--by",
        choices=[*EXPORT_BY, "vote"],
        default="option",
        help="group votes by (default option); vote: a row per point, with its place in the "
        "chain, for `votebox audit --from-export`",
    )
    p.add_argument(
        "--since",
        metavar="TIME",
        default=None,
        help="votes dated from then (ISO 8601 or Unix seconds; default: the poll's creation)",
    )
    p.add_argument(
        "--until", metavar="TIME", default=None, help="votes dated before then (default: now)"
    )
    p.add_argument("--out", default="-", help="the file to write (default: standard output)")
    p.add_argument("--redis-url", dest="redis_url", metavar="VOTEBOX_REDIS_URL")
    p.add_argument("--influx-url", dest="influx_url", metavar="VOTEBOX_INFLUX_URL")


def _run(args: argparse.Namespace, settings: Settings) -> int:
    columns: Sequence[str]
    if args.by == "vote":
        columns, records = EXPORT_COLUMNS, asyncio.run(_votes(settings, args.poll))
    else:
        rows = asyncio.run(
            export_rows(settings, args.poll, by=args.by, since=args.since, until=args.until)
        )
        columns, records = _columns(args.by), _records(args.poll, args.by, rows)
    if args.out == "-":
        _write(sys.stdout, columns, records, args.format)
    else:
        with open(args.out, "w", newline="", encoding="utf-8") as out:
            _write(out, columns, records, args.format)
    return 0


async def export_rows(
    settings: Settings, poll: str, *, by: str, since: str | None, until: str | None
) -> list[ExportRow]:
    """The rows of the export, sorted by group then option.

    Raises:
        ConfigError: InfluxDB is not configured, there is no such poll, or a time is not one.
        InfluxRejected, InfluxUnavailable: InfluxDB cannot be queried.
    """
    target = settings.influx_target()
    if target is None:
        raise ConfigError("export reads InfluxDB: set VOTEBOX_INFLUX_URL (and its friends)")
    async with open_redis(settings.redis_target(), timeout_s=settings.redis_timeout_s) as redis:
        with redis_errors():
            if await load_poll(redis, poll) is None:
                raise ConfigError(f"no poll {poll!r}; votebox poll list shows the polls there are")
            earliest_ms = await earliest_point_ms(redis, poll, clock_skew_s=settings.clock_skew_s)
    since_ms = _time_ms(since) if since else earliest_ms
    until_ms = _time_ms(until) if until else int(time.time() * 1000) + settings.clock_skew_s * 1000
    if until_ms <= since_ms:
        raise ConfigError("--until must come after --since")
    writer = make_writer(target)
    try:
        rows = await asyncio.to_thread(
            writer.query_sums, poll, by, since_ms * 1_000_000, until_ms * 1_000_000
        )
    finally:
        writer.close()
    return sorted(rows, key=lambda row: (row.group, row.option))


async def _votes(settings: Settings, poll: str) -> list[dict[str, object]]:
    """Every point of the poll, in InfluxDB or still queued, a row each in chain order: all of
    its log (--since and --until are not applied), from its creation on."""
    target = settings.influx_target()
    if target is None:
        raise ConfigError("export reads InfluxDB: set VOTEBOX_INFLUX_URL (and its friends)")
    async with open_redis(settings.redis_target(), timeout_s=settings.redis_timeout_s) as redis:
        with redis_errors():
            definition = await load_poll(redis, poll)
            if definition is None:
                raise ConfigError(f"no poll {poll!r}; votebox poll list shows the polls there are")
            earliest_ms = await earliest_point_ms(redis, poll, clock_skew_s=settings.clock_skew_s)
            writer = make_writer(target, timeout_s=60.0)
            try:
                points = await chain_points(
                    redis, writer, poll, definition.shards, since_ms=earliest_ms
                )
            finally:
                writer.close()
    return vote_rows(points, definition.shards)


def _time_ms(text: str) -> int:
    """Unix milliseconds from ISO 8601 text or Unix seconds (digits)."""
    return parse_time_ms(int(text) if text.isdigit() else text)


def _records(poll: str, by: str, rows: list[ExportRow]) -> list[dict[str, object]]:
    columns = _columns(by)
    return [
        dict(zip(columns, (poll, *((row.group,) if by != "option" else ()), row.option,
                           row.label, row.votes), strict=True))
        for row in rows
    ]  # fmt: skip


def _write(out: TextIO, columns: Sequence[str], records: list[dict[str, object]], fmt: str) -> None:
    if fmt == "json":
        json.dump(records, out, indent=1)
        out.write("\n")
        return
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
