"""The alert book: every unresolved alert, its timers and who is paged.

Whatever rule kind opens an alert, its life is the same (see the state
diagram in :mod:`rules.alerts`): levels escalate on their delays, reminders
page the current level again, an acknowledgement that is not followed by a
resolution in time reopens it. Two things hold pages back without stopping
the clock: an emergency or code call in the same zone (routine calls wait
until it is over) and a technician's silence on a device or zone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from rules.alerts import Alert, AlertState, Change, Notification
from rules.schema import STATION_ONLY, Level, RuleBase
from rules.timers import TimerQueue

LATE_AFTER = 1.0
"""Seconds past its due time after which a timer is reported as late.

Normal scheduling jitter is milliseconds; a second or more means the gateway
was stopped, stuck or restarted while the timer was due.
"""

PAGING = ("opened", "escalated", "reminded", "reopened", "released")
"""Change kinds that page the current level; the others tell who was paged."""


@dataclass(frozen=True, slots=True)
class Silence:
    """A technician's mute on a device or a zone, until a time, with a reason."""

    id: str
    until: float
    reason: str
    by: str
    device: str | None = None
    zone: str | None = None

    def covers(self, alert: Alert) -> bool:
        if alert.priority in STATION_ONLY:
            return False  # an emergency or code call is never muted
        return (self.device is not None and alert.device == self.device) or (
            self.zone is not None and alert.zone == self.zone
        )


Targets = Callable[[Level, float], tuple[str, ...]]
"""Who a level means at a given time (roles resolved through shifts)."""


class AlertBook:
    """Opens, moves and closes alerts; owns their ``("alert", id)`` timers."""

    def __init__(
        self,
        rules: dict[str, RuleBase],
        timers: TimerQueue,
        new_id: Callable[[], str],
        targets: Targets,
    ) -> None:
        self._rules = rules
        self._timers = timers
        self._new_id = new_id
        self._targets = targets
        self.alerts: dict[str, Alert] = {}
        self.by_key: dict[tuple[str, str], str] = {}
        self.by_place: dict[str, dict[str, Alert]] = {}
        """Room or zone id -> its unresolved alerts, for presence and holds."""

        self.urgent_in: dict[str, set[str]] = {}
        """Zone -> ids of its unresolved emergency and code calls."""

        self.silences: dict[str, Silence] = {}

    # -- opening and closing --------------------------------------------------

    def open(
        self,
        rule: RuleBase,
        subject: str,
        *,
        device: str,
        room: str | None,
        zone: str | None,
        event_id: str,
        now: float,
        detail: dict[str, Any] | None = None,
    ) -> Change:
        """Open an alert, or count a repeat on the one already open."""
        existing = self.by_key.get((rule.name, subject))
        if existing is not None:
            alert = self.alerts[existing]
            alert.touch(now)
            alert.repeats += 1
            return Change(alert.snapshot(), "repeated", device, "station")

        alert = Alert(
            id=self._new_id(),
            rule=rule.name,
            priority=rule.priority,
            device=device,
            room=room,
            zone=zone,
            event_id=event_id,
            opened_at=now,
            updated_at=now,
            subject=subject,
            detail=detail,
        )
        alert.escalation_base = now
        alert.notified_at = now
        self._add(alert)
        return self._change(alert, "opened", device, "station", now)

    def close(
        self,
        alert: Alert,
        staff: str | None,
        via: str,
        now: float,
        proof: dict[str, Any] | None = None,
    ) -> list[Change]:
        """Resolve for good; an emergency ending releases the calls it held."""
        alert.move(AlertState.RESOLVED, now)
        alert.resolved_at = now
        alert.resolved_by = staff
        alert.resolved_via = via
        alert.proof = proof
        alert.due_at = None
        self._remove(alert)
        actor = staff or alert.device
        changes = [self._change(alert, "resolved", actor, via, now)]
        if alert.priority in STATION_ONLY and alert.zone is not None:
            changes.extend(self._release(now, zone=alert.zone))
        return changes

    def acknowledge(
        self, alert: Alert, staff: str, via: str, now: float
    ) -> list[Change]:
        if alert.state is AlertState.ACKNOWLEDGED:
            return []
        alert.move(AlertState.ACKNOWLEDGED, now)
        alert.acked_at = now
        alert.acked_by = staff
        self._reschedule(alert)
        return [self._change(alert, "acknowledged", staff, via, now)]

    # -- timers ---------------------------------------------------------------

    def fire(self, alert_id: str, due_at: float, now: float) -> Change:
        """Carry out whichever timer of the alert fell due at ``due_at``."""
        alert = self.alerts[alert_id]
        alert.late = now - due_at > LATE_AFTER
        if alert.state is AlertState.ACKNOWLEDGED:
            return self._reopen(alert, now)
        if (next_at := self._next_level_at(alert)) is not None and next_at <= due_at:
            return self._escalate(alert, now)
        return self._remind(alert, now)

    def _escalate(self, alert: Alert, now: float) -> Change:
        alert.move(AlertState.ESCALATED, now)
        alert.level += 1
        alert.notified_at = now
        alert.reminders = 0
        self._reschedule(alert)
        return self._change(alert, "escalated", None, "timer", now)

    def _remind(self, alert: Alert, now: float) -> Change:
        alert.touch(now)
        alert.reminders += 1
        alert.notified_at = now
        self._reschedule(alert)
        return self._change(alert, "reminded", None, "timer", now)

    def _reopen(self, alert: Alert, now: float) -> Change:
        # Whoever took it did not finish in time: page the current level
        # again and let escalation resume from here, not from the opening,
        # so the levels above are not all paged at once.
        levels = self._rules[alert.rule].levels
        alert.move(AlertState.OPEN, now)
        alert.acked_at = None
        alert.acked_by = None
        alert.escalation_base = now - levels[alert.level - 1].after
        alert.notified_at = now
        alert.reminders = 0
        self._reschedule(alert)
        return self._change(alert, "reopened", None, "timer", now)

    def _next_level_at(self, alert: Alert) -> float | None:
        levels = self._rules[alert.rule].levels
        if alert.level >= len(levels):
            return None
        base = alert.escalation_base
        return (alert.opened_at if base is None else base) + levels[alert.level].after

    def _next_due(self, alert: Alert) -> float | None:
        rule = self._rules[alert.rule]
        if alert.state is AlertState.ACKNOWLEDGED:
            if rule.ack_timeout is None or alert.acked_at is None:
                return None
            return alert.acked_at + rule.ack_timeout

        candidates = []
        next_level_at = self._next_level_at(alert)
        if next_level_at is not None:
            candidates.append(next_level_at)
        remind_every = rule.levels[alert.level - 1].remind_every
        if remind_every is not None:
            last = alert.notified_at or alert.updated_at
            candidates.append(last + remind_every)
        return min(candidates, default=None)

    def _reschedule(self, alert: Alert) -> None:
        alert.due_at = self._next_due(alert)
        if alert.due_at is None:
            self._timers.cancel(("alert", alert.id))
        else:
            self._timers.set(("alert", alert.id), alert.due_at)

    # -- silences -------------------------------------------------------------

    def silence(self, silence: Silence, now: float) -> list[Change]:
        self.silences[silence.id] = silence
        self._timers.set(("silence", silence.id), silence.until)
        changes = []
        for alert in list(self.alerts.values()):
            if silence.covers(alert) and not alert.held:
                alert.touch(now)
                alert.held = True
                changes.append(Change(alert.snapshot(), "held", silence.by, "web"))
        return changes

    def end_silence(self, silence_id: str, now: float) -> list[Change]:
        silence = self.silences.pop(silence_id, None)
        self._timers.cancel(("silence", silence_id))
        if silence is None:
            return []
        return self._release(now, device=silence.device, zone=silence.zone)

    def _release(
        self, now: float, *, device: str | None = None, zone: str | None = None
    ) -> list[Change]:
        """Page the current level of held alerts that nothing holds any more."""
        changes = []
        candidates = self.by_place.get(zone, {}) if device is None and zone else None
        for alert in list((candidates or self.alerts).values()):
            if not alert.held:
                continue
            if device is not None and alert.device != device:
                continue
            if zone is not None and device is None and alert.zone != zone:
                continue
            if self._holder(alert, now) is None:
                alert.touch(now)
                alert.held = False
                alert.notified_at = now
                self._reschedule(alert)
                changes.append(self._change(alert, "released", None, "timer", now))
        return changes

    def _holder(self, alert: Alert, now: float) -> str | None:
        """What holds this alert's pages back, or None."""
        if alert.priority not in STATION_ONLY and alert.zone is not None:
            urgent = self.urgent_in.get(alert.zone)
            if urgent:
                return f"an emergency in {alert.zone}"
        for silence in self.silences.values():
            if silence.until > now and silence.covers(alert):
                return f"silence {silence.id}"
        return None

    # -- bookkeeping ----------------------------------------------------------

    def restore(self, alert: Alert) -> None:
        """Take back a stored alert under the rule as it is configured now.

        A technician may have removed levels since: an alert above the new
        last level stays at that last level, and its timers are computed
        afresh from the rule rather than trusted from storage.
        """
        levels = self._rules[alert.rule].levels
        alert.level = max(1, min(alert.level, len(levels)))
        self._add(alert)

    def _add(self, alert: Alert) -> None:
        self.alerts[alert.id] = alert
        self.by_key[alert.key] = alert.id
        for place in _places(alert):
            self.by_place.setdefault(place, {})[alert.id] = alert
        if alert.priority in STATION_ONLY and alert.zone is not None:
            self.urgent_in.setdefault(alert.zone, set()).add(alert.id)
        self._reschedule(alert)

    def _remove(self, alert: Alert) -> None:
        del self.alerts[alert.id]
        del self.by_key[alert.key]
        for place in _places(alert):
            alerts = self.by_place[place]
            del alerts[alert.id]
            if not alerts:
                del self.by_place[place]
        if alert.zone in self.urgent_in:
            self.urgent_in[alert.zone].discard(alert.id)
            if not self.urgent_in[alert.zone]:
                del self.urgent_in[alert.zone]
        self._timers.cancel(("alert", alert.id))

    def _change(
        self, alert: Alert, kind: str, actor: str | None, via: str, now: float
    ) -> Change:
        levels = self._rules[alert.rule].levels
        if kind in PAGING:
            if self._holder(alert, now) is not None:
                alert.held = True
                return Change(alert.snapshot(), kind, actor, via)
            # Only the current level is paged; earlier levels already were,
            # and are told again only when someone answers.
            targets = self._targets(levels[alert.level - 1], now)
        else:
            targets = _unique(
                target
                for level in levels[: alert.level]
                for target in self._targets(level, now)
            )
        notes = tuple(
            Notification(target, alert.id, alert.level, kind) for target in targets
        )
        return Change(alert.snapshot(), kind, actor, via, notes)


def _places(alert: Alert) -> tuple[str, ...]:
    return tuple(place for place in (alert.room, alert.zone) if place is not None)


def _unique(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))
