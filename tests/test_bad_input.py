"""Bad input is refused, counted by reason, and changes nothing accepted."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from tests.helpers import SiteTopics, event

ALERT_TABLES = ("alerts", "alert_history", "events", "outbox")


@dataclass(frozen=True)
class Bad:
    topic: Callable[[SiteTopics, str], str]
    """Topic from the site's topics and the id of the alert already open."""

    payload: bytes
    reason: str
    """Key expected under /healthz ``messages_rejected``."""


def as_event(device: str = "call-3", **changes: object) -> bytes:
    """A call from call-3, with fields changed, or removed when given None."""
    body = {**event(device), **changes}
    return json.dumps({k: v for k, v in body.items() if v is not None}).encode()


def on_events(device: str) -> Callable[[SiteTopics, str], str]:
    return lambda topics, _: topics.events(device)


def on_ack(topics: SiteTopics, alert_id: str) -> str:
    return topics.ack(alert_id)


def on_resolve(topics: SiteTopics, alert_id: str) -> str:
    return topics.resolve(alert_id)


CALL_3 = on_events("call-3")

CASES = {
    "malformed-json": Bad(CALL_3, b'{"id": "x1", "type": "call",', "malformed_json"),
    "not-an-object": Bad(CALL_3, b'["call", "call-3"]', "malformed_json"),
    "not-utf8": Bad(CALL_3, b'\xff\xfe{"id": 1}', "malformed_json"),
    "unknown-device": Bad(on_events("ghost-9"), as_event("ghost-9"), "unknown_device"),
    "missing-type": Bad(CALL_3, as_event(type=None), "missing_field"),
    "missing-id": Bad(CALL_3, as_event(id=None), "missing_field"),
    "missing-ts": Bad(CALL_3, as_event(ts=None), "missing_field"),
    "ts-as-string": Bad(CALL_3, as_event(ts="1733230000"), "bad_field"),
    "ts-not-finite": Bad(CALL_3, as_event().replace(b'"ts": ', b'"ts": NaN, "x": '),
                         "bad_field"),
    "id-as-number": Bad(CALL_3, as_event(id=12345), "bad_field"),
    "oversized": Bad(CALL_3, as_event(padding="x" * 4096), "oversized"),
    "names-another-device": Bad(CALL_3, as_event(device="call-4"), "device_mismatch"),
    "ack-unknown-alert": Bad(
        lambda topics, _: topics.ack("0123456789abcdef"), b'{"staff": "ana"}',
        "unknown_alert",
    ),
    "resolve-unknown-alert": Bad(
        lambda topics, _: topics.resolve("0123456789abcdef"), b'{"staff": "ana"}',
        "unknown_alert",
    ),
    "ack-unknown-staff": Bad(on_ack, b'{"staff": "mallory"}', "unknown_staff"),
    "resolve-unknown-staff": Bad(on_resolve, b'{"staff": "mallory"}', "unknown_staff"),
    "ack-without-staff": Bad(on_ack, b'{"id": "m1"}', "missing_field"),
    "ack-not-json": Bad(on_ack, b"ack!", "malformed_json"),
    # A pager's own topic speaks for its person: the body may not name another.
    "staff-ack-spoofed": Bad(
        lambda topics, _: topics.staff("ben", "ack"),
        b'{"alert": "0123456789abcdef", "staff": "ana"}', "spoofed",
    ),
    "staff-ack-without-alert": Bad(
        lambda topics, _: topics.staff("ben", "ack"), b'{"id": "m2"}', "missing_field",
    ),
    "staff-resolve-unknown-alert": Bad(
        lambda topics, _: topics.staff("ben", "resolve"),
        b'{"alert": "0123456789abcdef"}', "unknown_alert",
    ),
    "staff-answer-spoofed": Bad(
        lambda topics, _: topics.staff("ben", "answer"),
        b'{"poll": "mood", "answer": "good", "staff": "ana"}', "spoofed",
    ),
}  # fmt: skip


def snapshot(gateway) -> dict[str, list[dict]]:
    return {
        table: gateway.query(f"SELECT * FROM {table} ORDER BY rowid")  # noqa: S608
        for table in ALERT_TABLES
    }


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_bad_message_is_rejected_and_changes_nothing(case, gateway, mqtt, topics):
    """The gateway counts the bad message, keeps running and accepts the next."""
    display = mqtt(topics.alerts)
    device = mqtt()
    device.publish(topics.events("call-1"), event("call-1"))
    accepted = display.wait_for_json(device="call-1", state="open")
    before = snapshot(gateway)
    mark = display.mark()

    device.publish(case.topic(topics, accepted["id"]), case.payload)
    # Marker: published after the bad message, so handled after it.
    device.publish(topics.events("call-2"), event("call-2"))
    good = display.wait_for_json(device="call-2", state="open", after=mark)

    assert {m.json["msg_id"] for m in display.messages[mark:] if m.payload} <= {
        good["msg_id"],
        accepted["msg_id"],  # republished as is after (re)connecting, at most
    }
    health = gateway.healthz()
    assert health["messages_rejected"] == {case.reason: 1}
    assert (health["events_accepted"], health["open_alerts"]) == (2, 2)
    after = snapshot(gateway)
    for table in ALERT_TABLES:
        assert after[table][: len(before[table])] == before[table]
    assert [row["device"] for row in after["alerts"]] == ["call-1", "call-2"]
    assert gateway.running


def test_retained_event_is_rejected(start_gateway, mqtt, topics):
    """An event left retained on the broker is not taken as a press."""
    device = mqtt()
    stale = event("call-3")
    device.publish(topics.events("call-3"), stale, retain=True)
    gateway = start_gateway()
    display = mqtt(topics.alerts)
    # Marker: the broker delivers the retained event when the gateway
    # subscribes, before any message published afterwards.
    device.publish(topics.events("call-2"), event("call-2"))
    display.wait_for_json(device="call-2", state="open")

    assert gateway.healthz()["messages_rejected"] == {"retained": 1}
    assert gateway.query("SELECT device FROM alerts") == [{"device": "call-2"}]
    assert gateway.query("SELECT id FROM events WHERE id = ?", stale["id"]) == []


def test_ack_for_a_resolved_alert_is_rejected(gateway, mqtt, topics):
    """An ack arriving after the alert closed is counted and changes nothing."""
    display = mqtt(topics.alerts)
    device = mqtt()
    device.publish(topics.events("call-1"), event("call-1"))
    opened = display.wait_for_json(device="call-1", state="open")
    device.publish(topics.events("call-1"), event("call-1", "cancel"))
    display.wait_for_json(id=opened["id"], state="resolved")

    device.publish(topics.ack(opened["id"]), {"staff": "ana"})
    device.publish(topics.events("call-2"), event("call-2"))  # marker
    display.wait_for_json(device="call-2", state="open")

    assert gateway.healthz()["messages_rejected"] == {"alert_resolved": 1}
    [row] = gateway.query("SELECT * FROM alerts WHERE id = ?", opened["id"])
    assert (row["state"], row["version"], row["acked_by"]) == ("resolved", 2, None)


def test_qos0_messages_do_not_break_the_link(gateway, mqtt, topics):
    """A device publishing at QoS 0 is served, and the broker link stays up."""
    display = mqtt(topics.alerts)
    client = mqtt()
    for n in (1, 2):
        info = client._client.publish(
            topics.events(f"call-{n}"), json.dumps(event(f"call-{n}")), qos=0
        )
        info.wait_for_publish(5)
    display.wait_for_json(device="call-1", state="open")
    display.wait_for_json(device="call-2", state="open")
    assert "Lost the MQTT broker" not in gateway.log()
