"""The ESPHome device configurations in firmware-config/ against the MQTT contract.

Each file must parse, name its topics as the contract does, build payloads with
the contract's keys, and publish nothing retained except its status. The
C++ in the files' lambdas is compiled with the host's ``g++`` against small
stand-ins for the ESPHome API and run: the BLE receiver's badge ids are
compared with ``drivers.presence``, the pager is fed notices built by
``gateway.contract.pager_payload``. Neither replaces a build for the ESP32
(``esphome compile``), which needs a toolchain download; ``esphome config``
runs when the ``esphome`` command is there (or ``ESPHOME`` names it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from drivers.mqtt_device import parse_event
from drivers.presence import canonical_badge_id, eddystone_id, ibeacon_id
from gateway.contract import Topics, pager_payload
from gateway.polls import Poll, Question, parse_answer
from gateway.web.devices import TEST_SECONDS
from rules.alerts import AlertState, Notification
from rules.dome import LIGHTS
from rules.lifecycle import PAGING
from rules.schema import FeedbackRule

ROOT = Path(__file__).resolve().parent.parent
FIRMWARE = ROOT / "firmware-config"
ESPHOME = FIRMWARE / "esphome"
INCLUDE = ESPHOME / "include"
CONFIGS = sorted(p for p in ESPHOME.glob("*.yaml") if p.name != "secrets.yaml")
NAMES = [p.name for p in CONFIGS]

EVENT_KEYS = {"id", "type", "device", "ts"}
"""Every device event carries these (README, "MQTT contract")."""

EXTRA_KEYS = {
    "call": set(),
    "cancel": set(),
    "visit": set(),
    "feedback": {"score"},
    "reading": {"reading", "value"},
    "heartbeat": {"uptime"},
}
"""Event type -> the fields of that type a device may add."""

SCORES = set(FeedbackRule.model_fields["negative"].default) | set(
    FeedbackRule.model_fields["positive"].default
)
READINGS = {"soap_level", "towel_level", "paper_level", "sanitizer_level"}
"""Dispenser readings, as named in serial-hub-protocol.md."""

COMMAND_KEYS = {"alert", "id"}
ANSWER_KEYS = {"poll", "answer", "id"}
"""A pager's answer to a mood poll (README, "MQTT contract")."""
STATUS = "facility/${site}/devices/${device_id}/status"
PAGER_STATUS = "facility/${site}/staff/${staff_id}/status"
"""A pager's MQTT user is its wearer's staff id: it lives under the staff topic."""
ROOT_KEY = re.compile(r'root\["(\w+)"\]')
ROOT_VALUE = re.compile(r'root\["(\w+)"\]\s*=\s*([^;]+);')
JSON_READ = re.compile(r'x\["(\w+)"\]')
SUBSTITUTION = re.compile(r"\$\{(\w+)\}|\$(\w+)")
LAMBDA_PUBLISH = re.compile(
    r'publish_json\(\s*"([^"]+)",\s*\[[^\]]*\]\(JsonObject root\)\s*\{'
)
LAMBDA_PUBLISH_END = re.compile(r"\s*,\s*(\d)\s*,\s*(true|false)\s*\)")
PRESS_FIELD = re.compile(r"press\.(\w+)\s*=\s*([^;]+);")
"""A queued press's field set in a lambda: ``press.type = "feedback";``."""


# -- reading ESPHome YAML --------------------------------------------------------


class Lambda(str):
    """A ``!lambda`` value: C++ source."""


class Secret(str):
    """A ``!secret`` value: the name of a key in secrets.yaml."""


class EspHomeLoader(yaml.SafeLoader):
    """PyYAML's safe loader plus the ESPHome tags these files use."""


EspHomeLoader.add_constructor(
    "!lambda", lambda loader, node: Lambda(loader.construct_scalar(node))
)
EspHomeLoader.add_constructor(
    "!secret", lambda loader, node: Secret(loader.construct_scalar(node))
)


def load(path: Path) -> dict[str, Any]:
    config = yaml.load(path.read_text(), Loader=EspHomeLoader)  # noqa: S506
    assert isinstance(config, dict), f"{path.name} is not a mapping"
    return config


def substitute(text: str, substitutions: dict[str, Any]) -> str:
    def one(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        return str(substitutions[name]) if name in substitutions else match.group(0)

    return SUBSTITUTION.sub(one, text)


def walk(node: Any, script: str | None = None) -> Iterator[tuple[dict, str | None]]:
    """Every mapping in the tree, with the id of the script it is in, if any."""
    if isinstance(node, dict):
        yield node, script
        for value in node.values():
            yield from walk(value, script)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item, script)


def mappings(config: dict[str, Any]) -> Iterator[tuple[dict, str | None]]:
    for key, value in config.items():
        if key == "script":
            for script in value:
                yield from walk(script, script["id"])
        else:
            yield from walk(value)


def publishes(config: dict[str, Any]) -> list[tuple[dict, str | None]]:
    """(mqtt.publish or mqtt.publish_json settings, enclosing script id).

    A ``publish_json`` call in a lambda (the press queue's) is read into the
    same settings: topic, qos, retain and the payload's body.
    """
    found = []
    for node, script in mappings(config):
        for action in ("mqtt.publish", "mqtt.publish_json"):
            if action in node:
                found.append((node[action], script))
        for value in node.values():
            if isinstance(value, str):
                found += [(call, script) for call in lambda_publishes(value)]
    return found


def lambda_publishes(source: str) -> list[dict[str, Any]]:
    calls = []
    for match in LAMBDA_PUBLISH.finditer(source):
        depth, end = 1, match.end()
        while depth:
            depth += {"{": 1, "}": -1}.get(source[end], 0)
            end += 1
        tail = LAMBDA_PUBLISH_END.match(source, end)
        assert tail, f"cannot read the qos and retain of {match.group(0)}"
        calls.append(
            {
                "topic": match.group(1),
                "qos": int(tail.group(1)),
                "retain": tail.group(2) == "true",
                "payload": source[match.end() : end - 1],
            }
        )
    return calls


def press_values(config: dict[str, Any], field: str) -> set[str]:
    """Every value a queued press's ``field`` gets, through script arguments."""
    values = set()
    for node, script in mappings(config):
        for source in (v for v in node.values() if isinstance(v, str)):
            for name, value in PRESS_FIELD.findall(source):
                if name != field:
                    continue
                value = value.strip()
                if literal(value) is not None:
                    values.add(literal(value))
                else:
                    assert script, f"press.{field} = {value} comes from nowhere"
                    values |= script_arguments(config, script, value)
    return values


def script_arguments(config: dict[str, Any], script: str, name: str) -> set[str]:
    """Every value passed as ``name`` to ``script`` by a script.execute."""
    values = set()
    for node, _ in mappings(config):
        call = node.get("script.execute")
        if isinstance(call, dict) and call.get("id") == script and name in call:
            values.add(str(call[name]))
    return values


def assigned(payload: str, key: str) -> set[str]:
    return {value.strip() for k, value in ROOT_VALUE.findall(payload) if k == key}


def literal(value: str) -> str | None:
    match = re.fullmatch(r'"([^"]*)"', value)
    return match.group(1) if match else None


@pytest.fixture(scope="module", params=NAMES)
def config(request: pytest.FixtureRequest) -> dict[str, Any]:
    return load(ESPHOME / request.param)


def by_name(name: str) -> dict[str, Any]:
    return load(ESPHOME / name)


# -- every file -------------------------------------------------------------------


def test_every_device_is_here() -> None:
    assert set(NAMES) >= {
        "call-station.yaml",
        "feedback-terminal.yaml",
        "restroom-hub.yaml",
        "ble-receiver.yaml",
        "pager.yaml",
    }


def test_device_identity_and_mqtt_user(config: dict[str, Any]) -> None:
    subs = config["substitutions"]
    assert {"site", "device_id"} <= subs.keys()
    assert config["esphome"]["name"] == "${device_id}"
    mqtt = config["mqtt"]
    # One MQTT user per device (per wearer, for a pager): the broker's ACL
    # keys on it.
    user = "${staff_id}" if "staff_id" in subs else "${device_id}"
    assert mqtt["username"] == user
    assert isinstance(mqtt["password"], Secret)
    assert isinstance(mqtt["broker"], Secret)
    assert mqtt["discovery"] is False
    # Without Home Assistant, `api:` would reboot the node every 15 minutes.
    assert "api" not in config


def test_nothing_retained_but_status(config: dict[str, Any]) -> None:
    mqtt = config["mqtt"]
    status = PAGER_STATUS if "staff_id" in config["substitutions"] else STATUS
    for message in ("birth_message", "will_message", "shutdown_message"):
        assert mqtt[message]["topic"] == status, message
        assert mqtt[message]["retain"] is True, message
    assert (mqtt["birth_message"]["payload"], mqtt["will_message"]["payload"]) == (
        "online",
        "offline",
    )
    # ESPHome retains its log topic and every entity's state unless told not to.
    assert "log_topic" in mqtt, "log_topic: null, or ESPHome retains its logs"
    assert mqtt["log_topic"] is None
    assert mqtt["topic_prefix"].startswith(status.removesuffix("status"))
    for domain in ("binary_sensor", "sensor", "text_sensor", "switch", "button"):
        for entity in config.get(domain, []):
            assert entity.get("internal") is True or entity.get("retain") is False, (
                f"{domain} {entity.get('id')} would publish a retained state"
            )
    for action, _ in publishes(config):
        assert action.get("retain") is False, action["topic"]


def test_secrets_are_in_the_example(config: dict[str, Any]) -> None:
    example = yaml.safe_load((ESPHOME / "secrets.yaml.example").read_text())
    used = {node for node, _ in _scalars(config) if isinstance(node, Secret)}
    assert used <= example.keys()


def _scalars(node: Any) -> Iterator[tuple[Any, None]]:
    if isinstance(node, dict):
        for value in node.values():
            yield from _scalars(value)
    elif isinstance(node, list):
        for item in node:
            yield from _scalars(item)
    else:
        yield node, None


def test_files_it_reads_are_shipped(config: dict[str, Any]) -> None:
    for font in config.get("font", []):
        assert (ESPHOME / font["file"]).is_file(), font["file"]


# -- device events ----------------------------------------------------------------


def test_events_follow_the_contract(config: dict[str, Any]) -> None:
    subs = config["substitutions"]
    for action, script in publishes(config):
        topic = action["topic"]
        match = re.fullmatch(r"facility/\$\{site\}/devices/\$\{(\w+)\}/events", topic)
        if not match:
            continue
        device = match.group(1)
        assert device == "device_id" or (device.endswith("_id") and device in subs)
        assert action["qos"] == 1, topic
        payload = action["payload"]
        keys = set(ROOT_KEY.findall(payload))
        assert keys >= EVENT_KEYS, f"{topic}: missing {EVENT_KEYS - keys}"
        # The gateway refuses a payload naming another device than its topic.
        assert assigned(payload, "device") == {f'"${{{device}}}"'}

        types = set()
        for value in assigned(payload, "type"):
            if literal(value) is not None:
                types.add(literal(value))
            elif value.startswith("p->"):
                types |= press_values(config, value.removeprefix("p->"))
            else:
                assert script, f"{topic}: type {value} comes from nowhere"
                types |= script_arguments(config, script, value)
        assert types, topic
        assert types <= EXTRA_KEYS.keys(), types
        allowed = EVENT_KEYS.union(*(EXTRA_KEYS[t] for t in types))
        assert keys <= allowed, f"{topic}: unknown keys {keys - allowed}"
        if "feedback" in types:
            (score,) = assigned(payload, "score")
            if score.startswith("p->"):
                assert press_values(config, score.removeprefix("p->")) == SCORES
            else:
                assert script_arguments(config, script, score) == SCORES
        for value in assigned(payload, "reading"):
            assert literal(value) in READINGS


def test_event_topics_are_the_devices_own(config: dict[str, Any]) -> None:
    """Only its own ids: the broker's ACL refuses anything else."""
    subs = config["substitutions"]
    ids = {key for key in subs if key == "device_id" or key.endswith("_id")}
    for action, _ in publishes(config):
        topic = action["topic"]
        if topic.startswith("facility/${site}/devices/"):
            device = topic.split("/")[3]
            assert device.startswith("${"), topic
            assert device[2:-1] in ids, topic


def test_restroom_hub_devices() -> None:
    config = by_name("restroom-hub.yaml")
    topics = {action["topic"] for action, _ in publishes(config)}
    assert topics == {
        "facility/${site}/devices/${counter_id}/events",
        "facility/${site}/devices/${dispenser_id}/events",
    }
    assert script_arguments(config, "send_counter_event", "kind") == {
        "visit",
        "heartbeat",
    }
    assert script_arguments(config, "send_dispenser_event", "kind") == {
        "reading",
        "heartbeat",
    }
    (heartbeat,) = config["interval"]
    assert heartbeat["interval"] == "60s"


def test_feedback_terminal_scores() -> None:
    config = by_name("feedback-terminal.yaml")
    assert script_arguments(config, "send_feedback", "score") == SCORES
    for button in config["binary_sensor"]:
        assert button["filters"], f"{button['id']} has no debounce"


# -- sightings --------------------------------------------------------------------


def test_sightings_follow_the_contract() -> None:
    config = by_name("ble-receiver.yaml")
    ((action, _),) = publishes(config)
    assert action["topic"] == "facility/${site}/devices/${device_id}/sightings"
    assert action["qos"] in (0, 1)
    keys = set(ROOT_KEY.findall(action["payload"]))
    assert {"badge", "rssi"} <= keys <= {"badge", "rssi", "ts"}
    assert config["esp32_ble_tracker"]["scan_parameters"]["active"] is False


def test_receiver_filters_are_canonical() -> None:
    subs = by_name("ble-receiver.yaml")["substitutions"]
    if subs["badge_uuid"]:
        badge = f"ibeacon:{subs['badge_uuid']}:1:1"
        assert canonical_badge_id(badge) == badge
    if subs["eddystone_namespace"]:
        badge = f"eddystone:{subs['eddystone_namespace']}:000000000001"
        assert canonical_badge_id(badge) == badge


def test_badge_plan_ids_are_canonical() -> None:
    plan = (FIRMWARE / "badge-plan.md").read_text()
    ids = re.findall(r"\b(?:ibeacon|eddystone):[0-9a-f:-]+[0-9a-f]", plan)
    assert ids, "the badge plan shows no badge id"
    for badge in ids:
        if "<" not in badge:
            assert canonical_badge_id(badge) == badge


# -- pager -------------------------------------------------------------------------


def fake_change(alert_id: str, version: int, reason: str, **alert: Any) -> bytes:
    """A real pager payload, from the gateway's own contract code."""
    values = {
        "id": alert_id,
        "version": version,
        "rule": "patient-call",
        "room": "room-301",
        "zone": "west",
        "device": "call-301",
        "acked_by": None,
        "state": AlertState.OPEN,
        "level": 1,
        "priority": "routine",
    } | alert
    note = Notification(alert.get("target", "nurse"), alert_id, values["level"], reason)
    return pager_payload(SimpleNamespace(alert=SimpleNamespace(**values)), note)


QUESTION = Question(
    Poll.model_validate(
        {
            "id": "monday-mood",
            "question": "How is your week starting? Be honest, it stays anonymous.",
            "answers": ["great", "okay", "rough"],
            "roles": ["nurse"],
            "ask": {"days": ["mon"], "at": "09:00"},
            "open_for": "8h",
        }
    ),
    "2026-11-30T09:00",
    1767254400.0 + 8 * 3600,
)
"""A round of a poll, paged by the gateway's own code."""


def test_pager_subscribes_to_its_person_and_role() -> None:
    mqtt = by_name("pager.yaml")["mqtt"]
    topics = {entry["topic"] for entry in mqtt["on_json_message"]}
    assert topics == {
        "facility/${site}/pagers/${staff_id}",
        "facility/${site}/pagers/${role}",
    }
    assert {entry["qos"] for entry in mqtt["on_json_message"]} == {1}
    assert mqtt["clean_session"] is False


def test_pager_reads_only_contract_keys() -> None:
    body = json.loads(fake_change("a1", 3, "opened"))
    question = json.loads(QUESTION.payload("nurse"))
    text = (ESPHOME / "pager.yaml").read_text()
    assert set(JSON_READ.findall(text)) <= body.keys() | question.keys()
    assert {"poll", "round", "question", "answers", "closes_at"} <= set(
        JSON_READ.findall(text)
    )
    # The pager reads the alert version from the id; keep the two in step.
    assert body["id"] == f"a1:3:{body['target']}"
    for reason in (*PAGING, "acknowledged", "resolved"):
        assert f'"{reason}"' in text, f"the pager ignores {reason!r}"


def test_pager_commands_follow_the_contract() -> None:
    config = by_name("pager.yaml")
    verbs = set()
    for action, _ in publishes(config):
        # Only its wearer's own staff topic: the broker's ACL allows no other.
        topic = action["topic"]
        match = re.fullmatch(r"facility/\$\{site\}/staff/\$\{staff_id\}/(\w+)", topic)
        assert match, topic
        verbs.add(match.group(1))
        assert action["qos"] == 1
        payload = action["payload"]
        if match.group(1) == "answer":
            assert set(ROOT_KEY.findall(payload)) == ANSWER_KEYS
            continue
        assert set(ROOT_KEY.findall(payload)) == COMMAND_KEYS
        assert assigned(payload, "alert") == {"id(target_alert)"}
    assert verbs == {"ack", "resolve", "answer"}


# -- documentation ---------------------------------------------------------------


def test_readme_lists_every_file() -> None:
    readme = (FIRMWARE / "README.md").read_text()
    for path in sorted(FIRMWARE.rglob("*")):
        if path.is_file() and path.name not in ("secrets.yaml", "README.md"):
            name = path.relative_to(FIRMWARE).as_posix()
            folder = path.parent.relative_to(FIRMWARE).as_posix()
            listed = f"`{name}`" in readme or f"`{folder}/`" in readme
            assert listed, f"firmware-config/README.md does not list {name}"


# -- the lambdas, compiled and run on the host ----------------------------------

GXX = shutil.which("g++")
needs_gxx = pytest.mark.skipif(GXX is None, reason="g++ is not installed")

STUBS = r"""
#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <functional>
#include <iostream>
#include <map>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

using std::to_string;
static uint32_t fake_millis = 1000;
static uint32_t millis() { return fake_millis; }
static uint32_t fake_random = 7;
static uint32_t random_uint32() { return fake_random++; }
#define ESP_LOGD(tag, ...) ((void) 0)

struct ESPTime {
  time_t timestamp;
  bool valid;
  bool is_valid() const { return valid; }
};
struct Clock {
  time_t ts = 1767225600;
  bool valid = true;
  ESPTime now() const { return {ts, valid}; }
};
static std::string json_quote(const std::string &s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    out += c;
  }
  return out + "\"";
}
struct JsonSlot {
  std::map<std::string, std::string> *out;
  std::string key;
  void operator=(const std::string &v) { (*out)[key] = json_quote(v); }
  void operator=(const char *v) { (*out)[key] = json_quote(v); }
  template <typename T, std::enable_if_t<std::is_arithmetic_v<T>, int> = 0>
  void operator=(T v) {
    std::ostringstream s;
    s << +v;
    (*out)[key] = s.str();
  }
};
struct JsonObject {
  std::map<std::string, std::string> *out;
  JsonSlot operator[](const char *key) const { return {out, key}; }
};
static void print_json(const std::map<std::string, std::string> &fields) {
  std::string text = "{";
  for (auto &f : fields)
    text += (text.size() > 1 ? "," : "") + json_quote(f.first) + ":" + f.second;
  std::cout << text << "}" << std::endl;
}
struct JsonObjectConst;
struct JsonArrayConst;
struct JsonVariantConst {
  const JsonObjectConst *object = nullptr;
  std::string key;
  const std::string *item = nullptr;  // an element of an array of strings
  const char *operator|(const char *fallback) const;
  int operator|(int fallback) const;
  double operator|(double fallback) const;
  template <typename T> T as() const;
};
struct JsonArrayConst {
  const std::vector<std::string> *items = nullptr;
  struct iterator {
    const std::string *p;
    JsonVariantConst operator*() const { return {nullptr, "", p}; }
    iterator &operator++() { ++p; return *this; }
    bool operator!=(const iterator &o) const { return p != o.p; }
  };
  iterator begin() const { return {items ? items->data() : nullptr}; }
  iterator end() const { return {items ? items->data() + items->size() : nullptr}; }
};
struct JsonObjectConst {
  std::map<std::string, std::string> strings;
  std::map<std::string, int> ints;
  std::map<std::string, double> doubles;
  std::map<std::string, std::vector<std::string>> arrays;
  JsonVariantConst operator[](const char *key) const { return {this, key, nullptr}; }
};
inline const char *JsonVariantConst::operator|(const char *fallback) const {
  if (item) return item->c_str();
  auto it = object->strings.find(key);
  return it == object->strings.end() ? fallback : it->second.c_str();
}
// Like ArduinoJson: a float is no int, but any number is a double.
inline int JsonVariantConst::operator|(int fallback) const {
  if (item) return fallback;
  auto it = object->ints.find(key);
  return it == object->ints.end() ? fallback : it->second;
}
inline double JsonVariantConst::operator|(double fallback) const {
  if (item) return fallback;
  auto d = object->doubles.find(key);
  if (d != object->doubles.end()) return d->second;
  auto i = object->ints.find(key);
  return i == object->ints.end() ? fallback : i->second;
}
template <> inline JsonArrayConst JsonVariantConst::as<JsonArrayConst>() const {
  JsonArrayConst array;
  auto it = object ? object->arrays.find(key) : decltype(object->arrays.end())();
  if (object && it != object->arrays.end()) array.items = &it->second;
  return array;
}

// The MQTT client: publish_json prints what it would send.
struct Mqtt {
  bool connected = true;
  int refuse = 0;  // publishes to refuse, as when the client's buffer is full
  bool is_connected() const { return connected; }
  bool publish_json(const char *topic, const std::function<void(JsonObject)> &build,
                    int qos, bool retain) {
    if (!connected) return false;
    if (refuse > 0) {
      refuse--;
      return false;
    }
    std::map<std::string, std::string> out;
    build(JsonObject{&out});
    std::cout << "pub\t" << topic << "\t" << qos << "\t" << retain << "\t";
    print_json(out);
    return true;
  }
};

#define ESP_UUID_LEN_16 2
struct esp_bt_uuid_t {
  uint16_t len;
  union {
    uint16_t uuid16;
    uint32_t uuid32;
    uint8_t uuid128[16];
  } uuid;
};
struct ESPBTUUID {
  esp_bt_uuid_t value;
  esp_bt_uuid_t get_uuid() const { return value; }
};
struct ServiceData {
  ESPBTUUID uuid;
  std::vector<uint8_t> data;
};
struct ESPBTDevice {
  std::vector<ServiceData> manufacturer, service;
  int rssi = -60;
  const std::vector<ServiceData> &get_manufacturer_datas() const {
    return manufacturer;
  }
  const std::vector<ServiceData> &get_service_datas() const { return service; }
  int get_rssi() const { return rssi; }
};

struct Font {};
enum class TextAlign { TOP_LEFT, TOP_RIGHT };
struct Display {
  std::vector<std::string> lines;
  void print(int x, int y, Font *, const char *text) {
    lines.push_back(to_string(x) + "," + to_string(y) + ":" + text);
  }
  void printf(int x, int y, Font *font, const char *format, ...) {
    char buf[256];
    va_list args;
    va_start(args, format);
    vsnprintf(buf, sizeof buf, format, args);
    va_end(args);
    print(x, y, font, buf);
  }
  void printf(int x, int y, Font *font, TextAlign, const char *format, ...) {
    char buf[256];
    va_list args;
    va_start(args, format);
    vsnprintf(buf, sizeof buf, format, args);
    va_end(args);
    print(x, y, font, buf);
  }
};

static Clock clock_;
[[maybe_unused]] static Clock *wall_clock = &clock_;
static Mqtt mqtt_;
[[maybe_unused]] static Mqtt *mqtt_client = &mqtt_;
static Font small_, large_;
[[maybe_unused]] static Font *small = &small_, *large = &large_;

static std::vector<uint8_t> unhex(const std::string &hex) {
  std::vector<uint8_t> out;
  for (size_t i = 0; i + 1 < hex.size(); i += 2)
    out.push_back((uint8_t) std::stoul(hex.substr(i, 2), nullptr, 16));
  return out;
}
static std::vector<std::string> split(const std::string &line) {
  std::vector<std::string> parts;
  std::string part;
  std::istringstream in(line);
  while (std::getline(in, part, '\t')) parts.push_back(part);
  return parts;
}
"""

PARAM_TYPES = {
    "string": "std::string",
    "string[]": "std::vector<std::string>",
    "int": "int",
    "uint32_t": "uint32_t",
    "float": "float",
}


class Harness:
    """One device file's lambdas as C++ functions over the stubs."""

    def __init__(self, name: str) -> None:
        self.config = load(ESPHOME / name)
        self.subs = self.config["substitutions"]
        self.globals = {g["id"]: g for g in self.config.get("globals", [])}
        self.parts = [STUBS]
        for item in self.globals.values():
            init = item.get("initial_value")
            value = f" = {init}" if init is not None else "{}"
            self.parts.append(f"static {item['type']} g_{item['id']}{value};")
        # ESPHome includes the files of `includes:` after the globals.
        for include in self.config["esphome"].get("includes", []):
            self.parts.append(f'#include "{Path(include).name}"')

    def code(self, source: str) -> str:
        """ESPHome's rewrite of id(): globals by value, components by pointer."""

        def one(match: re.Match[str]) -> str:
            name, dot = match.group(1), match.group(2)
            if name in self.globals:
                return f"g_{name}{dot}"
            return f"{name}->" if dot else name

        text = substitute(source, self.subs)
        return re.sub(r"id\(\s*([A-Za-z_]\w*)\s*\)(\.?)", one, text)

    def function(self, signature: str, source: str) -> None:
        self.parts.append(f"{signature} {{\n{self.code(source)}\n}}")

    def run(self, tmp_path: Path, main: str, commands: list[str]) -> list[str]:
        source = tmp_path / "harness.cpp"
        binary = tmp_path / "harness"
        source.write_text("\n".join([*self.parts, main]))
        built = subprocess.run(
            [GXX or "g++", "-std=c++20", "-Wall", "-Werror", "-Wno-unused-function",
             "-I", str(INCLUDE), "-o", str(binary), str(source)],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert built.returncode == 0, built.stderr
        ran = subprocess.run(
            [str(binary)],
            input="".join(line + "\n" for line in commands),
            capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
        return ran.stdout.splitlines()


def script(config: dict[str, Any], script_id: str) -> dict[str, Any]:
    return next(s for s in config["script"] if s["id"] == script_id)


def parameters(item: dict[str, Any]) -> str:
    params = item.get("parameters", {})
    return ", ".join(f"{PARAM_TYPES[t]} {name}" for name, t in params.items())


@needs_gxx
def test_ble_receiver_badge_ids(tmp_path: Path) -> None:
    h = Harness("ble-receiver.yaml")
    then = h.config["esp32_ble_tracker"]["on_ble_advertise"][0]["then"]
    h.function("static void on_advert(const ESPBTDevice &x)", then[0]["lambda"])
    h.function("static bool due()", then[1]["if"]["condition"]["lambda"])
    payload = then[1]["if"]["then"][0]["mqtt.publish_json"]["payload"]
    h.function("static void sighting(JsonObject root)", payload)
    main = r"""
int main() {
  ESPBTDevice dev;
  std::string line;
  while (std::getline(std::cin, line)) {
    auto p = split(line);
    if (p[0] == "clock") fake_millis = std::stoul(p[1]);
    else if (p[0] == "synced") clock_.valid = p[1] == "1";
    else if (p[0] == "rssi") dev.rssi = std::stoi(p[1]);
    else if (p[0] == "mfr" || p[0] == "svc") {
      ServiceData d;
      d.uuid.value.len = (uint16_t) std::stoul(p[1]);
      d.uuid.value.uuid.uuid16 = (uint16_t) std::stoul(p[2], nullptr, 16);
      d.data = unhex(p[3]);
      (p[0] == "mfr" ? dev.manufacturer : dev.service).push_back(d);
    } else if (p[0] == "advert") {
      on_advert(dev);
      if (due()) {
        std::map<std::string, std::string> out;
        sighting(JsonObject{&out});
        print_json(out);
      } else {
        std::cout << "-" << std::endl;
      }
      dev = ESPBTDevice();
    }
  }
}
"""
    site = uuid.UUID(h.subs["badge_uuid"])
    namespace = bytes.fromhex(h.subs["eddystone_namespace"])
    other = uuid.UUID("e2c56db5-dffb-48d2-b060-d0f5a71096e0")

    def ibeacon(beacon: uuid.UUID, major: int, minor: int, company: int = 0x4C) -> str:
        data = b"\x02\x15" + beacon.bytes + major.to_bytes(2, "big")
        data += minor.to_bytes(2, "big") + b"\xc5"
        return f"mfr\t2\t{company:04x}\t{data.hex()}"

    instance = bytes.fromhex("0123456789ab")
    uid = b"\x00\xe7" + namespace + instance
    commands = [
        # 1-2: byte order: 0x0102 is 258, 0xff00 is 65280 (swapped: 513, 255).
        ibeacon(site, 0x0102, 0xFF00), "rssi\t-67", "advert",
        # 3: the same badge 0.5 s later is held back; 4: 1 s later it is sent.
        "clock\t1500", ibeacon(site, 0x0102, 0xFF00), "advert",
        "clock\t2000", ibeacon(site, 0x0102, 0xFF00), "advert",
        # 5: another site's UUID; 6: not Apple; 7: Apple, not an iBeacon.
        ibeacon(other, 1, 1), "advert",
        ibeacon(site, 1, 1, company=0x004D), "advert",
        "mfr\t2\t004c\t1005" + "00" * 21, "advert",
        # 8: Eddystone-UID with and 9: without the reserved bytes; clock unset.
        "synced\t0", f"svc\t2\tfeaa\t{(uid + bytes(2)).hex()}", "advert",
        "clock\t4000", f"svc\t2\tfeaa\t{uid.hex()}", "advert",
        # 10: an Eddystone-URL frame; 11: a 128-bit service UUID.
        f"svc\t2\tfeaa\t10e7{namespace.hex()}", "advert",
        f"svc\t16\tfeaa\t{(uid + bytes(2)).hex()}", "advert",
    ]  # fmt: skip
    out = h.run(tmp_path, main, commands)
    badge = ibeacon_id(site, 258, 65280)
    assert json.loads(out[0]) == {"badge": badge, "rssi": -67, "ts": 1767225600}
    assert canonical_badge_id(badge) == badge
    assert out[1] == "-"
    assert json.loads(out[2])["badge"] == badge
    assert out[3:6] == ["-", "-", "-"]
    edd = eddystone_id(namespace, instance)
    assert json.loads(out[6]) == {"badge": edd, "rssi": -60}  # no ts: clock unset
    assert json.loads(out[7])["badge"] == edd
    assert out[8:] == ["-", "-"]


@needs_gxx
def test_restroom_hub_throttle_and_visits(tmp_path: Path) -> None:
    h = Harness("restroom-hub.yaml")
    (beam,) = h.config["binary_sensor"]
    passage = beam["on_press"][0]["if"]["condition"]["lambda"]
    h.function("static bool passage()", passage)
    (level,) = h.config["sensor"]
    due = level["on_value"][0]["if"]["condition"]["lambda"]
    h.function("static bool level_due(float x)", due)
    send = script(h.config, "send_dispenser_event")
    payload = send["then"][0]["mqtt.publish_json"]["payload"]
    h.function(f"static void event(JsonObject root, {parameters(send)})", payload)
    (heartbeat,) = h.config["interval"]
    alive = heartbeat["then"][1]["if"]["condition"]["lambda"]
    h.function("static bool dispenser_alive()", alive)
    main = r"""
int main() {
  std::string line;
  while (std::getline(std::cin, line)) {
    auto p = split(line);
    fake_millis = std::stoul(p[1]);
    if (p[0] == "beam") std::cout << passage() << std::endl;
    else if (p[0] == "alive") std::cout << dispenser_alive() << std::endl;
    else if (level_due(p[2] == "nan" ? NAN : std::stof(p[2]))) {
      std::map<std::string, std::string> out;
      event(JsonObject{&out}, "reading");
      print_json(out);
    } else {
      std::cout << "-" << std::endl;
    }
  }
}
"""
    full, empty = int(h.subs["full_mm"]), int(h.subs["empty_mm"])

    def at(percent: float) -> str:
        return str((empty - percent / 100 * (empty - full)) / 1000)

    minute = 60_000
    commands = [
        "alive\t1000",
        "level\t1000\t" + at(50), "level\t6000\t" + at(52),  # 2 points: held
        "level\t11000\t" + at(53.4),  # 3 points: sent
        "level\t16000\tnan",  # nothing in range: nothing sent
        "level\t20000\t" + at(120),  # clamped at 100
        "alive\t30000", f"alive\t{20000 + minute}",
        f"level\t{20000 + 5 * minute - 1}\t" + at(100),
        f"level\t{20000 + 5 * minute}\t" + at(100),  # 5 minutes: sent again
        "level\t400000\t" + at(-5),  # clamped at 0
        "beam\t500000", "beam\t501000", "beam\t502000", "beam\t503000",
    ]  # fmt: skip
    out = h.run(tmp_path, main, commands)
    assert out[0] == "0"  # no reading yet: no dispenser heartbeat
    first = json.loads(out[1])
    assert first["value"] == 50
    assert first["reading"] == "towel_level"
    assert first["device"] == h.subs["dispenser_id"]
    assert first["type"] == "reading"
    assert first.keys() == EVENT_KEYS | {"reading", "value"}
    assert out[2] == "-"
    assert json.loads(out[3])["value"] == 53
    assert out[4] == "-"
    assert json.loads(out[5])["value"] == 100
    assert out[6:8] == ["1", "0"]  # the heartbeat stops a minute after the sensor
    assert out[8] == "-"
    assert json.loads(out[9])["value"] == 100
    assert json.loads(out[10])["value"] == 0
    passages = int(h.subs["passages_per_visit"])
    visits = [line == "1" for line in out[11:15]]
    assert visits == [(n + 1) % passages == 0 for n in range(4)]


PAGER_MAIN = r"""
static JsonObjectConst message;
int main() {
  std::string line;
  while (std::getline(std::cin, line)) {
    auto p = split(line);
    if (p[0] == "clock") fake_millis = std::stoul(p[1]);
    else if (p[0] == "connected") mqtt_.connected = p[1] == "1";
    else if (p[0] == "s") message.strings[p[1]] = p[2];
    else if (p[0] == "i") message.ints[p[1]] = std::stoi(p[2]);
    else if (p[0] == "d") message.doubles[p[1]] = std::stod(p[2]);
    else if (p[0] == "a") message.arrays[p[1]].assign(p.begin() + 2, p.end());
    else if (p[0] == "ts") clock_.ts = std::stol(p[1]);
    else if (p[0] == "synced") clock_.valid = p[1] == "1";
    else if (p[0] == "poll") {
      // The same message reaches both handlers of the role topic.
      std::cout << (poll(message) ? "tick" : "-") << std::endl;
      page(message);
      message = JsonObjectConst();
    } else if (p[0] == "page") {
      page(message);
      message = JsonObjectConst();
      if (g_start_buzz) g_buzzing = true;
      if (g_stop_buzz) g_buzzing = false;
      if (g_test_tick) std::cout << "tick" << std::endl;
    } else if (p[0] == "hold" && poll_shown()) {
      if (answer_ok()) {
        std::cout << answer_topic() << " ";
        std::map<std::string, std::string> out;
        answer_payload(JsonObject{&out});
        print_json(out);
      } else {
        std::cout << "- " << g_note << std::endl;
      }
    } else if (p[0] == "ack" || p[0] == "resolve" || p[0] == "hold") {
      if (p[0] == "hold") p[0] = "resolve";
      if (p[0] == "ack") g_buzzing = false;
      std::map<std::string, std::string> out;
      if (p[0] == "ack" ? ack_ok() : resolve_ok()) {
        std::cout << (p[0] == "ack" ? ack_topic() : resolve_topic()) << " ";
        (p[0] == "ack" ? ack_payload : resolve_payload)(JsonObject{&out});
        print_json(out);
      } else {
        std::cout << "- " << g_note << std::endl;
      }
    } else if (p[0] == "next") {
      next_alert();
    } else if (p[0] == "state") {
      int i = g_shown;
      std::cout << (i < 0 ? std::string("-") : g_alert_ids[i]) << " "
                << g_alert_ids.size() << " " << g_buzzing << " "
                << (g_buzz_alert.empty() ? "-" : g_buzz_alert) << " "
                << g_buzz_pulses << std::endl;
    } else if (p[0] == "draw") {
      Display it;
      draw(it);
      for (auto &l : it.lines) std::cout << l << "|";
      std::cout << std::endl;
    }
  }
}
"""


def pager_harness() -> Harness:
    h = Harness("pager.yaml")
    h.parts.append("static bool g_buzzing = false;")
    on_page = script(h.config, "on_page")
    signature = f"static void on_page({parameters(on_page)})"
    h.function(signature, on_page["then"][0]["lambda"])
    calls = []
    (subscription, *_) = h.config["mqtt"]["on_json_message"]
    execute = subscription["then"][0]["script.execute"]
    for name, kind in on_page["parameters"].items():
        signature = f"static {PARAM_TYPES[kind]} read_{name}(const JsonObjectConst &x)"
        h.function(signature, execute[name])
        calls.append(f"read_{name}(x)")
    h.parts.append(
        f"static void page(const JsonObjectConst &x) {{ on_page({', '.join(calls)}); }}"
    )
    ack, resolve = h.config["binary_sensor"]
    hold = resolve["on_multi_click"][0]["then"][0]["if"]
    h.function("static bool poll_shown()", hold["condition"]["lambda"])
    for verb, step in (
        ("ack", ack["on_press"][2]["if"]),
        ("resolve", hold["else"][0]["if"]),
        ("answer", hold["then"][0]["if"]),
    ):
        publish = step["then"][0]["mqtt.publish_json"]
        h.function(f"static bool {verb}_ok()", step["condition"]["lambda"])
        topic = publish["topic"]
        if not isinstance(topic, Lambda):
            topic = f'return "{topic}";'
        h.function(f"static std::string {verb}_topic()", topic)
        h.function(f"static void {verb}_payload(JsonObject root)", publish["payload"])
    next_alert = resolve["on_click"][0]["then"][0]["lambda"]
    h.function("static void next_alert()", next_alert)

    # Poll questions: the third subscription, into the on_poll script.
    on_poll = script(h.config, "on_poll")
    assert on_poll["then"][0]["if"]["then"] == [{"script.execute": "tick"}]
    signature = f"static bool on_poll({parameters(on_poll)})"
    h.function(signature, on_poll["then"][0]["if"]["condition"]["lambda"])
    (poll_subscription,) = [
        entry
        for entry in h.config["mqtt"]["on_json_message"]
        if entry["then"][0]["script.execute"]["id"] == "on_poll"
    ]
    assert poll_subscription["topic"] == "facility/${site}/pagers/${role}"
    execute = poll_subscription["then"][0]["script.execute"]
    calls = []
    for name, kind in on_poll["parameters"].items():
        signature = f"static {PARAM_TYPES[kind]} poll_{name}(const JsonObjectConst &x)"
        h.function(signature, execute[name])
        calls.append(f"poll_{name}(x)")
    arguments = ", ".join(calls)
    h.parts.append(
        f"static bool poll(const JsonObjectConst &x) {{ return on_poll({arguments}); }}"
    )
    (display,) = h.config["display"]
    h.function("static void draw(Display &it)", display["lambda"])
    return h


def notice(payload: bytes, command: str = "page") -> list[str]:
    lines = []
    for key, value in json.loads(payload).items():
        if isinstance(value, str):
            lines.append(f"s\t{key}\t{value}")
        elif isinstance(value, bool):
            continue
        elif isinstance(value, int):
            lines.append(f"i\t{key}\t{value}")
        elif isinstance(value, float):
            lines.append(f"d\t{key}\t{value!r}")
        elif isinstance(value, list):
            lines.append("\t".join(["a", key, *value]))
    return [*lines, command]


@needs_gxx
def test_pager_follows_its_alerts(tmp_path: Path) -> None:
    h = pager_harness()
    staff = h.subs["staff_id"]
    acked = {"state": AlertState.ACKNOWLEDGED, "acked_by": "ben"}
    commands = [
        "state", "draw",
        # A routine call, paged to the role and then to the person as well.
        "clock\t2000", *notice(fake_change("a1", 1, "opened")), "state",
        *notice(fake_change("a1", 1, "opened", target=staff)), "state",
        # An emergency elsewhere takes the display; a routine one does not.
        "clock\t3000", *notice(fake_change("e1", 1, "opened", priority="emergency")),
        "state",
        "clock\t4000", *notice(fake_change("a2", 1, "opened")), "state", "draw",
        # Emergencies are cancelled at their station, never from a pager.
        "resolve",
        # Someone else takes the emergency: the motor stops, a1 or a2 shows.
        *notice(fake_change("e1", 2, "acknowledged", priority="emergency", **acked)),
        "state",
        # A reminder for a1 comes twice (role and person): one buzz.
        "clock\t5000", *notice(fake_change("a1", 2, "reminded")), "state",
        *notice(fake_change("a1", 2, "reminded", target=staff)), "state",
        # The wearer acknowledges and resolves what is shown.
        "ack", "resolve",
        *notice(fake_change("a1", 4, "resolved", state=AlertState.RESOLVED)), "state",
        # A late copy of an old notice of a1 does not bring it back.
        *notice(fake_change("a1", 3, "escalated", level=2)), "state",
        # Resolved elsewhere: the pager lets go of everything.
        *notice(fake_change("a2", 2, "resolved", state=AlertState.RESOLVED)),
        *notice(fake_change("e1", 3, "resolved", state=AlertState.RESOLVED)),
        "state", "ack", "connected\t0", "draw",
    ]  # fmt: skip
    out = iter(h.run(tmp_path, PAGER_MAIN, commands))
    assert next(out) == "- 0 0 - 0"
    assert staff in next(out)
    assert next(out) == "a1 1 1 a1 8"
    assert next(out) == "a1 1 1 a1 8"  # the same version again: ignored
    assert next(out) == "e1 2 1 e1 60"
    assert next(out) == "e1 3 1 a2 8"
    screen = next(out)
    assert "EMERGENCY L1" in screen
    assert "2/3" in screen  # e1 is the second of three
    assert "Patient call in" in screen
    assert next(out) == "- cancel at station"
    assert next(out).split()[:4] == ["a2", "3", "1", "a2"]
    assert next(out) == "a1 3 1 a1 8"
    assert next(out) == "a1 3 1 a1 8"
    topic, body = next(out).split(" ", 1)
    assert topic == f"facility/{h.subs['site']}/staff/{staff}/ack"
    assert json.loads(body).keys() == COMMAND_KEYS
    assert json.loads(body)["alert"] == "a1"
    topic, body = next(out).split(" ", 1)
    assert topic == f"facility/{h.subs['site']}/staff/{staff}/resolve"
    assert json.loads(body)["alert"] == "a1"
    assert next(out).split()[:3] == ["a2", "2", "0"]
    assert next(out).split()[:2] == ["a2", "2"]
    assert next(out).split()[:3] == ["-", "0", "0"]
    assert next(out) == "- "
    assert "NO CONNECTION" in next(out)


@needs_gxx
def test_pager_keeps_at_most_eight_and_wraps_text(tmp_path: Path) -> None:
    h = pager_harness()
    commands = []
    for n in range(10):
        state = AlertState.ACKNOWLEDGED if n == 3 else AlertState.OPEN
        reason = "acknowledged" if n == 3 else "opened"
        commands += [f"clock\t{1000 + n}", *notice(fake_change(f"a{n}", 1, "opened"))]
        if n == 3:
            commands += notice(fake_change("a3", 2, reason, state=state))
    commands += ["state", "next", "state", "draw"]
    out = h.run(tmp_path, PAGER_MAIN, commands)
    shown, count = out[0].split()[:2]
    # The acknowledged alert went first, then the oldest.
    assert (shown, count) == ("a9", "8")
    assert out[1].split()[:2] == ["a1", "8"]  # next: wraps round to the oldest kept
    lines = [part.split(":", 1)[1] for part in out[2].split("|") if part]
    text = [line for line in lines if line and "ROUTINE" not in line]
    assert all(len(line) <= 21 for line in text), text


@needs_gxx
def test_pager_answers_a_poll(tmp_path: Path) -> None:
    h = pager_harness()
    staff, site = h.subs["staff_id"], h.subs["site"]
    question = QUESTION.payload(h.subs["role"])
    acked = {"state": AlertState.ACKNOWLEDGED, "acked_by": staff}
    closes_at = int(QUESTION.closes_at)
    commands = [
        f"ts\t{closes_at - 3600}",
        # An open call holds the question back: no pulse, the call shows,
        # and a held button resolves the call, not the poll.
        *notice(fake_change("a1", 1, "opened")),
        *notice(question, "poll"), "draw", "hold",
        # Acknowledged: now the question shows. A repeat of it (QoS 1, or a
        # second role) changes nothing.
        *notice(fake_change("a1", 2, "acknowledged", **acked)),
        "draw", *notice(question, "poll"),
        # Taps go through the answers and round again; the ack button does
        # not act on the acknowledged alert behind the question.
        "next", "draw", "next", "next", "next", "draw", "ack",
        # Offline, a held button sends nothing and keeps the question.
        "connected\t0", "hold", "connected\t1", "draw",
        "hold", "draw",
        # Answered: a late copy of the round is not asked again.
        *notice(question, "poll"), "draw",
    ]  # fmt: skip
    out = iter(h.run(tmp_path, PAGER_MAIN, commands))
    assert next(out) == "-"  # the question came while a call was open
    screen = next(out)
    assert "POLL" not in screen
    assert "ROUTINE L1" in screen
    topic, _ = next(out).split(" ", 1)
    assert topic == f"facility/{site}/staff/{staff}/resolve"

    screen = next(out)
    assert "0,0:POLL" in screen
    assert "128,0:1/3" in screen
    assert "0,44:> great" in screen
    assert "How is your week" in screen
    assert next(out) == "-"  # the repeat
    assert "0,44:> okay" in next(out)
    screen = next(out)
    assert "0,44:> okay" in screen  # great, okay, rough, great
    assert "2/3" in screen
    assert next(out) == "- "  # ack: nothing sent

    assert next(out) == "- offline: not sent"
    assert "0,44:> okay" in next(out)
    topic, body = next(out).split(" ", 1)
    assert topic == f"facility/{site}/staff/{staff}/answer"
    assert json.loads(body).keys() == ANSWER_KEYS
    # The gateway's own parser, with the person the topic speaks for.
    answer = parse_answer(body.encode(), 4096, staff=staff)
    assert (answer.staff, answer.answer) == (staff, "okay")
    assert json.loads(body)["poll"] == QUESTION.poll.id
    assert answer.answer in QUESTION.poll.answers
    screen = next(out)
    assert "POLL" not in screen
    assert "answer sent" in screen
    assert next(out) == "-"
    assert "POLL" not in next(out)


@needs_gxx
def test_pager_forgets_a_closed_round(tmp_path: Path) -> None:
    h = pager_harness()
    closes_at = int(QUESTION.closes_at)
    later = Question(QUESTION.poll, "2026-12-07T09:00", QUESTION.closes_at + 7 * 86400)
    commands = [
        f"ts\t{closes_at - 1}", *notice(QUESTION.payload("nurse"), "poll"), "draw",
        f"ts\t{closes_at}", "draw", "hold",
        # The next round replaces it; with the clock unset it stays shown.
        *notice(later.payload("nurse"), "poll"), "synced\t0", f"ts\t{2 * closes_at}",
        "draw",
    ]  # fmt: skip
    out = h.run(tmp_path, PAGER_MAIN, commands)
    assert out[0] == "tick"
    assert "POLL" in out[1]
    assert "POLL" not in out[2]
    assert out[3] == "- "  # nothing to resolve, no answer sent
    assert out[4] == "tick"
    assert "POLL" in out[5]


@needs_gxx
def test_pager_shows_a_test_page_briefly(tmp_path: Path) -> None:
    """A test page pulses once and shows a moment; it is never an alert."""
    h = pager_harness()
    staff = h.subs["staff_id"]
    # What the devices page sends (gateway/web/devices.py, pager_test).
    test_page = json.dumps(
        {
            "id": "test-0123456789ab",
            "test": True,
            "reason": "test",
            "target": staff,
            "alert": None,
            "text": "TEST page for Ana Silva from tech-1: no action needed",
            "at": 1767225600.25,
        }
    ).encode()
    acked = {"state": AlertState.ACKNOWLEDGED, "acked_by": staff}
    commands = [
        # 0-4: a pulse; nothing held, nothing buzzing; shown for 10 s.
        "clock\t1000", *notice(test_page), "state", "draw",
        "clock\t10999", "draw", "clock\t11000", "draw",
        # 5-7: an open call is never hidden by a test page.
        "clock\t20000", *notice(fake_change("a1", 1, "opened")),
        *notice(test_page), "draw",
        # 8-11: over an acknowledged call it shows, and a press of either
        # button only puts it away: no ack, no resolve is sent.
        *notice(fake_change("a1", 2, "acknowledged", **acked)),
        *notice(test_page), "draw", "ack", "draw",
        *notice(test_page), "hold", "draw",
    ]  # fmt: skip
    out = iter(h.run(tmp_path, PAGER_MAIN, commands))
    assert next(out) == "tick"
    assert next(out) == "- 0 0 - 0"
    for _ in range(2):
        screen = next(out)
        assert "0,0:TEST" in screen
        assert "0,36:action needed" in screen
    assert "TEST" not in next(out)
    assert next(out) == "tick"  # the test page, under the open call
    screen = next(out)
    assert "TEST" not in screen
    assert "ROUTINE L1" in screen
    assert next(out) == "tick"
    assert "0,0:TEST" in next(out)
    assert next(out).startswith("- ")  # ack: nothing sent
    assert "acknowledged" in next(out)  # a1 is back on the display
    assert next(out) == "tick"
    assert next(out).startswith("- ")  # hold: no resolve sent
    screen = next(out)
    assert "TEST" not in screen
    assert "acknowledged" in screen
    assert next(out, None) is None


QUEUE_MAIN = r"""
int main() {
  press_queue::PressQueue<4> queue;
  std::cout << press_queue::kConfirmMs << std::endl;
  std::string line;
  while (std::getline(std::cin, line)) {
    auto p = split(line);
    uint32_t now = p.size() > 1 ? std::stoul(p[1]) : 0;
    if (p[0] == "add") {
      press_queue::Press press;
      press.id = p[2];
      press.pressed_ms = now;
      press.ts = std::stoul(p[3]);
      queue.add(press);
    } else if (p[0] == "send") {
      // What a device's send loop does while connected.
      queue.confirm(now);
      std::string sent;
      while (press_queue::Press *press = queue.next()) {
        sent += press->id + ":" + std::to_string(press->ts) + " ";
        queue.handed_over(now);
      }
      std::cout << (sent.empty() ? "-" : sent) << std::endl;
    } else if (p[0] == "lost") {
      queue.connection_lost();
    } else if (p[0] == "status") {
      // The gateway's retained status topic, as the device receives it.
      queue.gateway_status(p.size() > 2 ? p[2] : "");
    } else if (p[0] == "backdate") {
      queue.backdate(std::stoul(p[2]), now);
    } else if (p[0] == "count") {
      std::cout << queue.size() << " " << queue.waiting() << " " << queue.dropped()
                << std::endl;
    }
  }
}
"""


@needs_gxx
def test_press_queue_keeps_order_and_counts_drops(tmp_path: Path) -> None:
    """The queue header alone, with room for 4."""
    h = Harness("call-station.yaml")
    out = iter(h.run(tmp_path, QUEUE_MAIN, [
        # Six presses while offline: the two oldest give way and count.
        *(f"add\t{1000 * n}\tp{n}\t{100 + n}" for n in range(6)), "count",
        "status\t6000\tonline", "send\t6000", "count",
        # The link drops within the confirm window: all four again, in order,
        # once the gateway's `online` has come again.
        "lost", "status\t7000\tonline", "send\t7000",
        # Full again: a press already handed over gives way without counting.
        "add\t7500\tp6\t106", "count",
        # After the window on an unbroken link, the broker surely has them.
        "send\t36999", "count", "send\t37000", "count",
        # Pressed before the clock was set (ts 0): backdated once it is set.
        "add\t40000\tq1\t0", "add\t45500\tq2\t0", "backdate\t50000\t2000000000",
        "send\t50000",
        # uptime wrapped round between the press and the send.
        "add\t4294967000\tq3\t0", "backdate\t2704\t2000000000", "send\t2704",
    ]))  # fmt: skip
    confirm = int(next(out))
    assert confirm == 30000
    assert next(out) == "4 4 2"
    assert next(out) == "p2:102 p3:103 p4:104 p5:105 "
    assert next(out) == "4 0 2"
    assert next(out) == "p2:102 p3:103 p4:104 p5:105 "  # same ids, same times
    assert next(out) == "4 1 2"
    assert next(out) == "p6:106 "  # p3..p5 wait for their window
    assert next(out) == "4 0 2"
    assert next(out) == "-"
    assert next(out) == "1 0 2"  # p6, handed over at 36999, stays
    # Whole seconds since the press, rounded down: 10 s and 4.5 s ago.
    assert next(out) == "q1:1999999990 q2:1999999996 "
    assert next(out) == "q3:1999999997 "


@needs_gxx
def test_press_queue_waits_for_the_gateways_online(tmp_path: Path) -> None:
    """Presses go only while the gateway's last status seen is ``online``."""
    h = Harness("call-station.yaml")
    out = iter(h.run(tmp_path, QUEUE_MAIN, [
        # 0-2. Connected, but no status yet (a restarted broker holds none
        # until the gateway has subscribed again): nothing goes.
        "add\t1000\tp1\t101", "add\t2000\tp2\t102", "send\t3000", "count",
        "status\t3500\ttrouble", "send\t4000",
        # 3-4. `online`: both, in order; then a new press at once.
        "status\t5000\tonline", "send\t5000",
        "add\t6000\tp3\t103", "send\t6000",
        # 5-7. `offline` within the confirm window: all three are taken back
        # and held; a press meanwhile waits behind them.
        "status\t20000\toffline", "count", "send\t20000",
        "add\t21000\tp4\t104", "count",
        # 8. `online` again: the same ids, in order, then the new press.
        "status\t22000\tonline", "send\t22000",
        # 9-10. 30 s of `online` on an unbroken link: confirmed and forgotten,
        # so a later `offline` and `online` send nothing again.
        "send\t52000", "count", "status\t53000\toffline",
        "status\t54000\tonline", "send\t54000",
        # 11-12. The device's own link drops: `online` from before does not
        # count; it waits for the retained `online` after reconnecting.
        "add\t55000\tp5\t105", "lost", "send\t56000",
        "status\t57000\tonline", "send\t57000",
    ]))  # fmt: skip
    assert next(out) == "30000"
    assert next(out) == "-"
    assert next(out) == "2 2 0"
    assert next(out) == "-"  # trouble holds too
    assert next(out) == "p1:101 p2:102 "
    assert next(out) == "p3:103 "
    assert next(out) == "3 3 0"
    assert next(out) == "-"
    assert next(out) == "4 4 0"
    assert next(out) == "p1:101 p2:102 p3:103 p4:104 "
    assert next(out) == "-"
    assert next(out) == "0 0 0"
    assert next(out) == "-"
    assert next(out) == "-"
    assert next(out) == "p5:105 "
    assert next(out, None) is None


CALL_STATION_MAIN = r"""
int main() {
  std::string line;
  while (std::getline(std::cin, line)) {
    auto p = split(line);
    if (p[0] == "clock") fake_millis = std::stoul(p[1]);
    else if (p[0] == "synced") clock_.valid = p[1] == "1";
    else if (p[0] == "ts") clock_.ts = std::stol(p[1]);
    else if (p[0] == "refuse") mqtt_.refuse = std::stoi(p[1]);
    else if (p[0] == "connected") {
      mqtt_.connected = p[1] == "1";
      if (mqtt_.connected) on_connect(); else on_disconnect();
      // The broker hands a subscriber the retained status, if it holds one.
      if (mqtt_.connected && !retained_status.empty()) on_status(retained_status);
    }
    // The gateway publishes its retained status: delivered if connected.
    else if (p[0] == "gateway") {
      retained_status = p.size() > 1 ? p[1] : "";
      if (mqtt_.connected) on_status(retained_status);
    }
    // The broker restarts: it holds no retained status until the gateway
    // has subscribed again and says so.
    else if (p[0] == "restart") retained_status = "";
    else if (p[0] == "press") press(p[1]);
    else if (p[0] == "tick") send_presses();
    else if (p[0] == "dropped") std::cout << "dropped " << dropped() << std::endl;
    std::cout << "." << std::endl;
  }
}
"""


def queued_device(name: str) -> Harness:
    """A button device's press queue as the YAML wires it, on the stubs."""
    h = Harness(name)
    assert "include/press_queue.h" in h.config["esphome"]["includes"]
    mqtt = h.config["mqtt"]
    assert mqtt["id"] == "mqtt_client"
    assert mqtt["on_connect"] == [{"script.execute": "send_presses"}]
    h.parts.append("static void send_presses();")
    h.function("static void on_connect()", "send_presses();")
    (on_disconnect,) = mqtt["on_disconnect"]
    h.function("static void on_disconnect()", on_disconnect["lambda"])
    names = Topics(h.subs["site"], h.subs["gateway_id"])
    assert substitute(gateway_status(h.config)["topic"], h.subs) == names.status
    (on_status, then_send) = gateway_status(h.config)["then"]
    assert then_send == {"script.execute": "send_presses"}
    h.parts.append("static std::string retained_status;")
    h.function("static void gateway_said(std::string x)", on_status["lambda"])
    h.parts.append(
        "static void on_status(std::string x) { gateway_said(x); send_presses(); }"
    )
    send_every = [i for i in h.config["interval"] if "script.execute" in i["then"][0]]
    (interval,) = send_every
    assert interval["then"] == [{"script.execute": "send_presses"}]
    (dropped,) = h.config["sensor"]
    h.function("static float dropped()", dropped["lambda"])
    send = script(h.config, "send_presses")
    (step,) = send["then"]
    h.function("static void send_presses()", step["lambda"])
    return h


def gateway_status(config: dict[str, Any]) -> dict[str, Any]:
    """The device's subscription to the gateway's retained status."""
    messages = config["mqtt"]["on_message"]
    (found,) = [m for m in messages if "/gateways/" in m["topic"]]
    assert found["qos"] == 1
    return found


def published(lines: list[str], device: str, site: str) -> list[list[Any]]:
    """Per command, the events it published, read by the gateway's parser."""
    steps: list[list[Any]] = [[]]
    for line in lines:
        if line == ".":
            steps.append([])
            continue
        if line.startswith("dropped "):
            steps[-1].append(float(line.split()[1]))
            continue
        kind, topic, qos, retain, body = line.split("\t")
        assert kind == "pub"
        assert topic == f"facility/{site}/devices/{device}/events"
        assert (qos, retain) == ("1", "0")
        steps[-1].append(parse_event(device, body.encode(), 4096))
    return steps[:-1]


def call_station() -> tuple[Harness, str]:
    """The call station's queue, and a main whose ``press`` runs its buttons' script."""
    h = queued_device("call-station.yaml")
    record = script(h.config, "record_press")
    assert record["then"][1] == {"script.execute": "send_presses"}
    h.function(f"static void press({parameters(record)})", record["then"][0]["lambda"])
    h.parts.append("static void pressed(std::string t) { press(t); send_presses(); }")
    return h, CALL_STATION_MAIN.replace("press(p[1])", "pressed(p[1])")


def feedback_terminal() -> tuple[Harness, str]:
    """The feedback terminal's queue, and a main whose ``press`` is a smiley's."""
    h = queued_device("feedback-terminal.yaml")
    feedback = script(h.config, "send_feedback")
    step = feedback["then"][0]["if"]
    assert step["then"][1:] == [
        {"script.execute": "send_presses"},
        {"script.execute": "thank_you"},
    ]
    params = parameters(feedback)
    h.function(f"static bool taken({params})", step["condition"]["lambda"])
    h.function(f"static void record({params})", step["then"][0]["lambda"])
    h.parts.append(
        "static void press(std::string s) {"
        " if (taken(s)) { record(s); send_presses(); } }"
    )
    return h, CALL_STATION_MAIN


@needs_gxx
def test_call_station_keeps_presses_while_offline(tmp_path: Path) -> None:
    h, main = call_station()
    site, device = h.subs["site"], h.subs["device_id"]
    commands = [
        # The gateway is up: its retained `online` is on the broker.
        "gateway\tonline",
        # 0-1. Online: a press goes at once.
        "clock\t1000", "press\tcall",
        # 2-8. Wi-Fi down after a reboot, so no clock either: a call and a
        # cancel wait; nothing is published.
        "connected\t0", "synced\t0", "clock\t5000", "press\tcall",
        "clock\t9000", "press\tcancel", "tick",
        # 9-12. Back, clock set: sent in order, dated when they were pressed.
        "clock\t60000", "synced\t1", "ts\t1767225660", "connected\t1",
        # 13-15. The link drops 10 s later: both again, same ids and times.
        "clock\t70000", "connected\t0", "connected\t1",
        # 16-19. 30 s of unbroken link: forgotten; nothing more is sent.
        "clock\t100000", "tick", "clock\t130000", "tick",
        # 20-24. The client refuses a publish: the call waits and keeps its
        # place before the next press.
        "refuse\t1", "press\tcall", "press\tcancel", "clock\t170000", "tick",
        # 25-67. 40 presses offline: the 8 oldest give way and are counted.
        "connected\t0",
        *(f"press\t{'call' if n % 2 else 'cancel'}" for n in range(40)),
        "dropped", "connected\t1",
    ]  # fmt: skip
    gateway_online, *steps = published(h.run(tmp_path, main, commands), device, site)
    assert gateway_online == []
    assert [(e.type, e.ts) for e in steps[1]] == [("call", 1767225600)]
    assert steps[2:12] == [[]] * 10  # offline: nothing
    back = steps[12]
    # The first call, handed over 1 s before the link dropped, goes again
    # under its own id: the gateway drops it if it had it.
    assert (back[0].id, back[0].ts) == (steps[1][0].id, steps[1][0].ts)
    assert [(e.type, e.ts) for e in back[1:]] == [
        ("call", 1767225660 - 55),
        ("cancel", 1767225660 - 51),
    ]
    assert steps[14] == []
    again = steps[15]
    assert [(e.id, e.type, e.ts) for e in again] == [(e.id, e.type, e.ts) for e in back]
    assert steps[16:21] == [[]] * 5
    assert [e.type for e in steps[22]] == ["call", "cancel"]
    assert steps[23:66] == [[]] * 43
    assert steps[66] == [8.0]
    last = steps[67]
    assert len(last) == 32
    assert [e.type for e in last] == [
        "call" if n % 2 else "cancel" for n in range(8, 40)
    ]
    assert len({e.id for e in last}) == 32


@needs_gxx
def test_feedback_terminal_keeps_presses_while_offline(tmp_path: Path) -> None:
    h, main = feedback_terminal()
    site, device = h.subs["site"], h.subs["device_id"]
    lockout = int(h.subs["lockout_ms"])
    scores = sorted(SCORES)
    commands = ["gateway\tonline", "connected\t0"]
    for n, score in enumerate(scores):
        commands += [f"clock\t{1000 + n * lockout}", f"press\t{score}"]
    # A second press within the lockout is not a vote.
    commands += [f"clock\t{1000 + len(scores) * lockout - 1}", f"press\t{scores[0]}"]
    commands += ["connected\t1"]
    steps = published(h.run(tmp_path, main, commands), device, site)
    assert all(step == [] for step in steps[:-1])
    events = steps[-1]
    assert [e.fields["score"] for e in events] == scores
    assert {e.type for e in events} == {"feedback"}
    assert len({e.id for e in events}) == len(scores)


@needs_gxx
@pytest.mark.parametrize("device", ["call-station.yaml", "feedback-terminal.yaml"])
def test_presses_wait_for_the_gateways_online(tmp_path: Path, device: str) -> None:
    """A broker restart: nothing goes until the gateway has subscribed again."""
    station = device == "call-station.yaml"
    h, main = call_station() if station else feedback_terminal()
    word, kind = ("call", "call") if station else ("happy", "feedback")
    # Presses further apart than the feedback terminal's lockout.
    apart = int(h.subs.get("lockout_ms", 0)) + 1000

    def press(n: int) -> list[str]:
        return [f"clock\t{n * apart}", f"press\t{word}"]

    commands = [
        # 0-2. The gateway is up; a press goes at once.
        "gateway\tonline", *press(1),
        # 3-10. The broker restarts: it holds no status, so after the
        # reconnect the press taken back and two new ones wait, through a
        # retry too.
        "connected\t0", "restart", "connected\t1", *press(2), *press(3), "tick",
        # 11-12. The gateway is back but cannot commit: still held.
        "gateway\ttrouble", "tick",
        # 13. It says `online`, after subscribing: all three, in order.
        "gateway\tonline",
        # 14-17. It goes `offline` within the confirm window: held, and the
        # three taken back go again under their ids, with the one pressed
        # meanwhile after them.
        "gateway\toffline", *press(4), "gateway\tonline",
    ]  # fmt: skip
    site, name = h.subs["site"], h.subs["device_id"]
    steps = published(h.run(tmp_path, main, commands), name, site)
    assert len(steps) == 18
    (first,) = steps[2]
    assert first.type == kind
    assert steps[3:13] == [[]] * 10
    back = steps[13]
    assert [e.type for e in back] == [kind] * 3
    assert back[0].id == first.id
    assert len({e.id for e in back}) == 3
    assert steps[14:17] == [[]] * 3
    again = steps[17]
    assert [e.id for e in again[:3]] == [e.id for e in back]
    assert len(again) == 4
    assert again[3].id not in {e.id for e in back}


DOME_MAIN = r"""
int main() {
  std::string line;
  while (std::getline(std::cin, line)) {
    auto p = split(line);
    if (p[0] == "clock") fake_millis = std::stoul(p[1]);
    else if (p[0] == "light") on_light(p.size() > 1 ? p[1] : "");
    else if (p[0] == "test") {
      JsonObjectConst x;
      x.strings["test"] = p[1];
      if (p.size() > 2) x.doubles["seconds"] = std::stod(p[2]);
      on_test(x);
    } else if (p[0] == "press") {
      press_queue::Press press;
      press.id = p[1];
      press_queue::presses().add(press);
    } else if (p[0] == "sent") {
      press_queue::presses().handed_over(fake_millis);
    } else if (p[0] == "gateway") {
      press_queue::presses().gateway_status(p[1]);
    } else if (p[0] == "lamp") {
      update_dome();
      std::cout << dome_lamp_.on << std::endl;
    }
  }
}
"""


def dome_state(config: dict[str, Any]) -> dict[str, Any]:
    """The call station's subscription to its dome's retained state."""
    messages = config["mqtt"]["on_message"]
    (light,) = [m for m in messages if m["topic"].endswith("/light")]
    return light


def dome_harness() -> Harness:
    """The call station's dome as the YAML wires it: subscriptions and lamp."""
    h = Harness("call-station.yaml")
    h.parts.append(
        "struct Lamp { bool on = false;"
        " void turn_on() { on = true; } void turn_off() { on = false; } };"
        "static Lamp dome_lamp_; [[maybe_unused]] static Lamp *dome_lamp = &dome_lamp_;"
        "\n"
        '#define ESP_LOGW(tag, ...) (std::cout << "warn" << std::endl)'
    )
    mqtt = h.config["mqtt"]
    light = dome_state(h.config)
    (test,) = mqtt["on_json_message"]
    h.function("static void on_light(std::string x)", light["then"][0]["lambda"])
    h.function(
        "static void on_test(const JsonObjectConst &x)", test["then"][0]["lambda"]
    )
    (lamp,) = [i for i in h.config["interval"] if "lambda" in i["then"][0]]
    h.function("static void update_dome()", lamp["then"][0]["lambda"])
    return h


def test_call_station_reads_the_gateways_light_topics() -> None:
    """The topics and words the gateway publishes, as gateway/contract.py names them."""
    config = by_name("call-station.yaml")
    subs = config["substitutions"]
    names = Topics(subs["site"], "gw")
    light = dome_state(config)
    (test,) = config["mqtt"]["on_json_message"]
    assert substitute(light["topic"], subs) == names.device_light(subs["device_id"])
    assert substitute(test["topic"], subs) == names.device_test(subs["device_id"])
    assert (light["qos"], test["qos"]) == (1, 1)
    header = (INCLUDE / "dome_light.h").read_text()
    assert {f'word == "{word}"' for word in LIGHTS} <= set(
        re.findall(r'word == "\w+"', header)
    )


@needs_gxx
def test_call_station_dome_follows_the_gateway(tmp_path: Path) -> None:
    h = dome_harness()
    test_seconds = str(TEST_SECONDS)  # what the devices page sends
    commands = [
        # 0-1: off; on.
        "clock\t1000", "lamp", "light\ton", "lamp",
        # 2-7: blinking from the moment it is told, 0.5 s on, 0.5 s off;
        # the same word again (a redelivery) keeps the rhythm.
        "clock\t2000", "light\tblink", "lamp", "clock\t2499", "lamp",
        "clock\t2500", "lamp", "clock\t2600", "light\tblink", "lamp",
        "clock\t2999", "lamp", "clock\t3000", "lamp",
        # 8-10: a 5 s test lights it steadily; meanwhile the call is
        # acknowledged and then resolved; after the test it shows off.
        "clock\t3100", f"test\tlight\t{test_seconds}", "clock\t3600", "lamp",
        "light\ton", "clock\t5000", "light\toff", "clock\t8099", "lamp",
        "clock\t8100", "lamp",
        # 11: another kind of test is not ours; an unknown word changes
        # nothing (a warning is logged).
        "test\tbuzzer\t5", "lamp", "light\tblink", "light\tpurple",
        # 12-15: a test without seconds lasts 5 s; one of an hour, 60 s.
        "clock\t20000", "light\toff", "test\tlight", "clock\t24999", "lamp",
        "clock\t25000", "lamp",
        "clock\t30000", "test\tlight\t3600", "clock\t89999", "lamp",
        "clock\t90000", "lamp",
        # 16-19: a press not yet sent flashes 0.25 s every 2 s while off.
        "press\tp1", "clock\t100000", "lamp", "clock\t100249", "lamp",
        "clock\t100250", "lamp", "clock\t101999", "lamp",
        # 20-21: once the gateway says on, it is steady; handed over (the
        # gateway online) and off, it is dark. 22: an empty (cleared)
        # retained state is off.
        "light\ton", "lamp", "gateway\tonline", "sent", "light\toff",
        "clock\t102000", "lamp", "light\ton", "light\t", "lamp",
        # 23-25: the gateway says offline: the press is held again and
        # flashes; handed over once it is back, dark again.
        "gateway\toffline", "clock\t104100", "lamp", "clock\t104300", "lamp",
        "gateway\tonline", "sent", "clock\t106000", "lamp",
    ]  # fmt: skip
    out = h.run(tmp_path, DOME_MAIN, commands)
    lamp = [line for line in out if line != "warn"]
    assert out.count("warn") == 1
    assert lamp[0:2] == ["0", "1"]
    assert lamp[2:8] == ["1", "1", "0", "0", "0", "1"]
    assert lamp[8:11] == ["1", "1", "0"]
    assert lamp[11] == "0"
    assert lamp[12:16] == ["1", "0", "1", "0"]
    assert lamp[16:20] == ["1", "1", "0", "0"]
    assert lamp[20:23] == ["1", "0", "0"]
    assert lamp[23:26] == ["1", "0", "0"]
    assert len(lamp) == 26


# -- esphome itself, where it is installed ------------------------------------------

ESPHOME_CMD = os.environ.get("ESPHOME") or shutil.which("esphome")


@pytest.mark.skipif(ESPHOME_CMD is None, reason="esphome is not installed")
@pytest.mark.parametrize("name", NAMES)
def test_esphome_config_validates(name: str, tmp_path: Path) -> None:
    shutil.copytree(ESPHOME, tmp_path, dirs_exist_ok=True)
    shutil.copy(ESPHOME / "secrets.yaml.example", tmp_path / "secrets.yaml")
    result = subprocess.run(
        [ESPHOME_CMD or "esphome", "config", name],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "Configuration is valid!" in result.stdout + result.stderr
