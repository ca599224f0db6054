"""The recognition board: the credit summary with each person's opt-out honoured.

A staff member with ``recognition: false`` in the site file is never named:
they are left out of the people, never shown as a team's fastest, and only
counted (how many opted out). Their closures, responses and kudos still
count in their team's totals, anonymously, so a team is not penalised for
a member's choice. Every web view of recognition goes through here, the
supervisors' API as much as a wall display.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from rules.site import StaffMember

log = logging.getLogger(__name__)


def opted_out(staff: tuple[StaffMember, ...]) -> frozenset[str]:
    """Staff ids of the people who asked not to be named."""
    return frozenset(member.id for member in staff if not member.recognition)


def board(summary: Mapping[str, Any], staff: tuple[StaffMember, ...]) -> dict[str, Any]:
    """``credit.recognition_summary`` with opted-out people left out by name."""
    hidden = opted_out(staff)
    teams_of = {m.id: frozenset(m.zones) for m in staff}
    result = dict(summary)
    for name in ("today", "week"):
        if name in summary:
            result[name] = _period(summary[name], hidden, teams_of)
    return result


def _period(
    period: Mapping[str, Any],
    hidden: frozenset[str],
    teams_of: Mapping[str, frozenset[str]],
) -> dict[str, Any]:
    shown = [p for p in period["people"] if p["staff"] not in hidden]
    teams = [_team(t, shown, hidden, teams_of) for t in period["teams"]]
    return {
        **period,
        "people": shown,
        "opted_out": len(period["people"]) - len(shown),
        "teams": teams,
    }


def _team(
    team: Mapping[str, Any],
    shown: list[dict[str, Any]],
    hidden: frozenset[str],
    teams_of: Mapping[str, frozenset[str]],
) -> dict[str, Any]:
    """The team's totals as they are; its fastest chosen among those named."""
    fastest = team.get("fastest")
    if fastest is None or fastest["staff"] not in hidden:
        return dict(team)
    # The same choice credit makes (lowest median over each person's
    # responses), among the people who may be named.
    zone = team["team"]
    candidates = [
        (p["median_response_seconds"], p["staff"])
        for p in shown
        if p["median_response_seconds"] is not None
        and (not teams_of.get(p["staff"]) or zone in teams_of[p["staff"]])
    ]
    if not candidates:
        return {**team, "fastest": None}
    median, staff_id = min(candidates)
    return {
        **team,
        "fastest": {"staff": staff_id, "median_response_seconds": median},
    }
