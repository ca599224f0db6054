"""Devices that speak their own MQTT dialect: ESPHome nodes and Zigbee2MQTT.

Our own devices publish the gateway's contract directly (drivers.mqtt_device).
Off-the-shelf firmware does not, so each such device is mapped in the site
file from its topic and dialect to our events::

    mqtt_devices:
      - device: call-301                 # ESPHome binary sensor: ON is a press
        topic: esphome/call-301/binary_sensor/call_button/state
        dialect: esphome
        press: call
      - device: clean-2f                 # Zigbee2MQTT button: action -> event
        topic: zigbee2mqtt/wc-2f-button
        dialect: zigbee2mqtt
        actions: {single: cleaned, double: call}
        readings: {battery: battery}

Both dialects retain state by default (ESPHome's ``retain`` defaults to true),
so a broker replays the last ``ON`` to every new subscriber. A retained
message is therefore never a press, and a press is only an ``OFF`` to ``ON``
edge: an ``ON`` repeated without an ``OFF`` between (a QoS 1 redelivery, a
reconnect) is the same press, not a new one.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

from pydantic import Field, model_validator

from drivers.base import make_event
from drivers.mqtt_device import RejectedMessage, decode_json_object
from rules.events import Event
from rules.schema import StrictModel

log = logging.getLogger(__name__)


class MappedDevice(StrictModel):
    """One device of another firmware, and what its messages mean to us."""

    device: str = Field(min_length=1)
    """The site file's device id the events are about."""

    topic: str = Field(min_length=1)
    """The exact topic the device publishes on (no wildcards)."""

    dialect: Literal["esphome", "zigbee2mqtt"]
    press: str | None = None
    """ESPHome binary sensor: event type of an OFF-to-ON edge, e.g. ``call``."""

    actions: dict[str, str] = {}
    """Zigbee2MQTT ``action`` values (or ESPHome ``event_type``) -> event type."""

    readings: dict[str, str] = {}
    """JSON keys (Zigbee2MQTT) -> reading names; an ESPHome sensor topic uses
    the single entry ``{"value": <reading name>}``."""

    @model_validator(mode="after")
    def _means_something(self) -> MappedDevice:
        if "+" in self.topic or "#" in self.topic:
            raise ValueError(
                f"topic {self.topic!r}: give the exact topic, no wildcards"
            )
        if self.press is None and not self.actions and not self.readings:
            raise ValueError(
                f"device {self.device!r}: map at least one of 'press', 'actions' "
                "or 'readings', or nothing would ever be read"
            )
        return self


class NativeDevices:
    """Turns messages on mapped topics into engine events."""

    name = "mqtt-native"

    def __init__(self, devices: tuple[MappedDevice, ...]) -> None:
        self._by_topic: dict[str, MappedDevice] = {}
        for mapped in devices:
            if mapped.topic in self._by_topic:
                raise ValueError(f"topic {mapped.topic!r} is mapped twice")
            self._by_topic[mapped.topic] = mapped
        self._pressed: dict[str, bool] = {}
        self.handled = 0

    @property
    def topics(self) -> tuple[str, ...]:
        return tuple(self._by_topic)

    def handles(self, topic: str) -> bool:
        return topic in self._by_topic

    def health(self) -> dict[str, Any]:
        return {"devices": len(self._by_topic), "messages": self.handled}

    def translate(
        self, topic: str, payload: bytes, retain: bool, max_payload: int
    ) -> list[Event]:
        """The events one message means; RejectedMessage if it cannot be read."""
        mapped = self._by_topic[topic]
        self.handled += 1
        if retain:
            # Old state replayed on subscribe: note it, so the next real OFF
            # to ON edge is recognised, but it is not a press. Expected on
            # every connect, so it is not counted as a rejection.
            self._note_state(mapped, payload)
            log.debug("Retained state on %s taken as state, not a press", topic)
            return []
        if len(payload) > max_payload:
            raise RejectedMessage(
                "oversized", f"payload is {len(payload)} bytes, limit {max_payload}"
            )
        if mapped.dialect == "esphome":
            return self._esphome(mapped, payload, max_payload)
        return self._zigbee2mqtt(mapped, payload, max_payload)

    # -- ESPHome -----------------------------------------------------------------

    def _esphome(
        self, mapped: MappedDevice, payload: bytes, max_payload: int
    ) -> list[Event]:
        text = payload.decode("utf-8", "replace").strip()
        if text in ("ON", "OFF"):
            return self._edge(mapped, text == "ON")
        if text.startswith("{"):
            body = decode_json_object(payload, max_payload)
            return self._actions(mapped, body.get("event_type"))
        if "value" in mapped.readings:
            value = _number(text)
            return [
                make_event(
                    mapped.device,
                    "reading",
                    reading=mapped.readings["value"],
                    value=value,
                )
            ]
        raise RejectedMessage(
            "bad_field", f"{mapped.topic}: unexpected payload {text[:40]!r}"
        )

    def _edge(self, mapped: MappedDevice, on: bool) -> list[Event]:
        was_on = self._pressed.get(mapped.topic, False)
        self._pressed[mapped.topic] = on
        if on and not was_on and mapped.press is not None:
            return [make_event(mapped.device, mapped.press)]
        return []

    def _note_state(self, mapped: MappedDevice, payload: bytes) -> None:
        text = payload.decode("utf-8", "replace").strip()
        if mapped.dialect == "esphome" and text in ("ON", "OFF"):
            self._pressed[mapped.topic] = text == "ON"

    # -- Zigbee2MQTT --------------------------------------------------------------

    def _zigbee2mqtt(
        self, mapped: MappedDevice, payload: bytes, max_payload: int
    ) -> list[Event]:
        body = decode_json_object(payload, max_payload)
        events = self._actions(mapped, body.get("action"))
        for key, reading in mapped.readings.items():
            if key in body and body[key] is not None:
                value = _number(body[key])
                events.append(
                    make_event(mapped.device, "reading", reading=reading, value=value)
                )
        return events

    def _actions(self, mapped: MappedDevice, action: Any) -> list[Event]:
        # Zigbee2MQTT sends an empty action right after each real one to
        # reset it; that, and actions we do not map, mean nothing to us.
        if not isinstance(action, str) or action not in mapped.actions:
            return []
        return [make_event(mapped.device, mapped.actions[action])]


def _number(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise RejectedMessage(
            "bad_field", f"expected a number, got {value!r:.40}"
        ) from None
    if isinstance(value, bool) or not math.isfinite(number):
        raise RejectedMessage("bad_field", f"expected a number, got {value!r:.40}")
    return number
