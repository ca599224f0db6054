"""Sign-in throttling: a few wrong guesses per account and per client address.

Failures are counted in a sliding window, in memory: a restart forgets them,
which costs an attacker a restart they cannot cause from the web page.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable

log = logging.getLogger(__name__)

WINDOW = 300.0
"""Seconds over which failures are counted."""

PER_ACCOUNT = 5
"""Wrong passwords or PINs for one account within the window."""

PER_ADDRESS = 20
"""Wrong passwords or PINs from one client address within the window."""

MAX_KEYS = 10_000
"""Keys remembered before old ones are dropped, so guessing names cannot fill memory."""


class Throttled(Exception):
    def __init__(self, wait: float) -> None:
        self.wait = max(1, math.ceil(wait))
        super().__init__(f"too many failed sign-ins; try again in {self.wait} s")


class SignInThrottle:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._failures: dict[str, deque[float]] = {}

    def check(self, account: str, address: str) -> None:
        """Raise :class:`Throttled` when either key has used up its failures."""
        now = self.clock()
        wait = max(
            self._wait(f"account:{account.lower()}", PER_ACCOUNT, now),
            self._wait(f"address:{address}", PER_ADDRESS, now),
        )
        if wait > 0:
            raise Throttled(wait)

    def failed(self, account: str, address: str) -> None:
        now = self.clock()
        for key in (f"account:{account.lower()}", f"address:{address}"):
            self._failures.setdefault(key, deque()).append(now)
        log.warning("Failed sign-in for %r from %s", account, address)
        if len(self._failures) > MAX_KEYS:
            self._forget_old(now)

    def succeeded(self, account: str) -> None:
        self._failures.pop(f"account:{account.lower()}", None)

    def _wait(self, key: str, limit: int, now: float) -> float:
        times = self._failures.get(key)
        if not times:
            return 0.0
        while times and times[0] <= now - WINDOW:
            times.popleft()
        if len(times) < limit:
            return 0.0
        # Free again when the oldest failure that keeps it at the limit expires.
        return times[-limit] + WINDOW - now

    def _forget_old(self, now: float) -> None:
        stale = [k for k, t in self._failures.items() if not t or t[-1] <= now - WINDOW]
        for key in stale:
            del self._failures[key]
        while len(self._failures) > MAX_KEYS:
            del self._failures[next(iter(self._failures))]
