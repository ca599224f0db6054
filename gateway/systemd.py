"""Life under systemd: readiness, a status line, and a watchdog fed by a healthy loop.

The unit (``systemd/facility-gateway.service``) is ``Type=notify`` with
``WatchdogSec=``. The :class:`Supervisor` runs as a task on the gateway's own
event loop and tells systemd:

* ``READY=1`` once the database is open and the alerts restored, the broker
  link is connected and the web page listens (or is disabled, or failed to
  start: the page never holds the alerts back). Until then it extends the
  start timeout itself, only while its own loop and database are healthy, so
  a site whose broker is down waits for it instead of restarting in a loop.
* ``WATCHDOG=1`` every half watchdog interval, and only while the gateway's
  own checks pass: the loop is prompt, the broker link is up (or has been
  down for less than a grace period) and the database takes a write. A hung
  loop sends nothing at all, so systemd kills and restarts it.
* ``STATUS=`` lines that ``systemctl status`` shows, and ``STOPPING=1``.

Outside systemd (no ``$NOTIFY_SOCKET``) every notification is a no-op, but
the loop lag is still measured: the metrics show it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import sqlite3
import time
from collections.abc import Callable, MutableMapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.service import Gateway
    from gateway.web import WebServer

log = logging.getLogger(__name__)

TICK = 0.5
"""Seconds between the supervisor's turns: how finely loop lag is measured."""

LOOP_LAG_LIMIT = 2.0
"""Seconds a turn of the loop may come late before the gateway counts as stuck.

A press waits at most this long before the engine sees it; the gateway's own
work is sliced (500 messages or timers per batch) to stay far below it.
"""

BROKER_GRACE_INTERVALS = 2
"""The broker link may be down this many watchdog intervals before pings stop.

The link reconnects with a backoff capped at 10 s, so with ``WatchdogSec=30``
a broker restart never costs a gateway restart; a link stuck down for a
minute does.
"""

STATUS_EVERY = 15.0
"""Seconds between status summaries when no watchdog ping carries them."""

EXTEND_BY = 30.0
"""Seconds of start time asked for at a time while waiting for the broker."""

PROBE_KEY = "watchdog/probe"
"""engine_state row rewritten to prove the database takes a write.

The engine ignores keys of kinds it does not know, so this row never becomes
rule state.
"""


# -- sd_notify -----------------------------------------------------------------------


class Notifier:
    """sd_notify(3) in Python: one datagram of ``KEY=value`` lines to systemd.

    Our own on purpose: it is a few lines over a Unix datagram socket, and the
    PyPI packages for it are either unmaintained or build against the
    libsystemd headers, which a Raspberry Pi install should not need.
    """

    def __init__(self, address: str | None) -> None:
        self.address = address
        self._sock: socket.socket | None = None
        if address:
            # '@' names a socket in the abstract namespace: a leading NUL.
            self._target = "\0" + address[1:] if address.startswith("@") else address
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] | None = None) -> Notifier:
        """Take $NOTIFY_SOCKET, removing it so child processes (a demo's
        Mosquitto) cannot speak for us."""
        environ = os.environ if environ is None else environ
        return cls(environ.pop("NOTIFY_SOCKET", None))

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, *fields: str) -> bool:
        """Send the fields; False when not under systemd or the send failed."""
        if self._sock is None:
            return False
        try:
            self._sock.sendto("\n".join(fields).encode(), self._target)
        except OSError as exc:
            log.warning("Could not notify systemd at %s: %s", self.address, exc)
            return False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval(environ: MutableMapping[str, str] | None = None) -> float | None:
    """Seconds of ``WatchdogSec=`` handed over in $WATCHDOG_USEC, if meant for us.

    Both variables are removed, like $NOTIFY_SOCKET, so no child inherits them.
    """
    environ = os.environ if environ is None else environ
    usec = environ.pop("WATCHDOG_USEC", None)
    pid = environ.pop("WATCHDOG_PID", None)
    if not usec:
        return None
    if pid and pid != str(os.getpid()):
        return None
    try:
        seconds = int(usec) / 1_000_000
    except ValueError:
        log.warning("Ignoring WATCHDOG_USEC=%r: not a number of microseconds", usec)
        return None
    return seconds if seconds > 0 else None


# -- the supervisor ------------------------------------------------------------------


class Supervisor:
    """Watches the gateway from its own loop and keeps systemd informed."""

    def __init__(
        self,
        gateway: Gateway,
        web: WebServer | None = None,
        page: asyncio.Task[None] | None = None,
        *,
        notifier: Notifier | None = None,
        watchdog: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.gateway = gateway
        self.notifier = notifier or Notifier(None)
        self.watchdog = watchdog
        """Seconds of WatchdogSec, or None when systemd watches no deadline."""
        self.lag = math.nan
        """How late the last turn of the loop came, in seconds."""
        self.announced_ready = False
        self.problems: list[str] = []

        self._web = web
        self._page = page
        self._clock = clock
        self._tick = TICK if watchdog is None else min(TICK, watchdog / 4)
        self._broker_down_since: float | None = None
        self._last_ping = -math.inf
        self._last_extend = -math.inf
        self._last_status = ""
        self._status_at = -math.inf
        self._probe_commits = -1
        self._probe_at = -math.inf
        self._probe_error: str | None = None

    @property
    def broker_grace(self) -> float:
        return BROKER_GRACE_INTERVALS * (self.watchdog or 30.0)

    async def run(self) -> None:
        """Measure, check and report every tick until cancelled."""
        while True:
            started = self._clock()
            await asyncio.sleep(self._tick)
            self.lag = max(0.0, self._clock() - started - self._tick)
            self.gateway.metrics.loop_lag.set(self.lag)
            self.turn()

    def turn(self) -> None:
        """One look at the gateway: readiness first, then health and the ping."""
        now = self._clock()
        self._follow_broker(now)
        if not self.announced_ready:
            self._while_starting(now)
            return
        self.problems = self.check(now)
        if self.problems:
            self._set_status("Unhealthy, watchdog not fed: " + "; ".join(self.problems))
            return

        fields = []
        if self.watchdog is not None and now - self._last_ping >= self.watchdog / 2:
            self._last_ping = now
            fields.append("WATCHDOG=1")
        # The summary rides on the pings, and on its own when health returns
        # or now and then without a watchdog; never a datagram per tick.
        recovered = not self._last_status.startswith("Running")
        if recovered:
            log.info("Healthy again: %s", self.summary())
        stale = now - self._status_at >= STATUS_EVERY
        if fields or stale or recovered:
            self._last_status = f"Running: {self.summary()}"
            self._status_at = now
            fields.append(f"STATUS={self._last_status}")
            self.notifier.send(*fields)

    def stopping(self) -> None:
        self.notifier.send("STOPPING=1", "STATUS=Stopping: finishing the last batch")

    # -- start-up --------------------------------------------------------------------

    def _while_starting(self, now: float) -> None:
        waiting = self._waiting_for()
        if not waiting:
            self.announced_ready = True
            self._last_ping = now
            self._last_status = f"Running: {self.summary()}"
            self._status_at = now
            self.notifier.send("READY=1", f"STATUS={self._last_status}")
            log.info("Ready: %s", self.summary())
            return

        # Asking for more start time only while our own parts work keeps a
        # start-up that hangs from waiting for ever.
        own = self.check(now, broker=False)
        if own:
            self._set_status("Starting, unhealthy: " + "; ".join(own))
            return
        if self.notifier.enabled and now - self._last_extend >= EXTEND_BY / 3:
            self._last_extend = now
            self.notifier.send(f"EXTEND_TIMEOUT_USEC={int(EXTEND_BY * 1_000_000)}")
        self._set_status("Starting, waiting for " + ", ".join(waiting), logging.INFO)

    def _waiting_for(self) -> list[str]:
        gateway = self.gateway
        waiting = []
        if not gateway.ready.is_set():
            waiting.append(f"the database {gateway.store.path}")
        if not gateway.link.connected:
            waiting.append(f"the MQTT broker at {gateway.link.address}")
        if self._web is not None and self._web.port is None:
            page_failed = self._page is not None and self._page.done()
            if not page_failed:
                waiting.append("the web page to listen")
        return waiting

    # -- health ------------------------------------------------------------------------

    def check(self, now: float, *, broker: bool = True) -> list[str]:
        """What is wrong with the gateway right now; empty when healthy."""
        problems = []
        # Stable wording: a status (and a log line) goes out only when it changes.
        if not math.isnan(self.lag) and self.lag > self.lag_limit:
            problems.append(f"event loop late by more than {self.lag_limit:g} s")
        down_since = self._broker_down_since
        if broker and down_since is not None and now - down_since >= self.broker_grace:
            problems.append(
                f"MQTT broker {self.gateway.link.address} unreachable for "
                f"more than {self.broker_grace:g} s"
            )
        error = self._database_error(now)
        trouble = self.gateway.trouble
        if error is None and trouble is not None:
            # A batch waits for its commit: the database refused it.
            error = trouble["error"]
        if error is not None:
            problems.append(f"database not writable ({error})")
        return problems

    @property
    def lag_limit(self) -> float:
        if self.watchdog is None:
            return LOOP_LAG_LIMIT
        return min(LOOP_LAG_LIMIT, self.watchdog / 2)

    def _follow_broker(self, now: float) -> None:
        if self.gateway.link.connected:
            self._broker_down_since = None
        elif self._broker_down_since is None:
            self._broker_down_since = now

    def _database_error(self, now: float) -> str | None:
        """None if the database took a write within the last watchdog interval.

        A commit of the gateway's own proves it; an idle gateway rewrites one
        small row instead, at most once per interval (about 4 KB to the WAL).
        """
        if self.watchdog is None:
            return None  # nobody to tell: spare the SD card the writes
        store = self.gateway.store
        if store.commits != self._probe_commits:
            self._probe_commits = store.commits
            self._probe_at = now
            self._probe_error = None
            return None
        if now - self._probe_at < self.watchdog:
            return self._probe_error
        self._probe_at = now
        self._probe_error = probe_database(self.gateway)
        return self._probe_error

    # -- status ------------------------------------------------------------------------

    def summary(self) -> str:
        gateway = self.gateway
        link = "broker connected" if gateway.link.connected else "broker reconnecting"
        depth = gateway.sender.status().get("depth", 0)
        return (
            f"{link}, {len(gateway.engine.alerts)} open alert(s), "
            f"{gateway.accepted} event(s) accepted, outbox {depth}"
        )

    def _set_status(self, text: str, level: int = logging.WARNING) -> None:
        """Send a status that is not the summary, once per change, and log it."""
        if text != self._last_status:
            self._last_status = text
            self.notifier.send(f"STATUS={text}")
            log.log(level, "%s", text)


def probe_database(gateway: Gateway) -> str | None:
    """Rewrite one row in one durable transaction; the error if it failed."""
    conn = gateway.store.db.conn
    try:
        with gateway.store.db.atomic():
            conn.execute(
                "INSERT INTO engine_state (key, value) VALUES (?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (PROBE_KEY, str(time.time())),
            )
    except sqlite3.Error as exc:
        return str(exc)
    return None
