"""Press-to-alert latency through a real Mosquitto, beside the broker's own floor.

What a nurse waits for is the time from a call button's publish to the open
alert reaching a pager or wall display. On the real path that is: device ->
Mosquitto -> gateway (parse, rule engine, durable SQLite commit) -> Mosquitto
-> display. This script measures that path end to end with the real gateway
(``python main.py run``) on a private Mosquitto, and, in the same run and
against the same broker, the floor that no gateway can beat: one client
publishing to another through that broker.

Both paths use the same two bench clients (paho-mqtt 2.x, QoS 1, TCP_NODELAY),
the same paced schedule and the same clock (``time.monotonic_ns``, shared by
every thread and process of one Linux host), so the harness's own cost is in
both numbers and their ratio shows what the gateway adds.

Each (path, rate) is measured ``--repeat`` times, with a fresh gateway and a
fresh database every time, and the report gives the median of every statistic
across repeats and its spread (min..max), because a 2-core machine is noisy.

Run from the repository root::

    python bench/latency.py [--rates 100 1000] [--duration 10] [--repeat 3]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import http.client
import importlib.metadata
import json
import logging
import math
import os
import platform
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import yaml
from paho.mqtt.enums import CallbackAPIVersion

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    # Run as ``python bench/latency.py``: the gateway is not an installed package.
    sys.path.insert(0, str(REPO))

from gateway.broker import PrivateBroker, free_port  # noqa: E402

log = logging.getLogger("bench")

QOS = 1
MAX_INFLIGHT = 1000
"""Same as the gateway: paho's default of 20 unacked QoS 1 messages would
throttle the publisher at 1,000/s and show up as latency."""

LEAD_NS = 200_000_000
"""The schedule starts this long after it is computed, so the first sends
are not already late."""

READY_TIMEOUT = 60.0
"""Seconds for the gateway to load its site file and say ``online``."""

STOP_TIMEOUT = 15.0
MIN_SAMPLES_P999 = 5000
"""Below this p99.9 rests on fewer than five samples, so it is not reported."""

STATS = ("p50_ms", "p99_ms", "p999_ms", "max_ms", "mean_ms", "lost")
NS_PER_MS = 1_000_000


class BenchError(RuntimeError):
    """A measurement could not be made (broker, gateway or client trouble)."""


# -- command line ------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/latency.py",
        description="Measure call-to-alert latency through the real gateway and a "
        "private Mosquitto, beside the broker's own client-to-client floor.",
    )
    parser.add_argument(
        "--rates",
        type=float,
        nargs="+",
        default=[100.0, 1000.0],
        help="calls per second to publish (default: 100 1000)",
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=10.0,
        help="seconds of publishing per rate and path (default: 10)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="measurements per rate and path; medians are reported (default: 3)",
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=10.0,
        help="seconds after the last call before a missing alert counts as lost "
        "(default: 10)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO / "bench" / "results" / "latency.json",
        help="where to write the JSON results (default: bench/results/latency.json)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        help="keep broker and gateway files (site, database, logs) here instead "
        "of a temporary folder removed at the end; the database's disk is part "
        "of what is measured",
    )
    parser.add_argument(
        "--gateway-log-level",
        default="INFO",
        help="the gateway's --log-level; INFO, as deployed, logs every transition",
    )
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.repeat < 1 or any(r <= 0 for r in args.rates):
        parser.error("--duration, --repeat and --rates must be positive")
    return args


# -- MQTT clients --------------------------------------------------------------------


def _no_delay(client: paho.Client, userdata: object, sock: socket.socket) -> None:
    # Without it a lone small publish can wait for the ACK of the previous one.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def connect(
    broker: PrivateBroker,
    user: str,
    on_message: Callable[[paho.MQTTMessage, int], None] | None = None,
) -> paho.Client:
    """A connected, running paho client; ``on_message`` gets the receive time."""
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"bench-{uuid.uuid4().hex[:8]}",
        protocol=paho.MQTTv311,
        clean_session=True,
    )
    client.username_pw_set(user, broker.passwords[user])
    client.max_inflight_messages_set(MAX_INFLIGHT)
    client.max_queued_messages_set(0)
    client.on_socket_open = _no_delay

    connected = threading.Event()

    def handle_connect(
        c: paho.Client, u: object, f: object, reason: Any, p: object
    ) -> None:
        if not reason.is_failure:
            connected.set()

    client.on_connect = handle_connect
    if on_message is not None:

        def handle_message(
            c: paho.Client, u: object, message: paho.MQTTMessage
        ) -> None:
            # Take the time first: parsing is the harness's cost, not the path's.
            on_message(message, time.monotonic_ns())

        client.on_message = handle_message

    client.connect(broker.host, broker.port, keepalive=30)
    client.loop_start()
    if not connected.wait(10):
        close_client(client)
        raise BenchError(f"bench client could not connect to {broker.port}")
    return client


def subscribe(client: paho.Client, topics: list[str]) -> None:
    """Subscribe and wait for the SUBACK, so no early message is missed."""
    done = threading.Event()
    client.on_subscribe = lambda *args: done.set()
    client.subscribe([(topic, QOS) for topic in topics])
    if not done.wait(10):
        raise BenchError(f"no SUBACK for {topics}")


def close_client(client: paho.Client) -> None:
    client.disconnect()
    client.loop_stop()


# -- pacing and statistics ----------------------------------------------------------


@dataclass
class Probe:
    """Send and first-receive times of one measurement, keyed by message id."""

    sent: dict[str, int] = field(default_factory=dict)
    latency: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0
    unmatched: int = 0

    def arrived(self, key: str, sent_ns: int, received_ns: int) -> None:
        # QoS 1 may deliver twice; only the first delivery is what a user sees.
        if key in self.latency:
            self.duplicates += 1
        else:
            self.latency[key] = received_ns - sent_ns

    def wait_all(self, grace: float) -> None:
        deadline = time.monotonic() + grace
        while len(self.latency) < len(self.sent) and time.monotonic() < deadline:
            time.sleep(0.02)


def publish_paced(
    client: paho.Client,
    rate: float,
    duration: float,
    message: Callable[[int, int], tuple[str, str, bytes]],
    probe: Probe,
) -> dict[str, float]:
    """Publish ``rate * duration`` messages on a fixed schedule.

    Each send is due at ``start + i / rate``: a late send is not pushed back
    onto the next one, so the rate holds even when one sleep overshoots.
    ``message(i, now_ns)`` returns (key, topic, payload).
    """
    count = max(1, round(rate * duration))
    interval = 1e9 / rate
    # A full collection of the harness's own objects mid-run would read as
    # latency on whichever path is being measured; set them aside first.
    gc.collect()
    gc.freeze()
    start = time.monotonic_ns() + LEAD_NS
    worst_lag = 0
    for i in range(count):
        due = start + round(i * interval)
        ahead = due - time.monotonic_ns()
        if ahead > 0:
            time.sleep(ahead / 1e9)

        now = time.monotonic_ns()
        key, topic, payload = message(i, now)
        probe.sent[key] = now
        client.publish(topic, payload, qos=QOS)
        worst_lag = max(worst_lag, now - due)

    elapsed = (time.monotonic_ns() - start) / 1e9
    return {
        "sent": count,
        "achieved_rate": round(count / elapsed, 1) if elapsed > 0 else 0.0,
        "worst_send_lag_ms": round(worst_lag / NS_PER_MS, 3),
    }


def percentile(ordered: list[int], q: float) -> int:
    """Nearest-rank percentile of an ascending list."""
    index = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
    return ordered[index]


def summarize(probe: Probe) -> dict[str, Any]:
    values = sorted(probe.latency.values())
    stats: dict[str, Any] = {
        "sent": len(probe.sent),
        "received": len(values),
        "lost": len(probe.sent) - len(values),
        "duplicates": probe.duplicates,
        "unmatched": probe.unmatched,
    }
    if not values:
        return stats | {key: None for key in STATS if key != "lost"}

    def ms(ns: float) -> float:
        return round(ns / NS_PER_MS, 3)

    stats["p50_ms"] = ms(percentile(values, 0.50))
    stats["p99_ms"] = ms(percentile(values, 0.99))
    enough = len(values) >= MIN_SAMPLES_P999
    stats["p999_ms"] = ms(percentile(values, 0.999)) if enough else None
    stats["max_ms"] = ms(values[-1])
    stats["mean_ms"] = ms(statistics.fmean(values))
    return stats


# -- the broker floor -------------------------------------------------------------


def measure_floor(
    broker: PrivateBroker, rate: float, duration: float, grace: float, tag: str
) -> dict[str, Any]:
    """One client publishes, another receives, through the same broker."""
    probe = Probe()
    base = f"facility/floor-{tag}/devices"

    def received(message: paho.MQTTMessage, now: int) -> None:
        body = json.loads(message.payload)
        probe.arrived(body["id"], body["sent_ns"], now)

    def floor_message(i: int, now: int) -> tuple[str, str, bytes]:
        # Same shape as a call event, plus the send time the receiver needs.
        key = f"{tag}-{i}"
        device = f"call-{i:05d}"
        payload = {
            "id": key,
            "type": "call",
            "device": device,
            "ts": time.time(),
            "sent_ns": now,
        }
        return key, f"{base}/{device}/events", json.dumps(payload).encode()

    with contextlib.ExitStack() as stack:
        subscriber = connect(broker, "bench", received)
        stack.callback(close_client, subscriber)
        subscribe(subscriber, [f"{base}/+/events"])

        publisher = connect(broker, "bench")
        stack.callback(close_client, publisher)

        window = CpuWindow()
        pacing = publish_paced(publisher, rate, duration, floor_message, probe)
        probe.wait_all(grace)
        cpu = window.close()

    return {"stats": summarize(probe), "pacing": pacing, "cpu": cpu}


# -- the gateway ----------------------------------------------------------------------


def write_site(path: Path, site: str, devices: int) -> None:
    """A site with one call button per call, so every call opens a new alert.

    A second call from a device with an open alert opens nothing, which would
    look like a loss; one device per call avoids that without cancels.
    """
    rooms = [f"room-{n:03d}" for n in range(min(devices, 50))]
    document = {
        "site": {"id": site, "name": "Latency bench"},
        "gateway": {"id": "gw-bench"},
        "zones": [{"id": "bench", "rooms": [{"id": room} for room in rooms]}],
        "devices": [
            {"id": f"call-{i:05d}", "kind": "call_button", "room": rooms[i % 50]}
            for i in range(devices)
        ],
        "staff": [
            {"id": "nurse-1", "name": "Nurse One", "roles": ["nurse"]},
            {"id": "charge-1", "name": "Charge One", "roles": ["charge_nurse"]},
        ],
        # Level 2 is an hour away: it keeps the escalation timers in play
        # without firing during the run.
        "rules": [
            {
                "name": "patient-call",
                "devices": {"kind": "call_button"},
                "levels": [
                    {"after": "0s", "roles": ["nurse"]},
                    {"after": "1h", "roles": ["charge_nurse"]},
                ],
            }
        ],
    }
    path.write_text(yaml.safe_dump(document, sort_keys=False))


def gateway_environ(
    broker: PrivateBroker, database: Path, web_port: int
) -> dict[str, str]:
    # GATEWAY_* variables from the caller's shell would silently change the
    # gateway under test, so only ours are passed.
    environ = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    environ.update(
        {
            "GATEWAY_MQTT__HOST": broker.host,
            "GATEWAY_MQTT__PORT": str(broker.port),
            "GATEWAY_MQTT__USERNAME": "gateway",
            "GATEWAY_MQTT__PASSWORD": broker.passwords["gateway"],
            "GATEWAY_DATABASE__PATH": str(database),
            "GATEWAY_WEB__ENABLED": "true",
            "GATEWAY_WEB__HOST": "127.0.0.1",
            "GATEWAY_WEB__PORT": str(web_port),
        }
    )
    return environ


@contextlib.contextmanager
def gateway_process(
    folder: Path, site_file: Path, environ: dict[str, str], log_level: str
) -> Iterator[subprocess.Popen[bytes]]:
    """The real gateway as a subprocess, always stopped on the way out."""
    log_path = folder / "gateway.log"
    with log_path.open("wb") as log_file:
        # Its own session: a Ctrl-C reaches the bench, which then stops the
        # gateway itself, in order, instead of both racing to exit.
        process = subprocess.Popen(
            [sys.executable, "main.py", "--log-level", log_level, "run"]
            + ["--config", str(site_file)],
            cwd=REPO,
            env=environ,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            yield process
        finally:
            stop_process(process)


def stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        log.warning("gateway pid %d ignored SIGTERM; killing it", process.pid)
        process.kill()
        process.wait()


def log_tail(folder: Path, lines: int = 20) -> str:
    path = folder / "gateway.log"
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def log_problems(folder: Path, keep: int = 5) -> dict[str, Any]:
    """WARNING and worse lines of the gateway's log: a clean run has none."""
    path = folder / "gateway.log"
    text = path.read_text(errors="replace") if path.exists() else ""
    found = [
        line
        for line in text.splitlines()
        if any(f" {level} " in line for level in ("WARNING", "ERROR", "CRITICAL"))
    ]
    return {"count": len(found), "first": found[:keep]}


def wait_online(
    process: subprocess.Popen[bytes], online: threading.Event, folder: Path
) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while not online.wait(0.1):
        if process.poll() is not None:
            raise BenchError(
                f"gateway exited with status {process.returncode} before going "
                f"online:\n{log_tail(folder)}"
            )
        if time.monotonic() > deadline:
            raise BenchError(f"gateway not online after {READY_TIMEOUT}s")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU of a process so far (Linux), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU seconds all cores have spent busy since boot (Linux /proc/stat)."""
    with open("/proc/stat") as stat:
        ticks = [int(value) for value in stat.readline().split()[1:]]
    idle = ticks[3] + ticks[4]  # idle and iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> dict[int, float]:
    """CPU so far of each direct child of this process: the broker, the gateway."""
    me = os.getpid()
    found: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            text = (entry / "stat").read_text()
            fields = text[text.rindex(")") + 2 :].split()
            if int(fields[1]) == me:
                ticks = int(fields[11]) + int(fields[12])
                found[int(entry.name)] = ticks / os.sysconf("SC_CLK_TCK")
    return found


@dataclass
class CpuWindow:
    """Who used the machine's cores while one measurement ran.

    On a shared 2-core machine a busy neighbour makes the gateway wait for a
    core; ``others_cores`` (everything but the bench, its broker and its
    gateway) tells which repeats were measured next to one.
    """

    gateway_pid: int | None = None
    began: float = field(default_factory=time.monotonic)
    busy: float = field(default_factory=machine_busy_seconds)
    bench: float = field(default_factory=time.process_time)
    children: dict[int, float] = field(default_factory=children_cpu_seconds)

    def close(self) -> dict[str, float | None]:
        wall = time.monotonic() - self.began
        children = children_cpu_seconds()
        used = {
            pid: seconds - self.children.get(pid, 0.0)
            for pid, seconds in children.items()
        }
        gateway = used.get(self.gateway_pid) if self.gateway_pid else None
        busy = machine_busy_seconds() - self.busy
        bench = time.process_time() - self.bench
        others = busy - bench - sum(used.values())

        def cores(seconds: float | None) -> float | None:
            return None if seconds is None else round(seconds / wall, 2)

        return {
            "wall_s": round(wall, 2),
            "machine_busy_cores": cores(busy),
            "bench_cores": cores(bench),
            "broker_cores": cores(sum(used.values()) - (gateway or 0.0)),
            "gateway_cores": cores(gateway),
            "others_cores": cores(max(0.0, others)),
        }


def healthz(port: int, quiet: bool = False) -> dict[str, Any] | None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", "/healthz")
        response = connection.getresponse()
        return json.loads(response.read())
    except (OSError, http.client.HTTPException, ValueError) as exc:
        if not quiet:
            log.warning("GET /healthz on port %d failed: %s", port, exc)
        return None
    finally:
        connection.close()


def wait_settled(port: int, timeout: float = 10.0) -> dict[str, Any] | None:
    """Wait for the web server too, so its start-up is not measured as latency."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = healthz(port, quiet=True)
        if health is not None:
            return health
        time.sleep(0.05)
    log.warning("the gateway's web server did not answer on port %d", port)
    return None


def measure_gateway(
    broker: PrivateBroker,
    rate: float,
    duration: float,
    grace: float,
    tag: str,
    workdir: Path,
    log_level: str,
) -> dict[str, Any]:
    """Calls in, open alerts out, through a fresh gateway and database."""
    folder = workdir / f"gateway-{tag}"
    folder.mkdir(parents=True)
    count = max(1, round(rate * duration))
    # A site id per run: alerts retained by an earlier run stay on the broker
    # and must not be matched to this run's calls.
    site = f"bench-{tag}"
    site_file = folder / "site.yaml"
    write_site(site_file, site, count)
    web_port = free_port()
    environ = gateway_environ(broker, folder / "gateway.db", web_port)

    probe = Probe()
    online = threading.Event()
    status_topic = f"facility/{site}/gateways/gw-bench/status"

    def received(message: paho.MQTTMessage, now: int) -> None:
        if message.topic == status_topic:
            if message.payload == b"online":
                online.set()
            return
        if not message.payload:
            return
        body = json.loads(message.payload)
        if body.get("state") != "open":
            return
        sent = probe.sent.get(body.get("event_id"))
        if sent is None:
            probe.unmatched += 1
        else:
            probe.arrived(body["event_id"], sent, now)

    def call(i: int, now: int) -> tuple[str, str, bytes]:
        key = f"{tag}-{i}"
        device = f"call-{i:05d}"
        payload = {"id": key, "type": "call", "device": device, "ts": time.time()}
        topic = f"facility/{site}/devices/{device}/events"
        return key, topic, json.dumps(payload).encode()

    with contextlib.ExitStack() as stack:
        subscriber = connect(broker, "bench", received)
        stack.callback(close_client, subscriber)
        subscribe(subscriber, [status_topic, f"facility/{site}/alerts/+"])

        started = time.monotonic()
        process = stack.enter_context(
            gateway_process(folder, site_file, environ, log_level)
        )
        wait_online(process, online, folder)
        before = wait_settled(web_port) or {}
        ready_s = time.monotonic() - started

        publisher = connect(broker, "bench")
        stack.callback(close_client, publisher)

        window = CpuWindow(process.pid)
        pacing = publish_paced(publisher, rate, duration, call, probe)
        probe.wait_all(grace)
        cpu = window.close()

        # Read once the run is over: healthz is served from another thread.
        health = healthz(web_port)
        stop_process(process)
        if process.returncode != 0:
            log.warning(
                "gateway exited with status %s:\n%s",
                process.returncode,
                log_tail(folder),
            )

    counters = gateway_counters(health, before, cpu, process.returncode, ready_s)
    counters["log_problems"] = log_problems(folder)
    return {
        "stats": summarize(probe),
        "pacing": pacing,
        "cpu": cpu,
        "gateway": counters,
    }


def gateway_counters(
    health: dict[str, Any] | None,
    before: dict[str, Any],
    cpu: dict[str, float | None],
    exit_code: int | None,
    ready_s: float,
) -> dict[str, Any]:
    health = health or {}
    accepted = health.get("events_accepted")
    commits = health.get("commits")
    if commits is not None:
        # Start-up commits nothing on an empty database; subtract in case.
        commits -= before.get("commits", 0)
    cores = cpu["gateway_cores"]
    return {
        "events_accepted": accepted,
        "commits": commits,
        "events_per_commit": round(accepted / commits, 2) if commits else None,
        "messages_rejected": health.get("messages_rejected"),
        "cpu_s": None if cores is None else round(cores * cpu["wall_s"], 2),
        "startup_s": round(ready_s, 2),
        "exit_code": exit_code,
    }


# -- the whole run ------------------------------------------------------------------


def machine_info(workdir: Path) -> dict[str, Any]:
    result = subprocess.run(
        ["mosquitto", "-h"], capture_output=True, text=True, check=False
    )
    banner = (result.stdout or result.stderr).splitlines()
    return {
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "mosquitto": banner[0].strip() if banner else "unknown",
        "paho_mqtt": importlib.metadata.version("paho-mqtt"),
        "sqlite": sqlite3.sqlite_version,
        "database_filesystem": filesystem_of(workdir),
        "code": code_version(),
        "load_average_at_start": list(os.getloadavg()),
    }


def code_version() -> dict[str, Any]:
    """The commit measured, and which of the gateway's files differed from it."""

    def git(*args: str) -> str:
        result = subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, check=False
        )
        return result.stdout

    # Porcelain lines are "XY path": the status letters may start with a space.
    changed = git(
        "status", "--porcelain", "--", "main.py", "gateway", "rules", "drivers"
    )
    return {
        "commit": git("rev-parse", "HEAD").strip() or None,
        "uncommitted": [line[3:] for line in changed.splitlines()],
    }


def filesystem_of(path: Path) -> str | None:
    """The mount type holding ``path``: tmpfs makes fsync free and the bench lie."""
    best, kind = "", None
    resolved = str(path.resolve())
    with contextlib.suppress(OSError), open("/proc/mounts") as mounts:
        for line in mounts:
            parts = line.split()
            mount = parts[1]
            inside = resolved == mount or resolved.startswith(mount.rstrip("/") + "/")
            if inside and len(mount) >= len(best):
                best, kind = mount, parts[2]
    return kind


def run_all(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Every repeat of every rate, floor then gateway, on one private broker."""
    info = machine_info(workdir)
    broker = PrivateBroker(workdir / "broker", users=("gateway", "bench"))
    runs: list[dict[str, Any]] = []
    broker.start()
    try:
        for repeat in range(1, args.repeat + 1):
            for rate in args.rates:
                runs.extend(measure_pair(args, broker, workdir, rate, repeat))
    finally:
        broker.stop()
    info["load_average_at_end"] = list(os.getloadavg())
    return {"machine": info, "runs": runs}


def measure_pair(
    args: argparse.Namespace,
    broker: PrivateBroker,
    workdir: Path,
    rate: float,
    repeat: int,
) -> list[dict[str, Any]]:
    tag = f"r{rate:g}-{repeat}"
    floor = measure_floor(broker, rate, args.duration, args.grace, tag)
    report("floor", rate, repeat, floor)
    gateway = measure_gateway(
        broker,
        rate,
        args.duration,
        args.grace,
        tag,
        workdir,
        args.gateway_log_level,
    )
    report("gateway", rate, repeat, gateway)
    return [
        {"kind": "floor", "rate": rate, "repeat": repeat} | floor,
        {"kind": "gateway", "rate": rate, "repeat": repeat} | gateway,
    ]


def report(kind: str, rate: float, repeat: int, run: dict[str, Any]) -> None:
    stats = run["stats"]
    extra = ""
    if "gateway" in run:
        g = run["gateway"]
        extra = f" commits={g['commits']} accepted={g['events_accepted']}"
    log.info(
        "repeat %d %-7s %6g/s  n=%d lost=%d p50=%s p99=%s max=%s ms lag=%sms "
        "others=%s cores%s",
        repeat,
        kind,
        rate,
        stats["received"],
        stats["lost"],
        stats.get("p50_ms"),
        stats.get("p99_ms"),
        stats.get("max_ms"),
        run["pacing"]["worst_send_lag_ms"],
        run["cpu"]["others_cores"],
        extra,
    )


def aggregate(runs: list[dict[str, Any]], rates: list[float]) -> list[dict[str, Any]]:
    """Median and min..max across repeats of each statistic, per (kind, rate)."""
    summary = []
    for rate in rates:
        for kind in ("floor", "gateway"):
            chosen = [r for r in runs if r["kind"] == kind and r["rate"] == rate]
            row: dict[str, Any] = {"kind": kind, "rate": rate, "repeats": len(chosen)}
            row["sent"] = chosen[0]["stats"]["sent"] if chosen else 0
            row["median"], row["spread"] = {}, {}
            keys = (*STATS, "commits", "events_per_commit", "cpu_s", "others_cores")
            for key in keys:
                values = [v for r in chosen if (v := value_of(r, key)) is not None]
                if values:
                    row["median"][key] = statistics.median(values)
                    row["spread"][key] = [min(values), max(values)]
            summary.append(row)
    return summary


def value_of(run: dict[str, Any], key: str) -> float | None:
    for part in ("stats", "gateway", "cpu"):
        if key in run.get(part, {}):
            return run[part][key]
    return None


def ratios(summary: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Gateway median over floor median, per rate and statistic."""
    found: dict[str, dict[str, float]] = {}
    for row in summary:
        if row["kind"] != "gateway":
            continue
        floor = next(
            r for r in summary if r["kind"] == "floor" and r["rate"] == row["rate"]
        )
        found[f"{row['rate']:g}"] = {
            key: round(row["median"][key] / floor["median"][key], 1)
            for key in ("p50_ms", "p99_ms", "p999_ms", "max_ms")
            if row["median"].get(key) and floor["median"].get(key)
        }
    return found


# -- output ----------------------------------------------------------------------


def cell(row: dict[str, Any], key: str, digits: int = 2) -> str:
    if key not in row["median"]:
        return "n/a"
    low, high = row["spread"][key]
    median = row["median"][key]
    if low == high:
        return f"{median:.{digits}f}"
    return f"{median:.{digits}f} ({low:.{digits}f}–{high:.{digits}f})"


def markdown(results: dict[str, Any]) -> str:
    summary = results["summary"]
    ratio = results["ratios"]
    repeats = results["parameters"]["repeat"]
    lines = [
        f"Median of {repeats} repeat(s), (min–max) across repeats; "
        "latency in milliseconds.",
        "",
        "| rate/s | path | calls | lost | p50 | p99 | p99.9 | max |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in summary:
        path = "broker floor" if row["kind"] == "floor" else "gateway"
        lines.append(
            f"| {row['rate']:g} | {path} | {row['sent']} | {cell(row, 'lost', 0)} "
            f"| {cell(row, 'p50_ms')} | {cell(row, 'p99_ms')} "
            f"| {cell(row, 'p999_ms')} | {cell(row, 'max_ms')} |"
        )
        if row["kind"] == "gateway":
            r = ratio.get(f"{row['rate']:g}", {})
            times = [f"×{r[k]:g}" if k in r else "n/a" for k in STATS[:4]]
            lines.append(
                f"| {row['rate']:g} | gateway / floor | | | {' | '.join(times)} |"
            )

    lines += [
        "",
        "| rate/s | repeat | events accepted | SQLite commits | events per commit "
        "| gateway CPU s | other CPU, cores | log warnings |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in results["runs"]:
        if run["kind"] != "gateway":
            continue
        g = run["gateway"]
        lines.append(
            f"| {run['rate']:g} | {run['repeat']} | {g['events_accepted']} "
            f"| {g['commits']} | {g['events_per_commit']} | {g['cpu_s']} "
            f"| {run['cpu']['others_cores']} | {g['log_problems']['count']} |"
        )
    return "\n".join(lines)


def write_json(path: Path, results: dict[str, Any]) -> None:
    # Write then rename, so an interrupted run never leaves half a file.
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(json.dumps(results, indent=2) + "\n")
    partial.replace(path)


@contextlib.contextmanager
def work_folder(chosen: Path | None) -> Iterator[Path]:
    if chosen is not None:
        chosen.mkdir(parents=True, exist_ok=True)
        yield chosen
        return
    with tempfile.TemporaryDirectory(prefix="gateway-latency-") as folder:
        yield Path(folder)


def _terminate(signum: int, frame: object) -> None:
    # SIGTERM takes the same way out as Ctrl-C, so every finally runs.
    raise KeyboardInterrupt


def stop_cleanly_on_signals() -> None:
    """Ctrl-C and SIGTERM both raise KeyboardInterrupt, so brokers and peers stop.

    Both are set explicitly: a shell starting us in the background ignores
    SIGINT, and then Python would never raise KeyboardInterrupt.
    """
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _terminate)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S"
    )
    stop_cleanly_on_signals()

    per_pair = 2 * (args.duration + 4)
    log.info(
        "%d rate(s) x %d repeat(s), %gs each path: about %.0fs",
        len(args.rates),
        args.repeat,
        args.duration,
        per_pair * len(args.rates) * args.repeat,
    )
    began = time.monotonic()
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    try:
        with work_folder(args.workdir) as workdir:
            measured = run_all(args, workdir)
    except KeyboardInterrupt:
        log.error("interrupted; every process this run started has been stopped")
        return 130
    except BenchError as exc:
        log.error("%s", exc)
        return 1

    results = {
        "started_at": started_at,
        "wall_s": round(time.monotonic() - began, 1),
        "machine": measured["machine"],
        "parameters": {
            "rates": args.rates,
            "duration_s": args.duration,
            "repeat": args.repeat,
            "grace_s": args.grace,
            "qos": QOS,
            "gateway_log_level": args.gateway_log_level,
            "clock": "time.monotonic_ns, same host",
        },
        "runs": measured["runs"],
    }
    results["summary"] = aggregate(results["runs"], args.rates)
    results["ratios"] = ratios(results["summary"])
    write_json(args.out, results)

    print(markdown(results))
    log.info("wrote %s in %.0fs", args.out, results["wall_s"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
