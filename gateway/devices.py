"""Every device and driver of the site as the gateway knows it, for the devices page.

The gateway already knows most of it: supervision alerts say which device is
offline and why, ``driver_failures`` which driver could not start, each
driver's ``health()`` its counters, the BLE scanner the last Eddystone TLM
frame of each badge. :class:`DeviceBook` adds what nothing kept: when each
device was last heard, its last battery reading, and the messages refused
per device. It lives in memory; at start-up, last seen is read back from
the events table, as far back as retention keeps events.
"""

from __future__ import annotations

import logging
import re
import sqlite3
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from rules.engine import OFFLINE
from rules.events import Event

if TYPE_CHECKING:
    from gateway.service import Gateway

log = logging.getLogger(__name__)

SEED_DAYS = 7
"""How far back the events table is read for last seen at start-up; a device
silent for longer shows "not heard" until it is heard again."""

RECENT_ALERT_DAYS = 7
"""Alerts shown per device: those opened within this many days..."""

RECENT_ALERTS = 5
"""... and at most this many per device, newest first."""

BATTERY_READINGS = frozenset({"battery", "battery_level"})
"""Reading names taken as a battery level (percent), e.g. Zigbee2MQTT's."""

_DEVICE_IN_TOPIC = re.compile(r"/devices/([^/]+)/")

MAX_REFUSING = 1000
"""Device ids refusals are counted for. Messages may name ids the site does not
have; past this many, only the ``/metrics`` totals count them, so a flood of
invented ids cannot grow the gateway's memory."""

_LAST_SEEN = (
    "SELECT device, MAX(received_at) FROM events "
    "WHERE received_at >= ? AND type != ? GROUP BY device"
)

_RECENT_ALERTS = (
    "SELECT id, device, rule, priority, state, opened_at, resolved_at "
    "FROM alerts WHERE opened_at >= ? ORDER BY opened_at DESC"
)


class DeviceBook:
    """Last seen, battery and refusals per device; used on the gateway's loop."""

    def __init__(self) -> None:
        self.last_seen: dict[str, float] = {}
        self.battery: dict[str, tuple[float, float]] = {}
        """Device -> (battery level, when it was read)."""

        self.refusals: dict[str, Counter[str]] = {}
        """Device -> refused messages by reason."""

    def seed(self, conn: sqlite3.Connection, now: float) -> None:
        """Read last seen back from the events table after a restart."""
        since = now - SEED_DAYS * 86400
        for device, at in conn.execute(_LAST_SEEN, (since, OFFLINE)):
            self.last_seen.setdefault(device, at)

    def heard(self, event: Event, now: float) -> None:
        """An event accepted from a device; an ``offline`` report is not hearing it."""
        if event.type == OFFLINE:
            return
        self.last_seen[event.device] = now
        reading = event.fields.get("reading")
        value = event.fields.get("value")
        if reading in BATTERY_READINGS and isinstance(value, int | float):
            self.battery[event.device] = (float(value), now)

    def refused(self, source: str, reason: str) -> None:
        """A refused message; ``source`` is a device id or the topic it came on."""
        found = _DEVICE_IN_TOPIC.search(source)
        device = found.group(1) if found else source
        if "/" in device:
            return  # a command topic, not a device's
        if device not in self.refusals and len(self.refusals) >= MAX_REFUSING:
            return
        self.refusals.setdefault(device, Counter())[reason] += 1


# -- drivers ------------------------------------------------------------------------


def driver_states(gateway: Gateway) -> list[dict[str, Any]]:
    """Each driver: running, retrying (could not start) or failed (its own word)."""
    result = []
    for driver in gateway.drivers:
        health = _health(driver)
        entry: dict[str, Any] = {"name": driver.name, "health": health}
        failure = gateway.driver_failures.get(driver.name)
        if failure is not None:
            entry |= {
                "state": "retrying",
                "reason": f"could not start: {failure}",
                "retry_at": gateway.driver_retry_at.get(driver.name),
            }
        elif _reports_trouble(health):
            entry |= {"state": "failed", "reason": _trouble(health)}
        else:
            entry["state"] = "running"
        result.append(entry)
    return result


def _health(driver: Any) -> dict[str, Any]:
    try:
        return dict(driver.health())
    except Exception as exc:  # noqa: BLE001 - one driver must not blank the page
        log.exception("Driver %s could not report its health", driver.name)
        return {"error": f"health() failed: {exc}"}


def _reports_trouble(health: Mapping[str, Any]) -> bool:
    """A driver that runs but says it is not working: a port unplugged, an
    adapter that cannot scan."""
    return (
        health.get("running") is False
        or health.get("connected") is False
        or health.get("state") in ("unavailable", "silent", "failed")
        or "error" in health
    )


def _trouble(health: Mapping[str, Any]) -> str:
    for key in ("last_error", "error", "state"):
        if health.get(key):
            return str(health[key])
    return "the driver reports that it is not running"


# -- devices ------------------------------------------------------------------------


def device_report(gateway: Gateway, now: float) -> list[dict[str, Any]]:
    """Every device of the site file with its state, as the devices page shows it."""
    config = gateway.config
    zone_of = {room.id: zone.id for zone in config.zones for room in zone.rooms}
    owners = _owners(gateway)
    trouble = _trouble_by_device(gateway)
    alerts = _recent_alerts(gateway.store.db.conn, now)
    counts = _driver_counts(gateway)
    book = gateway.devices

    result = []
    for device in config.devices:
        owner = owners.get(device.id)
        state, reason = _state(gateway, device.id, owner, trouble)
        battery = book.battery.get(device.id)
        result.append(
            {
                "id": device.id,
                "kind": device.kind,
                "room": device.room,
                "zone": zone_of.get(device.room or "") or device.room,
                "driver": owner or "mqtt",
                "state": state,
                "reason": reason,
                "last_seen": book.last_seen.get(device.id),
                "battery": None if battery is None else battery[0],
                "battery_at": None if battery is None else battery[1],
                "refused": dict(book.refusals.get(device.id, {})),
                "driver_counts": counts.get(device.id, {}),
                "alerts": alerts.get(device.id, []),
                "test": how_to_test(gateway, device.id),
            }
        )
    return result


def _owners(gateway: Gateway) -> dict[str, str]:
    """Device id -> the name of the driver that reads it."""
    owners: dict[str, str] = {}
    for driver in gateway.drivers:
        owned = getattr(driver, "device_ids", None)
        for device in owned() if owned is not None else ():
            owners.setdefault(device, driver.name)
    return owners


def _trouble_by_device(gateway: Gateway) -> dict[str, str]:
    """Devices an open supervision alert finds unreachable, with why."""
    supervision = getattr(gateway, "_supervision", set())
    trouble = {}
    for alert in gateway.engine.alerts:
        if alert.rule in supervision:
            detail = alert.detail or {}
            why = detail.get("reason")
            if why is None and "silent_for" in detail:
                why = f"silent for {detail['silent_for']:.0f} s"
            trouble[alert.device] = str(why or f"supervision alert {alert.id}")
    return trouble


def _state(
    gateway: Gateway, device: str, owner: str | None, trouble: Mapping[str, str]
) -> tuple[str, str | None]:
    """offline (with why), online, or "not heard" (no sign of it either way)."""
    if device in trouble:
        return "offline", trouble[device]
    if owner is not None and owner in gateway.driver_failures:
        return "offline", f"driver {owner} could not start"
    if device in gateway.devices.last_seen:
        return "online", None
    if owner is not None:
        return "online", f"read by driver {owner}, which is running"
    return "not heard", None


def _recent_alerts(
    conn: sqlite3.Connection, now: float
) -> dict[str, list[dict[str, Any]]]:
    since = now - RECENT_ALERT_DAYS * 86400
    names = ("id", "device", "rule", "priority", "state", "opened_at", "resolved_at")
    by_device: dict[str, list[dict[str, Any]]] = {}
    for row in conn.execute(_RECENT_ALERTS, (since,)):
        shown = by_device.setdefault(row[1], [])
        if len(shown) < RECENT_ALERTS:
            shown.append(dict(zip(names, row, strict=True)))
    return by_device


def _driver_counts(gateway: Gateway) -> dict[str, dict[str, Any]]:
    """Per-device counters a driver keeps itself (GPIO: presses, bounces)."""
    counts: dict[str, dict[str, Any]] = {}
    for driver in gateway.drivers:
        per_device = _health(driver).get("devices")
        if isinstance(per_device, dict):
            for device, values in per_device.items():
                if isinstance(values, dict):
                    counts.setdefault(device, {}).update(values)
    return counts


def badges(gateway: Gateway) -> list[dict[str, Any]]:
    """Staff badges with the battery their last Eddystone TLM frame reported."""
    owner = {m.badge: m.id for m in gateway.config.staff if m.badge is not None}
    result = []
    for driver in gateway.drivers:
        telemetry = getattr(driver, "telemetry", None)
        if telemetry is None:
            continue
        for badge, (frame, heard_at) in sorted(telemetry().items()):
            result.append(
                {
                    "badge": badge,
                    "staff": owner.get(badge),
                    "battery_mv": frame.battery_mv,
                    "heard_at": heard_at,
                }
            )
    return result


# -- test actions -------------------------------------------------------------------


def how_to_test(gateway: Gateway, device: str) -> str | None:
    """How a device is tested: ``gpio_light``, ``mqtt`` (a command topic the
    device reads), or None when the gateway has no way to test it."""
    for driver in gateway.drivers:
        lights = getattr(driver, "lights", None)
        if lights is not None and device in lights():
            return "gpio_light"
    if device in _owners(gateway):
        return None  # read by a driver (serial hub, BLE adapter): nothing to send
    return "mqtt"


def light_drivers(drivers: Iterable[Any], device: str) -> list[Any]:
    """Drivers with a dome light for ``device``."""
    return [
        d
        for d in drivers
        if getattr(d, "lights", None) is not None and device in d.lights()
    ]
