"""A stalled event loop in a real gateway process stops its watchdog pings.

systemd is not PID 1 here, so the test stands in for it as
``tests/test_systemd.py`` does: it binds the notification socket, names it
in ``$NOTIFY_SOCKET`` with a 1 s ``$WATCHDOG_USEC``, and starts ``main.py
run``. The stall comes from the gateway's test hook
(``GATEWAY_TEST_STALL_SECONDS``): SIGUSR2 blocks its event loop while
paho's and the sender's threads keep running, as a hung driver callback
would. Exercised: the real process, the real notify protocol, pings
stopping and the late loop reported after. Not exercised: systemd itself
killing the process on the missed deadline (its SIGABRT and the stacks it
leaves are tested in ``tests/test_systemd.py``).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import MAIN, ROOT, STARTUP, GatewayProcess, site_config, write_site
from tests.test_systemd import NotifyListener, pings

pytestmark = pytest.mark.timeout(120)

WATCHDOG = 1.0
STALL = 3.0


def test_a_stalled_loop_stops_the_pings_within_half_an_interval(
    broker, tmp_path, topics, figures, request
):
    listener = NotifyListener(str(tmp_path / "notify"))
    request.addfinalizer(listener.close)
    site = write_site(tmp_path / "site.yaml", site_config(topics.site))
    gateway = GatewayProcess(site, broker, tmp_path, topics)
    env = gateway.environ()
    env.update(
        NOTIFY_SOCKET=listener.address,
        WATCHDOG_USEC=str(int(WATCHDOG * 1_000_000)),
        GATEWAY_TEST_STALL_SECONDS=str(STALL),
    )
    with gateway.log_path.open("ab") as log:
        gateway.process = subprocess.Popen(
            [sys.executable, str(MAIN), "run", "--config", str(site)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    request.addfinalizer(gateway.stop)
    listener.wait_for(lambda d: d.has("READY", "1"), STARTUP, what="READY=1")
    mark = listener.mark()
    listener.wait_for(lambda d: len(pings(listener.datagrams[mark:])) >= 3, 10)

    stalled = time.monotonic()
    gateway.process.send_signal(signal.SIGUSR2)
    late = listener.wait_for(
        lambda d: "event loop late" in d.fields.get("STATUS", ""),
        STALL + 10,
        what="a status naming the late loop",
    )
    resumed = listener.wait_for(
        lambda d: d.has("WATCHDOG") and d.at > late.at, 10, what="pings again"
    )

    times = [d.at for d in pings(listener.datagrams)]
    before = [at for at in times if at < stalled + WATCHDOG / 2]
    silent = [at for at in times if stalled + WATCHDOG / 2 <= at < late.at]
    gap = min(at for at in times if at > stalled) - max(before)
    figures.update(
        watchdog_s=WATCHDOG,
        stall_s=STALL,
        last_ping_after_stall_s=round(max(0.0, max(before) - stalled), 3),
        ping_gap_s=round(gap, 2),
        late_status_after_s=round(late.at - stalled, 2),
    )
    assert silent == [], "pings went on more than half an interval into the stall"
    # systemd kills a service whose pings stop for WatchdogSec: this one would be.
    assert gap > WATCHDOG
    assert resumed.at > late.at
    assert gateway.running
