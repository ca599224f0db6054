"""The events the engine consumes: what a device, a pager or a person did."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Event types a call station sends. Other types (readings, sightings, feedback
# presses) pass through the engine untouched until a rule asks for them.
CALL = "call"
CANCEL = "cancel"


@dataclass(frozen=True, slots=True)
class Event:
    """One thing that happened at a device, already validated by a driver."""

    id: str
    """Unique id chosen by the sender; a repeated id is a duplicate delivery."""

    type: str
    """What happened: ``call``, ``cancel`` and, later, readings and sightings."""

    device: str
    """The device that reported it, as named in the site file."""

    ts: float
    """When the device says it happened, in Unix seconds."""

    fields: dict[str, Any] = field(default_factory=dict)
    """Anything else the payload carried for this type."""
