"""``votebox poll ...``: poll management for operators. Rule: every action validates all it is
given before it writes anything, and says what it did in one line per poll.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from processor.commands import Commands, add_command
from processor.config import Settings
from processor.errors import ConfigError
from processor.poll import POLL_FIELDS, Poll, PollField
from processor.poll_results import format_results
from processor.poll_store import (
    close_poll,
    create_poll,
    delete_poll,
    deleted_id_message,
    list_deleted,
    list_polls,
    load_poll,
    open_poll,
    plan_update,
    point_queues,
    read_fates,
    read_results,
    read_snapshots,
    update_poll,
)
from processor.store import redis_errors

__all__ = ["load_poll_file", "register", "run_poll_command"]


def load_poll_file(path: Path) -> list[Poll]:
    """The polls a TOML file declares, as ``[polls.<id>]`` tables (docs/polls.md).

    Raises:
        ConfigError: the file cannot be read or parsed, or a definition is invalid; the
            message names the file and the poll.
    """
    try:
        document = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    tables = document.get("polls")
    if not isinstance(tables, dict) or not tables or set(document) != {"polls"}:
        raise ConfigError(f"{path}: declare polls as [polls.<id>] tables, and nothing else")
    polls = []
    for poll_id, spec in tables.items():
        if not isinstance(spec, dict):
            raise ConfigError(f"{path}: polls.{poll_id} must be a table")
        try:
            polls.append(Poll.from_mapping(poll_id, spec))
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    return polls


def _poll_from_flags(args: Mapping[str, Any]) -> Poll:
    # A flag left out (None, an unset switch, no --option) is a key left out of the spec.
    # Compared by identity: a 0 given (--grace-s 0) equals False and must still be used.
    spec = {
        f.key: value
        for f in POLL_FIELDS
        if f.flag is not None
        and (value := args.get(_dest(f))) is not None
        and value is not False
        and value != []
    }
    return Poll.from_mapping(args["poll"], spec)


def _dest(f: PollField) -> str:
    assert f.flag is not None
    return f.flag[0].removeprefix("--").replace("-", "_")


def _describe(poll: Poll) -> str:
    rules = []
    if poll.type == "multiple":
        rules.append(f"up to {poll.max_choices} choices")
    if poll.one_per_voter:
        rules.append("one vote per voter")
    if poll.cooldown_s:
        rules.append(f"cooldown {poll.cooldown_s} s")
    if poll.hide_results_until_close:
        rules.append("results hidden until close")
    if poll.shards > 1:
        rules.append(f"spread over {poll.shards} shards")
    config = poll.config(0)
    times = ", ".join(
        f"{word} {config[key]}"
        for word, key in (("opens", "opens_at"), ("closes", "closes_at"))
        if config[key]
    )
    options = ", ".join(f"{i}={label}" for i, label in enumerate(poll.labels))
    extra = "; ".join(x for x in (times, ", ".join(rules)) if x)
    return f"{poll.type}: {options}" + (f" ({extra})" if extra else "")


async def run_poll_command(redis: Redis, action: str, args: Mapping[str, Any]) -> int:
    """Run one ``votebox poll`` action; returns the exit code.

    Raises:
        ConfigError: invalid input, or a poll that does not exist (the CLI prints it, exit 2).
        StoreUnavailable: Redis is unreachable.
    """
    with redis_errors():
        if action == "create":
            poll = _poll_from_flags(args)
            await create_poll(redis, poll, reuse_deleted=bool(args.get("reuse_deleted_id")))
            print(f"created poll {poll.id}, {_describe(poll)}")
            return 0
        if action == "apply":
            return await _apply(redis, Path(args["file"]))
        if action == "list":
            return await _list(redis)
        if action == "open":
            poll = await open_poll(redis, args["poll"])
            print(f"poll {poll.id} is open")
            return 0
        if action == "close":
            poll = await close_poll(redis, args["poll"])
            print(f"poll {poll.id} is closed (votes cast before now count for {poll.grace_s} s)")
            return 0
        if action == "delete":
            return await _delete(redis, args["poll"], yes=bool(args.get("yes")))
        if action == "show":
            return await _show(redis, args["poll"])
    raise AssertionError(action)  # pragma: no cover


async def _apply(redis: Redis, path: Path) -> int:
    polls = load_poll_file(path)  # every definition valid before anything is written
    existing = {poll.id: await load_poll(redis, poll.id) for poll in polls}
    retired = set(await list_deleted(redis))
    for poll in polls:  # checked before anything is written: all or nothing
        if existing[poll.id] is None and poll.id in retired:
            raise ConfigError(deleted_id_message(poll.id))
    plans = {  # and every update allowed: a refusal writes nothing at all
        poll.id: await plan_update(redis, poll) for poll in polls if existing[poll.id]
    }
    for poll in polls:
        if existing[poll.id] is None:
            await create_poll(redis, poll)
            print(f"created poll {poll.id}, {_describe(poll)}")
        else:
            changed = await update_poll(redis, poll) if plans[poll.id] else []
            print(
                f"updated poll {poll.id}: {', '.join(changed)}"
                if changed
                else f"poll {poll.id} unchanged"
            )
    return 0


async def _list(redis: Redis) -> int:
    ids = await list_polls(redis)
    snapshots = await read_snapshots(redis, ids)
    if not snapshots:
        print("no polls yet; create one with votebox poll create")
        return 0
    width = max(len(poll_id) for poll_id in snapshots)
    for poll_id, snap in snapshots.items():
        print(
            f"{poll_id:<{width}}  {snap.results.state:<9}  {snap.results.total:>8} votes  "
            f"{_describe(snap.poll)}"
        )
    return 0


async def _delete(redis: Redis, poll_id: str, *, yes: bool) -> int:
    results = (await read_results(redis, [poll_id])).get(poll_id)
    if results is None:
        raise ConfigError(f"no poll {poll_id!r}; votebox poll list shows the polls there are")
    if not yes:
        raise ConfigError(
            f"this deletes poll {poll_id} and its {results.total} counted votes; add --yes to do it"
        )
    dropped = await delete_poll(redis, poll_id)
    print(
        f"deleted poll {poll_id} ({results.total} votes); its retained topics are cleared"
        + (f"; {dropped} points still queued for InfluxDB were dropped" if dropped else "")
    )
    return 0


async def _show(redis: Redis, poll_id: str) -> int:
    snap = (await read_snapshots(redis, [poll_id])).get(poll_id)
    if snap is None:
        print(f"votebox: no poll {poll_id!r}; create it with votebox poll create", file=sys.stderr)
        return 1
    fates, unattributed = await read_fates(redis, poll_id)
    points = (await point_queues(redis, {poll_id: snap.poll.shards}))[poll_id]
    queued, refused = points.queued, points.refused
    document = json.loads(snap.results.to_json())
    if document.get("counts") is None:  # hidden until close: the operator still sees them
        document["counts"] = list(snap.results.counts)
    print(format_results(document))
    print(f"  {_describe(snap.poll)}")
    for key in ("mean", "nps"):
        if document.get(key) is not None:
            print(f"  {key}: {document[key]}")
    print("  fates:", ", ".join(f"{k}={n}" for k, n in sorted(fates.items())) or "none")
    print(f"  points for InfluxDB: {queued} queued, {refused} refused and set aside")
    if unattributed:
        print(
            "  rejected before reaching any poll:",
            ", ".join(f"{k}={n}" for k, n in sorted(unattributed.items())),
        )
    return 0


def register(commands: Commands) -> None:
    """Add ``votebox poll`` and its actions."""
    p = add_command(
        commands,
        "poll",
        _run,
        env_epilog=True,
        help="create, open, close, list, show, delete polls; apply a TOML file of polls",
    )
    actions = p.add_subparsers(dest="poll_command", required=True, metavar="ACTION")
    c = actions.add_parser(
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
    for field in POLL_FIELDS:
        if field.flag is not None:
            flag, options = field.flag
            c.add_argument(flag, **options)
    for name, text in (
        ("open", "open a poll now (reopens a closed one)"),
        ("close", "close a poll now; it publishes its final result at once"),
        ("show", "print a poll, its tally and the fates of its votes"),
    ):
        a = actions.add_parser(name, help=text)
        a.add_argument("poll")
    actions.add_parser("list", help="every poll, a line each")
    d = actions.add_parser(
        "delete", help="delete a poll and its tally; its retained topics are cleared"
    )
    d.add_argument("poll")
    d.add_argument("--yes", action="store_true", help="yes, delete its votes too")
    f = actions.add_parser(
        "apply",
        help="create or update the polls a TOML file declares (docs/polls.md); all or nothing",
    )
    f.add_argument("file")
    for action in actions.choices.values():
        action.add_argument("--redis-url", dest="redis_url", metavar="VOTEBOX_REDIS_URL")


def _run(args: argparse.Namespace, settings: Settings) -> int:
    return asyncio.run(_run_async(args, settings))


async def _run_async(args: argparse.Namespace, settings: Settings) -> int:
    from processor.store import open_redis

    async with open_redis(settings.redis_target(), timeout_s=settings.redis_timeout_s) as redis:
        return await run_poll_command(redis, args.poll_command, vars(args))
