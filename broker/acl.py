"""Who may read and write which topics: one table that both brokers enforce.

Rule: the only place a topic permission is written. `broker/mosquitto.acl` is rendered from
it (tests/test_accounts.py checks the file is current) and the embedded amqtt broker checks
it on every connect, subscribe, publish and delivery (broker/amqtt_plugins.py).
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal

from processor.topics import RESERVED_PREFIX

__all__ = [
    "GRANTS",
    "Access",
    "RESERVED_PREFIX",
    "ROLES",
    "Grant",
    "Role",
    "client_id_allowed",
    "filter_covers",
    "own_device_topics",
    "permitted",
    "render_mosquitto_acl",
]

Role = Literal["device", "processor", "dashboard"]
ROLES: Final[tuple[Role, ...]] = ("device", "processor", "dashboard")
Access = Literal["read", "write"]
# The roles whose one account is named for the role: never device ids (processor/topics.py).
_NAMED_ROLES: Final[tuple[Role, ...]] = ("processor", "dashboard")


@dataclass(frozen=True, slots=True)
class Grant:
    """One permission. In ``topic``, ``%u`` stands for the username, as in Mosquitto."""

    access: Literal["read", "write", "readwrite"]
    topic: str

    def allows(self, access: Access, username: str, requested: str) -> bool:
        if self.access not in (access, "readwrite"):
            return False
        return filter_covers(self.topic.replace("%u", username), requested)


# Why each role has what it has; rendered into broker/mosquitto.acl above each block.
_PURPOSE: Final[Mapping[Role, str]] = {
    "processor": "every vote and device report in; acks, polls' configs, results and stats out",
    "dashboard": "read only: its password is in every browser that opens the dashboard",
    "device": "its own votes, status (and last will) and heartbeats in; its own acks and the"
    " polls' configs and results out",
}

# docs/security.md explains the threats; docs/protocol.md, Topics, says who publishes what.
GRANTS: Final[Mapping[Role, tuple[Grant, ...]]] = {
    "processor": (
        Grant("read", "votes/#"),
        Grant("read", "devices/+/+"),
        Grant("write", "acks/#"),
        Grant("readwrite", "polls/#"),
        Grant("write", "votebox/#"),
        Grant("read", "votebox/probe/+"),
    ),
    "dashboard": (
        Grant("read", "polls/+/results"),
        Grant("read", "polls/+/config"),
        Grant("read", "polls/+/series"),
        Grant("read", "devices/+/status"),
        Grant("read", "votebox/stats"),
    ),
    "device": (
        Grant("write", "votes/+/%u"),
        Grant("write", "devices/%u/+"),
        Grant("read", "acks/%u"),
        Grant("read", "polls/+/config"),
        Grant("read", "polls/+/results"),
    ),
}


def filter_covers(allowed: str, requested: str) -> bool:
    """Whether every topic that ``requested`` (a topic or a filter) matches, ``allowed`` matches.

    ``a/+/c`` covers ``a/b/c`` and ``a/+/c``; ``a/#`` covers ``a/b/c`` and ``a/+/#``; ``a/b``
    does not cover ``a/+``: a device subscribing to ``acks/#`` is refused, not trimmed.
    """
    want, have = requested.split("/"), allowed.split("/")
    for i, level in enumerate(have):
        if level == "#":
            return True
        if i >= len(want) or want[i] == "#":
            return False
        if level != "+" and want[i] != level:  # a literal covers only itself, not "+"
            return False
    return len(want) == len(have)


def permitted(role: Role, username: str, access: Access, requested: str) -> bool:
    """Whether an account of ``role`` named ``username`` may ``access`` ``requested`` (a topic,
    or a filter, shared or not)."""
    if any(c in username for c in "%/+#"):
        return False  # a name that would widen its own patterns
    if requested.startswith("$share/"):
        requested = requested.split("/", 2)[2] if requested.count("/") >= 2 else ""
    return any(g.allows(access, username, requested) for g in GRANTS[role])


# Dashboards (dashboard/app.js, votebox watch, the simulator's results reader) share one
# account, so they cannot each use its name: they use these prefixes and a random suffix.
_DASHBOARD_CLIENT_IDS: Final = ("votebox-dashboard-", "votebox-watch-")


def client_id_allowed(role: Role, username: str, client_id: str) -> bool:
    """Whether an account may connect under ``client_id``. A broker disconnects whoever holds a
    client id when another connects with it (MQTT's session takeover): a device takes only its
    own id, a dashboard only dashboard ids, so neither can push the processor or another
    device off. The processor may use any id (several share one account)."""
    if role == "device":
        return client_id == username
    if role == "dashboard":
        return client_id.startswith(_DASHBOARD_CLIENT_IDS)
    return True


_HEADER: Final = """\
# Topic ACLs of the production Mosquitto (mosquitto.conf: acl_file). Each client logs in with
# a username from the password file (votebox device add); a device's username is its device
# id, so "processor" and "dashboard" are not valid device ids.
#
# GENERATED from broker/acl.py, the one table both brokers enforce (the embedded amqtt
# broker through broker/amqtt_plugins.py): change it there. `votebox device add` and
# `votebox device remove` rewrite this file along with the password file.
#
# Mosquitto refuses by default: a client may use only what is granted below. A device that
# publishes a vote under another device's name gets nothing through (MQTT 5: PUBACK 0x87).
"""


def render_mosquitto_acl() -> str:
    """broker/mosquitto.acl: ``user`` blocks for the named roles, ``pattern`` lines for devices.

    Mosquitto applies ``pattern`` lines to every user, the named roles too: without a denial,
    the dashboard (whose password every browser holds) could vote as ``votes/+/dashboard``.
    Each named role's block therefore denies the device patterns written out for its own name;
    Mosquitto checks a user's ``deny`` lines before anything else (security_default.c).
    """
    blocks = [_HEADER]
    for role in _NAMED_ROLES:
        lines = [_comment(f"{role}: {_PURPOSE[role]}."), f"user {role}"]
        lines += [f"topic {g.access} {g.topic}" for g in GRANTS[role]]
        lines += [f"topic deny {topic}" for topic in own_device_topics(role)]
        blocks.append("\n".join(lines) + "\n")
    lines = [_comment(f"Every device, by its own username (%u): {_PURPOSE['device']}.")]
    lines += [f"pattern {g.access} {g.topic}" for g in GRANTS["device"]]
    blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks)


def own_device_topics(username: str) -> list[str]:
    """The device grants that name the user (``%u``), written out for ``username``: what the
    device patterns would give an account of that name."""
    return [g.topic.replace("%u", username) for g in GRANTS["device"] if "%u" in g.topic]


def _comment(text: str) -> str:
    return textwrap.fill(text, width=94, initial_indent="# ", subsequent_indent="# ")
