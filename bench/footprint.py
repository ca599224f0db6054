"""The gateway's footprint on a Pi-sized budget, with a simulated ward at work.

Two measurements, each against a private Mosquitto and a fresh database:

* **steady state**: the real gateway (``python main.py run``) on a generated
  site of a 30-room ward, 40 staff badges and 20 restroom sensor hubs, with
  the simulated facility driver (``simulator:``) acting at real time and a
  realistic pace: patients call, nurses walk in with their badges, guests use
  the restrooms, dispensers report their levels and heartbeats. After a
  warm-up, the script samples the gateway process's resident memory, CPU time
  and bytes written to storage (``/proc/<pid>/io`` ``write_bytes``, which
  counts what reaches the disk, WAL and fsyncs included);
* **start-up**: a site with 10,000 call buttons, each with an open call, is
  killed with SIGKILL (a power cut) and started again; the time from the
  process's start to its retained ``online`` status (published once the
  database is open, every alert and timer restored and the broker link up)
  is the time to ready.

Targets (issue 7): under 80 MB resident, under 5 % of one core, under 50 MB
written per hour, ready in under 3 s with 10,000 open alerts. Medians of
``--repeat`` runs are reported with their spread.

Run from the repository root::

    python bench/footprint.py [--minutes 5] [--warmup 30] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from latency import (  # noqa: E402
    REPO,
    BenchError,
    close_client,
    connect,
    cpu_seconds,
    gateway_environ,
    gateway_process,
    log_problems,
    machine_info,
    subscribe,
    wait_online,
)

from gateway.broker import PrivateBroker, free_port  # noqa: E402

log = logging.getLogger("bench.footprint")

TARGETS = {
    "rss_mb": 80.0,
    "cpu_share_percent": 5.0,
    "written_mb_per_hour": 50.0,
    "ready_seconds": 3.0,
}

ROOMS, BADGES, HUBS = 30, 40, 20
CALLS_PER_HOUR = 60.0
"""Two calls per bed per hour on average, busier at morning care and meals."""

VISITS_PER_HOUR = 600.0
"""Thirty visits per restroom per hour across the 20 restrooms."""

OPEN_ALERTS = 10_000


# -- sites ---------------------------------------------------------------------------


def ward_site(site: str, seed: int) -> dict[str, Any]:
    """A 30-room ward, 40 badges and 20 restroom hubs, run by the simulator."""
    rooms = [{"id": f"room-{n:03}", "name": f"Room {n}"} for n in range(1, ROOMS + 1)]
    restrooms = [
        {"id": f"wc-{n:02}", "name": f"Restroom {n}"} for n in range(1, HUBS + 1)
    ]
    devices: list[dict[str, Any]] = []
    for room in rooms:
        devices.append(
            {"id": f"call-{room['id']}", "kind": "call_button", "room": room["id"]}
        )
        devices.append(
            {"id": f"rx-{room['id']}", "kind": "ble_receiver", "room": room["id"]}
        )
    for wc in restrooms:
        for kind, prefix in (
            ("people_counter", "door"),
            ("dispenser", "towel"),
            ("feedback_terminal", "smiley"),
            ("ble_receiver", "rx"),
        ):
            devices.append(
                {"id": f"{prefix}-{wc['id']}", "kind": kind, "room": wc["id"]}
            )
    roles = ["nurse"] * 28 + ["charge_nurse"] * 4 + ["cleaner"] * 8
    staff = [
        {
            "id": f"staff-{n:02}",
            "name": f"Staff {n}",
            "roles": [role],
            "badge": f"ibeacon:f7826da6-4fa2-4e98-8024-bc5b71e0893e:1:{n}",
        }
        for n, role in enumerate(roles, start=1)
    ]
    return {
        "site": {"id": site, "name": "Footprint ward"},
        "gateway": {"id": "gw-bench"},
        "zones": [
            {"id": "ward", "name": "Ward", "rooms": rooms},
            {"id": "restrooms", "name": "Restrooms", "rooms": restrooms},
        ],
        "devices": devices,
        "staff": staff,
        "rules": [
            {
                "name": "patient-call",
                "devices": {"kind": "call_button"},
                "resolve_by_presence": {
                    "roles": ["nurse", "charge_nurse"],
                    "dwell": "5s",
                },
                "levels": [
                    {"after": "0s", "roles": ["nurse"], "remind_every": "2m"},
                    {"after": "3m", "roles": ["charge_nurse"]},
                ],
            },
            {
                "name": "restroom-visits",
                "kind": "count",
                "devices": {"kind": "people_counter"},
                "at_least": 30,
                "reset_by_visit": {"roles": ["cleaner"], "dwell": "5s"},
                "levels": [{"after": "0s", "roles": ["cleaner"]}],
            },
            {
                "name": "towels-low",
                "kind": "threshold",
                "devices": {"kind": "dispenser"},
                "reading": "towel_level",
                "below": 15,
                "clear_at": 50,
                "for": "5s",
                "levels": [{"after": "0s", "roles": ["cleaner"]}],
            },
            {
                "name": "restroom-feedback",
                "kind": "feedback",
                "devices": {"kind": "feedback_terminal"},
                "window": "10m",
                "at_least": 4,
                "share": 0.5,
                "min_interval": "3s",
                "resolve_by_presence": {"roles": ["cleaner"], "dwell": "5s"},
                "levels": [{"after": "0s", "roles": ["cleaner"]}],
            },
            {
                "name": "dispenser-offline",
                "kind": "supervision",
                "devices": {"kind": "dispenser"},
                "heartbeat": "60s",
                "levels": [{"after": "0s", "roles": ["cleaner"]}],
            },
        ],
        "simulator": {
            "speed": 1.0,
            "seed": seed,
            "calls_per_hour": CALLS_PER_HOUR,
            "visits_per_hour": VISITS_PER_HOUR,
        },
    }


def crowded_site(site: str) -> dict[str, Any]:
    """10,000 call buttons in 100 zones; their calls escalate in an hour."""
    zones = [
        {"id": f"z{z:03}", "rooms": [{"id": f"r{z:03}-{r:03}"} for r in range(100)]}
        for z in range(100)
    ]
    devices = [
        {"id": f"c{z:03}-{r:03}", "kind": "call_button", "room": f"r{z:03}-{r:03}"}
        for z in range(100)
        for r in range(100)
    ]
    return {
        "site": {"id": site},
        "gateway": {"id": "gw-bench"},
        "zones": zones,
        "devices": devices,
        "staff": [{"id": "ana", "name": "Ana", "roles": ["nurse"]}],
        "rules": [
            {
                "name": "patient-call",
                "devices": {"kind": "call_button"},
                "levels": [
                    {"after": "0s", "roles": ["nurse"]},
                    {"after": "1h", "roles": ["nurse"]},
                ],
            }
        ],
    }


def write_site(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# -- process readings ----------------------------------------------------------------


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise BenchError(f"no VmRSS for pid {pid}")


def written_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    raise BenchError(f"no write_bytes for pid {pid}")


def watch_status(
    broker: PrivateBroker, site: str
) -> tuple[paho.Client, threading.Event]:
    """A client that sets the event when the gateway's status says online."""
    online = threading.Event()

    def on_message(message: paho.MQTTMessage, received_ns: int) -> None:
        if message.payload == b"online":
            online.set()

    client = connect(broker, "bench", on_message)
    subscribe(client, [f"facility/{site}/gateways/gw-bench/status"])
    return client, online


def wait_ready(
    process: subprocess.Popen[bytes], online: threading.Event, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while not online.wait(0.01):
        if process.poll() is not None:
            raise BenchError(f"gateway exited with {process.returncode} before ready")
        if time.monotonic() > deadline:
            raise BenchError(f"gateway not ready after {timeout} s")


def query(database: Path, sql: str) -> Any:
    import sqlite3

    with sqlite3.connect(database, timeout=30) as conn:
        return conn.execute(sql).fetchone()[0]


# -- steady state --------------------------------------------------------------------


def steady_state(
    args: argparse.Namespace, broker: PrivateBroker, folder: Path, repeat: int
) -> dict[str, Any]:
    site = f"footprint-{repeat}-{uuid.uuid4().hex[:6]}"
    site_file = write_site(folder / f"{site}.yaml", ward_site(site, seed=repeat))
    database = folder / f"{site}.db"
    environ = gateway_environ(broker, database, free_port())
    watcher, online = watch_status(broker, site)
    try:
        with gateway_process(folder, site_file, environ, "WARNING") as process:
            wait_online(process, online, folder)
            time.sleep(args.warmup)
            rss: list[float] = []
            cpu0, io0, t0 = (
                cpu_seconds(process.pid),
                written_bytes(process.pid),
                time.monotonic(),
            )
            alerts0 = query(database, "SELECT count(*) FROM alerts")
            deadline = t0 + args.minutes * 60
            while time.monotonic() < deadline:
                rss.append(rss_mb(process.pid))
                time.sleep(1.0)
            cpu1, io1, t1 = (
                cpu_seconds(process.pid),
                written_bytes(process.pid),
                time.monotonic(),
            )
            alerts1 = query(database, "SELECT count(*) FROM alerts")
            events = query(database, "SELECT count(*) FROM events")
            if process.poll() is not None:
                raise BenchError(f"gateway exited with {process.returncode}")
    finally:
        close_client(watcher)
    if cpu0 is None or cpu1 is None:
        raise BenchError("the gateway's CPU time could not be read")
    hours = (t1 - t0) / 3600
    result = {
        "rss_mb": round(statistics.median(rss), 1),
        "rss_mb_max": round(max(rss), 1),
        "cpu_share_percent": round(100 * (cpu1 - cpu0) / (t1 - t0), 2),
        "written_mb_per_hour": round((io1 - io0) / 1e6 / hours, 2),
        "alerts_per_hour": round((alerts1 - alerts0) / hours),
        "events_total": events,
        "seconds": round(t1 - t0),
        "log_problems": log_problems(folder),
    }
    log.info("steady state, run %d: %s", repeat, result)
    return result


# -- start-up with 10,000 open alerts ------------------------------------------------


def press_all(broker: PrivateBroker, site: str, devices: list[str]) -> None:
    client = connect(broker, "bench")
    try:
        for n, device in enumerate(devices):
            body = {
                "id": f"{device}-{n}",
                "type": "call",
                "device": device,
                "ts": time.time(),
            }
            client.publish(
                f"facility/{site}/devices/{device}/events", json.dumps(body), qos=1
            )
            if n % 500 == 499:
                time.sleep(0.25)  # stay within the broker's inflight window
    finally:
        close_client(client)


def start_up(
    args: argparse.Namespace, broker: PrivateBroker, folder: Path
) -> list[float]:
    site = f"crowded-{uuid.uuid4().hex[:6]}"
    config = crowded_site(site)
    site_file = write_site(folder / f"{site}.yaml", config)
    database = folder / f"{site}.db"
    environ = gateway_environ(broker, database, free_port())
    devices = [device["id"] for device in config["devices"]]

    watcher, online = watch_status(broker, site)
    try:
        with gateway_process(folder, site_file, environ, "WARNING") as process:
            wait_ready(process, online, timeout=120)
            press_all(broker, site, devices)
            deadline = time.monotonic() + 300
            while (
                query(database, "SELECT count(*) FROM alerts WHERE state != 'resolved'")
                < OPEN_ALERTS
            ):
                if time.monotonic() > deadline:
                    raise BenchError("the 10,000 calls did not all open in 5 minutes")
                time.sleep(1.0)
            process.kill()  # a power cut: no clean shutdown
            process.wait()

        times = []
        for _ in range(args.repeat):
            online.clear()
            # The retained status still says "offline" (the last will) after
            # the kill; only the restarted gateway's "online" sets the event.
            started = time.monotonic()
            with gateway_process(folder, site_file, environ, "WARNING") as process:
                wait_ready(process, online, timeout=120)
                times.append(round(time.monotonic() - started, 3))
                process.kill()
                process.wait()
            log.info("ready with %d open alerts after %.2f s", OPEN_ALERTS, times[-1])
    finally:
        close_client(watcher)
    return times


# -- report --------------------------------------------------------------------------


def summary(runs: list[dict[str, Any]], ready: list[float]) -> dict[str, Any]:
    keys = (
        "rss_mb",
        "rss_mb_max",
        "cpu_share_percent",
        "written_mb_per_hour",
        "alerts_per_hour",
    )
    result: dict[str, Any] = {}
    for key in keys:
        values = [run[key] for run in runs]
        result[key] = {
            "median": statistics.median(values),
            "min": min(values),
            "max": max(values),
        }
    result["ready_seconds"] = {
        "median": statistics.median(ready),
        "min": min(ready),
        "max": max(ready),
    }
    result["met"] = {
        key: result[key]["median"] <= target for key, target in TARGETS.items()
    }
    return result


def markdown(result: dict[str, Any]) -> str:
    rows = [
        ("Resident memory (median of samples)", "rss_mb", "MB", "< 80 MB"),
        ("Resident memory (highest sample)", "rss_mb_max", "MB", ""),
        ("CPU share of one core", "cpu_share_percent", "%", "< 5 %"),
        ("Written to storage per hour", "written_mb_per_hour", "MB", "< 50 MB"),
        ("Ready with 10,000 open alerts", "ready_seconds", "s", "< 3 s"),
        ("Alerts raised per hour (load)", "alerts_per_hour", "", ""),
    ]
    lines = ["| Measure | Median | Spread | Target |", "|---|---|---|---|"]
    for name, key, unit, target in rows:
        value = result[key]
        spread = f"{value['min']}..{value['max']}"
        lines.append(f"| {name} | {value['median']} {unit} | {spread} | {target} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--minutes", type=float, default=5.0, help="sampling time per run"
    )
    parser.add_argument(
        "--warmup", type=float, default=30.0, help="seconds before sampling"
    )
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs (medians are reported)"
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON results file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    with tempfile.TemporaryDirectory(prefix="footprint-", dir=REPO / "bench") as tmp:
        folder = Path(tmp)
        info = machine_info(folder)
        broker = PrivateBroker(folder / "broker", users=("gateway", "bench"))
        broker.start()
        try:
            runs = [
                steady_state(args, broker, folder, n) for n in range(1, args.repeat + 1)
            ]
            ready = start_up(args, broker, folder)
        finally:
            broker.stop()
    result = summary(runs, ready)
    stamp = datetime.now(UTC).strftime("%Y-%m-%d")
    out = args.out or REPO / "bench" / "results" / f"footprint-{stamp}.json"
    out.write_text(
        json.dumps(
            {
                "machine": info,
                "settings": vars(args) | {"out": str(out)},
                "site": {
                    "rooms": ROOMS,
                    "badges": BADGES,
                    "hubs": HUBS,
                    "calls_per_hour": CALLS_PER_HOUR,
                    "visits_per_hour": VISITS_PER_HOUR,
                },
                "runs": runs,
                "ready_seconds": ready,
                "summary": result,
            },
            indent=2,
        )
        + "\n"
    )
    print(markdown(result))
    print(f"\nResults: {out}")
    return 0 if all(result["met"].values()) else 1


if __name__ == "__main__":
    os.chdir(REPO)
    sys.exit(main())
