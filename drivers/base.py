"""What every driver is: a source of engine events that can start, stop and report.

A driver owns one kind of input (GPIO pins, a BLE adapter, a serial port) and
turns what it reads into :class:`~rules.events.Event` objects. It hands each one
to the ``emit`` callback it was started with. ``emit`` is safe to call from
any thread (the gateway queues the event for its own loop), so a driver may
use gpiozero's callback threads, bleak's asyncio loop or a serial reader
thread, whichever its library wants.

Drivers never import ``gateway``: the gateway builds them from their settings
(pydantic models that live beside each driver) and wires them in.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from rules.events import Event

Emit = Callable[[Event], None]
"""Hands one event to the gateway; safe from any thread, never blocks."""


class Driver(Protocol):
    """The small interface the gateway needs from every driver."""

    name: str
    """Short name for logs and health, e.g. ``gpio`` or ``serial:/dev/ttyUSB0``."""

    def start(self, emit: Emit) -> None:
        """Begin reading; return at once (work happens on the driver's threads)."""

    def stop(self) -> None:
        """Stop reading and release the hardware; safe to call twice."""

    def health(self) -> Mapping[str, Any]:
        """State and counters for /healthz: connected, frames, rejects, ..."""


class DeviceOwner(Protocol):
    """A driver that knows which devices it reads; the gateway reports them
    ``offline`` (to supervision) when the driver cannot start at all."""

    def device_ids(self) -> set[str]:
        """The site's device ids this driver speaks for."""


class AlertAware(Protocol):
    """A driver that shows alert states, e.g. a call station's dome light."""

    def show_alert(self, alert: Mapping[str, Any]) -> None:
        """Reflect one alert's current state (the retained JSON of the contract)."""


_sequence = itertools.count()
_prefix = f"{os.getpid():x}-{time.time_ns():x}"


def new_event_id(device: str) -> str:
    """An id unique across restarts: device, this process's start, a counter."""
    return f"{device}-{_prefix}-{next(_sequence)}"


def make_event(
    device: str, kind: str, clock: Callable[[], float] = time.time, **fields: Any
) -> Event:
    """Build an event stamped now, with a fresh id."""
    return Event(new_event_id(device), kind, device, clock(), fields)
