"""Faults that raise a trouble state while alerting goes on.

Each test runs the real gateway (``main.py run``) against a private broker and
injects one fault the way it happens on site, then measures how long the
trouble takes to show and checks that a call in another room still opens an
alert:

* a device gone quiet: a supervision alert once its heartbeat is overdue;
* a serial port unplugged: the master side of a real pseudo-terminal closed;
* a BLE adapter that cannot scan: real bleak with no BlueZ on this machine
  (an adapter that scans but hears nothing is covered in-process by
  ``tests/test_ble.py``, which needs no BlueZ);
* the database locked: another process holds its write lock;
* the disk full: the gateway's file size limit (``RLIMIT_FSIZE``) lowered
  to one byte with ``prlimit``, so every write to the database gets
  ``EFBIG``, as on a full SD card (Python ignores SIGXFSZ, so the process
  is not killed by the limit).

The database faults cannot let an alert open while they last, since a
transition is committed before it is shown: the gateway says ``trouble``
on its status topic and in /healthz, keeps the batch (unacknowledged at
the broker) and commits it as soon as the database takes writes again.
"""

from __future__ import annotations

import os
import pty
import resource
import sqlite3
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.helpers import (
    WAIT,
    GatewayProcess,
    MqttClient,
    SiteTopics,
    event,
    site_config,
    write_site,
)

pytestmark = pytest.mark.timeout(120)

DECLARED = {
    "device_quiet": 3.0,
    "serial_unplugged": 3.0,
    "ble_cannot_scan": 10.0,
    "database_locked": 5.0 + 3.0,
    "disk_full": 3.0,
}
"""Seconds within which each fault's trouble must show: a 1 s heartbeat plus
the supervision turn; the driver's own report; the busy timeout (5 s) for
a lock; a commit attempt for a full disk."""


def supervision(name: str, devices: list[str], **options: Any) -> dict[str, Any]:
    return {
        "name": name,
        "kind": "supervision",
        "priority": "urgent",
        "devices": {"ids": devices},
        "levels": [{"after": "0s", "roles": ["nurse"]}],
        **options,
    }


def trouble_alert(display: MqttClient, device: str, since: float = 0.0) -> float:
    """Wait for a supervision alert of ``device`` opened at ``since`` (Unix
    time) or later; when it arrived."""
    display.wait_for(
        lambda m: (
            m.matches(None, {"device": device, "state": "open"})
            and m.json["rule"].startswith("offline-")
            and m.json["opened_at"] >= since
        ),
        timeout=30,
        what=f"a supervision alert for {device}",
    )
    return time.monotonic()


def another_room_still_alerts(
    mqtt: Callable[..., MqttClient], topics: SiteTopics, device: str
) -> None:
    display = mqtt(topics.alerts)
    mqtt().publish(topics.events(device), event(device))
    display.wait_for_json(device=device, state="open", timeout=30)


def test_device_serial_and_ble_faults_raise_supervision_alerts(
    broker, tmp_path, mqtt, topics, figures, request
):
    """One gateway, three driver and device faults, one after the other."""
    master, slave = pty.openpty()
    path = os.ttyname(slave)
    os.close(slave)  # the gateway opens its own end by path
    site = site_config(topics.site)
    site["devices"] += [
        {"id": "soap-1", "kind": "dispenser", "room": "room-1"},
        {"id": "hub-1", "kind": "sensor_hub", "room": "room-1"},
        {"id": "gw-ble", "kind": "ble_receiver", "room": "room-1"},
    ]
    site["rules"] += [
        supervision("offline-quiet", ["soap-1"], heartbeat="1s"),
        supervision("offline-driver", ["hub-1", "gw-ble"]),
    ]
    site["serial_hubs"] = [{"port": path, "hubs": {"wc1": {"device": "hub-1"}}}]
    site["presence"] = {"receivers": {"gw-ble": "room-1"}}
    site["ble"] = {"receiver": "gw-ble"}
    display = mqtt(topics.alerts)
    gateway = GatewayProcess(
        write_site(tmp_path / "site.yaml", site), broker, tmp_path, topics
    )
    request.addfinalizer(gateway.stop)
    started = time.monotonic()
    gateway.start()

    # The BLE adapter cannot scan: there is no BlueZ here, real bleak says so.
    seconds = trouble_alert(display, "gw-ble") - started
    drivers = gateway.healthz()["drivers"]
    scanner = next(h for name, h in drivers.items() if "ble" in name.lower())
    assert scanner["state"] == "unavailable"
    figures["ble_cannot_scan_s_from_start"] = round(seconds, 2)
    assert seconds < DECLARED["ble_cannot_scan"] + 30  # start-up included
    another_room_still_alerts(mqtt, topics, "call-2")

    # A device gone quiet: one heartbeat (ending any alert for its silence
    # since start-up), then nothing.
    heartbeat = event("soap-1", "heartbeat")
    mqtt().publish(topics.events("soap-1"), heartbeat)
    heard = time.monotonic()
    seconds = trouble_alert(display, "soap-1", since=heartbeat["ts"]) - heard
    figures.update(heartbeat_s=1.0, device_quiet_s=round(seconds, 2))
    assert seconds < DECLARED["device_quiet"]
    another_room_still_alerts(mqtt, topics, "call-3")

    # The serial hub unplugged: the far end of its line goes away.
    ports = gateway.healthz()["drivers"]
    assert any(h.get("connected") for n, h in ports.items() if n.startswith("serial"))
    unplugged, wall = time.monotonic(), time.time()
    os.close(master)
    seconds = trouble_alert(display, "hub-1", since=wall) - unplugged
    figures["serial_unplugged_s"] = round(seconds, 2)
    assert seconds < DECLARED["serial_unplugged"]
    another_room_still_alerts(mqtt, topics, "call-4")


def wait_status(watcher: MqttClient, payload: bytes, after: int) -> float:
    watcher.wait_for(
        lambda m: m.payload == payload, timeout=30, after=after, what=str(payload)
    )
    return time.monotonic()


def database_fault_then_recovery(
    gateway: GatewayProcess,
    mqtt: Callable[..., MqttClient],
    topics: SiteTopics,
    begin: Any,
    end: Any,
) -> tuple[float, float]:
    """Fault, a call in two rooms, trouble shown; then recovery.

    Returns seconds from the fault to the trouble status, and from the
    fault's end to both alerts shown.
    """
    display = mqtt(topics.alerts)
    status = mqtt(topics.status)
    device = mqtt()
    mark, status_mark = display.mark(), status.mark()
    rooms = [f"call-{n}" for n in range(1, 5)]
    open_now = {m.json["device"] for m in display.messages if m.payload}
    first, second = [room for room in rooms if room not in open_now][:2]

    begin()
    injected = time.monotonic()
    try:
        device.publish(topics.events(first), event(first))
        troubled = wait_status(status, b"trouble", status_mark) - injected
        after_trouble = status.mark()
        health = gateway.healthz()
        assert health["status"] == "trouble", health
        assert health["trouble"]["what"] == "database"
        device.publish(topics.events(second), event(second))
        # Both calls wait for their commit: neither may be shown yet.
        assert gateway.healthz()["status"] == "trouble"
        assert not [m for m in display.messages[mark:] if m.payload]
    finally:
        end()
    released = time.monotonic()

    for room in (first, second):
        display.wait_for_json(device=room, state="open", after=mark, timeout=30)
    recovered = time.monotonic() - released
    wait_status(status, b"online", after_trouble)
    assert gateway.healthz()["status"] == "ok"
    assert gateway.query("PRAGMA integrity_check") == [{"integrity_check": "ok"}]
    assert gateway.running
    return round(troubled, 2), round(recovered, 2)


def test_a_locked_database_and_a_full_disk_show_trouble_and_lose_nothing(
    start_gateway, mqtt, topics, figures
):
    gateway = start_gateway()
    assert gateway.process is not None

    # Another process holds the database's write lock for a while.
    holder = sqlite3.connect(gateway.db_path, timeout=WAIT, isolation_level=None)

    def release() -> None:
        holder.execute("ROLLBACK")
        holder.close()

    locked = database_fault_then_recovery(
        gateway, mqtt, topics, lambda: holder.execute("BEGIN EXCLUSIVE"), release
    )
    figures.update(locked_s_to_trouble=locked[0], locked_s_release_to_alerts=locked[1])
    assert locked[0] < DECLARED["database_locked"]

    # The disk full: no file of the gateway's may grow by one byte.
    pid = gateway.process.pid
    _, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
    full = database_fault_then_recovery(
        gateway,
        mqtt,
        topics,
        lambda: resource.prlimit(pid, resource.RLIMIT_FSIZE, (1, hard)),
        lambda: resource.prlimit(pid, resource.RLIMIT_FSIZE, (hard, hard)),
    )
    figures.update(full_s_to_trouble=full[0], full_s_release_to_alerts=full[1])
    assert full[0] < DECLARED["disk_full"]


def test_stopped_while_the_database_is_locked_the_call_comes_back(
    start_gateway, mqtt, topics, figures
):
    """SIGTERM during trouble: a clean stop, and the broker redelivers the call."""
    gateway = start_gateway()
    display = mqtt(topics.alerts)
    status = mqtt(topics.status)
    mark = status.mark()
    holder = sqlite3.connect(gateway.db_path, timeout=WAIT, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        press = event("call-1")
        mqtt().publish(topics.events("call-1"), press)
        status.wait_for(lambda m: m.payload == b"trouble", timeout=30, after=mark)
        stopping = time.monotonic()
        gateway.stop()
        assert gateway.process is not None
        assert gateway.process.returncode == 0, gateway.log()[-3000:]
        figures["stop_s_in_trouble"] = round(time.monotonic() - stopping, 2)
    finally:
        holder.execute("ROLLBACK")
        holder.close()

    gateway.start()
    opened = display.wait_for_json(device="call-1", state="open", timeout=30)
    assert opened["event_id"] == press["id"]
    assert gateway.query("SELECT COUNT(*) AS n FROM alerts") == [{"n": 1}]
