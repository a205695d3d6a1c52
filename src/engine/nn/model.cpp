#include <unistd.h>

#include <algorithm>
#include <optional>
#include <sstream>

#include "nn/layers.hpp"
#include "normkit/engine/nn.hpp"
#include "support.hpp"

namespace normkit::nn {

// ---------------------------------------------------------------- sizes

double ModelSize::training_bytes(int64_t batch) const {
  constexpr double kFloat = sizeof(float);
  // Each parameter: its value, its gradient, and up to two optimizer values (Adam).
  return kFloat * (4.0 * static_cast<double>(parameters) + static_cast<double>(buffers) +
                   static_cast<double>(activations) * static_cast<double>(batch));
}

std::string ModelSize::describe(int64_t batch) const {
  const double state = training_bytes(0);
  return byte_text(training_bytes(batch)) + " (parameters, gradients and optimizer state " +
         byte_text(state) + ", activations for a batch of " + std::to_string(batch) + " " +
         byte_text(training_bytes(batch) - state) + ")";
}

double physical_memory_bytes() {
  return static_cast<double>(::sysconf(_SC_PHYS_PAGES)) * static_cast<double>(::sysconf(_SC_PAGE_SIZE));
}

std::string byte_text(double bytes) {
  const char* units[] = {"bytes", "KB", "MB", "GB", "TB", "PB", "EB"};
  int unit = 0;
  while (bytes >= 1000 && unit < 6) {
    bytes /= 1000;
    ++unit;
  }
  std::ostringstream out;
  out.precision(unit == 0 ? 0 : 3);
  out << bytes << " " << units[unit];
  return out.str();
}

ModelSize ModelSpec::size() const {
  ModelSize total;
  std::vector<int64_t> shape = input_shape;
  try {
    int64_t values = 1;
    for (const int64_t d : shape) values = engine::checked_mul(values, d, "the input's size");
  } catch (const Error& e) {
    throw Error(e.kind(), std::string("model spec: ") + e.what());
  }
  for (size_t i = 0; i < layers.size(); ++i) {
    const detail::LayerKind* kind = detail::find_layer_kind(layers[i].type);
    if (!kind) break;
    try {
      const std::optional<detail::LayerSize> layer = kind->size(layers[i], shape);
      if (!layer) break;
      total.parameters = engine::checked_add(total.parameters, layer->parameters, "the parameter count");
      total.buffers = engine::checked_add(total.buffers, layer->buffers, "the buffer count");
      total.activations = engine::checked_add(total.activations, layer->activations, "the activations");
      shape = layer->output;
    } catch (const Error& e) {
      throw Error(e.kind(), "model spec, layer " + std::to_string(i + 1) + " (" + layers[i].type +
                                "): " + e.what());
    }
  }
  return total;
}

// ---------------------------------------------------------------- the model

Model::Model(const ModelSpec& spec, MemoryFormat format) : spec_(spec), format_(format) {
  const ModelSize size = spec.size();
  if (size.training_bytes(0) > physical_memory_bytes())
    engine::fail_runtime("model spec: its ", size.parameters, " parameters and ", size.buffers,
                         " buffer values need ", byte_text(size.training_bytes(0)),
                         " with their gradients and optimizer state, more than this machine's ",
                         byte_text(physical_memory_bytes()), " of memory");
  std::vector<int64_t> shape = spec.input_shape;
  for (size_t i = 0; i < spec.layers.size(); ++i) {
    try {
      layers_.push_back(detail::make_layer(spec.layers[i], shape, format, i));
      shape = layers_.back()->output_shape(shape);
    } catch (const Error& e) {
      throw Error(e.kind(), "model spec, layer " + std::to_string(i + 1) + ": " + e.what());
    }
  }
  if (shape.size() != 1 || shape[0] < 2)
    engine::fail_invalid("model spec: the last layer must give [classes >= 2] logits");
}

void Model::initialize(const InitOptions& options, uint64_t seed) {
  std::mt19937_64 rng(seed);
  for (auto& layer : layers_) layer->initialize(options, rng);
}

void Model::set_step(uint64_t seed, uint64_t step, int64_t first_sample) {
  for (auto& layer : layers_) {
    layer->set_step(seed, step);
    layer->set_batch_offset(first_sample);
  }
}

const Tensor& Model::forward(const Tensor& x, Mode mode) {
  std::vector<int64_t> expected = {x.shape.empty() ? 0 : x.shape[0]};
  expected.insert(expected.end(), spec_.input_shape.begin(), spec_.input_shape.end());
  if (x.shape != expected || x.shape[0] < 1)
    engine::fail_invalid("model: input shape does not match the spec's input");
  if (static_cast<int64_t>(x.data.size()) != x.numel())
    engine::fail_invalid("model: input holds ", x.data.size(), " values, its shape ",
                                  x.numel());
  // Convolution and pooling read the input in the model's format; with one
  // channel both formats store the same thing.
  if (x.shape.size() == 4 && x.shape[1] > 1 && x.format != format_)
    engine::fail_invalid("model: input is ",
                                  x.format == MemoryFormat::channels_last ? "channels-last" : "channels-first",
                                  ", the model ",
                                  format_ == MemoryFormat::channels_last ? "channels-last" : "channels-first");
  // Whether layer i, in training, is BN + ReLU + 2×2 max pooling that runs in one pass.
  const auto one_pass_tail = [&](size_t i) -> detail::ReluTail* {
    auto* tail = dynamic_cast<detail::ReluTail*>(layers_[i].get());
    const bool fused = mode == Mode::train && tail && i + 2 < layers_.size() &&
                       layers_[i + 1]->type() == "relu" && tail->fuses_relu_max_pool() &&
                       detail::is_max_pool_2x2(*layers_[i + 2]);
    return fused ? tail : nullptr;
  };
  const Tensor* current = &x;
  for (size_t i = 0; i < layers_.size(); ++i) {
    auto* maker = dynamic_cast<detail::RecomputedOutput*>(layers_[i].get());
    detail::ReluTail* next_tail =
        maker && maker->recomputes_output() && i + 1 < layers_.size() ? one_pass_tail(i + 1)
                                                                      : nullptr;
    if (next_tail) {
      const std::vector<int64_t> shape = maker->forward_without_output(*current);
      current = &next_tail->forward_relu_max_pool_of(*maker, shape, format_);
      i += 3;  // the BN, relu and pooling: done
      continue;
    }
    auto* tail = one_pass_tail(i);
    if (tail) {
      current = &tail->forward_relu_max_pool(*current);
      i += 2;  // the relu and the pooling: done
      continue;
    }
    const bool relu_next = i + 1 < layers_.size() && layers_[i + 1]->type() == "relu";
    tail = dynamic_cast<detail::ReluTail*>(layers_[i].get());
    if (mode == Mode::train && tail && relu_next && tail->fuses_relu()) {
      current = &tail->forward_relu(*current);
      ++i;  // the relu: done
      continue;
    }
    auto* pool = i + 1 < layers_.size() ? dynamic_cast<detail::MaxPoolAfterRelu*>(layers_[i + 1].get())
                                        : nullptr;
    if (mode == Mode::train && layers_[i]->type() == "relu" && pool && pool->takes_relu()) {
      current = &pool->forward_after_relu(*current);
      ++i;  // the pooling: done
      continue;
    }
    current = &layers_[i]->forward(*current, mode);
  }
  return *current;
}

void Model::backward(const Tensor& dlogits) {
  // The input takes no gradient, so neither do the parameter-free layers at the
  // front (mlp-paper's flatten): the first layer with parameters computes no dx.
  size_t first = 0;
  while (first < layers_.size() && layers_[first]->parameters().empty()) ++first;
  const Tensor* grad = &dlogits;
  for (size_t i = layers_.size(); i-- > first;) {
    // Layer i - 1 ran with this relu in one pass (its last forward was
    // Model::forward's, not a probe's layer by layer): so does the backward.
    auto* pooled = i > 1 ? dynamic_cast<detail::ReluTail*>(layers_[i - 2].get()) : nullptr;
    if (pooled && pooled->ran_with_max_pool() && layers_[i]->type() == "maxpool") {
      i -= 2;
      // A layer before it that takes dL/dx in chunks gets it so, each chunk
      // made as it is used.
      auto* taker = i > first ? dynamic_cast<detail::TakesGradientInChunks*>(layers_[i - 1].get())
                              : nullptr;
      if (taker) {
        pooled->begin_backward_relu(*grad);
        --i;
        const auto chunk = [pooled](int64_t from, int64_t count, float* dx) {
          pooled->input_grad_of(from, count, dx);
        };
        grad = &taker->backward_in_chunks(chunk, i > first);
        continue;
      }
      grad = &pooled->backward_relu(*grad, i > first);
      continue;
    }
    auto* pool = dynamic_cast<detail::MaxPoolAfterRelu*>(layers_[i].get());
    if (pool && pool->ran_after_relu() && i > 0 && layers_[i - 1]->type() == "relu") {
      --i;  // the relu's backward is the pooling's
      grad = &layers_[i + 1]->backward(*grad, i > first);
      continue;
    }
    auto* tail = i > 0 ? dynamic_cast<detail::ReluTail*>(layers_[i - 1].get()) : nullptr;
    if (tail && tail->ran_with_relu() && layers_[i]->type() == "relu") {
      --i;
      grad = &tail->backward_relu(*grad, i > first);
      continue;
    }
    grad = &layers_[i]->backward(*grad, i > first);
  }
}

namespace {
// Records frozen=1 on every layer spec that takes it (the batch-norm layers),
// inside residual blocks too; returns how many.
int mark_frozen(std::vector<ModelSpec::LayerSpec>& layers) {
  int frozen = 0;
  for (auto& layer : layers) {
    const detail::LayerKind* kind = detail::find_layer_kind(layer.type);
    if (kind && std::find(kind->options.begin(), kind->options.end(), "frozen") != kind->options.end()) {
      layer.options.insert_or_assign("frozen", std::string("1"));
      ++frozen;
    }
    frozen += mark_frozen(layer.body) + mark_frozen(layer.shortcut);
  }
  return frozen;
}

// Whether `layers` (residual blocks' bodies and shortcuts included) have a layer of `type`.
bool has_layer(const std::vector<ModelSpec::LayerSpec>& layers, const std::string& type) {
  return std::any_of(layers.begin(), layers.end(), [&](const ModelSpec::LayerSpec& layer) {
    return layer.type == type || has_layer(layer.body, type) || has_layer(layer.shortcut, type);
  });
}
}  // namespace

int Model::freeze_batch_norm() {
  for (auto& layer : layers_) layer->set_frozen(true);
  return mark_frozen(spec_.layers);
}

int Model::synchronize_batch_norm(dist::Communicator* group) {
  if (group && has_layer(spec_.layers, "batchrenorm"))
    engine::fail_invalid("batchrenorm: batch renormalization has no synchronized form; "
                         "train it with each rank's own statistics (synchronized BN off)");
  int synchronized = 0;
  for (auto& layer : layers_) synchronized += layer->set_batch_sync(group);
  return synchronized;
}

void Model::zero_grad() {
  for (auto* p : parameters()) std::fill(p->grad.begin(), p->grad.end(), 0.0f);
}

std::vector<Parameter*> Model::parameters() {
  std::vector<Parameter*> out;
  for (auto& layer : layers_)
    for (auto* p : layer->parameters()) out.push_back(p);
  return out;
}

std::vector<std::pair<std::string, std::vector<float>*>> Model::state() {
  std::vector<std::pair<std::string, std::vector<float>*>> out;
  for (size_t i = 0; i < layers_.size(); ++i) {
    for (auto* p : layers_[i]->parameters())
      out.emplace_back(std::to_string(i) + "." + p->name, &p->value);
    for (auto& b : layers_[i]->buffers()) out.emplace_back(std::to_string(i) + "." + b.name, b.values);
  }
  return out;
}

int64_t Model::parameter_count() {
  int64_t n = 0;
  for (auto* p : parameters()) n += static_cast<int64_t>(p->value.size());
  return n;
}

std::string Model::summary() {
  std::ostringstream out;
  std::vector<int64_t> shape = spec_.input_shape;
  auto text = [](const std::vector<int64_t>& s) {
    std::string t = "[";
    for (size_t i = 0; i < s.size(); ++i) t += (i ? ", " : "") + std::to_string(s[i]);
    return t + "]";
  };
  out << "input " << text(shape) << "\n";
  for (size_t i = 0; i < layers_.size(); ++i) {
    shape = layers_[i]->output_shape(shape);
    int64_t params = 0;
    for (auto* p : layers_[i]->parameters()) params += static_cast<int64_t>(p->value.size());
    out << "  " << i << "  " << layers_[i]->describe() << "  -> " << text(shape);
    if (params) out << "  (" << params << " parameters)";
    out << "\n";
  }
  out << "parameters: " << parameter_count() << "\n";
  return out.str();
}

}  // namespace normkit::nn
