"""The processor's metrics: what a batch adds in one step is what one call per vote added."""

from __future__ import annotations

from collections import Counter

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import generate_latest

from processor.metrics import Metrics


def _ages_exposition(metrics: Metrics) -> tuple[list[bytes], float]:
    """The histogram's lines but its creation time and sum; and its sum (n * age and n
    additions of age may differ in the last bits)."""
    text = generate_latest(metrics.registry)
    lines = [line for line in text.splitlines() if b"votebox_publish_to_commit_seconds" in line]
    total = next(float(line.split()[-1]) for line in lines if b"_sum " in line)
    return [line for line in lines if b"_created " not in line and b"_sum " not in line], total


@given(st.lists(st.integers(0, 2_000_000_000), max_size=60), st.floats(0, 2.2e9))
def test_a_batchs_ages_are_observed_as_one_observation_per_vote(
    stamps: list[int], now_s: float
) -> None:
    bulk, one_by_one = Metrics(), Metrics()
    bulk.observe_ages(now_s, Counter(stamps))
    for ts_s in stamps:
        one_by_one.publish_to_commit_seconds.observe(max(0.0, now_s - ts_s))
    (bulk_lines, bulk_sum), (lines, total) = _ages_exposition(bulk), _ages_exposition(one_by_one)
    assert bulk_lines == lines
    assert abs(bulk_sum - total) <= 1e-9 * max(1.0, abs(total))
