// The engine's 2-d convolution on oneDNN's convolution primitives (forward,
// backward data, backward weights): channels-last images as they are,
// channels-first ones through oneDNN's blocked layout (make_plan says why).
//
// Determinism (onednn.hpp): one-thread primitives on fixed chunks of samples
// (kChunkSamples, or kRecomputedSamples after forward_without_output; the
// batch's last chunk may be shorter), spread over normkit's
// threads; the weight gradient of each chunk is kept apart and the chunks are
// added in chunk order. So the bits depend on the batch size, never on the
// thread count.
//
// Measured against the im2col + sgemm this replaced (cnn-small, batch 128,
// channels-last, one thread, CPU ms per step): conv 1 -> 32 forward 1.0 vs 3.3,
// weight gradient 0.9 vs 1.7; conv 32 -> 64 forward 5.3 vs 8.7, data gradient
// 5.8 vs 8.0, weight gradient 5.9 vs 6.2 (and 29 MB of im2col columns less).
#include <algorithm>
#include <optional>
#include <sstream>
#include <string_view>
#include <unordered_map>

#include "nn/layers.hpp"
#include "nn/onednn.hpp"
#include "normkit/threading.hpp"
#include "support.hpp"

namespace normkit::nn::detail {

using engine::fail_invalid;
using engine::fail_runtime;

namespace {

// Samples per chunk: the unit of work of a thread and of the weight-gradient sums.
constexpr int64_t kChunkSamples = kConvChunkSamples;

using dnnl::memory;
using tag = dnnl::memory::format_tag;

// Square kernel, zero padding; W: [out, in, k, k] (PyTorch's OIHW) in both
// formats, the layout of parameters and checkpoints; oneDNN's own weight
// layouts are reordered from and to it at each step.
class Conv2d final : public Layer, public TakesGradientInChunks, public RecomputedOutput {
 public:
  Conv2d(const std::vector<int64_t>& input, int64_t out, int64_t k, int64_t stride, int64_t pad,
         bool bias, MemoryFormat format)
      : cin_(input[0]), h_(input[1]), w_(input[2]), cout_(out), k_(k), stride_(stride), pad_(pad),
        format_(format) {
    oh_ = window_positions(h_ + 2 * pad_, k_, stride_);
    ow_ = window_positions(w_ + 2 * pad_, k_, stride_);
    const int64_t size = cout_ * cin_ * k_ * k_;
    weight_ = {"weight", std::vector<float>(size), std::vector<float>(size)};
    if (bias) bias_ = Parameter{"bias", std::vector<float>(cout_), std::vector<float>(cout_)};
  }
  std::string type() const override { return "conv"; }
  std::string describe() const override {
    std::ostringstream s;
    s << "conv(" << cin_ << " -> " << cout_ << ", " << k_ << "x" << k_ << ", stride " << stride_
      << ", pad " << pad_ << (bias_ ? ", bias" : ", no bias") << ")";
    return s.str();
  }
  std::vector<int64_t> output_shape(const std::vector<int64_t>& input) const override {
    if (input.size() != 3 || input[0] != cin_ || input[1] != h_ || input[2] != w_)
      fail_invalid(describe(), ": expected input [", cin_, ", ", h_, ", ", w_, "], got ",
                   shape_text(input));
    return {cout_, oh_, ow_};
  }
  const Tensor& forward(const Tensor& x, Mode mode) override {
    input_ = &x;
    without_output_ = false;
    const int64_t n = x.shape[0];
    y_.reshape({n, cout_, oh_, ow_}, format_);
    kept_src_.keep(mode == Mode::train, plan(std::min(n, kChunkSamples)), n);
    try {
      for (Plan* p : plans_for(n, kChunkSamples))
        p->reorder_weights(weight_.value, Plan::Weights::forward);
      for_each_sample_chunk(n, [&](int64_t first, int64_t samples, Buffers& buffers) {
        forward_chunk(first, samples, y_.data.data() + first * cout_ * oh_ * ow_, buffers,
                      kept_src_.valid);
      });
    } catch (const dnnl::error& e) {
      fail_runtime(describe(), ": oneDNN forward failed: ", e.what());
    }
    return y_;
  }
  // Worth it with few multiply-adds per output: cnn-small's conv 1 -> 32 (9)
  // computes a 16-sample chunk in 98 us hot on one core, and spent 352 us
  // writing it to memory (oneDNN's verbose log, in training); its 32 -> 64
  // (288) takes 690 us hot.
  bool recomputes_output() const override { return cin_ * k_ * k_ <= 16; }
  std::vector<int64_t> forward_without_output(const Tensor& x) override {
    std::vector<int64_t> shape = {x.shape.at(0), cout_, oh_, ow_};
    output_shape({x.shape.begin() + 1, x.shape.end()});  // checks x
    input_ = &x;
    without_output_ = true;
    kept_src_.valid = false;
    y_.reshape(shape, format_);  // the shape backward(dy) checks; its values are not written
    recompute_buffers_.resize(std::max<size_t>(recompute_buffers_.size(), num_threads()));
    try {
      for (Plan* p : plans_for(x.shape[0], kRecomputedSamples))
        p->reorder_weights(weight_.value, Plan::Weights::forward);
    } catch (const dnnl::error& e) {
      fail_runtime(describe(), ": oneDNN forward failed: ", e.what());
    }
    return shape;
  }
  bool output_recomputed() const override { return without_output_; }
  void output_of(int64_t first, int64_t count, float* y) override {
    try {
      Buffers& buffers = recompute_buffers_.at(static_cast<size_t>(omp_get_thread_num()));
      forward_chunk(first, count, y, buffers, false);
    } catch (const dnnl::error& e) {
      fail_runtime(describe(), ": oneDNN forward failed: ", e.what());
    }
  }
  const Tensor& backward(const Tensor& dy, bool need_input_grad) override {
    if (!input_ || dy.shape != y_.shape || dy.data.size() != y_.data.size())
      fail_invalid(describe(), ": dy ", shape_text(dy.shape),
                   " is not the shape of the last forward's output");
    return backward_from(dy.data.data(), nullptr, need_input_grad);
  }
  const Tensor& backward_in_chunks(const GradientChunk& chunk, bool need_input_grad) override {
    return backward_from(nullptr, &chunk, need_input_grad);
  }
  std::vector<Parameter*> parameters() override {
    if (bias_) return {&weight_, &*bias_};
    return {&weight_};
  }
  void initialize(const InitOptions& init, std::mt19937_64& rng) override {
    fill_init(weight_.value, cin_ * k_ * k_, cout_ * k_ * k_, init, rng);
    if (bias_) std::fill(bias_->value.begin(), bias_->value.end(), 0.0f);
  }

 private:
  // The backward, dL/dy read from dy (the whole batch's) or made chunk by chunk.
  const Tensor& backward_from(const float* dy, const GradientChunk* make, bool need_input_grad) {
    const Tensor& x = *input_;
    const int64_t n = x.shape[0], per = chunk_samples(), chunks = (n + per - 1) / per;
    const size_t weight_size = weight_.value.size();
    partial_weights_.resize(weight_size * static_cast<size_t>(chunks));
    partial_bias_.resize(bias_ ? static_cast<size_t>(cout_ * chunks) : 0);
    const bool replan = need_input_grad && !input_grad_;
    // output_of runs inside these chunks too: one buffer per thread now.
    if (without_output_)
      recompute_buffers_.resize(std::max<size_t>(recompute_buffers_.size(), num_threads()));
    if (replan) {
      input_grad_ = true;  // the plans may choose another layout now (make_plan)
      plans_.clear();
      kept_src_.valid = false;
    }
    try {
      if (need_input_grad) {
        dx_.reshape({n, cin_, h_, w_}, format_);
        for (Plan* p : plans_for(n, per))
          p->reorder_weights(weight_.value, Plan::Weights::backward_data);
      }
      // After forward_without_output the chunks' dy comes from output_of, on
      // the pieces' plans (per is a piece): new ones lack the forward weights.
      if (replan && without_output_)
        for (Plan* p : plans_for(n, per)) p->reorder_weights(weight_.value, Plan::Weights::forward);
      for_each_sample_chunk(n, [&](int64_t first, int64_t samples, Buffers& buffers) {
        Plan& p = plan(samples);
        const int64_t chunk = first / per;
        dnnl::stream stream(cpu_engine());
        memory dy_given = make ? buffers.made(p.dst) : p.dst_at(dy, first);
        if (make) (*make)(first, samples, static_cast<float*>(dy_given.get_data_handle()));
        const memory dy_chunk = buffers.copy_in(Buffers::dst, p.conv_dst, dy_given, stream);
        memory weight_gradient =
            buffers.weight_gradient(p.backward_weights_pd.diff_weights_desc());
        const memory src =
            kept_src_.valid
                ? kept_src_.at(p, first)
                : buffers.copy_in(Buffers::src, p.conv_src, p.src_at(x.data.data(), first), stream);
        std::unordered_map<int, memory> args = {
            {DNNL_ARG_SRC, src},
            {DNNL_ARG_DIFF_DST, dy_chunk},
            {DNNL_ARG_DIFF_WEIGHTS, weight_gradient},
            {DNNL_ARG_SCRATCHPAD, thread_scratchpad(p.backward_weights_pd.scratchpad_desc())}};
        if (bias_)
          args.emplace(DNNL_ARG_DIFF_BIAS,
                       memory(p.bias, cpu_engine(), partial_bias_.data() + cout_ * chunk));
        p.backward_weights_primitive.execute(stream, args);
        memory oihw(p.oihw, cpu_engine(), partial_weights_.data() + weight_size * chunk);
        dnnl::reorder(weight_gradient, oihw).execute(stream, weight_gradient, oihw);
        if (!need_input_grad) return;
        const memory dx_chunk = p.src_at(dx_.data.data(), first);
        const memory diff_src = buffers.in_layout(Buffers::src, p.conv_src, dx_chunk);
        p.backward_data_primitive.execute(
            stream, {{DNNL_ARG_DIFF_DST, dy_chunk},
                     {DNNL_ARG_WEIGHTS, p.weights(Plan::Weights::backward_data)},
                     {DNNL_ARG_DIFF_SRC, diff_src},
                     {DNNL_ARG_SCRATCHPAD, thread_scratchpad(p.backward_data_pd.scratchpad_desc())}});
        Buffers::copy_to(diff_src, dx_chunk, stream);
      });
    } catch (const dnnl::error& e) {
      fail_runtime(describe(), ": oneDNN backward failed: ", e.what());
    }
    // The chunks' partial gradients, added in chunk order.
    for (size_t i = 0; i < weight_size; ++i) {
      float sum = partial_weights_[i];
      for (int64_t chunk = 1; chunk < chunks; ++chunk) sum += partial_weights_[weight_size * chunk + i];
      weight_.grad[i] += sum;
    }
    if (bias_)
      for (int64_t c = 0; c < cout_; ++c) {
        float sum = partial_bias_[c];
        for (int64_t chunk = 1; chunk < chunks; ++chunk) sum += partial_bias_[chunk * cout_ + c];
        bias_->grad[c] += sum;
      }
    if (!need_input_grad) dx_.reshape({}, format_);
    return dx_;
  }

  // The one-thread primitives for chunks of `samples` samples, and the
  // weights in the layouts they chose.
  struct Plan {
    enum class Weights { forward, backward_data };
    memory::desc src, dst, bias;  // src and dst in the model's format
    memory::desc conv_src, conv_dst;  // in the primitives' (all three take the same)
    int64_t src_sample, dst_sample;  // floats per sample
    dnnl::convolution_forward::primitive_desc forward_pd;
    dnnl::convolution_backward_data::primitive_desc backward_data_pd;
    dnnl::convolution_backward_weights::primitive_desc backward_weights_pd;
    dnnl::convolution_forward forward_primitive;
    dnnl::convolution_backward_data backward_data_primitive;
    dnnl::convolution_backward_weights backward_weights_primitive;
    memory::desc oihw;
    std::vector<float> weight_values[2];

    // Chunks of a batch starting at sample `first`.
    memory src_at(const float* data, int64_t first) const {
      return memory(src, cpu_engine(), const_cast<float*>(data) + first * src_sample);
    }
    memory dst_at(const float* data, int64_t first) const {
      return memory(dst, cpu_engine(), const_cast<float*>(data) + first * dst_sample);
    }
    memory::desc weights_desc(Weights which) const {
      return which == Weights::forward ? forward_pd.weights_desc()
                                       : backward_data_pd.weights_desc();
    }
    memory weights(Weights which) {
      std::vector<float>& values = weight_values[static_cast<int>(which)];
      values.resize(weights_desc(which).get_size() / sizeof(float));
      return memory(weights_desc(which), cpu_engine(), values.data());
    }
    // Whether a primitive the layer runs is oneDNN's reference implementation
    // (plain loops, hundreds of times slower than its JIT kernels).
    bool runs_reference_loops(bool with_input_grad) const {
      const auto reference = [](const auto& pd) {
        return std::string_view(pd.impl_info_str()).starts_with("ref");
      };
      return reference(forward_pd) || reference(backward_weights_pd) ||
             (with_input_grad && reference(backward_data_pd));
    }
    // OIHW weights into the layout of `which`.
    void reorder_weights(const std::vector<float>& oihw_values, Weights which) {
      memory from(oihw, cpu_engine(), const_cast<float*>(oihw_values.data()));
      memory to = weights(which);
      dnnl::stream stream(cpu_engine());
      OneThread one_thread;
      dnnl::reorder(from, to).execute(stream, from, to);
    }
  };

  // The plans a batch of n samples uses in chunks of `per`: full ones, and a shorter last one.
  std::vector<Plan*> plans_for(int64_t n, int64_t per) {
    std::vector<Plan*> out = {&plan(std::min(n, per))};
    if (n > per && n % per) out.push_back(&plan(n % per));
    return out;
  }
  // A thread's own buffers: a chunk's weight gradient in oneDNN's layout
  // (before it is reordered into the chunk's OIHW partial), and a chunk's
  // images in the primitives' layout when it is not the model's. in_layout()
  // gives `image` itself when it already is in layout `want`, else the
  // thread's buffer for that role (src: x, then dx in backward, once the
  // weight gradient is done with x; dst: y, or dy); copy_in() also copies
  // image's values there; copy_to() copies one image into another (a
  // result back, or x into the room kept for the backward); made() is room
  // for a chunk's dy in the model's layout, made by backward_in_chunks' source.
  struct Buffers {
    enum Role { src, dst };
    std::vector<char> gradient_bytes;
    std::vector<float> images[2], made_values;
    memory made(const memory::desc& desc) {
      made_values.resize(desc.get_size() / sizeof(float));
      return memory(desc, cpu_engine(), made_values.data());
    }
    memory weight_gradient(const memory::desc& desc) {
      if (gradient_bytes.size() < desc.get_size()) gradient_bytes.resize(desc.get_size());
      return memory(desc, cpu_engine(), gradient_bytes.data());
    }
    memory in_layout(Role role, const memory::desc& want, const memory& image) {
      if (want == image.get_desc()) return image;
      std::vector<float>& values = images[role];
      values.resize(want.get_size() / sizeof(float));
      return memory(want, cpu_engine(), values.data());
    }
    memory copy_in(Role role, const memory::desc& want, memory image, const dnnl::stream& stream) {
      return copy_to(image, in_layout(role, want, image), stream);
    }
    // `to` with image's values, unless it is image itself.
    static memory copy_to(memory image, memory to, const dnnl::stream& stream) {
      if (to.get_data_handle() != image.get_data_handle())
        dnnl::reorder(image, to).execute(stream, image, to);
      return to;
    }
  };

  // Forward of the `samples` samples of x from `first` into y (the model's
  // layout), with a thread's buffers; keep: x's room in kept_src_ (the
  // primitives' layout, for the backward).
  void forward_chunk(int64_t first, int64_t samples, float* y, Buffers& buffers, bool keep) {
    Plan& p = plan(samples);
    dnnl::stream stream(cpu_engine());
    const memory y_chunk(p.dst, cpu_engine(), y);
    const memory dst = buffers.in_layout(Buffers::dst, p.conv_dst, y_chunk);
    const memory x_chunk = p.src_at(input_->data.data(), first);
    const memory src = Buffers::copy_to(
        x_chunk,
        keep ? kept_src_.at(p, first) : buffers.in_layout(Buffers::src, p.conv_src, x_chunk),
        stream);
    std::unordered_map<int, memory> args = {
        {DNNL_ARG_SRC, src},
        {DNNL_ARG_WEIGHTS, p.weights(Plan::Weights::forward)},
        {DNNL_ARG_DST, dst},
        {DNNL_ARG_SCRATCHPAD, thread_scratchpad(p.forward_pd.scratchpad_desc())}};
    if (bias_) args.emplace(DNNL_ARG_BIAS, memory(p.bias, cpu_engine(), bias_->value.data()));
    p.forward_primitive.execute(stream, args);
    Buffers::copy_to(dst, y_chunk, stream);
  }
  Plan& plan(int64_t samples) {
    return plans_.get(samples, [&] { return make_plan(samples); });
  }
  Plan make_plan(int64_t samples) const {
    if (format_ == MemoryFormat::channels_last) return make_plan(samples, tag::nhwc);
    // Channels-first images are reordered, chunk by chunk, into a layout the
    // primitives run fast on (Buffers): oneDNN's NCHW kernels took 1.6-2x as
    // long as that, reorders included (cnn-small: conv 32 -> 64 forward
    // 6.9-7.4 against 4.3 ms a step, backward 16.1-17.9 against 8.5-8.9).
    // First the layout they pick (blocks of 16 channels). But with 3 to 12
    // input channels oneDNN 2.6 has no fast backward for the layout its
    // forward picks, and falls back to its reference loops: 8 -> 16 channels,
    // 28x28, 16 samples took 955 ms against 0.7 ms in channels-last. Then
    // channels-last it is. The data gradient counts only once a backward has
    // asked for it: a first layer's (cnn-small's conv 1 -> 32) never does, and
    // there blocks run its forward in 254 us against 498 channels-last.
    Plan plan = make_plan(samples, tag::any);
    if (plan.runs_reference_loops(input_grad_)) plan = make_plan(samples, tag::nhwc);
    return plan;
  }
  // The plan with the primitives' images in layout `conv_tag` (tag::any: their
  // choice); the model's images are in its own format.
  Plan make_plan(int64_t samples, tag conv_tag) const {
    const tag image_tag = format_ == MemoryFormat::channels_last ? tag::nhwc : tag::nchw;
    const auto f32 = memory::data_type::f32;
    const memory::desc src({samples, cin_, h_, w_}, f32, image_tag);
    const memory::desc dst({samples, cout_, oh_, ow_}, f32, image_tag);
    const memory::desc any_src(src.dims(), f32, conv_tag);
    const memory::desc any_dst(dst.dims(), f32, conv_tag);
    const memory::desc weights({cout_, cin_, k_, k_}, f32, tag::any);
    const memory::desc bias = bias_ ? memory::desc({cout_}, f32, tag::x) : memory::desc();
    const memory::dims strides = {stride_, stride_}, padding = {pad_, pad_};
    const auto direct = dnnl::algorithm::convolution_direct;
    const dnnl::primitive_attr attr = user_scratchpad();
    OneThread one_thread;
    dnnl::convolution_forward::primitive_desc forward_pd(
        {dnnl::prop_kind::forward_training, direct, any_src, weights, bias, any_dst, strides,
         padding, padding},
        attr, cpu_engine());
    // The backward primitives take the forward's layouts, so that one reorder
    // of a chunk's dy serves both.
    const memory::desc conv_src = forward_pd.src_desc(), conv_dst = forward_pd.dst_desc();
    dnnl::convolution_backward_data::primitive_desc backward_data_pd(
        {direct, conv_src, weights, conv_dst, strides, padding, padding}, attr, cpu_engine(),
        forward_pd);
    dnnl::convolution_backward_weights::primitive_desc backward_weights_pd(
        {direct, conv_src, weights, bias, conv_dst, strides, padding, padding}, attr, cpu_engine(),
        forward_pd);
    return {src, dst, bias, conv_src, conv_dst, cin_ * h_ * w_, cout_ * oh_ * ow_, forward_pd,
            backward_data_pd, backward_weights_pd, dnnl::convolution_forward(forward_pd),
            dnnl::convolution_backward_data(backward_data_pd),
            dnnl::convolution_backward_weights(backward_weights_pd),
            memory::desc({cout_, cin_, k_, k_}, f32, tag::oihw), {}};
  }

  // Samples per chunk: after forward_without_output a piece's, so that the
  // backward's dy, made from the recomputed output, stays in cache too.
  int64_t chunk_samples() const { return without_output_ ? kRecomputedSamples : kChunkSamples; }
  // Runs body(first sample, samples, the thread's buffers) for each chunk of the batch.
  template <class Body>
  void for_each_sample_chunk(int64_t n, const Body& body) {
    const int64_t per = chunk_samples(), chunks = (n + per - 1) / per;
    buffers_.resize(std::max<size_t>(buffers_.size(), static_cast<size_t>(num_threads())));
    for_each_chunk(chunks, [&](int64_t chunk, int thread) {
      const int64_t first = chunk * per;
      body(first, std::min(per, n - first), buffers_[static_cast<size_t>(thread)]);
    });
  }

  int64_t cin_, h_, w_, cout_, k_, stride_, pad_, oh_ = 0, ow_ = 0;
  MemoryFormat format_;
  Parameter weight_;
  std::optional<Parameter> bias_;
  const Tensor* input_ = nullptr;
  Tensor y_, dx_;
  // The last training forward's x in the primitives' layout, chunk after
  // chunk (each in the room of a full one), when that is not the model's:
  // the backward then reorders only dy (cnn-small, channels-first: 8 chunks
  // of conv 32 -> 64's 16x32x14x14 input, 12-46 us each).
  struct KeptSource {
    bool valid = false;
    size_t room = 0;  // floats per chunk
    std::vector<float> values;
    // Before a forward of n samples whose full chunks run `full`.
    void keep(bool training, const Plan& full, int64_t n) {
      valid = training && full.conv_src != full.src;
      if (!valid) return;
      room = full.conv_src.get_size() / sizeof(float);
      values.resize(room * static_cast<size_t>((n + kChunkSamples - 1) / kChunkSamples));
    }
    memory at(const Plan& p, int64_t first) {
      const auto chunk = static_cast<size_t>(first / kChunkSamples);
      return memory(p.conv_src, cpu_engine(), values.data() + room * chunk);
    }
  } kept_src_;
  bool input_grad_ = false;  // a backward has asked for dx
  bool without_output_ = false;  // the last forward was forward_without_output
  Cache<Plan> plans_;        // by samples per chunk
  std::vector<float> partial_weights_, partial_bias_;  // per chunk: OIHW, then the bias
  std::vector<Buffers> buffers_;                       // per thread
  // per thread, output_of's: it also runs inside a backward chunk, whose buffers are in use
  std::vector<Buffers> recompute_buffers_;
};

}  // namespace

std::unique_ptr<Layer> make_conv_layer(const std::vector<int64_t>& input, int64_t out, int64_t k,
                                       int64_t stride, int64_t pad, bool bias, MemoryFormat format) {
  return std::make_unique<Conv2d>(input, out, k, stride, pad, bias, format);
}

}  // namespace normkit::nn::detail
