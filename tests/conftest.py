"""Fixtures: a private Mosquitto per test, MQTT clients, the gateway subprocess."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.broker import PrivateBroker
from tests.helpers import (
    GatewayProcess,
    MqttClient,
    SiteTopics,
    site_config,
    write_site,
)

LOGS = pytest.StashKey[dict[str, Path]]()
"""Log files of a test's processes, attached to its report when it fails."""


def attach_log(request: pytest.FixtureRequest, name: str, path: Path) -> None:
    request.node.stash.setdefault(LOGS, {})[name] = path


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Iterator[pytest.TestReport]:
    report = yield
    if report.failed:
        for name, path in item.stash.get(LOGS, {}).items():
            if path.exists():
                text = path.read_text(errors="replace")
                report.sections.append((name, text[-30_000:]))
    return report


@pytest.fixture
def site_id(request: pytest.FixtureRequest) -> str:
    """A site id no other test uses: topics never overlap, even on one broker."""
    name = re.sub(r"[^A-Za-z0-9]+", "-", request.node.name).strip("-")[:40]
    return f"{name}-{uuid.uuid4().hex[:6]}"


@pytest.fixture
def topics(site_id: str) -> SiteTopics:
    return SiteTopics(site_id)


@pytest.fixture
def broker(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[PrivateBroker]:
    """A Mosquitto of this test's own: no anonymous clients, no persistence."""
    broker = PrivateBroker(tmp_path / "broker", users=("gateway", "tester"))
    attach_log(request, "mosquitto log", broker.log_file)
    broker.start()
    yield broker
    broker.kill()


@pytest.fixture
def mqtt(broker: PrivateBroker) -> Iterator[Callable[..., MqttClient]]:
    """Factory: ``mqtt(topic, ...)`` connects a client subscribed to the topics."""
    clients: list[MqttClient] = []

    def connect(*subscriptions: str) -> MqttClient:
        client = MqttClient(broker)
        clients.append(client)
        if subscriptions:
            client.subscribe(*subscriptions)
        return client

    yield connect
    for client in clients:
        client.close()


@pytest.fixture
def start_gateway(
    broker: PrivateBroker,
    tmp_path: Path,
    topics: SiteTopics,
    request: pytest.FixtureRequest,
) -> Iterator[Callable[..., GatewayProcess]]:
    """Factory: write a site file, start ``main.py run`` on it, wait for online.

    Keyword arguments go to :func:`tests.helpers.site_config`; ``site=`` gives
    the whole configuration instead, ``web_port=`` a port of our choosing,
    ``main_options=`` options of ``main.py`` before ``run``.
    """
    started: list[GatewayProcess] = []

    def start(
        site: dict[str, Any] | None = None,
        web_port: int | None = None,
        main_options: tuple[str, ...] = (),
        **options: Any,
    ) -> GatewayProcess:
        config = site or site_config(topics.site, **options)
        site_file = write_site(tmp_path / f"{topics.site}.yaml", config)
        gateway = GatewayProcess(
            site_file, broker, tmp_path, topics, options=list(main_options)
        )
        if web_port is not None:
            gateway.web_port = web_port
        attach_log(request, "gateway log", gateway.log_path)
        started.append(gateway)
        return gateway.start()

    yield start
    for gateway in started:
        gateway.stop()


@pytest.fixture
def gateway(start_gateway: Callable[..., GatewayProcess]) -> GatewayProcess:
    """A running gateway on a four-bed ward whose escalations are minutes away."""
    return start_gateway()
