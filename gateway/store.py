"""SQLite storage: the gateway's system of record.

Alerts, their timelines and the raw events live here, never in the broker:
Mosquitto's persistence is a periodic snapshot that can be lost or corrupted
by a power cut, so after a restart this file alone says what is open.

Every batch of changes is one transaction committed with
``synchronous=FULL``: when :meth:`Store.record` returns, the transitions are
on disk and survive a power cut, and a burst of events costs one sync, not one
per event. The schema evolves by numbered migrations (sqlite-utils).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import orjson
import sqlite_utils
from sqlite_utils import Migrations

from rules.alerts import Alert, AlertState, Change, Kudos
from rules.events import Event

log = logging.getLogger(__name__)

migrations = Migrations("gateway")

ALERT_COLUMNS = (
    "id", "rule", "priority", "state", "level", "version", "device", "room",
    "zone", "event_id", "opened_at", "updated_at", "due_at", "acked_at",
    "acked_by", "resolved_at", "resolved_by", "resolved_via", "late",
    "notified_at", "reminders", "escalation_base", "subject", "repeats",
    "held", "detail", "proof",
)  # fmt: skip
JSON_COLUMNS = ("detail", "proof")
BOOL_COLUMNS = ("late", "held")


@migrations()
def m001_initial(db: sqlite_utils.Database) -> None:
    db["events"].create(
        {
            "id": str, "type": str, "device": str, "ts": float,
            "received_at": float, "fields": str,
        },
        pk="id",
        not_null={"type", "device", "ts", "received_at"},
    )  # fmt: skip
    db["events"].create_index(["received_at"])

    db["alerts"].create(
        {
            "id": str, "rule": str, "priority": str, "state": str,
            "level": int, "version": int, "device": str, "room": str,
            "zone": str, "event_id": str, "opened_at": float,
            "updated_at": float, "due_at": float, "acked_at": float,
            "acked_by": str, "resolved_at": float, "resolved_by": str,
            "resolved_via": str, "late": int,
        },
        pk="id",
        not_null={"rule", "state", "level", "version", "device", "opened_at"},
    )  # fmt: skip
    db["alerts"].create_index(["state"])

    db["alert_history"].create(
        {
            "id": int, "alert_id": str, "version": int, "kind": str,
            "state": str, "level": int, "at": float, "actor": str,
            "via": str, "late": int,
        },
        pk="id",
        not_null={"alert_id", "version", "kind", "state", "at"},
    )  # fmt: skip
    db["alert_history"].create_index(["alert_id", "version"], unique=True)

    # Records waiting to go upstream; written in the same transaction as the
    # alert's final state so a resolved gap can never miss its credit.
    db["outbox"].create(
        {"seq": int, "key": str, "kind": str, "created_at": float, "body": str},
        pk="seq",
        not_null={"key", "kind", "created_at", "body"},
    )
    db["outbox"].create_index(["key"], unique=True)


# Built once from the constant column list above, never from input.
@migrations()
def m002_reminders_and_ack_timeout(db: sqlite_utils.Database) -> None:
    alerts = db["alerts"]
    alerts.add_column("notified_at", float)
    alerts.add_column("reminders", int, not_null_default=0)
    alerts.add_column("escalation_base", float)


@migrations()
def m003_rule_kinds_and_state(db: sqlite_utils.Database) -> None:
    alerts = db["alerts"]
    alerts.add_column("subject", str)
    alerts.add_column("repeats", int, not_null_default=0)
    alerts.add_column("held", int, not_null_default=0)
    alerts.add_column("detail", str)
    alerts.add_column("proof", str)
    # Counters, windows, pending thresholds, presence and silences: one JSON
    # value per key, written with the alert changes of the same batch.
    db["engine_state"].create({"key": str, "value": str}, pk="key")


@migrations()
def m004_outbox_delivery(db: sqlite_utils.Database) -> None:
    outbox = db["outbox"]
    outbox.add_column("delivered_at", float)
    outbox.add_column("dead_at", float)
    outbox.add_column("error", str)
    # Partial indexes hold only their own rows: the alert path barely
    # notices them, and the sender finds what is pending without a scan.
    db.execute(
        "CREATE INDEX outbox_pending ON outbox (seq) "
        "WHERE delivered_at IS NULL AND dead_at IS NULL"
    )
    db.execute("CREATE INDEX outbox_dead ON outbox (dead_at) WHERE dead_at IS NOT NULL")
    db.execute("CREATE INDEX outbox_kudos ON outbox (created_at) WHERE kind = 'kudos'")
    db["outbox_counters"].create(
        {"name": str, "value": int}, pk="name", not_null={"value"}
    )
    db["alerts"].create_index(["resolved_at"], index_name="alerts_resolved_at")
    db["alert_history"].create_index(["at"], index_name="alert_history_at")


@migrations()
def m005_polls(db: sqlite_utils.Database) -> None:
    # A round keeps its salt only while open; closing deletes the salt and
    # every answer, leaving counts (and, with enough answers, the outbox).
    db["poll_rounds"].create(
        {
            "poll": str, "round": str, "opened_at": float, "closes_at": float,
            "closed_at": float, "salt": str, "answered": int,
        },
        pk=("poll", "round"),
        not_null={"opened_at", "closes_at"},
    )  # fmt: skip
    db["poll_rounds"].create_index(["closes_at"], index_name="poll_rounds_closes")
    # ``voter`` is sha256(salt:staff id), or of a button press's event id.
    db["poll_answers"].create(
        {"poll": str, "round": str, "voter": str, "answer": str, "at": float},
        pk=("poll", "round", "voter"),
        not_null={"answer", "at"},
    )


@migrations()
def m006_web_accounts(db: sqlite_utils.Database) -> None:
    # Web sign-in. Passwords and PINs are Argon2 hashes; sessions and display
    # tokens are kept as SHA-256 of the random value the browser holds, so a
    # copy of this file lets nobody sign in.
    db["web_users"].create(
        {
            "name": str, "role": str, "password_hash": str, "staff": str,
            "created_at": float, "updated_at": float,
        },
        pk="name",
        not_null={"role", "password_hash", "created_at", "updated_at"},
    )  # fmt: skip
    db["web_sessions"].create(
        {
            "token_hash": str, "kind": str, "subject": str, "csrf": str,
            "created_at": float, "expires_at": float,
        },
        pk="token_hash",
        not_null={"kind", "subject", "csrf", "created_at", "expires_at"},
    )  # fmt: skip
    db["web_sessions"].create_index(["expires_at"], index_name="web_sessions_expiry")
    db["display_tokens"].create(
        {
            "id": str, "token_hash": str, "label": str, "created_by": str,
            "created_at": float, "revoked_at": float,
        },
        pk="id",
        not_null={"token_hash", "label", "created_by", "created_at"},
    )  # fmt: skip
    db["display_tokens"].create_index(["token_hash"], unique=True)
    db["staff_pins"].create(
        {"staff": str, "pin_hash": str, "set_by": str, "set_at": float},
        pk="staff",
        not_null={"pin_hash", "set_by", "set_at"},
    )
    # The key that signs session cookies, made once per database.
    db["web_secrets"].create({"name": str, "value": str}, pk="name")


@migrations()
def m007_rule_versions(db: sqlite_utils.Database) -> None:
    # Append-only: a save, an enable switch or a rollback adds a version; the
    # newest one runs. ``rules`` is the JSON of the ``rules:`` list as written,
    # ``digest`` the SHA-256 of it normalised, to tell a changed site file.
    db["rule_versions"].create(
        {
            "number": int, "rules": str, "digest": str, "source": str,
            "action": str, "saved_by": str, "saved_at": float, "comment": str,
            "restored_from": int,
        },
        pk="number",
        not_null={"rules", "digest", "source", "action", "saved_by", "saved_at"},
    )  # fmt: skip
    # Who changed what on the web page, and when: rule sets and silences.
    db["audit_log"].create(
        {
            "id": int, "at": float, "by": str, "action": str, "target": str,
            "version": int, "detail": str,
        },
        pk="id",
        not_null={"at", "by", "action"},
    )  # fmt: skip
    db["audit_log"].create_index(["at"], index_name="audit_log_at")


_UPSERT_ALERT = (
    f"INSERT INTO alerts ({', '.join(ALERT_COLUMNS)}) "  # noqa: S608
    f"VALUES ({', '.join('?' for _ in ALERT_COLUMNS)}) "
    "ON CONFLICT(id) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in ALERT_COLUMNS[1:])
)
_INSERT_HISTORY = (
    "INSERT OR IGNORE INTO alert_history "
    "(alert_id, version, kind, state, level, at, actor, via, late) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_EVENT = (
    "INSERT OR IGNORE INTO events (id, type, device, ts, received_at, fields) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)
_UPSERT_STATE = (
    "INSERT INTO engine_state (key, value) VALUES (?, ?) "
    "ON CONFLICT(key) DO UPDATE SET value = excluded.value"
)
_DELETE_STATE = "DELETE FROM engine_state WHERE key = ?"
_INSERT_OUTBOX = (
    "INSERT OR IGNORE INTO outbox (key, kind, created_at, body) VALUES (?, ?, ?, ?)"
)


class Store:
    """One SQLite file, opened by one writer: the gateway's event loop."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Opened by whoever builds the gateway, then used only by its event
        # loop's thread: one thread at a time, but not always the first one.
        connection = sqlite3.connect(self.path, check_same_thread=False)
        self.db = sqlite_utils.Database(connection)
        conn = self.db.conn
        # Small pages for a new database: a commit rewrites every page it
        # touches, and a call touches a few rows in several tables and
        # indexes, so 1 KB pages write a quarter of the bytes of the default
        # 4 KB to the SD card. (An existing database keeps its page size.)
        conn.execute("PRAGMA page_size=1024")
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL syncs the WAL on every commit: a returned commit survives a
        # power cut, which NORMAL does not promise.
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=5000")
        migrations.apply(self.db)
        self.commits = 0
        log.info("Opened database %s", self.path)

    def close(self) -> None:
        self.db.close()

    # -- writes ----------------------------------------------------------------

    def record(
        self,
        events: Sequence[Event],
        changes: Sequence[Change],
        state: Mapping[str, Any] | None = None,
        kudos: Sequence[Kudos] = (),
        credits: Mapping[str, Any] | None = None,
    ) -> None:
        """Commit a batch of accepted events, alert changes and engine state.

        ``credits`` (by outbox key) go into the outbox records of resolved
        alerts and kudos, in the same transaction as the alerts' final state.
        """
        state = state or {}
        credits = credits or {}
        if not events and not changes and not state and not kudos:
            return
        now = time.time()
        conn = self.db.conn
        with self.db.atomic():
            conn.executemany(_INSERT_EVENT, [_event_row(e, now) for e in events])
            conn.executemany(_UPSERT_ALERT, [_alert_row(c.alert) for c in changes])
            conn.executemany(_INSERT_HISTORY, [_history_row(c) for c in changes])
            conn.executemany(
                _INSERT_OUTBOX,
                [_outbox_row(c, now, credits) for c in changes if c.kind == "resolved"],
            )
            conn.executemany(
                _INSERT_OUTBOX, [_kudos_row(k, now, credits) for k in kudos]
            )
            conn.executemany(
                _UPSERT_STATE,
                [(k, _json(v)) for k, v in state.items() if v is not None],
            )
            conn.executemany(
                _DELETE_STATE, [(k,) for k, v in state.items() if v is None]
            )
        self.commits += 1

    # -- reads -------------------------------------------------------------------

    def unresolved_alerts(self) -> list[Alert]:
        rows = self.db.query(
            "SELECT * FROM alerts WHERE state != ? ORDER BY opened_at",
            [AlertState.RESOLVED.value],
        )
        return [_alert_from_row(row) for row in rows]

    def engine_state(self) -> dict[str, Any]:
        rows = self.db.query("SELECT key, value FROM engine_state")
        return {row["key"]: json.loads(row["value"]) for row in rows}

    def alert(self, alert_id: str) -> dict[str, Any] | None:
        rows = list(self.db.query("SELECT * FROM alerts WHERE id = ?", [alert_id]))
        return rows[0] if rows else None

    def recent_alerts(self, limit: int = 50) -> list[dict[str, Any]]:
        return list(
            self.db.query(
                "SELECT * FROM alerts ORDER BY updated_at DESC LIMIT ?", [limit]
            )
        )

    def history(self, alert_id: str) -> list[dict[str, Any]]:
        return list(
            self.db.query(
                "SELECT * FROM alert_history WHERE alert_id = ? ORDER BY version",
                [alert_id],
            )
        )

    def recent_event_ids(self, limit: int) -> list[str]:
        rows = self.db.query(
            "SELECT id FROM events ORDER BY received_at DESC LIMIT ?", [limit]
        )
        return [row["id"] for row in rows]

    def integrity_ok(self) -> bool:
        try:
            row = self.db.execute("PRAGMA integrity_check").fetchone()
        except sqlite3.DatabaseError:
            log.exception("Integrity check of %s failed", self.path)
            return False
        return bool(row) and row[0] == "ok"


def _event_row(event: Event, received_at: float) -> tuple[Any, ...]:
    fields = _json(event.fields) if event.fields else None
    return (event.id, event.type, event.device, event.ts, received_at, fields)


def _json(value: Any) -> str:
    """JSON text for a column; orjson, because this runs for every event."""
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()


def _alert_row(alert: Alert) -> tuple[Any, ...]:
    values = alert_record(alert)
    values["state"] = alert.state.value
    for column in BOOL_COLUMNS:
        values[column] = int(values[column])
    for column in JSON_COLUMNS:
        if values[column] is not None:
            values[column] = _json(values[column])
    return tuple(values[column] for column in ALERT_COLUMNS)


def _history_row(change: Change) -> tuple[Any, ...]:
    alert = change.alert
    return (
        alert.id, alert.version, change.kind, alert.state.value, alert.level,
        alert.updated_at, change.actor, change.via, int(alert.late),
    )  # fmt: skip


def _outbox_row(
    change: Change, now: float, credits: Mapping[str, Any]
) -> tuple[Any, ...]:
    key = f"alert:{change.alert.id}"
    body = alert_record(change.alert)
    if key in credits:
        body["credit"] = credits[key]
    return (key, "alert.resolved", now, json.dumps(body))


def _kudos_row(kudos: Kudos, now: float, credits: Mapping[str, Any]) -> tuple[Any, ...]:
    key = f"kudos:{kudos.id}"
    body = asdict(kudos)
    if key in credits:
        body["credit"] = credits[key]
    return (key, "kudos", now, json.dumps(body))


_ALERT_FIELDS = tuple(field.name for field in fields(Alert))


def alert_record(alert: Alert) -> dict[str, Any]:
    """The JSON form of an alert, shared by MQTT, the outbox and the web.

    A shallow copy: ``asdict`` deep-copies and cost a fifth of the CPU of a
    call in the benchmark. The nested ``detail`` and ``proof`` are never
    mutated after the alert changes, so sharing them is safe.
    """
    record = {name: getattr(alert, name) for name in _ALERT_FIELDS}
    record["state"] = alert.state.value
    return record


def _alert_from_row(row: dict[str, Any]) -> Alert:
    values = {column: row[column] for column in ALERT_COLUMNS}
    values["state"] = AlertState(values["state"])
    for column in BOOL_COLUMNS:
        values[column] = bool(values[column])
    for column in JSON_COLUMNS:
        if values[column] is not None:
            values[column] = json.loads(values[column])
    return Alert(**values)


def all_rows(store: Store, table: str) -> Iterable[dict[str, Any]]:
    """Every row of a table, for tests and diagnostics."""
    return store.db[table].rows
