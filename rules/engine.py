"""The rule engine: turns events, acknowledgements and time into actions.

The engine is pure: it does no I/O and reads time only from the clock it is
given, so a recorded day of events can be replayed through it, in a test or a
benchmark, exactly as it ran on site. The caller persists and carries out the
actions it returns (:class:`~rules.alerts.Change` and
:class:`~rules.alerts.Kudos`), and calls :meth:`Engine.advance` when
:meth:`Engine.due` says a timer is due.

What each rule kind listens to:

=============  ==========================================  ================
kind           events                                      alert subject
=============  ==========================================  ================
call           ``opens_on`` / ``cancels_on`` of a device   the device
count          ``counts`` / ``resets_on`` in a zone        the zone
threshold      ``reading`` with ``reading`` and ``value``  the device
feedback       ``presses`` with a ``score``                the zone
supervision    anything from the device (its silence)      the device
composite      the conditions of the rules it names        the zone
=============  ==========================================  ================

Badges arrive as ``enter`` and ``leave`` events (fields ``badge``, ``zone``
naming a room or a zone, optional ``rssi``) from the presence estimator.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, tzinfo
from typing import Any

from rules.alerts import Action, Alert, Change, Kudos
from rules.calendar import in_windows
from rules.conditions import Counter, Feedback, Presence, Threshold
from rules.events import Event
from rules.lifecycle import LATE_AFTER as LATE_AFTER
from rules.lifecycle import AlertBook, Silence
from rules.schema import (
    CallRule,
    CompositeRule,
    CountRule,
    DeviceMatch,
    FeedbackRule,
    Level,
    PresenceCheck,
    RuleBase,
    SupervisionRule,
    ThresholdRule,
)
from rules.site import Device, Site, StaffMember
from rules.timers import TimerQueue

ENTER = "enter"
LEAVE = "leave"
OFFLINE = "offline"
"""Sent by a driver that knows a device is unreachable (its serial port is
unplugged, say): supervision raises trouble at once, without waiting for the
heartbeat to run out."""


class EngineError(ValueError):
    """Base for inputs the engine refuses; the caller logs and counts them."""

    reason = "refused"


class UnknownDevice(EngineError):
    reason = "unknown_device"

    def __init__(self, device: str) -> None:
        self.device = device
        super().__init__(f"device {device!r} is not in the site file")


class UnknownAlert(EngineError):
    reason = "unknown_alert"

    def __init__(self, alert_id: str) -> None:
        self.alert_id = alert_id
        super().__init__(f"no unresolved alert with id {alert_id!r}")


class UnknownStaff(EngineError):
    reason = "unknown_staff"

    def __init__(self, staff: str) -> None:
        self.staff = staff
        super().__init__(f"staff id {staff!r} is not in the site file")


class UnknownBadge(EngineError):
    reason = "unknown_badge"

    def __init__(self, badge: str) -> None:
        self.badge = badge
        super().__init__(f"badge {badge!r} belongs to nobody in the site file")


class BadEventField(EngineError):
    reason = "bad_field"

    def __init__(self, event: Event, field: str, expected: str) -> None:
        self.event_id = event.id
        self.field = field
        value = event.fields.get(field)
        super().__init__(
            f"event {event.id} ({event.type}) field {field!r}: expected "
            f"{expected}, got {value!r:.40}"
        )


class TooFast(EngineError):
    """A feedback press closer to the last one than the rule allows: misuse."""

    reason = "too_fast"

    def __init__(self, device: str, gap: float, minimum: float) -> None:
        super().__init__(
            f"press on {device} {gap:.1f}s after the last one; the rule "
            f"ignores presses closer than {minimum:g}s"
        )


class StationOnly(EngineError):
    """An emergency or code call may be cancelled only at its own station."""

    reason = "station_only"

    def __init__(self, alert_id: str, priority: str) -> None:
        self.alert_id = alert_id
        self.priority = priority
        super().__init__(
            f"alert {alert_id} is a {priority} call: it can be cancelled only "
            "at its own station, by someone at the bedside"
        )


def counter_ids(prefix: str = "a") -> Callable[[], str]:
    """Deterministic ids for replays and tests: ``a1``, ``a2``, ..."""
    counter = itertools.count(1)
    return lambda: f"{prefix}{next(counter)}"


class Engine:
    """Holds every unresolved alert, every rule's state and every timer."""

    def __init__(
        self,
        site: Site,
        rules: Iterable[RuleBase],
        clock: Callable[[], float],
        new_id: Callable[[], str],
        tz: tzinfo = UTC,
    ) -> None:
        self._site = site
        self._clock = clock
        self._new_id = new_id
        self._tz = tz
        self._devices = {device.id: device for device in site.devices}
        self._room_zone = site.room_zones()
        self._zones = {zone.id for zone in site.zones}
        self._staff = {member.id: member for member in site.staff}
        self._badges = {m.badge: m for m in site.staff if m.badge is not None}
        self._groups = {group.id: group.members for group in site.groups}
        self._by_role: dict[str, list[StaffMember]] = {}
        for member in site.staff:
            for role in member.roles:
                self._by_role.setdefault(role, []).append(member)

        self._rules = {rule.name: rule for rule in rules if rule.enabled}
        self._managed = dict(self._rules)
        """Rules by which unresolved alerts escalate: the enabled ones, and
        earlier definitions kept for alerts whose rule was removed or disabled."""

        self._timers = TimerQueue()
        self._book = AlertBook(self._managed, self._timers, new_id, self._targets)

        self._counters: dict[tuple[str, str], Counter] = {}
        self._thresholds: dict[tuple[str, str], Threshold] = {}
        self._feedback: dict[tuple[str, str], Feedback] = {}
        self._last_press: dict[tuple[str, str], float] = {}
        self._silent: set[tuple[str, str]] = set()
        self._last_heard: dict[tuple[str, str], float] = {}
        self._duty_minute: int | None = None
        self._duty: frozenset[str] = frozenset()
        self._presence = Presence()
        self._dirty: set[str] = set()

        self._routes: dict[tuple[str, str], list[RuleBase]] = {}
        self._watchers: dict[str, list[SupervisionRule]] = {}
        self._composites: dict[str, list[CompositeRule]] = {}
        self._presence_rules: dict[str, list[tuple[RuleBase, frozenset[str]]]] = {}
        """Zone -> rules that check badges there, with the roles they accept."""
        self._zone_devices: dict[str, list[str]] = {}
        self._index()
        self._start_supervision(clock())

    # -- what the caller asks -------------------------------------------------

    @property
    def alerts(self) -> list[Alert]:
        """Unresolved alerts, oldest first (live objects: do not mutate)."""
        return sorted(self._book.alerts.values(), key=lambda a: a.opened_at)

    def get(self, alert_id: str) -> Alert | None:
        return self._book.alerts.get(alert_id)

    @property
    def silences(self) -> list[Silence]:
        return list(self._book.silences.values())

    def due(self) -> float | None:
        """Wall-clock time of the next timer of any kind, or None."""
        return self._timers.next_due()

    @property
    def pending_timers(self) -> int:
        return len(self._timers)

    def restore(
        self, alerts: Iterable[Alert], former: Iterable[RuleBase] = ()
    ) -> list[Alert]:
        """Take back unresolved alerts from storage after a restart.

        Timers that fell due while the gateway was down fire at the next
        :meth:`advance`, marked late. An alert whose rule is gone, disabled
        or left without levels goes on under its definition in ``former``
        (earlier rule sets, newest first): it escalates by the levels it had
        and can be acknowledged and resolved, and the rule opens nothing new.
        Returns the alerts it could not take back, for the caller to report.
        """
        earlier: dict[str, RuleBase] = {}
        for rule in former:
            earlier.setdefault(rule.name, rule)
        orphans = []
        for alert in alerts:
            if not alert.unresolved:
                continue
            rule = self._rules.get(alert.rule)
            if rule is None or not rule.levels:
                rule = earlier.get(alert.rule)
            if rule is None or not rule.levels:
                orphans.append(alert)
                continue
            self._managed.setdefault(alert.rule, rule)
            self._book.restore(alert)
        return orphans

    def handover(self, rules: Iterable[RuleBase]) -> Engine:
        """A new engine running ``rules`` that carries on where this one stands.

        Unresolved alerts keep their ids, levels and timers (level delays
        count from the opening, so an escalation due in ten seconds still
        fires then); counters, windows, thresholds, presence and silences
        move across through :meth:`dump_state`; supervised devices keep the
        time they were last heard. An alert whose rule is removed or
        disabled goes on under the rule it had (see :meth:`restore`). State
        of rules that are gone is dropped, and reported by
        :meth:`take_dirty` so that storage drops it too.
        """
        successor = Engine(self._site, rules, self._clock, self._new_id, self._tz)
        alerts = [alert.snapshot() for alert in self.alerts]
        successor.restore(alerts, former=self._managed.values())
        state = self.dump_state()
        successor.load_state(state)
        successor._carry_supervision(self)
        successor._last_press.update(
            (key, at)
            for key, at in self._last_press.items()
            if key[0] in successor._rules
        )
        gone = state.keys() - successor.dump_state().keys()
        successor._dirty |= self._dirty | gone
        return successor

    def _carry_supervision(self, before: Engine) -> None:
        """Keep when each supervised device was last heard, and which are silent."""
        for key in list(self._last_heard):
            rule = self._rules[key[0]]
            assert isinstance(rule, SupervisionRule)
            if key in before._silent:
                # Already reported silent: no timer until it is heard again.
                self._silent.add(key)
                self._last_heard.pop(key)
                self._timers.cancel(("silent", *key))
                continue
            heard = before._last_heard.get(key)
            if heard is None:
                continue
            self._last_heard[key] = heard
            if rule.heartbeat is not None:
                self._timers.set(("silent", *key), heard + rule.heartbeat)

    # -- inputs ---------------------------------------------------------------

    def on_event(self, event: Event) -> list[Action]:
        """Apply one device event; return what it caused."""
        device = self._devices.get(event.device)
        if device is None:
            raise UnknownDevice(event.device)

        now = self._clock()
        routes = self._routes.get((device.id, event.type), ())
        # Refuse a bad event before anything changes: a rejected event must
        # leave every rule exactly as it was.
        for rule in routes:
            self._check(rule, event, device, now)

        actions: list[Action] = []
        if event.type in (ENTER, LEAVE):
            actions.extend(self._badge(event, now))
        for rule in routes:
            actions.extend(self._apply(rule, event, device, now))
        for rule in self._watchers.get(device.id, ()):
            if event.type == OFFLINE:
                actions.extend(self._lost(rule, device, now, event.fields))
            else:
                actions.extend(self._heard(rule, device, now))
        return actions

    def _check(self, rule: RuleBase, event: Event, device: Device, now: float) -> None:
        if isinstance(rule, ThresholdRule):
            if event.fields.get("reading") == rule.reading:
                value = event.fields.get("value")
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise BadEventField(event, "value", "a number")
        elif isinstance(rule, FeedbackRule) and event.type == rule.presses:
            score = event.fields.get("score")
            if score not in rule.negative and score not in rule.positive:
                choices = ", ".join((*rule.negative, *rule.positive))
                raise BadEventField(event, "score", f"one of {choices}")
            last = self._last_press.get((rule.name, device.id))
            if last is not None and now - last < rule.min_interval:
                raise TooFast(device.id, now - last, rule.min_interval)

    def _apply(
        self, rule: RuleBase, event: Event, device: Device, now: float
    ) -> list[Action]:
        if isinstance(rule, CallRule):
            if event.type == rule.opens_on:
                return self._call_open(rule, event, device, now)
            return self._call_cancel(rule, event, device, now)
        if isinstance(rule, CountRule):
            if event.type == rule.counts:
                return self._count(rule, event, device, now)
            return self._count_reset(rule, event, device, now)
        if isinstance(rule, ThresholdRule):
            return self._reading(rule, event, device, now)
        if isinstance(rule, FeedbackRule):
            return self._press(rule, event, device, now)
        return []

    def acknowledge(self, alert_id: str, staff: str, via: str) -> list[Change]:
        """A person takes the alert; escalation stops. Repeats change nothing."""
        alert = self._unresolved(alert_id)
        self._known_staff(staff)
        return self._book.acknowledge(alert, staff, via, self._clock())

    def resolve(self, alert_id: str, staff: str | None, via: str) -> list[Action]:
        """Close the alert for good, naming who closed it and how.

        Emergency and code calls refuse this: only their station cancels them.
        """
        alert = self._unresolved(alert_id)
        if staff is not None:
            self._known_staff(staff)
        if self._managed[alert.rule].station_only:
            raise StationOnly(alert.id, alert.priority)
        return self._close(alert, staff, via, self._clock())

    def silence(
        self,
        *,
        until: float,
        reason: str,
        by: str,
        device: str | None = None,
        zone: str | None = None,
    ) -> tuple[str, list[Change]]:
        """Hold back pages for a device or a zone until a time, with a reason."""
        if (device is None) == (zone is None):
            raise EngineError("a silence covers exactly one device or one zone")
        if device is not None and device not in self._devices:
            raise UnknownDevice(device)
        if zone is not None and zone not in self._zones:
            raise EngineError(f"zone {zone!r} is not in the site file")
        silence = Silence(self._new_id(), until, reason, by, device, zone)
        self._dirty.add(f"silence/{silence.id}")
        return silence.id, self._book.silence(silence, self._clock())

    def unsilence(self, silence_id: str) -> list[Change]:
        self._dirty.add(f"silence/{silence_id}")
        return self._book.end_silence(silence_id, self._clock())

    def advance(
        self, now: float | None = None, limit: int | None = None
    ) -> list[Action]:
        """Carry out the timers due by ``now`` (default: the clock), earliest first.

        With ``limit``, at most that many fire; the rest stay due for the next
        call, so a caller with other work (the gateway's loop) can take a
        hundred thousand due escalations in slices instead of one long stop.
        """
        now = self._clock() if now is None else now
        actions: list[Action] = []
        for key, due in itertools.islice(self._timers.pop_due(now), limit):
            actions.extend(self._fire(key, due, now))
        return actions

    # -- saved state ----------------------------------------------------------

    def take_dirty(self) -> dict[str, Any]:
        """State entries changed since the last call; None means deleted."""
        changed = {key: self._state_entry(key) for key in sorted(self._dirty)}
        self._dirty.clear()
        return changed

    def dump_state(self) -> dict[str, Any]:
        """Every state entry, for a snapshot or a test."""
        keys = [f"count/{r}/{s}" for r, s in self._counters]
        keys += [f"threshold/{r}/{s}" for r, s in self._thresholds]
        keys += [f"feedback/{r}/{s}" for r, s in self._feedback]
        keys += [f"silence/{i}" for i in self._book.silences]
        keys.append("presence")
        return {key: self._state_entry(key) for key in sorted(keys)}

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Take back counters, windows, thresholds, presence and silences."""
        for key, value in state.items():
            if value is None:
                continue
            kind, _, rest = key.partition("/")
            name, _, subject = rest.partition("/")
            if kind != "presence" and kind != "silence" and name not in self._rules:
                continue  # the rule is gone; its state goes with it
            if kind == "count":
                self._counters[(name, subject)] = Counter.load(value)
            elif kind == "threshold":
                self._load_threshold(name, subject, Threshold.load(value))
            elif kind == "feedback":
                self._feedback[(name, subject)] = Feedback.load(value)
            elif kind == "silence":
                silence = Silence(**value)
                self._book.silences[silence.id] = silence
                self._timers.set(("silence", silence.id), silence.until)
            elif kind == "presence":
                self._presence = Presence.load(value)
                self._reschedule_dwells()

    def _state_entry(self, key: str) -> Any:
        kind, _, rest = key.partition("/")
        name, _, subject = rest.partition("/")
        found: Any
        if kind == "count":
            found = self._counters.get((name, subject))
        elif kind == "threshold":
            found = self._thresholds.get((name, subject))
        elif kind == "feedback":
            found = self._feedback.get((name, subject))
        elif kind == "silence":
            silence = self._book.silences.get(rest)
            return None if silence is None else _silence_dict(silence)
        else:
            return self._presence.dump()
        return None if found is None else found.dump()

    # -- call rules -----------------------------------------------------------

    def _call_open(
        self, rule: CallRule, event: Event, device: Device, now: float
    ) -> list[Action]:
        if not self._active(rule, now):
            return []
        change = self._open(rule, device.id, device, event.id, now)
        return [change]

    def _call_cancel(
        self, rule: CallRule, event: Event, device: Device, now: float
    ) -> list[Action]:
        alert_id = self._book.by_key.get((rule.name, device.id))
        if alert_id is None:
            return []
        return self._close(self._book.alerts[alert_id], None, "station", now)

    # -- count rules ----------------------------------------------------------

    def _count(
        self, rule: CountRule, event: Event, device: Device, now: float
    ) -> list[Action]:
        zone = self._zone_of(device)
        if zone is None:
            return []
        counter = self._counters.setdefault((rule.name, zone), Counter())
        count = counter.add(rule, now)
        self._dirty.add(f"count/{rule.name}/{zone}")
        if count < rule.at_least:
            return []
        return self._condition(rule, zone, device, event.id, now, {"count": count})

    def _count_reset(
        self, rule: CountRule, event: Event, device: Device, now: float
    ) -> list[Action]:
        zone = self._zone_of(device)
        if zone is None:
            return []
        return self._reset_zone(rule, zone, None, "station", now, None)

    def _reset_zone(
        self,
        rule: RuleBase,
        zone: str,
        staff: str | None,
        via: str,
        now: float,
        proof: dict[str, Any] | None,
    ) -> list[Action]:
        alert_id = self._book.by_key.get((rule.name, zone))
        if alert_id is not None:
            return self._close(self._book.alerts[alert_id], staff, via, now, proof)
        self._forget(rule, zone)
        return self._composites_for(rule, zone, None, f"reset:{zone}", now)

    # -- threshold rules ------------------------------------------------------

    def _reading(
        self, rule: ThresholdRule, event: Event, device: Device, now: float
    ) -> list[Action]:
        if event.fields.get("reading") != rule.reading:
            return []
        value = float(event.fields["value"])
        key = (rule.name, device.id)
        state = self._thresholds.setdefault(key, Threshold())
        state.value = float(value)
        self._dirty.add(f"threshold/{rule.name}/{device.id}")
        if rule.breached(value):
            if state.since is None and not state.tripped:
                state.since = now
                self._timers.set(("threshold", *key), now + rule.lasting)
            return []
        if state.tripped and not rule.cleared(value):
            return []  # inside the hysteresis band: still a gap

        # Back within the limit: a pending breach is forgotten, a gap clears.
        state.since = None
        self._timers.cancel(("threshold", *key))
        if not state.tripped:
            return []
        state.tripped = False
        return self._clear(rule, device.id, self._zone_of(device), event.id, now)

    def _trip(self, rule: ThresholdRule, device_id: str, now: float) -> list[Action]:
        state = self._thresholds.get((rule.name, device_id))
        if state is None or state.since is None:
            return []
        state.tripped = True
        self._dirty.add(f"threshold/{rule.name}/{device_id}")
        detail = {"reading": rule.reading, "value": state.value}
        event_id = f"threshold:{rule.name}:{device_id}:{state.since:.3f}"
        return self._device_condition(rule, device_id, event_id, now, detail)

    def _load_threshold(self, name: str, device: str, state: Threshold) -> None:
        rule = self._rules[name]
        self._thresholds[(name, device)] = state
        if state.since is not None and not state.tripped:
            assert isinstance(rule, ThresholdRule)
            self._timers.set(("threshold", name, device), state.since + rule.lasting)

    # -- feedback rules -------------------------------------------------------

    def _press(
        self, rule: FeedbackRule, event: Event, device: Device, now: float
    ) -> list[Action]:
        score = event.fields["score"]
        zone = self._zone_of(device)
        if zone is None:
            return []
        self._last_press[(rule.name, device.id)] = now

        state = self._feedback.setdefault((rule.name, zone), Feedback())
        state.add(rule, now, negative=score in rule.negative)
        self._dirty.add(f"feedback/{rule.name}/{zone}")

        actions: list[Action] = []
        if rule.kudos_after is not None and state.positive_run >= rule.kudos_after:
            actions.append(self._kudos(rule, zone, state.positive_run, now))
            state.positive_run = 0
        if state.holds(rule, now):
            detail = {"share": round(state.share(), 3), "presses": len(state.presses)}
            actions.extend(self._condition(rule, zone, device, event.id, now, detail))
        return actions

    def _kudos(self, rule: FeedbackRule, zone: str, presses: int, now: float) -> Kudos:
        on_duty = self._on_duty(now)
        team = tuple(
            member.id
            for member in self._staff.values()
            if (not member.zones or zone in member.zones) and member.id in on_duty
        )
        return Kudos(self._new_id(), rule.name, zone, now, presses, team)

    # -- supervision rules ----------------------------------------------------

    def _start_supervision(self, now: float) -> None:
        # Every supervised device gets a full heartbeat from start-up: a
        # device that never reports is flagged, one that reports is not.
        for device, rules in self._watchers.items():
            for rule in rules:
                self._last_heard[(rule.name, device)] = now
                if rule.heartbeat is not None:
                    key = ("silent", rule.name, device)
                    self._timers.set(key, now + rule.heartbeat)

    def _heard(self, rule: SupervisionRule, device: Device, now: float) -> list[Action]:
        # Only remember the time: the pending timer checks it when it fires
        # and re-arms itself, instead of a heap push per message.
        self._last_heard[(rule.name, device.id)] = now
        key = ("silent", rule.name, device.id)
        if rule.heartbeat is not None and key not in self._timers:
            self._timers.set(key, now + rule.heartbeat)
        if (rule.name, device.id) not in self._silent:
            return []
        self._silent.discard((rule.name, device.id))
        zone = self._zone_of(device)
        return self._clear(rule, device.id, zone, f"heard:{device.id}", now)

    def _lost(
        self,
        rule: SupervisionRule,
        device: Device,
        now: float,
        fields: dict[str, Any],
    ) -> list[Action]:
        if (rule.name, device.id) in self._silent:
            return []
        self._timers.cancel(("silent", rule.name, device.id))
        self._last_heard.pop((rule.name, device.id), None)
        reason = str(fields.get("reason") or "reported offline by its driver")
        return self._went_silent(rule, device.id, now, now, {"reason": reason[:120]})

    def _went_silent(
        self,
        rule: SupervisionRule,
        device_id: str,
        due: float,
        now: float,
        detail: dict[str, Any] | None = None,
    ) -> list[Action]:
        self._silent.add((rule.name, device_id))
        event_id = f"silent:{device_id}:{due:.3f}"
        if detail is None:
            assert rule.heartbeat is not None  # only heartbeat timers get here
            detail = {"silent_for": round(now - due + rule.heartbeat, 3)}
        return self._device_condition(rule, device_id, event_id, now, detail)

    # -- badges and presence --------------------------------------------------

    def _badge(self, event: Event, now: float) -> list[Action]:
        badge = event.fields.get("badge")
        place = event.fields.get("zone")
        if not isinstance(badge, str):
            raise BadEventField(event, "badge", "the badge's beacon id")
        if place not in self._zones and place not in self._room_zone:
            raise BadEventField(event, "zone", "a room or zone id of the site")
        member = self._badges.get(badge)
        if member is None:
            raise UnknownBadge(badge)
        signal = event.fields.get("rssi")
        if not isinstance(signal, int | float) or isinstance(signal, bool):
            signal = None

        if event.type == LEAVE:
            if self._presence.leave(place, badge):
                self._dirty.add("presence")
                for rule, _ in self._presence_rules.get(self._place_zone(place), ()):
                    self._timers.cancel(("dwell", rule.name, badge, place))
            return []
        if self._presence.enter(place, badge, now, signal):
            self._dirty.add("presence")
            self._schedule_dwells(place, badge, member, now)
        return []

    def _schedule_dwells(
        self, place: str, badge: str, member: StaffMember, since: float
    ) -> None:
        """Arm the dwell check of every rule this badge's presence can serve."""
        for rule, roles in self._presence_rules.get(self._place_zone(place), ()):
            if roles.isdisjoint(member.roles):
                continue
            due = self._dwell_due(rule, place, since)
            if due is not None:
                self._arm_dwell(rule, badge, place, due)

    def _dwell_due(self, rule: RuleBase, place: str, entered: float) -> float | None:
        """When a badge that entered at ``entered`` has stayed long enough.

        A service visit resets a count whether or not a gap is open, so it
        counts from the arrival. For an alert the dwell counts from the later
        of the arrival and the alert's opening: a nurse already in the room
        when the patient calls must still stay ``dwell`` seconds.
        """
        check = _presence_check(rule)
        if check is None:
            return None
        if isinstance(rule, CountRule):
            return entered + check.dwell
        if rule.station_only:
            return None  # never resolved by presence, so nothing to arm
        starts = [
            max(entered, alert.opened_at)
            for alert in self._book.by_place.get(place, {}).values()
            if alert.rule == rule.name and _in_place(alert, place, self._zones)
        ]
        return min(starts) + check.dwell if starts else None

    def _arm_dwell(self, rule: RuleBase, badge: str, place: str, due: float) -> None:
        key = ("dwell", rule.name, badge, place)
        current = self._timers.due_at(key)
        if current is None or due < current:
            self._timers.set(key, due)

    def _reschedule_dwells(self) -> None:
        for place, badges in self._presence.here.items():
            for badge, (entered, _) in badges.items():
                member = self._badges.get(badge)
                if member is not None:
                    self._schedule_dwells(place, badge, member, entered)

    def _dwelled(
        self, rule: RuleBase, badge: str, place: str, now: float
    ) -> list[Action]:
        check = _presence_check(rule)
        entry = self._presence.present(place).get(badge)
        member = self._badges.get(badge)
        if check is None or entry is None or member is None:
            return []
        entered, signal = entry

        if isinstance(rule, CountRule):
            if now - entered < check.dwell:
                return []
            proof = _proof(badge, member.id, place, entered, entered, now, signal)
            zone = self._place_zone(place)
            return self._reset_zone(rule, zone, member.id, "presence", now, proof)

        actions: list[Action] = []
        for alert in list(self._book.by_place.get(place, {}).values()):
            if alert.rule != rule.name or not _in_place(alert, place, self._zones):
                continue
            # Never for emergency and code calls: a badge walking past is no
            # proof that anyone attended the patient.
            if rule.station_only:
                continue
            start = max(entered, alert.opened_at)
            if now - start >= check.dwell:
                proof = _proof(badge, member.id, place, entered, start, now, signal)
                actions.extend(self._close(alert, member.id, "presence", now, proof))

        # Alerts that opened after the badge arrived wait their own dwell.
        due = self._dwell_due(rule, place, entered)
        if due is not None:
            self._arm_dwell(rule, badge, place, due)
        return actions

    def _presence_for_new_alert(self, rule: RuleBase, alert: Alert) -> None:
        """Badges already in the place start their dwell when the alert opens."""
        if rule.resolve_by_presence is None or rule.station_only:
            return
        for place in (alert.room, alert.zone):
            if place is None:
                continue
            for badge, (entered, _) in self._presence.present(place).items():
                member = self._badges.get(badge)
                roles = rule.resolve_by_presence.roles
                if member is not None and not set(roles).isdisjoint(member.roles):
                    due = max(entered, alert.opened_at) + rule.resolve_by_presence.dwell
                    self._arm_dwell(rule, badge, place, due)

    # -- conditions, composites and the alerts they raise ---------------------

    def _condition(
        self,
        rule: RuleBase,
        zone: str,
        device: Device,
        event_id: str,
        now: float,
        detail: dict[str, Any],
    ) -> list[Action]:
        """A zone rule's condition holds: raise its gap once, update composites."""
        actions: list[Action] = []
        if (
            rule.raises_alerts
            and (rule.name, zone) not in self._book.by_key
            and self._active(rule, now)
        ):
            actions.append(self._open(rule, zone, device, event_id, now, detail))
        actions.extend(self._composites_for(rule, zone, device, event_id, now))
        return actions

    def _device_condition(
        self,
        rule: RuleBase,
        device_id: str,
        event_id: str,
        now: float,
        detail: dict[str, Any],
    ) -> list[Action]:
        """A device rule's condition holds: raise its gap, update composites."""
        device = self._devices[device_id]
        actions: list[Action] = []
        if rule.raises_alerts and self._active(rule, now):
            actions.append(self._open(rule, device_id, device, event_id, now, detail))
        zone = self._zone_of(device)
        if zone is not None:
            actions.extend(self._composites_for(rule, zone, device, event_id, now))
        return actions

    def _clear(
        self,
        rule: RuleBase,
        subject: str,
        zone: str | None,
        event_id: str,
        now: float,
    ) -> list[Action]:
        """A condition stopped holding: its gap closes by itself."""
        actions: list[Action] = []
        alert_id = self._book.by_key.get((rule.name, subject))
        if alert_id is not None:
            alert = self._book.alerts[alert_id]
            actions.extend(self._book.close(alert, None, "cleared", now))
        if zone is not None:
            actions.extend(self._composites_for(rule, zone, None, event_id, now))
        return actions

    def _composites_for(
        self,
        rule: RuleBase,
        zone: str,
        device: Device | None,
        event_id: str,
        now: float,
    ) -> list[Action]:
        actions: list[Action] = []
        for composite in self._composites.get(rule.name, ()):
            holds = all(
                # A disabled condition does not hold.
                name in self._rules and self._holds(self._rules[name], zone, now)
                for name in composite.all
            )
            alert_id = self._book.by_key.get((composite.name, zone))
            if holds and alert_id is None and self._active(composite, now):
                source = device or self._any_device_in(zone)
                if source is not None:
                    detail = {"conditions": list(composite.all)}
                    actions.append(
                        self._open(composite, zone, source, event_id, now, detail)
                    )
            elif not holds and alert_id is not None:
                alert = self._book.alerts[alert_id]
                actions.extend(self._book.close(alert, None, "cleared", now))
        return actions

    def _holds(self, rule: RuleBase, zone: str, now: float) -> bool:
        if isinstance(rule, CountRule):
            counter = self._counters.get((rule.name, zone))
            return counter is not None and counter.holds(rule, now)
        if isinstance(rule, FeedbackRule):
            state = self._feedback.get((rule.name, zone))
            return state is not None and state.holds(rule, now)
        devices = self._zone_devices.get(zone, ())
        if isinstance(rule, ThresholdRule):
            return any(
                (state := self._thresholds.get((rule.name, d))) is not None
                and state.tripped
                for d in devices
            )
        if isinstance(rule, SupervisionRule):
            return any((rule.name, d) in self._silent for d in devices)
        return False

    def _open(
        self,
        rule: RuleBase,
        subject: str,
        device: Device,
        event_id: str,
        now: float,
        detail: dict[str, Any] | None = None,
    ) -> Change:
        room = device.room
        zone = self._room_zone.get(room) if room else None
        if zone is None and subject in self._zones:
            zone = subject
        change = self._book.open(
            rule,
            subject,
            device=device.id,
            room=room if subject == device.id else None,
            zone=zone,
            event_id=event_id,
            now=now,
            detail=detail,
        )
        if change.kind == "opened":
            self._presence_for_new_alert(rule, self._book.alerts[change.alert.id])
        return change

    def _close(
        self,
        alert: Alert,
        staff: str | None,
        via: str,
        now: float,
        proof: dict[str, Any] | None = None,
    ) -> list[Action]:
        """Resolve an alert; a closed count or feedback gap starts afresh."""
        actions: list[Action] = list(self._book.close(alert, staff, via, now, proof))
        rule = self._managed[alert.rule]
        if isinstance(rule, CountRule | FeedbackRule) and alert.subject is not None:
            self._forget(rule, alert.subject)
            actions.extend(
                self._composites_for(rule, alert.subject, None, alert.event_id, now)
            )
        return actions

    def _forget(self, rule: RuleBase, zone: str) -> None:
        if isinstance(rule, CountRule):
            self._counters.pop((rule.name, zone), None)
            self._dirty.add(f"count/{rule.name}/{zone}")
        elif isinstance(rule, FeedbackRule):
            self._feedback.pop((rule.name, zone), None)
            self._dirty.add(f"feedback/{rule.name}/{zone}")

    # -- timers ---------------------------------------------------------------

    def _fire(self, key: tuple[Any, ...], due: float, now: float) -> list[Action]:
        kind = key[0]
        if kind == "alert":
            return [self._book.fire(key[1], due, now)]
        if kind == "silence":
            self._dirty.add(f"silence/{key[1]}")
            return list(self._book.end_silence(key[1], now))
        rule = self._rules.get(key[1])
        if rule is None:
            return []
        if kind == "threshold":
            assert isinstance(rule, ThresholdRule)
            return self._trip(rule, key[2], now)
        if kind == "silent":
            assert isinstance(rule, SupervisionRule)
            heard = self._last_heard.get((rule.name, key[2]))
            if rule.heartbeat is None:
                return []  # a timer left from a site file that had a heartbeat
            if heard is not None and heard + rule.heartbeat > now:
                self._timers.set(key, heard + rule.heartbeat)
                return []
            return self._went_silent(rule, key[2], due, now)
        if kind == "dwell":
            return self._dwelled(rule, key[2], key[3], now)
        return []

    # -- helpers --------------------------------------------------------------

    def _targets(self, level: Level, now: float) -> tuple[str, ...]:
        """Who a level means now: named staff, and each role's people on duty.

        A role whose people have no shifts is paged as the role itself, on
        its shared pager topic; if nobody of a role is on duty the role topic
        is paged too, so a page is never sent to no one.
        """
        on_duty = self._on_duty(now)
        targets = list(level.staff)
        for group in level.groups:
            targets.extend(m for m in self._groups.get(group, ()) if m in on_duty)
        for zone in level.zones:
            team = [
                member.id
                for member in self._staff.values()
                if zone in member.zones and member.id in on_duty
            ]
            # Nobody of the zone on duty: its shared pager topic still rings.
            targets.extend(team or [f"zone:{zone}"])
        for role in level.roles:
            members = self._by_role.get(role, [])
            if not any(member.shifts for member in members):
                targets.append(role)
                continue
            present = [member.id for member in members if member.id in on_duty]
            targets.extend(present or [role])
        return tuple(dict.fromkeys(targets))

    def _on_duty(self, now: float) -> frozenset[str]:
        """Staff on shift at ``now``, worked out once per minute.

        Shifts are whole minutes of local time, so the answer cannot change
        within a minute; computing it per page cost a fifth of the engine's
        time in the benchmark.
        """
        minute = int(now // 60)
        if minute != self._duty_minute:
            self._duty_minute = minute
            self._duty = frozenset(
                member.id
                for member in self._staff.values()
                if in_windows(member.shifts, now, self._tz)
            )
        return self._duty

    def _active(self, rule: RuleBase, now: float) -> bool:
        return in_windows(rule.active, now, self._tz)

    def _place_zone(self, place: str) -> str:
        return place if place in self._zones else self._room_zone[place]

    def _zone_of(self, device: Device) -> str | None:
        return self._room_zone.get(device.room) if device.room else None

    def _any_device_in(self, zone: str) -> Device | None:
        devices = self._zone_devices.get(zone)
        return self._devices[devices[0]] if devices else None

    def _unresolved(self, alert_id: str) -> Alert:
        alert = self._book.alerts.get(alert_id)
        if alert is None:
            raise UnknownAlert(alert_id)
        return alert

    def _known_staff(self, staff: str) -> None:
        if staff not in self._staff:
            raise UnknownStaff(staff)

    def _index(self) -> None:
        candidates = _CandidateRules(list(self._rules.values()))
        for device in self._devices.values():
            zone = self._zone_of(device)
            if zone is not None:
                self._zone_devices.setdefault(zone, []).append(device.id)
            for rule in candidates.for_device(device.id, zone):
                if _matches(rule.devices, device, zone):
                    self._route(rule, device.id)
                elif isinstance(rule, CountRule) and _in_zones(rule.devices, zone):
                    # A reset ("cleaned") may come from any device in the
                    # zone, such as a cleaner's button by the door.
                    self._add_route(rule, device.id, rule.resets_on)
        for rule in self._rules.values():
            if isinstance(rule, CompositeRule):
                for name in rule.all:
                    self._composites.setdefault(name, []).append(rule)
            check = _presence_check(rule)
            if check is not None:
                for zone in rule.devices.zones or sorted(self._zones):
                    entry = (rule, frozenset(check.roles))
                    self._presence_rules.setdefault(zone, []).append(entry)

    def _route(self, rule: RuleBase, device: str) -> None:
        if isinstance(rule, SupervisionRule):
            self._watchers.setdefault(device, []).append(rule)
            return
        if isinstance(rule, CallRule):
            types = [rule.opens_on, rule.cancels_on]
        elif isinstance(rule, CountRule):
            types = [rule.counts, rule.resets_on]
        elif isinstance(rule, ThresholdRule):
            types = ["reading"]
        elif isinstance(rule, FeedbackRule):
            types = [rule.presses]
        else:
            types = []
        for event_type in types:
            self._add_route(rule, device, event_type)

    def _add_route(self, rule: RuleBase, device: str, event_type: str | None) -> None:
        if event_type is not None:
            self._routes.setdefault((device, event_type), []).append(rule)


class _CandidateRules:
    """The rules that could match a device, found without trying them all.

    A rule naming device ids can only match those devices, and one naming
    zones only devices in them; only rules naming neither are tried on every
    device. Matching 1,000 rules against 19,000 devices one by one took five
    seconds at start-up.
    """

    def __init__(self, rules: list[RuleBase]) -> None:
        self._order = {id(rule): index for index, rule in enumerate(rules)}
        self._everywhere: list[RuleBase] = []
        self._by_device: dict[str, list[RuleBase]] = {}
        self._by_zone: dict[str, list[RuleBase]] = {}
        for rule in rules:
            match = rule.devices
            if isinstance(rule, CountRule):
                # A count rule also hears resets from devices it does not
                # count, anywhere in its zones (or in any zone).
                self._add_by_zones(rule)
            elif match.ids:
                for device in match.ids:
                    self._by_device.setdefault(device, []).append(rule)
            else:
                self._add_by_zones(rule)

    def _add_by_zones(self, rule: RuleBase) -> None:
        if not rule.devices.zones:
            self._everywhere.append(rule)
        for zone in rule.devices.zones:
            self._by_zone.setdefault(zone, []).append(rule)

    def for_device(self, device: str, zone: str | None) -> list[RuleBase]:
        found = [*self._by_device.get(device, ()), *self._everywhere]
        if zone is not None:
            found += self._by_zone.get(zone, ())
        unique = {id(rule): rule for rule in found}
        return sorted(unique.values(), key=lambda rule: self._order[id(rule)])


def _matches(match: DeviceMatch, device: Device, zone: str | None) -> bool:
    if match.kind is not None and match.kind != device.kind:
        return False
    if match.ids and device.id not in match.ids:
        return False
    return not match.zones or zone in match.zones


def _in_zones(match: DeviceMatch, zone: str | None) -> bool:
    return zone is not None and (not match.zones or zone in match.zones)


def _presence_check(rule: RuleBase) -> PresenceCheck | None:
    if isinstance(rule, CountRule) and rule.reset_by_visit is not None:
        return rule.reset_by_visit
    return rule.resolve_by_presence


def _in_place(alert: Alert, place: str, zones: set[str]) -> bool:
    """A badge in ``place`` attends this alert: its room, or its zone if it has none."""
    if alert.room is not None:
        return alert.room == place
    return place in zones and alert.zone == place


def _proof(
    badge: str,
    staff: str,
    place: str,
    entered: float,
    since: float,
    now: float,
    signal: float | None,
) -> dict[str, Any]:
    """What a presence resolution keeps as evidence of the visit.

    ``dwell`` counts from ``since``: the arrival, or the alert's opening if
    the badge was already there.
    """
    return {
        "badge": badge,
        "staff": staff,
        "place": place,
        "entered_at": entered,
        "dwell": round(now - since, 3),
        "signal": signal,
    }


def _silence_dict(silence: Silence) -> dict[str, Any]:
    return {
        "id": silence.id,
        "until": silence.until,
        "reason": silence.reason,
        "by": silence.by,
        "device": silence.device,
        "zone": silence.zone,
    }
