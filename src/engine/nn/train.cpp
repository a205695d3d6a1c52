#include <algorithm>
#include <chrono>
#include <cmath>
#include <numeric>
#include <random>
#include <tuple>

#include "normkit/engine/distributed.hpp"
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

namespace {

// Data-parallel, after backward: one sum over the ranks of the gradients (of the
// global batch's mean loss), the buffers, and the step's loss sum and correct
// count, all sent as floats (the loss as two, high and low part) and added in
// double. Buffers become the ranks' mean: running statistics of batch norm that
// each rank keeps from its own shard (synchronized BN off) then track the mean
// of the shards' statistics, and identical buffers stay bit for bit what they
// were (N equal floats add exactly in double). Also summed: whether each rank
// was asked to stop, and by which signal (the ranks stop together after this
// step when any was). Returns the global batch's loss sum and correct count,
// and the stop.
struct SumBuffers {
  std::vector<float> values;
  std::vector<double> sums;
};
struct RankSums {
  double loss_sum;
  int64_t correct;
  int stop;  // 0, or the signal (of the ranks that got one: the mean of their numbers)
};
RankSums sum_over_ranks(dist::Communicator& group, nn::Model& model,
                                          const std::vector<nn::Parameter*>& parameters,
                                          double loss_sum, int64_t correct, SumBuffers& buffers) {
  std::vector<std::vector<float>*> model_buffers;
  for (const auto& layer : model.layers())
    for (const nn::Buffer& b : layer->buffers()) model_buffers.push_back(b.values);
  auto& v = buffers.values;
  v.clear();
  for (const auto* p : parameters) v.insert(v.end(), p->grad.begin(), p->grad.end());
  for (const auto* b : model_buffers) v.insert(v.end(), b->begin(), b->end());
  const auto loss_high = static_cast<float>(loss_sum);
  const int signal = stop_signal();
  v.insert(v.end(), {loss_high, static_cast<float>(loss_sum - loss_high),
                     static_cast<float>(correct),  // exact below 2^24 samples per rank
                     signal ? 1.0f : 0.0f, static_cast<float>(signal)});
  buffers.sums.resize(v.size());
  dist::all_reduce_sum(group, v, buffers.sums);
  const double* sum = buffers.sums.data();
  for (auto* p : parameters)
    for (float& g : p->grad) g = static_cast<float>(*sum++);
  const double ranks = group.size();
  for (auto* b : model_buffers)
    for (float& value : *b) value = static_cast<float>(*sum++ / ranks);
  const int stop = sum[3] > 0 ? static_cast<int>(std::lround(sum[4] / sum[3])) : 0;
  return {sum[0] + sum[1], static_cast<int64_t>(sum[2]), stop};
}

// Every rank must hold the same model after an epoch: checked, not assumed.
void check_replicas(dist::Communicator& group, nn::Model& model, nn::Optimizer& optimizer,
                    int64_t epoch) {
  std::vector<const std::vector<float>*> arrays;
  for (const auto& [name, values] : model.state()) arrays.push_back(values);
  for (const auto* values : optimizer.state()) arrays.push_back(values);
  dist::check_same(group, dist::fingerprint(arrays),
                   engine::concat("the parameters, buffers and optimizer state after epoch ",
                                  epoch + 1, " (the ranks have diverged)"));
}

}  // namespace

int64_t steps_per_epoch(int64_t count, int64_t batch_size, int ranks) {
  int64_t steps = (count + batch_size - 1) / batch_size;
  if (count % batch_size == 1) --steps;  // a lone last sample cannot be batch-normalized
  const int64_t last_size = count - (steps - 1) * batch_size;
  if (steps > 1 && last_size < ranks) --steps;  // nor a last batch that leaves a rank empty
  return steps;
}

EpochResult train_epoch(nn::Model& model, nn::Optimizer& optimizer, const data::Dataset& train,
                        int64_t batch_size, uint64_t seed, int64_t epoch,
                        const ProgressCallback& progress, const EpochPosition& begin,
                        dist::Communicator* group) {
  if (batch_size < 2) engine::fail_invalid("batch size must be >= 2 for batch normalization, got ", batch_size);
  if (train.count() < 2) engine::fail_invalid("training needs at least 2 samples");
  const int ranks = group ? group->size() : 1, rank = group ? group->rank() : 0;
  if (batch_size < ranks)
    engine::fail_invalid("batch size ", batch_size, " is smaller than the number of ranks (",
                         ranks, "): every rank needs a sample of every batch");
  const auto order = epoch_order(train.count(), seed, epoch);
  const int64_t steps = steps_per_epoch(train.count(), batch_size, ranks);
  if (begin.step < 0 || begin.step >= steps || begin.samples < 0 || begin.correct < 0 ||
      begin.correct > begin.samples)
    engine::fail_invalid("train_epoch: cannot continue at step ", begin.step, " of ", steps,
                         " (", begin.samples, " samples, ", begin.correct, " correct)");
  const auto parameters = model.parameters();
  nn::Tensor batch, dlogits;
  std::vector<int32_t> labels;
  SumBuffers reduce_buffers;
  EpochResult result;
  result.samples = begin.samples;
  double loss_sum = begin.loss_sum;
  int64_t correct = begin.correct;
  const auto start = std::chrono::steady_clock::now();
  auto seconds = [&] {
    return begin.seconds + std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  };
  int group_stop = 0;
  for (int64_t step = begin.step; step < steps; ++step) {
    // Data-parallel: the stop the ranks agreed on in the last step's sum.
    const int stop = group && ranks > 1 ? group_stop : stop_signal();
    if (stop != 0) {
      if (stop_signal() == 0) request_stop(stop);  // another rank's signal
      result.interrupted = true;
      result.position = {step, loss_sum, correct, result.samples, seconds()};
      return result;
    }
    const int64_t first = step * batch_size;
    const int64_t size = std::min(batch_size, train.count() - first);
    const dist::Shard shard = dist::shard_of(size, rank, ranks);
    make_batch(train, order, first + shard.first, shard.count, model.format(), batch, labels);
    model.set_step(seed, static_cast<uint64_t>(epoch * steps + step), shard.first);
    const nn::Tensor& logits = model.forward(batch, nn::Mode::train);
    nn::LossResult loss = nn::softmax_cross_entropy(logits, labels.data(), &dlogits);
    if (shard.count != size) {
      // dL/dlogits of the global batch's mean loss: this shard's mean loss weighs count / size.
      const float weight = static_cast<float>(static_cast<double>(shard.count) / static_cast<double>(size));
      for (float& d : dlogits.data) d *= weight;
    }
    // Later steps start from the zeros the last one left (step_and_zero_grad).
    if (step == begin.step) model.zero_grad();
    model.backward(dlogits);
    double batch_loss_sum = loss.loss * static_cast<double>(shard.count);
    if (group && ranks > 1) {
      const RankSums sums =
          sum_over_ranks(*group, model, parameters, batch_loss_sum, loss.correct, reduce_buffers);
      batch_loss_sum = sums.loss_sum;
      loss.correct = sums.correct;
      group_stop = sums.stop;
    }
    loss.loss = batch_loss_sum / static_cast<double>(size);
    if (!std::isfinite(loss.loss))
      engine::fail_runtime("loss became ", loss.loss, " at epoch ", epoch + 1, ", step ", step + 1,
                           " of ", steps, "; training stopped");
    optimizer.step_and_zero_grad(parameters);
    loss_sum += batch_loss_sum;
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
  if (group) check_replicas(*group, model, optimizer, epoch);
  result.seconds = seconds();
  result.loss = loss_sum / static_cast<double>(result.samples);
  result.accuracy = static_cast<double>(correct) / static_cast<double>(result.samples);
  return result;
}

Evaluation evaluate(nn::Model& model, const data::Dataset& set, int64_t batch_size,
                    dist::Communicator* group) {
  if (set.count() < 1) engine::fail_invalid("evaluate: empty data set");
  if (batch_size < 1) engine::fail_invalid("evaluate: batch size must be >= 1");
  std::vector<int64_t> order(static_cast<size_t>(set.count()));
  std::iota(order.begin(), order.end(), 0);
  const dist::Shard shard =
      group ? dist::shard_of(set.count(), group->rank(), group->size()) : dist::Shard{0, set.count()};
  Scorer scorer;
  nn::Tensor batch;
  std::vector<int32_t> labels;
  const int64_t end = shard.first + shard.count;
  for (int64_t first = shard.first; first < end; first += batch_size) {
    const int64_t size = std::min(batch_size, end - first);
    make_batch(set, order, first, size, model.format(), batch, labels);
    scorer.add(model.forward(batch, nn::Mode::eval), labels.data());
  }
  if (group) {
    // A rank with no test sample still knows the class count: the model's output.
    std::vector<int64_t> shape = model.spec().input_shape;
    for (const auto& layer : model.layers()) shape = layer->output_shape(shape);
    scorer.sum_over(*group, static_cast<int32_t>(shape[0]));
  }
  return scorer.result();
}

void Scorer::sum_over(dist::Communicator& group, int32_t classes) {
  if (e_.confusion.empty()) {
    e_.classes = classes;
    e_.confusion.assign(static_cast<size_t>(classes) * static_cast<size_t>(classes), 0);
  }
  std::vector<double> totals(e_.confusion.begin(), e_.confusion.end());
  totals.insert(totals.end(), {loss_sum_, static_cast<double>(correct_), static_cast<double>(count_)});
  dist::all_reduce_sum(group, totals);
  const size_t n = e_.confusion.size();
  for (size_t i = 0; i < n; ++i) e_.confusion[i] = static_cast<int64_t>(totals[i]);
  loss_sum_ = totals[n];
  correct_ = static_cast<int64_t>(totals[n + 1]);
  count_ = static_cast<int64_t>(totals[n + 2]);
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
