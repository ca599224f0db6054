"""MQTT clients that behave like real displays, pagers and call stations
across broker restarts: they reconnect by themselves and subscribe again on
every connect (a restarted broker without persistence knows no session).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from gateway.broker import PrivateBroker


@dataclass(frozen=True)
class Received:
    at: float
    """``time.monotonic()`` when it arrived."""

    topic: str
    payload: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.payload) if self.payload else None


class Reconnecting:
    """A paho client that reconnects within half a second and resubscribes."""

    def __init__(
        self, broker: PrivateBroker, *subscriptions: str, status: str | None = None
    ) -> None:
        self.subscriptions = subscriptions
        self.status = status
        """The gateway's status topic: while it says ``online`` the gateway
        is subscribed (it subscribes before it says so)."""

        self.connected = threading.Event()
        self.gateway_online = False
        self.connects = 0
        self.received: list[Received] = []
        self.acked: list[tuple[int, float, bool]] = []
        """(message id, when, gateway online then) of every PUBACK."""

        self._lock = threading.Lock()
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"fault-{uuid.uuid4().hex[:10]}",
            protocol=paho.MQTTv311,
        )
        client.username_pw_set("tester", broker.passwords["tester"])
        client.reconnect_delay_set(0.05, 0.5)
        client.max_inflight_messages_set(0)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        self.client = client
        client.connect_async(broker.host, broker.port, keepalive=10)
        client.loop_start()
        if not self.connected.wait(10):
            raise AssertionError("fault client could not connect")

    def _on_connect(
        self,
        client: paho.Client,
        userdata: object,
        flags: paho.ConnectFlags,
        reason: ReasonCode,
        properties: object,
    ) -> None:
        if reason.is_failure:
            return
        topics = list(self.subscriptions)
        if self.status:
            topics.append(self.status)
        if topics:
            client.subscribe([(topic, 1) for topic in topics])
        self.connects += 1
        self.connected.set()

    def _on_disconnect(self, *args: object) -> None:
        self.connected.clear()
        self.gateway_online = False

    def _on_message(
        self, client: paho.Client, userdata: object, message: paho.MQTTMessage
    ) -> None:
        if message.topic == self.status:
            self.gateway_online = message.payload == b"online"
            return
        with self._lock:
            self.received.append(
                Received(time.monotonic(), message.topic, bytes(message.payload))
            )

    def _on_publish(
        self,
        client: paho.Client,
        userdata: object,
        mid: int,
        reason: ReasonCode,
        properties: object,
    ) -> None:
        with self._lock:
            self.acked.append((mid, time.monotonic(), self.gateway_online))

    def messages(self) -> list[Received]:
        with self._lock:
            return list(self.received)

    def publish(self, topic: str, body: dict[str, Any]) -> int:
        """Publish at QoS 1 (queued by paho while disconnected); its message id."""
        return self.client.publish(topic, json.dumps(body), qos=1).mid

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
