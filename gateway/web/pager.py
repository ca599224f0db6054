"""The staff pager page: a phone signs in with name and PIN and gets its pages live.

A staff member hears what a hardware pager subscribed to ``pagers/<staff id>``
and ``pagers/<role>`` would hear, and acknowledges or resolves with one tap
through the same path as a pager's MQTT message.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterable
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.responses import RedirectResponse
from fastapi.sse import EventSourceResponse, ServerSentEvent
from pydantic import BaseModel, Field

from gateway.web import passwords
from gateway.web.accounts import PAGER
from gateway.web.alerts import RETRY_MS, run_command, site_names
from gateway.web.auth import PAGER_COOKIE, STAFF, Gate, StaffMember, public_change
from gateway.web.live import LiveHub
from gateway.web.pages import page
from gateway.web.signin import check_throttle, client_address

if TYPE_CHECKING:
    from gateway.service import Gateway

log = logging.getLogger(__name__)

router = APIRouter(tags=["pager"])


class PagerSignIn(BaseModel):
    name: str = Field(max_length=80, description="Staff id or full name")
    pin: str = Field(max_length=16)


def _gate(request: Request) -> Gate:
    return request.app.state.gate


def _targets(gateway: Gateway, staff_id: str) -> frozenset[str]:
    """The pager topics this person hears: their own and their roles'."""
    member = next(m for m in gateway.config.staff if m.id == staff_id)
    return frozenset((member.id, *member.roles))


@router.get("/pager/signin", include_in_schema=False)
async def pager_signin_page(request: Request) -> Response:
    gate = _gate(request)
    if gate.identify(request, (STAFF,)) is not None:
        return RedirectResponse("/pager", 303)
    response = page("pager-signin.html")
    gate.give_csrf_cookie(request, response)
    return response


@router.get("/pager", include_in_schema=False)
async def pager_page(who: StaffMember) -> Response:
    return page("pager.html")


@router.post("/api/pager/signin", dependencies=[public_change()])
async def pager_signin(
    form: PagerSignIn, request: Request, response: Response
) -> dict[str, Any]:
    """Sign in on the pager page: staff id or name, and the PIN a technician set."""
    gate = _gate(request)
    wanted = form.name.strip().casefold()
    member = next(
        (
            m
            for m in gate.gateway.config.staff
            if wanted in (m.id.casefold(), m.name.casefold())
        ),
        None,
    )
    account = member.id if member else wanted
    check_throttle(gate, f"pager:{account}", request)
    stored = gate.accounts.pin_hash(member.id) if member else None
    if member is None or not await passwords.verify_secret(stored, form.pin):
        gate.throttle.failed(f"pager:{account}", client_address(request))
        raise HTTPException(
            401, "wrong name or PIN (a technician sets PINs on the Accounts page)"
        )
    gate.throttle.succeeded(f"pager:{account}")
    lifetime = gate.lifetime(PAGER)
    token, session = gate.accounts.open_session(PAGER, member.id, lifetime)
    gate.set_cookie(request, response, PAGER_COOKIE, token, lifetime)
    log.info(
        "%s signed in on the pager page from %s", member.id, client_address(request)
    )
    return {"staff": member.id, "name": member.name, "csrf": session.csrf}


@router.get("/api/pager/me")
async def pager_me(request: Request, who: StaffMember) -> dict[str, Any]:
    """Who this pager belongs to, the topics it hears, and its CSRF token."""
    assert who.staff is not None
    targets = _targets(request.app.state.gateway, who.staff)
    return {
        "staff": who.staff,
        "name": who.name,
        "hears": sorted(targets),
        "csrf": who.csrf,
    }


@router.post("/api/pager/signout")
async def pager_signout(
    request: Request, response: Response, who: StaffMember
) -> dict[str, Any]:
    gate = _gate(request)
    if who.token:
        gate.accounts.close_session(who.token)
    gate.clear_cookie(request, response, PAGER_COOKIE)
    return {"signed_out": who.staff}


@router.get("/api/pager/stream", response_class=EventSourceResponse)
async def pager_stream(
    request: Request, who: StaffMember
) -> AsyncIterable[ServerSentEvent]:
    """Server-Sent Events: a ``snapshot`` (unresolved alerts and the pages still
    remembered for this person), then each ``page`` for them and each ``alert``
    change, as soon as it is committed."""
    assert who.staff is not None
    hub: LiveHub = request.app.state.hub
    gateway: Gateway = request.app.state.gateway
    targets = _targets(gateway, who.staff)
    stream = hub.open(targets)
    try:
        body = {
            "now": time.time(),
            "site": site_names(gateway),
            "alerts": hub.snapshot(),
            "pages": hub.recent_pages(targets),
        }
        yield ServerSentEvent(event="snapshot", data=body, retry=RETRY_MS)
        async for event in stream.relay():
            yield event
    finally:
        hub.close(stream)


@router.post("/api/pager/alerts/{alert_id}/ack")
async def pager_ack(
    alert_id: str, request: Request, who: StaffMember
) -> dict[str, Any]:
    """ "On my way": escalation stops, and the floor shows who is coming."""
    gateway = request.app.state.gateway
    return await run_command(gateway, "ack", alert_id, staff=who.staff, via="pager")


@router.post("/api/pager/alerts/{alert_id}/resolve")
async def pager_resolve(
    alert_id: str, request: Request, who: StaffMember
) -> dict[str, Any]:
    """Done. Emergency and code calls refuse: only their station cancels them."""
    gateway = request.app.state.gateway
    return await run_command(gateway, "resolve", alert_id, staff=who.staff, via="pager")
