// Presses a button device keeps in RAM until the broker has them.
//
// A button handler adds a press with its event id and time fixed at the
// press. While the MQTT link is up and the gateway says it listens, the
// device hands the oldest press not yet handed over to the MQTT client, one
// after another, so the gateway gets them in the order they were pressed.
//
// Why wait for the gateway: the broker keeps no sessions across a restart,
// so a restarted broker acknowledges a press and hands it to nobody until
// the gateway has reconnected and subscribed again. The gateway publishes
// its retained status `online` only after subscribing, and a restarted
// broker holds no status until then, so the device hands presses over only
// after it has seen `online` since its own (re)connect. `offline` (the
// gateway's will) and `trouble` (a gateway that cannot commit) hold the
// queue.
//
// ESPHome does not tell a lambda when the broker acknowledged a QoS 1
// publish, so a press handed over stays here until the link has stayed up,
// with the gateway `online`, for kConfirmMs after it. A link that drops
// sooner, or a gateway that stops saying `online`, may have lost it on the
// way: every press handed over is then handed over again, with the same id,
// and the gateway drops the copies it already has.
//
// Known limitation: the queue is in RAM only, so a power cut or reboot of
// the node loses the presses waiting in it.
//
// Plain C++17 without ESPHome headers, so that the tests build and run it on
// the host (tests/test_firmware_config.py).
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>

namespace press_queue {

// How long a press handed to the MQTT client is kept in case the link
// drops. Longer than the time ESPHome takes to notice a silent broker
// (15 s keepalive, then the client's 10 s network timeout).
constexpr uint32_t kConfirmMs = 30000;

struct Press {
  std::string id;           // the event id, fixed at the press
  std::string type;         // the event type: call, cancel, feedback
  std::string detail;       // the type's one field (a feedback score), or empty
  uint32_t pressed_ms = 0;  // millis() at the press
  uint32_t ts = 0;          // Unix seconds at the press; 0 until the clock is set
  uint32_t sent_ms = 0;     // millis() when handed to the MQTT client
  bool sent = false;
};

template<size_t N> class PressQueue {
  static_assert(N > 0, "a queue needs room for one press");

 public:
  // Keep a press. When full, the oldest gives way; it counts as dropped
  // unless it had already been handed over.
  void add(Press press) {
    if (count_ == N) {
      if (!slots_[head_].sent)
        dropped_++;
      pop_();
    }
    press.sent = false;
    slots_[(head_ + count_) % N] = std::move(press);
    count_++;
  }

  // The oldest press not yet handed to the MQTT client, or nullptr; always
  // nullptr while the gateway is not known to listen.
  Press *next() {
    if (!gateway_online_)
      return nullptr;
    for (size_t i = 0; i < count_; i++) {
      Press &press = at_(i);
      if (!press.sent)
        return &press;
    }
    return nullptr;
  }

  // The press next() gave was handed to the MQTT client at now_ms.
  void handed_over(uint32_t now_ms) {
    Press *press = next();
    if (press == nullptr)
      return;
    press->sent = true;
    press->sent_ms = now_ms;
  }

  // Forget presses handed over kConfirmMs ago or more on a link that has
  // stayed up since (connection_lost() would have taken them back).
  void confirm(uint32_t now_ms) {
    while (count_ > 0 && slots_[head_].sent && now_ms - slots_[head_].sent_ms >= kConfirmMs)
      pop_();
  }

  // The link dropped: what was handed over may not have reached the broker,
  // and a broker we reach again may have restarted without the gateway's
  // subscription. Hold until its retained `online` comes again.
  void connection_lost() {
    gateway_online_ = false;
    take_back_();
  }

  // The gateway's retained status topic said `word`. Only `online` lets
  // presses go; anything else (`offline`, `trouble`, an empty payload) holds
  // them, and takes back those not yet confirmed, to go again under the
  // same ids once the gateway is back.
  void gateway_status(const std::string &word) {
    gateway_online_ = word == "online";
    if (!gateway_online_)
      take_back_();
  }

  // Give presses made while the clock was unset their time, now it is set.
  void backdate(uint32_t now_ts, uint32_t now_ms) {
    for (size_t i = 0; i < count_; i++) {
      Press &press = at_(i);
      if (press.ts == 0)
        press.ts = now_ts - (now_ms - press.pressed_ms) / 1000;
    }
  }

  size_t size() const { return count_; }

  // Presses not yet handed to the MQTT client.
  size_t waiting() const {
    size_t n = 0;
    for (size_t i = 0; i < count_; i++)
      n += slots_[(head_ + i) % N].sent ? 0 : 1;
    return n;
  }

  // Presses lost because the queue was full, since the node started.
  uint32_t dropped() const { return dropped_; }

 private:
  Press &at_(size_t i) { return slots_[(head_ + i) % N]; }

  void take_back_() {
    for (size_t i = 0; i < count_; i++)
      at_(i).sent = false;
  }

  void pop_() {
    slots_[head_] = Press();
    head_ = (head_ + 1) % N;
    count_--;
  }

  std::array<Press, N> slots_{};
  size_t head_ = 0;
  size_t count_ = 0;
  uint32_t dropped_ = 0;
  bool gateway_online_ = false;
};

// Room for presses made while the link is down: a patient pressing every
// few seconds through a minute-long outage, or a guest terminal's lockout.
constexpr size_t kCapacity = 32;

// The device's one queue. A function's static rather than an ESPHome
// `globals:` entry, because ESPHome declares those before it includes this
// file.
inline PressQueue<kCapacity> &presses() {
  static PressQueue<kCapacity> queue;
  return queue;
}

}  // namespace press_queue
