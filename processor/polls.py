"""Poll definitions and result snapshots in Redis.

Rule: definitions are written here and by nothing else; the tally script only reads them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from redis.asyncio import Redis

from processor.errors import ConfigError
from processor.keys import POLLS_INDEX, UNATTRIBUTED_FATES, PollKeys
from processor.topics import is_valid_id

__all__ = [
    "MAX_OPTIONS",
    "Poll",
    "Results",
    "create_poll",
    "list_polls",
    "load_poll",
    "read_fates",
    "read_results",
]

# docs/protocol.md, Polls: an option index must fit a kiosk's screen and a compact vote.
MAX_OPTIONS: Final = 64
MAX_LABEL_CHARS: Final = 200


@dataclass(frozen=True, slots=True)
class Poll:
    """A single-choice poll: options are numbered from 0 in the order given."""

    id: str
    labels: tuple[str, ...]
    title: str = ""
    state: str = "open"

    def __post_init__(self) -> None:
        if not is_valid_id(self.id):
            raise ConfigError(f"poll id {self.id!r} must be 1-64 chars of A-Z a-z 0-9 _ -")
        if not 2 <= len(self.labels) <= MAX_OPTIONS:
            raise ConfigError(f"a poll needs 2 to {MAX_OPTIONS} options (got {len(self.labels)})")
        for label in self.labels:
            if not label.strip() or len(label) > MAX_LABEL_CHARS:
                raise ConfigError(f"option labels are 1 to {MAX_LABEL_CHARS} characters")
        if len(set(self.labels)) != len(self.labels):
            raise ConfigError("option labels must differ from each other")


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

    def to_json(self) -> bytes:
        """The retained JSON payload."""
        updated_at = datetime.fromtimestamp(self.updated_ms / 1000, UTC)
        return json.dumps(
            {
                "poll": self.poll,
                "title": self.title,
                "state": self.state,
                "version": self.version,
                "total": self.total,
                "counts": list(self.counts),
                "labels": list(self.labels),
                "updated_at": updated_at.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            },
            separators=(",", ":"),
        ).encode()


async def create_poll(redis: Redis, poll: Poll) -> None:
    """Store a new poll, open for votes.

    Raises:
        ConfigError: a poll with that id exists (its votes would no longer match its options).
    """
    keys = PollKeys(poll.id)
    created = await redis.hsetnx(keys.definition, "n_options", len(poll.labels))
    if not created:
        raise ConfigError(f"poll {poll.id!r} exists already; pick another id")
    now_ms = int(time.time() * 1000)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hset(
            keys.definition,
            mapping={
                "title": poll.title,
                "labels": json.dumps(poll.labels),
                "state": poll.state,
                "created_ms": now_ms,
            },
        )
        pipe.hsetnx(keys.tally, "version", 0)
        pipe.hsetnx(keys.tally, "updated_ms", now_ms)
        pipe.sadd(POLLS_INDEX, poll.id)
        await pipe.execute()


def _poll_from_hash(poll_id: str, fields: dict[Any, Any]) -> Poll | None:
    if not fields or b"labels" not in fields:
        return None
    return Poll(
        id=poll_id,
        labels=tuple(json.loads(fields[b"labels"])),
        title=fields.get(b"title", b"").decode(),
        state=fields.get(b"state", b"open").decode(),
    )


async def load_poll(redis: Redis, poll_id: str) -> Poll | None:
    """The poll's definition, or None when there is no such poll."""
    return _poll_from_hash(poll_id, await redis.hgetall(PollKeys(poll_id).definition))


async def list_polls(redis: Redis) -> list[str]:
    """Every poll id, sorted."""
    members = await redis.smembers(POLLS_INDEX)
    return sorted(m.decode() if isinstance(m, bytes) else str(m) for m in members)


async def read_results(redis: Redis, poll_ids: Iterable[str]) -> dict[str, Results]:
    """Snapshots of several polls in one round trip; polls that do not exist are left out."""
    ids: Sequence[str] = list(poll_ids)
    async with redis.pipeline(transaction=False) as pipe:
        for poll_id in ids:
            keys = PollKeys(poll_id)
            pipe.hgetall(keys.definition)
            pipe.hgetall(keys.tally)
        replies = await pipe.execute()
    out: dict[str, Results] = {}
    for i, poll_id in enumerate(ids):
        poll = _poll_from_hash(poll_id, replies[2 * i])
        if poll is None:
            continue
        tally = replies[2 * i + 1]
        out[poll_id] = Results(
            poll=poll_id,
            title=poll.title,
            state=poll.state,
            version=int(tally.get(b"version", 0)),
            total=int(tally.get(b"total", 0)),
            counts=tuple(int(tally.get(f"c:{i}".encode(), 0)) for i in range(len(poll.labels))),
            labels=poll.labels,
            updated_ms=int(tally.get(b"updated_ms", 0)),
        )
    return out


def _counts(fields: dict[Any, Any]) -> dict[str, int]:
    return {(k.decode() if isinstance(k, bytes) else str(k)): int(v) for k, v in fields.items()}


async def read_fates(redis: Redis, poll_id: str) -> tuple[dict[str, int], dict[str, int]]:
    """How many votes of the poll met each fate, and how many messages naming no valid poll
    were rejected, by reason code (docs/protocol.md, Acks)."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(PollKeys(poll_id).fates)
        pipe.hgetall(UNATTRIBUTED_FATES)
        per_poll, unattributed = await pipe.execute()
    return _counts(per_poll), _counts(unattributed)
