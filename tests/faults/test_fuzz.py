"""Hypothesis against every input: MQTT payloads, serial frames, site files.

The property is the same for each: an input is taken or refused with the
documented error type and a specific reason (a short counter key and a
message that is not empty and not a bare repr), never anything else, and
within a per-case time bound. ``FAULTS_SIZE=large`` runs 100,000 cases per
input. Web forms are fuzzed over HTTP against a real gateway in
``test_fuzz_web.py``.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from drivers.mqtt_device import RejectedMessage
from drivers.serial_hub import (
    FrameError,
    HubSettings,
    LineSplitter,
    encode_frame,
    frame_events,
    parse_frame,
)
from gateway.config import ConfigError, GatewayConfig, load_config
from gateway.service import Gateway
from gateway.sources import build_drivers
from rules.engine import EngineError
from rules.events import Event
from tests.faults.conftest import SEED, sized
from tests.helpers import event as helpers_event
from tests.helpers import site_config

pytestmark = pytest.mark.timeout(sized(120, 1800))

CASES = sized(300, 100_000)
SITE_CASES = sized(100, 10_000)
"""Site files load in about 30 ms a case (YAML, pydantic, then the line of
every problem), so the large size runs 10,000 of them, not 100,000."""
CASE_LIMIT = 1.0
"""Seconds one case may take: a parser that hangs fails here, not in CI's timeout."""

REASON = re.compile(r"[a-z][a-z_]{2,39}")

DEVICES = ["call-1", "call-2", "mood-staffroom", "rx-1", "ghost-9", ""]
STAFF = ["ana", "ben", "chloe", "mallory", ""]
TYPES = ["call", "cancel", "heartbeat", "reading", "feedback", "enter", "leave"]
TYPES += ["mood", "visit", "cleaned", "offline", "press", "x"]
FIELDS = ["id", "type", "device", "ts", "staff", "alert", "poll", "answer", "until"]
FIELDS += ["reason", "zone", "badge", "rssi", "reading", "value", "score", "state"]
FIELDS += ["action", "event_type", "x"]
POLL = "monday-mood"
BADGE = "ibeacon:f7826da6-4fa2-4e98-8024-bc5b71e0893e:3:301"
ESPHOME = "esphome/call-1/binary_sensor/call/state"
Z2M = "zigbee2mqtt/button-2"


def fuzz_settings(
    cases: int = CASES,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return lambda test: seed(SEED)(
        settings(
            max_examples=cases,
            deadline=None,  # timed by Checker instead: one bound, counted
            database=None,
            suppress_health_check=list(HealthCheck),
        )(test)
    )


class Checker:
    """Counts outcomes and holds every refusal to the property."""

    def __init__(self, allowed: tuple[type[Exception], ...]) -> None:
        self.allowed = allowed
        self.cases = 0
        self.taken = 0
        self.reasons: Counter[str] = Counter()
        self.slowest = 0.0

    def run(self, action: Callable[[], Any]) -> None:
        started = time.perf_counter()
        try:
            action()
        except self.allowed as exc:
            self.refused(exc)
        else:
            self.taken += 1
        finally:
            self.cases += 1
            spent = time.perf_counter() - started
            self.slowest = max(self.slowest, spent)
        assert spent < CASE_LIMIT, f"one case took {spent:.2f}s"

    def refused(self, exc: Exception) -> None:
        reason = getattr(exc, "reason", None)
        if isinstance(exc, ConfigError):
            reason = "config_error"
            assert exc.problems, "a ConfigError without a problem"
            for problem in exc.problems:
                assert problem.strip(), exc.problems
                assert "Traceback" not in problem, problem
        assert isinstance(reason, str), f"{exc!r} has no reason"
        assert REASON.fullmatch(reason), f"reason {reason!r} of {exc!r}"
        message = str(exc)
        assert message.strip(), f"{exc!r} has an empty message"
        assert message != repr(exc), f"{exc!r}: the message is a bare repr"
        self.reasons[reason] += 1

    def figures(self) -> dict[str, Any]:
        return {
            "cases": self.cases,
            "taken": self.taken,
            "rejections_top": dict(self.reasons.most_common(5)),
            "crashes": 0,  # any other exception fails the test before this
            "slowest_case_s": round(self.slowest, 4),
        }


# -- MQTT, through the gateway's own handling ---------------------------------------


def fuzz_site(site_id: str) -> dict[str, Any]:
    site = site_config(site_id)
    site["devices"] += [
        {"id": "mood-staffroom", "kind": "mood_button"},
        {"id": "rx-1", "kind": "ble_receiver", "room": "room-1"},
        {"id": "button-2", "kind": "call_button", "room": "room-2"},
    ]
    site["staff"][0]["badge"] = BADGE
    site["presence"] = {"receivers": {"rx-1": "room-1"}}
    site["polls"] = [
        {
            "id": POLL,
            "question": "How is your week starting?",
            "answers": ["great", "okay", "rough"],
            "roles": ["nurse"],
            "ask": {"days": ["mon"], "at": "09:00"},
            "open_for": "8h",
            "buttons": ["mood-staffroom"],
        }
    ]
    site["mqtt_devices"] = [
        {"device": "call-1", "topic": ESPHOME, "dialect": "esphome", "press": "call"},
        {
            "device": "button-2",
            "topic": Z2M,
            "dialect": "zigbee2mqtt",
            "actions": {"single": "call"},
        },
    ]
    return site


@pytest.fixture(scope="module")
def fuzz_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """The real Gateway, not running: its handling is called as the loop would."""
    folder = tmp_path_factory.mktemp("fuzz")
    site = fuzz_site("fuzz") | {"database": {"path": str(folder / "fuzz.db")}}
    config = GatewayConfig.model_validate(site)
    gateway = Gateway(config, drivers=build_drivers(config))
    events: list[Event] = []
    for n in (1, 2, 3):
        body = {"id": f"open-{n}", "type": "call", "device": f"call-{n}", "ts": 1.0}
        topic = gateway.topics.device_events.replace("+", f"call-{n}")
        gateway._take((topic, json.dumps(body).encode(), False, (0, 0, 1)), events)
    yield gateway
    gateway.store.close()


ALERT = "@alert"
"""Stands for the id of an alert open at the time of the case."""

POOL = DEVICES + STAFF + TYPES + [ALERT, POLL, "great", BADGE, 1_790_000_000.0]
WHO = DEVICES + STAFF + [ALERT, "s1", POLL]
TOPICS = [
    "{b}/devices/{k}/events",
    "{b}/devices/{k}/sightings",
    "{b}/staff/{k}/ack",
    "{b}/staff/{k}/resolve",
    "{b}/staff/{k}/answer",
    "{b}/alerts/{k}/ack",
    "{b}/alerts/{k}/resolve",
    "{b}/silences",
    "{b}/silences/{k}/end",
    "{b}/polls/{k}/answer",
    ESPHOME,
    Z2M,
]


def json_value(pool: list[Any]) -> st.SearchStrategy[Any]:
    scalars = st.one_of(
        st.sampled_from(pool),
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=30),
    )
    return st.recursive(
        scalars,
        lambda inner: (
            st.lists(inner, max_size=3)
            | st.dictionaries(st.text(max_size=8), inner, max_size=3)
        ),
        max_leaves=6,
    )


def payloads(pool: list[Any]) -> st.SearchStrategy[bytes]:
    bodies = st.dictionaries(st.sampled_from(FIELDS), json_value(pool), max_size=7)
    as_json = bodies.map(lambda body: json.dumps(body).encode())
    return st.one_of(
        as_json,
        as_json.map(lambda b: b[: len(b) // 2]),
        json_value(pool).map(lambda value: json.dumps(value).encode()),
        st.binary(max_size=300),
        st.sampled_from([b"ON", b"OFF", b"", b"\xff", b"x" * 5000]),
    )


PAYLOADS = payloads(POOL)


@fuzz_settings()
@given(
    template=st.sampled_from(TOPICS),
    who=st.sampled_from(WHO),
    payload=PAYLOADS,
    retain=st.sampled_from([False, False, False, False, True]),
)
def _mqtt(
    template: str,
    who: str,
    payload: bytes,
    retain: bool,
    gateway: Gateway,
    checker: Checker,
) -> None:
    base = gateway.topics.device_events.rsplit("/devices/", 1)[0]
    alerts = [a.id for a in gateway.engine.alerts] or ["0123456789abcdef"]
    alert = alerts[len(payload) % len(alerts)]
    topic = template.format(b=base, k=who.replace(ALERT, alert))
    payload = payload.replace(ALERT.encode(), alert.encode())

    def handle() -> None:
        if topic.endswith("/sightings"):
            tracker = gateway._tracker
            assert tracker is not None
            limit = gateway.config.mqtt.max_payload
            tracker.feed_message(topic.split("/")[-2], payload, limit)
            return
        gateway._take((topic, payload, retain, (0, 0, 1)), [])

    checker.run(handle)


def test_fuzz_mqtt_payloads_on_every_topic_the_gateway_reads(fuzz_gateway, figures):
    checker = Checker((RejectedMessage, EngineError))
    _mqtt(gateway=fuzz_gateway, checker=checker)
    # What the engine made of it all can be committed.
    fuzz_gateway._commit_and_publish([], fuzz_gateway.engine.advance())
    assert fuzz_gateway.store.integrity_ok()
    figures.update(input="mqtt", seed=SEED, **checker.figures())
    assert checker.taken > 0
    assert len(checker.reasons) >= 3


# -- serial frames ----------------------------------------------------------------

HUB = HubSettings(device="hub-1", channels={"1": "wc-counter", "2": "wc-soap"})
KEYS = st.sampled_from(["ch", "n", "soap_level", "towel_level", "open", "x", "c1"])
VALUES = st.one_of(
    st.integers(-(10**10), 10**10),
    st.floats(-1e6, 1e6),
    st.sampled_from(["1", "2", "0", "nan", "inf", "1e5", "-", "abc"]),
    st.from_regex(r"[A-Za-z0-9._:+-]{1,12}", fullmatch=True),
)


@st.composite
def lines(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["HB", "VIS", "LVL", "DOOR", "SMILE", "BAD", "lvl"]))
    fields = draw(st.dictionaries(KEYS, VALUES, max_size=4))
    try:
        frame = encode_frame(
            draw(st.sampled_from(["hub-1", "hub-2", "x" * 20])),
            draw(st.integers(0, 70_000)),
            kind,
            **fields,
        )
    except ValueError:
        frame = b"$HUB,1,hub-1,1,HB*0000\r\n"
    if draw(st.booleans()):
        at = draw(st.integers(0, len(frame) - 1))
        frame = frame[:at] + draw(st.binary(max_size=3)) + frame[at + 1 :]
    return draw(st.sampled_from([frame, frame.rstrip(b"\r\n")]))


@fuzz_settings(CASES // 3)
@given(chunks=st.lists(lines() | st.binary(max_size=200), max_size=4))
def _serial(chunks: list[bytes], checker: Checker) -> None:
    splitter = LineSplitter()
    found: list[tuple[bytes, FrameError | None]] = []
    for chunk in chunks:
        checker.run(lambda c=chunk: found.extend(splitter.feed(c)))
    for line, error in found:
        if error is not None:
            checker.refused(error)
            continue
        checker.run(lambda line=line: frame_events(parse_frame(line), HUB))


def test_fuzz_serial_frames(figures):
    checker = Checker((FrameError,))
    _serial(checker=checker)
    figures.update(input="serial", seed=SEED, **checker.figures())
    assert checker.taken > 0
    assert len(checker.reasons) >= 4


# -- site files ---------------------------------------------------------------------

VALID = site_config("fuzz")


@st.composite
def site_texts(draw: st.DrawFn) -> str:
    """A valid site file with a few values replaced or removed, or raw text."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.text(max_size=200))
    site = json.loads(json.dumps(VALID))
    for _ in range(draw(st.integers(1, 3))):
        node = site
        path: list[Any] = []
        while isinstance(node, dict | list) and node and draw(st.booleans()):
            key = draw(
                st.sampled_from(
                    list(node) if isinstance(node, dict) else range(len(node))
                )
            )
            path.append(key)
            node = node[key]
        if not path:
            key = draw(st.sampled_from(list(site) + ["extra", "rulez"]))
            path = [key]
        parent = site
        for key in path[:-1]:
            parent = parent[key]
        if isinstance(parent, dict) and draw(st.booleans()):
            parent.pop(path[-1], None)
        else:
            parent[path[-1]] = draw(
                json_value(["call_button", "nurse", "0s", "-1s", "ana"])
            )
    return yaml.safe_dump(site, sort_keys=False)


@fuzz_settings(SITE_CASES)
@given(text=site_texts())
def _site(text: str, file: Path, checker: Checker) -> None:
    file.write_text(text)
    checker.run(lambda: load_config(file, {}))


def test_fuzz_site_files(tmp_path, figures):
    checker = Checker((ConfigError,))
    _site(file=tmp_path / "site.yaml", checker=checker)
    figures.update(input="site file", seed=SEED, **checker.figures())
    assert checker.taken > 0
    assert checker.reasons["config_error"] > checker.cases // 2


# -- MQTT, through a real gateway process -------------------------------------------

PROCESS_CASES = sized(200, 5_000)
"""Published to a running gateway: a short run, the parsers above take the bulk."""


def test_fuzz_mqtt_through_a_running_gateway(start_gateway, mqtt, topics, figures):
    gateway = start_gateway(site=fuzz_site(topics.site))
    display = mqtt(topics.alerts)
    client = mqtt()
    opened = "call-3"
    client.publish(topics.events(opened), helpers_event(opened))
    alert = display.wait_for_json(device=opened, state="open")["id"]
    base = f"facility/{topics.site}"

    @seed(SEED)
    @settings(
        max_examples=PROCESS_CASES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(template=st.sampled_from(TOPICS), who=st.sampled_from(WHO), body=PAYLOADS)
    def publish(template: str, who: str, body: bytes) -> None:
        topic = template.format(b=base, k=who.replace(ALERT, alert))
        client.publish(topic, body.replace(ALERT.encode(), alert.encode()))

    publish()
    # Still alive and answering: a call opens, /healthz counts the refusals.
    client.publish(topics.events("call-4"), helpers_event("call-4"))
    display.wait_for_json(device="call-4", state="open", timeout=30)
    health = gateway.healthz()
    rejected = health["messages_rejected"]
    figures.update(
        input="mqtt to a gateway process",
        seed=SEED,
        cases=PROCESS_CASES,
        rejections_top=dict(Counter(rejected).most_common(5)),
        events_accepted=health["events_accepted"],
    )
    assert gateway.running
    assert sum(rejected.values()) > PROCESS_CASES // 4
