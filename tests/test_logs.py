from __future__ import annotations

import json
import logging

import pytest

from processor.logs import JsonFormatter, LogfmtFormatter, RejectionLog


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


def _record(msg: str, *args: object, **extra: object) -> logging.LogRecord:
    record = logging.getLogger("votebox.test").makeRecord(
        "votebox.test", logging.WARNING, __file__, 1, msg, args, None, extra=extra
    )
    return record


def test_logfmt_lines_carry_extra_fields_as_keys_and_quote_what_needs_it() -> None:
    line = LogfmtFormatter().format(
        _record("rejected %s from %s", "malformed", "k-1", event="rejected", reason="malformed")
    )
    assert "\n" not in line
    assert 'level=warning logger=votebox.test msg="rejected malformed from k-1"' in line
    assert line.endswith("event=rejected reason=malformed")
    assert line.startswith("ts=20")


def test_logfmt_keeps_a_multi_line_message_on_one_line() -> None:
    line = LogfmtFormatter().format(_record('a "quoted"\nsecond line = x'))
    assert "\n" not in line
    assert 'msg="a \\"quoted\\"\\nsecond line = x"' in line


def test_json_lines_parse_and_carry_extra_fields() -> None:
    line = JsonFormatter().format(_record("stopped after %d", 5, event="stopped", accepted=5))
    body = json.loads(line)
    assert body["msg"] == "stopped after 5" and body["level"] == "warning"
    assert body["event"] == "stopped" and body["accepted"] == 5
