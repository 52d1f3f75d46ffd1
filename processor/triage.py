"""The triage of one batch of deliveries. Rule: pure: no I/O, no logging, no clock.

Deliveries in, and out: the votes to commit, each device's ack entries in arrival order (a
vote's entry is a slot its committed fate fills), the rejections (for the ack, the count and
the log), the devices heard from, and the devices' latest health reports.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from processor.codec import AckEntry, Vote, decode_heartbeat, decode_message, decode_status
from processor.errors import VoteRejected
from processor.keys import DEVICES_HEALTH, DEVICES_STATUS
from processor.mqtt import Delivery
from processor.reasons import Reason
from processor.topics import device_from_topic, parse_device_topic, parse_vote_topic

__all__ = ["DeviceReports", "Rejection", "Triage", "triage"]

# A vote's ack entry until its commit says what became of it.
PENDING_CODE = -1


@dataclass(frozen=True, slots=True)
class Rejection:
    """One message or vote refused, and by whom (None when no device could be named)."""

    device: str | None
    error: VoteRejected


@dataclass(slots=True)
class DeviceReports:
    """The status and heartbeat messages of one batch: the latest of each device, as the JSON
    that `votebox devices` reads (docs/protocol.md, Device health). A report never gets an ack:
    a lost one is replaced by the next."""

    count: int = 0
    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)
    status: dict[str, dict[str, Any]] = field(default_factory=dict)
    health: dict[str, dict[str, Any]] = field(default_factory=dict)

    def latest(self, *, now_ms: int) -> dict[str, dict[str, str]]:
        """The Redis hashes to write, by key, then by device."""
        out: dict[str, dict[str, str]] = {}
        for key, reports in ((DEVICES_STATUS, self.status), (DEVICES_HEALTH, self.health)):
            if reports:
                out[key] = {
                    device: json.dumps({**report, "at_ms": now_ms}, separators=(",", ":"))
                    for device, report in reports.items()
                }
        return out


@dataclass(slots=True)
class Triage:
    """What one batch holds, before anything is committed."""

    votes: list[Vote] = field(default_factory=list)
    # Per device, its ack entries in arrival order; a vote's is PENDING_CODE until committed.
    acks: defaultdict[str, list[AckEntry]] = field(default_factory=lambda: defaultdict(list))
    # For each vote, in order: (device, index of its entry in acks[device]).
    slots: list[tuple[str, int]] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    # Rejections counted apart from any poll (bad topics, unreadable messages...).
    unattributed: Counter[Reason] = field(default_factory=Counter)
    seen: set[str] = field(default_factory=set)
    reports: DeviceReports = field(default_factory=DeviceReports)

    def _reject(self, device: str | None, error: VoteRejected) -> None:
        self.unattributed[error.reason] += 1
        self.rejections.append(Rejection(device, error))
        if device is not None:
            self.acks[device].append(AckEntry.rejected(error))


def triage(batch: Sequence[Delivery], *, allow: Callable[[str], bool] | None = None) -> Triage:
    """Sort one batch into votes, ack slots, rejections and device reports.

    Args:
        batch: deliveries, in the order the broker sent them.
        allow: the rate limiter's verdict for a device's message; None lets all through.

    Returns:
        The `Triage`; nothing is decided here that needs Redis.
    """
    out = Triage()
    for delivery in batch:
        if delivery.topic.startswith("devices/"):
            _report(out, delivery)
            continue
        try:
            poll, device = parse_vote_topic(delivery.topic)
        except VoteRejected as error:
            out._reject(device_from_topic(delivery.topic), error)
            continue
        out.seen.add(device)
        if allow is not None and not allow(device):
            # Not read: the device keeps the votes in its outbox and sends them again.
            out._reject(device, VoteRejected(Reason.RATE_LIMITED, "over VOTEBOX_DEVICE_RATE"))
            continue
        if delivery.too_large:  # read past, never buffered (processor/mqtt.py)
            out._reject(device, VoteRejected(Reason.TOO_LARGE, f"{delivery.too_large} bytes"))
            continue
        try:
            items = decode_message(delivery.payload, poll=poll, device=device)
        except VoteRejected as error:
            out._reject(device, error)
            continue
        for item in items:
            if isinstance(item, VoteRejected):
                out._reject(device, item)
            else:
                entries = out.acks[device]
                out.slots.append((device, len(entries)))
                # Every field in order, without the generated __new__ (see codec.Vote).
                entries.append(tuple.__new__(AckEntry, (item.epoch, item.seq, PENDING_CODE, None)))
                out.votes.append(item)
    return out


def _report(out: Triage, delivery: Delivery) -> None:
    reports = out.reports
    reports.count += 1
    parsed = parse_device_topic(delivery.topic)
    if parsed is None:
        # Only when a broker without the ACL lets a device publish a wrong devices/ topic.
        reports.outcomes["status", "refused"] += 1
        out.rejections.append(Rejection(None, VoteRejected(Reason.BAD_TOPIC, delivery.topic[:80])))
        return
    device, kind = parsed
    try:
        if kind == "status":
            if not delivery.payload:
                return  # an operator cleared the retained status of a removed device
            reports.status[device] = {"state": decode_status(delivery.payload)}
        else:
            beat = decode_heartbeat(delivery.payload)
            reports.health[device] = {
                "uptime_s": beat.uptime_s,
                "outbox": beat.outbox,
                "battery": beat.battery,
            }
    except VoteRejected as error:
        reports.outcomes[kind, "refused"] += 1
        out.rejections.append(
            Rejection(device, VoteRejected(error.reason, f"{kind}: {error.detail}"))
        )
        return
    reports.outcomes[kind, "recorded"] += 1
    out.seen.add(device)  # a sign of life like a vote (docs/operations.md, silent devices)
