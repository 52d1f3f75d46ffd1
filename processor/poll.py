"""A poll: its definition and rules, and its state at a given time. Pure: no I/O.

A poll's state is computed from its times, never stored: ``scheduled`` before ``opens_ms``,
``closed`` from ``closes_ms``, ``open`` between. Opening and closing by hand set those times.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from processor.errors import ConfigError
from processor.topics import is_valid_id

__all__ = [
    "DEFAULT_GRACE_S",
    "MAX_LABEL_CHARS",
    "MAX_OPTIONS",
    "MAX_TITLE_CHARS",
    "Poll",
    "PollType",
    "iso_time",
    "parse_time_ms",
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
            "opens_at": iso_time(self.opens_ms),
            "closes_at": iso_time(self.closes_ms),
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
    def from_hash(cls, poll_id: str, h: Mapping[str, str]) -> Poll | None:
        """The definition from its stored hash (decoded to text), or None if there is none."""
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


def iso_time(ms: int) -> str | None:
    """Unix milliseconds as ISO 8601 UTC text, or None for 0 (no such time)."""
    if not ms:
        return None
    moment = datetime.fromtimestamp(ms / 1000, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
