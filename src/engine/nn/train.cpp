#include <signal.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <numeric>
#include <random>

#include "normkit/engine/train.hpp"
#include "support.hpp"

namespace normkit::train {

std::vector<int64_t> epoch_order(int64_t count, uint64_t seed, int64_t epoch) {
  std::vector<int64_t> order(static_cast<size_t>(count));
  std::iota(order.begin(), order.end(), 0);
  std::seed_seq seq{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32),
                    static_cast<uint32_t>(epoch), 0x6e6b7472u};
  std::mt19937_64 rng(seq);
  // Fisher-Yates with our own index draw: std::shuffle's use of the engine is
  // unspecified, so its order could change between standard libraries.
  for (int64_t i = count - 1; i > 0; --i) {
    const auto j = static_cast<int64_t>(rng() % static_cast<uint64_t>(i + 1));
    std::swap(order[i], order[j]);
  }
  return order;
}

void make_batch(const data::Dataset& set, const std::vector<int64_t>& order, int64_t first,
                int64_t size, nn::MemoryFormat format, nn::Tensor& batch,
                std::vector<int32_t>& labels) {
  const int64_t sample = set.sample_size();
  std::vector<int64_t> shape = {size};
  shape.insert(shape.end(), set.sample_shape.begin(), set.sample_shape.end());
  const bool image = shape.size() == 4;
  batch.reshape(shape, image ? format : nn::MemoryFormat::channels_first);
  labels.resize(static_cast<size_t>(size));
  const bool transpose = image && format == nn::MemoryFormat::channels_last && shape[1] > 1;
  const int64_t channels = image ? shape[1] : 1, pixels = image ? shape[2] * shape[3] : sample;
  // The samples lie scattered over the data set (a shuffled order): fetching
  // a few samples ahead keeps several of their cache misses in flight.
  constexpr int64_t kAhead = 4;
  const auto fetch = [&](int64_t i) {
    if (i >= size) return;
    const auto* bytes = reinterpret_cast<const char*>(set.features.data() + order[first + i] * sample);
    for (int64_t b = 0; b < sample * static_cast<int64_t>(sizeof(float)); b += 64)
      __builtin_prefetch(bytes + b);
  };
  for (int64_t i = 0; i < kAhead; ++i) fetch(i);
  for (int64_t i = 0; i < size; ++i) {
    fetch(i + kAhead);
    const int64_t index = order[first + i];
    const float* src = set.features.data() + index * sample;
    float* dst = batch.data.data() + i * sample;
    labels[i] = set.labels[index];
    if (!transpose) {
      std::copy(src, src + sample, dst);
      continue;
    }
    for (int64_t c = 0; c < channels; ++c)
      for (int64_t p = 0; p < pixels; ++p) dst[p * channels + c] = src[c * pixels + p];
  }
}

int64_t steps_per_epoch(int64_t count, int64_t batch_size) {
  int64_t steps = (count + batch_size - 1) / batch_size;
  if (count % batch_size == 1) --steps;  // a lone last sample cannot be batch-normalized
  return steps;
}


namespace {
// A lock-free atomic: the only kind a signal handler may touch.
std::atomic<int> stop_requested{0};
static_assert(std::atomic<int>::is_always_lock_free);

// Records the signal, and gives both signals back their default action (ending
// the process) for the next one. Only async-signal-safe calls.
extern "C" void record_stop_signal(int signal) {
  request_stop(signal);
  struct sigaction fallback {};
  fallback.sa_handler = SIG_DFL;
  sigemptyset(&fallback.sa_mask);
  ::sigaction(SIGINT, &fallback, nullptr);
  ::sigaction(SIGTERM, &fallback, nullptr);
}
}  // namespace

void install_stop_handlers() {
  struct sigaction action {};
  action.sa_handler = record_stop_signal;
  sigemptyset(&action.sa_mask);
  action.sa_flags = SA_RESTART;  // reads and writes in progress carry on
  for (const int signal : {SIGINT, SIGTERM})
    if (::sigaction(signal, &action, nullptr) != 0)
      engine::fail_runtime("cannot install the handler of signal ", signal);
}

void request_stop(int signal) noexcept { stop_requested.store(signal); }
int stop_signal() noexcept { return stop_requested.load(); }
void clear_stop() noexcept { stop_requested.store(0); }

EpochResult train_epoch(nn::Model& model, nn::Optimizer& optimizer, const data::Dataset& train,
                        int64_t batch_size, uint64_t seed, int64_t epoch,
                        const ProgressCallback& progress, const EpochPosition& begin) {
  if (batch_size < 2) engine::fail_invalid("batch size must be >= 2 for batch normalization, got ", batch_size);
  if (train.count() < 2) engine::fail_invalid("training needs at least 2 samples");
  const auto order = epoch_order(train.count(), seed, epoch);
  const int64_t steps = steps_per_epoch(train.count(), batch_size);
  if (begin.step < 0 || begin.step >= steps || begin.samples < 0 || begin.correct < 0 ||
      begin.correct > begin.samples)
    engine::fail_invalid("train_epoch: cannot continue at step ", begin.step, " of ", steps,
                         " (", begin.samples, " samples, ", begin.correct, " correct)");
  const auto parameters = model.parameters();
  nn::Tensor batch, dlogits;
  std::vector<int32_t> labels;
  EpochResult result;
  result.samples = begin.samples;
  double loss_sum = begin.loss_sum;
  int64_t correct = begin.correct;
  const auto start = std::chrono::steady_clock::now();
  auto seconds = [&] {
    return begin.seconds + std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  };
  for (int64_t step = begin.step; step < steps; ++step) {
    if (stop_signal() != 0) {
      result.interrupted = true;
      result.position = {step, loss_sum, correct, result.samples, seconds()};
      return result;
    }
    const int64_t first = step * batch_size;
    const int64_t size = std::min(batch_size, train.count() - first);
    make_batch(train, order, first, size, model.format(), batch, labels);
    model.set_step(seed, static_cast<uint64_t>(epoch * steps + step));
    const nn::Tensor& logits = model.forward(batch, nn::Mode::train);
    const nn::LossResult loss = nn::softmax_cross_entropy(logits, labels.data(), &dlogits);
    if (!std::isfinite(loss.loss))
      engine::fail_runtime("loss became ", loss.loss, " at epoch ", epoch + 1, ", step ", step + 1,
                           " of ", steps, "; training stopped");
    model.zero_grad();
    model.backward(dlogits);
    optimizer.step(parameters);
    loss_sum += loss.loss * static_cast<double>(size);
    correct += loss.correct;
    result.samples += size;
    if (progress) {
      progress({step + 1, steps, loss_sum / static_cast<double>(result.samples),
                static_cast<double>(correct) / static_cast<double>(result.samples),
                static_cast<double>(result.samples - begin.samples) /
                    std::max(seconds() - begin.seconds, 1e-9),
                loss.loss, loss.correct, size});
    }
  }
  result.seconds = seconds();
  result.loss = loss_sum / static_cast<double>(result.samples);
  result.accuracy = static_cast<double>(correct) / static_cast<double>(result.samples);
  return result;
}

Evaluation evaluate(nn::Model& model, const data::Dataset& set, int64_t batch_size) {
  if (set.count() < 1) engine::fail_invalid("evaluate: empty data set");
  if (batch_size < 1) engine::fail_invalid("evaluate: batch size must be >= 1");
  std::vector<int64_t> order(static_cast<size_t>(set.count()));
  std::iota(order.begin(), order.end(), 0);
  Scorer scorer;
  nn::Tensor batch;
  std::vector<int32_t> labels;
  for (int64_t first = 0; first < set.count(); first += batch_size) {
    const int64_t size = std::min(batch_size, set.count() - first);
    make_batch(set, order, first, size, model.format(), batch, labels);
    scorer.add(model.forward(batch, nn::Mode::eval), labels.data());
  }
  return scorer.result();
}

void Scorer::add(const nn::Tensor& logits, const int32_t* labels) {
  const int64_t size = logits.shape[0], classes = logits.shape[1];
  if (e_.confusion.empty()) {
    e_.classes = static_cast<int32_t>(classes);
    e_.confusion.assign(static_cast<size_t>(classes * classes), 0);
  }
  const nn::LossResult loss = nn::softmax_cross_entropy(logits, labels, nullptr);
  loss_sum_ += loss.loss * static_cast<double>(size);
  correct_ += loss.correct;
  count_ += size;
  for (int64_t i = 0; i < size; ++i) {
    const float* z = logits.data.data() + i * classes;
    const auto predicted = std::max_element(z, z + classes) - z;
    ++e_.confusion[static_cast<size_t>(labels[i] * classes + predicted)];
  }
}

Evaluation Scorer::result() const {
  Evaluation out = e_;
  out.loss = count_ ? loss_sum_ / static_cast<double>(count_) : 0.0;
  out.accuracy = count_ ? static_cast<double>(correct_) / static_cast<double>(count_) : 0.0;
  return out;
}

}  // namespace normkit::train
