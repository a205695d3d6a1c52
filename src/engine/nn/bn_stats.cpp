// Statistics sources for batch-norm layers at inference: precise BN (exact
// population statistics by merged moments) and batch statistics at test time.
// See normkit/engine/bn_stats.hpp for what each computes and why.
#include "normkit/engine/bn_stats.hpp"

#include <cmath>
#include <utility>

#include "nn/layers.hpp"
#include "normkit/batch_norm.hpp"
#include "support.hpp"

namespace normkit::bn_stats {

using engine::fail_invalid;
using engine::fail_runtime;

bool is_batch_norm(const nn::Layer& layer) {
  const std::string t = layer.type();
  return t == "batchnorm" || t == "batchrenorm" || t == "ghostbatchnorm";
}

std::vector<size_t> batch_norm_layers(const nn::Model& model) {
  std::vector<size_t> out;
  for (size_t i = 0; i < model.layers().size(); ++i)
    if (is_batch_norm(*model.layers()[i])) out.push_back(i);
  return out;
}

namespace {

std::vector<float>& buffer(nn::Layer& layer, const char* name) {
  for (const nn::Buffer& b : layer.buffers())
    if (b.name == name) return *b.values;
  fail_invalid(layer.describe(), " has no buffer ", name);
}

std::vector<Moments> channel_moments(const nn::Tensor& x) {
  std::vector<Moments> m(static_cast<size_t>(x.shape[1]));
  batch_norm_moments<float>(x.view(), m);
  return m;
}

// The layer normalizes with these statistics from now on (the variance is the
// population's, as training's normalization uses the batch's biased variance).
void set_statistics(nn::Layer& layer, const std::vector<Moments>& m) {
  auto& mean = buffer(layer, "running_mean");
  auto& var = buffer(layer, "running_var");
  for (size_t c = 0; c < m.size(); ++c) {
    mean[c] = static_cast<float>(m[c].mean);
    var[c] = static_cast<float>(m[c].biased_variance());
  }
}

void check_finite(const nn::Layer& layer, size_t index, const std::vector<Moments>& m) {
  for (size_t c = 0; c < m.size(); ++c)
    if (!std::isfinite(m[c].mean) || !std::isfinite(m[c].m2))
      fail_runtime("layer ", index, " (", layer.describe(), "): its inputs hold NaN or infinity (channel ",
                   c, "); the model's statistics are left as they were");
}

using Seen = std::function<void(size_t layer, const std::vector<Moments>&)>;

// `batch` through layers [0, end) in eval mode. With batch statistics, each
// batch-norm layer first takes its input's moments as its statistics (training's
// normalization) and `seen` receives them.
const nn::Tensor& forward_to(nn::Model& model, const nn::Tensor& batch, size_t end,
                             bool batch_statistics, const Seen& seen = {}) {
  const auto& layers = model.layers();
  const nn::Tensor* x = &batch;
  for (size_t i = 0; i < end; ++i) {
    if (batch_statistics && is_batch_norm(*layers[i])) {
      const auto m = channel_moments(*x);
      check_finite(*layers[i], i, m);
      if (seen) seen(i, m);
      set_statistics(*layers[i], m);
    }
    x = &layers[i]->forward(*x, nn::Mode::eval);
  }
  return *x;
}

void check_fits(const nn::Model& model, const data::Dataset& set, const char* what) {
  if (set.sample_shape != model.spec().input_shape)
    fail_invalid(what, ": the model takes samples of shape ",
                 nn::detail::shape_text(model.spec().input_shape), ", the data has ",
                 nn::detail::shape_text(set.sample_shape));
}

}  // namespace

SavedStatistics::SavedStatistics(nn::Model& model) {
  for (const size_t i : batch_norm_layers(model))
    for (const char* name : {"running_mean", "running_var"}) {
      auto& values = buffer(*model.layers()[i], name);
      saved_.emplace_back(&values, values);
    }
}

void SavedStatistics::restore() {
  for (auto& [target, values] : saved_) *target = values;
}

void SavedStatistics::keep() { saved_.clear(); }

std::vector<LayerStatistics> recalibrate(nn::Model& model, const data::Dataset& set,
                                         const PreciseOptions& o, const Progress& progress) {
  check_fits(model, set, "recalibrate");
  const std::vector<size_t> bn = batch_norm_layers(model);
  if (bn.empty()) fail_invalid("recalibrate: the model has no batch-norm layers (batchnorm, batchrenorm, ghostbatchnorm)");
  if (o.samples < 1 || o.samples > set.count())
    fail_invalid("recalibrate: samples must be in [1, ", set.count(), "] (the data set's size), got ", o.samples);
  const bool train = o.pass == Pass::train;
  if (o.batch_size < (train ? 2 : 1))
    fail_invalid("recalibrate: the batch size must be >= ", train ? 2 : 1, ", got ", o.batch_size);
  const auto& layers = model.layers();
  std::vector<LayerStatistics> out(bn.size());
  for (size_t k = 0; k < bn.size(); ++k) {
    out[k].layer = bn[k];
    out[k].type = layers[bn[k]]->type();
    out[k].old_mean = buffer(*layers[bn[k]], "running_mean");
    out[k].old_variance = buffer(*layers[bn[k]], "running_var");
  }
  std::vector<int64_t> order = train::epoch_order(set.count(), o.seed, 0);
  order.resize(static_cast<size_t>(o.samples));
  // Chunks (eval) or batches (train) of the chosen samples; in train mode a last
  // batch of one sample joins the one before (BN needs two).
  const int64_t chunks = train ? train::steps_per_epoch(o.samples, o.batch_size)
                               : (o.samples + o.batch_size - 1) / o.batch_size;
  auto chunk_size = [&](int64_t j) {
    return j + 1 == chunks ? o.samples - j * o.batch_size : o.batch_size;
  };
  SavedStatistics saved(model);  // put back if anything fails
  std::vector<std::vector<Moments>> totals(bn.size());
  nn::Tensor batch;
  std::vector<int32_t> labels;
  const int64_t total_work = train ? o.samples : o.samples * static_cast<int64_t>(bn.size());
  int64_t done = 0;
  if (train) {
    std::vector<size_t> position(layers.size());
    for (size_t k = 0; k < bn.size(); ++k) position[bn[k]] = k;
    for (int64_t j = 0; j < chunks; ++j) {
      train::make_batch(set, order, j * o.batch_size, chunk_size(j), model.format(), batch, labels);
      forward_to(model, batch, bn.back() + 1, true, [&](size_t layer, const std::vector<Moments>& m) {
        auto& t = totals[position[layer]];
        if (t.empty()) t.resize(m.size());
        for (size_t c = 0; c < m.size(); ++c) t[c].merge(m[c]);  // in batch order: deterministic
      });
      if (progress) progress(done += chunk_size(j), total_work);
    }
  } else {
    // Layer by layer: layer k's inputs depend on the statistics of those before it.
    for (size_t k = 0; k < bn.size(); ++k) {
      for (int64_t j = 0; j < chunks; ++j) {
        train::make_batch(set, order, j * o.batch_size, chunk_size(j), model.format(), batch, labels);
        const auto m = channel_moments(forward_to(model, batch, bn[k], false));
        auto& t = totals[k];
        if (t.empty()) t.resize(m.size());
        for (size_t c = 0; c < m.size(); ++c) t[c].merge(m[c]);
        if (progress) progress(done += chunk_size(j), total_work);
      }
      check_finite(*layers[bn[k]], bn[k], totals[k]);
      if (totals[k].front().count < 2)
        fail_invalid("recalibrate: layer ", bn[k], " (", layers[bn[k]]->describe(),
                     ") would see a single value per channel; use more samples");
      set_statistics(*layers[bn[k]], totals[k]);
    }
  }
  for (size_t k = 0; k < bn.size(); ++k) {
    check_finite(*layers[bn[k]], bn[k], totals[k]);
    set_statistics(*layers[bn[k]], totals[k]);
    out[k].count = totals[k].front().count;
    for (const Moments& m : totals[k]) {
      out[k].mean.push_back(m.mean);
      out[k].variance.push_back(m.biased_variance());
    }
  }
  saved.keep();
  return out;
}

train::Evaluation evaluate_batch_statistics(nn::Model& model, const data::Dataset& set,
                                            int64_t batch_size, uint64_t seed) {
  check_fits(model, set, "evaluate with batch statistics");
  if (batch_size < 2) fail_invalid("batch statistics need batches of >= 2 samples, got ", batch_size);
  if (set.count() < 2) fail_invalid("batch statistics need >= 2 samples, the data set has ", set.count());
  SavedStatistics saved(model);
  const auto order = train::epoch_order(set.count(), seed ^ 0xba7c5ull, 0);
  const int64_t batches = train::steps_per_epoch(set.count(), batch_size);
  train::Scorer scorer;
  nn::Tensor batch;
  std::vector<int32_t> labels;
  for (int64_t j = 0; j < batches; ++j) {
    const int64_t first = j * batch_size;
    const int64_t size = j + 1 == batches ? set.count() - first : batch_size;
    train::make_batch(set, order, first, size, model.format(), batch, labels);
    scorer.add(forward_to(model, batch, model.layers().size(), true), labels.data());
  }
  return scorer.result();
}

}  // namespace normkit::bn_stats
