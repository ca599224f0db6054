"""The gateway's web page and JSON API over real HTTP: sign-in, roles, alerts.

Every test runs a real gateway process on a private Mosquitto; the browser
tests are in ``test_browser.py``, the walk over every route in
``test_web_access.py``.
"""

# Fixtures come from tests/web_helpers.py by import, which ruff takes for redefinitions.
# ruff: noqa: F811, F401
from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess

import httpx
import pytest

from tests.helpers import event, wait_until
from tests.web_helpers import (
    PIN,
    SUPERVISOR_PASSWORD,
    TECHNICIAN_PASSWORD,
    Web,
    technician,
    web,
    web_gateway,
    web_site,
)


def supervisor_for(technician: Web, web, staff: str = "ana") -> Web:
    technician.ok(
        "PUT",
        "/api/accounts/sue",
        {"role": "supervisor", "password": SUPERVISOR_PASSWORD, "staff": staff},
    )
    client = web()
    assert client.sign_in("sue", SUPERVISOR_PASSWORD).status_code == 200
    return client


def open_call(mqtt, topics, device: str = "call-1") -> str:
    display = mqtt(topics.alerts)
    mqtt().publish(topics.events(device), event(device))
    return display.wait_for_json(device=device, state="open")["id"]


# -- health and first run


def test_healthz_is_open_and_reports_a_healthy_gateway(web_gateway):
    """/healthz answers without a session: systemd and the installer poll it."""
    expected = {
        "status": "ok",
        "broker_connected": True,
        "open_alerts": 0,
        "events_accepted": 0,
        "commits": 0,
        "messages_rejected": {},
    }
    assert web_gateway.healthz().items() >= expected.items()


def test_first_run_serves_only_the_setup_page(start_gateway, topics):
    """With no technician password, everything but /setup and /healthz is shut."""
    gateway = start_gateway()
    client = Web(gateway)
    try:
        for path in ("/", "/floor", "/alerts", "/signin", "/pager"):
            response = client.get(path)
            assert response.status_code == 303, path
            assert response.headers["location"].startswith("/setup"), path
        api = client.get("/api/alerts")
        assert api.status_code == 401
        assert "/setup" in api.json()["detail"]
        assert client.get("/setup").status_code == 200
        assert client.get("/healthz").status_code == 200
    finally:
        client.close()


def test_setup_needs_the_code_from_the_log(start_gateway, topics):
    """The first password is set with the setup code the gateway logged."""
    gateway = start_gateway()
    code = wait_until(
        lambda: re.search(r"setup code (\d{4}-\d{4})", gateway.log()),
        what="the setup code in the log",
    ).group(1)
    client = Web(gateway)
    try:
        client.csrf = client.csrf_cookie("/setup")
        form = {"code": "0000-0000", "name": "tech", "password": TECHNICIAN_PASSWORD}
        if code == form["code"]:
            form["code"] = "1111-1111"
        wrong = client.send("POST", "/api/setup", form)
        assert wrong.status_code == 401
        assert "setup code" in wrong.json()["detail"]

        short = client.send(
            "POST", "/api/setup", form | {"code": code, "password": "short"}
        )
        assert short.status_code == 422
        assert "at least 10 characters" in short.json()["detail"]

        done = client.send("POST", "/api/setup", form | {"code": code})
        assert done.status_code == 200, done.text
        client.csrf = done.json()["csrf"]
        assert client.ok("GET", "/api/session")["role"] == "technician"

        client.csrf = client.client.cookies["gw_csrf"]
        again = client.send("POST", "/api/setup", form | {"code": code})
        assert again.status_code == 409
        assert client.get("/setup").headers["location"] == "/signin"
    finally:
        client.close()


def test_installer_hash_must_be_argon2(start_gateway, topics):
    """A plain password in admin_password_hash is refused with what to do."""
    site = web_site(topics)
    site["web"]["admin_password_hash"] = "plain text, not a hash"  # noqa: S105
    with pytest.raises(AssertionError, match="gateway.web.passwords"):
        start_gateway(site=site)


# -- sign-in --


def test_wrong_password_is_refused_and_then_throttled(web):
    """Five wrong passwords lock the account for a while, with a clear message."""
    client = web()
    for _ in range(5):
        response = client.sign_in(password="wrong password here")  # noqa: S106
        assert response.status_code == 401
        assert response.json()["detail"] == "wrong name or password"
    locked = client.sign_in(password="wrong password again")  # noqa: S106
    assert locked.status_code == 429
    wait = int(locked.headers["retry-after"])
    assert 0 < wait <= 300
    assert re.fullmatch(
        r"too many failed sign-ins; try again in \d+ s", locked.json()["detail"]
    )
    # The right password waits too: a locked account gives no hint.
    assert client.sign_in().status_code == 429


def test_sign_in_without_the_csrf_cookie_is_refused(web):
    """Even signing in needs the CSRF cookie's value (no login forgery)."""
    client = web()
    form = {"name": "technician", "password": TECHNICIAN_PASSWORD}
    response = client.send("POST", "/api/signin", form, csrf=False)
    assert response.status_code == 403
    assert "X-CSRF-Token" in response.json()["detail"]


def test_session_cookie_is_httponly_strict_and_secure_behind_tls(web):
    """The cookie is HttpOnly and SameSite=Strict; Secure when the proxy says https."""
    client = web()
    client.csrf = client.csrf_cookie()
    form = {"name": "technician", "password": TECHNICIAN_PASSWORD}
    plain = client.client.post(
        "/api/signin", json=form, headers={"X-CSRF-Token": client.csrf}
    )
    cookie = plain.headers["set-cookie"].lower()
    assert "httponly" in cookie
    assert "samesite=strict" in cookie
    assert "secure" not in cookie

    behind_tls = client.client.post(
        "/api/signin",
        json=form,
        headers={"X-CSRF-Token": client.csrf, "X-Forwarded-Proto": "https"},
    )
    assert "; secure" in behind_tls.headers["set-cookie"].lower()


def test_sign_out_ends_the_session(technician: Web):
    cookies = dict(technician.client.cookies)
    technician.ok("POST", "/api/signout")
    assert technician.get("/api/session").status_code == 401
    # The old cookie, replayed, opens nothing: the session is gone from SQLite.
    replay = httpx.get(f"{technician.base}/api/session", cookies=cookies)
    assert replay.status_code == 401


def test_supervisor_may_not_manage_accounts(technician, web):
    supervisor = supervisor_for(technician, web)
    response = supervisor.send("GET", "/api/accounts")
    assert response.status_code == 403
    assert "technician" in response.json()["detail"]


# -- alerts


def test_api_lists_unresolved_alerts(technician, mqtt, topics):
    """/api/alerts lists the open and acknowledged alerts, not resolved ones."""
    display = mqtt(topics.alerts)
    device = mqtt()
    for n in (1, 2, 3):
        device.publish(topics.events(f"call-{n}"), event(f"call-{n}"))
    ids = [display.wait_for_json(device=f"call-{n}")["id"] for n in (1, 2, 3)]
    device.publish(topics.ack(ids[1]), {"staff": "ana"})
    device.publish(topics.events("call-3"), event("call-3", "cancel"))
    display.wait_for_json(id=ids[2], state="resolved")
    display.wait_for_json(id=ids[1], state="acknowledged")

    listed = technician.ok("GET", "/api/alerts")
    assert {a["id"]: a["state"] for a in listed} == {
        ids[0]: "open",
        ids[1]: "acknowledged",
    }


def test_supervisor_acknowledges_and_it_is_committed_before_published(
    technician,
    web,
    mqtt,
    topics,
    web_gateway,
):
    """An ack from the page goes through the gateway: stored, then on MQTT."""
    supervisor = supervisor_for(technician, web, staff="ana")
    alert_id = open_call(mqtt, topics)
    display = mqtt(topics.alert(alert_id))
    mark = display.mark()

    result = supervisor.ok("POST", f"/api/alerts/{alert_id}/ack")
    [changed] = result["alerts"]
    assert (changed["state"], changed["acked_by"]) == ("acknowledged", "ana")
    # The answer came after the commit: the row is already on disk.
    [row] = web_gateway.query(
        "SELECT state, acked_by FROM alerts WHERE id = ?", alert_id
    )
    assert row == {"state": "acknowledged", "acked_by": "ana"}
    published = display.wait_for_json(after=mark, state="acknowledged")
    assert published["acked_by"] == "ana"
    history = supervisor.ok("GET", f"/api/alerts/{alert_id}")["history"]
    assert [(h["kind"], h["via"]) for h in history] == [
        ("opened", "station"),
        ("acknowledged", "web"),
    ]


def test_ack_needs_an_account_linked_to_staff(technician, mqtt, topics):
    alert_id = open_call(mqtt, topics)
    response = technician.send("POST", f"/api/alerts/{alert_id}/ack")
    assert response.status_code == 422
    assert "linked to no staff id" in response.json()["detail"]


def test_resolving_twice_says_already_resolved(technician, mqtt, topics):
    alert_id = open_call(mqtt, topics)
    technician.ok("POST", f"/api/alerts/{alert_id}/resolve")
    again = technician.send("POST", f"/api/alerts/{alert_id}/resolve")
    assert again.status_code == 409
    assert again.json()["detail"].startswith(f"alert {alert_id} is already resolved")


def test_unknown_alert_is_a_404(technician):
    assert technician.send("GET", "/api/alerts/0123456789abcdef").status_code == 404
    response = technician.send("POST", "/api/alerts/0123456789abcdef/resolve")
    assert response.status_code == 404
    assert "no unresolved alert" in response.json()["detail"]


def test_an_emergency_cannot_be_resolved_from_the_page(start_gateway, topics, mqtt):
    site = web_site(topics)
    site["rules"][0]["priority"] = "emergency"
    gateway = start_gateway(site=site)
    client = Web(gateway)
    try:
        assert client.sign_in().status_code == 200
        alert_id = open_call(mqtt, topics)
        response = client.send("POST", f"/api/alerts/{alert_id}/resolve")
        assert response.status_code == 409
        assert "only at its own station" in response.json()["detail"]
        assert client.ok("GET", "/api/alerts")[0]["state"] == "open"
    finally:
        client.close()


def test_silence_from_the_page_holds_pages_until_ended(technician, mqtt, topics):
    pagers = mqtt(topics.pagers)
    made = technician.ok(
        "POST", "/api/silences", {"zone": "west", "minutes": 30, "reason": "deep clean"}
    )
    [listed] = technician.ok("GET", "/api/silences")
    assert (listed["id"], listed["zone"], listed["reason"]) == (
        made["silence"],
        "west",
        "deep clean",
    )
    alert_id = open_call(mqtt, topics)
    assert technician.ok("GET", "/api/alerts")[0]["held"] is True

    technician.ok("DELETE", f"/api/silences/{made['silence']}")
    page = pagers.wait_for_json(alert=alert_id)
    assert page["target"] == "nurse"
    assert technician.ok("GET", "/api/silences") == []
    missing = technician.send("DELETE", f"/api/silences/{made['silence']}")
    assert missing.status_code == 404


def test_silence_names_one_place(technician):
    response = technician.send("POST", "/api/silences", {"minutes": 5, "reason": "x"})
    assert response.status_code == 422
    assert "exactly one device or one zone" in response.text


def test_site_names_for_displays(technician):
    """/api/site maps ids to the names a wall display shows."""
    body = technician.ok("GET", "/api/site")
    assert body["rooms"]["room-1"] == "Room 1"
    assert body["zones"] == {"west": "West wing"}
    assert body["staff"]["ana"] == "Ana Silva"


# -- wall displays


def test_display_token_reads_the_floor_and_nothing_more(technician, web, mqtt, topics):
    made = technician.ok("POST", "/api/display-tokens", {"label": "West TV"})
    wall = web()
    entry = wall.get(made["url"])
    assert (entry.status_code, entry.headers["location"]) == (303, "/floor")
    assert "token" not in entry.headers["location"]
    assert wall.get("/floor").status_code == 200
    alert_id = open_call(mqtt, topics)
    assert [a["id"] for a in wall.ok("GET", "/api/alerts")] == [alert_id]
    # Read only: no acting, no console, no accounts.
    assert wall.send("POST", f"/api/alerts/{alert_id}/resolve").status_code == 403
    assert wall.get("/api/accounts").status_code == 403
    assert wall.get("/api/alerts/recent").status_code == 403

    technician.ok("DELETE", f"/api/display-tokens/{made['id']}")
    assert wall.get("/api/alerts").status_code == 401


# -- the pager page


def test_pager_sign_in_with_pin_and_live_pages(technician, web, mqtt, topics):
    """A nurse signs in with name and PIN and hears the nurse role's pages."""
    technician.ok("PUT", "/api/staff/ana/pin", {"pin": PIN})
    phone = web()
    wrong = phone.pager_sign_in("Ana Silva", "000000")
    assert wrong.status_code == 401
    assert phone.pager_sign_in("ana silva").status_code == 200
    me = phone.ok("GET", "/api/pager/me")
    assert (me["staff"], me["hears"]) == ("ana", ["ana", "nurse"])

    with phone.client.stream("GET", "/api/pager/stream") as stream:
        lines = stream.iter_lines()
        assert next(lines) == "event: snapshot"
        alert_id = open_call(mqtt, topics)
        found = None
        for line in lines:
            if line == "event: page":
                found = next(lines)
                break
        assert found is not None
        page = json.loads(found.removeprefix("data: "))
        assert (page["alert"], page["target"], page["reason"]) == (
            alert_id,
            "nurse",
            "opened",
        )

    taken = phone.ok("POST", f"/api/pager/alerts/{alert_id}/ack")
    assert taken["alerts"][0]["acked_by"] == "ana"
    assert phone.get("/api/alerts").status_code == 403  # a pager is not the console


def test_pin_must_be_digits(technician):
    response = technician.send("PUT", "/api/staff/ana/pin", {"pin": "12ab"})
    assert response.status_code == 422
    assert "4 to 8 digits" in response.json()["detail"]


# -- the web page never stops alerting


def test_taken_web_port_does_not_stop_alerting(start_gateway, mqtt, topics):
    """If the web port is taken, calls are still turned into alerts."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        gateway = start_gateway(web_port=port)
        wait_until(lambda: str(port) in gateway.log(), what="the bind failure logged")
        # Bounded wait for an exit that must not come: stopping after the
        # failure takes milliseconds, so two seconds is far beyond it.
        with contextlib.suppress(subprocess.TimeoutExpired):
            gateway.process.wait(timeout=2)
        assert gateway.running, "the gateway exited"
        display = mqtt(topics.alerts)
        mqtt().publish(topics.events("call-1"), event("call-1"))
        display.wait_for_json(device="call-1", state="open")
