// The terminal progress line of `normkit train` and `compare`.
#include <sys/ioctl.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>

#include <fmt/format.h>

#include "cli.hpp"

namespace normkit::cli {

Progress::Progress(std::string label) : label_(std::move(label)) {}

bool Progress::enabled() { return ::isatty(STDERR_FILENO) == 1; }

int Progress::terminal_columns() {
  winsize size{};
  if (::ioctl(STDERR_FILENO, TIOCGWINSZ, &size) == 0 && size.ws_col > 0) return size.ws_col;
  if (const char* columns = std::getenv("COLUMNS")) {
    const int value = std::atoi(columns);
    if (value > 0) return value;
  }
  return 80;
}

// The line holds, in this order of importance: the label, the epoch, the step
// count, the loss, the accuracy, the throughput and a bar. It is at most
// columns - 1 characters wide (a character in the last column makes some
// terminals wrap): the bar shrinks first, then the throughput, the accuracy and
// the bar go, and whatever is still too long is cut.
std::string Progress::line(const std::string& label, int64_t epoch, int64_t epochs,
                           const train::StepProgress& p, int columns) {
  const auto width = static_cast<size_t>(std::max(columns - 1, 1));
  const std::string head = (label.empty() ? "" : label + "  ") + fmt::format("epoch {}/{}", epoch, epochs);
  const std::string steps = fmt::format("{}/{}", p.step, p.steps);
  const std::string loss = fmt::format("loss {:.4f}", p.loss);
  const std::string accuracy = fmt::format("acc {:.4f}", p.accuracy);
  const std::string speed = fmt::format("{:.0f}/s", p.samples_per_second);
  auto join = [&](bool with_accuracy, bool with_speed, size_t bar) {
    std::string text = head;
    if (bar > 0) {
      const auto filled = static_cast<size_t>(static_cast<double>(bar) * static_cast<double>(p.step) /
                                              static_cast<double>(std::max<int64_t>(p.steps, 1)));
      text += " [" + std::string(std::min(filled, bar), '#') + std::string(bar - std::min(filled, bar), '.') + "]";
    }
    text += " " + steps + "  " + loss;
    if (with_accuracy) text += "  " + accuracy;
    if (with_speed) text += "  " + speed;
    return text;
  };
  constexpr size_t kMinBar = 10, kMaxBar = 30;
  for (const auto& [with_accuracy, with_speed] : {std::pair{true, true}, {true, false}, {false, false}}) {
    const size_t rest = join(with_accuracy, with_speed, 0).size() + 3;  // " [" and "]"
    if (rest + kMinBar <= width) return join(with_accuracy, with_speed, std::min(kMaxBar, width - rest));
  }
  std::string text = join(false, false, 0);
  if (text.size() > width) text.resize(width);
  return text;
}

void Progress::update(int64_t epoch, int64_t epochs, const train::StepProgress& p) {
  const auto now = std::chrono::steady_clock::now();
  if (p.step != p.steps && shown_ && now - last_ < std::chrono::milliseconds(100)) return;
  last_ = now;
  shown_ = true;
  // The width is asked each time: the terminal may have been resized.
  fmt::print(stderr, "\r{}\033[K", line(label_, epoch, epochs, p, terminal_columns()));
  std::fflush(stderr);
}

void Progress::clear() {
  if (!shown_) return;
  fmt::print(stderr, "\r\033[K");
  std::fflush(stderr);
  shown_ = false;
}

}  // namespace normkit::cli
