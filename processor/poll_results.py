"""What ``polls/{poll}/results`` carries: a poll's counts, its figures, their JSON, and the
terminal form of that JSON (``votebox watch``, ``votebox poll show``). Pure."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from processor.poll import PollType, iso_time

__all__ = ["Results", "format_results"]


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
    type: PollType = PollType.SINGLE
    scale: tuple[int, int] | None = None
    hidden: bool = False
    opens_ms: int = 0
    closes_ms: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    # Per shard, shard 0 first: the length and head of its chain (tally.lua, The chain).
    chain: tuple[tuple[int, str], ...] = ()

    def figures(self) -> dict[str, Any]:
        """Percentages and the type's own figures (mean of a rating, NPS score)."""
        total = self.total
        out: dict[str, Any] = {
            "percentages": [round(100 * c / total, 2) if total else 0.0 for c in self.counts]
        }
        if self.scale is not None:
            low = self.scale[0]
            answered = sum(self.counts)
            mean = (
                sum((low + i) * c for i, c in enumerate(self.counts)) / answered
                if answered
                else None
            )
            out["mean"] = round(mean, 3) if mean is not None else None
        if self.type is PollType.NPS:
            promoters = sum(self.counts[9:11])
            detractors = sum(self.counts[0:7])
            out["nps"] = round(100 * (promoters - detractors) / total, 1) if total else None
            out["promoters"], out["passives"], out["detractors"] = (
                promoters,
                sum(self.counts[7:9]),
                detractors,
            )
        return out

    def to_json(self) -> bytes:
        """The retained JSON payload."""
        body: dict[str, Any] = {
            "poll": self.poll,
            "title": self.title,
            "type": str(self.type),
            "state": self.state,
            "version": self.version,
            "total": self.total,
            "labels": list(self.labels),
            "updated_at": iso_time(self.updated_ms) or iso_time(1),
            "opens_at": iso_time(self.opens_ms),
            "closes_at": iso_time(self.closes_ms),
            # docs/protocol.md, Results: every copy of this document witnesses the heads.
            "chain": [{"length": n, "head": head} for n, head in self.chain],
        }
        if self.hidden:
            # hide_results_until_close: totals only while the poll is open.
            body.update(hidden=True, counts=None, percentages=None)
        else:
            body["counts"] = list(self.counts)
            body.update(self.figures())
        return json.dumps(body, separators=(",", ":")).encode()


def format_results(document: dict[str, Any], *, width: int = 30) -> str:
    """A few lines of text bars for one results document."""
    total = document.get("total", 0)
    lines = [
        f"{document.get('title') or document.get('poll', '?')}  [{document.get('state', '?')}]  "
        f"total {total}  v{document.get('version', 0)}  {document.get('updated_at', '')}"
    ]
    if document.get("counts") is None:
        lines.append("  results hidden until the poll closes")
        return "\n".join(lines)
    labels = document.get("labels") or []
    label_width = max((len(label) for label in labels), default=0)
    # A document from another publisher may be short of counts: draw what there is.
    for label, count in zip(labels, document["counts"], strict=False):
        share = count / total if total else 0.0
        bar = "#" * round(share * width)
        lines.append(f"  {label:<{label_width}} {bar:<{width}} {count:>7} {share:6.1%}")
    return "\n".join(lines)
