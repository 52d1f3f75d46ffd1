"""A smoke run of the benchmark, so that it keeps working (no timing is asserted)."""

from __future__ import annotations

import pytest

from bench.run import BenchConfig, run_bench, table

pytestmark = pytest.mark.e2e


@pytest.mark.timeout(300)
def test_smoke_run_measures_everything_and_every_count_is_exact() -> None:
    result = run_bench(BenchConfig.smoke(), log=lambda *_: None)
    for run in ("votebox", "votebox_10_devices", "votebox_two_processors", "votebox_amqtt"):
        assert result[run]["exact"], (run, result[run])
        assert result[run]["counted"] == result[run]["unique_votes"] > 0
        assert result[run]["rate"] > 0
    assert result["votebox_two_processors"]["processors"] == 2
    assert 0 < result["latency"]["p50_ms"] <= result["latency"]["p99_ms"]
    assert result["votebox"]["processor_peak_rss_mb"] > 0
    assert "votebox / baseline" in table(result)
