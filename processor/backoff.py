"""Reconnect delays. Rule: a pure generator, so the policy is tested without sleeping."""

from __future__ import annotations

import random
from collections.abc import Iterator

__all__ = ["backoff_delays"]


def backoff_delays(
    *, base_s: float, cap_s: float, rng: random.Random | None = None
) -> Iterator[float]:
    """Capped exponential backoff with full jitter: attempt n waits U(0, min(cap, base*2**n)).

    Full jitter spreads a fleet's reconnects after a broker restart instead of stampeding it
    (AWS Architecture Blog, "Exponential Backoff And Jitter").

    Args:
        base_s: the ceiling of the first delay.
        cap_s: the largest ceiling.
        rng: a seeded generator for tests.

    Yields:
        Delays in seconds, forever.
    """
    draw = (rng or random.Random()).uniform
    ceiling = base_s
    while True:
        yield draw(0, ceiling)
        ceiling = min(cap_s, ceiling * 2)
