"""The rule engine alone: a fake clock, counter ids, no I/O."""

from __future__ import annotations

import itertools

import pytest

from rules.alerts import Alert, AlertState, InvalidTransition, Notification
from rules.engine import (
    LATE_AFTER,
    Engine,
    EngineError,
    StationOnly,
    UnknownAlert,
    UnknownDevice,
    UnknownStaff,
    counter_ids,
)
from rules.events import Event
from rules.schema import CallRule
from rules.site import Site

OPEN, ACKED, ESCALATED, RESOLVED = (
    AlertState.OPEN,
    AlertState.ACKNOWLEDGED,
    AlertState.ESCALATED,
    AlertState.RESOLVED,
)
T0 = 1_000_000.0

SITE = Site.model_validate(
    {
        "zones": [
            {"id": "west", "rooms": [{"id": "r1"}, {"id": "r2"}]},
            {"id": "east", "rooms": [{"id": "r3"}]},
        ],
        "devices": [
            {"id": "call-1", "kind": "call_button", "room": "r1"},
            {"id": "call-2", "kind": "call_button", "room": "r2"},
            {"id": "code-3", "kind": "code_button", "room": "r3"},
        ],
        "staff": [
            {"id": "ana", "name": "Ana", "roles": ["nurse"]},
            {"id": "ben", "name": "Ben", "roles": ["nurse"]},
            {"id": "chloe", "name": "Chloe", "roles": ["charge_nurse"]},
            {"id": "dev", "name": "Dev", "roles": ["ward_manager"]},
        ],
    }
)


def call_rule(**extra: object) -> CallRule:
    """Level 2 at 60 s, level 3 at 150 s, both counted from the opening."""
    return CallRule.model_validate(
        {
            "name": "patient-call",
            "devices": {"kind": "call_button"},
            "levels": [
                {"after": "0s", "roles": ["nurse"]},
                {"after": "60s", "roles": ["charge_nurse"]},
                {"after": "150s", "staff": ["dev"]},
            ],
            **extra,
        }
    )


CODE_RULE = CallRule.model_validate(
    {
        "name": "code-blue",
        "priority": "code",
        "devices": {"kind": "code_button"},
        "levels": [{"after": "0s", "roles": ["nurse", "charge_nurse"]}],
    }
)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def new_engine(clock: Clock, rule: CallRule | None = None, ids: str = "a") -> Engine:
    return Engine(SITE, [rule or call_rule(), CODE_RULE], clock, counter_ids(ids))


@pytest.fixture
def engine(clock: Clock) -> Engine:
    return new_engine(clock)


_event_ids = itertools.count(1)


def press(engine: Engine, device: str = "call-1", kind: str = "call") -> list:
    return engine.on_event(Event(f"e{next(_event_ids)}", kind, device, T0))


def opened(engine: Engine, device: str = "call-1") -> Alert:
    [change] = press(engine, device)
    assert change.kind == "opened"
    return change.alert


# -- opening ---------------------------------------------------------------------------


def test_call_opens_an_alert_with_level_one_notifications(engine, clock):
    """A call opens an open level-1 alert at once and pages the first level."""
    [change] = press(engine, "call-2")
    alert = change.alert
    assert (change.kind, change.actor, change.via) == ("opened", "call-2", "station")
    assert (alert.id, alert.state, alert.level, alert.version) == ("a1", OPEN, 1, 1)
    assert (alert.device, alert.room, alert.zone) == ("call-2", "r2", "west")
    assert alert.opened_at == alert.updated_at == clock.now
    assert change.notifications == (Notification("nurse", "a1", 1, "opened"),)
    assert engine.due() == T0 + 60


def test_second_press_while_open_opens_nothing(engine):
    """More presses on the same device while its alert is open open no alert."""
    first = opened(engine)
    for _ in range(3):
        assert "opened" not in [change.kind for change in press(engine)]
    assert [a.id for a in engine.alerts] == [first.id]
    current = engine.get(first.id)
    assert (current.state, current.level, current.opened_at) == (OPEN, 1, T0)


def test_second_press_keeps_the_escalation_on_time(engine, clock):
    """A repeated press neither delays nor cancels the pending escalation."""
    first = opened(engine)
    clock.now = T0 + 30
    press(engine)
    clock.now = T0 + 60
    assert [(c.alert.id, c.kind, c.alert.level) for c in engine.advance()] == [
        (first.id, "escalated", 2)
    ]


def test_another_device_opens_its_own_alert(engine):
    """Each device's call is a gap of its own."""
    assert opened(engine, "call-1").id != opened(engine, "call-2").id
    assert len(engine.alerts) == 2


def test_event_from_an_unknown_device_raises(engine):
    """A device missing from the site file raises UnknownDevice."""
    with pytest.raises(UnknownDevice) as error:
        press(engine, "ghost")
    assert error.value.device == "ghost"
    assert isinstance(error.value, EngineError)


# -- escalation ------------------------------------------------------------------------


def test_escalation_fires_exactly_at_each_level_after_opening(engine, clock):
    """Level 2 fires at +60 s and level 3 at +150 s from opening, never before."""
    alert = opened(engine)
    assert engine.advance(T0 + 59.999) == []
    clock.now = T0 + 60
    [second] = engine.advance()
    assert (second.kind, second.alert.state, second.alert.level) == (
        "escalated",
        ESCALATED,
        2,
    )
    assert second.notifications == (
        Notification("charge_nurse", alert.id, 2, "escalated"),
    )
    assert second.alert.late is False
    assert engine.due() == T0 + 150  # from the opening, not from level 2
    assert engine.advance(T0 + 149.999) == []
    clock.now = T0 + 150
    [third] = engine.advance()
    assert (third.alert.level, third.notifications) == (
        3,
        (Notification("dev", alert.id, 3, "escalated"),),
    )


def test_last_level_leaves_nothing_pending(engine, clock):
    """After the last level nothing more is scheduled."""
    opened(engine)
    clock.now = T0 + 150
    assert [c.alert.level for c in engine.advance()] == [2, 3]
    assert engine.due() is None
    assert engine.advance(T0 + 10_000) == []


def test_ack_stops_escalation(engine, clock):
    """An acknowledged alert is never escalated."""
    alert = opened(engine)
    clock.now = T0 + 30
    [change] = engine.acknowledge(alert.id, "ben", via="pager")
    assert (change.alert.state, change.alert.acked_by, change.alert.acked_at) == (
        ACKED,
        "ben",
        T0 + 30,
    )
    assert engine.due() is None
    assert engine.advance(T0 + 10_000) == []
    assert engine.get(alert.id).state is ACKED


def test_ack_after_escalation_tells_every_level_so_far(engine, clock):
    """An ack at level 2 is told to level 1 and level 2."""
    alert = opened(engine)
    clock.now = T0 + 60
    engine.advance()
    [change] = engine.acknowledge(alert.id, "chloe", via="pager")
    assert change.alert.state is ACKED
    assert [n.target for n in change.notifications] == ["nurse", "charge_nurse"]
    assert {n.reason for n in change.notifications} == {"acknowledged"}


def test_repeated_ack_changes_nothing(engine):
    """A second ack, even by someone else, returns no change."""
    alert = opened(engine)
    engine.acknowledge(alert.id, "ana", via="pager")
    assert engine.acknowledge(alert.id, "ben", via="pager") == []
    current = engine.get(alert.id)
    assert (current.acked_by, current.version) == ("ana", 2)


# -- resolving -------------------------------------------------------------------------


def test_cancel_from_the_same_device_resolves(engine):
    """A cancel at the calling station resolves the alert, via the station."""
    alert = opened(engine)
    [change] = press(engine, "call-1", "cancel")
    assert (change.kind, change.alert.state) == ("resolved", RESOLVED)
    assert (change.alert.resolved_by, change.alert.resolved_via) == (None, "station")
    assert change.actor == "call-1"
    assert engine.get(alert.id) is None
    assert opened(engine).id != alert.id  # the next call is a new gap


def test_cancel_from_another_device_does_not_resolve(engine):
    """A cancel at another station leaves the alert as it was."""
    alert = opened(engine, "call-1")
    assert press(engine, "call-2", "cancel") == []
    assert engine.get(alert.id).state is OPEN


def test_resolve_from_a_pager_names_the_staff(engine, clock):
    """A pager's resolve records who closed it and tells every level so far."""
    alert = opened(engine)
    clock.now = T0 + 5
    [change] = engine.resolve(alert.id, "ana", via="pager")
    closed = change.alert
    assert (closed.state, closed.resolved_by, closed.resolved_via) == (
        RESOLVED,
        "ana",
        "pager",
    )
    assert closed.resolved_at == T0 + 5
    assert change.notifications == (Notification("nurse", alert.id, 1, "resolved"),)
    assert engine.alerts == []


@pytest.mark.parametrize("action", ["acknowledge", "resolve"])
def test_unknown_alert_raises(engine, action):
    """Acting on an alert that never existed raises UnknownAlert."""
    with pytest.raises(UnknownAlert) as error:
        getattr(engine, action)("a404", "ana", "pager")
    assert error.value.alert_id == "a404"


@pytest.mark.parametrize("action", ["acknowledge", "resolve"])
def test_unknown_staff_raises_and_changes_nothing(engine, action):
    """Acting as a staff id missing from the site file raises UnknownStaff."""
    alert = opened(engine)
    with pytest.raises(UnknownStaff) as error:
        getattr(engine, action)(alert.id, "mallory", "pager")
    assert error.value.staff == "mallory"
    assert (engine.get(alert.id).state, engine.get(alert.id).version) == (OPEN, 1)


def test_resolved_alert_cannot_move_again(engine):
    """After resolving, the engine refuses the alert and the alert refuses edges."""
    alert = opened(engine)
    [change] = engine.resolve(alert.id, "ana", via="pager")
    for action in (engine.acknowledge, engine.resolve):
        with pytest.raises(UnknownAlert):
            action(alert.id, "ana", "pager")
    closed = change.alert.snapshot()
    for state in AlertState:
        with pytest.raises(InvalidTransition):
            closed.move(state, T0 + 1)
    with pytest.raises(InvalidTransition):
        closed.touch(T0 + 1)
    assert (closed.state, closed.version) == (RESOLVED, 2)


def test_code_call_is_cancelled_only_at_its_station(engine):
    """A code call refuses a pager's resolve; its own station cancels it."""
    alert = opened(engine, "code-3")
    with pytest.raises(StationOnly):
        engine.resolve(alert.id, "ana", via="pager")
    [change] = press(engine, "code-3", "cancel")
    assert (change.alert.state, change.via) == (RESOLVED, "station")


# -- the state machine, edge by edge ---------------------------------------------------

EDGES = {
    (OPEN, ACKED), (OPEN, ESCALATED), (OPEN, RESOLVED),
    (ESCALATED, ESCALATED), (ESCALATED, ACKED), (ESCALATED, RESOLVED),
    (ACKED, OPEN), (ACKED, RESOLVED),
}  # fmt: skip
"""The edges drawn in rules/alerts.py; every other move must be refused."""


def an_alert(state: AlertState) -> Alert:
    return Alert(
        id="x1", rule="patient-call", priority="routine", device="call-1",
        room="r1", zone="west", event_id="e0", opened_at=T0, updated_at=T0,
        state=state,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("current", "wanted"), list(itertools.product(AlertState, repeat=2))
)
def test_alert_moves_only_along_the_documented_edges(current, wanted):
    """Alert.move takes exactly the edges of the diagram and refuses the rest."""
    alert = an_alert(current)
    if (current, wanted) in EDGES:
        alert.move(wanted, T0 + 1)
        assert (alert.state, alert.version, alert.updated_at) == (wanted, 2, T0 + 1)
        return
    with pytest.raises(InvalidTransition) as error:
        alert.move(wanted, T0 + 1)
    assert (error.value.current, error.value.wanted) == (current, wanted)
    assert (alert.state, alert.version, alert.updated_at) == (current, 1, T0)


def walk(engine: Engine, clock: Clock, steps: str) -> list[AlertState]:
    """Drive one alert through steps; return the state after each step."""
    alert = opened(engine)
    seen = [engine.get(alert.id).state]
    for step in steps.split():
        if step == "wait":
            clock.now += 100  # past the next level (60 s, then 150 s) or timeout
            changes = engine.advance()
        elif step == "ack":
            changes = engine.acknowledge(alert.id, "ana", "pager")
        elif step == "resolve":
            changes = engine.resolve(alert.id, "ana", "pager")
        else:
            changes = press(engine, "call-1", "cancel")
        assert len(changes) == 1, step
        seen.append(changes[0].alert.state)
    return seen


@pytest.mark.parametrize(
    ("steps", "states"),
    [
        ("ack", [OPEN, ACKED]),
        ("wait", [OPEN, ESCALATED]),
        ("cancel", [OPEN, RESOLVED]),
        ("resolve", [OPEN, RESOLVED]),
        ("wait wait", [OPEN, ESCALATED, ESCALATED]),
        ("wait ack", [OPEN, ESCALATED, ACKED]),
        ("wait resolve", [OPEN, ESCALATED, RESOLVED]),
        ("wait cancel", [OPEN, ESCALATED, RESOLVED]),
        ("ack resolve", [OPEN, ACKED, RESOLVED]),
        ("ack cancel", [OPEN, ACKED, RESOLVED]),
    ],
)
def test_engine_takes_each_edge(engine, clock, steps, states):
    """Each edge of the diagram is reachable through the engine's inputs."""
    assert walk(engine, clock, steps) == states


def test_ack_timeout_reopens_and_pages_the_level_again(clock):
    """Acknowledged but not resolved in time: open again, same level paged."""
    engine = new_engine(clock, call_rule(ack_timeout="30s"))
    alert = opened(engine)
    clock.now = T0 + 10
    engine.acknowledge(alert.id, "ana", "pager")
    assert engine.advance(T0 + 39.999) == []
    clock.now = T0 + 40
    [change] = engine.advance()
    assert (change.kind, change.alert.state, change.alert.acked_by) == (
        "reopened",
        OPEN,
        None,
    )
    assert change.notifications == (Notification("nurse", alert.id, 1, "reopened"),)


def test_reminder_pages_the_same_level_without_a_transition(clock):
    """remind_every pages the level again; state and level stay, version moves."""
    rule = CallRule.model_validate(
        {
            "name": "patient-call",
            "devices": {"kind": "call_button"},
            "levels": [{"after": "0s", "roles": ["nurse"], "remind_every": "20s"}],
        }
    )
    engine = new_engine(clock, rule)
    alert = opened(engine)
    clock.now = T0 + 20
    [change] = engine.advance()
    assert (change.kind, change.alert.state, change.alert.level) == (
        "reminded",
        OPEN,
        1,
    )
    assert (change.alert.version, change.alert.reminders) == (2, 1)
    assert change.notifications == (Notification("nurse", alert.id, 1, "reminded"),)


# -- restore after a restart -----------------------------------------------------------


def saved(engine: Engine) -> list[Alert]:
    """Copies of the unresolved alerts, as the database would hand them back."""
    return [alert.snapshot() for alert in engine.alerts]


def test_restored_overdue_timer_fires_late_at_next_advance(engine, clock):
    """A level that fell due while down fires at the next advance, marked late."""
    alert = opened(engine)
    clock.now = T0 + 60 + LATE_AFTER + 0.5
    restarted = new_engine(clock, ids="b")
    assert restarted.restore(saved(engine)) == []
    [change] = restarted.advance()
    assert (change.alert.id, change.kind, change.alert.level) == (
        alert.id,
        "escalated",
        2,
    )
    assert change.alert.late is True
    assert change.alert.updated_at == clock.now


def test_timer_within_late_after_is_not_late(engine, clock):
    """Firing up to LATE_AFTER past due is ordinary jitter, not late."""
    opened(engine)
    clock.now = T0 + 60 + LATE_AFTER
    [change] = engine.advance()
    assert change.alert.late is False


def test_several_overdue_levels_all_fire_in_order(engine, clock):
    """Down past two levels: both fire at once, in order, both late."""
    alert = opened(engine)
    clock.now = T0 + 400
    restarted = new_engine(clock, ids="b")
    restarted.restore(saved(engine))
    changes = restarted.advance()
    assert [(c.alert.level, c.alert.version, c.alert.late) for c in changes] == [
        (2, 2, True),
        (3, 3, True),
    ]
    assert [n.target for c in changes for n in c.notifications] == [
        "charge_nurse",
        "dev",
    ]
    assert restarted.get(alert.id).level == 3


def test_restored_alert_keeps_its_device_busy(engine, clock):
    """After a restore, another press on the same device still opens nothing."""
    alert = opened(engine)
    restarted = new_engine(clock, ids="b")
    restarted.restore(saved(engine))
    assert "opened" not in [change.kind for change in press(restarted)]
    assert [a.id for a in restarted.alerts] == [alert.id]


def test_restored_acknowledged_alert_stays_acknowledged(engine, clock):
    """An acknowledged alert restored long after is neither escalated nor moved."""
    alert = opened(engine)
    engine.acknowledge(alert.id, "ana", "pager")
    clock.now = T0 + 10_000
    restarted = new_engine(clock, ids="b")
    restarted.restore(saved(engine))
    assert restarted.advance() == []
    assert restarted.get(alert.id).state is ACKED


def test_restore_skips_resolved_and_returns_orphans(engine, clock):
    """Resolved alerts are not restored; ones whose rule is gone are returned."""
    gone = opened(engine, "call-1")
    closed = opened(engine, "call-2")
    [change] = engine.resolve(closed.id, "ana", "pager")
    only_code = Engine(SITE, [CODE_RULE], clock, counter_ids("b"))
    orphans = only_code.restore([*saved(engine), change.alert])
    assert [o.id for o in orphans] == [gone.id]
    assert only_code.alerts == []


def test_restore_after_a_level_was_removed_does_not_crash(engine, clock):
    """An alert at level 3 restored under a 1-level rule does not break advance."""
    alert = opened(engine)
    clock.now = T0 + 60
    engine.advance()  # level 2; its level-3 timer is saved with it
    clock.now = T0 + 400
    one_level = CallRule.model_validate(
        {"name": "patient-call", "devices": {"kind": "call_button"},
         "levels": [{"after": "0s", "roles": ["nurse"]}]}
    )  # fmt: skip
    restarted = new_engine(clock, one_level, ids="b")
    restarted.restore(saved(engine))
    restarted.advance()
    assert restarted.get(alert.id) is not None
