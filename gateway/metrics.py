"""Prometheus metrics of one gateway, rendered for ``GET /metrics``.

Two kinds of figures. Most are read from the gateway when Prometheus scrapes
(events accepted, rejections, open alerts, broker link, upstream outbox), so
they cost nothing between scrapes and can never drift from ``/healthz``.
The others must be observed when they happen: how long staff took to
acknowledge and to resolve, how long each commit took, and how late the
event loop ran; :class:`GatewayMetrics` holds those, and the gateway feeds
them.

No label ever carries a person or a device: staff, badge and device ids stay
out, so a scrape shows how the ward is doing, not who is doing what. Labels
are priorities, levels, alert states, rejection reasons and the way an alert
was resolved: small fixed sets.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    CollectorRegistry,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from rules.alerts import Action, Change

if TYPE_CHECKING:
    from gateway.service import Gateway

log = logging.getLogger(__name__)

# No "<name>_created" series beside each histogram: they double the text a
# Pi sends per scrape and say only when the process started.
disable_created_metrics()

RESPONSE_BUCKETS = (5, 10, 15, 30, 45, 60, 90, 120, 180, 300, 600, 900, 1800, 3600)
"""Seconds: from a glance at a pager to an hour-long gap."""

COMMIT_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
"""Seconds: an fsync on an SSD to a struggling SD card."""

NOT_A_RESPONSE = "cleared"
"""Resolved by the condition itself (a reading back in range, a device heard
again), not by anyone: not a staff response time."""


class GatewayMetrics:
    """The figures observed as they happen, in a registry of this gateway's own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.response = Histogram(
            "gateway_response_seconds",
            "Seconds from an alert opening to its acknowledgement or resolution "
            "by staff",
            ["step", "priority"],
            buckets=RESPONSE_BUCKETS,
            registry=self.registry,
        )
        self.commit = Histogram(
            "gateway_commit_seconds",
            "Seconds one durable SQLite transaction of a batch took",
            buckets=COMMIT_BUCKETS,
            registry=self.registry,
        )
        self.loop_lag = Gauge(
            "gateway_loop_lag_seconds",
            "How late the last supervision turn of the event loop ran (NaN until "
            "the supervisor measured it)",
            registry=self.registry,
        )
        self.loop_lag.set(math.nan)

    def observe_changes(self, actions: Sequence[Action]) -> None:
        """Response times of the transitions just committed."""
        for action in actions:
            if not isinstance(action, Change):
                continue
            alert = action.alert
            if action.kind == "acknowledged" and alert.acked_at is not None:
                self.response.labels("acknowledge", alert.priority).observe(
                    max(0.0, alert.acked_at - alert.opened_at)
                )
            elif (
                action.kind == "resolved"
                and alert.resolved_at is not None
                and alert.resolved_via != NOT_A_RESPONSE
            ):
                self.response.labels("resolve", alert.priority).observe(
                    max(0.0, alert.resolved_at - alert.opened_at)
                )


class _GatewayState:
    """Reads the gateway's counters and state at scrape time."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    def collect(self) -> Iterable[Metric]:
        yield from self._events()
        yield from self._alerts()
        yield from self._broker()
        yield from self._upstream()

    def _events(self) -> Iterable[Metric]:
        gateway = self._gateway
        yield CounterMetricFamily(
            "gateway_events_accepted",
            "Device events and poll answers accepted since start",
            value=gateway.accepted,
        )
        rejected = CounterMetricFamily(
            "gateway_messages_rejected",
            "Messages refused since start, by reason",
            labels=["reason"],
        )
        for reason, count in sorted(gateway.rejected.items()):
            rejected.add_metric([reason], count)
        yield rejected
        yield CounterMetricFamily(
            "gateway_commits",
            "Durable SQLite transactions since start",
            value=gateway.store.commits,
        )

    def _alerts(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            "gateway_alerts_open",
            "Unresolved alerts by priority, escalation level and state",
            labels=["priority", "level", "state"],
        )
        counts = Counter(
            (alert.priority, str(alert.level), alert.state.value)
            for alert in self._gateway.engine.alerts
        )
        for labels, count in sorted(counts.items()):
            family.add_metric(list(labels), count)
        yield family

    def _broker(self) -> Iterable[Metric]:
        link = self._gateway.link
        yield GaugeMetricFamily(
            "gateway_broker_connected",
            "1 while the link to the local MQTT broker is up",
            value=1 if link.connected else 0,
        )
        yield CounterMetricFamily(
            "gateway_broker_connects",
            "Successful connections to the broker since start",
            value=link.connects,
        )

    def _upstream(self) -> Iterable[Metric]:
        status = self._gateway.sender.status()
        yield GaugeMetricFamily(
            "gateway_upstream_outbox_depth",
            "Credit records waiting to go upstream",
            value=status.get("depth") or 0,
        )
        oldest = status.get("oldest_undelivered_age")
        yield GaugeMetricFamily(
            "gateway_upstream_oldest_age_seconds",
            "Age of the oldest undelivered record (0 when the outbox is empty)",
            value=oldest or 0.0,
        )
        last = status.get("last_success_at")
        yield GaugeMetricFamily(
            "gateway_upstream_last_success_timestamp_seconds",
            "Unix time of the last delivery the upstream accepted (NaN: none yet)",
            value=math.nan if last is None else last,
        )
        yield GaugeMetricFamily(
            "gateway_upstream_consecutive_failures",
            "Failed delivery attempts since the last success",
            value=status.get("consecutive_failures") or 0,
        )
        yield CounterMetricFamily(
            "gateway_upstream_delivered",
            "Records the upstream accepted since start",
            value=status.get("delivered") or 0,
        )
        yield GaugeMetricFamily(
            "gateway_upstream_dead_lettered",
            "Records the upstream refused outright, set aside in the outbox",
            value=status.get("dead_lettered") or 0,
        )
        yield CounterMetricFamily(
            "gateway_upstream_dropped",
            "Records ever lost to the outbox size or age cap (kept across restarts)",
            value=status.get("dropped") or 0,
        )


def render(gateway: Gateway) -> tuple[bytes, str]:
    """The body and content type of ``GET /metrics`` for this gateway.

    Call it on the gateway's event loop, like every other reader of its state.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_GatewayState(gateway))
    body = generate_latest(gateway.metrics.registry) + generate_latest(registry)
    return body, CONTENT_TYPE_PLAIN_0_0_4
