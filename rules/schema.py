"""The rule format: one pydantic schema, the single source of truth.

A technician writes rules in YAML; this module decides what is valid. The same
models export JSON Schema for editors and the web page (``rule_json_schema``).

Rule kinds: ``call`` (the default), ``count``, ``threshold``, ``feedback``,
``supervision`` and ``composite``. A call rule, as it appears in a site file::

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
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
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

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
TimeOfDay = Annotated[str, Field(pattern=r"^([01]\d|2[0-3]):[0-5]\d$|^24:00$")]


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

    groups: tuple[str, ...] = ()
    """Groups from the site file (e.g. a rapid-response team): their members."""

    zones: tuple[str, ...] = ()
    """Zones whose team on duty is told."""

    remind_every: Duration | None = None
    """Page this level again every so often while nobody answers."""

    @model_validator(mode="after")
    def _someone_is_told(self) -> Level:
        if not (self.roles or self.staff or self.groups or self.zones):
            raise ValueError(
                "a level must name at least one role, staff id, group or zone"
            )
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


class TimeWindow(StrictModel):
    """Days of the week and a time of day, in the site's time zone."""

    days: tuple[Weekday, ...] = WEEKDAYS
    start: TimeOfDay = "00:00"
    end: TimeOfDay = "24:00"
    """May be earlier than ``start`` for a window across midnight (a night shift)."""


class PresenceCheck(StrictModel):
    """A badge of one of these roles in the zone for ``dwell`` seconds."""

    roles: tuple[str, ...] = Field(min_length=1)
    dwell: Duration = 10.0


class RuleBase(StrictModel):
    """What every rule kind shares: its name, urgency and who is paged."""

    name: str = Field(min_length=1, pattern=r"^[a-z0-9][a-z0-9_-]*$")
    enabled: bool = True
    priority: Literal["routine", "urgent", "emergency", "code"] = "routine"
    devices: DeviceMatch = DeviceMatch()
    levels: tuple[Level, ...] = ()
    """Escalation tiers. A rule without levels is a condition only: it raises
    no alert of its own, but a composite rule can use it."""

    ack_timeout: Duration | None = None
    """Acknowledged but not resolved within this time: open again, page again."""

    active: tuple[TimeWindow, ...] = ()
    """When the rule may open alerts; always, when empty."""

    resolve_by_presence: PresenceCheck | None = None
    """Close the alert when a badge of these roles stays in its zone. Never
    applies to emergency and code calls."""

    @property
    def station_only(self) -> bool:
        return self.priority in STATION_ONLY

    @property
    def raises_alerts(self) -> bool:
        return bool(self.levels)

    @model_validator(mode="after")
    def _levels_in_order(self) -> RuleBase:
        if self.ack_timeout is not None and self.ack_timeout <= 0:
            raise ValueError("'ack_timeout' must be longer than 0s")
        if not self.levels:
            return self
        afters = [level.after for level in self.levels]
        if afters[0] != 0:
            raise ValueError(
                "the first level is paged when the alert opens, so its "
                f"'after' must be 0s, got {afters[0]:g}s"
            )
        if afters != sorted(afters) or len(set(afters)) != len(afters):
            raise ValueError(
                f"levels must have strictly increasing 'after' delays, got {afters}"
            )
        return self


class CallRule(RuleBase):
    """A call opens an alert at once; nobody answering escalates it.

    One alert per device: more presses while it is open are counted on it,
    not raised again.
    """

    kind: Literal["call"] = "call"
    opens_on: str = "call"
    """Event type that opens the alert."""

    cancels_on: str = "cancel"
    """Event type, from the same device, that resolves it at the station."""

    @model_validator(mode="after")
    def _calls_page_someone(self) -> CallRule:
        if not self.levels:
            raise ValueError("a call rule needs at least one level to page")
        return self


class CountRule(RuleBase):
    """N events of a kind in a zone open a gap (e.g. visits since the last clean).

    Counts since the last reset, or within a sliding ``within`` window. A
    ``resets_on`` event from the zone, or a verified service visit
    (``reset_by_visit``), resets the count and closes the gap.
    """

    kind: Literal["count"]
    counts: str = "visit"
    """Event type that is counted."""

    at_least: int = Field(ge=1)
    within: Duration | None = None
    resets_on: str | None = "cleaned"
    reset_by_visit: PresenceCheck | None = None


class ThresholdRule(RuleBase):
    """A reading beyond a limit for a while opens a gap; it clears with hysteresis.

    ``below: 15, clear_at: 25, for: 60s``: under 15 for a minute opens the
    gap, and only a reading of 25 or more clears it, so a level wavering
    around 15 does not flap.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    kind: Literal["threshold"]
    reading: str = Field(min_length=1)
    """Name of the reading, e.g. ``towel_level``."""

    below: float | None = None
    above: float | None = None
    clear_at: float | None = None
    """Where the gap clears; defaults to the limit itself (no hysteresis)."""

    lasting: Duration = Field(0.0, alias="for")
    """How long the reading must stay beyond the limit before the gap opens."""

    @model_validator(mode="after")
    def _one_limit(self) -> ThresholdRule:
        if (self.below is None) == (self.above is None):
            raise ValueError("give exactly one of 'below' or 'above'")
        if self.clear_at is not None:
            if self.below is not None and self.clear_at < self.below:
                raise ValueError(
                    f"'clear_at' ({self.clear_at}) must be at or above "
                    f"'below' ({self.below})"
                )
            if self.above is not None and self.clear_at > self.above:
                raise ValueError(
                    f"'clear_at' ({self.clear_at}) must be at or below "
                    f"'above' ({self.above})"
                )
        return self

    def breached(self, value: float) -> bool:
        if self.below is not None:
            return value < self.below
        return value > self.above  # type: ignore[operator]

    def cleared(self, value: float) -> bool:
        limit = self.clear_at
        if self.below is not None:
            return value >= (self.below if limit is None else limit)
        return value <= (self.above if limit is None else limit)  # type: ignore[operator]


class FeedbackRule(RuleBase):
    """Guests rate a zone with smiley buttons; too many unhappy presses open a gap.

    At least ``at_least`` presses within ``window``, of which a share of
    ``share`` or more are negative, open the gap. Presses from one device
    closer together than ``min_interval`` are ignored as misuse. A run of
    ``kudos_after`` positive presses in a row sends kudos to the zone's team.
    """

    kind: Literal["feedback"]
    presses: str = "feedback"
    """Event type of a press; its ``score`` field says which button."""

    negative: tuple[str, ...] = ("very_unhappy", "unhappy")
    positive: tuple[str, ...] = ("happy", "very_happy")
    window: Duration = 900.0
    at_least: int = Field(4, ge=1)
    share: float = Field(0.5, gt=0, le=1)
    min_interval: Duration = 3.0
    kudos_after: int | None = Field(None, ge=1)


class SupervisionRule(RuleBase):
    """A device silent for longer than its heartbeat raises a trouble alert."""

    kind: Literal["supervision"]
    heartbeat: Duration | None = Field(None, gt=0)
    """Longest silence allowed, heartbeat messages included. Leave it out for
    devices that are silent by nature, such as a call button on a GPIO pin:
    then only an ``offline`` report from their driver raises trouble."""


class CompositeRule(RuleBase):
    """A gap when several conditions hold at once in one zone.

    Each name in ``all`` is another rule (usually one without levels, kept
    as a condition); the gap opens when all of them hold in the same zone and
    clears when any stops holding.
    """

    kind: Literal["composite"]
    all: tuple[str, ...] = Field(min_length=2)


def _rule_kind(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("kind", "call"))
    return str(getattr(value, "kind", "call"))


Rule = Annotated[
    Annotated[CallRule, Tag("call")]
    | Annotated[CountRule, Tag("count")]
    | Annotated[ThresholdRule, Tag("threshold")]
    | Annotated[FeedbackRule, Tag("feedback")]
    | Annotated[SupervisionRule, Tag("supervision")]
    | Annotated[CompositeRule, Tag("composite")],
    Discriminator(
        _rule_kind,
        custom_error_type="unknown_rule_kind",
        custom_error_message=(
            "unknown rule kind; expected call, count, threshold, feedback, "
            "supervision or composite"
        ),
    ),
]
"""Every rule kind. A rule without ``kind`` is a call rule."""

RULE_KINDS: dict[str, type[RuleBase]] = {
    "call": CallRule,
    "count": CountRule,
    "threshold": ThresholdRule,
    "feedback": FeedbackRule,
    "supervision": SupervisionRule,
    "composite": CompositeRule,
}

_RULES = TypeAdapter(tuple[Rule, ...])


def parse_rules(data: Any) -> tuple[RuleBase, ...]:
    """Validate a list of rules (tests, replays); site files use GatewayConfig."""
    return _RULES.validate_python(data)


def rule_json_schema() -> dict[str, Any]:
    """JSON Schema of one rule, for editors and the web page."""
    return TypeAdapter(Rule).json_schema(by_alias=True)
