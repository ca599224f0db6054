"""``main.py backup`` and ``main.py restore`` against a real, running gateway.

The backup is taken while calls keep arriving, so the copy must be a
consistent snapshot; restore must refuse while the gateway runs, refuse a
damaged archive without touching anything, and otherwise bring back exactly
the state at the time of the backup, keeping what it replaced.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

from tests.helpers import MAIN, ROOT, WAIT, event, query, site_config, write_site

TIMEOUT = 60


def run_main(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(MAIN), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def members(archive: Path) -> dict[str, bytes]:
    with tarfile.open(archive, "r:gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]


def write_archive(path: Path, files: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def open_alert(mqtt, topics, device: str) -> dict:
    display = mqtt(topics.alerts)
    mqtt().publish(topics.events(device), event(device))
    return display.wait_for_json(device=device, state="open")


def test_backup_of_a_busy_gateway_is_a_consistent_snapshot(
    start_gateway, mqtt, topics, tmp_path
):
    gateway = start_gateway(devices=20)
    open_alert(mqtt, topics, "call-1")
    device = mqtt()
    stop = threading.Event()

    def keep_calling() -> None:
        # Calls and cancels while the backup reads: every one a commit.
        n = 0
        while not stop.is_set():
            name = f"call-{2 + n % 19}"
            device.publish(topics.events(name), event(name, "call"))
            device.publish(topics.events(name), event(name, "cancel"))
            n += 1

    caller = threading.Thread(target=keep_calling)
    caller.start()
    try:
        time.sleep(0.5)
        archive = tmp_path / "backup.tar.gz"
        result = run_main(
            "backup", str(archive), "--config", str(gateway.site_file),
            env=gateway.environ(),
        )  # fmt: skip
    finally:
        stop.set()
        caller.join(WAIT)
    assert result.returncode == 0, result.stderr
    assert gateway.running
    assert archive.stat().st_mode & 0o777 == 0o600

    files = members(archive)
    assert sorted(files) == ["gateway.db", "manifest.json", "site.yaml"]
    manifest = json.loads(files["manifest.json"])
    assert manifest["format"] == 1
    assert files["site.yaml"] == gateway.site_file.read_bytes()
    for name, key in (("gateway.db", "database"), ("site.yaml", "site_file")):
        assert hashlib.sha256(files[name]).hexdigest() == manifest[key]["sha256"]

    copy = tmp_path / "copy.db"
    copy.write_bytes(files["gateway.db"])
    assert query(copy, "PRAGMA integrity_check") == [{"integrity_check": "ok"}]
    # Alerts and their history are committed together: in a consistent copy
    # every alert's latest version has its history row, and the opened call
    # is there.
    torn = query(
        copy,
        "SELECT a.id, a.version, max(h.version) AS history FROM alerts a "
        "LEFT JOIN alert_history h ON h.alert_id = a.id GROUP BY a.id "
        "HAVING history IS NULL OR history != a.version",
    )
    assert torn == []
    alerts = query(copy, "SELECT device, state FROM alerts")
    assert {"device": "call-1", "state": "open"} in alerts
    assert len(alerts) > 5, "calls kept coming while the backup ran"
    assert manifest["alerts"]["total"] == len(alerts)


def test_restore_refuses_while_the_gateway_runs(start_gateway, mqtt, topics, tmp_path):
    gateway = start_gateway()
    open_alert(mqtt, topics, "call-1")
    archive = tmp_path / "backup.tar.gz"
    env = gateway.environ()
    made = run_main("backup", str(archive), "--config", str(gateway.site_file), env=env)
    assert made.returncode == 0, made.stderr
    before = gateway.db_path.read_bytes()

    result = run_main(
        "restore", str(archive), "--config", str(gateway.site_file), env=env
    )
    assert result.returncode == 1
    assert "in use by the gateway of" in result.stderr
    assert "Stop it first" in result.stderr
    assert gateway.running
    assert gateway.db_path.read_bytes() == before
    assert not list(tmp_path.glob("*.before-restore-*"))


def test_a_second_gateway_on_the_same_database_is_not_started(start_gateway):
    gateway = start_gateway()
    second = run_main("run", "--config", str(gateway.site_file), env=gateway.environ())
    assert second.returncode == 1
    assert f"Not started: {gateway.db_path} is in use" in second.stderr
    assert gateway.running


def test_restore_brings_back_the_state_of_the_backup(
    start_gateway, mqtt, topics, tmp_path
):
    gateway = start_gateway()
    kept_open = open_alert(mqtt, topics, "call-1")
    archive = tmp_path / "backup.tar.gz"
    env = gateway.environ()
    made = run_main("backup", str(archive), "--config", str(gateway.site_file), env=env)
    assert made.returncode == 0, made.stderr
    later = open_alert(mqtt, topics, "call-2")  # after the backup: not restored
    gateway.stop()
    original_site = gateway.site_file.read_bytes()
    gateway.site_file.write_text(original_site.decode() + "# edited later\n")

    result = run_main(
        "restore", str(archive), "--config", str(gateway.site_file), env=env
    )
    assert result.returncode == 0, result.stderr
    assert gateway.site_file.read_bytes() == original_site
    # What was replaced is kept: the database (with its WAL files, if the
    # last close left any) and the edited site file.
    kept = {p.name.split(".before-restore-")[0] for p in tmp_path.glob("*.before-*")}
    assert {"gw.db", gateway.site_file.name} <= kept
    assert kept <= {"gw.db", "gw.db-wal", "gw.db-shm", gateway.site_file.name}
    assert query(gateway.db_path, "PRAGMA integrity_check") == [
        {"integrity_check": "ok"}
    ]

    # The gateway starts on the restored file with call-1 open, call-2 never.
    gateway.start()
    states = {
        a["id"]: a["state"] for a in gateway.query("SELECT id, state FROM alerts")
    }
    assert states == {kept_open["id"]: "open"}
    assert later["id"] not in states
    health = gateway.healthz()
    assert health["open_alerts"] == 1


def test_restore_refuses_a_damaged_or_altered_archive(
    start_gateway, mqtt, topics, tmp_path
):
    gateway = start_gateway()
    open_alert(mqtt, topics, "call-1")
    archive = tmp_path / "backup.tar.gz"
    env = gateway.environ()
    made = run_main("backup", str(archive), "--config", str(gateway.site_file), env=env)
    assert made.returncode == 0, made.stderr
    gateway.stop()
    before = gateway.db_path.read_bytes()
    files = members(archive)

    # A database altered after the backup: its digest no longer matches.
    altered = dict(files)
    altered["gateway.db"] = files["gateway.db"][:-1] + b"\x01"
    write_archive(tmp_path / "altered.tar.gz", altered)

    # A database damaged before it was archived: the digest matches, but
    # PRAGMA integrity_check does not pass.
    broken_db = bytearray(files["gateway.db"])
    page = 4096
    broken_db[2 * page : 3 * page] = b"\xff" * page
    manifest = json.loads(files["manifest.json"])
    manifest["database"]["sha256"] = hashlib.sha256(broken_db).hexdigest()
    damaged = dict(files)
    damaged["gateway.db"] = bytes(broken_db)
    damaged["manifest.json"] = json.dumps(manifest).encode()
    write_archive(tmp_path / "damaged.tar.gz", damaged)

    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])

    for name, expected in (
        ("altered.tar.gz", "does not match its manifest"),
        ("damaged.tar.gz", "fails PRAGMA integrity_check"),
        ("truncated.tar.gz", "damaged"),
    ):
        result = run_main(
            "restore", str(tmp_path / name), "--config", str(gateway.site_file),
            env=env,
        )  # fmt: skip
        assert result.returncode == 1, (name, result.stdout)
        assert expected in result.stderr, (name, result.stderr)
        assert gateway.db_path.read_bytes() == before, name
        assert not list(tmp_path.glob("*.before-restore-*")), name
        assert not list(tmp_path.glob(".*.restoring")), name


def test_backup_of_a_missing_database_says_what_to_check(tmp_path, topics):
    site_file = write_site(tmp_path / "site.yaml", site_config(topics.site))
    env = {**os.environ, "GATEWAY_DATABASE__PATH": str(tmp_path / "none" / "gw.db")}
    result = run_main(
        "backup", str(tmp_path / "b.tar.gz"), "--config", str(site_file), env=env
    )
    assert result.returncode == 1
    assert "there is no database at" in result.stderr
    assert not (tmp_path / "b.tar.gz").exists()
    assert not (tmp_path / "none").exists()
