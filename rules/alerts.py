"""Gap alerts: their states, the allowed transitions and what a change carries.

An alert's life, and the only edges the engine will take::

                 call                    no ack within the level's delay
      (none) ──────────► OPEN ─────────────────────────────► ESCALATED ─┐
                          │  ▲                                  │   ▲   │ next level
                      ack │  │ ack timeout: acknowledged        │   └───┘
                          │  │ but not resolved in time         │ ack
                          ▼  │                                  ▼
                      ACKNOWLEDGED ◄────────────────────────────┘
                          │
     cancel at station,   │ resolve (pager, station, web)
     resolve from any     ▼
     open state ───────► RESOLVED   (final: never leaves this state)

A reminder (the same level paged again) is not a transition: the state stays,
only ``version`` and ``reminders`` move.

A change that does not follow an edge raises :class:`InvalidTransition`, so a
bug can never leave an alert in an impossible state.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields
from operator import attrgetter
from typing import Any


class AlertState(enum.StrEnum):
    OPEN = "open"
    ACKNOWLEDGED = "acknowledged"
    ESCALATED = "escalated"
    RESOLVED = "resolved"


UNRESOLVED = frozenset({AlertState.OPEN, AlertState.ACKNOWLEDGED, AlertState.ESCALATED})

ALLOWED = {
    AlertState.OPEN: {
        AlertState.ACKNOWLEDGED,
        AlertState.ESCALATED,
        AlertState.RESOLVED,
    },
    AlertState.ESCALATED: {
        AlertState.ESCALATED,
        AlertState.ACKNOWLEDGED,
        AlertState.RESOLVED,
    },
    AlertState.ACKNOWLEDGED: {AlertState.OPEN, AlertState.RESOLVED},
    AlertState.RESOLVED: set(),
}


class InvalidTransition(ValueError):
    """An alert was asked to move along an edge its state machine lacks."""

    def __init__(self, alert_id: str, current: str, wanted: str) -> None:
        self.alert_id = alert_id
        self.current = current
        self.wanted = wanted
        super().__init__(f"alert {alert_id} cannot go from {current} to {wanted}")


@dataclass(slots=True)
class Alert:
    """One service gap, from the event that opened it to its resolution."""

    id: str
    rule: str
    priority: str
    device: str
    room: str | None
    zone: str | None
    event_id: str
    """The event that opened the alert."""

    opened_at: float
    updated_at: float
    state: AlertState = AlertState.OPEN
    level: int = 1
    """Escalation level, 1-based: level 1 is the first people notified."""

    version: int = 1
    """Bumped on every change, so consumers can drop stale or repeated states."""

    due_at: float | None = None
    """Wall-clock time of the next timer (escalation, reminder or ack timeout)."""

    notified_at: float | None = None
    """When the current level was last paged; reminders count from here."""

    reminders: int = 0
    """How often the current level has been paged again without an answer."""

    escalation_base: float | None = None
    """The time level delays count from: the opening, or the reopening after
    an acknowledgement timed out, shifted so the current level keeps its place."""

    acked_at: float | None = None
    acked_by: str | None = None
    resolved_at: float | None = None
    resolved_by: str | None = None
    resolved_via: str | None = None
    """How it was closed: ``station``, ``pager``, ``web`` or ``presence``."""

    late: bool = False
    """True when the last escalation fired after its due time (gateway was down)."""

    subject: str | None = None
    """What the alert is about: the device for calls, thresholds and
    supervision, the zone for counts, feedback and composites."""

    repeats: int = 0
    """Further triggers while it was open (more presses): counted, not raised."""

    held: bool = False
    """Pages held back: an emergency in the zone, or a technician's silence."""

    detail: dict[str, Any] | None = None
    """What opened it, e.g. ``{"count": 200}`` or ``{"value": 12.5}``."""

    proof: dict[str, Any] | None = None
    """For a presence resolution: badge, staff, place, dwell and signal."""

    def snapshot(self) -> Alert:
        """A copy for a Change; positional, as ``replace`` is ten times slower."""
        return Alert(*_alert_values(self))

    @property
    def key(self) -> tuple[str, str]:
        """One unresolved alert per rule and subject."""
        return (self.rule, self.subject or self.device)

    def move(self, state: AlertState, at: float) -> None:
        """Take one edge of the state machine, or raise InvalidTransition."""
        if state not in ALLOWED[self.state]:
            raise InvalidTransition(self.id, self.state, state)
        self.state = state
        self.updated_at = at
        self.version += 1

    def touch(self, at: float) -> None:
        """Record a change that is not a transition, such as a reminder."""
        if not self.unresolved:
            raise InvalidTransition(self.id, self.state, self.state)
        self.updated_at = at
        self.version += 1

    @property
    def unresolved(self) -> bool:
        return self.state in UNRESOLVED


_alert_values = attrgetter(*(item.name for item in fields(Alert)))


@dataclass(frozen=True, slots=True)
class Notification:
    """A message for people: a role's pagers or one staff member's pager."""

    target: str
    """A staff id or a role name; it becomes the pager topic's last level."""

    alert_id: str
    level: int
    reason: str
    """Why they are told: ``opened``, ``escalated``, ``reminded``, ``reopened``,
    ``acknowledged`` or ``resolved``."""


@dataclass(frozen=True, slots=True)
class Change:
    """The result of one transition: the alert after it, and who must hear."""

    alert: Alert
    """A snapshot taken right after the transition; never mutated later."""

    kind: str
    """``opened``, ``acknowledged``, ``escalated``, ``reminded``, ``reopened``
    or ``resolved``."""

    actor: str | None = None
    """Staff id, device id or ``None`` for the engine's own timers."""

    via: str = "timer"
    """Where it came from: ``station``, ``pager``, ``web`` or ``timer``."""

    notifications: tuple[Notification, ...] = field(default_factory=tuple)


@dataclass(frozen=True, slots=True)
class Kudos:
    """Positive guest feedback credited to the team on duty in a zone."""

    id: str
    rule: str
    zone: str
    at: float
    presses: int
    """Positive presses in a row that earned it."""

    staff: tuple[str, ...]
    """The team credited: staff of the zone on duty at the time."""


Action = Change | Kudos
"""What the engine asks the gateway to carry out."""
