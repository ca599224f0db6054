"""ESPHome and Zigbee2MQTT devices mapped from their own topics."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from pydantic import ValidationError

from drivers.mqtt_device import RejectedMessage
from drivers.mqtt_native import MappedDevice, NativeDevices
from tests.helpers import GatewayProcess, SiteTopics, site_config

ESPHOME_CALL = "esphome/call-1/binary_sensor/call_button/state"
ESPHOME_LEVEL = "esphome/towel-1/sensor/towel_level/state"
Z2M_BUTTON = "zigbee2mqtt/bed-2-button"
LIMIT = 4096


def native() -> NativeDevices:
    return NativeDevices(
        (
            MappedDevice(
                device="call-1", topic=ESPHOME_CALL, dialect="esphome", press="call"
            ),
            MappedDevice(
                device="call-2",
                topic=Z2M_BUTTON,
                dialect="zigbee2mqtt",
                actions={"single": "call", "double": "cancel"},
                readings={"battery": "battery"},
            ),
            MappedDevice(
                device="towel-1",
                topic=ESPHOME_LEVEL,
                dialect="esphome",
                readings={"value": "towel_level"},
            ),
        )
    )


def kinds(events: list[Any]) -> list[tuple[str, str]]:
    return [(event.device, event.type) for event in events]


def test_esphome_press_is_an_off_to_on_edge():
    devices = native()
    assert kinds(devices.translate(ESPHOME_CALL, b"ON", False, LIMIT)) == [
        ("call-1", "call")
    ]
    assert devices.translate(ESPHOME_CALL, b"ON", False, LIMIT) == []  # same press
    assert devices.translate(ESPHOME_CALL, b"OFF", False, LIMIT) == []
    assert kinds(devices.translate(ESPHOME_CALL, b"ON", False, LIMIT)) == [
        ("call-1", "call")
    ]


def test_retained_on_is_state_not_a_press():
    """The broker replays ESPHome's retained ON on subscribe: no call."""
    devices = native()
    assert devices.translate(ESPHOME_CALL, b"ON", True, LIMIT) == []
    assert devices.translate(ESPHOME_CALL, b"ON", False, LIMIT) == []
    devices.translate(ESPHOME_CALL, b"OFF", False, LIMIT)
    assert kinds(devices.translate(ESPHOME_CALL, b"ON", False, LIMIT)) == [
        ("call-1", "call")
    ]


def test_zigbee2mqtt_actions_and_readings():
    devices = native()
    body = json.dumps({"action": "single", "battery": 87, "linkquality": 120})
    events = devices.translate(Z2M_BUTTON, body.encode(), False, LIMIT)
    assert kinds(events) == [("call-2", "call"), ("call-2", "reading")]
    assert events[1].fields == {"reading": "battery", "value": 87.0}
    # The empty action Zigbee2MQTT sends after each real one means nothing.
    assert devices.translate(Z2M_BUTTON, b'{"action": ""}', False, LIMIT) == []


def test_esphome_sensor_value_is_a_reading():
    events = native().translate(ESPHOME_LEVEL, b"12.5", False, LIMIT)
    assert [(e.type, e.fields) for e in events] == [
        ("reading", {"reading": "towel_level", "value": 12.5})
    ]


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        (Z2M_BUTTON, b"not json", "malformed_json"),
        (Z2M_BUTTON, b'{"battery": "full"}', "bad_field"),
        (ESPHOME_LEVEL, b"nan", "bad_field"),
        (ESPHOME_CALL, b"MAYBE", "bad_field"),
        (Z2M_BUTTON, b"{" + b" " * LIMIT + b"}", "oversized"),
    ],
)
def test_unreadable_message_is_rejected_with_a_reason(topic, payload, reason):
    with pytest.raises(RejectedMessage) as caught:
        native().translate(topic, payload, False, LIMIT)
    assert caught.value.reason == reason


def test_mapping_must_mean_something_and_use_exact_topics():
    with pytest.raises(ValidationError, match="map at least one"):
        MappedDevice(device="x", topic="a/b", dialect="esphome")
    with pytest.raises(ValidationError, match="no wildcards"):
        MappedDevice(device="x", topic="a/+", dialect="esphome", press="call")


def test_esphome_and_zigbee_devices_through_the_gateway(
    start_gateway: Callable[..., GatewayProcess], mqtt, topics: SiteTopics
):
    """A retained ON waiting on the broker opens nothing; a live press does."""
    site = site_config(topics.site)
    site["mqtt_devices"] = [
        {
            "device": "call-1",
            "topic": ESPHOME_CALL,
            "dialect": "esphome",
            "press": "call",
        },
        {
            "device": "call-2",
            "topic": Z2M_BUTTON,
            "dialect": "zigbee2mqtt",
            "actions": {"single": "call"},
        },
    ]
    device = mqtt()
    device.publish(ESPHOME_CALL, "ON", retain=True)
    gateway = start_gateway(site=site)
    display = mqtt(topics.alerts)

    device.publish(Z2M_BUTTON, {"action": "single"})
    opened = display.wait_for_json(device="call-2", state="open")
    assert opened["rule"] == "patient-call"
    about_call_1 = [
        m for m in display.messages if m.payload and m.json["device"] == "call-1"
    ]
    assert about_call_1 == []

    device.publish(ESPHOME_CALL, "OFF", retain=True)
    device.publish(ESPHOME_CALL, "ON", retain=True)
    display.wait_for_json(device="call-1", state="open")
    assert gateway.healthz()["messages_rejected"] == {}
