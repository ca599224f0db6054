// A mood poll's question on a pager, and the wearer's choice of answer.
//
// The gateway pages a poll's question to the roles it asks, on
// facility/<site>/pagers/<role>, as {"id", "poll", "round", "question",
// "answers", "closes_at"} (README, "Mood polls"). The pager keeps the latest
// round it was asked until the wearer answers it or it closes; a newer
// question replaces an unanswered older one.
//
// Plain C++17 without ESPHome headers, so that the tests build and run it on
// the host (tests/test_firmware_config.py).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace pager_poll {

class PollPrompt {
 public:
  // A question paged to this pager. False for a copy of a round it holds
  // or has answered (QoS 1 repeats, one copy per role), or a malformed one.
  bool offer(const std::string &poll, const std::string &round, const std::string &question,
             std::vector<std::string> answers, uint32_t closes_at) {
    if (poll.empty() || round.empty() || answers.empty())
      return false;
    if (poll == this->poll_ && round == this->round_)
      return false;
    if (poll == this->answered_poll_ && round == this->answered_round_)
      return false;
    this->poll_ = poll;
    this->round_ = round;
    this->question_ = question;
    this->answers_ = std::move(answers);
    this->closes_at_ = closes_at;
    this->choice_ = 0;
    return true;
  }

  // Whether to ask the wearer now: a round is held and, when the clock is
  // set (now_ts > 0), it has not closed yet.
  bool open(uint32_t now_ts) const {
    if (this->poll_.empty())
      return false;
    return now_ts == 0 || this->closes_at_ == 0 || now_ts < this->closes_at_;
  }

  // Show the next answer, round the list.
  void next() {
    if (!this->answers_.empty())
      this->choice_ = (this->choice_ + 1) % this->answers_.size();
  }

  // The answer was sent: forget the round, and ignore copies of it.
  void answered() {
    this->answered_poll_ = std::move(this->poll_);
    this->answered_round_ = std::move(this->round_);
    this->poll_.clear();
    this->round_.clear();
    this->question_.clear();
    this->answers_.clear();
    this->choice_ = 0;
  }

  const std::string &poll() const { return this->poll_; }
  const std::string &question() const { return this->question_; }
  const std::string &chosen() const { return this->answers_[this->choice_]; }
  size_t choice() const { return this->choice_; }
  size_t answers() const { return this->answers_.size(); }

 private:
  std::string poll_, round_, question_;
  std::vector<std::string> answers_;
  size_t choice_ = 0;
  uint32_t closes_at_ = 0;
  std::string answered_poll_, answered_round_;
};

// Whether the poll takes the display: only while no alert waits for an
// acknowledgement, so a question never hides a call.
inline bool poll_first(const PollPrompt &prompt, const std::vector<std::string> &alert_states,
                       uint32_t now_ts) {
  if (!prompt.open(now_ts))
    return false;
  for (const auto &state : alert_states)
    if (state != "acknowledged")
      return false;
  return true;
}

// Text cut at spaces into at most max_lines lines of at most width characters.
inline std::vector<std::string> wrap(const std::string &text, size_t width, size_t max_lines) {
  std::vector<std::string> lines;
  size_t start = 0;
  while (lines.size() < max_lines && start < text.size()) {
    size_t end = std::min(text.size(), start + width);
    if (end < text.size()) {
      size_t space = text.rfind(' ', end);
      if (space != std::string::npos && space > start)
        end = space;
    }
    lines.push_back(text.substr(start, end - start));
    start = end;
    while (start < text.size() && text[start] == ' ')
      start++;
  }
  return lines;
}

// The pager's one prompt. A function's static rather than an ESPHome
// `globals:` entry, because ESPHome declares those before it includes this
// file.
inline PollPrompt &prompt() {
  static PollPrompt prompt;
  return prompt;
}

// Unix seconds from an ESPHome time, or 0 while the clock is unset.
template<typename Time> uint32_t unix_now(const Time &time) {
  return time.is_valid() ? (uint32_t) time.timestamp : 0;
}

}  // namespace pager_poll
