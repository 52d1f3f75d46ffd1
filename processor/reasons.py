"""The stable outcome and rejection codes of the wire contract (docs/protocol.md, Acks).

Rule: a code's number and name never change once released; new codes get new numbers.
"""

from __future__ import annotations

import enum

__all__ = ["Fate", "Reason"]


class Fate(enum.IntEnum):
    """What became of one vote. The number is what an ack carries on the wire."""

    ACCEPTED = 0
    DUPLICATE = 1
    REJECTED = 2
    # One vote per voter: this voter has a later vote (by device time, then seq); this one is
    # recorded and never counted.
    SUPERSEDED = 3
    # Inside the poll's cooldown after the device's last counted press: recorded, not counted.
    SUPPRESSED = 4


class Reason(enum.IntEnum):
    """Why a vote was rejected. The number is what an ack carries; the name is for humans.

    Numbers start at 16 so that an ack code below 16 is always a `Fate` other than rejected.
    """

    TOO_LARGE = 16
    MALFORMED = 17
    FORBIDDEN_ITEM = 18
    DUPLICATE_KEY = 19
    BAD_SCHEMA = 20
    OUT_OF_RANGE = 21
    BATCH_TOO_LARGE = 22
    BAD_TOPIC = 23
    UNKNOWN_POLL = 24
    UNKNOWN_OPTION = 25
    SEQ_TOO_OLD = 26
    STALE_EPOCH = 27
    TOO_MANY_CHOICES = 28
    STORE_ERROR = 29
    POLL_NOT_OPEN = 30
    POLL_CLOSED = 31
    MISSING_VOTER = 32
    RATE_LIMITED = 33

    @property
    def code(self) -> str:
        """The lower-case name used in logs, stats and docs, e.g. ``unknown_option``."""
        return self.name.lower()
