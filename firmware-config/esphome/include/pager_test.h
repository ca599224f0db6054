// A technician's test page on the pager (README, "Device tests").
//
// The devices page sends {"id", "test": true, "reason": "test", "alert":
// null, "target", "text", "at"} to the person's pager topic. The pager gives
// one short pulse and shows the text for kShowMs, unless an alert waits for
// an acknowledgement: a test never hides a call. It is never kept as an
// alert, so there is nothing to acknowledge or resolve: a press of either
// button while it is shown only puts it away.
//
// Plain C++17 without ESPHome headers, so that the tests build and run it on
// the host (tests/test_firmware_config.py).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace pager_test {

// Long enough to read three lines at arm's length, short enough that the
// pager is back to its alerts before the technician has walked away.
constexpr uint32_t kShowMs = 10000;

class TestPage {
 public:
  // A test page arrived at now_ms.
  void offer(const std::string &text, uint32_t now_ms) {
    text_ = text.empty() ? std::string("TEST page") : text;
    at_ms_ = now_ms;
  }

  // Whether it is on the display: for kShowMs, while every alert the pager
  // holds is acknowledged.
  bool shown(const std::vector<std::string> &alert_states, uint32_t now_ms) const {
    if (text_.empty() || now_ms - at_ms_ >= kShowMs)
      return false;
    for (const auto &state : alert_states)
      if (state != "acknowledged")
        return false;
    return true;
  }

  // A button press: true if it put the test page away (and must do nothing
  // else), false if no test page was shown.
  bool take_press(const std::vector<std::string> &alert_states, uint32_t now_ms) {
    if (!shown(alert_states, now_ms))
      return false;
    text_.clear();
    return true;
  }

  const std::string &text() const { return text_; }

 private:
  std::string text_;
  uint32_t at_ms_ = 0;
};

// The pager's one test page; a function's static, like pager_poll::prompt().
inline TestPage &page() {
  static TestPage it;
  return it;
}

}  // namespace pager_test
