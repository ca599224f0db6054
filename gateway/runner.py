"""Running the gateway as a process: signals, the web server, clean shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Coroutine
from typing import Any

from gateway import web
from gateway.service import Gateway
from gateway.systemd import Notifier, Supervisor, watchdog_interval

log = logging.getLogger(__name__)

STALL_ENV = "GATEWAY_TEST_STALL_SECONDS"
"""Test hook, off unless set: SIGUSR2 then blocks the event loop this long,
as a hung driver callback would, so the fault battery can watch the
watchdog pings stop in a real process (tests/faults/test_watchdog_stall.py)."""


async def run_gateway(gateway: Gateway, *companions: Coroutine[Any, Any, None]) -> None:
    """Run the gateway, its web page and any companions until SIGINT/SIGTERM.

    Companions (the demo's simulated ward) are cancelled before the gateway
    stops, so nothing publishes into a closing gateway.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    _stall_on_request(loop)

    core = asyncio.create_task(gateway.run(), name="gateway")
    others = [asyncio.create_task(c, name="companion") for c in companions]
    # The web page runs beside the gateway but never decides its end: if it
    # cannot start, alerts and pages carry on without it.
    site = None
    page = None
    settings = gateway.config.web
    if settings.enabled:
        site = web.WebServer(gateway, settings.host, settings.port)
        page = asyncio.create_task(site.serve(), name="web")
    # Tells systemd when all of the above is up, and feeds its watchdog only
    # while the gateway is healthy; measures the loop's lag either way.
    notifier = Notifier.from_environ()
    supervisor = Supervisor(
        gateway, site, page, notifier=notifier, watchdog=watchdog_interval()
    )
    watcher = asyncio.create_task(supervisor.run(), name="supervisor")

    stopper = asyncio.create_task(stop.wait(), name="stop")
    done, _ = await asyncio.wait(
        [core, stopper, watcher, *others], return_when=asyncio.FIRST_COMPLETED
    )
    if stopper in done:
        log.info("Stopping on signal")
    supervisor.stopping()
    if not watcher.done():
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher

    # Companions first, so nothing publishes into a closing gateway; then the
    # web server, which finishes its requests; then the gateway itself.
    for task in others:
        task.cancel()
    for task in others:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    if site is not None and page is not None:
        site.shutdown()
        await page
    gateway.stop()
    await core
    stopper.cancel()
    notifier.close()

    failed = [
        task
        for task in done
        if task is not stopper and not task.cancelled() and task.exception()
    ]
    if failed:
        raise failed[0].exception()  # type: ignore[misc]


def _stall_on_request(loop: asyncio.AbstractEventLoop) -> None:
    seconds = os.environ.get(STALL_ENV)
    if not seconds:
        return
    log.warning(
        "Test hook on: SIGUSR2 blocks the event loop for %s s (%s is set); "
        "never set it on a site",
        seconds,
        STALL_ENV,
    )
    loop.add_signal_handler(signal.SIGUSR2, time.sleep, float(seconds))
