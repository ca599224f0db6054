"""Anonymous staff mood polls: a question on the pagers, counts upstream.

At a scheduled local time the gateway opens a *round* of a poll and pages
the question to the poll's roles. Staff answer from their pagers, anyone
may answer on a mood button, and when the round closes only the counts
remain. The privacy rule, enforced here and nowhere else:

- a person's answer is stored under a salted hash of their staff id; the
  salt is random per round and is deleted when the round closes;
- a second answer from the same person replaces the first;
- single answers are never published, nor logged at INFO or above;
- a round with fewer than :data:`MIN_ANSWERS` answers sends nothing
  upstream, so a result can never point at a handful of people.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta, tzinfo
from typing import Any

import sqlite_utils
from pydantic import Field, field_validator

from drivers.mqtt_device import RejectedMessage, decode_json_object
from rules.schema import WEEKDAYS, Duration, StrictModel, Weekday
from rules.site import Loc

log = logging.getLogger(__name__)

MIN_ANSWERS = 5
"""Fewer answers than this and a round's result could identify people."""

MOOD = "mood"
"""Event type a mood button sends, with the chosen ``answer``."""

_ID = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
_AT = r"^([01]\d|2[0-3]):[0-5]\d$"


class PollAsk(StrictModel):
    """When a round opens, in the site's local time."""

    days: tuple[Weekday, ...] = Field(WEEKDAYS, min_length=1)
    at: str = Field(pattern=_AT)
    """``HH:MM``, 24-hour clock."""


class Poll(StrictModel):
    """One recurring question, e.g. a Monday-morning mood check."""

    id: str = Field(pattern=_ID)
    """Becomes an MQTT topic level and part of the outbox key."""

    question: str = Field(min_length=1, max_length=200)
    answers: tuple[str, ...] = Field(min_length=2, max_length=6)
    roles: tuple[str, ...] = Field(min_length=1)
    """Roles whose pagers are asked."""

    ask: PollAsk
    open_for: Duration = Field(gt=0)
    """How long a round takes answers, e.g. ``8h``."""

    buttons: tuple[str, ...] = ()
    """Mood button device ids whose presses count as anonymous answers."""

    @field_validator("answers")
    @classmethod
    def _distinct_answers(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if any(not answer.strip() for answer in value):
            raise ValueError("an answer cannot be empty")
        if len(set(value)) != len(value):
            raise ValueError(f"answers must differ, got {list(value)}")
        return value


def poll_problems(
    polls: Iterable[Poll], roles: set[str], devices: set[str]
) -> list[tuple[Loc, str]]:
    """Cross-references of the ``polls:`` section: ids, roles and buttons."""
    found: list[tuple[Loc, str]] = []
    ids: set[str] = set()
    for index, poll in enumerate(polls):
        if poll.id in ids:
            found.append((("polls", index, "id"), f"poll id {poll.id!r} is used twice"))
        ids.add(poll.id)
        for role in poll.roles:
            if role not in roles:
                found.append(
                    (
                        ("polls", index, "roles"),
                        f"no staff member has role {role!r}, so nobody would be asked",
                    )
                )
        for button in poll.buttons:
            if button not in devices:
                found.append(
                    (
                        ("polls", index, "buttons"),
                        f"device {button!r} is not under 'devices:'",
                    )
                )
    return found


@dataclass(frozen=True)
class Question:
    """A round just opened: what to page, and to whom."""

    poll: Poll
    round: str
    closes_at: float

    def payload(self, role: str) -> bytes:
        body = {
            "id": f"poll:{self.poll.id}:{self.round}:{role}",
            "poll": self.poll.id,
            "round": self.round,
            "question": self.poll.question,
            "answers": list(self.poll.answers),
            "closes_at": self.closes_at,
        }
        return json.dumps(body, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Result:
    """A closed round with enough answers: the only thing that leaves."""

    poll: str
    round: str
    question: str
    counts: dict[str, int]
    answered: int

    @property
    def key(self) -> str:
        return f"poll:{self.poll}:{self.round}"

    def body(self) -> dict[str, Any]:
        return {
            "poll": self.poll,
            "round": self.round,
            "question": self.question,
            "counts": self.counts,
            "answered": self.answered,
        }


@dataclass(frozen=True)
class PollAnswer:
    """A pager's answer: ``{"staff", "answer", "id"}``."""

    staff: str
    answer: str
    id: str | None


def parse_answer(
    payload: bytes, max_payload: int, staff: str | None = None
) -> PollAnswer:
    """Read a pager's answer, or raise :class:`RejectedMessage`.

    ``staff`` is the person the topic speaks for, when the answer came on a
    pager's own staff topic; a body naming someone else is then refused.
    """
    body = decode_json_object(payload, max_payload)
    answer, message_id = body.get("answer"), body.get("id")
    claimed = body.get("staff", staff)
    if staff is not None and claimed != staff:
        raise RejectedMessage(
            "spoofed",
            f"the topic speaks for {staff!r:.40} but the body names {claimed!r:.40}",
        )
    staff = claimed
    if not isinstance(staff, str) or not staff:
        raise RejectedMessage("missing_field", "'staff' must name who answers")
    if not isinstance(answer, str) or not answer:
        raise RejectedMessage("missing_field", "'answer' must be one of the answers")
    if message_id is not None and not isinstance(message_id, str):
        raise RejectedMessage("bad_field", "'id' must be a string")
    return PollAnswer(staff, answer, message_id)


class Polls:
    """Opens, fills and closes poll rounds in the gateway's SQLite file.

    Used only from the gateway's event loop. Each change is its own small
    transaction: polls are rare, and an answer must not wait for a batch.
    """

    def __init__(
        self,
        db: sqlite_utils.Database,
        polls: Iterable[Poll],
        staff: Iterable[str],
        tz: tzinfo,
    ) -> None:
        self.db = db
        self.polls = {poll.id: poll for poll in polls}
        self.staff = frozenset(staff)
        self.tz = tz

    # -- schedule --------------------------------------------------------------

    def open_due(self, now: float) -> list[Question]:
        """Open every round whose minute is now; one missed is never asked late."""
        local = datetime.fromtimestamp(now, self.tz)
        minute = local.strftime("%H:%M")
        today = WEEKDAYS[local.weekday()]
        opened = []
        for poll in self.polls.values():
            if poll.ask.at != minute or today not in poll.ask.days:
                continue
            round_id = local.strftime("%Y-%m-%dT%H:%M")
            if self._round(poll.id, round_id) is not None:
                continue
            opened.append(self._open(poll, round_id, now))
        return opened

    def _open(self, poll: Poll, round_id: str, now: float) -> Question:
        closes_at = now + poll.open_for
        with self.db.atomic():
            self.db["poll_rounds"].insert(
                {
                    "poll": poll.id,
                    "round": round_id,
                    "opened_at": now,
                    "closes_at": closes_at,
                    "salt": secrets.token_hex(16),
                }
            )
        log.info(
            "Poll %s round %s opened until %s",
            poll.id,
            round_id,
            _hhmm(closes_at, self.tz),
        )
        return Question(poll, round_id, closes_at)

    def close_due(self, now: float) -> list[Result]:
        """Close rounds past their time; return those with a result to show."""
        rows = self.db.query(
            "SELECT poll, round FROM poll_rounds "
            "WHERE closed_at IS NULL AND closes_at <= ?",
            [now],
        )
        results = []
        for row in list(rows):
            result = self._close(row["poll"], row["round"], now)
            if result is not None:
                results.append(result)
        return results

    def _close(self, poll_id: str, round_id: str, now: float) -> Result | None:
        answers = [
            row["answer"]
            for row in self.db.query(
                "SELECT answer FROM poll_answers WHERE poll = ? AND round = ?",
                [poll_id, round_id],
            )
        ]
        poll = self.polls.get(poll_id)
        result = None
        if poll is not None and len(answers) >= MIN_ANSWERS:
            counts = Counter(answers)
            result = Result(
                poll_id,
                round_id,
                poll.question,
                {answer: counts[answer] for answer in poll.answers},
                len(answers),
            )
        # One transaction: the aggregate exists exactly when the individual
        # answers and the salt that could link them to people are gone.
        with self.db.atomic():
            self.db.execute(
                "DELETE FROM poll_answers WHERE poll = ? AND round = ?",
                [poll_id, round_id],
            )
            self.db.execute(
                "UPDATE poll_rounds SET salt = NULL, closed_at = ?, answered = ? "
                "WHERE poll = ? AND round = ?",
                [now, len(answers), poll_id, round_id],
            )
            if result is not None:
                self.db.execute(
                    "INSERT OR IGNORE INTO outbox (key, kind, created_at, body) "
                    "VALUES (?, ?, ?, ?)",
                    [result.key, "poll.result", now, json.dumps(result.body())],
                )
        if result is None:
            log.info(
                "poll %s round %s closed with %d answers; below %d, nothing sent",
                poll_id,
                round_id,
                len(answers),
                MIN_ANSWERS,
            )
        else:
            log.info(
                "poll %s round %s closed with %d answers; result queued upstream",
                poll_id,
                round_id,
                len(answers),
            )
        return result

    def due(self, now: float) -> float | None:
        """When :meth:`open_due` or :meth:`close_due` next has work."""
        closing = self.db.execute(
            "SELECT MIN(closes_at) FROM poll_rounds WHERE closed_at IS NULL"
        ).fetchone()[0]
        times = [closing] if closing is not None else []
        times += [self._next_ask(poll, now) for poll in self.polls.values()]
        return min(times, default=None)

    def _next_ask(self, poll: Poll, now: float) -> float:
        """The next start of the poll's minute; now if it is unasked and on."""
        local = datetime.fromtimestamp(now, self.tz)
        hours, minutes = (int(part) for part in poll.ask.at.split(":"))
        for offset in range(8):
            day: date = local.date() + timedelta(days=offset)
            if WEEKDAYS[day.weekday()] not in poll.ask.days:
                continue
            at = datetime(day.year, day.month, day.day, hours, minutes, tzinfo=self.tz)
            start = at.timestamp()
            if start > now:
                return start
            round_id = at.strftime("%Y-%m-%dT%H:%M")
            if now < start + 60 and self._round(poll.id, round_id) is None:
                return now
        # Unreachable for a valid poll (some day of the week matches); a
        # daily look is harmless if it ever is reached.
        return now + 86_400.0

    # -- answers ---------------------------------------------------------------

    def answer_from_pager(self, poll_id: str, answer: PollAnswer) -> None:
        """Record (or replace) one person's answer in the poll's open round."""
        poll = self._poll(poll_id)
        round_row = self._open_round(poll.id)
        self._check_answer(poll, answer.answer)
        if answer.staff not in self.staff:
            raise RejectedMessage(
                "unknown_staff",
                f"staff id {answer.staff!r:.40} is not in the site file",
            )
        self._store(poll.id, round_row, f"staff:{answer.staff}", answer.answer)

    def answer_from_button(self, device: str, event_id: str, answer: Any) -> None:
        """Count one mood button press; buttons are anonymous by nature."""
        polls = [poll for poll in self.polls.values() if device in poll.buttons]
        if not polls:
            raise RejectedMessage(
                "unknown_poll", f"device {device!r} is no poll's mood button"
            )
        open_rounds = [
            (poll, row)
            for poll in polls
            if (row := self._round_open_or_none(poll.id)) is not None
        ]
        if not open_rounds:
            raise RejectedMessage("no_open_round", f"no poll of {device!r} is open")
        poll, round_row = open_rounds[0]
        self._check_answer(poll, answer)
        self._store(poll.id, round_row, f"press:{event_id}", answer)

    def _store(
        self, poll_id: str, round_row: Mapping[str, Any], voter: str, answer: str
    ) -> None:
        salted = hashlib.sha256(f"{round_row['salt']}:{voter}".encode()).hexdigest()
        with self.db.atomic():
            self.db.execute(
                "INSERT INTO poll_answers (poll, round, voter, answer, at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT(poll, round, voter) "
                "DO UPDATE SET answer = excluded.answer, at = excluded.at",
                [poll_id, round_row["round"], salted, answer, time.time()],
            )
        # Never who, never what: only that the round moved.
        log.debug("Poll %s round %s took an answer", poll_id, round_row["round"])

    def _poll(self, poll_id: str) -> Poll:
        poll = self.polls.get(poll_id)
        if poll is None:
            raise RejectedMessage("unknown_poll", f"no poll {poll_id!r:.60}")
        return poll

    def _open_round(self, poll_id: str) -> dict[str, Any]:
        row = self._round_open_or_none(poll_id)
        if row is None:
            raise RejectedMessage("no_open_round", f"poll {poll_id!r} is not open")
        return row

    def _round_open_or_none(self, poll_id: str) -> dict[str, Any] | None:
        rows = list(
            self.db.query(
                "SELECT * FROM poll_rounds WHERE poll = ? AND closed_at IS NULL "
                "ORDER BY opened_at DESC LIMIT 1",
                [poll_id],
            )
        )
        return rows[0] if rows else None

    def _round(self, poll_id: str, round_id: str) -> dict[str, Any] | None:
        rows = list(
            self.db.query(
                "SELECT * FROM poll_rounds WHERE poll = ? AND round = ?",
                [poll_id, round_id],
            )
        )
        return rows[0] if rows else None

    @staticmethod
    def _check_answer(poll: Poll, answer: Any) -> None:
        if answer not in poll.answers:
            # The rejected text is not echoed: it may be free text from a person.
            raise RejectedMessage(
                "bad_answer",
                f"answer to poll {poll.id!r} must be one of {', '.join(poll.answers)}",
            )


def _hhmm(when: float, tz: tzinfo) -> str:
    return datetime.fromtimestamp(when, tz).strftime("%H:%M:%S")
