"""The firmware reference in C (devices/c), built from source with warnings as errors: its bytes
are docs/protocol.md's and devices/encoder.py's, it never reads or writes out of bounds under
AddressSanitizer and UndefinedBehaviorSanitizer, and 50 example buttons on real Mosquitto and a
real processor get every press counted exactly once through a broker SIGKILL and buttons killed
mid-send."""

from __future__ import annotations

import ast
import asyncio
import random
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from devices.ack import AckError, read_ack
from devices.encoder import encode_batch, encode_heartbeat, encode_vote
from harness.services import ManagedProcess, mosquitto
from processor.codec import AckEntry, encode_ack
from processor.poll import Poll
from processor.poll_store import read_results
from tests.conftest import REPO, eventually, unique_id
from tests.test_protocol_doc import ACKS, HEARTBEATS, VOTES

pytestmark = pytest.mark.e2e

C = REPO / "devices" / "c"


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`make` of devices/c into a fresh folder: -Wall -Wextra -Werror -std=c99 -pedantic."""
    out = tmp_path_factory.mktemp("c-build")
    done = subprocess.run(
        ["make", "-C", str(C), f"BUILD={out}"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return out


class Tool:
    """vbtool (devices/c/tools): the library's encoder and ack reader, a command a line."""

    def __init__(self, path: Path) -> None:
        self._proc = subprocess.Popen(
            [str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    def ask(self, line: str) -> list[str]:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(line + "\n")
        self._proc.stdin.flush()
        first = self._proc.stdout.readline().strip()
        if not line.startswith("ack ") or first.startswith("error"):
            return [first]
        out = [first]
        while out[-1] != "end":
            out.append(self._proc.stdout.readline().strip())
        return out[:-1]

    def vote(self, fields: dict[int, object]) -> str:
        choice = fields[0]
        choices = ",".join(map(str, choice)) if isinstance(choice, list) else str(choice)
        voter = fields.get(3)
        args = [
            choices, str(fields[1]), str(fields.get(2, "-")), str(fields.get(4, 0)),
            voter.hex() if isinstance(voter, bytes) else "-", str(int(fields.get(5) == 1)),
            str(int(isinstance(choice, list))),
        ]  # fmt: skip
        return self.ask("vote " + " ".join(args))[0]

    def close(self) -> None:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.close()
        # Under the sanitizers a leak or a bad access would end it with an error.
        assert self._proc.wait(timeout=30) == 0
        self._proc.stdout.close()


@pytest.fixture(scope="module")
def tool(build: Path) -> Iterator[Tool]:
    t = Tool(build / "vbtool")
    yield t
    t.close()


def _hex(cell: str) -> str:
    return cell.replace(" ", "")


@pytest.mark.parametrize(("name", "value", "hex_"), VOTES, ids=[row[0] for row in VOTES])
def test_a_vote_example_of_the_protocol_is_encoded_byte_for_byte(
    tool: Tool, name: str, value: str, hex_: str
) -> None:
    literal = ast.literal_eval(value)
    if isinstance(literal, list):  # a batch: its votes, then the batch of them
        parts = [tool.vote(m) for m in literal]
        assert tool.ask("batch " + " ".join(parts))[0] == _hex(hex_)
    else:
        assert tool.vote(literal) == _hex(hex_)


@pytest.mark.parametrize(("name", "value", "hex_"), HEARTBEATS, ids=[r[0] for r in HEARTBEATS])
def test_a_heartbeat_example_is_encoded_byte_for_byte(
    tool: Tool, name: str, value: str, hex_: str
) -> None:
    fields = ast.literal_eval(value)
    said = tool.ask(f"heartbeat {fields[0]} {fields[1]} {fields.get(2, -1)}")
    assert said == [_hex(hex_)]


@pytest.mark.parametrize(("name", "value", "hex_"), ACKS, ids=[row[0] for row in ACKS])
def test_an_ack_example_is_read_as_documented(tool: Tool, name: str, value: str, hex_: str) -> None:
    expected = [
        " ".join("-" if x is None else str(x) for x in entry) for entry in ast.literal_eval(value)
    ]
    assert tool.ask(f"ack {_hex(hex_)}") == expected


def test_statuses_and_refusals(tool: Tool) -> None:
    assert tool.ask("status 1") == [b"online".hex()]
    assert tool.ask("status 0") == [b"offline".hex()]
    # An integer above 2^53 - 1, a repeated option, an empty voter: refused, never encoded.
    assert tool.vote({0: 1, 1: 2**53}) == "error -2"
    assert tool.vote({0: [1, 1], 1: 2}) == "error -2"
    assert tool.ask("vote 1 2 - 0 - 2 0") == ["error -2"]  # a receipt of 2


_UINT = st.integers(0, 2**53 - 1)
_VOTE = st.fixed_dictionaries(
    {0: st.one_of(_UINT, st.lists(_UINT, min_size=1, max_size=32, unique=True)), 1: _UINT},
    optional={2: _UINT, 3: st.binary(min_size=1, max_size=32), 4: st.integers(1, 2**53 - 1),
              5: st.just(1)},
)  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(votes=st.lists(_VOTE, min_size=1, max_size=5))
def test_generated_votes_are_the_python_encoders_bytes(tool: Tool, votes: list[dict]) -> None:  # type: ignore[type-arg]
    expected = [
        encode_vote(v[0], v[1], ts=v.get(2), voter=v.get(3), epoch=v.get(4, 0), receipt=5 in v)
        for v in votes
    ]
    got = [tool.vote(v) for v in votes]
    assert got == [e.hex() for e in expected]
    if len(votes) > 1:
        assert tool.ask("batch " + " ".join(got)) == [encode_batch(expected).hex()]


@settings(max_examples=200, deadline=None)
@given(uptime=_UINT, outbox=_UINT, battery=st.one_of(st.none(), st.integers(0, 100)))
def test_generated_heartbeats_are_the_python_encoders_bytes(
    tool: Tool, uptime: int, outbox: int, battery: int | None
) -> None:
    said = tool.ask(f"heartbeat {uptime} {outbox} {-1 if battery is None else battery}")
    assert said == [encode_heartbeat(uptime, outbox, battery).hex()]


_ACK_ENTRY = st.one_of(
    st.builds(lambda e, s, c: AckEntry(e, s, c), _UINT, _UINT, st.integers(0, 255)),
    st.builds(lambda c: AckEntry(None, None, c), st.integers(16, 40)),
    st.builds(lambda e, s, r: AckEntry(e, s, 0, r), _UINT, _UINT,
              st.tuples(st.integers(0, 9), st.integers(1, 2**40))),
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(entries=st.lists(_ACK_ENTRY, max_size=20), flips=st.lists(st.integers(0, 10**6), max_size=3))
def test_acks_read_as_the_python_reader_reads_them_and_a_broken_one_is_refused(
    tool: Tool, entries: list[AckEntry], flips: list[int]
) -> None:
    payload = bytearray(encode_ack(entries))
    c_lines = tool.ask(f"ack {payload.hex()}")
    python = read_ack(bytes(payload))
    assert c_lines == [_ack_line(e) for e in python]
    # Changed bytes: whatever the C reader accepts, the Python one reads the same way.
    for flip in flips:
        payload[flip % len(payload)] ^= 1 << (flip % 8)
    c_lines = tool.ask(f"ack {payload.hex()}")
    try:
        read = read_ack(bytes(payload))
    except AckError:
        read = None
    if not c_lines or not c_lines[0].startswith("error"):
        assert read is not None and c_lines == [_ack_line(e) for e in read]


def _ack_line(entry: tuple[int | None, int | None, int, tuple[int, int] | None]) -> str:
    epoch, seq, code, receipt = entry
    parts = ["-" if epoch is None else str(epoch), "-" if seq is None else str(seq), str(code)]
    return " ".join(parts + ([str(receipt[0]), str(receipt[1])] if receipt else []))


def test_the_sanitizers_find_nothing_in_100000_acks_and_20000_steps_with_power_cuts(
    build: Path,
) -> None:
    seed = random.randrange(2**32)
    done = subprocess.run(
        [str(build / "vbfuzz"), str(seed), "100000", "20000"],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0 and done.stdout.startswith("ok "), (
        f"seed {seed}: {done.stdout[-2000:]}{done.stderr[-4000:]}"
    )
    counts = dict(part.split("=") for part in done.stdout.split()[1:])
    # It did what it says: cuts happened, votes were pressed, sent and settled.
    assert int(counts["cuts"]) > 0 and int(counts["settled"]) > 0 and int(counts["sent"]) > 0


# ---- The outbox, step by step (vbtool's outbox over a flash in memory) ----------------------


def _sent(tool: Tool, now_ms: int) -> list[list[dict[int, object]]]:
    """Every message due at now_ms, each as its list of votes."""
    out = []
    while (said := tool.ask(f"next {now_ms}")[0]) != "none":
        payload = cbor2.loads(bytes.fromhex(said.split()[1]))
        out.append(payload if isinstance(payload, list) else [payload])
    return out


@pytest.fixture
def outbox(tool: Tool) -> Tool:
    assert tool.ask("wipe") == ["ok"]
    return tool


def test_a_seq_survives_a_reboot_and_a_lost_store_is_a_new_epoch(outbox: Tool) -> None:
    assert outbox.ask("open 8 1000") == ["loaded 0 epoch 1000 next 1"]
    assert [outbox.ask(f"press p {o}")[0] for o in (0, 1)] == ["stored 1000 1", "stored 1000 2"]
    assert outbox.ask(f"settle {encode_ack([AckEntry(1000, 2, 0)]).hex()} 5") == ["left 1"]
    # A reboot: the vote still stored loads, and the next press takes seq 3, not 2 or 1.
    assert outbox.ask("open 8 5000") == ["loaded 1 epoch 1000 next 3"]
    assert outbox.ask("press p 2") == ["stored 1000 3"]
    # The flash wiped: a new store, whose epoch is the one given, seqs from 1 again.
    assert outbox.ask("wipe") == ["ok"]
    assert outbox.ask("open 8 5000") == ["loaded 0 epoch 5000 next 1"]
    assert outbox.ask("press p 0") == ["stored 5000 1"]


def test_a_vote_goes_again_only_after_30_s_or_a_reconnect(outbox: Tool) -> None:
    outbox.ask("open 8 1000")
    outbox.ask("press p 1")
    assert [[v[1] for v in m] for m in _sent(outbox, 0)] == [[1]]
    assert _sent(outbox, 29_999) == []
    assert [[v[1] for v in m] for m in _sent(outbox, 30_000)] == [[1]]
    outbox.ask("reconnect")
    assert [[v[1] for v in m] for m in _sent(outbox, 30_001)] == [[1]]
    # Answered: it leaves, and nothing goes again.
    assert outbox.ask(f"settle {encode_ack([AckEntry(1000, 1, 0)]).hex()} 30002") == ["left 1"]
    outbox.ask("reconnect")
    assert _sent(outbox, 90_000) == [] and outbox.ask("depth") == ["0"]


def test_a_backlog_goes_in_batches_of_64_per_poll_oldest_first(outbox: Tool) -> None:
    outbox.ask("open 200 1000")
    for n in range(150):
        outbox.ask(f"press {'a' if n < 100 else 'b'} {n % 3}")
    messages = _sent(outbox, 0)
    assert [len(m) for m in messages] == [64, 36, 50]
    assert [v[1] for m in messages for v in m] == list(range(1, 151))


def test_no_vote_goes_4096_or_more_above_the_oldest_unanswered(outbox: Tool) -> None:
    outbox.ask("open 4200 1000")
    for _ in range(4100):
        outbox.ask("press p 0")
    seqs = [v[1] for m in _sent(outbox, 0) for v in m]
    assert seqs == list(range(1, 4097))  # rule 5: seq 4097 waits for seq 1's answer
    assert outbox.ask(f"settle {encode_ack([AckEntry(1000, 1, 0)]).hex()} 1") == ["left 1"]
    assert [v[1] for m in _sent(outbox, 2) for v in m] == [4097]


def test_stale_epoch_moves_the_votes_to_a_higher_epoch_and_keeps_them(outbox: Tool) -> None:
    outbox.ask("open 8 1000")
    outbox.ask("press p 1")
    outbox.ask("press p 2")
    stale = encode_ack([AckEntry(1000, 1, 27)]).hex()
    assert outbox.ask(f"settle {stale} 0") == ["left 0"]  # kept, not settled
    assert outbox.ask("open 8 0") == ["loaded 2 epoch 1001 next 2"]  # moved, and stored so
    # The other vote of the old epoch moves into the current one, no higher.
    assert outbox.ask(f"settle {encode_ack([AckEntry(1000, 2, 27)]).hex()} 0") == ["left 0"]
    votes = sorted((v[4], v[1], v[0]) for m in _sent(outbox, 0) for v in m)
    assert votes == [(1001, 1, 1), (1001, 2, 2)]


def test_rate_limited_pauses_then_everything_goes_again(outbox: Tool) -> None:
    outbox.ask("open 8 1000")
    outbox.ask("press p 1")
    assert len(_sent(outbox, 0)) == 1
    limited = encode_ack([AckEntry(None, None, 33)]).hex()
    assert outbox.ask(f"settle {limited} 10") == ["left 0"]
    assert _sent(outbox, 1009) == []  # at least 1 s
    assert len(_sent(outbox, 3011)) == 1  # at most 3 s


def test_a_full_outbox_refuses_a_press_and_an_unreadable_ack_changes_nothing(
    outbox: Tool,
) -> None:
    outbox.ask("open 2 1000")
    assert outbox.ask("press p 0")[0].startswith("stored")
    assert outbox.ask("press p 0")[0].startswith("stored")
    assert outbox.ask("press p 0") == ["error -4"]
    assert outbox.ask("settle 8183 0") == ["error -3"]
    assert outbox.ask("depth") == ["2"]


# ---- Fifty buttons on real Mosquitto and a real processor ---------------------------------


class Button:
    """The example button (devices/c/example), its store a file, its output a file."""

    def __init__(self, build: Path, folder: Path, device: str, poll: str, port: int) -> None:
        self.device, self.store, self.out = device, folder / f"{device}.flash", folder / device
        self.argv = [
            str(build / "button"), "--device", device, "--poll", poll, "--store",
            str(self.store), "--port", str(port), "--heartbeat-s", "5", "--receipt",
        ]  # fmt: skip
        self.proc: subprocess.Popen[str] | None = None
        self.runs = 0

    def start(self, *, presses: bool) -> None:
        self.runs += 1
        with (self.out.parent / f"{self.device}.{self.runs}.log").open("w") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.PIPE if presses else subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
            )

    def press(self, options: list[int]) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write("".join(f"{o}\n" for o in options))
        self.proc.stdin.flush()

    def lines(self, kind: str) -> list[str]:
        return [
            line
            for run in range(1, self.runs + 1)
            for line in (self.out.parent / f"{self.device}.{run}.log").read_text().splitlines()
            if line == kind or line.startswith(kind + " ")
        ]

    def sent_since_reconnect(self) -> bool:
        """Whether it sent something on its latest connection (not yet answered, if the
        processor is stopped)."""
        log = (self.out.parent / f"{self.device}.{self.runs}.log").read_text().splitlines()
        connects = [i for i, line in enumerate(log) if line == "connected"]
        return len(connects) > 1 and any(line.startswith("sent ") for line in log[connects[-1] :])

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        if self.proc.stdin is not None:
            self.proc.stdin.close()

    def done_pressing(self) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.close()  # it goes on until its outbox is empty, then exits

    def outbox(self, build: Path) -> int:
        said = subprocess.run(
            [str(build / "button"), "--store", str(self.store), "--slots", "64",
             "--print-outbox"],
            capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
        return int(said.stdout)


@pytest.mark.timeout(600)
async def test_fifty_buttons_count_every_press_once_through_a_broker_sigkill_and_killed_buttons(
    build: Path,
    redis: Redis,
    poll: Poll,
    spawn_processor: Callable[..., ManagedProcess],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    presses = 20
    with mosquitto(tmp_path / "broker") as broker:
        processor = spawn_processor(broker)
        prefix = unique_id(request)[-12:]
        buttons = [
            Button(build, tmp_path, f"{prefix}-b{n:02d}", poll.id, broker.port) for n in range(50)
        ]
        try:
            for b in buttons:
                b.start(presses=True)
                b.press([n % 3 for n in range(presses // 2)])
            # Some votes counted, then the broker dies with the rest in flight.
            await eventually(lambda: sum(len(b.lines("settled")) for b in buttons) >= 100)
            broker.kill()
            for b in buttons:  # pressed while the broker is down: stored, waiting
                b.press([n % 3 for n in range(presses // 2)])
            await eventually(
                lambda: all(len(b.lines("stored")) == presses for b in buttons), timeout_s=60
            )
            # The processor stopped, so that what the buttons send now waits unanswered.
            processor.signal(signal.SIGSTOP)
            try:
                broker.start()
                # Ten buttons killed with votes sent and no answer yet, and started again.
                victims = buttons[:10]
                await eventually(lambda: all(b.sent_since_reconnect() for b in victims))
                for b in victims:
                    b.kill()
                for b in victims:
                    b.start(presses=False)
            finally:
                processor.signal(signal.SIGCONT)
            for b in buttons[10:]:
                b.done_pressing()
            for b in buttons:
                assert b.proc is not None
                await asyncio.to_thread(b.proc.wait, 180)
        finally:
            for b in buttons:
                if b.proc is not None and b.proc.poll() is None:
                    b.kill()
    # Every outbox empty, every press counted once.
    assert [b.outbox(build) for b in buttons] == [0] * 50
    results = (await read_results(redis, [poll.id]))[poll.id]
    assert results.total == 50 * presses
    assert sum(results.counts) == 50 * presses
    # Each accepted vote asked for its receipt, and each got one.
    for b in buttons:
        accepted = [line for line in b.lines("settled") if line.endswith(" 0")]
        assert len(b.lines("receipt")) == len(accepted)
