"""Dome lights of call stations on MQTT: ``devices/<id>/light``, retained.

The pure mapping (``rules/dome.py``) on its own, then the gateway as a
subprocess against a real Mosquitto: a call turns its station's dome on,
escalation makes it blink, an acknowledgement steadies it, a resolve puts it
out, and a station that subscribes late (a reboot) reads the current state.
"""

from __future__ import annotations

import pytest

from rules.dome import BLINK, OFF, ON, call_stations, light_for, strongest
from rules.schema import CallRule, SupervisionRule
from rules.site import Device, Zone
from tests.helpers import FAST_LEVELS, MqttClient, SiteTopics, event, site_config

# -- the mapping -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "light"),
    [("open", ON), ("acknowledged", ON), ("escalated", BLINK), ("resolved", OFF)],
)
def test_each_alert_state_has_its_light(state: str, light: str) -> None:
    assert light_for(state) == light


def test_unknown_state_and_strongest_light() -> None:
    assert light_for("snoozed") is None
    assert strongest([]) == OFF
    assert strongest([ON, OFF]) == ON
    assert strongest([ON, BLINK, ON]) == BLINK


def test_call_stations_are_the_devices_a_call_rule_hears() -> None:
    zones = [
        Zone(id="west", rooms=({"id": "r1"}, {"id": "r2"})),
        Zone(id="east", rooms=({"id": "r3"},)),
    ]
    devices = [
        Device(id="call-1", kind="call_button", room="r1"),
        Device(id="call-3", kind="call_button", room="r3"),
        Device(id="pull-2", kind="pull_cord", room="r2"),
        Device(id="towel-1", kind="dispenser", room="r1"),
        Device(id="spare", kind="call_button"),
    ]
    level = {"after": "0s", "roles": ["nurse"]}
    west_calls = CallRule(
        name="west", devices={"kind": "call_button", "zones": ["west"]}, levels=[level]
    )
    cords = CallRule(name="cords", devices={"ids": ["pull-2"]}, levels=[level])
    off = CallRule(name="off", enabled=False, levels=[level])
    watch = SupervisionRule(
        kind="supervision", name="watch", heartbeat=60, levels=[level]
    )

    assert call_stations(devices, zones, [west_calls, cords, off, watch]) == {
        "call-1",
        "pull-2",
    }
    # A call rule without a selector hears every device, as in the engine.
    every = CallRule(name="all", levels=[level])
    assert call_stations(devices, zones, [every]) == {d.id for d in devices}


# -- the gateway, against a real broker ---------------------------------------------


def light(topics: SiteTopics, device: str) -> str:
    return f"facility/{topics.site}/devices/{device}/light"


def next_light(client: MqttClient, topic: str, after: int) -> tuple[str, bool]:
    """The next light state on ``topic`` after message ``after``, and its retain."""
    message = client.wait_for(
        lambda m: m.topic == topic, after=after, what=f"a light state on {topic}"
    )
    return message.payload.decode(), message.retain


def alert_state(client: MqttClient, **fields: object) -> dict:
    """Wait for an alert state with these fields among lights and alerts."""
    found = client.wait_for(
        lambda m: "/alerts/" in m.topic and m.matches(None, fields),
        what=f"an alert with {fields}",
    )
    return found.json


def test_dome_follows_the_call(start_gateway, mqtt, topics):
    """on, blink on escalation, on when acknowledged, off when resolved."""
    site = site_config(topics.site, levels=FAST_LEVELS)
    # call-4's dome hangs on the Pi's pins: the GPIO driver drives it.
    site["gpio"] = {"mock": True, "lights": [{"pin": 18, "device": "call-4"}]}
    start_gateway(site=site)
    topic = light(topics, "call-1")
    station = mqtt(topic)
    # On connect the gateway states every station's light: off, no call yet.
    assert next_light(station, topic, 0) == (OFF, True)

    watcher = mqtt(light(topics, "+"))
    display = mqtt(topics.alerts)
    mark = station.mark()
    mqtt().publish(topics.events("call-1"), event("call-1"))
    assert next_light(station, topic, mark)[0] == ON
    opened = display.wait_for_json(device="call-1", state="open")

    # Escalation after 1 s: blinking, and a station rebooting now reads it.
    mark = station.mark()
    assert next_light(station, topic, mark)[0] == BLINK
    assert next_light(mqtt(topic), topic, 0) == (BLINK, True)

    mark = station.mark()
    mqtt().publish(topics.staff("ben", "ack"), {"alert": opened["id"]})
    assert next_light(station, topic, mark)[0] == ON

    mark = station.mark()
    mqtt().publish(topics.staff("ben", "resolve"), {"alert": opened["id"]})
    assert next_light(station, topic, mark)[0] == OFF
    assert next_light(mqtt(topic), topic, 0) == (OFF, True)

    # Only call-1's light changed; the GPIO station never had a topic (it
    # would have come with the others, before call-1's first "on").
    watcher.wait_for_count(lambda m: m.topic == topic, 5)
    lights = watcher.messages
    others = {m.topic: m.payload for m in lights if m.topic != topic}
    assert others == {light(topics, f"call-{n}"): b"off" for n in (2, 3)}
    assert [m.payload for m in lights if m.topic == topic] == [
        b"off",  # retained, read on subscribing
        b"on",
        b"blink",
        b"on",
        b"off",
    ]


def test_two_calls_on_one_station_keep_it_lit(start_gateway, mqtt, topics):
    """Two rules' calls on one station: the dome goes out only when both are closed."""
    site = site_config(topics.site)
    site["rules"].append(
        {
            "name": "bath-cord",
            "priority": "urgent",
            "devices": {"kind": "call_button"},
            "opens_on": "pull",
            "cancels_on": "reset",
            "levels": [{"after": "0s", "roles": ["nurse"]}],
        }
    )
    start_gateway(site=site)
    topic = light(topics, "call-2")
    # One client for lights and alerts: the broker keeps their order.
    station = mqtt(topic, topics.alerts)
    assert next_light(station, topic, 0) == (OFF, True)
    device = mqtt()

    mark = station.mark()
    device.publish(topics.events("call-2"), event("call-2"))
    assert next_light(station, topic, mark)[0] == ON
    call = alert_state(station, device="call-2", state="open", rule="patient-call")
    device.publish(topics.events("call-2"), event("call-2", "pull"))
    alert_state(station, device="call-2", state="open", rule="bath-cord")

    # The first call closes; the cord's call keeps the dome lit. A repeat
    # pull, published after the cancel's batch, shows nothing came between.
    device.publish(topics.events("call-2"), event("call-2", "cancel"))
    alert_state(station, id=call["id"], state="resolved")
    device.publish(topics.events("call-2"), event("call-2", "pull"))
    alert_state(station, rule="bath-cord", repeats=1)
    assert [m.payload for m in station.messages if m.topic == topic] == [b"off", b"on"]

    mark = station.mark()
    device.publish(topics.events("call-2"), event("call-2", "reset"))
    assert next_light(station, topic, mark)[0] == OFF
