"""The devices page and the recognition board in Debian's headless Chromium.

The devices page lists the site's devices and the gateway's health, and its
test buttons reach MQTT; the recognition board shows a closure, and a wall
display opened with a token shows it too without naming who opted out.
Screenshots go where ``tests/test_browser.py`` puts its own.
"""

# Fixtures come from the modules below by import, which ruff takes for redefinitions.
# ruff: noqa: F811, F401
from __future__ import annotations

from playwright.sync_api import expect

from tests.helpers import event
from tests.test_browser import browser, shots, sign_in
from tests.web_helpers import Web, technician, web, web_gateway, web_site


def test_devices_page_lists_devices_health_and_tests_them(
    browser, web_gateway, mqtt, topics, shots
):
    base = f"http://127.0.0.1:{web_gateway.web_port}"
    mqtt().publish(topics.events("call-1"), event("call-1"))
    station = mqtt(f"facility/{topics.site}/devices/call-1/test")
    pager = mqtt(topics.pager("ben"))

    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    sign_in(page, base, "/devices")
    rows = page.locator("#devices tbody tr")
    expect(rows).to_have_count(4)
    heard = page.locator("tr[data-device='call-1']")
    expect(heard).to_have_attribute("data-state", "online")
    expect(heard.locator("a.alert-link")).to_have_count(1)
    expect(page.locator("tr[data-fact='Broker link'] td")).to_contain_text("connected")
    expect(page.locator("tr[data-fact='Outbox'] td")).to_contain_text("0 waiting")
    page.screenshot(path=shots / "devices.png", full_page=True)

    heard.locator("button.test").click()
    expect(page.locator("#message")).to_contain_text("Dome light of call-1")
    assert station.wait_for_json(test="light")["seconds"] > 0

    page.locator("tr[data-staff='ben'] button.test").click()
    expect(page.locator("#message")).to_have_text("Test page sent to Ben Okafor.")
    assert pager.wait_for_json(test=True)["target"] == "ben"

    # The alert link opens that alert's timeline on the alerts page.
    heard.locator("a.alert-link").click()
    expect(page.locator("#timeline")).to_be_visible()
    expect(page.locator("#timeline tbody tr")).to_have_count(1)


def test_recognition_board_and_its_wall_display(
    browser, start_gateway, mqtt, topics, shots
):
    site = web_site(topics)
    site["staff"][1]["recognition"] = False  # Ben
    gateway = start_gateway(site=site)
    client = Web(gateway)
    try:
        assert client.sign_in().status_code == 200
        display = mqtt(topics.alerts)
        for device, who in (("call-1", "ana"), ("call-2", "ben")):
            mqtt().publish(topics.events(device), event(device))
            alert = display.wait_for_json(device=device, state="open")
            mqtt().publish(topics.staff(who, "resolve"), {"alert": alert["id"]})
            display.wait_for_json(id=alert["id"], state="resolved")
        made = client.ok("POST", "/api/display-tokens", {"label": "Staff room"})
    finally:
        client.close()
    base = f"http://127.0.0.1:{gateway.web_port}"

    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    sign_in(page, base, "/recognition")
    today = page.locator("#today")
    expect(today.locator(".teams tr[data-team='west'] td.closed")).to_have_text("2")
    expect(today.locator(".people tr[data-staff='ana'] td.closed")).to_have_text("1")
    expect(today.locator(".people tbody tr")).to_have_count(1)
    expect(today.locator(".opted")).to_contain_text("1 person has opted out")
    page.screenshot(path=shots / "recognition.png", full_page=True)

    wall = browser.new_page(viewport={"width": 1920, "height": 1080})
    wall.goto(base + made["url"].replace("/floor", "/recognition"))
    expect(wall).to_have_url(base + "/recognition")
    expect(wall.locator("body")).to_have_class("recognition wall")
    expect(wall.locator("#nav")).to_be_hidden()
    expect(wall.locator("#week .people tr[data-staff='ana']")).to_have_count(1)
    expect(wall.locator("#week .teams td.closed")).to_have_text("2")
    expect(wall.locator("body")).not_to_contain_text("Ben")
    wall.screenshot(path=shots / "recognition-wall.png")
