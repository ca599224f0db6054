"""A restroom sensor hub on a serial port, through the whole gateway.

The gateway subprocess opens the slave side of a real pseudo-terminal; the
test is the hub, writing frames on the master side.
"""

from __future__ import annotations

import os
import pty
from collections.abc import Iterator

import pytest

from drivers.serial_hub import encode_frame
from tests.helpers import site_config


@pytest.fixture
def hub_port() -> Iterator[tuple[int, str]]:
    master, slave = pty.openpty()
    yield master, os.ttyname(slave)
    os.close(master)
    os.close(slave)


def test_people_counter_frames_open_a_restroom_gap(
    start_gateway, mqtt, topics, hub_port
):
    """Three counted visits over serial open the count rule's gap; noise is refused."""
    master, path = hub_port
    site = site_config(topics.site)
    site["zones"].append({"id": "restroom", "rooms": [{"id": "wc-1"}]})
    site["devices"].append({"id": "door-1", "kind": "people_counter", "room": "wc-1"})
    site["rules"].append(
        {
            "name": "visits",
            "kind": "count",
            "devices": {"kind": "people_counter"},
            "at_least": 3,
            "levels": [{"after": "0s", "roles": ["nurse"]}],
        }
    )
    site["serial_hubs"] = [{"port": path, "hubs": {"wc1": {"channels": {1: "door-1"}}}}]
    gateway = start_gateway(site=site)
    display = mqtt(topics.alerts)

    os.write(master, b"$HUB,1,wc1,1,CNT,ch=1*0000\r\n")  # wrong checksum
    os.write(master, encode_frame("wc1", 2, "CNT", ch=1, n=2))
    os.write(master, encode_frame("wc1", 3, "CNT", ch=1))

    opened = display.wait_for_json(rule="visits", state="open", timeout=10)
    assert opened["detail"] == {"count": 3}
    hub = gateway.healthz()["drivers"]
    port = next(health for name, health in hub.items() if name.startswith("serial"))
    assert port["connected"] is True
    rejected = {reason: n for reason, n in port["rejects"].items() if n}
    assert rejected == {"bad_checksum": 1}
