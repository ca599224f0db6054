"""Every rule kind through the real gateway: MQTT events in, alerts out.

A restroom and a patient room on one site; devices publish to the contract
topics, and the test reads what displays and pagers would see.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.helpers import GatewayProcess, MqttClient, SiteTopics, event, wait_until

LEVELS = [{"after": "0s", "roles": ["cleaner"]}]


def restroom_site(site_id: str) -> dict[str, Any]:
    return {
        "site": {"id": site_id},
        "gateway": {"id": "gw-1"},
        "zones": [
            {"id": "ward", "rooms": [{"id": "room-1"}]},
            {"id": "restroom", "rooms": [{"id": "wc-1"}]},
        ],
        "devices": [
            {"id": "call-1", "kind": "call_button", "room": "room-1"},
            {"id": "code-1", "kind": "code_button", "room": "room-1"},
            {"id": "door-1", "kind": "people_counter", "room": "wc-1"},
            {"id": "clean-1", "kind": "clean_button", "room": "wc-1"},
            {"id": "towel-1", "kind": "dispenser", "room": "wc-1"},
            {"id": "smiley-1", "kind": "feedback_terminal", "room": "wc-1"},
            {"id": "rx-1", "kind": "ble_receiver", "room": "room-1"},
        ],
        "staff": [
            {"id": "ana", "name": "Ana", "roles": ["nurse"], "badge": "b-ana"},
            {"id": "carl", "name": "Carl", "roles": ["cleaner"], "badge": "b-carl"},
        ],
        "rules": [
            {
                "name": "patient-call",
                "devices": {"kind": "call_button"},
                "levels": [{"after": "0s", "roles": ["nurse"]}],
                "resolve_by_presence": {"roles": ["nurse"], "dwell": "1s"},
            },
            {
                "name": "code-blue",
                "priority": "code",
                "devices": {"kind": "code_button"},
                "levels": [{"after": "0s", "roles": ["nurse"]}],
            },
            {
                "name": "visits",
                "kind": "count",
                "devices": {"kind": "people_counter"},
                "at_least": 3,
                "levels": LEVELS,
            },
            {
                "name": "towels-low",
                "kind": "threshold",
                "devices": {"kind": "dispenser"},
                "reading": "towel_level",
                "below": 15,
                "clear_at": 25,
                "for": "1s",
                "levels": LEVELS,
            },
            {
                "name": "restroom-feedback",
                "kind": "feedback",
                "devices": {"kind": "feedback_terminal"},
                "at_least": 2,
                "share": 0.5,
                "min_interval": "0s",
                "kudos_after": 3,
                "levels": LEVELS,
            },
            {
                "name": "dispenser-offline",
                "kind": "supervision",
                "devices": {"kind": "dispenser"},
                "heartbeat": "2s",
                "levels": LEVELS,
            },
        ],
    }


@pytest.fixture
def restroom(
    start_gateway: Callable[..., GatewayProcess], topics: SiteTopics
) -> GatewayProcess:
    return start_gateway(site=restroom_site(topics.site))


def send(client: MqttClient, topics: SiteTopics, device: str, kind: str, **fields: Any):
    client.publish(topics.events(device), event(device, kind) | fields)


def test_count_opens_a_gap_and_a_clean_press_closes_it(restroom, mqtt, topics):
    """The third visit opens the restroom gap; the cleaned button resolves it."""
    display = mqtt(topics.alerts)
    device = mqtt()
    for _ in range(3):
        send(device, topics, "door-1", "visit")
    opened = display.wait_for_json(rule="visits", state="open")
    assert (opened["zone"], opened["detail"]) == ("restroom", {"count": 3})
    send(device, topics, "clean-1", "cleaned")
    closed = display.wait_for_json(rule="visits", state="resolved")
    assert closed["resolved_via"] == "station"


def test_counter_survives_a_restart(start_gateway, mqtt, topics):
    """Two visits, kill -9, restart: the third visit still opens the gap."""
    gateway = start_gateway(site=restroom_site(topics.site))
    display = mqtt(topics.alerts)
    device = mqtt()
    send(device, topics, "door-1", "visit")
    send(device, topics, "door-1", "visit")
    key = "count/visits/restroom"
    wait_until(
        lambda: (
            [
                json.loads(row["value"])
                for row in gateway.query(
                    "SELECT value FROM engine_state WHERE key = ?", key
                )
            ]
            == [{"count": 2, "times": []}]
        ),
        what="the count of two visits in the database",
    )
    gateway.kill()
    gateway.start()
    send(device, topics, "door-1", "visit")
    assert display.wait_for_json(rule="visits", state="open")["detail"] == {"count": 3}


def test_threshold_lasting_its_duration_opens_and_clears(restroom, mqtt, topics):
    """Towels under 15 % for a second open the gap; 30 % clears it."""
    display = mqtt(topics.alerts)
    device = mqtt()
    send(device, topics, "towel-1", "reading", reading="towel_level", value=10)
    opened = display.wait_for_json(rule="towels-low", state="open", timeout=5)
    assert opened["detail"] == {"reading": "towel_level", "value": 10.0}
    send(device, topics, "towel-1", "reading", reading="towel_level", value=30)
    cleared = display.wait_for_json(rule="towels-low", state="resolved")
    assert cleared["resolved_via"] == "cleared"


def test_unhappy_guests_open_a_gap_and_happy_ones_send_kudos(restroom, mqtt, topics):
    """Two unhappy presses open the gap; three happy ones credit the team."""
    display = mqtt(topics.alerts, f"facility/{topics.site}/zones/+/kudos")
    device = mqtt()
    send(device, topics, "smiley-1", "feedback", score="unhappy")
    send(device, topics, "smiley-1", "feedback", score="very_unhappy")
    opened = display.wait_for_json(rule="restroom-feedback", state="open")
    assert opened["detail"] == {"share": 1.0, "presses": 2}
    for _ in range(3):
        send(device, topics, "smiley-1", "feedback", score="happy")
    kudos = display.wait_for_json(
        f"facility/{topics.site}/zones/restroom/kudos", presses=3
    )
    assert kudos["staff"] == ["ana", "carl"]


def test_silent_dispenser_raises_trouble_until_it_reports(restroom, mqtt, topics):
    """No message for the heartbeat opens trouble; the next one clears it."""
    display = mqtt(topics.alerts)
    availability = mqtt(f"facility/{topics.site}/devices/towel-1/availability")
    opened = display.wait_for_json(rule="dispenser-offline", state="open", timeout=6)
    assert opened["device"] == "towel-1"
    availability.wait_for(lambda m: m.payload == b"offline", what="offline")
    send(mqtt(), topics, "towel-1", "heartbeat")
    display.wait_for_json(rule="dispenser-offline", state="resolved")
    availability.wait_for(lambda m: m.payload == b"online", what="online")


def test_nurse_badge_in_the_room_resolves_the_call(restroom, mqtt, topics):
    """A nurse's badge in the room for the dwell time closes the call, with proof."""
    display = mqtt(topics.alerts)
    device = mqtt()
    send(device, topics, "call-1", "call")
    display.wait_for_json(rule="patient-call", state="open")
    send(device, topics, "rx-1", "enter", badge="b-ana", zone="room-1", rssi=-58)
    closed = display.wait_for_json(rule="patient-call", state="resolved", timeout=5)
    assert (closed["resolved_by"], closed["resolved_via"]) == ("ana", "presence")
    assert closed["proof"]["badge"] == "b-ana"
    assert closed["proof"]["signal"] == -58


def test_code_call_cannot_be_resolved_from_a_pager(restroom, mqtt, topics):
    """A resolve for a code call is refused and counted; the station cancels it."""
    display = mqtt(topics.alerts)
    device = mqtt()
    send(device, topics, "code-1", "call")
    alert = display.wait_for_json(rule="code-blue", state="open")
    device.publish(topics.resolve(alert["id"]), {"staff": "ana"})
    send(device, topics, "code-1", "cancel")
    closed = display.wait_for_json(rule="code-blue", state="resolved")
    assert closed["resolved_via"] == "station"
    assert restroom.healthz()["messages_rejected"] == {"station_only": 1}


def test_technician_silences_a_zone_then_ends_it(restroom, mqtt, topics):
    """A silenced zone's call opens held, with no page; ending it pages at once."""
    display = mqtt(topics.alerts, f"facility/{topics.site}/silences/+")
    pagers = mqtt(topics.pagers)
    device = mqtt()
    device.publish(
        f"facility/{topics.site}/silences",
        {"staff": "ana", "zone": "ward", "until": time.time() + 600, "reason": "drill"},
    )
    silence = display.wait_for_json(zone="ward", reason="drill")
    send(device, topics, "call-1", "call")
    held = display.wait_for_json(rule="patient-call", state="open")
    assert held["held"] is True
    device.publish(f"facility/{topics.site}/silences/{silence['id']}/end", {})
    released = display.wait_for_json(rule="patient-call", held=False)
    assert released["id"] == held["id"]
    page = pagers.wait_for_json(alert=held["id"])
    assert page["reason"] == "released"
    assert [m for m in pagers.messages if m.json.get("reason") == "opened"] == []


def test_code_call_holds_routine_pages_in_its_zone(restroom, mqtt, topics):
    """During a code call, a routine call in the same zone is shown but not paged."""
    display = mqtt(topics.alerts)
    pagers = mqtt(topics.pagers)
    device = mqtt()
    send(device, topics, "code-1", "call")
    display.wait_for_json(rule="code-blue", state="open")
    send(device, topics, "call-1", "call")
    routine = display.wait_for_json(rule="patient-call", state="open")
    assert routine["held"] is True
    send(device, topics, "code-1", "cancel")
    page = pagers.wait_for_json(alert=routine["id"])
    assert page["reason"] == "released"


def test_reminder_ack_timeout_composite_and_schedule_through_the_gateway(
    start_gateway, mqtt, topics
):
    """Reminders, an acknowledgement that times out, a composite gap and a rule
    outside its active hours, all over MQTT."""
    site = restroom_site(topics.site)
    call = site["rules"][0]
    call["resolve_by_presence"] = None
    call["ack_timeout"] = "2s"
    call["levels"] = [{"after": "0s", "roles": ["nurse"], "remind_every": "1s"}]
    site["rules"][2]["levels"] = []  # visits: a condition only
    site["rules"][3]["levels"] = []  # towels-low: a condition only
    site["rules"].append(
        {
            "name": "restroom-service",
            "kind": "composite",
            "all": ["visits", "towels-low"],
            "levels": LEVELS,
        }
    )
    # Active only in an hour six hours from now (UTC): closed during the test.
    closed_minute = time.strftime("%H:%M", time.gmtime(time.time() + 6 * 3600))
    site["rules"].append(
        {
            "name": "after-hours",
            "devices": {"kind": "clean_button"},
            "opens_on": "help",
            "active": [{"start": closed_minute, "end": closed_minute[:3] + "59"}],
            "levels": LEVELS,
        }
    )
    start_gateway(site=site)
    display = mqtt(topics.alerts)
    pagers = mqtt(topics.pagers)
    device = mqtt()

    send(device, topics, "call-1", "call")
    alert = display.wait_for_json(rule="patient-call", state="open")
    pagers.wait_for_json(alert=alert["id"], reason="reminded", timeout=5)
    device.publish(topics.ack(alert["id"]), {"staff": "ana"})
    display.wait_for_json(id=alert["id"], state="acknowledged")
    after_ack = display.mark()
    reopened = display.wait_for_json(
        id=alert["id"], state="open", after=after_ack, timeout=5
    )
    assert reopened["version"] > alert["version"]
    pagers.wait_for_json(alert=alert["id"], reason="reopened", timeout=5)

    for _ in range(3):
        send(device, topics, "door-1", "visit")
    send(device, topics, "towel-1", "reading", reading="towel_level", value=5)
    composite = display.wait_for_json(rule="restroom-service", state="open", timeout=5)
    assert composite["zone"] == "restroom"
    send(device, topics, "towel-1", "reading", reading="towel_level", value=90)
    display.wait_for_json(rule="restroom-service", state="resolved")

    send(device, topics, "clean-1", "help")
    send(device, topics, "call-1", "cancel")  # a marker after the help press
    display.wait_for_json(id=alert["id"], state="resolved")
    assert not [
        m for m in display.messages if m.payload and m.json["rule"] == "after-hours"
    ]
