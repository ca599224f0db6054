"""Log set-up for the entry point; library modules only get their loggers."""

from __future__ import annotations

import logging
import os
import sys
import time

import orjson

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


FIELDS = (
    "event",
    "alert",
    "device",
    "zone",
    "room",
    "rule",
    "transition",
    "alert_level",
    "staff",
    "via",
    "topic",
    "reason",
)
"""Context a log call may pass in ``extra``; the JSON format writes each as a key."""

FORMATS = ("text", "json")


class _JsonFormatter(logging.Formatter):
    """One JSON object per line, for a log shipper (Loki, Elasticsearch, ...).

    Alert transitions and refused messages carry their ids as keys (see
    :data:`FIELDS`), so a shipper can find every line about one alert or one
    device without parsing the sentence.
    """

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Log to stderr; under systemd, journald adds the timestamps itself.

    ``fmt="json"`` writes one JSON object per line instead of text.
    """
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: choose one of {', '.join(FORMATS)}")
    handler = logging.StreamHandler(sys.stderr)
    under_journal = "JOURNAL_STREAM" in os.environ
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
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
