"""Life under systemd: the unit file, readiness, the watchdog, stopping.

systemd is not PID 1 here (nor in CI), so no test starts the unit for real.
What stands in for the service manager is its notification socket: a Unix
datagram socket the test binds and names in $NOTIFY_SOCKET, exactly what
systemd hands a ``Type=notify`` service. The gateway behind it is real: a
subprocess (``main.py run``) or, where the test must stall the gateway's
own event loop, the gateway in this process, against a real Mosquitto.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from gateway.broker import PrivateBroker, free_port
from gateway.config import load_config
from gateway.service import Gateway
from gateway.systemd import Notifier, Supervisor, watchdog_interval
from tests.helpers import (
    MAIN,
    ROOT,
    STARTUP,
    WAIT,
    GatewayProcess,
    SiteTopics,
    site_config,
    wait_until,
    write_site,
)

UNIT = ROOT / "systemd" / "facility-gateway.service"
INSTALL_ROOT = "/opt/facility-gateway"
SECURITY_LIMIT = 2.5


# -- the unit file -----------------------------------------------------------------


def systemd_analyze(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("systemd-analyze")
    assert binary, (
        "systemd-analyze is missing: install Debian's 'systemd' package "
        "(./run.sh test does)"
    )
    return subprocess.run(
        [binary, *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_unit_passes_systemd_analyze_verify():
    result = systemd_analyze("verify", str(UNIT))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert UNIT.name not in output, output


def test_unit_security_exposure_is_at_most_2_5():
    result = systemd_analyze("security", "--offline=true", "--no-pager", str(UNIT))
    output = result.stdout + result.stderr
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", output)
    assert found, output
    assert float(found.group(1)) <= SECURITY_LIMIT, output


def test_unit_command_runs_the_gateway_of_an_install():
    """The paths in ExecStart name files an install has.

    ``verify`` only checks that the first word (/usr/bin/env) is executable;
    the interpreter and main.py behind it are checked here, with this
    checkout standing in for /opt/facility-gateway.
    """
    text = UNIT.read_text()
    line = next(x for x in text.splitlines() if x.startswith("ExecStart="))
    words = line.removeprefix("ExecStart=").replace(INSTALL_ROOT, str(ROOT)).split()
    assert words[0] == "/usr/bin/env"
    assert words[1] == "GATEWAY_DATABASE__PATH=${STATE_DIRECTORY}/gateway.db"
    python, main = Path(words[2]), Path(words[3])
    assert python == ROOT / ".venv" / "bin" / "python"
    assert os.access(python, os.X_OK), python
    assert main == MAIN
    assert words[4:] == ["run", "--config", "${CONFIGURATION_DIRECTORY}/site.yaml"]


def test_unit_is_supervised_and_never_gives_up():
    settings = unit_settings()
    assert settings["Type"] == ["notify"]
    assert settings["NotifyAccess"] == ["main"]
    assert float(settings["WatchdogSec"][0]) >= 20  # twice the reconnect cap
    assert settings["Restart"] == ["always"]
    assert settings["StartLimitIntervalSec"] == ["0"]
    assert settings["StateDirectory"] == ["facility-gateway"]
    assert settings["ConfigurationDirectory"] == ["facility-gateway"]
    assert settings["User"] == ["facility-gateway"]
    assert settings["StandardError"] == ["journal"]
    assert "AF_BLUETOOTH" not in settings["RestrictAddressFamilies"][0]
    assert settings["DevicePolicy"] == ["closed"]
    assert sorted(settings["DeviceAllow"]) == [
        "char-gpiochip rw",
        "char-ttyACM rw",
        "char-ttyUSB rw",
    ]


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


# -- sd_notify ---------------------------------------------------------------------


@dataclass(frozen=True)
class Datagram:
    at: float
    fields: dict[str, str]

    def __getitem__(self, key: str) -> str:
        return self.fields[key]

    def has(self, key: str, value: str | None = None) -> bool:
        return key in self.fields and (value is None or self.fields[key] == value)


class NotifyListener:
    """systemd's side of $NOTIFY_SOCKET: records every datagram with its time."""

    def __init__(self, address: str) -> None:
        self.address = address
        bind_to = "\0" + address[1:] if address.startswith("@") else address
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(bind_to)
        self._sock.settimeout(0.1)
        self._cond = threading.Condition()
        self._datagrams: list[Datagram] = []
        self._closing = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._closing:
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            at = time.monotonic()
            lines = data.decode().split("\n")
            fields = dict(line.split("=", 1) for line in lines if "=" in line)
            with self._cond:
                self._datagrams.append(Datagram(at, fields))
                self._cond.notify_all()

    @property
    def datagrams(self) -> list[Datagram]:
        with self._cond:
            return list(self._datagrams)

    def mark(self) -> int:
        with self._cond:
            return len(self._datagrams)

    def wait_for(
        self,
        predicate: Callable[[Datagram], bool],
        timeout: float = WAIT,
        *,
        after: int = 0,
        what: str = "a datagram",
    ) -> Datagram:
        def found() -> Datagram | None:
            return next((d for d in self._datagrams[after:] if predicate(d)), None)

        with self._cond:
            if self._cond.wait_for(lambda: found() is not None, timeout):
                return found()  # type: ignore[return-value]
            seen = [d.fields for d in self._datagrams[after:]]
        raise AssertionError(f"no {what} within {timeout}s; got {seen}")

    def close(self) -> None:
        self._closing = True
        self._thread.join(timeout=2)
        self._sock.close()


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[NotifyListener]:
    found = NotifyListener(str(tmp_path / "notify"))
    yield found
    found.close()


def pings(datagrams: list[Datagram]) -> list[Datagram]:
    return [d for d in datagrams if d.has("WATCHDOG", "1")]


def test_notifier_reaches_an_abstract_socket():
    address = f"@facility-gateway-test-{os.getpid()}-{time.monotonic_ns()}"
    listener = NotifyListener(address)
    notifier = Notifier(address)
    try:
        assert notifier.send("READY=1", "STATUS=up")
        got = listener.wait_for(lambda d: d.has("READY"), what="READY=1")
        assert got.fields == {"READY": "1", "STATUS": "up"}
    finally:
        notifier.close()
        listener.close()


def test_notifier_takes_the_socket_from_the_environment(listener):
    environ = {"NOTIFY_SOCKET": listener.address, "PATH": "/usr/bin"}
    notifier = Notifier.from_environ(environ)
    try:
        # Removed, so a child process cannot notify in the gateway's name.
        assert environ == {"PATH": "/usr/bin"}
        assert notifier.send("STATUS=hello")
        listener.wait_for(lambda d: d.has("STATUS", "hello"), what="the status")
    finally:
        notifier.close()


def test_notifier_outside_systemd_sends_nothing():
    notifier = Notifier.from_environ({})
    assert not notifier.enabled
    assert not notifier.send("READY=1")


def test_notifier_survives_a_vanished_socket(tmp_path):
    notifier = Notifier(str(tmp_path / "gone"))
    assert not notifier.send("WATCHDOG=1")
    notifier.close()


def test_watchdog_interval_is_read_for_this_process_only():
    mine = {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}
    assert watchdog_interval(mine) == 30.0
    assert mine == {}
    assert watchdog_interval({"WATCHDOG_USEC": "1500000"}) == 1.5
    assert watchdog_interval({"WATCHDOG_USEC": "1", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None
    assert watchdog_interval({}) is None


# -- the gateway as a subprocess -----------------------------------------------------

WATCHDOG = 1.0
"""Seconds of WatchdogSec in these tests: pings every 0.5 s, broker grace 2 s."""


def start_notified_gateway(
    broker: PrivateBroker, folder: Path, topics: SiteTopics, listener: NotifyListener
) -> GatewayProcess:
    """``main.py run`` with $NOTIFY_SOCKET and $WATCHDOG_USEC, not waiting for it."""
    site_file = write_site(folder / "site.yaml", site_config(topics.site))
    gateway = GatewayProcess(site_file, broker, folder, topics)
    env = gateway.environ()
    env.update(
        NOTIFY_SOCKET=listener.address, WATCHDOG_USEC=str(int(WATCHDOG * 1_000_000))
    )
    with gateway.log_path.open("ab") as log:
        gateway.process = subprocess.Popen(
            [sys.executable, str(MAIN), "run", "--config", str(site_file)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return gateway


def test_ready_waits_for_the_broker_and_pings_stop_while_it_is_gone(
    broker, tmp_path, topics, listener, request
):
    """READY=1 only once the broker link is up; no pings once it stays down."""
    broker.stop()
    gateway = start_notified_gateway(broker, tmp_path, topics, listener)
    request.addfinalizer(gateway.stop)

    # Up, healthy, and asking systemd for more start time: but not ready.
    waiting = listener.wait_for(
        lambda d: "waiting for the MQTT broker" in d.fields.get("STATUS", ""),
        STARTUP,
        what="a status waiting for the broker",
    )
    listener.wait_for(lambda d: d.has("EXTEND_TIMEOUT_USEC"), what="EXTEND_TIMEOUT")
    time.sleep(4 * WATCHDOG)  # several turns of the supervisor, still no broker
    assert not any(d.has("READY") for d in listener.datagrams)
    assert not pings(listener.datagrams)

    broker_started = time.monotonic()
    broker.start()
    ready = listener.wait_for(lambda d: d.has("READY", "1"), STARTUP, what="READY=1")
    assert waiting.at < broker_started < ready.at
    assert ready["STATUS"].startswith("Running: broker connected")
    # READY promises the web page listens: one request, no retries.
    health = httpx.get(f"http://127.0.0.1:{gateway.web_port}/healthz", timeout=WAIT)
    assert health.status_code == 200
    assert health.json()["broker_connected"] is True

    # Pings every half interval while healthy.
    mark = listener.mark()
    listener.wait_for(lambda d: d.has("WATCHDOG"), after=mark, what="a ping")
    time.sleep(3 * WATCHDOG)
    assert len(pings(listener.datagrams[mark:])) >= 3

    # Broker gone: pings go on through the grace period (reconnecting), then
    # stop, and the status says why.
    mark = listener.mark()
    broker.stop()
    listener.wait_for(
        lambda d: d.has("WATCHDOG") and "broker reconnecting" in d["STATUS"],
        after=mark,
        what="a ping while reconnecting within the grace period",
    )
    unhealthy = listener.wait_for(
        lambda d: "unreachable for more than 2 s" in d.fields.get("STATUS", ""),
        after=mark,
        what="an unhealthy status",
    )
    time.sleep(3 * WATCHDOG)  # systemd would have restarted it by now
    after = [d for d in listener.datagrams if d.at >= unhealthy.at]
    assert not pings(after), [d.fields for d in after]

    # Broker back: pings again.
    mark = listener.mark()
    broker.start()
    back = listener.wait_for(
        lambda d: d.has("WATCHDOG"), STARTUP, after=mark, what="pings again"
    )
    assert "broker connected" in back["STATUS"]

    gateway.stop()
    assert gateway.process is not None
    assert gateway.process.returncode == 0
    stopping = listener.wait_for(lambda d: d.has("STOPPING", "1"), what="STOPPING=1")
    assert stopping.at > back.at


def test_a_watchdog_kill_leaves_every_thread_stack_in_the_log(start_gateway):
    """systemd ends a gateway that missed its pings with SIGABRT."""
    gateway = start_gateway()
    assert gateway.process is not None
    gateway.process.send_signal(signal.SIGABRT)
    gateway.process.wait(timeout=WAIT)
    log = gateway.log()
    assert gateway.process.returncode == -signal.SIGABRT
    assert "Fatal Python error: Aborted" in log
    assert "Thread 0x" in log
    assert "_process_forever" in log or "run_until_complete" in log


# -- the gateway in this process, so the test can stall its loop ---------------------


@dataclass
class Watched:
    gateway: Gateway
    supervisor: Supervisor
    loop: asyncio.AbstractEventLoop
    db_path: Path


@pytest.fixture
def watched(
    broker: PrivateBroker, tmp_path: Path, topics: SiteTopics, listener
) -> Iterator[Watched]:
    """The gateway and its supervisor on a loop of their own, web page off."""
    environ = {
        "GATEWAY_MQTT__PORT": str(broker.port),
        "GATEWAY_MQTT__USERNAME": "gateway",
        "GATEWAY_MQTT__PASSWORD": broker.passwords["gateway"],
        "GATEWAY_DATABASE__PATH": str(tmp_path / "gw.db"),
        "GATEWAY_WEB__ENABLED": "false",
        "GATEWAY_WEB__PORT": str(free_port()),
    }
    site_file = write_site(tmp_path / "site.yaml", site_config(topics.site))
    config = load_config(site_file, environ)
    gateway = Gateway(config)
    notifier = Notifier(listener.address)
    supervisor = Supervisor(gateway, notifier=notifier, watchdog=WATCHDOG)
    loop = asyncio.new_event_loop()

    async def run() -> None:
        watcher = asyncio.create_task(supervisor.run())
        await gateway.run()
        watcher.cancel()

    runner = threading.Thread(target=loop.run_until_complete, args=(run(),))
    runner.start()
    listener.wait_for(lambda d: d.has("READY"), STARTUP, what="READY=1")
    yield Watched(gateway, supervisor, loop, tmp_path / "gw.db")

    loop.call_soon_threadsafe(gateway.stop)
    runner.join(timeout=10)
    loop.close()
    notifier.close()


def test_a_stalled_event_loop_sends_no_pings(watched, listener):
    """A loop blocked for longer than WatchdogSec says nothing, then reports lag.

    The stall is a blocking call on the loop, as a hung driver callback or a
    runaway computation would be; systemd would kill the gateway during it.
    """
    listener.wait_for(lambda d: d.has("WATCHDOG"), what="a first ping")
    stall: dict[str, float] = {}

    def block_the_loop() -> None:
        stall["from"] = time.monotonic()
        time.sleep(2.5 * WATCHDOG)
        stall["to"] = time.monotonic()

    watched.loop.call_soon_threadsafe(block_the_loop)
    wait_until(lambda: "to" in stall, what="the stall to end")

    during = [d for d in listener.datagrams if stall["from"] < d.at < stall["to"]]
    assert during == []
    late = listener.wait_for(
        lambda d: "event loop late" in d.fields.get("STATUS", ""),
        what="a status naming the late loop",
    )
    assert late.at > stall["to"]
    assert not late.has("WATCHDOG")
    # The first turn after the stall measured it; pings resume once prompt.
    listener.wait_for(
        lambda d: d.has("WATCHDOG") and d.at > late.at, what="pings after the stall"
    )


def test_a_database_that_takes_no_write_stops_the_pings(watched, listener):
    """Another process holding the write lock makes the probe fail: no pings."""
    listener.wait_for(lambda d: d.has("WATCHDOG"), what="a first ping")
    holder = sqlite3.connect(watched.db_path, timeout=WAIT, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        unhealthy = listener.wait_for(
            lambda d: "database not writable" in d.fields.get("STATUS", ""),
            timeout=3 * WAIT,
            what="a status naming the database",
        )
        assert "locked" in unhealthy["STATUS"]
        time.sleep(2 * WATCHDOG)
        held = [d for d in listener.datagrams if d.at >= unhealthy.at]
        assert not pings(held), [d.fields for d in held]
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    released = time.monotonic()
    listener.wait_for(
        lambda d: d.has("WATCHDOG") and d.at > released,
        timeout=3 * WAIT,
        what="pings once the lock is gone",
    )
