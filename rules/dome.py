"""What a call station's dome light shows for the state of its calls.

One mapping for every dome, wherever it hangs: a lamp on the Pi's own pins
(``drivers/gpio.py``) and an ESPHome station told over MQTT
(``gateway/lights.py``, the ``devices/<id>/light`` topic)::

    no call ──(call)──► open: on ──(nobody answers in time)──► escalated: blink
                          ▲                                        │
                          └──────── acknowledged: on ◄─────────────┘
    resolved (cancel, pager, presence, web) ──► off

Of several alerts on one device, the strongest sets the light: blink over on
over off. Pure: no I/O, so drivers and the gateway share it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from rules.schema import CallRule, RuleBase
from rules.site import Device, Zone

OFF, ON, BLINK = "off", "on", "blink"
"""The light's three states; also the payloads of ``devices/<id>/light``."""

LIGHTS = (OFF, ON, BLINK)

_LIGHT_FOR_STATE = {
    "open": ON,
    "acknowledged": ON,
    "escalated": BLINK,
    "resolved": OFF,
}
_STRENGTH = {OFF: 0, ON: 1, BLINK: 2}


def light_for(state: str) -> str | None:
    """The light one alert in ``state`` asks for; None for a state it does not know."""
    return _LIGHT_FOR_STATE.get(state)


def strongest(lights: Iterable[str]) -> str:
    """The light a device shows for all its alerts' lights; ``off`` for none."""
    return max(lights, key=_STRENGTH.__getitem__, default=OFF)


def call_rules(rules: Iterable[RuleBase]) -> frozenset[str]:
    """Names of the enabled call rules: their alerts are what a dome shows."""
    return frozenset(
        rule.name for rule in rules if isinstance(rule, CallRule) and rule.enabled
    )


def call_stations(
    devices: Iterable[Device], zones: Iterable[Zone], rules: Iterable[RuleBase]
) -> frozenset[str]:
    """Devices that some enabled call rule listens to: the stations with a dome.

    Matched as the engine matches a rule's ``devices`` (kind, ids, zones of
    the device's room).
    """
    room_zone = {room.id: zone.id for zone in zones for room in zone.rooms}
    calls = [r for r in rules if isinstance(r, CallRule) and r.enabled]
    return frozenset(
        device.id
        for device in devices
        if any(_listens(rule, device, room_zone) for rule in calls)
    )


def _listens(rule: CallRule, device: Device, room_zone: Mapping[str, str]) -> bool:
    match = rule.devices
    if match.kind is not None and match.kind != device.kind:
        return False
    if match.ids and device.id not in match.ids:
        return False
    zone = room_zone.get(device.room) if device.room else None
    return not match.zones or zone in match.zones
