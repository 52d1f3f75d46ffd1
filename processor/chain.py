"""The chain: each poll shard's append-only log of accepted votes, and its audit. Pure.

Rule: `entry_text` and `link_head` are tally.lua's, byte for byte; the tests hold them to it. The
log is rebuilt from points alone (InfluxDB, the queue not yet written there, or an export), and
checked against heads that need not come from Redis: a head published on a retained results
topic is a witness the operator cannot take back (docs/security.md, The chain).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, NamedTuple

from processor.influx.line_protocol import QueuedPoint
from processor.keys import shard_of

__all__ = [
    "GENESIS",
    "Counts",
    "Entry",
    "Finding",
    "Head",
    "Log",
    "Witness",
    "check_counts",
    "check_head",
    "entry_text",
    "first_finding",
    "implied_counts",
    "link_head",
    "parse_head",
    "rebuild",
]

# The head of a chain with no entry (tally.lua starts from it).
GENESIS: Final = "0" * 40


class Head(NamedTuple):
    """A chain's state as some witness saw it: its shard, length and head."""

    shard: int
    length: int
    head: str


def parse_head(text: str) -> Head:
    """``LENGTH:HEAD`` (shard 0) or ``SHARD:LENGTH:HEAD``, as `votebox audit --head` takes it.

    Raises:
        ValueError: it is neither.
    """
    parts = text.strip().split(":")
    if len(parts) == 2:
        parts.insert(0, "0")
    if len(parts) != 3 or not parts[0].isdigit() or not parts[1].isdigit():
        raise ValueError(f"a head is LENGTH:HEAD or SHARD:LENGTH:HEAD, got {text!r:.80}")
    head = parts[2].lower()
    if len(head) != 40 or any(c not in "0123456789abcdef" for c in head):
        raise ValueError(f"a head is 40 hex digits (SHA-1), got {parts[2]!r:.80}")
    return Head(int(parts[0]), int(parts[1]), head)


class Entry(NamedTuple):
    """One accepted vote in the log: what its points say of it. A NamedTuple: an audit
    builds a million of them (see codec.Vote)."""

    number: int
    link: int
    device: str
    epoch: int
    seq: int
    options: tuple[int, ...]
    ts_s: int
    source: str
    # For a voter's changed vote: the vote it replaced (device, epoch, seq, options).
    replaced: tuple[str, int, int, tuple[int, ...]] | None
    # The head its points carry: only a link's last entry has one.
    head: str


def entry_text(entry: Entry) -> str:
    """The bytes the chain hashes for ``entry`` (tally.lua, count)."""
    replaced = ""
    if entry.replaced is not None:
        device, epoch, seq, options = entry.replaced
        replaced = f"{device}/{epoch}/{seq}/{','.join(map(str, options))}"
    return (
        f"{entry.device}\t{entry.epoch}\t{entry.seq}\t{','.join(map(str, entry.options))}\t"
        f"{entry.ts_s}\t{entry.source}\t{replaced}"
    )


def link_head(previous: str, entries: Sequence[Entry]) -> str:
    """The head after a link of ``entries`` that follows the head ``previous``."""
    text = previous + "\n" + "\n".join(entry_text(e) for e in entries)
    return hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()


@dataclass(frozen=True, slots=True)
class Finding:
    """Where the log and a witness first disagree, and why: ``missing``, ``added``,
    ``altered``, ``reordered`` or ``counter`` (a count that the log does not imply)."""

    shard: int
    entry: int
    why: str
    detail: str

    def __str__(self) -> str:
        return f"shard {self.shard}, entry {self.entry}: {self.why}: {self.detail}"


@dataclass(slots=True)
class Log:
    """One shard's log, rebuilt: its entries in order, the head after each link (by the length
    it ends at), and the first problem met while rebuilding it."""

    shard: int
    entries: list[Entry] = field(default_factory=list)
    heads: dict[int, str] = field(default_factory=lambda: {0: GENESIS})
    finding: Finding | None = None

    @property
    def length(self) -> int:
        return len(self.entries)

    def head_at(self, length: int) -> str | None:
        """The head after the link that ends at ``length``; None if no link ends there."""
        return self.heads.get(length)

    def counts_at(self, length: int, n_options: int) -> tuple[list[int], int]:
        """The votes per option and the total that the first ``length`` entries imply."""
        counts = [0] * n_options
        total = 0
        for entry in self.entries[:length]:
            for option in entry.options:
                if option < n_options:
                    counts[option] += 1
            if entry.replaced is None:
                total += 1
            else:
                for option in entry.replaced[3]:
                    if option < n_options:
                        counts[option] -= 1
        return counts, total

    def find(self, device: str, epoch: int, seq: int) -> Entry | None:
        """The entry of the vote (device, epoch, seq), if the log holds it."""
        for entry in self.entries:
            if (entry.device, entry.epoch, entry.seq) == (device, epoch, seq):
                return entry
        return None


def rebuild(points: Iterable[QueuedPoint], *, shards: int, up_to: Mapping[int, int]) -> list[Log]:
    """Each shard's log from its points (any order, a point seen twice counted once), up to
    the entry ``up_to[shard]`` (points past it came after the witness read: left out).

    A log is rebuilt as far as it holds together; its ``finding`` names the first entry where
    it does not: a number with no points (missing), two votes under one number or a point with
    no number (added), a link out of order (reordered), or a link whose head differs from the
    one its points carry (altered).
    """
    by_shard: list[dict[int, list[QueuedPoint]]] = [defaultdict(list) for _ in range(shards)]
    unplaced: list[list[QueuedPoint]] = [[] for _ in range(shards)]
    for point in points:
        shard = shard_of(point.device, shards) if shards > 1 else 0
        if point.entry <= 0:
            unplaced[shard].append(point)
        elif point.entry <= up_to.get(shard, 0):
            by_shard[shard][point.entry].append(point)
    logs = []
    for shard in range(shards):
        log = Log(shard)
        logs.append(log)
        if unplaced[shard]:
            p = min(unplaced[shard], key=lambda p: (p.device, p.epoch, p.seq))
            log.finding = Finding(
                shard, 0, "added", f"a point with no place in the chain: {_vote(p)}"
            )
            continue
        _rebuild_shard(log, by_shard[shard], up_to.get(shard, 0))
    return logs


def _vote(p: QueuedPoint) -> str:
    return f"device {p.device} epoch {p.epoch} seq {p.seq} option {p.option}"


def _entry_of(number: int, points: list[QueuedPoint]) -> Entry | str:
    """The entry its points make, or why they make none."""
    if len(points) == 1 and not points[0].withdrawn:  # most votes: one option, none replaced
        p = points[0]
        return Entry(
            number, p.link, p.device, p.epoch, p.seq, (p.option,), p.ts_s, p.source, None, p.head
        )
    # A point seen twice (still queued, and already in InfluxDB) is one point: its stream id
    # (0) and site (9) aside, the same fields.
    points = list({p[2:9] + p[10:]: p for p in points}.values())
    cast = [p for p in points if not p.withdrawn]
    if not cast:
        return "missing"
    first = cast[0]
    vote = (first.device, first.epoch, first.seq, first.ts_s, first.source, first.link, first.head)
    if any((p.device, p.epoch, p.seq, p.ts_s, p.source, p.link, p.head) != vote for p in cast):
        return "added"
    options = sorted(p.option for p in cast)
    withdrawn = [p for p in points if p.withdrawn]
    replaced = None
    if withdrawn:
        w = withdrawn[0]
        if any((p.device, p.epoch, p.seq) != (w.device, w.epoch, w.seq) for p in withdrawn):
            return "added"
        # Taken back when its vote was cast, in its link (tally.lua, count): bound to it.
        if any((p.ts_s, p.source, p.link, p.head) != vote[3:] for p in withdrawn):
            return "altered"
        replaced = (w.device, w.epoch, w.seq, tuple(sorted(p.option for p in withdrawn)))
    if len(set(options)) != len(options):
        return "added"
    return Entry(
        number, first.link, first.device, first.epoch, first.seq, tuple(options),
        first.ts_s, first.source, replaced, first.head,
    )  # fmt: skip


def _rebuild_shard(log: Log, points: Mapping[int, list[QueuedPoint]], length: int) -> None:
    """First the entries, as far as their points hold together; then the links over them,
    each checked against the head its last entry carries."""
    shard = log.shard
    entries: list[Entry] = []
    problem: Finding | None = None
    for number in range(1, length + 1):
        found = points.get(number)
        entry = _entry_of(number, found) if found else "missing"
        if isinstance(entry, str):
            problem = Finding(shard, number, entry, _WHY[entry])
            break
        follows = entries[-1].link if entries else None
        if entry.link != number and entry.link != follows:
            problem = Finding(
                shard, number, "reordered",
                f"its points say its link starts at entry {entry.link}, yet it comes after "
                f"entry {number - 1}" + (f" of the link from entry {follows}" if follows else ""),
            )  # fmt: skip
            break
        entries.append(entry)
    head = GENESIS
    end = 0
    while end < len(entries):
        start = end
        while end < len(entries) and entries[end].link == entries[start].link:
            end += 1
        if end == len(entries) and problem is not None:
            break  # a link the problem cut short: the problem is the finding
        made = link_head(head, entries[start:end])
        last = entries[end - 1]
        if last.head != made:
            problem = _link_finding(shard, entries, start, end, head)
            break
        head = made
        log.heads[last.number] = head
        log.entries += entries[start:end]
    log.finding = problem


_WHY: Final = {
    "missing": "no point of this vote is in the log",
    "added": "its points name more than one vote",
    "altered": "a point taking back a changed vote is not dated as the vote",
}
# Hashes tried to tell two exchanged entries from an altered one, at most.
_SWAP_BUDGET: Final = 200_000


def _link_finding(
    shard: int, entries: Sequence[Entry], start: int, end: int, previous: str
) -> Finding:
    """Why the link ``entries[start:end]`` does not give the head its last entry carries: two
    entries exchanged (found by trying each exchange that involves the link, within a budget),
    its last entry gone (no head at all), or else altered."""
    first, last = entries[start], entries[end - 1]
    if not last.head:
        detail = f"the link from entry {first.number} ends at {last.number} without its head"
        return Finding(shard, last.number + 1, "missing", f"{detail}: its last entry is gone")
    texts = [entry_text(e) for e in entries]
    tried = 0
    for a in range(start, end):
        for b in range(len(entries)):
            if b == a or tried >= _SWAP_BUDGET:
                continue
            tried += 1
            link = texts[start:end]
            link[a - start] = texts[b]
            if start <= b < end:
                link[b - start] = texts[a]
            text = previous + "\n" + "\n".join(link)
            if hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest() == last.head:
                low, high = sorted((entries[a].number, entries[b].number))
                detail = f"entries {low} and {high} were exchanged: each holds the other's vote"
                return Finding(shard, low, "reordered", detail)
    detail = f"entries {first.number}-{last.number} do not give the head their points carry"
    return Finding(
        shard, first.number, "altered", f"{detail}: a point in them was changed or added"
    )


class Counts(NamedTuple):
    """Votes per option and the total, as a tally or a result shows them."""

    counts: tuple[int, ...]
    total: int


def implied_counts(logs: Sequence[Log], lengths: Mapping[int, int], n_options: int) -> Counts:
    """The per-option counts and total the logs imply at ``lengths`` (by shard)."""
    counts = [0] * n_options
    total = 0
    for log in logs:
        c, t = log.counts_at(lengths.get(log.shard, 0), n_options)
        counts = [a + b for a, b in zip(counts, c, strict=True)]
        total += t
    return Counts(tuple(counts), total)


def check_counts(
    logs: Sequence[Log], witness: str, heads: Sequence[Head], counts: Counts
) -> Finding | None:
    """Whether ``counts`` (of ``witness``: the tally, a published result) are those the logs
    imply at the witness's ``heads``."""
    implied = implied_counts(logs, {h.shard: h.length for h in heads}, len(counts.counts))
    said = [
        f"{witness} counts {c} for option {option}; its chain implies {made}"
        for option, (c, made) in enumerate(zip(counts.counts, implied.counts, strict=True))
        if c != made
    ]
    if counts.total != implied.total:
        said.append(f"{witness} has a total of {counts.total}; its chain implies {implied.total}")
    if not said:
        return None
    return Finding(0, max((h.length for h in heads), default=0), "counter", said[0])


def check_head(logs: Sequence[Log], witness: str, head: Head) -> Finding | None:
    """Whether the rebuilt log of ``head.shard`` gives ``head`` (as ``witness`` holds it)."""
    if head.shard >= len(logs):
        return Finding(head.shard, 0, "added", f"{witness} names shard {head.shard}; the poll "
                       f"has {len(logs)}")  # fmt: skip
    log = logs[head.shard]
    if log.length < head.length:
        return Finding(
            head.shard, log.length + 1, "missing",
            f"{witness} has {head.length} entries; the log holds together up to {log.length}",
        )  # fmt: skip
    made = log.head_at(head.length)
    if made is None:
        return Finding(
            head.shard, head.length, "altered",
            f"{witness} says a link ends at entry {head.length}; in the log none does",
        )  # fmt: skip
    if made != head.head:
        return Finding(
            head.shard, head.length, "altered",
            f"the log's head at entry {head.length} is {made}; {witness} has {head.head}: the "
            "log up to there is not the one it witnessed",
        )  # fmt: skip
    return None


@dataclass(frozen=True, slots=True)
class Witness:
    """Someone who saw the chain: its heads, and the counts it shows at them (None: none
    shown, as a result hidden until the poll closes)."""

    name: str
    heads: tuple[Head, ...]
    counts: Counts | None = None


def first_finding(logs: Sequence[Log], witnesses: Sequence[Witness]) -> Finding | None:
    """The first disagreement: in the log itself, then with each witness's heads, then with
    its counts (a count the log does not imply is a counter changed)."""
    for log in logs:
        if log.finding is not None:
            return log.finding
    for witness in witnesses:
        for head in witness.heads:
            if (found := check_head(logs, witness.name, head)) is not None:
                return found
    for witness in witnesses:
        if witness.counts is not None:
            found = check_counts(logs, witness.name, witness.heads, witness.counts)
            if found is not None:
                return found
    return None
