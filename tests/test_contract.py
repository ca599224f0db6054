"""The README's MQTT contract and the payloads the gateway builds stay in step."""

from __future__ import annotations

import json
import re

from gateway.contract import alert_payload, pager_payload
from rules.alerts import Change
from rules.engine import Engine, counter_ids
from rules.events import Event
from rules.schema import CallRule
from rules.site import Site
from tests.helpers import ROOT

SITE = Site.model_validate(
    {
        "zones": [{"id": "west", "rooms": [{"id": "r1"}]}],
        "devices": [{"id": "call-1", "kind": "call_button", "room": "r1"}],
        "staff": [{"id": "ana", "name": "Ana", "roles": ["nurse"]}],
    }
)
RULE = CallRule.model_validate(
    {"name": "patient-call", "levels": [{"after": "0s", "roles": ["nurse"]}]}
)


def readme_row(topic: str) -> str:
    """The README's contract table row for one topic, without parentheses."""
    readme = (ROOT / "README.md").read_text()
    [row] = [line for line in readme.splitlines() if line.startswith(f"| `{topic}` |")]
    return re.sub(r"\([^)]*\)", "", row.split("|")[3])


def names_in(text: str) -> set[str]:
    return set(re.findall(r"[`\"]([a-z_]+)[`\"]", text))


def an_opening() -> Change:
    engine = Engine(SITE, [RULE], lambda: 1_000.0, counter_ids())
    [change] = engine.on_event(Event("e1", "call", "call-1", 1_000.0))
    return change


def test_readme_lists_every_field_of_the_retained_alert():
    """Every key of the retained alert state is documented, and nothing more."""
    change = an_opening()
    published = json.loads(alert_payload(change.alert))
    documented = names_in(readme_row("facility/<site>/alerts/<alert_id>"))
    assert set(published) == documented


def test_readme_lists_every_field_of_a_pager_message():
    """Every key of a pager notification is documented, and nothing more."""
    change = an_opening()
    published = json.loads(pager_payload(change, change.notifications[0]))
    documented = names_in(readme_row("facility/<site>/pagers/<staff_id or role>"))
    assert set(published) == documented
