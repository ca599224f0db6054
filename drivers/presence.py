"""Where each badge is: BLE sightings in, ``enter`` and ``leave`` events out.

Sightings come from two kinds of receiver: the gateway's own adapter
(:mod:`drivers.ble`) and ESP32 receivers in rooms, which publish over MQTT.
Each sighting is a badge heard by a receiver at some signal strength; the
:class:`PresenceEstimator` decides from them which place (a room or zone id
of the site file) each badge is in, and says so with ``enter`` and ``leave``
events for the rule engine. It is pure: no threads, no clock of its own (time
comes with each sighting and with :meth:`PresenceEstimator.tick`), so a
recorded trace replays to the same events every time. :class:`PresenceTracker`
is the driver around it: a lock, a ticker thread and the MQTT payload.

Badge ids
---------
A badge is known by what it broadcasts, never by its MAC address (phones and
many badges rotate it). The canonical forms, lower case::

    ibeacon:<uuid, 8-4-4-4-12 hex>:<major 0-65535>:<minor 0-65535>
        ibeacon:f7826da6-4fa2-4e98-8024-bc5b71e0893e:100:7
    eddystone:<namespace, 20 hex>:<instance, 12 hex>
        eddystone:edd1ebeac04e5defa017:0123456789ab

:func:`canonical_badge_id` reads looser spellings (upper case, a UUID without
dashes) and returns this form; site files and receivers should use it as is.

MQTT sightings
--------------
An ESP32 receiver publishes each badge it hears, QoS 0 or 1, never retained,
to ``facility/<site>/devices/<receiver_id>/sightings``::

    {"badge": "ibeacon:f7826da6-4fa2-4e98-8024-bc5b71e0893e:100:7",
     "rssi": -67, "ts": 1767225600.25}

``badge`` and ``rssi`` (dBm) are required; ``ts`` (Unix seconds) is optional
and only used to drop sightings older than ``max_age``, such as a broker's
backlog after a reconnect. The receiver is the topic's device id; other keys
are ignored. The gateway's clock, not the receiver's, times the sighting, so
one receiver's drifting clock cannot reorder another's.

How a badge moves
-----------------
Per (badge, receiver) the signal is smoothed (an exponential moving average,
restarted when the receiver has not heard the badge for ``fresh_for``), a
receiver's ``rssi_offset`` is added, and readings under ``rssi_floor`` are
dropped. A place is as strong as its strongest fresh receiver. Then::

                best place at >= enter_rssi for dwell
      nowhere ─────────────────────────────────────────► in place P
         ▲                                                 │    │
         │ P not heard at >= leave_rssi for away_timeout   │    │ Q at >= enter_rssi
         ├──────────────── leave P (away) ─────────────────┤    │ beats P by
         │ two places at >= conflict_rssi at once          │    │ switch_margin for
         └──────────────── leave P (conflict) ─────────────┘    │ dwell: leave P
                                                                ▼ (moved), enter Q
                                                           in place Q

Entering needs a stronger signal than staying (``enter_rssi`` above
``leave_rssi``), and a neighbouring room must beat the current one by
``switch_margin`` for the whole ``dwell``, so a badge in a doorway, heard
about equally by two rooms, stays where it first settled.

Spoofing: iBeacon and Eddystone-UID ids are broadcast in clear and can be
cloned. A badge heard at ``conflict_rssi`` (about a metre from a receiver) in
two places within ``conflict_window`` is in conflict: it leaves its place
(reason ``conflict``) and enters nowhere until only one place hears it that
strongly, counted in ``health()["conflicts"]`` and logged once. So a clone
cannot place a person in a second room, nor keep them where they were. A
clone alone, while the real badge is out of range, cannot be told apart; a
badge sighting must never be the only proof that a patient was seen.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field, model_validator

from drivers.base import Emit, make_event
from drivers.mqtt_device import RejectedMessage, decode_json_object
from rules.engine import ENTER, LEAVE
from rules.events import Event
from rules.schema import Duration, StrictModel

log = logging.getLogger(__name__)

RSSI_FLOOR = -90.0
"""dBm; weaker readings are a badge rooms away or noise, never a presence."""

ENTER_RSSI = -72.0
"""dBm; a few metres from a ceiling receiver indoors, so inside its room."""

LEAVE_RSSI = -82.0
"""dBm; 10 dB under ``ENTER_RSSI``: a body turning away costs that much."""

SWITCH_MARGIN = 8.0
"""dB a new place must beat the current one by; body shadowing alone moves
two receivers' readings of one badge by a few dB."""

SMOOTHING = 0.3
"""Weight of a new reading in the moving average: about the last five adverts
count, a few seconds of lag at one advert a second."""

FRESH_FOR = 10.0
"""Seconds a receiver's reading stays current; ESP32 receivers report every
few seconds, and an older reading says where the badge was, not where it is."""

DWELL = 5.0
"""Seconds a place must win before the badge enters it; walking past an open
door takes one or two."""

AWAY_TIMEOUT = 30.0
"""Seconds without a usable reading before ``leave``; a body between badge and
receiver can hide many adverts in a row (Bermuda's default is also 30 s)."""

CONFLICT_RSSI = -60.0
"""dBm; about a metre from a receiver, which nobody is from two rooms' at once."""

CONFLICT_WINDOW = 2.0
"""Seconds within which two strong readings count as "at once"; walking from
one room's receiver to another's takes longer."""

MAX_AGE = 10.0
"""Seconds after which an MQTT sighting describes the past, not the present."""

MAX_PAYLOAD = 1024
"""Bytes; a sighting is under 150, so anything much larger is not one."""

RSSI_RANGE = (-127.0, 20.0)
"""dBm a receiver can report; -127 is BlueZ's "no reading", +20 the strongest
transmit power BLE allows."""

TICK_EVERY = 1.0
"""Seconds between timeout checks; a leave is at most this late."""

_MAX_U16 = 0xFFFF


# -- badge ids ----------------------------------------------------------------


def ibeacon_id(beacon_uuid: uuid.UUID, major: int, minor: int) -> str:
    """The canonical badge id of an iBeacon."""
    return f"ibeacon:{beacon_uuid}:{major}:{minor}"


def eddystone_id(namespace: bytes, instance: bytes) -> str:
    """The canonical badge id of an Eddystone-UID beacon."""
    return f"eddystone:{namespace.hex()}:{instance.hex()}"


def canonical_badge_id(text: str) -> str:
    """Read a badge id as a person or a receiver wrote it; return the canonical form.

    Raises:
        ValueError: the text is neither an iBeacon nor an Eddystone-UID id.
    """
    kind, _, rest = text.strip().partition(":")
    if kind.lower() == "ibeacon":
        return _canonical_ibeacon(rest, text)
    if kind.lower() == "eddystone":
        return _canonical_eddystone(rest, text)
    raise ValueError(
        f"badge id {text!r:.80} must start with 'ibeacon:' or 'eddystone:'"
    )


def _canonical_ibeacon(rest: str, text: str) -> str:
    parts = rest.rsplit(":", 2)
    expected = "ibeacon:<uuid>:<major 0-65535>:<minor 0-65535>"
    if len(parts) != 3:
        raise ValueError(f"badge id {text!r:.80} is not {expected}")
    try:
        beacon_uuid = uuid.UUID(parts[0])
    except ValueError:
        raise ValueError(
            f"badge id {text!r:.80}: {parts[0]!r:.40} is not a UUID"
        ) from None
    numbers = [part.strip() for part in parts[1:]]
    if not all(n.isdecimal() and n.isascii() and int(n) <= _MAX_U16 for n in numbers):
        raise ValueError(f"badge id {text!r:.80} is not {expected}")
    return ibeacon_id(beacon_uuid, int(numbers[0]), int(numbers[1]))


def _canonical_eddystone(rest: str, text: str) -> str:
    parts = [part.strip().lower() for part in rest.split(":")]
    if len(parts) != 2 or not _is_hex(parts[0], 20) or not _is_hex(parts[1], 12):
        raise ValueError(
            f"badge id {text!r:.80} is not eddystone:<namespace, 20 hex digits>"
            ":<instance, 12 hex digits>"
        )
    return f"eddystone:{parts[0]}:{parts[1]}"


def _is_hex(text: str, length: int) -> bool:
    return len(text) == length and all(c in "0123456789abcdef" for c in text)


BadgeId = Annotated[str, AfterValidator(canonical_badge_id)]
"""A badge id in any accepted spelling, stored in the canonical form."""


# -- settings -----------------------------------------------------------------


class Receiver(StrictModel):
    """A BLE receiver (the gateway's adapter or an ESP32) and where it listens."""

    place: str = Field(min_length=1)
    """The room or zone id of the site file its badges are in."""

    rssi_offset: float = 0.0
    """dB added to its readings, to even out antennas: a Pi's internal antenna
    hears a badge a few dB weaker than an ESP32 with an external one."""


def _place_only(value: Any) -> Any:
    """Accept ``rx-301: room-301`` for ``rx-301: {place: room-301}``."""
    return {"place": value} if isinstance(value, str) else value


class PresenceSettings(StrictModel):
    """Receivers, badges and the thresholds that turn sightings into presence."""

    receivers: dict[str, Annotated[Receiver, BeforeValidator(_place_only)]] = Field(
        min_length=1
    )
    """Device id of each receiver (a device of the site file) -> where it is."""

    badges: tuple[BadgeId, ...] = ()
    """Badge ids to track; every other beacon is ignored and counted."""

    rssi_floor: float = RSSI_FLOOR
    enter_rssi: float = ENTER_RSSI
    leave_rssi: float = LEAVE_RSSI
    switch_margin: float = Field(SWITCH_MARGIN, ge=0)
    smoothing: float = Field(SMOOTHING, gt=0, le=1)
    fresh_for: Duration = FRESH_FOR
    dwell: Duration = DWELL
    away_timeout: Duration = AWAY_TIMEOUT
    conflict_rssi: float | None = CONFLICT_RSSI
    """None turns conflict detection off (receivers of two places too close)."""

    conflict_window: Duration = CONFLICT_WINDOW
    max_age: Duration = MAX_AGE

    @model_validator(mode="after")
    def _consistent(self) -> PresenceSettings:
        if not self.rssi_floor <= self.leave_rssi < self.enter_rssi:
            raise ValueError(
                "thresholds must satisfy rssi_floor <= leave_rssi < enter_rssi, got "
                f"{self.rssi_floor:g} / {self.leave_rssi:g} / {self.enter_rssi:g}"
            )
        if self.conflict_rssi is not None and self.conflict_rssi < self.enter_rssi:
            raise ValueError(
                f"'conflict_rssi' ({self.conflict_rssi:g}) must be at or above "
                f"'enter_rssi' ({self.enter_rssi:g})"
            )
        for name in ("fresh_for", "away_timeout", "conflict_window", "max_age"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name!r} must be longer than 0s")
        if self.conflict_window > self.fresh_for:
            raise ValueError("'conflict_window' must not be longer than 'fresh_for'")
        if len(set(self.badges)) != len(self.badges):
            raise ValueError("a badge id is listed twice under 'badges'")
        return self


# -- the estimator ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sighting:
    """One badge heard by one receiver."""

    badge: str
    """Canonical badge id."""

    receiver: str
    """Device id of the receiver that heard it."""

    rssi: float
    """Signal strength in dBm, as the receiver measured it."""

    at: float
    """When, in Unix seconds of the gateway's clock."""


@dataclass(slots=True)
class _Signal:
    """One receiver's smoothed view of one badge."""

    rssi: float
    last: float


@dataclass(slots=True)
class _Track:
    """What the estimator knows about one badge."""

    signals: dict[str, _Signal] = field(default_factory=dict)
    place: str | None = None
    receiver: str | None = None
    """The receiver that reported the entry; the leave comes from it too."""

    held: float = 0.0
    """Last time the current place heard the badge at ``leave_rssi`` or more."""

    candidate: str | None = None
    since: float = 0.0
    """When ``candidate`` started to win, for the dwell."""

    conflict: bool = False

    @property
    def idle(self) -> bool:
        return self.place is None and not self.signals and not self.conflict


Strengths = dict[str, tuple[float, str]]
"""Place -> (smoothed dBm, receiver) of its strongest fresh receiver."""


class PresenceEstimator:
    """Turns sightings and the passing of time into enter and leave events."""

    def __init__(self, settings: PresenceSettings) -> None:
        self.settings = settings
        self._badges = frozenset(settings.badges)
        self._tracks: dict[str, _Track] = {}
        self.sightings = 0
        """Sightings used (known badge, known receiver, above the floor)."""

        self.ignored: Counter[str] = Counter()
        """Sightings not used, by reason: ``unknown_badge``, ``unknown_receiver``,
        ``weak`` (under the floor), ``bad_rssi``; the tracker adds ``not_started``."""

        self.conflicts = 0
        """Times a badge was heard strongly in two places at once."""

    def observe(self, sighting: Sighting) -> list[Event]:
        """Take one sighting; return the events it causes, in order."""
        reason = self._refusal(sighting)
        if reason is not None:
            self.ignored[reason] += 1
            return []
        self.sightings += 1
        track = self._tracks.setdefault(sighting.badge, _Track())
        self._record(track, sighting)
        return self._decide(sighting.badge, track, sighting.at)

    def tick(self, now: float) -> list[Event]:
        """Apply timeouts up to ``now``: dwells completed, badges gone away."""
        events: list[Event] = []
        for badge in sorted(self._tracks):
            track = self._tracks[badge]
            self._forget_stale(track, now)
            events.extend(self._decide(badge, track, now))
            if track.idle:
                del self._tracks[badge]
        return events

    def present(self) -> dict[str, str]:
        """Badge -> the place it is in now."""
        return {
            badge: track.place
            for badge, track in self._tracks.items()
            if track.place is not None
        }

    def restore(
        self, present: Iterable[tuple[str, str]], now: float
    ) -> list[tuple[str, str]]:
        """Take (badge, place) pairs the engine still holds after a restart.

        Each is assumed present as of ``now``, so it leaves after
        ``away_timeout`` unless heard again. Returns the pairs it cannot hold
        (an unknown badge, a place no receiver covers, a second place of one
        badge), for the caller to clear in the engine.
        """
        refused = []
        for badge, place in present:
            receiver = self._receiver_for(place)
            placed = badge in self.present()
            if badge not in self._badges or receiver is None or placed:
                refused.append((badge, place))
                continue
            track = self._tracks.setdefault(badge, _Track())
            track.place, track.receiver, track.held = place, receiver, now
        return refused

    # -- sightings ------------------------------------------------------------

    def _refusal(self, sighting: Sighting) -> str | None:
        receiver = self.settings.receivers.get(sighting.receiver)
        if receiver is None:
            return "unknown_receiver"
        if sighting.badge not in self._badges:
            return "unknown_badge"
        if not math.isfinite(sighting.rssi):
            return "bad_rssi"
        if sighting.rssi + receiver.rssi_offset < self.settings.rssi_floor:
            return "weak"
        return None

    def _record(self, track: _Track, sighting: Sighting) -> None:
        """Fold the reading into its receiver's moving average."""
        receiver = self.settings.receivers[sighting.receiver]
        rssi = sighting.rssi + receiver.rssi_offset
        signal = track.signals.get(sighting.receiver)
        if signal is None or sighting.at - signal.last > self.settings.fresh_for:
            # An old average describes where the badge was: start afresh.
            signal = track.signals[sighting.receiver] = _Signal(rssi, sighting.at)
        else:
            signal.rssi += self.settings.smoothing * (rssi - signal.rssi)
            signal.last = max(signal.last, sighting.at)
        if receiver.place == track.place and signal.rssi >= self.settings.leave_rssi:
            track.held = max(track.held, sighting.at)

    def _forget_stale(self, track: _Track, now: float) -> None:
        fresh_for = self.settings.fresh_for
        for receiver in [
            r for r, s in track.signals.items() if now - s.last > fresh_for
        ]:
            del track.signals[receiver]

    # -- decisions ------------------------------------------------------------

    def _decide(self, badge: str, track: _Track, now: float) -> list[Event]:
        """Move the badge as the current signals say; events in order."""
        events: list[Event] = []
        if self._in_conflict(badge, track, now):
            track.candidate = None
            if track.place is not None:
                events.append(self._leave(badge, track, now, "conflict"))
            return events
        if track.place is not None and now - track.held >= self.settings.away_timeout:
            events.append(self._leave(badge, track, now, "away"))

        strengths = self._strengths(track, now)
        target = self._target(track, strengths)
        if target != track.candidate:
            track.candidate, track.since = target, now
        if target is not None and now - track.since >= self.settings.dwell:
            if track.place is not None:
                events.append(self._leave(badge, track, now, "moved"))
            events.append(self._enter(badge, track, target, strengths[target], now))
        return events

    def _strengths(self, track: _Track, now: float) -> Strengths:
        found: Strengths = {}
        for receiver, signal in sorted(track.signals.items()):
            if now - signal.last > self.settings.fresh_for:
                continue
            place = self.settings.receivers[receiver].place
            if place not in found or signal.rssi > found[place][0]:
                found[place] = (signal.rssi, receiver)
        return found

    def _target(self, track: _Track, strengths: Strengths) -> str | None:
        """The place the badge should move to, if any (before the dwell)."""
        settings = self.settings
        ranked = sorted(strengths, key=lambda place: (-strengths[place][0], place))
        others = [place for place in ranked if place != track.place]
        if not others or strengths[others[0]][0] < settings.enter_rssi:
            return None
        best = others[0]
        if track.place in strengths:
            current = strengths[track.place][0]
            if strengths[best][0] < current + settings.switch_margin:
                return None
        return best

    def _in_conflict(self, badge: str, track: _Track, now: float) -> bool:
        """Strong in two places at once; ends once only one place is strong."""
        threshold = self.settings.conflict_rssi
        if threshold is None:
            return False
        # Hysteresis: a conflict starts on two strong readings within the
        # short window, and ends only when the other reading is stale, so the
        # clone's last average cannot win the moment it falls silent.
        window = (
            self.settings.fresh_for if track.conflict else self.settings.conflict_window
        )
        strong = {
            self.settings.receivers[receiver].place
            for receiver, signal in track.signals.items()
            if now - signal.last <= window and signal.rssi >= threshold
        }
        conflict = len(strong) > 1
        if conflict and not track.conflict:
            self.conflicts += 1
            log.warning(
                "Badge %s heard strongly in %s at once; it counts as in no place "
                "until one place alone hears it (a cloned beacon?)",
                badge,
                " and ".join(sorted(strong)),
            )
        elif track.conflict and not conflict:
            log.info("Badge %s is heard strongly in one place again", badge)
        track.conflict = conflict
        return conflict

    def _enter(
        self,
        badge: str,
        track: _Track,
        place: str,
        strength: tuple[float, str],
        now: float,
    ) -> Event:
        rssi, receiver = strength
        track.place, track.receiver, track.held = place, receiver, now
        track.candidate = None
        return make_event(
            receiver,
            ENTER,
            clock=lambda: now,
            badge=badge,
            zone=place,
            rssi=round(rssi, 1),
        )

    def _leave(self, badge: str, track: _Track, now: float, reason: str) -> Event:
        place, receiver = track.place, track.receiver
        track.place = track.receiver = None
        assert receiver is not None  # set together with the place
        return make_event(
            receiver, LEAVE, clock=lambda: now, badge=badge, zone=place, reason=reason
        )

    def _receiver_for(self, place: str) -> str | None:
        receivers = self.settings.receivers
        return next((r for r in sorted(receivers) if receivers[r].place == place), None)


# -- MQTT receivers -------------------------------------------------------------


def parse_sighting(
    receiver: str,
    payload: bytes,
    now: float,
    *,
    max_age: float = MAX_AGE,
    max_payload: int = MAX_PAYLOAD,
) -> Sighting:
    """Validate one receiver's MQTT sighting, or raise :class:`RejectedMessage`."""
    body = decode_json_object(payload, max_payload)
    badge = body.get("badge")
    if badge is None:
        raise RejectedMessage("missing_field", "required field 'badge' is missing")
    if not isinstance(badge, str):
        raise RejectedMessage(
            "bad_field", f"'badge' must be a string, got {badge!r:.60}"
        )
    try:
        badge = canonical_badge_id(badge)
    except ValueError as exc:
        raise RejectedMessage("bad_field", str(exc)) from None

    rssi = _number(body, "rssi")
    if rssi is None:
        raise RejectedMessage("missing_field", "required field 'rssi' is missing")
    low, high = RSSI_RANGE
    if not low <= rssi <= high:
        raise RejectedMessage(
            "bad_field", f"'rssi' must be dBm from {low:g} to {high:g}, got {rssi:g}"
        )
    ts = _number(body, "ts")
    if ts is not None and now - ts > max_age:
        raise RejectedMessage(
            "stale", f"sighting is {now - ts:.0f}s old, the limit is {max_age:g}s"
        )
    return Sighting(badge, receiver, rssi, now)


def _number(body: Mapping[str, Any], key: str) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
    ):
        raise RejectedMessage(
            "bad_field", f"{key!r} must be a number, got {value!r:.60}"
        )
    return float(value)


# -- the driver -----------------------------------------------------------------


class PresenceTracker:
    """The presence driver: emits ``enter`` and ``leave`` from every receiver.

    :meth:`feed` (the local scanner's thread) and :meth:`feed_message` (the
    gateway's MQTT handling) may be called from any thread; a ticker thread
    applies the timeouts. One lock keeps the estimator and the order of the
    events it emits consistent.
    """

    name = "presence"

    def __init__(
        self,
        settings: PresenceSettings,
        clock: Callable[[], float] = time.time,
        tick_every: float = TICK_EVERY,
    ) -> None:
        self.estimator = PresenceEstimator(settings)
        self._clock = clock
        self._tick_every = tick_every
        self._lock = threading.Lock()
        self._emit: Emit | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.events = 0

    def start(self, emit: Emit) -> None:
        """Start applying timeouts; sightings fed before this are ignored."""
        if self._thread is not None:
            return
        with self._lock:
            self._emit = emit
        self._stopping.clear()
        self._thread = threading.Thread(
            target=self._tick_forever, name="presence-ticker", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop the ticker; later sightings are ignored. Safe to call twice."""
        thread, self._thread = self._thread, None
        self._stopping.set()
        if thread is not None:
            thread.join()
        with self._lock:
            self._emit = None

    def feed(self, sighting: Sighting) -> None:
        """Take one sighting, from any thread."""
        with self._lock:
            if self._emit is None:
                self.estimator.ignored["not_started"] += 1
                return
            self._send(self.estimator.observe(sighting))

    def feed_message(
        self, receiver: str, payload: bytes, max_payload: int = MAX_PAYLOAD
    ) -> None:
        """Take one MQTT sighting from ``receiver``; raises RejectedMessage."""
        sighting = parse_sighting(
            receiver,
            payload,
            self._clock(),
            max_age=self.estimator.settings.max_age,
            max_payload=max_payload,
        )
        self.feed(sighting)

    def tick(self) -> None:
        """Apply timeouts now (the ticker thread does this every second)."""
        with self._lock:
            if self._emit is not None:
                self._send(self.estimator.tick(self._clock()))

    def restore(self, present: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
        """See :meth:`PresenceEstimator.restore`; call it before :meth:`start`."""
        with self._lock:
            return self.estimator.restore(present, self._clock())

    def health(self) -> Mapping[str, Any]:
        with self._lock:
            estimator = self.estimator
            return {
                "running": self._thread is not None,
                "receivers": len(estimator.settings.receivers),
                "badges": len(estimator.settings.badges),
                "present": len(estimator.present()),
                "sightings": estimator.sightings,
                "ignored": dict(estimator.ignored),
                "conflicts": estimator.conflicts,
                "events": self.events,
            }

    def _send(self, events: list[Event]) -> None:
        emit = self._emit
        assert emit is not None  # checked by the callers, under the lock
        for event in events:
            log.debug(
                "%s %s %s", event.type, event.fields["badge"], event.fields["zone"]
            )
            emit(event)
        self.events += len(events)

    def _tick_forever(self) -> None:
        while not self._stopping.wait(self._tick_every):
            self.tick()
