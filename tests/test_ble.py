"""The BLE driver: beacon frames read from bleak's own types, and the watchdog.

Advertisements are bleak's ``AdvertisementData`` and ``BLEDevice``, built
with the byte layouts real badges send, and handed to the detection callback
as bleak would. The watchdog runs against a stand-in scanner (see
:class:`StandInScanner`) and a clock the test moves; one test runs the real
bleak scanner to show how it fails without BlueZ.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from bleak import BleakScanner
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData
from bleak.exc import BleakDBusError, BleakError

from drivers import ble
from drivers.ble import (
    EDDYSTONE,
    BLEScanner,
    BLESettings,
    EddystoneTLM,
    EddystoneUID,
    IBeacon,
    NotABadge,
    ScanMode,
    bleak_scanner,
    parse_eddystone,
    parse_ibeacon,
    read_beacons,
)
from drivers.presence import Sighting
from rules.events import Event

# -- recorded frames ---------------------------------------------------------------
# Manufacturer data as bleak hands it over: keyed by company id, which the
# bytes no longer contain. Service data keyed by the 128-bit UUID.

APPLE, NORDIC = 0x004C, 0x0059

KONTAKT_IBEACON = bytes.fromhex("0215f7826da64fa24e988024bc5b71e0893e0003012dc5")
"""A Kontakt.io badge: its default UUID, major 3, minor 301, -59 dBm at 1 m."""

BLUECHARM_IBEACON = b"\x02\x15BlueCharmBeacons\x0e\xfe\x13U\xc5"
"""A BlueCharm beacon, as in Home Assistant's ibeacon tests: major 3838, minor 4949."""

IPHONE_NEARBY = bytes.fromhex("1005031c1a8e7b")
"""Apple "Nearby Info" from a phone: Apple data, but not an iBeacon."""

SHORT_IBEACON = bytes.fromhex("0215f7826da64fa24e98")
BAD_LENGTH_IBEACON = bytes.fromhex("0214f7826da64fa24e988024bc5b71e0893e0003012d")

EDDYSTONE_UID = bytes.fromhex("00eeedd1ebeac04e5defa0170000000000b10000")
"""Namespace edd1ebeac04e5defa017 (Google's example), instance b1, -18 dBm at 0 m."""

EDDYSTONE_TLM = bytes.fromhex("20000bb81780000012340001e240")
"""3000 mV, 23.5 °C, 0x1234 adverts, 12345.6 s since power-up."""

EDDYSTONE_TLM_LOW = bytes.fromhex("20000960ff80000000100000000a")
"""2400 mV, -0.5 °C: a coin cell near its end in a cold store."""

EDDYSTONE_TLM_NO_SENSORS = bytes.fromhex("2000000080000000000100000001")
EDDYSTONE_ETLM = bytes.fromhex("20011122334455667788990011223344aabb")
EDDYSTONE_URL = bytes.fromhex("10ee03676f6f676c6507")
"""https://google.com, which names no badge."""

ANA = "ibeacon:f7826da6-4fa2-4e98-8024-bc5b71e0893e:3:301"
BEN = "eddystone:edd1ebeac04e5defa017:0000000000b1"


def device(address: str = "C4:4F:33:0A:0B:0C") -> BLEDevice:
    path = f"/org/bluez/hci0/dev_{address.replace(':', '_')}"
    return BLEDevice(address, None, {"path": path, "props": {}})


def advert(
    rssi: int = -60,
    manufacturer: dict[int, bytes] | None = None,
    eddystone: bytes | None = None,
) -> AdvertisementData:
    service_data = {} if eddystone is None else {EDDYSTONE: eddystone}
    return AdvertisementData(
        local_name=None,
        manufacturer_data=manufacturer or {},
        service_data=service_data,
        service_uuids=[EDDYSTONE] if eddystone is not None else [],
        tx_power=None,
        rssi=rssi,
        platform_data=(),
    )


# -- parsing ----------------------------------------------------------------------


def test_an_ibeacon_is_read_from_apple_manufacturer_data():
    frame = parse_ibeacon(APPLE, KONTAKT_IBEACON)
    assert frame == IBeacon(
        uuid.UUID("f7826da6-4fa2-4e98-8024-bc5b71e0893e"), 3, 301, -59
    )
    assert frame.badge == ANA
    bluecharm = parse_ibeacon(APPLE, BLUECHARM_IBEACON)
    assert bluecharm is not None
    assert bluecharm.badge == "ibeacon:426c7565-4368-6172-6d42-6561636f6e73:3838:4949"


def test_trailing_apple_entries_after_an_ibeacon_are_left_alone():
    frame = parse_ibeacon(APPLE, KONTAKT_IBEACON + IPHONE_NEARBY)
    assert frame is not None
    assert frame.badge == ANA


@pytest.mark.parametrize(
    ("company", "data", "reason"),
    [
        (APPLE, SHORT_IBEACON, "truncated_ibeacon"),
        (APPLE, b"\x02", "bad_ibeacon"),
        (APPLE, BAD_LENGTH_IBEACON, "bad_ibeacon"),
        (NORDIC, KONTAKT_IBEACON, "not_apple"),
    ],
)
def test_malformed_or_foreign_ibeacons_are_refused(
    company: int, data: bytes, reason: str
):
    with pytest.raises(NotABadge) as caught:
        parse_ibeacon(company, data)
    assert caught.value.reason == reason


def test_other_manufacturer_data_is_simply_not_a_beacon():
    assert parse_ibeacon(APPLE, IPHONE_NEARBY) is None
    assert parse_ibeacon(APPLE, b"") is None
    assert parse_ibeacon(NORDIC, SHORT_IBEACON) is None


def test_an_eddystone_uid_is_read_with_or_without_its_reserved_bytes():
    full = parse_eddystone(EDDYSTONE_UID)
    assert full == EddystoneUID(
        bytes.fromhex("edd1ebeac04e5defa017"), bytes.fromhex("0000000000b1"), -18
    )
    assert full.badge == BEN
    assert parse_eddystone(EDDYSTONE_UID[:18]) == full


def test_eddystone_telemetry_gives_battery_temperature_and_counters():
    assert parse_eddystone(EDDYSTONE_TLM) == EddystoneTLM(3000, 23.5, 0x1234, 12345.6)
    assert parse_eddystone(EDDYSTONE_TLM_LOW) == EddystoneTLM(2400, -0.5, 16, 1.0)
    assert parse_eddystone(EDDYSTONE_TLM_NO_SENSORS) == EddystoneTLM(None, None, 1, 0.1)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "truncated_eddystone"),
        (EDDYSTONE_UID[:12], "truncated_eddystone"),
        (EDDYSTONE_TLM[:10], "truncated_eddystone"),
        (EDDYSTONE_ETLM, "encrypted_tlm"),
        (EDDYSTONE_URL, "eddystone_url"),
        (bytes.fromhex("30ee0102030405060708"), "eddystone_eid"),
        (bytes.fromhex("40"), "eddystone_unknown"),
    ],
)
def test_eddystone_frames_that_name_no_badge_are_refused(data: bytes, reason: str):
    with pytest.raises(NotABadge) as caught:
        parse_eddystone(data)
    assert caught.value.reason == reason


def test_one_merged_advertisement_can_carry_two_frames():
    """BlueZ merges a device's adverts, so iBeacon and Eddystone can come together."""
    frames, ignored = read_beacons(
        advert(
            manufacturer={APPLE: KONTAKT_IBEACON, NORDIC: b"\x01"},
            eddystone=EDDYSTONE_UID,
        )
    )
    assert [frame.badge for frame in frames] == [ANA, BEN]  # type: ignore[union-attr]
    assert ignored == []


# -- the detection callback ---------------------------------------------------------


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def scanner_with(
    factory: Factory | None = None, clock: Clock | None = None, **settings: object
) -> tuple[BLEScanner, list[Sighting]]:
    sightings: list[Sighting] = []
    clock = clock or Clock()
    scanner = BLEScanner(
        BLESettings(receiver="gw-ble", **settings),  # type: ignore[arg-type]
        sightings.append,
        clock=clock,
        monotonic=clock,
        scanner_factory=factory or Factory(),
    )
    return scanner, sightings


def test_adverts_become_sightings_of_the_gateway_receiver():
    scanner, sightings = scanner_with()
    scanner.on_advertisement(device(), advert(-61, {APPLE: KONTAKT_IBEACON}))
    scanner.on_advertisement(
        device("D0:00:00:00:00:01"), advert(-74, eddystone=EDDYSTONE_UID)
    )
    assert sightings == [
        Sighting(ANA, "gw-ble", -61, 1000.0),
        Sighting(BEN, "gw-ble", -74, 1000.0),
    ]
    health = scanner.health()
    assert (health["adverts"], health["beacons"], health["last_advert"]) == (
        2,
        2,
        1000.0,
    )


def test_ignored_adverts_are_counted_by_reason():
    """Short, foreign and non-beacon data: no sighting, one count each."""
    scanner, sightings = scanner_with()
    for data in (
        {APPLE: SHORT_IBEACON},
        {NORDIC: KONTAKT_IBEACON},
        {APPLE: IPHONE_NEARBY},
        {},
    ):
        scanner.on_advertisement(device(), advert(-50, data))
    scanner.on_advertisement(device(), advert(-50, eddystone=EDDYSTONE_URL))
    assert sightings == []
    assert scanner.health()["ignored"] == {
        "truncated_ibeacon": 1,
        "not_apple": 1,
        "not_a_beacon": 2,
        "eddystone_url": 1,
    }
    assert scanner.health()["adverts"] == 5


def test_telemetry_is_paired_with_the_uid_heard_from_the_same_address():
    """A TLM frame has no id: it belongs to the UID last heard from its address."""
    scanner, sightings = scanner_with()
    scanner.on_advertisement(
        device("D0:00:00:00:00:01"), advert(-70, eddystone=EDDYSTONE_TLM)
    )
    assert sightings == []
    assert scanner.health()["ignored"] == {"unpaired_tlm": 1}

    scanner.on_advertisement(
        device("D0:00:00:00:00:01"), advert(-70, eddystone=EDDYSTONE_UID)
    )
    scanner.on_advertisement(
        device("D0:00:00:00:00:01"), advert(-72, eddystone=EDDYSTONE_TLM_LOW)
    )
    assert [s.badge for s in sightings] == [BEN, BEN]
    frame, heard = scanner.telemetry()[BEN]
    assert (frame.battery_mv, frame.temperature, heard) == (2400, -0.5, 1000.0)
    assert scanner.health()["badges_low_battery"] == 1


# -- the watchdog -----------------------------------------------------------------


class StandInScanner:
    """Stands in for bleak's BleakScanner in the watchdog tests.

    The real one cannot start without BlueZ on the system D-Bus, which CI
    machines do not have; this is the one place the tests use a stand-in.
    It has the two coroutines the watchdog calls, and fails when told to.
    """

    def __init__(
        self,
        callback: Callable[[BLEDevice, AdvertisementData], None],
        mode: ScanMode,
        error: BaseException | None,
        stop_error: BaseException | None,
    ) -> None:
        self.callback = callback
        self.mode = mode
        self.running = False
        self.started = threading.Event()
        self._error = error
        self._stop_error = stop_error

    async def start(self) -> None:
        if self._error is not None:
            raise self._error
        self.running = True
        self.started.set()

    async def stop(self) -> None:
        self.running = False
        if self._stop_error is not None:
            raise self._stop_error


class Factory:
    """Builds stand-ins; ``errors`` fail the next starts in turn."""

    def __init__(self) -> None:
        self.built: list[StandInScanner] = []
        self.errors: list[BaseException] = []
        self.passive_error: BaseException | None = None
        self.stop_error: BaseException | None = None

    def __call__(
        self,
        callback: Callable[[BLEDevice, AdvertisementData], None],
        mode: ScanMode,
        _: str,
    ) -> StandInScanner:
        error = self.errors.pop(0) if self.errors else None
        if mode == "passive" and error is None:
            error = self.passive_error
        scanner = StandInScanner(callback, mode, error, self.stop_error)
        self.built.append(scanner)
        return scanner

    @property
    def running(self) -> list[StandInScanner]:
        return [scanner for scanner in self.built if scanner.running]


def messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level]


def test_a_silent_scanner_is_rebuilt_and_logged_once(caplog: pytest.LogCaptureFixture):
    """60 s without adverts: rebuild; silent again: rebuild, no second warning."""
    factory, clock = Factory(), Clock(0.0)
    scanner, sightings = scanner_with(factory, clock)

    async def scenario() -> None:
        await scanner.check()
        assert [s.mode for s in factory.running] == ["passive"]
        clock.now = 30.0
        factory.built[0].callback(device(), advert(-60, {APPLE: KONTAKT_IBEACON}))
        clock.now = 89.9
        await scanner.check()
        assert len(factory.built) == 1
        clock.now = 90.0
        await scanner.check()
        assert factory.running == [factory.built[1]]
        assert scanner.health()["state"] == "silent"
        clock.now = 150.0
        await scanner.check()
        assert factory.running == [factory.built[2]]
        clock.now = 151.0
        factory.built[2].callback(device(), advert(-60, {APPLE: KONTAKT_IBEACON}))
        await scanner.check()

    with caplog.at_level(logging.INFO, logger="drivers.ble"):
        asyncio.run(scenario())
    assert messages(caplog, logging.WARNING) == [
        "No BLE advertisements on hci0 for 60 s; rebuilding the scanner"
    ]
    assert messages(caplog, logging.INFO) == [
        "BLE scanner on hci0 started (passive)",
        "BLE advertisements on hci0 again, after 2 rebuild(s) in all",
    ]
    health = scanner.health()
    assert (health["state"], health["restarts"], len(sightings)) == ("scanning", 2, 2)


def test_the_receiver_reports_its_own_health_for_supervision():
    """Heartbeats while adverts come, ``offline`` once when they stop, and a
    heartbeat again with the first advert after the rebuild."""
    factory, clock = Factory(), Clock(0.0)
    scanner, _ = scanner_with(factory, clock)
    reports: list[Event] = []
    scanner.report_to(reports.append)

    async def scenario() -> None:
        await scanner.check()
        for second in range(1, 62):
            clock.now = float(second)
            factory.running[0].callback(device(), advert(-60, {APPLE: KONTAKT_IBEACON}))
            await scanner.check()
        clock.now = 121.0
        await scanner.check()  # 60 s without adverts: silent
        clock.now = 181.0
        await scanner.check()  # still silent, rebuilt again: no second report
        clock.now = 182.0
        factory.running[0].callback(device(), advert(-60, {APPLE: KONTAKT_IBEACON}))

    asyncio.run(scenario())
    kinds = [(event.type, event.ts) for event in reports]
    assert kinds == [
        ("heartbeat", 1.0),
        ("heartbeat", 31.0),
        ("heartbeat", 61.0),
        ("offline", 121.0),
        ("heartbeat", 182.0),
    ]
    assert {event.device for event in reports} == {"gw-ble"}
    assert reports[3].fields == {"reason": "no BLE advertisements for 60 s"}


def test_an_adapter_that_cannot_scan_is_reported_offline_once():
    factory, clock = Factory(), Clock(0.0)
    factory.errors = [FileNotFoundError(2, "No such file or directory")] * 3
    scanner, _ = scanner_with(factory, clock)
    reports: list[Event] = []
    scanner.report_to(reports.append)

    async def scenario() -> None:
        while clock.now <= 20:
            await scanner.check()
            clock.now += 1.0

    asyncio.run(scenario())
    assert [event.type for event in reports] == ["offline"]
    assert reports[0].fields["reason"].startswith("cannot scan: no D-Bus system bus")


def test_silence_is_no_fault_while_no_badges_are_expected():
    factory, clock = Factory(), Clock(0.0)
    expected = [False]
    scanner = BLEScanner(
        BLESettings(receiver="gw-ble"),
        lambda sighting: None,
        clock=clock,
        monotonic=clock,
        scanner_factory=factory,
        expecting=lambda: expected[0],
    )

    async def scenario() -> None:
        await scanner.check()
        clock.now = 600.0
        await scanner.check()
        assert len(factory.built) == 1
        expected[0] = True
        await scanner.check()
        assert len(factory.built) == 2

    asyncio.run(scenario())


def test_bluez_unavailable_is_retried_with_capped_backoff(
    caplog: pytest.LogCaptureFixture,
):
    """No D-Bus socket (what bleak raises here): 2, 4, ... 60 s, one error logged."""
    factory, clock = Factory(), Clock(0.0)
    factory.errors = [FileNotFoundError(2, "No such file or directory")] * 7
    scanner, _ = scanner_with(factory, clock)
    attempts: list[float] = []

    async def scenario() -> None:
        while clock.now <= 200:
            built = len(factory.built)
            await scanner.check()
            if len(factory.built) > built:
                attempts.append(clock.now)
            clock.now += 1.0

    with caplog.at_level(logging.INFO, logger="drivers.ble"):
        asyncio.run(scenario())
    assert attempts == [0, 2, 6, 14, 30, 62, 122, 182]
    assert len(factory.running) == 1
    assert messages(caplog, logging.ERROR) == [
        "Cannot scan for BLE badges on hci0 (no D-Bus system bus to reach BlueZ: "
        "[Errno 2] No such file or directory); retrying, at most every 60 s"
    ]
    assert messages(caplog, logging.INFO) == [
        "BLE scanner on hci0 started (passive) after 7 failed attempt(s)"
    ]
    health = scanner.health()
    assert (health["state"], health["start_failures"]) == ("scanning", 7)


def test_without_passive_support_it_scans_actively_and_says_so_once(
    caplog: pytest.LogCaptureFixture,
):
    """A plain BleakError, as for BlueZ without --experimental: active from then on."""
    factory, clock = Factory(), Clock(0.0)
    factory.passive_error = BleakError(
        "passive scanning on Linux requires BlueZ >= 5.56 with --experimental "
        "enabled and Linux kernel >= 5.10"
    )
    scanner, _ = scanner_with(factory, clock)

    async def scenario() -> None:
        await scanner.check()
        clock.now = 60.0
        await scanner.check()

    with caplog.at_level(logging.WARNING, logger="drivers.ble"):
        asyncio.run(scenario())
    assert [(s.mode, s.running) for s in factory.built] == [
        ("passive", False),
        ("active", False),
        ("active", True),
    ]
    warnings = messages(caplog, logging.WARNING)
    assert len(warnings) == 2
    assert warnings[0].startswith("Passive BLE scanning is not available on hci0")
    assert warnings[1].startswith("No BLE advertisements")
    assert scanner.health()["mode"] == "active"


def test_a_dbus_error_is_not_mistaken_for_missing_passive_support():
    """InProgress is a BlueZ hiccup: retry later, still passive."""
    factory, clock = Factory(), Clock(0.0)
    factory.errors = [
        BleakDBusError("org.bluez.Error.InProgress", ["Operation already in progress"])
    ]
    scanner, _ = scanner_with(factory, clock)

    async def scenario() -> None:
        await scanner.check()
        clock.now = 2.0
        await scanner.check()

    asyncio.run(scenario())
    assert [(s.mode, s.running) for s in factory.built] == [
        ("passive", False),
        ("passive", True),
    ]


def test_a_scanner_that_cannot_stop_is_replaced_all_the_same():
    factory, clock = Factory(), Clock(0.0)
    factory.stop_error = BleakDBusError("org.bluez.Error.InProgress", [])
    scanner, _ = scanner_with(factory, clock)

    async def scenario() -> None:
        await scanner.check()
        clock.now = 60.0
        await scanner.check()

    asyncio.run(scenario())
    assert len(factory.built) == 2
    assert factory.running == [factory.built[1]]


def test_a_hung_start_counts_as_a_failure(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(ble, "START_TIMEOUT", 0.05)
    clock = Clock(0.0)

    class Hanging(StandInScanner):
        async def start(self) -> None:
            await asyncio.sleep(10)

    def factory(callback: Callable[..., None], mode: ScanMode, _: str) -> Hanging:
        return Hanging(callback, mode, None, None)

    scanner, _ = scanner_with(factory, clock)  # type: ignore[arg-type]
    asyncio.run(scanner.check())
    health = scanner.health()
    assert (health["state"], health["last_error"]) == ("unavailable", "TimeoutError: ")


# -- the thread, with the stand-in and with real bleak ------------------------------


def ble_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("ble-")]


def test_start_scans_on_its_own_thread_and_stop_ends_it():
    factory = Factory()
    scanner, sightings = scanner_with(factory, Clock())
    scanner.start(lambda event: None)
    try:
        scanner.start(lambda event: None)  # a second start changes nothing
        assert _wait_built(factory)
        assert factory.built[0].started.wait(5)
        factory.built[0].callback(device(), advert(-58, {APPLE: KONTAKT_IBEACON}))
        assert [s.badge for s in sightings] == [ANA]
        assert scanner.health()["state"] == "scanning"
    finally:
        scanner.stop()
        scanner.stop()
    assert factory.running == []
    assert scanner.health()["state"] == "stopped"
    assert ble_threads() == []


def _wait_built(factory: Factory) -> bool:
    deadline = time.monotonic() + 5
    while not factory.built and time.monotonic() < deadline:
        time.sleep(0.01)
    return bool(factory.built)


SYSTEM_BUS = Path("/run/dbus/system_bus_socket")


@pytest.mark.skipif(
    SYSTEM_BUS.exists() or "DBUS_SYSTEM_BUS_ADDRESS" in os.environ,
    reason="this machine has a system D-Bus; the test is about running without one",
)
def test_real_bleak_without_bluez_reports_unavailable_and_stops_cleanly():
    """The real BleakScanner: start fails, health says why, nothing is left behind."""
    scanner = BLEScanner(BLESettings(receiver="gw-ble"), lambda sighting: None)
    scanner.start(lambda event: None)
    try:
        deadline = time.monotonic() + 5
        while (
            scanner.health()["state"] != "unavailable" and time.monotonic() < deadline
        ):
            time.sleep(0.01)
        health = scanner.health()
        assert health["state"] == "unavailable"
        assert health["last_error"].startswith("no D-Bus system bus to reach BlueZ")
    finally:
        scanner.stop()
    assert ble_threads() == []


def test_the_bleak_factory_builds_passive_and_active_scanners():
    """bleak accepts our or-patterns (it refuses passive mode without them)."""

    def callback(device: BLEDevice, adv: AdvertisementData) -> None:
        pass

    assert isinstance(bleak_scanner(callback, "passive", "hci0"), BleakScanner)
    assert isinstance(bleak_scanner(callback, "active", "hci1"), BleakScanner)
    with pytest.raises(BleakError, match="requires bluez or_patterns"):
        BleakScanner(callback, scanning_mode="passive")


def test_settings_refuse_a_backoff_cap_below_its_start():
    with pytest.raises(ValueError, match="'retry_max' must not be shorter"):
        BLESettings.model_validate(
            {"receiver": "gw-ble", "retry_initial": "30s", "retry_max": "10s"}
        )
