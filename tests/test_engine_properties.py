"""Property tests of the alert lifecycle: random presses, answers, time and restarts.

Two engines take the same steps. One never stops; the other is rebuilt from
copies of its unresolved alerts at random moments, as the gateway is after a
restart. Both must report exactly the same changes, and the lifecycle
invariants must hold after every step.
"""

from __future__ import annotations

import json
from dataclasses import replace

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

from rules.alerts import AlertState, Change
from rules.engine import Engine, EngineError, StationOnly, counter_ids
from rules.events import Event
from rules.schema import CallRule
from rules.site import Site

SITE = Site.model_validate(
    {
        "zones": [{"id": "ward", "rooms": [{"id": "r1"}, {"id": "r2"}, {"id": "r3"}]}],
        "devices": [
            {"id": "bed-1", "kind": "call_button", "room": "r1"},
            {"id": "bed-2", "kind": "call_button", "room": "r2"},
            {"id": "code-3", "kind": "code_button", "room": "r3"},
            {"id": "rx", "kind": "ble_receiver", "room": "r1"},
        ],
        "staff": [
            {"id": "ann", "name": "Ann", "roles": ["nurse"], "badge": "b-ann"},
            {"id": "cas", "name": "Cas", "roles": ["charge_nurse"], "badge": "b-cas"},
        ],
    }
)
RULES = [
    CallRule.model_validate(
        {
            "name": "patient-call",
            "devices": {"kind": "call_button"},
            "ack_timeout": "50s",
            "resolve_by_presence": {"roles": ["nurse"], "dwell": "10s"},
            "levels": [
                {"after": "0s", "roles": ["nurse"], "remind_every": "15s"},
                {"after": "40s", "roles": ["charge_nurse"], "remind_every": "25s"},
                {"after": "90s", "staff": ["cas"]},
            ],
        }
    ),
    CallRule.model_validate(
        {
            "name": "code-blue",
            "priority": "code",
            "devices": {"kind": "code_button"},
            # The site file refuses this; the engine must ignore it anyway.
            "resolve_by_presence": {"roles": ["nurse", "charge_nurse"], "dwell": "5s"},
            "levels": [
                {"after": "0s", "roles": ["nurse", "charge_nurse"]},
                {"after": "30s", "staff": ["cas"]},
            ],
        }
    ),
]
DEVICES = ["bed-1", "bed-2", "code-3"]
STAFF = ["ann", "cas"]


class Lifecycle(RuleBasedStateMachine):
    """Drives a steady engine and a restarted one through the same steps."""

    @initialize()
    def start(self) -> None:
        self.now = 1_000_000.0
        self.steady = Engine(SITE, RULES, self.clock, counter_ids())
        self.restarted_ids = counter_ids()
        self.restarted = Engine(SITE, RULES, self.clock, self.restarted_ids)
        self.events = 0
        self.opened: set[str] = set()
        self.resolved: set[str] = set()
        self.levels: dict[str, int] = {}
        self.station_only: set[str] = set()

    def clock(self) -> float:
        return self.now

    # -- steps -------------------------------------------------------------------

    @rule(device=st.sampled_from(DEVICES), kind=st.sampled_from(["call", "cancel"]))
    def press(self, device: str, kind: str) -> None:
        self.events += 1
        event = Event(f"e{self.events}", kind, device, self.now)
        self.both(lambda engine: engine.on_event(event))

    @rule(
        badge=st.sampled_from(["b-ann", "b-cas"]),
        room=st.sampled_from(["r1", "r2", "r3"]),
        kind=st.sampled_from(["enter", "leave"]),
    )
    def badge(self, badge: str, room: str, kind: str) -> None:
        self.events += 1
        event = Event(
            f"e{self.events}", kind, "rx", self.now, {"badge": badge, "zone": room}
        )
        self.both(lambda engine: engine.on_event(event))

    @rule(pick=st.integers(0, 20), staff=st.sampled_from(STAFF))
    def acknowledge(self, pick: int, staff: str) -> None:
        alert_id = self.pick_alert(pick)
        self.both(lambda engine: engine.acknowledge(alert_id, staff, "pager"))

    @rule(pick=st.integers(0, 20), staff=st.sampled_from(STAFF))
    def resolve_from_pager(self, pick: int, staff: str) -> None:
        alert_id = self.pick_alert(pick)
        self.both(lambda engine: engine.resolve(alert_id, staff, "pager"))

    @rule(seconds=st.sampled_from([0.5, 5.0, 14.0, 15.0, 30.0, 61.0, 400.0]))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds
        self.both(lambda engine: engine.advance())

    @rule()
    def restart(self) -> None:
        """Rebuild from stored alerts and state, as after kill -9."""
        saved = [replace(alert) for alert in self.restarted.alerts]
        state = json.loads(json.dumps(self.restarted.dump_state()))
        self.restarted = Engine(SITE, RULES, self.clock, self.restarted_ids)
        assert self.restarted.restore(saved) == []
        self.restarted.load_state(state)

    # -- checks --------------------------------------------------------------------

    def both(self, step) -> None:  # noqa: ANN001 - a lambda over an engine
        steady, steady_error = _attempt(step, self.steady)
        restarted, restarted_error = _attempt(step, self.restarted)
        assert steady == restarted
        assert type(steady_error) is type(restarted_error)
        for change in steady:
            self.check(change)

    def check(self, change: Change) -> None:
        alert = change.alert
        assert alert.id not in self.resolved, f"{alert.id} changed after resolving"
        if change.kind == "opened":
            assert alert.id not in self.opened
            self.opened.add(alert.id)
            if alert.priority == "code":
                self.station_only.add(alert.id)
        assert alert.level >= self.levels.get(alert.id, 1), "levels only rise"
        self.levels[alert.id] = alert.level
        if change.kind == "resolved":
            self.resolved.add(alert.id)
            assert alert.state is AlertState.RESOLVED
            if alert.id in self.station_only:
                assert change.via == "station", "a code call closed off-station"
            if change.via == "presence":
                assert alert.proof is not None
                assert alert.proof["dwell"] >= 10.0

    def pick_alert(self, pick: int) -> str:
        alerts = self.steady.alerts
        if alerts and pick < 15:
            return alerts[pick % len(alerts)].id
        return f"a{pick}"  # sometimes an id that is resolved or never existed

    @invariant()
    def no_alert_lost(self) -> None:
        if not hasattr(self, "steady"):
            return
        unresolved = {alert.id for alert in self.steady.alerts}
        assert unresolved == self.opened - self.resolved
        assert unresolved == {alert.id for alert in self.restarted.alerts}

    @invariant()
    def nothing_overdue(self) -> None:
        """Every timer that fell due has fired; the next one is the earliest."""
        if not hasattr(self, "steady"):
            return
        dues = [a.due_at for a in self.steady.alerts if a.due_at is not None]
        assert all(due > self.now for due in dues)
        due = self.steady.due()
        assert due is None or due > self.now
        if dues:
            assert due is not None
            assert due <= min(dues)


def _attempt(step, engine: Engine) -> tuple[list[Change], Exception | None]:  # noqa: ANN001
    try:
        return step(engine), None
    except StationOnly as exc:
        return [], exc
    except EngineError as exc:
        return [], exc


Lifecycle.TestCase.settings = settings(
    max_examples=150, stateful_step_count=50, deadline=None
)
TestLifecycle = Lifecycle.TestCase
