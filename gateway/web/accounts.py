"""Web accounts, sessions, display tokens and staff PINs in the gateway's SQLite file.

Used only from the gateway's event loop, like the rest of the store. Sessions
and display tokens are random values held by the browser; the database keeps
only their SHA-256, so a copied database file opens no session.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sqlite_utils

log = logging.getLogger(__name__)

ROLES = ("technician", "supervisor")
"""Roles of accounts with a password. Wall displays use tokens and staff use
PINs on the pager page; neither is an account."""

USER = "user"
PAGER = "pager"
"""Session kinds: a technician's or supervisor's browser, or a staff pager page."""


@dataclass(frozen=True)
class Session:
    kind: str
    subject: str
    """The account name, or the staff id for a pager session."""

    csrf: str
    """Sent back in the ``X-CSRF-Token`` header of every change."""

    expires_at: float


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Accounts:
    def __init__(
        self, db: sqlite_utils.Database, clock: Callable[[], float] = time.time
    ) -> None:
        self.db = db
        self.clock = clock

    # -- accounts with a password --------------------------------------------------

    def has_technician(self) -> bool:
        rows = self.db.execute(
            "SELECT 1 FROM web_users WHERE role = 'technician' LIMIT 1"
        ).fetchall()
        return bool(rows)

    def user(self, name: str) -> dict[str, Any] | None:
        rows = list(self.db.query("SELECT * FROM web_users WHERE name = ?", [name]))
        return rows[0] if rows else None

    def users(self) -> list[dict[str, Any]]:
        """Every account, without its hash."""
        return list(
            self.db.query(
                "SELECT name, role, staff, created_at, updated_at FROM web_users "
                "ORDER BY name"
            )
        )

    def put_user(
        self,
        name: str,
        role: str,
        staff: str | None,
        password_hash: str | None = None,
    ) -> None:
        """Create an account or change its role, staff link and password."""
        now = self.clock()
        existing = self.user(name)
        if existing is None and password_hash is None:
            raise ValueError(f"a new account ({name}) needs a password")
        with self.db.atomic():
            if existing is None:
                self.db.execute(
                    "INSERT INTO web_users (name, role, password_hash, staff, "
                    "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?)",
                    [name, role, password_hash, staff, now, now],
                )
            else:
                self.db.execute(
                    "UPDATE web_users SET role = ?, staff = ?, "
                    "password_hash = COALESCE(?, password_hash), updated_at = ? "
                    "WHERE name = ?",
                    [role, staff, password_hash, now, name],
                )
            if existing is not None and (password_hash or role != existing["role"]):
                # A new password or role signs the account out everywhere.
                self._close_all(USER, name)
        log.info("Web account %s saved (role %s, staff %s)", name, role, staff)

    def delete_user(self, name: str) -> bool:
        with self.db.atomic():
            cursor = self.db.execute("DELETE FROM web_users WHERE name = ?", [name])
            self._close_all(USER, name)
        return cursor.rowcount > 0

    # -- sessions ----------------------------------------------------------------------

    def open_session(
        self, kind: str, subject: str, lifetime: float
    ) -> tuple[str, Session]:
        token = secrets.token_urlsafe(32)
        now = self.clock()
        session = Session(kind, subject, secrets.token_urlsafe(32), now + lifetime)
        with self.db.atomic():
            # Expired sessions go when new ones come: the table stays small.
            self.db.execute("DELETE FROM web_sessions WHERE expires_at < ?", [now])
            self.db.execute(
                "INSERT INTO web_sessions (token_hash, kind, subject, csrf, "
                "created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?)",
                [digest(token), kind, subject, session.csrf, now, session.expires_at],
            )
        return token, session

    def session(self, token: str, kind: str) -> Session | None:
        rows = list(
            self.db.query(
                "SELECT kind, subject, csrf, expires_at FROM web_sessions "
                "WHERE token_hash = ? AND kind = ? AND expires_at > ?",
                [digest(token), kind, self.clock()],
            )
        )
        return Session(**rows[0]) if rows else None

    def close_session(self, token: str) -> None:
        with self.db.atomic():
            self.db.execute(
                "DELETE FROM web_sessions WHERE token_hash = ?", [digest(token)]
            )

    def _close_all(self, kind: str, subject: str) -> None:
        self.db.execute(
            "DELETE FROM web_sessions WHERE kind = ? AND subject = ?", [kind, subject]
        )

    # -- wall display tokens ---------------------------------------------------------

    def mint_display_token(self, label: str, by: str) -> tuple[str, str]:
        """A new read-only token for a wall screen: (its id, the token)."""
        token = secrets.token_urlsafe(32)
        token_id = secrets.token_hex(6)
        with self.db.atomic():
            self.db.execute(
                "INSERT INTO display_tokens (id, token_hash, label, created_by, "
                "created_at) VALUES (?, ?, ?, ?, ?)",
                [token_id, digest(token), label, by, self.clock()],
            )
        log.info("Display token %s (%s) minted by %s", token_id, label, by)
        return token_id, token

    def display_token(self, token: str) -> dict[str, Any] | None:
        rows = list(
            self.db.query(
                "SELECT id, label FROM display_tokens "
                "WHERE token_hash = ? AND revoked_at IS NULL",
                [digest(token)],
            )
        )
        return rows[0] if rows else None

    def display_tokens(self) -> list[dict[str, Any]]:
        return list(
            self.db.query(
                "SELECT id, label, created_by, created_at, revoked_at "
                "FROM display_tokens ORDER BY created_at"
            )
        )

    def revoke_display_token(self, token_id: str) -> bool:
        with self.db.atomic():
            cursor = self.db.execute(
                "UPDATE display_tokens SET revoked_at = ? "
                "WHERE id = ? AND revoked_at IS NULL",
                [self.clock(), token_id],
            )
        return cursor.rowcount > 0

    # -- staff PINs for the pager page ---------------------------------------------

    def set_pin(self, staff: str, pin_hash: str, by: str) -> None:
        with self.db.atomic():
            self.db.execute(
                "INSERT INTO staff_pins (staff, pin_hash, set_by, set_at) "
                "VALUES (?, ?, ?, ?) ON CONFLICT(staff) DO UPDATE SET "
                "pin_hash = excluded.pin_hash, set_by = excluded.set_by, "
                "set_at = excluded.set_at",
                [staff, pin_hash, by, self.clock()],
            )
            self._close_all(PAGER, staff)
        log.info("Pager PIN of %s set by %s", staff, by)

    def clear_pin(self, staff: str) -> None:
        with self.db.atomic():
            self.db.execute("DELETE FROM staff_pins WHERE staff = ?", [staff])
            self._close_all(PAGER, staff)

    def pin_hash(self, staff: str) -> str | None:
        rows = self.db.execute(
            "SELECT pin_hash FROM staff_pins WHERE staff = ?", [staff]
        ).fetchall()
        return rows[0][0] if rows else None

    def staff_with_pins(self) -> set[str]:
        return {row[0] for row in self.db.execute("SELECT staff FROM staff_pins")}

    # -- the key that signs cookies ----------------------------------------------------

    def secret(self, name: str) -> str:
        rows = self.db.execute(
            "SELECT value FROM web_secrets WHERE name = ?", [name]
        ).fetchall()
        if rows:
            return str(rows[0][0])
        value = secrets.token_urlsafe(48)
        with self.db.atomic():
            self.db.execute(
                "INSERT INTO web_secrets (name, value) VALUES (?, ?)", [name, value]
            )
        return value
