"""The gateway's own health: broker link, outbox, disk, clock, loop lag, uptime.

Shown on the devices page and in ``/healthz``. Counts and times only, no
person or device: ``/healthz`` is open to anyone who can reach the page.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import logging
import math
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.service import Gateway

log = logging.getLogger(__name__)

LOW_DISK = 200 * 1024 * 1024
"""Free bytes below which the disk is reported ``low``: a day of a busy
ward's events and outbox is a few MB, so this leaves weeks to react."""

MAX_ERROR_US = 16_000_000
"""The kernel's estimated clock error (µs) above which the clock is not
synchronised, the limit systemd's ``timedatectl`` (NTPSynchronized) uses."""

STA_UNSYNC = 0x0040
"""``status`` bit of struct timex: the clock is not synchronised."""

TIME_ERROR = 5
"""adjtimex's answer when the clock is not synchronised."""

TIMESYNCD_FLAG = Path("/run/systemd/timesync/synchronized")
"""Touched by systemd-timesyncd once it has synchronised the clock."""


def gateway_health(gateway: Gateway, now: float) -> dict[str, Any]:
    """Everything the devices page shows about the gateway itself."""
    link = gateway.link
    return {
        "now": now,
        "broker": {
            "connected": link.connected,
            "since": link.changed_at,
            "connects": link.connects,
        },
        "upstream": outbox(gateway.sender.status()),
        "disk": disk(Path(gateway.store.path)),
        "clock": clock(now),
        "loop_lag_seconds": loop_lag(gateway),
        "uptime_seconds": round(now - gateway.started_at, 1),
        "host_uptime_seconds": host_uptime(),
    }


def outbox(status: dict[str, Any]) -> dict[str, Any]:
    """The upstream outbox: depth, oldest record, last success and error."""
    keys = (
        "upstream", "running", "depth", "oldest_undelivered_age", "last_success_at",
        "last_error", "last_error_at", "consecutive_failures", "dead_lettered",
        "dropped",
    )  # fmt: skip
    return {key: status.get(key) for key in keys}


def disk(database: Path) -> dict[str, Any]:
    """Free space of the database's file system, and the database's own size."""
    size = 0
    for suffix in ("", "-wal", "-shm"):
        try:
            size += os.stat(f"{database}{suffix}").st_size
        except FileNotFoundError:
            continue
    usage = shutil.disk_usage(database.parent)
    return {
        "path": str(database.parent),
        "free_bytes": usage.free,
        "total_bytes": usage.total,
        "database_bytes": size,
        "low": usage.free < LOW_DISK,
    }


def loop_lag(gateway: Gateway) -> float | None:
    """How late the event loop's last supervision turn ran; None until measured."""
    [family] = gateway.metrics.loop_lag.collect()
    value = family.samples[0].value
    return None if math.isnan(value) else round(value, 4)


def host_uptime() -> float | None:
    try:
        return float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


# -- is the clock synchronised? ------------------------------------------------------


class _Timex(ctypes.Structure):
    """struct timex of <sys/timex.h>, as glibc's adjtimex() takes it."""

    _fields_ = [  # noqa: RUF012 - the ctypes API
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("constant", ctypes.c_long),
        ("precision", ctypes.c_long),
        ("tolerance", ctypes.c_long),
        ("time_sec", ctypes.c_long),
        ("time_usec", ctypes.c_long),
        ("tick", ctypes.c_long),
        ("ppsfreq", ctypes.c_long),
        ("jitter", ctypes.c_long),
        ("shift", ctypes.c_int),
        ("stable", ctypes.c_long),
        ("jitcnt", ctypes.c_long),
        ("calcnt", ctypes.c_long),
        ("errcnt", ctypes.c_long),
        ("stbcnt", ctypes.c_long),
        ("tai", ctypes.c_int),
        # Eleven reserved ints, and room to spare in case a libc's is larger.
        ("reserved", ctypes.c_int * 32),
    ]


def clock(now: float) -> dict[str, Any]:
    """The system time and whether the kernel says it is synchronised.

    It asks the kernel (adjtimex with no change, the call ``timedatectl``'s
    NTPSynchronized rests on): synchronised when an NTP client (timesyncd,
    chrony, ntpd) has cleared STA_UNSYNC and the estimated error is under
    16 s. Where the call is not allowed (the shipped unit filters the
    @clock system calls), it falls back to the flag file systemd-timesyncd
    touches; with neither, it says it cannot tell rather than guess.
    """
    found = _kernel_clock()
    if found is not None:
        return {"time": now, **found}
    if TIMESYNCD_FLAG.exists():
        return {"time": now, "synchronised": True, "method": "timesyncd flag file"}
    return {
        "time": now,
        "synchronised": None,
        "method": "unknown: adjtimex not allowed here and no timesyncd flag file",
    }


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


def _kernel_clock() -> dict[str, Any] | None:
    libc = _libc()
    if libc is None:
        return None
    timex = _Timex()  # modes 0: read only
    state = libc.adjtimex(ctypes.byref(timex))
    if state < 0:
        code = ctypes.get_errno()
        if code not in (errno.EPERM, errno.ENOSYS, errno.EACCES):
            log.warning("adjtimex failed: %s", os.strerror(code))
        return None
    synchronised = (
        state != TIME_ERROR
        and not timex.status & STA_UNSYNC
        and timex.maxerror < MAX_ERROR_US
    )
    return {
        "synchronised": synchronised,
        "method": "kernel (adjtimex)",
        "max_error_seconds": round(timex.maxerror / 1e6, 3),
    }
