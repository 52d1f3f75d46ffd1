"""``votebox audit POLL``: the poll's chain rebuilt from its points, checked against every head
and count that witnessed it.

Rule: a witness is only ever compared with the log rebuilt from the points; Redis is one
witness among others, and ``--no-redis`` leaves it out, so that an auditor needs nothing the
operator could rewrite unseen (docs/analytics.md, Auditing a poll).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from processor.chain import (
    Counts,
    Finding,
    Head,
    Log,
    Witness,
    first_finding,
    parse_head,
    rebuild,
)
from processor.commands import Commands, add_command
from processor.config import Settings
from processor.errors import ConfigError
from processor.influx.line_protocol import QueuedPoint
from processor.influx.queries import chain_points
from processor.influx.writers import make_writer
from processor.keys import shard_of
from processor.poll_store import earliest_point_ms, load_poll, read_fates, read_results
from processor.store import open_redis, redis_errors

__all__ = [
    "EXPORT_COLUMNS",
    "Audit",
    "audit",
    "vote_rows",
    "read_export",
    "redis_witness",
    "register",
    "result_witness",
]


@dataclass(slots=True)
class Audit:
    """What the audit found: the logs, the witnesses they were checked against, and the first
    disagreement (None: every witness agrees with the log)."""

    poll: str
    logs: list[Log]
    witnesses: list[Witness]
    finding: Finding | None
    notes: list[str] = field(default_factory=list)

    @property
    def entries(self) -> int:
        return sum(log.length for log in self.logs)

    def verdict(self) -> str:
        """One line: OK and what agreed, or FAILED and where."""
        if self.finding is not None:
            return f"audit of {self.poll}: FAILED at {self.finding}"
        names = ", ".join(w.name for w in self.witnesses) or "no witness"
        shards = len(self.logs)
        return (
            f"audit of {self.poll}: OK: {self.entries} entries in {shards} "
            f"shard{'s' if shards != 1 else ''}, heads and counts agree with {names}"
        )

    def receipt(self, device: str, epoch: int, seq: int) -> tuple[bool, str]:
        """Whether the vote is in the log, and under which witnessed head."""
        for log in self.logs:
            entry = log.find(device, epoch, seq)
            if entry is None:
                continue
            where = f"vote {device}:{epoch}:{seq} is entry {entry.number} of shard {log.shard}"
            covering = sorted(
                (h.length, w.name, h)
                for w in self.witnesses
                for h in w.heads
                if h.shard == log.shard and h.length >= entry.number
            )
            if not covering:
                return False, f"{where}, under no witnessed head yet"
            length, name, head = covering[0]
            return True, f"{where}, under the head {length}:{head.head} ({name})"
        return False, f"vote {device}:{epoch}:{seq} is not in the log"


def result_witness(document: dict[str, Any], name: str) -> Witness:
    """A published result (the retained JSON of ``polls/{poll}/results``) as a witness.

    Raises:
        ConfigError: it carries no chain (published before 2026-12-05, or not a result).
    """
    chain = document.get("chain")
    if not isinstance(chain, list) or not chain:
        raise ConfigError(f"{name} carries no chain: is it a polls/POLL/results document?")
    heads = tuple(
        Head(shard, int(link["length"]), str(link["head"])) for shard, link in enumerate(chain)
    )
    counts = None
    if document.get("counts") is not None:
        counts = Counts(tuple(int(c) for c in document["counts"]), int(document["total"]))
    return Witness(name, heads, counts)


async def redis_witness(redis: Redis, poll: str) -> Witness:
    """Redis's tally as a witness: each shard's chain and the poll's counts, as the results
    publisher reads them (each shard's hash in one read, its chain with its counts)."""
    results = (await read_results(redis, [poll]))[poll]
    heads = tuple(Head(shard, n, head) for shard, (n, head) in enumerate(results.chain))
    return Witness("Redis", heads, Counts(results.counts, results.total))


def read_export(path: Path | str, poll: str) -> list[QueuedPoint]:
    """The points of a ``votebox export --by vote`` CSV file (``-``: standard input).

    Raises:
        ConfigError: it is not such a file.
    """
    with open(
        sys.stdin.fileno() if path == "-" else path, encoding="utf-8", closefd=path != "-"
    ) as f:
        reader = csv.DictReader(f)
        missing = set(EXPORT_COLUMNS) - set(reader.fieldnames or ())
        if missing:
            raise ConfigError(
                f"{path} is not an export of votes (votebox export --by vote): it has no "
                f"{', '.join(sorted(missing))}"
            )
        try:
            return [
                QueuedPoint(
                    "",
                    poll,
                    row["device"],
                    int(row["epoch"]),
                    int(row["seq"]),
                    int(row["option"]),
                    int(row["ts"]),
                    row["source"],
                    row["withdrawn"] == "1",
                    row.get("site", ""),
                    int(row["entry"] or 0),
                    int(row["link"] or 0),
                    row["head"],
                )  # fmt: skip
                for row in reader
                if row["poll"] == poll
            ]
        except ValueError as exc:
            raise ConfigError(f"{path}, line {reader.line_num}: {exc}") from None


# The columns of ``votebox export --by vote``: one row per point, all the chain needs.
EXPORT_COLUMNS = (
    "poll", "shard", "entry", "link", "head", "device", "epoch", "seq", "option", "withdrawn",
    "ts", "source", "site",
)  # fmt: skip


def vote_rows(points: Iterable[QueuedPoint], shards: int) -> list[dict[str, object]]:
    """The rows of ``votebox export --by vote``, in chain order."""
    rows = [
        {
            "poll": p.poll,
            "shard": shard_of(p.device, shards),
            "entry": p.entry,
            "link": p.link,
            "head": p.head,
            "device": p.device,
            "epoch": p.epoch,
            "seq": p.seq,
            "option": p.option,
            "withdrawn": int(p.withdrawn),
            "ts": p.ts_s,
            "source": p.source,
            "site": p.site,
        }  # fmt: skip
        for p in set(p._replace(stream_id="") for p in points)
    ]
    rows.sort(key=lambda r: (r["shard"], r["entry"], r["withdrawn"], r["option"]))
    return rows


async def audit(
    settings: Settings,
    poll: str,
    *,
    export: str | None = None,
    heads: Sequence[Head] = (),
    results: Sequence[Witness] = (),
    use_redis: bool = True,
    shards: int | None = None,
) -> Audit:
    """Rebuild ``poll``'s chain and check it against every witness given, and Redis's.

    Args:
        settings: where Redis and InfluxDB are.
        poll: the poll id.
        export: a ``votebox export --by vote`` file to rebuild from, instead of InfluxDB.
        heads: heads seen published (``--head``).
        results: published results (``--result``).
        use_redis: whether Redis is a witness (and the source of the poll's shards and of the
            points not yet written to InfluxDB).
        shards: the poll's shards, where Redis is not asked.

    Raises:
        ConfigError: nothing to rebuild from, or no such poll.
        StoreUnavailable, InfluxRejected, InfluxUnavailable: a source cannot be read.
    """
    witnesses = list(results)
    if heads:
        witnesses.append(Witness("the heads given", tuple(heads)))
    notes: list[str] = []
    if use_redis:
        async with open_redis(settings.redis_target(), timeout_s=settings.redis_timeout_s) as r:
            with redis_errors():
                definition = await load_poll(r, poll)
                if definition is None:
                    raise ConfigError(f"no poll {poll!r}; votebox poll list shows the polls")
                shards = definition.shards
                # The lengths first: every entry up to them is then queued or in InfluxDB.
                witnesses.insert(0, await redis_witness(r, poll))
                # A poll deleted and made again under its id starts a new chain: the old
                # one's points are dated before this one could date any.
                earliest_ms = await earliest_point_ms(r, poll, clock_skew_s=settings.clock_skew_s)
                points = await _points(settings, r, poll, shards, export, since_ms=earliest_ms)
                fates, _ = await read_fates(r, poll)
        if fates.get("point_dropped"):
            notes.append(
                f"{fates['point_dropped']} points were dropped at the queue's bound "
                "(votebox_influx_points_dropped): their entries cannot be found"
            )
    else:
        shards = shards or max((len(w.heads) for w in witnesses), default=1)
        points = await _points(settings, None, poll, shards, export)
    up_to = {shard: 0 for shard in range(shards)}
    for w in witnesses:
        for h in w.heads:
            up_to[h.shard] = max(up_to.get(h.shard, 0), h.length)
    if not use_redis and not witnesses:
        # Nobody's lengths to go by: the log as far as its points go.
        for p in points:
            shard = shard_of(p.device, shards)
            up_to[shard] = max(up_to[shard], p.entry)
    logs = rebuild(points, shards=shards, up_to=up_to)
    return Audit(poll, logs, witnesses, first_finding(logs, witnesses), notes)


async def _points(
    settings: Settings,
    redis: Redis | None,
    poll: str,
    shards: int,
    export: str | None,
    *,
    since_ms: int = 0,
) -> list[QueuedPoint]:
    if export is not None:
        points = await asyncio.to_thread(read_export, export, poll)
        return [p for p in points if p.ts_s >= since_ms // 1000]
    target = settings.influx_target()
    if target is None:
        raise ConfigError(
            "audit rebuilds the chain from InfluxDB: set VOTEBOX_INFLUX_URL (and its friends), "
            "or give --from-export FILE"
        )
    writer = make_writer(target, timeout_s=60.0)
    try:
        return await chain_points(redis, writer, poll, shards, since_ms=since_ms)
    finally:
        writer.close()


def register(commands: Commands) -> None:
    """Add ``votebox audit``."""
    p = add_command(
        commands,
        "audit",
        _run,
        env_epilog=True,
        help="rebuild a poll's chain of votes from InfluxDB (or an export) and check it against "
        "Redis and the heads published (exit 1 at the first disagreement)",
        description="docs/analytics.md, Auditing a poll. Exit 0 with a one-line verdict, 1 "
        "naming the first entry where the log and a witness disagree and why.",
    )
    p.add_argument("poll")
    p.add_argument(
        "--from-export",
        metavar="FILE",
        dest="export",
        help="rebuild from this `votebox export --by vote --format csv` file (- for standard "
        "input), not from InfluxDB",
    )
    p.add_argument(
        "--head",
        action="append",
        default=[],
        metavar="[SHARD:]LENGTH:HEAD",
        help="a head seen published (a result's chain), to check the log against; repeatable",
    )
    p.add_argument(
        "--result",
        action="append",
        default=[],
        metavar="FILE",
        help="a published polls/POLL/results document (- for standard input): its heads and "
        "counts are checked; repeatable",
    )
    p.add_argument(
        "--receipt",
        metavar="DEVICE:EPOCH:SEQ",
        help="also say whether this vote is in the log, and under which head",
    )
    p.add_argument(
        "--no-redis",
        dest="use_redis",
        action="store_false",
        help="do not ask Redis: check only against the heads and results given",
    )
    p.add_argument(
        "--shards", type=int, default=None, help="the poll's shards, with --no-redis (default: "
        "as many as the heads given name)"
    )  # fmt: skip
    p.add_argument("--redis-url", dest="redis_url", metavar="VOTEBOX_REDIS_URL")
    p.add_argument("--influx-url", dest="influx_url", metavar="VOTEBOX_INFLUX_URL")


def _run(args: argparse.Namespace, settings: Settings) -> int:
    try:
        heads = [parse_head(text) for text in args.head]
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    results = [result_witness(_read_json(path), f"the result in {path}") for path in args.result]
    receipt = None
    if args.receipt is not None:
        parts = args.receipt.split(":")
        if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
            raise ConfigError("--receipt is DEVICE:EPOCH:SEQ, as the vote was sent")
        receipt = (parts[0], int(parts[1]), int(parts[2]))
    if not args.use_redis and not heads and not results and args.export is None:
        raise ConfigError("with --no-redis, give --from-export and the heads or results to check")
    found = asyncio.run(
        audit(
            settings,
            args.poll,
            export=args.export,
            heads=heads,
            results=results,
            use_redis=args.use_redis,
            shards=args.shards,
        )
    )
    for note in found.notes:
        print(f"note: {note}")
    code = 0 if found.finding is None else 1
    if receipt is not None:
        present, said = found.receipt(*receipt)
        print(said)
        code = code or (0 if present else 1)
    print(found.verdict())
    return code


def _read_json(path: str) -> dict[str, Any]:
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
        # The last document, as `mosquitto_sub -v` prints it too ("topic payload").
        last = text.strip().splitlines()[-1] if text.strip() else ""
        document = json.loads(last[last.index("{") :] if "{" in last else last)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read a result from {path}: {exc}") from None
    if not isinstance(document, dict):
        raise ConfigError(f"{path} is not a results document")
    return document
