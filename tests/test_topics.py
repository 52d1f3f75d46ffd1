from __future__ import annotations

import pytest

from processor.errors import VoteRejected
from processor.reasons import Reason
from processor.topics import (
    acks_topic,
    device_from_topic,
    parse_vote_topic,
    results_topic,
    shared,
    vote_topic,
)


def test_vote_topic_round_trips() -> None:
    assert parse_vote_topic(vote_topic("final-2026", "kiosk_07")) == ("final-2026", "kiosk_07")


@pytest.mark.parametrize(
    "topic",
    [
        "votes/poll",
        "votes/poll/device/extra",
        "votes//device",
        "votes/poll/",
        "votes/po ll/device",
        "votes/poll/dev+ice",
        "votes/poll/dévice",
        "votes/" + "p" * 65 + "/device",
        "vote/poll/device",
        "",
    ],
)
def test_parse_rejects_topics_outside_the_contract(topic: str) -> None:
    with pytest.raises(VoteRejected) as caught:
        parse_vote_topic(topic)
    assert caught.value.reason is Reason.BAD_TOPIC


def test_device_from_a_bad_topic_is_found_only_when_valid() -> None:
    assert device_from_topic("votes/bad poll/kiosk-1") == "kiosk-1"
    assert device_from_topic("votes/poll/bad device") is None
    assert device_from_topic("other/x/y") is None


def test_output_topics() -> None:
    assert acks_topic("k1") == "acks/k1"
    assert results_topic("p1") == "polls/p1/results"
    assert shared("votes/#", "votebox") == "$share/votebox/votes/#"
    assert shared("votes/#", None) == "votes/#"
