"""The gateway's own BLE adapter: beacon frames in, badge sightings out.

:class:`BLEScanner` runs bleak's :class:`~bleak.BleakScanner` on a thread of
its own, reads iBeacon and Eddystone frames from every advertisement, and
hands each badge it hears to a sink (the presence tracker's ``feed``) as a
:class:`~drivers.presence.Sighting`. It emits no events itself: where a badge
is, is for :mod:`drivers.presence` to decide, together with the ESP32
receivers. Badge ids are described there.

Frames, as bleak hands them over (``manufacturer_data`` is keyed by the
company id, which the bytes no longer contain; field sizes in bytes, numbers
big-endian)::

    iBeacon, manufacturer_data[0x004C] (Apple):
      02 15 | uuid 16 | major 2 | minor 2 | power at 1 m 1 (signed)
    Eddystone UID, service_data["0000feaa-..."]:
      00 | power at 0 m 1 (signed) | namespace 10 | instance 6 [| reserved 2]
    Eddystone TLM, same key:
      20 00 | battery mV 2 | temperature 2 (signed 8.8 °C) | adverts 4 | 0.1 s 4

A TLM frame carries no id: it is paired with the UID frame last heard from
the same address, which an Eddystone beacon keeps while it interleaves them.

The scanner keeps itself alive, because a BlueZ scanner can die without a
word (``org.bluez.Error.InProgress``, or zero adverts after ``bluetoothd``
restarts, hbldh/bleak#178, #832)::

    stopped ─start()─► scanning ──no advert for silence_timeout──► silent
                          ▲  ▲                                        │
                          │  └──────── first advert ◄── rebuilt ◄─────┘
                          │
                   start succeeds
                          │
                     unavailable ◄── start fails (no D-Bus, no adapter),
                                     retried after 2 s, 4 s, ... retry_max

Each transition into ``silent`` and ``unavailable`` is logged once, and once
more when it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import threading
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from bleak import BleakScanner
from bleak.args.bluez import BlueZScannerArgs, OrPattern
from bleak.assigned_numbers import AdvertisementDataType
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData
from bleak.exc import BleakBluetoothNotAvailableError, BleakDBusError, BleakError
from pydantic import model_validator

from drivers.base import Emit, make_event
from drivers.presence import Sighting, eddystone_id, ibeacon_id
from rules.schema import Duration, StrictModel

try:
    from dbus_fast.errors import DBusFastError
except ImportError:  # bleak needs dbus-fast on Linux only
    DBusFastError = BleakError

log = logging.getLogger(__name__)

APPLE = 0x004C
"""Bluetooth SIG company id of Apple; iBeacon frames are valid only under it."""

IBEACON_TYPE = b"\x02\x15"
"""Apple's type 0x02 (iBeacon) and its length, 0x15 = 21 bytes."""

IBEACON_LENGTH = 23
"""Type and length, 16-byte UUID, major, minor, measured power."""

EDDYSTONE = "0000feaa-0000-1000-8000-00805f9b34fb"
"""Eddystone's 16-bit service UUID 0xFEAA, in the 128-bit form bleak keys by."""

UID_FRAME, URL_FRAME, TLM_FRAME, EID_FRAME = 0x00, 0x10, 0x20, 0x30
"""Eddystone frame types, the first byte of its service data."""

UID_LENGTH = 18
"""Type, power, 10-byte namespace, 6-byte instance; many beacons leave out
the two reserved bytes the specification puts after them."""

TLM_LENGTH = 14
"""Type, version, battery, temperature, advert count, uptime."""

NO_BATTERY = 0
"""TLM battery field of a beacon that cannot measure its voltage."""

NO_TEMPERATURE = -0x8000
"""TLM temperature field (0x8000, signed) of a beacon without a sensor."""

LOW_BATTERY_MV = 2500
"""A CR2032 coin cell under this many mV has days left, not months."""

MAX_PAIRED = 512
"""Addresses remembered for pairing TLM frames; a ward has tens of badges."""

OR_PATTERNS = (
    OrPattern(0, AdvertisementDataType.MANUFACTURER_SPECIFIC_DATA, b"\x4c\x00\x02\x15"),
    OrPattern(0, AdvertisementDataType.SERVICE_DATA_UUID16, b"\xaa\xfe"),
)
"""What a passive scan asks BlueZ for: iBeacon under Apple's id, and any
Eddystone frame (AD data starts with the little-endian company id or UUID)."""

SILENCE_TIMEOUT = 60.0
"""Seconds without any advert before the scanner is rebuilt; badges advertise
every second, and reliability.md asks for a rebuild within 120 s."""

RETRY_INITIAL = 2.0
"""Seconds before the first retry when BlueZ cannot start a scan."""

RETRY_MAX = 60.0
"""Longest wait between retries: an adapter plugged back in is used within it."""

HEARTBEAT_EVERY = 30.0
"""Seconds between the ``heartbeat`` events the scanner sends for its receiver
while it hears advertisements, so a supervision rule on the receiver sees it
alive; a silent or unavailable scanner sends ``offline`` at once instead."""

WATCHDOG_POLL = 1.0
"""Seconds between watchdog checks; cheap, and bounds how late a rebuild is."""

START_TIMEOUT = 15.0
"""Seconds for BlueZ to start or stop a scan; a hung D-Bus call counts as failed."""

STOP_TIMEOUT = 20.0
"""Seconds :meth:`BLEScanner.stop` waits for the scanner thread."""

_NOT_ABOUT_PASSIVE = (BleakDBusError, BleakBluetoothNotAvailableError)
"""Failures that active scanning would meet too; any other BleakError from a
passive start (bleak raises a plain one when BlueZ lacks --experimental or the
kernel is older than 5.10) is worth one try in active mode."""

_BLUEZ_DOWN = (BleakError, OSError, DBusFastError)
"""What a start or stop raises when BlueZ or D-Bus is missing or broken: no
bus socket is an OSError, a hung call a TimeoutError (also an OSError)."""


# -- frames ---------------------------------------------------------------------


class NotABadge(ValueError):
    """Beacon-looking data that names no badge; ``reason`` is a counter key."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        super().__init__(f"{reason}: {detail}")


@dataclass(frozen=True, slots=True)
class IBeacon:
    uuid: uuid.UUID
    major: int
    minor: int
    power: int
    """Measured power: dBm a receiver hears at 1 m."""

    @property
    def badge(self) -> str:
        return ibeacon_id(self.uuid, self.major, self.minor)


@dataclass(frozen=True, slots=True)
class EddystoneUID:
    namespace: bytes
    instance: bytes
    power: int
    """Ranging data: transmit power in dBm as heard at 0 m."""

    @property
    def badge(self) -> str:
        return eddystone_id(self.namespace, self.instance)


@dataclass(frozen=True, slots=True)
class EddystoneTLM:
    battery_mv: int | None
    temperature: float | None
    """Degrees Celsius, or None without a sensor."""

    adverts: int
    """Frames sent since power-up or reboot."""

    uptime: float
    """Seconds since power-up or reboot."""


Frame = IBeacon | EddystoneUID | EddystoneTLM


def parse_ibeacon(company: int, data: bytes) -> IBeacon | None:
    """One manufacturer-data entry as an iBeacon; None if it is something else.

    Raises:
        NotABadge: iBeacon-shaped but malformed, or under another company id.
    """
    if company != APPLE:
        if data[:2] == IBEACON_TYPE and len(data) >= IBEACON_LENGTH:
            raise NotABadge(
                "not_apple", f"iBeacon layout under company 0x{company:04x}"
            )
        return None
    if data[:1] != IBEACON_TYPE[:1]:
        return None  # Apple's other types: phones, watches, AirTags
    if data[1:2] != IBEACON_TYPE[1:]:
        raise NotABadge(
            "bad_ibeacon", f"iBeacon length byte is {data[1:2].hex() or 'missing'}"
        )
    if len(data) < IBEACON_LENGTH:
        raise NotABadge("truncated_ibeacon", f"{len(data)} bytes, an iBeacon has 23")
    # Bytes after the 23rd are further Apple type-length entries, not ours.
    major, minor, power = struct.unpack_from(">HHb", data, 18)
    return IBeacon(uuid.UUID(bytes=data[2:18]), major, minor, power)


def parse_eddystone(data: bytes) -> EddystoneUID | EddystoneTLM:
    """Eddystone service data as a UID or TLM frame.

    Raises:
        NotABadge: a short frame, an encrypted TLM, or a URL or EID frame.
    """
    if not data:
        raise NotABadge("truncated_eddystone", "empty service data")
    if data[0] == UID_FRAME:
        return _uid(data)
    if data[0] == TLM_FRAME:
        return _tlm(data)
    reason = {URL_FRAME: "eddystone_url", EID_FRAME: "eddystone_eid"}
    raise NotABadge(reason.get(data[0], "eddystone_unknown"), f"frame 0x{data[0]:02x}")


def _uid(data: bytes) -> EddystoneUID:
    if len(data) < UID_LENGTH:
        raise NotABadge("truncated_eddystone", f"UID frame of {len(data)} bytes")
    power = struct.unpack_from(">b", data, 1)[0]
    return EddystoneUID(bytes(data[2:12]), bytes(data[12:18]), power)


def _tlm(data: bytes) -> EddystoneTLM:
    if data[1:2] != b"\x00":
        # Version 1 (eTLM) is encrypted with the beacon's EID key.
        raise NotABadge("encrypted_tlm", f"TLM version {data[1:2].hex() or 'missing'}")
    if len(data) < TLM_LENGTH:
        raise NotABadge("truncated_eddystone", f"TLM frame of {len(data)} bytes")
    battery, temperature, adverts, tenths = struct.unpack_from(">HhII", data, 2)
    return EddystoneTLM(
        None if battery == NO_BATTERY else battery,
        None if temperature == NO_TEMPERATURE else temperature / 256,
        adverts,
        tenths / 10,
    )


def read_beacons(adv: AdvertisementData) -> tuple[list[Frame], list[str]]:
    """Every beacon frame in one advertisement, and why anything else was ignored.

    BlueZ merges what a device advertised into one set of properties, so one
    advertisement can carry an iBeacon and an Eddystone frame of one badge.
    """
    frames: list[Frame] = []
    ignored: list[str] = []
    for company, data in adv.manufacturer_data.items():
        try:
            frame = parse_ibeacon(company, data)
        except NotABadge as exc:
            ignored.append(exc.reason)
            continue
        if frame is not None:
            frames.append(frame)
    data = adv.service_data.get(EDDYSTONE)
    if data is not None:
        try:
            frames.append(parse_eddystone(data))
        except NotABadge as exc:
            ignored.append(exc.reason)
    return frames, ignored


# -- settings and the bleak seam ---------------------------------------------------


class BLESettings(StrictModel):
    """The gateway's own adapter as a badge receiver."""

    receiver: str
    """Its device id in the site file; the presence settings place it."""

    adapter: str = "hci0"
    passive: bool = True
    """Listen without scan requests (saves badge batteries); needs BlueZ >= 5.56
    with ``--experimental`` and kernel >= 5.10, else it falls back to active."""

    silence_timeout: Duration = SILENCE_TIMEOUT
    retry_initial: Duration = RETRY_INITIAL
    retry_max: Duration = RETRY_MAX

    @model_validator(mode="after")
    def _positive(self) -> BLESettings:
        for name in ("silence_timeout", "retry_initial"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name!r} must be longer than 0s")
        if self.retry_max < self.retry_initial:
            raise ValueError("'retry_max' must not be shorter than 'retry_initial'")
        return self


ScanMode = Literal["active", "passive"]
DetectionCallback = Callable[[BLEDevice, AdvertisementData], None]


class Scanner(Protocol):
    """What the watchdog needs of a scanner: bleak's two coroutines."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


ScannerFactory = Callable[[DetectionCallback, ScanMode, str], Scanner]
"""Builds a scanner for (detection callback, mode, adapter)."""


def bleak_scanner(callback: DetectionCallback, mode: ScanMode, adapter: str) -> Scanner:
    """bleak's scanner; passive mode must tell BlueZ which adverts to pass on."""
    if mode == "passive":
        bluez = BlueZScannerArgs(adapter=adapter, or_patterns=list(OR_PATTERNS))
    else:
        bluez = BlueZScannerArgs(adapter=adapter)
    return BleakScanner(callback, scanning_mode=mode, bluez=bluez)


def _always() -> bool:
    return True


def _explain(exc: BaseException) -> str:
    """A start failure in words; a missing bus socket says nothing by itself."""
    if isinstance(exc, FileNotFoundError | ConnectionRefusedError):
        return f"no D-Bus system bus to reach BlueZ: {exc}"
    return f"{type(exc).__name__}: {exc}"


# -- the scanner ------------------------------------------------------------------


class BLEScanner:
    """Scans one adapter for badges and keeps the scan alive.

    Args:
        settings: adapter, mode and watchdog timings.
        sink: takes each :class:`Sighting`; called on the scanner's thread.
        clock: wall time for sightings.
        monotonic: time for the watchdog, immune to the clock being set.
        scanner_factory: builds the scanner; tests inject a stand-in, since
            a real one cannot start without BlueZ.
        expecting: whether adverts are expected now; a silence while it
            says False (say, a site that is empty at night) is not a fault.
    """

    def __init__(
        self,
        settings: BLESettings,
        sink: Callable[[Sighting], None],
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        scanner_factory: ScannerFactory = bleak_scanner,
        expecting: Callable[[], bool] = _always,
    ) -> None:
        self.settings = settings
        self.name = f"ble:{settings.adapter}"
        self._sink = sink
        self._clock = clock
        self._monotonic = monotonic
        self._factory = scanner_factory
        self._expecting = expecting
        self._mode: ScanMode = "passive" if settings.passive else "active"

        # Watchdog state, touched only on the scanner's event loop.
        self._scanner: Scanner | None = None
        self._state = "stopped"
        self._silent = False
        self._failures = 0
        self._retry_at = 0.0
        self._started_at = 0.0
        self._heard_at: float | None = None
        self._emit: Emit | None = None
        self._offline = False
        self._beat_at: float | None = None

        # Counters and telemetry, read by health() from other threads.
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._ignored: Counter[str] = Counter()
        self._last_advert: float | None = None
        self._last_error: str | None = None
        self._paired: OrderedDict[str, str] = OrderedDict()
        self._telemetry: dict[str, tuple[EddystoneTLM, float]] = {}

        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._halt = asyncio.Event()

    # -- driver interface ------------------------------------------------------

    def start(self, emit: Emit) -> None:
        """Scan on a thread of its own.

        Sightings go to the sink, and the presence tracker emits their
        events; ``emit`` carries only the receiver's own health: a heartbeat
        every 30 s while adverts are heard, ``offline`` when they stop.
        """
        if self._thread is not None:
            return
        self.report_to(emit)
        loop = asyncio.new_event_loop()
        self._loop, self._halt = loop, asyncio.Event()
        self._thread = threading.Thread(
            target=self._run,
            args=(loop,),
            name=f"ble-{self.settings.adapter}",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop scanning and wait for the thread; safe to call twice."""
        thread, loop = self._thread, self._loop
        self._thread = None
        if thread is None or loop is None:
            return
        # The loop is closed already if the thread died of an unexpected error.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._halt.set)
        thread.join(STOP_TIMEOUT)
        if thread.is_alive():
            log.error(
                "BLE scanner thread on %s did not stop in %.0f s",
                self.settings.adapter,
                STOP_TIMEOUT,
            )

    def device_ids(self) -> set[str]:
        """The receiver this adapter is, in the site file."""
        return {self.settings.receiver}

    def health(self) -> Mapping[str, Any]:
        with self._lock:
            low = sum(
                1
                for frame, _ in self._telemetry.values()
                if frame.battery_mv is not None and frame.battery_mv < LOW_BATTERY_MV
            )
            return {
                "state": self._state,
                "adapter": self.settings.adapter,
                "mode": self._mode,
                "adverts": self._counts["adverts"],
                "beacons": self._counts["beacons"],
                "last_advert": self._last_advert,
                "restarts": self._counts["restarts"],
                "start_failures": self._counts["start_failures"],
                "last_error": self._last_error,
                "ignored": dict(self._ignored),
                "badges_low_battery": low,
            }

    def telemetry(self) -> dict[str, tuple[EddystoneTLM, float]]:
        """Badge -> its last TLM frame and when it was heard."""
        with self._lock:
            return dict(self._telemetry)

    # -- adverts ----------------------------------------------------------------

    def on_advertisement(self, device: BLEDevice, adv: AdvertisementData) -> None:
        """bleak's detection callback: every advertisement BlueZ passes on."""
        self._heard()
        now = self._clock()
        frames, ignored = read_beacons(adv)
        sightings = []
        with self._lock:
            self._last_advert = now
            self._counts["adverts"] += 1
            self._ignored.update(ignored)
            if not frames and not ignored:
                self._ignored["not_a_beacon"] += 1
            for frame in frames:
                badge = self._badge_of(frame, device.address, now)
                if badge is not None:
                    sightings.append(
                        Sighting(badge, self.settings.receiver, adv.rssi, now)
                    )
        for sighting in sightings:
            self._sink(sighting)

    def _badge_of(self, frame: Frame, address: str, now: float) -> str | None:
        if isinstance(frame, EddystoneTLM):
            badge = self._paired.get(address)
            if badge is None:
                self._ignored["unpaired_tlm"] += 1
                return None
            self._telemetry[badge] = (frame, now)
            self._counts["beacons"] += 1
            return badge
        if isinstance(frame, EddystoneUID):
            self._paired[address] = frame.badge
            self._paired.move_to_end(address)
            if len(self._paired) > MAX_PAIRED:
                self._paired.popitem(last=False)
        self._counts["beacons"] += 1
        return frame.badge

    def _heard(self) -> None:
        self._heard_at = self._monotonic()
        if self._offline:
            self._offline = False
            self._beat_at = self._heard_at
            self._report("heartbeat")
        if self._silent:
            self._silent = False
            self._state = "scanning"
            log.info(
                "BLE advertisements on %s again, after %d rebuild(s) in all",
                self.settings.adapter,
                self._counts["restarts"],
            )

    # -- watchdog ----------------------------------------------------------------

    async def watch(self) -> None:
        """Keep a scanner running until :meth:`stop`: start, check, rebuild."""
        try:
            while not self._halt.is_set():
                await self.check()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._halt.wait(), WATCHDOG_POLL)
        finally:
            await self._close()
            self._state = "stopped"

    async def check(self) -> None:
        """One watchdog step: start a scanner when one is due, rebuild a silent one."""
        now = self._monotonic()
        if self._scanner is None:
            if now >= self._retry_at:
                await self._open(now)
        elif self._is_silent(now):
            await self._rebuild(now)
        elif not self._silent and self._heard_at is not None:
            self._beat(now)

    def report_to(self, emit: Emit) -> None:
        """Send the receiver's heartbeats and offline reports to ``emit``."""
        self._emit = emit

    def _beat(self, now: float) -> None:
        if self._beat_at is None or now - self._beat_at >= HEARTBEAT_EVERY:
            self._beat_at = now
            self._report("heartbeat")

    def _went_offline(self, reason: str) -> None:
        """Tell supervision at once that this receiver hears no badges."""
        if not self._offline:
            self._offline = True
            self._report("offline", reason=reason)

    def _report(self, kind: str, **fields: Any) -> None:
        emit = self._emit
        if emit is None:
            return
        try:
            emit(make_event(self.settings.receiver, kind, clock=self._clock, **fields))
        except Exception:  # noqa: BLE001 - the scanner outlives a closed queue
            log.exception("BLE scanner on %s could not report %s", self.name, kind)

    def _is_silent(self, now: float) -> bool:
        heard = self._started_at if self._heard_at is None else self._heard_at
        last = max(self._started_at, heard)
        return now - last >= self.settings.silence_timeout and self._expecting()

    async def _rebuild(self, now: float) -> None:
        if not self._silent:
            self._silent = True
            log.warning(
                "No BLE advertisements on %s for %.0f s; rebuilding the scanner",
                self.settings.adapter,
                self.settings.silence_timeout,
            )
            self._went_offline(
                f"no BLE advertisements for {self.settings.silence_timeout:.0f} s"
            )
        self._state = "silent"
        with self._lock:
            self._counts["restarts"] += 1
        await self._close()
        await self._open(now)

    async def _open(self, now: float) -> None:
        try:
            self._scanner = await self._start_scanner()
        except _BLUEZ_DOWN as exc:
            self._unavailable(exc, now)
            return
        if self._failures:
            log.info(
                "BLE scanner on %s started (%s) after %d failed attempt(s)",
                self.settings.adapter,
                self._mode,
                self._failures,
            )
        elif self._state == "stopped":
            log.info(
                "BLE scanner on %s started (%s)", self.settings.adapter, self._mode
            )
        self._failures = 0
        self._started_at = now
        self._state = "silent" if self._silent else "scanning"

    async def _start_scanner(self) -> Scanner:
        if self._mode == "active":
            return await self._start_mode("active")
        try:
            return await self._start_mode("passive")
        except BleakError as exc:
            if isinstance(exc, _NOT_ABOUT_PASSIVE):
                raise
            scanner = await self._start_mode("active")
            self._mode = "active"
            log.warning(
                "Passive BLE scanning is not available on %s (%s); scanning "
                "actively, so badges also answer scan requests",
                self.settings.adapter,
                exc,
            )
            return scanner

    async def _start_mode(self, mode: ScanMode) -> Scanner:
        scanner = self._factory(self.on_advertisement, mode, self.settings.adapter)
        try:
            await asyncio.wait_for(scanner.start(), START_TIMEOUT)
        except TimeoutError:
            await self._stop_scanner(scanner)
            raise
        return scanner

    def _unavailable(self, exc: BaseException, now: float) -> None:
        self._failures += 1
        exponent = min(self._failures - 1, 16)
        delay = min(self.settings.retry_initial * 2**exponent, self.settings.retry_max)
        self._retry_at = now + delay
        self._state = "unavailable"
        with self._lock:
            self._counts["start_failures"] += 1
            self._last_error = _explain(exc)
        if self._failures == 1:
            log.error(
                "Cannot scan for BLE badges on %s (%s); retrying, at most every %.0f s",
                self.settings.adapter,
                self._last_error,
                self.settings.retry_max,
            )
            self._went_offline(f"cannot scan: {self._last_error}")
        else:
            log.debug("BLE scanner start failed again, retry in %.1f s: %s", delay, exc)

    async def _close(self) -> None:
        scanner, self._scanner = self._scanner, None
        if scanner is not None:
            await self._stop_scanner(scanner)

    async def _stop_scanner(self, scanner: Scanner) -> None:
        try:
            await asyncio.wait_for(scanner.stop(), START_TIMEOUT)
        except _BLUEZ_DOWN as exc:
            # A scanner that went silent often cannot stop cleanly either
            # (InProgress, or a restarted bluetoothd forgot it); drop it anyway.
            log.debug(
                "Stopping the BLE scanner on %s failed: %s", self.settings.adapter, exc
            )

    def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        with asyncio.Runner(loop_factory=lambda: loop) as runner:
            try:
                runner.run(self.watch())
            except Exception:
                self._state = "failed"
                log.exception(
                    "BLE scanner on %s stopped by an unexpected error",
                    self.settings.adapter,
                )
