"""Helpers for the web page's tests: a site with a technician, an HTTP client
that signs in and sends its CSRF token, and a staff member with a pager PIN."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest
from argon2 import PasswordHasher

from tests.helpers import WAIT, GatewayProcess, SiteTopics, site_config

TECHNICIAN_PASSWORD = "test-only technician password"  # noqa: S105
SUPERVISOR_PASSWORD = "test-only supervisor password"  # noqa: S105
PIN = "482916"

_HASH = PasswordHasher().hash(TECHNICIAN_PASSWORD)


def web_site(topics: SiteTopics, **options: Any) -> dict[str, Any]:
    """The test ward, with the technician's hash placed as an installer would."""
    config = site_config(topics.site, **options)
    config["web"] = {"admin_password_hash": _HASH}
    return config


class Web:
    """A browser without a browser: cookies, and the CSRF token it was given."""

    def __init__(self, gateway: GatewayProcess) -> None:
        self.gateway = gateway
        gateway.healthz()  # the web server binds a moment after MQTT is up
        self.base = f"http://127.0.0.1:{gateway.web_port}"
        self.client = httpx.Client(base_url=self.base, timeout=WAIT)
        self.csrf: str | None = None

    def close(self) -> None:
        self.client.close()

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.client.get(path, **kwargs)

    def send(
        self, method: str, path: str, body: Any = None, *, csrf: bool = True
    ) -> httpx.Response:
        headers = {"X-CSRF-Token": self.csrf or ""} if csrf else {}
        return self.client.request(method, path, json=body, headers=headers)

    def csrf_cookie(self, page: str = "/signin") -> str:
        """Load a sign-in page, as a browser would, for its CSRF cookie."""
        self.get(page).raise_for_status()
        return self.client.cookies["gw_csrf"]

    def sign_in(
        self, name: str = "technician", password: str = TECHNICIAN_PASSWORD
    ) -> httpx.Response:
        self.csrf = self.csrf_cookie()
        response = self.send(
            "POST", "/api/signin", {"name": name, "password": password}
        )
        if response.status_code == 200:
            self.csrf = response.json()["csrf"]
        return response

    def pager_sign_in(self, name: str, pin: str = PIN) -> httpx.Response:
        self.csrf = self.csrf_cookie("/pager/signin")
        response = self.send("POST", "/api/pager/signin", {"name": name, "pin": pin})
        if response.status_code == 200:
            self.csrf = response.json()["csrf"]
        return response

    def ok(self, method: str, path: str, body: Any = None) -> Any:
        response = self.send(method, path, body)
        assert response.status_code == 200, (method, path, response.text)
        return response.json()


@pytest.fixture
def web_gateway(
    start_gateway: Callable[..., GatewayProcess], topics: SiteTopics
) -> GatewayProcess:
    """A running gateway whose technician password the installer placed."""
    return start_gateway(site=web_site(topics))


@pytest.fixture
def web(web_gateway: GatewayProcess) -> Any:
    """Factory: ``web()`` a new client, not signed in; closed after the test."""
    clients: list[Web] = []

    def new() -> Web:
        client = Web(web_gateway)
        clients.append(client)
        return client

    yield new
    for client in clients:
        client.close()


@pytest.fixture
def technician(web: Callable[[], Web]) -> Web:
    client = web()
    assert client.sign_in().status_code == 200
    return client
