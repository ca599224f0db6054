"""A child process that writes and forwards the outbox, to be killed with SIGKILL.

It does what the gateway's own process does for credit: resolved alerts go
into SQLite through :meth:`gateway.store.Store.record` (alert row, history
and outbox record with its credit, in one durable transaction), and an
:class:`gateway.upstream.Sender` on the same file forwards them. Time is
simulated, so a day-long outage takes seconds; the simulated time is kept
in a side file, so a restarted process goes on where the killed one was.

``python -m tests.faults.outbox_writer DB RECORDS URL`` writes a day of
``RECORDS`` records while the upstream at URL refuses, then drains, and
exits 0 when the outbox is empty. The test kills and restarts it at will.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from gateway.store import Store
from gateway.upstream import Sender, Webhook, WebhookSettings, connect
from rules.alerts import Change
from tests.helpers import resolved_alert

SECRET = "fault battery upstream secret"  # noqa: S105 - a test fixture
SITE = "faults"
GATEWAY = "gw-1"
T0 = 1_790_000_000.0
DAY = 86_400.0

log = logging.getLogger("outbox_writer")


class SimClock:
    """Simulated time, saved beside the database after every step."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.now = json.loads(path.read_text())["now"] if path.exists() else T0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
        fresh = self.path.with_suffix(".tmp")
        fresh.write_text(json.dumps({"now": self.now}))
        os.replace(fresh, self.path)


def resolved(n: int, at: float) -> Change:
    """Alert number ``n``, resolved from a pager at ``at``."""
    alert = resolved_alert(n, at, version=3)
    return Change(alert, "resolved", actor="ana", via="pager")


def credit_of(change: Change) -> dict[str, object]:
    alert = change.alert
    return {
        "staff": alert.resolved_by,
        "granted": True,
        "seconds_to_resolve": alert.resolved_at - alert.opened_at,  # type: ignore[operator]
    }


def written(path: Path) -> int:
    """Records already committed: keys run from a000000 without a gap."""
    conn = connect(path)
    try:
        return conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
    finally:
        conn.close()


def main(db: str, records: int, url: str) -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    path = Path(db)
    store = Store(path)
    clock = SimClock(path.with_suffix(".clock"))
    settings = WebhookSettings(
        kind="webhook",
        url=url,
        secret=SECRET,
        timeout=2.0,
        retry_min=1.0,
        retry_max=300.0,
        max_rate=1e9,
        poll_every=0.05,
    )
    sender = Sender(
        path,
        Webhook(settings, SITE, GATEWAY),
        settings,
        clock=clock,
        monotonic=clock,
    )
    done = written(path)
    while True:
        # A day of resolved alerts, spread evenly over simulated time; each
        # turn's share is one transaction, as one batch of the gateway is.
        due = min(records, int((clock.now - T0) / DAY * records) + 1)
        if due > done:
            changes = [resolved(n, clock.now) for n in range(done, due)]
            credits = {f"alert:{c.alert.id}": credit_of(c) for c in changes}
            store.record([], changes, credits=credits)
            done = due
        step = sender.step()
        if done == records and step.wakeable and step.sent == 0 and not step.error:
            return 0
        clock.advance(step.delay)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2]), sys.argv[3]))
