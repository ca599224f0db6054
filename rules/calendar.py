"""Time windows: when a rule is active and when a person is on duty.

Windows are written in the site's local time (``mon``-``fri``, ``07:00`` to
``19:00``). A window whose end is earlier than its start runs across midnight
and belongs to the day it starts on, so a Friday night shift ``22:00``-``06:00``
still covers Saturday 03:00.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, tzinfo

from rules.schema import WEEKDAYS, TimeWindow


def _minutes(text: str) -> int:
    hours, minutes = text.split(":")
    return int(hours) * 60 + int(minutes)


def in_windows(windows: Iterable[TimeWindow], when: float, tz: tzinfo) -> bool:
    """True if ``when`` (Unix seconds) falls in any window; no windows: always."""
    windows = tuple(windows)
    if not windows:
        return True
    local = datetime.fromtimestamp(when, tz)
    minute = local.hour * 60 + local.minute
    today = WEEKDAYS[local.weekday()]
    yesterday = WEEKDAYS[(local.weekday() - 1) % 7]
    for window in windows:
        start, end = _minutes(window.start), _minutes(window.end)
        if start <= end:
            if today in window.days and start <= minute < end:
                return True
        elif (today in window.days and minute >= start) or (
            yesterday in window.days and minute < end
        ):
            return True
    return False
