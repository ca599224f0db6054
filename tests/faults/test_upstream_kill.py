"""Upstream down for a simulated day while the outbox's process is killed with -9.

The process that writes resolved alerts and forwards the outbox is a real
child (``tests/faults/outbox_writer.py``) on a real SQLite file, SIGKILLed
at random moments during the outage and again during the drain. The
receiver must end with every record exactly once after its deduplication,
in order.
"""

from __future__ import annotations

import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway.store import Store
from tests.faults.conftest import SEED, sized
from tests.faults.outbox_writer import SECRET
from tests.helpers import ROOT, query, wait_until
from tests.upstream_receiver import WebhookReceiver

pytestmark = pytest.mark.timeout(sized(120, 1800))

RECORDS = sized(5_000, 100_000)
KILLS = sized(3, 5)
"""SIGKILLs during the outage, and as many again during the drain."""


class Writer:
    """The child process, restartable."""

    def __init__(self, db: Path, url: str, log: Path) -> None:
        self.args = [sys.executable, "-m", "tests.faults.outbox_writer"]
        self.args += [str(db), str(RECORDS), url]
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                self.args, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
            )

    def kill(self) -> bool:
        """SIGKILL; True if it was still running (a real kill, not a corpse)."""
        assert self.process is not None
        alive = self.process.poll() is None
        self.process.kill()
        self.process.wait()
        return alive

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout)


def committed(db: Path) -> int:
    return query(db, "SELECT COUNT(*) AS n FROM outbox")[0]["n"]


def test_outbox_process_killed_through_a_day_long_outage_and_drain(
    tmp_path, figures, request
):
    chance = random.Random(SEED)
    db = tmp_path / "gw.db"
    receiver = WebhookReceiver(SECRET.encode())  # down for the day
    receiver.keep_bodies = False
    writer = Writer(db, receiver.url, tmp_path / "writer.log")
    request.addfinalizer(lambda: writer.process and writer.process.kill())
    figures.update(records=RECORDS, seed=SEED, outage_kills=0, drain_kills=0)

    # The outage: kill it after it has made progress, at a random moment.
    Store(db).close()
    writer.start()
    while figures["outage_kills"] < KILLS:
        before = committed(db)
        wait_until(lambda b=before: committed(db) > b, 60, "outbox growth")
        time.sleep(chance.uniform(0.0, 0.4))
        assert writer.kill(), "the writer finished the outage before its kills"
        figures["outage_kills"] += 1
        writer.start()
    wait_until(lambda: committed(db) == RECORDS, 600, "a day of records")
    assert writer.process is not None
    assert writer.process.poll() is None
    assert receiver.copies == 0

    # Upstream back: kill it again while the backlog drains.
    started = time.monotonic()
    receiver.start()
    try:
        while figures["drain_kills"] < KILLS:
            before = receiver.copies
            wait_until(lambda b=before: receiver.copies > b, 60, "a delivery")
            time.sleep(chance.uniform(0.0, 0.05))
            assert writer.kill(), "the drain finished before its kills"
            figures["drain_kills"] += 1
            writer.start()
        assert writer.wait(timeout=600) == 0
        figures["drain_seconds"] = round(time.monotonic() - started, 1)
    finally:
        receiver.stop()

    keys = receiver.keys
    figures["received"] = len(keys)
    figures["duplicates_on_the_wire"] = receiver.copies - len(keys)
    assert keys == [f"alert:a{n:06d}" for n in range(RECORDS)]
    assert receiver.bad_signatures == 0
    pending = "SELECT COUNT(*) AS n FROM outbox WHERE delivered_at IS NULL"
    assert query(db, pending) == [{"n": 0}]
    assert query(db, "PRAGMA integrity_check") == [{"integrity_check": "ok"}]
