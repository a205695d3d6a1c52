// Precise BN (bn_stats::recalibrate), batch statistics at evaluation and the
// input shifts (shift.hpp), against plain double references:
// - the eval pass writes, for every batch-norm layer, the exact population mean
//   and variance of the inputs that layer sees at inference after the layers
//   before it were recalibrated (an MLP computed entirely in double; a CNN's
//   captured inputs with double moments);
// - the train pass writes the population moments of the inputs training-mode
//   normalization produces, batch by batch (double MLP reference);
// - nothing else of the model changes, and an error changes nothing at all;
// - batch statistics at test time equal training-mode BN on the same batch.
#include <gtest/gtest.h>

#include <cmath>
#include <numeric>
#include <set>

#include "nn_test_support.hpp"
#include "normkit/engine/bn_stats.hpp"
#include "normkit/engine/shift.hpp"
#include "normkit/engine/train.hpp"

namespace {

using namespace nn_test;
using normkit::Error;
using normkit::bn_stats::Pass;
using normkit::bn_stats::PreciseOptions;
using normkit::data::Dataset;
using normkit::nn::Model;
using normkit::nn::ModelSpec;

constexpr double kEps = 1e-5;

// Random weights and, for the batch-norm layers, random γ, β and running
// statistics far from any population's (so a test cannot pass by leaving them).
void randomize(Model& model, uint64_t seed) {
  model.initialize({}, seed);
  std::mt19937_64 rng(seed + 1);
  std::uniform_real_distribution<float> u(0.5f, 1.5f), shift(-1.0f, 1.0f);
  std::set<std::string> norms;  // "2." for a batch-norm layer 2
  for (auto& [name, values] : model.state())
    if (name.ends_with("running_mean")) norms.insert(name.substr(0, name.find('.') + 1));
  for (auto& [name, values] : model.state()) {
    const bool norm = norms.contains(name.substr(0, name.find('.') + 1));
    if (name.ends_with("running_mean")) for (auto& v : *values) v = 7.0f + shift(rng);
    if (name.ends_with("running_var")) for (auto& v : *values) v = 40.0f * u(rng);
    if (norm && name.ends_with("weight")) for (auto& v : *values) v = u(rng);
    if (name.ends_with("bias")) for (auto& v : *values) v = 0.3f * shift(rng);
  }
}

std::vector<float>& state(Model& model, const std::string& name) {
  for (auto& [n, values] : model.state())
    if (n == name) return *values;
  throw std::runtime_error("no state " + name);
}

std::vector<std::vector<float>> snapshot(Model& model) {
  std::vector<std::vector<float>> out;
  for (auto& [n, values] : model.state()) out.push_back(*values);
  return out;
}

// Flat samples with a mean of 3 and spread 2 (far from standardized).
Dataset table(int64_t count, int64_t features, uint64_t seed) {
  Dataset set;
  set.sample_shape = {features};
  set.num_classes = 3;
  set.features = normal_values(static_cast<size_t>(count * features), seed, 2.0f, 3.0f);
  for (int64_t i = 0; i < count; ++i) set.labels.push_back(static_cast<int32_t>(i % 3));
  return set;
}

// ---------------------------------------------------------------- the MLP in double

// Layers 0 linear, 1 batchnorm, 2 relu, 3 linear, 4 batchnorm, 5 relu, 6 linear.
const char* kMlp = "input 6; linear 8 bias=0; batchnorm; relu; linear 5; batchnorm; relu; linear 3";

using Rows = std::vector<std::vector<double>>;

Rows linear(Model& m, size_t layer, const Rows& x) {
  const auto& w = state(m, std::to_string(layer) + ".weight");
  const size_t in = x.front().size(), out = w.size() / in;
  std::vector<float> bias(out, 0.0f);
  for (auto& [n, values] : m.state())
    if (n == std::to_string(layer) + ".bias") bias = *values;
  Rows y(x.size(), std::vector<double>(out));
  for (size_t i = 0; i < x.size(); ++i)
    for (size_t o = 0; o < out; ++o) {
      double s = bias[o];
      for (size_t k = 0; k < in; ++k) s += static_cast<double>(w[o * in + k]) * x[i][k];
      y[i][o] = s;
    }
  return y;
}

// Population mean and variance (two passes, double) of each column.
std::pair<std::vector<double>, std::vector<double>> column_moments(const Rows& x) {
  const size_t c = x.front().size();
  std::vector<double> mean(c, 0.0), var(c, 0.0);
  for (const auto& row : x)
    for (size_t j = 0; j < c; ++j) mean[j] += row[j];
  for (auto& v : mean) v /= static_cast<double>(x.size());
  for (const auto& row : x)
    for (size_t j = 0; j < c; ++j) var[j] += (row[j] - mean[j]) * (row[j] - mean[j]);
  for (auto& v : var) v /= static_cast<double>(x.size());
  return {mean, var};
}

// relu(γ(x − μ)/sqrt(σ² + eps) + β)
Rows normalize_relu(Model& m, const std::string& prefix, const Rows& x, const std::vector<double>& mean,
                    const std::vector<double>& var) {
  const auto& g = state(m, prefix + "weight");
  const auto& b = state(m, prefix + "bias");
  Rows y = x;
  for (auto& row : y)
    for (size_t j = 0; j < row.size(); ++j)
      row[j] = std::max(0.0, g[j] * (row[j] - mean[j]) / std::sqrt(var[j] + kEps) + b[j]);
  return y;
}

Rows rows_of(const Dataset& set, const std::vector<int64_t>& indices) {
  Rows out;
  const int64_t n = set.sample_size();
  for (const int64_t i : indices)
    out.emplace_back(set.features.begin() + i * n, set.features.begin() + (i + 1) * n);
  return out;
}

std::vector<int64_t> chosen(const Dataset& set, const PreciseOptions& o) {
  auto order = normkit::train::epoch_order(set.count(), o.seed, 0);
  order.resize(static_cast<size_t>(o.samples));
  return order;
}

void expect_statistics(Model& m, const std::string& prefix, const std::vector<double>& mean,
                       const std::vector<double>& var, const char* what) {
  const auto& rm = state(m, prefix + "running_mean");
  const auto& rv = state(m, prefix + "running_var");
  ASSERT_EQ(rm.size(), mean.size());
  for (size_t c = 0; c < mean.size(); ++c) {
    EXPECT_NEAR(rm[c], mean[c], 2e-6 * (std::abs(mean[c]) + std::sqrt(var[c]))) << what << " " << prefix << c;
    EXPECT_NEAR(rv[c], var[c], 4e-6 * var[c]) << what << " " << prefix << c;
  }
}

TEST(PreciseBn, EvalPassWritesExactPopulationStatisticsOfInferenceInputs) {
  Model model(ModelSpec::parse(kMlp));
  randomize(model, 3);
  const Dataset set = table(150, 6, 4);
  PreciseOptions o;
  o.samples = 100;   // not a multiple of the chunk size
  o.batch_size = 32;
  o.seed = 5;
  const auto written = normkit::bn_stats::recalibrate(model, set, o);
  ASSERT_EQ(written.size(), 2u);
  // The reference: the chosen samples through the model in double, each layer
  // normalized with the population statistics of its own inputs.
  Rows x = rows_of(set, chosen(set, o));
  Rows h = linear(model, 0, x);
  auto [m1, v1] = column_moments(h);
  expect_statistics(model, "1.", m1, v1, "eval pass");
  h = linear(model, 3, normalize_relu(model, "1.", h, m1, v1));
  auto [m2, v2] = column_moments(h);
  expect_statistics(model, "4.", m2, v2, "eval pass");
  EXPECT_EQ(written[0].layer, 1u);
  EXPECT_EQ(written[1].count, 100.0);
  EXPECT_NEAR(written[1].variance[0], v2[0], 4e-6 * v2[0]);
}

TEST(PreciseBn, TrainPassPoolsTheInputsOfTrainingModeNormalization) {
  Model model(ModelSpec::parse(kMlp));
  randomize(model, 8);
  const Dataset set = table(90, 6, 9);
  PreciseOptions o;
  o.samples = 81;  // batches of 8: ten of 8, and a lone last sample joins the tenth
  o.batch_size = 8;
  o.seed = 2;
  o.pass = Pass::train;
  Model copy(ModelSpec::parse(kMlp));
  randomize(copy, 8);
  normkit::bn_stats::recalibrate(model, set, o);
  const auto order = chosen(set, o);
  Rows in1, in2;
  for (int64_t first = 0; first < 80; first += 8) {
    const int64_t size = first == 72 ? 9 : 8;
    Rows x = rows_of(set, {order.begin() + first, order.begin() + first + size});
    Rows h = linear(copy, 0, x);
    auto [m1, v1] = column_moments(h);  // the batch's statistics, as training normalizes
    in1.insert(in1.end(), h.begin(), h.end());
    h = linear(copy, 3, normalize_relu(copy, "1.", h, m1, v1));
    in2.insert(in2.end(), h.begin(), h.end());
  }
  ASSERT_EQ(in1.size(), 81u);
  auto [m1, v1] = column_moments(in1);
  auto [m2, v2] = column_moments(in2);
  expect_statistics(model, "1.", m1, v1, "train pass");
  expect_statistics(model, "4.", m2, v2, "train pass");
}

// A CNN in both memory formats: the written statistics are the double moments
// of the inputs each batch-norm layer sees in the recalibrated model's eval
// forward, and the chunk size changes nothing beyond float rounding.
TEST(PreciseBn, CnnStatisticsAreTheMomentsOfTheInferenceInputs) {
  const auto spec = ModelSpec::parse(
      "input 2 4 4; conv 3 3 pad=1 bias=0; batchnorm; relu; maxpool 2; flatten; linear 6 bias=0; "
      "ghostbatchnorm size=4; relu; linear 4");
  for (const auto format : {MemoryFormat::channels_first, MemoryFormat::channels_last}) {
    SCOPED_TRACE(name_of(format));
    Model model(spec, format), other(spec, format);
    randomize(model, 11);
    randomize(other, 11);
    const Dataset set = blobs(70, 12);
    PreciseOptions o;
    o.samples = 50;
    o.batch_size = 7;
    normkit::bn_stats::recalibrate(model, set, o);
    o.batch_size = 50;
    normkit::bn_stats::recalibrate(other, set, o);
    // All 50 samples in one eval forward, the inputs of layers 1 and 6 captured.
    Tensor batch;
    std::vector<int32_t> labels;
    normkit::train::make_batch(set, chosen(set, o), 0, 50, format, batch, labels);
    const Tensor* x = &batch;
    for (size_t i = 0; i < model.layers().size(); ++i) {
      if (i == 1 || i == 6) {
        const auto values = canonical(*x);
        const int64_t C = x->shape[1], positions = x->numel() / (50 * C);
        std::vector<double> mean(C, 0.0), var(C, 0.0);
        for (int64_t n = 0; n < 50; ++n)
          for (int64_t c = 0; c < C; ++c)
            for (int64_t p = 0; p < positions; ++p) mean[c] += values[(n * C + c) * positions + p];
        for (auto& v : mean) v /= 50.0 * static_cast<double>(positions);
        for (int64_t n = 0; n < 50; ++n)
          for (int64_t c = 0; c < C; ++c)
            for (int64_t p = 0; p < positions; ++p) {
              const double d = values[(n * C + c) * positions + p] - mean[c];
              var[c] += d * d;
            }
        for (auto& v : var) v /= 50.0 * static_cast<double>(positions);
        const std::string prefix = std::to_string(i) + ".";
        expect_statistics(model, prefix, mean, var, "chunks of 7");
        expect_statistics(other, prefix, mean, var, "one chunk");
      }
      x = &model.layers()[i]->forward(*x, Mode::eval);
    }
  }
}

TEST(PreciseBn, ChangesOnlyTheRunningStatistics) {
  const auto spec = ModelSpec::parse(
      "input 6; linear 8 bias=0; batchrenorm frozen=1; relu; linear 5; batchnorm; relu; linear 3");
  for (const Pass pass : {Pass::eval, Pass::train}) {
    Model model(spec);
    randomize(model, 21);
    state(model, "1.num_batches_tracked")[0] = 17.0f;
    const auto before = snapshot(model);
    PreciseOptions o;
    o.samples = 40;
    o.batch_size = 16;
    o.pass = pass;
    normkit::bn_stats::recalibrate(model, table(60, 6, 22), o);
    const auto after = snapshot(model);
    size_t i = 0, changed = 0;
    for (auto& [name, values] : model.state()) {
      const bool statistic = name.ends_with("running_mean") || name.ends_with("running_var");
      if (statistic) changed += after[i] != before[i];
      else EXPECT_EQ(after[i], before[i]) << name;
      ++i;
    }
    EXPECT_EQ(changed, 4u);
    EXPECT_NE(model.spec().to_string().find("frozen=1"), std::string::npos);
  }
}

TEST(PreciseBn, ErrorsChangeNothing) {
  Model model(ModelSpec::parse(kMlp));
  randomize(model, 31);
  const auto before = snapshot(model);
  Dataset set = table(50, 6, 32);
  auto expect_error = [&](const Dataset& data, PreciseOptions o, const std::string& words) {
    try {
      normkit::bn_stats::recalibrate(model, data, o);
      ADD_FAILURE() << "no error; expected one naming '" << words << "'";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(words), std::string::npos) << e.what();
    }
    EXPECT_EQ(snapshot(model), before);
  };
  PreciseOptions o;
  o.samples = 0;
  expect_error(set, o, "samples must be in [1, 50]");
  o.samples = 51;
  expect_error(set, o, "samples must be in [1, 50]");
  o.samples = 20;
  o.batch_size = 0;
  expect_error(set, o, "batch size");
  o.batch_size = 1;
  o.pass = Pass::train;
  expect_error(set, o, "batch size must be >= 2");
  o.pass = Pass::eval;
  o.batch_size = 8;
  o.samples = 1;
  expect_error(set, o, "single value per channel");
  o.samples = 20;
  expect_error(table(50, 5, 1), o, "shape");
  // A NaN in one chosen sample: found at the first layer, nothing written.
  Dataset bad = set;
  bad.features[static_cast<size_t>(chosen(set, o)[13] * 6 + 2)] = NAN;
  expect_error(bad, o, "NaN");
  o.pass = Pass::train;
  expect_error(bad, o, "NaN");
  Model plain(ModelSpec::parse("input 6; linear 8; relu; linear 3"));
  EXPECT_THROW(normkit::bn_stats::recalibrate(plain, set, {}), Error);
}

// ---------------------------------------------------------------- batch statistics

TEST(BatchStatistics, OneBatchEqualsTrainingModeNormalization) {
  const Dataset set = table(64, 6, 41);
  Model model(ModelSpec::parse(kMlp)), copy(ModelSpec::parse(kMlp));
  randomize(model, 42);
  randomize(copy, 42);
  const auto before = snapshot(model);
  const auto e = normkit::bn_stats::evaluate_batch_statistics(model, set, 64, 3);
  EXPECT_EQ(snapshot(model), before);
  // The reference: the whole set as one training-mode batch (order does not
  // change per-sample results within one batch).
  std::vector<int64_t> order(64);
  std::iota(order.begin(), order.end(), 0);
  Tensor batch;
  std::vector<int32_t> labels;
  normkit::train::make_batch(set, order, 0, 64, copy.format(), batch, labels);
  const auto loss = normkit::nn::softmax_cross_entropy(copy.forward(batch, Mode::train), labels.data(), nullptr);
  EXPECT_NEAR(e.loss, loss.loss, 1e-5 * loss.loss);
  EXPECT_NEAR(e.accuracy, static_cast<double>(loss.correct) / 64.0, 1.0 / 64 + 1e-12);  // a tie may flip
  int64_t total = 0;
  for (const auto v : e.confusion) total += v;
  EXPECT_EQ(total, 64);
  // Small batches: other statistics, another result; the model still as it was.
  const auto small = normkit::bn_stats::evaluate_batch_statistics(model, set, 2, 3);
  EXPECT_NE(small.loss, e.loss);
  EXPECT_EQ(snapshot(model), before);
  EXPECT_EQ(normkit::bn_stats::evaluate_batch_statistics(model, set, 2, 3).loss, small.loss);
  EXPECT_THROW(normkit::bn_stats::evaluate_batch_statistics(model, set, 1, 3), Error);
}

TEST(SavedStatistics, PutsBackUnlessKept) {
  Model model(ModelSpec::parse(kMlp));
  randomize(model, 51);
  const auto before = snapshot(model);
  {
    normkit::bn_stats::SavedStatistics saved(model);
    state(model, "1.running_mean")[0] = 123.0f;
    state(model, "4.running_var")[1] = 0.5f;
  }
  EXPECT_EQ(snapshot(model), before);
  {
    normkit::bn_stats::SavedStatistics saved(model);
    state(model, "1.running_mean")[0] = 123.0f;
    saved.keep();
  }
  EXPECT_EQ(state(model, "1.running_mean")[0], 123.0f);
}

// ---------------------------------------------------------------- shifts

using normkit::data::Shift;

TEST(Shift, ParsesAndNamesEachKind) {
  for (const char* text : {"none", "noise:0.2", "contrast:0.5", "brightness:-0.25", "saltpepper:0.05"})
    EXPECT_EQ(Shift::parse(text).to_string(), text);
  for (const char* bad : {"", "noise", "noise:", "noise:-1", "noise:x", "contrast:0", "brightness:1.5",
                          "saltpepper:2", "blur:1", "none:1", "noise:nan"})
    EXPECT_THROW(Shift::parse(bad), Error) << bad;
}

Dataset images(int64_t count, uint64_t seed) {
  Dataset set;
  set.sample_shape = {1, 8, 8};
  set.num_classes = 2;
  std::mt19937_64 rng(seed);
  for (int64_t i = 0; i < count * 64; ++i) set.features.push_back(static_cast<float>(rng() % 256) / 255.0f);
  for (int64_t i = 0; i < count; ++i) set.labels.push_back(static_cast<int32_t>(i % 2));
  return set;
}

TEST(Shift, IsReproduciblePerSampleAndStaysAnEightBitImage) {
  const Dataset original = images(200, 1);
  for (const char* text : {"noise:0.3", "contrast:0.4", "contrast:2", "brightness:0.3", "saltpepper:0.2"}) {
    SCOPED_TRACE(text);
    Dataset a = original, b = original, c = original;
    normkit::data::apply_shift(a, Shift::parse(text), 7);
    normkit::data::apply_shift(b, Shift::parse(text), 7);
    EXPECT_EQ(a.features, b.features);
    EXPECT_NE(a.features, original.features);
    // Sample i's pixels depend on (seed, i) only: the first 10 samples alone shift alike.
    Dataset head = original;
    head.features.resize(640);
    head.labels.resize(10);
    normkit::data::apply_shift(head, Shift::parse(text), 7);
    EXPECT_TRUE(std::equal(head.features.begin(), head.features.end(), a.features.begin()));
    for (const float v : a.features) {
      ASSERT_GE(v, 0.0f);
      ASSERT_LE(v, 1.0f);
      ASSERT_NEAR(v * 255.0f, std::round(v * 255.0f), 1e-3f);
    }
    // Raw pixels (0-255) shift to the same levels.
    Dataset raw = original;
    for (float& v : raw.features) v = std::round(v * 255.0f);
    normkit::data::apply_shift(raw, Shift::parse(text), 7, 255.0f);
    for (size_t i = 0; i < raw.features.size(); ++i) ASSERT_EQ(raw.features[i], std::round(a.features[i] * 255.0f));
    normkit::data::apply_shift(c, Shift::parse(text), 8);
    if (std::string(text).starts_with("noise") || std::string(text).starts_with("salt"))
      EXPECT_NE(c.features, a.features);
    else
      EXPECT_EQ(c.features, a.features);  // deterministic shifts draw nothing
  }
}

TEST(Shift, EachKindDoesWhatItSays) {
  Dataset grey;
  grey.sample_shape = {1, 100, 100};
  grey.num_classes = 1;
  grey.features.assign(10000, 128.0f / 255.0f);
  grey.labels = {0};
  Dataset noisy = grey;
  normkit::data::apply_shift(noisy, Shift::parse("noise:0.1"), 3);
  double sum = 0, sq = 0;
  for (const float v : noisy.features) {
    sum += v - 128.0 / 255.0;
    sq += (v - 128.0 / 255.0) * (v - 128.0 / 255.0);
  }
  EXPECT_NEAR(sum / 1e4, 0.0, 0.004);               // 4 standard errors
  EXPECT_NEAR(std::sqrt(sq / 1e4), 0.1, 0.004);     // quantization adds 1/255/sqrt(12)
  Dataset sp = grey;
  normkit::data::apply_shift(sp, Shift::parse("saltpepper:0.2"), 3);
  int zeros = 0, ones = 0;
  for (const float v : sp.features) {
    zeros += v == 0.0f;
    ones += v == 1.0f;
  }
  EXPECT_NEAR((zeros + ones) / 1e4, 0.2, 0.016);
  EXPECT_NEAR(zeros / double(zeros + ones), 0.5, 0.045);
  // Contrast around the image's mean; brightness added.
  Dataset ramp;
  ramp.sample_shape = {1, 2, 2};
  ramp.num_classes = 1;
  ramp.features = {0.2f, 0.4f, 0.6f, 0.8f};
  ramp.labels = {0};
  Dataset low = ramp, bright = ramp;
  normkit::data::apply_shift(low, Shift::parse("contrast:0.5"), 0);
  normkit::data::apply_shift(bright, Shift::parse("brightness:0.3"), 0);
  const std::vector<float> want_low = {0.35f, 0.45f, 0.55f, 0.65f}, want_bright = {0.5f, 0.7f, 0.9f, 1.0f};
  for (size_t i = 0; i < 4; ++i) {
    EXPECT_NEAR(low.features[i], want_low[i], 0.5 / 255.0 + 1e-6);
    EXPECT_NEAR(bright.features[i], want_bright[i], 0.5 / 255.0 + 1e-6);  // 0.5 is level 127.5: either
  }
  Dataset flat = table(4, 6, 1);
  EXPECT_THROW(normkit::data::apply_shift(flat, Shift::parse("noise:0.1"), 1), Error);
}

}  // namespace
