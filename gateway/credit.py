"""Recognition credit: who closed which gap, how fast, and whether to believe it.

A resolved alert becomes one **credit record**: who acknowledged it, who
resolved it and how (pager, web, presence with its proof), the seconds to
acknowledge and to resolve against the rule's target (the delay of its first
escalation), and a few facts for the recognition page (closed before
escalating, outside the person's own zone or role).

Credit is a motive to cheat, and badges can be cloned (an iBeacon has no
authentication). So a credit that does not add up is **flagged, never granted
silently**: a presence resolution without proof or with too short a dwell, a
proof that names someone else or another place, a badge seen elsewhere while
it was supposedly dwelling here, a pager resolve of a rule that expects a
visit with no sighting of the resolver's badge there. A resolution at the
station, by a condition clearing or by a timer credits nobody, and says so.

Everything here is a pure function of an alert record (the dict of
:func:`gateway.store.alert_record`, as stored in the outbox), the rules'
escalation tiers and the staff list, except the two SQL readers at the end:
:func:`sightings_between` and :func:`recognition_summary`.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.config import GatewayConfig
    from rules.events import Event
    from rules.schema import RuleBase

log = logging.getLogger(__name__)

# -- why a credit is not granted ----------------------------------------------

NO_PERSON = "no_person"
"""Closed at the station, by the condition clearing or by a timer: nobody to
credit. Not a suspicion, but no person gets the gap either."""

UNKNOWN_STAFF = "unknown_staff"
"""The resolver is not (or no longer) in the site file's staff list."""

UNKNOWN_RULE = "unknown_rule"
"""The alert's rule is not in the site file any more: no target, no dwell."""

NO_PROOF = "no_proof"
"""Resolved by presence, but no badge evidence was kept with it."""

SHORT_DWELL = "short_dwell"
"""The badge stayed less than the rule's ``dwell``."""

PROOF_MISMATCH = "proof_mismatch"
"""The proof names another person, a badge that is not the resolver's, or a
place that is not the alert's room or zone."""

TWO_PLACES = "two_places"
"""The badge arrived somewhere else while it was dwelling here: a clone, or a
badge that left and came back without the estimator noticing."""

WEAK_SIGNAL = "weak_signal"
"""The proof's signal is below the site's floor: maybe heard through a wall."""

NO_PRESENCE = "no_presence"
"""The rule expects a visit, and the resolver's badge was not seen at the
alert's place while it was open."""

PRESENCE_UNVERIFIED = "presence_unverified"
"""The rule expects a visit, but there is nothing to check it against: the
resolver carries no badge, or no sightings were available."""

FLAGS = {
    NO_PERSON: "closed at the station or by the condition: nobody to credit",
    UNKNOWN_STAFF: "the resolver is not in the staff list",
    UNKNOWN_RULE: "the alert's rule is no longer in the site file",
    NO_PROOF: "resolved by presence without badge evidence",
    SHORT_DWELL: "the badge stayed less than the rule's dwell",
    PROOF_MISMATCH: "the evidence names another person, badge or place",
    TWO_PLACES: "the badge was seen in another place at the same time",
    WEAK_SIGNAL: "the badge's signal was too weak to place it in the room",
    NO_PRESENCE: "the rule expects a visit; the badge was not seen there",
    PRESENCE_UNVERIFIED: "the rule expects a visit; nothing to check it against",
}
"""Every flag with a sentence for the recognition page."""

PERSON_VIAS = frozenset({"pager", "presence", "web"})
"""Ways of resolving that name a person; ``station``, ``cleared`` and
``timer`` never do."""

TOLERANCE = 2.0
"""Seconds at either end of a dwell in which a sighting elsewhere is no
contradiction: a presence estimator reports an arrival a moment late."""

LOOKBACK = 12 * 3600.0
"""How far before an alert opened to look for the resolver's badge: someone
already in the room when the patient called was there. One long shift."""

DWELL_SLACK = 0.001
"""The engine rounds a proof's dwell to milliseconds."""


# -- the site as credit sees it -----------------------------------------------


@dataclass(frozen=True, slots=True)
class Person:
    """A staff member, reduced to what credit needs."""

    id: str
    name: str
    roles: frozenset[str]
    zones: frozenset[str] = frozenset()
    """The teams the person belongs to; empty means every zone."""

    badge: str | None = None

    def in_team(self, zone: str | None) -> bool:
        return not self.zones or (zone is not None and zone in self.zones)


@dataclass(frozen=True, slots=True)
class Tier:
    """One escalation level: when it is paged and who it reaches."""

    after: float
    roles: frozenset[str] = frozenset()
    staff: frozenset[str] = frozenset()
    """Named staff, with the members of named groups already expanded."""

    zones: frozenset[str] = frozenset()
    """Zones whose team is paged."""

    def reaches(self, person: Person) -> bool:
        return (
            person.id in self.staff
            or not self.roles.isdisjoint(person.roles)
            or any(person.in_team(zone) for zone in self.zones)
        )


@dataclass(frozen=True, slots=True)
class RuleInfo:
    """What credit needs of a rule: its tiers and its presence check."""

    name: str
    tiers: tuple[Tier, ...] = ()
    dwell: float | None = None
    """Seconds a badge must stay to resolve by presence; None: no presence check."""

    presence_required: bool = False
    """Someone must have been there: the rule resolves by presence, so a pager
    resolve without a visit is suspicious. Never set for station-only rules."""

    @property
    def target(self) -> float | None:
        """Seconds to the first escalation: the response the rule asks for."""
        return self.tiers[1].after if len(self.tiers) > 1 else None

    def pages(self, person: Person, level: int) -> bool:
        """True if any tier up to ``level`` reaches this person."""
        return any(tier.reaches(person) for tier in self.tiers[: max(level, 1)])

    @classmethod
    def from_rule(cls, rule: RuleBase, groups: Mapping[str, Iterable[str]]) -> RuleInfo:
        tiers = tuple(
            Tier(
                after=level.after,
                roles=frozenset(level.roles),
                staff=frozenset(level.staff).union(
                    *(groups.get(group, ()) for group in level.groups)
                ),
                zones=frozenset(level.zones),
            )
            for level in rule.levels
        )
        check = getattr(rule, "reset_by_visit", None) or rule.resolve_by_presence
        return cls(
            name=rule.name,
            tiers=tiers,
            dwell=check.dwell if check is not None else None,
            presence_required=check is not None and not rule.station_only,
        )


@dataclass(frozen=True, slots=True)
class Sighting:
    """A badge arriving at (or leaving) a room or zone, by the gateway's clock."""

    place: str
    at: float
    left: bool = False


@dataclass(frozen=True)
class CreditSite:
    """The staff, rules and rooms that credit is judged against."""

    staff: Mapping[str, Person]
    rules: Mapping[str, RuleInfo]
    room_zones: Mapping[str, str]
    """Room id -> zone id: a badge in a room is also in its zone."""

    teams: tuple[str, ...] = ()
    """Zone ids, each the team of the people who list it."""

    min_signal: float | None = None
    """Weakest believable signal (dBm) of a presence proof; None: not checked."""

    @classmethod
    def from_config(
        cls, config: GatewayConfig, min_signal: float | None = None
    ) -> CreditSite:
        """Build from the validated site file; call once at start-up."""
        groups = {group.id: group.members for group in config.groups}
        staff = {
            member.id: Person(
                id=member.id,
                name=member.name,
                roles=frozenset(member.roles),
                zones=frozenset(member.zones),
                badge=member.badge,
            )
            for member in config.staff
        }
        rules = {rule.name: RuleInfo.from_rule(rule, groups) for rule in config.rules}
        room_zones = {room.id: zone.id for zone in config.zones for room in zone.rooms}
        teams = tuple(zone.id for zone in config.zones)
        return cls(staff, rules, room_zones, teams, min_signal)

    def same_place(self, a: str | None, b: str | None) -> bool:
        """A room and the zone that holds it are one place for a badge."""
        if a is None or b is None:
            return False
        return a == b or self.room_zones.get(a) == b or self.room_zones.get(b) == a

    def badge_of(self, staff_id: str | None) -> str | None:
        person = self.staff.get(staff_id or "")
        return person.badge if person is not None else None

    # -- alerts -----------------------------------------------------------------

    def credit_alert(
        self,
        alert: Mapping[str, Any],
        sightings: Sequence[Sighting] | None = None,
    ) -> dict[str, Any]:
        """The credit record of one resolved alert.

        Args:
            alert: The alert record, as published and stored in the outbox.
            sightings: The resolver's badge arriving and leaving places from
                :data:`LOOKBACK` before the alert opened until it was resolved,
                or None when they are not available. Only needed for the
                ``two_places`` and ``no_presence`` checks.
        """
        rule = self.rules.get(alert["rule"])
        via = alert.get("resolved_via")
        resolver = alert.get("resolved_by") if via in PERSON_VIAS else None
        person = self.staff.get(resolver or "")

        flags = self._flags(alert, rule, via, resolver, person, sightings)
        granted = person is not None and not flags
        times = _times(alert, rule, credited_resolver=person is not None)
        acker = alert.get("acked_by")
        level = int(alert.get("level") or 1)
        return {
            "kind": "alert",
            "alert": alert["id"],
            "rule": alert["rule"],
            "priority": alert.get("priority"),
            "zone": alert.get("zone"),
            "room": alert.get("room"),
            "opened_at": alert["opened_at"],
            "acknowledged_at": alert.get("acked_at"),
            "resolved_at": alert.get("resolved_at"),
            "acknowledged_by": acker if acker in self.staff else None,
            "resolved_by": resolver,
            "resolved_via": via,
            "credited": resolver if granted else None,
            "granted": granted,
            **times,
            "level": level,
            "before_escalation": level == 1,
            "outside_own_zone": _outside_zone(person, alert.get("zone")),
            "outside_own_role": (
                None
                if person is None or rule is None
                else not rule.pages(person, level)
            ),
            "proof": alert.get("proof"),
            "flags": flags,
        }

    def _flags(
        self,
        alert: Mapping[str, Any],
        rule: RuleInfo | None,
        via: str | None,
        resolver: str | None,
        person: Person | None,
        sightings: Sequence[Sighting] | None,
    ) -> list[str]:
        if resolver is None:
            return [NO_PERSON]
        if person is None:
            return [UNKNOWN_STAFF]

        flags = [] if rule is not None else [UNKNOWN_RULE]
        if via == "presence":
            flags += self._proof_flags(alert, rule, person, sightings)
        elif rule is not None and rule.presence_required:
            flags += self._visit_flags(alert, person, sightings)
        return flags

    def _proof_flags(
        self,
        alert: Mapping[str, Any],
        rule: RuleInfo | None,
        person: Person,
        sightings: Sequence[Sighting] | None,
    ) -> list[str]:
        proof = alert.get("proof")
        if not isinstance(proof, Mapping):
            return [NO_PROOF]

        flags = []
        dwell = float(proof.get("dwell") or 0.0)
        wanted = rule.dwell if rule is not None else None
        if wanted is not None and dwell + DWELL_SLACK < wanted:
            flags.append(SHORT_DWELL)
        place = proof.get("place")
        mismatched = (
            proof.get("staff") != person.id
            or proof.get("badge") != person.badge
            or not self.same_place(place, _place_of(alert))
        )
        if mismatched:
            flags.append(PROOF_MISMATCH)
        signal = proof.get("signal")
        floor = self.min_signal
        if floor is not None and signal is not None and signal < floor:
            flags.append(WEAK_SIGNAL)

        # The dwell ran from ``resolved_at - dwell``; arriving anywhere else
        # in between (past the estimator's lag) contradicts it.
        end = float(alert.get("resolved_at") or 0.0)
        start = end - dwell
        elsewhere = [
            s
            for s in sightings or ()
            if start + TOLERANCE < s.at < end - TOLERANCE
            and not s.left
            and not self.same_place(s.place, place)
        ]
        if elsewhere:
            flags.append(TWO_PLACES)
        return flags

    def _visit_flags(
        self,
        alert: Mapping[str, Any],
        person: Person,
        sightings: Sequence[Sighting] | None,
    ) -> list[str]:
        if person.badge is None or sightings is None:
            return [PRESENCE_UNVERIFIED]
        place = _place_of(alert)
        opened = float(alert["opened_at"])
        resolved = float(alert.get("resolved_at") or opened)
        if self._was_there(sightings, place, opened, resolved):
            return []
        return [NO_PRESENCE]

    def _was_there(
        self,
        sightings: Sequence[Sighting],
        place: str | None,
        opened: float,
        end: float,
    ) -> bool:
        """Whether the badge was at ``place`` at some moment in [opened, end].

        Either it was there when the alert opened (its last arrival before
        then was there, and it has not left), or it arrived there while the
        alert was open.
        """
        here: str | None = None
        for sighting in sorted(sightings, key=lambda s: s.at):
            if sighting.at <= opened:
                if not sighting.left:
                    here = sighting.place
                elif sighting.place == here:
                    here = None
                continue
            if sighting.at > end + TOLERANCE:
                break
            if not sighting.left and self.same_place(sighting.place, place):
                return True
        return self.same_place(here, place)

    # -- kudos ------------------------------------------------------------------

    def credit_kudos(self, kudos: Mapping[str, Any]) -> dict[str, Any]:
        """The team credit of one kudos (the body of a ``kudos`` outbox row)."""
        staff = [str(member) for member in kudos.get("staff") or ()]
        known = [member for member in staff if member in self.staff]
        flags = []
        if not staff:
            flags.append(NO_PERSON)
        if len(known) < len(staff):
            flags.append(UNKNOWN_STAFF)
        return {
            "kind": "kudos",
            "kudos": kudos.get("id"),
            "rule": kudos.get("rule"),
            "team": kudos.get("zone"),
            "at": kudos.get("at"),
            "presses": kudos.get("presses"),
            "credited": known,
            "granted": bool(known),
            "flags": flags,
        }


def _place_of(alert: Mapping[str, Any]) -> str | None:
    """Where someone must be to attend the alert: its room, else its zone."""
    return alert.get("room") or alert.get("zone")


def _seconds(start: Any, end: Any) -> float | None:
    if start is None or end is None:
        return None
    return round(float(end) - float(start), 3)


def _times(
    alert: Mapping[str, Any], rule: RuleInfo | None, *, credited_resolver: bool
) -> dict[str, Any]:
    """Seconds to acknowledge and to resolve, and the first human response."""
    opened = alert["opened_at"]
    to_ack = _seconds(opened, alert.get("acked_at"))
    to_resolve = _seconds(opened, alert.get("resolved_at"))
    # A patient cancelling at the bedside is nobody's response.
    response = to_ack if to_ack is not None else None
    if response is None and credited_resolver:
        response = to_resolve
    target = rule.target if rule is not None else None
    within = None if response is None or target is None else response <= target
    return {
        "seconds_to_acknowledge": to_ack,
        "seconds_to_resolve": to_resolve,
        "response_seconds": response,
        "target_seconds": target,
        "within_target": within,
    }


def _outside_zone(person: Person | None, zone: str | None) -> bool | None:
    if person is None:
        return None
    return bool(person.zones) and zone is not None and zone not in person.zones


# -- sightings from the events table ------------------------------------------

_SIGHTINGS = (
    "SELECT received_at, type, json_extract(fields, '$.badge') AS badge, "
    "json_extract(fields, '$.zone') AS place FROM events "
    "WHERE type IN ('enter', 'leave') AND received_at >= ? AND received_at <= ? "
)


def sightings_between(
    conn: sqlite3.Connection, start: float, end: float, badge: str | None = None
) -> dict[str, list[Sighting]]:
    """Badge arrivals and departures stored between two times, by badge.

    Times are the gateway's receipt times, the clock the engine judges dwell
    by. Uses the ``events(received_at)`` index, so a window of minutes is
    cheap enough for the loop thread; a week belongs in a worker thread.
    """
    sql, params = _SIGHTINGS, [start, end]
    if badge is not None:
        sql += "AND json_extract(fields, '$.badge') = ? "
        params.append(badge)
    found: dict[str, list[Sighting]] = {}
    for at, kind, who, place in conn.execute(sql + "ORDER BY received_at", params):
        if isinstance(who, str) and isinstance(place, str):
            found.setdefault(who, []).append(Sighting(place, at, kind == "leave"))
    return found


def credit_resolved(
    conn: sqlite3.Connection,
    site: CreditSite,
    alert: Mapping[str, Any],
    pending: Iterable[Event] = (),
) -> dict[str, Any]:
    """Credit a just-resolved alert, with its resolver's sightings from the store.

    ``pending`` are the events of the batch being committed with the
    resolution: not in the table yet, but already seen by the engine.
    """
    badge = site.badge_of(alert.get("resolved_by"))
    if badge is None:
        credit = site.credit_alert(alert)
    else:
        end = float(alert.get("resolved_at") or alert["opened_at"])
        start = float(alert["opened_at"]) - LOOKBACK
        sightings = sightings_between(conn, start, end, badge).get(badge, [])
        for event in pending:
            kind = event.type
            if kind in ("enter", "leave") and event.fields.get("badge") == badge:
                place = str(event.fields.get("zone"))
                sightings.append(Sighting(place, end, kind == "leave"))
        credit = site.credit_alert(alert, sightings)
    credit["fastest_of_shift"] = _fastest_of_shift(conn, credit)
    return credit


SHIFT = 12 * 3600.0
"""The window a "fastest response of the shift" is judged in. Ward shifts run
8 to 12 hours, and a credit does not know when its person's shift began, so
the last 12 hours stand in for it."""


def _fastest_of_shift(
    conn: sqlite3.Connection, credit: Mapping[str, Any]
) -> bool | None:
    """Whether this granted response beats every other one of the last shift."""
    response = credit.get("response_seconds")
    if response is None or not credit.get("granted"):
        return None
    now = float(credit.get("resolved_at") or credit["opened_at"])
    best = conn.execute(
        "SELECT MIN(COALESCE(acked_at, resolved_at) - opened_at) FROM alerts "
        "WHERE state = 'resolved' AND resolved_by IS NOT NULL "
        "AND resolved_at >= ? AND resolved_at <= ? AND id != ?",
        [now - SHIFT, now, credit["alert"]],
    ).fetchone()[0]
    return best is None or response < best


# -- the recognition summary --------------------------------------------------

_RESPONSES = (
    "SELECT h.alert_id, h.kind, h.actor, h.at, a.rule, a.priority, a.zone, "
    "a.room, a.level, a.opened_at, a.acked_at, a.acked_by, a.resolved_at, "
    "a.resolved_by, a.resolved_via, a.proof "
    "FROM alert_history AS h JOIN alerts AS a ON a.id = h.alert_id "
    "WHERE h.kind IN ('acknowledged', 'resolved') AND h.at >= ? AND h.at <= ? "
    "ORDER BY h.at"
)
_KUDOS = (
    "SELECT body FROM outbox WHERE kind = 'kudos' "
    "AND created_at >= ? AND created_at <= ?"
)
"""By commit time, which the partial index ``outbox_kudos`` covers; the
kudos' own ``at`` (a moment earlier) then decides its day."""

KUDOS_SLACK = 3600.0
"""Seconds either side of the window to look for kudos rows by commit time."""


def open_reader(path: str | Path) -> sqlite3.Connection:
    """A read-only connection of its own, for a summary built in a worker thread."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
    conn.execute("PRAGMA busy_timeout=5000")
    return conn


def period_starts(now: float, tz: tzinfo) -> dict[str, float]:
    """Local midnight today and on Monday of this week, as Unix times.

    Built from the local date, not by subtracting hours, so a day with a
    daylight-saving change still starts at its own midnight.
    """
    today = datetime.fromtimestamp(now, tz).date()
    monday = today - timedelta(days=today.weekday())
    return {
        "today": datetime(today.year, today.month, today.day, tzinfo=tz).timestamp(),
        "week": datetime(monday.year, monday.month, monday.day, tzinfo=tz).timestamp(),
    }


def recognition_summary(
    conn: sqlite3.Connection, site: CreditSite, tz: tzinfo, now: float
) -> dict[str, Any]:
    """Per person and per team, today and this week: gaps closed, response, kudos.

    Read from ``alert_history`` (each acknowledgement and resolution, with
    its alert) and the ``kudos`` rows of the outbox. A resolution counts as
    a gap closed only when its credit is granted; a flagged one is counted as
    ``flagged`` for its resolver, never dropped silently. A response is the
    time from opening to a person's first acknowledgement or granted
    resolution of the alert. Returns plain dicts for the web page.

    The kudos rows stay in the outbox until retention deletes delivered
    rows, which is why :class:`gateway.upstream.RetentionSettings` keeps
    them at least eight days.
    """
    starts = period_starts(now, tz)
    week = starts["week"]
    rows = conn.execute(_RESPONSES, (week, now)).fetchall()
    window = (week - KUDOS_SLACK, now + KUDOS_SLACK)
    kudos = [
        item
        for (body,) in conn.execute(_KUDOS, window)
        if week <= float((item := json.loads(body)).get("at") or 0.0) <= now
    ]
    sightings = sightings_between(conn, week - LOOKBACK, now)

    credits = {}
    for row in rows:
        if row[1] == "resolved":
            record = _record_from_row(row)
            badge = site.badge_of(record["resolved_by"])
            found = sightings.get(badge, []) if badge is not None else None
            credits[row[0]] = site.credit_alert(record, found)

    periods = {
        name: _period(site, start, rows, credits, kudos)
        for name, start in starts.items()
    }
    return {"generated_at": now, "timezone": str(tz), **periods}


def _record_from_row(row: Sequence[Any]) -> dict[str, Any]:
    names = (
        "id", "kind", "actor", "at", "rule", "priority", "zone", "room",
        "level", "opened_at", "acked_at", "acked_by", "resolved_at",
        "resolved_by", "resolved_via", "proof",
    )  # fmt: skip
    record = dict(zip(names, row, strict=True))
    if record["proof"] is not None:
        record["proof"] = json.loads(record["proof"])
    return record


@dataclass
class _Tally:
    gaps_closed: int = 0
    flagged: int = 0
    acknowledged: int = 0
    kudos: int = 0
    closed_without_person: int = 0

    def as_dict(self, responses: Iterable[float]) -> dict[str, Any]:
        values = list(responses)
        median = round(statistics.median(values), 1) if values else None
        return {
            "gaps_closed": self.gaps_closed,
            "flagged": self.flagged,
            "acknowledged": self.acknowledged,
            "kudos": self.kudos,
            "responses": len(values),
            "median_response_seconds": median,
        }


def _period(
    site: CreditSite,
    start: float,
    rows: Sequence[Sequence[Any]],
    credits: Mapping[str, dict[str, Any]],
    kudos: Sequence[Mapping[str, Any]],
) -> dict[str, Any]:
    people = {staff_id: _Tally() for staff_id in site.staff}
    teams = {zone: _Tally() for zone in site.teams}
    # Earliest response per (person, alert) and per alert, in seconds.
    mine: dict[tuple[str, str], float] = {}
    first: dict[str, tuple[float, str | None]] = {}

    for row in rows:
        alert_id, kind, actor, at = row[0:4]
        zone, opened = row[6], row[9]
        if at < start:
            continue
        team = teams.setdefault(zone, _Tally()) if zone is not None else _Tally()
        person = _count(kind, actor, credits.get(alert_id), people, team)
        if person is not None:
            seconds = round(at - opened, 3)
            mine.setdefault((person, alert_id), seconds)
            first.setdefault(alert_id, (seconds, zone))

    for item in kudos:
        if float(item.get("at") or 0.0) < start:
            continue
        if item.get("zone") is not None:
            teams.setdefault(item["zone"], _Tally()).kudos += 1
        for member in item.get("staff") or ():
            if member in people:
                people[member].kudos += 1

    return {
        "since": start,
        "people": _people(site, people, mine),
        "teams": _teams(site, teams, first, mine),
    }


def _count(
    kind: str,
    actor: str | None,
    credit: Mapping[str, Any] | None,
    people: dict[str, _Tally],
    team: _Tally,
) -> str | None:
    """Add one history row to the tallies; return who responded, if anyone."""
    if kind == "acknowledged":
        if actor in people:
            people[actor].acknowledged += 1
            return actor
        return None
    if credit is None:
        return None
    if credit["granted"]:
        people[credit["credited"]].gaps_closed += 1
        team.gaps_closed += 1
        return str(credit["credited"])
    if credit["flags"] == [NO_PERSON]:
        team.closed_without_person += 1
        return None
    team.flagged += 1
    resolver = credit["resolved_by"]
    if resolver in people:
        people[resolver].flagged += 1
    return None


def _people(
    site: CreditSite,
    tallies: Mapping[str, _Tally],
    mine: Mapping[tuple[str, str], float],
) -> list[dict[str, Any]]:
    result = []
    for staff_id, tally in tallies.items():
        responses = [s for (who, _), s in mine.items() if who == staff_id]
        entry = {"staff": staff_id, "name": site.staff[staff_id].name}
        result.append(entry | tally.as_dict(responses))
    result.sort(key=lambda e: (-e["gaps_closed"], e["name"]))
    return result


def _teams(
    site: CreditSite,
    tallies: Mapping[str, _Tally],
    first: Mapping[str, tuple[float, str | None]],
    mine: Mapping[tuple[str, str], float],
) -> list[dict[str, Any]]:
    result = []
    for zone, tally in tallies.items():
        responses = [seconds for seconds, where in first.values() if where == zone]
        entry = {"team": zone} | tally.as_dict(responses)
        entry["closed_without_person"] = tally.closed_without_person
        entry["fastest"] = _fastest(site, zone, mine)
        result.append(entry)
    result.sort(key=lambda e: e["team"])
    return result


def _fastest(
    site: CreditSite, zone: str, mine: Mapping[tuple[str, str], float]
) -> dict[str, Any] | None:
    """The team member with the lowest median response, if anyone responded."""
    medians = []
    for person in site.staff.values():
        if not person.in_team(zone):
            continue
        responses = [s for (who, _), s in mine.items() if who == person.id]
        if responses:
            medians.append((statistics.median(responses), person.id))
    if not medians:
        return None
    median, staff_id = min(medians)
    return {"staff": staff_id, "median_response_seconds": round(median, 1)}
