"""Polls: their definitions, lifecycle and result snapshots in Redis.

Rule: definitions are written here and by nothing else; the tally script only reads them. Every
change bumps the poll's version and is announced on `POLLS_CHANGED`, so processors republish
its config and results at once.

A poll's state is computed from its times, never stored: ``scheduled`` before ``opens_ms``,
``closed`` from ``closes_ms``, ``open`` between. Opening and closing by hand set those times.
"""

from __future__ import annotations

import enum
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from typing import Any, Final

from redis.asyncio import Redis

from processor.errors import ConfigError
from processor.keys import POLLS_CHANGED, POLLS_DELETED, POLLS_INDEX, UNATTRIBUTED_FATES, PollKeys
from processor.topics import is_valid_id

__all__ = [
    "MAX_OPTIONS",
    "Poll",
    "PollType",
    "Results",
    "close_poll",
    "create_poll",
    "delete_poll",
    "deleted_id_message",
    "list_deleted",
    "list_polls",
    "load_poll",
    "load_polls",
    "open_poll",
    "read_fates",
    "read_results",
    "read_snapshots",
    "redis_text",
    "Snapshot",
    "note_states",
    "parse_time_ms",
    "plan_update",
    "update_poll",
]

# docs/protocol.md, Polls: an option index must fit a kiosk's screen and a compact vote.
MAX_OPTIONS: Final = 64
MAX_LABEL_CHARS: Final = 200
MAX_TITLE_CHARS: Final = 500
DEFAULT_GRACE_S: Final = 300


class PollType(enum.StrEnum):
    """What a vote's choice means (docs/protocol.md, Polls)."""

    SINGLE = "single"  # one option index
    MULTIPLE = "multiple"  # 1 to max_choices distinct option indexes
    RATING = "rating"  # one value of a scale, min..max
    NPS = "nps"  # a rating 0..10, with the Net Promoter Score in the results


@dataclass(frozen=True, slots=True)
class Poll:
    """A poll definition. Options are numbered from 0 in the order given; a rating poll's options
    are its scale's values, and its vote carries the value itself.

    Times are Unix milliseconds; 0 means "no such time" (open from creation, open until closed).
    """

    id: str
    labels: tuple[str, ...] = ()
    title: str = ""
    type: PollType = PollType.SINGLE
    max_choices: int = 1
    scale: tuple[int, int] | None = None
    opens_ms: int = 0
    closes_ms: int = 0
    # A vote cast while the poll was open (by the device's clock) and arriving at most this long
    # after it closed still counts: an offline kiosk's votes are not lost at the close.
    grace_s: int = DEFAULT_GRACE_S
    one_per_voter: bool = False
    cooldown_s: int = 0
    hide_results_until_close: bool = False

    def __post_init__(self) -> None:
        if not is_valid_id(self.id):
            raise ConfigError(f"poll id {self.id!r} must be 1-64 chars of A-Z a-z 0-9 _ -")
        kind = PollType(self.type)  # raises ValueError for a stray string; caught below
        object.__setattr__(self, "type", kind)
        if kind is PollType.NPS:
            if self.scale not in (None, (0, 10)):
                raise ConfigError("an nps poll's scale is 0 to 10; leave scale out")
            object.__setattr__(self, "scale", (0, 10))
        if kind in (PollType.RATING, PollType.NPS):
            if self.scale is None:
                raise ConfigError("a rating poll needs a scale, such as 1-5 (--scale 1-5)")
            low, high = self.scale
            if not 0 <= low < high or high - low + 1 > MAX_OPTIONS:
                raise ConfigError(
                    f"a rating scale runs from min to max, 0 <= min < max, at most "
                    f"{MAX_OPTIONS} values (got {low}-{high})"
                )
            values = tuple(str(v) for v in range(low, high + 1))
            if self.labels and self.labels != values:
                raise ConfigError("a rating poll's options are its scale's values; give no labels")
            object.__setattr__(self, "labels", values)
        elif self.scale is not None:
            raise ConfigError(f"only rating and nps polls have a scale (this one is {kind})")
        if not 2 <= len(self.labels) <= MAX_OPTIONS:
            raise ConfigError(f"a poll needs 2 to {MAX_OPTIONS} options (got {len(self.labels)})")
        for label in self.labels:
            if not label.strip() or len(label) > MAX_LABEL_CHARS:
                raise ConfigError(f"option labels are 1 to {MAX_LABEL_CHARS} characters")
        if len(set(self.labels)) != len(self.labels):
            raise ConfigError("option labels must differ from each other")
        if len(self.title) > MAX_TITLE_CHARS:
            raise ConfigError(f"a title is at most {MAX_TITLE_CHARS} characters")
        if kind is PollType.MULTIPLE:
            if not 1 <= self.max_choices <= len(self.labels):
                raise ConfigError(
                    f"a multiple-choice poll takes max_choices 1 to {len(self.labels)} "
                    f"(its number of options; got {self.max_choices})"
                )
        elif self.max_choices != 1:
            raise ConfigError(f"only multiple-choice polls take max_choices (this one is {kind})")
        if self.opens_ms < 0 or self.closes_ms < 0:
            raise ConfigError("opening and closing times are Unix times, not negative")
        if self.opens_ms and self.closes_ms and self.closes_ms <= self.opens_ms:
            raise ConfigError("a poll must close after it opens (closes_at > opens_at)")
        if self.grace_s < 0 or self.cooldown_s < 0:
            raise ConfigError("grace_s and cooldown_s are seconds, 0 or more")

    @property
    def scale_min(self) -> int:
        """What a vote's choice value is offset by: the scale's minimum for a rating, else 0."""
        return self.scale[0] if self.scale else 0

    def state_at(self, now_ms: int) -> str:
        """``scheduled``, ``open`` or ``closed`` at ``now_ms``."""
        if self.opens_ms and now_ms < self.opens_ms:
            return "scheduled"
        if self.closes_ms and now_ms >= self.closes_ms:
            return "closed"
        return "open"

    def next_change_ms(self, now_ms: int) -> int | None:
        """When the state changes next by itself, if ever."""
        later = [t for t in (self.opens_ms, self.closes_ms) if t and t > now_ms]
        return min(later) if later else None

    def config(self, now_ms: int) -> dict[str, Any]:
        """What ``polls/{poll}/config`` carries (docs/protocol.md, Poll config)."""
        body: dict[str, Any] = {
            "poll": self.id,
            "title": self.title,
            "type": str(self.type),
            "labels": list(self.labels),
            "state": self.state_at(now_ms),
            "opens_at": _iso(self.opens_ms),
            "closes_at": _iso(self.closes_ms),
            "one_per_voter": self.one_per_voter,
            "cooldown_s": self.cooldown_s,
        }
        if self.type is PollType.MULTIPLE:
            body["max_choices"] = self.max_choices
        if self.scale is not None:
            body["scale"] = list(self.scale)
        return body

    def to_hash(self) -> dict[Any, Any]:  # redis-py wants its own EncodableT mapping
        """The definition as stored (tally.lua reads n_options and the rule fields)."""
        return {
            "n_options": len(self.labels),
            "labels": json.dumps(self.labels),
            "title": self.title,
            "type": str(self.type),
            "max_choices": self.max_choices,
            "scale_min": self.scale_min,
            "scale": json.dumps(self.scale) if self.scale else "",
            "opens_ms": self.opens_ms,
            "closes_ms": self.closes_ms,
            "grace_s": self.grace_s,
            "one_per_voter": int(self.one_per_voter),
            "cooldown_s": self.cooldown_s,
            "hide_results": int(self.hide_results_until_close),
        }

    @classmethod
    def from_hash(cls, poll_id: str, stored: Mapping[Any, Any]) -> Poll | None:
        """The definition from its stored hash, or None if there is none."""
        h = {redis_text(k): redis_text(v) for k, v in stored.items()}
        if "labels" not in h:
            return None
        scale = json.loads(h["scale"]) if h.get("scale") else None
        return cls(
            id=poll_id,
            labels=tuple(json.loads(h["labels"])),
            title=h.get("title", ""),
            type=PollType(h.get("type", "single")),
            max_choices=int(h.get("max_choices", 1)),
            scale=(int(scale[0]), int(scale[1])) if scale else None,
            opens_ms=int(h.get("opens_ms", 0)),
            closes_ms=int(h.get("closes_ms", 0)),
            grace_s=int(h.get("grace_s", DEFAULT_GRACE_S)),
            one_per_voter=h.get("one_per_voter") == "1",
            cooldown_s=int(h.get("cooldown_s", 0)),
            hide_results_until_close=h.get("hide_results") == "1",
        )

    @classmethod
    def from_mapping(cls, poll_id: str, spec: Mapping[str, Any]) -> Poll:
        """A definition from a TOML table or CLI flags (``votebox poll apply``).

        Keys: title, type, options, max_choices, scale ("1-5" or [1, 5]), opens_at,
        closes_at (ISO 8601 or Unix seconds), grace_s, one_per_voter, cooldown_s,
        hide_results_until_close.

        Raises:
            ConfigError: an unknown key or a bad value, naming the poll and the key.
        """
        known = {
            "title",
            "type",
            "options",
            "max_choices",
            "scale",
            "opens_at",
            "closes_at",
            "grace_s",
            "one_per_voter",
            "cooldown_s",
            "hide_results_until_close",
        }
        unknown = set(spec) - known
        if unknown:
            raise ConfigError(
                f"poll {poll_id}: unknown key(s) {sorted(unknown)}; known: {sorted(known)}"
            )
        try:
            kind = PollType(spec.get("type", "single"))
        except ValueError:
            raise ConfigError(
                f"poll {poll_id}: type must be one of {[str(t) for t in PollType]} "
                f"(got {spec.get('type')!r})"
            ) from None
        try:
            return cls(
                id=poll_id,
                labels=tuple(str(o) for o in spec.get("options", ())),
                title=str(spec.get("title", "")),
                type=kind,
                max_choices=int(spec.get("max_choices", 1)),
                scale=_scale(spec.get("scale")),
                opens_ms=parse_time_ms(spec.get("opens_at")),
                closes_ms=parse_time_ms(spec.get("closes_at")),
                grace_s=int(spec.get("grace_s", DEFAULT_GRACE_S)),
                one_per_voter=_flag(spec.get("one_per_voter", False)),
                cooldown_s=int(spec.get("cooldown_s", 0)),
                hide_results_until_close=_flag(spec.get("hide_results_until_close", False)),
            )
        except ConfigError as exc:
            raise ConfigError(f"poll {poll_id}: {exc}") from None
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"poll {poll_id}: {exc}") from None


def _flag(value: object) -> bool:
    if isinstance(value, bool):
        return value
    raise ConfigError(f"expected true or false (got {value!r})")


def _scale(value: object) -> tuple[int, int] | None:
    if value is None or value == "":
        return None
    if isinstance(value, str) and "-" in value:
        low, _, high = value.partition("-")
        return int(low), int(high)
    if isinstance(value, list | tuple) and len(value) == 2:
        return int(value[0]), int(value[1])
    raise ConfigError(f"scale is min-max, such as 1-5 or [1, 5] (got {value!r})")


def parse_time_ms(value: object) -> int:
    """Unix milliseconds from ISO 8601 text (with a UTC offset), a TOML datetime or Unix
    seconds; None and "" are 0 (no such time).

    Raises:
        ConfigError: anything else, or a time without its UTC offset.
    """
    if value is None or value == "" or value == 0:
        return 0
    if isinstance(value, bool):
        raise ConfigError(f"a time is ISO 8601 or Unix seconds (got {value!r})")
    if isinstance(value, int | float):
        return int(value * 1000)
    when: datetime
    if isinstance(value, datetime):
        when = value
    elif isinstance(value, str):
        try:
            when = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise ConfigError(
                f"a time is ISO 8601, such as 2026-12-01T18:00:00Z (got {value!r})"
            ) from None
    else:
        raise ConfigError(f"a time is ISO 8601 or Unix seconds (got {value!r})")
    if when.tzinfo is None:
        raise ConfigError(f"give the time's UTC offset, as in 2026-12-01T18:00:00Z (got {value})")
    return int(when.timestamp() * 1000)


def _iso(ms: int) -> str | None:
    if not ms:
        return None
    moment = datetime.fromtimestamp(ms / 1000, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def redis_text(value: object) -> str:
    """A Redis reply value as text (the clients here do not decode replies)."""
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True, slots=True)
class Results:
    """What ``polls/{poll}/results`` carries (docs/protocol.md, Results)."""

    poll: str
    title: str
    state: str
    version: int
    total: int
    counts: tuple[int, ...]
    labels: tuple[str, ...]
    updated_ms: int
    type: PollType = PollType.SINGLE
    scale: tuple[int, int] | None = None
    hidden: bool = False
    opens_ms: int = 0
    closes_ms: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def figures(self) -> dict[str, Any]:
        """Percentages and the type's own figures (mean of a rating, NPS score)."""
        total = self.total
        out: dict[str, Any] = {
            "percentages": [round(100 * c / total, 2) if total else 0.0 for c in self.counts]
        }
        if self.scale is not None:
            low = self.scale[0]
            answered = sum(self.counts)
            mean = (
                sum((low + i) * c for i, c in enumerate(self.counts)) / answered
                if answered
                else None
            )
            out["mean"] = round(mean, 3) if mean is not None else None
        if self.type is PollType.NPS:
            promoters = sum(self.counts[9:11])
            detractors = sum(self.counts[0:7])
            out["nps"] = round(100 * (promoters - detractors) / total, 1) if total else None
            out["promoters"], out["passives"], out["detractors"] = (
                promoters,
                sum(self.counts[7:9]),
                detractors,
            )
        return out

    def to_json(self) -> bytes:
        """The retained JSON payload."""
        body: dict[str, Any] = {
            "poll": self.poll,
            "title": self.title,
            "type": str(self.type),
            "state": self.state,
            "version": self.version,
            "total": self.total,
            "labels": list(self.labels),
            "updated_at": _iso(self.updated_ms) or _iso(1),
            "opens_at": _iso(self.opens_ms),
            "closes_at": _iso(self.closes_ms),
        }
        if self.hidden:
            # hide_results_until_close: totals only while the poll is open.
            body.update(hidden=True, counts=None, percentages=None)
        else:
            body["counts"] = list(self.counts)
            body.update(self.figures())
        return json.dumps(body, separators=(",", ":")).encode()


def _now_ms() -> int:
    return int(time.time() * 1000)


async def create_poll(
    redis: Redis, poll: Poll, *, now_ms: int | None = None, reuse_deleted: bool = False
) -> None:
    """Store a new poll.

    Args:
        redis: where polls live.
        poll: the new poll.
        now_ms: its creation time (default now).
        reuse_deleted: take an id of a deleted poll, accepting that votes cast for the deleted
            one, still in the broker's queue or in device outboxes, count into this one.

    Raises:
        ConfigError: a poll with that id exists (its votes would no longer match its options),
            or existed and was deleted (unless ``reuse_deleted``).
    """
    if not reuse_deleted and await redis.sismember(POLLS_DELETED, poll.id):
        raise ConfigError(deleted_id_message(poll.id))
    keys = PollKeys(poll.id)
    created = await redis.hsetnx(keys.definition, "n_options", len(poll.labels))
    if not created:
        raise ConfigError(f"poll {poll.id!r} exists already; pick another id")
    now_ms = now_ms if now_ms is not None else _now_ms()
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hset(keys.definition, mapping={**poll.to_hash(), "created_ms": now_ms})
        pipe.hsetnx(keys.tally, "version", 0)
        pipe.hsetnx(keys.tally, "updated_ms", now_ms)
        pipe.hset(keys.tally, "state_seen", poll.state_at(now_ms))
        pipe.sadd(POLLS_INDEX, poll.id)
        pipe.srem(POLLS_DELETED, poll.id)
        pipe.publish(POLLS_CHANGED, poll.id)
        await pipe.execute()


def deleted_id_message(poll_id: str) -> str:
    """Why a deleted poll's id is not taken again, and what to do."""
    return (
        f"poll {poll_id!r} was deleted; votes cast for it may still wait in the broker's queue "
        "or in device outboxes, and would count into a new poll of that id. Pick another id, "
        "or accept that with `votebox poll create --reuse-deleted-id`"
    )


# Fields a poll with votes may not change: its votes would no longer mean what they meant.
_FIXED_ONCE_VOTED: Final = ("labels", "type", "scale", "one_per_voter")


async def plan_update(redis: Redis, poll: Poll) -> list[str]:
    """The names of the fields an update to ``poll`` would change; writes nothing.

    Raises:
        ConfigError: there is no such poll, or it has votes and the change would alter what
            they mean (options, type, scale, one vote per voter).
    """
    old = await load_poll(redis, poll.id)
    if old is None:
        raise ConfigError(f"no poll {poll.id!r}; create it first")
    changed = [f.name for f in fields(Poll) if getattr(old, f.name) != getattr(poll, f.name)]
    if not changed:
        return []
    total = int(await redis.hget(PollKeys(poll.id).tally, "total") or 0)
    frozen = [name for name in changed if name in _FIXED_ONCE_VOTED]
    if total and frozen:
        raise ConfigError(
            f"poll {poll.id} has {total} votes: its {', '.join(frozen)} cannot change "
            "(make a new poll instead)"
        )
    return changed


async def update_poll(redis: Redis, poll: Poll, *, now_ms: int | None = None) -> list[str]:
    """Change an existing poll's definition; returns the names of the fields that changed.

    Raises:
        ConfigError: as `plan_update`; then nothing is written.
    """
    changed = await plan_update(redis, poll)
    if changed:
        await _store(redis, poll, now_ms if now_ms is not None else _now_ms())
    return changed


async def _store(redis: Redis, poll: Poll, now_ms: int) -> None:
    keys = PollKeys(poll.id)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hset(keys.definition, mapping=poll.to_hash())
        # A new state or definition is a new result: dashboards see a higher version.
        pipe.hincrby(keys.tally, "version", 1)
        pipe.hset(keys.tally, mapping={"state_seen": poll.state_at(now_ms), "updated_ms": now_ms})
        pipe.publish(POLLS_CHANGED, poll.id)
        await pipe.execute()


async def open_poll(redis: Redis, poll_id: str, *, now_ms: int | None = None) -> Poll:
    """Open a poll now (also reopens a closed one); returns the new definition.

    Raises:
        ConfigError: there is no such poll.
    """
    now_ms = now_ms if now_ms is not None else _now_ms()
    poll = await _must_load(redis, poll_id)
    opens = poll.opens_ms if poll.opens_ms and poll.opens_ms <= now_ms else now_ms
    closes = poll.closes_ms if poll.closes_ms > now_ms else 0
    opened = replace(poll, opens_ms=opens, closes_ms=closes)
    await _store(redis, opened, now_ms)
    return opened


async def close_poll(redis: Redis, poll_id: str, *, now_ms: int | None = None) -> Poll:
    """Close a poll now; votes cast before now may still arrive within its grace period.

    Raises:
        ConfigError: there is no such poll, or it never opened.
    """
    now_ms = now_ms if now_ms is not None else _now_ms()
    poll = await _must_load(redis, poll_id)
    if poll.state_at(now_ms) == "scheduled":
        raise ConfigError(f"poll {poll_id} has not opened yet; nothing to close")
    if poll.state_at(now_ms) == "closed":
        return poll
    closed = replace(poll, closes_ms=now_ms)
    await _store(redis, closed, now_ms)
    return closed


async def delete_poll(redis: Redis, poll_id: str) -> int:
    """Delete a poll and everything stored about it; processors clear its retained topics.

    Returns:
        How many points were still queued for InfluxDB and are dropped with it.

    Raises:
        ConfigError: there is no such poll.
    """
    await _must_load(redis, poll_id)
    keys = PollKeys(poll_id)
    queued = int(await redis.xlen(keys.points))
    windows = [key async for key in redis.scan_iter(match=keys.window_prefix + "*", count=1000)]
    async with redis.pipeline(transaction=True) as pipe:
        pipe.delete(*keys.every_key(), *windows)
        pipe.srem(POLLS_INDEX, poll_id)
        pipe.sadd(POLLS_DELETED, poll_id)
        pipe.publish(POLLS_CHANGED, poll_id)
        await pipe.execute()
    return queued


async def _must_load(redis: Redis, poll_id: str) -> Poll:
    poll = await load_poll(redis, poll_id)
    if poll is None:
        raise ConfigError(f"no poll {poll_id!r}; votebox poll list shows the polls there are")
    return poll


async def load_poll(redis: Redis, poll_id: str) -> Poll | None:
    """The poll's definition, or None when there is no such poll."""
    return Poll.from_hash(poll_id, await redis.hgetall(PollKeys(poll_id).definition))


async def load_polls(redis: Redis, poll_ids: Iterable[str]) -> dict[str, Poll]:
    """Several definitions in one round trip; polls that do not exist are left out."""
    ids = list(poll_ids)
    async with redis.pipeline(transaction=False) as pipe:
        for poll_id in ids:
            pipe.hgetall(PollKeys(poll_id).definition)
        replies = await pipe.execute()
    out = {}
    for poll_id, stored in zip(ids, replies, strict=True):
        poll = Poll.from_hash(poll_id, stored)
        if poll is not None:
            out[poll_id] = poll
    return out


async def list_polls(redis: Redis) -> list[str]:
    """Every poll id, sorted."""
    members = await redis.smembers(POLLS_INDEX)
    return sorted(redis_text(m) for m in members)


async def list_deleted(redis: Redis) -> list[str]:
    """Ids of deleted polls (whose retained topics processors clear), sorted."""
    members = await redis.smembers(POLLS_DELETED)
    return sorted(redis_text(m) for m in members)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A poll's definition and results read together, and the state its version last counted."""

    poll: Poll
    results: Results
    state_seen: str | None


async def read_snapshots(
    redis: Redis, poll_ids: Iterable[str], *, now_ms: int | None = None
) -> dict[str, Snapshot]:
    """Definitions and results of several polls in one round trip; missing polls left out."""
    now_ms = now_ms if now_ms is not None else _now_ms()
    ids: Sequence[str] = list(poll_ids)
    async with redis.pipeline(transaction=False) as pipe:
        for poll_id in ids:
            keys = PollKeys(poll_id)
            pipe.hgetall(keys.definition)
            pipe.hgetall(keys.tally)
        replies = await pipe.execute()
    out: dict[str, Snapshot] = {}
    for i, poll_id in enumerate(ids):
        poll = Poll.from_hash(poll_id, replies[2 * i])
        if poll is None:
            continue
        tally = replies[2 * i + 1]
        state = poll.state_at(now_ms)
        results = Results(
            poll=poll_id,
            title=poll.title,
            state=state,
            version=int(tally.get(b"version", 0)),
            total=int(tally.get(b"total", 0)),
            counts=tuple(int(tally.get(f"c:{i}".encode(), 0)) for i in range(len(poll.labels))),
            labels=poll.labels,
            updated_ms=int(tally.get(b"updated_ms", 0)),
            type=poll.type,
            scale=poll.scale,
            hidden=poll.hide_results_until_close and state != "closed",
            opens_ms=poll.opens_ms,
            closes_ms=poll.closes_ms,
        )
        seen = tally.get(b"state_seen")
        out[poll_id] = Snapshot(poll, results, redis_text(seen) if seen is not None else None)
    return out


async def read_results(
    redis: Redis, poll_ids: Iterable[str], *, now_ms: int | None = None
) -> dict[str, Results]:
    """Results of several polls in one round trip; polls that do not exist are left out."""
    snapshots = await read_snapshots(redis, poll_ids, now_ms=now_ms)
    return {poll_id: snap.results for poll_id, snap in snapshots.items()}


_STATE_BUMP: Final = """
if redis.call('HGET', KEYS[1], 'state_seen') == ARGV[1] then return false end
redis.call('HSET', KEYS[1], 'state_seen', ARGV[1], 'updated_ms', ARGV[2])
return redis.call('HINCRBY', KEYS[1], 'version', 1)
"""


async def note_states(redis: Redis, states: Mapping[str, str], *, now_ms: int) -> None:
    """Bump the version of each poll whose state (by its times) is not the one its version
    last counted: a scheduled open or close is a new result, and dashboards go by version.
    Several processors may race here; the script makes only the first bump count."""
    async with redis.pipeline(transaction=False) as pipe:
        for poll_id, state in states.items():
            pipe.eval(_STATE_BUMP, 1, PollKeys(poll_id).tally, state, now_ms)
        await pipe.execute()


def _counts(stored: dict[Any, Any]) -> dict[str, int]:
    return {redis_text(k): int(v) for k, v in stored.items()}


async def read_fates(redis: Redis, poll_id: str) -> tuple[dict[str, int], dict[str, int]]:
    """How many votes of the poll met each fate, and how many messages naming no valid poll
    were rejected, by reason code (docs/protocol.md, Acks)."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(PollKeys(poll_id).fates)
        pipe.hgetall(UNATTRIBUTED_FATES)
        per_poll, unattributed = await pipe.execute()
    return _counts(per_poll), _counts(unattributed)
