"""Building the drivers a site file asks for.

Each driver's settings live beside it in ``drivers/``; this module only
decides which drivers run and in what order. MQTT devices need no driver: the
broker link carries them.
"""

from __future__ import annotations

import logging

from gpiozero import Factory

from drivers.base import Driver
from drivers.ble import BLEScanner
from drivers.gpio import GPIODriver
from drivers.presence import PresenceTracker
from drivers.serial_hub import SerialHubDriver
from drivers.simulator import Device, Person, SimulatorDriver
from gateway.config import GatewayConfig

log = logging.getLogger(__name__)


def build_drivers(
    config: GatewayConfig, pin_factory: Factory | None = None
) -> list[Driver]:
    """One driver per hardware section present in the site file.

    ``pin_factory`` replaces gpiozero's choice (the demo drives mock pins).
    """
    drivers: list[Driver] = []
    if config.gpio is not None:
        drivers.append(GPIODriver(config.gpio, pin_factory=pin_factory))
    drivers.extend(SerialHubDriver(port) for port in config.serial_hubs)
    tracker = presence_tracker(config)
    if tracker is not None:
        # The tracker first: the scanner feeds it from the moment it starts.
        drivers.append(tracker)
        if config.ble is not None:
            drivers.append(BLEScanner(config.ble, tracker.feed))
    if config.simulator is not None:
        drivers.append(simulator(config))
    return drivers


def simulator(config: GatewayConfig) -> SimulatorDriver:
    """Simulated people on the site's devices; each rule's gaps answered by
    the roles whose badge can close them (else its first level's roles)."""
    answerers: dict[str, tuple[str, ...]] = {}
    dwell = 0.0
    for rule in config.rules:
        visit = getattr(rule, "resolve_by_presence", None) or getattr(
            rule, "reset_by_visit", None
        )
        roles = tuple(visit.roles) if visit is not None else ()
        dwell = max(dwell, visit.dwell if visit is not None else 0.0)
        if not roles and rule.levels:
            roles = tuple(rule.levels[0].roles)
        answerers[rule.name] = roles or ("",)
    settings = config.simulator
    assert settings is not None
    log.warning(
        "Simulated people are acting on this site's devices (speed %gx): "
        "remove 'simulator:' from the site file on a live site",
        settings.speed,
    )
    return SimulatorDriver(
        config.site.id,
        devices=[Device(d.id, d.kind, d.room) for d in config.devices],
        staff=[Person(s.id, s.name, s.roles, s.badge) for s in config.staff],
        behaviour=settings.behaviour(visit_at_least=dwell + 1.0),
        seed=settings.seed,
        speed=settings.speed,
        answerers=answerers,
    )


def presence_tracker(config: GatewayConfig) -> PresenceTracker | None:
    """The presence estimator, tracking the staff badges unless told otherwise."""
    settings = config.presence
    if settings is None:
        return None
    if not settings.badges:
        badges = tuple(m.badge for m in config.staff if m.badge is not None)
        settings = settings.model_copy(update={"badges": badges})
    return PresenceTracker(settings)
