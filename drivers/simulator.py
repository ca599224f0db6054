"""A simulated facility: a ward with call buttons and a restroom with sensors.

The people are the same whichever way their actions reach the gateway:

* :class:`MqttOutlet` acts as real devices and pagers do, over the broker
  (the demo: the same code path as a site, acknowledgements included);
* :class:`SimulatorDriver` is a driver like the GPIO or serial ones: its
  events go straight to the gateway through ``emit``, and it learns of
  alerts the way a dome light does, through ``show_alert``. Its staff have
  no pagers, so they answer in person: a badge walking in, or the cancel
  button at the bedside. Load tests and the footprint benchmark use it.

What happens:

* patients press call buttons; nurses answer from their pagers after a few
  seconds, some by walking in (their badge resolves the call), some by
  tapping resolve; some calls are cancelled at the bedside, and some go
  unanswered long enough to escalate; now and then a code call is raised
  and cancelled at its station;
* guests visit the restroom (a people counter), use towels (a dispenser
  that reports its level and a heartbeat) and press a four-smiley feedback
  terminal, less happily as towels run low; a cleaner answers restroom gaps
  by walking in and refilling.

Every device id, room and person comes from the site file, found by device
kind: ``call_button``, ``code_button``, ``people_counter``, ``dispenser``,
``feedback_terminal``, ``ble_receiver``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import socket
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from pydantic import Field

from drivers.base import Emit, make_event
from rules.schema import StrictModel

log = logging.getLogger("sim")


class SimulatorSettings(StrictModel):
    """``simulator:`` in a site file: simulated people act on the site's devices.

    For demos, load tests and benchmarks, never for a live site: the events it
    sends are as real to the engine as a patient's press.
    """

    speed: float = Field(1.0, gt=0, le=1000)
    """How many times faster than real time people act."""

    seed: int | None = None
    """Fix it to replay the same day; leave it out for a new day each run."""

    calls_per_hour: float | None = Field(None, gt=0)
    """Patient calls across the whole site in an average hour; left out, the
    demo's busy pace (one every few seconds) so that something always happens."""

    visits_per_hour: float | None = Field(None, gt=0)
    """Restroom visits across the whole site in an average hour; left out,
    the demo's pace."""

    def behaviour(self, **overrides: Any) -> Behaviour:
        """The people's behaviour these settings ask for."""
        paces: dict[str, Any] = {}
        if self.calls_per_hour is not None:
            mean = 3600 / self.calls_per_hour
            paces["call_every"] = (0.5 * mean, 1.5 * mean)
        if self.visits_per_hour is not None:
            mean = 3600 / self.visits_per_hour
            paces["visit_every"] = (0.5 * mean, 1.5 * mean)
        return Behaviour(**paces, **overrides)


@dataclass(frozen=True)
class Device:
    id: str
    kind: str
    room: str | None


@dataclass(frozen=True)
class Person:
    id: str
    name: str
    roles: tuple[str, ...]
    badge: str | None = None


@dataclass
class Behaviour:
    """How the simulated people act; seconds unless named otherwise."""

    call_every: tuple[float, float] = (4.0, 9.0)
    answer_after: tuple[float, float] = (3.0, 10.0)
    work_for: tuple[float, float] = (4.0, 10.0)
    unanswered_share: float = 0.25
    """Share of calls level 1 ignores, so they escalate."""

    cancelled_share: float = 0.15
    """Share of calls the patient cancels at the bedside."""

    walk_in_share: float = 0.5
    """Share of answered calls closed by the nurse's badge, not a tap."""

    code_every: tuple[float, float] = (90.0, 150.0)
    visit_every: tuple[float, float] = (1.5, 4.0)
    towels_per_visit: tuple[float, float] = (1.0, 4.0)
    feedback_share: float = 0.35
    """Share of restroom visitors who press a smiley."""

    heartbeat_every: float = 20.0
    outage_every: tuple[float, float] = (150.0, 240.0)
    """Now and then the dispenser falls silent (a flat battery, a lost
    Wi-Fi link) for ``outage_for`` seconds, long enough for supervision."""

    outage_for: float = 75.0

    visit_at_least: float = 0.0
    """Real seconds a walk-in lasts at least: at ``speed`` above 1 a visit
    would otherwise end before the rule's dwell (real time) has passed."""

    def busyness(self, hour: float) -> float:
        """How busy the ward is at an hour of the day, 1.0 being an average hour.

        Calls bunch up at morning care and meals and thin out at night, so a
        day at ``speed`` shows the peaks a real shift has.
        """
        peaks = ((7.5, 1.0), (12.5, 0.6), (18.0, 0.6), (21.5, 0.4))
        night = 0.35 if hour < 6 or hour >= 23 else 0.8
        return night + sum(
            height * math.exp(-(((hour - at) / 1.2) ** 2)) for at, height in peaks
        )


class SimulatedFacility:
    """The people of a site, acting on its devices, found by kind."""

    def __init__(
        self,
        site: str,
        devices: Iterable[Device],
        staff: Iterable[Person],
        outlet: Outlet,
        behaviour: Behaviour | None = None,
        seed: int | None = None,
        physical: Mapping[tuple[str, str], Callable[[], Awaitable[None]]] | None = None,
        sightings: bool = False,
        speed: float = 1.0,
    ) -> None:
        """Args:
        outlet: how actions reach the gateway (:class:`MqttOutlet`, or the
            ``emit`` of :class:`SimulatorDriver`).
        physical: (device, event type) -> what acting on the device means when
            it is wired to the gateway rather than on MQTT, e.g. a finger on
            a mock GPIO pin or a frame written to a serial hub's port.
        sightings: walk staff in as raw BLE sightings from room receivers
            (the gateway's presence tracker decides), not as enter/leave.
        speed: how many times faster than real time people act (a load
            test); the gateway's own timers still run in real time.
        """
        if speed <= 0:
            raise ValueError(f"speed must be above 0, got {speed}")
        self._speed = speed
        self._silent: set[str] = set()
        self._site = site
        self._devices = list(devices)
        self._staff = list(staff)
        self._behaviour = behaviour or Behaviour()
        self._rng = random.Random(seed)
        self._outlet = outlet
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handled: set[str] = set()
        self._resolved: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._physical = dict(physical or {})
        self._sightings = sightings
        self._towels = {d.id: 70.0 for d in self._of_kind("dispenser")}
        self._last_press: dict[str, float] = {}
        self.actions = 0
        """Device actions taken so far (events sent, frames written, presses)."""

        now = time.localtime()
        self._day_start = now.tm_hour + now.tm_min / 60
        self._started = time.monotonic()

    async def run(self) -> None:
        """Simulate until cancelled."""
        self._loop = asyncio.get_running_loop()
        self._outlet.open(self._loop, self.on_page)
        activities = [self._patients(), self._codes(), self._restroom()]
        activities += [self._heartbeats(d) for d in self._of_kind("dispenser")]
        try:
            await asyncio.gather(*activities)
        finally:
            for task in self._tasks:
                task.cancel()
            self._outlet.close()

    # -- the ward ------------------------------------------------------------------

    async def _patients(self) -> None:
        beds = self._of_kind("call_button")
        if not beds:
            return
        # The first patient calls soon after start, so a newcomer sees
        # something happen at once; then calls come every few seconds.
        await self._wait(self._rng.uniform(1.0, 2.0))
        while True:
            bed = self._rng.choice(beds)
            self._send(bed, "call")
            log.info("%s: patient pressed the call button", bed.room)
            pause = self._rng.uniform(*self._behaviour.call_every)
            await self._wait(pause / self._behaviour.busyness(self._hour()))

    async def _codes(self) -> None:
        stations = self._of_kind("code_button")
        if not stations:
            return
        while True:
            await self._wait(self._rng.uniform(*self._behaviour.code_every))
            station = self._rng.choice(stations)
            self._send(station, "call")
            log.info("%s: CODE call raised at the bedside", station.room)
            await self._wait(self._rng.uniform(15.0, 25.0))
            self._send(station, "cancel")
            log.info(
                "%s: code team cancelled the code call at the station", station.room
            )

    # -- the restroom ----------------------------------------------------------------

    async def _restroom(self) -> None:
        doors = self._of_kind("people_counter")
        if not doors:
            return
        terminals = self._of_kind("feedback_terminal")
        while True:
            await self._wait(self._rng.uniform(*self._behaviour.visit_every))
            door = self._rng.choice(doors)
            self._send(door, "visit")
            self._use_towels(door.room)
            here = [t for t in terminals if t.room == door.room] or terminals
            if here and self._rng.random() < self._behaviour.feedback_share:
                terminal = self._rng.choice(here)
                # One guest at a time: presses closer than a few seconds are
                # what the feedback rule throws away as misuse.
                if time.monotonic() - self._last_press.get(terminal.id, 0.0) > 4.0:
                    self._last_press[terminal.id] = time.monotonic()
                    self._feedback(terminal)

    def _use_towels(self, room: str | None) -> None:
        for dispenser in self._of_kind("dispenser"):
            if dispenser.room != room:
                continue
            used = self._rng.uniform(*self._behaviour.towels_per_visit)
            self._towels[dispenser.id] = max(0.0, self._towels[dispenser.id] - used)
            self._report_towels(dispenser)

    def _report_towels(self, dispenser: Device) -> None:
        level = round(self._towels[dispenser.id], 1)
        self._send(dispenser, "reading", reading="towel_level", value=level)

    def _feedback(self, terminal: Device) -> None:
        low = min(self._towels.values(), default=100.0) < 20.0
        unhappy = self._rng.random() < (0.7 if low else 0.1)
        score = self._rng.choice(
            ["unhappy", "very_unhappy"] if unhappy else ["happy", "very_happy"]
        )
        self._send(terminal, "feedback", score=score)

    async def _heartbeats(self, dispenser: Device) -> None:
        behaviour = self._behaviour
        next_outage = self._rng.uniform(*behaviour.outage_every)
        since_outage = 0.0
        while True:
            await self._wait(behaviour.heartbeat_every)
            since_outage += behaviour.heartbeat_every
            if since_outage >= next_outage:
                log.info("%s: dispenser fell silent (battery)", dispenser.room)
                self._silent.add(dispenser.id)
                await self._wait(behaviour.outage_for)
                self._silent.discard(dispenser.id)
                log.info("%s: dispenser back after a battery swap", dispenser.room)
                since_outage = 0.0
                next_outage = self._rng.uniform(*behaviour.outage_every)
            self._send(dispenser, "heartbeat")

    # -- pages -------------------------------------------------------------------------

    def on_page(self, note: Mapping[str, Any]) -> None:
        """A page reached the staff (on the simulation's loop): act on it."""
        alert = str(note["alert"])
        if note["reason"] == "resolved":
            self._resolved.add(alert)
            return
        reasons = ("opened", "escalated", "released")
        if note["reason"] not in reasons or alert in self._handled:
            return
        if note.get("priority") == "code":
            return  # the code team answers at the bedside and cancels there
        if note.get("device") in {d.id for d in self._of_kind("call_button")}:
            self._on_call(alert, note)
        else:
            self._handled.add(alert)
            self._spawn(self._service_restroom(alert, note))

    def _on_call(self, alert: str, note: Mapping[str, Any]) -> None:
        behaviour = self._behaviour
        if note["reason"] == "opened":
            draw = self._rng.random()
            if draw < behaviour.cancelled_share:
                self._handled.add(alert)
                self._spawn(self._cancel_at_bedside(str(note["device"])))
                return
            if draw < behaviour.cancelled_share + behaviour.unanswered_share:
                return  # nobody answers: it will escalate
        self._handled.add(alert)
        self._spawn(self._answer(alert, note))

    async def _answer(self, alert: str, note: Mapping[str, Any]) -> None:
        behaviour = self._behaviour
        person = self._someone_for(note)
        await self._wait(self._rng.uniform(*behaviour.answer_after))
        paged = self._outlet.command(alert, "ack", person)
        room = note.get("room")
        walk_in = not paged or self._rng.random() < behaviour.walk_in_share
        if person.badge and room and walk_in:
            # Walking in: the badge in the room closes the call by itself.
            await self._visit(person, str(room), self._rng.uniform(8.0, 14.0))
            return
        await self._wait(self._rng.uniform(*behaviour.work_for))
        if not self._outlet.command(alert, "resolve", person):
            self._spawn(self._cancel_at_bedside(str(note["device"])))

    async def _cancel_at_bedside(self, device: str) -> None:
        await self._wait(self._rng.uniform(2.0, 6.0))
        bed = next(d for d in self._devices if d.id == device)
        self._send(bed, "cancel")
        log.info("%s: patient cancelled the call at the bedside", bed.room)

    async def _service_restroom(self, alert: str, note: Mapping[str, Any]) -> None:
        cleaner = self._someone_for(note)
        await self._wait(self._rng.uniform(5.0, 12.0))
        if alert in self._resolved:
            return  # someone else's visit closed it meanwhile
        self._outlet.command(alert, "ack", cleaner)
        # The gap's own restroom; a zone-wide gap sends them to the first one.
        place = note.get("room") or self._restroom_room()
        if cleaner.badge is None or place is None:
            await self._wait(self._rng.uniform(5.0, 10.0))
            self._outlet.command(alert, "resolve", cleaner)
            return
        for dispenser in self._of_kind("dispenser"):
            if dispenser.room == place:
                self._towels[dispenser.id] = 100.0
                self._report_towels(dispenser)
        await self._visit(cleaner, place, self._rng.uniform(10.0, 16.0))
        # The visit resets a count by itself; other gaps need a tap.
        if alert not in self._resolved:
            self._outlet.command(alert, "resolve", cleaner)

    async def _visit(self, person: Person, room: str, stay: float) -> None:
        receiver = self._receiver(room)
        if receiver is None:
            return
        log.info("%s: %s walked in (badge %s)", room, person.name, person.badge)
        if self._sightings:
            # Like an ESP32 receiver: raw sightings, about one a second; the
            # gateway's presence tracker decides when the badge is in and,
            # once they stop, when it has left.
            until = time.monotonic() + stay / self._speed
            while time.monotonic() < until:
                self._sight(receiver, person, self._rng.uniform(-62, -52))
                await self._wait(1.0)
            return
        self._send(receiver, "enter", badge=person.badge, zone=room, rssi=-58)
        await asyncio.sleep(max(stay / self._speed, self._behaviour.visit_at_least))
        self._send(receiver, "leave", badge=person.badge, zone=room)

    def _sight(self, receiver: Device, person: Person, rssi: float) -> None:
        if person.badge is not None:
            self._outlet.sight(receiver.id, person.badge, round(rssi))

    # -- helpers -----------------------------------------------------------------------

    def _someone_for(self, note: Mapping[str, Any]) -> Person:
        target = str(note.get("target", ""))
        # The pager topic names a role or a person; pick someone who fits.
        wanted = [p for p in self._staff if target in p.roles or p.id == target]
        return self._rng.choice(wanted or self._staff)

    def _of_kind(self, kind: str) -> list[Device]:
        return [device for device in self._devices if device.kind == kind]

    def _receiver(self, room: str) -> Device | None:
        receivers = self._of_kind("ble_receiver")
        in_room = [device for device in receivers if device.room == room]
        return (in_room or receivers or [None])[0]

    def _restroom_room(self) -> str | None:
        doors = self._of_kind("people_counter")
        return doors[0].room if doors else None

    async def _wait(self, seconds: float) -> None:
        """Sleep simulated seconds: real ones divided by the speed factor."""
        await asyncio.sleep(seconds / self._speed)

    def _send(self, device: Device, kind: str, **fields: Any) -> None:
        if device.id in self._silent:
            return  # a silent device sends nothing at all
        self.actions += 1
        physical = self._physical.get((device.id, kind))
        if physical is not None:
            # Wired to the gateway itself (a GPIO pin, a serial hub): act on
            # the hardware stand-in instead.
            self._spawn(physical())
            return
        self._outlet.send(device.id, kind, fields)

    def _hour(self) -> float:
        """The hour of the simulated day, which runs ``speed`` times fast."""
        hours = (time.monotonic() - self._started) * self._speed / 3600
        return (self._day_start + hours) % 24

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class Outlet(Protocol):
    """How the simulated people's actions reach the gateway."""

    def open(
        self,
        loop: asyncio.AbstractEventLoop,
        on_page: Callable[[Mapping[str, Any]], None],
    ) -> None:
        """Start; call ``on_page`` on ``loop`` for each page staff receive."""

    def close(self) -> None:
        """Stop; safe to call twice."""

    def send(self, device: str, kind: str, fields: Mapping[str, Any]) -> None:
        """A device reports an event."""

    def sight(self, receiver: str, badge: str, rssi: int) -> None:
        """A BLE receiver hears a badge."""

    def command(self, alert: str, verb: str, person: Person) -> bool:
        """A person acks or resolves from a pager; False if they carry none."""


class MqttOutlet:
    """Devices and pagers on the broker, exactly as on a site."""

    def __init__(
        self,
        site: str,
        host: str,
        port: int,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self._site = site
        self._host = host
        self._port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_page: Callable[[Mapping[str, Any]], None] | None = None
        client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"sim-{uuid.uuid4().hex[:8]}"
        )
        if username:
            client.username_pw_set(username, password)
        client.on_socket_open = _no_delay
        client.on_connect = self._on_connect
        client.on_message = self._on_message
        self._client = client

    def open(
        self,
        loop: asyncio.AbstractEventLoop,
        on_page: Callable[[Mapping[str, Any]], None],
    ) -> None:
        self._loop, self._on_page = loop, on_page
        self._client.connect_async(self._host, self._port, keepalive=15)
        self._client.loop_start()

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def send(self, device: str, kind: str, fields: Mapping[str, Any]) -> None:
        event = {
            "id": uuid.uuid4().hex,
            "type": kind,
            "device": device,
            "ts": time.time(),
            **fields,
        }
        topic = f"facility/{self._site}/devices/{device}/events"
        self._client.publish(topic, json.dumps(event), qos=1)

    def sight(self, receiver: str, badge: str, rssi: int) -> None:
        body = {"badge": badge, "rssi": rssi, "ts": time.time()}
        topic = f"facility/{self._site}/devices/{receiver}/sightings"
        self._client.publish(topic, json.dumps(body), qos=0)

    def command(self, alert: str, verb: str, person: Person) -> bool:
        # A pager speaks for its own person, on that person's staff topic.
        topic = f"facility/{self._site}/staff/{person.id}/{verb}"
        body = {"id": uuid.uuid4().hex, "alert": alert}
        self._client.publish(topic, json.dumps(body), qos=1)
        return True

    def _on_connect(self, client: paho.Client, *args: object) -> None:
        client.subscribe(f"facility/{self._site}/pagers/+", qos=1)

    def _on_message(
        self, client: paho.Client, userdata: object, message: paho.MQTTMessage
    ) -> None:
        if self._loop is None or self._on_page is None or not message.payload:
            return
        note = json.loads(message.payload)
        self._loop.call_soon_threadsafe(self._on_page, note)


class SimulatorDriver:
    """A simulated facility behind the driver interface, on a thread of its own.

    Its events reach the gateway through ``emit`` like any driver's, and it
    learns of alerts from ``show_alert``, as a dome light does. Nobody carries
    a pager here: staff answer by walking in (their badge resolves the call)
    or by the cancel button at the bedside.
    """

    def __init__(
        self,
        site: str,
        devices: Iterable[Device],
        staff: Iterable[Person],
        behaviour: Behaviour | None = None,
        seed: int | None = None,
        speed: float = 1.0,
        answerers: Mapping[str, Iterable[str]] | None = None,
    ) -> None:
        """Args:
        answerers: rule name -> the roles that answer its alerts in person
            (those whose badge resolves it); anyone answers other alerts.
        """
        self.name = "simulator"
        self._answerers = {
            rule: list(roles) for rule, roles in (answerers or {}).items()
        }
        self._rng = random.Random(seed)
        self._facility = SimulatedFacility(
            site, devices, staff, self, behaviour, seed=seed, speed=speed
        )
        self._speed = speed
        self._emit: Emit | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_page: Callable[[Mapping[str, Any]], None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._thread: threading.Thread | None = None
        self._seen: set[str] = set()
        self._pages = 0

    # -- the driver interface --------------------------------------------------------

    def start(self, emit: Emit) -> None:
        self._emit = emit
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name="simulator", daemon=True
        )
        self._thread.start()
        ready.wait(5.0)

    def stop(self) -> None:
        loop, task = self._loop, self._task
        if loop is not None and task is not None and not loop.is_closed():
            loop.call_soon_threadsafe(task.cancel)
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None

    def health(self) -> Mapping[str, Any]:
        return {
            "running": self._thread is not None and self._thread.is_alive(),
            "speed": self._speed,
            "actions": self._facility.actions,
            "alerts_seen": self._pages,
        }

    def show_alert(self, alert: Mapping[str, Any]) -> None:
        """Turn an alert's state into the page the simulated staff react to."""
        loop, on_page = self._loop, self._on_page
        if loop is None or on_page is None or loop.is_closed():
            return
        state = alert.get("state")
        if state == "resolved":
            reason = "resolved"
        elif state == "escalated":
            reason = "escalated"
        elif state == "open" and alert["id"] not in self._seen:
            self._seen.add(str(alert["id"]))
            reason = "opened"
        else:
            return
        self._pages += 1
        note = {
            "alert": alert["id"],
            "reason": reason,
            "priority": alert.get("priority"),
            "device": alert.get("device"),
            "room": alert.get("room"),
            # Pages go to roles; pick one of those who can close this gap.
            "target": self._rng.choice(self._answerers.get(alert.get("rule"), [""])),
        }
        loop.call_soon_threadsafe(on_page, note)

    # -- the outlet the facility acts through ------------------------------------------

    def open(
        self,
        loop: asyncio.AbstractEventLoop,
        on_page: Callable[[Mapping[str, Any]], None],
    ) -> None:
        self._loop, self._on_page = loop, on_page

    def close(self) -> None:
        self._on_page = None

    def send(self, device: str, kind: str, fields: Mapping[str, Any]) -> None:
        if self._emit is not None:
            self._emit(make_event(device, kind, **fields))

    def sight(self, receiver: str, badge: str, rssi: int) -> None:
        # Sightings belong to the presence tracker, which this driver does
        # not feed: its facility walks staff in with enter and leave events.
        raise NotImplementedError("the simulator driver sends enter/leave events")

    def command(self, alert: str, verb: str, person: Person) -> bool:
        return False  # no pagers: staff answer in person

    def _run(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._task = loop.create_task(self._facility.run())
        ready.set()
        try:
            loop.run_until_complete(self._task)
        except asyncio.CancelledError:
            pass
        except Exception:  # noqa: BLE001 - a broken simulation must not stop alerting
            log.exception("The simulated facility stopped")
        finally:
            loop.close()


def _no_delay(client: paho.Client, userdata: object, sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
