"""Anonymous mood polls: the site file, the schedule, and the real gateway.

The end-to-end tests ask a poll in the current minute (site time zone UTC)
and keep it open for seconds, then read what pagers, the retained result
topic and the SQLite file show once the round has closed.
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from pydantic import ValidationError

from gateway.config import ConfigError, load_config
from gateway.contract import Topics
from gateway.polls import Poll, Polls
from gateway.store import Store
from rules.schema import WEEKDAYS
from tests.helpers import STAFF, event, query, site_config, wait_until, write_site

POLL = "monday-mood"
ANSWERS = ["great", "okay", "rough"]
VOTERS = ("ana", "ben", "chloe", "eve", "finn")
"""Five staff members who may answer; ``eve`` and ``finn`` are added below."""


def a_poll(**changes: Any) -> dict[str, Any]:
    poll = {
        "id": POLL,
        "question": "How is your week starting?",
        "answers": list(ANSWERS),
        "roles": ["nurse", "charge_nurse"],
        "ask": {"days": ["mon"], "at": "09:00"},
        "open_for": "8h",
        "buttons": ["mood-staffroom"],
    }
    return poll | changes


def poll_site(site_id: str, *polls: dict[str, Any]) -> dict[str, Any]:
    """The test ward plus a staffroom mood button and two more nurses, in UTC."""
    site = site_config(site_id)
    site["site"]["timezone"] = "UTC"
    site["devices"].append({"id": "mood-staffroom", "kind": "mood_button"})
    site["staff"] = [dict(member) for member in STAFF] + [
        {"id": "eve", "name": "Eve Tan", "roles": ["nurse"]},
        {"id": "finn", "name": "Finn Berg", "roles": ["nurse"]},
    ]
    site["polls"] = list(polls)
    return site


# -- the site file -----------------------------------------------------------------


def test_a_valid_poll_reads_durations_and_days():
    """``open_for: 8h`` is seconds, and days default to every day."""
    poll = Poll.model_validate(a_poll(ask={"at": "07:30"}))
    assert poll.open_for == 8 * 3600
    assert len(poll.ask.days) == 7


@pytest.mark.parametrize(
    "changes",
    [
        {"answers": ["only"]},
        {"answers": [str(n) for n in range(7)]},
        {"answers": ["great", "great"]},
        {"ask": {"days": ["mon"], "at": "9:00"}},
        {"ask": {"days": ["mon"], "at": "24:00"}},
        {"ask": {"days": ["monday"], "at": "09:00"}},
        {"roles": []},
        {"open_for": "0s"},
        {"id": "with space"},
        {"colour": "blue"},
    ],
    ids=lambda changes: "-".join(map(str, changes)),
)
def test_a_bad_poll_is_refused(changes):
    """Answers 2-6 and distinct, ``at`` as HH:MM, a role, a positive duration."""
    with pytest.raises(ValidationError):
        Poll.model_validate(a_poll(**changes))


def test_polls_must_name_known_roles_and_buttons_and_differ(tmp_path: Path):
    """Cross-checks name the poll, the line and what is missing."""
    site = poll_site(
        "s1",
        a_poll(roles=["nurse", "porter"]),
        a_poll(buttons=["mood-lobby"]),
    )
    with pytest.raises(ConfigError) as caught:
        load_config(write_site(tmp_path / "site.yaml", site), environ={})
    text = str(caught.value)
    assert "polls[0].roles: no staff member has role 'porter'" in text
    assert "polls[1].buttons: device 'mood-lobby' is not under 'devices:'" in text
    assert "polls[1].id: poll id 'monday-mood' is used twice" in text


def test_answer_topic_is_parsed():
    topics = Topics("s1", "gw-1")
    assert topics.parse("facility/s1/polls/monday-mood/answer") == (
        "poll_answer",
        "monday-mood",
    )
    assert "facility/s1/polls/+/answer" in topics.commands


def test_a_round_missed_while_down_is_not_asked_late(tmp_path: Path):
    """Asked within its minute; a minute later the round is simply skipped."""
    monday_nine = datetime(2026, 11, 30, 9, 0, tzinfo=UTC).timestamp()
    poll = Poll.model_validate(a_poll())
    store = Store(tmp_path / "gw.db")
    polls = Polls(store.db, [poll], staff=["ana"], tz=ZoneInfo("UTC"))
    assert polls.open_due(monday_nine + 60) == []
    assert polls.due(monday_nine + 60) == monday_nine + 7 * 86_400
    [question] = polls.open_due(monday_nine + 30)
    assert question.round == "2026-11-30T09:00"
    assert polls.open_due(monday_nine + 40) == []
    store.close()


# -- through the gateway -------------------------------------------------------------


def this_minute() -> str:
    """``HH:MM`` in UTC, with at least 20 s left for the gateway to start."""
    now = datetime.now(UTC)
    if now.second >= 40:
        time.sleep(60.2 - now.second - now.microsecond / 1e6)
        now = datetime.now(UTC)
    return now.strftime("%H:%M")


def answer_topic(site: str, poll: str = POLL) -> str:
    return f"facility/{site}/polls/{poll}/answer"


def result_topic(site: str, poll: str = POLL) -> str:
    return f"facility/{site}/polls/{poll}/result"


def answer(staff: str, choice: str) -> dict[str, str]:
    return {"staff": staff, "answer": choice, "id": uuid.uuid4().hex}


def start_poll(start_gateway, mqtt, topics, open_for: str = "3s", *extra):
    """A gateway whose poll is asked now; returns it and a nurse's pager."""
    pager = mqtt(topics.pagers, result_topic(topics.site))
    poll = a_poll(open_for=open_for, ask={"at": this_minute()})
    gateway = start_gateway(site=poll_site(topics.site, poll, *extra))
    pager.wait_for_json(topics.pager("nurse"), poll=POLL, timeout=20)
    return gateway, pager


def wait_closed(gateway) -> dict[str, Any]:
    return wait_until(
        lambda: gateway.query(
            "SELECT * FROM poll_rounds WHERE poll = ? AND closed_at IS NOT NULL",
            POLL,
        ),
        timeout=15,
        what="the round to close",
    )[0]


def every_cell(db_path: Path) -> list[Any]:
    """Every value in every table of the gateway's database."""
    tables = query(db_path, "SELECT name FROM sqlite_master WHERE type = 'table'")
    cells: list[Any] = []
    for table in tables:
        for row in query(db_path, f'SELECT * FROM "{table["name"]}"'):  # noqa: S608
            cells.extend(row.values())
    return cells


def test_five_answers_leave_one_aggregate_and_nothing_personal(
    start_gateway, mqtt, topics
):
    """The question is paged; after closing only counts remain, and go upstream."""
    gateway, pager = start_poll(start_gateway, mqtt, topics)
    question = pager.wait_for(lambda m: m.topic == topics.pager("nurse"))
    assert not question.retain
    body = question.json
    assert body["question"] == "How is your week starting?"
    assert body["answers"] == ANSWERS
    assert set(body) == {"id", "poll", "round", "question", "answers", "closes_at"}
    pager.wait_for_json(topics.pager("charge_nurse"), poll=POLL)
    choices = ["great", "great", "okay", "rough", "great"]
    mqtt().publish_many(
        (answer_topic(topics.site), answer(staff, choice))
        for staff, choice in zip(VOTERS, choices, strict=True)
    )
    rows = wait_until(
        lambda: (
            len(found := gateway.query("SELECT * FROM poll_answers")) == 5 and found
        ),
        what="five stored answers",
    )
    hashes = {row["voter"] for row in rows}
    [open_round] = gateway.query("SELECT salt FROM poll_rounds")
    salt = open_round["salt"]

    closed = wait_closed(gateway)
    assert (closed["salt"], closed["answered"]) == (None, 5)
    [record] = gateway.query("SELECT * FROM outbox WHERE kind = 'poll.result'")
    assert record["key"] == f"poll:{POLL}:{body['round']}"
    counts = {"great": 3, "okay": 1, "rough": 1}
    result = pager.wait_for_json(result_topic(topics.site), counts=counts)
    assert result == {
        "poll": POLL,
        "round": body["round"],
        "question": body["question"],
        "counts": counts,
        "answered": 5,
    }
    assert gateway.query("SELECT * FROM poll_answers") == []
    cells = [str(cell) for cell in every_cell(gateway.db_path)]
    for secret in (*hashes, salt):
        assert not any(secret in cell for cell in cells)
    assert not set(VOTERS) & set(cells)


def test_four_answers_send_nothing(start_gateway, mqtt, topics):
    """Below five answers the round closes silently: no outbox row, no result."""
    gateway, pager = start_poll(start_gateway, mqtt, topics)
    mqtt().publish_many(
        (answer_topic(topics.site), answer(staff, "okay")) for staff in VOTERS[:4]
    )
    wait_until(
        lambda: len(gateway.query("SELECT * FROM poll_answers")) == 4,
        what="four stored answers",
    )
    assert wait_closed(gateway)["answered"] == 4
    time.sleep(0.5)
    assert gateway.query("SELECT * FROM outbox") == []
    assert gateway.query("SELECT * FROM poll_answers") == []
    assert not [m for m in pager.messages if m.topic == result_topic(topics.site)]
    round_id = gateway.query("SELECT round FROM poll_rounds")[0]["round"]
    assert (
        f"poll {POLL} round {round_id} closed with 4 answers; below 5, nothing sent"
        in gateway.log()
    )


def test_a_second_answer_replaces_the_first(start_gateway, mqtt, topics):
    """One person, one answer per round: the latest counts."""
    gateway, _ = start_poll(start_gateway, mqtt, topics, "30s")
    client = mqtt()
    client.publish(answer_topic(topics.site), answer("ana", "great"))
    client.publish(answer_topic(topics.site), answer("ana", "rough"))
    wait_until(
        lambda: (
            [row["answer"] for row in gateway.query("SELECT * FROM poll_answers")]
            == ["rough"]
        ),
        what="the second answer to replace the first",
    )


def test_a_mood_button_press_counts(start_gateway, mqtt, topics):
    """Four people and one anonymous press make five: the result is sent."""
    gateway, pager = start_poll(start_gateway, mqtt, topics)
    client = mqtt()
    press = event("mood-staffroom", "mood") | {"answer": "rough"}
    client.publish(topics.events("mood-staffroom"), press)
    client.publish_many(
        (answer_topic(topics.site), answer(staff, "great")) for staff in VOTERS[:4]
    )
    result = pager.wait_for_json(result_topic(topics.site), timeout=15)
    assert result["counts"] == {"great": 4, "okay": 0, "rough": 1}
    assert result["answered"] == 5
    assert gateway.query("SELECT * FROM events WHERE type = 'mood'") == []


def test_bad_answers_are_rejected_and_counted(start_gateway, mqtt, topics):
    """Unknown poll, no open round, bad answer, unknown staff: each counted."""
    today = datetime.now(UTC).weekday()
    not_today = WEEKDAYS[(today + 3) % 7]
    later = a_poll(id="other-day", ask={"days": [not_today], "at": "12:00"})
    gateway, _ = start_poll(start_gateway, mqtt, topics, "30s", later)
    client = mqtt()
    client.publish(answer_topic(topics.site, "no-such-poll"), answer("ana", "great"))
    client.publish(answer_topic(topics.site, "other-day"), answer("ana", "great"))
    client.publish(answer_topic(topics.site), answer("ana", "meh"))
    client.publish(answer_topic(topics.site), answer("zed", "great"))
    client.publish(
        topics.events("call-1"), event("call-1", "mood") | {"answer": "great"}
    )
    expected = {
        "unknown_poll": 2,
        "no_open_round": 1,
        "bad_answer": 1,
        "unknown_staff": 1,
    }
    wait_until(
        lambda: gateway.healthz()["messages_rejected"] == expected,
        what=f"rejections {expected}",
    )
    assert gateway.query("SELECT * FROM poll_answers") == []
    assert "meh" not in gateway.log()
