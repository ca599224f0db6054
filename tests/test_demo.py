"""`main.py demo`: the real gateway on a simulated ward, on a private broker."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from gateway.broker import free_port, port_answers
from tests.helpers import MAIN, ROOT

DEMO_SECONDS = 6
"""Long enough that a call is certain: the simulated ward presses its first
button 1 to 2 s after it connects (drivers/simulator.py, SimulatedWard.run)."""


def test_demo_starts_its_own_broker_and_shows_a_call():
    """With no broker at the configured port, the demo brings one and pages."""
    nothing_there = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(
        GATEWAY_MQTT__PORT=str(nothing_there), GATEWAY_WEB__PORT=str(free_port())
    )
    result = subprocess.run(
        [sys.executable, str(MAIN), "demo", "--duration", str(DEMO_SECONDS)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=DEMO_SECONDS + 60,
    )
    log = result.stderr

    assert result.returncode == 0, log
    assert f"No broker answers at 127.0.0.1:{nothing_there}" in log
    [private] = re.findall(r"Started private Mosquitto on 127\.0\.0\.1:(\d+)", log)
    assert re.search(r"^\S+ INFO\s+gateway\.alerts\s+OPENED\s", log, re.MULTILINE), log
    assert "Gateway stopped" in log
    assert not port_answers("127.0.0.1", int(private)), "private broker left running"
