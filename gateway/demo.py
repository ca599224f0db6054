"""The demo: the real gateway on a simulated ward, on whatever broker is at hand.

It uses the broker at the configured address if one answers there, and
otherwise starts a private Mosquitto on a free loopback port. The database is
a fresh file in a temporary folder, so every demo starts with an empty ward.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import pty
import secrets
import signal
import socket
import tempfile
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

from gpiozero.pins.mock import MockFactory
from pydantic import SecretStr

from drivers.serial_hub import encode_frame
from drivers.simulator import Device, MqttOutlet, Person, SimulatedFacility
from gateway.broker import BrokerError, PrivateBroker, free_port, port_answers
from gateway.config import GatewayConfig, load_config
from gateway.credit_board import CreditBoard
from gateway.runner import run_gateway
from gateway.service import Gateway
from gateway.sources import build_drivers
from gateway.upstream import WebhookSettings
from gateway.web.passwords import hash_now

log = logging.getLogger(__name__)

DEMO_SITE = Path(__file__).resolve().parent.parent / "sites" / "demo-ward.yaml"


def run_demo(
    site_file: Path = DEMO_SITE, duration: float | None = None, speed: float = 1.0
) -> int:
    with tempfile.TemporaryDirectory(prefix="gateway-demo-") as folder:
        config = load_config(site_file, _demo_environ(Path(folder)))
        broker = None
        mqtt = config.mqtt
        if port_answers(mqtt.host, mqtt.port):
            log.info("Using the MQTT broker at %s:%d", mqtt.host, mqtt.port)
            sim_user, sim_password = mqtt.username, mqtt.resolved_password()
        else:
            log.info(
                "No broker answers at %s:%d; starting a private one",
                mqtt.host,
                mqtt.port,
            )
            try:
                broker = PrivateBroker(
                    Path(folder) / "broker", users=("gateway", "sim")
                )
                broker.start()
            except BrokerError as exc:
                log.error("%s", exc)
                return 1
            config = _with_broker(config, broker)
            sim_user, sim_password = "sim", broker.passwords["sim"]

        config = _with_free_web_port(config)
        config, password = _with_technician_password(config)
        board = None
        if config.upstream is None:
            # Credit goes somewhere a newcomer can watch: a local board.
            board, config = _with_credit_board(config, Path(folder))
            board.start()
        try:
            asyncio.run(
                _demo(config, sim_user, sim_password, duration, speed, password)
            )
        finally:
            if board is not None:
                board.stop()
            if broker is not None:
                broker.stop()
    return 0


def _with_credit_board(
    config: GatewayConfig, folder: Path
) -> tuple[CreditBoard, GatewayConfig]:
    secret = secrets.token_hex(32)
    secret_file = folder / "upstream.secret"
    secret_file.write_text(secret)
    secret_file.chmod(0o600)
    board = CreditBoard(secret.encode(), {s.id: s.name for s in config.staff})
    upstream = WebhookSettings.model_validate(
        {
            "kind": "webhook",
            "url": board.url,
            "secret_file": secret_file,
            "retry_max": "10s",
            "poll_every": "1s",
        }
    )
    log.info("Credit records go to a local board at %s", board.url)
    return board, config.model_copy(update={"upstream": upstream})


async def _demo(
    config: GatewayConfig,
    sim_user: str | None,
    sim_password: str | None,
    duration: float | None,
    speed: float,
    password: str,
) -> None:
    with Workbench(config) as bench:
        await _run_facility(bench, sim_user, sim_password, duration, speed, password)


async def _run_facility(
    bench: Workbench,
    sim_user: str | None,
    sim_password: str | None,
    duration: float | None,
    speed: float,
    password: str,
) -> None:
    config = bench.config
    gateway = Gateway(config, drivers=build_drivers(config, bench.pins))
    facility = SimulatedFacility(
        config.site.id,
        devices=[Device(d.id, d.kind, d.room) for d in config.devices],
        staff=[Person(s.id, s.name, s.roles, s.badge) for s in config.staff],
        outlet=MqttOutlet(
            config.site.id,
            config.mqtt.host,
            config.mqtt.port,
            username=sim_user,
            password=sim_password,
        ),
        physical=bench.physical(),
        sightings=config.presence is not None,
        speed=speed,
    )
    log.info(
        "Sources: %s",
        ", ".join(bench.sources()) or "MQTT only",
    )
    log.info(
        "Demo site %r: %d devices, %d staff. Floor view: http://%s:%d/  (Ctrl-C stops)",
        config.site.name or config.site.id,
        len(config.devices),
        len(config.staff),
        config.web.host,
        config.web.port,
    )
    log.warning(
        "Sign in at http://%s:%d/signin as %r with the password %s "
        "(made for this run only)",
        config.web.host,
        config.web.port,
        config.web.admin_user,
        password,
    )
    base = f"http://{config.web.host}:{config.web.port}"
    log.info(
        "Pages: %s/ floor, %s/alerts, %s/rules, %s/devices, %s/recognition, "
        "%s/pager (staff)",
        *(base,) * 6,
    )
    companions = [facility.run()]
    if duration is not None:
        companions.append(_stop_after(duration))
    await run_gateway(gateway, *companions)


class Workbench:
    """Stand-ins for the hardware a real site wires to the gateway itself.

    gpiozero's mock pin factory takes the place of the Pi's header, so the
    simulated patients press real gpiozero buttons; a pseudo-terminal takes
    the place of the restroom hub's serial cable, so its frames go through
    the real serial driver. Both are driven by the simulated facility.
    """

    def __init__(self, config: GatewayConfig) -> None:
        self.pins = MockFactory() if config.gpio is not None else None
        self._master: int | None = None
        self._slave: int | None = None
        self._sequence = itertools.count(1)
        if config.serial_hubs:
            self._master, self._slave = pty.openpty()
            port = config.serial_hubs[0].model_copy(
                update={"port": os.ttyname(self._slave)}
            )
            config = config.model_copy(update={"serial_hubs": (port,)})
        self.config = config

    def __enter__(self) -> Workbench:
        return self

    def __exit__(self, *exc: object) -> None:
        for fd in (self._master, self._slave):
            if fd is not None:
                os.close(fd)
        if self.pins is not None:
            self.pins.close()

    def sources(self) -> list[str]:
        found = []
        if self.pins is not None:
            found.append("GPIO (gpiozero mock pins)")
        if self._master is not None:
            found.append("serial sensor hub (pseudo-terminal)")
        if self.config.presence is not None:
            found.append("BLE badge sightings (simulated ESP32 receivers)")
        found.append("MQTT devices and pagers")
        return found

    def physical(self) -> dict[tuple[str, str], Callable[[], Awaitable[None]]]:
        """What pressing a wired button or counting a visit means here."""
        actions: dict[tuple[str, str], Callable[[], Awaitable[None]]] = {}
        if self.config.gpio is not None:
            for spec in self.config.gpio.buttons:
                if spec.press is not None:
                    actions[(spec.device, spec.press)] = partial(
                        self._press, spec.pin, 0.15
                    )
                if spec.hold is not None:
                    hold = spec.hold_time + 0.4
                    actions[(spec.device, spec.hold)] = partial(
                        self._press, spec.pin, hold
                    )
        for port in self.config.serial_hubs:
            for hub, mapping in port.hubs.items():
                for channel, device in mapping.channels.items():
                    actions[(device, "visit")] = partial(self._frame, hub, channel)
        return actions

    async def _press(self, pin: int, seconds: float) -> None:
        assert self.pins is not None
        finger = self.pins.pin(pin)
        finger.drive_low()
        await asyncio.sleep(seconds)
        finger.drive_high()

    async def _frame(self, hub: str, channel: str) -> None:
        if self._master is not None:
            frame = encode_frame(hub, next(self._sequence), "CNT", ch=channel)
            os.write(self._master, frame)


async def _stop_after(seconds: float) -> None:
    await asyncio.sleep(seconds)
    log.info("Demo ran for %gs; stopping", seconds)
    os.kill(os.getpid(), signal.SIGINT)


def _demo_environ(folder: Path) -> dict[str, str]:
    environ = dict(os.environ)
    environ.setdefault("GATEWAY_DATABASE__PATH", str(folder / "demo-ward.db"))
    return environ


def _with_broker(config: GatewayConfig, broker: PrivateBroker) -> GatewayConfig:
    mqtt = config.mqtt.model_copy(
        update={
            "host": broker.host,
            "port": broker.port,
            "username": "gateway",
            "password": SecretStr(broker.passwords["gateway"]),
        }
    )
    return config.model_copy(update={"mqtt": mqtt})


def _with_technician_password(config: GatewayConfig) -> tuple[GatewayConfig, str]:
    """A random technician password for this run: never a fixed default.

    It takes effect only in a database without a technician, which the demo's
    fresh database is (unless GATEWAY_DATABASE__PATH points elsewhere)."""
    password = secrets.token_urlsafe(12)
    web = config.web.model_copy(
        update={"admin_password_hash": SecretStr(hash_now(password))}
    )
    return config.model_copy(update={"web": web}), password


def _with_free_web_port(config: GatewayConfig) -> GatewayConfig:
    web = config.web
    with socket.socket() as sock, contextlib.suppress(OSError):
        sock.bind((web.host, web.port))
        return config
    port = free_port()
    log.info("Port %d is taken; the floor view uses port %d", web.port, port)
    return config.model_copy(update={"web": web.model_copy(update={"port": port})})
