"""The simulated facility as a driver: a sped-up ward through a real gateway.

The same site file as the demo, without its hardware sections, with
``simulator:`` added: simulated patients call, nurses walk in with their
badges, guests use the restroom, a dispenser falls silent. Everything reaches
the engine through the driver interface, as a GPIO press or a serial frame
does, and the gateway commits and publishes it as on a live site.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from drivers.simulator import Behaviour
from gateway.config import ConfigError, load_config
from tests.helpers import wait_until

DEMO_SITE = Path(__file__).parents[1] / "sites" / "demo-ward.yaml"
HARDWARE = ("gpio", "serial_hubs", "presence", "ble", "mqtt_devices", "upstream")


def simulated_ward(site_id: str, speed: float) -> dict:
    config = yaml.safe_load(DEMO_SITE.read_text())
    for section in HARDWARE:
        config.pop(section, None)
    config["site"]["id"] = site_id
    config["gateway"]["id"] = "gw-1"
    config["simulator"] = {"speed": speed, "seed": 7}
    return config


def test_a_sped_up_ward_opens_and_closes_gaps_through_the_driver(
    start_gateway, mqtt, topics
):
    """Calls open alerts; badges walking in and bedside cancels close them."""
    display = mqtt(topics.alerts)
    gateway = start_gateway(site=simulated_ward(topics.site, speed=20.0))

    def closed_in_person() -> set[str]:
        rows = gateway.query(
            "SELECT DISTINCT resolved_via FROM alerts WHERE state = 'resolved'"
        )
        return {row["resolved_via"] for row in rows}

    wait_until(
        lambda: {"presence", "station"} <= closed_in_person(),
        timeout=40,
        what="gaps closed both by a badge walking in and at the bedside",
    )

    # Every alert the display saw open is in the database, and every one the
    # database holds as resolved was shown resolved: commit, then publish.
    opened = {m.json["id"] for m in display.messages if m.payload}
    stored = {row["id"] for row in gateway.query("SELECT id FROM alerts")}
    assert opened <= stored

    health = gateway.healthz()
    simulator = health["drivers"]["simulator"]
    assert simulator["running"] is True
    assert simulator["actions"] >= len(stored)
    assert health["messages_rejected"] == {}

    # Presence resolutions carry their proof: a nurse's badge, in the room.
    proofs = gateway.query(
        "SELECT proof FROM alerts WHERE resolved_via = 'presence' LIMIT 5"
    )
    assert proofs
    assert all('"badge"' in row["proof"] for row in proofs)


def test_the_simulated_day_is_busier_at_morning_care_than_at_night():
    """The day profile the simulated ward calls by."""
    behaviour = Behaviour()
    night, morning = behaviour.busyness(3.0), behaviour.busyness(7.5)
    assert morning > 4 * night
    assert min(behaviour.busyness(h / 4) for h in range(96)) > 0


def test_speed_is_checked_where_the_site_file_says_it(tmp_path):
    """A speed of zero is refused with the field's place in the file."""
    config = simulated_ward("sim-check", speed=0)
    site = tmp_path / "site.yaml"
    site.write_text(yaml.safe_dump(config, sort_keys=False))

    with pytest.raises(ConfigError, match=r"simulator.*speed") as raised:
        load_config(site)
    assert "greater than 0" in str(raised.value)
