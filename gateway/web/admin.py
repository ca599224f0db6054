"""What only a technician does: accounts, staff PINs and wall display tokens."""

from __future__ import annotations

import logging
import re
from typing import Any, Literal

from fastapi import APIRouter, HTTPException, Request, Response
from pydantic import BaseModel, Field

from gateway.web import passwords
from gateway.web.accounts import ROLES
from gateway.web.auth import TECHNICIAN, Gate, Technician
from gateway.web.pages import page

log = logging.getLogger(__name__)

router = APIRouter(tags=["accounts"])

NAME = r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$"


class AccountForm(BaseModel):
    role: Literal["technician", "supervisor"]
    password: str | None = Field(None, max_length=256)
    """Required for a new account; leave out to keep the current one."""

    staff: str | None = Field(None, max_length=64)
    """The site file's staff id, so acknowledgements name a person."""


class PinForm(BaseModel):
    pin: str = Field(max_length=16)


class DisplayForm(BaseModel):
    label: str = Field(min_length=1, max_length=80, description="e.g. 'West wing TV'")


def _gate(request: Request) -> Gate:
    return request.app.state.gate


@router.get("/accounts", include_in_schema=False)
async def accounts_page(who: Technician) -> Response:
    return page("accounts.html")


@router.get("/api/accounts")
async def list_accounts(request: Request, who: Technician) -> list[dict[str, Any]]:
    return _gate(request).accounts.users()


@router.put("/api/accounts/{name}")
async def put_account(
    name: str, form: AccountForm, request: Request, who: Technician
) -> dict[str, Any]:
    """Create an account, or change its role, password or staff link."""
    gate = _gate(request)
    if not _valid_name(name):
        raise HTTPException(422, "an account name is letters, digits and . _ @ -")
    if form.role not in ROLES:
        raise HTTPException(422, f"role must be one of {', '.join(ROLES)}")
    if form.staff is not None and gate.staff_member(form.staff) is None:
        raise HTTPException(422, f"staff id {form.staff!r} is not in the site file")
    existing = gate.accounts.user(name)
    if existing is None and not form.password:
        raise HTTPException(422, "a new account needs a password")
    if existing and existing["role"] == TECHNICIAN and form.role != TECHNICIAN:
        _keep_a_technician(gate, name)
    password_hash = None
    if form.password:
        problem = passwords.password_problem(form.password)
        if problem:
            raise HTTPException(422, problem)
        password_hash = await passwords.hash_secret(form.password)
    gate.accounts.put_user(name, form.role, form.staff, password_hash)
    log.info("Account %r saved by %s", name, who.name)
    return {"name": name, "role": form.role, "staff": form.staff}


@router.delete("/api/accounts/{name}")
async def delete_account(
    name: str, request: Request, who: Technician
) -> dict[str, Any]:
    gate = _gate(request)
    user = gate.accounts.user(name)
    if user is None:
        raise HTTPException(404, f"no account named {name!r}")
    if user["role"] == TECHNICIAN:
        _keep_a_technician(gate, name)
    gate.accounts.delete_user(name)
    log.warning("Account %r deleted by %s", name, who.name)
    return {"deleted": name}


@router.get("/api/staff")
async def list_staff(request: Request, who: Technician) -> list[dict[str, Any]]:
    """The site file's staff, and whether each can sign in on the pager page."""
    gate = _gate(request)
    with_pins = gate.accounts.staff_with_pins()
    return [
        {
            "id": m.id,
            "name": m.name,
            "roles": list(m.roles),
            "has_pin": m.id in with_pins,
        }
        for m in gate.gateway.config.staff
    ]


@router.put("/api/staff/{staff_id}/pin")
async def set_pin(
    staff_id: str, form: PinForm, request: Request, who: Technician
) -> dict[str, Any]:
    """Set a staff member's pager PIN; signs their pager pages out."""
    gate = _gate(request)
    if gate.staff_member(staff_id) is None:
        raise HTTPException(404, f"staff id {staff_id!r} is not in the site file")
    problem = passwords.pin_problem(form.pin)
    if problem:
        raise HTTPException(422, problem)
    gate.accounts.set_pin(staff_id, await passwords.hash_secret(form.pin), who.name)
    return {"staff": staff_id, "has_pin": True}


@router.delete("/api/staff/{staff_id}/pin")
async def clear_pin(staff_id: str, request: Request, who: Technician) -> dict[str, Any]:
    _gate(request).accounts.clear_pin(staff_id)
    return {"staff": staff_id, "has_pin": False}


@router.get("/api/display-tokens")
async def list_display_tokens(
    request: Request, who: Technician
) -> list[dict[str, Any]]:
    return _gate(request).accounts.display_tokens()


@router.post("/api/display-tokens")
async def mint_display_token(
    form: DisplayForm, request: Request, who: Technician
) -> dict[str, Any]:
    """A read-only token for a wall screen; shown once, kept only as a hash."""
    token_id, token = _gate(request).accounts.mint_display_token(form.label, who.name)
    return {
        "id": token_id,
        "label": form.label,
        "token": token,
        "url": f"/floor?token={token}",
    }


@router.delete("/api/display-tokens/{token_id}")
async def revoke_display_token(
    token_id: str, request: Request, who: Technician
) -> dict[str, Any]:
    if not _gate(request).accounts.revoke_display_token(token_id):
        raise HTTPException(404, f"no active display token {token_id!r}")
    log.warning("Display token %s revoked by %s", token_id, who.name)
    return {"revoked": token_id}


def _keep_a_technician(gate: Gate, leaving: str) -> None:
    others = [
        u
        for u in gate.accounts.users()
        if u["role"] == TECHNICIAN and u["name"] != leaving
    ]
    if not others:
        raise HTTPException(
            409, "this is the last technician account; add another first"
        )


def _valid_name(name: str) -> bool:
    return re.fullmatch(NAME, name) is not None
