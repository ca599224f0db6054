"""Credit through the whole gateway while the upstream is down and the gateway dies.

Calls are raised and cancelled over MQTT while the webhook receiver is down;
the gateway is killed with SIGKILL several times while it keeps resolving
and again while its backlog drains. Afterwards the receiver holds every
resolved gap exactly once (after its deduplication), in the order of the
outbox.
"""

from __future__ import annotations

import time
import uuid

from tests.helpers import site_config, wait_until
from tests.upstream_receiver import WebhookReceiver

SECRET = "an upstream secret for this test only"  # noqa: S105 - a test fixture
CALLS_PER_ROUND = 30
ROUNDS = 4


def test_every_resolved_gap_reaches_upstream_once_across_kill_9(
    start_gateway, mqtt, topics, tmp_path
):
    receiver = WebhookReceiver(SECRET.encode())
    secret_file = tmp_path / "upstream.secret"
    secret_file.write_text(SECRET)
    site = site_config(topics.site, devices=CALLS_PER_ROUND)
    site["upstream"] = {
        "kind": "webhook",
        "url": receiver.url,
        "secret_file": str(secret_file),
        "batch_size": 7,
        "retry_min": "0.1s",
        "retry_max": "0.5s",
        "poll_every": "0.2s",
        "max_rate": 200,
    }
    gateway = start_gateway(site=site)
    device = mqtt()
    display = mqtt(topics.alerts)

    # Upstream down: every round opens and cancels calls, then the gateway
    # is killed mid-stream and started again.
    for round_number in range(ROUNDS):
        for n in range(1, CALLS_PER_ROUND + 1):
            for kind in ("call", "cancel"):
                device.publish(
                    topics.events(f"call-{n}"),
                    {
                        "id": uuid.uuid4().hex,
                        "type": kind,
                        "device": f"call-{n}",
                        "ts": time.time(),
                    },
                )
        expected = CALLS_PER_ROUND * (round_number + 1)
        wait_until(
            lambda expected=expected: (
                gateway.query(
                    "SELECT COUNT(*) AS n FROM outbox WHERE kind = 'alert.resolved'"
                )[0]["n"]
                >= expected
            ),
            timeout=30,
            what=f"{expected} resolved alerts in the outbox",
        )
        gateway.kill()
        gateway.start()

    outbox = gateway.query(
        "SELECT key FROM outbox WHERE kind = 'alert.resolved' ORDER BY seq"
    )
    assert len(outbox) == CALLS_PER_ROUND * ROUNDS
    assert len(display.messages) > 0

    # Upstream back; kill the gateway twice more while the backlog drains.
    receiver.start()
    try:
        for _ in range(2):
            wait_until(lambda: receiver.records, timeout=30, what="a first batch")
            gateway.kill()
            gateway.start()
        records = receiver.wait_for(len(outbox), timeout=60)
    finally:
        receiver.stop()

    keys = [record["key"] for record in records if record["kind"] == "alert.resolved"]
    assert keys == [row["key"] for row in outbox]
    assert receiver.bad_signatures == 0
    assert receiver.copies >= len(keys)  # duplicates allowed on the wire, not after
