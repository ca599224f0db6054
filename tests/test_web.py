"""The gateway's own web page and JSON API, over real HTTP."""

from __future__ import annotations

import contextlib
import socket
import subprocess

import httpx

from tests.helpers import event, wait_until


def get(gateway, path: str) -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{gateway.web_port}{path}", timeout=10)


def test_healthz_reports_a_healthy_gateway(gateway):
    """/healthz says ok, connected, and counts nothing yet."""
    expected = {
        "status": "ok",
        "broker_connected": True,
        "open_alerts": 0,
        "events_accepted": 0,
        "commits": 0,
        "messages_rejected": {},
    }
    assert gateway.healthz().items() >= expected.items()


def test_api_lists_unresolved_alerts(gateway, mqtt, topics):
    """/api/alerts lists the open and acknowledged alerts, not resolved ones."""
    display = mqtt(topics.alerts)
    device = mqtt()
    for n in (1, 2, 3):
        device.publish(topics.events(f"call-{n}"), event(f"call-{n}"))
    ids = [display.wait_for_json(device=f"call-{n}")["id"] for n in (1, 2, 3)]
    device.publish(topics.ack(ids[1]), {"staff": "ana"})
    device.publish(topics.events("call-3"), event("call-3", "cancel"))
    display.wait_for_json(id=ids[2], state="resolved")

    listed = get(gateway, "/api/alerts").json()
    assert {a["id"]: a["state"] for a in listed} == {
        ids[0]: "open",
        ids[1]: "acknowledged",
    }


def test_floor_page_is_served(gateway):
    """/ serves the floor view as HTML."""
    response = get(gateway, "/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")


def test_api_shows_one_alert_with_its_timeline(gateway, mqtt, topics):
    """/api/alerts/<id> returns the stored alert and its history."""
    display = mqtt(topics.alerts)
    mqtt().publish(topics.events("call-1"), event("call-1"))
    alert_id = display.wait_for_json(device="call-1")["id"]
    response = get(gateway, f"/api/alerts/{alert_id}")
    assert response.status_code == 200
    body = response.json()
    assert (body["id"], body["state"]) == (alert_id, "open")
    assert [h["kind"] for h in body["history"]] == ["opened"]


def test_api_answers_404_for_an_unknown_alert(gateway):
    """/api/alerts/<unknown> is a 404, not a server error."""
    assert get(gateway, "/api/alerts/0123456789abcdef").status_code == 404


def test_taken_web_port_does_not_stop_alerting(start_gateway, mqtt, topics):
    """If the web port is taken, calls are still turned into alerts."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        gateway = start_gateway(web_port=port)
        wait_until(lambda: str(port) in gateway.log(), what="the bind failure logged")
        # Bounded wait for an exit that must not come: stopping after the
        # failure takes milliseconds, so two seconds is far beyond it.
        with contextlib.suppress(subprocess.TimeoutExpired):
            gateway.process.wait(timeout=2)
        assert gateway.running, "the gateway exited"
        display = mqtt(topics.alerts)
        mqtt().publish(topics.events("call-1"), event("call-1"))
        display.wait_for_json(device="call-1", state="open")


def test_site_names_for_displays(gateway):
    """/api/site maps ids to the names a wall display shows."""
    body = get(gateway, "/api/site").json()
    assert body["rooms"]["room-1"] == "Room 1"
    assert body["zones"] == {"west": "West wing"}
    assert body["staff"]["ana"] == "Ana Silva"
