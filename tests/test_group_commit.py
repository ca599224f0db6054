"""A burst of presses is committed in a few durable transactions, not one each."""

from __future__ import annotations

from tests.helpers import event

DEVICES = 300

MAX_COMMITS = DEVICES // 2
"""At most half as many commits as presses: on average two or more per commit.

Safe because one commit covers a whole batch in a single transaction that is
durable when it returns (WAL, synchronous=FULL), and nothing of the batch is
published or acknowledged to the broker before it returns: grouping changes
how many disk syncs a burst costs, never what a display may see or what a
power cut may lose. One commit per press would be 300 here.
"""


def test_burst_of_calls_costs_far_fewer_commits(start_gateway, mqtt, topics):
    """300 calls from 300 devices open 300 alerts in fewer than 150 commits."""
    gateway = start_gateway(devices=DEVICES)
    display = mqtt(topics.alerts)
    commits_before = gateway.healthz()["commits"]
    presses = [event(f"call-{n}") for n in range(1, DEVICES + 1)]

    mqtt().publish_many((topics.events(p["device"]), p) for p in presses)
    opened = display.wait_for_count(
        lambda m: m.matches(None, {"state": "open"}), DEVICES, timeout=60
    )

    assert {m.json["event_id"] for m in opened} == {p["id"] for p in presses}
    commits = gateway.healthz()["commits"] - commits_before
    assert 1 <= commits < MAX_COMMITS
    [row] = gateway.query(
        "SELECT count(*) AS n, count(DISTINCT device) AS d FROM alerts"
    )
    assert row == {"n": DEVICES, "d": DEVICES}
    assert gateway.query("SELECT count(*) AS n FROM events") == [{"n": DEVICES}]
