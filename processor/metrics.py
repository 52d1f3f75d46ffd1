"""Prometheus metrics of one processor. Rule: every name here is one the docs and the Grafana
dashboard may use (tests/test_operations.py checks them against this registry); no label takes
a value a device chooses.

Counters are per process, as Prometheus expects: `sum()` them over processors. The exact,
shared numbers per poll live in Redis and reach the retained ``votebox/stats`` topic.
"""

from __future__ import annotations

import bisect
from collections import Counter as CodeCounter
from collections.abc import Callable
from typing import Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    ProcessCollector,
    generate_latest,
)

from processor.reasons import Fate, Reason

__all__ = ["CONTENT_TYPE", "Metrics"]

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

# Seconds. The low end resolves the results interval (0.1 s) and a Redis round trip; the high
# end a Redis outage being ridden out.
_LATENCY_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# Device clocks tick in whole seconds (docs/protocol.md, key 2); an offline replay is hours old.
_AGE_BUCKETS: Final = (1, 2, 5, 10, 30, 60, 300, 900, 3600, 21600, 86400)
_BATCH_BUCKETS: Final = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)


class Metrics:
    """The processor's metrics, in a registry of their own (two processors in one test process
    must not share counters).

    Attributes are the metric objects; the service updates them once per batch, not per vote.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # The process's CPU, memory and file descriptors, and its garbage collections: the
        # standard families every Python exporter has (docs/operations.md, Metrics).
        ProcessCollector(registry=r)
        GCCollector(registry=r)
        self.votes = Counter(
            "votebox_votes",
            "Votes by fate: accepted, duplicate or rejected (see votebox_votes_rejected_total).",
            ["fate"],
            registry=r,
        )
        self.rejected = Counter(
            "votebox_votes_rejected",
            "Rejected votes and messages by reason code (docs/protocol.md, Codes).",
            ["reason"],
            registry=r,
        )
        self.messages = Counter(
            "votebox_messages", "MQTT messages received on votes/#.", registry=r
        )
        self.device_reports = Counter(
            "votebox_device_reports",
            "Device status and heartbeat messages (devices/+/+), by kind and whether they were "
            "recorded or refused as unreadable.",
            ["kind", "outcome"],
            registry=r,
        )
        self.batch_size = Histogram(
            "votebox_batch_messages",
            "Messages per batch (one Redis round trip each); _count is the number of batches.",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.commit_seconds = Histogram(
            "votebox_commit_seconds",
            "Time of one batch's Redis commit (the round trip of its tally scripts).",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.receive_to_commit_seconds = Histogram(
            "votebox_receive_to_commit_seconds",
            "Per batch, how long its oldest message waited from arriving at the processor to "
            "being committed.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.publish_to_commit_seconds = Histogram(
            "votebox_publish_to_commit_seconds",
            "Per vote that carries a device timestamp: commit time minus that timestamp (device "
            "clock, whole seconds; offline replays show here as old votes).",
            buckets=_AGE_BUCKETS,
            registry=r,
        )
        self.acks = Counter(
            "votebox_acks_published", "Ack messages published to acks/{device}.", registry=r
        )
        self.commit_failures = Counter(
            "votebox_commit_failures",
            "Batch commits that failed because Redis was unavailable (retried).",
            registry=r,
        )
        self.intake_held = Gauge(
            "votebox_intake_held_messages",
            "Messages received from the broker and not yet committed and acked.",
            registry=r,
        )
        self.intake_stalled = Gauge(
            "votebox_intake_stalled",
            "1 while received votes have waited VOTEBOX_STALL_S with no batch committed (what"
            " /readyz calls a stalled intake); 0 from the next commit on.",
            registry=r,
        )
        self.mqtt_connected = Gauge(
            "votebox_mqtt_connected", "1 while connected to the broker.", registry=r
        )
        self.mqtt_reconnects = Counter(
            "votebox_mqtt_reconnects", "Connections to the broker after the first.", registry=r
        )
        self.mqtt_publishes_refused = Counter(
            "votebox_mqtt_publishes_refused",
            "Our QoS 1 publishes (results, configs, stats) the broker refused, by MQTT 5 reason"
            " code (0x95: over the broker's Maximum Packet Size, not sent).",
            ["reason"],
            registry=r,
        )
        self.mqtt_takeovers = Counter(
            "votebox_mqtt_session_takeovers",
            "Times the broker said another client took our session over (MQTT 5 DISCONNECT"
            " 0x8E): two processors with one client id.",
            registry=r,
        )
        self.results_published = Counter(
            "votebox_results_published",
            "Retained results published, by poll (polls are created by operators: bounded).",
            ["poll"],
            registry=r,
        )
        self.influx_points_written = Counter(
            "votebox_influx_points_written", "Points written to InfluxDB.", registry=r
        )
        self.influx_points_refused = Counter(
            "votebox_influx_points_refused",
            "Points InfluxDB refused as bad; set aside in Redis (docs/analytics.md).",
            registry=r,
        )
        self.influx_write_failures = Counter(
            "votebox_influx_write_failures",
            "InfluxDB writes that failed and will be retried.",
            registry=r,
        )
        # From Redis, refreshed by the stats loop: shared by all processors, so not summed.
        self.influx_queue_points = Gauge(
            "votebox_influx_queue_points",
            "Points queued in Redis for InfluxDB, all polls (from Redis, every stats interval).",
            registry=r,
        )
        self.influx_points_dropped = Gauge(
            "votebox_influx_points_dropped",
            "Points of counted votes never queued for InfluxDB because their poll's queue was"
            " full (VOTEBOX_INFLUX_QUEUE_MAX), all polls (from Redis: the polls' point_dropped).",
            registry=r,
        )
        self.devices_known = Gauge(
            "votebox_devices_known", "Devices that have ever sent a vote (from Redis).", registry=r
        )
        self.devices_silent = Gauge(
            "votebox_devices_silent",
            "Devices whose last status said online, with no message (vote, heartbeat, status)"
            " for VOTEBOX_SILENT_AFTER_S (from Redis).",
            registry=r,
        )
        self.polls = Gauge("votebox_polls", "Polls defined in Redis.", registry=r)
        self.up_seconds = Gauge(
            "votebox_uptime_seconds", "Seconds since this processor started.", registry=r
        )
        # Export every label value from the start: a rate() over a series that appears only
        # with its first rejection misses that rejection.
        for fate in Fate:
            self.votes.labels(fate.name.lower())
        for reason in Reason:
            self.rejected.labels(reason.code)
        for kind in ("status", "heartbeat"):
            for outcome in ("recorded", "refused"):
                self.device_reports.labels(kind, outcome)

    def observe_ages(self, now_s: float, stamps: CodeCounter[int]) -> None:
        """`publish_to_commit_seconds` of a batch's votes, given how many carried each device
        timestamp: one observation per vote, added per distinct timestamp (a batch's votes
        carry few), not one call per vote (profiled at 4% of the processor's time)."""
        histogram = self.publish_to_commit_seconds
        bounds = getattr(histogram, "_upper_bounds", None)
        buckets = getattr(histogram, "_buckets", None)
        total = getattr(histogram, "_sum", None)
        for ts_s, n in stamps.items():
            age = max(0.0, now_s - ts_s)
            if bounds is None or buckets is None or total is None:  # another prometheus_client
                for _ in range(n):
                    histogram.observe(age)
                continue
            # What Histogram.observe does for one value, n times at once.
            total.inc(age * n)
            buckets[bisect.bisect_left(bounds, age)].inc(n)

    def count_codes(self, codes: CodeCounter[int]) -> None:
        """Count fates and reasons, given how many times each ack code occurred."""
        for code, n in codes.items():
            if code < 16:
                self.votes.labels(Fate(code).name.lower()).inc(n)
            else:
                self.votes.labels("rejected").inc(n)
                self.rejected.labels(Reason(code).code).inc(n)

    def watch(self, gauge: Gauge, read: Callable[[], float]) -> None:
        """Make ``gauge`` read its value from ``read`` at each scrape."""
        gauge.set_function(read)

    def fates(self) -> dict[str, int]:
        """Votes by fate and rejections by reason, for a log line (zeros left out)."""
        counts: dict[str, int] = {}
        for family in (self.votes, self.rejected):
            for metric in family.collect():
                for sample in metric.samples:
                    if sample.name.endswith("_total") and sample.value:
                        label = next(iter(sample.labels.values()))
                        counts[label] = int(sample.value)
        return counts

    def value(self, sample: str, labels: dict[str, str] | None = None) -> float:
        """One sample's current value (0 when it has none yet)."""
        return self.registry.get_sample_value(sample, labels or {}) or 0.0

    def exposition(self) -> bytes:
        """The text format Prometheus scrapes."""
        return generate_latest(self.registry)

    def names(self) -> set[str]:
        """Every sample name exported (``_total``, ``_bucket`` ... included), also of labelled
        families that have no sample yet."""
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
        return {
            family.name + suffix
            for family in self.registry.collect()
            for suffix in suffixes.get(family.type, ("",))
        }
