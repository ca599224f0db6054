"""The rule engine: pure, clock-injected, free of I/O.

Nothing here imports ``gateway`` or ``drivers``; feed it events and time and it
returns the alert changes to persist and publish.
"""

from rules.alerts import Alert, AlertState, Change, Notification
from rules.engine import Engine, EngineError, UnknownAlert, UnknownDevice
from rules.events import Event
from rules.schema import CallRule, Level, Rule
from rules.site import Site

__all__ = [
    "Alert",
    "AlertState",
    "CallRule",
    "Change",
    "Engine",
    "EngineError",
    "Event",
    "Level",
    "Notification",
    "Rule",
    "Site",
    "UnknownAlert",
    "UnknownDevice",
]
