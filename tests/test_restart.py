"""kill -9 of the gateway: SQLite alone brings every open alert back."""

from __future__ import annotations

import time

from rules.engine import LATE_AFTER
from tests.helpers import (
    FAST_LEVELS,
    SLOW_LEVELS,
    event,
    site_config,
    write_site,
)

LEVEL_2_IN_3S = (
    {"after": "0s", "roles": ["nurse"]},
    {"after": "3s", "roles": ["charge_nurse"]},
)


def test_overdue_escalations_fire_late_after_restart(start_gateway, mqtt, topics):
    """Levels that fell due while the gateway was down fire at restart, late."""
    gateway = start_gateway(levels=FAST_LEVELS)
    display = mqtt(topics.alerts)
    pagers = mqtt(topics.pagers)
    device = mqtt()
    device.publish(topics.events("call-1"), event("call-1"))
    device.publish(topics.events("call-2"), event("call-2"))
    waiting = display.wait_for_json(device="call-1", state="open")
    taken = display.wait_for_json(device="call-2", state="open")
    device.publish(topics.ack(taken["id"]), {"staff": "ana"})
    display.wait_for_json(id=taken["id"], state="acknowledged")
    gateway.kill()
    assert gateway.query("SELECT level FROM alerts WHERE id = ?", waiting["id"]) == [
        {"level": 1}
    ], "killed too late: level 2 fired before the kill"

    # Time must pass while the gateway is down: both escalations (1 s and 2 s
    # after opening) must be overdue by more than LATE_AFTER at the restart.
    time.sleep(max(0.0, waiting["opened_at"] + 2.0 + LATE_AFTER + 0.3 - time.time()))
    # The broker forgets everything retained, as if it had restarted too: what
    # displays see next can only come from the gateway's database.
    for alert in (waiting, taken):
        device.publish(topics.alert(alert["id"]), b"", retain=True)
    mark = display.mark()
    gateway.start()

    second = display.wait_for_json(id=waiting["id"], level=2, after=mark)
    third = display.wait_for_json(id=waiting["id"], level=3, after=mark)
    assert (second["state"], second["late"]) == ("escalated", True)
    assert (third["state"], third["late"]) == ("escalated", True)
    assert second["version"] < third["version"]
    page = pagers.wait_for_json(topics.pager("charge_nurse"), alert=waiting["id"])
    assert (page["reason"], page["level"]) == ("escalated", 2)
    pagers.wait_for_json(topics.pager("dev"), alert=waiting["id"], level=3)

    late = mqtt(topics.alerts)
    shown = late.wait_for_json(id=taken["id"])
    assert (shown["state"], shown["level"], shown["acked_by"]) == (
        "acknowledged",
        1,
        "ana",
    )
    assert late.wait_for_json(id=waiting["id"])["level"] == 3
    history = gateway.query(
        "SELECT alert_id, kind, late FROM alert_history ORDER BY alert_id, version"
    )
    assert [h for h in history if h["alert_id"] == taken["id"]] == [
        {"alert_id": taken["id"], "kind": "opened", "late": 0},
        {"alert_id": taken["id"], "kind": "acknowledged", "late": 0},
    ]
    assert [
        (h["kind"], h["late"]) for h in history if h["alert_id"] == waiting["id"]
    ] == [
        ("opened", 0),
        ("escalated", 1),
        ("escalated", 1),
    ]


def test_pending_escalation_fires_on_time_after_restart(start_gateway, mqtt, topics):
    """A timer not yet due at the restart fires at its own time, not late."""
    gateway = start_gateway(levels=LEVEL_2_IN_3S)
    display = mqtt(topics.alerts)
    mqtt().publish(topics.events("call-1"), event("call-1"))
    opened = display.wait_for_json(device="call-1", state="open")
    gateway.kill()
    gateway.start()

    escalated = display.wait_for_json(id=opened["id"], state="escalated")
    assert escalated["updated_at"] >= opened["opened_at"] + 3.0
    assert escalated["late"] is False


def test_press_while_gateway_is_down_opens_after_restart(start_gateway, mqtt, topics):
    """A call made while the gateway is down waits in the broker for it."""
    gateway = start_gateway()
    display = mqtt(topics.alerts)
    gateway.kill()
    press = event("call-3")
    mqtt().publish(topics.events("call-3"), press)
    gateway.start()

    opened = display.wait_for_json(device="call-3", state="open")
    assert opened["event_id"] == press["id"]


def test_event_ids_seen_before_a_restart_stay_duplicates(start_gateway, mqtt, topics):
    """A redelivery after a restart of an event handled before it opens nothing."""
    gateway = start_gateway(levels=SLOW_LEVELS)
    display = mqtt(topics.alerts)
    device = mqtt()
    press = event("call-1")
    device.publish(topics.events("call-1"), press)
    opened = display.wait_for_json(device="call-1", state="open")
    device.publish(topics.events("call-1"), event("call-1", "cancel"))
    display.wait_for_json(id=opened["id"], state="resolved")
    gateway.kill()
    gateway.start()

    device.publish(topics.events("call-1"), press)
    device.publish(topics.events("call-2"), event("call-2"))  # marker
    display.wait_for_json(device="call-2", state="open")
    assert {m.json["id"] for m in display.messages if m.payload} == {
        opened["id"],
        display.wait_for_json(device="call-2")["id"],
    }
    # The broker may also redeliver the cancel, if kill -9 came before its
    # PUBACK: a duplicate too, by design. Nothing else may be rejected.
    assert set(gateway.healthz()["messages_rejected"]) == {"duplicate"}
    assert gateway.query("SELECT count(*) AS n FROM alerts") == [{"n": 2}]


def test_restart_after_a_level_was_removed_comes_online(start_gateway, mqtt, topics):
    """Escalated alert, site file shortened to one level: it still restarts."""
    three_levels = (
        {"after": "0s", "roles": ["nurse"]},
        {"after": "1s", "roles": ["charge_nurse"]},
        {"after": "3s", "staff": ["dev"]},
    )
    gateway = start_gateway(levels=three_levels)
    display = mqtt(topics.alerts)
    mqtt().publish(topics.events("call-1"), event("call-1"))
    escalated = display.wait_for_json(device="call-1", level=2)
    gateway.kill()
    write_site(gateway.site_file, site_config(topics.site, levels=three_levels[:1]))
    # Time passes while it is down: the old level 3 falls due, as it would
    # over a technician's edit and restart.
    time.sleep(max(0.0, escalated["opened_at"] + 3.0 + 0.3 - time.time()))
    gateway.start()

    shown = mqtt(topics.alerts).wait_for_json(id=escalated["id"])
    assert shown["state"] != "resolved"
