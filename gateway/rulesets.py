"""Rule sets as numbered versions in SQLite, and which one runs.

The site file seeds version 1. After that, every save on the web page, every
enable switch and every rollback appends a version (a rollback copies the
old content into a new one, so history only grows), and the newest version
runs. At each start the site file's rules are compared with the version it
last seeded: if they differ, someone edited the file on disk, and the file
wins as a new version saved by ``site file``; if not, the newest version
runs, web edits included. A newest version that no longer fits the site file
(it pages a role nobody has any more) is not run: the site file's rules are,
as a new version, and the log says why.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from typing import Any

import sqlite_utils
import yaml
from pydantic import ValidationError

from gateway import audit
from gateway.config import (
    GatewayConfig,
    Loc,
    field_name,
    validate_rules,
    yaml_lines,
)
from rules.engine import EngineError
from rules.schema import RuleBase, parse_rules

log = logging.getLogger(__name__)

SITE_FILE = "site file"
"""Who saved a version that came from the site file."""

MAX_RULES = 1000
"""Rules in one proposed set; a site file's own rule set may hold more."""

FORMER_VERSIONS = 50
"""Earlier versions searched for the rule of an alert whose rule is gone."""

DURATION_KEYS = frozenset(
    {
        "after", "remind_every", "ack_timeout", "for", "within", "dwell",
        "window", "min_interval", "heartbeat",
    }
)  # fmt: skip
"""Keys whose numbers are seconds, written back as ``90s`` or ``4m``."""


class RuleSetConflict(EngineError):
    """A save based on a version that is no longer the newest."""

    reason = "rule_set_conflict"

    def __init__(self, base: int, newest: int) -> None:
        self.base = base
        self.newest = newest
        super().__init__(
            f"the rules were changed meanwhile: you edited version {base}, and "
            f"version {newest} is the newest; reload the page and edit again"
        )


class RuleVersions:
    """The ``rule_versions`` table; used on the gateway's loop only."""

    def __init__(self, db: sqlite_utils.Database) -> None:
        self.db = db

    # -- reading ---------------------------------------------------------------------

    def newest(self) -> dict[str, Any] | None:
        rows = list(
            self.db.query("SELECT * FROM rule_versions ORDER BY number DESC LIMIT 1")
        )
        return _with_rules(rows[0]) if rows else None

    def version(self, number: int) -> dict[str, Any] | None:
        rows = list(
            self.db.query("SELECT * FROM rule_versions WHERE number = ?", [number])
        )
        return _with_rules(rows[0]) if rows else None

    def versions(self, limit: int = 100) -> list[dict[str, Any]]:
        """Newest first, without their content."""
        return list(
            self.db.query(
                "SELECT number, source, action, saved_by, saved_at, comment, "
                "restored_from, json_array_length(rules) AS rules "
                "FROM rule_versions ORDER BY number DESC LIMIT ?",
                [limit],
            )
        )

    def former_rules(self) -> list[RuleBase]:
        """Rules of recent versions, newest first: for alerts whose rule is gone."""
        rows = self.db.query(
            "SELECT rules FROM rule_versions ORDER BY number DESC LIMIT ?",
            [FORMER_VERSIONS],
        )
        found: list[RuleBase] = []
        for row in rows:
            try:
                found.extend(parse_rules(json.loads(row["rules"])))
            except ValidationError:
                continue  # saved under an older schema; nothing to learn from it
        return found

    # -- writing ---------------------------------------------------------------------

    def save(
        self,
        content: list[dict[str, Any]],
        rules: Sequence[RuleBase],
        *,
        by: str,
        action: str,
        comment: str = "",
        base: int | None = None,
        source: str = "web",
        restored_from: int | None = None,
        target: str | None = None,
    ) -> int:
        """Append a version and its audit row in one transaction; its number.

        With ``base``, refuse (:class:`RuleSetConflict`) unless ``base`` is
        still the newest version: two technicians never overwrite each other.
        """
        with self.db.atomic():
            before = self.newest()
            newest = before["number"] if before else 0
            if base is not None and base != newest:
                raise RuleSetConflict(base, newest)
            number = newest + 1
            self.db.execute(
                "INSERT INTO rule_versions (number, rules, digest, source, action, "
                "saved_by, saved_at, comment, restored_from) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    number,
                    json.dumps(content),
                    digest(rules),
                    source,
                    action,
                    by,
                    time.time(),
                    comment or None,
                    restored_from,
                ],
            )
            detail = {"comment": comment or None, "rules": len(content)}
            if before is not None:
                detail |= _differences(before["rules"], rules)
            if restored_from is not None:
                detail["restored_from"] = restored_from
            audit.record(self.db, by, action, target, version=number, detail=detail)
        log.info(
            "Rule set version %d saved by %s (%s, %d rule(s))",
            number,
            by,
            action,
            len(content),
        )
        return number

    def startup(self, config: GatewayConfig) -> tuple[tuple[RuleBase, ...], int]:
        """The rules to run at start and their version number (see the module)."""
        rules = config.rules
        seeded = list(
            self.db.query(
                "SELECT number, digest FROM rule_versions WHERE source = 'site' "
                "ORDER BY number DESC LIMIT 1"
            )
        )
        if not seeded or seeded[0]["digest"] != digest(rules):
            why = "the site file's rules changed on disk" if seeded else "first start"
            return rules, self._from_site_file(rules, why)

        newest = self.newest()
        assert newest is not None  # the site file's version at least
        if newest["number"] == seeded[0]["number"]:
            return rules, newest["number"]
        running, problems = validate_rules(config, newest["rules"])
        if problems:
            loc, message = problems[0]
            why = (
                f"version {newest['number']} no longer fits the site file "
                f"({field_name(loc)}: {message})"
            )
            log.error("Not running rule set %s; the site file's rules run", why)
            return rules, self._from_site_file(rules, why)
        log.info("Running rule set version %d from the database", newest["number"])
        return running, newest["number"]

    def _from_site_file(self, rules: Sequence[RuleBase], why: str) -> int:
        return self.save(
            site_file_content(rules),
            rules,
            by=SITE_FILE,
            action="site file",
            comment=why,
            source="site",
        )


# -- content -------------------------------------------------------------------------


def digest(rules: Sequence[RuleBase]) -> str:
    """SHA-256 of the rules normalised: the same rules written differently match."""
    text = json.dumps([_normal(rule) for rule in rules], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _normal(rule: RuleBase) -> dict[str, Any]:
    return rule.model_dump(mode="json", by_alias=True)


def site_file_content(rules: Sequence[RuleBase]) -> list[dict[str, Any]]:
    """The rules as the site file wrote them: only the keys it gave."""
    return [
        readable(rule.model_dump(mode="json", by_alias=True, exclude_unset=True))
        for rule in rules
    ]


def readable(value: Any, key: str | None = None) -> Any:
    """Durations in seconds written back as ``90s``, ``4m`` or ``2h``."""
    if isinstance(value, dict):
        return {k: readable(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [readable(item) for item in value]
    if key in DURATION_KEYS and isinstance(value, int | float):
        return duration_text(float(value))
    return value


def duration_text(seconds: float) -> str:
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def rule_yaml(rule: dict[str, Any]) -> str:
    """One rule as YAML, for the editor: short lists and levels on one line."""
    return yaml.safe_dump(rule, sort_keys=False, default_flow_style=None, width=100)


def _differences(
    before: list[dict[str, Any]], after: Sequence[RuleBase]
) -> dict[str, list[str]]:
    """Rule names added, removed and changed, for the audit log."""
    try:
        old = {rule.name: _normal(rule) for rule in parse_rules(before)}
    except ValidationError:
        old = {}
    new = {rule.name: _normal(rule) for rule in after}
    return {
        "added": sorted(new.keys() - old.keys()),
        "removed": sorted(old.keys() - new.keys()),
        "changed": sorted(n for n in new.keys() & old.keys() if new[n] != old[n]),
    }


def _with_rules(row: dict[str, Any]) -> dict[str, Any]:
    return {**row, "rules": json.loads(row["rules"])}


# -- proposed rule sets from the web page ----------------------------------------------


def check(
    config: GatewayConfig, items: Sequence[dict[str, Any] | str]
) -> tuple[tuple[RuleBase, ...], list[dict[str, Any]], list[dict[str, Any]]]:
    """Read and validate a proposed rule set: (rules, content, problems).

    Each item is one rule: a mapping, or its YAML text from the page's
    editor. A problem names the rule (its index and name), the field within
    it, the line within that rule's text, and the site file's message.
    """
    content: list[dict[str, Any]] = []
    problems: list[dict[str, Any]] = []
    for index, item in enumerate(items):
        data, problem = _read(index, item)
        if problem is not None:
            problems.append(problem)
        content.append(data)
    if problems:
        return (), content, problems

    rules, found = validate_rules(config, content)
    for loc, message in found:
        problems.append(_locate(loc, message, items, content))
    return rules, content, problems


def _read(index: int, item: dict[str, Any] | str) -> tuple[dict[str, Any], Any]:
    if isinstance(item, dict):
        return item, None
    try:
        data = yaml.safe_load(item)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        return {}, _problem(
            index, None, "", mark.line + 1 if mark else None, f"not YAML: {problem}"
        )
    if not isinstance(data, dict):
        return {}, _problem(
            index, None, "", 1, "a rule is a mapping with name, levels, ..."
        )
    return data, None


def _locate(
    loc: Loc,
    message: str,
    items: Sequence[dict[str, Any] | str],
    content: list[dict[str, Any]],
) -> dict[str, Any]:
    if len(loc) < 2 or not isinstance(loc[1], int) or loc[1] >= len(content):
        return _problem(None, None, field_name(loc), None, message)
    index, inner = loc[1], loc[2:]
    name = content[index].get("name")
    item = items[index]
    line = _line_in(item, inner) if isinstance(item, str) else None
    return _problem(index, name, field_name(inner), line, message)


def _line_in(text: str, loc: Loc) -> int | None:
    try:
        lines = yaml_lines(text)
    except yaml.YAMLError:
        return None
    for size in range(len(loc), -1, -1):
        if loc[:size] in lines:
            return lines[loc[:size]]
    return None


def _problem(
    rule: int | None, name: Any, field: str, line: int | None, message: str
) -> dict[str, Any]:
    return {
        "rule": rule,
        "name": name if isinstance(name, str) else None,
        "field": field,
        "line": line,
        "message": message,
    }
