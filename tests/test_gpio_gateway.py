"""A call button and a dome light on GPIO, through the whole gateway.

The gateway runs in this process (so the test can put a finger on
gpiozero's mock pins) against a real Mosquitto and a real SQLite file.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from gpiozero import Button
from gpiozero.pins.mock import MockFactory

from drivers.gpio import GPIODriver
from gateway.broker import PrivateBroker
from gateway.config import load_config
from gateway.service import Gateway
from tests.helpers import SiteTopics, event, site_config, wait_until, write_site

BUTTON, LIGHT = 17, 18


@pytest.fixture
def gpio_gateway(
    broker: PrivateBroker, tmp_path: Path, topics: SiteTopics
) -> Iterator[tuple[Gateway, MockFactory]]:
    site = site_config(topics.site)
    site["gpio"] = {
        "buttons": [{"pin": BUTTON, "device": "call-1", "press": "call"}],
        "lights": [{"pin": LIGHT, "device": "call-1"}],
        "mock": True,
    }
    environ = {
        "GATEWAY_MQTT__PORT": str(broker.port),
        "GATEWAY_MQTT__USERNAME": "gateway",
        "GATEWAY_MQTT__PASSWORD": broker.passwords["gateway"],
        "GATEWAY_DATABASE__PATH": str(tmp_path / "gw.db"),
        "GATEWAY_WEB__ENABLED": "false",
    }
    config = load_config(write_site(tmp_path / "site.yaml", site), environ)
    factory = MockFactory()
    assert config.gpio is not None
    gateway = Gateway(config, drivers=[GPIODriver(config.gpio, pin_factory=factory)])

    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=loop.run_until_complete, args=(gateway.run(),))
    runner.start()
    wait_until(lambda: gateway.link.connected, what="the gateway's broker link")
    yield gateway, factory

    loop.call_soon_threadsafe(gateway.stop)
    runner.join(timeout=10)
    loop.close()
    factory.close()


def test_button_press_opens_a_call_and_lights_the_dome(gpio_gateway, mqtt, topics):
    """Pressing the pin opens the alert; resolving it puts the light out."""
    gateway, factory = gpio_gateway
    display = mqtt(topics.alerts)
    button, light = factory.pin(BUTTON), factory.pin(LIGHT)

    button.drive_low()
    time.sleep(0.1)  # held well past the 20 ms debounce
    button.drive_high()
    alert = display.wait_for_json(device="call-1", state="open")
    wait_until(lambda: light.state, what="the dome light on")

    mqtt().publish(topics.resolve(alert["id"]), {"staff": "ana"})
    display.wait_for_json(device="call-1", state="resolved")
    wait_until(lambda: not light.state, what="the dome light off")
    assert gateway.engine.alerts == []


def test_a_pin_in_use_raises_trouble_at_once_and_alerting_goes_on(
    broker: PrivateBroker, tmp_path: Path, topics: SiteTopics, mqtt
):
    """Another program holds the call button's pin when the gateway starts.

    The bed's call button cannot work: supervision (no heartbeat, since a
    button is silent by nature) raises trouble at once, MQTT devices still
    raise calls, and once the pin is free the retried driver starts and the
    trouble clears.
    """
    site = site_config(topics.site)
    site["gpio"] = {
        "buttons": [{"pin": BUTTON, "device": "call-1", "press": "call"}],
        "mock": True,
    }
    site["rules"].append(
        {
            "name": "button-unreachable",
            "kind": "supervision",
            "devices": {"ids": ["call-1"]},
            "levels": [{"after": "0s", "roles": ["charge_nurse"]}],
        }
    )
    environ = {
        "GATEWAY_MQTT__PORT": str(broker.port),
        "GATEWAY_MQTT__USERNAME": "gateway",
        "GATEWAY_MQTT__PASSWORD": broker.passwords["gateway"],
        "GATEWAY_DATABASE__PATH": str(tmp_path / "gw.db"),
        "GATEWAY_WEB__ENABLED": "false",
    }
    config = load_config(write_site(tmp_path / "site.yaml", site), environ)
    factory = MockFactory()
    squatter = Button(BUTTON, pin_factory=factory)
    assert config.gpio is not None
    display = mqtt(topics.alerts)
    gateway = Gateway(config, drivers=[GPIODriver(config.gpio, pin_factory=factory)])
    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=loop.run_until_complete, args=(gateway.run(),))
    runner.start()
    try:
        trouble = display.wait_for_json(rule="button-unreachable", state="open")
        assert trouble["device"] == "call-1"
        assert "cannot be opened" in trouble["detail"]["reason"]
        assert "gpio" in gateway.driver_failures

        mqtt().publish(topics.events("call-2"), event("call-2"))
        display.wait_for_json(device="call-2", state="open")

        squatter.close()
        display.wait_for_json(id=trouble["id"], state="resolved", timeout=15)
        assert gateway.driver_failures == {}
        factory.pin(BUTTON).drive_low()
        time.sleep(0.1)
        factory.pin(BUTTON).drive_high()
        display.wait_for_json(device="call-1", rule="patient-call", state="open")
    finally:
        loop.call_soon_threadsafe(gateway.stop)
        runner.join(timeout=10)
        loop.close()
        factory.close()
