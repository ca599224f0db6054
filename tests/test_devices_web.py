"""The devices and health page, device tests and the recognition board, over HTTP.

Most tests run the gateway as a process on a private Mosquitto. The GPIO
tests run it in this process with its web page, so the test can hold a pin
and read the dome light's pin on gpiozero's mock factory.
"""

# Fixtures come from tests/web_helpers.py by import, which ruff takes for redefinitions.
# ruff: noqa: F811, F401
from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from gpiozero import Button
from gpiozero.pins.mock import MockFactory

from drivers.gpio import GPIODriver
from gateway.broker import PrivateBroker, free_port
from gateway.config import load_config
from gateway.devices import MAX_REFUSING, DeviceBook
from gateway.service import Gateway
from gateway.web.server import WebServer
from tests.helpers import WAIT, SiteTopics, event, query, wait_until, write_site
from tests.web_helpers import (
    SUPERVISOR_PASSWORD,
    Web,
    technician,
    web,
    web_gateway,
    web_site,
)

BUTTON, LIGHT = 17, 18


def device(body: dict[str, Any], device_id: str) -> dict[str, Any]:
    return next(d for d in body["devices"] if d["id"] == device_id)


def resolve_call(mqtt, topics, device_id: str, staff: str) -> str:
    """A call on ``device_id``, resolved from ``staff``'s pager; returns its id."""
    display = mqtt(topics.alerts)
    mqtt().publish(topics.events(device_id), event(device_id))
    alert_id = display.wait_for_json(device=device_id, state="open")["id"]
    mqtt().publish(topics.staff(staff, "resolve"), {"alert": alert_id})
    display.wait_for_json(id=alert_id, state="resolved")
    return alert_id


# -- the devices page, from a gateway process


def test_devices_show_offline_online_and_refusals(start_gateway, topics, mqtt):
    """Supervision finds call-2 silent: the page says offline, with why; call-1
    was heard (last seen), had a message refused, and raised an alert."""
    site = web_site(topics)
    site["rules"].append(
        {
            "name": "station-silent",
            "kind": "supervision",
            "devices": {"ids": ["call-2"]},
            "heartbeat": "1s",
            "levels": [{"after": "0s", "roles": ["charge_nurse"]}],
        }
    )
    gateway = start_gateway(site=site)
    client = Web(gateway)
    try:
        assert client.sign_in().status_code == 200
        display = mqtt(topics.alerts)
        silent = display.wait_for_json(device="call-2", rule="station-silent")
        sender = mqtt()
        sender.publish(topics.events("call-1"), event("call-1"))
        call = display.wait_for_json(device="call-1", state="open")
        sender.publish(topics.events("call-1"), b"{not json")
        wait_until(
            lambda: client.ok("GET", "/healthz")["messages_rejected"],
            what="the refusal counted",
        )

        body = client.ok("GET", "/api/devices")
        offline = device(body, "call-2")
        assert offline["state"] == "offline"
        assert offline["reason"].startswith("silent for")
        assert [a["id"] for a in offline["alerts"]] == [silent["id"]]
        heard = device(body, "call-1")
        assert heard["state"] == "online"
        assert time.time() - WAIT < heard["last_seen"] <= time.time()
        assert heard["refused"] == {"malformed_json": 1}
        assert [(a["id"], a["state"]) for a in heard["alerts"]] == [
            (call["id"], "open")
        ]
        assert heard["zone"] == "west"
        assert device(body, "call-3")["state"] == "not heard"
        assert body["drivers"] == []
        assert {p["staff"] for p in body["pagers"]} == {"ana", "ben", "chloe", "dev"}
    finally:
        client.close()


def test_health_shows_broker_outbox_disk_and_clock(technician, mqtt, topics):
    """Two resolved calls wait in the outbox (no upstream is set): depth 2."""
    for device_id in ("call-1", "call-2"):
        resolve_call(mqtt, topics, device_id, "ana")

    def depth() -> int:
        return technician.ok("GET", "/api/devices")["health"]["upstream"]["depth"]

    wait_until(lambda: depth() == 2, what="an outbox depth of 2")
    health = technician.ok("GET", "/api/devices")["health"]
    assert health["broker"]["connected"] is True
    assert time.time() - 60 < health["broker"]["since"] <= time.time()
    assert health["upstream"]["oldest_undelivered_age"] >= 0
    assert health["disk"]["free_bytes"] > 0
    assert health["disk"]["database_bytes"] > 0
    assert health["clock"]["synchronised"] in (True, False, None)
    assert health["clock"]["method"]
    assert health["uptime_seconds"] >= 0
    # The same figures, open, in /healthz.
    open_health = httpx.get(f"{technician.base}/healthz").json()["gateway"]
    assert open_health["upstream"]["depth"] == 2
    assert open_health["disk"]["database_bytes"] > 0


# -- tests of devices and pagers


def test_test_page_reaches_the_pager_topic_and_opens_nothing(
    technician, web, mqtt, topics, web_gateway
):
    pager = mqtt(topics.pager("ana"), topics.alerts)
    technician.ok("POST", "/api/staff/ana/test-page")
    page = pager.wait_for_json(topics.pager("ana"), test=True)
    assert (page["target"], page["reason"], page["alert"]) == ("ana", "test", None)
    assert page["text"].startswith("TEST page")

    # No alert, no credit: nothing in the engine, the alerts or the outbox.
    assert technician.ok("GET", "/api/alerts") == []
    assert web_gateway.query("SELECT id FROM alerts") == []
    assert web_gateway.query("SELECT seq FROM outbox") == []
    assert not [m for m in pager.messages if m.topic != topics.pager("ana")]
    [row] = web_gateway.query(
        "SELECT by, action, target FROM audit_log WHERE action = ?", "test"
    )
    assert row == {"by": "technician", "action": "test", "target": "pager of ana"}

    missing = technician.send("POST", "/api/staff/nobody/test-page")
    assert missing.status_code == 404


def test_dome_light_test_of_an_mqtt_station_is_a_command(technician, web, mqtt, topics):
    """A station that is not wired to the Pi gets devices/<id>/test."""
    topic = f"facility/{topics.site}/devices/call-1/test"
    station = mqtt(topic)
    result = technician.ok("POST", "/api/devices/call-1/test")
    assert result["test"] == "mqtt"
    command = station.wait_for_json(topic, test="light")
    assert command["seconds"] == result["seconds"] > 0
    assert technician.ok("GET", "/api/alerts") == []
    assert technician.send("POST", "/api/devices/nope/test").status_code == 404


def test_only_a_technician_tests(technician, web):
    technician.ok(
        "PUT",
        "/api/accounts/sue",
        {"role": "supervisor", "password": SUPERVISOR_PASSWORD, "staff": "ana"},
    )
    supervisor = web()
    assert supervisor.sign_in("sue", SUPERVISOR_PASSWORD).status_code == 200
    assert supervisor.ok("GET", "/api/devices")["devices"]  # may read
    for path in ("/api/devices/call-1/test", "/api/staff/ana/test-page"):
        response = supervisor.send("POST", path)
        assert response.status_code == 403, path
        assert "technician" in response.json()["detail"]


# -- the recognition board


def test_board_counts_closures_and_names_nobody_who_opted_out(
    start_gateway, topics, mqtt
):
    """Ana and Ben close gaps; Ben opted out: his closure counts for the team
    only, and his name is on no board, API or wall display."""
    site = web_site(topics)
    for member in site["staff"]:
        if member["id"] == "ben":
            member["recognition"] = False
    gateway = start_gateway(site=site)
    client = Web(gateway)
    wall = Web(gateway)
    try:
        assert client.sign_in().status_code == 200
        resolve_call(mqtt, topics, "call-1", "ana")
        resolve_call(mqtt, topics, "call-2", "ana")
        resolve_call(mqtt, topics, "call-3", "ben")

        board = client.ok("GET", "/api/recognition/board")
        for period in ("today", "week"):
            people = {p["staff"]: p for p in board[period]["people"]}
            assert "ben" not in people
            assert people["ana"]["gaps_closed"] == 2
            assert people["ana"]["median_response_seconds"] is not None
            assert board[period]["opted_out"] == 1
            [team] = board[period]["teams"]
            assert (team["team"], team["gaps_closed"]) == ("west", 3)
            assert team["fastest"]["staff"] == "ana"
        assert "Ben" not in client.get("/api/recognition").text

        made = client.ok("POST", "/api/display-tokens", {"label": "Staff room"})
        assert (
            wall.get(made["url"].replace("/floor", "/recognition")).status_code == 303
        )
        assert wall.get("/recognition").status_code == 200
        shown = wall.get("/api/recognition/board")
        assert shown.status_code == 200
        assert "ben" not in shown.text
        assert "Ben" not in shown.text
        assert wall.get("/api/devices").status_code == 403
    finally:
        client.close()
        wall.close()


# -- GPIO, in this process


class InProcess:
    """The gateway and its web page on a loop in a thread of this process."""

    def __init__(self, gateway: Gateway, port: int) -> None:
        self.gateway = gateway
        self.web_port = port
        self.server = WebServer(gateway, "127.0.0.1", port)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_until_complete, args=(self._run(),)
        )

    async def _run(self) -> None:
        await asyncio.gather(self.gateway.run(), self.server.serve())

    def start(self) -> InProcess:
        self.thread.start()
        wait_until(lambda: self.gateway.link.connected, what="the broker link")
        return self

    def healthz(self) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.web_port}/healthz"
        return wait_until(lambda: _get(url), what="the web page")

    def stop(self) -> None:
        def both() -> None:
            self.server.shutdown()
            self.gateway.stop()

        self.loop.call_soon_threadsafe(both)
        self.thread.join(timeout=15)
        self.loop.close()


def _get(url: str) -> dict[str, Any] | None:
    try:
        return httpx.get(url, timeout=WAIT).json()
    except httpx.TransportError:
        return None


@pytest.fixture
def gpio_web(
    broker: PrivateBroker, tmp_path: Path, topics: SiteTopics
) -> Iterator[Callable[[MockFactory], InProcess]]:
    """Factory: a gateway with a call button and dome light on mock pins."""
    started: list[InProcess] = []

    def start(factory: MockFactory) -> InProcess:
        site = web_site(topics)
        site["gpio"] = {
            "buttons": [{"pin": BUTTON, "device": "call-1", "press": "call"}],
            "lights": [{"pin": LIGHT, "device": "call-1"}],
            "mock": True,
        }
        port = free_port()
        environ = {
            "GATEWAY_MQTT__PORT": str(broker.port),
            "GATEWAY_MQTT__USERNAME": "gateway",
            "GATEWAY_MQTT__PASSWORD": broker.passwords["gateway"],
            "GATEWAY_DATABASE__PATH": str(tmp_path / "gw.db"),
            "GATEWAY_WEB__PORT": str(port),
        }
        config = load_config(write_site(tmp_path / "site.yaml", site), environ)
        assert config.gpio is not None
        driver = GPIODriver(config.gpio, pin_factory=factory)
        running = InProcess(Gateway(config, drivers=[driver]), port).start()
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


def test_gpio_dome_light_test_goes_high_then_low(gpio_web, mqtt, topics):
    factory = MockFactory()
    try:
        client = Web(gpio_web(factory))
        assert client.sign_in().status_code == 200
        light = factory.pin(LIGHT)
        assert not light.state
        result = client.ok("POST", "/api/devices/call-1/test")
        assert result["test"] == "gpio_light"
        assert light.state  # lit before the answer came back
        wait_until(
            lambda: not light.state,
            timeout=result["seconds"] + WAIT,
            what="the dome light off again",
        )
        db = Path(client.gateway.gateway.config.database.path)
        [row] = query(db, "SELECT target FROM audit_log WHERE action = ?", "test")
        assert row == {"target": "device call-1"}
        assert client.ok("GET", "/api/alerts") == []
        client.close()
    finally:
        factory.close()


def test_a_driver_that_cannot_start_shows_retrying(gpio_web, topics):
    """Another program holds the button's pin: the driver is retrying, with
    why and when, and its devices are offline."""
    factory = MockFactory()
    squatter = Button(BUTTON, pin_factory=factory)
    try:
        client = Web(gpio_web(factory))
        assert client.sign_in().status_code == 200
        body = client.ok("GET", "/api/devices")
        [gpio] = body["drivers"]
        assert (gpio["name"], gpio["state"]) == ("gpio", "retrying")
        assert "could not start" in gpio["reason"]
        assert str(BUTTON) in gpio["reason"]
        assert gpio["retry_at"] > time.time()
        station = device(body, "call-1")
        assert (station["state"], station["driver"]) == ("offline", "gpio")
        client.close()
    finally:
        squatter.close()
        factory.close()


def test_refusals_are_counted_for_a_bounded_number_of_device_ids():
    """Invented device ids cannot grow the book without end; known ones still count."""
    book = DeviceBook()
    for n in range(MAX_REFUSING + 50):
        book.refused(f"facility/s/devices/made-up-{n}/events", "unknown_device")
    book.refused("facility/s/devices/made-up-0/events", "malformed_json")

    assert len(book.refusals) == MAX_REFUSING
    assert book.refusals["made-up-0"] == {"unknown_device": 1, "malformed_json": 1}
    assert f"made-up-{MAX_REFUSING}" not in book.refusals
