"""Alerts on the web page: the floor display, the console, and their JSON API.

Acknowledge, resolve and silence go through :meth:`Gateway.command`, the same
queue as a pager's MQTT message: the engine changes only on the gateway's
loop, and the answer comes after the change is committed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterable
from typing import TYPE_CHECKING, Annotated, Any
from zoneinfo import ZoneInfo

from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi.responses import RedirectResponse
from fastapi.sse import EventSourceResponse, ServerSentEvent
from pydantic import BaseModel, Field, model_validator

from gateway import audit, credit
from gateway.recognition import board as named_board
from gateway.store import alert_record
from gateway.web.auth import (
    DISPLAY_COOKIE,
    DISPLAY_LIFETIME,
    Gate,
    Reader,
    Supervisor,
)
from gateway.web.live import LiveHub
from gateway.web.pages import gateway_of, page
from rules.engine import EngineError, StationOnly, UnknownAlert, UnknownStaff

if TYPE_CHECKING:
    from gateway.service import Gateway

log = logging.getLogger(__name__)

router = APIRouter(tags=["alerts"])

RETRY_MS = 1000
"""How soon a page's EventSource reconnects after the stream drops."""


class AlertAction(BaseModel):
    note: str | None = Field(None, max_length=200)


class SilenceForm(BaseModel):
    device: str | None = Field(None, max_length=64)
    zone: str | None = Field(None, max_length=64)
    minutes: float = Field(gt=0, le=24 * 60)
    reason: str = Field(min_length=1, max_length=200)

    @model_validator(mode="after")
    def _one_place(self) -> SilenceForm:
        if (self.device is None) == (self.zone is None):
            raise ValueError("a silence covers exactly one device or one zone")
        return self


def site_names(gateway: Gateway) -> dict[str, Any]:
    """Names for ids, so pages say "Room 301", not "room-301"."""
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


async def run_command(
    gateway: Gateway, action: str, alert_id: str | None, **kw: Any
) -> dict[str, Any]:
    """Carry out an action and turn the engine's refusals into clear 4xx answers."""
    try:
        return await gateway.command(action, alert_id, **kw)
    except StationOnly as exc:
        raise HTTPException(409, str(exc)) from None
    except UnknownAlert as exc:
        raise HTTPException(404, str(exc)) from None
    except UnknownStaff as exc:
        raise HTTPException(
            422, f"{exc}; a technician links your account to a staff id"
        ) from None
    except EngineError as exc:
        # AlreadyResolved among them: somebody else was faster.
        raise HTTPException(
            409 if exc.reason == "alert_resolved" else 422, str(exc)
        ) from None
    except RuntimeError as exc:
        raise HTTPException(503, str(exc)) from None


# -- pages -------------------------------------------------------------------------


@router.get("/", include_in_schema=False)
@router.get("/floor", include_in_schema=False)
async def floor_page(request: Request, who: Reader) -> Response:
    """The wall display. ``/floor?token=...`` turns a display token into a cookie."""
    if who.display_token:
        gate: Gate = request.app.state.gate
        response = RedirectResponse("/floor", 303)
        gate.set_cookie(
            request, response, DISPLAY_COOKIE, who.display_token, DISPLAY_LIFETIME
        )
        return response
    return page("floor.html")


@router.get("/alerts", include_in_schema=False)
async def alerts_page(who: Supervisor) -> Response:
    return page("alerts.html")


# -- reading ---------------------------------------------------------------------


@router.get("/api/site")
async def site(request: Request, who: Reader) -> dict[str, Any]:
    """Names for ids, so displays can say "Room 301", not "room-301"."""
    return site_names(gateway_of(request))


@router.get("/api/alerts")
async def open_alerts(request: Request, who: Reader) -> list[dict[str, Any]]:
    """Every unresolved alert, highest level first, then oldest."""
    alerts = sorted(
        gateway_of(request).engine.alerts, key=lambda a: (-a.level, a.opened_at)
    )
    return [alert_record(alert) for alert in alerts]


@router.get("/api/alerts/recent")
async def recent_alerts(
    request: Request,
    who: Supervisor,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> list[dict[str, Any]]:
    """Open and closed alerts, the most recently changed first."""
    return gateway_of(request).store.recent_alerts(limit)


@router.get("/api/alerts/{alert_id}")
async def alert_detail(
    alert_id: str, request: Request, who: Supervisor
) -> dict[str, Any]:
    """One alert with its timeline: opened, acknowledged, escalated, resolved."""
    store = gateway_of(request).store
    row = store.alert(alert_id)
    if row is None:
        raise HTTPException(404, f"no alert with id {alert_id!r}")
    row["history"] = store.history(alert_id)
    return row


@router.get("/api/recognition")
async def recognition(request: Request, who: Supervisor) -> dict[str, Any]:
    """Per person and team, today and this week: gaps closed, response, kudos."""
    return await asyncio.to_thread(read_recognition, gateway_of(request))


def read_recognition(gateway: Gateway) -> dict[str, Any]:
    # A connection of its own: this runs in a worker thread, off the loop.
    conn = credit.open_reader(gateway.config.database.path)
    try:
        tz = ZoneInfo(gateway.config.site.timezone)
        summary = credit.recognition_summary(conn, gateway.credit_site, tz, time.time())
        # Opted-out people are named on no page, this API included.
        return named_board(summary, gateway.config.staff)
    finally:
        conn.close()


@router.get("/api/stream", response_class=EventSourceResponse)
async def floor_stream(request: Request, who: Reader) -> AsyncIterable[ServerSentEvent]:
    """Server-Sent Events: a ``snapshot`` of unresolved alerts, then each ``alert``
    change (with its ``change`` kind) as soon as it is committed."""
    hub: LiveHub = request.app.state.hub
    gateway = gateway_of(request)
    stream = hub.open()
    try:
        body = {
            "now": time.time(),
            "site": site_names(gateway),
            "alerts": hub.snapshot(),
        }
        yield ServerSentEvent(event="snapshot", data=body, retry=RETRY_MS)
        async for event in stream.relay():
            yield event
    finally:
        hub.close(stream)


# -- acting ------------------------------------------------------------------------


@router.post("/api/alerts/{alert_id}/ack")
async def acknowledge(
    alert_id: str, request: Request, who: Supervisor
) -> dict[str, Any]:
    """Take the alert: escalation stops. Needs an account linked to a staff id."""
    if who.staff is None:
        raise HTTPException(
            422,
            f"account {who.name!r} is linked to no staff id, and an acknowledgement "
            "names who is on the way; a technician links it on the Accounts page",
        )
    return await run_command(
        gateway_of(request), "ack", alert_id, staff=who.staff, via="web"
    )


@router.post("/api/alerts/{alert_id}/resolve")
async def resolve(alert_id: str, request: Request, who: Supervisor) -> dict[str, Any]:
    """Close the alert. Emergency and code calls refuse: only their station cancels."""
    return await run_command(
        gateway_of(request), "resolve", alert_id, staff=who.staff, via="web"
    )


@router.get("/api/silences")
async def silences(request: Request, who: Supervisor) -> list[dict[str, Any]]:
    return [
        {
            "id": s.id,
            "device": s.device,
            "zone": s.zone,
            "until": s.until,
            "reason": s.reason,
            "by": s.by,
        }
        for s in gateway_of(request).engine.silences
    ]


@router.post("/api/silences")
async def silence(
    form: SilenceForm, request: Request, who: Supervisor
) -> dict[str, Any]:
    """Hold back pages for one device or zone for some minutes, with a reason.

    Emergency and code calls are never held back."""
    gateway = gateway_of(request)
    done = await run_command(
        gateway,
        "silence",
        None,
        staff=who.staff,
        until=time.time() + form.minutes * 60,
        reason=form.reason,
        by=who.staff or who.name,
        device=form.device,
        zone=form.zone,
    )
    detail = form.model_dump(exclude_none=True)
    audit.record_now(
        gateway.store.db, who.name, "silence", target=done["silence"], detail=detail
    )
    return done


@router.delete("/api/silences/{silence_id}")
async def unsilence(
    silence_id: str, request: Request, who: Supervisor
) -> dict[str, Any]:
    gateway = gateway_of(request)
    if silence_id not in {s.id for s in gateway.engine.silences}:
        raise HTTPException(404, f"no active silence {silence_id!r}")
    done = await run_command(gateway, "unsilence", silence_id)
    audit.record_now(gateway.store.db, who.name, "end silence", target=silence_id)
    return done
