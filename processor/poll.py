"""A poll: its definition and rules, and its state at a given time. Pure: no I/O.

A poll's state is computed from its times, never stored: ``scheduled`` before ``opens_ms``,
``closed`` from ``closes_ms``, ``open`` between. Opening and closing by hand set those times.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from processor.errors import ConfigError
from processor.topics import is_valid_id

__all__ = [
    "DEFAULT_GRACE_S",
    "MAX_LABEL_CHARS",
    "MAX_OPTIONS",
    "MAX_SHARDS",
    "MAX_TITLE_CHARS",
    "Poll",
    "POLL_FIELDS",
    "PollField",
    "PollType",
    "iso_time",
    "parse_time_ms",
]

# docs/protocol.md, Polls: an option index must fit a kiosk's screen and a compact vote.
MAX_OPTIONS: Final = 64
MAX_LABEL_CHARS: Final = 200
MAX_TITLE_CHARS: Final = 500
DEFAULT_GRACE_S: Final = 300
# A hot poll's votes spread over this many Redis hash tags at most (docs/operations.md, Scale):
# more shards than a cluster has primaries buys nothing.
MAX_SHARDS: Final = 64


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
    # Redis hash tags the poll's votes are spread over, by device (keys.shard_of). Fixed at
    # creation: a device's de-duplication window lives on its shard.
    shards: int = 1

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
        if not 1 <= self.shards <= MAX_SHARDS:
            raise ConfigError(f"shards is 1 to {MAX_SHARDS} (got {self.shards})")
        if self.shards > 1 and self.one_per_voter:
            # A voter may vote from any device, so their latest vote must be found in one place.
            raise ConfigError(
                "a one-vote-per-voter poll keeps its voters on one shard: leave shards at 1"
            )

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
        body: dict[str, Any] = {"poll": self.id, "state": self.state_at(now_ms)}
        for f in POLL_FIELDS:
            if f.published is not None and f.shown(self):
                body[f.published] = f.publish(getattr(self, f.name))
        return body

    def to_hash(self) -> dict[Any, Any]:  # redis-py wants its own EncodableT mapping
        """The definition as stored; tally.lua reads n_options, scale_min and the rule fields."""
        stored = {f.stored: f.store(getattr(self, f.name)) for f in POLL_FIELDS}
        return {**stored, "n_options": len(self.labels), "scale_min": self.scale_min}

    @classmethod
    def from_hash(cls, poll_id: str, h: Mapping[str, str]) -> Poll | None:
        """The definition from its stored hash (decoded to text), or None if there is none."""
        if "labels" not in h:
            return None
        return cls(
            id=poll_id, **{f.name: f.load(h[f.stored]) for f in POLL_FIELDS if f.stored in h}
        )

    @classmethod
    def from_mapping(cls, poll_id: str, spec: Mapping[str, Any]) -> Poll:
        """A definition from a TOML table or CLI flags (``votebox poll apply``).

        Keys: those of `POLL_FIELDS` (docs/polls.md): title, type, options, max_choices, scale
        ("1-5" or [1, 5]), opens_at, closes_at (ISO 8601 or Unix seconds), grace_s,
        one_per_voter, cooldown_s, hide_results_until_close.

        Raises:
            ConfigError: an unknown key or a bad value, naming the poll and the key.
        """
        known = {f.key for f in POLL_FIELDS}
        unknown = set(spec) - known
        if unknown:
            raise ConfigError(
                f"poll {poll_id}: unknown key(s) {sorted(unknown)}; known: {sorted(known)}"
            )
        try:
            values = {f.name: f.parse(spec[f.key]) for f in POLL_FIELDS if f.key in spec}
            return cls(id=poll_id, **values)
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


def iso_time(ms: int) -> str | None:
    """Unix milliseconds as ISO 8601 UTC text, or None for 0 (no such time)."""
    if not ms:
        return None
    moment = datetime.fromtimestamp(ms / 1000, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _poll_type(value: object) -> PollType:
    try:
        return PollType(str(value))
    except ValueError:
        raise ConfigError(
            f"type must be one of {[str(t) for t in PollType]} (got {value!r})"
        ) from None


def _load_scale(text: str) -> tuple[int, int] | None:
    scale = json.loads(text) if text else None
    return (int(scale[0]), int(scale[1])) if scale else None


def _always(poll: Poll) -> bool:
    return True


@dataclass(frozen=True, slots=True)
class PollField:
    """One field of a poll in each of its forms. Rule: a new poll rule is a new row of
    `POLL_FIELDS` and a check in `Poll.__post_init__`; its TOML key, flag, Redis field and
    config key follow from the row.

    Args:
        name: the `Poll` attribute.
        key: its key in a TOML table (docs/polls.md) and in the flags' spec; default ``name``.
        stored: its field in the poll's Redis hash (tally.lua reads some by this name);
            default ``name``.
        store: the value as stored.
        load: the value from its stored text.
        parse: the value from TOML or a flag.
        flag: ``votebox poll create``'s flag and its argparse options, or None.
        published: its key in ``polls/{poll}/config``, or None when kiosks need not know it.
        publish: the value as published.
        shown: whether a poll's config has it at all.
        fixed_once_voted: a poll with votes may not change it: they would no longer mean what
            they meant.
        fixed: no update may change it, votes or not.
    """

    name: str
    store: Callable[[Any], Any]
    load: Callable[[str], Any]
    parse: Callable[[Any], Any]
    key: str = ""
    stored: str = ""
    flag: tuple[str, dict[str, Any]] | None = None
    published: str | None = None
    publish: Callable[[Any], Any] = lambda value: value
    shown: Callable[[Poll], bool] = _always
    fixed_once_voted: bool = False
    fixed: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", self.key or self.name)
        object.__setattr__(self, "stored", self.stored or self.name)


# The order is that of `votebox poll create --help`.
POLL_FIELDS: Final = (
    PollField(
        "labels",
        key="options",
        store=lambda labels: json.dumps(labels),
        load=lambda text: tuple(json.loads(text)),
        parse=lambda options: tuple(str(o) for o in options),
        flag=(
            "--option",
            dict(
                action="append",
                default=[],
                metavar="LABEL",
                help="an option label; repeat for each option, in order (index 0 first); not "
                "for rating and nps polls",
            ),
        ),
        published="labels",
        publish=list,
        fixed_once_voted=True,
    ),
    PollField(
        "title",
        store=str,
        load=str,
        parse=str,
        flag=("--title", dict(default="", help="the question shown on kiosks")),
        published="title",
    ),
    PollField(
        "type",
        store=str,
        load=PollType,
        parse=_poll_type,
        flag=("--type", dict(default="single", choices=[str(t) for t in PollType])),
        published="type",
        publish=str,
        fixed_once_voted=True,
    ),
    PollField(
        "max_choices",
        store=int,
        load=int,
        parse=int,
        flag=("--max-choices", dict(type=int, default=None, help="multiple: options per vote")),
        published="max_choices",
        shown=lambda poll: poll.type is PollType.MULTIPLE,
    ),
    PollField(
        "scale",
        store=lambda scale: json.dumps(scale) if scale else "",
        load=_load_scale,
        parse=_scale,
        flag=("--scale", dict(default=None, metavar="MIN-MAX", help="rating: e.g. 1-5")),
        published="scale",
        publish=list,
        shown=lambda poll: poll.scale is not None,
        fixed_once_voted=True,
    ),
    PollField(
        "opens_ms",
        key="opens_at",
        store=int,
        load=int,
        parse=parse_time_ms,
        flag=("--opens-at", dict(default=None, metavar="TIME", help="opens then, not now")),
        published="opens_at",
        publish=iso_time,
    ),
    PollField(
        "closes_ms",
        key="closes_at",
        store=int,
        load=int,
        parse=parse_time_ms,
        flag=("--closes-at", dict(default=None, metavar="TIME", help="closes by itself then")),
        published="closes_at",
        publish=iso_time,
    ),
    PollField(
        "grace_s",
        store=int,
        load=int,
        parse=int,
        flag=(
            "--grace-s",
            dict(
                type=int,
                default=None,
                help="after the close, votes cast while open still count if they arrive within "
                f"this (default {DEFAULT_GRACE_S})",
            ),
        ),
    ),
    PollField(
        "one_per_voter",
        store=int,
        load=lambda text: text == "1",
        parse=_flag,
        flag=(
            "--one-per-voter",
            dict(
                action="store_true",
                help="votes carry a voter token; each voter's latest vote counts",
            ),
        ),
        published="one_per_voter",
        fixed_once_voted=True,
    ),
    PollField(
        "cooldown_s",
        store=int,
        load=int,
        parse=int,
        flag=(
            "--cooldown-s",
            dict(
                type=int,
                default=None,
                help="presses of one device this close together count once (the rest: suppressed)",
            ),
        ),
        published="cooldown_s",
    ),
    PollField(
        "hide_results_until_close",
        stored="hide_results",
        store=int,
        load=lambda text: text == "1",
        parse=_flag,
        flag=(
            "--hide-results-until-close",
            dict(
                action="store_true",
                help="retained results carry totals only while the poll is open",
            ),
        ),
    ),
    PollField(
        "shards",
        store=int,
        load=int,
        parse=int,
        flag=(
            "--shards",
            dict(
                type=int,
                default=None,
                metavar="K",
                help="spread a hot poll's votes over K Redis hash tags (cluster shards), by "
                "device; fixed at creation (default 1)",
            ),
        ),
        fixed=True,
    ),
)
