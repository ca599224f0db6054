"""Badge sightings from an ESP32 receiver, through the whole gateway.

The receiver publishes raw sightings; the gateway's presence tracker turns
them into enter and leave, and the engine resolves a call by presence.
"""

from __future__ import annotations

import time

from tests.helpers import site_config

BADGE = "ibeacon:f7826da6-4fa2-4e98-8024-bc5b71e0893e:3:301"


def presence_site(site_id: str) -> dict:
    site = site_config(site_id)
    site["devices"].append({"id": "rx-1", "kind": "ble_receiver", "room": "room-1"})
    site["staff"][0]["badge"] = BADGE
    site["rules"][0]["resolve_by_presence"] = {"roles": ["nurse"], "dwell": "1s"}
    site["presence"] = {
        "receivers": {"rx-1": "room-1"},
        "dwell": "0.5s",
        "away_timeout": "3s",
    }
    return site


def test_sightings_from_a_receiver_resolve_a_call(start_gateway, mqtt, topics):
    """A nurse's badge heard strongly in the room closes the call by presence."""
    gateway = start_gateway(site=presence_site(topics.site))
    display = mqtt(topics.alerts)
    device = mqtt()
    device.publish(
        topics.events("call-1"),
        {"id": "e1", "type": "call", "device": "call-1", "ts": time.time()},
    )
    alert = display.wait_for_json(device="call-1", state="open")

    sightings = f"facility/{topics.site}/devices/rx-1/sightings"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        device.publish(sightings, {"badge": BADGE, "rssi": -55, "ts": time.time()})
        resolved = [
            m
            for m in display.messages
            if m.payload
            and m.json["id"] == alert["id"]
            and m.json["state"] == "resolved"
        ]
        if resolved:
            break
        time.sleep(0.2)
    closed = display.wait_for_json(id=alert["id"], state="resolved", timeout=1)
    assert (closed["resolved_by"], closed["resolved_via"]) == ("ana", "presence")
    assert closed["proof"]["badge"] == BADGE
    assert gateway.healthz()["drivers"]["presence"]["sightings"] > 0


def test_bad_sighting_is_rejected_and_counted(start_gateway, mqtt, topics):
    gateway = start_gateway(site=presence_site(topics.site))
    mqtt().publish(f"facility/{topics.site}/devices/rx-1/sightings", b"{not json")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if gateway.healthz()["messages_rejected"]:
            break
        time.sleep(0.1)
    assert gateway.healthz()["messages_rejected"] == {"malformed_json": 1}
