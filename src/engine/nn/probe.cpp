// Probes on a fixed batch: activation percentiles, BN statistics, per-layer
// gradient norms and Santurkar et al.'s gradient ICS. See probe.hpp.
#include "normkit/engine/probe.hpp"

#include <algorithm>
#include <cmath>

#include "support.hpp"

namespace normkit::probe {

namespace {

bool is_activation(const std::string& t) { return t == "relu" || t == "sigmoid" || t == "tanh"; }
bool is_weight_layer(const std::string& t) { return t == "linear" || t == "conv"; }
bool is_batch_norm(const std::string& t) {
  return t == "batchnorm" || t == "batchrenorm" || t == "ghostbatchnorm";
}

// Element index of (sample n, channel c, position p) in a [N, C] or [N, C, H, W] tensor.
struct ChannelIndex {
  int64_t n_count, c_count, positions;
  bool channels_last;
  explicit ChannelIndex(const nn::Tensor& t)
      : n_count(t.shape[0]), c_count(t.shape.size() > 1 ? t.shape[1] : 1), positions(1),
        channels_last(t.format == nn::MemoryFormat::channels_last) {
    for (size_t i = 2; i < t.shape.size(); ++i) positions *= t.shape[i];
  }
  int64_t at(int64_t n, int64_t c, int64_t p) const {
    return channels_last ? (n * positions + p) * c_count + c
                         : (n * c_count + c) * positions + p;
  }
  template <class F>
  void for_channel(int64_t c, F f) const {
    for (int64_t n = 0; n < n_count; ++n)
      for (int64_t p = 0; p < positions; ++p) f(at(n, c, p));
  }
};

// numpy.percentile's default (linear interpolation between order statistics).
double percentile(std::vector<double>& sorted, double q) {
  if (sorted.size() == 1) return sorted[0];
  const double pos = q / 100.0 * static_cast<double>(sorted.size() - 1);
  const auto lo = static_cast<size_t>(std::floor(pos));
  const size_t hi = std::min(lo + 1, sorted.size() - 1);
  return sorted[lo] + (pos - static_cast<double>(lo)) * (sorted[hi] - sorted[lo]);
}

double norm2(const std::vector<float>& v) {
  double s = 0;
  for (const float x : v) s += static_cast<double>(x) * x;
  return std::sqrt(s);
}

// Every buffer of the model (running statistics, step counters), to put back
// after a forward in train mode.
std::vector<std::vector<float>> save_buffers(nn::Model& model) {
  std::vector<std::vector<float>> saved;
  for (const auto& layer : model.layers())
    for (const auto& b : layer->buffers()) saved.push_back(*b.values);
  return saved;
}
void restore_buffers(nn::Model& model, const std::vector<std::vector<float>>& saved) {
  size_t i = 0;
  for (const auto& layer : model.layers())
    for (const auto& b : layer->buffers()) *b.values = saved[i++];
}

// Forward in train mode layer by layer (calling `before(i, input)` and
// `after(i, output)` around each), loss, backward; the buffers are restored.
template <class Before, class After>
nn::LossResult forward_backward(nn::Model& model, const nn::Tensor& batch,
                                const std::vector<int32_t>& labels, Before before, After after) {
  const auto saved = save_buffers(model);
  const nn::Tensor* current = &batch;
  const auto& layers = model.layers();
  for (size_t i = 0; i < layers.size(); ++i) {
    before(i, *current);
    current = &layers[i]->forward(*current, nn::Mode::train);
    after(i, *current);
  }
  nn::Tensor dlogits;
  const nn::LossResult loss = nn::softmax_cross_entropy(*current, labels.data(), &dlogits);
  model.zero_grad();
  model.backward(dlogits);
  restore_buffers(model, saved);
  return loss;
}

ActivationStats activation_stats(size_t index, const std::string& type, const nn::Tensor& in,
                                 const Options& options) {
  ActivationStats s;
  s.layer = index;
  s.type = type;
  const ChannelIndex ci(in);
  s.units = ci.c_count;
  double sum = 0, sum2 = 0;
  for (const float v : in.data) {
    sum += v;
    sum2 += static_cast<double>(v) * v;
  }
  const auto n = static_cast<double>(in.data.size());
  s.input_mean = sum / n;
  s.input_std = std::sqrt(std::max(0.0, sum2 / n - s.input_mean * s.input_mean));
  std::vector<double> values;
  for (int64_t c = 0; c < std::min(options.units, ci.c_count); ++c) {
    values.clear();
    ci.for_channel(c, [&](int64_t i) { values.push_back(in.data[i]); });
    std::sort(values.begin(), values.end());
    std::vector<double> row;
    for (const double q : options.percentiles) row.push_back(percentile(values, q));
    s.percentiles.push_back(std::move(row));
  }
  return s;
}

void add_output_stats(ActivationStats& s, const nn::Tensor& out) {
  const ChannelIndex ci(out);
  double sum = 0;
  for (const float v : out.data) sum += v;
  s.output_mean = sum / static_cast<double>(out.data.size());
  int64_t dead = 0;
  for (int64_t c = 0; c < ci.c_count; ++c) {
    bool all_zero = true;
    ci.for_channel(c, [&](int64_t i) { all_zero = all_zero && out.data[i] == 0.0f; });
    dead += all_zero;
  }
  s.dead_fraction = static_cast<double>(dead) / static_cast<double>(ci.c_count);
}

NormStats norm_stats(size_t index, nn::Layer& layer, const nn::Tensor& in, const Options& options) {
  NormStats s;
  s.layer = index;
  s.type = layer.type();
  const ChannelIndex ci(in);
  for (int64_t c = 0; c < ci.c_count; ++c) {
    double sum = 0, sum2 = 0;
    int64_t count = 0;
    ci.for_channel(c, [&](int64_t i) {
      sum += in.data[i];
      sum2 += static_cast<double>(in.data[i]) * in.data[i];
      ++count;
    });
    const double mean = sum / static_cast<double>(count);
    s.batch_mean_abs += std::abs(mean);
    s.batch_var += std::max(0.0, sum2 / static_cast<double>(count) - mean * mean);
  }
  s.batch_mean_abs /= static_cast<double>(ci.c_count);
  s.batch_var /= static_cast<double>(ci.c_count);
  for (const auto& b : layer.buffers()) {
    double acc = 0;
    for (const float v : *b.values) acc += b.name == "running_mean" ? std::abs(v) : v;
    if (b.name == "running_mean") s.running_mean_abs = acc / static_cast<double>(b.values->size());
    if (b.name == "running_var") s.running_var = acc / static_cast<double>(b.values->size());
  }
  for (auto* p : layer.parameters()) {
    auto& target = p->name == "weight" ? s.gamma : s.beta;
    for (int64_t c = 0; c < std::min<int64_t>(options.units, static_cast<int64_t>(p->value.size())); ++c)
      target.push_back(p->value[c]);
  }
  return s;
}

}  // namespace

Result run(nn::Model& model, const nn::Tensor& batch, const std::vector<int32_t>& labels,
           const Options& options) {
  if (batch.shape.empty() || static_cast<int64_t>(labels.size()) != batch.shape[0])
    engine::fail_invalid("probe: ", labels.size(), " labels for a batch of ",
                         batch.shape.empty() ? 0 : batch.shape[0]);
  if (options.units < 0) engine::fail_invalid("probe: units must be >= 0, got ", options.units);
  for (const double q : options.percentiles)
    if (!(q >= 0 && q <= 100)) engine::fail_invalid("probe: percentiles must be in [0, 100], got ", q);
  const auto& layers = model.layers();
  Result result;
  const nn::LossResult loss = forward_backward(
      model, batch, labels,
      [&](size_t i, const nn::Tensor& in) {
        const std::string t = layers[i]->type();
        if (is_activation(t)) result.activations.push_back(activation_stats(i, t, in, options));
        if (is_batch_norm(t)) result.norms.push_back(norm_stats(i, *layers[i], in, options));
      },
      [&](size_t i, const nn::Tensor& out) {
        if (is_activation(layers[i]->type())) add_output_stats(result.activations.back(), out);
      });
  result.loss = loss.loss;
  result.accuracy = static_cast<double>(loss.correct) / static_cast<double>(labels.size());

  // The weight gradient of each weight layer at θ (G), kept for the ICS measure.
  std::vector<size_t> weight_layers;
  std::vector<std::vector<float>> g;
  for (size_t i = 0; i < layers.size(); ++i) {
    if (!is_weight_layer(layers[i]->type())) continue;
    nn::Parameter* w = layers[i]->parameters().front();
    WeightLayerStats s;
    s.layer = i;
    s.type = layers[i]->type();
    s.grad_norm = norm2(w->grad);
    s.weight_norm = norm2(w->value);
    result.weights.push_back(s);
    weight_layers.push_back(i);
    g.push_back(w->grad);
  }
  if (options.ics) {
    // Every parameter's gradient at θ, for the update of the layers before i.
    std::vector<std::vector<float>> all_grads;
    for (auto* p : model.parameters()) all_grads.push_back(p->grad);
    const auto lr = static_cast<float>(options.ics_lr);
    for (size_t k = 0; k < weight_layers.size(); ++k) {
      std::vector<std::vector<float>> saved;
      size_t index = 0;
      for (size_t i = 0; i < layers.size(); ++i)
        for (auto* p : layers[i]->parameters()) {
          if (i < weight_layers[k]) {
            saved.push_back(p->value);
            for (size_t j = 0; j < p->value.size(); ++j) p->value[j] -= lr * all_grads[index][j];
          }
          ++index;
        }
      forward_backward(model, batch, labels, [](size_t, const nn::Tensor&) {},
                       [](size_t, const nn::Tensor&) {});
      const std::vector<float>& g2 = layers[weight_layers[k]]->parameters().front()->grad;
      double diff = 0, dot = 0, n1 = 0, n2 = 0;
      for (size_t j = 0; j < g2.size(); ++j) {
        const double a = g[k][j], b = g2[j];
        diff += (a - b) * (a - b);
        dot += a * b;
        n1 += a * a;
        n2 += b * b;
      }
      result.weights[k].ics_distance = n1 > 0 ? std::sqrt(diff / n1) : 0.0;
      result.weights[k].ics_cosine = n1 > 0 && n2 > 0 ? dot / std::sqrt(n1 * n2) : 1.0;
      size_t s = 0;
      for (size_t i = 0; i < weight_layers[k]; ++i)
        for (auto* p : layers[i]->parameters()) p->value = saved[s++];
    }
  }
  model.zero_grad();
  return result;
}

}  // namespace normkit::probe
