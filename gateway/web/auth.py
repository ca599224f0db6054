"""Sign-in, roles and CSRF: who may see and change what on the web page.

Roles: a *technician* may do everything; a *supervisor* handles alerts,
silences and recognition; a *display* (a wall screen, by a token a
technician minted) only reads; *staff* sign in on the pager page with a PIN.

Cookies are signed (itsdangerous) and name a session kept in SQLite, so a
technician can end one, and a new password ends them all. Every change
(POST, PUT, PATCH, DELETE) must carry the ``X-CSRF-Token`` header: the
session's own token once signed in, or before that (sign-in, setup) the
value of the ``gw_csrf`` cookie, which another site can neither read nor set.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, HTTPException, Request, Response
from itsdangerous import BadSignature, TimestampSigner

from gateway.config import WebSettings
from gateway.web.accounts import PAGER, USER, Accounts, Session
from gateway.web.throttle import SignInThrottle

if TYPE_CHECKING:
    from gateway.service import Gateway

log = logging.getLogger(__name__)

TECHNICIAN = "technician"
SUPERVISOR = "supervisor"
DISPLAY = "display"
STAFF = "staff"

STAFF_ROLES = (TECHNICIAN, SUPERVISOR)
"""Who may act on alerts from the web console."""

READERS = (TECHNICIAN, SUPERVISOR, DISPLAY)
"""Who may watch the floor."""

SESSION_COOKIE = "gw_session"
PAGER_COOKIE = "gw_pager"
DISPLAY_COOKIE = "gw_display"
CSRF_COOKIE = "gw_csrf"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

DISPLAY_LIFETIME = 400 * 86400.0
"""Seconds a wall screen's cookie lasts; the token itself is checked on every
request, so revoking it takes effect at once."""


@dataclass(frozen=True)
class Principal:
    """Who is asking: a signed-in account, a wall display or a staff member."""

    role: str
    name: str
    """Account name, display label, or the staff member's name."""

    staff: str | None = None
    """The site file's staff id: a pager's person, or an account's link."""

    csrf: str = ""
    token: str | None = None
    """The session token, so signing out can end it."""

    display_token: str | None = None
    """A display token given in the address, to be turned into a cookie."""


class NotSignedIn(Exception):
    """No usable session: pages redirect to ``where``, the API answers 401."""

    def __init__(self, where: str, message: str) -> None:
        self.where = where
        super().__init__(message)


class Gate:
    """Reads cookies into a :class:`Principal`, and writes them."""

    def __init__(self, gateway: Gateway, accounts: Accounts) -> None:
        self.gateway = gateway
        self.accounts = accounts
        self.settings: WebSettings = gateway.config.web
        self.throttle = SignInThrottle()
        self._signer = TimestampSigner(accounts.secret("cookies"), salt="session")
        self.setup_code: str | None = None
        self._bootstrap()

    # -- first run ---------------------------------------------------------------

    @property
    def needs_setup(self) -> bool:
        return self.setup_code is not None

    def _bootstrap(self) -> None:
        """Take the installer's hash, or ask for a password with a code from the log."""
        if self.accounts.has_technician():
            return
        try:
            placed = self.settings.installer_hash()
        except (OSError, ValueError) as exc:
            log.error("Cannot use the installer's technician password hash: %s", exc)
            placed = None
        if placed is not None:
            name = self.settings.admin_user
            self.accounts.put_user(name, TECHNICIAN, None, placed)
            log.info("Technician account %r created from the installer's hash", name)
            return
        self.setup_code = "-".join(
            "".join(secrets.choice("0123456789") for _ in range(4)) for _ in range(2)
        )
        # The log is readable only by whoever runs the gateway: knowing the
        # code proves that, so nobody else on the network can claim it first.
        log.warning(
            "No technician password is set. Open /setup on the gateway's web "
            "page and enter the setup code %s (a new code at every start)",
            self.setup_code,
        )

    def setup_done(self) -> None:
        self.setup_code = None

    # -- who is asking -------------------------------------------------------------

    def admit(self, request: Request, roles: tuple[str, ...]) -> Principal:
        """The caller, if signed in with one of ``roles``; CSRF-checked for changes."""
        if self.needs_setup:
            raise NotSignedIn(
                "/setup", "no technician password is set yet; open /setup first"
            )
        who = self.identify(request, roles)
        if who is None:
            where = "/pager/signin" if roles == (STAFF,) else "/signin"
            raise NotSignedIn(where, f"sign in first (at {where})")
        if who.role not in roles:
            raise HTTPException(
                403,
                f"this needs a {' or '.join(roles)} account; "
                f"you are signed in as {who.role}",
            )
        if request.method not in SAFE_METHODS:
            check_csrf(request, who.csrf)
        return who

    def identify(self, request: Request, roles: tuple[str, ...]) -> Principal | None:
        """Whoever the cookies say, trying first the kind the route is for."""
        kinds = [self._account, self._display, self._pager]
        if STAFF in roles:
            kinds = [self._pager, self._account, self._display]
        for kind in kinds:
            who = kind(request)
            if who is not None:
                return who
        return None

    def _account(self, request: Request) -> Principal | None:
        found = self._session(request, SESSION_COOKIE, USER)
        if found is None:
            return None
        token, session = found
        user = self.accounts.user(session.subject)
        if user is None:
            return None
        return Principal(user["role"], user["name"], user["staff"], session.csrf, token)

    def _pager(self, request: Request) -> Principal | None:
        found = self._session(request, PAGER_COOKIE, PAGER)
        if found is None:
            return None
        token, session = found
        member = self.staff_member(session.subject)
        if member is None:
            return None  # gone from the site file since
        return Principal(STAFF, member.name, member.id, session.csrf, token)

    def _display(self, request: Request) -> Principal | None:
        token = self._unsign(request.cookies.get(DISPLAY_COOKIE), DISPLAY_LIFETIME)
        given = None
        if token is None and request.method == "GET":
            token = given = request.query_params.get("token")
        if not token:
            return None
        row = self.accounts.display_token(token)
        if row is None:
            return None
        return Principal(DISPLAY, row["label"], display_token=given)

    def _session(
        self, request: Request, cookie: str, kind: str
    ) -> tuple[str, Session] | None:
        lifetime = self.lifetime(kind)
        token = self._unsign(request.cookies.get(cookie), lifetime)
        if token is None:
            return None
        session = self.accounts.session(token, kind)
        return None if session is None else (token, session)

    def _unsign(self, value: str | None, max_age: float) -> str | None:
        if not value:
            return None
        try:
            return self._signer.unsign(value, max_age=int(max_age)).decode()
        except BadSignature:
            return None

    def staff_member(self, staff_id: str) -> Any:
        return next((m for m in self.gateway.config.staff if m.id == staff_id), None)

    def lifetime(self, kind: str) -> float:
        if kind == PAGER:
            return self.settings.pager_session_days * 86400
        return self.settings.session_hours * 3600

    # -- cookies -------------------------------------------------------------------

    def set_cookie(
        self,
        request: Request,
        response: Response,
        name: str,
        token: str,
        max_age: float,
    ) -> None:
        response.set_cookie(
            name,
            self._signer.sign(token).decode(),
            max_age=int(max_age),
            httponly=True,
            samesite="strict",
            secure=self.secure(request),
            path="/",
        )

    def clear_cookie(self, request: Request, response: Response, name: str) -> None:
        response.delete_cookie(
            name, httponly=True, samesite="strict", secure=self.secure(request)
        )

    def secure(self, request: Request) -> bool:
        """Secure cookies behind TLS (uvicorn reads X-Forwarded-Proto) or when told."""
        return self.settings.secure_cookies or request.url.scheme == "https"

    def give_csrf_cookie(self, request: Request, response: Response) -> None:
        """A page that signs in sends this cookie's value back as its CSRF token."""
        if request.cookies.get(CSRF_COOKIE):
            return
        response.set_cookie(
            CSRF_COOKIE,
            secrets.token_urlsafe(24),
            httponly=False,  # the page's script reads it to send it back
            samesite="strict",
            secure=self.secure(request),
            path="/",
        )


def check_csrf(request: Request, expected: str) -> None:
    given = request.headers.get(CSRF_HEADER, "")
    if not expected or not given or not secrets.compare_digest(given, expected):
        raise HTTPException(
            403,
            f"missing or stale {CSRF_HEADER} header; reload the page and try again",
        )


def allow(*roles: str) -> Any:
    """Dependency: the caller, signed in with one of ``roles``."""

    async def signed_in(request: Request) -> Principal:
        gate: Gate = request.app.state.gate
        return gate.admit(request, roles)

    return Depends(signed_in)


def public_change() -> Any:
    """Dependency for changes made before signing in: the CSRF cookie's value."""

    async def double_submit(request: Request) -> None:
        check_csrf(request, request.cookies.get(CSRF_COOKIE, ""))

    return Depends(double_submit)


Technician = Annotated[Principal, allow(TECHNICIAN)]
"""A route parameter: the caller, a signed-in technician."""

Supervisor = Annotated[Principal, allow(*STAFF_ROLES)]
"""A route parameter: a signed-in supervisor or technician."""

Reader = Annotated[Principal, allow(*READERS)]
"""A route parameter: anyone who may watch the floor, wall displays included."""

StaffMember = Annotated[Principal, allow(STAFF)]
"""A route parameter: a staff member signed in on the pager page."""
