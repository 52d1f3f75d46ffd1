"""A smoke run of the benchmark, so that it keeps working (no timing is asserted)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.chain import chain_table, run_chain_bench
from bench.run import COUNTING_RUNS, BenchConfig, run_bench, table

pytestmark = pytest.mark.e2e


@pytest.mark.timeout(300)
def test_smoke_run_measures_everything_and_every_count_is_exact() -> None:
    result = run_bench(BenchConfig.smoke(), log=lambda *_: None)
    for run in COUNTING_RUNS:
        assert result[run]["exact"], (run, result[run])
        assert result[run]["counted"] == result[run]["unique_votes"] > 0
        assert result[run]["rate"] > 0
    assert result["votebox_two_processors"]["processors"] == 2
    assert 0 < result["latency"]["p50_ms"] <= result["latency"]["p99_ms"]
    assert result["votebox"]["processor_peak_rss_mb"] > 0
    assert "votebox / baseline" in table(result)
    # The cluster runs: three polls on three primaries, and one poll over three shards on
    # three primaries, each counted exactly above.
    for run, polls, shards in (
        ("redis_cluster_3_polls", 3, 1),
        ("redis_cluster_hot_poll_3_shards", 1, 3),
    ):
        assert result[run]["store"].startswith("Redis Cluster")
        assert (result[run]["polls"], result[run]["shards"]) == (polls, shards)
        assert len(result[run]["redis_node_cores"]) == 3
    # The many-polls runs: a backlog over many polls, every poll's retained result right, and
    # idle polls measured (the smoke sizes: 20 polls, 50 idle).
    spread = result["polls_backlog_spread"]
    assert spread["polls"] == BenchConfig.smoke().spread_polls and spread["retained_right"]
    assert result["polls_backlog_1"]["retained_right"]
    assert result["idle_many_polls"]["polls"] == BenchConfig.smoke().idle_polls
    assert result["idle_many_polls"]["processor_cores"] >= 0
    assert "open polls, nothing happening" in table(result)


@pytest.mark.timeout(300)
def test_the_chains_smoke_run_measures_the_tally_and_audits_every_vote(tmp_path: Path) -> None:
    result = run_chain_bench(tmp_path, smoke=True, log=lambda *_: None)
    (run,) = result["tally"]
    assert run["script_us_per_vote"] > 0 and run["client_us_per_vote"] > 0
    # Every vote of the audited poll is an entry, and the audit found the log whole.
    assert result["audit"]["entries"] == 20_000 and result["audit"]["audit_s"] > 0
    assert "audit: 20,000 entries" in chain_table(result)
