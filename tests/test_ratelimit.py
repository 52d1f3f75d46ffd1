from __future__ import annotations

from processor.ratelimit import DeviceRateLimiter


def test_a_device_gets_its_burst_then_its_rate_and_others_are_not_touched() -> None:
    now = [0.0]
    limiter = DeviceRateLimiter(rate_per_s=10, burst=5, clock=lambda: now[0])
    assert [limiter.allow("flood") for _ in range(8)] == [True] * 5 + [False] * 3
    assert limiter.allow("quiet")  # another device has its own bucket
    now[0] += 0.25  # 2.5 tokens back
    assert [limiter.allow("flood") for _ in range(3)] == [True, True, False]
    now[0] += 60  # quiet for a minute: the burst again, never more
    assert sum(limiter.allow("flood") for _ in range(10)) == 5


def test_rate_zero_is_no_limit() -> None:
    limiter = DeviceRateLimiter(rate_per_s=0, burst=0, clock=lambda: 0.0)
    assert all(limiter.allow("d") for _ in range(10_000))
