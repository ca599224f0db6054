"""The FastAPI application: its parts, the sign-in gate, and the open health check."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response

from gateway import health, metrics
from gateway.web import admin, alerts, devices, pager, rules, signin
from gateway.web.accounts import Accounts
from gateway.web.auth import Gate, NotSignedIn, Supervisor
from gateway.web.live import LiveHub
from gateway.web.pages import HEADERS, STATIC

if TYPE_CHECKING:
    from gateway.service import Gateway

log = logging.getLogger(__name__)

ASSET_TYPES = {".css": "text/css", ".js": "text/javascript", ".svg": "image/svg+xml"}
"""Files under ``gateway/static`` served to anyone: styles and scripts, no data."""

OPEN_PATHS = (
    "/healthz",
    "/metrics",
    "/setup",
    "/signin",
    "/pager/signin",
    "/assets/{name}",
)
"""Routes served without signing in; ``tests/test_web_access.py`` holds the same list
and walks every other route. ``/metrics`` is open because a Prometheus scraper has no
session; it carries counts only, never a person's or a device's id."""

OPEN_CHANGES = ("/api/setup", "/api/signin", "/api/pager/signin")
"""Changes made before signing in; they still need the CSRF cookie's value."""


def create_app(gateway: Gateway) -> FastAPI:
    app = FastAPI(
        title="Facility gateway",
        summary="The gateway's local web page and its JSON API",
        description=(
            "Sign in with POST /api/signin (technicians, supervisors) or "
            "/api/pager/signin (staff). Every POST, PUT and DELETE needs the "
            "X-CSRF-Token header with the token the sign-in returned."
        ),
        docs_url=None,  # the interactive docs load from a CDN; none on site
        redoc_url=None,
        openapi_url=None,  # served below, behind sign-in
    )
    app.state.gateway = gateway
    app.state.gate = Gate(gateway, Accounts(gateway.store.db))
    app.state.hub = LiveHub(gateway)
    app.state.dry_run_lock = asyncio.Lock()  # one dry run at a time
    app.add_exception_handler(NotSignedIn, _not_signed_in)

    # Every endpoint is ``async def``: it then runs on the gateway's own loop,
    # the one thread allowed to use the SQLite connection and the engine.

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, Any]:
        """Liveness for the service manager and installer: open, no sign-in."""
        status = "ok" if gateway.link.connected else "degraded"
        return {
            # "trouble": the database refuses commits, so alerting waits.
            "status": "trouble" if gateway.trouble else status,
            "trouble": gateway.trouble,
            "broker_connected": gateway.link.connected,
            "open_alerts": len(gateway.engine.alerts),
            "events_accepted": gateway.accepted,
            "commits": gateway.store.commits,
            "messages_rejected": dict(gateway.rejected),
            "drivers": {d.name: dict(d.health()) for d in gateway.drivers},
            "upstream": gateway.sender.status(),
            "web": {"live_streams": app.state.hub.streams},
            # Broker link since, disk, clock, loop lag, uptime: counts only.
            "gateway": health.gateway_health(gateway, time.time()),
        }

    @app.get("/metrics", tags=["health"], response_class=Response)
    async def prometheus() -> Response:
        """Counters, gauges and histograms for Prometheus; no personal ids."""
        body, content_type = metrics.render(gateway)
        return Response(body, media_type=content_type)

    @app.get("/api/openapi.json", tags=["health"])
    async def openapi(who: Supervisor) -> dict[str, Any]:
        """This API's OpenAPI document."""
        return app.openapi()

    @app.get("/assets/{name}", include_in_schema=False)
    async def asset(name: str) -> Response:
        path = STATIC / name
        media_type = ASSET_TYPES.get(path.suffix)
        if media_type is None or "/" in name or not path.is_file():
            raise HTTPException(404, f"no asset {name!r}")
        return FileResponse(path, media_type=media_type, headers=HEADERS)

    for part in (signin, admin, alerts, pager, devices, rules):
        app.include_router(part.router)
    return app


async def _not_signed_in(request: Request, exc: Exception) -> Response:
    """The API answers 401; a page sends the browser to sign in, and back after."""
    assert isinstance(exc, NotSignedIn)
    if request.url.path.startswith("/api/"):
        return JSONResponse({"detail": str(exc), "sign_in": exc.where}, 401)
    target = exc.where
    if target != "/setup":
        target += "?next=" + quote(request.url.path)
    return RedirectResponse(target, 303)
