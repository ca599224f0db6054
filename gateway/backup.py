"""Backup and restore of a gateway: its SQLite database and its site file.

A backup is one ``.tar.gz`` holding ``manifest.json``, ``gateway.db`` and
``site.yaml``. The database is copied with SQLite's online backup API from a
reading connection: in WAL mode the running gateway keeps committing while
the copy reads one consistent snapshot, so a backup never holds half of a
batch. The copy must pass ``PRAGMA integrity_check`` before it is archived,
and again before it is restored.

Restore never runs over a live gateway: ``main.py run`` holds an exclusive
lock (``<database>.lock``, flock) for as long as it runs, and restore takes
the same lock first, so neither can start while the other works. What it
replaces is kept beside it as ``*.before-restore-<time>``, never deleted.

Secret files the site file names (MQTT password, upstream secret, TLS keys)
are not in the archive: a backup can then be stored anywhere without
becoming a key, and the installer sets secrets up again on a new machine.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import io
import json
import logging
import os
import shutil
import sqlite3
import tarfile
import tempfile
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)

FORMAT = 1
"""Archive format version, written in the manifest and checked on restore."""

MANIFEST, DATABASE, SITE = "manifest.json", "gateway.db", "site.yaml"
CHUNK = 1 << 20
"""Bytes read at a time: a large database never sits in memory whole."""

GATEWAY_TABLES = ("alerts", "alert_history", "events", "outbox")
"""Tables a file must hold to be taken for a gateway database on restore."""


class BackupError(RuntimeError):
    """A backup or restore that could not be done; the message says why."""


# -- the lock a running gateway holds --------------------------------------------------


def lock_path(database: Path) -> Path:
    return database.with_name(database.name + ".lock")


@contextlib.contextmanager
def hold_database(database: str | Path, purpose: str) -> Iterator[None]:
    """Hold the database's lock, or fail at once naming who holds it.

    flock is released by the kernel when the holder exits, even by SIGKILL or
    a power cut, so a crashed gateway never leaves a stale lock behind.
    """
    path = lock_path(Path(database))
    path.parent.mkdir(parents=True, exist_ok=True)
    created = not path.exists()
    with path.open("a+") as handle:
        if created:
            # Made by root (a restore): the service user must open it too.
            _match_owner(path, path.parent)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise BackupError(
                f"{database} is in use by {holder}. Stop it first "
                "(systemctl stop facility-gateway), then run this again."
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{purpose} (pid {os.getpid()})\n")
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()


# -- backup ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Backup:
    path: Path
    manifest: dict[str, Any]


def backup(database: str | Path, site_file: str | Path, target: str | Path) -> Backup:
    """Write a consistent copy of the database and the site file to ``target``."""
    database, site_file, target = Path(database), Path(site_file), Path(target)
    if not database.is_file():
        raise BackupError(f"there is no database at {database}: check --database")
    if not site_file.is_file():
        raise BackupError(f"there is no site file at {site_file}: check --config")
    owner = database.stat().st_uid
    if os.geteuid() == 0 and owner != 0:
        raise BackupError(
            f"run the backup as the owner of {database} (for example "
            "sudo -u facility-gateway ...): SQLite opened by root can leave "
            "root-owned -wal and -shm files the gateway then cannot open"
        )

    with tempfile.TemporaryDirectory(prefix="gateway-backup-") as work:
        copy = Path(work) / DATABASE
        _online_copy(database, copy)
        _check_integrity(copy, f"the copy of {database}")
        manifest = {
            "format": FORMAT,
            "created_at": time.time(),
            "database": {"source": str(database), **_describe(copy)},
            "site_file": {"source": str(site_file), **_describe(site_file)},
            "alerts": _count_alerts(copy),
        }
        _write_archive(target, manifest, copy, site_file)

    log.info(
        "Backed up %s (%d bytes, %d unresolved alert(s)) and %s to %s",
        database,
        manifest["database"]["bytes"],
        manifest["alerts"]["unresolved"],
        site_file,
        target,
    )
    return Backup(target, manifest)


def _online_copy(database: Path, copy: Path) -> None:
    """SQLite's backup API: one consistent snapshot while writers carry on."""
    source = sqlite3.connect(database, timeout=30)
    try:
        target = sqlite3.connect(copy)
        try:
            # All pages in one step: one read transaction, one snapshot. In
            # WAL mode the gateway's commits go on meanwhile.
            source.backup(target)
            # One self-contained file, without a WAL beside it.
            target.execute("PRAGMA journal_mode=DELETE")
        finally:
            target.close()
    except sqlite3.Error as exc:
        raise BackupError(f"could not copy {database}: {exc}") from exc
    finally:
        source.close()


def _write_archive(
    target: Path, manifest: dict[str, Any], database: Path, site_file: Path
) -> None:
    """Write beside the target, then rename: never a half-written backup."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    # The archive holds the whole history of calls: readable by its owner only.
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz") as tar:
        body = json.dumps(manifest, indent=2, sort_keys=True).encode()
        info = tarfile.TarInfo(MANIFEST)
        info.size, info.mtime, info.mode = len(body), int(time.time()), 0o600
        tar.addfile(info, io.BytesIO(body))
        tar.add(database, arcname=DATABASE, filter=_private)
        tar.add(site_file, arcname=SITE, filter=_private)
        raw.flush()
        os.fsync(raw.fileno())
    os.replace(partial, target)


def _private(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mode = 0o600
    return info


# -- restore ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Restored:
    database: Path
    site_file: Path
    kept: list[Path]
    """What was there before, moved aside."""

    manifest: dict[str, Any]


def read_site(archive: str | Path) -> bytes:
    """The site file inside a backup, checked against its manifest."""
    with _open_archive(Path(archive)) as (manifest, tar):
        return _member(tar, manifest, SITE, "site_file")


def restore(
    archive: str | Path, database: str | Path, site_file: str | Path
) -> Restored:
    """Put the backup's database and site file in place; keep what was there."""
    archive, database, site_file = Path(archive), Path(database), Path(site_file)
    with hold_database(database, "main.py restore"):
        database.parent.mkdir(parents=True, exist_ok=True)
        incoming = database.with_name(f".{database.name}.restoring")
        try:
            with _open_archive(archive) as (manifest, tar):
                _extract(tar, manifest, DATABASE, "database", incoming)
                site_bytes = _member(tar, manifest, SITE, "site_file")
            _check_integrity(incoming, f"the database in {archive}")
            _check_gateway_tables(incoming, archive)
        except BackupError:
            incoming.unlink(missing_ok=True)
            raise

        stamp = time.strftime("%Y%m%dT%H%M%S")
        kept = _move_aside(database, stamp)
        _match_owner(incoming, kept[0] if kept else database.parent)
        os.replace(incoming, database)
        kept += _replace_file(site_file, site_bytes, stamp)
        _fsync_folder(database.parent)

    log.info("Restored %s and %s from %s", database, site_file, archive)
    return Restored(database, site_file, kept, manifest)


@contextlib.contextmanager
def _open_archive(archive: Path) -> Iterator[tuple[dict[str, Any], tarfile.TarFile]]:
    with contextlib.ExitStack() as stack:
        try:
            tar = stack.enter_context(tarfile.open(archive, mode="r:gz"))
            manifest = json.loads(_read(tar, MANIFEST, archive))
        except (OSError, EOFError, zlib.error, tarfile.TarError, ValueError) as exc:
            raise BackupError(
                f"{archive} is not a readable gateway backup: {exc}"
            ) from exc
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            found = manifest.get("format") if isinstance(manifest, dict) else None
            raise BackupError(
                f"{archive} is a backup of format {found!r}; "
                f"this gateway reads format {FORMAT}"
            )
        try:
            yield manifest, tar
        except (EOFError, zlib.error, gzip.BadGzipFile, tarfile.TarError) as exc:
            raise BackupError(f"{archive} is damaged: {exc}") from exc


def _open_member(tar: tarfile.TarFile, name: str, archive: Path | str) -> IO[bytes]:
    """One of our three names, as a regular file: nothing else is ever read."""
    try:
        member = tar.getmember(name)
    except KeyError:
        raise BackupError(f"{archive} has no {name}: not a gateway backup") from None
    handle = tar.extractfile(member) if member.isfile() else None
    if handle is None:
        raise BackupError(f"{name} in {archive} is not a regular file")
    return handle


def _read(tar: tarfile.TarFile, name: str, archive: Path | str) -> bytes:
    return _open_member(tar, name, archive).read()


def _member(
    tar: tarfile.TarFile, manifest: dict[str, Any], name: str, key: str
) -> bytes:
    data = _read(tar, name, tar.name or "the archive")
    _check_digest(tar, manifest, name, key, hashlib.sha256(data).hexdigest())
    return data


def _extract(
    tar: tarfile.TarFile, manifest: dict[str, Any], name: str, key: str, to: Path
) -> None:
    """Stream a member to a private file, hashing it on the way."""
    digest = hashlib.sha256()
    source = _open_member(tar, name, tar.name or "the archive")
    fd = os.open(to, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        while chunk := source.read(CHUNK):
            digest.update(chunk)
            handle.write(chunk)
        handle.flush()
        os.fsync(handle.fileno())
    _check_digest(tar, manifest, name, key, digest.hexdigest())


def _check_digest(
    tar: tarfile.TarFile, manifest: dict[str, Any], name: str, key: str, found: str
) -> None:
    if found != manifest.get(key, {}).get("sha256"):
        raise BackupError(
            f"{name} in {tar.name} does not match its manifest (damaged or "
            "altered archive); nothing was restored"
        )


def _move_aside(database: Path, stamp: str) -> list[Path]:
    """Move the old database and its WAL and shared-memory files away together.

    A WAL left beside a new database would be replayed into it: the three
    files only ever move as one.
    """
    kept = []
    for suffix in ("", "-wal", "-shm"):
        path = database.with_name(database.name + suffix)
        if path.exists():
            aside = path.with_name(f"{path.name}.before-restore-{stamp}")
            os.replace(path, aside)
            kept.append(aside)
    return kept


def _replace_file(path: Path, data: bytes, stamp: str) -> list[Path]:
    kept = []
    if path.exists():
        if path.read_bytes() == data:
            return []
        aside = path.with_name(f"{path.name}.before-restore-{stamp}")
        shutil.copy2(path, aside)
        kept.append(aside)
    path.parent.mkdir(parents=True, exist_ok=True)
    incoming = path.with_name(f".{path.name}.restoring")
    _write_private(incoming, data)
    _match_owner(incoming, kept[0] if kept else path.parent)
    os.replace(incoming, path)
    return kept


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _match_owner(path: Path, like: Path) -> None:
    """Run as root for a service user's files: hand the new file to that user."""
    if os.geteuid() != 0:
        return
    status = like.stat()
    os.chown(path, status.st_uid, status.st_gid)


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- checks ----------------------------------------------------------------------------


def _check_integrity(path: Path, what: str) -> None:
    try:
        with contextlib.closing(sqlite3.connect(path)) as conn:
            rows = [row[0] for row in conn.execute("PRAGMA integrity_check")]
    except sqlite3.DatabaseError as exc:
        raise BackupError(f"{what} fails PRAGMA integrity_check: {exc}") from exc
    if rows != ["ok"]:
        shown = "; ".join(rows[:5])
        raise BackupError(f"{what} fails PRAGMA integrity_check: {shown}")


def _check_gateway_tables(path: Path, archive: Path) -> None:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    missing = [table for table in GATEWAY_TABLES if table not in names]
    if missing:
        raise BackupError(
            f"the database in {archive} lacks {', '.join(missing)}: "
            "not a gateway database"
        )


def _describe(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def _count_alerts(path: Path) -> dict[str, int]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        total = conn.execute("SELECT count(*) FROM alerts").fetchone()[0]
        open_ = conn.execute(
            "SELECT count(*) FROM alerts WHERE state != 'resolved'"
        ).fetchone()[0]
    return {"total": total, "unresolved": open_}
