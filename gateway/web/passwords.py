"""Argon2 hashes for web passwords and pager PINs.

Hashing costs tens of milliseconds and 64 MiB on purpose, so it runs in a
worker thread, one at a time: the gateway's loop keeps paging while someone
signs in, and a flood of sign-in attempts queues instead of eating memory.

``python -m gateway.web.passwords`` asks for a password and prints its hash,
for an installer to place in ``web.admin_password_hash``.
"""

from __future__ import annotations

import asyncio
import getpass
import logging
import sys
import weakref

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

log = logging.getLogger(__name__)

_hasher = PasswordHasher()
_turns: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
    weakref.WeakKeyDictionary()
)

# Checked against when the account does not exist, so a wrong name takes as
# long as a wrong password and answers cannot tell which names exist.
_DUMMY_HASH = _hasher.hash("no account has this password")

MIN_PASSWORD = 10
"""Characters; a password for a web account is long enough to resist guessing
at the throttled rate of sign-in."""


def password_problem(password: str) -> str | None:
    """Why a new password is refused, or None."""
    if len(password) < MIN_PASSWORD:
        return f"the password needs at least {MIN_PASSWORD} characters"
    return None


def pin_problem(pin: str) -> str | None:
    """Why a new pager PIN is refused, or None."""
    if not pin.isdigit() or not 4 <= len(pin) <= 8:
        return "a PIN is 4 to 8 digits"
    return None


def _one_at_a_time() -> asyncio.Semaphore:
    """One hash at a time per event loop (a semaphore belongs to one loop)."""
    loop = asyncio.get_running_loop()
    if loop not in _turns:
        _turns[loop] = asyncio.Semaphore(1)
    return _turns[loop]


def hash_now(secret: str) -> str:
    """Hash on the calling thread: for start-up and the command line, not the loop."""
    return _hasher.hash(secret)


async def hash_secret(secret: str) -> str:
    async with _one_at_a_time():
        return await asyncio.to_thread(_hasher.hash, secret)


async def verify_secret(stored: str | None, secret: str) -> bool:
    """True when ``secret`` matches the stored hash; False for no hash."""
    async with _one_at_a_time():
        return await asyncio.to_thread(_verify, stored, secret)


def _verify(stored: str | None, secret: str) -> bool:
    try:
        return _hasher.verify(stored or _DUMMY_HASH, secret) and stored is not None
    except VerificationError:
        return False
    except InvalidHashError:
        log.error("A stored password hash is not a valid Argon2 hash; reset it")
        return False


def main() -> int:
    """Print the Argon2 hash of a password typed twice."""
    password = getpass.getpass("Technician password: ")
    problem = password_problem(password)
    if problem:
        sys.stderr.write(f"Refused: {problem}\n")
        return 2
    if getpass.getpass("Again: ") != password:
        sys.stderr.write("Refused: the two passwords differ\n")
        return 2
    sys.stdout.write(hash_now(password) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
