"""The state behind the rule kinds that watch a stream rather than one press.

Each class keeps what one rule needs to know about one subject (a zone or a
device) and says when its condition starts or stops holding. None of them
opens alerts or reads a clock: the engine calls them with the time and acts on
what they answer. Every state can be written out as plain JSON and read back,
so counters, windows and pending thresholds survive a restart.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from rules.schema import CountRule, FeedbackRule


@dataclass
class Counter:
    """Events counted since the last reset, or the latest ones for a window."""

    count: int = 0
    times: deque[float] = field(default_factory=deque)

    def add(self, rule: CountRule, at: float) -> int:
        """Count one event; return the count that now decides."""
        if rule.within is None:
            self.count += 1
            return self.count
        # Only the newest ``at_least`` times can decide whether at least that
        # many fell inside the window, so older ones are dropped.
        self.times.append(at)
        while len(self.times) > rule.at_least:
            self.times.popleft()
        return self.in_window(rule, at)

    def in_window(self, rule: CountRule, now: float) -> int:
        if rule.within is None:
            return self.count
        start = now - rule.within
        return sum(1 for at in self.times if at > start)

    def holds(self, rule: CountRule, now: float) -> bool:
        return self.in_window(rule, now) >= rule.at_least

    def dump(self) -> dict[str, Any]:
        return {"count": self.count, "times": list(self.times)}

    @classmethod
    def load(cls, data: dict[str, Any]) -> Counter:
        return cls(int(data["count"]), deque(float(t) for t in data["times"]))


@dataclass
class Threshold:
    """Whether a reading is beyond its limit, since when, and if that lasted."""

    since: float | None = None
    tripped: bool = False
    value: float | None = None

    def dump(self) -> dict[str, Any]:
        return {"since": self.since, "tripped": self.tripped, "value": self.value}

    @classmethod
    def load(cls, data: dict[str, Any]) -> Threshold:
        return cls(data["since"], bool(data["tripped"]), data["value"])


@dataclass
class Feedback:
    """Guest presses of one zone within the window, and the current positive run."""

    presses: deque[tuple[float, bool]] = field(default_factory=deque)
    """(time, negative) of each counted press, oldest first."""

    positive_run: int = 0

    def add(self, rule: FeedbackRule, at: float, negative: bool) -> None:
        self.presses.append((at, negative))
        self.positive_run = 0 if negative else self.positive_run + 1
        self.prune(rule, at)

    def prune(self, rule: FeedbackRule, now: float) -> None:
        start = now - rule.window
        while self.presses and self.presses[0][0] <= start:
            self.presses.popleft()

    def share(self) -> float:
        if not self.presses:
            return 0.0
        return sum(1 for _, negative in self.presses if negative) / len(self.presses)

    def holds(self, rule: FeedbackRule, now: float) -> bool:
        self.prune(rule, now)
        return len(self.presses) >= rule.at_least and self.share() >= rule.share

    def dump(self) -> dict[str, Any]:
        return {
            "presses": [[at, negative] for at, negative in self.presses],
            "positive_run": self.positive_run,
        }

    @classmethod
    def load(cls, data: dict[str, Any]) -> Feedback:
        presses = deque((float(at), bool(neg)) for at, neg in data["presses"])
        return cls(presses, int(data["positive_run"]))


@dataclass
class Presence:
    """Which badges are in which place (a room or a zone), since when."""

    here: dict[str, dict[str, tuple[float, float | None]]] = field(default_factory=dict)
    """place -> badge -> (entered at, signal strength in dBm or None)."""

    def enter(self, place: str, badge: str, at: float, signal: float | None) -> bool:
        """Record an arrival; False if the badge was already there."""
        badges = self.here.setdefault(place, {})
        if badge in badges:
            return False
        badges[badge] = (at, signal)
        return True

    def leave(self, place: str, badge: str) -> bool:
        badges = self.here.get(place)
        if badges is None or badge not in badges:
            return False
        del badges[badge]
        if not badges:
            del self.here[place]
        return True

    def present(self, place: str) -> dict[str, tuple[float, float | None]]:
        return self.here.get(place, {})

    def dump(self) -> dict[str, Any]:
        return {
            place: {badge: list(entry) for badge, entry in badges.items()}
            for place, badges in self.here.items()
        }

    @classmethod
    def load(cls, data: dict[str, Any]) -> Presence:
        return cls(
            {
                place: {badge: (float(e[0]), e[1]) for badge, e in badges.items()}
                for place, badges in data.items()
            }
        )
