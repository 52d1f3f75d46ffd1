"""Redis key names. Rule: the only module that formats a key.

Every key of a poll carries the hash tag ``{poll}``, so that all of them live in one Redis Cluster
slot and the tally script may touch them together. A poll spread over K shards (``votebox poll
create --shards K``) has K such sets: shard 0 is tagged ``{poll}`` (a one-shard poll's keys are
those of every poll before shards existed), shard i is tagged ``{poll:i}`` (":" is not allowed in
a poll id, so no poll's tag is another's shard). A device's votes always go to one shard,
`shard_of` it.
"""

from __future__ import annotations

import zlib
from typing import Final

__all__ = [
    "CHANGES",
    "DEVICES_HEALTH",
    "DEVICES_ONLINE",
    "DEVICES_SEEN",
    "DEVICES_SEEN_BEFORE",
    "DEVICES_SITE",
    "DEVICES_SITE_VERSION",
    "DEVICES_STATUS",
    "KEY_SUFFIXES",
    "POLLS_CHANGED",
    "POLLS_DELETED",
    "POLLS_INDEX",
    "QUEUED_POINTS",
    "SET_ASIDE",
    "UNATTRIBUTED_FATES",
    "PollKeys",
    "batch_commit",
    "RESULTS_CHANGED",
    "fates_counted",
    "results_lease",
    "shard_keys",
    "shard_of",
]

# The set of all poll ids. Global, outside any poll's slot: only the CLI and the results
# publisher read it, never the tally script.
POLLS_INDEX: Final = "votebox:polls"
# Deleted poll ids: processors clear their retained topics (a processor that was down when the
# poll was deleted must still learn of it). Removed when a poll of that id is created again.
POLLS_DELETED: Final = "votebox:polls:deleted"
# Pub/sub channel: a poll id is published on it whenever its definition or state changes.
POLLS_CHANGED: Final = "votebox:polls:changed"
# Pub/sub channel: poll ids whose results a processor changed while another held the results
# lease (results.py), comma-separated: the holder publishes them.
RESULTS_CHANGED: Final = "votebox:results:changed"
# The change feed (processor/changes.py): a stream whose entries name the poll shards a commit
# wrote to, and the polls an operator made, changed or deleted. Global, outside any poll's slot:
# written beside the tally scripts in the same round trip, never by them.
CHANGES: Final = "votebox:changes"
# Fates of messages that name no valid poll (bad topic, unreadable payload).
UNATTRIBUTED_FATES: Final = "votebox:fates"
# A stream of votes the tally script could not process, with the error, for an operator to
# inspect and replay (docs/protocol.md, store_error). Capped; see SET_ASIDE_MAXLEN in tally.py.
SET_ASIDE: Final = "votebox:set_aside"
# device -> when a message of it last reached a processor (ms), a sorted set scored by that
# time: who is silent is a range of it, read without visiting every device. Only devices whose
# topic parsed, so a flood of garbage topics cannot grow it.
DEVICES_SEEN: Final = "votebox:devices:seen"
# The same, as a hash, before 2026-12-05: moved into DEVICES_SEEN when a processor starts.
DEVICES_SEEN_BEFORE: Final = "votebox:devices:last_seen"
# device -> its last heartbeat as JSON (uptime_s, outbox, battery, at_ms); device -> its last
# status as JSON (state online/offline, at_ms). docs/protocol.md, Device health.
DEVICES_HEALTH: Final = "votebox:devices:health"
# device -> its site (`votebox device add --site`): a tag of its votes' InfluxDB points.
DEVICES_SITE: Final = "votebox:devices:site"
# Bumped with every change of DEVICES_SITE: processors read the sites again only when it moved.
DEVICES_SITE_VERSION: Final = "votebox:devices:site:version"
DEVICES_STATUS: Final = "votebox:devices:status"
# device -> when a message of it last came (ms), for the devices whose last status said
# online: who is silent ("says online, and nothing came") is a range of it. A status of
# offline (its own, or the broker's last will for it) takes the device out.
DEVICES_ONLINE: Final = "votebox:devices:online"


def results_lease(broker: str) -> str:
    """The results lease of the processors on ``broker`` (host:port): its value is the client
    id of the one that publishes retained results there (results.py)."""
    return f"votebox:results:publisher:{broker}"


def fates_counted(token: str) -> str:
    """Marks that the batch named ``token`` added its unattributed fates (tally.py): in the
    slot of `UNATTRIBUTED_FATES` (its hash tag is that key's name), so one script does both."""
    return f"{{{UNATTRIBUTED_FATES}}}:counted:{token}"


def shard_of(device: str, shards: int) -> int:
    """The shard of a poll spread over ``shards`` that holds ``device``'s votes. Stored data
    depends on it (a device's de-duplication window lives on its shard): never change it."""
    return zlib.crc32(device.encode()) % shards if shards > 1 else 0


# The field of a poll's (shard's) tally hash counting its points queued for InfluxDB: tally.lua
# adds them, the drainer takes them off as it deletes their stream entries.
QUEUED_POINTS: Final = "queued_points"


# What follows a poll's (shard's) key prefix, ``votebox:{tag}:``, in each of its keys, in the
# order tally.lua takes them (KEYS[1..9]), then the window prefix's: a batch's call on one
# Redis node names each poll by its prefix only (tally.lua, the loop at its end).
KEY_SUFFIXES: Final = (
    "poll",
    "tally",
    "fates",
    "devices",
    "points",
    "voters",
    "presses",
    "suppressed",
    "minutes",
    "win:",
)


def batch_commit(token: str) -> str:
    """The answer a single Redis node gave the batch named ``token`` (tally.lua, ARGV[7] of a
    batch's call); outside every poll's slot, so never used on a Redis Cluster."""
    return f"votebox:commit:{token}"


class PollKeys:
    """The keys of one poll, or of one shard of a poll spread over several."""

    __slots__ = (
        "definition",
        "devices",
        "fates",
        "minutes",
        "points",
        "poll",
        "points_rejected",
        "prefix",
        "presses",
        "shard",
        "suppressed",
        "tally",
        "tag",
        "voters",
        "window_prefix",
    )

    def __init__(self, poll: str, shard: int = 0) -> None:
        self.tag = f"{{{poll}:{shard}}}" if shard else f"{{{poll}}}"
        self.prefix = prefix = f"votebox:{self.tag}:"
        self.poll = poll
        self.shard = shard
        (
            self.definition,
            self.tally,
            self.fates,
            self.devices,
            # Accepted votes waiting for InfluxDB.
            self.points,
            # One vote per voter: voter (hex) -> the vote that counts. Cooldown: device -> the
            # time of its last counted press. Presses inside a cooldown, recorded (capped).
            self.voters,
            self.presses,
            self.suppressed,
            # minute (Unix time // 60) -> votes accepted in it: the retained per-minute series.
            self.minutes,
            self.window_prefix,
        ) = (prefix + suffix for suffix in KEY_SUFFIXES)
        # Points InfluxDB refused, with the reason.
        self.points_rejected = f"{prefix}points_rejected"

    @property
    def name(self) -> str:
        """The shard's name in the change feed: the poll id, or "poll:shard" past shard 0 (":"
        is not allowed in a poll id)."""
        return f"{self.poll}:{self.shard}" if self.shard else self.poll

    @classmethod
    def named(cls, name: str) -> PollKeys:
        """The keys of the shard called ``name`` (`name`)."""
        poll, _, shard = name.partition(":")
        return cls(poll, int(shard) if shard.isdigit() else 0)

    def commit(self, token: str) -> str:
        """The answer this poll gave the batch named ``token`` (tally.lua, KEYS[10])."""
        return f"votebox:{self.tag}:commit:{token}"

    def all_keys(self) -> tuple[str, ...]:
        """The fixed keys, in the order tally.lua expects them as KEYS (`KEY_SUFFIXES`, but
        the window prefix)."""
        return tuple(self.prefix + suffix for suffix in KEY_SUFFIXES[:-1])

    def every_key(self) -> tuple[str, ...]:
        """Every fixed key of the poll (the windows, one per device, share `window_prefix`)."""
        return (*self.all_keys(), self.points_rejected)


def shard_keys(poll: str, shards: int) -> tuple[PollKeys, ...]:
    """The keys of every shard of ``poll``, shard 0 first."""
    return tuple(PollKeys(poll, shard) for shard in range(max(shards, 1)))
