"""The gateway's one connection to the local broker (paho-mqtt 2.x).

paho runs its network loop in its own thread. This module keeps that thread
at arm's length: it subscribes on every connect, hands each incoming message
to a callback that must only enqueue it, and reports link changes.

What paho does not do for us, and we do here:

* Nagle's algorithm is switched off on the socket: with it, a small publish
  can wait ~10 ms for an ACK of the previous one.
* The retained ``online`` status is published on every connect, with a
  retained ``offline`` last will for when we vanish.
* Incoming messages are acknowledged (PUBACK) only when the gateway says so,
  after it has committed what they caused. With a persistent session the
  broker redelivers anything not yet acknowledged, so a gateway killed
  between receiving a press and committing it sees the press again after a
  restart, and a press made while the gateway is down waits in the broker.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Callable

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.reasoncodes import ReasonCode

from gateway.config import MQTTSettings
from gateway.contract import OFFLINE, ONLINE, QOS, Topics

log = logging.getLogger(__name__)

RECONNECT_MIN = 1
RECONNECT_MAX = 10
"""Seconds; capped backoff so a restarted broker is found again within 10 s."""

MAX_INFLIGHT = 1000
"""QoS 1 messages awaiting PUBACK; paho's default of 20 throttles a burst."""

Receipt = tuple[int, int, int]
"""(connection number, message id, QoS): what :meth:`MQTTLink.ack` needs later."""

MessageHandler = Callable[[str, bytes, bool, Receipt], None]


class MQTTLink:
    """Connects, subscribes, publishes, and reconnects forever."""

    def __init__(
        self,
        settings: MQTTSettings,
        topics: Topics,
        client_id: str,
        on_message: MessageHandler,
        on_connected: Callable[[], None],
        extra_topics: tuple[str, ...] = (),
    ) -> None:
        self._settings = settings
        self._topics = topics
        self._on_message = on_message
        self._on_connected = on_connected
        self._extra_topics = extra_topics
        self.connected = False
        self.connects = 0
        self._closing = False

        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=paho.MQTTv311,
            clean_session=False,
            manual_ack=True,
        )
        client.enable_logger(logging.getLogger(f"{__name__}.paho"))
        client.max_inflight_messages_set(MAX_INFLIGHT)
        client.max_queued_messages_set(0)
        client.reconnect_delay_set(RECONNECT_MIN, RECONNECT_MAX)
        client.will_set(topics.status, OFFLINE, qos=QOS, retain=True)

        password = settings.resolved_password()
        if settings.username:
            client.username_pw_set(settings.username, password)
        if settings.tls is not None:
            client.tls_set(
                ca_certs=_str(settings.tls.ca_file),
                certfile=_str(settings.tls.cert_file),
                keyfile=_str(settings.tls.key_file),
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )

        client.on_socket_open = _no_delay
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        self._client = client

    @property
    def address(self) -> str:
        return f"{self._settings.host}:{self._settings.port}"

    def start(self) -> None:
        """Connect in the background; paho retries until the broker answers."""
        log.info("Connecting to MQTT broker %s", self.address)
        self._client.connect_async(
            self._settings.host,
            self._settings.port,
            keepalive=self._settings.keepalive,
        )
        self._client.loop_start()

    def stop(self) -> None:
        """Say ``offline`` ourselves, then disconnect cleanly."""
        self._closing = True
        if self.connected:
            info = self._client.publish(
                self._topics.status, OFFLINE, qos=QOS, retain=True
            )
            if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                try:
                    info.wait_for_publish(timeout=2)
                except (RuntimeError, ValueError):
                    log.warning("Could not confirm the offline status")
        # paho's thread may run once more after disconnect() and log an error
        # about the socket it just closed; that is the shutdown, not a fault.
        self._client.disable_logger()
        self._client.disconnect()
        self._client.loop_stop()

    def ack(self, receipt: Receipt) -> None:
        """Acknowledge a message once what it caused is committed.

        Message ids are per connection: a receipt from an earlier connection
        is dropped, and the broker redelivers that message instead.
        """
        connection, mid, qos = receipt
        # A QoS 0 message has no acknowledgement: a PUBACK for it (with its
        # message id 0) is a protocol error that makes the broker hang up.
        if qos > 0 and connection == self.connects and self.connected:
            self._client.ack(mid, qos)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> bool:
        """Queue a QoS 1 publish; paho sends it now or on reconnect."""
        info = self._client.publish(topic, payload, qos=QOS, retain=retain)
        if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
            return True
        # NO_CONN still keeps the message for the next connection; anything
        # else means it was refused outright.
        if info.rc != MQTTErrorCode.MQTT_ERR_NO_CONN:
            log.error("Publish to %s refused: %s", topic, paho.error_string(info.rc))
        return False

    # -- paho callbacks (network thread) ------------------------------------------

    def _handle_connect(
        self,
        client: paho.Client,
        userdata: object,
        flags: paho.ConnectFlags,
        reason: ReasonCode,
        properties: object,
    ) -> None:
        if reason.is_failure:
            log.error("Broker %s refused the connection: %s", self.address, reason)
            return
        self.connected = True
        self.connects += 1
        log.info("Connected to MQTT broker %s", self.address)
        subscriptions = [(self._topics.device_events, QOS)]
        subscriptions += [(topic, QOS) for topic in self._topics.commands]
        subscriptions += [(topic, QOS) for topic in self._extra_topics]
        client.subscribe(subscriptions)
        client.publish(self._topics.status, ONLINE, qos=QOS, retain=True)
        self._on_connected()

    def _handle_disconnect(
        self,
        client: paho.Client,
        userdata: object,
        flags: paho.DisconnectFlags,
        reason: ReasonCode,
        properties: object,
    ) -> None:
        if self.connected and not self._closing:
            log.warning(
                "Lost the MQTT broker %s (%s); reconnecting", self.address, reason
            )
        self.connected = False

    def _handle_message(
        self, client: paho.Client, userdata: object, message: paho.MQTTMessage
    ) -> None:
        receipt = (self.connects, message.mid, message.qos)
        self._on_message(message.topic, message.payload, bool(message.retain), receipt)


def _no_delay(client: paho.Client, userdata: object, sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _str(value: object) -> str | None:
    return None if value is None else str(value)
