"""The rules page and its JSON API: versions, validation, dry run, audit log.

Technicians change rules; supervisors may read them. A save, an enable
switch and a rollback each become a new version (``gateway/rulesets.py``)
and take effect at once through :meth:`Gateway.command`, on the gateway's
own loop, without a restart and without losing open alerts or timers.

Routes for the whole set are under ``/api/ruleset``, and those for one rule
under ``/api/rules/{name}``, so that no rule name can shadow a route.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Annotated, Any
from zoneinfo import ZoneInfo

from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from gateway import audit, dryrun, rulesets
from gateway.rulesets import MAX_RULES, RuleSetConflict
from gateway.web.auth import Principal, Supervisor, Technician
from gateway.web.pages import gateway_of, page
from rules.schema import parse_rules

if TYPE_CHECKING:
    from gateway.service import Gateway

log = logging.getLogger(__name__)

router = APIRouter(tags=["rules"])

RuleItems = Annotated[
    list[dict[str, Any] | Annotated[str, Field(max_length=20_000)]],
    Field(max_length=MAX_RULES),
]
"""A proposed rule set: each rule a mapping, or its YAML text from the editor."""


class RuleSetForm(BaseModel):
    rules: RuleItems
    comment: str = Field("", max_length=300)
    base: int | None = None
    """The version the edit started from: a save refuses if a newer one exists."""


class EnabledForm(BaseModel):
    enabled: bool
    comment: str = Field("", max_length=300)
    base: int | None = None


class RollbackForm(BaseModel):
    comment: str = Field("", max_length=300)


class DryRunForm(BaseModel):
    rules: RuleItems
    hours: float = Field(24.0, gt=0, le=dryrun.MAX_HOURS)


# -- the page ------------------------------------------------------------------------


@router.get("/rules", include_in_schema=False)
async def rules_page(who: Technician) -> Response:
    return page("rules.html")


# -- reading -------------------------------------------------------------------------


@router.get("/api/rules")
async def running_rules(request: Request, who: Supervisor) -> dict[str, Any]:
    """The running version and its rules, each with its YAML for the editor."""
    gateway = gateway_of(request)
    version = _version(gateway, gateway.rules_version)
    return {
        "version": _meta(version),
        "rules": [_view(rule) for rule in version["rules"]],
    }


@router.get("/api/rules/{name}")
async def one_rule(name: str, request: Request, who: Supervisor) -> dict[str, Any]:
    gateway = gateway_of(request)
    version = _version(gateway, gateway.rules_version)
    for rule in version["rules"]:
        if rule.get("name") == name:
            return {"version": version["number"], **_view(rule)}
    raise HTTPException(404, f"no rule named {name!r} in version {version['number']}")


@router.get("/api/ruleset/versions")
async def versions(
    request: Request,
    who: Supervisor,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> dict[str, Any]:
    """Every version, newest first; ``running`` is the one in force."""
    gateway = gateway_of(request)
    return {
        "running": gateway.rules_version,
        "versions": gateway.rule_versions.versions(limit),
    }


@router.get("/api/ruleset/versions/{number}")
async def version(number: int, request: Request, who: Supervisor) -> dict[str, Any]:
    """One version as it was saved: its rules, who, when and why."""
    found = _version(gateway_of(request), number)
    return {**_meta(found), "rules": [_view(rule) for rule in found["rules"]]}


@router.get("/api/ruleset/audit")
async def audit_log(
    request: Request,
    who: Supervisor,
    limit: Annotated[int, Query(ge=1, le=audit.MAX_ROWS)] = 100,
) -> list[dict[str, Any]]:
    """Who changed rules and silences, newest first."""
    return audit.recent(gateway_of(request).store.db, limit)


# -- checking ------------------------------------------------------------------------


@router.post("/api/ruleset/validate")
async def validate(
    form: RuleSetForm, request: Request, who: Technician
) -> dict[str, Any]:
    """Check a proposed rule set; each problem names its rule, field and line."""
    _, _, problems = rulesets.check(gateway_of(request).config, form.rules)
    return {"ok": not problems, "problems": problems}


@router.post("/api/ruleset/dry-run")
async def dry_run(form: DryRunForm, request: Request, who: Technician) -> Any:
    """What the running and the proposed rules would have raised on recorded events."""
    gateway = gateway_of(request)
    proposed, _, problems = rulesets.check(gateway.config, form.rules)
    if problems:
        return _refused(problems)
    lock: asyncio.Lock = request.app.state.dry_run_lock
    if lock.locked():
        raise HTTPException(409, "a dry run is already running; try again shortly")
    async with lock:
        return await asyncio.to_thread(
            _dry_run, gateway, gateway.config.rules, proposed, form.hours
        )


def _dry_run(
    gateway: Gateway, current: Any, proposed: Any, hours: float
) -> dict[str, Any]:
    # A worker thread: its own read-only connection, never the gateway's.
    config = gateway.config
    window = dryrun.recorded(config.database.path, hours, time.time())
    tz = ZoneInfo(config.site.timezone)
    return dryrun.compare(window, config.physical, tz, current, proposed)


# -- changing ------------------------------------------------------------------------


@router.put("/api/ruleset")
async def save(form: RuleSetForm, request: Request, who: Technician) -> Any:
    """Save the rule set as a new version; it runs at once."""
    gateway = gateway_of(request)
    rules, content, problems = rulesets.check(gateway.config, form.rules)
    if problems:
        return _refused(problems)
    return await _run(
        gateway, who, rules, content, "save", form.comment, form.base, None
    )


@router.put("/api/rules/{name}/enabled")
async def enable(
    name: str, form: EnabledForm, request: Request, who: Technician
) -> Any:
    """Switch one rule on or off: a new version with only that changed."""
    gateway = gateway_of(request)
    current = _version(gateway, gateway.rules_version)
    content = [dict(rule) for rule in current["rules"]]
    found = [rule for rule in content if rule.get("name") == name]
    if not found:
        raise HTTPException(404, f"no rule named {name!r}")
    if form.enabled:
        found[0].pop("enabled", None)  # true is the default; keep the text short
    else:
        found[0]["enabled"] = False
    rules, _, problems = rulesets.check(gateway.config, content)
    if problems:
        return _refused(problems)
    action = "enable" if form.enabled else "disable"
    base = current["number"] if form.base is None else form.base
    return await _run(gateway, who, rules, content, action, form.comment, base, name)


@router.post("/api/ruleset/versions/{number}/rollback")
async def rollback(
    number: int, form: RollbackForm, request: Request, who: Technician
) -> Any:
    """Run version ``number`` again, as a new version with the same rules."""
    gateway = gateway_of(request)
    old = _version(gateway, number)
    rules, content, problems = rulesets.check(gateway.config, old["rules"])
    if problems:
        return _refused(
            problems, f"version {number} no longer fits the site file; not rolled back"
        )
    comment = form.comment or f"rolled back to version {number}"
    return await _run(
        gateway,
        who,
        rules,
        content,
        "rollback",
        comment,
        None,
        f"version {number}",
        restored_from=number,
    )


async def _run(
    gateway: Gateway,
    who: Principal,
    rules: Any,
    content: list[dict[str, Any]],
    action: str,
    comment: str,
    base: int | None,
    target: str | None,
    **extra: Any,
) -> dict[str, Any]:
    """Save and swap on the gateway's loop; answer once it runs."""
    try:
        done = await gateway.command(
            "rules",
            rules=rules,
            content=content,
            by=who.name,
            change=action,
            comment=comment,
            base=base,
            target=target,
            **extra,
        )
    except RuleSetConflict as exc:
        raise HTTPException(409, str(exc)) from None
    except RuntimeError as exc:
        raise HTTPException(503, str(exc)) from None
    return {"version": done["version"], "rules": len(content)}


# -- helpers -------------------------------------------------------------------------


def _version(gateway: Gateway, number: int) -> dict[str, Any]:
    found = gateway.rule_versions.version(number)
    if found is None:
        raise HTTPException(404, f"no rule set version {number}")
    return found


def _meta(version: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in version.items() if key != "rules"}


def _view(rule: dict[str, Any]) -> dict[str, Any]:
    """A stored rule for the page: its summary and its YAML text."""
    try:
        [parsed] = parse_rules([rule])
        levels = len(parsed.levels)
        kind, priority, enabled = parsed.kind, parsed.priority, parsed.enabled
    except ValueError:
        kind, priority, enabled, levels = rule.get("kind", "call"), None, None, 0
    return {
        "name": rule.get("name"),
        "kind": kind,
        "priority": priority,
        "enabled": enabled,
        "levels": levels,
        "yaml": rulesets.rule_yaml(rule),
        "rule": rule,
    }


def _refused(problems: list[dict[str, Any]], detail: str = "") -> JSONResponse:
    count = len(problems)
    text = detail or f"{count} problem{'s' if count != 1 else ''} in the rules"
    return JSONResponse({"detail": text, "problems": problems}, 422)
