"""Questions to InfluxDB about a poll's points: ``votebox recount`` counts with them."""

from __future__ import annotations

import asyncio
from typing import Final

from processor.influx.writers import PointWriter

__all__ = ["count_votes"]

# Every time InfluxDB can store (1677-2262 is its range; no vote is dated before 1970).
_ALL_TIME_NS: Final = (0, 9_223_372_036_854_775_806)


async def count_votes(writer: PointWriter, poll: str) -> dict[int, int]:
    """The sum of ``poll``'s point values in InfluxDB per option index: its votes, changed
    votes taken back (for ``votebox recount``)."""
    rows = await asyncio.to_thread(writer.query_sums, poll, "option", *_ALL_TIME_NS)
    counts: dict[int, int] = {}
    for row in rows:
        counts[row.option] = counts.get(row.option, 0) + row.votes
    return counts
