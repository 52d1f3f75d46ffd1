"""Line protocol: the points the tally queues, and the line each becomes in InfluxDB.

Rule: a point's series and timestamp are fixed when it is queued, so a write retried after a
crash overwrites itself instead of adding a second point (docs/analytics.md, Schema).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Final, NamedTuple

__all__ = ["MEASUREMENT", "QueuedPoint", "counted_points", "line_for", "points_of_entry"]

MEASUREMENT: Final = "vote"
# A point's timestamp is the vote's second plus its seq in the nanoseconds, so two votes of one
# device in one second (same series) never share a timestamp and never overwrite each other.
_NS: Final = 1_000_000_000


class QueuedPoint(NamedTuple):
    """One entry of a poll's points stream (written by tally.lua). A NamedTuple: one is built
    per vote (see codec.Vote)."""

    stream_id: str
    poll: str
    device: str
    epoch: int
    seq: int
    option: int
    ts_s: int
    source: str
    # A voter changed their vote: this point takes the old one back (value -1).
    withdrawn: bool = False
    # The device's site when the vote was counted ("" for none): fixed with the point, so a
    # point written twice is the same point.
    site: str = ""
    # Its place in the poll shard's chain (tally.lua, The chain): the entry it belongs to, and
    # the first entry of that entry's link; 0 for a point queued before the chain.
    entry: int = 0
    link: int = 0
    # On the points of a link's last entry: the chain's head after that link.
    head: str = ""


def points_of_entry(
    poll: str, stream_id: bytes | str, fields: Mapping[bytes, bytes]
) -> list[QueuedPoint]:
    """The points of one entry of a poll's stream, as tally.lua queues them: ``n`` points in
    ``p``, one per line, "device, epoch, seq, option, ts, source, withdrawn, site, mark"
    tab-separated; or, as queued before 2026-12-03, one point with a field each.

    The chain (tally.lua): the entry's ``c`` is the chain's length before its link, ``m`` how
    many entries the link has and ``h`` the head it made; a point marked ``+`` is its entry's
    first. Each point gets its entry's number, its link's first, and on the link's last
    entry the head."""
    sid = stream_id.decode() if isinstance(stream_id, bytes) else stream_id
    packed = fields.get(b"p")
    if packed is None:
        return [
            QueuedPoint(
                sid,
                poll,
                fields[b"d"].decode(),
                int(fields[b"e"]),
                int(fields[b"s"]),
                int(fields[b"o"]),
                int(fields[b"t"]),
                fields[b"src"].decode(),
                fields.get(b"w") == b"1",
            )
        ]
    before = int(fields.get(b"c", -1))
    last = before + int(fields.get(b"m", 0))
    head = fields.get(b"h", b"").decode()
    link = before + 1 if before >= 0 else 0
    entry = before if before >= 0 else 0
    out = []
    for line in packed.decode().split("\n"):
        # device, epoch, seq, option, ts, source, withdrawn; the site from 2026-12-03, the
        # chain's mark from 2026-12-05
        device, epoch, seq, option, ts, source, withdrawn, *rest = line.split("\t")
        if link and len(rest) > 1 and rest[1]:
            entry += 1
        # Every field in order, without the generated __new__ (see codec.Vote).
        point = (sid, poll, device, int(epoch), int(seq), int(option), int(ts), source,
                 withdrawn == "1", rest[0] if rest else "", entry, link,
                 head if link and entry == last else "")  # fmt: skip
        out.append(tuple.__new__(QueuedPoint, point))
    return out


def counted_points(fields: Mapping[bytes, bytes]) -> int:
    """How many of the tally's ``queued_points`` an entry holds (entries queued before they
    were counted hold none)."""
    return int(fields.get(b"n", 0))


@functools.lru_cache(maxsize=4096)  # labels and sites: a few per poll, one per point
def _escape_tag(value: str) -> str:
    # Line protocol: commas, equals signs and spaces in tag values are escaped with a backslash.
    return value.replace("\\", "\\\\").replace(",", r"\,").replace("=", r"\=").replace(" ", r"\ ")


def line_for(point: QueuedPoint, label: str) -> bytes:
    """The line protocol of one vote (docs/analytics.md, Schema); tags in key order."""
    _, poll, device, epoch, seq, option, ts_s, source, withdrawn, site, entry, link, head = point
    # A device that lost its store counts seqs from 0 again in a higher epoch: the epoch is a
    # tag from 1 on, so that its votes never share a point key (series and timestamp) with the
    # same seqs of an earlier epoch; absent for 0, so epoch-0 series are those of before.
    epoch_tag = f",epoch={epoch}" if epoch else ""
    tags = (
        f"device={device}{epoch_tag},label={_escape_tag(label) or '-'},option={option},"
        f"poll={poll},site={_escape_tag(site) or '-'}"
    )
    value = 1
    if withdrawn:
        # Its own series (tag withdrawn=1), so it never overwrites a vote's point.
        tags, value = tags + ",withdrawn=1", -1
    # The chain's fields, not tags: one per vote, they would make a series each.
    chain = (f",entry={entry}i,link={link}i" + (f',head="{head}"' if head else "")) if entry else ""
    return (
        f"{MEASUREMENT},{tags} value={value}i,seq={seq}i,epoch={epoch}i,"
        f'ts_source="{source}"{chain} {ts_s * _NS + seq % _NS}'
    ).encode()
