"""kill -9 of the broker: it comes back empty, the gateway fills it again."""

from __future__ import annotations

from tests.helpers import event, wait_until

SECOND_LEVEL_IN_1S = (
    {"after": "0s", "roles": ["nurse"]},
    {"after": "1s", "roles": ["charge_nurse"]},
    {"after": "10m", "staff": ["dev"]},
)


def test_gateway_republishes_after_broker_restart(broker, gateway, mqtt, topics):
    """After a broker restart a new display sees the open alert; acks still work."""
    display = mqtt(topics.alerts)
    mqtt().publish(topics.events("call-1"), event("call-1"))
    opened = display.wait_for_json(device="call-1", state="open")

    broker.kill()
    wait_until(
        lambda: not gateway.healthz()["broker_connected"], what="link reported down"
    )
    assert gateway.healthz()["status"] == "degraded"
    broker.start()  # same port, no persistence: nothing retained survives
    gateway.wait_online()

    fresh = mqtt(topics.alerts)
    assert fresh.wait_for_json(id=opened["id"]) == opened
    pager = mqtt()
    pager.publish(topics.ack(opened["id"]), {"staff": "ben"})
    acked = fresh.wait_for_json(id=opened["id"], state="acknowledged")
    assert acked["acked_by"] == "ben"
    assert gateway.query("SELECT state FROM alerts") == [{"state": "acknowledged"}]
    assert gateway.healthz()["broker_connected"] is True


def test_call_after_broker_restart_opens_an_alert(broker, gateway, mqtt, topics):
    """Once the gateway is back online, a new press opens an alert as before."""
    broker.kill()
    broker.start()
    gateway.wait_online()

    display = mqtt(topics.alerts)
    press = event("call-2")
    mqtt().publish(topics.events("call-2"), press)
    opened = display.wait_for_json(device="call-2", state="open")
    assert opened["event_id"] == press["id"]


def test_escalation_while_broker_is_down_is_shown_after(
    broker, start_gateway, mqtt, topics
):
    """An escalation that fired with no broker reaches displays once it is back."""
    gateway = start_gateway(levels=SECOND_LEVEL_IN_1S)
    display = mqtt(topics.alerts)
    mqtt().publish(topics.events("call-1"), event("call-1"))
    opened = display.wait_for_json(device="call-1", state="open")
    broker.kill()
    wait_until(
        lambda: gateway.query("SELECT level FROM alerts WHERE level = 2"),
        what="level 2 committed while the broker is down",
    )
    broker.start()
    gateway.wait_online()

    shown = mqtt(topics.alerts).wait_for_json(id=opened["id"], level=2)
    assert (shown["state"], shown["late"]) == ("escalated", False)
