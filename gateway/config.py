"""The site file: one YAML document per site, validated loudly, read once.

Every setting can be overridden from the environment with
``GATEWAY_<SECTION>__<KEY>`` (``GATEWAY_MQTT__PORT=1884``), so a service
manager, a test or the demo can point the same file at another broker,
database or port. A bad file raises :class:`ConfigError`, which names the file,
the line, the field and what was expected.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import Field, SecretStr, TypeAdapter, ValidationError, field_validator

from drivers.ble import BLESettings
from drivers.gpio import GPIOSettings
from drivers.mqtt_native import MappedDevice
from drivers.presence import PresenceSettings, canonical_badge_id
from drivers.serial_hub import SerialHubSettings
from drivers.simulator import SimulatorSettings
from gateway.polls import Poll, poll_problems
from gateway.upstream import RetentionSettings, UpstreamSettings
from rules.schema import (
    RULE_KINDS,
    CompositeRule,
    CountRule,
    Level,
    Rule,
    RuleBase,
    StrictModel,
)
from rules.site import Device, Group, Loc, Site, StaffMember, Zone

ENV_PREFIX = "GATEWAY_"


class ConfigError(ValueError):
    """A site file that cannot be used, with where and why."""

    def __init__(self, file: str, problems: list[str]) -> None:
        self.file = file
        self.problems = problems
        super().__init__("\n".join(problems))


class SiteInfo(StrictModel):
    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    name: str | None = None
    timezone: str = "UTC"
    """IANA name, e.g. ``Europe/Berlin``: rule schedules and shifts use it."""

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"unknown time zone {value!r}; use an IANA name such as "
                "'Europe/Berlin' or 'America/New_York'"
            ) from None
        return value


class GatewayInfo(StrictModel):
    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class TLSSettings(StrictModel):
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None


class MQTTSettings(StrictModel):
    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    username: str | None = None
    password: SecretStr | None = None
    """Never written in logs; its repr is ``**********``."""

    password_file: Path | None = None
    """Read at start-up; preferred to ``password`` so the site file holds no secret."""

    tls: TLSSettings | None = None
    keepalive: int = Field(15, ge=5, le=3600)
    """Seconds; the broker declares us offline after 1.5 times this."""

    max_payload: int = Field(4096, ge=256)
    """Bytes; a device event bigger than this is rejected unread."""

    def resolved_password(self) -> str | None:
        if self.password is not None:
            return self.password.get_secret_value()
        if self.password_file is not None:
            return self.password_file.read_text().strip()
        return None


class DatabaseSettings(StrictModel):
    path: Path = Path("gateway.db")


class WebSettings(StrictModel):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    """0 picks a free port, useful for tests."""

    admin_user: str = Field("technician", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
    """The technician account created on the first run."""

    admin_password_hash: SecretStr | None = None
    """An Argon2 hash placed by the installer (``$argon2id$...``); used only
    while no technician account exists. Without it (or the file below) the
    first visitor must set the password on ``/setup`` with the code in the log."""

    admin_password_hash_file: Path | None = None
    """The same hash in a file readable only by the gateway's user."""

    secure_cookies: bool = False
    """Mark cookies ``Secure`` even when the request looks like plain HTTP
    (behind a TLS proxy that does not send X-Forwarded-Proto)."""

    session_hours: float = Field(12.0, gt=0, le=24 * 30)
    """How long a technician's or supervisor's sign-in lasts."""

    pager_session_days: float = Field(14.0, gt=0, le=365)
    """How long a staff member stays signed in on the pager page."""

    @field_validator("admin_password_hash")
    @classmethod
    def _argon2_hash(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().startswith("$argon2"):
            raise ValueError(
                "expected an Argon2 hash starting with '$argon2'; make one with "
                "'python -m gateway.web.passwords'"
            )
        return value

    def installer_hash(self) -> str | None:
        """The technician's hash placed by the installer, if any."""
        if self.admin_password_hash is not None:
            return self.admin_password_hash.get_secret_value()
        if self.admin_password_hash_file is not None:
            text = self.admin_password_hash_file.read_text().strip()
            if not text.startswith("$argon2"):
                raise ValueError(
                    f"{self.admin_password_hash_file} holds no Argon2 hash "
                    "(expected text starting with '$argon2')"
                )
            return text
        return None


class GatewayConfig(StrictModel):
    """Everything one gateway needs to run one site."""

    site: SiteInfo
    gateway: GatewayInfo
    mqtt: MQTTSettings = MQTTSettings()
    database: DatabaseSettings = DatabaseSettings()
    web: WebSettings = WebSettings()
    zones: tuple[Zone, ...] = ()
    devices: tuple[Device, ...] = ()
    staff: tuple[StaffMember, ...] = ()
    groups: tuple[Group, ...] = ()
    rules: tuple[Rule, ...] = ()
    mqtt_devices: tuple[MappedDevice, ...] = ()
    """ESPHome and Zigbee2MQTT devices mapped from their own topics."""

    gpio: GPIOSettings | None = None
    """Buttons and lights on the Pi's own pins."""

    presence: PresenceSettings | None = None
    """BLE receivers (this gateway's adapter, ESP32 receivers) and thresholds."""

    ble: BLESettings | None = None
    """This gateway's own Bluetooth adapter as a badge receiver."""

    serial_hubs: tuple[SerialHubSettings, ...] = ()
    """Room and restroom sensor hubs on serial ports, one entry per port."""

    upstream: UpstreamSettings | None = None
    """Where resolved gaps and kudos go for credit: a webhook or an MQTT broker."""

    retention: RetentionSettings = RetentionSettings()
    """How long events, alerts and the outbox are kept, and the outbox's cap."""

    polls: tuple[Poll, ...] = ()
    """Anonymous staff mood polls: asked on pagers, only counts go upstream."""

    simulator: SimulatorSettings | None = None
    """Simulated people on this site's devices (load tests, benchmarks)."""

    def problems(self) -> list[tuple[Loc, str]]:
        """Cross-references that the field types alone cannot check."""
        found = self.physical_unchecked().problems()
        devices = {device.id for device in self.devices}
        found.extend(self._gpio_problems(devices))
        found.extend(self._presence_problems(devices))
        found.extend(self._serial_hub_problems(devices))
        topics: set[str] = set()
        for index, mapped in enumerate(self.mqtt_devices):
            if mapped.device not in devices:
                found.append(
                    (
                        ("mqtt_devices", index, "device"),
                        f"device {mapped.device!r} is not under 'devices:'",
                    )
                )
            if mapped.topic in topics:
                found.append(
                    (
                        ("mqtt_devices", index, "topic"),
                        f"topic {mapped.topic!r} is mapped twice",
                    )
                )
            topics.add(mapped.topic)
        roles = {role for member in self.staff for role in member.roles}
        staff = {member.id for member in self.staff}
        found.extend(poll_problems(self.polls, roles, devices))
        names: set[str] = set()
        for r, rule in enumerate(self.rules):
            if rule.name in names:
                found.append(
                    (("rules", r, "name"), f"rule name {rule.name!r} is used twice")
                )
            names.add(rule.name)
            found.extend(_presence_problems(r, rule, roles))
            if isinstance(rule, CompositeRule):
                found.extend(_composite_problems(r, rule, self.rules))
            for lv, level in enumerate(rule.levels):
                for role in level.roles:
                    if role not in roles:
                        found.append(
                            (
                                ("rules", r, "levels", lv, "roles"),
                                f"no staff member has role {role!r}, so nobody "
                                "would be paged; roles in the file: "
                                + ", ".join(sorted(roles)),
                            )
                        )
                for member in level.staff:
                    if member not in staff:
                        found.append(
                            (
                                ("rules", r, "levels", lv, "staff"),
                                f"staff id {member!r} is not under 'staff:'",
                            )
                        )
                found.extend(self._target_problems(r, lv, level))
        return found

    def _gpio_problems(self, devices: set[str]) -> list[tuple[Loc, str]]:
        if self.gpio is None:
            return []
        found: list[tuple[Loc, str]] = []
        pins = [("buttons", self.gpio.buttons), ("lights", self.gpio.lights)]
        for section, specs in pins:
            for index, spec in enumerate(specs):
                if spec.device not in devices:
                    found.append(
                        (
                            ("gpio", section, index, "device"),
                            f"pin {spec.pin}: device {spec.device!r} is not under "
                            "'devices:'",
                        )
                    )
        return found

    def _serial_hub_problems(self, devices: set[str]) -> list[tuple[Loc, str]]:
        found: list[tuple[Loc, str]] = []
        ports: set[str] = set()
        for index, port in enumerate(self.serial_hubs):
            if port.port in ports:
                found.append(
                    (
                        ("serial_hubs", index, "port"),
                        f"port {port.port!r} is listed twice",
                    )
                )
            ports.add(port.port)
            for device in sorted(port.device_ids()):
                if device not in devices:
                    found.append(
                        (
                            ("serial_hubs", index, "hubs"),
                            f"{port.port}: device {device!r} is not under 'devices:'",
                        )
                    )
        return found

    def _presence_problems(self, devices: set[str]) -> list[tuple[Loc, str]]:
        found: list[tuple[Loc, str]] = []
        if self.ble is not None and (
            self.presence is None or self.ble.receiver not in self.presence.receivers
        ):
            found.append(
                (
                    ("ble", "receiver"),
                    f"receiver {self.ble.receiver!r} must be listed under "
                    "'presence: receivers:' to say where it is",
                )
            )
        if self.presence is None:
            return found
        places = {zone.id for zone in self.zones}
        places |= {room.id for zone in self.zones for room in zone.rooms}
        for device, receiver in self.presence.receivers.items():
            if device not in devices:
                found.append(
                    (
                        ("presence", "receivers", device),
                        f"receiver {device!r} is not under 'devices:'",
                    )
                )
            if receiver.place not in places:
                found.append(
                    (
                        ("presence", "receivers", device),
                        f"place {receiver.place!r} is no room or zone of the site",
                    )
                )
        for index, member in enumerate(self.staff):
            if member.badge is None:
                continue
            try:
                canonical = canonical_badge_id(member.badge)
            except ValueError as exc:
                found.append((("staff", index, "badge"), str(exc)))
                continue
            if canonical != member.badge:
                found.append(
                    (
                        ("staff", index, "badge"),
                        f"write the badge id as {canonical!r}, the form "
                        "receivers report",
                    )
                )
        return found

    def _target_problems(
        self, rule: int, index: int, level: Level
    ) -> list[tuple[Loc, str]]:
        groups = {group.id for group in self.groups}
        zones = {zone.id for zone in self.zones}
        found: list[tuple[Loc, str]] = []
        for group in level.groups:
            if group not in groups:
                found.append(
                    (
                        ("rules", rule, "levels", index, "groups"),
                        f"group {group!r} is not under 'groups:'",
                    )
                )
        for zone in level.zones:
            if zone not in zones:
                found.append(
                    (
                        ("rules", rule, "levels", index, "zones"),
                        f"zone {zone!r} is not under 'zones:'",
                    )
                )
        return found

    def physical_unchecked(self) -> Site:
        return Site.model_construct(
            zones=self.zones,
            devices=self.devices,
            staff=self.staff,
            groups=self.groups,
        )

    @property
    def physical(self) -> Site:
        return Site(
            zones=self.zones,
            devices=self.devices,
            staff=self.staff,
            groups=self.groups,
        )


def _presence_problems(
    index: int, rule: RuleBase, roles: set[str]
) -> list[tuple[Loc, str]]:
    found: list[tuple[Loc, str]] = []
    checks = [("resolve_by_presence", rule.resolve_by_presence)]
    if isinstance(rule, CountRule):
        checks.append(("reset_by_visit", rule.reset_by_visit))
    for key, check in checks:
        if check is None:
            continue
        if rule.station_only and key == "resolve_by_presence":
            found.append(
                (
                    ("rules", index, key),
                    f"a {rule.priority} call is never resolved by presence alone; "
                    "remove 'resolve_by_presence' or lower the priority",
                )
            )
        for role in check.roles:
            if role not in roles:
                found.append(
                    (
                        ("rules", index, key, "roles"),
                        f"no staff member has role {role!r}",
                    )
                )
    return found


def _composite_problems(
    index: int, rule: CompositeRule, rules: tuple[RuleBase, ...]
) -> list[tuple[Loc, str]]:
    kinds = {other.name: other.kind for other in rules}
    found: list[tuple[Loc, str]] = []
    for name in rule.all:
        kind = kinds.get(name)
        if kind is None:
            found.append((("rules", index, "all"), f"no rule is named {name!r}"))
        elif kind in ("call", "composite"):
            found.append(
                (
                    ("rules", index, "all"),
                    f"rule {name!r} is a {kind} rule; a composite combines count, "
                    "threshold, feedback and supervision rules",
                )
            )
    return found


def site_json_schema() -> dict[str, Any]:
    """JSON Schema of a whole site file, rules included, for editors."""
    schema = GatewayConfig.model_json_schema(by_alias=True)
    schema["title"] = "Facility gateway site file"
    return schema


def load_config(
    path: str | Path, environ: Mapping[str, str] | None = None
) -> GatewayConfig:
    """Read, override from the environment and validate one site file."""
    path = Path(path)
    environ = os.environ if environ is None else environ
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(str(path), [f"{path}: cannot read: {exc.strerror}"]) from exc

    data = _parse_yaml(path, text)
    applied = _apply_env(data, environ)
    try:
        config = GatewayConfig.model_validate(data)
    except ValidationError as exc:
        lines = yaml_lines(text)
        names = _rule_names(data)
        problems = [
            _describe(path, error, lines, applied, names) for error in exc.errors()
        ]
        raise ConfigError(str(path), problems) from None

    broken = config.problems()
    if broken:
        lines = yaml_lines(text)
        problems = [
            f"{path}:{_line_of(loc, lines)}: "
            f"{_field_name(loc, _rule_names(data))}: {message}"
            for loc, message in broken
        ]
        raise ConfigError(str(path), problems)
    return config


_RULE_LIST = TypeAdapter(tuple[Rule, ...])

RuleProblem = tuple[Loc, str]
"""Where in ``rules`` a problem sits, e.g. ``("rules", 0, "levels", 1, "after")``,
and what is wrong, worded as ``check-config`` words it."""


def validate_rules(
    config: GatewayConfig, data: Any
) -> tuple[tuple[RuleBase, ...], list[RuleProblem]]:
    """Check a proposed ``rules:`` list against this site, as its file is checked.

    Returns the rules, or no rules and every problem: the same field types,
    cross-references (roles, staff, groups, zones, composites) and messages
    as a site file gets, so the web page and ``check-config`` agree.
    """
    try:
        rules = _RULE_LIST.validate_python(data)
    except ValidationError as exc:
        found = []
        for error in exc.errors():
            error = {**error, "loc": ("rules", *error["loc"])}
            found.append((_without_tag(error["loc"]), _explain(error)))
        return (), found
    site = config.model_copy(update={"rules": rules})
    broken = [(loc, text) for loc, text in site.problems() if loc[0] == "rules"]
    return ((), broken) if broken else (rules, [])


def field_name(loc: Loc) -> str:
    """``levels[1].after``: a location as a person reads it."""
    return _field_name(loc)


# -- YAML with line numbers ------------------------------------------------------


_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
"""libyaml's loader where PyYAML was built with it: a site of 10,000 devices
loads in a fraction of a second instead of 15 s with the pure-Python one."""


def _parse_yaml(path: Path, text: str) -> dict[str, Any]:
    """Load the YAML document, or say where it is not YAML."""
    try:
        data = yaml.load(text, Loader=_LOADER)  # noqa: S506 - a safe loader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(str(path), [f"{where}: not valid YAML: {problem}"]) from None

    if not isinstance(data, dict):
        raise ConfigError(
            str(path), [f"{path}:1: expected a mapping with 'site', 'gateway', ..."]
        )
    return data


def yaml_lines(text: str) -> dict[Loc, int]:
    """The line of every key and list item; parsed again only to explain errors."""
    lines: dict[Loc, int] = {}
    _record_lines(yaml.compose(text, Loader=_LOADER), (), lines)
    return lines


def _record_lines(node: yaml.Node, loc: Loc, lines: dict[Loc, int]) -> None:
    lines[loc] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            child = (*loc, key.value)
            lines[child] = key.start_mark.line + 1
            _record_lines(value, child, lines)
            lines[child] = key.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _record_lines(item, (*loc, index), lines)


# -- environment overrides -------------------------------------------------------


def _apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> dict[Loc, str]:
    """Apply GATEWAY_<SECTION>__<KEY> variables; return what was applied."""
    applied: dict[Loc, str] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        loc = tuple(part.lower() for part in name[len(ENV_PREFIX) :].split("__"))
        target = data
        for part in loc[:-1]:
            existing = target.get(part)
            if not isinstance(existing, dict):
                existing = target[part] = {}
            target = existing
        target[loc[-1]] = value
        applied[loc] = name
    return applied


# -- error messages ----------------------------------------------------------------


def _describe(
    path: Path,
    error: Any,
    lines: dict[Loc, int],
    applied: dict[Loc, str],
    rule_names: dict[int, str],
) -> str:
    loc = _without_tag(tuple(error["loc"]))
    field = _field_name(loc, rule_names)
    if loc in applied:
        where = f"{path} (environment variable {applied[loc]})"
    else:
        where = f"{path}:{_line_of(loc, lines)}"
    return f"{where}: {field}: {_explain(error)}"


def _explain(error: Any) -> str:
    """What is wrong with one value, in the words ``check-config`` uses."""
    raw: Loc = tuple(error["loc"])
    message = error["msg"]
    if error["type"] == "extra_forbidden":
        message = f"unknown field {raw[-1]!r}" + _suggestion(raw)
    elif error["type"] == "missing":
        message = "required field is missing"
    elif "input" in error and not isinstance(error["input"], dict | list):
        message = f"{message} (got {error['input']!r})"
    return message


def _without_tag(loc: Loc) -> Loc:
    """Drop the rule kind pydantic puts in a rule's error location."""
    if len(loc) > 2 and loc[0] == "rules" and loc[2] in RULE_KINDS:
        return (*loc[:2], *loc[3:])
    return loc


def _rule_names(data: Any) -> dict[int, str]:
    rules = data.get("rules") if isinstance(data, dict) else None
    if not isinstance(rules, list):
        return {}
    return {
        index: str(rule["name"])
        for index, rule in enumerate(rules)
        if isinstance(rule, dict) and rule.get("name")
    }


def _field_name(loc: Loc, rule_names: dict[int, str] | None = None) -> str:
    """``rules[0] (patient-call).levels[1].after``: a path a person can follow."""
    parts: list[str] = []
    for position, part in enumerate(loc):
        if isinstance(part, int):
            parts[-1:] = [f"{parts[-1]}[{part}]" if parts else f"[{part}]"]
            if position == 1 and loc[0] == "rules" and rule_names:
                name = rule_names.get(part)
                if name:
                    parts[-1] += f" ({name})"
        else:
            parts.append(str(part))
    return ".".join(parts) or "(top level)"


def _line_of(loc: Loc, lines: dict[Loc, int]) -> int:
    # Pydantic may point below what the file contains (a missing key), so
    # walk up to the nearest location the file does have.
    for size in range(len(loc), -1, -1):
        if loc[:size] in lines:
            return lines[loc[:size]]
    return 1


def _suggestion(raw: Loc) -> str:
    model = _model_at(raw[:-1])
    if model is None:
        return ""
    names = [field.alias or name for name, field in model.model_fields.items()]
    close = difflib.get_close_matches(str(raw[-1]), names, n=1)
    if close:
        return f"; did you mean {close[0]!r}?"
    return f"; expected one of: {', '.join(names)}"


def _model_at(raw: Loc) -> type[StrictModel] | None:
    """Find the model class that validates the mapping at ``raw`` (with tags)."""
    model: Any = GatewayConfig
    loc = raw
    if len(raw) > 2 and raw[0] == "rules" and raw[2] in RULE_KINDS:
        model, loc = RULE_KINDS[str(raw[2])], raw[3:]
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        model = _inner_model(field.annotation)
        if model is None:
            return None
    return model


def _inner_model(annotation: Any) -> type[StrictModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, StrictModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _inner_model(arg)
        if found is not None:
            return found
    return None
