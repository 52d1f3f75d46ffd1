from __future__ import annotations

import logging

import pytest

from processor.logs import RejectionLog


def test_repeated_rejections_are_logged_once_per_interval_with_a_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = RejectionLog(logging.getLogger("votebox.test"), every_s=3600)
    with caplog.at_level(logging.WARNING):
        for _ in range(1000):
            log.rejected("malformed", "kiosk-1", "truncated")
        log.rejected("unknown_option", "kiosk-2", "poll p")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "rejected malformed from kiosk-1: truncated",
        "rejected unknown_option from kiosk-2: poll p",
    ]


def test_the_next_line_says_how_many_were_not_logged(caplog: pytest.LogCaptureFixture) -> None:
    now = [1000.0]
    log = RejectionLog(logging.getLogger("votebox.test"), every_s=10, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING):
        log.rejected("malformed", None, "x")
        for _ in range(5):
            now[0] += 1
            log.rejected("malformed", None, "x")
        now[0] += 10
        log.rejected("malformed", None, "x")
    assert len(caplog.records) == 2
    assert caplog.records[-1].getMessage().endswith("(and 5 more since the last line)")
