"""The live results page in a real browser (Debian's chromium, headless, through chromedriver),
reading a real broker's WebSockets listener while kiosks vote."""

from __future__ import annotations

import asyncio
import io
import json
import urllib.request
from pathlib import Path

import paho.mqtt.publish as paho_publish
import pytest
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from harness.services import ManagedProcess
from processor.commands import dashboard
from processor.commands.dashboard import serve_dashboard
from processor.commands.watch import watch_polls
from processor.errors import ConfigError
from tests.conftest import REPO, unique_id
from tests.fleet import Fleet, results_url
from tests.test_cli import poll_cli

pytestmark = pytest.mark.e2e

ARTIFACTS = REPO / "test-artifacts"


def attribute(driver: WebDriver, css: str, name: str) -> str | None:
    """An element's attribute, or None while it is not there (the page redraws often)."""
    try:
        found = driver.find_elements(By.CSS_SELECTOR, css)
        return found[0].get_attribute(name) if found else None
    except StaleElementReferenceException:
        return None


def wait_for(driver: WebDriver, css: str, name: str, value: str, timeout_s: float = 30) -> None:
    WebDriverWait(driver, timeout_s, poll_frequency=0.1).until(
        lambda d: attribute(d, css, name) == value,
        message=f"{css} [{name}] never became {value!r}",
    )


def test_the_page_shows_live_bars_and_a_closed_poll(
    broker: ManagedProcess,
    processor_proc: ManagedProcess,
    redis_proc: ManagedProcess,
    browser: WebDriver,
    request: pytest.FixtureRequest,
) -> None:
    poll_id = unique_id(request)
    poll_cli(redis_proc, "poll", "create", poll_id, "--title", "Best <b>snack</b>?",
        "--option", "Pretzels", "--option", "Nachos", "--option", "Popcorn")  # fmt: skip
    card = f'[data-poll="{poll_id}"]'
    with serve_dashboard(port=0, ws_url=broker.ws_url) as url:
        with urllib.request.urlopen(url + "vendor/mqtt.min.js", timeout=5) as reply:
            assert reply.status == 200 and len(reply.read()) > 100_000  # npm's browser build
        browser.get(url)
        wait_for(browser, "#connection", "data-state", "connected")
        wait_for(browser, card, "data-state", "open")
        assert browser.find_element(By.CSS_SELECTOR, f"{card} .title").text == "Best <b>snack</b>?"

        with Fleet(broker, poll_id, 2) as fleet:
            for i, choice in enumerate([0, 1, 0, 2, 0, 1]):
                fleet.kiosks[i % 2].vote(poll_id, choice)
            for option, count in (("0", "3"), ("1", "2"), ("2", "1")):
                wait_for(browser, f'{card} [data-option="{option}"]', "data-count", count)
        wait_for(browser, card, "data-total", "6")
        row = browser.find_element(By.CSS_SELECTOR, f'{card} [data-option="0"]')
        assert row.find_element(By.CSS_SELECTOR, ".pct").text == "50.0%"
        bar = row.find_element(By.CSS_SELECTOR, ".bar").get_attribute("style") or ""
        assert "width: 100%" in bar  # the largest count fills its track
        # Votes per minute over the last hour (polls/{poll}/series): 60 bars, the six votes in
        # the newest minutes, within a few seconds of the last vote (not at the next rescan).
        # Read in one script: the card is redrawn as documents arrive.
        read_bars = (
            "return [...document.querySelectorAll(arguments[0])]"
            ".map((r) => Number(r.dataset.count));"
        )
        minute_bars = f"{card} .series rect"
        WebDriverWait(browser, 15, poll_frequency=0.2).until(
            lambda d: sum(d.execute_script(read_bars, minute_bars)) == 6,
            message="the chart never showed the six votes",
        )
        bars = browser.execute_script(read_bars, minute_bars)
        assert len(bars) == 60 and sum(bars[-2:]) == 6
        caption = browser.execute_script(
            "return document.querySelector(arguments[0]).textContent;", f"{card} .series-caption"
        )
        assert caption.startswith("votes per minute, last hour")

        poll_cli(redis_proc, "poll", "close", poll_id)
        wait_for(browser, card, "data-state", "closed")
        assert browser.find_element(By.CSS_SELECTOR, f"{card} .state").text.lower() == "closed"
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / f"dashboard-{broker.name}.png"
        assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000

        # The big-screen mode: one poll, full screen.
        browser.get(f"{url}?poll={poll_id}")
        wait_for(browser, card, "data-state", "closed")
        assert "single" in (browser.find_element(By.TAG_NAME, "body").get_attribute("class") or "")
        assert len(browser.find_elements(By.CSS_SELECTOR, ".poll")) == 1
        assert browser.save_screenshot(str(ARTIFACTS / f"dashboard-single-{broker.name}.png"))


def test_the_page_shows_when_the_broker_is_gone_and_reconnects_by_itself(
    mosquitto_proc: ManagedProcess,
    browser: WebDriver,
    request: pytest.FixtureRequest,
) -> None:
    with serve_dashboard(port=0, ws_url=mosquitto_proc.ws_url) as url:
        browser.get(url)
        wait_for(browser, "#connection", "data-state", "connected")
        mosquitto_proc.stop()
        try:
            WebDriverWait(browser, 30, poll_frequency=0.1).until(
                lambda d: attribute(d, "#connection", "data-state") in ("offline", "reconnecting")
            )
        finally:
            mosquitto_proc.start()
        wait_for(browser, "#connection", "data-state", "connected")
        # And it subscribed again: a result published now appears.
        poll_id = unique_id(request)
        document = {
            "poll": poll_id,
            "title": "after",
            "state": "open",
            "version": 1,
            "total": 1,
            "labels": ["a", "b"],
            "counts": [0, 1],
            "percentages": [0.0, 100.0],
        }
        paho_publish.single(
            f"polls/{poll_id}/results",
            json.dumps(document),
            qos=1,
            retain=True,
            hostname="127.0.0.1",
            port=mosquitto_proc.port,
            client_id=f"{poll_id}-pub",
        )
        wait_for(browser, f'[data-poll="{poll_id}"] [data-option="1"]', "data-count", "1")


def test_a_missing_browser_build_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The page cannot work without npm's mqtt build; the error says how to get it."""
    monkeypatch.setattr(dashboard, "MQTT_BROWSER_BUILD", tmp_path / "absent.js")
    with pytest.raises(ConfigError, match="scripts/setup"):
        with serve_dashboard(port=0, ws_url="ws://127.0.0.1:1"):
            pass


async def test_votebox_watch_redraws_in_place_and_follows_every_poll(
    broker: ManagedProcess,
    processor_proc: ManagedProcess,
    redis_proc: ManagedProcess,
    request: pytest.FixtureRequest,
) -> None:
    first, second = unique_id(request, "-1"), unique_id(request, "-2")
    for poll_id, title in ((first, "Q first"), (second, "Q second")):
        poll_cli(redis_proc, "poll", "create", poll_id, "--title", title,
            "--option", "yes", "--option", "no")  # fmt: skip
    out = io.StringIO()

    def done() -> bool:
        text = out.getvalue()
        return "Q first  [open]  total 2" in text and "Q second  [open]  total 1" in text

    with Fleet(broker, first, 1) as fleet:
        fleet.kiosks[0].vote(first, 0)
        fleet.kiosks[0].vote(first, 1)
        fleet.kiosks[0].vote(second, 1)
        try:
            async with asyncio.timeout(30):
                await watch_polls(results_url(broker), None, out=out, in_place=True, stop=done)
        except TimeoutError:
            raise AssertionError(out.getvalue()[-3000:]) from None
    text = out.getvalue()
    assert "\x1b[" in text, text  # drawn again in place, not scrolled
    last = text.rsplit("\x1b[J", 1)[-1]
    assert "Q first  [open]  total 2" in last and "Q second  [open]  total 1" in last
