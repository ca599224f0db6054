"""Devices that speak our MQTT contract directly (ESPHome call stations, tests).

A device publishes to ``facility/<site>/devices/<device_id>/events``::

    {"id": "<unique>", "type": "call", "device": "<device_id>", "ts": 1733230000.5}

plus any fields its type carries. This module turns such a payload into an
:class:`~rules.events.Event`, or refuses it with a :class:`RejectedMessage`
that says exactly what is wrong, so the gateway can log and count it.
"""

from __future__ import annotations

import json
import math
from typing import Any

from rules.events import Event

MAX_ID_LENGTH = 128
"""Event ids are stored and echoed; a longer one is a broken or hostile sender."""


class RejectedMessage(ValueError):
    """A message the gateway will not act on; ``reason`` is a short counter key."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


def parse_event(topic_device: str, payload: bytes, max_payload: int) -> Event:
    """Validate one device event payload published under ``topic_device``."""
    body = decode_json_object(payload, max_payload)

    event_id = _required_text(body, "id")
    event_type = _required_text(body, "type")
    device = _required_text(body, "device")
    if device != topic_device:
        # A device may publish only about itself; the broker's ACL enforces
        # the topic, and this check stops a payload naming another device.
        raise RejectedMessage(
            "device_mismatch",
            f"payload names device {device!r} but was published under {topic_device!r}",
        )

    ts = body.get("ts")
    if ts is None:
        raise RejectedMessage("missing_field", "required field 'ts' is missing")
    if isinstance(ts, bool) or not isinstance(ts, int | float) or not math.isfinite(ts):
        raise RejectedMessage(
            "bad_field", f"'ts' must be Unix seconds as a number, got {ts!r}"
        )

    extra = {k: v for k, v in body.items() if k not in ("id", "type", "device", "ts")}
    return Event(event_id, event_type, device, float(ts), extra)


def decode_json_object(payload: bytes, max_payload: int) -> dict[str, Any]:
    """Decode a size-capped UTF-8 JSON object, or raise RejectedMessage."""
    if len(payload) > max_payload:
        raise RejectedMessage(
            "oversized",
            f"payload is {len(payload)} bytes, the limit is {max_payload}",
        )
    try:
        body = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RejectedMessage("malformed_json", f"not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise RejectedMessage(
            "malformed_json", f"expected a JSON object, got {type(body).__name__}"
        )
    return body


def _required_text(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if value is None:
        raise RejectedMessage("missing_field", f"required field {key!r} is missing")
    if not isinstance(value, str) or not value or len(value) > MAX_ID_LENGTH:
        raise RejectedMessage(
            "bad_field",
            f"{key!r} must be a non-empty string of at most {MAX_ID_LENGTH} "
            f"characters, got {value!r:.60}",
        )
    return value
