"""The gateway as a subprocess against a real Mosquitto: the MQTT contract."""

from __future__ import annotations

import time
from collections.abc import Callable

from tests.helpers import FAST_LEVELS, Message, event, on_topic

ALERT_FIELDS = {
    "id", "state", "level", "rule", "zone", "device", "event_id", "opened_at",
    "updated_at", "acked_by", "resolved_by", "msg_id",
}  # fmt: skip
"""The fields the contract promises every retained alert carries, at least."""


def about(device: str) -> Callable[[Message], bool]:
    """Messages carrying an alert state of this device (not the cleared ones)."""
    return lambda m: m.matches(None, {"device": device})


def states(messages: list[Message], alert_id: str) -> list[str | None]:
    """The states a display shows for one alert; None for a clear.

    Like a display, it drops repeats of a ``msg_id``: QoS 1 may redeliver, and
    the gateway republishes every unresolved alert when it (re)connects.
    """
    shown: list[str | None] = []
    seen: set[str] = set()
    for m in messages:
        if not m.topic.endswith(f"/alerts/{alert_id}"):
            continue
        if not m.payload:
            shown.append(None)
        elif m.json["msg_id"] not in seen:
            seen.add(m.json["msg_id"])
            shown.append(m.json["state"])
    return shown


def test_opened_alert_carries_the_contract_fields(gateway, mqtt, topics):
    """A call publishes a retained alert with every contract field set right."""
    display = mqtt(topics.alerts)
    press = event("call-2")
    before = time.time()
    mqtt().publish(topics.events("call-2"), press)
    live = display.wait_for(about("call-2"))
    after = time.time()

    alert = live.json
    assert alert.keys() >= ALERT_FIELDS
    assert live.topic == topics.alert(alert["id"])
    assert alert["state"] == "open"
    assert alert["level"] == 1
    assert alert["rule"] == "patient-call"
    assert alert["zone"] == "west"
    assert alert["device"] == "call-2"
    assert alert["event_id"] == press["id"]
    assert before <= alert["opened_at"] <= after
    assert alert["updated_at"] == alert["opened_at"]
    assert alert["acked_by"] is None
    assert alert["resolved_by"] is None
    assert alert["msg_id"] == f"{alert['id']}:1"

    retained = mqtt(topics.alerts).wait_for(on_topic(live.topic))
    assert retained.retain
    assert retained.json == alert


def test_late_joining_display_sees_every_unresolved_alert(gateway, mqtt, topics):
    """A display subscribing later gets all unresolved alerts, and only those."""
    display = mqtt(topics.alerts)
    device = mqtt()
    for n in (1, 2, 3, 4):
        device.publish(topics.events(f"call-{n}"), event(f"call-{n}"))
    alerts = {n: display.wait_for_json(device=f"call-{n}") for n in (1, 2, 3, 4)}
    device.publish(topics.ack(alerts[2]["id"]), {"staff": "ana"})
    device.publish(topics.events("call-3"), event("call-3", "cancel"))
    acked = display.wait_for_json(id=alerts[2]["id"], state="acknowledged")
    display.wait_for_json(id=alerts[3]["id"], state="resolved")
    # The resolved state is followed by the clear of its retained message;
    # a display subscribing between the two would see the resolved state once.
    cleared = topics.alert(alerts[3]["id"])
    display.wait_for(lambda m: m.topic == cleared and not m.payload)

    late = mqtt(topics.alerts)
    # Marker: a new call published after the late subscription; retained
    # messages are delivered on subscribe, so they all arrive before it.
    device.publish(topics.events("call-3"), event("call-3"))
    marker = late.wait_for_json(device="call-3", state="open")

    retained = {m.json["id"]: m for m in late.messages if m.json["id"] != marker["id"]}
    assert all(m.retain for m in retained.values())
    assert {i: m.json for i, m in retained.items()} == {
        alerts[1]["id"]: alerts[1],
        alerts[2]["id"]: acked,
        alerts[4]["id"]: alerts[4],
    }


def test_call_pages_the_level_one_role(gateway, mqtt, topics):
    """The opening is paged to the first level's role and to nobody else."""
    pagers = mqtt(topics.pagers)
    device = mqtt()
    device.publish(topics.events("call-1"), event("call-1"))
    page = pagers.wait_for_json(topics.pager("nurse"), reason="opened")

    assert page["target"] == "nurse"
    assert page["state"] == "open"
    assert page["level"] == 1
    assert page["device"] == "call-1"
    assert page["zone"] == "west"
    assert page["id"] == f"{page['alert']}:1:nurse"

    # Marker: the acknowledgement is paged in a later batch than the opening,
    # so once it arrives every page of the opening has arrived too.
    device.publish(topics.ack(page["alert"]), {"staff": "ana"})
    pagers.wait_for_json(topics.pager("nurse"), reason="acknowledged")
    assert {m.topic for m in pagers.messages} == {topics.pager("nurse")}


def test_ack_then_resolve_from_a_pager(gateway, mqtt, topics):
    """A pager's ack and resolve move the alert and name the staff member."""
    display = mqtt(topics.alerts)
    device = mqtt()
    device.publish(topics.events("call-1"), event("call-1"))
    opened = display.wait_for_json(device="call-1", state="open")

    device.publish(topics.ack(opened["id"]), {"staff": "ben"})
    acked = display.wait_for_json(id=opened["id"], state="acknowledged")
    assert acked["acked_by"] == "ben"
    assert acked["msg_id"] == f"{opened['id']}:2"

    device.publish(topics.resolve(opened["id"]), {"staff": "ben"})
    resolved = display.wait_for_json(id=opened["id"], state="resolved")
    assert resolved["resolved_by"] == "ben"
    assert resolved["acked_by"] == "ben"
    assert resolved["msg_id"] == f"{opened['id']}:3"


def test_pager_acks_and_resolves_on_its_own_staff_topic(gateway, mqtt, topics):
    """The staff id comes from the topic, which the broker ACL ties to the pager."""
    display = mqtt(topics.alerts)
    pager = mqtt()
    pager.publish(topics.events("call-1"), event("call-1"))
    opened = display.wait_for_json(device="call-1", state="open")

    pager.publish(topics.staff("ben", "ack"), {"alert": opened["id"], "id": "p-1"})
    acked = display.wait_for_json(id=opened["id"], state="acknowledged")
    assert acked["acked_by"] == "ben"

    pager.publish(topics.staff("ben", "resolve"), {"alert": opened["id"]})
    resolved = display.wait_for_json(id=opened["id"], state="resolved")
    assert resolved["resolved_by"] == "ben"
    assert resolved["resolved_via"] == "pager"


def test_cancel_from_the_same_device_resolves(gateway, mqtt, topics):
    """A cancel at the calling station resolves; one from elsewhere does not."""
    display = mqtt(topics.alerts)
    device = mqtt()
    device.publish(topics.events("call-3"), event("call-3"))
    opened = display.wait_for_json(device="call-3", state="open")

    device.publish(topics.events("call-4"), event("call-4", "cancel"))
    device.publish(topics.events("call-3"), event("call-3", "cancel"))
    resolved = display.wait_for_json(id=opened["id"], state="resolved")

    # Version 2: the other station's cancel changed nothing in between.
    assert resolved["msg_id"] == f"{opened['id']}:2"
    assert resolved["resolved_by"] is None
    assert resolved["resolved_via"] == "station"


def test_more_presses_while_open_open_no_new_alert(gateway, mqtt, topics):
    """Pressing again while the call is open is the same gap, not a new alert."""
    display = mqtt(topics.alerts)
    device = mqtt()
    for _ in range(3):
        device.publish(topics.events("call-1"), event("call-1"))
    # Marker: published after the presses, so handled after them.
    device.publish(topics.events("call-2"), event("call-2"))
    display.wait_for_json(device="call-2", state="open")

    about_call_1 = [m.json for m in display.messages if about("call-1")(m)]
    assert {(a["id"], a["state"], a["level"]) for a in about_call_1} == {
        (about_call_1[0]["id"], "open", 1)
    }
    assert gateway.query("SELECT device FROM alerts ORDER BY device") == [
        {"device": "call-1"},
        {"device": "call-2"},
    ]
    assert gateway.healthz()["events_accepted"] == 4


def test_unanswered_call_escalates_after_each_delay(start_gateway, mqtt, topics):
    """Nobody answers: level 2 after 1 s, level 3 after 2 s, each one paged."""
    start_gateway(levels=FAST_LEVELS)
    display = mqtt(topics.alerts)
    pagers = mqtt(topics.pagers)
    mqtt().publish(topics.events("call-1"), event("call-1"))
    opened = display.wait_for_json(device="call-1", state="open")

    second = display.wait_for_json(id=opened["id"], level=2)
    assert second["state"] == "escalated"
    assert second["updated_at"] >= opened["opened_at"] + 1.0
    assert second["late"] is False  # fired within a second of its due time
    page = pagers.wait_for_json(topics.pager("charge_nurse"), alert=opened["id"])
    assert (page["reason"], page["state"], page["level"]) == (
        "escalated",
        "escalated",
        2,
    )

    third = display.wait_for_json(id=opened["id"], level=3)
    assert third["state"] == "escalated"
    assert third["updated_at"] >= opened["opened_at"] + 2.0
    assert third["late"] is False
    page = pagers.wait_for_json(topics.pager("dev"), alert=opened["id"])
    assert (page["reason"], page["level"]) == ("escalated", 3)


def test_resolved_alert_is_published_then_cleared(gateway, mqtt, topics):
    """The final state is published, then the retained message is cleared."""
    display = mqtt(topics.alerts)
    device = mqtt()
    device.publish(topics.events("call-1"), event("call-1"))
    opened = display.wait_for_json(device="call-1", state="open")
    device.publish(topics.resolve(opened["id"]), {"staff": "ana"})
    display.wait_for(
        lambda m: m.topic == topics.alert(opened["id"]) and m.payload == b""
    )
    assert states(display.messages, opened["id"]) == ["open", "resolved", None]

    late = mqtt(topics.alerts)
    # Marker: a call published after the late subscription; a retained copy of
    # the resolved alert would have been delivered before it.
    device.publish(topics.events("call-2"), event("call-2"))
    late.wait_for_json(device="call-2", state="open")
    assert states(late.messages, opened["id"]) == []


def test_duplicate_event_id_opens_one_alert(gateway, mqtt, topics):
    """A redelivered event (same id) is dropped, even after its alert closed."""
    display = mqtt(topics.alerts)
    device = mqtt()
    press = event("call-1")
    device.publish(topics.events("call-1"), press)
    device.publish(topics.events("call-1"), press)
    device.publish(topics.events("call-1"), event("call-1", "cancel"))
    opened = display.wait_for_json(device="call-1", state="open")
    display.wait_for_json(id=opened["id"], state="resolved")
    # Redelivered after the cancel: as a new press it would open a new alert.
    device.publish(topics.events("call-1"), press)
    device.publish(topics.events("call-2"), event("call-2"))  # marker
    display.wait_for_json(device="call-2", state="open")

    assert {m.json["id"] for m in display.messages if about("call-1")(m)} == {
        opened["id"]
    }
    health = gateway.healthz()
    assert health["messages_rejected"] == {"duplicate": 2}
    assert health["events_accepted"] == 3
    assert gateway.query("SELECT id FROM events WHERE id = ?", press["id"]) == [
        {"id": press["id"]}
    ]


def test_every_transition_is_in_sqlite_once_published(gateway, mqtt, topics):
    """When a state reaches the broker, its commit is already in the file."""
    display = mqtt(topics.alerts)
    device = mqtt()
    press = event("call-1")
    device.publish(topics.events("call-1"), press)
    opened = display.wait_for_json(device="call-1", state="open")
    alert_id = opened["id"]
    assert_committed(gateway, alert_id, "open", version=1)
    assert gateway.query("SELECT id, type FROM events") == [
        {"id": press["id"], "type": "call"}
    ]

    device.publish(topics.ack(alert_id), {"staff": "ana"})
    display.wait_for_json(id=alert_id, state="acknowledged")
    assert_committed(gateway, alert_id, "acknowledged", version=2)

    device.publish(topics.resolve(alert_id), {"staff": "ana"})
    display.wait_for_json(id=alert_id, state="resolved")
    assert_committed(gateway, alert_id, "resolved", version=3)
    [outbox] = gateway.query("SELECT key, kind, body FROM outbox")
    assert (outbox["key"], outbox["kind"]) == (f"alert:{alert_id}", "alert.resolved")
    assert '"resolved_by": "ana"' in outbox["body"]

    history = gateway.query(
        "SELECT version, kind, state, actor, via FROM alert_history "
        "WHERE alert_id = ? ORDER BY version",
        alert_id,
    )
    assert history == [
        {"version": 1, "kind": "opened", "state": "open", "actor": "call-1",
         "via": "station"},
        {"version": 2, "kind": "acknowledged", "state": "acknowledged",
         "actor": "ana", "via": "pager"},
        {"version": 3, "kind": "resolved", "state": "resolved", "actor": "ana",
         "via": "pager"},
    ]  # fmt: skip


def assert_committed(gateway, alert_id: str, state: str, version: int) -> None:
    [row] = gateway.query("SELECT state, version FROM alerts WHERE id = ?", alert_id)
    assert row == {"state": state, "version": version}
    history = gateway.query(
        "SELECT state FROM alert_history WHERE alert_id = ? AND version = ?",
        alert_id,
        version,
    )
    assert history == [{"state": state}]


def test_status_is_online_while_up_and_offline_after_kill(gateway, mqtt, topics):
    """The retained status says online; after kill -9 the broker's will says offline."""
    watcher = mqtt(topics.status)
    online = watcher.wait_for(lambda m: m.payload == b"online")
    assert online.retain
    assert gateway.healthz()["broker_connected"] is True

    gateway.kill()
    watcher.wait_for(lambda m: m.payload == b"offline", after=online.index + 1)
    retained = mqtt(topics.status).wait_for(lambda m: True)
    assert (retained.payload, retained.retain) == (b"offline", True)


def test_clean_stop_says_offline_and_exits_zero(gateway, mqtt, topics):
    """SIGTERM: the gateway publishes offline itself and exits with status 0."""
    watcher = mqtt(topics.status)
    online = watcher.wait_for(lambda m: m.payload == b"online")
    gateway.stop()
    assert gateway.process.returncode == 0
    watcher.wait_for(lambda m: m.payload == b"offline", after=online.index + 1)
    assert "Traceback" not in gateway.log()
