"""Command line of the facility gateway: run, demo, check-config, backup, restore."""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import sys
from pathlib import Path

from gateway.config import ConfigError, load_config
from gateway.logs import setup_logging

EXIT_BAD_CONFIG = 2
EXIT_FAILED = 1


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    return int(args.command(args))


def _run(args: argparse.Namespace) -> int:
    from gateway.backup import BackupError, hold_database
    from gateway.runner import run_gateway
    from gateway.service import Gateway
    from gateway.sources import build_drivers

    config = _load_or_explain(args.config)
    if config is None:
        return EXIT_BAD_CONFIG
    # Killed by systemd's watchdog (SIGABRT) or crashing, it writes the stack
    # of every thread to stderr, the journal: where it hung, not just that.
    faulthandler.enable()
    # One gateway per database, and no restore underneath a running one.
    try:
        with hold_database(config.database.path, f"the gateway of {args.config}"):
            gateway = Gateway(config, drivers=build_drivers(config))
            asyncio.run(run_gateway(gateway))
    except BackupError as exc:
        print(f"Not started: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return 0


def _backup(args: argparse.Namespace) -> int:
    from gateway.backup import BackupError, backup

    config = _load_or_explain(args.config)
    if config is None:
        return EXIT_BAD_CONFIG
    database = args.database or config.database.path
    try:
        done = backup(database, args.config, args.file)
    except (BackupError, OSError) as exc:
        print(f"Backup failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    alerts = done.manifest["alerts"]
    print(
        f"{done.path}: database {database} ({done.manifest['database']['bytes']} "
        f"bytes, {alerts['unresolved']} unresolved of {alerts['total']} alerts, "
        f"integrity ok) and site file {args.config}"
    )
    return 0


def _restore(args: argparse.Namespace) -> int:
    import tempfile

    from gateway.backup import BackupError, read_site, restore
    from gateway.config import load_config

    try:
        database = args.database
        if database is None:
            # Where the restored site file (and any GATEWAY_ override) puts it.
            with tempfile.TemporaryDirectory() as folder:
                site = Path(folder) / "site.yaml"
                site.write_bytes(read_site(args.file))
                database = load_config(site).database.path
        done = restore(args.file, database, args.config)
    except ConfigError as exc:
        print(f"Restore failed: the site file in {args.file}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except (BackupError, OSError) as exc:
        print(f"Restore failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"Restored {done.database} and {done.site_file} from {args.file}")
    for path in done.kept:
        print(f"  kept the previous file as {path}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from gateway.demo import DEMO_SITE, run_demo

    site = Path(args.site) if args.site else DEMO_SITE
    try:
        return run_demo(site, duration=args.duration, speed=args.speed)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_BAD_CONFIG


def _check_config(args: argparse.Namespace) -> int:
    config = _load_or_explain(args.file)
    if config is None:
        return EXIT_BAD_CONFIG
    print(
        f"{args.file}: OK - site {config.site.id!r}, {len(config.zones)} zone(s), "
        f"{len(config.devices)} device(s), {len(config.staff)} staff, "
        f"{len(config.rules)} rule(s)"
    )
    return 0


def _schema(args: argparse.Namespace) -> int:
    import json

    from gateway.config import site_json_schema

    print(json.dumps(site_json_schema(), indent=2, sort_keys=True))
    return 0


def _load_or_explain(path: str):  # noqa: ANN202 - GatewayConfig or None
    try:
        return load_config(path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="main.py",
        description="Edge gateway that turns facility call buttons and sensors "
        "into game-time gap alerts for staff pagers and wall displays.",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        help="DEBUG, INFO, WARNING or ERROR (default INFO)",
    )
    parser.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="text lines (default), or one JSON object per line with the alert, "
        "event and device ids as keys, for a log shipper",
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the gateway for one site file")
    run.add_argument("--config", required=True, help="the site's YAML file")
    run.set_defaults(command=_run)

    demo = commands.add_parser(
        "demo",
        help="run the gateway on a simulated ward (starts a broker if none answers)",
    )
    demo.add_argument(
        "--site", help="site file to simulate (default: sites/demo-ward.yaml)"
    )
    demo.add_argument(
        "--duration",
        type=float,
        help="stop after this many seconds (default: until Ctrl-C)",
    )
    demo.add_argument(
        "--speed",
        type=float,
        default=1.0,
        help="people act this many times faster than real time (default 1)",
    )
    demo.set_defaults(command=_demo)

    check = commands.add_parser(
        "check-config", help="validate a site file and its rules, then exit"
    )
    check.add_argument("file", help="the site's YAML file")
    check.set_defaults(command=_check_config)

    schema = commands.add_parser(
        "schema",
        help="print the JSON Schema of site files (rules included) for editors",
    )
    schema.set_defaults(command=_schema)

    backup = commands.add_parser(
        "backup",
        help="copy the database (safely, while the gateway runs) and the site "
        "file into one .tar.gz",
    )
    backup.add_argument("file", help="the archive to write, e.g. gateway.tar.gz")
    backup.add_argument("--config", required=True, help="the site's YAML file")
    backup.add_argument(
        "--database", help="the database (default: database.path of the site)"
    )
    backup.set_defaults(command=_backup)

    restore = commands.add_parser(
        "restore",
        help="put a backup's database and site file back (the gateway must be "
        "stopped); the files replaced are kept beside them",
    )
    restore.add_argument("file", help="the archive written by 'backup'")
    restore.add_argument("--config", required=True, help="where the site file goes")
    restore.add_argument(
        "--database",
        help="where the database goes (default: database.path of the restored "
        "site file)",
    )
    restore.set_defaults(command=_restore)
    return parser


if __name__ == "__main__":
    sys.exit(main())
