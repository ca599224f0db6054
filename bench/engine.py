"""The rule engine alone: events per second and per-event latency, no I/O.

``rules.engine.Engine`` is pure: events go in through ``on_event``, time
through an injected clock and ``advance()``, people through ``acknowledge``
and ``resolve``. This script measures exactly that, in one process, on one
core, with nothing between the caller and the engine:

* a generated site of 500 zones (2,000 rooms, 19,000 devices, 319 staff of
  whom 160 wear badges, on shifts in the site's time zone) and 1,000 rules
  of every kind, each covering a few zones;
* 10,000 open call alerts loaded before the clock starts;
* a pre-generated stream, heavy in badge ``enter``/``leave`` events, with
  visits, readings, feedback presses, heartbeats, calls, cancels,
  acknowledgements and resolutions, on a fake clock that moves a few
  milliseconds per event; ``advance()`` and ``take_dirty()`` run after every
  small batch, as the gateway's loop does;
* 100,000 timers falling due at once, through the engine and through
  ``rules.timers.TimerQueue`` alone.

Every repeat runs in a fresh process forked from the one that generated the
inputs, pinned to one core. Run from the repository root::

    python bench/engine.py [--repeat 5] [--events 200000]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import hashlib
import heapq
import importlib.metadata
import json
import math
import multiprocessing
import os
import platform
import pstats
import random
import statistics
import subprocess
import sys
import time
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    # Run as ``python bench/engine.py``: the rules are not an installed package.
    sys.path.insert(0, str(REPO))

from rules.engine import Engine, EngineError, counter_ids  # noqa: E402
from rules.events import Event  # noqa: E402
from rules.schema import parse_rules  # noqa: E402
from rules.site import Site  # noqa: E402
from rules.timers import TimerQueue  # noqa: E402

TZ = "Europe/Berlin"
T0 = 1_796_288_400.0
"""Thursday 2026-12-03 10:00 in Berlin: the early shift is on duty."""

PRELOAD_SPAN = 600.0
"""The preloaded calls are spread over the ten minutes before ``T0``."""

TARGET_EVENTS_PER_S = 50_000
TARGET_P99_US = 100.0

WARD_SIZE = 10
"""Zones per ward; a ward's nurses answer its calls."""

SHIFTS = (
    {"start": "06:00", "end": "14:00"},
    {"start": "14:00", "end": "22:00"},
    {"start": "22:00", "end": "06:00"},
)

# Operation codes of the pre-generated stream.
EVENT, ACK, RESOLVE, ADVANCE, DIRTY = range(5)
OP_NAMES = {ACK: "acknowledge", RESOLVE: "resolve", ADVANCE: "advance"}
OP_NAMES[DIRTY] = "take_dirty"


# -- the site -------------------------------------------------------------------


def zone_id(z: int) -> str:
    return f"z{z:03d}"


def room_id(z: int, r: int) -> str:
    return f"z{z:03d}-r{r}"


def ward_of(z: int) -> int:
    return z // WARD_SIZE


@dataclass
class Plan:
    """The site's shape, shared by the generator of rules and of events."""

    zones: int = 500
    rooms: int = 4
    beds: int = 6
    """Call buttons per room."""

    @property
    def wards(self) -> int:
        return math.ceil(self.zones / WARD_SIZE)

    def call_buttons(self) -> list[str]:
        return [
            f"cb-{room_id(z, r)}-{b}"
            for z in range(self.zones)
            for r in range(self.rooms)
            for b in range(self.beds)
        ]


def make_site(plan: Plan) -> dict[str, Any]:
    zones = []
    devices: list[dict[str, Any]] = []
    for z in range(plan.zones):
        rooms = [room_id(z, r) for r in range(plan.rooms)]
        zones.append(
            {
                "id": zone_id(z),
                "name": f"ward {ward_of(z)} zone {z}",
                "rooms": [{"id": room} for room in rooms],
            }
        )
        for room in rooms:
            for b in range(plan.beds):
                devices.append(
                    {"id": f"cb-{room}-{b}", "kind": "call_button", "room": room}
                )
            devices.append({"id": f"pc-{room}", "kind": "pull_cord", "room": room})
            devices.append({"id": f"rx-{room}", "kind": "ble_receiver", "room": room})
        # Room 0 is the nurses' station, the last room the restroom.
        station, restroom = rooms[0], rooms[-1]
        zone = zone_id(z)
        devices += [
            {"id": f"code-{zone}", "kind": "code_button", "room": station},
            {"id": f"door-{zone}", "kind": "people_counter", "room": restroom},
            {"id": f"towel-{zone}", "kind": "towel_dispenser", "room": restroom},
            {"id": f"soap-{zone}", "kind": "soap_dispenser", "room": restroom},
            {"id": f"smiley-{zone}", "kind": "feedback_terminal", "room": restroom},
            {"id": f"clean-{zone}", "kind": "clean_button", "room": restroom},
        ]
    return {"zones": zones, "devices": devices, "staff": make_staff(plan)}


def make_staff(plan: Plan) -> list[dict[str, Any]]:
    """319 people, 160 badges; nurses and cleaners work shifts."""
    staff: list[dict[str, Any]] = []
    for w in range(plan.wards):
        ward = f"ward-{w:02d}"
        for n in range(4):
            person = {
                "id": f"n-{w:02d}-{n}",
                "name": f"Nurse {w}/{n}",
                "roles": ["nurse", ward],
                "shifts": [SHIFTS[n % 3]],
            }
            if n < 2:
                person["badge"] = f"b-n-{w:02d}-{n}"
            staff.append(person)
        charge = {
            "id": f"cn-{w:02d}",
            "name": f"Charge nurse {w}",
            "roles": ["charge_nurse", "nurse", ward],
            "shifts": [SHIFTS[w % 3]],
        }
        if w % 2 == 0:
            charge["badge"] = f"b-cn-{w:02d}"
        staff.append(charge)
    for c in range(40):
        first = c * plan.zones // 40
        last = (c + 1) * plan.zones // 40
        person = {
            "id": f"cl-{c:02d}",
            "name": f"Cleaner {c}",
            "roles": ["cleaner"],
            "zones": [zone_id(z) for z in range(first, last)],
            "shifts": [SHIFTS[c % 2]],
        }
        if c < 30:
            person["badge"] = f"b-cl-{c:02d}"
        staff.append(person)
    for h in range(4):
        staff.append(
            {"id": f"hk-{h}", "name": f"Lead {h}", "roles": ["housekeeping_lead"]}
        )
    for t in range(15):
        person = {"id": f"tech-{t:02d}", "name": f"Tech {t}", "roles": ["technician"]}
        if t < 5:
            person["badge"] = f"b-tech-{t:02d}"
        staff.append(person)
    for m in range(10):
        staff.append({"id": f"mgr-{m}", "name": f"Manager {m}", "roles": ["manager"]})
    return staff


# -- the rules ------------------------------------------------------------------


def _spread(count: int, zones: int) -> Iterator[tuple[int, list[str]]]:
    """``count`` rules, each covering a consecutive run of zones, all zones once."""
    for i in range(count):
        first = i * zones // count
        last = max(first + 1, (i + 1) * zones // count)
        yield i, [zone_id(z) for z in range(first, last)]


def _ward(zones: list[str]) -> str:
    return f"ward-{ward_of(int(zones[0][1:])):02d}"


def _manager(zones: list[str]) -> str:
    return f"mgr-{ward_of(int(zones[0][1:])) % 10}"


def make_rules(plan: Plan) -> list[dict[str, Any]]:
    """1,000 rules of every kind; each kind covers every zone once.

    ===========================  =====  =============
    rules                        count  zones each
    ===========================  =====  =============
    routine bedside calls        250    2
    code calls                   100    5
    urgent bathroom pull cords   100    5
    visits since cleaning        125    4
    towel / soap levels          100/50 5 / 10
    guest feedback               100    5
    offline receivers/dispensers 50/50  10 / 20
    composites (+2 conditions)   25+50  2 (zones 0-49)
    ===========================  =====  =============
    """
    z = plan.zones
    rules: list[dict[str, Any]] = []
    for i, zones in _spread(250, z):
        rules.append(
            {
                "name": f"call-{i:03d}",
                "devices": {"kind": "call_button", "zones": zones},
                "levels": [
                    {"after": "0s", "roles": [_ward(zones)], "remind_every": "10m"},
                    {"after": "15m", "roles": ["charge_nurse"], "remind_every": "15m"},
                    {"after": "30m", "staff": [_manager(zones)]},
                ],
                "ack_timeout": "10m",
                "resolve_by_presence": {"roles": ["nurse"], "dwell": "10s"},
            }
        )
    for i, zones in _spread(100, z):
        rules.append(
            {
                "name": f"code-{i:03d}",
                "priority": "code",
                "devices": {"kind": "code_button", "zones": zones},
                "levels": [
                    {"after": "0s", "roles": [_ward(zones), "charge_nurse"]},
                    {"after": "2m", "staff": [_manager(zones)]},
                ],
            }
        )
    for i, zones in _spread(100, z):
        rules.append(
            {
                "name": f"bath-{i:03d}",
                "priority": "urgent",
                "devices": {"kind": "pull_cord", "zones": zones},
                "levels": [
                    {"after": "0s", "roles": [_ward(zones)], "remind_every": "5m"},
                    {"after": "5m", "roles": ["charge_nurse"]},
                ],
                "ack_timeout": "5m",
                "resolve_by_presence": {"roles": ["nurse"], "dwell": "10s"},
            }
        )
    cleaners = [
        {"after": "0s", "roles": ["cleaner"]},
        {"after": "20m", "roles": ["housekeeping_lead"]},
    ]
    for i, zones in _spread(125, z):
        rule: dict[str, Any] = {
            "name": f"visits-{i:03d}",
            "kind": "count",
            "devices": {"kind": "people_counter", "zones": zones},
            "at_least": 30 + 10 * (i % 4),
            "reset_by_visit": {"roles": ["cleaner"], "dwell": "60s"},
            "levels": cleaners,
        }
        if i % 2:
            rule["within"] = "1h"
        rules.append(rule)
    for i, zones in _spread(100, z):
        rules.append(
            {
                "name": f"towels-{i:03d}",
                "kind": "threshold",
                "devices": {"kind": "towel_dispenser", "zones": zones},
                "reading": "towel_level",
                "below": 15,
                "clear_at": 25,
                "for": "60s",
                "levels": cleaners[:1],
            }
        )
    for i, zones in _spread(50, z):
        rules.append(
            {
                "name": f"soap-{i:03d}",
                "kind": "threshold",
                "devices": {"kind": "soap_dispenser", "zones": zones},
                "reading": "soap_level",
                "below": 10,
                "clear_at": 20,
                "for": "2m",
                "levels": cleaners[:1],
            }
        )
    for i, zones in _spread(100, z):
        rules.append(
            {
                "name": f"feedback-{i:03d}",
                "kind": "feedback",
                "devices": {"kind": "feedback_terminal", "zones": zones},
                "window": "15m",
                "at_least": 4,
                "share": 0.5,
                "min_interval": "5s",
                "kudos_after": 10,
                "levels": cleaners,
            }
        )
    technicians = [{"after": "0s", "roles": ["technician"]}]
    for i, zones in _spread(50, z):
        rules.append(
            {
                "name": f"offline-rx-{i:02d}",
                "kind": "supervision",
                "devices": {"kind": "ble_receiver", "zones": zones},
                "heartbeat": "15m",
                "levels": technicians,
            }
        )
    for i, zones in _spread(50, z):
        kind = "towel_dispenser" if i < 25 else "soap_dispenser"
        rules.append(
            {
                "name": f"offline-disp-{i:02d}",
                "kind": "supervision",
                "devices": {"kind": kind, "zones": zones},
                "heartbeat": "20m",
                "levels": technicians,
            }
        )
    for j in range(25):
        zones = [zone_id(2 * j % z), zone_id((2 * j + 1) % z)]
        rules += [
            {
                "name": f"busy-{j:02d}",
                "kind": "count",
                "devices": {"kind": "people_counter", "zones": zones},
                "at_least": 20,
                "within": "30m",
            },
            {
                "name": f"low-towels-{j:02d}",
                "kind": "threshold",
                "devices": {"kind": "towel_dispenser", "zones": zones},
                "reading": "towel_level",
                "below": 30,
                "for": "30s",
            },
            {
                "name": f"service-{j:02d}",
                "kind": "composite",
                "all": [f"busy-{j:02d}", f"low-towels-{j:02d}"],
                "levels": cleaners,
            },
        ]
    return rules


# -- the event stream -----------------------------------------------------------


class Pool:
    """A set with O(1) random choice and removal."""

    def __init__(self, items: list[str] | None = None) -> None:
        self.items: list[str] = []
        self.index: dict[str, int] = {}
        for item in items or ():
            self.add(item)

    def __len__(self) -> int:
        return len(self.items)

    def __contains__(self, item: str) -> bool:
        return item in self.index

    def add(self, item: str) -> None:
        if item not in self.index:
            self.index[item] = len(self.items)
            self.items.append(item)

    def remove(self, item: str) -> None:
        at = self.index.pop(item, None)
        if at is None:
            return
        last = self.items.pop()
        if at < len(self.items):
            self.items[at] = last
            self.index[last] = at

    def choice(self, rng: random.Random) -> str:
        return self.items[rng.randrange(len(self.items))]


@dataclass(eq=False)
class Badge:
    id: str
    staff: str
    nurse: bool
    """Nurses' badges resolve calls by presence (the call rules' check)."""

    rooms: list[str]
    """Where this person usually works."""

    place: str | None = None
    moves_at: float = 0.0
    visit: int = 0


MIX = {
    "badge": 0.57,
    "visit": 0.10,
    "reading": 0.07,
    "feedback": 0.03,
    "call": 0.11,
    "cancel": 0.025,
    "ack": 0.03,
    "resolve": 0.02,
    "cleaned": 0.005,
}
"""Share of each kind of input, heartbeats aside (they come on schedule)."""

DWELL = 10.0
"""The call rules' ``resolve_by_presence`` dwell, mirrored by the generator."""


@dataclass
class Stream:
    """The pre-generated inputs of one run, replayed identically by every repeat."""

    preload: list[tuple[float, Event]]
    ops: list[tuple[int, float, Any, Any]]
    counts: dict[str, int] = field(default_factory=dict)
    end: float = 0.0
    open_calls_at_end: int = 0
    """Open call-button and pull-cord alerts the generator expects at the end."""


def make_badges(site: dict[str, Any], plan: Plan) -> list[Badge]:
    badges = []
    for member in site["staff"]:
        badge = member.get("badge")
        if badge is None:
            continue
        roles = member["roles"]
        if "cleaner" in roles:
            # Cleaners work the restrooms of their zones and pass through rooms.
            zones = [int(zone[1:]) for zone in member["zones"]]
            rooms = [room_id(z, plan.rooms - 1) for z in zones]
            rooms += [room_id(z, 1) for z in zones[:3]]
        elif "technician" in roles:
            rooms = [
                room_id(z, r) for z in range(plan.zones) for r in range(plan.rooms)
            ]
        else:
            w = int(member["id"].split("-")[1])
            first, last = w * WARD_SIZE, min(plan.zones, (w + 1) * WARD_SIZE)
            rooms = [
                room_id(z, r) for z in range(first, last) for r in range(plan.rooms)
            ]
        badges.append(Badge(badge, member["id"], "nurse" in roles, rooms))
    return badges


def _room_of(device: str) -> str:
    """``cb-z001-r2-3`` and ``pc-z001-r2`` are in room ``z001-r2``."""
    return device.split("-", 1)[1][:7]


class StreamMaker:
    """Generates the inputs, keeping a model of which calls are open.

    The model mirrors what the engine will do with them (presence resolution
    included), so acknowledgements and resolutions name alerts that are still
    open, and new calls keep the number of open alerts near the preload.
    """

    def __init__(
        self,
        plan: Plan,
        site: dict[str, Any],
        preload: int,
        step: float,
        batch: int,
        seed: int,
    ) -> None:
        self.rng = rng = random.Random(seed)
        self.step = step
        self.batch = batch
        buttons = plan.call_buttons()
        if preload > len(buttons):
            raise SystemExit(f"--preload {preload} > {len(buttons)} call buttons")
        rng.shuffle(buttons)
        preloaded = buttons[:preload]
        start = T0 - PRELOAD_SPAN
        self.preload = [
            (start + i * PRELOAD_SPAN / max(1, preload), Event(f"p{i}", "call", d, 0.0))
            for i, d in enumerate(preloaded)
        ]
        self.target_open = preload
        self.zones = [zone_id(z) for z in range(plan.zones)]
        rooms = [room_id(z, r) for z in range(plan.zones) for r in range(plan.rooms)]
        self.free = {
            "cb": Pool(buttons[preload:]),
            "pc": Pool([f"pc-{r}" for r in rooms]),
        }
        self.open = {"cb": Pool(preloaded), "pc": Pool()}
        # Dicts, not sets: their order, and so the stream, must not depend on
        # the process's hash seed.
        self.in_room: dict[str, dict[str, None]] = {}
        self.opened_at: dict[str, float] = {}
        for at, event in self.preload:
            self.in_room.setdefault(_room_of(event.device), {})[event.device] = None
            self.opened_at[event.device] = at
        self.answerable = Pool(preloaded)
        """Preloaded calls still open: acknowledgements and resolutions name these."""

        self.open_codes: dict[str, float] = {}
        self.badges = make_badges(site, plan)
        self.nurses_in: dict[str, dict[Badge, None]] = {}
        self.dwells: list[tuple[float, int, Badge, int, str, float]] = []
        """(due, order, badge, its visit, device, the call's opening time)."""
        self.dwell_order = 0
        self.nurses = [m["id"] for m in site["staff"] if "nurse" in m["roles"]]
        self.dispensers = [
            f"{k}-{zone}" for zone in self.zones for k in ("towel", "soap")
        ]
        self.level = {d: rng.uniform(0, 100) for d in self.dispensers}
        self.terminals = [f"smiley-{zone}" for zone in self.zones]
        self.last_press = dict.fromkeys(self.terminals, -1e9)
        # Supervised devices report every five minutes; one in a hundred is dead.
        supervised = [f"rx-{room}" for room in rooms] + self.dispensers
        self.heartbeats = sorted(
            (T0 + rng.uniform(0, 300), d) for d in supervised if rng.random() >= 0.01
        )
        self.next_heartbeat = 0
        self.ops: list[tuple[int, float, Any, Any]] = []
        self.counts: dict[str, int] = {}
        self.now = T0
        self.produced = 0

    # -- output ------------------------------------------------------------------

    def _tick(self, name: str) -> None:
        self.now += self.step
        self.produced += 1
        self.counts[name] = self.counts.get(name, 0) + 1

    def _after_input(self) -> None:
        if self.produced % self.batch == 0:
            self._batch_end()

    def _batch_end(self) -> None:
        self.ops.append((ADVANCE, self.now, None, None))
        self.ops.append((DIRTY, self.now, None, None))
        self._presence_resolutions()

    def emit(self, kind: str, device: str, **fields: Any) -> None:
        self._tick(kind)
        event = Event(f"s{self.produced}", kind, device, self.now, fields)
        self.ops.append((EVENT, self.now, event, None))
        self._after_input()

    def person(self, op: int, device: str, staff: str) -> None:
        self._tick(OP_NAMES[op])
        self.ops.append((op, self.now, device, staff))
        self._after_input()

    # -- the model of open calls ---------------------------------------------------

    def _opened(self, family: str, device: str, at: float) -> None:
        self.free[family].remove(device)
        self.open[family].add(device)
        self.opened_at[device] = at
        room = _room_of(device)
        self.in_room.setdefault(room, {})[device] = None
        for badge in self.nurses_in.get(room, ()):
            self._dwell(badge, device, at)  # a nurse already there

    def _closed(self, device: str) -> None:
        family = device[:2]
        self.open[family].remove(device)
        self.free[family].add(device)
        self.answerable.remove(device)
        self.in_room.get(_room_of(device), {}).pop(device, None)

    def _dwell(self, badge: Badge, device: str, since: float) -> None:
        """The nurse resolves the call ``DWELL`` after the later of arrival and
        opening, if still there: what the call rules' presence check does."""
        self.dwell_order += 1
        opened = self.opened_at[device]
        entry = (since + DWELL, self.dwell_order, badge, badge.visit, device, opened)
        heapq.heappush(self.dwells, entry)

    def _presence_resolutions(self) -> None:
        """What the engine's ``advance()`` at this batch end resolves by presence."""
        while self.dwells and self.dwells[0][0] <= self.now:
            _, _, badge, visit, device, opened = heapq.heappop(self.dwells)
            still_there = badge.visit == visit and badge.place == _room_of(device)
            same_call = device in self.open[device[:2]]
            if still_there and same_call and self.opened_at[device] == opened:
                self._closed(device)

    # -- one input of each kind -------------------------------------------------------

    def badge(self) -> None:
        rng = self.rng
        badge = self.badges[rng.randrange(len(self.badges))]
        if badge.place is not None and self.now < badge.moves_at:
            # The estimator reports the badge where it already is: a no-op.
            place = badge.place
            rssi = rng.randint(-90, -45)
            self.emit("enter", f"rx-{place}", badge=badge.id, zone=place, rssi=rssi)
            return
        if badge.place is not None:
            old = badge.place
            self.emit("leave", f"rx-{old}", badge=badge.id, zone=old, rssi=-88)
            if badge.nurse:
                self.nurses_in[old].pop(badge, None)
        new = rng.choice(badge.rooms)
        badge.place = new
        badge.visit += 1
        badge.moves_at = self.now + rng.expovariate(1 / 45)
        rssi = rng.randint(-75, -45)
        self.emit("enter", f"rx-{new}", badge=badge.id, zone=new, rssi=rssi)
        if badge.nurse:
            self.nurses_in.setdefault(new, {})[badge] = None
            for device in self.in_room.get(new, ()):
                self._dwell(badge, device, max(self.now, self.opened_at[device]))

    def call(self) -> None:
        rng = self.rng
        opened = len(self.open["cb"]) + len(self.open["pc"])
        roll = rng.random()
        # New calls keep the open alerts near the preload; the rest are
        # presses on a call that is already open, code calls and pull cords.
        at = self.now + self.step  # the time the call will carry
        if roll < (0.90 if opened < self.target_open else 0.40) and self.free["cb"]:
            device = self.free["cb"].choice(rng)
            self._opened("cb", device, at)
        elif roll < 0.93 and self.open["cb"]:
            device = self.open["cb"].choice(rng)
        elif roll < 0.99 and self.free["pc"]:
            device = self.free["pc"].choice(rng)
            self._opened("pc", device, at)
        else:
            device = f"code-{rng.choice(self.zones)}"
            self.open_codes.setdefault(device, self.now + rng.uniform(60, 120))
        self.emit("call", device)

    def cancel(self) -> None:
        family = "pc" if self.rng.random() < 0.2 and self.open["pc"] else "cb"
        if not self.open[family]:
            return
        device = self.open[family].choice(self.rng)
        self._closed(device)
        self.emit("cancel", device)

    def answer(self, op: int) -> None:
        if not self.answerable:
            return
        device = self.answerable.choice(self.rng)
        staff = self.rng.choice(self.nurses)
        if op == RESOLVE:
            self._closed(device)
        self.person(op, device, staff)

    def reading(self) -> None:
        rng = self.rng
        device = rng.choice(self.dispensers)
        level = max(0.0, self.level[device] - rng.uniform(0, 8))
        if level < 8 and rng.random() < 0.3:
            level = 100.0  # refilled
        self.level[device] = level
        reading = "towel_level" if device.startswith("towel") else "soap_level"
        self.emit("reading", device, reading=reading, value=round(level, 1))

    def feedback(self) -> None:
        rng = self.rng
        score = rng.choices(
            ("very_happy", "happy", "unhappy", "very_unhappy"), (3, 3, 2.5, 1.5)
        )[0]
        terminal = rng.choice(self.terminals)
        misuse = rng.random() < 0.02  # pressed again too soon: refused
        for _ in range(20):
            if misuse or self.now - self.last_press[terminal] > 5.5:
                break
            terminal = rng.choice(self.terminals)
        else:
            return
        self.last_press[terminal] = self.now
        self.emit("feedback", terminal, score=score)

    def make(self, events: int) -> Stream:
        rng = self.rng
        kinds = list(MIX)
        weights = list(MIX.values())
        while self.produced < events:
            beats = self.heartbeats
            if (
                self.next_heartbeat < len(beats)
                and beats[self.next_heartbeat][0] <= self.now
            ):
                self.emit("heartbeat", beats[self.next_heartbeat][1])
                self.next_heartbeat += 1
                continue
            # Code calls are cancelled at their station a minute or two later.
            due = [code for code, at in self.open_codes.items() if at <= self.now]
            if due:
                del self.open_codes[due[0]]
                self.emit("cancel", due[0])
                continue
            kind = rng.choices(kinds, weights)[0]
            if kind == "badge":
                self.badge()
            elif kind == "visit":
                self.emit("visit", f"door-{rng.choice(self.zones)}")
            elif kind == "reading":
                self.reading()
            elif kind == "feedback":
                self.feedback()
            elif kind == "call":
                self.call()
            elif kind == "cancel":
                self.cancel()
            elif kind == "ack":
                self.answer(ACK)
            elif kind == "resolve":
                self.answer(RESOLVE)
            else:
                self.emit("cleaned", f"clean-{rng.choice(self.zones)}")
        self._batch_end()
        opened = len(self.open["cb"]) + len(self.open["pc"])
        return Stream(self.preload, self.ops, self.counts, self.now, opened)


def make_stream(
    plan: Plan,
    site: dict[str, Any],
    events: int,
    preload: int,
    step: float,
    batch: int,
    seed: int,
) -> Stream:
    return StreamMaker(plan, site, preload, step, batch, seed).make(events)


# -- one repeat, in its own process ---------------------------------------------


class Clock:
    """The engine's time: the bench sets ``now`` before each call."""

    __slots__ = ("now",)

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class GcWatch:
    """Time spent in Python's garbage collector while the stream runs."""

    def __init__(self) -> None:
        self.started = 0
        self.pauses: list[tuple[int, int]] = []

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self.started = time.perf_counter_ns()
        else:
            self.pauses.append(
                (info["generation"], time.perf_counter_ns() - self.started)
            )

    def summary(self) -> dict[str, Any]:
        by_gen = {g: [ns for gen, ns in self.pauses if gen == g] for g in (0, 1, 2)}
        return {
            "collections": {str(g): len(ns) for g, ns in by_gen.items()},
            "total_ms": round(sum(ns for _, ns in self.pauses) / 1e6, 2),
            "max_pause_us": round(
                max((ns for _, ns in self.pauses), default=0) / 1e3, 1
            ),
            "full_collection_max_us": round(max(by_gen[2], default=0) / 1e3, 1),
        }


def percentile(ordered: list[int] | array, q: float) -> float:
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[index]


def latency_stats(ns: list[int]) -> dict[str, Any]:
    ordered = sorted(ns)
    n = len(ordered)
    if not n:
        return {"n": 0}
    return {
        "n": n,
        "mean_us": round(sum(ordered) / n / 1e3, 2),
        "p50_us": round(percentile(ordered, 50) / 1e3, 2),
        "p90_us": round(percentile(ordered, 90) / 1e3, 2),
        "p99_us": round(percentile(ordered, 99) / 1e3, 2),
        "p99_9_us": round(percentile(ordered, 99.9) / 1e3, 2) if n >= 5000 else None,
        "max_us": round(ordered[-1] / 1e3, 2),
        "total_ms": round(sum(ordered) / 1e6, 2),
    }


def pin(core: int | None) -> list[int] | None:
    if core is None or not hasattr(os, "sched_setaffinity"):
        return None
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, {core})
    return sorted(os.sched_getaffinity(0))


def machine_busy_seconds() -> float:
    """CPU seconds all cores have spent busy since boot (Linux /proc/stat)."""
    try:
        with open("/proc/stat") as stat:
            ticks = [int(value) for value in stat.readline().split()[1:]]
    except OSError:
        return float("nan")
    idle = ticks[3] + ticks[4]
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def build_engine(
    site: dict[str, Any], rules: list[dict[str, Any]], clock: Clock
) -> tuple[Engine, dict[str, float]]:
    began = time.perf_counter()
    parsed_site = Site.model_validate(site)
    parsed_rules = parse_rules(rules)
    validated = time.perf_counter()
    engine = Engine(parsed_site, parsed_rules, clock, counter_ids(), ZoneInfo(TZ))
    built = time.perf_counter()
    return engine, {
        "validate_s": round(validated - began, 3),
        "engine_init_s": round(built - validated, 3),
    }


def preload(
    engine: Engine, clock: Clock, calls: list[tuple[float, Event]]
) -> dict[str, str]:
    """Open the preloaded calls as the gateway would; return device -> alert id."""
    ids: dict[str, str] = {}
    for i, (at, event) in enumerate(calls):
        clock.now = at
        for action in engine.on_event(event):
            ids[event.device] = action.alert.id  # type: ignore[union-attr]
        if i % 10 == 9:
            engine.advance()
            engine.take_dirty()
    clock.now = T0
    engine.advance()
    engine.take_dirty()
    return ids


def run_stream(
    engine: Engine, clock: Clock, stream: Stream, ids: dict[str, str]
) -> dict[str, Any]:
    """Replay the stream, timing every call; return the raw numbers."""
    ops = stream.ops
    latency = array("q", bytes(8 * len(ops)))
    refused: dict[str, int] = {}
    from_inputs: dict[str, int] = {}
    from_timers: dict[str, int] = {}
    on_event = engine.on_event
    acknowledge = engine.acknowledge
    resolve = engine.resolve
    advance = engine.advance
    take_dirty = engine.take_dirty
    ticks = time.perf_counter_ns
    watch = GcWatch()
    gc.callbacks.append(watch)
    busy = machine_busy_seconds()
    cpu = time.process_time()
    began = time.perf_counter()
    try:
        for i, (op, at, a, b) in enumerate(ops):
            clock.now = at
            try:
                if op == EVENT:
                    start = ticks()
                    result = on_event(a)
                    latency[i] = ticks() - start
                elif op == ADVANCE:
                    start = ticks()
                    result = advance()
                    latency[i] = ticks() - start
                    for action in result:
                        kind = getattr(action, "kind", "kudos")
                        from_timers[kind] = from_timers.get(kind, 0) + 1
                    continue
                elif op == DIRTY:
                    start = ticks()
                    take_dirty()
                    latency[i] = ticks() - start
                    continue
                elif op == ACK:
                    alert_id = ids.get(a, "gone")
                    start = ticks()
                    result = acknowledge(alert_id, b, "pager")
                    latency[i] = ticks() - start
                else:
                    alert_id = ids.get(a, "gone")
                    start = ticks()
                    result = resolve(alert_id, b, "pager")
                    latency[i] = ticks() - start
                for action in result:
                    kind = getattr(action, "kind", "kudos")
                    from_inputs[kind] = from_inputs.get(kind, 0) + 1
            except EngineError as exc:
                latency[i] = ticks() - start
                refused[exc.reason] = refused.get(exc.reason, 0) + 1
        wall = time.perf_counter() - began
    finally:
        gc.callbacks.remove(watch)
    cpu = time.process_time() - cpu
    busy = machine_busy_seconds() - busy

    per_kind: dict[str, list[int]] = {}
    inputs: list[int] = []
    for (op, _, a, _), ns in zip(ops, latency, strict=True):
        if op == EVENT:
            name = a.type
            inputs.append(ns)
        else:
            name = OP_NAMES[op]
            if op in (ACK, RESOLVE):
                inputs.append(ns)
        per_kind.setdefault(name, []).append(ns)
    engine_s = sum(latency) / 1e9
    n = len(inputs)
    return {
        "inputs": n,
        "wall_s": round(wall, 4),
        "events_per_s": round(n / wall),
        "engine_s": round(engine_s, 4),
        "events_per_engine_s": round(n / engine_s),
        "latency": latency_stats(inputs),
        "by_kind": {name: latency_stats(ns) for name, ns in sorted(per_kind.items())},
        "refused": refused,
        "actions_from_inputs": dict(sorted(from_inputs.items())),
        "actions_from_timers": dict(sorted(from_timers.items())),
        "gc": watch.summary(),
        "cpu_s": round(cpu, 3),
        "others_cores": round(max(0.0, busy - cpu) / wall, 2) if wall else None,
    }


def one_repeat(
    site: dict[str, Any],
    rules: list[dict[str, Any]],
    stream: Stream,
    core: int | None,
    profile: bool,
) -> dict[str, Any]:
    affinity = pin(core)
    clock = Clock(T0 - PRELOAD_SPAN)
    engine, build = build_engine(site, rules, clock)
    began = time.perf_counter()
    ids = preload(engine, clock, stream.preload)
    build["preload_s"] = round(time.perf_counter() - began, 3)
    open_before = len(engine.alerts)
    timers_before = engine.pending_timers
    gc.collect()
    profiler = cProfile.Profile() if profile else None
    if profiler is not None:
        profiler.enable()
    result = run_stream(engine, clock, stream, ids)
    if profiler is not None:
        profiler.disable()
        result["profile"] = profile_summary(profiler)
    result.update(build)
    result["affinity"] = affinity
    result["open_alerts_before"] = open_before
    result["open_alerts_after"] = len(engine.alerts)
    result["timers_before"] = timers_before
    result["timers_after"] = engine.pending_timers
    return result


def profile_summary(profiler: cProfile.Profile, top: int = 30) -> dict[str, Any]:
    stats = pstats.Stats(profiler)
    rows = []
    entries = stats.stats.items()  # type: ignore[attr-defined]
    for (path, line, name), (_, calls, tottime, cumtime, _) in entries:
        rows.append(
            {
                "function": f"{_short(path)}:{line}({name})",
                "calls": calls,
                "tottime_s": round(tottime, 4),
                "cumtime_s": round(cumtime, 4),
            }
        )
    by_self = sorted(rows, key=lambda r: -r["tottime_s"])[:top]
    by_total = sorted(rows, key=lambda r: -r["cumtime_s"])[:top]
    return {"by_self_time": by_self, "by_cumulative_time": by_total}


def _short(path: str) -> str:
    with contextlib.suppress(ValueError):
        return str(Path(path).resolve().relative_to(REPO))
    return Path(path).name if path.startswith("/") else path


# -- 100,000 timers due together ---------------------------------------------------


def timer_queue_bench(n: int, seed: int, core: int | None) -> dict[str, Any]:
    """TimerQueue alone: n sets, n/2 cancels, then pop_due of everything."""
    pin(core)
    rng = random.Random(seed)
    dues = [rng.uniform(0, 1000) for _ in range(n)]
    keys = [("alert", f"a{i}") for i in range(n)]
    doomed = rng.sample(keys, n // 2)
    ticks = time.perf_counter_ns
    gc.collect()

    queue = TimerQueue()
    began = ticks()
    for key, due in zip(keys, dues, strict=True):
        queue.set(key, due)
    set_ns = ticks() - began
    began = ticks()
    for key in doomed:
        queue.cancel(key)
    cancel_ns = ticks() - began
    began = ticks()
    popped = sum(1 for _ in queue.pop_due(math.inf))
    pop_ns = ticks() - began

    # Moving every timer once, as a heartbeat or a reschedule does.
    for key, due in zip(keys, dues, strict=True):
        queue.set(key, due)
    began = ticks()
    for key, due in zip(keys, dues, strict=True):
        queue.set(key, due + 300)
    move_ns = ticks() - began

    # All due at one instant: a restart after downtime, or one busy second.
    same = TimerQueue()
    for key in keys:
        same.set(key, 1.0)
    began = ticks()
    popped_same = sum(1 for _ in same.pop_due(1.0))
    pop_same_ns = ticks() - began
    return {
        "timers": n,
        "set_ns_per_op": round(set_ns / n, 1),
        "cancel_ns_per_op": round(cancel_ns / len(doomed), 1),
        "popped": popped,
        "pop_due_ns_per_live_timer": round(pop_ns / max(1, popped), 1),
        "pop_due_total_ms": round(pop_ns / 1e6, 2),
        "move_ns_per_op": round(move_ns / n, 1),
        "pop_due_same_instant_ns_per_timer": round(
            pop_same_ns / max(1, popped_same), 1
        ),
    }


def engine_timer_bench(n: int, core: int | None) -> dict[str, Any]:
    """n open calls whose second level falls due at one instant; one advance().

    The call rules are the stream's (level 2 pages the charge nurses on
    duty), with level 2 after 90 s; every call opens at the same instant.
    """
    pin(core)
    plan = Plan(beds=math.ceil(n / (Plan.zones * Plan.rooms)))
    site = make_site(plan)
    site["devices"] = [d for d in site["devices"] if d["kind"] == "call_button"]
    rules = [
        {
            "name": f"call-{i:03d}",
            "devices": {"kind": "call_button", "zones": zones},
            "levels": [
                {"after": "0s", "roles": [_ward(zones)], "remind_every": "10m"},
                {"after": "90s", "roles": ["charge_nurse"], "remind_every": "15m"},
                {"after": "30m", "staff": [_manager(zones)]},
            ],
            "ack_timeout": "10m",
        }
        for i, zones in _spread(50, plan.zones)
    ]
    clock = Clock(T0)
    engine, build = build_engine(site, rules, clock)
    events = [
        Event(f"c{i}", "call", device, T0)
        for i, device in enumerate(plan.call_buttons()[:n])
    ]
    gc.collect()
    began = time.perf_counter()
    for event in events:
        engine.on_event(event)
    open_s = time.perf_counter() - began
    due = engine.due()
    clock.now = T0 + 90
    gc.collect()
    watch = GcWatch()
    gc.callbacks.append(watch)
    began = time.perf_counter()
    try:
        actions = engine.advance()
    finally:
        advance_s = time.perf_counter() - began
        gc.callbacks.remove(watch)
    notifications = sum(len(getattr(a, "notifications", ())) for a in actions)
    return {
        "alerts": len(engine.alerts),
        "first_due_after_open_s": None if due is None else round(due - T0, 3),
        "build": build,
        "open_us_per_call": round(open_s / n * 1e6, 2),
        "advance_s": round(advance_s, 3),
        "advance_us_per_timer": round(advance_s / max(1, len(actions)) * 1e6, 2),
        "actions": len(actions),
        "escalated": sum(1 for a in actions if getattr(a, "kind", "") == "escalated"),
        "notifications": notifications,
        "gc_during_advance": watch.summary(),
    }


# -- aggregation and output ----------------------------------------------------------


def in_child(function: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """Run ``function(*args)`` in a forked process and return its result."""
    context = multiprocessing.get_context("fork")
    with context.Pool(1) as pool:
        return pool.apply(function, args)


def spread_of(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 2),
        "min": round(min(values), 2),
        "max": round(max(values), 2),
    }


def summarize(repeats: list[dict[str, Any]]) -> dict[str, Any]:
    def pick(*path: str) -> list[float]:
        found = []
        for run in repeats:
            value: Any = run
            for key in path:
                value = value[key]
            found.append(value)
        return found

    summary: dict[str, Any] = {
        "events_per_s": spread_of(pick("events_per_s")),
        "events_per_engine_s": spread_of(pick("events_per_engine_s")),
    }
    for stat in ("p50_us", "p90_us", "p99_us", "p99_9_us", "max_us"):
        values = pick("latency", stat)
        if None not in values:
            summary[stat] = spread_of(values)
    kinds = sorted(repeats[0]["by_kind"])
    summary["by_kind"] = {
        kind: {
            stat: spread_of(pick("by_kind", kind, stat))
            for stat in ("n", "p50_us", "p99_us", "max_us", "total_ms")
        }
        for kind in kinds
    }
    summary["gc_total_ms"] = spread_of(pick("gc", "total_ms"))
    summary["gc_max_pause_us"] = spread_of(pick("gc", "max_pause_us"))
    summary["engine_init_s"] = spread_of(pick("engine_init_s"))
    summary["others_cores"] = spread_of(pick("others_cores"))
    return summary


def cell(value: dict[str, float], digits: int = 1) -> str:
    fmt = f"{{:,.{digits}f}}"
    return (
        f"{fmt.format(value['median'])} "
        f"({fmt.format(value['min'])}–{fmt.format(value['max'])})"
    )


def markdown(results: dict[str, Any]) -> str:
    s = results["summary"]
    p = results["parameters"]
    verdict = results["target"]
    lines = [
        f"Median of {p['repeat']} repeat(s), (min–max) across repeats; "
        f"{p['events']:,} inputs after {p['preload']:,} open alerts; "
        "latency in µs.",
        "",
        "| metric | value |",
        "|---|---:|",
        f"| events/s (wall, whole stream) | {cell(s['events_per_s'], 0)} |",
        f"| events/s (engine time only) | {cell(s['events_per_engine_s'], 0)} |",
    ]
    for stat in ("p50_us", "p90_us", "p99_us", "p99_9_us", "max_us"):
        if stat in s:
            label = stat[:-3].replace("_", ".")
            lines.append(f"| per-input {label} | {cell(s[stat])} |")
    lines += [
        f"| GC time in stream, ms | {cell(s['gc_total_ms'])} |",
        f"| longest GC pause | {cell(s['gc_max_pause_us'])} |",
        f"| Engine() construction, s | {cell(s['engine_init_s'], 2)} |",
        f"| other load on the machine, cores | {cell(s['others_cores'], 2)} |",
        "",
        f"Target ≥ {TARGET_EVENTS_PER_S:,} events/s and p99 < {TARGET_P99_US:g} µs: "
        f"**{'met' if verdict['met'] else 'NOT met'}** "
        f"({verdict['events_per_s']:,} events/s, p99 {verdict['p99_us']} µs).",
        "",
        "| input | count | p50 | p99 | max | share of engine time |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    total = sum(k["total_ms"]["median"] for k in s["by_kind"].values())
    for kind, k in sorted(
        s["by_kind"].items(), key=lambda kv: -kv[1]["total_ms"]["median"]
    ):
        share = k["total_ms"]["median"] / total * 100 if total else 0.0
        lines.append(
            f"| {kind} | {k['n']['median']:,.0f} | {k['p50_us']['median']:.1f} "
            f"| {k['p99_us']['median']:.1f} | {k['max_us']['median']:,.0f} "
            f"| {share:.1f} % |"
        )
    first = results["repeats"][0]

    def listed(counts: dict[str, int]) -> str:
        return ", ".join(f"{kind} {n:,}" for kind, n in counts.items()) or "none"

    lines += [
        "",
        f"Open alerts {first['open_alerts_before']:,} before the stream, "
        f"{first['open_alerts_after']:,} after; pending timers "
        f"{first['timers_before']:,} → {first['timers_after']:,}. "
        f"Fake time covered: {p['fake_time_s']:,.0f} s.",
        f"Changes caused by inputs: {listed(first['actions_from_inputs'])}.",
        f"Changes from timers (advance): {listed(first['actions_from_timers'])}.",
        f"Refused inputs: {listed(first['refused'])}.",
    ]
    timers = results.get("timers")
    if timers:
        q = timers["queue"]
        e = timers["engine"]
        n = results["parameters"]["timers"]
        lines += [
            "",
            f"| {n:,} timers | median (min–max) |",
            "|---|---:|",
            f"| TimerQueue.set, ns/op | {cell(q['set_ns_per_op'], 0)} |",
            f"| TimerQueue.cancel, ns/op | {cell(q['cancel_ns_per_op'], 0)} |",
            "| TimerQueue.pop_due of all (half cancelled), ns per live timer "
            f"| {cell(q['pop_due_ns_per_live_timer'], 0)} |",
            "| TimerQueue.set moving an existing key, ns/op "
            f"| {cell(q['move_ns_per_op'], 0)} |",
            "| TimerQueue.pop_due, all due at one instant, ns/timer "
            f"| {cell(q['pop_due_same_instant_ns_per_timer'], 0)} |",
            f"| Engine: one advance() with {e['alerts']:,} escalations due, s "
            f"| {cell(e['advance_s'], 2)} |",
            f"| Engine: per escalation, µs | {cell(e['advance_us_per_timer'])} |",
            f"| Engine: of which garbage collection, ms | {cell(e['gc_ms'], 0)} |",
            f"| Engine: opening a call with {e['alerts']:,} open, µs "
            f"| {cell(e['open_us_per_call'])} |",
        ]
    return "\n".join(lines)


def code_version() -> dict[str, Any]:
    def git(*args: str) -> str:
        result = subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, check=False
        )
        return result.stdout

    changed = git("status", "--porcelain", "--", "rules")
    diff = git("diff", "HEAD", "--", "rules")
    return {
        "commit": git("rev-parse", "HEAD").strip() or None,
        "uncommitted_rules": [line[3:] for line in changed.splitlines()],
        "rules_diff_sha256": hashlib.sha256(diff.encode()).hexdigest()[:16]
        if diff
        else None,
    }


def machine_info() -> dict[str, Any]:
    cpu = None
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "pydantic": importlib.metadata.version("pydantic"),
        "code": code_version(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def write_json(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(json.dumps(results, indent=2) + "\n")
    partial.replace(path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Benchmark the rule engine alone (no MQTT, no SQLite): events per "
            "second and per-event latency on a 500-zone, 1,000-rule site with "
            "10,000 open alerts, and 100,000 timers falling due at once."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--repeat", type=int, default=5, help="fresh processes, one run each"
    )
    parser.add_argument(
        "--events", type=int, default=200_000, help="inputs in the timed stream"
    )
    parser.add_argument(
        "--preload", type=int, default=10_000, help="open calls loaded before timing"
    )
    parser.add_argument(
        "--step-ms", type=float, default=5.0, help="fake-clock step per input"
    )
    parser.add_argument(
        "--batch", type=int, default=10, help="inputs between advance() + take_dirty()"
    )
    parser.add_argument(
        "--timers", type=int, default=100_000, help="timers due together"
    )
    parser.add_argument(
        "--timer-repeat",
        type=int,
        default=1,
        help="runs of the engine-level timer burst (about 30 s each today)",
    )
    parser.add_argument(
        "--no-timers", action="store_true", help="skip the timer benchmarks"
    )
    parser.add_argument(
        "--core", type=int, default=0, help="CPU to pin to; -1: no pinning"
    )
    parser.add_argument(
        "--seed", type=int, default=1, help="seed of the generated inputs"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also run one repeat under cProfile and print its hot spots",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO / "bench" / "results" / "engine.json",
        help="where the JSON results go",
    )
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.events < 1 or args.batch < 1:
        parser.error("--repeat, --events and --batch must be at least 1")
    return args


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    core = None if args.core < 0 else args.core
    began = time.monotonic()
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    info = machine_info()

    plan = Plan()
    site = make_site(plan)
    rules = make_rules(plan)
    stream = make_stream(
        plan,
        site,
        args.events,
        args.preload,
        args.step_ms / 1000,
        args.batch,
        args.seed,
    )
    log(
        f"site: {len(site['zones'])} zones, {len(site['devices'])} devices, "
        f"{len(site['staff'])} staff; {len(rules)} rules; "
        f"{len(stream.ops):,} stream operations over "
        f"{stream.end - T0:.0f} s of fake time"
    )
    # Everything made so far is input, not engine state: keep it out of the
    # collector's way in the children, as the gateway has no such list.
    gc.collect()
    gc.freeze()

    repeats = []
    for repeat in range(1, args.repeat + 1):
        run = in_child(one_repeat, site, rules, stream, core, False)
        run["repeat"] = repeat
        repeats.append(run)
        if run["open_alerts_before"] < args.preload:
            log(f"warning: only {run['open_alerts_before']:,} alerts were open")
        answered = stream.counts.get("acknowledge", 0) + stream.counts.get("resolve", 0)
        if run["refused"].get("unknown_alert", 0) > 0.01 * answered:
            # The generator's model of open calls no longer matches the engine
            # (say, presence resolution changed): answers miss their alerts.
            log(f"warning: refused {run['refused']}: answers miss their alerts")
        log(
            f"repeat {repeat}: {run['events_per_s']:,} events/s, "
            f"p50 {run['latency']['p50_us']} µs, p99 {run['latency']['p99_us']} µs, "
            f"max {run['latency']['max_us']:,} µs, others {run['others_cores']} cores"
        )

    profile = None
    if args.profile:
        log("profiling one more repeat under cProfile ...")
        profiled = in_child(one_repeat, site, rules, stream, core, True)
        profile = profiled["profile"]

    timers = None
    if not args.no_timers:
        log(f"{args.timers:,} timers: TimerQueue alone, {args.repeat} time(s) ...")
        queue_runs = [
            in_child(timer_queue_bench, args.timers, args.seed, core)
            for _ in range(args.repeat)
        ]
        log(f"{args.timers:,} escalations due at once through the engine ...")
        engine_runs = [
            in_child(engine_timer_bench, args.timers, core)
            for _ in range(args.timer_repeat)
        ]
        timers = {
            "queue_runs": queue_runs,
            "queue": {
                key: spread_of([run[key] for run in queue_runs])
                for key in queue_runs[0]
                if key.endswith(("_per_op", "_per_live_timer", "_per_timer", "_ms"))
            },
            "engine_runs": engine_runs,
            "engine": {
                key: spread_of([run[key] for run in engine_runs])
                for key in ("advance_s", "advance_us_per_timer", "open_us_per_call")
            },
        }
        timers["engine"]["gc_ms"] = spread_of(
            [run["gc_during_advance"]["total_ms"] for run in engine_runs]
        )
        timers["engine"]["alerts"] = engine_runs[0]["alerts"]
        timers["engine"]["notifications"] = engine_runs[0]["notifications"]

    summary = summarize(repeats)
    verdict = {
        "events_per_s": summary["events_per_s"]["median"],
        "p99_us": summary["p99_us"]["median"],
    }
    verdict["met"] = (
        verdict["events_per_s"] >= TARGET_EVENTS_PER_S
        and verdict["p99_us"] < TARGET_P99_US
    )
    results = {
        "started_at": started_at,
        "wall_s": None,
        "machine": info,
        "parameters": {
            "repeat": args.repeat,
            "events": args.events,
            "preload": args.preload,
            "step_ms": args.step_ms,
            "batch": args.batch,
            "timers": args.timers,
            "core": core,
            "seed": args.seed,
            "zones": plan.zones,
            "rooms": plan.zones * plan.rooms,
            "devices": len(site["devices"]),
            "staff": len(site["staff"]),
            "badges": sum(1 for m in site["staff"] if "badge" in m),
            "rules": len(rules),
            "rule_kinds": _rule_kinds(rules),
            "stream_inputs": stream.counts,
            "fake_time_s": round(stream.end - T0, 1),
            "time_zone": TZ,
            "clock": "time.perf_counter / perf_counter_ns, one process per repeat",
        },
        "target": {
            "events_per_s": TARGET_EVENTS_PER_S,
            "p99_us": TARGET_P99_US,
            **verdict,
        },
        "repeats": repeats,
        "summary": summary,
        "timers": timers,
        "profile": profile,
    }
    results["wall_s"] = round(time.monotonic() - began, 1)
    write_json(args.out, results)
    print(markdown(results))
    if profile:
        print()
        print(profile_markdown(profile))
    log(f"wrote {args.out} in {results['wall_s']:.0f}s")
    return 0


def _rule_kinds(rules: list[dict[str, Any]]) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for rule in rules:
        kind = rule.get("kind", "call")
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def profile_markdown(profile: dict[str, Any], top: int = 15) -> str:
    lines = ["cProfile of one more repeat (profiling inflates times; compare shares)."]
    for title, key in (
        ("self time", "by_self_time"),
        ("cumulative time", "by_cumulative_time"),
    ):
        lines += [
            "",
            f"| function, by {title} | calls | self s | cumulative s |",
            "|---|---:|---:|---:|",
        ]
        for row in profile[key][:top]:
            lines.append(
                f"| `{row['function']}` | {row['calls']:,} | {row['tottime_s']:.3f} "
                f"| {row['cumtime_s']:.3f} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
