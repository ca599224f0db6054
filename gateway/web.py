"""The local web page, served by the gateway itself (FastAPI).

This first version is read-only: a floor view of unresolved alerts, their
timelines as JSON, and a health check. Configuration pages, sign-in and the
actions that change alerts come with the login they need.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

import uvicorn
from fastapi import FastAPI, HTTPException
from fastapi.responses import HTMLResponse

from gateway import credit
from gateway.store import alert_record

if TYPE_CHECKING:
    from gateway.service import Gateway

log = logging.getLogger(__name__)

FLOOR_PAGE = Path(__file__).with_name("static") / "floor.html"


def create_app(gateway: Gateway) -> FastAPI:
    app = FastAPI(title="Facility gateway", docs_url=None, redoc_url=None)

    # Every endpoint is ``async def``: it then runs on the gateway's own loop,
    # the one thread allowed to use the SQLite connection and the engine.

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        """Liveness for the service manager: database and broker link."""
        return {
            "status": "ok" if gateway.link.connected else "degraded",
            "broker_connected": gateway.link.connected,
            "open_alerts": len(gateway.engine.alerts),
            "events_accepted": gateway.accepted,
            "commits": gateway.store.commits,
            "messages_rejected": dict(gateway.rejected),
            "drivers": {d.name: dict(d.health()) for d in gateway.drivers},
            "upstream": gateway.sender.status(),
        }

    @app.get("/api/alerts")
    async def open_alerts() -> list[dict[str, Any]]:
        """Every unresolved alert, highest level first, then oldest."""
        alerts = sorted(gateway.engine.alerts, key=lambda a: (-a.level, a.opened_at))
        return [alert_record(alert) for alert in alerts]

    @app.get("/api/site")
    async def site() -> dict[str, Any]:
        """Names for ids, so displays can say "Room 301", not "room-301"."""
        config = gateway.config
        return {
            "id": config.site.id,
            "name": config.site.name or config.site.id,
            "zones": {zone.id: zone.name or zone.id for zone in config.zones},
            "rooms": {
                room.id: room.name or room.id
                for zone in config.zones
                for room in zone.rooms
            },
            "staff": {member.id: member.name for member in config.staff},
        }

    @app.get("/api/recognition")
    async def recognition() -> dict[str, Any]:
        """Per person and team, today and this week: gaps closed, response, kudos."""
        return await asyncio.to_thread(_recognition, gateway)

    @app.get("/api/alerts/{alert_id}")
    async def alert_detail(alert_id: str) -> dict[str, Any]:
        row = gateway.store.alert(alert_id)
        if row is None:
            raise HTTPException(404, f"no alert with id {alert_id!r}")
        row["history"] = gateway.store.history(alert_id)
        return row

    @app.get("/", response_class=HTMLResponse)
    async def floor() -> str:
        return FLOOR_PAGE.read_text()

    return app


def _recognition(gateway: Gateway) -> dict[str, Any]:
    # A connection of its own: this runs in a worker thread, off the loop.
    conn = credit.open_reader(gateway.config.database.path)
    try:
        tz = ZoneInfo(gateway.config.site.timezone)
        return credit.recognition_summary(conn, gateway.credit_site, tz, time.time())
    finally:
        conn.close()


class WebServer:
    """uvicorn on the gateway's own loop, stopped by the gateway, not by signals."""

    def __init__(self, gateway: Gateway, host: str, port: int) -> None:
        config = uvicorn.Config(
            create_app(gateway),
            host=host,
            port=port,
            log_config=None,
            access_log=False,
        )
        self._server = uvicorn.Server(config)
        # The gateway owns SIGINT and SIGTERM; uvicorn must not take them over.
        self._server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]

    @property
    def port(self) -> int | None:
        """The bound port once started (useful when configured as 0)."""
        for server in getattr(self._server, "servers", []):
            for sock in server.sockets:
                return int(sock.getsockname()[1])
        return None

    async def serve(self) -> None:
        """Serve until shut down; a failure to start costs the page, not the alerts."""
        try:
            await self._server.serve()
        except (OSError, SystemExit) as exc:
            # uvicorn exits the process when it cannot bind; paging must go on.
            log.error(
                "The web page is not served (%s); alerts and pages carry on",
                exc,
            )

    def shutdown(self) -> None:
        self._server.should_exit = True
