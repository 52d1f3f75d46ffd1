"""MQTT topic names. Rule: the only module that formats or parses a topic string."""

from __future__ import annotations

import functools
import hashlib
import re
from typing import Final

from processor.errors import VoteRejected
from processor.reasons import Reason

__all__ = [
    "DEVICES_FILTER",
    "STATS_TOPIC",
    "VOTES_FILTER",
    "acks_topic",
    "config_topic",
    "device_from_topic",
    "NON_DEVICE_ACCOUNTS",
    "RESERVED_PREFIX",
    "heartbeat_topic",
    "is_device_id",
    "is_valid_id",
    "parse_device_topic",
    "status_topic",
    "parse_vote_topic",
    "probe_topic",
    "results_topic",
    "series_topic",
    "shared",
    "vote_topic",
]

# docs/protocol.md, Topics: poll and device ids are 1-64 chars of [A-Za-z0-9_-].
_ID: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
# The broker accounts that are not devices, named for their roles (broker/acl.py). Mosquitto
# applies an ACL's `pattern` lines (votes/+/%u) to every user, so these names are never device
# ids: the processor refuses a vote or report under them even if a broker lets it through.
NON_DEVICE_ACCOUNTS: Final = frozenset({"processor", "dashboard"})
# Client ids votebox's own programs use; no device id may start with it (docs/protocol.md).
RESERVED_PREFIX: Final = "votebox-"

# The processor subscribes wider than the contract so that a vote on a wrong topic is rejected
# and counted instead of vanishing unseen.
VOTES_FILTER: Final = "votes/#"
# A device's own reports: devices/{device}/status (retained online/offline, also its last will)
# and devices/{device}/heartbeat (docs/protocol.md, Device health).
DEVICES_FILTER: Final = "devices/+/+"
DEVICE_REPORTS: Final = frozenset({"status", "heartbeat"})
# Retained summary of all polls, for dashboards that speak only MQTT (docs/operations.md).
STATS_TOPIC: Final = "votebox/stats"
# Vote topics remembered parsed: a device publishes on the same topic every time, and a split
# and three regex matches per message were 5% of the processor's CPU. Sized for
# 16,384 devices' topics, about 6 MB; beyond that the least recently used are parsed again.
_PARSED_TOPICS: Final = 16_384


def is_valid_id(value: str) -> bool:
    """Whether ``value`` is a valid poll or device id."""
    return _ID.fullmatch(value) is not None


def is_device_id(value: str) -> bool:
    """Whether ``value`` may be a device id: a valid id that no account of votebox's own uses."""
    return (
        _ID.fullmatch(value) is not None
        and value not in NON_DEVICE_ACCOUNTS
        and not value.startswith(RESERVED_PREFIX)
    )


@functools.lru_cache(maxsize=_PARSED_TOPICS)
def parse_vote_topic(topic: str) -> tuple[str, str]:
    """Split ``votes/{poll}/{device}``.

    Returns:
        ``(poll, device)``.

    Raises:
        VoteRejected: with `Reason.BAD_TOPIC` when the topic breaks the contract.
    """
    parts = topic.split("/")
    if len(parts) != 3 or parts[0] != "votes":
        raise VoteRejected(Reason.BAD_TOPIC, "topic must be votes/{poll}/{device}")
    _, poll, device = parts
    if _ID.fullmatch(poll) is None or _ID.fullmatch(device) is None:
        raise VoteRejected(Reason.BAD_TOPIC, "ids are 1-64 chars of [A-Za-z0-9_-]")
    if not is_device_id(device):
        raise VoteRejected(Reason.BAD_TOPIC, f"{device!r} is votebox's own account, not a device")
    return poll, device


def device_from_topic(topic: str) -> str | None:
    """The device id of a vote topic, if it has a valid one, to address an ack for a bad message.
    None for an account that is not a device: there is no device to answer."""
    parts = topic.split("/")
    if len(parts) == 3 and parts[0] == "votes" and is_device_id(parts[2]):
        return parts[2]
    return None


def vote_topic(poll: str, device: str) -> str:
    """``votes/{poll}/{device}``: where a device publishes its votes."""
    return f"votes/{poll}/{device}"


def acks_topic(device: str) -> str:
    """``acks/{device}``: where the processor answers a device."""
    return f"acks/{device}"


def results_topic(poll: str) -> str:
    """``polls/{poll}/results``: the retained live result of a poll."""
    return f"polls/{poll}/results"


def series_topic(poll: str) -> str:
    """Retained votes per minute of the last hour, JSON (docs/protocol.md, Votes per minute)."""
    return f"polls/{poll}/series"


def shared(topic_filter: str, group: str | None) -> str:
    """Prefix ``$share/{group}/`` (an MQTT 5 shared subscription) when a group is set."""
    return f"$share/{group}/{topic_filter}" if group else topic_filter


def probe_topic(client_id: str) -> str:
    """``votebox/probe/{hash of the client id}``: where a processor sends itself a message to
    learn that the broker still routes to its session (processor/mqtt.py). Hashed, because a
    client id may hold characters a topic level may not."""
    return f"votebox/probe/{hashlib.sha1(client_id.encode()).hexdigest()[:16]}"


def config_topic(poll: str) -> str:
    """``polls/{poll}/config``: the poll's definition and state, retained, for kiosks."""
    return f"polls/{poll}/config"


def status_topic(device: str) -> str:
    """``devices/{device}/status``: retained ``online``/``offline``, the device's last will."""
    return f"devices/{device}/status"


def heartbeat_topic(device: str) -> str:
    """``devices/{device}/heartbeat``: the device's periodic health report."""
    return f"devices/{device}/heartbeat"


def parse_device_topic(topic: str) -> tuple[str, str] | None:
    """Split ``devices/{device}/{report}`` into ``(device, report)``; None if it is not one
    (``report`` is ``status`` or ``heartbeat``)."""
    parts = topic.split("/")
    if (
        len(parts) == 3
        and parts[0] == "devices"
        and parts[2] in DEVICE_REPORTS
        and is_device_id(parts[1])
    ):
        return parts[1], parts[2]
    return None
