"""The GPIO driver on gpiozero's MockFactory: drive_low() is a finger on a button.

Most tests move a fake clock and call ``driver.settle()``, so debouncing is
exact and fast; a few run on the real clock to show that the debounce thread
and gpiozero's hold thread do the same on their own.
"""

from __future__ import annotations

import logging
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from gpiozero import LED, Button, Device
from gpiozero.pins.mock import MockFactory, MockPin
from pydantic import ValidationError

from drivers.gpio import MOCK_FACTORY_WARNING, GPIODriver, GPIOSettings, GPIOSetupError
from rules.events import Event

CALL_BUTTON = {"pin": 17, "device": "call-301", "press": "call"}
DOME_LIGHT = {"pin": 18, "device": "call-301", "blink_on": "20ms", "blink_off": "20ms"}
SMILEYS = [
    {"pin": pin, "device": "smiley-2f", "press": "feedback", "fields": {"score": score}}
    for pin, score in [
        (5, "very_unhappy"),
        (6, "unhappy"),
        (13, "happy"),
        (19, "very_happy"),
    ]
]
QUIET = 0.05
"""Longer than the default 20 ms bounce time: the contacts have settled."""


class FakeClock:
    """Monotonic seconds that move only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Recorder:
    """The emit callback: keeps every event, from any thread."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._changed = threading.Condition()

    def __call__(self, event: Event) -> None:
        with self._changed:
            self.events.append(event)
            self._changed.notify_all()

    def wait_for(self, count: int, timeout: float = 2.0) -> list[Event]:
        with self._changed:
            arrived = self._changed.wait_for(lambda: len(self.events) >= count, timeout)
        assert arrived, f"{len(self.events)} events, expected {count}"
        return list(self.events)

    @property
    def types(self) -> list[str]:
        return [event.type for event in self.events]


class PressedPin(MockPin):
    """A pin whose button is already held down: the pull-up cannot raise it."""

    def _set_pull(self, value: str) -> None:
        super()._set_pull(value)
        self.drive_low()


class Station:
    """A running driver, its pins and what it emitted."""

    def __init__(
        self, driver: GPIODriver, factory: MockFactory, clock: FakeClock | None
    ) -> None:
        self.driver = driver
        self.factory = factory
        self.clock = clock
        self.emitted = Recorder()

    def pin(self, number: int) -> MockPin:
        return self.factory.pin(number)

    def wait(self, seconds: float) -> None:
        """Let the contacts rest: move the fake clock, or really wait."""
        if self.clock is None:
            time.sleep(seconds)
            return
        self.clock.advance(seconds)
        self.driver.settle()

    def close_contacts(self, number: int, bounces: int = 0, gap: float = 0.001) -> None:
        """A finger pressing: the contacts touch and part ``bounces`` times."""
        pin = self.pin(number)
        for _ in range(bounces):
            pin.drive_low()
            self._step(gap)
            pin.drive_high()
            self._step(gap)
        pin.drive_low()

    def open_contacts(self, number: int, bounces: int = 0, gap: float = 0.001) -> None:
        """The finger lifting: the contacts part and touch ``bounces`` times."""
        pin = self.pin(number)
        for _ in range(bounces):
            pin.drive_high()
            self._step(gap)
            pin.drive_low()
            self._step(gap)
        pin.drive_high()

    def press(self, number: int, bounces: int = 3) -> None:
        """One physical press and release, each side a bounce train."""
        self.close_contacts(number, bounces)
        self.wait(QUIET)
        self.open_contacts(number, bounces)
        self.wait(QUIET)

    def _step(self, gap: float) -> None:
        # Within a bounce train the edges are a few ms apart on the fake
        # clock; on the real clock they are as close as Python can make them.
        if self.clock is not None:
            self.clock.advance(gap)


@pytest.fixture(autouse=True)
def no_threads_left() -> Iterator[None]:
    """Every test ends with the threads it started: gpiozero's and ours."""
    before = set(threading.enumerate())
    yield
    leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    assert not leaked, f"threads left running: {leaked}"


@pytest.fixture
def factory() -> Iterator[MockFactory]:
    factory = MockFactory()
    yield factory
    factory.reset()


@pytest.fixture
def start(factory: MockFactory) -> Iterator[Callable[..., Station]]:
    """Factory: ``start(buttons=[...], lights=[...])`` runs a driver on mock pins.

    The fake clock is used unless ``real_clock=True``; ``mock`` defaults to
    true (these tests ask for the mock factory on purpose).
    """
    stations: list[Station] = []

    def start(real_clock: bool = False, **settings: Any) -> Station:
        settings.setdefault("mock", True)
        clock = None if real_clock else FakeClock()
        driver = GPIODriver(
            GPIOSettings.model_validate(settings),
            pin_factory=factory,
            clock=clock or time.monotonic,
        )
        station = Station(driver, factory, clock)
        stations.append(station)
        driver.start(station.emitted)
        station.wait(QUIET)  # the check at start: no button is down
        return station

    yield start
    for station in stations:
        station.driver.stop()


# Presses ------------------------------------------------------------------


def test_a_press_sends_one_call_with_its_device_and_a_unique_id(
    start: Callable[..., Station],
) -> None:
    station = start(buttons=[CALL_BUTTON])
    before = time.time()

    station.press(17)
    station.press(17)

    first, second = station.emitted.events
    assert (first.type, first.device, first.fields) == ("call", "call-301", {})
    assert second.type == "call"
    assert first.id != second.id
    assert first.id.startswith("call-301-")
    assert before <= first.ts <= time.time()


def test_a_thousand_bounced_presses_send_a_thousand_calls(
    start: Callable[..., Station],
) -> None:
    station = start(buttons=[CALL_BUTTON])
    pin = station.pin(17)
    clock = station.clock
    assert clock is not None
    rng = random.Random(301)
    bounces_made = 0

    for _ in range(1000):
        # Up to five bounces each way, edges 0.1 to 4 ms apart; the button
        # stays down 30 to 500 ms and up 30 to 300 ms, as fingers do.
        bounces = rng.randint(0, 5)
        for drive in (pin.drive_low, pin.drive_high) * bounces:
            drive()
            clock.advance(rng.uniform(0.0001, 0.004))
        pin.drive_low()
        station.wait(rng.uniform(0.03, 0.5))

        for drive in (pin.drive_high, pin.drive_low) * bounces:
            drive()
            clock.advance(rng.uniform(0.0001, 0.004))
        pin.drive_high()
        station.wait(rng.uniform(0.03, 0.3))
        bounces_made += 4 * bounces

    events = station.emitted.events
    assert len(events) == 1000
    assert {event.type for event in events} == {"call"}
    assert len({event.id for event in events}) == 1000
    health = station.driver.health()
    assert health["devices"]["call-301"]["presses"] == 1000
    assert health["bounces_suppressed"] == bounces_made


def test_two_real_presses_100_ms_apart_send_two_calls(
    start: Callable[..., Station],
) -> None:
    station = start(buttons=[CALL_BUTTON], real_clock=True)
    started = time.monotonic()

    for _ in range(2):
        station.close_contacts(17, bounces=4)
        time.sleep(0.04)
        station.open_contacts(17, bounces=4)
        time.sleep(max(0.0, started + 0.1 - time.monotonic()))
        started += 0.1

    assert station.emitted.wait_for(2)[1].type == "call"
    time.sleep(QUIET)
    assert len(station.emitted.events) == 2


def test_a_glitch_shorter_than_the_bounce_time_is_not_a_press(
    start: Callable[..., Station],
) -> None:
    station = start(buttons=[CALL_BUTTON])

    station.close_contacts(17)
    station.wait(0.005)
    station.open_contacts(17)
    station.wait(QUIET)

    assert station.emitted.events == []
    assert station.driver.health()["bounces_suppressed"] == 2


# Holds --------------------------------------------------------------------


def test_a_long_press_sends_the_press_then_the_hold(
    start: Callable[..., Station],
) -> None:
    button = CALL_BUTTON | {"hold": "emergency", "hold_time": "100ms"}
    station = start(buttons=[button], real_clock=True)

    station.close_contacts(17, bounces=3)
    assert station.emitted.wait_for(1)[0].type == "call"
    held = station.emitted.wait_for(2)[1]
    time.sleep(0.15)  # held on: the hold is sent once, not repeated
    station.open_contacts(17, bounces=3)
    time.sleep(QUIET)

    assert station.emitted.types == ["call", "emergency"]
    assert held.device == "call-301"
    assert station.driver.health()["devices"]["call-301"]["holds"] == 1


def test_a_cancel_button_needs_a_hold(start: Callable[..., Station]) -> None:
    cancel = {"pin": 27, "device": "call-301", "hold": "cancel"}
    station = start(
        buttons=[cancel | {"hold_time": "100ms", "bounce_time": "10ms"}],
        real_clock=True,
    )

    station.close_contacts(27, bounces=2)
    time.sleep(0.04)
    station.open_contacts(27, bounces=2)
    time.sleep(0.15)
    assert station.emitted.events == []

    station.close_contacts(27, bounces=2)
    assert station.emitted.wait_for(1)[0].type == "cancel"
    station.open_contacts(27)
    assert station.driver.health()["devices"]["call-301"]["presses"] == 2


# Start --------------------------------------------------------------------


def test_a_button_held_when_the_gateway_starts_raises_its_call(
    factory: MockFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    factory.pin(17, pin_class=PressedPin)
    clock = FakeClock()
    emitted = Recorder()
    settings = GPIOSettings.model_validate({"buttons": [CALL_BUTTON], "mock": True})
    driver = GPIODriver(settings, pin_factory=factory, clock=clock)

    driver.start(emitted)
    try:
        clock.advance(QUIET)
        driver.settle()
        assert emitted.types == ["call"]

        factory.pin(17).drive_high()  # the finger lifts: no event
        clock.advance(QUIET)
        driver.settle()
    finally:
        driver.stop()

    assert emitted.types == ["call"]
    assert driver.health()["pressed_at_start"] == 1
    assert "pin 17 (call-301) was already pressed at start" in caplog.text


# Feedback terminals -------------------------------------------------------


def test_a_feedback_terminal_sends_the_score_of_each_smiley(
    start: Callable[..., Station],
) -> None:
    station = start(buttons=SMILEYS)

    for pin in (19, 5, 13, 6, 19):
        station.press(pin)

    events = station.emitted.events
    assert {(event.type, event.device) for event in events} == {
        ("feedback", "smiley-2f")
    }
    assert [event.fields for event in events] == [
        {"score": "very_happy"},
        {"score": "very_unhappy"},
        {"score": "happy"},
        {"score": "unhappy"},
        {"score": "very_happy"},
    ]
    health = station.driver.health()
    assert health["buttons"] == [5, 6, 13, 19]
    assert health["devices"]["smiley-2f"]["presses"] == 5
    assert health["devices"]["smiley-2f"]["last_press"] <= time.time()


# Dome lights --------------------------------------------------------------


def alert(state: str, alert_id: str = "a1", device: str = "call-301") -> dict[str, Any]:
    return {"id": alert_id, "device": device, "state": state, "level": 0}


def test_the_dome_light_follows_the_alert(start: Callable[..., Station]) -> None:
    station = start(buttons=[CALL_BUTTON], lights=[DOME_LIGHT])
    light = station.pin(18)
    assert light.state is False

    station.driver.show_alert(alert("open"))
    assert light.state is True
    station.driver.show_alert(alert("acknowledged"))
    assert light.state is True

    light.clear_states()
    station.driver.show_alert(alert("escalated"))
    time.sleep(0.15)  # 20 ms on, 20 ms off: several flashes
    assert len(light.states) >= 5
    light.assert_states([True, False, True, False, True])

    station.driver.show_alert(alert("resolved"))
    flashes = len(light.states)
    time.sleep(0.05)
    assert light.state is False
    assert len(light.states) == flashes  # the blink thread has stopped


def test_the_strongest_alert_of_a_device_sets_its_light(
    start: Callable[..., Station],
) -> None:
    station = start(lights=[DOME_LIGHT | {"active_high": False}])
    show = station.driver.show_alert
    light = station.pin(18)

    def shown() -> str:
        return station.driver.health()["lights_shown"]["call-301"]

    assert (shown(), light.state) == ("off", True)  # active low: high is off
    show(alert("escalated", "a1"))
    show(alert("open", "a2"))
    assert shown() == "blink"
    show(alert("resolved", "a2"))
    assert shown() == "blink"
    show(alert("acknowledged", "a1"))
    assert (shown(), light.state) == ("on", False)
    show(alert("escalated", "a9", device="call-999"))  # another device: no light
    show(alert("resolved", "a1"))
    assert (shown(), light.state) == ("off", True)


def test_lights_show_alerts_that_arrived_before_start(factory: MockFactory) -> None:
    settings = GPIOSettings.model_validate({"lights": [DOME_LIGHT], "mock": True})
    driver = GPIODriver(settings, pin_factory=factory)
    driver.show_alert(alert("open"))

    driver.start(Recorder())
    try:
        assert factory.pin(18).state is True
    finally:
        driver.stop()


# Stop ---------------------------------------------------------------------


def test_stop_turns_lights_off_and_releases_every_pin(
    start: Callable[..., Station], factory: MockFactory
) -> None:
    station = start(buttons=[CALL_BUTTON, *SMILEYS], lights=[DOME_LIGHT])
    station.driver.show_alert(alert("escalated"))

    station.driver.stop()
    station.driver.stop()

    assert factory.pin(18).state is False
    assert station.driver.health()["running"] is False
    for number in (17, 18, 5, 6, 13, 19):
        Button(number, pin_factory=factory).close()  # free again
    station.pin(17).drive_low()
    station.wait(QUIET)
    assert station.emitted.events == []


def test_a_pin_that_cannot_be_opened_is_named_and_nothing_stays_open(
    factory: MockFactory,
) -> None:
    settings = GPIOSettings.model_validate(
        {"buttons": [SMILEYS[0], CALL_BUTTON], "lights": [DOME_LIGHT], "mock": True}
    )
    taken = LED(17, pin_factory=factory)
    driver = GPIODriver(settings, pin_factory=factory)

    with pytest.raises(GPIOSetupError, match=r"GPIO pin 17 \(call-301\)") as caught:
        driver.start(Recorder())
    taken.close()

    assert (caught.value.pin, caught.value.device) == (17, "call-301")
    assert driver.health()["running"] is False
    Button(5, pin_factory=factory).close()  # released after the failure


def test_a_failing_emit_is_counted_and_the_next_press_still_goes_out(
    start: Callable[..., Station],
) -> None:
    station = start(buttons=[CALL_BUTTON])
    station.driver.stop()
    calls: list[Event] = []

    def emit(event: Event) -> None:
        calls.append(event)
        if len(calls) == 1:
            raise RuntimeError("queue closed")

    station.driver.start(emit)
    station.wait(QUIET)
    station.press(17)
    station.press(17)

    assert len(calls) == 2
    health = station.driver.health()
    assert health["errors"] == 1
    assert (
        "pin 17 (call-301) sending call: RuntimeError('queue closed')"
        in (health["last_error"])
    )


# Pin factories ------------------------------------------------------------


def mock_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.levelno == logging.WARNING
        and record.getMessage().startswith(MOCK_FACTORY_WARNING)
    ]


def test_no_real_pin_factory_warns_once_and_keeps_running(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(Device, "pin_factory", None)
    monkeypatch.setenv("GPIOZERO_PIN_FACTORY", "no-such-factory")
    settings = GPIOSettings.model_validate({"buttons": [CALL_BUTTON]})
    driver = GPIODriver(settings)

    driver.start(Recorder())
    driver.stop()
    driver.start(Recorder())
    try:
        health = driver.health()
    finally:
        driver.stop()

    (warning,) = mock_warnings(caplog)
    assert "no real pin factory could be loaded" in warning
    assert (health["running"], health["pin_factory"]) == (True, "MockFactory")


def test_gpiozeros_default_mock_factory_is_warned_about(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(Device, "pin_factory", None)
    monkeypatch.setenv("GPIOZERO_PIN_FACTORY", "mock")
    settings = GPIOSettings.model_validate({"buttons": [CALL_BUTTON]})
    emitted = Recorder()
    driver = GPIODriver(settings)

    driver.start(emitted)
    try:
        Device.pin_factory.pin(17).drive_low()
        emitted.wait_for(1)
        Device.pin_factory.pin(17).drive_high()
    finally:
        driver.stop()

    assert len(mock_warnings(caplog)) == 1


@pytest.mark.parametrize(("mock", "warned"), [(False, 1), (True, 0)])
def test_a_mock_factory_passed_in_is_warned_about_unless_asked_for(
    factory: MockFactory,
    caplog: pytest.LogCaptureFixture,
    mock: bool,
    warned: int,
) -> None:
    settings = GPIOSettings.model_validate({"buttons": [CALL_BUTTON], "mock": mock})
    driver = GPIODriver(settings, pin_factory=factory)

    driver.start(Recorder())
    driver.stop()

    assert len(mock_warnings(caplog)) == warned


# Settings -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"buttons": [CALL_BUTTON], "lights": [{"pin": 17, "device": "call-301"}]},
            r"pin 17 is used twice: by buttons\[0\] \(call-301\) and by lights\[0\]",
        ),
        (
            {"buttons": [CALL_BUTTON | {"bounce_time": "0ms"}]},
            r"pin 17: 'bounce_time' must be longer than 0s, got 0s",
        ),
        (
            {"buttons": [CALL_BUTTON | {"hold": "emergency", "hold_time": 0}]},
            r"pin 17: 'hold_time' must be longer than 0s",
        ),
        (
            {"buttons": [CALL_BUTTON | {"hold": "emergency", "hold_time": "10ms"}]},
            r"pin 17: 'hold_time' \(0.01s\) must be longer than 'bounce_time'",
        ),
        (
            {"buttons": [CALL_BUTTON | {"hold_time": "2s"}]},
            r"pin 17: 'hold_time' is set but 'hold' is not",
        ),
        (
            {"buttons": [{"pin": 17, "device": "call-301"}]},
            r"pin 17 \(call-301\) has neither 'press' nor 'hold'",
        ),
        (
            {"buttons": [CALL_BUTTON | {"hold": "cancel"}]},
            r"pin 17: a long press would cancel the call it has just raised",
        ),
        (
            {"buttons": [CALL_BUTTON | {"fields": {"device": "x", "ts": 1}}]},
            r"pin 17: 'fields' cannot set device, ts",
        ),
        (
            {"buttons": [CALL_BUTTON | {"pin": 40}]},
            r"pin 40 is not a GPIO of the Pi header",
        ),
        (
            {"lights": [DOME_LIGHT | {"blink_off": -1}]},
            r"lights\.0\.blink_off\n.*a duration cannot be negative",
        ),
        (
            {"lights": [DOME_LIGHT | {"blink_on": 0}]},
            r"pin 18: 'blink_on' must be longer than 0s",
        ),
        (
            {"buttons": [CALL_BUTTON | {"hodl": "cancel"}]},
            r"buttons\.0\.hodl\n\s+Extra inputs are not permitted",
        ),
    ],
)
def test_bad_settings_are_refused_naming_the_pin(
    settings: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        GPIOSettings.model_validate(settings)


def test_the_wiring_example_in_the_firmware_readme_is_valid() -> None:
    readme = Path(__file__).parents[1] / "firmware-config" / "README.md"
    block = re.search(r"```yaml\n(gpio:\n.*?)```", readme.read_text(), re.DOTALL)
    assert block is not None, "no ```yaml block starting with gpio: in the README"

    settings = GPIOSettings.model_validate(yaml.safe_load(block.group(1))["gpio"])

    assert settings.buttons[0].bounce_time == 0.02
    assert settings.lights
