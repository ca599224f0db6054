"""Keyed timers on a binary heap: set, move or cancel in O(log n).

Every timer has a key (an alert id, a device's heartbeat, a badge's dwell in a
zone) and at most one due time. Setting a key again moves its timer;
cancelling forgets it. Both leave the old heap entry behind and skip it when
it surfaces, which keeps each operation O(log n) without searching the heap.
The heap is rebuilt when stale entries outnumber live ones, so memory stays
proportional to the live timers.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Hashable, Iterator

_COMPACT_BELOW = 1024
"""Heaps smaller than this are never compacted; the work would not pay off."""


class TimerQueue:
    """Due times by key, earliest first; ties fire in the order they were set."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Hashable]] = []
        self._live: dict[Hashable, tuple[float, int]] = {}
        self._order = itertools.count()

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._live

    def due_at(self, key: Hashable) -> float | None:
        entry = self._live.get(key)
        return None if entry is None else entry[0]

    def set(self, key: Hashable, due: float) -> None:
        """Schedule ``key`` at ``due``, replacing any earlier time it had."""
        entry = (due, next(self._order))
        self._live[key] = entry
        heapq.heappush(self._heap, (*entry, key))
        self._compact_if_stale()

    def cancel(self, key: Hashable) -> None:
        self._live.pop(key, None)

    def next_due(self) -> float | None:
        """The earliest due time, or None when no timer is set."""
        heap = self._heap
        while heap:
            due, order, key = heap[0]
            if self._live.get(key) == (due, order):
                return due
            heapq.heappop(heap)
        return None

    def pop_due(self, now: float) -> Iterator[tuple[Hashable, float]]:
        """Yield (key, due) for every timer due by ``now``, earliest first.

        Timers set while iterating are seen too if they are already due, so
        a chain of overdue escalations all fire in one call.
        """
        while (due := self.next_due()) is not None and due <= now:
            _, _, key = heapq.heappop(self._heap)
            del self._live[key]
            yield key, due

    def _compact_if_stale(self) -> None:
        heap = self._heap
        if len(heap) < _COMPACT_BELOW or len(heap) < 2 * len(self._live):
            return
        self._heap = [(due, order, key) for key, (due, order) in self._live.items()]
        heapq.heapify(self._heap)
