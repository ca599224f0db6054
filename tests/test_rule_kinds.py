"""Rule kinds beyond the call: counting, thresholds, feedback, supervision,
composites, presence, inhibition, silences, schedules and shifts.

The engine alone, with a fake clock: what a technician's rule promises, step
by step.
"""

from __future__ import annotations

from typing import Any
from zoneinfo import ZoneInfo

import pytest

from rules.alerts import Action, AlertState, Change, Kudos
from rules.engine import (
    BadEventField,
    Engine,
    TooFast,
    UnknownBadge,
    counter_ids,
)
from rules.events import Event
from rules.schema import parse_rules
from rules.site import Site

T0 = 1_796_000_000.0  # a Thursday, 2026-11-29 ... in UTC; see test_schedule
SITE = Site.model_validate(
    {
        "zones": [
            {"id": "ward", "rooms": [{"id": "r1"}, {"id": "r2"}]},
            {"id": "restroom-2f", "rooms": [{"id": "wc-2f"}]},
        ],
        "devices": [
            {"id": "call-1", "kind": "call_button", "room": "r1"},
            {"id": "call-2", "kind": "call_button", "room": "r2"},
            {"id": "code-2", "kind": "code_button", "room": "r2"},
            {"id": "door-2f", "kind": "people_counter", "room": "wc-2f"},
            {"id": "towel-2f", "kind": "dispenser", "room": "wc-2f"},
            {"id": "smiley-2f", "kind": "feedback_terminal", "room": "wc-2f"},
            {"id": "clean-2f", "kind": "clean_button", "room": "wc-2f"},
            {"id": "rx-1", "kind": "ble_receiver", "room": "r1"},
        ],
        "staff": [
            {"id": "ana", "name": "Ana", "roles": ["nurse"], "badge": "b-ana"},
            {
                "id": "carl",
                "name": "Carl",
                "roles": ["cleaner"],
                "badge": "b-carl",
                "zones": ["restroom-2f"],
            },
            {"id": "dev", "name": "Dev", "roles": ["supervisor"]},
        ],
    }
)
NURSE = [{"after": "0s", "roles": ["nurse"]}]
CLEANER_VISIT = {"roles": ["cleaner"], "dwell": "30s"}
CLEANER = [{"after": "0s", "roles": ["cleaner"]}]


class Ward:
    """An engine on the test site with a clock the test moves."""

    def __init__(self, rules: list[dict[str, Any]], tz: str = "UTC") -> None:
        self.now = T0
        self.events = 0
        self.rules = parse_rules(rules)
        self.engine = Engine(
            SITE, self.rules, lambda: self.now, counter_ids(), ZoneInfo(tz)
        )

    def send(self, device: str, kind: str, **fields: Any) -> list[Action]:
        self.events += 1
        event = Event(f"e{self.events}", kind, device, self.now, fields)
        return self.engine.on_event(event)

    def wait(self, seconds: float) -> list[Action]:
        self.now += seconds
        return self.engine.advance()


def kinds(actions: list[Action]) -> list[tuple[str, str]]:
    return [
        (a.kind, a.alert.rule) if isinstance(a, Change) else ("kudos", a.rule)
        for a in actions
    ]


# -- counting -----------------------------------------------------------------


def visits_rule(**extra: Any) -> dict[str, Any]:
    return {
        "name": "visits",
        "kind": "count",
        "devices": {"kind": "people_counter"},
        "at_least": 3,
        "levels": CLEANER,
        **extra,
    }


def test_count_opens_one_gap_at_the_threshold():
    """The Nth visit opens the gap; later visits do not open another."""
    ward = Ward([visits_rule()])
    assert ward.send("door-2f", "visit") == []
    assert ward.send("door-2f", "visit") == []
    opened = ward.send("door-2f", "visit")
    assert kinds(opened) == [("opened", "visits")]
    alert = opened[0].alert
    assert (alert.zone, alert.subject, alert.detail) == (
        "restroom-2f",
        "restroom-2f",
        {"count": 3},
    )
    assert ward.send("door-2f", "visit") == []
    assert len(ward.engine.alerts) == 1


def test_cleaned_press_resets_the_count_and_closes_the_gap():
    """A ``cleaned`` press closes the gap and counting starts again from zero."""
    ward = Ward([visits_rule()])
    for _ in range(3):
        ward.send("door-2f", "visit")
    closed = ward.send("clean-2f", "cleaned")
    assert kinds(closed) == [("resolved", "visits")]
    assert closed[0].alert.resolved_via == "station"
    assert ward.send("door-2f", "visit") == []
    assert ward.send("door-2f", "visit") == []
    assert kinds(ward.send("door-2f", "visit")) == [("opened", "visits")]


def test_count_in_a_sliding_window_forgets_old_events():
    """With ``within``, only events inside the window count."""
    ward = Ward([visits_rule(within="60s")])
    ward.send("door-2f", "visit")
    ward.wait(50)
    ward.send("door-2f", "visit")
    ward.wait(20)  # the first visit is now 70 s old
    assert ward.send("door-2f", "visit") == []
    assert kinds(ward.send("door-2f", "visit")) == [("opened", "visits")]


def test_verified_service_visit_resets_the_count():
    """A cleaner's badge in the restroom for the dwell time closes the gap."""
    ward = Ward([visits_rule(reset_by_visit=CLEANER_VISIT)])
    for _ in range(3):
        ward.send("door-2f", "visit")
    ward.send("rx-1", "enter", badge="b-carl", zone="wc-2f", rssi=-61)
    assert ward.wait(29) == []
    closed = ward.wait(1)
    assert kinds(closed) == [("resolved", "visits")]
    alert = closed[0].alert
    assert (alert.resolved_by, alert.resolved_via) == ("carl", "presence")
    assert alert.proof == {
        "badge": "b-carl",
        "staff": "carl",
        "place": "wc-2f",
        "entered_at": T0,
        "dwell": 30.0,
        "signal": -61,
    }


def test_a_visit_too_short_is_no_service_visit():
    """Leaving before the dwell time resets nothing."""
    ward = Ward([visits_rule(reset_by_visit=CLEANER_VISIT)])
    for _ in range(3):
        ward.send("door-2f", "visit")
    ward.send("rx-1", "enter", badge="b-carl", zone="wc-2f")
    ward.wait(10)
    ward.send("rx-1", "leave", badge="b-carl", zone="wc-2f")
    assert ward.wait(60) == []
    assert len(ward.engine.alerts) == 1


# -- thresholds ---------------------------------------------------------------


def towel_rule() -> dict[str, Any]:
    return {
        "name": "towels-low",
        "kind": "threshold",
        "devices": {"kind": "dispenser"},
        "reading": "towel_level",
        "below": 15,
        "clear_at": 25,
        "for": "60s",
        "levels": CLEANER,
    }


def level(ward: Ward, value: float) -> list[Action]:
    return ward.send("towel-2f", "reading", reading="towel_level", value=value)


def test_threshold_opens_only_after_lasting_its_duration():
    """Below 15 % for a full minute opens the gap, not before."""
    ward = Ward([towel_rule()])
    assert level(ward, 12) == []
    assert ward.wait(59) == []
    opened = ward.wait(1)
    assert kinds(opened) == [("opened", "towels-low")]
    assert opened[0].alert.detail == {"reading": "towel_level", "value": 12.0}


def test_threshold_recovering_before_the_duration_opens_nothing():
    """A dip shorter than the duration is forgotten."""
    ward = Ward([towel_rule()])
    level(ward, 12)
    ward.wait(30)
    level(ward, 18)  # above the limit again, inside the hysteresis band
    assert ward.wait(120) == []


def test_threshold_clears_only_past_the_hysteresis_level():
    """Once open, 20 % keeps the gap; 25 % clears it."""
    ward = Ward([towel_rule()])
    level(ward, 10)
    ward.wait(60)
    assert level(ward, 20) == []
    cleared = level(ward, 25)
    assert kinds(cleared) == [("resolved", "towels-low")]
    assert cleared[0].alert.resolved_via == "cleared"


def test_reading_with_a_bad_value_is_refused_and_changes_nothing():
    """A non-numeric value is a specific error; the pending breach survives."""
    ward = Ward([towel_rule()])
    level(ward, 10)
    with pytest.raises(BadEventField, match="value"):
        level(ward, "low")  # type: ignore[arg-type]
    assert kinds(ward.wait(60)) == [("opened", "towels-low")]


# -- guest feedback -----------------------------------------------------------


def feedback_rule(**extra: Any) -> dict[str, Any]:
    return {
        "name": "restroom-feedback",
        "kind": "feedback",
        "devices": {"kind": "feedback_terminal"},
        "window": "15m",
        "at_least": 4,
        "share": 0.5,
        "min_interval": "5s",
        "levels": CLEANER,
        **extra,
    }


def smile(ward: Ward, score: str) -> list[Action]:
    ward.now += 6  # past the misuse interval
    return ward.send("smiley-2f", "feedback", score=score)


def test_feedback_needs_both_the_share_and_the_minimum_count():
    """Three unhappy presses are too few; half of four opens the gap."""
    ward = Ward([feedback_rule()])
    assert smile(ward, "happy") == []
    assert smile(ward, "unhappy") == []
    assert smile(ward, "happy") == []
    opened = smile(ward, "very_unhappy")
    assert kinds(opened) == [("opened", "restroom-feedback")]
    assert opened[0].alert.detail == {"share": 0.5, "presses": 4}


def test_feedback_presses_too_close_together_are_ignored():
    """A second press within the minimum interval is refused as misuse."""
    ward = Ward([feedback_rule()])
    ward.send("smiley-2f", "feedback", score="unhappy")
    ward.now += 1
    with pytest.raises(TooFast):
        ward.send("smiley-2f", "feedback", score="unhappy")


def test_feedback_window_forgets_old_presses():
    """Presses older than the window no longer count."""
    ward = Ward([feedback_rule()])
    smile(ward, "unhappy")
    smile(ward, "unhappy")
    ward.wait(16 * 60)
    assert smile(ward, "unhappy") == []
    assert smile(ward, "unhappy") == []


def test_a_run_of_happy_presses_sends_kudos_to_the_zone_team():
    """Five happy presses in a row credit the team of the zone on duty."""
    ward = Ward([feedback_rule(kudos_after=5)])
    actions = [smile(ward, "happy") for _ in range(5)]
    assert [a for step in actions[:4] for a in step] == []
    kudos = actions[4]
    assert len(kudos) == 1
    assert isinstance(kudos[0], Kudos)
    # Carl is in the restroom's zone; Ana and Dev list no zones, so every zone.
    assert (kudos[0].zone, kudos[0].presses, kudos[0].staff) == (
        "restroom-2f",
        5,
        ("ana", "carl", "dev"),
    )


def test_unknown_score_is_a_specific_error():
    ward = Ward([feedback_rule()])
    with pytest.raises(BadEventField, match="one of very_unhappy"):
        ward.send("smiley-2f", "feedback", score="meh")


# -- supervision --------------------------------------------------------------


def heartbeat_rule() -> dict[str, Any]:
    return {
        "name": "dispenser-offline",
        "kind": "supervision",
        "devices": {"kind": "dispenser"},
        "heartbeat": "5m",
        "levels": [{"after": "0s", "roles": ["supervisor"]}],
    }


def test_silent_device_raises_trouble_and_clears_when_heard():
    """No message for a heartbeat opens trouble; the next message clears it."""
    ward = Ward([heartbeat_rule()])
    ward.wait(200)
    ward.send("towel-2f", "heartbeat")
    assert ward.wait(299) == []
    opened = ward.wait(1)
    assert kinds(opened) == [("opened", "dispenser-offline")]
    assert opened[0].alert.device == "towel-2f"
    cleared = ward.send("towel-2f", "heartbeat")
    assert kinds(cleared) == [("resolved", "dispenser-offline")]
    assert cleared[0].alert.resolved_via == "cleared"


# -- composites ---------------------------------------------------------------


def test_composite_opens_when_all_conditions_hold_in_the_zone():
    """Visits >= 3 and towels low together open the composite gap, once."""
    visits = visits_rule(levels=[])
    towels = towel_rule() | {"levels": []}
    both = {
        "name": "restroom-service",
        "kind": "composite",
        "all": ["visits", "towels-low"],
        "levels": CLEANER,
    }
    ward = Ward([visits, towels, both])
    for _ in range(3):
        assert ward.send("door-2f", "visit") == []  # conditions raise nothing
    level(ward, 10)
    opened = ward.wait(60)
    assert kinds(opened) == [("opened", "restroom-service")]
    assert opened[0].alert.zone == "restroom-2f"
    cleared = level(ward, 30)
    assert kinds(cleared) == [("resolved", "restroom-service")]


# -- presence resolution ------------------------------------------------------


def call_rule(**extra: Any) -> dict[str, Any]:
    return {
        "name": "patient-call",
        "devices": {"kind": "call_button"},
        "levels": [
            {"after": "0s", "roles": ["nurse"]},
            {"after": "60s", "staff": ["dev"]},
        ],
        "resolve_by_presence": {"roles": ["nurse"], "dwell": "10s"},
        **extra,
    }


CODE = {
    "name": "code-blue",
    "priority": "code",
    "devices": {"kind": "code_button"},
    "levels": NURSE,
}


def test_nurse_badge_in_the_room_resolves_the_call_with_proof():
    """Ten seconds of a nurse's badge in the room closes the call, naming her."""
    ward = Ward([call_rule()])
    ward.send("call-1", "call")
    ward.wait(5)
    ward.send("rx-1", "enter", badge="b-ana", zone="r1", rssi=-55)
    assert ward.wait(9) == []
    closed = ward.wait(1)
    assert kinds(closed) == [("resolved", "patient-call")]
    alert = closed[0].alert
    assert (alert.resolved_by, alert.resolved_via) == ("ana", "presence")
    assert alert.proof["dwell"] == 10.0
    assert alert.proof["place"] == "r1"


def test_badge_in_another_room_resolves_nothing():
    ward = Ward([call_rule()])
    ward.send("call-1", "call")
    ward.send("rx-1", "enter", badge="b-ana", zone="r2")
    assert ward.wait(30) == []


def test_badge_of_the_wrong_role_resolves_nothing():
    ward = Ward([call_rule()])
    ward.send("call-1", "call")
    ward.send("rx-1", "enter", badge="b-carl", zone="r1")
    assert ward.wait(30) == []


def test_badge_already_in_the_room_counts_from_the_call():
    """A nurse already present resolves a new call after the dwell, not at once."""
    ward = Ward([call_rule()])
    ward.send("rx-1", "enter", badge="b-ana", zone="r1")
    ward.wait(100)
    assert kinds(ward.send("call-1", "call")) == [("opened", "patient-call")]
    assert ward.wait(9) == []
    assert kinds(ward.wait(1)) == [("resolved", "patient-call")]


def test_unknown_badge_is_refused():
    ward = Ward([call_rule()])
    with pytest.raises(UnknownBadge):
        ward.send("rx-1", "enter", badge="b-stranger", zone="r1")


# -- alarm fatigue: inhibition and silences -----------------------------------


def test_emergency_in_a_zone_holds_routine_pages_until_it_ends():
    """A routine call during a code call in the zone is opened but not paged."""
    ward = Ward([call_rule(resolve_by_presence=None), CODE])
    code = ward.send("code-2", "call")[0]
    routine = ward.send("call-1", "call")[0]
    assert routine.kind == "opened"
    assert routine.notifications == ()
    assert routine.alert.held
    released = ward.send("code-2", "cancel")
    assert [c.kind for c in released] == ["resolved", "released"]
    assert released[1].alert.id == routine.alert.id
    assert [n.target for n in released[1].notifications] == ["nurse"]
    assert code.alert.id != routine.alert.id


def test_silence_holds_pages_for_a_device_until_it_ends():
    """A silenced device's call is held; when the silence ends it is paged."""
    ward = Ward([call_rule(resolve_by_presence=None)])
    silence_id, _ = ward.engine.silence(
        device="call-1", until=T0 + 300, reason="button being replaced", by="dev"
    )
    opened = ward.send("call-1", "call")[0]
    assert opened.notifications == ()
    assert opened.alert.held
    other = ward.send("call-2", "call")[0]
    assert [n.target for n in other.notifications] == ["nurse"]
    released = ward.wait(300)
    assert [(c.kind, c.alert.id) for c in released if c.kind == "released"] == [
        ("released", opened.alert.id)
    ]
    assert silence_id not in [s.id for s in ward.engine.silences]


# -- schedules and shifts -----------------------------------------------------


def test_rule_outside_its_active_hours_opens_nothing():
    """A rule active 07:00-19:00 ignores a call at night (site time)."""
    rule = call_rule(
        resolve_by_presence=None, active=[{"start": "07:00", "end": "19:00"}]
    )
    ward = Ward([rule], tz="Europe/Berlin")
    ward.now = 1_796_266_800.0  # 2026-12-03 03:00 UTC, 04:00 in Berlin
    assert ward.send("call-1", "call") == []
    ward.now += 4 * 3600  # 08:00 in Berlin
    assert kinds(ward.send("call-1", "call")) == [("opened", "patient-call")]


def test_role_means_the_people_on_shift_now():
    """With shifts, a role is paged as the named people on duty."""
    data = SITE.model_dump()
    data["staff"] = [
        *data["staff"],
        {
            "id": "nia",
            "name": "Nia",
            "roles": ["nurse"],
            "shifts": [{"start": "22:00", "end": "06:00"}],
        },
    ]
    site = Site.model_validate(data)
    rules = parse_rules([call_rule(resolve_by_presence=None)])
    now = [1_796_266_800.0]  # 03:00 UTC: Nia's night shift
    engine = Engine(site, rules, lambda: now[0], counter_ids())
    opened = engine.on_event(Event("e1", "call", "call-1", now[0]))[0]
    assert [n.target for n in opened.notifications] == ["ana", "nia"]
    now[0] += 8 * 3600  # 11:00: Nia is off
    opened = engine.on_event(Event("e2", "call", "call-2", now[0]))[0]
    assert [n.target for n in opened.notifications] == ["ana"]


# -- saved state --------------------------------------------------------------


def test_counters_thresholds_and_presence_survive_a_restart():
    """State written out and read back behaves as if nothing had stopped."""
    rules = [
        visits_rule(reset_by_visit=CLEANER_VISIT),
        towel_rule(),
    ]
    ward = Ward(rules)
    ward.send("door-2f", "visit")
    ward.send("door-2f", "visit")
    level(ward, 10)
    state = ward.engine.take_dirty()
    assert set(state) == {
        "count/visits/restroom-2f",
        "threshold/towels-low/towel-2f",
    }

    restarted = Ward(rules)
    restarted.now = ward.now
    restarted.engine.load_state(state)
    assert kinds(restarted.send("door-2f", "visit")) == [("opened", "visits")]
    assert kinds(restarted.wait(60)) == [("opened", "towels-low")]


def test_dirty_state_marks_a_reset_as_deleted():
    ward = Ward([visits_rule()])
    ward.send("door-2f", "visit")
    ward.engine.take_dirty()
    for _ in range(2):
        ward.send("door-2f", "visit")
    ward.send("clean-2f", "cleaned")
    assert ward.engine.take_dirty() == {"count/visits/restroom-2f": None}


def test_alert_states_after_a_presence_resolution_are_final():
    ward = Ward([call_rule()])
    ward.send("call-1", "call")
    ward.send("rx-1", "enter", badge="b-ana", zone="r1")
    closed = ward.wait(10)
    assert closed[0].alert.state is AlertState.RESOLVED
    assert ward.engine.alerts == []


def test_levels_can_page_a_group_and_a_zone_team():
    """A group pages its members; a zone pages the people of that zone."""
    data = SITE.model_dump()
    data["groups"] = [{"id": "rapid-response", "members": ["ana", "dev"]}]
    site = Site.model_validate(data)
    rule = call_rule(
        resolve_by_presence=None,
        levels=[{"after": "0s", "groups": ["rapid-response"], "zones": ["ward"]}],
    )
    engine = Engine(site, parse_rules([rule]), lambda: T0, counter_ids())
    opened = engine.on_event(Event("e1", "call", "call-1", T0))[0]
    # Nobody lists the ward among their zones, so its shared topic is paged.
    assert [n.target for n in opened.notifications] == ["ana", "dev", "zone:ward"]


def test_driver_reporting_a_device_offline_raises_trouble_at_once():
    """An ``offline`` event from a driver trips supervision without waiting."""
    ward = Ward([heartbeat_rule()])
    ward.send("towel-2f", "heartbeat")
    opened = ward.send("towel-2f", "offline", reason="port unplugged")
    assert kinds(opened) == [("opened", "dispenser-offline")]
    assert opened[0].alert.detail == {"reason": "port unplugged"}
    assert ward.send("towel-2f", "offline") == []  # already known
    assert ward.wait(600) == []  # no second alert when the heartbeat runs out
    assert kinds(ward.send("towel-2f", "heartbeat")) == [
        ("resolved", "dispenser-offline")
    ]
