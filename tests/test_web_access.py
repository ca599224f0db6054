"""Every route of the web page, walked from ``app.routes``: none can escape.

Without a session, each answers 401 (the API) or redirects to sign-in (a
page); with a session but without the CSRF header, each change is refused.
A route added later is walked too, so it cannot be forgotten here.
"""

# Fixtures come from tests/web_helpers.py by import, which ruff takes for redefinitions.
# ruff: noqa: F811, F401
from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastapi.routing import APIRoute, iter_route_contexts

from gateway.config import GatewayConfig
from gateway.service import Gateway
from gateway.web import create_app
from tests.helpers import site_config
from tests.web_helpers import PIN, Web, technician, web, web_gateway

OPEN = {"/healthz", "/metrics", "/setup", "/signin", "/pager/signin", "/assets/{name}"}
"""Pages and files served to anyone: no data, no change."""

OPEN_CHANGES = {"/api/setup", "/api/signin", "/api/pager/signin"}
"""Changes made before signing in: refused without the CSRF cookie's value."""

CHANGES = {"POST", "PUT", "PATCH", "DELETE"}


def _routes(folder: Path) -> list[tuple[str, str]]:
    """(method, path) of every route the real app has."""
    config = GatewayConfig.model_validate(
        site_config("routes") | {"database": {"path": str(folder / "routes.db")}}
    )
    gateway = Gateway(config)
    try:
        app = create_app(gateway)
        # Routers are included lazily; FastAPI's own walk (the one its OpenAPI
        # document uses) reaches the routes inside them.
        contexts = list(iter_route_contexts(app.routes))
        others = [
            c.path for c in contexts if not isinstance(c.original_route, APIRoute)
        ]
        assert others == [], "a route of another kind would escape this walk"
        return sorted(
            (method, context.path)
            for context in contexts
            for method in context.methods or ()
            if method != "HEAD"
        )
    finally:
        gateway.store.close()


@pytest.fixture(scope="module")
def routes(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, str]]:
    found = _routes(tmp_path_factory.mktemp("routes"))
    assert len(found) > 25, found  # the walk sees the whole app
    return found


def _fill(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "0123456789abcdef", path)


def test_every_route_needs_a_session(routes, web):
    """No cookie: the API answers 401, pages send the browser to sign in."""
    client = web()
    for method, path in routes:
        if path in OPEN or path in OPEN_CHANGES:
            continue
        response = client.send(method, _fill(path), {}, csrf=False)
        if path.startswith("/api/"):
            assert response.status_code == 401, (method, path, response.text)
            assert response.json()["sign_in"] in ("/signin", "/pager/signin")
        else:
            assert response.status_code == 303, (method, path)
            location = response.headers["location"]
            assert location.split("?")[0] in ("/signin", "/pager/signin"), path


def test_a_forged_session_cookie_opens_nothing(routes, web):
    client = web()
    for name in ("gw_session", "gw_pager", "gw_display"):
        client.client.cookies.set(name, "some-token.AAAAAA.forgedsignature")
    for method, path in routes:
        if method == "GET" and path.startswith("/api/"):
            assert client.send(method, _fill(path)).status_code == 401, path


def test_every_change_needs_the_csrf_token(routes, technician, web):
    """Signed in (console and pager), a change without the header is refused."""
    technician.ok("PUT", "/api/staff/ana/pin", {"pin": PIN})
    phone = web()
    assert phone.pager_sign_in("ana").status_code == 200
    changes = [(m, p) for m, p in routes if m in CHANGES]
    assert len(changes) > 10, changes
    for method, path in changes:
        client = phone if path.startswith("/api/pager/") else technician
        for token in (None, "not-the-token"):
            headers = {} if token is None else {"X-CSRF-Token": token}
            response = client.client.request(
                method, _fill(path), json={}, headers=headers
            )
            assert response.status_code == 403, (method, path, token, response.text)
            assert "X-CSRF-Token" in response.json()["detail"], path
    # The sessions still work with their tokens: nothing above changed anything.
    assert technician.ok("GET", "/api/session")["role"] == "technician"


def test_open_routes_hold_no_data(web):
    """The open pages are sign-in forms and static files; /healthz is counts."""
    client = web()
    for path in ("/signin", "/pager/signin"):
        response = client.get(path)
        assert response.status_code == 200
        assert "<form" in response.text
    assert client.get("/assets/common.js").status_code == 200
    scraped = client.get("/metrics")
    assert scraped.status_code == 200
    assert "gateway_events_accepted" in scraped.text
    for person in ("ana", "ben", "call-1", "room-1"):
        assert f'"{person}"' not in scraped.text, person
    assert client.get("/assets/..%2Fweb%2Fauth.py").status_code == 404
    assert client.get("/assets/floor.html").status_code == 404
