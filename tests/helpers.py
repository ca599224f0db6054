"""Test helpers: MQTT clients, the gateway as a subprocess, site files, SQLite.

Everything here talks to real parts: a real Mosquitto (``PrivateBroker``), the
gateway started as ``python main.py run``, and the SQLite file it writes.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as paho
import yaml
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.reasoncodes import ReasonCode

from gateway.broker import PrivateBroker, free_port
from rules.alerts import Alert, AlertState

ROOT = Path(__file__).resolve().parent.parent
MAIN = ROOT / "main.py"

WAIT = 10.0
"""Seconds to wait for something that should happen within milliseconds.

Generous on purpose: it only matters when a test is about to fail, and a
loaded 2-core CI machine must not turn a slow pass into a failure.
"""

STARTUP = 30.0
"""Seconds for a gateway process to import, open its database and connect."""

STAFF = (
    {"id": "ana", "name": "Ana Silva", "roles": ["nurse"]},
    {"id": "ben", "name": "Ben Okafor", "roles": ["nurse"]},
    {"id": "chloe", "name": "Chloe Martin", "roles": ["charge_nurse"]},
    {"id": "dev", "name": "Dev Patel", "roles": ["ward_manager"]},
)

SLOW_LEVELS = (
    {"after": "0s", "roles": ["nurse"]},
    {"after": "10m", "roles": ["charge_nurse"]},
    {"after": "20m", "staff": ["dev"]},
)
"""Escalation far beyond any test, for tests about everything but escalation."""

FAST_LEVELS = (
    {"after": "0s", "roles": ["nurse"]},
    {"after": "1s", "roles": ["charge_nurse"]},
    {"after": "2s", "staff": ["dev"]},
)
"""Escalation within a test's lifetime: level 2 after 1 s, level 3 after 2 s."""


# -- site files ------------------------------------------------------------------------


def site_config(
    site_id: str,
    *,
    devices: int = 4,
    levels: Iterable[dict[str, Any]] = SLOW_LEVELS,
    gateway_id: str = "gw-1",
) -> dict[str, Any]:
    """A one-zone ward: devices ``call-1``.. in rooms ``room-1``.., four staff."""
    rooms = [{"id": f"room-{n}", "name": f"Room {n}"} for n in range(1, devices + 1)]
    return {
        "site": {"id": site_id, "name": f"Test site {site_id}"},
        "gateway": {"id": gateway_id},
        "zones": [{"id": "west", "name": "West wing", "rooms": rooms}],
        "devices": [
            {"id": f"call-{n}", "kind": "call_button", "room": f"room-{n}"}
            for n in range(1, devices + 1)
        ],
        "staff": [dict(member) for member in STAFF],
        "rules": [
            {
                "name": "patient-call",
                "priority": "routine",
                "devices": {"kind": "call_button"},
                "levels": [dict(level) for level in levels],
            }
        ],
    }


def write_site(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# -- the MQTT contract, spelled out independently of gateway/contract.py ---------------


@dataclass(frozen=True)
class SiteTopics:
    site: str
    gateway: str = "gw-1"

    @property
    def alerts(self) -> str:
        return f"facility/{self.site}/alerts/+"

    @property
    def pagers(self) -> str:
        return f"facility/{self.site}/pagers/+"

    @property
    def status(self) -> str:
        return f"facility/{self.site}/gateways/{self.gateway}/status"

    def events(self, device: str) -> str:
        return f"facility/{self.site}/devices/{device}/events"

    def alert(self, alert_id: str) -> str:
        return f"facility/{self.site}/alerts/{alert_id}"

    def ack(self, alert_id: str) -> str:
        return f"{self.alert(alert_id)}/ack"

    def resolve(self, alert_id: str) -> str:
        return f"{self.alert(alert_id)}/resolve"

    def pager(self, target: str) -> str:
        return f"facility/{self.site}/pagers/{target}"

    def staff(self, staff: str, verb: str) -> str:
        """A pager's own command topic: ``ack``, ``resolve`` or ``answer``."""
        return f"facility/{self.site}/staff/{staff}/{verb}"


def event(device: str, kind: str = "call", event_id: str | None = None) -> dict:
    """A device event as the contract defines it."""
    return {
        "id": event_id or uuid.uuid4().hex,
        "type": kind,
        "device": device,
        "ts": time.time(),
    }


def resolved_alert(n: int, at: float, version: int = 4) -> Alert:
    """Patient call number ``n``, acknowledged and resolved from Ana's pager at ``at``.

    The outbox tests write thousands of these, in order, and check that the
    receiver gets each one once.
    """
    return Alert(
        id=f"a{n:06d}",
        rule="patient-call",
        priority="routine",
        device=f"call-{n % 4 + 1}",
        room=f"room-{n % 4 + 1}",
        zone="west",
        event_id=f"e{n}",
        opened_at=at - 95,
        updated_at=at,
        state=AlertState.RESOLVED,
        version=version,
        acked_at=at - 60,
        acked_by="ana",
        resolved_at=at,
        resolved_by="ana",
        resolved_via="pager",
    )


# -- MQTT test client ------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    retain: bool
    index: int
    """Position in the client's list: everything received before has a lower one."""

    @property
    def json(self) -> Any:
        return json.loads(self.payload) if self.payload else None

    def matches(self, topic: str | None, fields: dict[str, Any]) -> bool:
        if topic is not None and self.topic != topic:
            return False
        if not fields:
            return True
        body = self.json
        return isinstance(body, dict) and all(
            body.get(key) == value for key, value in fields.items()
        )


class MqttClient:
    """A display, pager or device: connects with a password, collects messages."""

    def __init__(self, broker: PrivateBroker, user: str = "tester") -> None:
        self.name = f"test-{uuid.uuid4().hex[:10]}"
        self._lock = threading.Condition()
        self._messages: list[Message] = []
        self._subacks: set[int] = set()
        self._connected = threading.Event()
        self._refused: str | None = None

        client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=self.name, protocol=paho.MQTTv311
        )
        client.username_pw_set(user, broker.passwords[user])
        client.max_inflight_messages_set(0)  # unlimited: bursts go out at once
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        self._client = client
        client.connect(broker.host, broker.port, keepalive=60)
        client.loop_start()
        if not self._connected.wait(WAIT) or self._refused:
            self.close()
            raise AssertionError(f"{self.name} could not connect: {self._refused}")

    # paho thread -----------------------------------------------------------------

    def _on_connect(
        self,
        client: paho.Client,
        userdata: object,
        flags: paho.ConnectFlags,
        reason: ReasonCode,
        properties: object,
    ) -> None:
        if reason.is_failure:
            self._refused = str(reason)
        self._connected.set()

    def _on_subscribe(
        self,
        client: paho.Client,
        userdata: object,
        mid: int,
        reasons: list[ReasonCode],
        properties: object,
    ) -> None:
        with self._lock:
            self._subacks.add(mid)
            self._lock.notify_all()

    def _on_message(
        self, client: paho.Client, userdata: object, message: paho.MQTTMessage
    ) -> None:
        with self._lock:
            self._messages.append(
                Message(
                    message.topic,
                    bytes(message.payload),
                    bool(message.retain),
                    len(self._messages),
                )
            )
            self._lock.notify_all()

    # test thread -----------------------------------------------------------------

    def subscribe(self, *topics: str) -> MqttClient:
        """Subscribe at QoS 1 and wait for the broker's SUBACK."""
        result, mid = self._client.subscribe([(topic, 1) for topic in topics])
        assert result == MQTTErrorCode.MQTT_ERR_SUCCESS, result
        with self._lock:
            assert self._lock.wait_for(lambda: mid in self._subacks, WAIT), (
                f"no SUBACK for {topics}"
            )
        return self

    def publish(
        self, topic: str, payload: bytes | str | dict, *, retain: bool = False
    ) -> None:
        """Publish at QoS 1 and wait for the broker's PUBACK."""
        if isinstance(payload, dict):
            payload = json.dumps(payload)
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(WAIT)
        assert info.is_published(), f"broker did not acknowledge {topic}"

    def publish_many(self, items: Iterable[tuple[str, dict]]) -> None:
        """Publish without waiting in between, then wait for every PUBACK."""
        infos = [
            self._client.publish(topic, json.dumps(body), qos=1)
            for topic, body in items
        ]
        for info in infos:
            info.wait_for_publish(WAIT)
            assert info.is_published(), "broker did not acknowledge a publish"

    @property
    def messages(self) -> list[Message]:
        with self._lock:
            return list(self._messages)

    def mark(self) -> int:
        """Index of the next message: pass as ``after`` to skip older ones."""
        with self._lock:
            return len(self._messages)

    def wait_for(
        self,
        predicate: Callable[[Message], bool],
        timeout: float = WAIT,
        *,
        after: int = 0,
        what: str = "a matching message",
    ) -> Message:
        """Block until a message at ``after`` or later matches; return the first."""

        def found() -> Message | None:
            return next(
                (m for m in self._messages[after:] if predicate(m)),
                None,
            )

        with self._lock:
            if self._lock.wait_for(lambda: found() is not None, timeout):
                return found()  # type: ignore[return-value]
            seen = [(m.topic, m.payload[:200]) for m in self._messages[after:]]
        raise AssertionError(
            f"timed out after {timeout}s waiting for {what}; saw {seen}"
        )

    def wait_for_json(
        self,
        topic: str | None = None,
        *,
        timeout: float = WAIT,
        after: int = 0,
        **fields: Any,
    ) -> dict[str, Any]:
        """Wait for a JSON message (on ``topic``) whose fields have these values."""
        message = self.wait_for(
            lambda m: m.matches(topic, fields),
            timeout,
            after=after,
            what=f"{topic or 'any topic'} with {fields}",
        )
        return message.json

    def wait_for_count(
        self,
        predicate: Callable[[Message], bool],
        count: int,
        timeout: float = WAIT,
        *,
        after: int = 0,
    ) -> list[Message]:
        """Block until ``count`` messages match; return them."""

        def matching() -> list[Message]:
            return [m for m in self._messages[after:] if predicate(m)]

        with self._lock:
            if self._lock.wait_for(lambda: len(matching()) >= count, timeout):
                return matching()
            got = len(matching())
        raise AssertionError(f"timed out after {timeout}s: {got} of {count} messages")

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def wait_until(
    condition: Callable[[], Any], timeout: float = WAIT, what: str = "condition"
) -> Any:
    """Poll ``condition`` until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)
    return result


def on_topic(topic: str) -> Callable[[Message], bool]:
    return lambda message: message.topic == topic


# -- the gateway as a subprocess -------------------------------------------------------


@dataclass
class GatewayProcess:
    """``python main.py run --config SITE`` against a private broker."""

    site_file: Path
    broker: PrivateBroker
    folder: Path
    topics: SiteTopics
    db_path: Path = field(init=False)
    web_port: int = field(init=False)
    log_path: Path = field(init=False)
    process: subprocess.Popen[bytes] | None = field(init=False, default=None)
    options: list[str] = field(default_factory=list)
    """Options of ``main.py`` itself, before ``run`` (``--log-format json``)."""

    def __post_init__(self) -> None:
        self.db_path = self.folder / "gw.db"
        self.web_port = free_port()
        self.log_path = self.folder / "gateway.log"

    def environ(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        env.update(
            GATEWAY_MQTT__HOST=self.broker.host,
            GATEWAY_MQTT__PORT=str(self.broker.port),
            GATEWAY_MQTT__USERNAME="gateway",
            GATEWAY_MQTT__PASSWORD=self.broker.passwords["gateway"],
            GATEWAY_DATABASE__PATH=str(self.db_path),
            GATEWAY_WEB__PORT=str(self.web_port),
        )
        return env

    def start(self) -> GatewayProcess:
        """Start the process and wait until its retained status says online."""
        with self.log_path.open("ab") as log:
            log.write(f"----- gateway started at {time.strftime('%X')}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                [sys.executable, str(MAIN), *self.options]
                + ["run", "--config", str(self.site_file)],
                cwd=ROOT,
                env=self.environ(),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.wait_online()
        return self

    def wait_online(self, timeout: float = STARTUP) -> None:
        """Wait for the retained ``online`` status, failing early if we died."""
        watcher = MqttClient(self.broker)
        try:
            watcher.subscribe(self.topics.status)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                assert self.process is not None
                if self.process.poll() is not None:
                    raise AssertionError(
                        f"gateway exited with {self.process.returncode}:\n{self.log()}"
                    )
                with contextlib.suppress(AssertionError):
                    watcher.wait_for(lambda m: m.payload == b"online", timeout=0.2)
                    return
            raise AssertionError(f"gateway not online after {timeout}s")
        finally:
            watcher.close()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL, as a power cut or the OOM killer would."""
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not stop within 10 s."""
        self._signal(signal.SIGTERM)

    def _signal(self, sig: signal.Signals) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(sig)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def log(self) -> str:
        return (
            self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        )

    def healthz(self) -> dict[str, Any]:
        """GET /healthz, retrying while the web server is still starting."""
        url = f"http://127.0.0.1:{self.web_port}/healthz"
        deadline = time.monotonic() + WAIT
        while True:
            try:
                response = httpx.get(url, timeout=WAIT)
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
                continue
            response.raise_for_status()
            return response.json()

    def query(self, sql: str, *params: Any) -> list[dict[str, Any]]:
        return query(self.db_path, sql, *params)


# -- SQLite ----------------------------------------------------------------------------


def query(db_path: Path, sql: str, *params: Any) -> list[dict[str, Any]]:
    """Rows of one query against the gateway's file, read by a separate connection."""
    with contextlib.closing(sqlite3.connect(db_path, timeout=WAIT)) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(row) for row in conn.execute(sql, params)]
