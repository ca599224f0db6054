"""The devices and health page, device tests, and the recognition board.

Technicians and supervisors read the devices page; only a technician tests
a device. A test never goes through the engine: a dome light is lit by its
driver or told over MQTT, a test page goes straight to the person's pager
topic marked ``"test": true``, so no test opens an alert or earns credit.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.responses import RedirectResponse

from gateway import audit, devices, health, recognition
from gateway.web.alerts import read_recognition, site_names
from gateway.web.auth import (
    DISPLAY_COOKIE,
    DISPLAY_LIFETIME,
    Gate,
    Principal,
    Reader,
    Supervisor,
    Technician,
)
from gateway.web.pages import gateway_of, page

if TYPE_CHECKING:
    from gateway.service import Gateway

log = logging.getLogger(__name__)

router = APIRouter(tags=["devices"])

TEST_SECONDS = 5.0
"""How long a test lights a dome: long enough to walk to the door and look."""


# -- pages -------------------------------------------------------------------------


@router.get("/devices", include_in_schema=False)
async def devices_page(who: Supervisor) -> Response:
    return page("devices.html")


@router.get("/recognition", include_in_schema=False)
async def recognition_page(request: Request, who: Reader) -> Response:
    """The board; ``/recognition?token=...`` turns a display token into a cookie."""
    if who.display_token:
        gate: Gate = request.app.state.gate
        response = RedirectResponse("/recognition", 303)
        gate.set_cookie(
            request, response, DISPLAY_COOKIE, who.display_token, DISPLAY_LIFETIME
        )
        return response
    return page("recognition.html")


# -- reading ---------------------------------------------------------------------


@router.get("/api/devices")
async def device_list(request: Request, who: Supervisor) -> dict[str, Any]:
    """Every driver and device, the staff pagers, badges and the gateway's health."""
    gateway = gateway_of(request)
    now = time.time()
    return {
        "now": now,
        "site": site_names(gateway),
        "drivers": devices.driver_states(gateway),
        "devices": devices.device_report(gateway, now),
        "pagers": [
            {"staff": m.id, "name": m.name, "roles": list(m.roles)}
            for m in gateway.config.staff
        ],
        "badges": devices.badges(gateway),
        "health": health.gateway_health(gateway, now),
    }


@router.get("/api/recognition/board")
async def recognition_board(request: Request, who: Reader) -> dict[str, Any]:
    """Per person and team, today and this week; opted-out people not named.

    Wall displays may read it; it is the only recognition they see."""
    gateway = gateway_of(request)
    body = await asyncio.to_thread(read_recognition, gateway)
    names = site_names(gateway)
    hidden = recognition.opted_out(gateway.config.staff)
    names["staff"] = {k: v for k, v in names["staff"].items() if k not in hidden}
    body["site"] = names
    return body


# -- tests -------------------------------------------------------------------------


@router.post("/api/devices/{device_id}/test")
async def device_test(
    device_id: str, request: Request, who: Technician
) -> dict[str, Any]:
    """Light a call station's dome for a few seconds: its GPIO light, or the
    ``devices/<id>/test`` command an ESPHome station reads. No alert opens."""
    gateway = gateway_of(request)
    if device_id not in {d.id for d in gateway.config.devices}:
        raise HTTPException(404, f"no device {device_id!r} in the site file")
    kind = devices.how_to_test(gateway, device_id)
    if kind == "gpio_light":
        for driver in devices.light_drivers(gateway.drivers, device_id):
            driver.test_light(device_id, TEST_SECONDS)
    elif kind == "mqtt":
        body = {
            "id": f"test-{uuid.uuid4().hex[:12]}",
            "test": "light",
            "seconds": TEST_SECONDS,
            "by": who.name,
        }
        _publish(gateway, gateway.topics.device_test(device_id), body)
    else:
        raise HTTPException(
            422,
            f"device {device_id!r} is read by a driver (a serial hub or a Bluetooth "
            "adapter) and has nothing the gateway can switch; test it at the device",
        )
    _audit(gateway, who, f"device {device_id}", str(kind))
    return {"device": device_id, "test": kind, "seconds": TEST_SECONDS}


@router.post("/api/staff/{staff_id}/test-page")
async def pager_test(
    staff_id: str, request: Request, who: Technician
) -> dict[str, Any]:
    """Send a page marked as a test to one person's pager topic; no alert opens."""
    gateway = gateway_of(request)
    member = next((m for m in gateway.config.staff if m.id == staff_id), None)
    if member is None:
        raise HTTPException(404, f"no staff member {staff_id!r} in the site file")
    body = {
        "id": f"test-{uuid.uuid4().hex[:12]}",
        "test": True,
        "reason": "test",
        "target": staff_id,
        "alert": None,
        "text": f"TEST page for {member.name} from {who.name}: no action needed",
        "at": time.time(),
    }
    _publish(gateway, gateway.topics.pager(staff_id), body)
    _audit(gateway, who, f"pager of {staff_id}", "test page")
    return {"staff": staff_id, "page": body}


def _publish(gateway: Gateway, topic: str, body: dict[str, Any]) -> None:
    payload = json.dumps(body, separators=(",", ":")).encode()
    if not gateway.link.publish(topic, payload):
        raise HTTPException(
            503, "the gateway has no broker link right now; the test was not sent"
        )


def _audit(gateway: Gateway, who: Principal, target: str, how: str) -> None:
    """A test is a change a technician made: it goes in the audit log."""
    audit.record_now(
        gateway.store.db, who.name, "test", target=target, detail={"how": how}
    )
