"""Building the drivers a site file asks for.

Each driver's settings live beside it in ``drivers/``; this module only
decides which drivers run. MQTT devices need no driver: the broker link
carries them.
"""

from __future__ import annotations

import logging

from drivers.base import Driver
from drivers.gpio import GPIODriver
from gateway.config import GatewayConfig

log = logging.getLogger(__name__)


def build_drivers(config: GatewayConfig) -> list[Driver]:
    """One driver per hardware section present in the site file."""
    drivers: list[Driver] = []
    if config.gpio is not None:
        drivers.append(GPIODriver(config.gpio))
    return drivers
