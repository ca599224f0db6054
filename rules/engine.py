"""The rule engine: turns events, acknowledgements and time into alert changes.

The engine is pure: it does no I/O and reads time only from the clock it is
given, so a recorded day of events can be replayed through it, in a test or a
benchmark, exactly as it ran on site. The caller persists and publishes the
:class:`~rules.alerts.Change` objects it returns, and calls :meth:`Engine.advance`
when :meth:`Engine.due` says a timer is due.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterable
from dataclasses import replace

from rules.alerts import Alert, AlertState, Change, Notification
from rules.events import Event
from rules.schema import CallRule, Rule
from rules.site import Site

LATE_AFTER = 1.0
"""Seconds past its due time after which an escalation is reported as late.

Normal scheduling jitter is milliseconds; a second or more means the gateway
was stopped, stuck or restarted while the timer was due.
"""


class EngineError(ValueError):
    """Base for inputs the engine refuses; the caller logs and counts them."""


class UnknownDevice(EngineError):
    def __init__(self, device: str) -> None:
        self.device = device
        super().__init__(f"device {device!r} is not in the site file")


class UnknownAlert(EngineError):
    def __init__(self, alert_id: str) -> None:
        self.alert_id = alert_id
        super().__init__(f"no unresolved alert with id {alert_id!r}")


class UnknownStaff(EngineError):
    def __init__(self, staff: str) -> None:
        self.staff = staff
        super().__init__(f"staff id {staff!r} is not in the site file")


class StationOnly(EngineError):
    """An emergency or code call may be cancelled only at its own station."""

    def __init__(self, alert_id: str, priority: str) -> None:
        self.alert_id = alert_id
        self.priority = priority
        super().__init__(
            f"alert {alert_id} is a {priority} call: it can be cancelled only "
            "at its own station, by someone at the bedside"
        )


def counter_ids(prefix: str = "a") -> Callable[[], str]:
    """Deterministic alert ids for replays and tests: ``a1``, ``a2``, ..."""
    counter = itertools.count(1)
    return lambda: f"{prefix}{next(counter)}"


class Engine:
    """Holds every unresolved alert and its pending escalation."""

    def __init__(
        self,
        site: Site,
        rules: Iterable[Rule],
        clock: Callable[[], float],
        new_id: Callable[[], str],
    ) -> None:
        self._site = site
        self._clock = clock
        self._new_id = new_id
        self._staff = {member.id for member in site.staff}
        self._devices = {device.id: device for device in site.devices}
        self._room_zone = site.room_zones()
        self._rules = {rule.name: rule for rule in rules if rule.enabled}
        self._by_trigger = self._index_rules()

        self._alerts: dict[str, Alert] = {}
        self._open_for: dict[tuple[str, str], str] = {}
        """(rule, device) -> id of the unresolved alert it already has."""

        self._timers: list[tuple[float, str, int]] = []
        """Heap of (due_at, alert id, alert version) with lazy deletion."""

    # -- what the caller asks ------------------------------------------------

    @property
    def alerts(self) -> list[Alert]:
        """Unresolved alerts, oldest first (live objects: do not mutate)."""
        return sorted(self._alerts.values(), key=lambda a: a.opened_at)

    def get(self, alert_id: str) -> Alert | None:
        return self._alerts.get(alert_id)

    def due(self) -> float | None:
        """Wall-clock time of the next escalation, or None."""
        while self._timers:
            due_at, alert_id, version = self._timers[0]
            alert = self._alerts.get(alert_id)
            if alert is not None and alert.version == version:
                return due_at
            heapq.heappop(self._timers)
        return None

    def restore(self, alerts: Iterable[Alert]) -> list[Alert]:
        """Take back unresolved alerts from storage after a restart.

        Timers that fell due while the gateway was down fire at the next
        :meth:`advance`, marked late. Returns the alerts it could not take
        back because their rule is gone or disabled, for the caller to report.
        """
        orphans = []
        for alert in alerts:
            if not alert.unresolved:
                continue
            if alert.rule not in self._rules:
                orphans.append(alert)
                continue
            self._alerts[alert.id] = alert
            self._open_for[(alert.rule, alert.device)] = alert.id
            self._schedule(alert)
        return orphans

    # -- inputs ----------------------------------------------------------------

    def on_event(self, event: Event) -> list[Change]:
        """Apply one device event; return the changes it caused."""
        if event.device not in self._devices:
            raise UnknownDevice(event.device)

        changes = []
        for rule in self._by_trigger.get((event.device, event.type), ()):
            change = self._open(rule, event)
            if change is not None:
                changes.append(change)
        changes.extend(self._cancel_at_station(event))
        return changes

    def acknowledge(self, alert_id: str, staff: str, via: str) -> list[Change]:
        """A person takes the alert; escalation stops. Repeats change nothing."""
        alert = self._unresolved(alert_id)
        self._known_staff(staff)
        if alert.state is AlertState.ACKNOWLEDGED:
            return []

        now = self._clock()
        alert.move(AlertState.ACKNOWLEDGED, now)
        alert.acked_at = now
        alert.acked_by = staff
        self._reschedule(alert)
        return [self._change(alert, "acknowledged", staff, via)]

    def resolve(self, alert_id: str, staff: str | None, via: str) -> list[Change]:
        """Close the alert for good, naming who closed it and how.

        Emergency and code calls refuse this: only their station cancels them.
        """
        alert = self._unresolved(alert_id)
        if staff is not None:
            self._known_staff(staff)
        if self._rules[alert.rule].station_only:
            raise StationOnly(alert.id, alert.priority)
        return [self._close(alert, staff, via)]

    def advance(self, now: float | None = None) -> list[Change]:
        """Fire every escalation due by ``now`` (default: the clock)."""
        now = self._clock() if now is None else now
        changes = []
        while (due_at := self.due()) is not None and due_at <= now:
            _, alert_id, _ = heapq.heappop(self._timers)
            alert = self._alerts[alert_id]
            changes.append(self._fire(alert, due_at, now))
        return changes

    # -- transitions -----------------------------------------------------------

    def _open(self, rule: CallRule, event: Event) -> Change | None:
        # A second press while the call is open is the same gap, not a new one.
        if (rule.name, event.device) in self._open_for:
            return None

        now = self._clock()
        device = self._devices[event.device]
        alert = Alert(
            id=self._new_id(),
            rule=rule.name,
            priority=rule.priority,
            device=device.id,
            room=device.room,
            zone=self._room_zone.get(device.room) if device.room else None,
            event_id=event.id,
            opened_at=now,
            updated_at=now,
        )
        alert.escalation_base = now
        alert.notified_at = now
        self._alerts[alert.id] = alert
        self._open_for[(rule.name, device.id)] = alert.id
        self._reschedule(alert)
        return self._change(alert, "opened", device.id, "station")

    def _cancel_at_station(self, event: Event) -> list[Change]:
        changes = []
        for rule in self._rules.values():
            if rule.cancels_on != event.type:
                continue
            alert_id = self._open_for.get((rule.name, event.device))
            if alert_id is not None:
                alert = self._alerts[alert_id]
                changes.append(self._close(alert, None, "station"))
        return changes

    def _fire(self, alert: Alert, due_at: float, now: float) -> Change:
        """Carry out whichever timer of the alert fell due at ``due_at``."""
        late = now - due_at > LATE_AFTER
        if alert.state is AlertState.ACKNOWLEDGED:
            change = self._reopen(alert, now)
        elif (next_at := self._next_level_at(alert)) is not None and next_at <= due_at:
            change = self._escalate(alert, now)
        else:
            change = self._remind(alert, now)
        alert.late = late
        return replace(change, alert=alert.snapshot())

    def _escalate(self, alert: Alert, now: float) -> Change:
        alert.move(AlertState.ESCALATED, now)
        alert.level += 1
        alert.notified_at = now
        alert.reminders = 0
        self._reschedule(alert)
        return self._change(alert, "escalated", None, "timer")

    def _remind(self, alert: Alert, now: float) -> Change:
        alert.touch(now)
        alert.reminders += 1
        alert.notified_at = now
        self._reschedule(alert)
        return self._change(alert, "reminded", None, "timer")

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
        return self._change(alert, "reopened", None, "timer")

    def _close(self, alert: Alert, staff: str | None, via: str) -> Change:
        now = self._clock()
        alert.move(AlertState.RESOLVED, now)
        alert.resolved_at = now
        alert.resolved_by = staff
        alert.resolved_via = via
        alert.due_at = None
        del self._alerts[alert.id]
        del self._open_for[(alert.rule, alert.device)]
        return self._change(alert, "resolved", staff or alert.device, via)

    # -- helpers -----------------------------------------------------------------

    def _change(self, alert: Alert, kind: str, actor: str | None, via: str) -> Change:
        rule = self._rules[alert.rule]
        if kind in ("opened", "escalated", "reminded", "reopened"):
            # Only the current level is paged; earlier levels already were,
            # and are told again only when someone answers.
            targets = rule.levels[alert.level - 1].targets
        else:
            targets = _unique(
                target
                for level in rule.levels[: alert.level]
                for target in level.targets
            )
        notifications = tuple(
            Notification(target, alert.id, alert.level, kind) for target in targets
        )
        return Change(alert.snapshot(), kind, actor, via, notifications)

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
        self._schedule(alert)

    def _schedule(self, alert: Alert) -> None:
        if alert.due_at is not None:
            entry = (alert.due_at, alert.id, alert.version)
            heapq.heappush(self._timers, entry)

    def _unresolved(self, alert_id: str) -> Alert:
        alert = self._alerts.get(alert_id)
        if alert is None:
            raise UnknownAlert(alert_id)
        return alert

    def _known_staff(self, staff: str) -> None:
        if staff not in self._staff:
            raise UnknownStaff(staff)

    def _index_rules(self) -> dict[tuple[str, str], list[CallRule]]:
        index: dict[tuple[str, str], list[CallRule]] = {}
        for device in self._site.devices:
            zone = self._room_zone.get(device.room or "")
            for rule in self._rules.values():
                if _matches(rule, device.id, device.kind, zone):
                    index.setdefault((device.id, rule.opens_on), []).append(rule)
        return index


def _matches(rule: CallRule, device: str, kind: str, zone: str | None) -> bool:
    match = rule.devices
    if match.kind is not None and match.kind != kind:
        return False
    if match.ids and device not in match.ids:
        return False
    return not match.zones or zone in match.zones


def _unique(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))
