"""The gateway killed with SIGKILL at random points of call, ack, escalation
and resolve storms.

The witness of a returned commit is what the gateway published: it
publishes an alert's state only after the commit of that state returned. So
after every restart each state a display saw must be in the database (the
same version or a later one), and every event a device published (the
broker acknowledged it, and the gateway's persistent session gets it again
if the kill came first) must in the end be in the events table. Nothing may
be in an impossible state, and ``PRAGMA integrity_check`` must say ok.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from typing import Any

import pytest

from tests.faults.conftest import SEED, sized
from tests.helpers import GatewayProcess, MqttClient, SiteTopics, wait_until

KILLS = sized(5, 50)
DEVICES = 8
UNANSWERED = f"call-{DEVICES}"
"""A room the storm never answers: its call escalates, through the kills."""
LEVELS = (
    {"after": "0s", "roles": ["nurse"]},
    {"after": "1s", "roles": ["charge_nurse"]},
    {"after": "2s", "staff": ["dev"]},
)

pytestmark = pytest.mark.timeout(sized(120, 1800))
"""Escalations within the storms, so timers fire around the kills too."""


class Storm:
    """A device and a pager publishing calls, cancels, acks and resolves."""

    def __init__(
        self, client: MqttClient, display: MqttClient, topics: SiteTopics
    ) -> None:
        self.client = client
        self.display = display
        self.topics = topics
        self.chance = random.Random(SEED)
        self.events: list[str] = []
        self.commands = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="storm")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _open_alerts(self) -> list[str]:
        latest = latest_states(self.display)
        return [
            i
            for i, body in latest.items()
            if body["state"] != "resolved" and body["device"] != UNANSWERED
        ]

    def _run(self) -> None:
        while not self._stop.is_set():
            roll = self.chance.random()
            device = f"call-{self.chance.randint(1, DEVICES - 1)}"
            open_alerts = self._open_alerts() if roll >= 0.6 else []
            if roll < 0.45 or not open_alerts:
                self.event(device, "call")
            elif roll < 0.6:
                self.event(device, "cancel")
            else:
                verb = "ack" if roll < 0.8 else "resolve"
                staff = self.chance.choice(("ana", "ben"))
                alert = self.chance.choice(open_alerts)
                body = {"alert": alert, "id": uuid.uuid4().hex}
                self.client.publish(self.topics.staff(staff, verb), body)
                self.commands += 1
            self._stop.wait(self.chance.uniform(0.0, 0.01))

    def event(self, device: str, kind: str) -> None:
        body = {
            "id": uuid.uuid4().hex,
            "type": kind,
            "device": device,
            "ts": time.time(),
        }
        self.client.publish(self.topics.events(device), body)
        self.events.append(body["id"])


def latest_states(display: MqttClient) -> dict[str, dict[str, Any]]:
    """What a display shows: the highest version seen of each alert."""
    latest: dict[str, dict[str, Any]] = {}
    for message in display.messages:
        body = message.json
        if not body:
            continue  # a cleared retained copy after a resolve
        seen = latest.get(body["id"])
        if seen is None or body["version"] > seen["version"]:
            latest[body["id"]] = body
    return latest


def violations(gateway: GatewayProcess, display: MqttClient) -> list[str]:
    """What is wrong in the database against the witness and the state rules."""
    found = []
    rows = {row["id"]: row for row in gateway.query("SELECT * FROM alerts")}
    history: dict[str, list[dict[str, Any]]] = {}
    for row in gateway.query("SELECT * FROM alert_history ORDER BY version"):
        history.setdefault(row["alert_id"], []).append(row)

    for alert_id, shown in latest_states(display).items():
        row = rows.get(alert_id)
        if row is None or row["version"] < shown["version"]:
            found.append(f"{alert_id} v{shown['version']} was shown, lost: {row}")

    open_per_device: dict[tuple[str, str], int] = {}
    for alert_id, row in rows.items():
        state = row["state"]
        if state == "resolved" and not row["resolved_at"]:
            found.append(f"{alert_id} resolved without resolved_at")
        if state != "resolved" and row["resolved_at"]:
            found.append(f"{alert_id} {state} with a resolved_at")
        if state == "acknowledged" and not (row["acked_at"] and row["acked_by"]):
            found.append(f"{alert_id} acknowledged by nobody")
        if row["acked_at"] and row["acked_at"] < row["opened_at"]:
            found.append(f"{alert_id} acknowledged before it opened")
        if row["resolved_at"] and row["resolved_at"] < row["opened_at"]:
            found.append(f"{alert_id} resolved before it opened")
        versions = [h["version"] for h in history.get(alert_id, [])]
        if versions != list(range(1, row["version"] + 1)):
            found.append(f"{alert_id} v{row['version']} has history {versions}")
        elif history[alert_id][0]["kind"] != "opened":
            found.append(f"{alert_id} history starts with {history[alert_id][0]}")
        if state != "resolved":
            key = (row["device"], row["rule"])
            open_per_device[key] = open_per_device.get(key, 0) + 1
    found += [f"{n} open alerts for {k}" for k, n in open_per_device.items() if n > 1]

    integrity = gateway.query("PRAGMA integrity_check")
    if integrity != [{"integrity_check": "ok"}]:
        found.append(f"integrity_check: {integrity}")
    return found


def test_kill_9_at_random_points_of_storms_loses_no_returned_commit(
    start_gateway, mqtt, topics, figures
):
    chance = random.Random(SEED + 1)
    gateway = start_gateway(devices=DEVICES, levels=LEVELS)
    display = mqtt(topics.alerts)
    storm = Storm(mqtt(), display, topics)
    figures.update(seed=SEED, kills=0, states_checked=0, violations=0)

    # However the dice fall, one call waits unanswered and escalates.
    storm.event(UNANSWERED, "call")
    storm.start()
    try:
        for _ in range(KILLS):
            time.sleep(chance.uniform(0.05, 1.5))
            gateway.kill()
            figures["kills"] += 1
            found = violations(gateway, display)
            figures["states_checked"] += len(latest_states(display))
            figures["violations"] += len(found)
            assert not found, found
            gateway.start()
    finally:
        storm.stop()

    # Every event a device published reached the database, kills or not.
    published = set(storm.events)

    def stored() -> bool:
        rows = gateway.query("SELECT id FROM events")
        return published <= {row["id"] for row in rows}

    wait_until(stored, 30, "every published event in the events table")
    found = violations(gateway, display)
    figures.update(
        events=len(published),
        commands=storm.commands,
        alerts=len(gateway.query("SELECT id FROM alerts")),
        transitions=len(gateway.query("SELECT id FROM alert_history")),
        by_kind={
            row["kind"]: row["n"]
            for row in gateway.query(
                "SELECT kind, COUNT(*) AS n FROM alert_history GROUP BY kind"
            )
        },
    )
    figures["states_checked"] += len(latest_states(display))
    figures["violations"] += len(found)
    assert not found, found
    # The storms reached every transition: none of them is left untested.
    for kind in ("opened", "acknowledged", "escalated", "resolved"):
        assert figures["by_kind"].get(kind, 0) > 0, figures["by_kind"]
