from __future__ import annotations

import pytest

from broker.acl import ROLES
from processor.errors import VoteRejected
from processor.reasons import Reason
from processor.topics import (
    NON_DEVICE_ACCOUNTS,
    acks_topic,
    device_from_topic,
    is_device_id,
    parse_device_topic,
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


@pytest.mark.parametrize("device", ["processor", "dashboard", "votebox-processor", "votebox-x"])
def test_no_account_of_votebox_own_is_a_device_on_any_device_topic(device: str) -> None:
    assert not is_device_id(device)
    with pytest.raises(VoteRejected) as caught:
        parse_vote_topic(f"votes/p/{device}")
    assert caught.value.reason is Reason.BAD_TOPIC
    assert device_from_topic(f"votes/p/{device}") is None  # no ack: no device to answer
    assert parse_device_topic(f"devices/{device}/status") is None
    assert parse_device_topic(f"devices/{device}/heartbeat") is None


def test_every_role_but_device_names_an_account_that_is_not_a_device() -> None:
    assert {role for role in ROLES if role != "device"} == NON_DEVICE_ACCOUNTS
    assert is_device_id("processor-7") and is_device_id("my-dashboard")


def test_output_topics() -> None:
    assert acks_topic("k1") == "acks/k1"
    assert results_topic("p1") == "polls/p1/results"
    assert shared("votes/#", "votebox") == "$share/votebox/votes/#"
    assert shared("votes/#", None) == "votes/#"
