"""First-run setup, sign-in and sign-out for technicians and supervisors."""

from __future__ import annotations

import logging
import secrets
from typing import Any

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.responses import RedirectResponse
from pydantic import BaseModel, Field

from gateway.web import passwords
from gateway.web.accounts import USER
from gateway.web.auth import (
    SESSION_COOKIE,
    TECHNICIAN,
    Gate,
    Reader,
    Supervisor,
    public_change,
)
from gateway.web.pages import page
from gateway.web.throttle import Throttled

log = logging.getLogger(__name__)

router = APIRouter(tags=["sign-in"])


class SetupForm(BaseModel):
    code: str = Field(max_length=32, description="The setup code from the log")
    name: str = Field("technician", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
    password: str = Field(max_length=256)


class SignInForm(BaseModel):
    name: str = Field(max_length=64)
    password: str = Field(max_length=256)


class SessionInfo(BaseModel):
    name: str
    role: str
    staff: str | None
    csrf: str = Field(description="Send back as X-CSRF-Token with every change")


def _gate(request: Request) -> Gate:
    return request.app.state.gate


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


@router.get("/setup", include_in_schema=False)
async def setup_page(request: Request) -> Response:
    gate = _gate(request)
    if not gate.needs_setup:
        return RedirectResponse("/signin", 303)
    response = page("setup.html")
    gate.give_csrf_cookie(request, response)
    return response


@router.post("/api/setup", dependencies=[public_change()])
async def setup(form: SetupForm, request: Request, response: Response) -> SessionInfo:
    """Set the first technician's password, with the setup code from the log."""
    gate = _gate(request)
    if not gate.needs_setup:
        raise HTTPException(409, "a technician password is already set; sign in")
    check_throttle(gate, "(setup)", request)
    assert gate.setup_code is not None
    if not secrets.compare_digest(form.code.strip(), gate.setup_code):
        gate.throttle.failed("(setup)", client_address(request))
        raise HTTPException(
            401, "wrong setup code; it is in the gateway's log (journalctl)"
        )
    problem = passwords.password_problem(form.password)
    if problem:
        raise HTTPException(422, problem)
    password_hash = await passwords.hash_secret(form.password)
    if not gate.needs_setup:  # someone else finished while we hashed
        raise HTTPException(409, "a technician password is already set; sign in")
    gate.accounts.put_user(form.name, TECHNICIAN, None, password_hash)
    gate.setup_done()
    log.warning(
        "Technician account %r set up from %s", form.name, client_address(request)
    )
    return _open_session(gate, request, response, form.name, TECHNICIAN, None)


@router.get("/signin", include_in_schema=False)
async def signin_page(request: Request) -> Response:
    gate = _gate(request)
    if gate.needs_setup:
        return RedirectResponse("/setup", 303)
    response = page("signin.html")
    gate.give_csrf_cookie(request, response)
    return response


@router.post("/api/signin", dependencies=[public_change()])
async def signin(form: SignInForm, request: Request, response: Response) -> SessionInfo:
    """Sign in with an account's name and password; sets the session cookie."""
    gate = _gate(request)
    if gate.needs_setup:
        raise HTTPException(401, "no technician password is set yet; open /setup")
    check_throttle(gate, form.name, request)
    user = gate.accounts.user(form.name)
    stored = user["password_hash"] if user else None
    if not await passwords.verify_secret(stored, form.password) or user is None:
        gate.throttle.failed(form.name, client_address(request))
        raise HTTPException(401, "wrong name or password")
    gate.throttle.succeeded(form.name)
    log.info(
        "%s %r signed in from %s", user["role"], user["name"], client_address(request)
    )
    return _open_session(
        gate, request, response, user["name"], user["role"], user["staff"]
    )


@router.post("/api/signout")
async def signout(
    request: Request, response: Response, who: Supervisor
) -> dict[str, Any]:
    gate = _gate(request)
    if who.token:
        gate.accounts.close_session(who.token)
    gate.clear_cookie(request, response, SESSION_COOKIE)
    return {"signed_out": who.name}


@router.get("/api/session")
async def session(who: Reader) -> SessionInfo:
    """Who is signed in, and the CSRF token the page sends with changes."""
    return SessionInfo(name=who.name, role=who.role, staff=who.staff, csrf=who.csrf)


def check_throttle(gate: Gate, account: str, request: Request) -> None:
    try:
        gate.throttle.check(account, client_address(request))
    except Throttled as exc:
        raise HTTPException(
            429, str(exc), headers={"Retry-After": str(exc.wait)}
        ) from None


def _open_session(
    gate: Gate,
    request: Request,
    response: Response,
    name: str,
    role: str,
    staff: str | None,
) -> SessionInfo:
    lifetime = gate.lifetime(USER)
    token, session = gate.accounts.open_session(USER, name, lifetime)
    gate.set_cookie(request, response, SESSION_COOKIE, token, lifetime)
    return SessionInfo(name=name, role=role, staff=staff, csrf=session.csrf)
