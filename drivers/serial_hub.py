"""Room and restroom sensor hubs on a serial line: ASCII frames in, events out.

A hub is a small microcontroller with sensors on numbered channels (a people
counter, dispenser levels, occupancy, air quality, a door contact). It writes
one frame per line, at most 128 bytes including the line end::

    $HUB,1,wc2,17,LVL,ch=2,soap_level=37*A646\\r\\n

    HUB          fixed tag            1    protocol version
    wc2          hub id               17   sequence number (see below)
    LVL          kind                 ch=2 channel, then the kind's fields
    *A646        CRC-16/CCITT-FALSE of the bytes between ``$`` and ``*``

Kinds and the engine events they become (``hub``, ``channel`` and ``seq`` are
added to every event):

=====  ====================================  ======================================
kind   fields                                events
=====  ====================================  ======================================
CNT    ``ch``, ``n`` (visits, default 1)     ``n`` x ``visit``
LVL    ``ch``, ``<reading>=<number>`` ...    one ``reading`` per pair
AIR    ``ch``, ``<reading>=<number>`` ...    one ``reading`` per pair
OCC    ``ch``, ``occupied`` (0 or 1)         ``occupancy`` with ``occupied``
DOOR   ``ch``, ``open`` (0 or 1)             ``door`` with ``open``
HB     ``ch`` optional, ``up`` (s) optional  ``heartbeat`` (hub's or channel's)
=====  ====================================  ======================================

The settings map each hub id and channel to a device id of the site file.
Sequence numbers run 1..65535 and wrap to 1; 0 marks a hub's first frame
after boot. A frame identical to one of the hub's last 64 is a repeat (a
replay after a reconnect) and is dropped; a jump counts as a gap.

Bad lines are rejected, counted by reason and logged once per burst; the
reader never stops on them. A lost port is reopened with capped, jittered
exponential backoff, and :meth:`SerialHubDriver.health` says it is offline
meanwhile. ``firmware-config/serial-hub-protocol.md`` is the full contract.
"""

from __future__ import annotations

import binascii
import contextlib
import logging
import random
import re
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

import serial
from pydantic import Field, field_validator, model_validator

from drivers.base import Emit, make_event
from rules.schema import Duration, StrictModel

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1

MAX_LINE = 128
"""Bytes in a frame from ``$`` to ``\\n``: fits a hub's UART buffer and caps
what a noisy line can make the gateway hold."""

SEQ_MAX = 65535
"""Sequence numbers run 1..SEQ_MAX and wrap to 1; 0 is kept for boot."""

REPEAT_WINDOW = 64
"""Frames per hub remembered to spot a replay; hubs replay at most this many."""

MAX_VISITS = 100
"""A counter batching more visits into one frame is broken, not busy."""

READ_TIMEOUT = 0.5
"""Longest one read blocks: bounds stop() on ports without cancel_read."""

STOP_TIMEOUT = 6.0
"""A ``socket://`` connect may block 5 s inside pyserial before stop is seen."""

LOG_QUIET = 60.0
"""A problem is logged again only once it has been absent this long."""

REJECT_REASONS = (
    "too_long",
    "truncated",
    "noise",
    "bad_syntax",
    "bad_checksum",
    "unsupported_version",
    "unknown_hub",
    "unknown_kind",
    "unknown_channel",
    "missing_field",
    "non_numeric",
    "bad_value",
    "internal_error",
)
"""Every reason a line can be refused for; health lists each, zeros included."""

_DELIMITER = re.compile(rb"[$\n]")
_HEX4 = re.compile(rb"[0-9A-Fa-f]{4}")
_NAME = r"[A-Za-z0-9_-]{1,16}"
_HUB_ID = re.compile(_NAME)
_SEQ = re.compile(r"\d{1,5}")
_KIND = re.compile(r"[A-Z]{1,8}")
_KEY = re.compile(r"[a-z][a-z0-9_]{0,31}")
_VALUE = re.compile(r"[A-Za-z0-9._:+-]{1,32}")
# Plain decimals only: "nan", "inf" and exponents are what a broken
# sensor driver prints, never a reading.
_NUMBER = re.compile(r"-?\d{1,9}(\.\d{1,6})?")


# -- wire format ------------------------------------------------------------------


def crc16_ccitt(data: bytes) -> int:
    """CRC-16/CCITT-FALSE (poly 0x1021, init 0xFFFF): ``b"123456789"`` -> 0x29B1."""
    return binascii.crc_hqx(data, 0xFFFF)


def encode_frame(hub: str, seq: int, kind: str, **fields: float | str) -> bytes:
    """Build one frame exactly as a hub sends it: the reference encoder.

    >>> encode_frame("wc2", 17, "LVL", ch=2, soap_level=37)
    b'$HUB,1,wc2,17,LVL,ch=2,soap_level=37*A646\\r\\n'

    Raises:
        ValueError: the frame would be longer than :data:`MAX_LINE` bytes.
    """
    parts = ["HUB", str(PROTOCOL_VERSION), hub, str(seq), kind]
    parts += [f"{key}={_wire_value(value)}" for key, value in fields.items()]
    body = ",".join(parts).encode("ascii")
    frame = b"$%s*%04X\r\n" % (body, crc16_ccitt(body))
    if len(frame) > MAX_LINE:
        raise ValueError(
            f"frame is {len(frame)} bytes, the limit is {MAX_LINE}: {_clip(frame)}"
        )
    return frame


def _wire_value(value: float | str) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        # Fixed point: the wire has no exponents.
        return f"{value:.6f}".rstrip("0").rstrip(".")
    return str(value)


def _clip(line: bytes, limit: int = 48) -> str:
    """A bad frame for a log line: repr, cut short, so noise cannot flood it."""
    text = repr(line[:limit])
    return text + "..." if len(line) > limit else text


class FrameError(ValueError):
    """A line the driver refuses; ``reason`` is one of :data:`REJECT_REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


@dataclass(frozen=True, slots=True)
class Frame:
    """One frame whose checksum and syntax are good; meaning not yet checked."""

    hub: str
    seq: int
    kind: str
    fields: dict[str, str]
    crc: int
    """The frame's checksum: with ``seq`` it tells a replay from a new frame."""


def parse_frame(line: bytes) -> Frame:
    """Check one line (without ``\\n``) and split it into a :class:`Frame`.

    Raises:
        FrameError: ``bad_syntax``, ``bad_checksum`` or ``unsupported_version``.
    """
    parts = _checked_body(line).split(",")
    if len(parts) < 5 or parts[0] != "HUB":
        raise FrameError("bad_syntax", "expected $HUB,<version>,<hub>,<seq>,<kind>")
    _, version, hub, seq, kind = parts[:5]
    if version != str(PROTOCOL_VERSION):
        if _SEQ.fullmatch(version):
            raise FrameError(
                "unsupported_version",
                f"protocol version {version}; this gateway speaks {PROTOCOL_VERSION}",
            )
        raise FrameError("bad_syntax", f"version {version!r:.20} is not a number")
    if not _HUB_ID.fullmatch(hub):
        raise FrameError(
            "bad_syntax", f"hub id {hub!r:.24} is not 1-16 of [A-Za-z0-9_-]"
        )
    if not _SEQ.fullmatch(seq) or int(seq) > SEQ_MAX:
        raise FrameError("bad_syntax", f"sequence {seq!r:.12} is not 0..{SEQ_MAX}")
    if not _KIND.fullmatch(kind):
        raise FrameError("bad_syntax", f"kind {kind!r:.12} is not 1-8 capitals")
    crc = int(line[line.rfind(b"*") + 1 :], 16)
    return Frame(hub, int(seq), kind, _key_values(parts[5:]), crc)


def _checked_body(line: bytes) -> str:
    """The text between ``$`` and ``*`` once the checksum over it matches."""
    star = line.rfind(b"*")
    if not line.startswith(b"$") or star < 0:
        raise FrameError("bad_syntax", "a frame is $<body>*<checksum>")
    sent = line[star + 1 :]
    if not _HEX4.fullmatch(sent):
        raise FrameError("bad_syntax", f"checksum {sent!r:.12} is not 4 hex digits")
    # The checksum comes before any parsing, so a corrupted frame is called
    # corrupted rather than blamed on whichever field the noise hit.
    body = line[1:star]
    crc = crc16_ccitt(body)
    if int(sent, 16) != crc:
        raise FrameError(
            "bad_checksum", f"frame says {sent.decode()}, its bytes sum to {crc:04X}"
        )
    try:
        return body.decode("ascii")
    except UnicodeDecodeError:
        raise FrameError("bad_syntax", "the frame holds a non-ASCII byte") from None


def _key_values(tokens: list[str]) -> dict[str, str]:
    fields: dict[str, str] = {}
    for token in tokens:
        key, equals, value = token.partition("=")
        if not equals or not _KEY.fullmatch(key) or not _VALUE.fullmatch(value):
            raise FrameError("bad_syntax", f"field {token!r:.40} is not key=value")
        if key in fields:
            raise FrameError("bad_syntax", f"field {key!r} appears twice")
        fields[key] = value
    return fields


class LineSplitter:
    """Cut a byte stream into candidate frames, resyncing on every ``$``.

    A ``$`` before the line end means bytes were lost mid-frame (a reopened
    port, an overrun UART): the cut-off part is rejected as ``truncated``
    and the new frame is still read. Over-long lines are dropped up to their
    end, so noise without newlines can never grow the buffer.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._skipping = False

    def feed(self, data: bytes) -> list[tuple[bytes, FrameError | None]]:
        """Lines completed by ``data``, each with the error that rejects it."""
        out: list[tuple[bytes, FrameError | None]] = []
        start = 0
        for match in _DELIMITER.finditer(data):
            self._take(data[start : match.start()], out)
            if match.group() == b"\n":
                self._end_line(out)
            else:
                self._cut(out)
                self._buf += b"$"
            start = match.end()
        self._take(data[start:], out)
        return out

    def flush(self) -> list[tuple[bytes, FrameError | None]]:
        """Give up on a partial line, e.g. when the port is lost."""
        out: list[tuple[bytes, FrameError | None]] = []
        self._cut(out)
        return out

    def _take(self, chunk: bytes, out: list[tuple[bytes, FrameError | None]]) -> None:
        if self._skipping or not chunk:
            return
        self._buf += chunk
        if len(self._buf) >= MAX_LINE:
            line = bytes(self._buf)
            out.append((line, FrameError("too_long", f"over {MAX_LINE} bytes")))
            self._buf.clear()
            self._skipping = True

    def _end_line(self, out: list[tuple[bytes, FrameError | None]]) -> None:
        if self._skipping:
            self._skipping = False
            return
        line = bytes(self._buf).removesuffix(b"\r")
        self._buf.clear()
        if not line.strip():
            return  # a blank line is padding, not an error
        if line.startswith(b"$"):
            out.append((line, None))
        else:
            out.append((line, FrameError("noise", "a line that does not start with $")))

    def _cut(self, out: list[tuple[bytes, FrameError | None]]) -> None:
        line = bytes(self._buf)
        self._buf.clear()
        self._skipping = False
        if not line.strip():
            return
        if line.startswith(b"$"):
            out.append((line, FrameError("truncated", "frame cut off before its end")))
        else:
            out.append((line, FrameError("noise", "bytes before a frame start")))


# -- sequence numbers --------------------------------------------------------------

IN_ORDER = "in_order"
REPEAT = "repeat"
RESTART = "restart"
GAP = "gap"
BACKWARDS = "backwards"


class HubSequence:
    """One hub's sequence numbers: replays, restarts and lost frames."""

    def __init__(self) -> None:
        self.last: int | None = None
        self._recent: OrderedDict[tuple[int, int], None] = OrderedDict()

    def check(self, seq: int, crc: int) -> tuple[str, int]:
        """Classify the next frame; returns a verdict and the frames missed."""
        key = (seq, crc)
        if key in self._recent:
            return REPEAT, 0
        if seq == 0:
            # A new boot: frames of the old one must not shadow the new ones.
            self._recent.clear()
        self._recent[key] = None
        if len(self._recent) > REPEAT_WINDOW:
            self._recent.popitem(last=False)
        last, self.last = self.last, seq
        if seq == 0:
            return RESTART, 0
        if last is None:
            return IN_ORDER, 0
        expected = 1 if last == SEQ_MAX else last + 1
        ahead = (seq - expected) % SEQ_MAX
        if ahead == 0:
            return IN_ORDER, 0
        # Half the ring ahead is a plausible loss; beyond, the hub went back
        # (rebooted without its boot frame reaching us), so nothing is known.
        if ahead < SEQ_MAX // 2:
            return GAP, ahead
        return BACKWARDS, 0


# -- what frames mean --------------------------------------------------------------

Planned = tuple[str, str, dict[str, Any]]
"""An event to emit: device id, event type, fields."""


def frame_events(frame: Frame, hub: HubSettings) -> list[Planned]:
    """The events one frame stands for; all checked before any is emitted.

    Raises:
        FrameError: unknown kind or channel, missing, non-numeric or bad values.
    """
    interpret = _KINDS.get(frame.kind)
    if interpret is None:
        raise FrameError(
            "unknown_kind", f"kind {frame.kind!r}; known: {', '.join(_KINDS)}"
        )
    return interpret(frame, hub)


def _visits(frame: Frame, hub: HubSettings) -> list[Planned]:
    device, origin = _channel(frame, hub)
    n = _number(frame, "n", default=1)
    if isinstance(n, float) or not 1 <= n <= MAX_VISITS:
        raise FrameError("bad_value", f"n={n}: expected 1..{MAX_VISITS} visits")
    return [(device, "visit", origin) for _ in range(n)]


def _readings(frame: Frame, hub: HubSettings) -> list[Planned]:
    device, origin = _channel(frame, hub)
    names = [key for key in frame.fields if key != "ch"]
    if not names:
        raise FrameError("missing_field", f"{frame.kind} frame carries no reading")
    return [
        (device, "reading", {**origin, "reading": name, "value": _number(frame, name)})
        for name in names
    ]


def _switch(event_type: str, key: str) -> Callable[[Frame, HubSettings], list[Planned]]:
    def interpret(frame: Frame, hub: HubSettings) -> list[Planned]:
        device, origin = _channel(frame, hub)
        value = _number(frame, key)
        if value not in (0, 1) or isinstance(value, float):
            raise FrameError("bad_value", f"{key}={value}: expected 0 or 1")
        return [(device, event_type, {**origin, key: value == 1})]

    return interpret


def _heartbeat(frame: Frame, hub: HubSettings) -> list[Planned]:
    if "ch" in frame.fields:
        device, origin = _channel(frame, hub)
    elif hub.device is None:
        return []  # nobody supervises the hub itself; the frame still counts
    else:
        device, origin = hub.device, {"hub": frame.hub, "seq": frame.seq}
    if "up" in frame.fields:
        origin = {**origin, "uptime": _number(frame, "up")}
    return [(device, "heartbeat", origin)]


_KINDS: dict[str, Callable[[Frame, HubSettings], list[Planned]]] = {
    "CNT": _visits,
    "LVL": _readings,
    "AIR": _readings,
    "OCC": _switch("occupancy", "occupied"),
    "DOOR": _switch("door", "open"),
    "HB": _heartbeat,
}


def _channel(frame: Frame, hub: HubSettings) -> tuple[str, dict[str, Any]]:
    channel = frame.fields.get("ch")
    if channel is None:
        raise FrameError("missing_field", f"{frame.kind} frame needs ch=<channel>")
    device = hub.channels.get(channel)
    if device is None:
        mapped = ", ".join(hub.channels) or "none"
        raise FrameError(
            "unknown_channel",
            f"hub {frame.hub!r} channel {channel!r} is not mapped; mapped: {mapped}",
        )
    return device, {"hub": frame.hub, "channel": channel, "seq": frame.seq}


def _number(frame: Frame, key: str, default: int | None = None) -> int | float:
    text = frame.fields.get(key)
    if text is None:
        if default is None:
            raise FrameError("missing_field", f"{frame.kind} frame needs {key}=")
        return default
    if not _NUMBER.fullmatch(text):
        raise FrameError("non_numeric", f"{key}={text!r}: expected a number like 21.5")
    return float(text) if "." in text else int(text)


# -- settings ----------------------------------------------------------------------

_DEVICE_ID = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
"""The site file's device id pattern (``rules.site``), so typos fail early."""

_URL_SCHEMES = ("socket", "loop", "rfc2217", "spy")
"""pyserial URL handlers that make sense here; anything else is a typo."""

Token = Annotated[str, Field(pattern=f"^{_NAME}$")]
DeviceId = Annotated[str, Field(pattern=_DEVICE_ID)]


class HubSettings(StrictModel):
    """One hub on the line: which site device each of its channels is."""

    device: DeviceId | None = None
    """The hub's own device id: heartbeats without ``ch`` are its own."""

    channels: dict[Token, DeviceId] = Field(default_factory=dict)
    """Channel -> device id, e.g. ``{1: wc2-door-counter, 2: wc2-soap}``."""

    @field_validator("channels", mode="before")
    @classmethod
    def _channel_names(cls, value: Any) -> Any:
        # YAML reads `1: wc2-counter` with an integer key; channels are names.
        if isinstance(value, Mapping):
            return {str(key): device for key, device in value.items()}
        return value


class SerialHubSettings(StrictModel):
    """One serial port and the hubs that talk on it.

    ``port`` is a path (best a stable ``/dev/serial/by-id/...`` link, which
    survives replugging into another USB socket) or a pyserial URL:
    ``socket://host:port`` for a serial server, ``loop://`` for tests.
    """

    port: str = Field(min_length=1)
    baudrate: int = Field(115200, gt=0)
    hubs: dict[Token, HubSettings] = Field(min_length=1)
    """Hub id -> its channels; frames from other hubs are rejected."""

    reopen_min: Duration = 0.5
    """First wait before reopening a lost port; doubles on every failure."""

    reopen_max: Duration = 30.0
    """Longest wait between attempts: how late a replugged hub may be noticed."""

    @field_validator("port")
    @classmethod
    def _known_scheme(cls, port: str) -> str:
        scheme, separator, _ = port.partition("://")
        if separator and scheme not in _URL_SCHEMES:
            raise ValueError(
                f"unknown port URL scheme {scheme!r} in {port!r}; use a path "
                f"or one of {', '.join(s + '://' for s in _URL_SCHEMES)}"
            )
        return port

    @model_validator(mode="after")
    def _backoff_order(self) -> SerialHubSettings:
        if self.reopen_min <= 0:
            raise ValueError("'reopen_min' must be longer than 0s")
        if self.reopen_max < self.reopen_min:
            raise ValueError(
                f"'reopen_max' ({self.reopen_max}s) must be at least "
                f"'reopen_min' ({self.reopen_min}s)"
            )
        return self

    def device_ids(self) -> set[str]:
        """Every device id the hubs on this port speak for."""
        ids = {hub.device for hub in self.hubs.values() if hub.device}
        ids.update(d for hub in self.hubs.values() for d in hub.channels.values())
        return ids


# -- the driver --------------------------------------------------------------------


class Backoff:
    """Capped exponential waits with jitter: ~low, 2*low, 4*low ... high.

    Each wait is drawn between half and all of its step, so ports (or
    gateways on one serial server) lost together do not retry in lockstep.
    """

    def __init__(
        self, low: float, high: float, rng: Callable[[], float] = random.random
    ) -> None:
        self._low = low
        self._high = high
        self._rng = rng
        self._failures = 0

    def next(self) -> float:
        step = min(self._high, self._low * 2 ** min(self._failures, 32))
        self._failures += 1
        return step * (0.5 + self._rng() / 2)

    def reset(self) -> None:
        self._failures = 0


class BurstLog:
    """Say the first of a burst of alike problems; count the rest quietly."""

    def __init__(
        self, quiet: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._quiet = quiet
        self._clock = clock
        self._last: dict[str, float] = {}
        self._hidden: Counter[str] = Counter()

    def due(self, key: str) -> int | None:
        """None to stay quiet; else how many went unlogged since the last one."""
        now = self._clock()
        last = self._last.get(key)
        self._last[key] = now
        if last is not None and now - last < self._quiet:
            self._hidden[key] += 1
            return None
        return self._hidden.pop(key, 0)


@dataclass
class PortHealth:
    """What /healthz shows for one port; changed only under the driver's lock."""

    connected: bool = False
    last_frame_at: float | None = None
    last_error: str | None = None
    counts: Counter[str] = field(default_factory=Counter)
    rejects: Counter[str] = field(
        default_factory=lambda: Counter(dict.fromkeys(REJECT_REASONS, 0))
    )
    hubs: dict[str, dict[str, Any]] = field(default_factory=dict)


class SerialHubDriver:
    """Read sensor hubs on one serial port, reopening it whenever it is lost.

    One thread per port opens, reads with a timeout (never spinning) and
    reopens. pyserial's ReaderThread was not used: it ends on the first
    error, so reopening would need a second, supervising thread anyway.
    """

    def __init__(
        self,
        settings: SerialHubSettings,
        *,
        clock: Callable[[], float] = time.time,
        open_port: Callable[..., serial.SerialBase] = serial.serial_for_url,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.settings = settings
        self.name = f"serial:{settings.port}"
        self._clock = clock
        self._open_port = open_port
        self._backoff = Backoff(settings.reopen_min, settings.reopen_max, rng)
        self._burst = BurstLog(LOG_QUIET)
        self._splitter = LineSplitter()
        self._sequences = {hub: HubSequence() for hub in settings.hubs}
        self._health = PortHealth()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._port: serial.SerialBase | None = None
        self._emit: Emit = _discard
        self._down_since: float | None = None

    # -- Driver interface ----------------------------------------------------------

    def start(self, emit: Emit) -> None:
        """Start the reader thread; the port is opened there, not here."""
        if self._thread is not None:
            raise RuntimeError(f"{self.name} is already started")
        self._emit = emit
        self._stopping.clear()
        self._thread = threading.Thread(
            target=self._run, name=f"serial-hub {self.settings.port}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop reading, close the port and join the thread; safe to repeat."""
        self._stopping.set()
        with self._lock:
            # Under the lock: the reader cannot close the port meanwhile, so
            # the cancel never reaches a file descriptor reused by another.
            if self._port is not None and hasattr(self._port, "cancel_read"):
                self._port.cancel_read()
        thread, self._thread = self._thread, None
        if thread is None:
            return
        thread.join(STOP_TIMEOUT)
        if thread.is_alive():
            log.error("Serial hub port %s: reader did not stop", self.settings.port)

    def device_ids(self) -> set[str]:
        """Every device the hubs on this port speak for."""
        return self.settings.device_ids()

    def health(self) -> dict[str, Any]:
        """Connection state and counters of this port, for /healthz."""
        with self._lock:
            h = self._health
            return {
                "port": self.settings.port,
                "connected": h.connected,
                "last_frame_at": h.last_frame_at,
                "last_error": h.last_error,
                **{key: h.counts[key] for key in _COUNTS},
                "rejects": dict(h.rejects),
                "hubs": {hub: dict(seen) for hub, seen in h.hubs.items()},
            }

    # -- reader thread: the port ---------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            port = self._open()
            if port is not None:
                self._read(port)
            self._stopping.wait(self._backoff.next())

    def _open(self) -> serial.SerialBase | None:
        s = self.settings
        try:
            # exclusive: a second reader on the port would steal half the bytes.
            port = self._open_port(
                s.port, baudrate=s.baudrate, timeout=READ_TIMEOUT, exclusive=True
            )
        except (OSError, ValueError) as exc:  # SerialException is an OSError
            self._offline(f"cannot be opened: {exc}", opening=True)
            return None
        self._online()
        return port

    def _read(self, port: serial.SerialBase) -> None:
        with self._lock:
            self._port = port
        try:
            while not self._stopping.is_set():
                # One byte blocks up to the timeout; whatever else is already
                # there comes in the same call.
                self._feed(port.read(port.in_waiting or 1))
        except OSError as exc:
            self._offline(f"lost: {exc}", opening=False)
        finally:
            with self._lock:
                self._port = None
                self._health.connected = False
            with contextlib.suppress(OSError):
                port.close()
            self._feed_lines(self._splitter.flush())

    def _online(self) -> None:
        down, self._down_since = self._down_since, None
        with self._lock:
            self._health.connected = True
            if down is not None:
                self._health.counts["reopens"] += 1
        port = self.settings.port
        if down is None:
            log.info("Serial hub port %s open at %d baud", port, self.settings.baudrate)
        else:
            log.info(
                "Serial hub port %s is back after %.1f s offline",
                port,
                time.monotonic() - down,
            )

    def _offline(self, error: str, opening: bool) -> None:
        with self._lock:
            self._health.connected = False
            self._health.last_error = error
            if opening:
                self._health.counts["failed_opens"] += 1
        if self._down_since is not None:
            log.debug("Serial hub port %s still %s", self.settings.port, error)
            return
        self._down_since = time.monotonic()
        log.warning(
            "Serial hub port %s %s; retrying with backoff up to %g s",
            self.settings.port,
            error,
            self.settings.reopen_max,
        )
        # Its devices cannot be heard now: say so, so supervision raises
        # trouble at once instead of when their heartbeat runs out. Their
        # next frame after the reopen clears it.
        for device in sorted(self.settings.device_ids()):
            self._emit(make_event(device, "offline", clock=self._clock, reason=error))

    # -- reader thread: frames -----------------------------------------------------

    def _feed(self, data: bytes) -> None:
        if data:
            self._feed_lines(self._splitter.feed(data))

    def _feed_lines(self, lines: list[tuple[bytes, FrameError | None]]) -> None:
        for line, error in lines:
            if error is not None:
                self._reject(error, line)
                continue
            try:
                self._handle(line)
            except Exception:
                # A bug here must cost one frame, never the reader thread.
                log.exception("Serial hub port %s: failed on %s", *self._where(line))
                self._count_reject("internal_error")

    def _handle(self, line: bytes) -> None:
        try:
            frame = parse_frame(line)
            hub = self.settings.hubs.get(frame.hub)
            if hub is None:
                known = ", ".join(self.settings.hubs)
                raise FrameError(
                    "unknown_hub", f"hub {frame.hub!r} is not configured: {known}"
                )
            if not self._in_sequence(frame):
                return
            planned = frame_events(frame, hub)
        except FrameError as error:
            self._reject(error, line)
            return
        for device, event_type, fields in planned:
            self._emit(make_event(device, event_type, clock=self._clock, **fields))
        self._accepted(frame, len(planned))

    def _accepted(self, frame: Frame, events: int) -> None:
        now = self._clock()
        with self._lock:
            h = self._health
            h.counts["frames_ok"] += 1
            h.counts["events"] += events
            h.last_frame_at = now
            h.hubs[frame.hub] = {"last_seq": frame.seq, "last_frame_at": now}
        # Frames flow again, so the next loss starts from the shortest wait.
        self._backoff.reset()

    def _in_sequence(self, frame: Frame) -> bool:
        sequence = self._sequences[frame.hub]
        last = sequence.last
        verdict, missed = sequence.check(frame.seq, frame.crc)
        with self._lock:
            counts = self._health.counts
            counts["repeats"] += verdict == REPEAT
            counts["hub_restarts"] += verdict == RESTART
            counts["seq_gaps"] += verdict in (GAP, BACKWARDS)
            counts["frames_missed"] += missed
        if verdict == REPEAT:
            log.debug("Serial hub %s: repeat of frame %d dropped", frame.hub, frame.seq)
            return False
        self._log_sequence(frame, verdict, last, missed)
        return True

    def _log_sequence(
        self, frame: Frame, verdict: str, last: int | None, missed: int
    ) -> None:
        if verdict == RESTART and self._burst.due(f"restart {frame.hub}") is not None:
            log.info("Serial hub %s restarted (sequence 0)", frame.hub)
        if (
            verdict not in (GAP, BACKWARDS)
            or self._burst.due(f"gap {frame.hub}") is None
        ):
            return
        if verdict == GAP:
            log.warning(
                "Serial hub %s: sequence jumped from %s to %d, %d frames lost; "
                "further jumps are only counted",
                frame.hub,
                last,
                frame.seq,
                missed,
            )
        else:
            log.warning(
                "Serial hub %s: sequence went back from %s to %d (a restart "
                "whose boot frame was lost?); further jumps are only counted",
                frame.hub,
                last,
                frame.seq,
            )

    def _reject(self, error: FrameError, line: bytes) -> None:
        self._count_reject(error.reason)
        hidden = self._burst.due(error.reason)
        if hidden is None:
            return
        port, frame = self._where(line)
        earlier = f"; {hidden} more since the last report" if hidden else ""
        log.warning(
            "Serial hub port %s rejected frame %s (%s: %s); further %s rejects "
            "are only counted until %.0f s pass without one%s",
            port,
            frame,
            error.reason,
            error.detail,
            error.reason,
            LOG_QUIET,
            earlier,
        )

    def _count_reject(self, reason: str) -> None:
        with self._lock:
            self._health.rejects[reason] += 1

    def _where(self, line: bytes) -> tuple[str, str]:
        return self.settings.port, _clip(line)


_COUNTS = (
    "frames_ok",
    "events",
    "repeats",
    "seq_gaps",
    "frames_missed",
    "hub_restarts",
    "reopens",
    "failed_opens",
)
"""Counters health always shows, zeros included, so a dashboard can graph them."""


def _discard(event: object) -> None:
    """Emit before start(): nothing can be read yet, so nothing arrives here."""
