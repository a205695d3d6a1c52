// The residual block: y = relu(body(x) + shortcut(x)), the shortcut the identity
// unless the spec gives one (a projection: conv 1×1 with a stride, its BN).
//
// When the body ends in a batchnorm layer, its BN, the addition and the ReLU
// are one pass of the library's fused batch_norm_add_relu kernels, with the
// ReLU mask kept as bits (batch_norm_fused.hpp); otherwise (no normalization,
// or one without a fused kernel) the sum and the ReLU are computed here.
#include <algorithm>
#include <sstream>

#include "nn/layers.hpp"
#include "support.hpp"

namespace normkit::nn::detail {

using engine::fail_invalid;
using engine::parallel_for;
using engine::parallel_region;
using engine::threads_for;

namespace {

using Layers = std::vector<std::unique_ptr<Layer>>;

// The layers of `specs` for `shape` (updated to their output shape); their
// parameters and buffers are named "<prefix>.<j>.<name>".
Layers build_sequence(const std::vector<ModelSpec::LayerSpec>& specs, std::vector<int64_t>& shape,
                      MemoryFormat format, size_t index, const std::string& prefix) {
  Layers layers;
  for (size_t j = 0; j < specs.size(); ++j) {
    try {
      // Distinct indices keep the randomness (dropout) of the block's layers apart.
      layers.push_back(make_layer(specs[j], shape, format, (index + 1) * 1000 + j + (prefix == "shortcut" ? 500 : 0)));
      shape = layers.back()->output_shape(shape);
    } catch (const Error& e) {
      throw Error(e.kind(), engine::concat("residual ", prefix, ", layer ", j + 1, ": ", e.what()));
    }
    for (Parameter* p : layers.back()->parameters()) p->name = prefix + "." + std::to_string(j) + "." + p->name;
  }
  return layers;
}

const Tensor& forward_sequence(Layers& layers, const Tensor& x, Mode mode) {
  const Tensor* current = &x;
  for (auto& layer : layers) current = &layer->forward(*current, mode);
  return *current;
}

// Backward through `layers` from `dy`; the first layer computes dx only when
// need_input_grad (then the result is dL/dx, else an empty tensor).
const Tensor& backward_sequence(Layers& layers, const Tensor& dy, bool need_input_grad) {
  const Tensor* grad = &dy;
  for (size_t i = layers.size(); i-- > 0;) grad = &layers[i]->backward(*grad, i > 0 || need_input_grad);
  return *grad;
}

class Residual final : public Layer {
 public:
  Residual(const ModelSpec::LayerSpec& spec, const std::vector<int64_t>& input, MemoryFormat format,
           size_t index)
      : input_shape_(input) {
    if (spec.body.empty()) fail_invalid("residual: the block has no layers");
    std::vector<int64_t> body_shape = input, shortcut_shape = input;
    body_ = build_sequence(spec.body, body_shape, format, index, "body");
    shortcut_ = build_sequence(spec.shortcut, shortcut_shape, format, index, "shortcut");
    if (body_shape != shortcut_shape)
      fail_invalid("residual: the body gives ", shape_text(body_shape), ", the ",
                   shortcut_.empty() ? "identity shortcut " : "shortcut ", shape_text(shortcut_shape),
                   shortcut_.empty() ? " (give a 'shortcut' that matches, e.g. conv C 1 stride=S bias=0; batchnorm)"
                                     : "");
    output_shape_ = body_shape;
    tail_ = dynamic_cast<AddReluTail*>(body_.back().get());
  }
  std::string type() const override { return "residual"; }
  std::string describe() const override {
    std::ostringstream s;
    s << "residual(";
    for (size_t j = 0; j < body_.size(); ++j) s << (j ? ", " : "") << body_[j]->describe();
    s << (fused() ? " + add + relu, fused" : "; + add, relu");
    s << "; shortcut ";
    if (shortcut_.empty()) s << "identity";
    for (size_t j = 0; j < shortcut_.size(); ++j) s << (j ? ", " : "") << shortcut_[j]->describe();
    s << ")";
    return s.str();
  }
  std::vector<int64_t> output_shape(const std::vector<int64_t>& input) const override {
    if (input != input_shape_)
      fail_invalid("residual: expected input ", shape_text(input_shape_), ", got ", shape_text(input));
    return output_shape_;
  }

  const Tensor& forward(const Tensor& x, Mode mode) override {
    const Tensor& z = shortcut_.empty() ? x : forward_sequence(shortcut_, x, mode);
    // The body up to its tail; with a fused tail, its last layer runs with the sum.
    // (Whether it fuses is asked at every forward: noise and synchronization are set later.)
    fused_ = fused();
    const Tensor* h = &x;
    const size_t plain = body_.size() - (fused_ ? 1 : 0);
    for (size_t j = 0; j < plain; ++j) h = &body_[j]->forward(*h, mode);
    if (h->shape != z.shape || h->format != z.format)
      fail_invalid("residual: body and shortcut outputs differ in shape or memory format");
    if (fused_) return tail_->forward_add_relu(*h, z, mode);
    y_.reshape(h->shape, h->format);
    const int64_t total = y_.numel();
    const float* a = h->data.data();
    const float* b = z.data.data();
    float* y = y_.data.data();
    parallel_for(threads_for(total), total,
                 [&](int64_t i) { y[i] = std::max(a[i] + b[i], 0.0f); });
    return y_;
  }

  const Tensor& backward(const Tensor& dy, bool need_input_grad) override {
    // g = dL/d(body + shortcut): the fused tail gives the body's gradient below
    // its BN, and g itself for the shortcut.
    const Tensor* body_grad = nullptr;
    const Tensor* shortcut_grad = nullptr;
    const size_t plain = body_.size() - (fused_ ? 1 : 0);
    if (fused_) {
      body_grad = &tail_->backward_add_relu(dy, plain > 0 || need_input_grad, g_);
      shortcut_grad = &g_;
    } else {
      g_.reshape(dy.shape, dy.format);
      const int64_t total = g_.numel();
      parallel_for(threads_for(total), total,
                   [&](int64_t i) { g_.data[i] = y_.data[i] > 0.0f ? dy.data[i] : 0.0f; });
      body_grad = shortcut_grad = &g_;
    }
    // The body below the tail.
    for (size_t j = plain; j-- > 0;) body_grad = &body_[j]->backward(*body_grad, j > 0 || need_input_grad);
    const Tensor& through_shortcut =
        shortcut_.empty() ? *shortcut_grad : backward_sequence(shortcut_, *shortcut_grad, need_input_grad);
    if (!need_input_grad) {
      dx_.reshape({}, dy.format);
      return dx_;
    }
    dx_.reshape(body_grad->shape, body_grad->format);
    const int64_t total = dx_.numel();
    const float* a = body_grad->data.data();
    const float* b = through_shortcut.data.data();
    parallel_for(threads_for(total), total, [&](int64_t i) { dx_.data[i] = a[i] + b[i]; });
    return dx_;
  }

  std::vector<Parameter*> parameters() override {
    std::vector<Parameter*> out;
    for (const Layers* layers : {&body_, &shortcut_})
      for (auto& layer : *layers)
        for (Parameter* p : layer->parameters()) out.push_back(p);
    return out;
  }
  std::vector<Buffer> buffers() override {
    std::vector<Buffer> out;
    for (const auto& [layers, prefix] : {std::pair{&body_, "body"}, std::pair{&shortcut_, "shortcut"}})
      for (size_t j = 0; j < layers->size(); ++j)
        for (Buffer b : (*layers)[j]->buffers()) {
          b.name = std::string(prefix) + "." + std::to_string(j) + "." + b.name;
          out.push_back(b);
        }
    return out;
  }
  void initialize(const InitOptions& init, std::mt19937_64& rng) override {
    for (Layers* layers : {&body_, &shortcut_})
      for (auto& layer : *layers) layer->initialize(init, rng);
  }
  void set_step(uint64_t seed, uint64_t step) override {
    for (Layers* layers : {&body_, &shortcut_})
      for (auto& layer : *layers) layer->set_step(seed, step);
  }
  bool set_frozen(bool frozen) override {
    bool any = false;
    for (Layers* layers : {&body_, &shortcut_})
      for (auto& layer : *layers) any = layer->set_frozen(frozen) || any;
    return any;
  }
  void set_batch_offset(int64_t first_sample) override {
    for (Layers* layers : {&body_, &shortcut_})
      for (auto& layer : *layers) layer->set_batch_offset(first_sample);
  }
  int set_batch_sync(dist::Communicator* group) override {
    int synchronized = 0;
    for (Layers* layers : {&body_, &shortcut_})
      for (auto& layer : *layers) synchronized += layer->set_batch_sync(group);
    return synchronized;
  }

 private:
  bool fused() const { return tail_ && tail_->fuses_add_relu(); }

  std::vector<int64_t> input_shape_, output_shape_;
  Layers body_, shortcut_;
  AddReluTail* tail_ = nullptr;  // body_.back() when it has a fused BN+Add+ReLU form
  bool fused_ = false;           // the last forward used it (backward follows it)
  Tensor y_, g_, dx_;
};

}  // namespace

std::unique_ptr<Layer> make_residual(const ModelSpec::LayerSpec& spec, const std::vector<int64_t>& input,
                                     MemoryFormat format, size_t index) {
  return std::make_unique<Residual>(spec, input, format, index);
}

}  // namespace normkit::nn::detail
