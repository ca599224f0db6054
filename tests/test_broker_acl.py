"""The shipped Mosquitto configuration: who may connect, publish and read what.

Every test here runs the broker on exactly the files we install
(``systemd/mosquitto/``, rendered by ``gateway.broker_config`` for a test site)
with free loopback ports and a throwaway certificate. A refused publish is
dropped silently (MQTT 3.1.1 still acknowledges it), so each test proves
"nothing arrived" with a sentinel: a message published after the refused
ones, on a topic every role reads. Mosquitto hands each subscriber its
messages in the order it accepted them, so once the sentinel is in, anything
refused-but-delivered would already be there too.
"""

from __future__ import annotations

import json
import ssl
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from gateway.broker import PrivateBroker
from gateway.broker_config import BrokerConfigError, read_extra_users, site_users
from gateway.config import load_config
from gateway.contract import Topics
from tests.conftest import attach_log
from tests.helpers import (
    ROOT,
    WAIT,
    MqttClient,
    SiteTopics,
    event,
    on_topic,
    site_config,
    write_site,
)

OTHER_SITE = "facility/another-site"

EXTRA_USERS = [("display", "wall-1"), ("technician", "tech-1"), ("observer", "tester")]
"""Users the site file does not list. The observer is named ``tester`` because
the shared helpers (``mqtt`` fixture, ``GatewayProcess.wait_online``) connect
as ``tester``; it reads everything and writes nothing."""


@pytest.fixture
def broker(
    tmp_path: Path, topics: SiteTopics, request: pytest.FixtureRequest
) -> Iterator[PrivateBroker]:
    """The shipped configuration for the test site, replacing the simple broker."""
    config = load_config(write_site(tmp_path / "site.yaml", site_config(topics.site)))
    broker = PrivateBroker(tmp_path / "broker", site=site_users(config, EXTRA_USERS))
    attach_log(request, "mosquitto log", broker.log_file)
    broker.start()
    yield broker
    broker.kill()


@pytest.fixture
def login(broker: PrivateBroker) -> Iterator[Callable[..., MqttClient]]:
    """Factory: ``login(user, *topics)`` connects on loopback as that user."""
    clients: list[MqttClient] = []

    def connect(user: str, *subscriptions: str) -> MqttClient:
        client = MqttClient(broker, user)
        clients.append(client)
        if subscriptions:
            client.subscribe(*subscriptions)
        return client

    yield connect
    for client in clients:
        client.close()


def probe() -> dict[str, str]:
    return {"probe": uuid.uuid4().hex}


def sentinel(login, topics: SiteTopics, observer: MqttClient) -> None:
    """Publish an alert state as the gateway and wait until the observer has it."""
    topic = topics.alert(f"sentinel-{uuid.uuid4().hex[:8]}")
    login("gateway").publish(topic, probe())
    observer.wait_for(on_topic(topic), what=f"the sentinel on {topic}")


# -- connecting ---------------------------------------------------------------------


def attempt(broker: PrivateBroker, listener: str, user: str | None, password: str):
    """Connect once over one listener; return the CONNACK reason, or the error."""
    transport = "websockets" if listener == "websockets" else "tcp"
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"probe-{uuid.uuid4().hex[:8]}",
        protocol=paho.MQTTv311,
        transport=transport,
    )
    if user is not None:
        client.username_pw_set(user, password)
    port = {
        "loopback": broker.port,
        "tls": broker.tls_port,
        "websockets": broker.websockets_port,
        "tls-port-without-tls": broker.tls_port,
    }[listener]
    if listener in ("tls", "websockets"):
        client.tls_set(
            ca_certs=str(broker.ca_file), tls_version=ssl.PROTOCOL_TLS_CLIENT
        )
    answered = threading.Event()
    reasons: list[str] = []

    def on_connect(client, userdata, flags, reason, properties) -> None:
        reasons.append(str(reason))
        answered.set()

    def on_disconnect(client, userdata, flags, reason, properties) -> None:
        answered.set()

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    try:
        client.connect(broker.host, port, keepalive=10)
    except (OSError, ssl.SSLError) as exc:
        return f"no connection: {exc}"
    client.loop_start()
    answered.wait(3.0)
    client.disconnect()
    client.loop_stop()
    return reasons[0] if reasons else "no CONNACK"


@pytest.mark.parametrize("listener", ["loopback", "tls", "websockets"])
def test_only_known_users_with_their_password_connect(broker, listener):
    """Anonymous, wrong-password and unknown clients are refused on every listener."""
    password = broker.passwords["ana"]

    assert attempt(broker, listener, "ana", password) == "Success"
    assert attempt(broker, listener, None, "") == "Not authorized"
    assert attempt(broker, listener, "ana", password + "x") == "Not authorized"
    assert attempt(broker, listener, "ana", broker.passwords["ben"]) == "Not authorized"
    assert attempt(broker, listener, "nobody", password) == "Not authorized"
    assert attempt(broker, listener, "", "") == "Not authorized"


def test_site_listener_speaks_only_tls(broker):
    """Plain MQTT to the site network's port gets no CONNACK at all."""
    password = broker.passwords["ana"]
    result = attempt(broker, "tls-port-without-tls", "ana", password)
    assert result == "no CONNACK" or result.startswith("no connection"), result


# -- publishing ---------------------------------------------------------------------

FORBIDDEN = {
    "call-1": [
        "{s}/devices/call-2/events", "{s}/devices/call-2/sightings",
        "{s}/devices/call-2/status", "{s}/devices/call-2/esphome/x/state",
        "{s}/devices/call-1/availability", "{s}/devices/call-1/commands",
        "{s}/devices/call-2/light", "{s}/devices/call-1/light",
        "{s}/devices/call-2/test", "{s}/alerts/a-1", "{s}/alerts/a-1/ack",
        "{s}/alerts/a-1/resolve",
        "{s}/staff/ana/ack", "{s}/pagers/nurse", "{s}/silences",
        "{s}/silences/s-1", "{s}/zones/west/kudos", "{s}/polls/p-1/answer",
        "{s}/polls/p-1/result", "{s}/gateways/gw-1/status",
        "{o}/devices/call-1/events", "call-1/events",
    ],
    "ana": [
        "{s}/staff/ben/ack", "{s}/staff/ben/resolve", "{s}/staff/ben/answer",
        "{s}/staff/ana/ack/extra", "{s}/alerts/a-1/ack", "{s}/alerts/a-1/resolve",
        "{s}/alerts/a-1", "{s}/pagers/ana", "{s}/devices/ana/events",
        "{s}/devices/call-1/events", "{s}/silences", "{s}/polls/p-1/answer",
        "{o}/staff/ana/ack",
    ],
    "wall-1": [
        "{s}/alerts/a-1", "{s}/alerts/a-1/ack", "{s}/alerts/a-1/resolve",
        "{s}/staff/wall-1/ack", "{s}/staff/ana/ack", "{s}/devices/wall-1/events",
        "{s}/devices/call-1/events", "{s}/silences", "{s}/silences/s-1/end",
        "{s}/zones/west/kudos", "{s}/pagers/nurse", "{s}/polls/p-1/answer",
        "{s}/display/wall-1", "wall-1",
    ],
    "tech-1": [
        "{s}/alerts/a-1", "{s}/pagers/nurse", "{s}/devices/call-1/events",
        "{s}/staff/ana/ack", "{s}/silences/s-1", "{s}/zones/west/kudos",
        "{s}/gateways/gw-1/status", "{o}/silences",
    ],
    "gateway": [
        "{s}/devices/call-1/events", "{s}/devices/call-1/sightings",
        "{s}/staff/ana/ack", "{s}/alerts/a-1/ack", "{s}/alerts/a-1/resolve",
        "{s}/silences", "{s}/polls/p-1/answer", "{s}/gateways/gw-2/status",
        "{o}/alerts/a-1",
    ],
    "tester": ["{s}/alerts/a-1", "{s}/devices/call-1/events", "{s}/staff/ana/ack"],
}  # fmt: skip
"""Topics each user must not publish on: ``{s}`` is the site, ``{o}`` another."""

ALLOWED = {
    "call-1": [
        "{s}/devices/call-1/events", "{s}/devices/call-1/sightings",
        "{s}/devices/call-1/status", "{s}/devices/call-1/esphome/binary_sensor/x/state",
    ],
    "ana": ["{s}/staff/ana/ack", "{s}/staff/ana/resolve", "{s}/staff/ana/answer"],
    "wall-1": [],
    "tech-1": [
        "{s}/silences", "{s}/silences/s-1/end", "{s}/alerts/a-1/ack",
        "{s}/alerts/a-1/resolve",
    ],
    "tester": [],
}  # fmt: skip
"""Topics each user may publish on; the gateway's come from the contract."""


def gateway_topics(site: str) -> list[str]:
    """Every topic the gateway publishes on, as gateway/contract.py names them."""
    names = Topics(site, "gw-1")
    return [
        names.alert("a-1"),
        names.pager("nurse"),
        names.pager("ana"),
        names.availability("call-1"),
        names.device_light("call-1"),
        names.device_test("call-1"),
        names.silence("s-1"),
        names.kudos("west"),
        names.poll_result("p-1"),
        names.status,
    ]


def expand(patterns: list[str], site: str) -> list[str]:
    return [p.format(s=f"facility/{site}", o=OTHER_SITE) for p in patterns]


@pytest.mark.parametrize("user", list(FORBIDDEN))
def test_each_role_publishes_only_its_own_topics(login, topics, user):
    """Every forbidden publish reaches nobody; every allowed one arrives."""
    observer = login("tester", "#")
    client = login(user)
    forbidden = {topic: probe() for topic in expand(FORBIDDEN[user], topics.site)}
    for topic, body in forbidden.items():
        client.publish(topic, body)
    sentinel(login, topics, observer)

    leaked = [m.topic for m in observer.messages if m.json in forbidden.values()]
    assert leaked == [], f"{user} published where it must not"

    allowed = (
        gateway_topics(topics.site)
        if user == "gateway"
        else expand(ALLOWED[user], topics.site)
    )
    for topic in allowed:
        body = probe()
        client.publish(topic, body)
        observer.wait_for_json(topic, **body)


# -- reading ------------------------------------------------------------------------

READERS = {
    "call-1": {
        "alerts/a-1", "alerts/a-1/ack", "devices/call-1/availability",
        "devices/call-1/events", "devices/call-1/light", "gateways/gw-1/status",
    },
    "ana": {"alerts/a-1", "alerts/a-1/ack", "pagers/ana", "pagers/nurse"},
    "wall-1": {
        "alerts/a-1", "alerts/a-1/ack", "devices/call-1/availability",
        "devices/call-2/availability", "silences", "silences/s-1",
        "zones/west/kudos", "polls/p-1/result",
    },
}  # fmt: skip
"""What a subscriber to ``#`` receives, per role, of the messages below."""

WRITES = [
    ("gateway", "alerts/a-1"),
    ("gateway", "pagers/ana"),
    ("gateway", "pagers/nurse"),
    ("gateway", "devices/call-1/availability"),
    ("gateway", "devices/call-2/availability"),
    ("gateway", "devices/call-1/light"),
    ("gateway", "devices/call-2/light"),
    ("gateway", "silences/s-1"),
    ("gateway", "zones/west/kudos"),
    ("gateway", "polls/p-1/result"),
    ("gateway", "gateways/gw-1/status"),
    ("call-1", "devices/call-1/events"),
    ("call-2", "devices/call-2/events"),
    ("ana", "staff/ana/ack"),
    ("ben", "staff/ben/resolve"),
    ("tech-1", "silences"),
    ("tech-1", "alerts/a-1/ack"),
]


def test_each_role_reads_only_its_own_topics(login, topics):
    """A subscription to '#' delivers only what the role may read."""
    every = {topic for _, topic in WRITES}
    expected = {**READERS, "tech-1": every, "gateway": every, "tester": every}
    readers = {user: login(user, "#") for user in expected}
    writers = {user: login(user) for user, _ in WRITES}
    base = f"facility/{topics.site}/"
    for user, topic in WRITES:
        writers[user].publish(base + topic, probe())
    last = topics.alert("zz-last")
    writers["gateway"].publish(last, probe())

    for user, reader in readers.items():
        reader.wait_for(on_topic(last), what=f"the last alert, read by {user}")
        got = {m.topic.removeprefix(base) for m in reader.messages if m.topic != last}
        assert got == expected[user], user


def test_a_device_reads_the_gateways_status_and_cannot_change_it(login, topics):
    """Our call stations wait for the retained ``online``; a device cannot fake it."""
    gateways = f"facility/{topics.site}/gateways/+/status"
    login("gateway").publish(topics.status, "online", retain=True)
    station = login("call-1", gateways, topics.alerts)
    station.wait_for(on_topic(topics.status), what="the retained status")

    # A device saying the gateway is offline, or speaking for another
    # gateway, is dropped; the retained status stays the gateway's own. The
    # sentinel on alerts/+, which devices read, comes after anything leaked.
    other = f"facility/{topics.site}/gateways/gw-2/status"
    for topic in (topics.status, other):
        login("call-2").publish(topic, "offline", retain=True)
    sentinel(login, topics, station)
    later = login("call-2", gateways, topics.alerts)
    sentinel(login, topics, later)
    for reader in (station, later):
        got = [
            (m.topic, m.payload, m.retain)
            for m in reader.messages
            if "/gateways/" in m.topic
        ]
        assert got == [(topics.status, b"online", True)]


# -- the site network: TLS and WebSockets --------------------------------------------


class SiteClient:
    """A pager or display on the site network (TLS, or WebSockets over TLS)."""

    def __init__(self, broker: PrivateBroker, user: str, transport: str) -> None:
        self.messages: list[paho.MQTTMessage] = []
        self._arrived = threading.Condition()
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"{user}-{uuid.uuid4().hex[:6]}",
            protocol=paho.MQTTv311,
            transport=transport,
        )
        self._client.username_pw_set(user, broker.passwords[user])
        self._client.tls_set(
            ca_certs=str(broker.ca_file), tls_version=ssl.PROTOCOL_TLS_CLIENT
        )
        self._client.on_message = self._on_message
        port = broker.websockets_port if transport == "websockets" else broker.tls_port
        self._client.connect(broker.host, port, keepalive=30)
        self._client.loop_start()

    def _on_message(self, client, userdata, message) -> None:
        with self._arrived:
            self.messages.append(message)
            self._arrived.notify_all()

    def subscribe(self, topic: str) -> None:
        info = self._client.subscribe(topic, qos=1)
        assert info[0] == paho.MQTT_ERR_SUCCESS

    def publish(self, topic: str, body: dict[str, Any]) -> None:
        info = self._client.publish(topic, json.dumps(body), qos=1)
        info.wait_for_publish(WAIT)
        assert info.is_published()

    def wait_for(self, topic: str) -> dict[str, Any]:
        def found() -> paho.MQTTMessage | None:
            return next((m for m in self.messages if m.topic == topic), None)

        with self._arrived:
            assert self._arrived.wait_for(found, WAIT), f"nothing on {topic}"
            return json.loads(found().payload)  # type: ignore[union-attr]

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


@pytest.mark.parametrize("transport", ["tcp", "websockets"])
def test_pager_and_display_work_over_the_site_network(broker, login, topics, transport):
    """Over TLS (and WebSockets with TLS) the same rules hold as on loopback."""
    pager = SiteClient(broker, "ana", transport)
    display = SiteClient(broker, "wall-1", transport)
    observer = login("tester", "#")
    pager.subscribe(f"facility/{topics.site}/pagers/#")
    display.subscribe(f"facility/{topics.site}/#")
    page = probe()
    login("gateway").publish(topics.pager("ana"), page)
    assert pager.wait_for(topics.pager("ana")) == page

    forged = {topics.staff("ana", "ack"): probe(), topics.events("call-1"): probe()}
    for topic, body in forged.items():
        display.publish(topic, body)
    allowed = probe()
    pager.publish(topics.staff("ana", "ack"), allowed)
    observer.wait_for_json(topics.staff("ana", "ack"), **allowed)
    assert [m.topic for m in observer.messages if m.json in forged.values()] == []
    pager.close()
    display.close()
    observer.close()


# -- a slow pager -------------------------------------------------------------------


def test_a_burst_to_an_absent_pager_is_kept_whole(broker, login, topics):
    """30,000 messages queued for a pager that is away all arrive when it is back.

    The size of a gateway reconnect during a mass escalation: 10,000 alert
    states plus two pages for each. Mosquitto's default queue (1,000) would
    drop all but the first thousand.
    """
    alerts, pages = 10_000, 20_000
    pager_id = f"pager-ana-{uuid.uuid4().hex[:6]}"
    subscriptions = [
        (f"facility/{topics.site}/alerts/#", 1),
        (f"facility/{topics.site}/pagers/#", 1),
    ]
    away = persistent_pager(broker, pager_id)
    away.subscribe(subscriptions)
    away.disconnect()
    away.loop_stop()

    burst = [(topics.alert(f"a-{n}"), {"n": n}) for n in range(alerts)]
    burst += [(topics.pager("nurse"), {"n": n}) for n in range(pages)]
    login("gateway").publish_many(burst)

    received: list[tuple[str, bytes]] = []
    done = threading.Event()

    def on_message(client, userdata, message) -> None:
        received.append((message.topic, bytes(message.payload)))
        if len(received) >= len(burst):
            done.set()

    back = persistent_pager(broker, pager_id, on_message=on_message)
    done.wait(60)
    back.disconnect()
    back.loop_stop()
    assert len(received) == len(burst)
    assert sorted(received) == sorted((t, json.dumps(b).encode()) for t, b in burst)


def persistent_pager(broker: PrivateBroker, client_id: str, on_message=None):
    """A pager keeping its session (clean_session=False), as the firmware does."""
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=paho.MQTTv311,
        clean_session=False,
    )
    client.username_pw_set("ana", broker.passwords["ana"])
    connected = threading.Event()
    client.on_connect = lambda *args: connected.set()
    if on_message is not None:
        client.on_message = on_message
    client.connect(broker.host, broker.port, keepalive=30)
    client.loop_start()
    assert connected.wait(WAIT), "pager could not connect"
    return client


# -- the gateway behind the shipped broker --------------------------------------------


def test_forged_events_reach_no_gateway(gateway, login, topics):
    """A device's press on another device's topic, or a display's, opens nothing."""
    display = login("wall-1", topics.alerts)
    forged = event("call-1")
    login("call-2").publish(topics.events("call-1"), forged)
    login("wall-1").publish(topics.events("call-1"), forged)
    press = event("call-1")
    login("call-1").publish(topics.events("call-1"), press)

    opened = display.wait_for_json(device="call-1", state="open")
    assert opened["event_id"] == press["id"]
    health = gateway.healthz()
    assert (health["events_accepted"], health["messages_rejected"]) == (1, {})
    assert gateway.query("SELECT device FROM alerts") == [{"device": "call-1"}]


def test_a_pager_cannot_ack_or_resolve_as_someone_else(gateway, login, topics):
    """Only a pager's own staff topic counts; forged acks and resolves reach nobody."""
    display = login("wall-1", topics.alerts)
    ana, chloe, wall = login("ana"), login("chloe"), login("wall-1")
    login("call-1").publish(topics.events("call-1"), event("call-1"))
    alert = display.wait_for_json(device="call-1", state="open")["id"]

    ana.publish(topics.staff("ben", "ack"), {"alert": alert})
    ana.publish(topics.ack(alert), {"staff": "ben"})
    wall.publish(topics.ack(alert), {"staff": "dev"})
    wall.publish(topics.staff("wall-1", "ack"), {"alert": alert})
    login("call-2").publish(topics.staff("dev", "ack"), {"alert": alert})
    ana.publish(topics.staff("ana", "ack"), {"alert": alert})
    acked = display.wait_for_json(id=alert, state="acknowledged")
    assert acked["acked_by"] == "ana"

    ana.publish(topics.staff("ben", "resolve"), {"alert": alert})
    ana.publish(topics.resolve(alert), {"staff": "ben"})
    wall.publish(topics.resolve(alert), {"staff": "dev"})
    chloe.publish(topics.staff("chloe", "resolve"), {"alert": alert})
    resolved = display.wait_for_json(id=alert, state="resolved")
    assert (resolved["resolved_by"], resolved["resolved_via"]) == ("chloe", "pager")
    assert gateway.healthz()["messages_rejected"] == {}


def test_a_technician_acks_on_the_older_topic(gateway, login, topics):
    """The console may still ack naming the staff member in the body."""
    display = login("wall-1", topics.alerts)
    login("call-3").publish(topics.events("call-3"), event("call-3"))
    alert = display.wait_for_json(device="call-3", state="open")["id"]

    login("tech-1").publish(topics.ack(alert), {"staff": "ben"})
    acked = display.wait_for_json(id=alert, state="acknowledged")
    assert acked["acked_by"] == "ben"


# -- who gets a user ------------------------------------------------------------------


def test_devices_wired_to_the_pi_get_no_mqtt_user():
    """GPIO and serial-hub devices never connect to the broker, so get no password."""
    site = site_users(load_config(ROOT / "sites" / "demo-ward.yaml"))
    roles = {user.name: user.role for user in site.users}
    assert roles["gateway"] == "gateway"
    assert roles["call-301"] == "device"  # an MQTT call station
    assert roles["ana"] == "pager"
    assert "call-306" not in roles  # on the Pi's GPIO pins
    assert "door-3w" not in roles  # on the serial sensor hub


def test_a_name_used_by_two_roles_is_refused(tmp_path, topics):
    """A staff id equal to a device id would share one password and one ACL."""
    config = site_config(topics.site)
    config["staff"][0]["id"] = "call-2"
    site = load_config(write_site(tmp_path / "site.yaml", config))
    with pytest.raises(BrokerConfigError, match="'call-2' is both a device and a pag"):
        site_users(site)


@pytest.mark.parametrize("name", ["wall 1", "wall/1", "wall+", "#", "a:b", "-x"])
def test_a_name_that_cannot_be_a_topic_level_is_refused(tmp_path, topics, name):
    """A name goes into topics and ACL lines verbatim, so it must be plain."""
    site = load_config(write_site(tmp_path / "site.yaml", site_config(topics.site)))
    with pytest.raises(BrokerConfigError, match="becomes a topic level"):
        site_users(site, [("display", name)])


def test_extra_users_file_names_the_bad_line(tmp_path):
    extra = tmp_path / "broker-users"
    extra.write_text("# walls\ndisplay wall-1\n\npager ana\n")
    with pytest.raises(BrokerConfigError, match=r"broker-users:4: .*'pager ana'"):
        read_extra_users(extra)
    extra.write_text("display wall-1  # by the lifts\ntechnician tech-1\n")
    assert read_extra_users(extra) == [("display", "wall-1"), ("technician", "tech-1")]


def test_a_mapped_esphome_topic_belongs_to_its_device(tmp_path, topics):
    """Only the device a site file maps a foreign topic to may publish on it."""
    mapped = f"esphome/{topics.site}/call-4/binary_sensor/call/state"
    config = site_config(topics.site)
    config["mqtt_devices"] = [
        {"device": "call-4", "topic": mapped, "dialect": "esphome", "press": "call"}
    ]
    site = site_users(load_config(write_site(tmp_path / "site.yaml", config)))
    broker = PrivateBroker(tmp_path / "mapped", site=site)
    broker.start()
    clients: list[MqttClient] = []
    try:
        gateway, call_3, call_4 = (
            MqttClient(broker, user) for user in ("gateway", "call-3", "call-4")
        )
        clients += [gateway, call_3, call_4]
        gateway.subscribe(mapped)
        forged, pressed = probe(), probe()
        call_3.publish(mapped, forged)
        call_4.publish(mapped, pressed)
        gateway.wait_for_json(mapped, **pressed)
        assert [m.json for m in gateway.messages] == [pressed]
    finally:
        for client in clients:
            client.close()
        broker.kill()
