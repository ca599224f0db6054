"""Dome lights of call stations on MQTT: ``devices/<id>/light``, retained.

A station with a dome is a device that some enabled call rule listens to,
that no driver of this gateway reads (a GPIO light is driven by
``drivers/gpio.py`` itself; serial hubs and Bluetooth adapters have no lamp)
and that no ``mqtt_devices`` entry maps (a Zigbee or stock ESPHome button
does not read our topics). For each, the gateway publishes ``on``, ``blink``
or ``off`` (``rules/dome.py``), retained, whenever one of its call alerts
changes, and for every station on each (re)connect: a station that reboots
gets its state from the broker, and a call resolved while the link was
down is put out once it is back.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

from rules.dome import OFF, call_rules, call_stations, light_for, strongest

if TYPE_CHECKING:
    from gateway.config import GatewayConfig
    from gateway.contract import Topics
    from gateway.mqtt import MQTTLink
    from rules.alerts import Alert, Change

log = logging.getLogger(__name__)


class DomeLights:
    """What each MQTT call station's dome shows, published as it changes.

    Args:
        link: the broker link the states are published on.
        topics: the site's topic names.
        config: the site file, for its devices, zones and rules.
        owned: devices a driver of this gateway reads; they get no topic.
    """

    def __init__(
        self,
        link: MQTTLink,
        topics: Topics,
        config: GatewayConfig,
        owned: Iterable[str] = (),
    ) -> None:
        self._link = link
        self._topics = topics
        self._owned = frozenset(owned) | {m.device for m in config.mqtt_devices}
        self._stations, self._rules = self._targets(config)
        self._alerts: dict[str, dict[str, str]] = {}
        """Per station: alert id -> the light that alert asks for."""

        self._shown: dict[str, str] = {}
        """Per station: the state last handed to the link."""

    @property
    def stations(self) -> frozenset[str]:
        """Devices whose dome this gateway drives over MQTT."""
        return self._stations

    def changed(self, changes: Iterable[Change]) -> None:
        """Publish the lights of the stations these committed changes touch."""
        touched = {c.alert.device for c in changes if self._note(c.alert)}
        for device in sorted(touched):
            self._publish(device, again=False)

    def all_again(self, alerts: Iterable[Alert]) -> None:
        """Publish every station's light from the unresolved alerts (on connect)."""
        self._alerts = {}
        for alert in alerts:
            self._note(alert)
        for device in sorted(self._stations):
            self._publish(device, again=True)
        log.info("Published the dome light of %d call station(s)", len(self._stations))

    def retarget(self, config: GatewayConfig, alerts: Iterable[Alert]) -> None:
        """Take a new rule set: stations no call rule hears any more go dark."""
        before = self._stations
        self._stations, self._rules = self._targets(config)
        for device in sorted(before - self._stations):
            self._send(device, OFF)
            self._shown.pop(device, None)
        self._alerts = {}
        for alert in alerts:
            self._note(alert)
        for device in sorted(self._stations):
            self._publish(device, again=False)

    def _targets(self, config: GatewayConfig) -> tuple[frozenset[str], frozenset[str]]:
        found = call_stations(config.devices, config.zones, config.rules)
        return found - self._owned, call_rules(config.rules)

    def _note(self, alert: Alert) -> bool:
        """Keep the light one alert asks for; True if it is a station's call."""
        device = alert.device
        if device not in self._stations or alert.rule not in self._rules:
            return False
        light = light_for(alert.state.value)
        lights = self._alerts.setdefault(device, {})
        if light is None or light == OFF:
            lights.pop(alert.id, None)
        else:
            lights[alert.id] = light
        return True

    def _publish(self, device: str, *, again: bool) -> None:
        wanted = strongest(self._alerts.get(device, {}).values())
        if again or self._shown.get(device) != wanted:
            self._send(device, wanted)

    def _send(self, device: str, light: str) -> None:
        # Retained: a station that connects later, or reboots, reads it then.
        # Paho keeps a publish made while the link is down for the next
        # connection, and all_again() follows each connect anyway.
        topic = self._topics.device_light(device)
        self._link.publish(topic, light.encode(), retain=True)
        self._shown[device] = light
        log.debug("Dome light of %s: %s", device, light)
