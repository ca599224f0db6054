"""Log set-up for the entry point; library modules only get their loggers."""

from __future__ import annotations

import logging
import os
import sys

_COLOURS = {
    "OPENED": "\033[1;34m",
    "ESCALATED": "\033[1;31m",
    "ACKNOWLEDGED": "\033[1;33m",
    "RESOLVED": "\033[1;32m",
}
_RESET = "\033[0m"


class _Formatter(logging.Formatter):
    """Short lines; alert transitions in colour when writing to a terminal."""

    def __init__(self, colour: bool, timestamps: bool) -> None:
        fmt = "%(levelname)-7s %(name)-15s %(message)s"
        if timestamps:
            fmt = "%(asctime)s " + fmt
        super().__init__(fmt, datefmt="%H:%M:%S")
        self._colour = colour

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        if self._colour and record.name == "gateway.alerts":
            kind = str(record.args[0]) if isinstance(record.args, tuple) else ""
            colour = _COLOURS.get(kind)
            if colour:
                return f"{colour}{line}{_RESET}"
        return line


def setup_logging(level: str = "INFO") -> None:
    """Log to stderr; under systemd, journald adds the timestamps itself."""
    handler = logging.StreamHandler(sys.stderr)
    under_journal = "JOURNAL_STREAM" in os.environ
    handler.setFormatter(
        _Formatter(colour=sys.stderr.isatty(), timestamps=not under_journal)
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # paho logs every packet at DEBUG; keep it out of a normal run.
    logging.getLogger("gateway.mqtt.paho").setLevel(logging.WARNING)
    # uvicorn's start-up chatter repeats what the gateway already says.
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    # httpx logs every upstream request at INFO; the sender logs what matters.
    logging.getLogger("httpx").setLevel(logging.WARNING)
