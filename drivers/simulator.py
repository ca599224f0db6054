"""A simulated ward: patients press call buttons, staff answer from pagers.

It talks to the gateway only through the broker, exactly as real call
stations and pagers do, so the demo exercises the same code path as a site.
Staff behaviour is random but plausible: most calls are acknowledged within
seconds and resolved a little later, some are cancelled at the bedside, and
some go unanswered long enough to escalate.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import socket
import time
import uuid
from dataclasses import dataclass

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

log = logging.getLogger("sim")


@dataclass(frozen=True)
class Bed:
    device: str
    room: str


@dataclass(frozen=True)
class Person:
    id: str
    name: str
    roles: tuple[str, ...]


@dataclass
class Behaviour:
    """How the simulated people act; seconds unless named otherwise."""

    call_every: tuple[float, float] = (4.0, 9.0)
    answer_after: tuple[float, float] = (3.0, 12.0)
    work_for: tuple[float, float] = (4.0, 10.0)
    unanswered_share: float = 0.25
    """Share of calls level 1 ignores, so they escalate."""

    cancelled_share: float = 0.15
    """Share of calls the patient cancels at the bedside."""


class SimulatedWard:
    """Drives call buttons and pagers for the beds and staff it is given."""

    def __init__(
        self,
        site: str,
        beds: list[Bed],
        staff: list[Person],
        host: str,
        port: int,
        username: str | None = None,
        password: str | None = None,
        behaviour: Behaviour | None = None,
        seed: int | None = None,
    ) -> None:
        self._site = site
        self._beds = beds
        self._staff = staff
        self._behaviour = behaviour or Behaviour()
        self._rng = random.Random(seed)
        self._host = host
        self._port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handled: set[str] = set()
        self._ignored: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()

        client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"sim-{uuid.uuid4().hex[:8]}"
        )
        if username:
            client.username_pw_set(username, password)
        client.on_socket_open = _no_delay
        client.on_connect = self._on_connect
        client.on_message = self._on_message
        self._client = client

    async def run(self) -> None:
        """Press buttons until cancelled."""
        self._loop = asyncio.get_running_loop()
        self._client.connect_async(self._host, self._port, keepalive=15)
        self._client.loop_start()
        try:
            # The first patient calls soon after start, so a newcomer sees
            # something happen at once; then calls come every few seconds.
            await asyncio.sleep(self._rng.uniform(1.0, 2.0))
            while True:
                self._press(self._rng.choice(self._beds), "call")
                await asyncio.sleep(self._rng.uniform(*self._behaviour.call_every))
        finally:
            for task in self._tasks:
                task.cancel()
            self._client.disconnect()
            self._client.loop_stop()

    # -- buttons ----------------------------------------------------------------------

    def _press(self, bed: Bed, kind: str) -> None:
        event = {
            "id": uuid.uuid4().hex,
            "type": kind,
            "device": bed.device,
            "ts": time.time(),
        }
        topic = f"facility/{self._site}/devices/{bed.device}/events"
        self._client.publish(topic, json.dumps(event), qos=1)
        verb = "pressed call" if kind == "call" else "pressed cancel"
        log.info("%s %s", bed.room, verb)

    # -- pagers ----------------------------------------------------------------------

    def _on_connect(self, client: paho.Client, *args: object) -> None:
        client.subscribe(f"facility/{self._site}/pagers/+", qos=1)

    def _on_message(
        self, client: paho.Client, userdata: object, message: paho.MQTTMessage
    ) -> None:
        if self._loop is None:
            return
        note = json.loads(message.payload)
        self._loop.call_soon_threadsafe(self._on_page, note)

    def _on_page(self, note: dict[str, object]) -> None:
        alert = str(note["alert"])
        if note["reason"] not in ("opened", "escalated") or alert in self._handled:
            return
        role = str(note.get("level", 1))
        behaviour = self._behaviour
        if note["reason"] == "opened":
            draw = self._rng.random()
            if draw < behaviour.cancelled_share:
                self._handled.add(alert)
                self._spawn(self._cancel_at_bedside(alert, str(note["device"])))
                return
            if draw < behaviour.cancelled_share + behaviour.unanswered_share:
                log.debug("Nobody answers alert %s at level %s", alert, role)
                return
        self._handled.add(alert)
        self._spawn(self._answer(alert, note))

    async def _answer(self, alert: str, note: dict[str, object]) -> None:
        behaviour = self._behaviour
        person = self._someone_for(note)
        await asyncio.sleep(self._rng.uniform(*behaviour.answer_after))
        self._command(alert, "ack", person)
        await asyncio.sleep(self._rng.uniform(*behaviour.work_for))
        self._command(alert, "resolve", person)

    async def _cancel_at_bedside(self, alert: str, device: str) -> None:
        await asyncio.sleep(self._rng.uniform(2.0, 6.0))
        bed = next(bed for bed in self._beds if bed.device == device)
        self._press(bed, "cancel")

    def _someone_for(self, note: dict[str, object]) -> Person:
        target = str(note.get("target", ""))
        level = int(str(note.get("level", 1)))
        # The pager topic names a role; pick someone who has it, or anyone.
        wanted = [p for p in self._staff if target in p.roles or p.id == target]
        if not wanted:
            wanted = self._staff[: max(1, level)]
        return self._rng.choice(wanted)

    def _command(self, alert: str, verb: str, person: Person) -> None:
        topic = f"facility/{self._site}/alerts/{alert}/{verb}"
        body = {"id": uuid.uuid4().hex, "staff": person.id}
        self._client.publish(topic, json.dumps(body), qos=1)

    def _spawn(self, coro: object) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _no_delay(client: paho.Client, userdata: object, sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
