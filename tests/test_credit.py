"""Recognition credit: who closed a gap, how fast, and when not to believe it.

The alert records come from the real rule engine where the scenario is one
the engine can produce (a presence resolution with its proof, an escalation,
an acknowledgement), and are then altered by hand for the implausible cases
the engine never produces itself: a forged proof, a cloned badge, a rule
that has since been removed.
"""

from __future__ import annotations

import contextlib
import itertools
import json
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from gateway.config import GatewayConfig
from gateway.credit import (
    NO_PERSON,
    NO_PRESENCE,
    NO_PROOF,
    PRESENCE_UNVERIFIED,
    PROOF_MISMATCH,
    SHORT_DWELL,
    TWO_PLACES,
    UNKNOWN_RULE,
    UNKNOWN_STAFF,
    WEAK_SIGNAL,
    CreditSite,
    RuleInfo,
    Sighting,
    credit_resolved,
    open_reader,
    period_starts,
    recognition_summary,
    sightings_between,
)
from gateway.store import Store, alert_record
from rules.alerts import Change
from rules.engine import Engine
from rules.events import Event

BERLIN = ZoneInfo("Europe/Berlin")
T0 = 1_790_000_000.0

SITE: dict[str, Any] = {
    "site": {"id": "ward-3", "timezone": "Europe/Berlin"},
    "gateway": {"id": "gw-1"},
    "zones": [
        {"id": "west", "rooms": [{"id": "room-1"}, {"id": "room-2"}]},
        {"id": "east", "rooms": [{"id": "room-9"}]},
    ],
    "devices": [
        {"id": "call-1", "kind": "call_button", "room": "room-1"},
        {"id": "call-2", "kind": "call_button", "room": "room-2"},
        {"id": "locator", "kind": "presence"},
    ],
    "staff": [
        {"id": "ana", "name": "Ana Silva", "roles": ["nurse"], "badge": "b-ana",
         "zones": ["west"]},
        {"id": "ben", "name": "Ben Okafor", "roles": ["nurse"], "badge": "b-ben",
         "zones": ["west"]},
        {"id": "eve", "name": "Eve Ito", "roles": ["nurse"], "badge": "b-eve",
         "zones": ["east"]},
        {"id": "chloe", "name": "Chloe Martin", "roles": ["charge_nurse"],
         "badge": "b-chloe"},
        {"id": "dev", "name": "Dev Patel", "roles": ["ward_manager"]},
        {"id": "carl", "name": "Carl Berg", "roles": ["cleaner"]},
    ],
    "groups": [{"id": "rapid", "members": ["dev", "carl"]}],
    "rules": [
        {
            "name": "patient-call",
            "devices": {"kind": "call_button"},
            "levels": [
                {"after": "0s", "roles": ["nurse"]},
                {"after": "90s", "roles": ["charge_nurse"]},
                {"after": "4m", "groups": ["rapid"]},
            ],
            "resolve_by_presence": {"roles": ["nurse"], "dwell": "10s"},
        },
        {
            "name": "towels-low",
            "kind": "threshold",
            "devices": {"kind": "dispenser"},
            "reading": "towel_level",
            "below": 15,
            "clear_at": 25,
            "levels": [{"after": "0s", "roles": ["cleaner"]}],
        },
    ],
}  # fmt: skip

CONFIG = GatewayConfig.model_validate(SITE)


@pytest.fixture
def site() -> CreditSite:
    return CreditSite.from_config(CONFIG, min_signal=-85.0)


class Ward:
    """The real engine on the site above, with a clock the test moves."""

    def __init__(self, now: float = T0, store: Store | None = None) -> None:
        self.now = now
        self.store = store
        ids = (f"al{n}" for n in itertools.count(1))
        self.engine = Engine(
            CONFIG.physical, CONFIG.rules, lambda: self.now, lambda: next(ids), BERLIN
        )
        self.events = itertools.count(1)

    def _apply(self, actions: list[Any]) -> list[Change]:
        changes = [a for a in actions if isinstance(a, Change)]
        if self.store is not None:
            self.store.record([], changes)
        return changes

    def call(self, device: str = "call-1", kind: str = "call") -> list[Change]:
        event = Event(f"e{next(self.events)}", kind, device, self.now)
        return self._apply(self.engine.on_event(event))

    def badge(self, badge: str, place: str, kind: str = "enter") -> list[Change]:
        fields = {"badge": badge, "zone": place, "rssi": -60}
        event = Event(f"e{next(self.events)}", kind, "locator", self.now, fields)
        if self.store is not None:
            # Straight into the table, received "now" by the simulated clock.
            with self.store.db.conn:
                self.store.db.conn.execute(
                    "INSERT INTO events (id, type, device, ts, received_at, fields) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (event.id, kind, "locator", self.now, self.now, json.dumps(fields)),
                )
        return self._apply(self.engine.on_event(event))

    def ack(self, alert_id: str, staff: str) -> list[Change]:
        return self._apply(self.engine.acknowledge(alert_id, staff, via="pager"))

    def resolve(self, alert_id: str, staff: str, via: str = "pager") -> list[Change]:
        return self._apply(self.engine.resolve(alert_id, staff, via=via))

    def wait(self, seconds: float) -> list[Change]:
        self.now += seconds
        return self._apply(self.engine.advance())


def resolved(changes: list[Change]) -> dict[str, Any]:
    """The record of the one alert these changes resolved."""
    [change] = [c for c in changes if c.kind == "resolved"]
    return alert_record(change.alert)


def presence_resolved() -> dict[str, Any]:
    """Ana walks into room 1 twenty seconds after the call and stays ten."""
    ward = Ward()
    ward.call()
    ward.wait(20)
    ward.badge("b-ana", "room-1")
    return resolved(ward.wait(10))


ANA_ARRIVES = [Sighting("room-1", T0 + 20)]


# -- what a credit says ------------------------------------------------------------


def test_presence_resolution_is_credited_with_its_times(site):
    """A plausible visit: granted to Ana, 30 s, within the 90 s target."""
    credit = site.credit_alert(presence_resolved(), ANA_ARRIVES)

    assert credit["granted"] is True
    assert credit["flags"] == []
    assert credit["credited"] == credit["resolved_by"] == "ana"
    assert credit["resolved_via"] == "presence"
    assert credit["seconds_to_acknowledge"] is None
    assert credit["seconds_to_resolve"] == 30.0
    assert credit["response_seconds"] == 30.0
    assert (credit["target_seconds"], credit["within_target"]) == (90.0, True)
    assert (credit["level"], credit["before_escalation"]) == (1, True)
    assert credit["outside_own_zone"] is False
    assert credit["outside_own_role"] is False
    assert credit["proof"]["badge"] == "b-ana"


def test_an_escalated_call_acknowledged_and_resolved_by_the_charge_nurse(site):
    """Past the target: level 2, not before escalation, her own role there."""
    ward = Ward()
    alert_id = ward.call()[0].alert.id
    ward.wait(100)  # escalated to the charge nurse at 90 s
    ward.ack(alert_id, "chloe")
    ward.wait(50)
    ward.badge("b-chloe", "room-1")
    ward.wait(30)
    record = resolved(ward.resolve(alert_id, "chloe"))
    seen = [Sighting("room-1", T0 + 150)]

    credit = site.credit_alert(record, seen)
    assert credit["granted"] is True
    assert credit["acknowledged_by"] == "chloe"
    assert credit["seconds_to_acknowledge"] == 100.0
    assert credit["seconds_to_resolve"] == 180.0
    assert (credit["response_seconds"], credit["within_target"]) == (100.0, False)
    assert (credit["level"], credit["before_escalation"]) == (2, False)
    assert credit["outside_own_role"] is False
    assert credit["outside_own_zone"] is False  # no zones listed: every zone


def test_a_call_cancelled_at_the_station_credits_nobody(site):
    """The acknowledgement still counts; the resolution names no one."""
    ward = Ward()
    alert_id = ward.call()[0].alert.id
    ward.wait(15)
    ward.ack(alert_id, "ana")
    ward.wait(25)
    credit = site.credit_alert(resolved(ward.call(kind="cancel")))

    assert credit["flags"] == [NO_PERSON]
    assert (credit["granted"], credit["credited"], credit["resolved_by"]) == (
        False,
        None,
        None,
    )
    assert credit["resolved_via"] == "station"
    assert credit["acknowledged_by"] == "ana"
    assert credit["response_seconds"] == 15.0


def test_a_condition_that_cleared_credits_nobody(site):
    record = presence_resolved() | {
        "rule": "towels-low",
        "resolved_via": "cleared",
        "resolved_by": None,
        "proof": None,
    }
    credit = site.credit_alert(record)
    assert credit["flags"] == [NO_PERSON]
    assert credit["response_seconds"] is None


# -- implausible credit is flagged ----------------------------------------------------


@pytest.mark.parametrize(
    ("proof", "flag"),
    [
        (None, NO_PROOF),
        ({"dwell": 4.0}, SHORT_DWELL),
        ({"staff": "ben"}, PROOF_MISMATCH),
        ({"badge": "b-ben"}, PROOF_MISMATCH),
        ({"place": "room-2"}, PROOF_MISMATCH),
        ({"signal": -95}, WEAK_SIGNAL),
    ],
)
def test_a_presence_proof_that_does_not_add_up_is_flagged(site, proof, flag):
    record = presence_resolved()
    record["proof"] = None if proof is None else record["proof"] | proof
    credit = site.credit_alert(record, ANA_ARRIVES)
    assert credit["flags"] == [flag]
    assert credit["granted"] is False
    assert credit["credited"] is None
    assert credit["resolved_by"] == "ana"


def test_a_proof_placing_the_badge_in_the_rooms_zone_is_the_same_place(site):
    record = presence_resolved()
    record["proof"] = record["proof"] | {"place": "west"}
    assert site.credit_alert(record, ANA_ARRIVES)["flags"] == []


@pytest.mark.parametrize(
    ("elsewhere", "flagged"),
    [
        (Sighting("room-2", T0 + 25), True),  # mid-dwell, next door
        (Sighting("room-9", T0 + 27), True),  # mid-dwell, another wing
        (Sighting("room-2", T0 + 19), False),  # came from there
        (Sighting("room-2", T0 + 29), False),  # within the estimator's lag
        (Sighting("west", T0 + 25), False),  # the room's own zone
        (Sighting("room-2", T0 + 25, left=True), False),  # leaving is no sighting
    ],
)
def test_a_badge_seen_in_two_places_at_once_is_flagged(site, elsewhere, flagged):
    credit = site.credit_alert(presence_resolved(), [*ANA_ARRIVES, elsewhere])
    assert (TWO_PLACES in credit["flags"]) is flagged
    assert credit["granted"] is not flagged


def pager_resolved(staff: str = "ben", *, ack: str | None = None) -> dict[str, Any]:
    """A call resolved from the pager after 60 s (acknowledged at 30 s)."""
    ward = Ward()
    alert_id = ward.call()[0].alert.id
    ward.wait(30)
    if ack is not None:
        ward.ack(alert_id, ack)
    ward.wait(30)
    return resolved(ward.resolve(alert_id, staff))


@pytest.mark.parametrize(
    ("sightings", "flags"),
    [
        ([Sighting("room-1", T0 + 40)], []),  # walked in, then resolved
        ([Sighting("room-1", T0 - 600)], []),  # was already there
        ([Sighting("west", T0 + 40)], []),  # the room's zone
        (
            [Sighting("room-1", T0 - 600), Sighting("room-1", T0 - 10, left=True)],
            [NO_PRESENCE],
        ),
        ([Sighting("room-1", T0 - 600), Sighting("room-2", T0 - 10)], [NO_PRESENCE]),
        ([Sighting("room-2", T0 + 40)], [NO_PRESENCE]),
        ([Sighting("room-1", T0 + 300)], [NO_PRESENCE]),  # after the fact
        ([], [NO_PRESENCE]),
        (None, [PRESENCE_UNVERIFIED]),
    ],
)  # fmt: skip
def test_a_pager_resolve_where_a_visit_is_expected_needs_the_badge_there(
    site, sightings, flags
):
    credit = site.credit_alert(pager_resolved(ack="ben"), sightings)
    assert credit["flags"] == flags
    assert credit["granted"] is (not flags)


def test_a_resolver_without_a_badge_cannot_prove_a_visit(site):
    """Carl carries no badge; he is also outside his role (a cleaner)."""
    credit = site.credit_alert(pager_resolved("carl"), [])
    assert credit["flags"] == [PRESENCE_UNVERIFIED]
    assert credit["outside_own_role"] is True


def test_unknown_resolver_and_unknown_rule_are_flagged(site):
    record = pager_resolved()
    assert site.credit_alert(record | {"resolved_by": "zoe"})["flags"] == [
        UNKNOWN_STAFF
    ]
    credit = site.credit_alert(record | {"rule": "removed-rule"}, [])
    assert credit["flags"] == [UNKNOWN_RULE]
    assert credit["target_seconds"] is None
    assert credit["outside_own_role"] is None


def test_outside_own_zone_and_role(site):
    """Eve (east) helps in the west wing; the charge nurse steps in at level 1."""
    seen = [Sighting("room-1", T0 + 40)]
    eve = site.credit_alert(pager_resolved("eve"), seen)
    assert (eve["granted"], eve["outside_own_zone"], eve["outside_own_role"]) == (
        True,
        True,
        False,
    )
    chloe = site.credit_alert(pager_resolved("chloe"), seen)
    assert (chloe["outside_own_zone"], chloe["outside_own_role"]) == (False, True)


def test_rule_tiers_expand_groups_and_give_the_target():
    groups = {group.id: group.members for group in CONFIG.groups}
    call, towels = (RuleInfo.from_rule(rule, groups) for rule in CONFIG.rules)
    assert call.target == 90.0
    assert call.tiers[2].staff == {"dev", "carl"}
    assert (call.dwell, call.presence_required) == (10.0, True)
    assert towels.target is None
    assert (towels.dwell, towels.presence_required) == (None, False)


def test_kudos_credit_goes_to_the_team(site):
    kudos = {"id": "k1", "rule": "feedback", "zone": "west", "at": T0, "presses": 5}
    credit = site.credit_kudos(kudos | {"staff": ["ana", "ben"]})
    assert (credit["team"], credit["credited"], credit["granted"]) == (
        "west",
        ["ana", "ben"],
        True,
    )
    assert site.credit_kudos(kudos | {"staff": []})["flags"] == [NO_PERSON]
    odd = site.credit_kudos(kudos | {"staff": ["ana", "zoe"]})
    assert (odd["credited"], odd["flags"]) == (["ana"], [UNKNOWN_STAFF])


# -- from the database ----------------------------------------------------------------


def test_credit_at_commit_reads_the_resolvers_sightings(tmp_path, site):
    """What service.py calls: sightings from the events table, plus the batch's."""
    store = Store(tmp_path / "gw.db")
    try:
        ward = Ward(store=store)
        alert_id = ward.call()[0].alert.id
        ward.wait(30)
        ward.badge("b-ben", "room-1")
        ward.wait(5)  # taps resolve before his dwell would have
        record = resolved(ward.resolve(alert_id, "ben"))
        conn = store.db.conn
        assert credit_resolved(conn, site, record)["granted"] is True
        assert sightings_between(conn, T0, T0 + 35) == {
            "b-ben": [Sighting("room-1", T0 + 30)]
        }

        # Eve's arrival is still in the batch being committed: it counts too.
        record = record | {"resolved_by": "eve"}
        assert credit_resolved(conn, site, record)["flags"] == [NO_PRESENCE]
        fields = {"badge": "b-eve", "zone": "room-1"}
        arrival = Event("e-eve", "enter", "locator", T0 + 35, fields)
        assert credit_resolved(conn, site, record, [arrival])["granted"] is True
    finally:
        store.close()


def local(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=BERLIN).timestamp()


NOW = local("2026-03-11T14:00")  # a Wednesday


def test_periods_start_at_local_midnight_even_on_a_daylight_saving_day():
    starts = period_starts(NOW, BERLIN)
    assert starts == {
        "today": local("2026-03-11T00:00"),
        "week": local("2026-03-09T00:00"),
    }
    # 29 March 2026: clocks go forward at 02:00 in Berlin; the day has 23 hours.
    sunday = period_starts(local("2026-03-29T12:00"), BERLIN)
    assert sunday["today"] == local("2026-03-29T00:00")
    assert sunday["week"] == local("2026-03-23T00:00")
    assert local("2026-03-30T00:00") - sunday["today"] == 23 * 3600


def insert_kudos(store: Store, kudos_id: str, at: float, staff: list[str]) -> None:
    body = {"id": kudos_id, "rule": "feedback", "zone": "west", "at": at,
            "presses": 5, "staff": staff}  # fmt: skip
    with store.db.conn:
        store.db.conn.execute(
            "INSERT INTO outbox (key, kind, created_at, body) VALUES (?, ?, ?, ?)",
            (f"kudos:{kudos_id}", "kudos", at, json.dumps(body)),
        )


def visit(ward: Ward, at: float, device: str, place: str, badge: str) -> str:
    """A call answered by a visit of ``badge``, who leaves afterwards."""
    ward.now = at
    alert_id = ward.call(device)[0].alert.id
    ward.wait(20)
    ward.badge(badge, place)
    ward.wait(10)
    ward.badge(badge, place, "leave")
    return alert_id


def test_recognition_summary_per_person_and_team_today_and_this_week(tmp_path, site):
    path = tmp_path / "gw.db"
    store = Store(path)
    try:
        ward = Ward(store=store)
        # Last Sunday: outside this week.
        visit(ward, local("2026-03-08T12:00"), "call-2", "room-2", "b-ben")
        insert_kudos(store, "k-last-week", local("2026-03-08T13:00"), ["ben"])
        # Monday: Ana resolves from her pager, never seen in the room: flagged.
        ward.now = local("2026-03-09T11:00")
        monday = ward.call("call-1")[0].alert.id
        ward.wait(40)
        ward.resolve(monday, "ana")
        insert_kudos(store, "k-tuesday", local("2026-03-10T12:00"), ["ana"])
        # Today: Ana's visit (30 s), Ben's ack (50 s) and visit, a cancel.
        visit(ward, local("2026-03-11T09:00"), "call-1", "room-1", "b-ana")
        ward.now = local("2026-03-11T10:00")
        bens = ward.call("call-2")[0].alert.id
        ward.wait(50)
        ward.ack(bens, "ben")
        ward.wait(20)
        ward.badge("b-ben", "room-2")
        ward.wait(5)
        ward.resolve(bens, "ben")
        ward.badge("b-ben", "room-2", "leave")
        ward.now = local("2026-03-11T11:00")
        cancelled = ward.call("call-1")[0].alert.id
        ward.wait(15)
        ward.ack(cancelled, "ana")
        ward.wait(25)
        ward.call("call-1", "cancel")
        insert_kudos(store, "k-today", local("2026-03-11T12:00"), ["ana", "ben"])
    finally:
        store.close()

    with contextlib.closing(open_reader(path)) as conn:
        summary = recognition_summary(conn, site, BERLIN, NOW)

    assert summary["timezone"] == "Europe/Berlin"
    today, week = summary["today"], summary["week"]
    assert today["since"] == local("2026-03-11T00:00")
    people = {p["staff"]: p for p in today["people"]}
    assert people["ana"] == {
        "staff": "ana", "name": "Ana Silva", "gaps_closed": 1, "flagged": 0,
        "acknowledged": 1, "kudos": 1, "responses": 2,
        "median_response_seconds": 22.5,
    }  # fmt: skip
    assert (people["ben"]["gaps_closed"], people["ben"]["acknowledged"]) == (1, 1)
    assert people["ben"]["median_response_seconds"] == 50.0
    assert people["chloe"]["responses"] == 0
    assert today["people"][0]["gaps_closed"] == 1  # most gaps first

    weekly = {p["staff"]: p for p in week["people"]}
    assert (weekly["ana"]["gaps_closed"], weekly["ana"]["flagged"]) == (1, 1)
    assert weekly["ana"]["kudos"] == 2
    assert (weekly["ben"]["gaps_closed"], weekly["ben"]["kudos"]) == (1, 1)

    west_today = next(t for t in today["teams"] if t["team"] == "west")
    assert west_today == west_today | {
        "gaps_closed": 2, "flagged": 0, "closed_without_person": 1, "kudos": 1,
        "responses": 3, "median_response_seconds": 30.0,
        "fastest": {"staff": "ana", "median_response_seconds": 22.5},
    }  # fmt: skip
    west_week = next(t for t in week["teams"] if t["team"] == "west")
    assert (west_week["gaps_closed"], west_week["flagged"], west_week["kudos"]) == (
        2,
        1,
        2,
    )
    east = next(t for t in week["teams"] if t["team"] == "east")
    assert (east["gaps_closed"], east["fastest"]) == (0, None)


def test_summary_of_an_empty_database(tmp_path, site):
    path = Path(tmp_path / "gw.db")
    Store(path).close()
    with contextlib.closing(open_reader(path)) as conn:
        summary = recognition_summary(conn, site, BERLIN, NOW)
    assert all(p["gaps_closed"] == 0 for p in summary["week"]["people"])
    assert [t["team"] for t in summary["week"]["teams"]] == ["east", "west"]


def test_fastest_response_of_the_shift_is_flagged(tmp_path, site):
    """The first answer of the shift is the fastest; a slower one later is not."""
    store = Store(tmp_path / "gw.db")
    try:
        ward = Ward(store=store)
        conn = store.db.conn
        quick = ward.call("call-1")[0].alert.id
        ward.wait(10)
        ward.badge("b-ben", "room-1")
        record = resolved(ward.resolve(quick, "ben"))
        assert credit_resolved(conn, site, record)["fastest_of_shift"] is True

        slow = ward.call("call-2")[0].alert.id
        ward.wait(60)
        ward.badge("b-ben", "room-2")
        record = resolved(ward.resolve(slow, "ben"))
        credit = credit_resolved(conn, site, record)
        assert credit["granted"] is True
        assert credit["fastest_of_shift"] is False
    finally:
        store.close()
