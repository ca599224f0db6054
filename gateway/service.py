"""The running gateway: wires the broker, the engine, the store and the web page.

Messages arrive on paho's thread and are only queued there. One task on the
asyncio loop drains the queue in batches: every message of a batch goes
through the engine, the whole batch is committed to SQLite in one durable
transaction, and only then are the resulting alert states published. So a
display can never see a state that a power cut could take back, and a burst
of presses costs one disk sync, not one per press.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import sqlite3
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any
from zoneinfo import ZoneInfo

from drivers.base import Driver, make_event
from drivers.mqtt_device import RejectedMessage, decode_json_object, parse_event
from drivers.mqtt_native import NativeDevices
from drivers.presence import PresenceTracker
from gateway import credit, upstream
from gateway.config import GatewayConfig
from gateway.contract import (
    SilenceRequest,
    Topics,
    alert_payload,
    pager_payload,
    parse_command,
    parse_silence,
    parse_staff_command,
)
from gateway.devices import DeviceBook
from gateway.lights import DomeLights
from gateway.metrics import GatewayMetrics
from gateway.mqtt import MQTTLink, Receipt
from gateway.polls import MOOD, Polls, Result, parse_answer
from gateway.rulesets import RuleVersions
from gateway.store import Store, alert_record
from rules.alerts import Action, Change, Kudos
from rules.engine import OFFLINE, Engine, EngineError, UnknownAlert
from rules.events import Event
from rules.schema import PRIORITY_RANK, SupervisionRule

log = logging.getLogger(__name__)
transitions_log = logging.getLogger("gateway.alerts")

DEDUP_WINDOW = 10_000
"""Recent event ids kept to drop QoS 1 redeliveries: a day of a busy ward."""

MAX_BATCH = 500
"""Messages per transaction; bounds how long one commit holds the loop."""

MAX_TIMERS = 500
"""Timers fired per batch; 500 escalations take about 20 ms on a 2-core x86."""

DRIVER_RETRY = (5.0, 60.0)
"""First and longest wait, in seconds, before starting a failed driver again."""

COMMIT_RETRY = (0.5, 5.0)
"""First and longest wait, in seconds, before committing a refused batch again."""

TROUBLE = b"trouble"
"""Retained on the gateway's status topic while its database takes no write."""

Message = tuple[str, bytes, bool, Receipt]
Watcher = Callable[[list[Change]], None]
"""Told of every batch of alert changes right after it is committed."""


class DatabaseTrouble(Exception):
    """A batch whose commit the database refused (locked, full, failing disk).

    Nothing of it was published or acknowledged; ``resume`` commits it again
    and then does the rest, so it is never lost and never half done.
    """

    def __init__(self, error: sqlite3.Error, resume: Callable[[], None]) -> None:
        super().__init__(f"database not writable: {error}")
        self.error = str(error)
        self.resume = resume


class AlreadyResolved(EngineError):
    """A web action on an alert that someone closed a moment before."""

    reason = "alert_resolved"

    def __init__(self, row: dict[str, Any]) -> None:
        self.alert_id = row["id"]
        by = f" by {row['resolved_by']}" if row.get("resolved_by") else ""
        super().__init__(
            f"alert {row['id']} is already resolved{by} "
            f"(via {row.get('resolved_via') or 'unknown'})"
        )


@dataclass
class Command:
    """An action from the web page, carried out on the loop like a message.

    ``done`` is set only after the batch holding it is committed, so the page
    never shows a change that a power cut could take back.
    """

    action: str
    alert_id: str | None
    staff: str | None
    via: str
    options: dict[str, Any]
    done: asyncio.Future[dict[str, Any]]
    result: dict[str, Any] = field(default_factory=dict)

    def fail(self, exc: Exception) -> None:
        if not self.done.done():
            self.done.set_exception(exc)

    def finish(self) -> None:
        if not self.done.done():
            self.done.set_result(self.result)


COMMANDS = ("ack", "resolve", "silence", "unsilence", "rules")

Item = Message | Event | Command
"""What the loop processes: a broker message, an event a driver read, or a
web page's command."""


class Gateway:
    """One site's gateway. ``await run()`` until ``stop()``."""

    def __init__(
        self,
        config: GatewayConfig,
        clock: Callable[[], float] = time.time,
        drivers: Sequence[Driver] = (),
    ) -> None:
        self.config = config
        self.clock = clock
        self.drivers = list(drivers)
        self.topics = Topics(config.site.id, config.gateway.id)
        self.store = Store(config.database.path)
        # The rules that run are the newest saved version (gateway/rulesets.py).
        self.rule_versions = RuleVersions(self.store.db)
        rules, self.rules_version = self.rule_versions.startup(config)
        config = self.config = config.model_copy(update={"rules": rules})
        self.credit_site = credit.CreditSite.from_config(config)
        self.sender = upstream.build_sender(
            config.database.path,
            config.upstream,
            config.retention,
            config.site.id,
            config.gateway.id,
        )
        self.engine = Engine(
            config.physical,
            config.rules,
            clock,
            new_id=_alert_id,
            tz=ZoneInfo(config.site.timezone),
        )
        self.polls = Polls(
            self.store.db,
            config.polls,
            staff=(member.id for member in config.staff),
            tz=ZoneInfo(config.site.timezone),
        )
        self.rejected: Counter[str] = Counter()
        self.driver_failures: dict[str, str] = {}
        """Drivers that could not start (name -> why); retried with backoff."""
        self.driver_retry_at: dict[str, float] = {}
        """When each failed driver is tried again (Unix time)."""
        self.devices = DeviceBook()
        """Last seen, battery and refusals per device, for the devices page."""
        self.accepted = 0
        self.started_at = clock()
        self.trouble: dict[str, Any] | None = None
        """Set while the database refuses commits: what, why and since when."""
        # Response times, commit durations, loop lag: for /metrics.
        self.metrics = GatewayMetrics()

        self._inbox: list[Item] = []
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._ready = asyncio.Event()
        self._resync = False
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._shown_silences: set[str] = set()
        self._watchers: list[Watcher] = []

        self.native = NativeDevices(config.mqtt_devices)
        self._supervision = {
            rule.name for rule in config.rules if isinstance(rule, SupervisionRule)
        }
        self._tracker = next(
            (d for d in self.drivers if isinstance(d, PresenceTracker)), None
        )
        extra_topics = self.native.topics
        if self._tracker is not None:
            extra_topics += (self.topics.sightings,)
        self.link = MQTTLink(
            config.mqtt,
            self.topics,
            client_id=f"gateway-{config.site.id}-{config.gateway.id}",
            on_message=self._receive,
            on_connected=self._link_up,
            extra_topics=extra_topics,
        )
        # Dome lights of call stations on MQTT; GPIO lights are the driver's.
        self.domes = DomeLights(self.link, self.topics, config, _owned(self.drivers))

    @property
    def ready(self) -> asyncio.Event:
        """Set once the database is open, alerts restored and the loop runs."""
        return self._ready

    # -- lifecycle ------------------------------------------------------------------

    async def run(self) -> None:
        """Restore state, connect, and process until :meth:`stop`."""
        self._loop = asyncio.get_running_loop()
        self._restore()
        self.devices.seed(self.store.db.conn, self.clock())
        self.sender.start()
        # Move everything loaded at start-up (imports, the site file, the
        # restored alerts) out of the collector's reach: a full collection
        # over it paused a call for 20-70 ms in the benchmark.
        gc.collect()
        gc.freeze()
        self._restore_presence()
        self.link.start()
        for driver in self.drivers:
            self._start_driver(driver)
        # Lights and displays on drivers show the restored alerts at once.
        self._show_on_drivers(
            [Change(a.snapshot(), "restored") for a in self.engine.alerts]
        )
        self._ready.set()
        # A first turn of the loop at once: a poll may be due this minute.
        self._wake.set()
        try:
            await self._process_forever()
        finally:
            if self._timer is not None:
                self._timer.cancel()
            for driver in self.drivers:
                driver.stop()
            self.link.stop()
            # It may be waiting on an upstream's timeout; not on the loop.
            await asyncio.to_thread(self.sender.stop)
            self.store.close()
            log.info("Gateway stopped")

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    def _start_driver(self, driver: Driver, attempt: int = 0) -> None:
        """Start one driver; if it cannot start, report its devices offline
        and try again later. A pin in use or a missing adapter costs that
        driver's devices, never the alerts of every other source."""
        if self._stopping.is_set():
            return
        try:
            driver.start(self._from_driver)
        except Exception as exc:  # noqa: BLE001 - one source must not stop alerting
            first, longest = DRIVER_RETRY
            delay = min(longest, first * 2**attempt)
            if driver.name not in self.driver_failures:
                log.error(
                    "Driver %s could not start (%s); its devices are reported "
                    "offline, and it is retried every %g s at most",
                    driver.name,
                    exc,
                    longest,
                )
                reason = f"driver could not start: {exc}"
                self._report_devices(driver, OFFLINE, reason=reason)
            self.driver_failures[driver.name] = str(exc)
            self.driver_retry_at[driver.name] = self.clock() + delay
            if self._loop is not None:
                self._loop.call_later(delay, self._start_driver, driver, attempt + 1)
            return
        self.driver_retry_at.pop(driver.name, None)
        if self.driver_failures.pop(driver.name, None) is not None:
            log.info(
                "Driver %s started after %d failed attempt(s)", driver.name, attempt
            )
            # Its devices can be heard again: supervision clears their trouble.
            self._report_devices(driver, "heartbeat")
        else:
            log.info("Started driver %s", driver.name)

    def _report_devices(self, driver: Driver, kind: str, **fields: str) -> None:
        owned = getattr(driver, "device_ids", None)
        for device in sorted(owned() if owned is not None else ()):
            self._enqueue(make_event(device, kind, clock=self.clock, **fields))

    # -- the web page's door -------------------------------------------------------

    async def command(
        self,
        action: str,
        alert_id: str | None = None,
        *,
        staff: str | None = None,
        via: str = "web",
        **options: Any,
    ) -> dict[str, Any]:
        """Acknowledge, resolve, silence or unsilence, and wait for the commit.

        The action joins the loop's queue like a pager's message, so the
        engine changes only on the loop and the result is committed before
        it is published or returned. Refusals raise the engine's error
        (:class:`UnknownAlert`, :class:`StationOnly`, :class:`AlreadyResolved`).
        """
        if action not in COMMANDS:
            raise ValueError(f"unknown command {action!r}; expected one of {COMMANDS}")
        if self._loop is None or self._stopping.is_set():
            raise RuntimeError("the gateway is not running; try again in a moment")
        done: asyncio.Future[dict[str, Any]] = self._loop.create_future()
        self._enqueue(Command(action, alert_id, staff, via, dict(options), done))
        return await done

    def watch(self, watcher: Watcher) -> Callable[[], None]:
        """Call ``watcher`` with every committed batch of changes; returns an undo."""
        self._watchers.append(watcher)
        return lambda: self._watchers.remove(watcher)

    def _restore_presence(self) -> None:
        """Tell the tracker who the engine believes is where, after a restart."""
        if self._tracker is None:
            return
        here = self.engine.dump_state().get("presence") or {}
        pairs = [(badge, place) for place, badges in here.items() for badge in badges]
        refused = self._tracker.restore(pairs)
        receivers = list(self._tracker.estimator.settings.receivers)
        for badge, place in refused:
            # The tracker cannot hold this badge there, so it would never
            # send the leave: send it now, or the badge stays in for ever.
            leave = make_event(receivers[0], "leave", badge=badge, zone=place)
            self._inbox.append(leave)
            self._wake.set()

    def _restore(self) -> None:
        alerts = self.store.unresolved_alerts()
        orphans = self.engine.restore(alerts, self.rule_versions.former_rules())
        # After the alerts: presence state re-arms dwell checks against them.
        self.engine.load_state(self.store.engine_state())
        for orphan in orphans:
            # Kept in the database, not shown: a technician must re-enable the
            # rule or close the alert, and must hear about it.
            log.warning(
                "Alert %s in %s stays open but unmanaged: its rule %r is no "
                "longer enabled in the site file",
                orphan.id,
                orphan.room or orphan.device,
                orphan.rule,
            )
        for event_id in reversed(self.store.recent_event_ids(DEDUP_WINDOW)):
            self._seen[event_id] = None
        log.info(
            "Restored %d unresolved alert(s) from %s",
            len(self.engine.alerts),
            self.store.path,
        )
        # Escalations that fell due while we were down fire now, marked late.
        self._commit_and_publish([], self.engine.advance())

    # -- from the broker link ----------------------------------------------------

    def _receive(
        self, topic: str, payload: bytes, retain: bool, receipt: Receipt
    ) -> None:
        """Called by the link, on the loop: queue the message, nothing more."""
        if self._tracker is not None and topic.endswith("/sightings"):
            self._sighting(topic, payload, receipt)
            return
        self._enqueue((topic, payload, retain, receipt))

    def _sighting(self, topic: str, payload: bytes, receipt: Receipt) -> None:
        """A badge sighting from an ESP32 receiver.

        Sightings are many and change nothing by themselves, so they go
        straight to the presence tracker (thread-safe) instead of the commit
        loop; only the enter and leave events it derives are committed.
        """
        route = self.topics.parse(topic)
        limit = self.config.mqtt.max_payload
        try:
            if route is None or route[0] != "sighting" or self._tracker is None:
                raise RejectedMessage("unknown_topic", f"no handler for {topic}")
            self._tracker.feed_message(route[1], payload, limit)
        except RejectedMessage as exc:
            self._reject(topic, exc)
        self.link.ack(receipt)

    def _from_driver(self, event: Event) -> None:
        """Called on a driver's thread: queue the event for the loop."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._enqueue, event)

    def _link_up(self) -> None:
        self._request_resync()

    # -- event loop --------------------------------------------------------------------

    def _enqueue(self, item: Item) -> None:
        self._inbox.append(item)
        self._wake.set()

    def _request_resync(self) -> None:
        self._resync = True
        self._wake.set()

    async def _process_forever(self) -> None:
        while not self._stopping.is_set():
            await self._wake.wait()
            self._wake.clear()
            while self._inbox:
                batch = self._inbox[:MAX_BATCH]
                del self._inbox[:MAX_BATCH]
                try:
                    self._process(batch)
                except DatabaseTrouble as trouble:
                    if not await self._ride_out(trouble, batch):
                        return
                except BaseException as exc:
                    _fail_commands(batch, exc)
                    raise
                # Let paho's callbacks and the web server run between batches.
                await asyncio.sleep(0)
            try:
                self._process([])
            except DatabaseTrouble as trouble:
                if not await self._ride_out(trouble, []):
                    return
            if self._resync:
                self._resync = False
                self._publish_all_unresolved()
            self._schedule_next_timer()

    def _process(self, batch: list[Item]) -> None:
        events: list[Event] = []
        changes: list[Action] = []
        for item in batch:
            try:
                changes.extend(self._take(item, events))
            except (RejectedMessage, EngineError) as exc:
                source = item.device if isinstance(item, Event) else item[0]
                self._reject(source, exc)
        # Due timers in slices: the rest fire on the next turn of the loop,
        # after paho's callbacks and the web server have had theirs.
        changes.extend(self.engine.advance(limit=MAX_TIMERS))
        self._commit_and_publish(events, changes, then=partial(self._finish, batch))

    def _finish(self, batch: list[Item]) -> None:
        """After the batch's commit: polls, web commands, broker acks."""
        try:
            self._run_polls()
        except sqlite3.OperationalError as exc:
            # A round left open or unasked stays due: the next turn tries again.
            log.warning("Polls wait for the database: %s", exc)
        for item in batch:
            if isinstance(item, Command):
                item.finish()

        # Only now may the broker forget these messages. If the process stops
        # before the commit (a crash, or a stop while the database refuses
        # it), they stay unacknowledged, and after the restart the broker
        # redelivers the batch to an engine rebuilt from the database.
        for item in batch:
            if isinstance(item, tuple):
                self.link.ack(item[3])

    async def _ride_out(self, trouble: DatabaseTrouble, batch: list[Item]) -> bool:
        """Commit a refused batch again, with backoff, until the database takes it.

        Meanwhile nothing new is processed (the engine already holds the
        batch, so the next commit must be this one), nothing is published or
        acknowledged, and the trouble shows on the status topic, /healthz
        and the watchdog: a locked or full database pauses alerting, it
        loses nothing. False if the gateway is stopping first: then nothing
        more may be processed, as the engine holds uncommitted changes.
        """
        self._set_trouble(trouble.error)
        delay, longest = COMMIT_RETRY
        while not self._stopping.is_set():
            await asyncio.sleep(delay)
            try:
                trouble.resume()
            except DatabaseTrouble as again:
                trouble = again
                self.trouble = (self.trouble or {}) | {"error": again.error}
                delay = min(longest, delay * 2)
                continue
            self._set_trouble(None)
            return True
        # Stopping with the batch uncommitted: the broker redelivers it.
        _fail_commands(batch, trouble)
        return False

    def _set_trouble(self, error: str | None) -> None:
        if error is not None and self.trouble is None:
            self.trouble = {"what": "database", "error": error, "since": self.clock()}
            log.error(
                "Database %s takes no write (%s): alerting waits, nothing is "
                "acknowledged to the broker, and the commit is retried every "
                "%g s at most",
                self.store.path,
                error,
                COMMIT_RETRY[1],
            )
            self.link.publish(self.topics.status, TROUBLE, retain=True)
        elif error is None and self.trouble is not None:
            since, self.trouble = self.trouble["since"], None
            log.warning(
                "Database %s takes writes again after %.1f s",
                self.store.path,
                self.clock() - since,
            )
            self.link.publish(self.topics.status, b"online", retain=True)

    def _take(self, item: Item, events: list[Event]) -> list[Action]:
        if isinstance(item, Event):
            return self._accept(item, events)
        if isinstance(item, Command):
            return self._command(item)
        topic, payload, retain, _ = item
        return self._handle(topic, payload, retain, events)

    def _handle(
        self, topic: str, payload: bytes, retain: bool, events: list[Event]
    ) -> list[Action]:
        route = self.topics.parse(topic)
        limit = self.config.mqtt.max_payload
        if route is None and self.native.handles(topic):
            changes: list[Action] = []
            for event in self.native.translate(topic, payload, retain, limit):
                changes.extend(self._accept(event, events))
            return changes
        if route is None:
            raise RejectedMessage("unknown_topic", f"no handler for {topic}")
        if retain:
            # A retained message is old state replayed by the broker on
            # subscribe, never a new press or a new acknowledgement.
            raise RejectedMessage("retained", "retained messages are not events")

        kind, key = route
        if kind == "event":
            return self._accept(parse_event(key, payload, limit), events)
        if kind == "silence":
            return self._silence(parse_silence(payload, limit))
        if kind == "unsilence":
            return self.engine.unsilence(key)
        if kind == "poll_answer":
            return self._poll_answer(key, payload)
        if kind == "staff_answer":
            return self._poll_answer(_poll_of(payload, limit), payload, staff=key)
        if kind in ("staff_ack", "staff_resolve"):
            # A pager on its own topic: the broker vouches for who it is.
            alert, _ = parse_staff_command(key, payload, limit)
            if kind == "staff_ack":
                return self.engine.acknowledge(alert, key, via="pager")
            return self.engine.resolve(alert, key, via="pager")

        staff, _ = parse_command(payload, limit)
        if kind == "ack":
            return self.engine.acknowledge(key, staff, via="pager")
        return self.engine.resolve(key, staff, via="pager")

    def _command(self, command: Command) -> list[Action]:
        """Carry out a web command; its refusal goes back to the page, uncounted."""
        try:
            actions = self._carry_out(command)
        except EngineError as exc:
            if isinstance(exc, UnknownAlert) and command.alert_id:
                row = self.store.alert(command.alert_id)
                if row is not None:
                    exc = AlreadyResolved(row)
            log.info("Web %s of %s refused: %s", command.action, command.alert_id, exc)
            command.fail(exc)
            return []
        command.result["alerts"] = [
            alert_record(a.alert) for a in actions if isinstance(a, Change)
        ]
        return actions

    def _carry_out(self, command: Command) -> list[Action]:
        key, staff, options = command.alert_id or "", command.staff, command.options
        if command.action == "ack":
            if staff is None:
                raise EngineError("acknowledging needs a staff id from the site file")
            return list(self.engine.acknowledge(key, staff, via=command.via))
        if command.action == "resolve":
            return self.engine.resolve(key, staff, via=command.via)
        if command.action == "unsilence":
            return list(self.engine.unsilence(key))
        if command.action == "rules":
            command.result["version"] = self._swap_rules(**options)
            return []
        silence_id, changes = self.engine.silence(
            until=options["until"],
            reason=options["reason"],
            by=options["by"],
            device=options.get("device"),
            zone=options.get("zone"),
        )
        command.result["silence"] = silence_id
        log.warning(
            "Pages for %s held until %s by %s from the web page: %s (silence %s)",
            options.get("device") or options.get("zone"),
            time.strftime("%H:%M", time.localtime(options["until"])),
            options["by"],
            options["reason"],
            silence_id,
        )
        return list(changes)

    def _swap_rules(self, rules: tuple[Any, ...], change: str, **save: Any) -> int:
        """Save a rule set as the newest version and run it from this batch on.

        The version is committed first: if the process dies before the batch
        commits, the restarted gateway runs that version anyway. Open alerts,
        their timers and rule state carry over (:meth:`Engine.handover`).
        """
        number = self.rule_versions.save(rules=rules, action=change, **save)
        before = {rule.name: rule for rule in self.config.rules}
        self.engine = self.engine.handover(rules)
        self.config = self.config.model_copy(update={"rules": rules})
        self.rules_version = number
        # Credit and availability still know the rules of alerts left open.
        known = before | {rule.name: rule for rule in rules}
        everything = self.config.model_copy(update={"rules": tuple(known.values())})
        self.credit_site = credit.CreditSite.from_config(everything)
        self._supervision |= {
            rule.name for rule in rules if isinstance(rule, SupervisionRule)
        }
        self.domes.retarget(self.config, self.engine.alerts)
        log.warning(
            "Rule set version %d runs from now (%s by %s, %d rule(s))",
            number,
            change,
            save["by"],
            len(rules),
        )
        return number

    def _accept(self, event: Event, events: list[Event]) -> list[Action]:
        """Run a new event through the engine; drop one seen before."""
        if event.id in self._seen:
            self.rejected["duplicate"] += 1
            log.debug("Dropped duplicate event %s", event.id)
            return []
        if event.type == MOOD:
            # Kept out of the engine and the events table: a poll answer is
            # stored only in its round, and only until the round closes.
            self.polls.answer_from_button(
                event.device, event.id, event.fields.get("answer")
            )
            self._remember(event.id)
            self.accepted += 1
            self.devices.heard(event, self.clock())
            return []
        changes = self.engine.on_event(event)
        self._remember(event.id)
        events.append(event)
        self.accepted += 1
        self.devices.heard(event, self.clock())
        return changes

    def _poll_answer(
        self, poll_id: str, payload: bytes, staff: str | None = None
    ) -> list[Action]:
        """A pager's answer to a poll; changes no alert."""
        answer = parse_answer(payload, self.config.mqtt.max_payload, staff)
        if answer.id is not None and answer.id in self._seen:
            # A QoS 1 redelivery must not undo a newer answer of the person.
            self.rejected["duplicate"] += 1
            return []
        self.polls.answer_from_pager(poll_id, answer)
        if answer.id is not None:
            self._remember(answer.id)
        self.accepted += 1
        return []

    def _run_polls(self) -> None:
        """Close rounds that are over, then ask the questions due this minute."""
        if not self.config.polls:
            return  # no database look-ups per batch for sites without polls
        now = self.clock()
        results = self.polls.close_due(now)
        if results:
            self.sender.wake()
        for result in results:
            self._publish_poll_result(result)
        for question in self.polls.open_due(now):
            for role in question.poll.roles:
                self.link.publish(self.topics.pager(role), question.payload(role))

    def _publish_poll_result(self, result: Result) -> None:
        payload = json.dumps(result.body(), separators=(",", ":")).encode()
        self.link.publish(self.topics.poll_result(result.poll), payload, retain=True)

    def _silence(self, request: SilenceRequest) -> list[Action]:
        if request.staff not in {member.id for member in self.config.staff}:
            raise RejectedMessage(
                "unknown_staff", f"staff id {request.staff!r} is not in the site file"
            )
        silence_id, changes = self.engine.silence(
            until=request.until,
            reason=request.reason,
            by=request.staff,
            device=request.device,
            zone=request.zone,
        )
        log.warning(
            "Pages for %s held until %s by %s: %s (silence %s)",
            request.device or request.zone,
            time.strftime("%H:%M", time.localtime(request.until)),
            request.staff,
            request.reason,
            silence_id,
        )
        return list(changes)

    def _reject(self, topic: str, exc: Exception) -> None:
        reason = getattr(exc, "reason", None) or type(exc).__name__
        if isinstance(exc, UnknownAlert) and self.store.alert(exc.alert_id):
            # Two people answering one call is ordinary; the later tap finds
            # it closed. Counted, but not a warning.
            self.rejected["alert_resolved"] += 1
            log.info("Ignored %s: alert %s is already resolved", topic, exc.alert_id)
            return
        self.rejected[reason] += 1
        self.devices.refused(topic, reason)
        log.warning(
            "Rejected message on %s: %s",
            topic,
            exc,
            extra={"topic": topic, "reason": reason},
        )

    def _remember(self, event_id: str) -> None:
        self._seen[event_id] = None
        if len(self._seen) > DEDUP_WINDOW:
            self._seen.popitem(last=False)

    def _commit_and_publish(
        self,
        events: list[Event],
        actions: list[Action],
        then: Callable[[], None] | None = None,
    ) -> None:
        """Commit, then publish, then ``then()``; DatabaseTrouble if refused."""
        changes = [a for a in actions if isinstance(a, Change)]
        kudos = [a for a in actions if isinstance(a, Kudos)]

        credits = {
            f"alert:{c.alert.id}": credit.credit_resolved(
                self.store.db.conn, self.credit_site, alert_record(c.alert), events
            )
            for c in changes
            if c.kind == "resolved"
        }
        credits |= {
            f"kudos:{k.id}": self.credit_site.credit_kudos(asdict(k)) for k in kudos
        }

        record = (events, changes, self.engine.take_dirty(), kudos, credits)
        self._commit_then_publish(record, then)

    def _commit_then_publish(
        self, record: tuple[Any, ...], then: Callable[[], None] | None
    ) -> None:
        events, changes, _, kudos, credits = record
        # Commit first: nobody may see a transition a power cut could undo.
        commits, started = self.store.commits, time.perf_counter()
        try:
            self.store.record(*record)
        except sqlite3.OperationalError as exc:
            resume = partial(self._commit_then_publish, record, then)
            raise DatabaseTrouble(exc, resume) from exc
        if self.store.commits != commits:
            self.metrics.commit.observe(time.perf_counter() - started)
            self.metrics.observe_changes(changes)
        if credits:
            self.sender.wake()

        for item in kudos:
            self._publish_kudos(item)
        # Within a batch, the most urgent calls are paged first.
        changes = sorted(changes, key=_urgency)
        for change in changes:
            self._publish(change)
            _log_transition(change)
        if changes:
            self._show_on_drivers(changes)
            self.domes.changed(changes)
            self._tell_watchers(changes)
        self._publish_silences()
        if then is not None:
            then()

    def _tell_watchers(self, changes: list[Change]) -> None:
        """Live web pages hear of changes after the commit, like the broker."""
        for watcher in list(self._watchers):
            try:
                watcher(changes)
            except Exception:  # noqa: BLE001 - a web page must not stop alerting
                log.exception("A live page could not take %d change(s)", len(changes))

    def _publish(self, change: Change) -> None:
        alert = change.alert
        topic = self.topics.alert(alert.id)
        self.link.publish(topic, alert_payload(alert), retain=True)
        if change.kind == "resolved":
            # Displays saw the final state; clearing the retained copy keeps
            # late joiners from being shown a closed gap.
            self.link.publish(topic, b"", retain=True)
        for note in change.notifications:
            self.link.publish(
                self.topics.pager(note.target), pager_payload(change, note)
            )
        if alert.rule in self._supervision and change.kind in ("opened", "resolved"):
            # A supervision alert is the device's availability, seen from here.
            state = b"offline" if change.kind == "opened" else b"online"
            self.link.publish(
                self.topics.availability(alert.device), state, retain=True
            )

    def _publish_silences(self, *, all_again: bool = False) -> None:
        """Retained state of each active silence, cleared when it ends."""
        active = {silence.id: silence for silence in self.engine.silences}
        for silence_id in self._shown_silences - active.keys():
            self.link.publish(self.topics.silence(silence_id), b"", retain=True)
        for silence_id, silence in active.items():
            if all_again or silence_id not in self._shown_silences:
                body = {
                    "id": silence.id,
                    "device": silence.device,
                    "zone": silence.zone,
                    "until": silence.until,
                    "reason": silence.reason,
                    "by": silence.by,
                }
                payload = json.dumps(body, separators=(",", ":")).encode()
                self.link.publish(self.topics.silence(silence_id), payload, retain=True)
        self._shown_silences = set(active)

    def _show_on_drivers(self, changes: list[Change]) -> None:
        """Let drivers with outputs (dome lights) show the new alert states."""
        for driver in self.drivers:
            show = getattr(driver, "show_alert", None)
            if show is None:
                continue
            for change in changes:
                try:
                    show(alert_record(change.alert))
                except Exception:  # noqa: BLE001 - a lamp must not stop alerting
                    log.exception("Driver %s could not show an alert", driver.name)

    def _publish_kudos(self, kudos: Kudos) -> None:
        body = {
            "id": kudos.id,
            "rule": kudos.rule,
            "zone": kudos.zone,
            "at": kudos.at,
            "presses": kudos.presses,
            "staff": list(kudos.staff),
        }
        topic = self.topics.kudos(kudos.zone)
        self.link.publish(topic, json.dumps(body, separators=(",", ":")).encode())
        transitions_log.info(
            "%-12s %s  %s  %d happy presses in a row, team %s",
            "KUDOS",
            kudos.id,
            kudos.zone,
            kudos.presses,
            ", ".join(kudos.staff) or "(none on duty)",
        )

    def _publish_all_unresolved(self) -> None:
        alerts = self.engine.alerts
        for alert in alerts:
            self.link.publish(
                self.topics.alert(alert.id), alert_payload(alert), retain=True
            )
        self._publish_silences(all_again=True)
        self.domes.all_again(alerts)
        log.info("Published %d unresolved alert(s) after connecting", len(alerts))

    def _schedule_next_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        now = self.clock()
        times = [self.engine.due()]
        if self.config.polls:
            times.append(self.polls.due(now))
        due = min((t for t in times if t is not None), default=None)
        if due is None or self._loop is None:
            return
        delay = max(0.0, due - now)
        self._timer = self._loop.call_later(delay, self._wake.set)


def _owned(drivers: Sequence[Driver]) -> set[str]:
    """Devices the drivers read themselves (GPIO, serial hubs, BLE adapters)."""
    owned: set[str] = set()
    for driver in drivers:
        device_ids = getattr(driver, "device_ids", None)
        owned |= set(device_ids()) if device_ids is not None else set()
    return owned


def _fail_commands(batch: list[Item], exc: BaseException) -> None:
    for item in batch:
        if isinstance(item, Command):
            item.fail(RuntimeError(f"the gateway failed: {exc}"))


def _poll_of(payload: bytes, max_payload: int) -> str:
    """The poll an answer on a staff topic is for: its ``poll`` field."""
    poll = decode_json_object(payload, max_payload).get("poll")
    if not isinstance(poll, str) or not poll:
        raise RejectedMessage("missing_field", "'poll' must name the poll id")
    return poll


def _urgency(change: Change) -> int:
    return -PRIORITY_RANK.get(change.alert.priority, 0)


def _alert_id() -> str:
    return uuid.uuid4().hex[:16]


def _log_transition(change: Change) -> None:
    """One line per transition: what, where, which rule, level, who and how."""
    alert = change.alert
    where = alert.room or alert.zone or alert.device
    notes = []
    if alert.late and change.kind in ("escalated", "reminded", "reopened"):
        notes.append("late")
    if alert.held:
        notes.append("pages held")
    if alert.priority != "routine":
        notes.append(alert.priority.upper())
    by = f"by {change.actor} " if change.actor else ""
    transitions_log.info(
        "%-12s %-9s %-18s level %d  %svia %s%s  [%s]",
        change.kind.upper(),
        where,
        alert.rule,
        alert.level,
        by,
        change.via,
        f" ({', '.join(notes)})" if notes else "",
        alert.id[:8],
        extra={
            "alert": alert.id,
            "event": alert.event_id,
            "transition": change.kind,
            "device": alert.device,
            "zone": alert.zone,
            "room": alert.room,
            "rule": alert.rule,
            "alert_level": alert.level,
            "staff": change.actor,
            "via": change.via,
        },
    )
