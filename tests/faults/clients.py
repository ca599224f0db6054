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


@dataclass
class Press:
    """One event held by a :class:`WaitingDevice` until the gateway surely has it."""

    topic: str
    payload: str
    handed_at: float | None = None
    """``time.monotonic()`` when handed to paho; None while held."""

    handovers: int = 0


class WaitingDevice(Reconnecting):
    """A device that behaves like our ESPHome call station and feedback terminal.

    Presses wait in order in a queue and are handed to the client only while
    connected and after the gateway's retained ``online`` has come since the
    last (re)connect: a restarted broker holds no status until the gateway
    has subscribed again and says so. A press handed over is kept until the
    link has stayed up, with the gateway ``online``, for ``confirm`` seconds;
    a dropped link or any other status takes every kept press back, to be
    handed over again under the same event id (the gateway drops copies).
    One client stands for many devices here, so its queue has no bound; a
    real device keeps 32 presses.
    """

    def __init__(
        self, broker: PrivateBroker, *, status: str, confirm: float = 3.0
    ) -> None:
        self.confirm = confirm
        self._queue: list[Press] = []
        self._resent = 0
        self._stop = threading.Event()
        super().__init__(broker, status=status)
        self._thread = threading.Thread(target=self._run, name="waiting-device")
        self._thread.start()

    def publish(self, topic: str, body: dict[str, Any]) -> int:
        """Queue a press; it goes when the gateway listens. Returns 0 (no mid yet)."""
        with self._lock:
            self._queue.append(Press(topic, json.dumps(body)))
        return 0

    @property
    def waiting(self) -> int:
        """Presses not yet confirmed: held, or handed over within the window."""
        with self._lock:
            return len(self._queue)

    @property
    def resent(self) -> int:
        """Presses handed over again after a dropped link or a gateway gone."""
        with self._lock:
            return self._resent

    def _on_disconnect(self, *args: object) -> None:
        super()._on_disconnect(*args)
        with self._lock:
            self._take_back()

    def _on_message(
        self, client: paho.Client, userdata: object, message: paho.MQTTMessage
    ) -> None:
        super()._on_message(client, userdata, message)
        if message.topic == self.status and not self.gateway_online:
            with self._lock:
                self._take_back()

    def _take_back(self) -> None:
        for press in self._queue:
            press.handed_at = None

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self._forget_confirmed()
            while press := self._next():
                # Outside the lock: paho calls on_publish under a lock of its own.
                self.client.publish(press.topic, press.payload, qos=1)

    def _forget_confirmed(self) -> None:
        now = time.monotonic()
        with self._lock:
            while self._queue and (handed := self._queue[0].handed_at) is not None:
                if now - handed < self.confirm:
                    break
                self._queue.pop(0)

    def _next(self) -> Press | None:
        """The oldest held press, marked handed over, if the gateway listens."""
        with self._lock:
            if not (self.connected.is_set() and self.gateway_online):
                return None
            press = next((p for p in self._queue if p.handed_at is None), None)
            if press is not None:
                press.handed_at = time.monotonic()
                press.handovers += 1
                self._resent += press.handovers > 1
            return press

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        super().close()
