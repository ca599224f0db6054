"""Logs a technician or a log shipper can search by alert, event and device id."""

from __future__ import annotations

import json

from tests.helpers import event, wait_until


def json_lines(text: str) -> list[dict]:
    """The JSON objects of a log, skipping the test harness's own banner lines."""
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_json_log_names_the_alert_event_and_device_of_each_transition(
    start_gateway, mqtt, topics
):
    gateway = start_gateway(main_options=("--log-format", "json"))
    display = mqtt(topics.alerts)
    press = event("call-2")
    mqtt().publish(topics.events("call-2"), press)
    alert = display.wait_for(lambda m: m.matches(None, {"device": "call-2"})).json

    def opened() -> list[dict]:
        return [
            entry
            for entry in json_lines(gateway.log_path.read_text())
            if entry.get("transition") == "opened"
        ]

    wait_until(lambda: opened(), what="the opened transition in the log")
    [line] = opened()
    assert line["logger"] == "gateway.alerts"
    assert line["level"] == "INFO"
    assert line["alert"] == alert["id"]
    assert line["event"] == press["id"]
    assert line["device"] == "call-2"
    assert line["zone"] == "west"
    assert line["rule"] == "patient-call"
    assert line["alert_level"] == 1
    assert line["time"].endswith("Z")
    assert alert["id"][:8] in line["message"]


def test_json_log_gives_the_topic_and_reason_of_a_refused_message(
    start_gateway, mqtt, topics
):
    gateway = start_gateway(main_options=("--log-format", "json"))
    mqtt().publish(topics.events("call-2"), b"{not json")

    def refused() -> list[dict]:
        return [
            entry
            for entry in json_lines(gateway.log_path.read_text())
            if entry.get("topic") == topics.events("call-2")
        ]

    wait_until(lambda: refused(), what="the refusal in the log")
    [line] = refused()
    assert line["level"] == "WARNING"
    assert line["reason"] == "malformed_json"
    # Every line of the process is JSON, start-up included.
    banner = "----- gateway started"
    rest = [
        row
        for row in gateway.log_path.read_text().splitlines()
        if row and not row.startswith(banner)
    ]
    assert all(row.startswith("{") for row in rest), rest[:3]
