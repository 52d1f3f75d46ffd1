from __future__ import annotations

import itertools
import random

from processor.backoff import backoff_delays


def test_delays_grow_to_the_cap_with_full_jitter() -> None:
    delays = list(itertools.islice(backoff_delays(base_s=0.1, cap_s=2.0, rng=random.Random(1)), 50))
    ceilings = [min(2.0, 0.1 * 2**n) for n in range(50)]
    assert all(0 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    assert max(delays[10:]) > 1.0  # the cap is reached, not just the base
    assert len(set(delays)) == len(delays)  # jittered, not a fixed schedule
