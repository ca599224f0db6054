"""The gateway's one connection to the local broker (paho-mqtt 2.x).

paho's network I/O runs on the gateway's own asyncio loop, through paho's
hooks for an external event loop (socket open, close and write interest),
instead of in paho's background thread. Every press is read, committed and
published by one thread: there is no hand-over between two threads that
compete for the interpreter lock, which in the benchmark added milliseconds
to each call. Only the TCP connect runs in a worker thread, so an
unreachable broker never blocks the loop.

What paho does not do for us, and we do here:

* Nagle's algorithm is switched off on the socket: with it, a small publish
  can wait ~10 ms for an ACK of the previous one.
* Reconnecting, with a capped backoff, for ever.
* The retained ``online`` status is published on every connect, with a
  retained ``offline`` last will for when we vanish.
* Incoming messages are acknowledged (PUBACK) only when the gateway says so,
  after it has committed what they caused. With a persistent session the
  broker redelivers anything not yet acknowledged, so a gateway killed
  between receiving a press and committing it sees the press again after a
  restart, and a press made while the gateway is down waits in the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.reasoncodes import ReasonCode

from gateway.config import MQTTSettings
from gateway.contract import OFFLINE, ONLINE, QOS, Topics

log = logging.getLogger(__name__)

RECONNECT_MIN = 1.0
RECONNECT_MAX = 10.0
"""Seconds; capped backoff so a restarted broker is found again within 10 s."""

MISC_EVERY = 1.0
"""Seconds between paho's housekeeping calls: keepalive pings, lost-link checks."""

CONNECT_TIMEOUT = 5.0
"""Seconds a TCP connect (and TLS handshake) may take before it is retried."""

STOP_FLUSH = 2.0
"""Seconds to wait at shutdown for the broker to take our ``offline`` status."""

MAX_INFLIGHT = 0
"""QoS 1 messages awaiting PUBACK: no limit. paho's default of 20 throttles a
burst, and with any limit paho scans every queued message on each PUBACK, so
the reconnect burst (every unresolved alert and dome light again) cost time
quadratic in its size. Mosquitto takes what we send and acknowledges it."""

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
        self.changed_at: float | None = None
        """Unix time the link last came up or went down; None: never up yet."""
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._down: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._failures = 0

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
        client.connect_timeout = CONNECT_TIMEOUT
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

        client.on_socket_open = self._socket_open
        client.on_socket_close = self._socket_close
        client.on_socket_register_write = self._want_write
        client.on_socket_unregister_write = self._done_writing
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        self._client = client

    @property
    def address(self) -> str:
        return f"{self._settings.host}:{self._settings.port}"

    def start(self) -> None:
        """Connect from the running loop, and keep reconnecting until :meth:`stop`."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._down = asyncio.Event()
        log.info("Connecting to MQTT broker %s", self.address)
        self._tasks = [
            self._loop.create_task(self._stay_connected(), name="mqtt-connect"),
            self._loop.create_task(self._housekeeping(), name="mqtt-housekeeping"),
        ]

    def stop(self) -> None:
        """Say ``offline`` ourselves, then disconnect cleanly.

        Called from the loop as it shuts down, so the last exchange with the
        broker is driven by hand, with paho's own blocking ``loop()``.
        """
        self._closing = True
        for task in self._tasks:
            task.cancel()
        client = self._client
        sock = client.socket()
        if sock is not None and self._loop is not None:
            self._loop.remove_reader(sock.fileno())
            self._loop.remove_writer(sock.fileno())
        client.on_socket_register_write = None
        client.on_socket_unregister_write = None
        client.on_socket_close = None
        if self.connected:
            info = client.publish(self._topics.status, OFFLINE, qos=QOS, retain=True)
            deadline = time.monotonic() + STOP_FLUSH
            while not info.is_published() and time.monotonic() < deadline:
                if client.loop(timeout=0.05) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    break
            if not info.is_published():
                log.warning("Could not confirm the offline status")
        # paho may log an error about the socket it just closed; that is the
        # shutdown, not a fault.
        client.disable_logger()
        client.disconnect()

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

    # -- connecting -----------------------------------------------------------------

    async def _stay_connected(self) -> None:
        """Connect, wait for the link to drop, back off, and connect again."""
        assert self._loop is not None
        assert self._down is not None
        while not self._closing:
            self._down.clear()
            try:
                await self._loop.run_in_executor(None, self._connect)
            except (OSError, ssl.SSLError) as exc:
                self._down.set()
                self._failures += 1
                # Said once per outage; the attempts go on quietly.
                report = log.warning if self._failures == 1 else log.debug
                report("Cannot reach MQTT broker %s: %s", self.address, exc)
            await self._down.wait()
            await asyncio.sleep(self._backoff())

    def _connect(self) -> None:
        """In a worker thread: TCP connect, TLS handshake, send CONNECT."""
        self._client.connect(
            self._settings.host, self._settings.port, keepalive=self._settings.keepalive
        )

    def _backoff(self) -> float:
        if self._failures == 0:
            return RECONNECT_MIN
        return min(RECONNECT_MIN * 2 ** (self._failures - 1), RECONNECT_MAX)

    async def _housekeeping(self) -> None:
        """paho's keepalive pings and its check for a broker gone silent."""
        while True:
            await asyncio.sleep(MISC_EVERY)
            if self._client.socket() is not None:
                self._client.loop_misc()

    def _on_loop(self, call: Callable[..., object], *args: object) -> None:
        """Run ``call`` on the loop: now if we are on it, else as soon as it can."""
        assert self._loop is not None
        if threading.get_ident() == self._loop_thread:
            call(*args)
        elif not self._loop.is_closed():
            self._loop.call_soon_threadsafe(call, *args)

    # -- paho's socket hooks ------------------------------------------------------

    def _socket_open(
        self, client: paho.Client, userdata: object, sock: socket.socket
    ) -> None:
        _no_delay(client, userdata, sock)
        self._on_loop(self._read_from, sock.fileno())

    def _read_from(self, fd: int) -> None:
        assert self._loop is not None
        self._loop.add_reader(fd, self._client.loop_read)

    def _socket_close(
        self, client: paho.Client, userdata: object, sock: socket.socket
    ) -> None:
        self._on_loop(self._forget, sock.fileno())

    def _forget(self, fd: int) -> None:
        assert self._loop is not None
        assert self._down is not None
        # The descriptor may be closed already; the selector ignores that.
        with contextlib.suppress(ValueError):
            self._loop.remove_reader(fd)
            self._loop.remove_writer(fd)
        self._down.set()

    def _want_write(
        self, client: paho.Client, userdata: object, sock: socket.socket
    ) -> None:
        self._on_loop(self._write_to, sock.fileno())

    def _write_to(self, fd: int) -> None:
        assert self._loop is not None
        if self._client.socket() is not None:
            self._loop.add_writer(fd, self._client.loop_write)

    def _done_writing(
        self, client: paho.Client, userdata: object, sock: socket.socket
    ) -> None:
        self._on_loop(self._stop_writing, sock.fileno())

    def _stop_writing(self, fd: int) -> None:
        assert self._loop is not None
        with contextlib.suppress(ValueError):
            self._loop.remove_writer(fd)

    # -- paho callbacks (on the loop) ---------------------------------------------

    def _handle_connect(
        self,
        client: paho.Client,
        userdata: object,
        flags: paho.ConnectFlags,
        reason: ReasonCode,
        properties: object,
    ) -> None:
        if reason.is_failure:
            self._failures += 1
            log.error("Broker %s refused the connection: %s", self.address, reason)
            return
        self.connected = True
        self._failures = 0
        self.connects += 1
        self.changed_at = time.time()
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
        if self.connected:
            self.changed_at = time.time()
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
