"""The audit log: who changed what on the web page, and when.

Rule set saves, enable switches and rollbacks are written in the same
transaction as the version they make; silences are written after the
gateway has committed them. Acknowledgements and resolutions are not here:
each alert's own timeline (``alert_history``) already names who and how.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import sqlite_utils

log = logging.getLogger(__name__)

MAX_ROWS = 500
"""The most rows one read returns; the table itself keeps everything."""


def record(
    db: sqlite_utils.Database,
    by: str,
    action: str,
    target: str | None = None,
    *,
    version: int | None = None,
    detail: dict[str, Any] | None = None,
    at: float | None = None,
) -> None:
    """Add one row; inside the caller's transaction if there is one."""
    db.execute(
        "INSERT INTO audit_log (at, by, action, target, version, detail) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        [
            time.time() if at is None else at,
            by,
            action,
            target,
            version,
            json.dumps(detail) if detail else None,
        ],
    )


def record_now(db: sqlite_utils.Database, by: str, action: str, **kw: Any) -> None:
    """Add one row in a transaction of its own."""
    with db.atomic():
        record(db, by, action, **kw)
    log.info("Audit: %s %s %s", by, action, kw.get("target") or "")


def recent(db: sqlite_utils.Database, limit: int = 100) -> list[dict[str, Any]]:
    """The newest rows first."""
    rows = db.query(
        "SELECT id, at, by, action, target, version, detail FROM audit_log "
        "ORDER BY id DESC LIMIT ?",
        [min(limit, MAX_ROWS)],
    )
    return [
        {**row, "detail": json.loads(row["detail"]) if row["detail"] else None}
        for row in rows
    ]
