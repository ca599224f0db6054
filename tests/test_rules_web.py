"""The rules API over real HTTP, on a real gateway and a real broker.

Validation located per rule and field, versions, enable switches, rollback,
the hot swap that keeps open alerts and their timers, the audit log, a
restart, and the dry run on recorded events.
"""

# Fixtures come from tests/web_helpers.py by import, which ruff takes for redefinitions.
# ruff: noqa: F811, F401
from __future__ import annotations

import time
from typing import Any

from tests.helpers import SLOW_LEVELS, event, wait_until, write_site
from tests.web_helpers import Web, technician, web, web_gateway, web_site

TYPO = """name: patient-call
devices: {kind: call_button}
levels:
- {after: 0s, roles: [nurse]}
- {aftr: 10m, roles: [charge_nurse]}
"""

NO_SUCH_ROLE = """name: patient-call
devices: {kind: call_button}
levels:
- {after: 0s, roles: [nurse]}
- {after: 10m, roles: [charge_nurce]}
"""


def call_rule(levels: Any = SLOW_LEVELS, **extra: Any) -> dict[str, Any]:
    return {
        "name": "patient-call",
        "devices": {"kind": "call_button"},
        "levels": [dict(level) for level in levels],
        **extra,
    }


def open_call(mqtt, topics, device: str = "call-1") -> dict[str, Any]:
    display = mqtt(topics.alerts)
    mqtt().publish(topics.events(device), event(device))
    return display.wait_for_json(device=device, state="open")


def test_the_site_file_is_version_1_and_supervisors_only_read(
    technician, web, web_gateway
):
    running = technician.ok("GET", "/api/rules")
    assert running["version"]["number"] == 1
    assert running["version"]["saved_by"] == "site file"
    [rule] = running["rules"]
    assert (rule["name"], rule["kind"], rule["enabled"], rule["levels"]) == (
        "patient-call",
        "call",
        True,
        3,
    )
    assert "- after: 10m\n  roles: [charge_nurse]\n" in rule["yaml"]
    assert technician.ok("GET", "/api/rules/patient-call")["name"] == "patient-call"
    assert technician.send("GET", "/api/rules/nope").status_code == 404

    technician.ok(
        "PUT",
        "/api/accounts/sue",
        {"role": "supervisor", "password": "supervisor password 1", "staff": "ana"},
    )
    supervisor = web()
    assert supervisor.sign_in("sue", "supervisor password 1").status_code == 200
    assert supervisor.ok("GET", "/api/rules")["version"]["number"] == 1
    refused = supervisor.send("PUT", "/api/ruleset", {"rules": [call_rule()]})
    assert refused.status_code == 403
    assert supervisor.get("/rules").status_code == 403


def test_problems_name_the_rule_the_field_and_the_line(technician):
    checked = technician.ok("POST", "/api/ruleset/validate", {"rules": [TYPO]})
    assert checked["ok"] is False
    assert checked["problems"] == [
        {
            "rule": 0,
            "name": "patient-call",
            "field": "levels[1].aftr",
            "line": 5,
            "message": "unknown field 'aftr'; did you mean 'after'?",
        }
    ]
    # Cross-references get the site file's own message, too.
    checked = technician.ok(
        "POST", "/api/ruleset/validate", {"rules": [call_rule(), NO_SUCH_ROLE]}
    )
    problems = [(p["rule"], p["field"], p["line"]) for p in checked["problems"]]
    assert (1, "levels[1].roles", 5) in problems
    assert any(
        "no staff member has role 'charge_nurce'" in p["message"]
        for p in checked["problems"]
    )

    refused = technician.send("PUT", "/api/ruleset", {"rules": [TYPO]})
    assert refused.status_code == 422
    assert refused.json()["problems"][0]["field"] == "levels[1].aftr"
    assert technician.ok("GET", "/api/rules")["version"]["number"] == 1


def test_a_save_makes_a_version_that_runs_at_once(
    technician, mqtt, topics, web_gateway
):
    pagers = mqtt(topics.pagers)
    charge_first = call_rule([{"after": "0s", "roles": ["charge_nurse"]}])
    saved = technician.ok(
        "PUT", "/api/ruleset", {"rules": [charge_first], "comment": "night", "base": 1}
    )
    assert saved == {"version": 2, "rules": 1}
    [row] = web_gateway.query(
        "SELECT saved_by, action, comment, source FROM rule_versions WHERE number = 2"
    )
    assert row == {
        "saved_by": "technician",
        "action": "save",
        "comment": "night",
        "source": "web",
    }

    alert = open_call(mqtt, topics)
    page = pagers.wait_for_json(alert=alert["id"])
    assert page["target"] == "charge_nurse"

    # An edit based on version 1 no longer saves: version 2 is newer.
    stale = technician.send("PUT", "/api/ruleset", {"rules": [call_rule()], "base": 1})
    assert stale.status_code == 409
    assert "version 2 is the newest" in stale.json()["detail"]


def test_hot_swap_keeps_an_open_alert_and_its_escalation_on_time(
    start_gateway, topics, mqtt
):
    levels = [
        {"after": "0s", "roles": ["nurse"]},
        {"after": "3s", "roles": ["charge_nurse"]},
        {"after": "20m", "staff": ["dev"]},
    ]
    gateway = start_gateway(site=web_site(topics, levels=levels))
    client = Web(gateway)
    try:
        assert client.sign_in().status_code == 200
        display = mqtt(topics.alerts)
        opened = open_call(mqtt, topics)

        # Swapped while the alert waits for level 2: a new rule, and the
        # call rule's last level changed.
        changed = [*levels[:2], {"after": "30m", "roles": ["charge_nurse"]}]
        towels = {
            "name": "towels-low",
            "kind": "threshold",
            "devices": {"kind": "dispenser"},
            "reading": "towel_level",
            "below": 15,
            "levels": [{"after": "0s", "roles": ["nurse"]}],
        }
        assert time.time() - opened["opened_at"] < 2.5, "too slow to swap in time"
        client.ok("PUT", "/api/ruleset", {"rules": [call_rule(changed), towels]})
        assert [a["id"] for a in client.ok("GET", "/api/alerts")] == [opened["id"]]

        escalated = display.wait_for_json(id=opened["id"], state="escalated")
        assert escalated["level"] == 2
        assert escalated["late"] is False
        assert abs(escalated["updated_at"] - (opened["opened_at"] + 3)) < 0.5
        assert escalated["due_at"] == opened["opened_at"] + 30 * 60
    finally:
        client.close()


def test_a_disabled_rule_raises_nothing_and_rollback_brings_it_back(
    technician, mqtt, topics, web_gateway
):
    off = technician.ok("PUT", "/api/rules/patient-call/enabled", {"enabled": False})
    assert off["version"] == 2
    rule = technician.ok("GET", "/api/rules/patient-call")
    assert (rule["enabled"], rule["version"]) == (False, 2)

    mqtt().publish(topics.events("call-1"), event("call-1"))
    wait_until(
        lambda: web_gateway.healthz()["events_accepted"] == 1,
        what="the call taken in",
    )
    assert technician.ok("GET", "/api/alerts") == []
    assert web_gateway.query("SELECT id FROM alerts") == []

    back = technician.ok("POST", "/api/ruleset/versions/1/rollback", {})
    assert back["version"] == 3
    three = technician.ok("GET", "/api/ruleset/versions/3")
    one = technician.ok("GET", "/api/ruleset/versions/1")
    assert (three["action"], three["restored_from"]) == ("rollback", 1)
    assert three["rules"] == one["rules"]
    listed = technician.ok("GET", "/api/ruleset/versions")
    assert listed["running"] == 3
    assert [v["number"] for v in listed["versions"]] == [3, 2, 1]
    assert open_call(mqtt, topics, "call-2")["rule"] == "patient-call"

    technician.ok(
        "POST", "/api/silences", {"zone": "west", "minutes": 5, "reason": "cleaning"}
    )
    log = technician.ok("GET", "/api/ruleset/audit")
    assert [(r["action"], r["by"], r["target"], r["version"]) for r in log] == [
        ("silence", "technician", log[0]["target"], None),
        ("rollback", "technician", "version 1", 3),
        ("disable", "technician", "patient-call", 2),
        ("site file", "site file", None, 1),
    ]
    assert log[0]["detail"] == {"zone": "west", "minutes": 5.0, "reason": "cleaning"}
    assert log[2]["detail"]["changed"] == ["patient-call"]


def test_the_saved_version_runs_after_a_restart_until_the_file_changes(
    technician, mqtt, topics, web_gateway
):
    pagers = mqtt(topics.pagers)
    charge_first = call_rule([{"after": "0s", "roles": ["charge_nurse"]}])
    technician.ok("PUT", "/api/ruleset", {"rules": [charge_first]})

    web_gateway.stop()
    web_gateway.start()
    client = Web(web_gateway)
    try:
        assert client.sign_in().status_code == 200
        assert client.ok("GET", "/api/rules")["version"]["number"] == 2
        alert = open_call(mqtt, topics)
        assert pagers.wait_for_json(alert=alert["id"])["target"] == "charge_nurse"

        # The site file's rules edited on disk: they win, as a new version.
        web_gateway.stop()
        site = web_site(topics)
        site["rules"][0]["levels"][1]["after"] = "5m"
        write_site(web_gateway.site_file, site)
        web_gateway.start()
        web_gateway.healthz()  # the web server binds a moment after MQTT is up
        assert client.sign_in().status_code == 200
        running = client.ok("GET", "/api/rules")
        assert running["version"]["number"] == 3
        assert running["version"]["comment"] == "the site file's rules changed on disk"
        assert "- after: 5m\n  roles: [charge_nurse]\n" in running["rules"][0]["yaml"]
    finally:
        client.close()


def test_dry_run_compares_what_each_rule_set_raises_on_recorded_events(
    technician, mqtt, topics
):
    display = mqtt(topics.alerts)
    device = mqtt()
    for name in ("call-1", "call-2", "call-3"):
        device.publish(topics.events(name), event(name))
    device.publish(topics.events("call-2"), event("call-2", "cancel"))
    display.wait_for_json(device="call-2", state="resolved")
    opened = display.wait_for_json(device="call-3", state="open")

    # Only calls 1 and 2, and level 2 after 1 s instead of 10 min.
    proposed = call_rule(
        [
            {"after": "0s", "roles": ["nurse"]},
            {"after": "1s", "roles": ["charge_nurse"]},
        ],
        devices={"ids": ["call-1", "call-2"]},
    )
    wait_until(lambda: time.time() > opened["opened_at"] + 1.5, what="a second")
    result = technician.ok(
        "POST", "/api/ruleset/dry-run", {"rules": [proposed], "hours": 1}
    )
    assert result["events"] == 4
    assert result["truncated"] is False
    assert (result["current"]["count"], result["proposed"]["count"]) == (3, 2)
    assert result["current"]["by_level"] == {"1": 3}
    assert result["proposed"]["by_level"] == {"1": 1, "2": 1}
    assert result["differences"] == {
        "same": 1,
        "changed": 1,
        "only_current": 1,
        "only_proposed": 0,
    }
    by_device = {a["device"]: a for a in result["proposed"]["alerts"]}
    assert by_device["call-1"]["change"] == "changed"
    assert [
        (lv["level"], lv["roles"], lv["paged"]) for lv in by_device["call-1"]["paged"]
    ] == [
        (1, ["nurse"], ["nurse"]),
        (2, ["charge_nurse"], ["charge_nurse"]),
    ]
    assert by_device["call-2"]["closed_via"] == "station"
    gone = [a for a in result["current"]["alerts"] if a["change"] == "only_current"]
    assert [a["device"] for a in gone] == ["call-3"]
    # Nothing ran for real: still version 1, with its open alerts.
    assert technician.ok("GET", "/api/rules")["version"]["number"] == 1
