"""The gateway beside Node-RED and beside the broker alone, in one run on one machine.

A facility choosing how to raise call alerts would most likely reach for
Node-RED: an MQTT-in node, a function node and a trigger node do the job in an
afternoon. This bench runs that flow (``bench/nodered/flows.json``, written by
this script) and the real gateway (``python main.py run``) against the same
private Mosquitto, with the same load, and measures:

* **latency tiers**: at 100, 1,000 and 5,000 calls/s, every call cancelled
  ``--cancel-after`` seconds later (so a button is pressed again later and
  open alerts stay bounded): p50, p99, p99.9 and max from a call's publish to
  its ``open`` alert reaching a display, losses, and the same for cancels;
  the **broker floor** is the same load published straight to a subscriber;
* **sustained rate**: the highest calls/s with p99 under 50 ms and nothing
  lost, found by doubling then bisecting;
* **open calls**: 10,000 calls open together with a short escalation delay,
  half of them cancelled half-way: escalation lateness, missed escalations and
  wrong ones (an alert escalated although its cancel was sent in time);
* **peak resident memory** (``VmHWM``) and **CPU seconds** of each peer.

Node-RED has no durable commit: its alert book lives in memory and is gone on
a restart. The gateway commits every transition to SQLite with
``synchronous=FULL`` before publishing it. The bench reports both as they are.

Every measurement uses a fresh peer process (and a fresh database) and is
repeated ``--repeats`` times; the tables give medians across repeats.

Run from the repository root::

    .venv/bin/python bench/versus.py --rates 100,1000,5000 --repeats 3
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import math
import multiprocessing
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    # Run as ``python bench/versus.py``: the gateway is not an installed package.
    sys.path.insert(0, str(REPO))

from bench import latency  # noqa: E402
from gateway.broker import PrivateBroker, free_port  # noqa: E402

log = logging.getLogger("bench.versus")

NODE_RED_VERSION = "4.1.15"
"""Newest 4.x. Node-RED 5 needs Node.js 22.9 or newer; Debian 12 ships 18/20."""

NODERED_SOURCE = REPO / "bench" / "nodered"
"""Kept in the repository: package.json and its lock, settings.js, flows.json."""

NODERED_INSTALL = REPO / "bench" / ".node-red"
"""Scratch folder (git-ignored) that ``npm ci`` installs Node-RED into."""

BROKER_ID = "b0a7c0de00000001"
"""Node id of the flow's mqtt-broker config node, named in its credentials file."""

P99_LIMIT_MS = 50.0
"""A rate is sustained while p99 of opens and of cancels stays under this."""

READY_TIMEOUT = 60.0
"""Seconds for a peer to load, connect and answer a probe call."""

LEAD_S = 0.3
"""The schedule starts this long after the load processes are told to go."""

CALLS_PER_LOAD_PROCESS = 2500
"""Calls/s one load process is given (plus as many cancels): at 5,000
messages/s a paho publisher still keeps its schedule on this machine."""

PEERS = ("floor", "gateway", "nodered", "nodered-nodelay")
"""Peers of the latency tiers; the search and the open calls use gateway and nodered."""
SHORT = {"floor": "f", "gateway": "g", "nodered": "n", "nodered-nodelay": "d"}
LATENCY_KEYS = ("p50_ms", "p99_ms", "p999_ms", "max_ms")
LABEL = {
    "floor": "broker floor",
    "gateway": "gateway",
    "nodered": "Node-RED",
    "nodered-nodelay": "Node-RED, TCP_NODELAY",
}


class BenchError(RuntimeError):
    """A measurement could not be made; the message says what to do."""


# -- command line ----------------------------------------------------------------------


def rate_list(text: str) -> list[float]:
    try:
        rates = [float(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from exc
    if not rates or any(rate <= 0 for rate in rates):
        raise argparse.ArgumentTypeError("rates must be positive, e.g. 100,1000,5000")
    return rates


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/versus.py",
        description="Measure the gateway beside Node-RED and beside the broker "
        "alone: latency, sustained rate, escalations with 10,000 open calls, "
        "memory and CPU.",
    )
    add = parser.add_argument
    add(
        "--rates",
        type=rate_list,
        default=[100.0, 1000.0, 5000.0],
        help="calls/s of the latency tiers, comma-separated (default: 100,1000,5000)",
    )
    add(
        "--repeats",
        type=int,
        default=3,
        help="repeats of every measurement; medians are reported (default: 3)",
    )
    add(
        "--duration",
        type=float,
        default=10.0,
        help="seconds of calls per latency tier (default: 10)",
    )
    add(
        "--cancel-after",
        type=float,
        default=1.0,
        help="seconds from a call to its cancel in the tiers and the search "
        "(default: 1)",
    )
    add(
        "--grace",
        type=float,
        default=10.0,
        help="seconds after the last send before a missing alert is lost (default: 10)",
    )
    add(
        "--search-start",
        type=float,
        default=500.0,
        help="first rate of the sustained-rate search (default: 500)",
    )
    add(
        "--search-max",
        type=float,
        default=16000.0,
        help="highest rate the search tries (default: 16000)",
    )
    add(
        "--search-duration",
        type=float,
        default=10.0,
        help="seconds of calls per search step (default: 10)",
    )
    add(
        "--search-precision",
        type=float,
        default=1.1,
        help="stop bisecting when the failing rate is within this factor of the "
        "passing one (default: 1.1)",
    )
    add(
        "--open-calls",
        type=int,
        default=10000,
        help="calls open together in the escalation test (default: 10000)",
    )
    add(
        "--open-spread",
        type=float,
        default=4.0,
        help="seconds over which those calls are made (default: 4)",
    )
    add(
        "--escalate-after",
        type=float,
        default=10.0,
        help="escalation delay T of the escalation test, seconds (default: 10)",
    )
    add(
        "--load-processes",
        type=int,
        default=0,
        help="publishing processes; 0 picks one per 2,500 calls/s (default: 0)",
    )
    add(
        "--skip",
        default="",
        help="parts to leave out, comma-separated: tiers, search, open",
    )
    add(
        "--peers",
        default=",".join(PEERS),
        help="what to measure, comma-separated (default: all of "
        f"{','.join(PEERS)}); the search and open calls use gateway and nodered",
    )
    add(
        "--out",
        type=Path,
        help="JSON results (default: bench/results/versus-<date>.json)",
    )
    add(
        "--workdir",
        type=Path,
        help="keep sites, databases, Node-RED folders and logs here",
    )
    add(
        "--readme",
        action="store_true",
        help="also write the table between the versus markers in README.md",
    )
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.duration <= 0 or args.escalate_after <= 0:
        parser.error("--repeats, --duration and --escalate-after must be positive")
    if args.open_spread >= args.escalate_after / 2:
        parser.error(
            "--open-spread must be under half of --escalate-after, so "
            "every call is open before the first cancel"
        )
    args.skip = {part.strip() for part in args.skip.split(",") if part.strip()}
    args.peers = [part.strip() for part in args.peers.split(",") if part.strip()]
    if unknown := set(args.peers) - set(PEERS):
        parser.error(f"unknown peers {sorted(unknown)}; choose from {PEERS}")
    return args


# -- Node-RED: install, flow, process --------------------------------------------------


def ensure_node_red() -> Path:
    """Install the pinned Node-RED into the scratch folder unless it is there."""
    red = NODERED_INSTALL / "node_modules" / "node-red" / "red.js"
    installed = NODERED_INSTALL / "node_modules" / "node-red" / "package.json"
    if (
        red.exists()
        and json.loads(installed.read_text())["version"] == NODE_RED_VERSION
    ):
        return red
    if shutil.which("node") is None or shutil.which("npm") is None:
        raise BenchError(
            "Node.js and npm are needed to run Node-RED. Install them with "
            "'sudo apt-get install -y nodejs npm', then run the bench again."
        )
    NODERED_INSTALL.mkdir(parents=True, exist_ok=True)
    for name in ("package.json", "package-lock.json"):
        shutil.copy(NODERED_SOURCE / name, NODERED_INSTALL / name)
    log.info(
        "installing node-red %s into %s (npm ci)", NODE_RED_VERSION, NODERED_INSTALL
    )
    result = subprocess.run(
        ["npm", "ci", "--omit=dev", "--no-audit", "--no-fund"],
        cwd=NODERED_INSTALL,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0 or not red.exists():
        raise BenchError(
            f"npm could not install node-red {NODE_RED_VERSION}:\n"
            + result.stderr[-2000:]
        )
    return red


ALERT_BOOK_JS = """\
// One open alert per device, as the gateway keeps it: a second call while
// one is open opens nothing. The book lives in flow context, in memory only.
const parts = msg.topic.split("/");
const site = parts[1];
const device = parts[3];
const event = msg.payload;
if (event === null || typeof event !== "object" || typeof event.id !== "string"
        || event.device !== device) {
    node.warn(`rejected a malformed event on ${msg.topic}`);
    return null;
}
const open = flow.get("open");
const now = Date.now() / 1000;
const topic = `facility/${site}/alerts/`;
const state = (alert) => ({topic: topic + alert.id, payload: JSON.stringify(alert),
    retain: true});
const page = (alert, target, reason) => ({
    topic: `facility/${site}/pagers/${target}`,
    payload: JSON.stringify({id: `${alert.id}:${alert.version}:${target}`,
        alert: alert.id, target, reason, state: alert.state, level: alert.level,
        device}),
    retain: false,
});
if (event.type === "call") {
    const current = open.get(device);
    if (current) {
        current.repeats += 1;
        return null;
    }
    const alert = {id: `nr-${event.id}`, state: "open", level: 1, device, site,
        event_id: event.id, opened_at: now, updated_at: now, version: 1, repeats: 0};
    open.set(device, alert);
    return [[state(alert), page(alert, "nurse-1", "opened")],
            {topic: alert.id, device, alert_id: alert.id}];
}
if (event.type === "cancel") {
    const alert = open.get(device);
    if (!alert) {
        return null;
    }
    open.delete(device);
    Object.assign(alert, {state: "resolved", resolved_at: now, updated_at: now,
        resolved_via: "station", version: alert.version + 1});
    // The final state for displays, then the retained copy cleared, then pagers.
    return [[state(alert), {topic: topic + alert.id, payload: "", retain: true},
             page(alert, "nurse-1", "resolved")],
            {topic: alert.id, reset: true}];
}
return null;
"""

ESCALATE_JS = """\
// The trigger fired: escalate if the alert is still the open one of its device.
const open = flow.get("open");
const alert = open.get(msg.device);
if (!alert || alert.id !== msg.alert_id || alert.state !== "open") {
    return null;
}
const now = Date.now() / 1000;
Object.assign(alert, {state: "escalated", level: 2, updated_at: now,
    version: alert.version + 1});
const target = "charge-1";
return [[
    {topic: `facility/${alert.site}/alerts/${alert.id}`, payload: JSON.stringify(alert),
     retain: true},
    {topic: `facility/${alert.site}/pagers/${target}`, retain: false,
     payload: JSON.stringify({id: `${alert.id}:${alert.version}:${target}`,
        alert: alert.id, target, reason: "escalated", state: alert.state, level: 2,
        device: alert.device})},
]];
"""


def flow_document() -> list[dict[str, Any]]:
    """The Node-RED flow: MQTT in, alert book, trigger (escalation), MQTT out."""
    tab = "f1a90000000000a1"
    ids = {
        name: f"f1a9000000000{n:03d}"
        for n, name in enumerate(("in", "book", "trigger", "escalate", "out"), start=1)
    }
    common = {"z": tab}
    return [
        {
            "id": tab,
            "type": "tab",
            "label": "Call alerts",
            "disabled": False,
            "info": "A call opens an alert; a cancel from the same device resolves "
            "it; after NR_ESCALATE_AFTER_MS unanswered it escalates.",
        },
        {
            "id": BROKER_ID,
            "type": "mqtt-broker",
            "name": "local mosquitto",
            "broker": "${NR_MQTT_HOST}",
            "port": "${NR_MQTT_PORT}",
            "clientid": "",
            "autoConnect": True,
            "usetls": False,
            "protocolVersion": "4",
            "keepalive": "60",
            "cleansession": True,
            "autoUnsubscribe": True,
            "birthTopic": "",
            "closeTopic": "",
            "willTopic": "",
        },
        {
            "id": ids["in"],
            "type": "mqtt in",
            **common,
            "name": "device events",
            "topic": "facility/+/devices/+/events",
            "qos": "1",
            "datatype": "json",
            "broker": BROKER_ID,
            "nl": False,
            "rap": True,
            "rh": 0,
            "inputs": 0,
            "x": 140,
            "y": 100,
            "wires": [[ids["book"]]],
        },
        {
            "id": ids["book"],
            "type": "function",
            **common,
            "name": "alert book",
            "func": ALERT_BOOK_JS,
            "outputs": 2,
            "timeout": 0,
            "noerr": 0,
            "initialize": 'flow.set("open", new Map());\n',
            "finalize": "",
            "libs": [],
            "x": 340,
            "y": 100,
            "wires": [[ids["out"]], [ids["trigger"]]],
        },
        {
            "id": ids["trigger"],
            "type": "trigger",
            **common,
            "name": "escalate after T unless reset",
            "op1": "",
            "op2": "",
            "op1type": "nul",
            "op2type": "payl",
            "duration": "${NR_ESCALATE_AFTER_MS}",
            "extend": False,
            "overrideDelay": False,
            "units": "ms",
            "reset": "",
            "bytopic": "topic",
            "topic": "topic",
            "outputs": 1,
            "x": 560,
            "y": 160,
            "wires": [[ids["escalate"]]],
        },
        {
            "id": ids["escalate"],
            "type": "function",
            **common,
            "name": "escalate",
            "func": ESCALATE_JS,
            "outputs": 1,
            "timeout": 0,
            "noerr": 0,
            "initialize": "",
            "finalize": "",
            "libs": [],
            "x": 780,
            "y": 160,
            "wires": [[ids["out"]]],
        },
        {
            "id": ids["out"],
            "type": "mqtt out",
            **common,
            "name": "alerts and pagers",
            "topic": "",
            "qos": "1",
            "retain": "",
            "broker": BROKER_ID,
            "x": 800,
            "y": 100,
            "wires": [],
        },
    ]


def write_flow() -> Path:
    """(Re)write bench/nodered/flows.json, so the repository shows what ran."""
    path = NODERED_SOURCE / "flows.json"
    text = json.dumps(flow_document(), indent=4) + "\n"
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    return path


# -- the peers -------------------------------------------------------------------------


def proc_status(pid: int) -> dict[str, int]:
    """Peak and current resident memory of a process, in KiB (Linux /proc)."""
    found: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                found[key] = int(value.split()[0])
    return found


@dataclass
class Peer:
    """A running gateway or Node-RED, or nothing for the broker floor."""

    kind: str
    folder: Path
    process: subprocess.Popen[bytes] | None = None
    web_port: int | None = None
    started: float = field(default_factory=time.monotonic)
    ready_s: float | None = None
    cpu_at_go: float | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise BenchError(
                f"{LABEL[self.kind]} exited with status {self.process.returncode}; "
                f"see {self.folder / 'peer.log'}:\n{log_tail(self.folder)}"
            )

    def mark_go(self) -> None:
        self.cpu_at_go = latency.cpu_seconds(self.pid) if self.pid else None

    def usage(self) -> dict[str, Any]:
        """Memory and CPU now; call while the process still runs."""
        if self.pid is None:
            return {}
        status = proc_status(self.pid)
        cpu = latency.cpu_seconds(self.pid)
        counters: dict[str, Any] = {
            "peak_rss_mb": round(status.get("VmHWM", 0) / 1024, 1),
            "rss_mb": round(status.get("VmRSS", 0) / 1024, 1),
            "cpu_s_total": None if cpu is None else round(cpu, 2),
            "cpu_s_run": None
            if cpu is None or self.cpu_at_go is None
            else round(cpu - self.cpu_at_go, 2),
            "ready_s": None if self.ready_s is None else round(self.ready_s, 2),
        }
        if self.kind == "gateway" and self.web_port:
            health = latency.healthz(self.web_port) or {}
            counters["events_accepted"] = health.get("events_accepted")
            counters["commits"] = health.get("commits")
            counters["messages_rejected"] = health.get("messages_rejected")
        return counters

    def stop(self) -> dict[str, Any]:
        if self.process is None:
            return {}
        stop_process(self.process)
        return {
            "exit_code": self.process.returncode,
            "log_problems": log_problems(self),
        }


def stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        log.warning("pid %d ignored SIGTERM for 15 s; killing it", process.pid)
        process.kill()
        process.wait()


def log_tail(folder: Path, lines: int = 20) -> str:
    path = folder / "peer.log"
    text = path.read_text(errors="replace") if path.exists() else "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def log_problems(peer: Peer, keep: int = 5) -> dict[str, Any]:
    """Warning and error lines of a peer's log: a clean run has none."""
    path = peer.folder / "peer.log"
    text = path.read_text(errors="replace") if path.exists() else ""
    marks = (
        ("[warn]", "[error]")
        if peer.kind.startswith("nodered")
        else (" WARNING ", " ERROR ", " CRITICAL ")
    )
    found = [line for line in text.splitlines() if any(m in line for m in marks)]
    return {"count": len(found), "first": found[:keep]}


def gateway_site(path: Path, site: str, devices: int, escalate_after: float) -> None:
    """A site whose call buttons are ``call-00000``.. plus one ``probe`` button."""
    rooms = [f"room-{n:03d}" for n in range(50)]
    ids = [f"call-{i:05d}" for i in range(devices)] + ["probe"]
    document = {
        "site": {"id": site, "name": "Versus bench"},
        "gateway": {"id": "gw-bench"},
        "zones": [{"id": "bench", "rooms": [{"id": room} for room in rooms]}],
        "devices": [
            {"id": device, "kind": "call_button", "room": rooms[n % 50]}
            for n, device in enumerate(ids)
        ],
        "staff": [
            {"id": "nurse-1", "name": "Nurse One", "roles": ["nurse"]},
            {"id": "charge-1", "name": "Charge One", "roles": ["charge_nurse"]},
        ],
        "rules": [
            {
                "name": "patient-call",
                "devices": {"kind": "call_button"},
                "levels": [
                    {"after": "0s", "roles": ["nurse"]},
                    {
                        "after": f"{round(escalate_after * 1000)}ms",
                        "roles": ["charge_nurse"],
                    },
                ],
            }
        ],
    }
    path.write_text(yaml.safe_dump(document, sort_keys=False))


def start_gateway(
    broker: PrivateBroker, folder: Path, site: str, devices: int, escalate_after: float
) -> Peer:
    site_file = folder / "site.yaml"
    gateway_site(site_file, site, devices, escalate_after)
    peer = Peer("gateway", folder, web_port=free_port())
    environ = latency.gateway_environ(broker, folder / "gateway.db", peer.web_port)
    with (folder / "peer.log").open("wb") as log_file:
        peer.process = subprocess.Popen(
            [
                sys.executable,
                "main.py",
                "--log-level",
                "INFO",
                "run",
                "--config",
                str(site_file),
            ],
            cwd=REPO,
            env=environ,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return peer


def start_nodered(
    broker: PrivateBroker,
    folder: Path,
    red: Path,
    escalate_after: float,
    *,
    nodelay: bool = False,
) -> Peer:
    user_dir = folder / "userdir"
    user_dir.mkdir()
    shutil.copy(write_flow(), user_dir / "flows.json")
    # Placeholders only: Node-RED fills credentials from the environment.
    credentials = {
        BROKER_ID: {"user": "${NR_MQTT_USER}", "password": "${NR_MQTT_PASSWORD}"}
    }
    (user_dir / "flows_cred.json").write_text(json.dumps(credentials))
    environ = dict(os.environ)
    environ.update(
        NR_PORT=str(free_port()),
        NR_MQTT_HOST=broker.host,
        NR_MQTT_PORT=str(broker.port),
        NR_MQTT_USER="nodered",
        NR_MQTT_PASSWORD=broker.passwords["nodered"],
        NR_ESCALATE_AFTER_MS=str(round(escalate_after * 1000)),
    )
    if nodelay:
        preload = f"--require {NODERED_SOURCE / 'nodelay.js'}"
        environ["NODE_OPTIONS"] = f"{environ.get('NODE_OPTIONS', '')} {preload}".strip()
    peer = Peer("nodered-nodelay" if nodelay else "nodered", folder)
    with (folder / "peer.log").open("wb") as log_file:
        # node itself, not a wrapper script, so the pid is Node-RED's.
        peer.process = subprocess.Popen(
            [
                "node",
                str(red),
                "--settings",
                str(NODERED_SOURCE / "settings.js"),
                "--userDir",
                str(user_dir),
            ],
            cwd=folder,
            env=environ,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return peer


# -- receiving -------------------------------------------------------------------------


class Receiver:
    """A display: takes the time and keeps the raw message; parsing comes later."""

    def __init__(self, broker: PrivateBroker, topics: list[str]) -> None:
        self.messages: list[tuple[int, str, bytes]] = []
        self._client = latency.connect(broker, "bench", self._on_message)
        latency.subscribe(self._client, topics)

    def _on_message(self, message: Any, now: int) -> None:
        self.messages.append((now, message.topic, message.payload))

    def close(self) -> None:
        latency.close_client(self._client)


def wait_ready(peer: Peer, receiver: Receiver, publisher: Any, site: str) -> None:
    """Press the ``probe`` button until its alert shows up, then cancel it.

    This proves the whole path (subscription, rule, publish) is live before
    any measured call is sent, for both peers alike.
    """
    topic = f"facility/{site}/devices/probe/events"
    deadline = time.monotonic() + READY_TIMEOUT
    attempt = 0
    while time.monotonic() < deadline:
        peer.check_alive()
        attempt += 1
        publisher.publish(
            topic,
            json.dumps(
                {
                    "id": f"probe-{attempt}",
                    "type": "call",
                    "device": "probe",
                    "ts": time.time(),
                }
            ),
            qos=1,
        )
        until = time.monotonic() + 0.5
        while time.monotonic() < until:
            if any(b'"event_id":"probe-' in m[2] for m in receiver.messages[-50:]):
                publisher.publish(
                    topic,
                    json.dumps(
                        {
                            "id": "probe-cancel",
                            "type": "cancel",
                            "device": "probe",
                            "ts": time.time(),
                        }
                    ),
                    qos=1,
                )
                peer.ready_s = time.monotonic() - peer.started
                time.sleep(0.5)
                return
            time.sleep(0.02)
    raise BenchError(
        f"{LABEL[peer.kind]} did not answer a probe call in "
        f"{READY_TIMEOUT:g}s; see {peer.folder / 'peer.log'}"
    )


# -- the load --------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """Who is pressed when: calls at a fixed rate, some cancelled later."""

    site: str
    tag: str
    rate: float
    count: int
    devices: int
    cancel_after: float
    cancel_every: int
    """1: every call is cancelled; 2: every other call (even indices)."""
    escalate_after: float
    processes: int

    def device(self, i: int) -> str:
        return f"call-{i % self.devices:05d}"

    def cancelled(self, i: int) -> bool:
        return i % self.cancel_every == 0


def load_process(
    conn: Connection, broker: dict[str, Any], work: Workload, k: int
) -> None:
    """One publishing process: calls ``i ≡ k`` (mod processes) and their cancels.

    A device always belongs to one process, so its call and cancel reach the
    broker in order. A send that is late does not push the next one back.
    """
    logging.basicConfig(level=logging.WARNING)
    client = latency.connect(SimpleNamespace(**broker), "bench")
    interval = 1e9 / work.rate
    plan: list[tuple[int, int, int]] = []  # (offset ns, 0 call / 1 cancel, index)
    for i in range(k, work.count, work.processes):
        plan.append((round(i * interval), 0, i))
        if work.cancelled(i):
            plan.append((round(i * interval + work.cancel_after * 1e9), 1, i))
    plan.sort()
    base = f"facility/{work.site}/devices/"
    # Everything but the wall-clock "ts" is built before the clock starts.
    templates = [
        (
            f"{base}{work.device(i)}/events",
            f'{{"id":"{"x" if kind else ""}{work.tag}-{i}",'
            f'"type":"{("call", "cancel")[kind]}","device":"{work.device(i)}","ts":',
        )
        for _, kind, i in plan
    ]
    gc.collect()
    gc.freeze()
    conn.send("ready")
    start = conn.recv()
    # Reported back: once this process has exited, the bench's CPU window
    # can no longer see it and would count it as another program's load.
    cpu_at_start = time.process_time()

    sent = [0] * len(plan)
    worst = 0
    info = None
    for n, (offset, _, _) in enumerate(plan):
        due = start + offset
        ahead = due - time.monotonic_ns()
        if ahead > 0:
            time.sleep(ahead / 1e9)
        now = time.monotonic_ns()
        topic, head = templates[n]
        info = client.publish(topic, f"{head}{time.time():.3f}}}", qos=1)
        sent[n] = now
        worst = max(worst, now - due)
    if info is not None:
        info.wait_for_publish(30)
    conn.send(
        {
            "plan": [(kind, i) for _, kind, i in plan],
            "sent": sent,
            "worst_lag_ms": round(worst / 1e6, 3),
            "cpu_s": time.process_time() - cpu_at_start,
        }
    )
    latency.close_client(client)


class Load:
    """The publishing processes of one measurement, started and connected early."""

    def __init__(self, broker: PrivateBroker, work: Workload) -> None:
        context = multiprocessing.get_context("spawn")
        details = {
            "host": broker.host,
            "port": broker.port,
            "passwords": broker.passwords,
        }
        self.work = work
        self.pipes: list[Connection] = []
        self.processes = []
        for k in range(work.processes):
            parent, child = context.Pipe()
            process = context.Process(
                target=load_process, args=(child, details, work, k), daemon=True
            )
            process.start()
            self.pipes.append(parent)
            self.processes.append(process)
        for pipe in self.pipes:
            if not pipe.poll(60):
                raise BenchError("a load process did not start within 60 s")
            pipe.recv()

    def run(self) -> dict[str, Any]:
        """Go, wait for every send, return send times by call index."""
        start = time.monotonic_ns() + round(LEAD_S * 1e9)
        for pipe in self.pipes:
            pipe.send(start)
        calls: dict[int, int] = {}
        cancels: dict[int, int] = {}
        lags, part_cpu = [], []
        timeout = (
            LEAD_S + self.work.count / self.work.rate + self.work.cancel_after + 60
        )
        for pipe in self.pipes:
            if not pipe.poll(timeout):
                raise BenchError("a load process did not finish its schedule")
            part = pipe.recv()
            for (kind, i), sent in zip(part["plan"], part["sent"], strict=True):
                (cancels if kind else calls)[i] = sent
            lags.append(part["worst_lag_ms"])
            part_cpu.append(part["cpu_s"])
        self.close()
        last_call = max(calls.values())
        return {
            "calls": calls,
            "cancels": cancels,
            "start": start,
            "worst_send_lag_ms": max(lags),
            "achieved_rate": round(
                len(calls) / ((last_call - start) / 1e9 + 1 / self.work.rate), 1
            ),
            "load_cpu_s": sum(part_cpu),
        }

    def close(self) -> None:
        for process in self.processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()


# -- matching what arrived to what was sent --------------------------------------------


@dataclass
class Tally:
    """What the display saw, per call index."""

    tag: str
    floor: bool
    opened: dict[int, int] = field(default_factory=dict)
    resolved: dict[int, int] = field(default_factory=dict)
    escalated: dict[int, int] = field(default_factory=dict)
    alert_of: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0
    unmatched: int = 0
    done: int = 0

    def feed(self, messages: list[tuple[int, str, bytes]]) -> None:
        for now, _topic, payload in messages[self.done :]:
            self.done += 1
            if payload:
                self._one(now, json.loads(payload))

    def _one(self, now: int, body: dict[str, Any]) -> None:
        if self.floor:
            key = body.get("id", "")
            target = self.resolved if key.startswith("x") else self.opened
            index = self._index(key.lstrip("x"))
        elif body.get("state") == "open":
            index = self._index(body.get("event_id") or "")
            if index is not None:
                self.alert_of[body["id"]] = index
            target = self.opened
        else:
            index = self.alert_of.get(body.get("id"))
            state = body.get("state")
            target = {"resolved": self.resolved, "escalated": self.escalated}.get(state)
            if target is None:
                return
        if index is None:
            self.unmatched += 1
        elif index in target:
            self.duplicates += 1
        else:
            target[index] = now

    def _index(self, key: str) -> int | None:
        tag, _, number = key.rpartition("-")
        return int(number) if tag == self.tag and number.isdigit() else None


def drain(
    receiver: Receiver,
    tally: Tally,
    sent: dict[str, Any],
    grace: float,
    escalations: int = 0,
) -> None:
    """Wait until every call is open, every cancel resolved and every due
    escalation seen, or until the grace is over."""
    deadline = time.monotonic() + grace
    wanted_open, wanted_resolved = len(sent["calls"]), len(sent["cancels"])
    while True:
        tally.feed(receiver.messages)
        complete = (
            len(tally.opened) >= wanted_open
            and len(tally.resolved) >= wanted_resolved
            and len(tally.escalated) >= escalations
        )
        if complete or time.monotonic() > deadline:
            return
        time.sleep(0.2)


def distribution(values: list[int]) -> dict[str, float | None]:
    values = sorted(values)
    if not values:
        return {"p50_ms": None, "p99_ms": None, "p999_ms": None, "max_ms": None}

    def ms(ns: float) -> float:
        return round(ns / 1e6, 3)

    enough = len(values) >= latency.MIN_SAMPLES_P999
    return {
        "p50_ms": ms(latency.percentile(values, 0.50)),
        "p99_ms": ms(latency.percentile(values, 0.99)),
        "p999_ms": ms(latency.percentile(values, 0.999)) if enough else None,
        "max_ms": ms(values[-1]),
    }


def latency_stats(tally: Tally, sent: dict[str, Any]) -> dict[str, Any]:
    calls, cancels = sent["calls"], sent["cancels"]
    opens = [tally.opened[i] - t for i, t in calls.items() if i in tally.opened]
    closes = [tally.resolved[i] - t for i, t in cancels.items() if i in tally.resolved]
    stats = {
        "calls": len(calls),
        "lost_opens": len(calls) - len(opens),
        "cancels": len(cancels),
        "lost_cancels": len(cancels) - len(closes),
        "duplicates": tally.duplicates,
        "unmatched": tally.unmatched,
        "open": distribution(opens),
        "cancel": distribution(closes),
    }
    stats["lost"] = stats["lost_opens"] + stats["lost_cancels"]
    return stats


def escalation_stats(
    tally: Tally, sent: dict[str, Any], work: Workload
) -> dict[str, Any]:
    """Lateness of due escalations; missed ones; wrong ones (cancelled in time)."""
    due_ns = round(work.escalate_after * 1e9)
    lateness, missed, wrong, early = [], 0, 0, 0
    for i, call in sent["calls"].items():
        cancel = sent["cancels"].get(i)
        escalated = tally.escalated.get(i)
        if cancel is not None and cancel < call + due_ns:
            wrong += escalated is not None
        elif escalated is None:
            missed += 1
        elif escalated < call + due_ns:
            early += 1
        else:
            lateness.append(escalated - call - due_ns)
    return {
        "due": sum(1 for i in sent["calls"] if i not in sent["cancels"]),
        "escalated": len(tally.escalated),
        "missed": missed,
        "wrong": wrong + early,
        "early": early,
        "lateness": distribution(lateness),
    }


# -- one measurement -------------------------------------------------------------------


@dataclass
class Context:
    args: argparse.Namespace
    broker: PrivateBroker
    workdir: Path
    red: Path | None
    runs: int = 0


def processes_for(args: argparse.Namespace, rate: float) -> int:
    if args.load_processes > 0:
        return args.load_processes
    return max(1, math.ceil(rate / CALLS_PER_LOAD_PROCESS))


def measure(
    ctx: Context,
    kind: str,
    work: Workload,
    *,
    escalation: bool = False,
    grace: float | None = None,
) -> dict[str, Any]:
    """One fresh peer (or none, for the floor), one load, one tally."""
    ctx.runs += 1
    folder = ctx.workdir / f"{ctx.runs:03d}-{kind}-{work.tag}"
    folder.mkdir(parents=True)
    base = f"facility/{work.site}"
    topics = [f"{base}/devices/+/events"] if kind == "floor" else [f"{base}/alerts/+"]
    with contextlib.ExitStack() as stack:
        receiver = Receiver(ctx.broker, topics)
        stack.callback(receiver.close)
        load = Load(ctx.broker, work)
        stack.callback(load.close)
        peer = start_peer(ctx, kind, folder, work)
        stack.callback(peer.stop)
        if peer.process is not None:
            publisher = latency.connect(ctx.broker, "bench")
            try:
                wait_ready(peer, receiver, publisher, work.site)
            finally:
                latency.close_client(publisher)
            if peer.web_port:
                latency.wait_settled(peer.web_port)

        window = latency.CpuWindow(peer.pid)
        peer.mark_go()
        sent = load.run()
        tally = Tally(work.tag, floor=kind == "floor")
        if escalation:
            # Wait for the last escalation to fall due, then the grace.
            last_due = max(sent["calls"].values()) + work.escalate_after * 1e9
            time.sleep(max(0.0, (last_due - time.monotonic_ns()) / 1e9))
        due = sum(1 for i in sent["calls"] if i not in sent["cancels"])
        drain(
            receiver,
            tally,
            sent,
            ctx.args.grace if grace is None else grace,
            escalations=due if escalation else 0,
        )
        if escalation:
            # Wrong escalations may still be on their way; give them a moment.
            time.sleep(1.0)
            tally.feed(receiver.messages)
        cpu = window.close()
        load_cores = sent["load_cpu_s"] / cpu["wall_s"]
        cpu["load_cores"] = round(load_cores, 2)
        cpu["others_cores"] = round(max(0.0, cpu["others_cores"] - load_cores), 2)
        usage = peer.usage()
        peer.check_alive()
        stopped = peer.stop()
    result = {
        "kind": kind,
        "tag": work.tag,
        "rate": work.rate,
        "processes": work.processes,
        "pacing": {k: sent[k] for k in ("worst_send_lag_ms", "achieved_rate")},
        "stats": latency_stats(tally, sent),
        "cpu": cpu,
        "peer": usage | stopped,
    }
    if escalation:
        result["escalation"] = escalation_stats(tally, sent, work)
    return result


def start_peer(ctx: Context, kind: str, folder: Path, work: Workload) -> Peer:
    if kind == "gateway":
        return start_gateway(
            ctx.broker, folder, work.site, work.devices, work.escalate_after
        )
    if kind.startswith("nodered"):
        assert ctx.red is not None
        return start_nodered(
            ctx.broker,
            folder,
            ctx.red,
            work.escalate_after,
            nodelay=kind == "nodered-nodelay",
        )
    return Peer("floor", folder)


def tier_workload(
    args: argparse.Namespace, rate: float, duration: float, tag: str, processes: int
) -> Workload:
    count = max(1, round(rate * duration))
    # Enough buttons that each is cancelled well before it is pressed again.
    devices = min(count, math.ceil(rate * (args.cancel_after + 2)))
    devices = math.ceil(devices / processes) * processes
    return Workload(
        site=f"vs-{tag}",
        tag=tag,
        rate=rate,
        count=count,
        devices=devices,
        cancel_after=args.cancel_after,
        cancel_every=1,
        escalate_after=3600.0,
        processes=processes,
    )


def brief(kind: str, run: dict[str, Any]) -> str:
    s = run["stats"]
    extra = ""
    if "escalation" in run:
        e = run["escalation"]
        extra = (
            f" escalated={e['escalated']}/{e['due']} missed={e['missed']} "
            f"wrong={e['wrong']} late p99={e['lateness']['p99_ms']}"
        )
    return (
        f"{LABEL[kind]:<12} {run['rate']:>7g}/s lost={s['lost']} "
        f"p50={s['open']['p50_ms']} p99={s['open']['p99_ms']} "
        f"max={s['open']['max_ms']} cancel p99={s['cancel']['p99_ms']} "
        f"lag={run['pacing']['worst_send_lag_ms']}ms "
        f"rss={run['peer'].get('peak_rss_mb')}MB cpu={run['peer'].get('cpu_s_run')}s "
        f"others={run['cpu']['others_cores']}{extra}"
    )


# -- the three experiments -------------------------------------------------------------


def run_tiers(ctx: Context, repeat: int) -> list[dict[str, Any]]:
    runs = []
    for rate in ctx.args.rates:
        processes = processes_for(ctx.args, rate)
        for kind in [p for p in PEERS if p in ctx.args.peers]:
            tag = f"t{rate:g}r{repeat}{SHORT[kind]}"
            work = tier_workload(ctx.args, rate, ctx.args.duration, tag, processes)
            run = measure(ctx, kind, work)
            log.info("tier   repeat %d %s", repeat, brief(kind, run))
            runs.append(run | {"repeat": repeat})
    return runs


def sustained(run: dict[str, Any]) -> bool:
    s = run["stats"]
    return (
        s["lost"] == 0
        and s["open"]["p99_ms"] is not None
        and s["open"]["p99_ms"] < P99_LIMIT_MS
        and (s["cancels"] == 0 or s["cancel"]["p99_ms"] < P99_LIMIT_MS)
    )


def search_rate(ctx: Context, kind: str, repeat: int) -> dict[str, Any]:
    """Double from --search-start until a rate fails, then bisect."""
    args = ctx.args
    steps: list[dict[str, Any]] = []

    def attempt(rate: float) -> bool:
        rate = round(rate)
        tag = f"s{rate}r{repeat}{SHORT[kind]}"
        processes = processes_for(args, rate)
        work = tier_workload(args, rate, args.search_duration, tag, processes)
        run = measure(ctx, kind, work, grace=min(args.grace, 5.0))
        ok = sustained(run)
        log.info(
            "search repeat %d %s -> %s",
            repeat,
            brief(kind, run),
            "sustained" if ok else "not sustained",
        )
        steps.append(
            {
                "rate": rate,
                "sustained": ok,
                "stats": run["stats"],
                "pacing": run["pacing"],
                "peer": run["peer"],
                "cpu": run["cpu"],
            }
        )
        return ok

    low, high = 0.0, None
    rate = args.search_start
    while rate <= args.search_max:
        if not attempt(rate):
            high = rate
            break
        low, rate = rate, rate * 2
    if high is not None:
        if low == 0.0:
            # Even the first rate failed: halve down to find any sustained rate.
            rate = high / 2
            while rate >= 25 and not attempt(rate):
                high, rate = rate, rate / 2
            low = rate if rate >= 25 else 0.0
        while low and high / low > args.search_precision:
            middle = math.sqrt(low * high)
            if attempt(middle):
                low = middle
            else:
                high = middle
    return {
        "kind": kind,
        "repeat": repeat,
        "sustained_rate": round(low),
        "first_failing_rate": None if high is None else round(high),
        "steps": steps,
    }


def run_open_calls(ctx: Context, kind: str, repeat: int) -> dict[str, Any]:
    """N calls within --open-spread s, half cancelled at T/2, escalation at T."""
    args = ctx.args
    rate = args.open_calls / args.open_spread
    processes = processes_for(args, rate)
    tag = f"o{repeat}{SHORT[kind]}"
    devices = math.ceil(args.open_calls / processes) * processes
    work = Workload(
        site=f"vs-{tag}",
        tag=tag,
        rate=rate,
        count=args.open_calls,
        devices=devices,
        cancel_after=args.escalate_after / 2,
        cancel_every=2,
        escalate_after=args.escalate_after,
        processes=processes,
    )
    run = measure(ctx, kind, work, escalation=True)
    log.info("open   repeat %d %s", repeat, brief(kind, run))
    return run | {"repeat": repeat}


# -- medians, ratios, targets ----------------------------------------------------------


def median_spread(values: list[float | None]) -> dict[str, Any] | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def pick(run: dict[str, Any], path: str) -> Any:
    value: Any = run
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


TIER_KEYS = (
    "stats.open.p50_ms",
    "stats.open.p99_ms",
    "stats.open.p999_ms",
    "stats.open.max_ms",
    "stats.lost",
    "stats.cancel.p99_ms",
    "peer.peak_rss_mb",
    "peer.cpu_s_run",
    "cpu.others_cores",
    "pacing.worst_send_lag_ms",
)
OPEN_KEYS = (
    "escalation.lateness.p50_ms",
    "escalation.lateness.p99_ms",
    "escalation.lateness.max_ms",
    "escalation.missed",
    "escalation.wrong",
    "stats.lost",
    "peer.peak_rss_mb",
    "peer.cpu_s_run",
    "cpu.others_cores",
)


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Median and min..max across repeats of everything the tables show."""
    summary: dict[str, Any] = {"tiers": {}, "search": {}, "open": {}}
    for run_list, keys, into, by_rate in (
        (results["tiers"], TIER_KEYS, summary["tiers"], True),
        (results["open"], OPEN_KEYS, summary["open"], False),
    ):
        for run in run_list:
            name = f"{run['rate']:g}/{run['kind']}" if by_rate else run["kind"]
            into.setdefault(name, []).append(run)
        for name, runs in list(into.items()):
            into[name] = {
                key: median_spread([pick(r, key) for r in runs]) for key in keys
            }
            into[name]["repeats"] = len(runs)
    for found in results["search"]:
        summary["search"].setdefault(found["kind"], []).append(found["sustained_rate"])
    for kind, rates in list(summary["search"].items()):
        summary["search"][kind] = median_spread(rates) | {"repeats": rates}
    return summary


def med(table: dict[str, Any], name: str, key: str) -> float | None:
    entry = table.get(name, {}).get(key)
    return None if entry is None else entry["median"]


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(a / b, 2)


def ratios(summary: dict[str, Any], rates: list[float]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    tiers = summary["tiers"]
    for rate in rates:
        for key in ("p50_ms", "p99_ms", "p999_ms", "max_ms"):
            gw = med(tiers, f"{rate:g}/gateway", f"stats.open.{key}")
            for other in ("floor", "nodered", "nodered-nodelay"):
                mine = med(tiers, f"{rate:g}/{other}", f"stats.open.{key}")
                found.setdefault(f"{rate:g}", {}).setdefault(f"gateway/{other}", {})[
                    key
                ] = ratio(gw, mine)
    search = summary["search"]
    found["sustained gateway/nodered"] = ratio(
        (search.get("gateway") or {}).get("median"),
        (search.get("nodered") or {}).get("median"),
    )
    for where, table, name in (
        ("1000/s", tiers, "1000/"),
        ("open calls", summary["open"], ""),
    ):
        found[f"peak RSS gateway/nodered, {where}"] = ratio(
            med(table, f"{name}gateway", "peer.peak_rss_mb"),
            med(table, f"{name}nodered", "peer.peak_rss_mb"),
        )
    return found


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 8's targets, judged on this run's medians (and every repeat for
    missed and wrong escalations)."""
    summary, found = results["summary"], results["ratios"]
    checks = []

    def check(name: str, figure: str, met: bool | None) -> None:
        checks.append({"target": name, "figure": figure, "met": met})

    at = found.get("1000", {})
    floor_ratio = at.get("gateway/floor", {}).get("p99_ms")
    peer_ratio = at.get("gateway/nodered", {}).get("p99_ms")
    check(
        "p99 at 1,000 calls/s ≤ 5× the broker floor",
        times(floor_ratio),
        None if floor_ratio is None else floor_ratio <= 5,
    )
    check(
        "p99 at 1,000 calls/s ≤ ¼ of Node-RED's",
        times(peer_ratio),
        None if peer_ratio is None else peer_ratio <= 0.25,
    )
    sustained_ratio = found.get("sustained gateway/nodered")
    check(
        "sustained rate ≥ 2× Node-RED's",
        times(sustained_ratio),
        None if sustained_ratio is None else sustained_ratio >= 2,
    )
    gateway_open = [r for r in results["open"] if r["kind"] == "gateway"]
    n = f"{results['parameters']['open_calls']:,} open calls"
    if gateway_open:
        bad = sum(
            r["escalation"]["missed"] + r["escalation"]["wrong"] for r in gateway_open
        )
        check(
            f"{n}: zero missed or wrong escalations (every repeat)",
            f"{bad} in {len(gateway_open)} repeat(s)",
            bad == 0,
        )
        late = med(summary["open"], "gateway", "escalation.lateness.p99_ms")
        check(
            f"{n}: escalation lateness p99 < 20 ms",
            figure(late, " ms"),
            None if late is None else late < 20,
        )
    for key in ("1000/s", "open calls"):
        rss = found.get(f"peak RSS gateway/nodered, {key}")
        check(
            f"peak RSS ≤ ½ of Node-RED's ({key})",
            times(rss),
            None if rss is None else rss <= 0.5,
        )
    return checks


# -- output ----------------------------------------------------------------------------


def fmt(entry: dict[str, Any] | None, digits: int = 2) -> str:
    if entry is None:
        return "n/a"
    median, low, high = entry["median"], entry["min"], entry["max"]
    text = f"{median:,.{digits}f}"
    if low != high:
        text += f" ({low:,.{digits}f}–{high:,.{digits}f})"
    return text


def times(value: float | None) -> str:
    return "n/a" if value is None else f"×{value:g}"


def figure(value: float | None, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:g}{unit}"


def markdown(results: dict[str, Any]) -> str:
    args, summary, found = results["parameters"], results["summary"], results["ratios"]
    lines: list[str] = []
    if summary["tiers"]:
        lines += [
            f"Calls/s with every call cancelled {args['cancel_after']:g} s later. "
            f"Median of {args['repeats']} repeat(s), (min–max); latency in ms from a "
            "call's publish to its `open` alert at a subscriber.",
            "",
            "| calls/s | path | lost | p50 | p99 | p99.9 | max | cancel p99 "
            "| peak RSS MB | CPU s |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for rate in args["rates"]:
            for kind in PEERS:
                row = summary["tiers"].get(f"{rate:g}/{kind}")
                if row is None:
                    continue
                lines.append(
                    f"| {rate:,.0f} | {LABEL[kind]} | {fmt(row['stats.lost'], 0)} | "
                    + " | ".join(fmt(row[f"stats.open.{k}"]) for k in LATENCY_KEYS)
                    + f" | {fmt(row['stats.cancel.p99_ms'])} "
                    f"| {fmt(row['peer.peak_rss_mb'], 0) if kind != 'floor' else ''} "
                    f"| {fmt(row['peer.cpu_s_run'], 1) if kind != 'floor' else ''} |"
                )
            for other in ("floor", "nodered", "nodered-nodelay"):
                r = found.get(f"{rate:g}", {}).get(f"gateway/{other}", {})
                cells = " | ".join(
                    times(r.get(k)) for k in ("p50_ms", "p99_ms", "p999_ms", "max_ms")
                )
                lines.append(
                    f"| {rate:,.0f} | gateway / {LABEL[other]} | | {cells} | | | |"
                )
    lines += [
        "",
        "| measure | gateway | Node-RED | gateway / Node-RED |",
        "|---|---:|---:|---:|",
    ]
    search = summary["search"]
    if search:
        lines.append(
            f"| sustained calls/s (p99 < {P99_LIMIT_MS:g} ms, nothing lost) "
            f"| {fmt(search.get('gateway'), 0)} | {fmt(search.get('nodered'), 0)} "
            f"| {times(found.get('sustained gateway/nodered'))} |"
        )
    opened = summary["open"]
    if opened:
        n = f"{args['open_calls']:,} open calls"
        for label, key, digits in (
            ("escalation lateness p50, ms", "escalation.lateness.p50_ms", 1),
            ("escalation lateness p99, ms", "escalation.lateness.p99_ms", 1),
            ("escalation lateness max, ms", "escalation.lateness.max_ms", 1),
            ("missed escalations", "escalation.missed", 0),
            ("wrong escalations (cancelled in time)", "escalation.wrong", 0),
            ("peak RSS, MB", "peer.peak_rss_mb", 0),
            ("CPU s", "peer.cpu_s_run", 1),
        ):
            gw, nr = (
                opened.get("gateway", {}).get(key),
                opened.get("nodered", {}).get(key),
            )
            r = ratio(gw and gw["median"], nr and nr["median"])
            lines.append(
                f"| {n}: {label} | {fmt(gw, digits)} | {fmt(nr, digits)} | {times(r)} |"
            )
    lines += ["", "| target (issue 8) | this run | met |", "|---|---:|---|"]
    for item in results["targets"]:
        met = {True: "yes", False: "**no**", None: "not measured"}[item["met"]]
        lines.append(f"| {item['target']} | {item['figure']} | {met} |")
    return "\n".join(lines)


README_START = "<!-- versus:start -->"
README_END = "<!-- versus:end -->"


def write_readme(table: str, results: dict[str, Any]) -> None:
    """Replace what is between the versus markers in README.md."""
    readme = REPO / "README.md"
    text = readme.read_text()
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        raise BenchError(f"README.md has no {README_START} ... {README_END} block")
    machine = results["machine"]
    head = (
        f"Run of {results['started_at'][:10]}, {results['wall_s'] / 60:.0f} min, "
        f"{machine['cpu_count']} cores, Node-RED {NODE_RED_VERSION} on Node.js "
        f"{machine['node']}, raw data in `bench/results/{results['out_name']}`."
    )
    block = f"{README_START}\n{head}\n\n{table}\n{README_END}"
    readme.write_text(text[:start] + block + text[end + len(README_END) :])


def machine_info(workdir: Path) -> dict[str, Any]:
    info = latency.machine_info(workdir)
    node = subprocess.run(
        ["node", "--version"], capture_output=True, text=True, check=False
    )
    info["node"] = node.stdout.strip() or "not installed"
    info["node_red"] = NODE_RED_VERSION
    return info


@contextlib.contextmanager
def work_folder(chosen: Path | None) -> Iterator[Path]:
    if chosen is not None:
        chosen.mkdir(parents=True, exist_ok=True)
        yield chosen
        return
    with tempfile.TemporaryDirectory(prefix="gateway-versus-") as folder:
        yield Path(folder)


def run_all(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    wanted = any(peer.startswith("nodered") for peer in args.peers)
    red = ensure_node_red() if wanted else None
    write_flow()
    info = machine_info(workdir)
    broker = PrivateBroker(workdir / "broker", users=("gateway", "bench", "nodered"))
    broker.start()
    ctx = Context(args, broker, workdir, red)
    found: dict[str, list[Any]] = {"tiers": [], "search": [], "open": []}
    try:
        for repeat in range(1, args.repeats + 1):
            if "tiers" not in args.skip:
                found["tiers"] += run_tiers(ctx, repeat)
            if "open" not in args.skip:
                for kind in [p for p in ("gateway", "nodered") if p in args.peers]:
                    found["open"].append(run_open_calls(ctx, kind, repeat))
            if "search" not in args.skip:
                for kind in [p for p in ("gateway", "nodered") if p in args.peers]:
                    found["search"].append(search_rate(ctx, kind, repeat))
    finally:
        broker.stop()
    info["load_average_at_end"] = list(os.getloadavg())
    return {"machine": info, **found}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S"
    )
    latency.stop_cleanly_on_signals()
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    out = args.out or REPO / "bench" / "results" / f"versus-{started_at[:10]}.json"
    began = time.monotonic()
    try:
        with work_folder(args.workdir) as workdir:
            measured = run_all(args, workdir)
    except KeyboardInterrupt:
        log.error("interrupted; every process this run started has been stopped")
        return 130
    except BenchError as exc:
        log.error("%s", exc)
        return 1

    results: dict[str, Any] = {
        "started_at": started_at,
        "wall_s": round(time.monotonic() - began, 1),
        "out_name": out.name,
        "machine": measured.pop("machine"),
        "parameters": {
            key: sorted(value) if isinstance(value, set) else value
            for key, value in vars(args).items()
            if key not in ("out", "workdir", "readme")
        }
        | {
            "p99_limit_ms": P99_LIMIT_MS,
            "qos": latency.QOS,
            "durable_commit": {
                "gateway": "SQLite WAL, synchronous=FULL, before publish",
                "nodered": "none: alerts live in flow context (memory)",
            },
        },
        **measured,
    }
    results["summary"] = summarize(results)
    results["ratios"] = ratios(results["summary"], args.rates)
    results["targets"] = targets(results)
    latency.write_json(out, results)
    table = markdown(results)
    print(table)
    if args.readme:
        write_readme(table, results)
    log.info("wrote %s in %.0f min", out, results["wall_s"] / 60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
