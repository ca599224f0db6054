"""The demo: the real gateway on a simulated ward, on whatever broker is at hand.

It uses the broker at the configured address if one answers there, and
otherwise starts a private Mosquitto on a free loopback port. The database is
a fresh file in a temporary folder, so every demo starts with an empty ward.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import tempfile
from pathlib import Path

from pydantic import SecretStr

from drivers.simulator import Device, Person, SimulatedFacility
from gateway.broker import BrokerError, PrivateBroker, free_port, port_answers
from gateway.config import GatewayConfig, load_config
from gateway.runner import run_gateway
from gateway.service import Gateway

log = logging.getLogger(__name__)

DEMO_SITE = Path(__file__).resolve().parent.parent / "sites" / "demo-ward.yaml"


def run_demo(site_file: Path = DEMO_SITE, duration: float | None = None) -> int:
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
        try:
            asyncio.run(_demo(config, sim_user, sim_password, duration))
        finally:
            if broker is not None:
                broker.stop()
    return 0


async def _demo(
    config: GatewayConfig,
    sim_user: str | None,
    sim_password: str | None,
    duration: float | None,
) -> None:
    gateway = Gateway(config)
    facility = SimulatedFacility(
        config.site.id,
        devices=[Device(d.id, d.kind, d.room) for d in config.devices],
        staff=[Person(s.id, s.name, s.roles, s.badge) for s in config.staff],
        host=config.mqtt.host,
        port=config.mqtt.port,
        username=sim_user,
        password=sim_password,
    )
    log.info(
        "Demo site %r: %d devices, %d staff. Floor view: http://%s:%d/  (Ctrl-C stops)",
        config.site.name or config.site.id,
        len(config.devices),
        len(config.staff),
        config.web.host,
        config.web.port,
    )
    companions = [facility.run()]
    if duration is not None:
        companions.append(_stop_after(duration))
    await run_gateway(gateway, *companions)


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


def _with_free_web_port(config: GatewayConfig) -> GatewayConfig:
    web = config.web
    with socket.socket() as sock, contextlib.suppress(OSError):
        sock.bind((web.host, web.port))
        return config
    port = free_port()
    log.info("Port %d is taken; the floor view uses port %d", web.port, port)
    return config.model_copy(update={"web": web.model_copy(update={"port": port})})
