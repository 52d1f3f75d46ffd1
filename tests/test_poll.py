"""The poll field table: each field's TOML, Redis, config and flag forms follow from one row."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from processor.errors import ConfigError
from processor.poll import POLL_FIELDS, Poll, PollType

REPO = Path(__file__).resolve().parents[1]

# Every field away from its default, across the four types.
POLLS = [
    Poll(
        id="final",
        labels=("Ada", "Grace"),
        title="Who?",
        opens_ms=1_000,
        closes_ms=2_000,
        grace_s=7,
        one_per_voter=True,
        cooldown_s=3,
        hide_results_until_close=True,
    ),
    Poll(id="snacks", labels=("a", "b", "c"), type=PollType.MULTIPLE, max_choices=2),
    Poll(id="stars", type=PollType.RATING, scale=(1, 5)),
    Poll(id="nps", type=PollType.NPS),
]


@pytest.mark.parametrize("poll", POLLS, ids=lambda p: p.id)
def test_a_poll_comes_back_whole_from_its_redis_hash(poll: Poll) -> None:
    stored = {key: str(value) for key, value in poll.to_hash().items()}
    assert Poll.from_hash(poll.id, stored) == poll


@pytest.mark.parametrize("poll", POLLS, ids=lambda p: p.id)
def test_a_poll_comes_back_whole_from_its_toml_keys(poll: Poll) -> None:
    spec = {f.key: getattr(poll, f.name) for f in POLL_FIELDS}
    spec["opens_at"], spec["closes_at"] = poll.opens_ms / 1000, poll.closes_ms / 1000
    spec["type"] = str(poll.type)
    assert Poll.from_mapping(poll.id, spec) == poll


def test_a_key_not_in_the_table_is_refused_with_the_known_ones_listed() -> None:
    with pytest.raises(ConfigError, match=r"poll p: unknown key\(s\) \['colour'\]; known: "):
        Poll.from_mapping("p", {"options": ["a", "b"], "colour": "red"})


def test_a_bad_type_is_refused_naming_the_poll_and_the_types() -> None:
    with pytest.raises(ConfigError, match=r"^poll p: type must be one of \['single'"):
        Poll.from_mapping("p", {"options": ["a", "b"], "type": "ranked"})


def test_the_config_kiosks_read_has_the_published_fields_and_the_state() -> None:
    config = POLLS[1].config(now_ms=0)
    assert config == {
        "poll": "snacks",
        "state": "open",
        "title": "",
        "type": "multiple",
        "labels": ["a", "b", "c"],
        "max_choices": 2,
        "opens_at": None,
        "closes_at": None,
        "one_per_voter": False,
        "cooldown_s": 0,
    }
    assert POLLS[2].config(now_ms=0)["scale"] == [1, 5]
    assert "max_choices" not in POLLS[2].config(now_ms=0)


def test_every_definition_field_the_tally_script_reads_is_one_the_store_writes() -> None:
    lua = (REPO / "processor" / "tally.lua").read_text()
    read = re.search(r"local def = redis\.call\('HMGET', KEYS\[1\],(.*?)\)", lua, re.S)
    assert read is not None
    names = set(re.findall(r"'(\w+)'", read.group(1)))
    written = set(POLLS[0].to_hash()) | {"created_ms"}  # created_ms: by create_poll
    assert names and names <= written, names - written


def test_docs_polls_md_names_every_key_of_a_poll_table() -> None:
    doc = (REPO / "docs" / "polls.md").read_text()
    missing = [f.key for f in POLL_FIELDS if f"`{f.key}`" not in doc]
    assert not missing
