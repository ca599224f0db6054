"""Live pages: every committed alert change, fanned out to Server-Sent Events.

The gateway tells the hub of each batch right after its commit (the same
moment it publishes over MQTT), so a floor display or a pager page never
shows a change that a power cut could take back. Each open stream has a
bounded queue; a stream that falls that far behind is ended, and its page
reconnects and starts again from a fresh snapshot.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable
from typing import TYPE_CHECKING, Any

from fastapi.sse import ServerSentEvent

from gateway.contract import pager_body
from gateway.store import alert_record
from rules.alerts import Change

if TYPE_CHECKING:
    from gateway.service import Gateway

log = logging.getLogger(__name__)

QUEUE = 1000
"""Updates a stream may fall behind before it is ended and starts over."""

TICK = 15.0
"""Seconds between ``tick`` events on a quiet stream: a page that hears
nothing for twice as long takes the connection as dead and reconnects."""

RECENT_PAGES = 2000
"""Pager notifications remembered, so a page that reconnects gets its cards."""

Update = tuple[str, dict[str, Any]]
"""An SSE event name and its JSON body."""


class Stream:
    """One open page: what it wants to hear, and its queue."""

    def __init__(self, targets: frozenset[str] | None) -> None:
        self.targets = targets
        """Pager topics (staff id and roles) this page hears; None for the floor."""

        self.queue: asyncio.Queue[Update | None] = asyncio.Queue(QUEUE)
        self.ended = False

    def put(self, update: Update | None) -> None:
        if self.ended:
            return
        try:
            self.queue.put_nowait(update)
        except asyncio.QueueFull:
            log.warning("A live page fell %d updates behind; it starts over", QUEUE)
            self.end()

    def end(self) -> None:
        """Wake the stream with its last item, even when its queue is full."""
        if self.ended:
            return
        self.ended = True
        while self.queue.full():
            self.queue.get_nowait()
        self.queue.put_nowait(None)

    async def next(self) -> Update | None:
        return await self.queue.get()

    async def relay(self) -> AsyncIterator[ServerSentEvent]:
        """Each update as an event, with a ``tick`` (the gateway's time) when quiet."""
        while True:
            try:
                update = await asyncio.wait_for(self.next(), TICK)
            except TimeoutError:
                yield ServerSentEvent(event="tick", data={"now": time.time()})
                continue
            if update is None:
                return
            yield ServerSentEvent(event=update[0], data=update[1])


class LiveHub:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self._streams: set[Stream] = set()
        self._recent: deque[dict[str, Any]] = deque(maxlen=RECENT_PAGES)
        self._unwatch = gateway.watch(self._changed)

    @property
    def streams(self) -> int:
        return len(self._streams)

    def open(self, targets: Iterable[str] | None = None) -> Stream:
        stream = Stream(None if targets is None else frozenset(targets))
        self._streams.add(stream)
        return stream

    def close(self, stream: Stream) -> None:
        self._streams.discard(stream)

    def shutdown(self) -> None:
        """End every stream, so the web server can stop without waiting on them."""
        for stream in list(self._streams):
            stream.end()
        self._streams.clear()

    def snapshot(self) -> list[dict[str, Any]]:
        """Every unresolved alert, newest first."""
        alerts = sorted(self.gateway.engine.alerts, key=lambda a: -a.opened_at)
        return [alert_record(alert) for alert in alerts]

    def recent_pages(self, targets: frozenset[str]) -> list[dict[str, Any]]:
        """Notifications still remembered for these pager topics, oldest first."""
        return [page for page in self._recent if page["target"] in targets]

    def _changed(self, changes: list[Change]) -> None:
        """On the loop, right after the commit: queue the updates for each page."""
        updates: list[Update] = []
        pages: list[dict[str, Any]] = []
        for change in changes:
            record = alert_record(change.alert)
            record["change"] = change.kind
            updates.append(("alert", record))
            for note in change.notifications:
                pages.append(pager_body(change, note))
        self._recent.extend(pages)
        for stream in list(self._streams):
            for update in updates:
                stream.put(update)
            if stream.targets is None:
                continue
            for body in pages:
                if body["target"] in stream.targets:
                    stream.put(("page", body))
