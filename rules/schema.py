"""The rule format: one pydantic schema, the single source of truth.

A technician writes rules in YAML; this module decides what is valid. The same
models export JSON Schema for editors and the web page (``rule_json_schema``).

A call rule, as it appears in a site file::

    - name: patient-call
      kind: call
      priority: routine
      devices: {kind: call_button}
      levels:
        - {after: 0s, roles: [nurse]}
        - {after: 90s, roles: [charge_nurse]}
        - {after: 4m, staff: [ward-manager]}

``after`` is counted from the moment the alert opened, so a level's due time
does not depend on when earlier levels fired, which keeps it exact across a
restart.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    model_validator,
)

PRIORITIES = ("routine", "urgent", "emergency", "code")
"""Lowest to highest; a higher priority is notified and shown first."""

PRIORITY_RANK = {name: rank for rank, name in enumerate(PRIORITIES)}

STATION_ONLY = frozenset({"emergency", "code"})
"""Priorities that only their own station can cancel: never a pager, a web
page or a badge walking past, because someone must be at the bedside."""

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: Any) -> float:
    """Read ``90``, ``90s``, ``1.5m`` or ``2h`` as seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 90s or 2m, not a boolean")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if match is None:
            raise ValueError(
                f"expected a duration such as 90s, 2m or 1h, got {value!r}"
            )
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if seconds < 0:
        raise ValueError(f"a duration cannot be negative, got {value!r}")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]


class StrictModel(BaseModel):
    """Unknown keys are errors: a typo must never silently disable a rule."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Level(StrictModel):
    """One escalation tier: when it starts and who is told."""

    after: Duration = 0.0
    """Seconds after the alert opened at which this level is notified."""

    roles: tuple[str, ...] = ()
    """Roles whose pagers are told, e.g. ``nurse``."""

    staff: tuple[str, ...] = ()
    """Named staff ids whose pagers are told."""

    remind_every: Duration | None = None
    """Page this level again every so often while nobody answers."""

    @model_validator(mode="after")
    def _someone_is_told(self) -> Level:
        if not self.roles and not self.staff:
            raise ValueError("a level must name at least one role or staff id")
        if self.remind_every is not None and self.remind_every <= 0:
            raise ValueError("'remind_every' must be longer than 0s")
        return self

    @property
    def targets(self) -> tuple[str, ...]:
        return self.roles + self.staff


class DeviceMatch(StrictModel):
    """Which devices a rule listens to; every given key must match."""

    kind: str | None = None
    ids: tuple[str, ...] = ()
    zones: tuple[str, ...] = ()


class CallRule(StrictModel):
    """A call opens an alert at once; nobody answering escalates it."""

    name: str = Field(min_length=1, pattern=r"^[a-z0-9][a-z0-9_-]*$")
    kind: Literal["call"] = "call"
    enabled: bool = True
    priority: Literal["routine", "urgent", "emergency", "code"] = "routine"
    devices: DeviceMatch = DeviceMatch()
    opens_on: str = "call"
    """Event type that opens the alert."""

    cancels_on: str = "cancel"
    """Event type, from the same device, that resolves it at the station."""

    levels: tuple[Level, ...] = Field(min_length=1)

    ack_timeout: Duration | None = None
    """Acknowledged but not resolved within this time: open again, page again."""

    @property
    def station_only(self) -> bool:
        return self.priority in STATION_ONLY

    @model_validator(mode="after")
    def _levels_in_order(self) -> CallRule:
        afters = [level.after for level in self.levels]
        if afters[0] != 0:
            raise ValueError(
                "the first level is paged when the alert opens, so its "
                f"'after' must be 0s, got {afters[0]:g}s"
            )
        if self.ack_timeout is not None and self.ack_timeout <= 0:
            raise ValueError("'ack_timeout' must be longer than 0s")
        if afters != sorted(afters) or len(set(afters)) != len(afters):
            raise ValueError(
                f"levels must have strictly increasing 'after' delays, got {afters}"
            )
        return self


Rule = CallRule
"""Every rule kind; more kinds (counting, thresholds, feedback) join this union."""


def rule_json_schema() -> dict[str, Any]:
    """JSON Schema of one rule, for editors and the web page."""
    return CallRule.model_json_schema()
