"""Swapping the rule set of a running engine: nothing open is lost.

The engine alone, with a fake clock: :meth:`Engine.handover` builds the
engine of a new rule set that carries on with the open alerts, their timers,
counters, thresholds, silences and supervised devices of the old one.
"""

from __future__ import annotations

from typing import Any

import pytest

from rules.alerts import AlertState
from rules.engine import StationOnly
from rules.schema import parse_rules
from tests.test_rule_kinds import (
    NURSE,
    T0,
    Ward,
    call_rule,
    heartbeat_rule,
    kinds,
    towel_rule,
    visits_rule,
)


def swap(ward: Ward, rules: list[dict[str, Any]]) -> dict[str, Any]:
    """Hand the ward's engine over to ``rules``; the state it says to store."""
    ward.rules = parse_rules(rules)
    ward.engine = ward.engine.handover(ward.rules)
    return ward.engine.take_dirty()


def test_an_open_call_escalates_on_time_after_a_swap():
    """Level 2 is due 60 s after the call, swap or not."""
    ward = Ward([call_rule()])
    [opened] = ward.send("call-1", "call")
    ward.wait(20)
    swap(ward, [call_rule(), towel_rule()])

    [alert] = ward.engine.alerts
    assert (alert.id, alert.level, alert.due_at) == (opened.alert.id, 1, T0 + 60)
    assert ward.wait(39.9) == []
    [escalated] = ward.wait(0.1)
    assert (escalated.kind, escalated.alert.level, escalated.alert.late) == (
        "escalated",
        2,
        False,
    )
    assert [n.target for n in escalated.notifications] == ["dev"]


def test_a_changed_rule_takes_over_its_open_alert():
    """Its new level delays count from the original opening."""
    ward = Ward([call_rule()])
    ward.send("call-1", "call")
    ward.wait(20)
    faster = call_rule(levels=[*NURSE, {"after": "30s", "staff": ["dev"]}])
    swap(ward, [faster])
    assert ward.engine.alerts[0].due_at == T0 + 30
    [escalated] = ward.wait(10)
    assert (escalated.kind, escalated.alert.level) == ("escalated", 2)


def test_an_alert_of_a_removed_rule_escalates_by_its_old_levels():
    """It stays open, escalates as before, and can be acknowledged and resolved."""
    ward = Ward([call_rule(), towel_rule()])
    [opened] = ward.send("call-1", "call")
    dirty = swap(ward, [towel_rule()])
    assert dirty == {}

    # The removed rule opens nothing new...
    assert ward.send("call-2", "call") == []
    # ... but its open alert escalates by the levels it had, at 60 s.
    [escalated] = ward.wait(60)
    assert (escalated.alert.id, escalated.kind) == (opened.alert.id, "escalated")
    assert [n.target for n in escalated.notifications] == ["dev"]
    [acked] = ward.engine.acknowledge(opened.alert.id, "ana", via="pager")
    assert acked.alert.state is AlertState.ACKNOWLEDGED
    [resolved] = ward.engine.resolve(opened.alert.id, "ana", via="pager")
    assert resolved.kind == "resolved"
    assert ward.engine.alerts == []


def test_a_disabled_rule_raises_nothing_and_its_open_alert_goes_on():
    ward = Ward([call_rule()])
    [opened] = ward.send("call-1", "call")
    swap(ward, [call_rule(enabled=False)])
    assert ward.send("call-2", "call") == []
    assert ward.send("call-1", "call") == []  # no repeat counted on a disabled rule
    # The station still cannot cancel it (the rule hears nothing), a pager can.
    assert ward.send("call-1", "cancel") == []
    assert kinds(ward.engine.resolve(opened.alert.id, "ana", via="pager")) == [
        ("resolved", "patient-call")
    ]


def test_a_removed_emergency_rule_still_refuses_a_pager():
    code = call_rule(name="code-call", priority="emergency")
    del code["resolve_by_presence"]
    ward = Ward([code])
    [opened] = ward.send("call-1", "call")
    swap(ward, [call_rule()])
    with pytest.raises(StationOnly):
        ward.engine.resolve(opened.alert.id, "ana", via="pager")


def test_counters_thresholds_and_silences_carry_over():
    ward = Ward([visits_rule(), towel_rule()])
    ward.send("door-2f", "visit")
    ward.send("door-2f", "visit")
    ward.send("towel-2f", "reading", reading="towel_level", value=5)
    silence_id, _ = ward.engine.silence(
        until=T0 + 600, reason="deep clean", by="dev", zone="ward"
    )
    swap(ward, [visits_rule(), towel_rule(), call_rule()])

    # The third visit opens the count gap: the first two were kept.
    assert kinds(ward.send("door-2f", "visit")) == [("opened", "visits")]
    # The breach that began before the swap trips 60 s after it began.
    assert kinds(ward.wait(60)) == [("opened", "towels-low")]
    assert [s.id for s in ward.engine.silences] == [silence_id]
    [held] = ward.send("call-1", "call")
    assert held.alert.held is True


def test_state_of_a_removed_rule_is_dropped_from_storage():
    ward = Ward([visits_rule(), towel_rule()])
    ward.send("door-2f", "visit")
    ward.engine.take_dirty()
    dirty = swap(ward, [towel_rule()])
    assert dirty == {"count/visits/restroom-2f": None}


def test_a_supervised_device_keeps_its_last_heard_time():
    """Heard 200 s before the swap, it is overdue 100 s after, not 300 s."""
    ward = Ward([heartbeat_rule()])
    ward.send("towel-2f", "heartbeat")
    ward.wait(200)
    swap(ward, [heartbeat_rule(), call_rule()])
    assert ward.wait(99) == []
    assert kinds(ward.wait(1)) == [("opened", "dispenser-offline")]

    # Silent when swapped again: heard once more, its trouble clears.
    swap(ward, [heartbeat_rule()])
    assert kinds(ward.send("towel-2f", "heartbeat")) == [
        ("resolved", "dispenser-offline")
    ]


def test_a_composite_over_a_disabled_condition_does_not_hold():
    condition = {**visits_rule(), "levels": []}
    composite = {
        "name": "busy-and-low",
        "kind": "composite",
        "all": ["visits", "towels-low"],
        "levels": [{"after": "0s", "roles": ["cleaner"]}],
    }
    ward = Ward([condition, towel_rule(), composite])
    swap(ward, [condition, {**towel_rule(), "enabled": False}, composite])
    for _ in range(3):
        assert ward.send("door-2f", "visit") == []
