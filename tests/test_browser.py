"""The web pages in a real headless Chromium (Debian's), driven by Playwright.

Sign-in, the floor display updating live from an MQTT call, a nurse
acknowledging from the pager page, the floor recovering after the gateway is
killed and restarted, and the 401 and CSRF refusals as a browser meets them.
Screenshots go to ``$GATEWAY_TEST_ARTIFACTS/browser`` when that is set, and
otherwise to the test's temporary folder.
"""

# Fixtures come from tests/web_helpers.py by import, which ruff takes for redefinitions.
# ruff: noqa: F811, F401
from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.helpers import STARTUP, WAIT, event
from tests.web_helpers import (
    PIN,
    TECHNICIAN_PASSWORD,
    Web,
    technician,
    web,
    web_gateway,
)

log = logging.getLogger(__name__)

CHROMIUM = "/usr/bin/chromium"
"""Debian's package (``run.sh test`` installs it); Playwright's own browser
builds are never downloaded."""

expect.set_options(timeout=WAIT * 1000)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert Path(CHROMIUM).exists(), (
        "install Debian's chromium: apt-get install chromium"
    )
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM)
        yield chromium
        chromium.close()


@pytest.fixture
def shots(tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    """Where this test's screenshots go."""
    root = os.environ.get("GATEWAY_TEST_ARTIFACTS")
    folder = Path(root) / "browser" / request.node.name if root else tmp_path / "shots"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def sign_in(page: Page, base: str, path: str = "/floor") -> None:
    """Open a page signed out, get sent to sign in, and come back signed in."""
    page.goto(base + path)
    expect(page).to_have_url(re.compile(r"/signin\?next="))
    page.fill("input[name=name]", "technician")
    page.fill("input[name=password]", TECHNICIAN_PASSWORD)
    page.click("button[type=submit]")
    expect(page).to_have_url(base + path)


def live(page: Page) -> None:
    expect(page.locator("#link")).to_have_text("live")


def test_sign_in_and_the_floor_shows_a_call_live(
    browser, web_gateway, mqtt, topics, shots
):
    """A call pressed over MQTT appears on the floor without a reload, then goes."""
    base = f"http://127.0.0.1:{web_gateway.web_port}"
    page = browser.new_page(viewport={"width": 1920, "height": 1080})
    sign_in(page, base)
    live(page)
    expect(page.locator("#empty")).to_be_visible()

    pressed = time.monotonic()
    mqtt().publish(topics.events("call-2"), event("call-2"))
    card = page.locator("section.gap")
    expect(card).to_have_count(1)
    seen = time.monotonic() - pressed
    log.info(
        "The floor showed the call %.0f ms after the press was published", seen * 1000
    )
    expect(card.locator(".place")).to_have_text("Room 2")
    expect(card.locator(".what")).to_have_text("Patient call")
    expect(page.locator("h2")).to_have_text("West wing")
    page.screenshot(path=shots / "floor-one-call.png")

    mqtt().publish(topics.events("call-2"), event("call-2", "cancel"))
    expect(card).to_have_count(0)
    expect(page.locator("#empty")).to_be_visible()


def test_nurse_acknowledges_on_the_pager_page_and_the_floor_shows_it(
    browser, web_gateway, technician, mqtt, topics, shots
):
    technician.ok("PUT", "/api/staff/ana/pin", {"pin": PIN})
    base = f"http://127.0.0.1:{web_gateway.web_port}"
    wall = browser.new_page(viewport={"width": 1920, "height": 1080})
    sign_in(wall, base)
    live(wall)

    phone_context = browser.new_context(
        viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True
    )
    phone = phone_context.new_page()
    phone.goto(base + "/pager")
    expect(phone).to_have_url(re.compile(r"/pager/signin"))
    phone.fill("input[name=name]", "Ana Silva")
    phone.fill("input[name=pin]", PIN)
    phone.click("button[type=submit]")
    expect(phone).to_have_url(base + "/pager")
    expect(phone.locator("#who")).to_have_text("Ana Silva")
    expect(phone.locator("#offline")).to_be_hidden()

    display = mqtt(topics.alerts)
    mqtt().publish(topics.events("call-3"), event("call-3"))
    card = phone.locator("section.card")
    expect(card).to_have_count(1)
    expect(card.locator(".text")).to_have_text("Patient call in room-3")
    phone.screenshot(path=shots / "pager-call.png")

    card.locator("button.ack").tap()
    floor_card = wall.locator("section.gap")
    expect(floor_card).to_have_attribute("data-state", "acknowledged")
    expect(floor_card.locator(".meta")).to_contain_text("Ana Silva on the way")
    acked = display.wait_for_json(state="acknowledged")
    assert acked["acked_by"] == "ana"
    wall.screenshot(path=shots / "floor-acknowledged.png")

    card.locator("button.done").tap()
    expect(card).to_have_count(0)
    expect(floor_card).to_have_count(0)
    resolved = display.wait_for_json(state="resolved")
    assert (resolved["resolved_by"], resolved["resolved_via"]) == ("ana", "pager")
    phone_context.close()


def test_the_floor_recovers_after_the_gateway_is_killed_and_restarted(
    browser, web_gateway, mqtt, topics, shots
):
    base = f"http://127.0.0.1:{web_gateway.web_port}"
    page = browser.new_page(viewport={"width": 1920, "height": 1080})
    sign_in(page, base)
    live(page)
    mqtt().publish(topics.events("call-1"), event("call-1"))
    expect(page.locator("section.gap")).to_have_count(1)

    web_gateway.kill()
    expect(page.locator("#link")).to_contain_text("NOT CONNECTED")
    expect(page.locator("body")).to_have_class(re.compile("offline"))
    page.screenshot(path=shots / "floor-disconnected.png")

    web_gateway.start()
    expect(page.locator("#link")).to_have_text("live", timeout=STARTUP * 1000)
    # The call open before the kill is still there, restored from SQLite.
    expect(page.locator("section.gap")).to_have_count(1)
    mqtt().publish(topics.events("call-4"), event("call-4"))
    expect(page.locator("section.gap")).to_have_count(2)
    expect(page.locator("section.gap .place").first).to_have_text("Room 4")
    page.screenshot(path=shots / "floor-recovered.png")


def test_signed_out_browser_gets_401_and_changes_need_the_csrf_token(
    browser, web_gateway, technician, mqtt, topics, shots
):
    base = f"http://127.0.0.1:{web_gateway.web_port}"
    stranger = browser.new_context()
    assert stranger.request.get(base + "/api/alerts").status == 401
    page = stranger.new_page()
    page.goto(base + "/alerts")
    expect(page).to_have_url(
        re.compile(r"/signin\?next=%2Falerts|/signin\?next=/alerts")
    )

    sign_in(page, base, "/alerts")
    live(page)
    forged = page.evaluate(
        """async () => (await fetch('/api/silences', {
             method: 'POST',
             headers: {'Content-Type': 'application/json'},
             body: JSON.stringify({zone: 'west', minutes: 5, reason: 'forged'}),
           })).status"""
    )
    assert forged == 403
    assert technician.ok("GET", "/api/silences") == []

    # The page's own form sends the token and works.
    page.fill("input[name=reason]", "bed being cleaned")
    page.click("#silence-form button")
    expect(page.locator("#silences tbody tr")).to_have_count(1)
    expect(page.locator("#message")).to_have_text("Pages held.")
    page.screenshot(path=shots / "alerts-console.png")
    stranger.close()


def test_wall_display_token_opens_the_floor(browser, web_gateway, technician, shots):
    made = technician.ok("POST", "/api/display-tokens", {"label": "West TV"})
    base = f"http://127.0.0.1:{web_gateway.web_port}"
    page = browser.new_page(viewport={"width": 1920, "height": 1080})
    page.goto(base + made["url"])
    expect(page).to_have_url(base + "/floor")
    live(page)
    expect(page.locator("#title")).to_contain_text("open gaps")
    page.screenshot(path=shots / "wall-display.png")
