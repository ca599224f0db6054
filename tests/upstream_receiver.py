"""Real upstreams for the sender's tests: an HTTP receiver and an MQTT consumer.

Both deduplicate by record key, as a real consumer must, and also count every
copy they were sent, so a test can tell "exactly once after deduplication"
(the promise) from "exactly once on the wire" (which at-least-once delivery
does not make).

The HTTP receiver checks the HMAC itself, with :mod:`hmac` directly rather
than the sender's own helper, so a signing bug cannot hide behind the code
it would test. It can be switched to misbehave: stopped (connections are
refused), answering 500, answering slowly (it still takes the batch, then
answers after the sender gave up, as an overloaded server does), or
answering 400 to any batch holding a poisoned key.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from socketserver import ThreadingMixIn
from typing import Any, Literal

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from gateway.broker import PrivateBroker, free_port

log = logging.getLogger(__name__)

Mode = Literal["ok", "error", "slow"]


@dataclass(frozen=True)
class Hit:
    """One request as the receiver saw it."""

    at: float
    """``time.monotonic()`` when it arrived."""

    status: int
    records: int
    idempotency_key: str | None


class _Server(ThreadingMixIn, HTTPServer):
    # Join handler threads on close, so no test leaves one behind.
    daemon_threads = False
    block_on_close = True
    allow_reuse_address = True
    receiver: WebhookReceiver

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A slow answer meets a sender that already hung up: expected here.
        log.debug("Receiver could not answer %s", client_address)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_POST(self) -> None:  # noqa: N802 - the name http.server calls
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length)
        status = self.server.receiver.take(body, dict(self.headers))
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        log.debug(format, *args)


class WebhookReceiver:
    """An HTTP upstream on a loopback port that verifies and deduplicates."""

    def __init__(self, secret: bytes, port: int | None = None) -> None:
        self.secret = secret
        self.port = port or free_port()
        self.mode: Mode = "ok"
        self.slow_for = 1.0
        self.poisoned: set[str] = set()
        self.keep_bodies = True
        """False keeps only key and seq: 100,000 bodies would take 500 MB."""

        self.copies = 0
        """Records received, duplicates included."""

        self.bad_signatures = 0
        self.hits: list[Hit] = []
        self._unique: list[dict[str, Any]] = []
        self._keys: set[str] = set()
        self._lock = threading.Condition()
        self._closing = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/ingest"

    def start(self) -> WebhookReceiver:
        """Listen (again) on the same port."""
        self._closing.clear()
        server = _Server(("127.0.0.1", self.port), _Handler)
        server.receiver = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.02}
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening: the sender's connections are now refused."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None or thread is None:
            return
        self._closing.set()  # wakes a handler sleeping in slow mode
        server.shutdown()
        server.server_close()
        thread.join()

    def __enter__(self) -> WebhookReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what arrived ---------------------------------------------------------

    @property
    def records(self) -> list[dict[str, Any]]:
        """The first copy of each record, in the order they arrived."""
        with self._lock:
            return list(self._unique)

    @property
    def keys(self) -> list[str]:
        return [record["key"] for record in self.records]

    def wait_for(self, count: int, timeout: float = 30.0) -> list[dict[str, Any]]:
        with self._lock:
            if not self._lock.wait_for(lambda: len(self._unique) >= count, timeout):
                raise AssertionError(
                    f"receiver has {len(self._unique)} of {count} records "
                    f"after {timeout}s"
                )
            return list(self._unique)

    # -- a handler thread -----------------------------------------------------

    def take(self, body: bytes, headers: dict[str, str]) -> int:
        """Judge one POST as a real receiver would; return the status."""
        if self.mode == "slow":
            self._closing.wait(self.slow_for)
        status = self._judge(body, headers)
        with self._lock:
            self.hits.append(
                Hit(
                    time.monotonic(),
                    status,
                    body.count(b'"key":'),
                    headers.get("Idempotency-Key"),
                )
            )
            self._lock.notify_all()
        return status

    def _judge(self, body: bytes, headers: dict[str, str]) -> int:
        if self.mode == "error":
            return 500
        expected = "sha256=" + hmac.new(self.secret, body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, headers.get("X-Signature", "")):
            with self._lock:
                self.bad_signatures += 1
            return 401
        records = json.loads(body)["records"]
        if any(record["key"] in self.poisoned for record in records):
            return 400
        with self._lock:
            for record in records:
                self.copies += 1
                if record["key"] not in self._keys:
                    self._keys.add(record["key"])
                    if not self.keep_bodies:
                        record = {"key": record["key"], "seq": record["seq"]}
                    self._unique.append(record)
        return 200


class MqttReceiver:
    """A consumer on the upstream broker: resubscribes on every connect.

    Its session is clean, so what the broker accepted while this consumer
    was away (or lost in a broker crash) is not replayed to it.
    """

    def __init__(self, broker: PrivateBroker, topic: str, user: str = "tester") -> None:
        self.topic = topic
        self.copies = 0
        self.topics: list[str] = []
        self._unique: list[dict[str, Any]] = []
        self._keys: set[str] = set()
        self._lock = threading.Condition()
        self._subscribed = 0

        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"consumer-{uuid.uuid4().hex[:10]}",
            protocol=paho.MQTTv311,
        )
        client.username_pw_set(user, broker.passwords[user])
        client.reconnect_delay_set(1, 1)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.connect_async(broker.host, broker.port, keepalive=5)
        client.loop_start()
        self._client = client
        self.wait_subscribed(1)

    def wait_subscribed(self, times: int, timeout: float = 15.0) -> None:
        """Wait until the subscription was granted ``times`` times in all."""
        with self._lock:
            if not self._lock.wait_for(lambda: self._subscribed >= times, timeout):
                raise AssertionError(f"consumer not subscribed to {self.topic}")

    @property
    def records(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._unique)

    @property
    def keys(self) -> list[str]:
        return [record["key"] for record in self.records]

    def wait_for(self, count: int, timeout: float = 30.0) -> list[dict[str, Any]]:
        with self._lock:
            if not self._lock.wait_for(lambda: len(self._unique) >= count, timeout):
                raise AssertionError(
                    f"consumer has {len(self._unique)} of {count} records"
                )
            return list(self._unique)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    # paho's thread -------------------------------------------------------------

    def _on_connect(
        self,
        client: paho.Client,
        userdata: object,
        flags: paho.ConnectFlags,
        reason: ReasonCode,
        properties: object,
    ) -> None:
        if not reason.is_failure:
            client.subscribe(self.topic, qos=1)

    def _on_subscribe(
        self,
        client: paho.Client,
        userdata: object,
        mid: int,
        reasons: list[ReasonCode],
        properties: object,
    ) -> None:
        with self._lock:
            self._subscribed += 1
            self._lock.notify_all()

    def _on_message(
        self, client: paho.Client, userdata: object, message: paho.MQTTMessage
    ) -> None:
        record = json.loads(message.payload)
        with self._lock:
            self.copies += 1
            self.topics.append(message.topic)
            if record["key"] not in self._keys:
                self._keys.add(record["key"])
                self._unique.append(record)
            self._lock.notify_all()
