// What a call station's dome light shows, from what the gateway says.
//
// The gateway publishes the state of the station's calls, retained, on
// facility/<site>/devices/<id>/light: "on" while a call is open or
// acknowledged, "blink" once it has escalated, "off" when it is resolved
// (the same mapping as a dome on the Pi's pins, rules/dome.py). A reboot
// reads it back from the broker on subscribing. A technician's test
// (devices/<id>/test, {"test": "light", "seconds": 5}) lights the dome
// steadily for that long, then it shows the gateway's state again, including
// any change that came during the test:
//
//   gateway says   presses waiting   test running   the lamp
//   anything       any               yes            on, steady
//   blink          any               no             0.5 s on, 0.5 s off
//   on             any               no             on, steady
//   off            one or more       no             0.25 s flash every 2 s
//   off            none              no             off
//
// The flash says "pressed here, not yet sent": a press waiting in the RAM
// queue (include/press_queue.h) while Wi-Fi or the broker is down. Once the
// gateway has the call it answers "on".
//
// Plain C++17 without ESPHome headers, so that the tests build and run it on
// the host (tests/test_firmware_config.py).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>

namespace dome_light {

// An escalated call blinks once a second, like a dome on the Pi's pins
// (drivers/gpio.py DEFAULT_BLINK): seen down a corridor, not a strobe.
constexpr uint32_t kBlinkMs = 500;

// "Pressed, not yet sent": a short flash every two seconds, so that it
// cannot be mistaken for an escalated call.
constexpr uint32_t kPendingPeriodMs = 2000;
constexpr uint32_t kPendingFlashMs = 250;

// A test without a usable length lights the dome this long; no test lasts
// longer than kTestMaxMs, so a bad command cannot leave the dome lit.
constexpr double kTestSeconds = 5;
constexpr double kTestMaxSeconds = 60;

enum class State { OFF, ON, BLINK };

class Dome {
 public:
  // The gateway's word on devices/<id>/light at now_ms. An empty payload
  // (a cleared retained message) is off; an unknown word changes nothing
  // and returns false.
  bool set_state(const std::string &word, uint32_t now_ms) {
    State next;
    if (word == "on")
      next = State::ON;
    else if (word == "blink")
      next = State::BLINK;
    else if (word == "off" || word.empty())
      next = State::OFF;
    else
      return false;
    if (next != state_)
      since_ms_ = now_ms;  // a blink starts lit
    state_ = next;
    return true;
  }

  // A technician's test from now_ms for `seconds` (kTestSeconds if not a
  // positive number, at most kTestMaxSeconds).
  void test(uint32_t now_ms, double seconds) {
    if (!(seconds > 0))
      seconds = kTestSeconds;
    seconds = std::fmin(seconds, kTestMaxSeconds);
    test_from_ms_ = now_ms;
    test_ms_ = (uint32_t) (seconds * 1000);
  }

  // Whether the lamp is lit at now_ms, with `waiting` presses not yet sent.
  bool lit(uint32_t now_ms, size_t waiting) const {
    if (testing(now_ms))
      return true;
    if (state_ == State::BLINK)
      return (now_ms - since_ms_) % (2 * kBlinkMs) < kBlinkMs;
    if (state_ == State::ON)
      return true;
    return waiting > 0 && now_ms % kPendingPeriodMs < kPendingFlashMs;
  }

  bool testing(uint32_t now_ms) const {
    return test_ms_ > 0 && now_ms - test_from_ms_ < test_ms_;
  }

  State state() const { return state_; }

 private:
  State state_ = State::OFF;
  uint32_t since_ms_ = 0;
  uint32_t test_from_ms_ = 0;
  uint32_t test_ms_ = 0;
};

// The station's one dome. A function's static rather than an ESPHome
// `globals:` entry, because ESPHome declares those before it includes this
// file.
inline Dome &dome() {
  static Dome it;
  return it;
}

}  // namespace dome_light
