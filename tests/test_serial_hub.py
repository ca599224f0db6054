"""The serial hub driver, through real pseudo-terminals and ``loop://``.

The driver opens the slave side of a pty by its path, as it opens
``/dev/serial/by-id/...`` on site; the test writes frames to the master side,
as a hub would. Unplugging is a pty that closes and a by-id style symlink
that disappears, then comes back pointing at a new pty.
"""

from __future__ import annotations

import logging
import os
import pty
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import serial
import yaml
from pydantic import TypeAdapter, ValidationError

from drivers.serial_hub import (
    MAX_LINE,
    REJECT_REASONS,
    Backoff,
    FrameError,
    HubSequence,
    HubSettings,
    LineSplitter,
    SerialHubDriver,
    SerialHubSettings,
    crc16_ccitt,
    encode_frame,
    frame_events,
    parse_frame,
)
from rules.events import Event
from rules.schema import Rule
from rules.site import Device

DOC = Path(__file__).resolve().parent.parent / "firmware-config/serial-hub-protocol.md"

WAIT = 5.0
"""Seconds to wait for what should take milliseconds; only a failure waits."""

FAST = {"reopen_min": "20ms", "reopen_max": "100ms"}
"""Backoff short enough that a replug is noticed within a test's patience."""

HUBS: dict[str, Any] = {
    "wc2": {
        "device": "wc2-hub",
        "channels": {
            1: "wc2-counter",
            2: "wc2-soap",
            3: "wc2-towels",
            4: "wc2-air",
            5: "wc2-stall1",
            6: "wc2-door",
        },
    }
}

GOOD = encode_frame("wc2", 2, "OCC", ch=5, occupied=1)
"""A frame sent after each bad one: the reader must still be working."""


def wait_for(condition: Callable[[], object], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {WAIT}s waiting for {what}")
        time.sleep(0.005)


def wrap(body: bytes) -> bytes:
    """Any body as a frame with a right checksum, for what encode_frame refuses."""
    return b"$%s*%04X\r\n" % (body, crc16_ccitt(body))


def brief(events: list[Event]) -> list[tuple[str, str, dict[str, Any]]]:
    """Events without what every one carries (ids, times, hub, channel, seq)."""
    common = ("hub", "channel", "seq")
    return [
        (e.device, e.type, {k: v for k, v in e.fields.items() if k not in common})
        for e in events
    ]


class Pty:
    """A pseudo-terminal: the driver opens ``path``; the test writes to master."""

    def __init__(self) -> None:
        self.master, self.slave = pty.openpty()
        self.path = os.ttyname(self.slave)
        self._open = True

    def write(self, data: bytes) -> None:
        os.write(self.master, data)

    def close(self) -> None:
        """Hang up: the driver's reads fail, as when a USB hub is pulled."""
        if self._open:
            self._open = False
            os.close(self.master)
            os.close(self.slave)


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    yield
    leaked = [t.name for t in threading.enumerate() if t.name.startswith("serial-hub")]
    assert not leaked, f"reader threads still running: {leaked}"


@pytest.fixture
def ptys() -> Iterator[Callable[[], Pty]]:
    made: list[Pty] = []

    def make() -> Pty:
        made.append(Pty())
        return made[-1]

    yield make
    for tty in made:
        tty.close()


Run = Callable[..., tuple[SerialHubDriver, list[Event]]]


@pytest.fixture
def run_driver() -> Iterator[Run]:
    """Factory: start a driver on a port; every one is stopped at teardown."""
    started: list[SerialHubDriver] = []

    def run(port: str, **options: Any) -> tuple[SerialHubDriver, list[Event]]:
        extra = {k: options.pop(k) for k in ("open_port",) if k in options}
        settings = SerialHubSettings(port=port, hubs=HUBS, **options)
        driver = SerialHubDriver(settings, **extra)
        events: list[Event] = []
        driver.start(events.append)
        started.append(driver)
        return driver, events

    yield run
    for driver in started:
        driver.stop()


@pytest.fixture
def on_pty(ptys: Callable[[], Pty], run_driver: Run) -> Callable[..., Any]:
    """Factory: a pty with a connected driver on it."""

    def start(**options: Any) -> tuple[Pty, SerialHubDriver, list[Event]]:
        tty = ptys()
        driver, events = run_driver(tty.path, **options)
        wait_for(lambda: driver.health()["connected"], "the pty to open")
        return tty, driver, events

    return start


# -- the wire format, without a port --------------------------------------------


def test_checksum_is_crc16_ccitt_false() -> None:
    assert crc16_ccitt(b"123456789") == 0x29B1


def test_encoded_frame_parses_back() -> None:
    line = encode_frame("wc2", 17, "AIR", ch=4, co2=812, temp=22.4, ok=True)
    assert line == b"$HUB,1,wc2,17,AIR,ch=4,co2=812,temp=22.4,ok=1*B5FF\r\n"
    frame = parse_frame(line.removesuffix(b"\r\n"))
    assert (frame.hub, frame.seq, frame.kind) == ("wc2", 17, "AIR")
    assert frame.fields == {"ch": "4", "co2": "812", "temp": "22.4", "ok": "1"}


def test_encoder_refuses_an_over_long_frame() -> None:
    with pytest.raises(ValueError, match="the limit is 128"):
        encode_frame("wc2", 1, "AIR", ch=4, **{f"r{i}": 1000 for i in range(20)})


def test_line_length_limit_counts_the_line_end() -> None:
    body = b"HUB,1,wc2,1,LVL,ch=2,x="
    longest = wrap(body + b"1" * (MAX_LINE - len(wrap(body))))
    assert len(longest) == MAX_LINE
    one_more = wrap(body + b"1" * (MAX_LINE + 1 - len(wrap(body))))

    [(line, error)] = LineSplitter().feed(longest)
    assert error is None
    assert line == longest.removesuffix(b"\r\n")
    [(_, error)] = LineSplitter().feed(one_more)
    assert error is not None
    assert error.reason == "too_long"


def test_splitter_resyncs_on_dollar_and_gives_up_partial_lines() -> None:
    splitter = LineSplitter()
    good = encode_frame("wc2", 1, "HB")
    lines = splitter.feed(b"\r\n$HUB,1,wc2,1,LV" + good + b"$HUB,1,wc2,2,D")
    assert [(line, e and e.reason) for line, e in lines] == [
        (b"$HUB,1,wc2,1,LV", "truncated"),
        (good.removesuffix(b"\r\n"), None),
    ]
    # The port is lost: the tail must not be glued to what comes after.
    [(line, error)] = splitter.flush()
    assert line == b"$HUB,1,wc2,2,D"
    assert error is not None
    assert error.reason == "truncated"
    assert splitter.feed(good) == [(good.removesuffix(b"\r\n"), None)]


def doc_frames() -> list[bytes]:
    return [
        line.encode()
        for line in DOC.read_text().splitlines()
        if re.fullmatch(r"\$HUB\S*\*[0-9A-F]{4}", line)
    ]


def doc_yaml(key: str) -> dict[str, Any]:
    blocks = re.findall(r"```yaml\n(.*?)```", DOC.read_text(), re.DOTALL)
    return next(y for b in blocks if key in (y := yaml.safe_load(b)))


def test_every_example_frame_in_the_protocol_doc_decodes() -> None:
    frames = doc_frames()
    assert len(frames) >= 10
    hub = SerialHubSettings(**doc_yaml("serial_hubs")["serial_hubs"][0]).hubs["wc2"]
    for line in frames:
        assert frame_events(parse_frame(line), hub), line


def test_settings_example_in_the_protocol_doc_is_valid() -> None:
    example = doc_yaml("serial_hubs")
    devices = {Device(**d).id for d in example["devices"]}
    for entry in example["serial_hubs"]:
        settings = SerialHubSettings(**entry)
        assert settings.device_ids() <= devices
    first = SerialHubSettings(**example["serial_hubs"][0])
    assert first.hubs["wc2"].channels["2"] == "wc2-soap"
    assert (first.reopen_min, first.reopen_max) == (0.5, 30.0)
    TypeAdapter(tuple[Rule, ...]).validate_python(doc_yaml("rules")["rules"])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"port": "tcp://10.0.0.1:4001"}, "unknown port URL scheme 'tcp'"),
        ({"reopen_min": "5s", "reopen_max": "1s"}, "'reopen_max' .* at least"),
        ({"reopen_min": 0}, "longer than 0s"),
        ({"hubs": {}}, "at least 1 item"),
        ({"hubs": {"wc2": {"channels": {"a b": "x"}}}}, "should match pattern"),
        ({"hubs": {"wc2": {"chanels": {}}}}, "Extra inputs are not permitted"),
        ({"baud": 9600}, "Extra inputs are not permitted"),
    ],
)
def test_settings_refuse_mistakes(options: dict[str, Any], message: str) -> None:
    raw = {"port": "/dev/ttyUSB0", "hubs": HUBS, **options}
    with pytest.raises(ValidationError, match=message):
        SerialHubSettings(**raw)


def test_sequence_numbers_spot_gaps_wraps_repeats_and_restarts() -> None:
    seq = HubSequence()
    assert seq.check(7, 0xA) == ("in_order", 0)  # first frame: a baseline
    assert seq.check(8, 0xB) == ("in_order", 0)
    assert seq.check(8, 0xB) == ("repeat", 0)
    assert seq.check(11, 0xC) == ("gap", 2)
    assert seq.check(5, 0xD) == ("backwards", 0)  # rebooted, boot frame lost
    assert seq.check(0, 0xF) == ("restart", 0)
    assert seq.check(1, 0xE0) == ("in_order", 0)
    assert seq.check(1, 0xE0) == ("repeat", 0)

    wrapping = HubSequence()
    assert wrapping.check(65534, 1) == ("in_order", 0)
    assert wrapping.check(65535, 2) == ("in_order", 0)
    assert wrapping.check(1, 3) == ("in_order", 0)  # 65535 wraps to 1, not 0
    assert wrapping.check(65535, 4) == ("backwards", 0)
    assert wrapping.check(3, 5) == ("gap", 2)  # 1 and 2 lost across the wrap


def test_a_restart_forgets_the_old_boot() -> None:
    seq = HubSequence()
    for n in range(4):
        seq.check(n, 0xAB)
    assert seq.check(0, 0xCD) == ("restart", 0)
    # Same sequence number and bytes as before the reboot: new, not a repeat.
    assert seq.check(1, 0xAB) == ("in_order", 0)


def test_backoff_doubles_up_to_its_cap_with_jitter() -> None:
    top = Backoff(0.5, 3.0, rng=lambda: 1.0)
    assert [top.next() for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    top.reset()
    assert top.next() == 0.5
    bottom = Backoff(0.5, 3.0, rng=lambda: 0.0)
    assert [bottom.next() for _ in range(3)] == [0.25, 0.5, 1.0]


def test_heartbeat_without_channel_needs_a_hub_device() -> None:
    frame = parse_frame(encode_frame("wc2", 3, "HB", up=60).strip())
    assert frame_events(frame, HubSettings()) == []
    [(device, kind, fields)] = frame_events(frame, HubSettings(device="wc2-hub"))
    assert (device, kind, fields["uptime"]) == ("wc2-hub", "heartbeat", 60)


# -- through a pty ----------------------------------------------------------------


def test_good_frames_become_events(on_pty: Callable[..., Any]) -> None:
    tty, driver, events = on_pty()
    frames = [
        encode_frame("wc2", 0, "HB", up=0),
        encode_frame("wc2", 1, "CNT", ch=1),
        encode_frame("wc2", 2, "CNT", ch=1, n=2),
        encode_frame("wc2", 3, "LVL", ch=3, towel_level=12.5, paper_level=80),
        encode_frame("wc2", 4, "AIR", ch=4, co2=812, nh3=-0.5),
        encode_frame("wc2", 5, "OCC", ch=5, occupied=1),
        encode_frame("wc2", 6, "DOOR", ch=6, open=0),
        encode_frame("wc2", 7, "HB", ch=4),
    ]
    tty.write(b"".join(frames))
    wait_for(lambda: len(events) == 11, "eleven events")

    assert brief(events) == [
        ("wc2-hub", "heartbeat", {"uptime": 0}),
        ("wc2-counter", "visit", {}),
        ("wc2-counter", "visit", {}),
        ("wc2-counter", "visit", {}),
        ("wc2-towels", "reading", {"reading": "towel_level", "value": 12.5}),
        ("wc2-towels", "reading", {"reading": "paper_level", "value": 80}),
        ("wc2-air", "reading", {"reading": "co2", "value": 812}),
        ("wc2-air", "reading", {"reading": "nh3", "value": -0.5}),
        ("wc2-stall1", "occupancy", {"occupied": True}),
        ("wc2-door", "door", {"open": False}),
        ("wc2-air", "heartbeat", {}),
    ]
    assert events[4].fields["channel"] == "3"
    assert events[4].fields["seq"] == 3
    assert len({e.id for e in events}) == 11

    health = driver.health()
    assert health["connected"] is True
    assert health["frames_ok"] == 8
    assert health["events"] == 11
    assert health["hub_restarts"] == 1
    assert health["seq_gaps"] == 0
    assert set(health["rejects"].values()) == {0}
    assert health["hubs"]["wc2"]["last_seq"] == 7
    assert health["last_frame_at"] == pytest.approx(time.time(), abs=WAIT)


BAD_FRAMES = [
    pytest.param("too_long", b"$HUB,1,wc2,1,AIR,ch=4," + b"co2=1," * 30 + b"\r\n"),
    pytest.param("too_long", b"x" * 300, id="too_long-noise_without_newline"),
    pytest.param("truncated", b"$HUB,1,wc2,1,LVL,ch=2,soap_le"),
    pytest.param("noise", b"ets Jun  8 2016 00:22:57\r\n"),
    pytest.param("bad_syntax", b"$HUB,1,wc2,1,OCC,ch=5,occupied=1\r\n", id="no_crc"),
    pytest.param("bad_syntax", wrap(b"HUX,1,wc2,1,OCC,ch=5"), id="bad_tag"),
    pytest.param("bad_syntax", wrap(b"HUB,1,wc2,1,OCC,ch=5,ch=5"), id="twice"),
    pytest.param("bad_syntax", wrap(b"HUB,1,wc2,1,LVL,ch=2,soap=3\xb7"), id="ascii"),
    pytest.param("bad_syntax", wrap(b"HUB,1,wc2,70000,HB"), id="seq"),
    pytest.param(
        "bad_checksum",
        encode_frame("wc2", 1, "LVL", ch=2, soap_level=37).replace(b"37", b"87"),
    ),
    pytest.param("unsupported_version", wrap(b"HUB,2,wc2,1,OCC,ch=5,occupied=1")),
    pytest.param("unknown_hub", encode_frame("wc9", 1, "OCC", ch=5, occupied=1)),
    pytest.param("unknown_kind", encode_frame("wc2", 1, "FOO", ch=1)),
    pytest.param("unknown_channel", encode_frame("wc2", 1, "OCC", ch=9, occupied=1)),
    pytest.param("missing_field", encode_frame("wc2", 1, "OCC", ch=5)),
    pytest.param("missing_field", encode_frame("wc2", 1, "AIR", ch=4), id="noread"),
    pytest.param("non_numeric", encode_frame("wc2", 1, "LVL", ch=2, soap="abc")),
    pytest.param("non_numeric", encode_frame("wc2", 1, "AIR", ch=4, co2="nan")),
    pytest.param("bad_value", encode_frame("wc2", 1, "OCC", ch=5, occupied=2)),
    pytest.param("bad_value", encode_frame("wc2", 1, "CNT", ch=1, n=0), id="n=0"),
]


@pytest.mark.parametrize(("reason", "bad"), BAD_FRAMES)
def test_bad_frame_is_rejected_and_counted_then_reading_goes_on(
    on_pty: Callable[..., Any],
    caplog: pytest.LogCaptureFixture,
    reason: str,
    bad: bytes,
) -> None:
    tty, driver, events = on_pty()
    tty.write(bad)
    tty.write(GOOD)
    wait_for(lambda: events, "the good frame after the bad one")

    assert brief(events) == [("wc2-stall1", "occupancy", {"occupied": True})]
    health = driver.health()
    assert health["rejects"] == {r: int(r == reason) for r in REJECT_REASONS}
    assert health["frames_ok"] == 1
    assert health["seq_gaps"] == 0
    [record] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert tty.path in record.getMessage()
    assert reason in record.getMessage()


def test_rejects_are_logged_once_per_burst(
    on_pty: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    tty, driver, events = on_pty()
    corrupt = encode_frame("wc2", 1, "LVL", ch=2, soap_level=37).replace(b"=", b":")
    tty.write(corrupt * 5 + GOOD)
    wait_for(lambda: events, "the good frame")

    assert driver.health()["rejects"]["bad_checksum"] == 5
    [record] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "bad_checksum" in record.getMessage()
    assert repr(corrupt.removesuffix(b"\r\n")) in record.getMessage()


def test_a_frame_split_across_writes_is_put_back_together(
    on_pty: Callable[..., Any],
) -> None:
    tty, driver, events = on_pty()
    frame = encode_frame("wc2", 1, "LVL", ch=3, towel_level=12.5, paper_level=80)
    for piece in (frame[:1], frame[1:9], frame[9:30], frame[30:-1]):
        tty.write(piece)
        time.sleep(0.02)
    assert events == []  # nothing before the line end
    tty.write(frame[-1:] + GOOD[:20])
    wait_for(lambda: len(events) == 2, "the two readings")
    tty.write(GOOD[20:])
    wait_for(lambda: len(events) == 3, "the frame after it")

    assert [e.fields["value"] for e in events[:2]] == [12.5, 80]
    assert driver.health()["frames_ok"] == 2


def test_sequence_gaps_and_replays_after_a_reconnect(
    on_pty: Callable[..., Any],
) -> None:
    tty, driver, events = on_pty()
    frames = [encode_frame("wc2", n, "DOOR", ch=6, open=n % 2) for n in (1, 2, 5)]
    tty.write(b"".join(frames))
    tty.write(frames[1] + frames[2])  # the hub replays its last two frames
    tty.write(encode_frame("wc2", 6, "DOOR", ch=6, open=0))
    wait_for(lambda: driver.health()["frames_ok"] == 4, "four frames")

    assert [e.fields["seq"] for e in events] == [1, 2, 5, 6]
    health = driver.health()
    assert health["repeats"] == 2
    assert health["seq_gaps"] == 1
    assert health["frames_missed"] == 2


def test_unplugged_port_is_offline_then_reopened(
    tmp_path: Path,
    ptys: Callable[[], Pty],
    run_driver: Run,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="drivers.serial_hub")
    link = tmp_path / "usb-hub-if00"  # stands in for /dev/serial/by-id/...
    first = ptys()
    link.symlink_to(first.path)
    driver, events = run_driver(str(link), **FAST)
    wait_for(lambda: driver.health()["connected"], "the port to open")
    first.write(encode_frame("wc2", 1, "DOOR", ch=6, open=1))
    wait_for(lambda: events, "a first event")

    # Unplugged: the device hangs up and its by-id link vanishes.
    link.unlink()
    first.close()
    wait_for(lambda: not driver.health()["connected"], "the port to be lost")
    wait_for(lambda: driver.health()["failed_opens"] >= 3, "retries")
    assert str(link) in driver.health()["last_error"]
    # Every device of the port is reported offline once, for supervision.
    offline = sorted(e.device for e in events if e.type == "offline")
    assert offline == sorted(driver.settings.device_ids())

    second = ptys()
    link.symlink_to(second.path)
    wait_for(lambda: driver.health()["connected"], "the port to reopen")
    second.write(encode_frame("wc2", 4, "DOOR", ch=6, open=0))
    wait_for(
        lambda: len([e for e in events if e.type != "offline"]) == 2,
        "an event after the replug",
    )

    health = driver.health()
    assert health["reopens"] == 1
    assert health["seq_gaps"] == 1
    assert health["frames_missed"] == 2
    messages = [r.getMessage() for r in caplog.records]
    for once in (" lost: ", "is back after", "sequence jumped"):
        assert len([m for m in messages if once in m]) == 1, (once, messages)


def test_port_missing_at_start_is_opened_once_it_appears(
    tmp_path: Path,
    ptys: Callable[[], Pty],
    run_driver: Run,
    caplog: pytest.LogCaptureFixture,
) -> None:
    link = tmp_path / "not-plugged-in-yet"
    driver, events = run_driver(str(link), **FAST)
    wait_for(lambda: driver.health()["failed_opens"] >= 3, "retries")
    assert driver.health()["connected"] is False
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "cannot be opened" in warning.getMessage()

    tty = ptys()
    link.symlink_to(tty.path)
    wait_for(lambda: driver.health()["connected"], "the port to open")
    tty.write(GOOD)
    wait_for(lambda: events, "an event")


# -- loop:// and the lifecycle ---------------------------------------------------


def test_loop_url_and_a_clean_stop(run_driver: Run) -> None:
    opened: list[serial.SerialBase] = []

    def open_port(url: str, **options: Any) -> serial.SerialBase:
        opened.append(serial.serial_for_url(url, **options))
        return opened[-1]

    driver, events = run_driver("loop://", open_port=open_port)
    wait_for(lambda: driver.health()["connected"], "loop:// to open")
    opened[0].write(GOOD + b"junk\n" + encode_frame("wc2", 3, "CNT", ch=1, n=2))
    wait_for(lambda: len(events) == 3, "three events")
    assert [e.type for e in events] == ["occupancy", "visit", "visit"]
    assert driver.health()["rejects"]["noise"] == 1

    driver.stop()
    driver.stop()  # a second stop is harmless
    assert not opened[0].is_open
    assert driver.health()["connected"] is False
    assert not [t for t in threading.enumerate() if t.name.startswith("serial-hub")]


def test_start_twice_is_refused(run_driver: Run) -> None:
    driver, _ = run_driver("loop://")
    with pytest.raises(RuntimeError, match="already started"):
        driver.start(lambda event: None)


def test_frame_error_names_its_reason() -> None:
    with pytest.raises(FrameError, match="bad_checksum: frame says 0000") as caught:
        parse_frame(b"$HUB,1,wc2,1,HB*0000")
    assert caught.value.reason == "bad_checksum"
