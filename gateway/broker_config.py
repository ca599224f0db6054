"""The Mosquitto configuration we ship, rendered for one site.

The templates live in ``systemd/mosquitto/``: ``mosquitto.conf.template``
(listeners, limits, logging), ``websockets.conf.template`` (browser displays,
optional) and ``acl.template`` (one section per role). This module fills them
in: the installer calls it as ``python -m gateway.broker_config render``, and
the tests' :class:`gateway.broker.PrivateBroker` calls the same functions, so
the tests run the configuration a site runs.

MQTT users come from the site file (the gateway, every device that is not
wired to the Pi itself, every staff member's pager) and from a small extra
file for what the site file does not list (displays, technicians, observers).
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.config import GatewayConfig

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).resolve().parent.parent / "systemd" / "mosquitto"

ROLES = ("gateway", "device", "pager", "display", "technician", "observer")
EXTRA_ROLES = ("display", "technician", "observer")
"""Roles the site file does not list; they come from the extra users file."""

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
"""A user name that is safe as one topic level, an ACL word and a password
file entry: no '/', '+', '#', ':', spaces or line breaks."""

_TOPIC = re.compile(r"^[^\s+#]+$")


class BrokerConfigError(ValueError):
    """Users or settings that would make a broken or unsafe configuration."""


@dataclass(frozen=True)
class BrokerUser:
    name: str
    role: str
    mapped_topics: tuple[str, ...] = ()
    """ESPHome or Zigbee2MQTT topics this device publishes on (site file
    ``mqtt_devices``); for the gateway, every mapped topic of the site."""


@dataclass(frozen=True)
class BrokerSite:
    """Everyone who connects to one site's broker, and the site's ids."""

    site: str
    gateway_id: str
    users: tuple[BrokerUser, ...]

    def __post_init__(self) -> None:
        _check_ids(self.site, self.gateway_id)
        seen: dict[str, str] = {}
        for user in self.users:
            _check_user(user)
            if user.name in seen:
                raise BrokerConfigError(
                    f"MQTT user {user.name!r} is both a {seen[user.name]} and a "
                    f"{user.role}; every device, staff member, display and "
                    "technician needs a name of its own"
                )
            seen[user.name] = user.role

    def named(self, role: str) -> list[str]:
        return [user.name for user in self.users if user.role == role]


@dataclass(frozen=True)
class Listeners:
    """Ports and addresses; an empty bind address means every interface."""

    local_port: int = 1883
    tls_port: int = 8883
    tls_bind: str = ""
    websockets_port: int | None = None
    """None: no WebSockets listener (no browser displays)."""

    websockets_bind: str = ""


@dataclass(frozen=True)
class BrokerFiles:
    """Where Mosquitto finds its files at run time, and how it logs."""

    password_file: Path
    acl_file: Path
    cert_file: Path
    key_file: Path
    log_dest: str = "stderr"
    """``stderr`` under systemd (the journal); ``file <path>`` in tests."""

    run_user: str = "mosquitto"


# -- users ---------------------------------------------------------------------


def site_users(
    config: GatewayConfig, extra: Iterable[tuple[str, str]] = ()
) -> BrokerSite:
    """Every MQTT user of a site: from its site file, plus (role, name) extras.

    Devices on the Pi's own GPIO pins and serial hubs, and the Pi's own BLE
    adapter, never connect to the broker, so they get no user.
    """
    wired = _wired_devices(config)
    mapped: dict[str, list[str]] = {}
    for device in config.mqtt_devices:
        mapped.setdefault(device.device, []).append(device.topic)

    gateway_user = config.mqtt.username or "gateway"
    every_mapped = tuple(topic for topics in mapped.values() for topic in topics)
    users = [BrokerUser(gateway_user, "gateway", every_mapped)]
    users += [
        BrokerUser(device.id, "device", tuple(mapped.get(device.id, ())))
        for device in config.devices
        if device.id not in wired
    ]
    users += [BrokerUser(member.id, "pager") for member in config.staff]
    users += [BrokerUser(name, role) for role, name in extra]
    return BrokerSite(config.site.id, config.gateway.id, tuple(users))


def _wired_devices(config: GatewayConfig) -> set[str]:
    wired: set[str] = set()
    if config.gpio is not None:
        wired |= {spec.device for spec in config.gpio.buttons}
        wired |= {spec.device for spec in config.gpio.lights}
    for port in config.serial_hubs:
        wired |= set(port.device_ids())
    if config.ble is not None:
        wired.add(config.ble.receiver)
    return wired


def read_extra_users(path: Path) -> list[tuple[str, str]]:
    """Read ``<role> <name>`` lines (displays, technicians, observers)."""
    extra: list[tuple[str, str]] = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) != 2 or words[0] not in EXTRA_ROLES:
            raise BrokerConfigError(
                f"{path}:{number}: expected '<role> <name>' with role one of "
                f"{', '.join(EXTRA_ROLES)}; got {line.strip()!r}"
            )
        extra.append((words[0], words[1]))
    return extra


def _check_ids(site: str, gateway_id: str) -> None:
    for what, value in (("site id", site), ("gateway id", gateway_id)):
        if not _NAME.match(value):
            raise BrokerConfigError(
                f"{what} {value!r} cannot be used in topics and ACL lines; use "
                "letters, digits, '_', '.', '-' and '@'"
            )


def _check_user(user: BrokerUser) -> None:
    if user.role not in ROLES:
        raise BrokerConfigError(
            f"unknown role {user.role!r} for {user.name!r}; roles: {', '.join(ROLES)}"
        )
    if not _NAME.match(user.name):
        raise BrokerConfigError(
            f"MQTT user name {user.name!r} ({user.role}) cannot be used: it must "
            "start with a letter or digit and hold only letters, digits, '_', "
            "'.', '-' and '@' (at most 64), because it becomes a topic level"
        )
    for topic in user.mapped_topics:
        if not _TOPIC.match(topic) or topic.startswith("$"):
            raise BrokerConfigError(
                f"mapped topic {topic!r} of {user.name!r} cannot go into the ACL: "
                "no spaces, wildcards or leading '$'"
            )


# -- rendering -----------------------------------------------------------------


def render_config(
    listeners: Listeners, files: BrokerFiles, templates: Path = TEMPLATES
) -> str:
    """mosquitto.conf for these listeners and files."""
    values = {
        "password_file": str(files.password_file),
        "acl_file": str(files.acl_file),
        "cert_file": str(files.cert_file),
        "key_file": str(files.key_file),
        "log_dest": files.log_dest,
        "run_user": files.run_user,
        "local_port": str(listeners.local_port),
        "tls_port": str(listeners.tls_port),
        "tls_bind": listeners.tls_bind,
        "ws_port": str(listeners.websockets_port),
        "ws_bind": listeners.websockets_bind,
    }
    text = _fill(templates / "mosquitto.conf.template", values)
    if listeners.websockets_port is not None:
        text += _fill(templates / "websockets.conf.template", values)
    return text


def render_acl(site: BrokerSite, templates: Path = TEMPLATES) -> str:
    """The ACL file: each role's section once per user of that role."""
    source = templates / "acl.template"
    sections = _acl_sections(source)
    out = [
        f"# Rendered from {source.name} for site {site.site}; do not edit: change",
        "# the template, the site file or the extra users file and render again.",
        "",
    ]
    for user in site.users:
        out.append(f"user {user.name}")
        values = {"site": site.site, "user": user.name, "gateway_id": site.gateway_id}
        for line in sections[user.role]:
            if "${mapped_topic}" in line:
                for topic in user.mapped_topics:
                    out.append(Template(line).substitute(values, mapped_topic=topic))
            else:
                out.append(Template(line).substitute(values))
        out.append("")
    return "\n".join(out)


def _acl_sections(path: Path) -> dict[str, list[str]]:
    """Role name -> its ``topic`` lines, from the ``[role]`` sections."""
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            current = sections.setdefault(stripped[1:-1], [])
        elif current is not None and stripped and not stripped.startswith("#"):
            current.append(stripped)
    missing = set(ROLES) - set(sections)
    if missing:
        raise BrokerConfigError(f"{path}: no section for {', '.join(sorted(missing))}")
    return sections


def _fill(path: Path, values: dict[str, str]) -> str:
    try:
        text = Template(path.read_text()).substitute(values)
    except KeyError as exc:
        raise BrokerConfigError(f"{path}: unknown field {exc}") from None
    # An empty bind address leaves a trailing space; keep the file tidy.
    return "\n".join(line.rstrip() for line in text.splitlines()) + "\n"


# -- command line (used by install/install.sh) -----------------------------------


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m gateway.broker_config",
        description="Render the shipped Mosquitto configuration for one site.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    render = sub.add_parser(
        "render",
        help="write mosquitto.conf and acl into a folder and list the MQTT users",
    )
    render.add_argument("--site", type=Path, required=True, help="the site file")
    render.add_argument(
        "--extra-users",
        type=Path,
        help="file of '<role> <name>' lines: displays, technicians, observers",
    )
    render.add_argument(
        "--out", type=Path, required=True, help="folder to write the files into"
    )
    render.add_argument(
        "--runtime-dir",
        type=Path,
        help="the folder as Mosquitto will see it (default: --out); differs "
        "when installing into a staging root",
    )
    render.add_argument("--local-port", type=int, default=1883)
    render.add_argument("--tls-port", type=int, default=8883)
    render.add_argument("--tls-bind", default="", help="address; default: all")
    render.add_argument(
        "--websockets-port",
        type=int,
        help="add a WebSockets+TLS listener for browser displays on this port",
    )
    render.add_argument("--run-user", default="mosquitto")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Write ``mosquitto.conf`` and ``acl``; print ``<role> <name>`` per user."""
    from gateway.config import ConfigError, load_config

    args = _arguments(argv)
    runtime = args.runtime_dir or args.out
    try:
        config = load_config(args.site, environ={})
        extra = read_extra_users(args.extra_users) if args.extra_users else []
        site = site_users(config, extra)
        listeners = Listeners(
            local_port=args.local_port,
            tls_port=args.tls_port,
            tls_bind=args.tls_bind,
            websockets_port=args.websockets_port,
        )
        files = BrokerFiles(
            password_file=runtime / "passwd",
            acl_file=runtime / "acl",
            cert_file=runtime / "certs" / "server.crt",
            key_file=runtime / "certs" / "server.key",
            run_user=args.run_user,
        )
        conf_text = render_config(listeners, files)
        acl_text = render_acl(site)
    except (ConfigError, BrokerConfigError, OSError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mosquitto.conf").write_text(conf_text)
    (args.out / "acl").write_text(acl_text)
    sys.stdout.write("".join(f"{user.role} {user.name}\n" for user in site.users))
    return 0


if __name__ == "__main__":
    sys.exit(main())
