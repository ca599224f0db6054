"""The presence estimator: recorded sighting traces in, exact enter/leave out.

Traces live in tests/data (written by tests/data/make_traces.py); the
estimator is pure, so each replays to the same events every time. The
tracker tests run its real ticker thread against a clock the test moves.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import threading
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

import pydantic
import pytest
import yaml

from drivers.mqtt_device import RejectedMessage
from drivers.presence import (
    PresenceEstimator,
    PresenceSettings,
    PresenceTracker,
    Sighting,
    canonical_badge_id,
    parse_sighting,
)
from rules.engine import Engine, counter_ids
from rules.events import Event
from rules.schema import parse_rules
from rules.site import Site

DATA = Path(__file__).resolve().parent / "data"

ANA = "ibeacon:f7826da6-4fa2-4e98-8024-bc5b71e0893e:3:301"
BEN = "eddystone:edd1ebeac04e5defa017:0000000000b1"
RECEIVERS = {"rx-301": "room-301", "rx-302": "room-302", "rx-412": "room-412"}

Seen = tuple[Any, ...]
"""(type, device, zone, ts) of an enter; the same plus the reason for a leave."""


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "make_traces", DATA / "make_traces.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load(name: str) -> dict[str, Any]:
    return json.loads((DATA / f"presence-{name}.json").read_text())


def settings_for(trace: dict[str, Any], **extra: Any) -> PresenceSettings:
    """The defaults, with the trace's receivers and badges."""
    return PresenceSettings(
        receivers=trace["receivers"], badges=trace["badges"], **extra
    )


def replay(
    estimator: PresenceEstimator,
    badge: str,
    rows: Iterable[list[Any]],
    duration: int,
) -> list[Event]:
    """Sightings in time order, with a tick at every whole second after them."""
    pending = deque(rows)
    events: list[Event] = []
    for second in range(duration + 1):
        while pending and pending[0][0] <= second:
            at, receiver, rssi = pending.popleft()
            events += estimator.observe(Sighting(badge, receiver, rssi, at))
        events += estimator.tick(float(second))
    return events


def seen(events: Iterable[Event]) -> list[Seen]:
    found: list[Seen] = []
    for event in events:
        row = (event.type, event.device, event.fields["zone"], event.ts)
        found.append(row + ((event.fields["reason"],) if event.type == "leave" else ()))
    return found


def replay_trace(
    name: str, until: int | None = None, **extra: Any
) -> tuple[PresenceEstimator, list[Event]]:
    """Replay a recorded trace, ticking to its end or to ``until``."""
    trace = load(name)
    estimator = PresenceEstimator(settings_for(trace, **extra))
    duration = trace["duration"] if until is None else until
    events = replay(estimator, trace["badge"], trace["sightings"], duration)
    return estimator, events


def run(
    estimator: PresenceEstimator, *sightings: tuple[float, str, float]
) -> list[Seen]:
    """Hand-written sightings of Ana, (at, receiver, rssi), each then a tick."""
    events: list[Event] = []
    for at, receiver, rssi in sightings:
        events += estimator.observe(Sighting(ANA, receiver, rssi, at))
        events += estimator.tick(at)
    return seen(events)


def steady(
    receiver: str, rssi: float, start: float, end: float
) -> list[tuple[float, str, float]]:
    """One sighting a second from ``start`` up to, not including, ``end``."""
    return [(float(t), receiver, rssi) for t in range(int(start), int(end))]


def estimator(**extra: Any) -> PresenceEstimator:
    return PresenceEstimator(
        PresenceSettings(receivers=RECEIVERS, badges=[ANA, BEN], **extra)
    )


# -- recorded traces --------------------------------------------------------------


def test_a_nurse_walks_into_room_301_stays_two_minutes_and_leaves():
    """Corridor, then 301 for two minutes, then corridor and out of range."""
    _, events = replay_trace("nurse-visit-301")
    assert seen(events) == [
        ("enter", "rx-corridor-3", "corridor-3", 7.0),
        ("leave", "rx-corridor-3", "corridor-3", 31.0, "moved"),
        ("enter", "rx-301", "room-301", 31.0),
        ("leave", "rx-301", "room-301", 151.39, "moved"),
        ("enter", "rx-corridor-3", "corridor-3", 151.39),
        ("leave", "rx-corridor-3", "corridor-3", 196.0, "away"),
    ]
    # Passing room 302's open door at 11-13 s entered nothing.
    assert events[2].fields["badge"] == ANA
    assert events[2].fields["rssi"] == -60.3


def test_a_badge_in_a_doorway_between_two_rooms_does_not_flap():
    """Ten minutes heard about equally by 301 and 302: one enter, nothing more."""
    _, events = replay_trace("doorway-301-302")
    assert seen(events) == [("enter", "rx-301", "room-301", 35.0)]


def test_the_doorway_never_flaps_whatever_the_noise():
    """Fifty more noise draws of the doorway: no place is ever entered twice."""
    generator = load_generator()
    scenario = generator.SCENARIOS["doorway-301-302"]
    for seed in range(50):
        rows = generator.sightings({**scenario, "seed": seed})
        estimator = PresenceEstimator(
            PresenceSettings(receivers=generator.RECEIVERS, badges=[ANA])
        )
        events = replay(estimator, ANA, rows, scenario["duration"])
        entered = [e.fields["zone"] for e in events if e.type == "enter"]
        assert len(entered) == len(set(entered)) >= 1, (seed, entered)


def test_a_badge_out_of_range_leaves_after_the_away_timeout():
    """Heard last at about 60 s; the leave comes at the first tick 30 s later."""
    trace = load("out-of-range")
    _, events = replay_trace("out-of-range")
    last = max(at for at, receiver, _ in trace["sightings"] if receiver == "rx-302")
    assert seen(events) == [
        ("enter", "rx-302", "room-302", 6.0),
        ("leave", "rx-302", "room-302", 91.0, "away"),
    ]
    assert 30 <= events[1].ts - last < 31


def test_the_away_timeout_is_a_setting():
    """The same trace with away_timeout 2m leaves 90 s later."""
    _, events = replay_trace("out-of-range", until=200, away_timeout="2m")
    assert seen(events)[1:] == [("leave", "rx-302", "room-302", 181.0, "away")]


def test_a_cloned_badge_in_a_distant_room_puts_the_badge_nowhere(
    caplog: pytest.LogCaptureFixture,
):
    """Strong in 301 and 412 at once: leave 301, enter again once 412 is gone.

    The clone is heard from 60 s to 90 s; its last reading goes stale at
    about 100 s, and 301 then wins for the dwell.
    """
    with caplog.at_level(logging.INFO, logger="drivers.presence"):
        estimator, events = replay_trace("cloned-badge")
    assert seen(events) == [
        ("enter", "rx-301", "room-301", 5.41),
        ("leave", "rx-301", "room-301", 60.36, "conflict"),
        ("enter", "rx-301", "room-301", 106.0),
    ]
    assert estimator.conflicts == 1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "room-301 and room-412" in warnings[0].getMessage()
    assert sum("one place again" in r.getMessage() for r in caplog.records) == 1


def test_recorded_traces_match_their_generator():
    """The files are what make_traces.py writes, byte for byte."""
    generator = load_generator()
    for name in generator.SCENARIOS:
        expected = generator.dumps(generator.trace(name))
        assert generator.path_of(name).read_text() == expected, name


def test_trace_events_are_accepted_by_the_rule_engine():
    """In the nurse trace the engine resolves a call in 301 by her presence."""
    trace = load("nurse-visit-301")
    site = Site.model_validate(
        {
            "zones": [
                {
                    "id": "ward-3",
                    "rooms": [
                        {"id": r} for r in ("corridor-3", "room-301", "room-302")
                    ],
                },
                {"id": "ward-4", "rooms": [{"id": "room-412"}]},
            ],
            "devices": [
                {"id": "call-301", "kind": "call_button", "room": "room-301"},
                *(
                    {"id": device, "kind": "ble_receiver", "room": place}
                    for device, place in trace["receivers"].items()
                ),
            ],
            "staff": [{"id": "ana", "name": "Ana", "roles": ["nurse"], "badge": ANA}],
        }
    )
    rules = parse_rules(
        [
            {
                "name": "patient-call",
                "devices": {"kind": "call_button"},
                "levels": [{"after": "0s", "roles": ["nurse"]}],
                "resolve_by_presence": {"roles": ["nurse"], "dwell": "10s"},
            }
        ]
    )
    now = [10.0]
    engine = Engine(site, rules, lambda: now[0], counter_ids())
    engine.on_event(Event("call-1", "call", "call-301", now[0]))
    _, events = replay_trace("nurse-visit-301")

    resolved = []
    for second in range(11, trace["duration"]):
        while events and events[0].ts <= second:
            now[0] = events[0].ts
            resolved += engine.on_event(events.pop(0))
        now[0] = float(second)
        resolved += engine.advance()
    closing = [c for c in resolved if c.alert.resolved_via == "presence"]
    assert [(c.alert.resolved_at, c.alert.resolved_by) for c in closing] == [
        (41.0, "ana")
    ]


# -- the rules, one at a time ----------------------------------------------------


def test_entering_takes_the_dwell():
    """Four seconds strong in 301 is a walk past; the fifth is an arrival."""
    assert run(estimator(), *steady("rx-301", -60, 100, 105)) == []
    assert run(estimator(), *steady("rx-301", -60, 100, 106)) == [
        ("enter", "rx-301", "room-301", 105.0)
    ]


def test_a_signal_between_the_thresholds_keeps_a_badge_in():
    """-78 dBm is too weak to enter but strong enough to stay."""
    present = estimator()
    run(present, *steady("rx-301", -60, 0, 10))
    assert run(present, *steady("rx-301", -78, 10, 200)) == []
    assert run(estimator(), *steady("rx-301", -78, 0, 200)) == []


def test_a_weak_signal_lets_the_away_timeout_run():
    """Under leave_rssi the place no longer holds the badge; 30 s later it leaves.

    The average falls from -60 to under -82 in four readings, so the last
    reading that held the badge is the one at 13 s.
    """
    present = estimator()
    run(present, *steady("rx-301", -60, 0, 10))
    assert run(present, *steady("rx-301", -88, 10, 60)) == [
        ("leave", "rx-301", "room-301", 43.0, "away")
    ]


def test_switching_rooms_needs_the_margin():
    """302 at 6 dB over 301 is not enough; at 10 dB over, it is."""
    close = estimator()
    run(close, *steady("rx-301", -66, 0, 10))
    both = sorted(steady("rx-301", -66, 10, 60) + steady("rx-302", -60, 10, 60))
    assert run(close, *both) == []

    clear = estimator()
    run(clear, *steady("rx-301", -66, 0, 10))
    both = sorted(steady("rx-301", -66, 10, 30) + steady("rx-302", -56, 10, 30))
    assert run(clear, *both) == [
        ("leave", "rx-301", "room-301", 15.0, "moved"),
        ("enter", "rx-302", "room-302", 15.0),
    ]


def test_a_receiver_offset_evens_out_antennas():
    """-80 from a deaf receiver with +10 dB offset counts as -70."""
    calibrated = PresenceEstimator(
        PresenceSettings(
            receivers={"rx-301": {"place": "room-301", "rssi_offset": 10}},
            badges=[ANA],
        )
    )
    assert run(calibrated, *steady("rx-301", -80, 0, 6))[0][:3] == (
        "enter",
        "rx-301",
        "room-301",
    )


def test_unknown_badges_and_receivers_are_counted_never_emitted():
    present = estimator()
    stranger = "ibeacon:00000000-0000-0000-0000-000000000001:1:1"
    for t in range(20):
        assert present.observe(Sighting(stranger, "rx-301", -50, t)) == []
        assert present.observe(Sighting(ANA, "rx-999", -50, t)) == []
        assert present.observe(Sighting(ANA, "rx-301", -95, t)) == []
    assert present.tick(20.0) == []
    assert present.ignored == {"unknown_badge": 20, "unknown_receiver": 20, "weak": 20}
    assert present.sightings == 0


def test_conflicts_can_be_switched_off():
    """With conflict_rssi null, the stronger of two rooms simply wins."""
    present = estimator(conflict_rssi=None)
    both = sorted(steady("rx-301", -58, 0, 20) + steady("rx-412", -50, 0, 20))
    assert run(present, *both) == [("enter", "rx-412", "room-412", 5.0)]
    assert present.conflicts == 0


def test_restored_presence_leaves_unless_heard_again():
    """After a restart the engine's badges are held, then time out."""
    present = estimator()
    refused = present.restore(
        [
            (ANA, "room-301"),
            (ANA, "room-302"),
            (BEN, "lobby"),
            ("stranger", "room-301"),
        ],
        now=1000.0,
    )
    assert refused == [(ANA, "room-302"), (BEN, "lobby"), ("stranger", "room-301")]
    assert present.present() == {ANA: "room-301"}
    assert seen(present.tick(1029.0)) == []
    assert seen(present.tick(1030.0)) == [
        ("leave", "rx-301", "room-301", 1030.0, "away")
    ]


# -- settings ---------------------------------------------------------------------

EXAMPLE = """
receivers:
  gw-ble: {place: corridor-3, rssi_offset: 4}   # the gateway's own adapter
  rx-301: room-301                              # ESP32 receivers in rooms
  rx-302: room-302
badges:
  - ibeacon:F7826DA6-4FA2-4E98-8024-BC5B71E0893E:3:301
  - eddystone:EDD1EBEAC04E5DEFA017:0000000000B1
enter_rssi: -72
leave_rssi: -82
switch_margin: 8
dwell: 5s
away_timeout: 45s
"""


def test_the_documented_example_is_valid():
    settings = PresenceSettings.model_validate(yaml.safe_load(EXAMPLE))
    assert settings.receivers["rx-301"].place == "room-301"
    assert settings.receivers["gw-ble"].rssi_offset == 4
    assert settings.badges == (ANA, BEN)
    assert settings.away_timeout == 45.0
    assert settings.fresh_for == 10.0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"enter_rssi": -85}, "leave_rssi < enter_rssi"),
        ({"rssi_floor": -80}, "rssi_floor <= leave_rssi"),
        ({"conflict_rssi": -75}, r"'conflict_rssi' \(-75\) must be at or above"),
        ({"away_timeout": "0s"}, "'away_timeout' must be longer than 0s"),
        ({"badges": [ANA, ANA.upper()]}, "listed twice"),
        ({"badges": ["ibeacon:nope:1:2"]}, "is not a UUID"),
        ({"dwel": "5s"}, "Extra inputs are not permitted"),
    ],
)
def test_bad_settings_say_what_is_wrong(change: dict[str, Any], message: str):
    with pytest.raises(pydantic.ValidationError, match=message):
        PresenceSettings.model_validate({"receivers": {"rx-301": "room-301"}, **change})


@pytest.mark.parametrize(
    ("written", "canonical"),
    [
        (ANA, ANA),
        ("IBEACON:F7826DA64FA24E988024BC5B71E0893E:3:301", ANA),
        (" ibeacon:{f7826da6-4fa2-4e98-8024-bc5b71e0893e}:03:0301 ", ANA),
        ("Eddystone:EDD1EBEAC04E5DEFA017:0000000000B1", BEN),
    ],
)
def test_badge_ids_are_read_in_any_spelling(written: str, canonical: str):
    assert canonical_badge_id(written) == canonical


@pytest.mark.parametrize(
    "written",
    [
        "AA:BB:CC:DD:EE:FF",
        "ibeacon:f7826da6-4fa2-4e98-8024-bc5b71e0893e:3",
        "ibeacon:f7826da6-4fa2-4e98-8024-bc5b71e0893e:65536:1",
        "ibeacon:f7826da6-4fa2-4e98-8024-bc5b71e0893e:-1:1",
        "eddystone:edd1ebeac04e5defa017:00000000b1",
        "eddystone:xdd1ebeac04e5defa017:0000000000b1",
    ],
)
def test_malformed_badge_ids_are_refused(written: str):
    with pytest.raises(ValueError, match="badge id"):
        canonical_badge_id(written)


# -- MQTT sightings -----------------------------------------------------------------


def payload(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def test_a_receiver_sighting_is_read_and_timed_by_the_gateway():
    """The badge id is made canonical; the gateway's clock times it."""
    written = "IBEACON:F7826DA64FA24E988024BC5B71E0893E:3:301"
    message = payload(badge=written, rssi=-67, ts=995.5, mac="c4:4f:33:0a:0b:0c")
    sighting = parse_sighting("rx-301", message, now=1000.0)
    assert sighting == Sighting(ANA, "rx-301", -67.0, 1000.0)
    assert parse_sighting("rx-301", payload(badge=BEN, rssi=-50), 7.0).at == 7.0


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (b"not json", "malformed_json"),
        (b"[1, 2]", "malformed_json"),
        (payload(rssi=-60), "missing_field"),
        (payload(badge=7, rssi=-60), "bad_field"),
        (payload(badge="AA:BB:CC:DD:EE:FF", rssi=-60), "bad_field"),
        (payload(badge=ANA), "missing_field"),
        (payload(badge=ANA, rssi=True), "bad_field"),
        (payload(badge=ANA, rssi=-200), "bad_field"),
        (payload(badge=ANA, rssi="-60"), "bad_field"),
        (payload(badge=ANA, rssi=-60, ts=900), "stale"),
        (payload(badge=ANA, rssi=-60, pad="x" * 2000), "oversized"),
    ],
)
def test_bad_receiver_sightings_are_rejected_with_a_reason(message: bytes, reason: str):
    with pytest.raises(RejectedMessage) as caught:
        parse_sighting("rx-301", message, now=1000.0)
    assert caught.value.reason == reason


# -- the tracker (the driver) ---------------------------------------------------------


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Collected:
    """An emit that records events and lets a test wait for the n-th."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._changed = threading.Condition()

    def __call__(self, event: Event) -> None:
        with self._changed:
            self.events.append(event)
            self._changed.notify_all()

    def wait_for(self, count: int) -> list[Event]:
        with self._changed:
            assert self._changed.wait_for(lambda: len(self.events) >= count, timeout=5)
            return list(self.events)


def test_the_tracker_turns_mqtt_sightings_into_events_and_times_out_on_its_own():
    """Real ticker thread, moved clock: enter from MQTT, leave from the ticker."""
    clock = Clock(1000.0)
    tracker = PresenceTracker(
        PresenceSettings(receivers=RECEIVERS, badges=[ANA]),
        clock=clock,
        tick_every=0.01,
    )
    emit = Collected()
    tracker.feed_message("rx-301", payload(badge=ANA, rssi=-60))
    assert tracker.health()["ignored"] == {"not_started": 1}
    tracker.start(emit)
    try:
        for _ in range(7):
            tracker.feed_message("rx-301", payload(badge=ANA, rssi=-60))
            clock.now += 1
        assert seen(emit.wait_for(1)) == [("enter", "rx-301", "room-301", 1005.0)]
        clock.now += 60
        events = emit.wait_for(2)
        assert seen(events)[1][:3] == ("leave", "rx-301", "room-301")
        health = tracker.health()
        assert health["running"] is True
        assert (health["events"], health["present"], health["sightings"]) == (2, 0, 7)
    finally:
        tracker.stop()
        tracker.stop()
    assert tracker.health()["running"] is False
    assert not [t for t in threading.enumerate() if t.name == "presence-ticker"]


def test_the_tracker_passes_on_rejections():
    tracker = PresenceTracker(PresenceSettings(receivers=RECEIVERS, badges=[ANA]))
    with pytest.raises(RejectedMessage, match="missing_field"):
        tracker.feed_message("rx-301", b"{}")
