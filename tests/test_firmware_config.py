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

from drivers.presence import canonical_badge_id, eddystone_id, ibeacon_id
from gateway.contract import pager_payload
from rules.alerts import AlertState, Notification
from rules.lifecycle import PAGING
from rules.schema import FeedbackRule

ROOT = Path(__file__).resolve().parent.parent
FIRMWARE = ROOT / "firmware-config"
ESPHOME = FIRMWARE / "esphome"
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
STATUS = "facility/${site}/devices/${device_id}/status"
PAGER_STATUS = "facility/${site}/staff/${staff_id}/status"
"""A pager's MQTT user is its wearer's staff id: it lives under the staff topic."""
ROOT_KEY = re.compile(r'root\["(\w+)"\]')
ROOT_VALUE = re.compile(r'root\["(\w+)"\]\s*=\s*([^;]+);')
JSON_READ = re.compile(r'x\["(\w+)"\]')
SUBSTITUTION = re.compile(r"\$\{(\w+)\}|\$(\w+)")


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
    """(mqtt.publish or mqtt.publish_json settings, enclosing script id)."""
    found = []
    for node, script in mappings(config):
        for action in ("mqtt.publish", "mqtt.publish_json"):
            if action in node:
                found.append((node[action], script))
    return found


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
            else:
                assert script, f"{topic}: type {value} comes from nowhere"
                types |= script_arguments(config, script, value)
        assert types, topic
        assert types <= EXTRA_KEYS.keys(), types
        allowed = EVENT_KEYS.union(*(EXTRA_KEYS[t] for t in types))
        assert keys <= allowed, f"{topic}: unknown keys {keys - allowed}"
        if "feedback" in types:
            (score,) = assigned(payload, "score")
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
    text = (ESPHOME / "pager.yaml").read_text()
    assert set(JSON_READ.findall(text)) <= body.keys()
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
        assert set(ROOT_KEY.findall(payload)) == COMMAND_KEYS
        assert assigned(payload, "alert") == {"id(target_alert)"}
    assert verbs == {"ack", "resolve"}


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
struct Mqtt {
  bool connected = true;
  bool is_connected() const { return connected; }
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
struct JsonVariantConst {
  const std::map<std::string, std::string> *strings;
  const std::map<std::string, int> *ints;
  std::string key;
  const char *operator|(const char *fallback) const {
    auto it = strings->find(key);
    return it == strings->end() ? fallback : it->second.c_str();
  }
  int operator|(int fallback) const {
    auto it = ints->find(key);
    return it == ints->end() ? fallback : it->second;
  }
};
struct JsonObjectConst {
  std::map<std::string, std::string> strings;
  std::map<std::string, int> ints;
  JsonVariantConst operator[](const char *key) const { return {&strings, &ints, key}; }
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

PARAM_TYPES = {"string": "std::string", "int": "int", "float": "float"}


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
             "-o", str(binary), str(source)],
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
    else if (p[0] == "page") {
      page(message);
      message = JsonObjectConst();
      if (g_start_buzz) g_buzzing = true;
      if (g_stop_buzz) g_buzzing = false;
    } else if (p[0] == "ack" || p[0] == "resolve") {
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
    for verb, step in (
        ("ack", ack["on_press"][2]["if"]),
        ("resolve", resolve["on_multi_click"][0]["then"][0]["if"]),
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
    (display,) = h.config["display"]
    h.function("static void draw(Display &it)", display["lambda"])
    return h


def notice(payload: bytes) -> list[str]:
    lines = []
    for key, value in json.loads(payload).items():
        if isinstance(value, str):
            lines.append(f"s\t{key}\t{value}")
        elif isinstance(value, int):
            lines.append(f"i\t{key}\t{value}")
    return [*lines, "page"]


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
