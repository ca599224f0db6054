"""The keyed timer queue behind every escalation, reminder, dwell and heartbeat."""

from __future__ import annotations

import random

from rules.timers import TimerQueue


def test_timers_fire_earliest_first_and_ties_in_setting_order():
    queue = TimerQueue()
    queue.set("b", 20.0)
    queue.set("a", 10.0)
    queue.set("c", 20.0)
    assert list(queue.pop_due(20.0)) == [("a", 10.0), ("b", 20.0), ("c", 20.0)]
    assert len(queue) == 0
    assert queue.next_due() is None


def test_setting_a_key_again_moves_its_timer():
    queue = TimerQueue()
    queue.set("call-1", 10.0)
    queue.set("call-1", 30.0)
    assert list(queue.pop_due(20.0)) == []
    assert queue.next_due() == 30.0
    assert queue.due_at("call-1") == 30.0


def test_cancelled_timer_never_fires():
    queue = TimerQueue()
    queue.set("call-1", 10.0)
    queue.set("call-2", 11.0)
    queue.cancel("call-1")
    queue.cancel("never-set")
    assert "call-1" not in queue
    assert list(queue.pop_due(100.0)) == [("call-2", 11.0)]


def test_timer_set_while_firing_is_seen_when_already_due():
    """A chain of overdue escalations all fires in one pass."""
    queue = TimerQueue()
    queue.set("alert", 10.0)
    fired = []
    for key, due in queue.pop_due(100.0):
        fired.append(due)
        if due < 30.0:
            queue.set(key, due + 10.0)
    assert fired == [10.0, 20.0, 30.0]


def test_a_hundred_thousand_timers_due_together_all_fire_once():
    queue = TimerQueue()
    for n in range(100_000):
        queue.set(n, 500.0)
    fired = [key for key, _ in queue.pop_due(500.0)]
    assert fired == list(range(100_000))
    assert len(queue) == 0


def test_heap_stays_proportional_to_live_timers_under_churn():
    """Moving timers over and over does not grow the heap without bound."""
    queue = TimerQueue()
    rng = random.Random(7)
    for _ in range(50_000):
        queue.set(rng.randrange(100), rng.uniform(0, 1000))
    assert len(queue) == 100
    assert len(queue._heap) < 2_100  # compacted well before 50,000 entries
    fired = list(queue.pop_due(1000.0))
    assert len(fired) == 100
    assert [due for _, due in fired] == sorted(due for _, due in fired)


def test_engine_advances_a_flood_of_due_timers_in_slices():
    """advance(limit=) fires the earliest first and leaves the rest due."""
    from rules.engine import Engine, counter_ids
    from rules.events import Event
    from rules.schema import parse_rules
    from rules.site import Site

    site = Site.model_validate(
        {
            "zones": [{"id": "w", "rooms": [{"id": f"r{n}"} for n in range(50)]}],
            "devices": [
                {"id": f"b{n}", "kind": "call_button", "room": f"r{n}"}
                for n in range(50)
            ],
            "staff": [{"id": "ann", "name": "Ann", "roles": ["nurse"]}],
        }
    )
    rules = parse_rules(
        [
            {
                "name": "call",
                "levels": [{"roles": ["nurse"]}, {"after": 10, "roles": ["nurse"]}],
            }
        ]
    )
    now = [0.0]
    engine = Engine(site, rules, lambda: now[0], counter_ids())
    for n in range(50):
        now[0] = n * 0.01
        engine.on_event(Event(f"e{n}", "call", f"b{n}", now[0]))
    now[0] = 100.0
    first = engine.advance(limit=20)
    rest = engine.advance(limit=100)
    assert [c.alert.device for c in first] == [f"b{n}" for n in range(20)]
    assert [c.alert.device for c in rest] == [f"b{n}" for n in range(20, 50)]
    assert engine.advance() == []
