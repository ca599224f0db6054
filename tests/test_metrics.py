"""Prometheus metrics of a running gateway, with numbers the test caused.

The gateway runs in this process (so ``render`` can be called on its own
loop, as the web route does) against a real Mosquitto, a real SQLite file
and a real webhook receiver for the upstream, with its supervisor measuring
the loop's lag. The test raises, acknowledges and resolves calls over MQTT,
sends a broken message, keeps the upstream down and then up, and reads every
figure back from the rendered text with Prometheus' own parser.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway import metrics
from gateway.broker import PrivateBroker
from gateway.config import load_config
from gateway.service import Gateway
from gateway.systemd import Supervisor
from rules.alerts import Alert, AlertState, Change
from tests.helpers import STAFF, SiteTopics, event, site_config, wait_until, write_site
from tests.upstream_receiver import WebhookReceiver

SECRET = "a metrics test secret"  # noqa: S105 - a test fixture


@dataclass
class Running:
    gateway: Gateway
    supervisor: Supervisor
    loop: asyncio.AbstractEventLoop
    receiver: WebhookReceiver

    def scrape(self) -> tuple[dict[tuple[str, tuple], float], str]:
        """Render on the gateway's loop; samples by (name, sorted labels)."""

        async def on_loop() -> tuple[bytes, str]:
            return metrics.render(self.gateway)

        future = asyncio.run_coroutine_threadsafe(on_loop(), self.loop)
        body, content_type = future.result(timeout=10)
        samples = {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(body.decode())
            for sample in family.samples
        }
        return samples, content_type


@pytest.fixture
def running(
    broker: PrivateBroker, tmp_path: Path, topics: SiteTopics
) -> Iterator[Running]:
    receiver = WebhookReceiver(SECRET.encode())  # not started: upstream down
    secret_file = tmp_path / "upstream.secret"
    secret_file.write_text(SECRET)
    site = site_config(topics.site)
    site["upstream"] = {
        "kind": "webhook",
        "url": receiver.url,
        "secret_file": str(secret_file),
        "retry_min": "0.1s",
        "retry_max": "0.3s",
        "poll_every": "0.2s",
    }
    environ = {
        "GATEWAY_MQTT__PORT": str(broker.port),
        "GATEWAY_MQTT__USERNAME": "gateway",
        "GATEWAY_MQTT__PASSWORD": broker.passwords["gateway"],
        "GATEWAY_DATABASE__PATH": str(tmp_path / "gw.db"),
        "GATEWAY_WEB__ENABLED": "false",
    }
    config = load_config(write_site(tmp_path / "site.yaml", site), environ)
    gateway = Gateway(config)
    supervisor = Supervisor(gateway)
    loop = asyncio.new_event_loop()

    async def run() -> None:
        watcher = asyncio.create_task(supervisor.run())
        await gateway.run()
        watcher.cancel()

    thread = threading.Thread(target=loop.run_until_complete, args=(run(),))
    thread.start()
    wait_until(lambda: gateway.link.connected, what="the broker link")
    yield Running(gateway, supervisor, loop, receiver)

    loop.call_soon_threadsafe(gateway.stop)
    thread.join(timeout=10)
    loop.close()
    receiver.stop()


def value(samples: dict, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    assert key in samples, f"no sample {key}; have {sorted(samples)}"
    return samples[key]


def test_metrics_show_what_the_gateway_did(running, mqtt, topics):
    gateway = running.gateway
    display = mqtt(topics.alerts)
    device = mqtt()

    # Three calls; one acknowledged then resolved, one resolved at once.
    for n in (1, 2, 3):
        device.publish(topics.events(f"call-{n}"), event(f"call-{n}"))
    alerts = {
        n: display.wait_for_json(device=f"call-{n}", state="open") for n in (1, 2, 3)
    }
    time.sleep(0.2)  # so the response times are not all zero
    device.publish(topics.ack(alerts[1]["id"]), {"staff": "ana"})
    display.wait_for_json(device="call-1", state="acknowledged")
    device.publish(topics.resolve(alerts[1]["id"]), {"staff": "ana"})
    device.publish(topics.resolve(alerts[2]["id"]), {"staff": "ben"})
    display.wait_for_json(device="call-1", state="resolved")
    display.wait_for_json(device="call-2", state="resolved")
    # A broken message is refused and counted.
    device.publish(topics.events("call-4"), b"{not json")
    wait_until(lambda: gateway.rejected["malformed_json"] == 1, what="the rejection")
    # The upstream is down: both credit records wait, and attempts fail.
    wait_until(
        lambda: (
            gateway.sender.status()["consecutive_failures"] >= 1
            and gateway.sender.status()["depth"] == 2
        ),
        what="two records waiting after a failed upstream attempt",
    )

    # The supervisor turns every 0.5 s; the first turn sets the loop lag.
    wait_until(lambda: not math.isnan(running.supervisor.lag), what="a lag figure")

    samples, content_type = running.scrape()
    assert content_type.startswith("text/plain; version=0.0.4")
    assert value(samples, "gateway_events_accepted_total") == 3
    assert (
        value(samples, "gateway_messages_rejected_total", reason="malformed_json") == 1
    )
    assert value(samples, "gateway_broker_connected") == 1
    assert value(samples, "gateway_broker_connects_total") >= 1

    # Only call-3 is still open, at level 1, unacknowledged.
    open_alerts = {k: v for k, v in samples.items() if k[0] == "gateway_alerts_open"}
    assert open_alerts == {
        (
            "gateway_alerts_open",
            (("level", "1"), ("priority", "routine"), ("state", "open")),
        ): 1
    }

    # One acknowledgement, two resolutions, each at least the 0.2 s waited.
    ack = ("acknowledge", "routine")
    resolve = ("resolve", "routine")
    for (step, priority), count in ((ack, 1), (resolve, 2)):
        labels = {"step": step, "priority": priority}
        assert value(samples, "gateway_response_seconds_count", **labels) == count
        total = value(samples, "gateway_response_seconds_sum", **labels)
        assert 0.2 * count <= total < 60 * count
        assert (
            value(samples, "gateway_response_seconds_bucket", le="+Inf", **labels)
            == count
        )

    # Every commit timed: as many observations as the gateway counts commits.
    commits = value(samples, "gateway_commits_total")
    assert commits >= 3
    assert value(samples, "gateway_commit_seconds_count") == commits
    assert value(samples, "gateway_commit_seconds_sum") > 0

    lag = value(samples, "gateway_loop_lag_seconds")
    assert not math.isnan(lag)
    assert lag >= 0

    assert value(samples, "gateway_upstream_outbox_depth") == 2
    assert value(samples, "gateway_upstream_oldest_age_seconds") > 0
    assert math.isnan(value(samples, "gateway_upstream_last_success_timestamp_seconds"))
    assert value(samples, "gateway_upstream_consecutive_failures") >= 1
    assert value(samples, "gateway_upstream_delivered_total") == 0

    # No label anywhere names a person, a badge, a device or a room.
    private = {m["id"] for m in STAFF} | {f"call-{n}" for n in range(1, 5)}
    private |= {f"room-{n}" for n in range(1, 5)}
    shown = {v for _, labels in samples for _, v in labels}
    assert not shown & private, shown & private

    # Upstream back: both records delivered, the outbox empty.
    running.receiver.start()
    running.receiver.wait_for(2)
    wait_until(lambda: gateway.sender.status()["depth"] == 0, what="an empty outbox")
    samples, _ = running.scrape()
    assert value(samples, "gateway_upstream_delivered_total") == 2
    assert value(samples, "gateway_upstream_outbox_depth") == 0
    assert value(samples, "gateway_upstream_oldest_age_seconds") == 0
    assert value(samples, "gateway_upstream_consecutive_failures") == 0
    last = value(samples, "gateway_upstream_last_success_timestamp_seconds")
    assert time.time() - 60 < last <= time.time()


def test_a_condition_that_clears_itself_is_no_response_time():
    """A reading back in range closes its alert, but nobody responded."""
    observed = metrics.GatewayMetrics()
    cleared = Alert(
        id="a1",
        rule="towels-low",
        priority="routine",
        device="dispenser-1",
        room=None,
        zone="restroom",
        event_id="e1",
        opened_at=100.0,
        updated_at=400.0,
        state=AlertState.RESOLVED,
        resolved_at=400.0,
        resolved_via="cleared",
    )
    refilled = replace(cleared, id="a2", resolved_via="presence", resolved_at=250.0)
    observed.observe_changes(
        [Change(cleared, "resolved"), Change(refilled, "resolved", via="presence")]
    )

    labels = {"step": "resolve", "priority": "routine"}
    registry = observed.registry
    assert registry.get_sample_value("gateway_response_seconds_count", labels) == 1
    assert registry.get_sample_value("gateway_response_seconds_sum", labels) == 150
