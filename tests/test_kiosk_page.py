"""The touch kiosk page (dashboard/kiosk.html) in headless Chromium, a device in a browser:
its CBOR is byte for byte the protocol's, and its presses are counted exactly once through a
network cut (DevTools' offline emulation) and a page reload with votes still stored, against a
real Mosquitto, processor and Redis. Screenshots in test-artifacts/."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import itertools
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import aiomqtt
import cbor2
import pytest
from redis.asyncio import Redis
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from broker.accounts import AccountStore
from devices.encoder import encode_vote
from harness.services import HOST, ManagedProcess
from processor.codec import AckEntry, encode_ack
from processor.commands.dashboard import serve_dashboard
from processor.keys import PollKeys
from processor.poll_store import read_results
from processor.store import redis_text
from tests.conftest import unique_id
from tests.test_cli import poll_cli
from tests.test_dashboard import ARTIFACTS, wait_for
from tests.test_protocol_doc import VOTES
from tests.test_security import make_certs, production_mosquitto

pytestmark = pytest.mark.e2e


def test_the_page_encodes_votes_and_reads_acks_as_the_protocol_says(
    mosquitto_proc: ManagedProcess, browser: WebDriver
) -> None:
    cases: list[tuple[int | list[int], int, int | None, int]] = [
        (2, 7, None, 0),
        (63, 2**32 - 1, 1_764_000_000, 3),
        (0, 23, None, 0),
        (1, 24, 1_764_000_000, 1_764_000_000),
        ([1, 4], 255, 1, 0),
        (3, 2**53 - 1, 2**32, 2**40),
    ]
    acks = [AckEntry(1_764_000_000, 17, 0), AckEntry(None, None, 33), AckEntry(3, 2**40, 31),
            AckEntry(0, 18, 0, (2, 70_000))]  # fmt: skip
    with serve_dashboard(port=0, ws_url=mosquitto_proc.ws_url) as url:
        browser.get(url + "kiosk.html")  # no device in the fragment: it says how to open it
        encoded = browser.execute_script(
            "return arguments[0].map(([c, s, t, e]) =>"
            " Array.from(window.voteboxKiosk.encodeVote(c, s, t, e, s % 2 === 1)));",
            [list(case) for case in cases],
        )
        decoded = browser.execute_script(
            "return window.voteboxKiosk.decodeAck(new Uint8Array(arguments[0]));",
            list(encode_ack(acks)),
        )
        # docs/protocol.md's vote examples a kiosk sends (one vote, no voter token).
        examples = [
            (literal, bytes.fromhex(hex_.replace(" ", "")))
            for _, value, hex_ in VOTES
            if isinstance(literal := ast.literal_eval(value), dict) and 3 not in literal
        ]
        assert len(examples) >= 3
        documented = browser.execute_script(
            "return arguments[0].map(([c, s, t, e, r]) =>"
            " Array.from(window.voteboxKiosk.encodeVote(c, s, t, e, r)));",
            [[m[0], m[1], m.get(2), m.get(4, 0), 5 in m] for m, _ in examples],
        )
        said = browser.find_element(By.ID, "question").text
        # Rule 6: full jitter under a ceiling that doubles from 1 s to 60 s.
        delays = browser.execute_script(
            "const k = window.voteboxKiosk; return [0, 1, 2, 5, 6, 7, 30].map((n) =>"
            " [k.reconnectDelayMs(n, () => 0), k.reconnectDelayMs(n, () => 0.999999)]);"
        )
        # Rule 4: batches of one poll, at most 64 votes and 4096 bytes; a batch is an array.
        batches = browser.execute_script(
            "const k = window.voteboxKiosk;"
            "const vote = (poll, seq, n) => ({poll, seq, payload: new Array(n).fill(0)});"
            "const votes = [...Array(70).keys()].map((i) => vote('a', i, 10))"
            "  .concat([vote('b', 70, 10)], [...Array(3).keys()].map((i) => vote('c', i, 2000)));"
            "return [k.batchesOf(votes).map((g) => g.length),"
            "        Array.from(k.messageOf([vote('a', 1, 2), vote('a', 2, 2)]))];"
        )
    assert delays == [[0, 999], [0, 1999], [0, 3999], [0, 31999], [0, 59999], [0, 59999],
                      [0, 59999]]  # fmt: skip
    assert batches == [[64, 6, 1, 2, 1], [0x82, 0, 0, 0, 0]]
    for (choice, seq, ts, epoch), got in zip(cases, encoded, strict=True):
        expected = encode_vote(choice, seq, ts=ts, epoch=epoch, receipt=seq % 2 == 1)
        assert bytes(got) == expected, (choice, seq, ts)
    assert [bytes(got) for got in documented] == [expected for _, expected in examples]
    assert [tuple(entry) for entry in decoded] == [(*a[:3], *(a.receipt or ())) for a in acks]
    assert "kiosk.html#device=" in said


def _pending(browser: WebDriver) -> str:
    return str(browser.find_element(By.ID, "pending").text)


def _press(browser: WebDriver, option: int) -> None:
    # The buttons are drawn again when a config arrives (the kept one, then the broker's).
    def pressed(d: WebDriver) -> bool:
        d.find_element(By.CSS_SELECTOR, f'.choice[data-option="{option}"]').click()
        return True

    WebDriverWait(browser, 10, ignored_exceptions=[StaleElementReferenceException]).until(pressed)


def _network(browser: WebDriver, *, offline: bool) -> None:
    # DevTools' network emulation: offline cuts the page's connections, WebSockets too.
    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd(
        "Network.emulateNetworkConditions",
        {"offline": offline, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1},
    )


async def test_presses_count_once_through_a_network_cut_and_a_reload(
    mosquitto_proc: ManagedProcess,
    spawn_processor: Callable[..., ManagedProcess],
    redis_proc: ManagedProcess,
    redis: Redis,
    browser: WebDriver,
    request: pytest.FixtureRequest,
) -> None:
    spawn_processor(mosquitto_proc)
    poll_id = unique_id(request)
    device = f"{poll_id[:40]}-tab"
    poll_cli(redis_proc, "poll", "create", poll_id, "--title", "Lunch?",
             "--option", "Soup", "--option", "Salad")  # fmt: skip
    with serve_dashboard(port=0, ws_url=mosquitto_proc.ws_url) as url:
        page = f"{url}kiosk.html#device={device}&poll={poll_id}"
        browser.get(page)
        wait_for(browser, "#connection", "data-state", "connected")
        WebDriverWait(browser, 20).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".choice"))
        assert browser.find_element(By.ID, "question").text == "Lunch?"
        for option in (0, 0, 1, 0, 1):
            _press(browser, option)
        WebDriverWait(browser, 30).until(lambda d: _pending(d) == "0")
        wait_for(browser, "#answer", "data-code", "0")
        assert browser.find_element(By.ID, "answer").text == "Thank you, your vote counts!"
        results = (await read_results(redis, [poll_id]))[poll_id]
        assert results.counts == (3, 2) and results.chain[0][0] == 5
        # Each vote asked for its receipt: the last answered is one of the chain's 5 entries.
        shown = browser.find_element(By.ID, "receipt").text
        assert re.fullmatch(rf"Receipt {poll_id}-0-[1-5]", shown), shown

        # The network goes: presses are stored, not lost.
        _network(browser, offline=True)
        WebDriverWait(browser, 30).until(
            lambda d: d.find_element(By.ID, "connection").get_attribute("data-state") != "connected"
        )
        for option in (1, 1, 0, 1):
            _press(browser, option)
        WebDriverWait(browser, 10).until(lambda d: _pending(d) == "4")
        ARTIFACTS.mkdir(exist_ok=True)
        assert browser.save_screenshot(str(ARTIFACTS / "kiosk-offline.png"))
        # The page is reloaded while the broker is still out of reach (stopped: its port takes
        # the connection and answers nothing): the votes wait in IndexedDB, then go out once
        # it is back, each counted once.
        mosquitto_proc.signal(signal.SIGSTOP)
        try:
            _network(browser, offline=False)
            browser.refresh()  # a reload: the page starts again from its IndexedDB
            WebDriverWait(browser, 10).until(lambda d: _pending(d) == "4")
            # Reloaded offline, it still shows the poll it kept, takes a vote and says so.
            assert browser.find_element(By.ID, "question").text == "Lunch?"
            _press(browser, 0)
            WebDriverWait(browser, 10).until(lambda d: _pending(d) == "5")
            wait_for(browser, "#answer", "data-code", "saved")
            assert "saved and will be sent" in browser.find_element(By.ID, "answer").text
            assert browser.find_element(By.ID, "connection").get_attribute("data-state") != (
                "connected"
            )
        finally:
            mosquitto_proc.signal(signal.SIGCONT)
        assert (await read_results(redis, [poll_id]))[poll_id].total == 5
        wait_for(browser, "#connection", "data-state", "connected", timeout_s=60)
        WebDriverWait(browser, 30).until(lambda d: _pending(d) == "0")
        assert browser.save_screenshot(str(ARTIFACTS / "kiosk-thank-you.png"))
    results = (await read_results(redis, [poll_id]))[poll_id]
    assert results.counts == (5, 5) and results.total == 10


async def test_the_voter_is_told_of_the_cooldown_and_of_a_closed_poll(
    broker: ManagedProcess,
    spawn_processor: Callable[..., ManagedProcess],
    redis_proc: ManagedProcess,
    redis: Redis,
    browser: WebDriver,
    request: pytest.FixtureRequest,
) -> None:
    spawn_processor(broker)
    poll_id = unique_id(request)
    device = f"{poll_id[:40]}-tab"
    poll_cli(redis_proc, "poll", "create", poll_id, "--type", "rating", "--scale", "1-5",
             "--cooldown-s", "600", "--title", "How was it?")  # fmt: skip
    with serve_dashboard(port=0, ws_url=broker.ws_url) as url:
        browser.get(f"{url}kiosk.html#device={device}&poll={poll_id}")
        wait_for(browser, "#connection", "data-state", "connected")
        WebDriverWait(browser, 20).until(
            lambda d: len(d.find_elements(By.CSS_SELECTOR, ".choice")) == 5
        )
        _press(browser, 4)  # the value 5
        wait_for(browser, "#answer", "data-code", "0")
        _press(browser, 0)  # again within the cooldown
        wait_for(browser, "#answer", "data-code", "4")
        assert "voted a moment ago" in browser.find_element(By.ID, "answer").text
        poll_cli(redis_proc, "poll", "close", poll_id)
        wait_for(browser, "#options", "data-state", "closed")

        def closed_is_said(d: WebDriver) -> bool:
            # A vote dated (in whole seconds) before the close still counts within the grace
            # period (docs/protocol.md, Windows), here as suppressed: press until past it.
            if d.find_element(By.ID, "answer").get_attribute("data-code") == "31":
                return True
            _press(d, 2)
            return False

        WebDriverWait(browser, 15, poll_frequency=0.5).until(closed_is_said)
        assert browser.find_element(By.ID, "answer").text == "This poll is closed."
        ARTIFACTS.mkdir(exist_ok=True)
        assert browser.save_screenshot(str(ARTIFACTS / f"kiosk-closed-{broker.name}.png"))
        WebDriverWait(browser, 10).until(lambda d: _pending(d) == "0")
    results = (await read_results(redis, [poll_id]))[poll_id]
    assert results.total == 1 and results.counts == (0, 0, 0, 0, 1)


async def test_a_multiple_choice_vote_is_picked_then_sent_as_one(
    mosquitto_proc: ManagedProcess,
    spawn_processor: Callable[..., ManagedProcess],
    redis_proc: ManagedProcess,
    redis: Redis,
    browser: WebDriver,
    request: pytest.FixtureRequest,
) -> None:
    spawn_processor(mosquitto_proc)
    poll_id = unique_id(request)
    poll_cli(redis_proc, "poll", "create", poll_id, "--type", "multiple", "--max-choices", "2",
             "--option", "A", "--option", "B", "--option", "C")  # fmt: skip
    with serve_dashboard(port=0, ws_url=mosquitto_proc.ws_url) as url:
        browser.get(f"{url}kiosk.html#device={poll_id[:40]}-tab&poll={poll_id}")
        wait_for(browser, "#connection", "data-state", "connected")
        WebDriverWait(browser, 20).until(lambda d: d.find_elements(By.ID, "submit"))
        for option in (2, 0, 1):  # the third pick is refused: two at most
            _press(browser, option)
        wait_for(browser, '.choice[data-option="1"]', "data-picked", "false")
        browser.find_element(By.ID, "submit").click()
        wait_for(browser, "#answer", "data-code", "0")
        WebDriverWait(browser, 10).until(lambda d: _pending(d) == "0")
    results = (await read_results(redis, [poll_id]))[poll_id]
    assert results.total == 1 and results.counts == (1, 0, 1)


@contextlib.contextmanager
def _kiosk(
    browser: WebDriver, broker: ManagedProcess, poll_id: str, device: str, extra: str = ""
) -> Iterator[None]:
    """The kiosk page of ``device`` on ``poll_id`` (options A and B), connected and showing
    its buttons; served for the duration of the block."""
    with serve_dashboard(port=0, ws_url=broker.ws_url) as url:
        browser.get(f"{url}kiosk.html#device={device}&poll={poll_id}{extra}")
        wait_for(browser, "#connection", "data-state", "connected")
        WebDriverWait(browser, 20).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".choice"))
        yield


def _ab_poll(redis_proc: ManagedProcess, request: pytest.FixtureRequest) -> tuple[str, str]:
    """A new poll with options A and B, and a device id for the test's kiosk."""
    poll_id = unique_id(request)
    poll_cli(redis_proc, "poll", "create", poll_id, "--option", "A", "--option", "B")
    return poll_id, f"{poll_id[:40]}-tab"


async def test_a_vote_goes_again_only_when_unanswered_for_the_ack_timeout(
    mosquitto_proc: ManagedProcess,
    spawn_processor: Callable[..., ManagedProcess],
    redis_proc: ManagedProcess,
    redis: Redis,
    browser: WebDriver,
    request: pytest.FixtureRequest,
) -> None:
    """Rule 4 with the processor frozen: each stored vote goes out once, then again only after
    the ack timeout (4 s here, 30 s by default), whatever the presses and the page's own
    flushes in between; the broker receives exactly what the page says it sent."""
    proc = spawn_processor(mosquitto_proc)
    poll_id, device = _ab_poll(redis_proc, request)
    received: list[bytes] = []
    async with aiomqtt.Client(HOST, mosquitto_proc.port, identifier=f"{poll_id[:40]}-spy") as spy:
        await spy.subscribe(f"votes/{poll_id}/{device}", qos=1)

        async def listen() -> None:
            async for message in spy.messages:
                assert isinstance(message.payload, bytes)
                received.append(message.payload)

        with _kiosk(browser, mosquitto_proc, poll_id, device, "&ack_timeout_s=4"):
            async with asyncio.TaskGroup() as tg:
                listening = tg.create_task(listen())
                proc.signal(signal.SIGSTOP)  # no ack comes
                try:
                    for option in (0, 1, 0):
                        _press(browser, option)
                        await asyncio.sleep(0.2)
                    await asyncio.sleep(10)
                    sent = browser.execute_script("return window.voteboxKiosk.sent;")
                finally:
                    proc.signal(signal.SIGCONT)
                WebDriverWait(browser, 30).until(lambda d: _pending(d) == "0")
                listening.cancel()
    by_vote: dict[tuple[int, int], list[int]] = {}
    for epoch, seq, at_ms in sent:
        by_vote.setdefault((epoch, seq), []).append(at_ms)
    assert len(by_vote) == 3
    for times in by_vote.values():
        assert 2 <= len(times) <= 3, times  # at 0, 4 and perhaps 8 s (flushes come every 5 s)
        assert all(b - a >= 4000 for a, b in itertools.pairwise(times)), times
    copies = sum(len(m) if isinstance(m := cbor2.loads(p), list) else 1 for p in received)
    assert copies >= len(sent)  # every copy the page sent reached the broker (and no more)
    assert copies - len(sent) <= 3  # but the re-sends after the processor woke
    results = (await read_results(redis, [poll_id]))[poll_id]
    assert results.counts == (2, 1)


async def test_a_refused_login_is_retried_with_backoff_until_the_account_exists(
    tmp_path: Path,
    browser: WebDriver,
    request: pytest.FixtureRequest,
) -> None:
    """A tablet set up before its account reached the broker: refused, it goes on trying
    (mqtt.js alone gives up after a refused CONNACK), each wait under the doubling ceiling of
    rule 6, and connects once the account is there."""
    certs = make_certs(tmp_path / "certs")
    store = AccountStore(tmp_path / "accounts.json", tmp_path / "mosquitto.passwd")
    store.add("dashboard", "dashboard", "pw-dashboard")
    device = unique_id(request)[:40] + "-tab"
    with (
        production_mosquitto(tmp_path, certs) as (broker, _, _),
        serve_dashboard(port=0, ws_url=broker.ws_url) as url,
    ):
        browser.get(f"{url}kiosk.html#device={device}&password=pw-tab&poll=p")
        WebDriverWait(browser, 40, poll_frequency=0.2).until(
            lambda d: d.execute_script("return (window.voteboxKiosk.attempts || []).length;") >= 4
        )
        assert browser.find_element(By.ID, "connection").get_attribute("data-state") != (
            "connected"
        )
        store.add(device, "device", "pw-tab")
        broker.signal(signal.SIGHUP)  # Mosquitto reads its password file again
        wait_for(browser, "#connection", "data-state", "connected", timeout_s=90)
        attempts = browser.execute_script("return window.voteboxKiosk.attempts;")
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    # The n-th wait is below 2**n s (plus the refusal's own round trip), never a fixed period.
    for n, gap in enumerate(gaps):
        assert gap <= 1000 * 2**n + 1500, (n, gaps)


async def test_rate_limited_the_page_pauses_then_sends_again_and_each_vote_counts_once(
    mosquitto_proc: ManagedProcess,
    spawn_processor: Callable[..., ManagedProcess],
    redis_proc: ManagedProcess,
    redis: Redis,
    browser: WebDriver,
    request: pytest.FixtureRequest,
) -> None:
    """Rule 3: `[null, null, 33]` answers no vote: the page sends nothing for a pause of 1 to
    3 s, then everything not answered, and each vote counts once."""
    spawn_processor(mosquitto_proc, VOTEBOX_DEVICE_RATE="1", VOTEBOX_DEVICE_BURST="2")
    poll_id, device = _ab_poll(redis_proc, request)
    with _kiosk(browser, mosquitto_proc, poll_id, device):
        for option in (0, 1, 0, 1, 0, 1):
            _press(browser, option)
        WebDriverWait(browser, 60).until(lambda d: _pending(d) == "0")
        sent = browser.execute_script("return window.voteboxKiosk.sent;")
        answers = browser.execute_script("return window.voteboxKiosk.answers;")
    limited = [at for code, at in answers if code == 33]
    assert limited, "the processor never rate-limited the page"
    for at in limited:
        assert not [s for s in sent if at < s[2] < at + 1000], (at, sent)
    results = (await read_results(redis, [poll_id]))[poll_id]
    assert results.counts == (3, 3) and results.total == 6


async def test_a_kiosk_whose_epoch_the_processor_knows_higher_moves_past_it_and_counts(
    mosquitto_proc: ManagedProcess,
    spawn_processor: Callable[..., ManagedProcess],
    redis_proc: ManagedProcess,
    redis: Redis,
    browser: WebDriver,
    request: pytest.FixtureRequest,
) -> None:
    """A tablet whose clock was 12 days ahead when an earlier store was made: the processor
    knows that higher epoch, so the new store's votes are answered stale_epoch. The page keeps
    them, moves to higher epochs (steps doubling) and sends them again: each counts once."""
    spawn_processor(mosquitto_proc)
    poll_id, device = _ab_poll(redis_proc, request)
    ahead = int(time.time()) + 1_000_000
    await redis.hset(PollKeys(poll_id).devices, device, f"{ahead}:5")
    with _kiosk(browser, mosquitto_proc, poll_id, device):
        _press(browser, 1)
        _press(browser, 0)
        WebDriverWait(browser, 60).until(lambda d: _pending(d) == "0")
        wait_for(browser, "#answer", "data-code", "0")
        answers = browser.execute_script("return window.voteboxKiosk.answers;")
    assert [code for code, _ in answers].count(27) >= 20  # about log2(1,000,000) steps
    results = (await read_results(redis, [poll_id]))[poll_id]
    assert results.counts == (1, 1) and results.total == 2
    stored = await redis.hget(PollKeys(poll_id).devices, device)
    assert stored is not None and int(redis_text(stored).split(":")[0]) > ahead
