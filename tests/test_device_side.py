"""The device side without a broker: the outbox, the ack reader, heartbeats, batching, the
kiosk's screen and `votebox devices`' table."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.ack import CODE_NAMES, AckError, code_name, decode_ack
from devices.client import SEQ_WINDOW, DeviceClient, DeviceConfig, _batches, _inside_window
from devices.encoder import encode_heartbeat, encode_vote, vote_again
from devices.kiosk import parse_choice, render_config
from devices.outbox import Outbox, Pending
from devices.simulator import ResultsSnapshot, SimulationSummary
from processor.codec import MAX_PAYLOAD_BYTES, Heartbeat, decode_heartbeat, decode_message
from processor.commands.devices import DeviceHealth, format_devices
from processor.errors import VoteRejected
from processor.reasons import Fate, Reason
from processor.tally import DEDUP_WINDOW


def test_outbox_gives_increasing_seqs_and_keeps_them_across_a_reopen(tmp_path: Path) -> None:
    store = tmp_path / "d.outbox"
    outbox = Outbox(store, clock=lambda: 1_800_000_000)
    first = [outbox.add("p", i % 3, ts=100 + i) for i in range(5)]
    assert [e.seq for e in first] == [1, 2, 3, 4, 5]
    assert {e.epoch for e in first} == {1_800_000_000}
    assert outbox.settle(first[1].epoch, 2, 0) == first[1]
    assert outbox.settle(first[1].epoch, 2, 0) is None  # a repeated ack settles nothing
    outbox.close()

    again = Outbox(store, clock=lambda: 1_900_000_000)  # a later boot: same store, same epoch
    assert again.epoch == 1_800_000_000 and again.last_seq == 5
    assert [e.seq for e in again.pending()] == [1, 3, 4, 5]
    assert again.pending()[0].payload == first[0].payload
    assert again.add("p", 1).seq == 6  # never 2 again, though 2 left the outbox
    assert again.fates() == {0: 1}
    again.close()


def test_a_lost_store_starts_a_higher_epoch(tmp_path: Path) -> None:
    store = tmp_path / "d.outbox"
    old = Outbox(store, clock=lambda: 1_800_000_000)
    old.add("p", 0)
    old.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{store}{suffix}").unlink(missing_ok=True)
    new = Outbox(store, clock=lambda: 1_800_000_500)
    vote = new.add("p", 0)
    assert (vote.epoch, vote.seq) == (1_800_000_500, 1)
    # The processor reads exactly the epoch and seq the outbox gave (docs/protocol.md, key 4).
    decoded = decode_message(vote.payload, poll="p", device="d")[0]
    assert not isinstance(decoded, VoteRejected)
    assert (decoded.epoch, decoded.seq) == (1_800_000_500, 1)
    new.close()


_PRESS_FOREVER = """
import sys
from pathlib import Path
from devices.outbox import Outbox
outbox = Outbox(Path(sys.argv[1]))
print("open", flush=True)
while True:
    outbox.add("p", 1)
"""


def test_a_kill_during_presses_leaves_every_seq_stored_once(tmp_path: Path) -> None:
    store = tmp_path / "d.outbox"
    for round_ in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-c", _PRESS_FOREVER, str(store)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).parent.parent,
        )
        assert proc.stdout is not None and proc.stdout.readline() == "open\n"
        time.sleep(0.2 + 0.1 * round_)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        outbox = Outbox(store)
        seqs = [e.seq for e in outbox.pending()]
        # Whenever the kill came, the seq counter and the stored votes agree: no gap (a vote
        # lost) and no seq without its vote (one that a restart would hand out again).
        assert seqs == list(range(1, outbox.last_seq + 1))
        assert outbox.last_seq > 0
        outbox.close()


acks = st.lists(
    st.tuples(
        st.one_of(st.none(), st.integers(0, 2**53 - 1)),
        st.one_of(st.none(), st.integers(0, 2**53 - 1)),
        st.integers(0, 255),
    ),
    max_size=300,
)


@given(acks)
def test_the_minimal_ack_reader_reads_what_the_processor_writes(entries: list[Any]) -> None:
    payload = cbor2.dumps([list(e) for e in entries])
    assert decode_ack(payload) == entries


@given(st.binary(max_size=64))
@settings(max_examples=500)
def test_the_ack_reader_refuses_garbage_with_one_error(payload: bytes) -> None:
    try:
        entries = decode_ack(payload)
    except AckError:
        return
    assert cbor2.loads(payload) == [list(e) for e in entries]


@given(
    st.integers(0, 2**32),
    st.integers(0, 10_000),
    st.one_of(st.none(), st.integers(0, 100)),
)
def test_heartbeats_encode_as_cbor2_does_and_decode_back(
    uptime: int, outbox: int, battery: int | None
) -> None:
    fields = {0: uptime, 1: outbox} | ({} if battery is None else {2: battery})
    payload = encode_heartbeat(uptime, outbox, battery)
    assert payload == cbor2.dumps(fields)
    assert decode_heartbeat(payload) == Heartbeat(uptime, outbox, battery)


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ([1, 2], Reason.BAD_SCHEMA),
        ({0: 5}, Reason.BAD_SCHEMA),
        ({0: 5, 1: 0, 2: 101}, Reason.OUT_OF_RANGE),
        ({0: 5, 1: 0, 7: 1}, Reason.BAD_SCHEMA),
        ({0: -1, 1: 0}, Reason.BAD_SCHEMA),
        ({0: 1.5, 1: 0}, Reason.FORBIDDEN_ITEM),
        ({0: 1, 1: "x" * 80}, Reason.TOO_LARGE),
    ],
)
def test_a_bad_heartbeat_is_refused_with_a_reason(fields: object, reason: Reason) -> None:
    with pytest.raises(VoteRejected) as caught:
        decode_heartbeat(cbor2.dumps(fields))
    assert caught.value.reason is reason


def _pending(poll: str, seq: int, choice: int | list[int] = 1) -> Pending:
    return Pending(7, seq, poll, encode_vote(choice, seq, ts=1_800_000_000, epoch=7))


def test_batches_keep_order_stay_in_one_poll_and_fit_the_payload_limit() -> None:
    entries = [_pending("a", s) for s in range(1, 301)] + [_pending("b", 301)]
    entries += [_pending("a", s, list(range(32))) for s in range(302, 502)]
    batches = list(_batches(entries, 64))
    flat = [e for _, group in batches for e in group]
    assert flat == entries
    for poll, group in batches:
        assert {e.poll for e in group} == {poll}
        assert len(group) <= 64
        payload = cbor2.dumps([cbor2.loads(e.payload) for e in group])
        assert len(payload) <= MAX_PAYLOAD_BYTES
        assert len(decode_message(payload, poll=poll, device="d")) == len(group)
    # Large votes (32 choices each) fill a message before the count does.
    assert any(len(group) < 64 for poll, group in batches if poll == "a" and len(group) > 1)


def test_the_kiosk_screen_and_what_it_accepts() -> None:
    single: dict[str, Any] = {"poll": "p", "title": "Snack?", "state": "open", "type": "single"}
    single["labels"] = ["Pretzels", "Nachos"]
    screen = render_config(single)
    assert "Snack?" in screen and "1) Pretzels" in screen and "2) Nachos" in screen
    assert parse_choice("2", single) == 1
    for bad in ("3", "0", "x", "1,2", ""):
        with pytest.raises(ValueError):
            parse_choice(bad, single)
    multiple = single | {"type": "multiple", "max_choices": 2}
    assert parse_choice("2, 1", multiple) == [0, 1]
    rating = {"title": "How was it?", "type": "rating", "scale": [1, 5], "labels": list("12345")}
    assert "from 1 to 5" in render_config(rating)
    assert parse_choice("5", rating) == 5
    with pytest.raises(ValueError):
        parse_choice("6", rating)
    assert "waiting" in render_config(None)
    assert code_name(0) == "accepted" and code_name(33) == "rate_limited"
    assert code_name(99) == "code 99"


def test_the_devices_table_shows_state_outbox_and_battery() -> None:
    now = 1_800_000_000_000
    devices = [
        DeviceHealth("kiosk-1", "online", now - 3_000, 120, 4, 87, now - 3_000, "North"),
        DeviceHealth("button-9", "offline", now - 600_000, None, None, None, None),
    ]
    table = format_devices(devices, now_ms=now).splitlines()
    head = ["DEVICE", "SITE", "STATE", "LAST", "SEEN", "UPTIME", "OUTBOX", "BATTERY"]
    assert table[0].split() == head
    assert table[1].split() == ["kiosk-1", "North", "online", "3s", "ago", "120s", "4", "87%"]
    assert table[2].split() == ["button-9", "-", "offline", "10m", "ago", "-", "-", "-"]
    assert table[3] == "2 devices: 1 offline, 1 online"


def test_the_summary_disagrees_when_the_results_or_redis_are_off_by_one_vote() -> None:
    summary = SimulationSummary(sent=3)
    summary.fates.update(accepted=2, duplicate=1)
    summary.counted_per_option.update({0: 2, 1: 1})
    summary.results_before = ResultsSnapshot(10, (5, 5))
    summary.results_after = ResultsSnapshot(13, (7, 6))
    summary.redis_before, summary.redis_after = (
        ResultsSnapshot(10, (5, 5)),
        ResultsSnapshot(13, (7, 6)),
    )
    assert summary.agrees()
    assert summary.lines()[-1] == "redis: total 10 -> 13 (+3); counted 3: agrees"
    summary.redis_after = ResultsSnapshot(13, (8, 5))  # right total, wrong option
    assert not summary.agrees()
    assert summary.lines()[-1].endswith("DISAGREES") and "agrees" in summary.lines()[-2]
    summary.redis_after = None  # not read: the results topic alone decides
    assert summary.agrees()
    summary.results_after = ResultsSnapshot(12, (7, 5))
    assert not summary.agrees()


def test_the_devices_code_table_is_the_processors() -> None:
    # devices/ keeps its own copy, as firmware would; it must say what the processor means.
    expected = {int(f): f.name.lower() for f in Fate} | {int(r): r.code for r in Reason}
    assert expected == CODE_NAMES


def test_reconnect_delays_grow_with_full_jitter_up_to_the_cap(tmp_path: Path) -> None:
    config = DeviceConfig(device="k", backoff_base_s=1.0, backoff_cap_s=8.0)
    client = DeviceClient(config, Outbox(tmp_path / "k.outbox"), rng=random.Random(7))
    delays = [client._next_delay() for _ in range(60)]
    assert all(0 <= d <= min(8.0, 2.0**i) for i, d in enumerate(delays))
    assert max(delays[:3]) < 4 and max(delays[10:]) > 6  # grows, up to the cap
    assert len(set(delays)) == len(delays)  # jittered: no two clients in lockstep
    client.outbox.close()


def test_the_window_equals_the_processors_and_holds_back_what_is_too_far_above() -> None:
    assert SEQ_WINDOW == DEDUP_WINDOW
    pending = [Pending(0, seq, "p", b"") for seq in (5, 6, 4100, 4101)] + [
        Pending(1, seq, "p", b"") for seq in (1, 5000)
    ]
    # Epoch 0: 4101 - 5 = 4096 is one too far; epoch 1 has its own oldest (1).
    assert [(p.epoch, p.seq) for p in _inside_window(pending)] == [
        (0, 5),
        (0, 6),
        (0, 4100),
        (1, 1),
    ]


@given(
    choice=st.integers(0, 2**32) | st.lists(st.integers(0, 300), min_size=1, max_size=8),
    seq=st.integers(0, 2**63),
    ts=st.none() | st.integers(0, 2**40),
    voter=st.none() | st.binary(min_size=1, max_size=32),
    epoch=st.integers(0, 2**40),
    again=st.tuples(st.integers(1, 2**63), st.integers(1, 2**40)),
)
def test_a_vote_stored_again_is_the_same_vote_under_its_new_seq_and_epoch(
    choice: int | list[int],
    seq: int,
    ts: int | None,
    voter: bytes | None,
    epoch: int,
    again: tuple[int, int],
) -> None:
    before = encode_vote(choice, seq, ts=ts, voter=voter, epoch=epoch)
    new_seq, new_epoch = again
    assert vote_again(before, new_seq, new_epoch) == encode_vote(
        choice, new_seq, ts=ts, voter=voter, epoch=new_epoch
    )


def test_votes_stored_again_take_a_higher_epoch_and_never_repeat_a_seq(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "o.sqlite", clock=lambda: 1000)
    first = [outbox.add("p", i) for i in range(3)]
    moved = outbox.store_again(first[:2], higher=True)  # steps: +1 s
    assert [(p.epoch, p.seq) for p in moved] == [(1001, 1), (1001, 2)]
    later = outbox.add("p", 2)
    assert (later.epoch, later.seq) == (1001, 3)
    moved_again = outbox.store_again([first[2]], higher=False)  # into the current epoch
    assert [(p.epoch, p.seq) for p in moved_again] == [(1001, 4)]
    assert [(p.epoch, p.seq) for p in outbox.store_again([later], higher=True)] == [(1003, 1)]
    reopened = Outbox(tmp_path / "o.sqlite", clock=lambda: 1000)
    assert (reopened.epoch, reopened.last_seq) == (1003, 1)
    assert sorted((p.epoch, p.seq) for p in reopened.pending()) == [
        (1001, 1), (1001, 2), (1001, 4), (1003, 1),
    ]  # fmt: skip
