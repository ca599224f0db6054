"""Dry run: what a proposed rule set would have raised on the recorded events.

The device events of the last hours (table ``events``) are replayed through
two fresh engines with a simulated clock, one with the running rules and one
with the proposed ones, and the alerts each raised are set side by side.
Runs in a worker thread on a read-only connection of its own, so the gateway
keeps alerting meanwhile.

Only device events are replayed: acknowledgements and resolutions from
pagers and the web page are not in that table, so in both runs an alert
escalates as if nobody answered, until a station cancel, a reset, a badge or
its condition clearing closes it.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import tzinfo
from pathlib import Path
from typing import Any

from gateway.credit import open_reader
from rules.alerts import Action, Change
from rules.engine import Engine, EngineError, counter_ids
from rules.events import Event
from rules.lifecycle import PAGING
from rules.schema import RuleBase
from rules.site import Site

log = logging.getLogger(__name__)

MAX_HOURS = 7 * 24.0
"""The longest window a dry run looks back over."""

MAX_EVENTS = 100_000
"""Events replayed at most (the newest of the window), so a run stays bounded;
its time on a Raspberry Pi has not been measured."""

MAX_TIMERS = 200_000
"""Timer firings per replay at most: reminders every minute on many alerts
left open for a week would otherwise run long."""

MAX_LISTED = 500
"""Alerts listed per side; the counts cover them all."""


@dataclass(frozen=True)
class Window:
    """The events of a dry run, and what was left out."""

    start: float
    end: float
    events: list[Event]
    times: list[float]
    truncated: bool


def recorded(path: str | Path, hours: float, now: float) -> Window:
    """The events received in the last ``hours``, oldest first, at most MAX_EVENTS."""
    hours = min(hours, MAX_HOURS)
    start = now - hours * 3600
    conn = open_reader(path)
    try:
        rows = conn.execute(
            "SELECT id, type, device, ts, received_at, fields FROM events "
            "WHERE received_at >= ? AND received_at <= ? "
            "ORDER BY received_at DESC, rowid DESC LIMIT ?",
            [start, now, MAX_EVENTS + 1],
        ).fetchall()
    except sqlite3.OperationalError as exc:
        raise RuntimeError(f"cannot read the recorded events: {exc}") from None
    finally:
        conn.close()
    truncated = len(rows) > MAX_EVENTS
    rows = rows[:MAX_EVENTS][::-1]
    events = [
        Event(row[0], row[1], row[2], row[3], json.loads(row[5]) if row[5] else {})
        for row in rows
    ]
    if truncated:
        start = rows[0][4]
    return Window(start, now, events, [row[4] for row in rows], truncated)


def compare(
    window: Window,
    site: Site,
    tz: tzinfo,
    current: Sequence[RuleBase],
    proposed: Sequence[RuleBase],
) -> dict[str, Any]:
    """Replay the window through both rule sets; the result the page shows."""
    started = time.perf_counter()
    before = replay(window, site, tz, current)
    after = replay(window, site, tz, proposed)
    _mark_differences(before["alerts"], after["alerts"])
    result = {
        "start": window.start,
        "end": window.end,
        "events": len(window.events),
        "truncated": window.truncated,
        "current": _summary(before),
        "proposed": _summary(after),
        "differences": _difference_counts(before["alerts"], after["alerts"]),
        "seconds": round(time.perf_counter() - started, 3),
    }
    log.info(
        "Dry run over %d event(s): %d alert(s) now, %d proposed, in %.2f s",
        len(window.events),
        len(before["alerts"]),
        len(after["alerts"]),
        result["seconds"],
    )
    return result


def replay(
    window: Window, site: Site, tz: tzinfo, rules: Sequence[RuleBase]
) -> dict[str, Any]:
    """Every alert ``rules`` raise on the window's events, with who was paged."""
    clock = [window.start]
    engine = Engine(site, rules, lambda: clock[0], counter_ids("dry"), tz)
    book = _Book({rule.name: rule for rule in rules})
    refused: Counter[str] = Counter()
    timers = _Timers(engine, clock, book)

    for at, event in zip(window.times, window.events, strict=True):
        timers.run_until(at)
        clock[0] = at
        try:
            book.take(engine.on_event(event))
        except EngineError as exc:
            refused[exc.reason] += 1
    timers.run_until(window.end)
    return {
        "alerts": book.alerts(),
        "refused": dict(refused),
        "timers_cut": timers.cut,
    }


class _Timers:
    """Fires due timers at their own due times, so escalations keep their time."""

    def __init__(self, engine: Engine, clock: list[float], book: _Book) -> None:
        self.engine = engine
        self.clock = clock
        self.book = book
        self.fired = 0
        self.cut = False

    def run_until(self, end: float) -> None:
        while (due := self.engine.due()) is not None and due <= end:
            if self.fired >= MAX_TIMERS:
                self.cut = True
                return
            self.clock[0] = due
            actions = self.engine.advance(due)
            self.fired += max(1, len(actions))
            self.book.take(actions)


class _Book:
    """What each alert of a replay did: its level, pages and closing."""

    def __init__(self, rules: dict[str, RuleBase]) -> None:
        self.rules = rules
        self._alerts: dict[str, dict[str, Any]] = {}

    def take(self, actions: Sequence[Action]) -> None:
        for action in actions:
            if isinstance(action, Change):
                self._change(action)

    def _change(self, change: Change) -> None:
        alert = change.alert
        entry = self._alerts.get(alert.id)
        if entry is None:
            entry = self._alerts[alert.id] = {
                "rule": alert.rule,
                "priority": alert.priority,
                "zone": alert.zone,
                "room": alert.room,
                "device": alert.device,
                "subject": alert.subject,
                "opened_at": alert.opened_at,
                "level": alert.level,
                "closed_at": None,
                "closed_via": None,
                "paged": {},
            }
        entry["level"] = max(entry["level"], alert.level)
        if change.kind in PAGING and change.notifications:
            paged = entry["paged"].setdefault(alert.level, set())
            paged.update(note.target for note in change.notifications)
        if change.kind == "resolved":
            entry["closed_at"] = alert.resolved_at
            entry["closed_via"] = alert.resolved_via

    def alerts(self) -> list[dict[str, Any]]:
        found = []
        for entry in self._alerts.values():
            rule = self.rules[entry["rule"]]
            levels = []
            for number in range(1, entry["level"] + 1):
                level = rule.levels[number - 1]
                levels.append(
                    {
                        "level": number,
                        "roles": list(level.roles),
                        "staff": list(level.staff),
                        "groups": list(level.groups),
                        "zones": list(level.zones),
                        "paged": sorted(entry["paged"].get(number, ())),
                    }
                )
            key = f"{entry['rule']}|{entry['subject']}|{entry['opened_at']:.3f}"
            found.append({**entry, "key": key, "paged": levels})
        return sorted(found, key=lambda a: (a["opened_at"], a["key"]))


def _pages(alert: dict[str, Any]) -> list[tuple[int, tuple[str, ...]]]:
    return [(level["level"], tuple(level["paged"])) for level in alert["paged"]]


def _mark_differences(
    before: list[dict[str, Any]], after: list[dict[str, Any]]
) -> None:
    """Each alert's ``change``: same, changed (level or pages), only_current..."""
    old = {alert["key"]: alert for alert in before}
    new = {alert["key"]: alert for alert in after}
    for key, alert in old.items():
        other = new.get(key)
        alert["change"] = "only_current" if other is None else _same(alert, other)
    for key, alert in new.items():
        other = old.get(key)
        alert["change"] = "only_proposed" if other is None else _same(other, alert)


def _same(a: dict[str, Any], b: dict[str, Any]) -> str:
    same = (a["level"], _pages(a), a["closed_at"]) == (
        b["level"],
        _pages(b),
        b["closed_at"],
    )
    return "same" if same else "changed"


def _difference_counts(
    before: list[dict[str, Any]], after: list[dict[str, Any]]
) -> dict[str, int]:
    counts = Counter(alert["change"] for alert in before)
    counts.update(a["change"] for a in after if a["change"] == "only_proposed")
    return {
        kind: counts.get(kind, 0)
        for kind in ("same", "changed", "only_current", "only_proposed")
    }


def _summary(run: dict[str, Any]) -> dict[str, Any]:
    alerts = run["alerts"]
    return {
        "count": len(alerts),
        "by_rule": dict(Counter(alert["rule"] for alert in alerts)),
        "by_level": {
            str(level): count
            for level, count in sorted(Counter(a["level"] for a in alerts).items())
        },
        "alerts": alerts[:MAX_LISTED],
        "listed_all": len(alerts) <= MAX_LISTED,
        "refused": run["refused"],
        "timers_cut": run["timers_cut"],
    }
