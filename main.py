"""Command line of the facility gateway: run, demo, check-config."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from gateway.config import ConfigError, load_config
from gateway.logs import setup_logging

EXIT_BAD_CONFIG = 2


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(args.log_level)
    return int(args.command(args))


def _run(args: argparse.Namespace) -> int:
    from gateway.runner import run_gateway
    from gateway.service import Gateway
    from gateway.sources import build_drivers

    config = _load_or_explain(args.config)
    if config is None:
        return EXIT_BAD_CONFIG
    asyncio.run(run_gateway(Gateway(config, drivers=build_drivers(config))))
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
    return parser


if __name__ == "__main__":
    sys.exit(main())
