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
    return drivers


def presence_tracker(config: GatewayConfig) -> PresenceTracker | None:
    """The presence estimator, tracking the staff badges unless told otherwise."""
    settings = config.presence
    if settings is None:
        return None
    if not settings.badges:
        badges = tuple(m.badge for m in config.staff if m.badge is not None)
        settings = settings.model_copy(update={"badges": badges})
    return PresenceTracker(settings)
