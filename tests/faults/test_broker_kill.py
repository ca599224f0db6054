"""The broker SIGKILLed and restarted again and again under calls and cancels.

A display (``alerts/+``) and a pager (``alerts/+`` and ``pagers/+``) reconnect
by themselves and subscribe again; the broker keeps nothing (no persistence),
so what they see after a restart comes from the gateway's republish on
connect and from new transitions.

*Shown twice*, for a display that keeps the latest state per alert id (the
contract publishes retained state per alert id, with a ``version``): either
one call opening two distinct alerts, or a state older than one already
shown arriving for the same id (the display would step back). The same
state arriving again (same id and version: a QoS 1 redelivery or the
republish on connect) is a duplicate delivery, harmless and not counted.

Two kinds of device press at once, on devices of their own:

* Devices that wait, as our ESPHome call stations and feedback terminals do
  (:class:`WaitingDevice`): a press goes only after the gateway's retained
  ``online`` has come since the device's last (re)connect, and one not yet
  confirmed goes again under its id after a reconnect. Every one of their
  calls must be seen: zero lost.
* Devices that do not wait (a third-party device, e.g. a Zigbee2MQTT
  bridge): they publish as soon as they are connected. Their calls the
  broker acknowledged while the gateway was subscribed must be seen; a call
  acknowledged by a freshly restarted broker before the gateway is back
  reaches nobody, because the broker keeps no session. Those are counted
  and reported (``blind_calls_lost``), not asserted.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
import uuid
from collections.abc import Callable

import pytest

from tests.faults.clients import Received, Reconnecting, WaitingDevice
from tests.faults.conftest import SEED, sized
from tests.helpers import SiteTopics, wait_until

pytestmark = pytest.mark.timeout(sized(120, 1800))

KILLS = sized(3, 20)
DEVICES = sized(300, 2000)


class Ward:
    """Calls on fresh devices; each cancelled once display and pager saw it."""

    def __init__(
        self,
        device: Reconnecting,
        seen: Callable[[], set[str]],
        topics: SiteTopics,
        numbers: range,
        seed: int,
    ) -> None:
        self.device = device
        self.seen = seen
        self.topics = topics
        self.numbers = iter(numbers)
        self.chance = random.Random(seed)
        self.calls: dict[int, tuple[str, str]] = {}
        """Message id (0 for a waiting device) -> (device, event id) of every
        call published."""
        self.call_ids: list[str] = []
        self.devices: set[str] = set()
        self.cancelled: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ward")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _event(self, device: str, kind: str) -> tuple[int, str]:
        body = {
            "id": uuid.uuid4().hex,
            "type": kind,
            "device": device,
            "ts": time.time(),
        }
        return self.device.publish(self.topics.events(device), body), body["id"]

    def _run(self) -> None:
        while not self._stop.wait(self.chance.uniform(0.01, 0.05)):
            number = next(self.numbers, None)
            if number is not None:
                device = f"call-{number}"
                mid, event_id = self._event(device, "call")
                self.calls[mid] = (device, event_id)
                self.call_ids.append(event_id)
                self.devices.add(device)
            for device in sorted((self.seen() & self.devices) - self.cancelled):
                if self.chance.random() < 0.3:
                    self._event(device, "cancel")
                    self.cancelled.add(device)


def opened(messages: list[Received]) -> dict[str, set[str]]:
    """Event id of each call -> the alert ids shown for it."""
    found: dict[str, set[str]] = {}
    for message in messages:
        body = message.json
        if body and "event_id" in body and "version" in body:
            found.setdefault(body["event_id"], set()).add(body["id"])
    return found


def regressions(messages: list[Received]) -> int:
    """States older than one already shown for the same alert id."""
    shown: dict[str, int] = {}
    stepped_back = 0
    for message in messages:
        body = message.json
        if not body or "version" not in body:
            continue
        if body["version"] < shown.get(body["id"], 0):
            stepped_back += 1
        shown[body["id"]] = max(body["version"], shown.get(body["id"], 0))
    return stepped_back


def test_broker_kill_9_loop_every_call_seen_none_shown_twice(
    broker, start_gateway, topics, figures, request
):
    chance = random.Random(SEED + 3)
    start_gateway(devices=2 * DEVICES)
    display = Reconnecting(broker, topics.alerts)
    pager = Reconnecting(broker, topics.alerts, topics.pagers)
    device = Reconnecting(broker, status=topics.status)
    waiting = WaitingDevice(broker, status=topics.status)
    for client in (display, pager, device, waiting):
        request.addfinalizer(client.close)
    wait_until(lambda: device.gateway_online, what="the gateway's online status")

    def seen_by_both() -> set[str]:
        shown = [
            {m.json["device"] for m in c.messages() if m.json} for c in (display, pager)
        ]
        return shown[0] & shown[1]

    ward = Ward(device, seen_by_both, topics, range(1, DEVICES + 1), SEED + 2)
    careful = Ward(
        waiting, seen_by_both, topics, range(DEVICES + 1, 2 * DEVICES + 1), SEED + 4
    )
    figures.update(seed=SEED, kills=0, restart_to_first_alert_max_s=0.0)
    ward.start()
    careful.start()
    try:
        for _ in range(KILLS):
            time.sleep(chance.uniform(0.5, 2.0))
            broker.kill()
            figures["kills"] += 1
            time.sleep(chance.uniform(0.1, 1.0))
            mark = len(display.messages())
            restarted = time.monotonic()
            broker.start()
            first = wait_until(
                lambda m=mark: display.messages()[m:], 30, "an alert after restart"
            )[0]
            delay = round(first.at - restarted, 3)
            figures["restart_to_first_alert_max_s"] = max(
                delay, figures["restart_to_first_alert_max_s"]
            )
        time.sleep(1.0)
    finally:
        ward.stop()
        careful.stop()

    listened = {mid for mid, _, online in device.acked if online}
    acked = {mid for mid, _, _ in device.acked}
    must_see = {ward.calls[mid][1] for mid in listened if mid in ward.calls}
    blind = {ward.calls[mid][1] for mid in (acked - listened) & set(ward.calls)}
    for client in (display, pager):
        wait_until(
            lambda c=client: must_see <= opened(c.messages()).keys(),
            30,
            f"all {len(must_see)} calls acked while the gateway listened",
        )

    # Devices that wait lose nothing: every call is shown, to both.
    waited = set(careful.call_ids)
    figures.update(waiting_calls_sent=len(waited))
    for client in (display, pager):
        with contextlib.suppress(AssertionError):
            wait_until(lambda c=client: waited <= opened(c.messages()).keys(), 30)
    shown_both = opened(display.messages()).keys() & opened(pager.messages()).keys()
    figures.update(
        waiting_calls_lost=len(waited - shown_both),
        waiting_presses_resent=waiting.resent,
    )

    shown = opened(display.messages())
    figures.update(
        calls_sent=len(ward.calls),
        calls_acked_while_gateway_listened=len(must_see),
        alerts_seen_display=len(shown),
        alerts_seen_pager=len(opened(pager.messages())),
        calls_never_acked=len(set(ward.calls) - acked),
        calls_acked_blind=len(blind),
        blind_calls_lost=len(blind - shown.keys()),
        cancels=len(ward.cancelled),
        opened_twice=sum(len(ids) > 1 for ids in shown.values()),
        stepped_back=regressions(display.messages()) + regressions(pager.messages()),
    )
    assert figures["waiting_calls_lost"] == 0, sorted(waited - shown_both)[:10]
    assert figures["opened_twice"] == 0, {k: v for k, v in shown.items() if len(v) > 1}
    assert figures["stepped_back"] == 0
    assert len(must_see) > KILLS * 10
    assert len(waited) > KILLS * 10
