"""The MQTT contract: topic names and the JSON the gateway publishes.

Everything is QoS 1, and every message carries an id so a consumer can drop
the duplicates QoS 1 allows. The README documents the same contract; a test
keeps the two in step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from drivers.mqtt_device import RejectedMessage, decode_json_object
from gateway.store import alert_record
from rules.alerts import Alert, Change, Notification

QOS = 1
ONLINE = b"online"
OFFLINE = b"offline"


@dataclass(frozen=True)
class Topics:
    """Topic names of one site, built once from its id."""

    site: str
    gateway: str

    @property
    def base(self) -> str:
        return f"facility/{self.site}"

    @property
    def device_events(self) -> str:
        return f"{self.base}/devices/+/events"

    @property
    def commands(self) -> tuple[str, ...]:
        return (
            f"{self.base}/alerts/+/ack",
            f"{self.base}/alerts/+/resolve",
            f"{self.base}/silences",
            f"{self.base}/silences/+/end",
            f"{self.base}/polls/+/answer",
            f"{self.base}/staff/+/ack",
            f"{self.base}/staff/+/resolve",
            f"{self.base}/staff/+/answer",
        )

    @property
    def sightings(self) -> str:
        return f"{self.base}/devices/+/sightings"

    @property
    def status(self) -> str:
        return f"{self.base}/gateways/{self.gateway}/status"

    def alert(self, alert_id: str) -> str:
        return f"{self.base}/alerts/{alert_id}"

    def pager(self, target: str) -> str:
        return f"{self.base}/pagers/{target}"

    def availability(self, device: str) -> str:
        return f"{self.base}/devices/{device}/availability"

    def device_test(self, device: str) -> str:
        """A technician's test of a device: a call station lights its dome."""
        return f"{self.base}/devices/{device}/test"

    def device_light(self, device: str) -> str:
        """A call station's dome light, retained: ``on``, ``blink`` or ``off``."""
        return f"{self.base}/devices/{device}/light"

    def silence(self, silence_id: str) -> str:
        return f"{self.base}/silences/{silence_id}"

    def kudos(self, zone: str) -> str:
        return f"{self.base}/zones/{zone}/kudos"

    def poll_result(self, poll_id: str) -> str:
        return f"{self.base}/polls/{poll_id}/result"

    def parse(self, topic: str) -> tuple[str, str] | None:
        """Split an incoming topic into (kind, id), or None if it is not ours.

        Kinds: ``event`` (id is the device), ``ack`` and ``resolve`` (id is
        the alert), ``silence`` (no id), ``unsilence`` (id is the silence),
        ``poll_answer`` (id is the poll), and ``staff_ack``, ``staff_resolve``
        and ``staff_answer`` (id is the staff member the topic speaks for).
        """
        parts = topic.split("/")
        if len(parts) < 3 or parts[0] != "facility" or parts[1] != self.site:
            return None
        if parts[2:] == ["silences"]:
            return ("silence", "")
        if len(parts) != 5:
            return None
        if parts[2] == "silences" and parts[4] == "end":
            return ("unsilence", parts[3])
        if parts[2] == "devices" and parts[4] == "events":
            return ("event", parts[3])
        if parts[2] == "devices" and parts[4] == "sightings":
            return ("sighting", parts[3])
        if parts[2] == "alerts" and parts[4] in ("ack", "resolve"):
            return (parts[4], parts[3])
        if parts[2] == "polls" and parts[4] == "answer":
            return ("poll_answer", parts[3])
        if parts[2] == "staff" and parts[4] in ("ack", "resolve", "answer"):
            return (f"staff_{parts[4]}", parts[3])
        return None


def alert_payload(alert: Alert) -> bytes:
    """The retained state of an alert, as displays and pagers read it."""
    record = alert_record(alert)
    record["msg_id"] = f"{alert.id}:{alert.version}"
    return orjson.dumps(record)


def pager_payload(change: Change, note: Notification) -> bytes:
    """A notification for one pager topic (a person or a role)."""
    return orjson.dumps(pager_body(change, note))


def pager_body(change: Change, note: Notification) -> dict[str, Any]:
    """The fields of :func:`pager_payload`, for the web page's pager view."""
    alert = change.alert
    where = alert.room or alert.zone or alert.device
    what = alert.rule.replace("-", " ").replace("_", " ").capitalize()
    text = {
        "opened": f"{what} in {where}",
        "escalated": f"Escalated (level {alert.level}): {what} in {where}",
        "reminded": f"Still waiting: {what} in {where}",
        "reopened": f"Not finished in time: {what} in {where} is open again",
        "released": f"{what} in {where} (held back until now)",
        "acknowledged": f"{where}: taken by {alert.acked_by}",
        "resolved": f"{where}: resolved",
    }.get(note.reason, f"{where}: {note.reason}")
    body: dict[str, Any] = {
        "id": f"{alert.id}:{alert.version}:{note.target}",
        "alert": alert.id,
        "target": note.target,
        "reason": note.reason,
        "state": alert.state.value,
        "level": alert.level,
        "priority": alert.priority,
        "room": alert.room,
        "zone": alert.zone,
        "device": alert.device,
        "text": text,
    }
    return body


def parse_command(payload: bytes, max_payload: int) -> tuple[str, str | None]:
    """Read an ack or resolve: ``{"staff": "<staff_id>", "id": "<optional>"}``."""
    body = decode_json_object(payload, max_payload)
    staff = body.get("staff")
    if not isinstance(staff, str) or not staff:
        raise RejectedMessage(
            "missing_field", f"'staff' must name the staff id, got {staff!r:.60}"
        )
    message_id = body.get("id")
    if message_id is not None and not isinstance(message_id, str):
        raise RejectedMessage(
            "bad_field", f"'id' must be a string, got {message_id!r:.60}"
        )
    return staff, message_id


def parse_staff_command(
    staff: str, payload: bytes, max_payload: int
) -> tuple[str, str | None]:
    """Read a pager's ack or resolve on its own staff topic: ``{"alert", "id"}``.

    The staff id comes from the topic, which the broker's ACL lets only that
    person's pager write; a body naming someone else is a spoof, refused.
    """
    body = decode_json_object(payload, max_payload)
    alert = body.get("alert")
    if not isinstance(alert, str) or not alert:
        raise RejectedMessage(
            "missing_field", f"'alert' must name the alert id, got {alert!r:.60}"
        )
    claimed = body.get("staff", staff)
    if claimed != staff:
        raise RejectedMessage(
            "spoofed",
            f"the topic speaks for {staff!r:.40} but the body names {claimed!r:.40}",
        )
    message_id = body.get("id")
    if message_id is not None and not isinstance(message_id, str):
        raise RejectedMessage(
            "bad_field", f"'id' must be a string, got {message_id!r:.60}"
        )
    return alert, message_id


@dataclass(frozen=True)
class SilenceRequest:
    """A technician's mute: one device or one zone, until a time, with a reason."""

    staff: str
    until: float
    reason: str
    device: str | None = None
    zone: str | None = None


def parse_silence(payload: bytes, max_payload: int) -> SilenceRequest:
    """Read ``{"staff", "until", "reason", "device" | "zone"}``."""
    body = decode_json_object(payload, max_payload)
    staff, reason = body.get("staff"), body.get("reason")
    until = body.get("until")
    device, zone = body.get("device"), body.get("zone")
    if not isinstance(staff, str) or not staff:
        raise RejectedMessage("missing_field", "'staff' must name who silences")
    if not isinstance(reason, str) or not reason.strip():
        raise RejectedMessage("missing_field", "a silence needs a 'reason'")
    if isinstance(until, bool) or not isinstance(until, int | float):
        raise RejectedMessage("bad_field", "'until' must be Unix seconds")
    if (device is None) == (zone is None) or not isinstance(device or zone, str):
        raise RejectedMessage("bad_field", "give exactly one of 'device' or 'zone'")
    return SilenceRequest(staff, float(until), reason.strip()[:200], device, zone)
