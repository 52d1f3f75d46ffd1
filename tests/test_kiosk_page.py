"""The touch kiosk page (dashboard/kiosk.html) in headless Chromium, a device in a browser:
its CBOR is byte for byte the protocol's, and its presses are counted exactly once through a
network cut (DevTools' offline emulation) and a page reload with votes still stored, against a
real Mosquitto, processor and Redis. Screenshots in test-artifacts/."""

from __future__ import annotations

import ast
from collections.abc import Callable

import pytest
from redis.asyncio import Redis
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from devices.encoder import encode_vote
from harness.services import ManagedProcess
from processor.codec import AckEntry, encode_ack
from processor.commands.dashboard import serve_dashboard
from processor.poll_store import read_results
from tests.conftest import unique_id
from tests.test_cli import poll_cli
from tests.test_dashboard import ARTIFACTS, wait_for
from tests.test_protocol_doc import VOTES

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
    acks = [AckEntry(1_764_000_000, 17, 0), AckEntry(None, None, 33), AckEntry(3, 2**40, 31)]
    with serve_dashboard(port=0, ws_url=mosquitto_proc.ws_url) as url:
        browser.get(url + "kiosk.html")  # no device in the fragment: it says how to open it
        encoded = browser.execute_script(
            "return arguments[0].map(([c, s, t, e]) =>"
            " Array.from(window.voteboxKiosk.encodeVote(c, s, t, e)));",
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
            "return arguments[0].map(([c, s, t, e]) =>"
            " Array.from(window.voteboxKiosk.encodeVote(c, s, t, e)));",
            [[m[0], m[1], m.get(2), m.get(4, 0)] for m, _ in examples],
        )
        said = browser.find_element(By.ID, "question").text
    for (choice, seq, ts, epoch), got in zip(cases, encoded, strict=True):
        assert bytes(got) == encode_vote(choice, seq, ts=ts, epoch=epoch), (choice, seq, ts)
    assert [bytes(got) for got in documented] == [expected for _, expected in examples]
    assert [tuple(entry) for entry in decoded] == [tuple(a) for a in acks]
    assert "kiosk.html#device=" in said


def _pending(browser: WebDriver) -> str:
    return str(browser.find_element(By.ID, "pending").text)


def _press(browser: WebDriver, option: int) -> None:
    browser.find_element(By.CSS_SELECTOR, f'.choice[data-option="{option}"]').click()


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
        assert (await read_results(redis, [poll_id]))[poll_id].counts == (3, 2)

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
        # The page is reloaded while the broker is still out of reach: the votes wait in
        # IndexedDB, then go out once it is back, each counted once.
        broker_ws = mosquitto_proc.ws_url + "*"
        browser.execute_cdp_cmd("Network.setBlockedURLs", {"urls": [broker_ws]})
        _network(browser, offline=False)
        browser.refresh()  # a reload: the page starts again from its IndexedDB
        WebDriverWait(browser, 10).until(lambda d: _pending(d) == "4")
        assert browser.find_element(By.ID, "connection").get_attribute("data-state") != (
            "connected"
        )
        assert (await read_results(redis, [poll_id]))[poll_id].total == 5
        browser.execute_cdp_cmd("Network.setBlockedURLs", {"urls": []})
        wait_for(browser, "#connection", "data-state", "connected")
        WebDriverWait(browser, 30).until(lambda d: _pending(d) == "0")
        assert browser.save_screenshot(str(ARTIFACTS / "kiosk-thank-you.png"))
    results = (await read_results(redis, [poll_id]))[poll_id]
    assert results.counts == (4, 5) and results.total == 9


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
