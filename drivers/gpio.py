"""Buttons and dome lights wired straight to the Raspberry Pi's GPIO header.

Call, cancel, guest feedback and mood buttons become engine events; each call
station's dome light shows the state of its alerts (on while open or
acknowledged, flashing when escalated, off once resolved).

Wiring: a button sits between its GPIO pin (BCM number: GPIO17 is physical pin
11) and ground. The Pi's internal pull-up holds the pin high until a finger
pulls it low, so no resistor is needed. A light's pin drives a transistor or a
relay module, never the lamp itself: a pin gives 3.3 V and a few milliamps.
``firmware-config/README.md`` has the wiring table.

Debounce. gpiozero's own ``bounce_time`` is not used: its meaning depends on
the pin factory. RPi.GPIO and the native factory ignore edges for a while after
one, which can swallow a release so that the next real press looks like no
change and is lost; lgpio filters differently; the mock factory ignores it, so
tests could not show it works. Here, on every factory, each edge only restarts
a quiet timer; once a pin's contacts have been quiet for ``bounce_time`` its
*level* is read and compared with the last confirmed state::

    contacts   ‾‾‾‾|_|‾|_|‾|__________________|‾|_|‾|‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾
    edges          ^ ^ ^ ^ ^                  ^ ^ ^ ^
    quiet timer    restarted at each edge -> [20 ms]   restarted ... [20 ms]
    confirmed  ‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾|_______________________________|‾‾‾‾
                                   press sent                   released

A bounce train therefore yields one transition, however many edges it has,
and an edge lost within a train cannot lose a press, because the level is
read, not inferred from edges. A press, or a gap between presses, shorter
than ``bounce_time`` is a glitch, not a finger, and is ignored.

Hold. The ``press`` event is sent the moment a press is confirmed and the
``hold`` event, if configured, once the button has stayed down for
``hold_time`` (gpiozero's hold thread times it from the last edge of the
press): in addition to the press, never instead of it. Waiting to see
whether a press becomes a hold would delay every call, and would turn a
patient who keeps the button down into a hold. A button with only ``hold``
(a cancel button that needs a deliberate two-second press) sends nothing on
a short press. A button already down when the driver starts counts as a press
(a stuck or held call button raises its call) but never as a hold::

    released --(quiet, low)--> pressed --(hold_time)--> held
       ^                          |                       |
       +-------(quiet, high)------+-----------------------+
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from typing import Annotated, Any

from gpiozero import LED, Button, Device
from gpiozero.exc import GPIOZeroError
from gpiozero.pins import Factory
from gpiozero.pins.mock import MockFactory
from pydantic import AfterValidator, Field, model_validator

from drivers.base import Emit, make_event
from rules.dome import BLINK, OFF, ON, light_for, strongest
from rules.events import CALL, CANCEL
from rules.schema import Duration, StrictModel

log = logging.getLogger(__name__)

MOCK_FACTORY_WARNING = "GPIO mock pin factory in use: no physical buttons will be read"
"""Logged once when the driver runs on a mock factory nobody asked for."""

DEFAULT_BOUNCE_TIME = 0.02
"""Most switches settle within a few milliseconds (Ganssle, "A Guide to
Debouncing", http://www.ganssle.com/debouncing.htm); 20 ms also covers worn
contacts and is still well under the shortest press a finger makes."""

DEFAULT_HOLD_TIME = 2.0
"""Long enough that nobody brushing a cancel button sends it by accident."""

DEFAULT_BLINK = 0.5
"""An escalated dome light flashes once a second: seen down a corridor, not a
strobe."""

FIRST_PIN, LAST_PIN = 2, 27
"""BCM numbers of the header's GPIOs; 0 and 1 belong to the HAT EEPROM."""

_RESERVED_FIELDS = frozenset({"id", "type", "device", "ts", "kind", "clock"})
"""Set by the event itself or taken by ``make_event``'s own parameters."""

_TEST = "(test)"
"""Stands for a technician's test among a light's alerts, so a test never
puts out a light that a real alert keeps on."""


# Settings -----------------------------------------------------------------


def _header_pin(value: int) -> int:
    if not FIRST_PIN <= value <= LAST_PIN:
        raise ValueError(
            f"pin {value} is not a GPIO of the Pi header; give its BCM number, "
            f"{FIRST_PIN} to {LAST_PIN} (GPIO17 is physical pin 11)"
        )
    return value


def _positive(pin: int, name: str, seconds: float) -> None:
    if seconds <= 0:
        raise ValueError(
            f"pin {pin}: {name!r} must be longer than 0s, got {seconds:g}s"
        )


GPIOPin = Annotated[int, AfterValidator(_header_pin)]
DeviceId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
EventType = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$")]


class ButtonPin(StrictModel):
    """One button between a GPIO pin and ground."""

    pin: GPIOPin
    """BCM number, e.g. 17 for GPIO17 (physical pin 11)."""

    device: DeviceId
    """The device of the site file whose events this button sends."""

    press: EventType | None = None
    """Event type sent as soon as a press is confirmed, e.g. ``call``."""

    hold: EventType | None = None
    """Event type sent once the button has stayed down for ``hold_time``, in
    addition to ``press``; e.g. ``cancel`` on a cancel button."""

    hold_time: Duration = DEFAULT_HOLD_TIME
    pull_up: bool = True
    """True: button to ground, internal pull-up. False: button to 3.3 V."""

    bounce_time: Duration = DEFAULT_BOUNCE_TIME
    """How long the contacts must be quiet before a level counts."""

    fields: dict[str, str | int | float | bool] = Field(default_factory=dict)
    """Sent with every event, e.g. ``{score: very_unhappy}`` on a smiley."""

    @model_validator(mode="after")
    def _sends_something(self) -> ButtonPin:
        if self.press is None and self.hold is None:
            raise ValueError(
                f"pin {self.pin} ({self.device}) has neither 'press' nor 'hold', "
                "so it would never send anything"
            )
        return self

    @model_validator(mode="after")
    def _timings(self) -> ButtonPin:
        _positive(self.pin, "bounce_time", self.bounce_time)
        _positive(self.pin, "hold_time", self.hold_time)
        if self.hold is None and "hold_time" in self.model_fields_set:
            raise ValueError(
                f"pin {self.pin}: 'hold_time' is set but 'hold' is not, so a "
                "long press would send nothing; add 'hold: <event type>'"
            )
        if self.hold is not None and self.hold_time <= self.bounce_time:
            raise ValueError(
                f"pin {self.pin}: 'hold_time' ({self.hold_time:g}s) must be "
                f"longer than 'bounce_time' ({self.bounce_time:g}s)"
            )
        return self

    @model_validator(mode="after")
    def _hold_keeps_the_call(self) -> ButtonPin:
        # The hold comes in addition to the press, so this pin would raise a
        # call and cancel it again whenever a patient keeps it down.
        if self.press == CALL and self.hold == CANCEL:
            raise ValueError(
                f"pin {self.pin}: a long press would cancel the call it has "
                "just raised; wire cancel to its own pin with 'hold: cancel'"
            )
        return self

    @model_validator(mode="after")
    def _own_fields_only(self) -> ButtonPin:
        taken = sorted(_RESERVED_FIELDS & self.fields.keys())
        if taken:
            raise ValueError(
                f"pin {self.pin}: 'fields' cannot set {', '.join(taken)}; "
                "the event sets those itself"
            )
        return self


class LightPin(StrictModel):
    """A station's dome light or LED, driven through a transistor or relay."""

    pin: GPIOPin
    device: DeviceId
    """The device whose alerts the light shows."""

    active_high: bool = True
    """False for relay boards that switch on when the pin is low."""

    blink_on: Duration = DEFAULT_BLINK
    blink_off: Duration = DEFAULT_BLINK

    @model_validator(mode="after")
    def _timings(self) -> LightPin:
        _positive(self.pin, "blink_on", self.blink_on)
        _positive(self.pin, "blink_off", self.blink_off)
        return self


class GPIOSettings(StrictModel):
    """The Pi's own GPIO: buttons that send events, lights that show alerts."""

    buttons: tuple[ButtonPin, ...] = ()
    lights: tuple[LightPin, ...] = ()
    mock: bool = False
    """Run on gpiozero's MockFactory on purpose (a demo, a bench without a
    Pi). Otherwise a mock factory is a degraded mode and is warned about."""

    @model_validator(mode="after")
    def _each_pin_once(self) -> GPIOSettings:
        owners: dict[int, str] = {}
        for pin, owner in self._owners():
            if pin in owners:
                raise ValueError(
                    f"pin {pin} is used twice: by {owners[pin]} and by {owner}"
                )
            owners[pin] = owner
        return self

    def _owners(self) -> Iterator[tuple[int, str]]:
        for index, button in enumerate(self.buttons):
            yield button.pin, f"buttons[{index}] ({button.device})"
        for index, light in enumerate(self.lights):
            yield light.pin, f"lights[{index}] ({light.device})"


# Errors -------------------------------------------------------------------


class GPIOSetupError(RuntimeError):
    """A configured pin could not be opened (in use, not on this board, ...)."""

    def __init__(self, pin: int, device: str, reason: str) -> None:
        self.pin = pin
        self.device = device
        self.reason = reason
        super().__init__(f"GPIO pin {pin} ({device}) cannot be opened: {reason}")


# Driver -------------------------------------------------------------------


@dataclass(eq=False)
class _Button:
    """One button's gpiozero device and its debounced state."""

    spec: ButtonPin
    device: Button
    pressed: bool = False
    """The confirmed state, after debouncing."""

    held: bool = False
    """The hold event of the current press has been sent."""

    settle_at: float | None = None
    """When the contacts will have been quiet long enough to read the level."""

    edges: int = 0
    """Edges seen since the level was last read."""

    starting: bool = True
    """No edge since start: a press read now was already down at start."""


@dataclass
class _Counts:
    """Per device, for ``health()``."""

    presses: int = 0
    holds: int = 0
    bounces: int = 0
    last_press: float | None = None


class GPIODriver:
    """Buttons and lights on the Pi's GPIO header, through gpiozero.

    Args:
        settings: the pins, validated.
        pin_factory: gpiozero's pin factory; ``None`` takes gpiozero's
            default, or a MockFactory (with a warning) when there is none.
        clock: monotonic seconds for the quiet timers; a test passes its own
            and calls :meth:`settle` after moving it.
    """

    name = "gpio"

    def __init__(
        self,
        settings: GPIOSettings,
        pin_factory: Factory | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._factory = pin_factory
        self._clock = clock
        self._mock_warned = False

        # Buttons, counters and the debounce thread; gpiozero's threads,
        # the debounce thread and the caller all take this lock.
        self._lock = threading.Condition()
        self._emit: Emit | None = None
        self._buttons: list[_Button] = []
        self._worker: threading.Thread | None = None
        self._stopping = False
        self._counts = {spec.device: _Counts() for spec in settings.buttons}
        self._bounces = 0
        self._pressed_at_start = 0

        # Errors come from every thread and every lock; this one is taken last.
        self._errors_lock = threading.Lock()
        self._errors = 0
        self._last_error: str | None = None

        # Lights have their own lock: starting or stopping a blink thread
        # must not hold up a button edge.
        self._lights_lock = threading.Lock()
        self._light_devices = frozenset(spec.device for spec in settings.lights)
        self._leds: list[tuple[LightPin, LED]] = []
        # Per device with a light: alert id -> the light that alert asks for.
        self._alerts: dict[str, dict[str, str]] = {}
        self._shown: dict[str, str] = {}

    # Life cycle -----------------------------------------------------------

    def start(self, emit: Emit) -> None:
        """Open every pin and start reading; return at once.

        Raises:
            GPIOSetupError: a pin could not be opened; none is left open.
        """
        if self._worker is not None:
            raise RuntimeError("the GPIO driver is already running")
        factory = self._pin_factory()
        buttons, leds = self._open_pins(factory)

        with self._lock:
            self._emit = emit
            self._buttons = buttons
            self._stopping = False
            now = self._clock()
            for button in buttons:
                # Read every button once it could have settled: one already
                # down at start raises its call like any other press.
                button.settle_at = now + button.spec.bounce_time
        self._listen(buttons)
        self._worker = threading.Thread(
            target=self._run, name="gpio-debounce", daemon=True
        )
        self._worker.start()

        with self._lights_lock:
            self._leds = leds
            for device in {spec.device for spec, _ in leds}:
                self._show(device)
        log.info(
            "GPIO started: %d buttons, %d lights on %s",
            len(buttons),
            len(leds),
            type(factory).__name__,
        )

    def stop(self) -> None:
        """Stop reading, turn the lights off and release every pin; safe twice.

        A button with a hold that is down at this moment delays this by up to
        its hold time: gpiozero's hold thread must time out before it ends.
        """
        with self._lock:
            worker, self._worker = self._worker, None
            buttons, self._buttons = self._buttons, []
            self._stopping = True
            self._lock.notify()
        if worker is None:
            return
        worker.join()

        # Outside our lock: close() joins gpiozero's hold thread, which may
        # be waiting for that lock in _on_held.
        for button in buttons:
            self._close(button.spec, button.device)
        with self._lights_lock:
            leds, self._leds = self._leds, []
            self._shown.clear()
        for spec, led in leds:
            self._close(spec, led)
        log.info("GPIO stopped")

    def _pin_factory(self) -> Factory:
        """The factory to open pins on; warn once if it is a mock nobody asked for."""
        if self._factory is not None:
            why = "the driver was given one"
        elif self._settings.mock:
            self._factory, why = MockFactory(), "the settings ask for one"
        else:
            self._factory, why = _default_factory()

        mock = isinstance(self._factory, MockFactory)
        if mock and not self._settings.mock and not self._mock_warned:
            self._mock_warned = True
            log.warning("%s (%s)", MOCK_FACTORY_WARNING, why)
        return self._factory

    def _open_pins(
        self, factory: Factory
    ) -> tuple[list[_Button], list[tuple[LightPin, LED]]]:
        buttons: list[_Button] = []
        leds: list[tuple[LightPin, LED]] = []
        try:
            for spec in self._settings.buttons:
                button = _open(spec, partial(_button, spec, factory))
                buttons.append(_Button(spec, button))
            for light in self._settings.lights:
                leds.append((light, _open(light, partial(_led, light, factory))))
        except GPIOSetupError:
            # Release what was opened, so a corrected start finds it free.
            for opened in buttons:
                self._close(opened.spec, opened.device)
            for light, led in leds:
                self._close(light, led)
            raise
        return buttons, leds

    def _listen(self, buttons: list[_Button]) -> None:
        # gpiozero calls these on its own threads (the mock factory: on the
        # thread that drives the pin); each only notes the edge.
        for button in buttons:
            button.device.when_pressed = partial(self._on_edge, button)
            button.device.when_released = partial(self._on_edge, button)
            if button.spec.hold is not None:
                button.device.when_held = partial(self._on_held, button)

    def _close(self, spec: ButtonPin | LightPin, device: Any) -> None:
        with self._guard(spec, "closing"):
            if isinstance(device, LED):
                device.off()
            device.close()

    # Buttons --------------------------------------------------------------

    def settle(self) -> None:
        """Read every pin whose contacts have been quiet for its bounce time.

        The debounce thread does this when a timer falls due; a test that
        moves its own clock calls it afterwards.
        """
        with self._lock:
            self._settle_due(self._clock())

    def _on_edge(self, button: _Button) -> None:
        with self._lock:
            if self._stopping:
                return
            button.edges += 1
            button.starting = False  # this edge, not the start, explains a press
            button.settle_at = self._clock() + button.spec.bounce_time
            self._lock.notify()

    def _on_held(self, button: _Button) -> None:
        with self._lock, self._guard(button.spec, "hold"):
            if self._stopping:
                return
            # gpiozero times the hold from the last edge, which is later
            # than the press could be confirmed; confirm it now if due.
            self._settle_due(self._clock())
            if button.pressed and not button.held:
                self._held(button)

    def _run(self) -> None:
        with self._lock:
            while not self._stopping:
                now = self._clock()
                self._settle_due(now)
                self._lock.wait(self._until_next(now))

    def _until_next(self, now: float) -> float | None:
        due = [b.settle_at for b in self._buttons if b.settle_at is not None]
        return max(0.0, min(due) - now) if due else None

    def _settle_due(self, now: float) -> None:
        for button in self._buttons:
            if button.settle_at is not None and button.settle_at <= now:
                with self._guard(button.spec, "reading"):
                    self._settle(button)

    def _settle(self, button: _Button) -> None:
        edges, button.edges, button.settle_at = button.edges, 0, None
        starting, button.starting = button.starting, False
        level = bool(button.device.is_pressed)
        changed = level != button.pressed
        self._count_bounces(button, edges - 1 if changed else edges)

        if not changed:
            return
        button.pressed = level
        if level:
            self._pressed(button, starting)
        else:
            log.debug("pin %d (%s) released", button.spec.pin, button.spec.device)

    def _count_bounces(self, button: _Button, bounces: int) -> None:
        bounces = max(0, bounces)
        self._bounces += bounces
        self._counts[button.spec.device].bounces += bounces

    def _pressed(self, button: _Button, starting: bool) -> None:
        spec = button.spec
        button.held = False
        counts = self._counts[spec.device]
        counts.presses += 1
        counts.last_press = time.time()

        if starting:
            self._pressed_at_start += 1
            log.warning(
                "pin %d (%s) was already pressed at start: counting it as a press",
                spec.pin,
                spec.device,
            )
        if spec.press is not None:
            self._send(spec, spec.press)

    def _held(self, button: _Button) -> None:
        button.held = True
        self._counts[button.spec.device].holds += 1
        if button.spec.hold is not None:
            self._send(button.spec, button.spec.hold)

    def _send(self, spec: ButtonPin, kind: str) -> None:
        event = make_event(spec.device, kind, **spec.fields)
        log.debug("pin %d (%s): %s %s", spec.pin, spec.device, kind, event.id)
        if self._emit is not None:
            with self._guard(spec, f"sending {kind}"):
                self._emit(event)

    @contextmanager
    def _guard(self, spec: ButtonPin | LightPin, action: str) -> Iterator[None]:
        """Count and log a failure; gpiozero's threads and ours must live on."""
        try:
            yield
        except Exception as exc:
            log.exception("GPIO pin %d (%s): %s failed", spec.pin, spec.device, action)
            with self._errors_lock:
                self._errors += 1
                self._last_error = f"pin {spec.pin} ({spec.device}) {action}: {exc!r}"

    # Lights ---------------------------------------------------------------

    def show_alert(self, alert: Mapping[str, Any]) -> None:
        """Set the dome light of the alert's device from its alerts' states.

        ``alert`` is the retained alert JSON: its ``device``, ``id`` and
        ``state`` count. Of several alerts on one device the strongest wins:
        escalated (flashing) over open or acknowledged (on) over none (off).
        """
        device, alert_id, state = (alert.get(k) for k in ("device", "id", "state"))
        if device not in self._light_devices:
            return
        light = light_for(str(state))
        if light is None or alert_id is None:
            log.warning(
                "alert %r of %s: no id or unknown state %r; light unchanged",
                alert_id,
                device,
                state,
            )
            return

        with self._lights_lock:
            alerts = self._alerts.setdefault(device, {})
            if light == OFF:
                alerts.pop(str(alert_id), None)
            else:
                alerts[str(alert_id)] = light
            self._show(device)

    def lights(self) -> frozenset[str]:
        """Devices with a dome light on this driver's pins."""
        return self._light_devices

    def test_light(self, device: str, seconds: float) -> None:
        """Light the device's dome for ``seconds``, then show its alerts again.

        Raises:
            KeyError: no light on this driver's pins belongs to ``device``.
        """
        if device not in self._light_devices:
            raise KeyError(f"no GPIO light belongs to device {device!r}")
        with self._lights_lock:
            self._alerts.setdefault(device, {})[_TEST] = ON
            self._show(device)
        timer = threading.Timer(seconds, self._end_test, args=(device,))
        timer.daemon = True
        timer.start()

    def _end_test(self, device: str) -> None:
        with self._lights_lock:
            self._alerts.get(device, {}).pop(_TEST, None)
            self._show(device)

    def _show(self, device: str) -> None:
        alerts = self._alerts.get(device, {}).values()
        # Several alerts on one device: the strongest one sets the light.
        wanted = strongest(alerts)
        leds = [(spec, led) for spec, led in self._leds if spec.device == device]
        if not leds or self._shown.get(device) == wanted:
            return
        for spec, led in leds:
            with self._guard(spec, f"turning the light {wanted}"):
                _drive(led, spec, wanted)
        self._shown[device] = wanted
        log.info("dome light of %s: %s", device, wanted)

    # Health ---------------------------------------------------------------

    def device_ids(self) -> set[str]:
        """Every device on this driver's pins, reported offline if it fails."""
        specs = [*self._settings.buttons, *self._settings.lights]
        return {spec.device for spec in specs}

    def health(self) -> dict[str, Any]:
        """Pins, presses per device, bounces suppressed, errors."""
        with self._lock:
            report = {
                "running": self._worker is not None,
                "pin_factory": type(self._factory).__name__ if self._factory else None,
                "buttons": [spec.pin for spec in self._settings.buttons],
                "lights": [spec.pin for spec in self._settings.lights],
                "devices": {d: asdict(c) for d, c in self._counts.items()},
                "bounces_suppressed": self._bounces,
                "pressed_at_start": self._pressed_at_start,
            }
        with self._errors_lock:
            report["errors"] = self._errors
            report["last_error"] = self._last_error
        with self._lights_lock:
            report["lights_shown"] = dict(self._shown)
        return report


def _default_factory() -> tuple[Factory, str]:
    """gpiozero's own choice of pin factory, or a MockFactory if it has none."""
    # gpiozero reports each factory it could not load as a warning; they
    # are expected off a Pi, so they are logged, not raised.
    with warnings.catch_warnings(record=True) as fallbacks:
        warnings.simplefilter("always")
        try:
            Device.ensure_pin_factory()
        except (GPIOZeroError, ImportError, OSError) as exc:
            factory: Factory = MockFactory()
            why = f"no real pin factory could be loaded: {exc}"
        else:
            factory = Device.pin_factory
            why = "gpiozero's default pin factory is one"
    for fallback in fallbacks:
        log.debug("gpiozero: %s", fallback.message)
    return factory, why


def _open(spec: ButtonPin | LightPin, make: Callable[[], Any]) -> Any:
    try:
        return make()
    except Exception as exc:  # gpiozero, lgpio and the kernel each raise their own
        raise GPIOSetupError(spec.pin, spec.device, str(exc) or repr(exc)) from exc


def _button(spec: ButtonPin, factory: Factory) -> Button:
    # bounce_time=None: the driver debounces itself (see the module docstring).
    # Every Button runs a hold thread, and close() waits for it while the
    # button is down for up to hold_time; without a hold, make that nothing.
    return Button(
        spec.pin,
        pull_up=spec.pull_up,
        bounce_time=None,
        hold_time=spec.hold_time if spec.hold is not None else 0,
        pin_factory=factory,
    )


def _led(spec: LightPin, factory: Factory) -> LED:
    return LED(spec.pin, active_high=spec.active_high, pin_factory=factory)


def _drive(led: LED, spec: LightPin, light: str) -> None:
    if light == BLINK:
        led.blink(on_time=spec.blink_on, off_time=spec.blink_off)
    elif light == ON:
        led.on()
    else:
        led.off()
