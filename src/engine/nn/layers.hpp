#pragma once
// Layer implementations; Model builds them from a ModelSpec.
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "normkit/engine/nn.hpp"

namespace normkit::nn::detail {

// The one registry of layer types: what the model spec accepts for each type
// (spec.cpp checks arguments and options against it) and how make_layer builds
// it. A new layer type is one entry here.
// What one layer takes (ModelSize's terms) and gives, from its spec and input
// shape alone.
struct LayerSize {
  std::vector<int64_t> output;  // shape without N
  int64_t parameters = 0, buffers = 0, activations = 0;
};

struct LayerKind {
  const char* type;
  size_t min_args, max_args;
  std::vector<std::string> options;
  bool is_norm;  // a normalization layer: ModelSpec::without_batch_norm drops it
  // The layer for `spec` given its input shape (without N); see make_layer.
  std::unique_ptr<Layer> (*build)(const ModelSpec::LayerSpec& spec,
                                  const std::vector<int64_t>& input_shape, MemoryFormat format,
                                  size_t index);
  // Its sizes, in overflow-checked arithmetic (normkit::Error when one does not
  // fit in 64 bits), without building it; nullopt when the input does not suit
  // the layer (build names the problem). Must agree with what build makes
  // (tests/cpp/test_nn_layers.cpp checks every kind).
  std::optional<LayerSize> (*size)(const ModelSpec::LayerSpec& spec,
                                   const std::vector<int64_t>& input_shape);
};
const std::vector<LayerKind>& layer_kinds();
const LayerKind* find_layer_kind(const std::string& type);  // nullptr: no such type

// Builds the layer for `spec` given its input shape (without N).
// `index` (the layer's position) keeps the randomness of equal layers apart.
std::unique_ptr<Layer> make_layer(const ModelSpec::LayerSpec& spec,
                                  const std::vector<int64_t>& input_shape, MemoryFormat format,
                                  size_t index);

// Positions of a window of k along an extent (padding included), `stride` apart.
inline int64_t window_positions(int64_t extent, int64_t k, int64_t stride) {
  return (extent - k) / stride + 1;
}
// The samples of a chunk of the convolution's work, whose weight gradient it keeps
// apart until the chunks are added in order (conv_layer.cpp).
constexpr int64_t kConvChunkSamples = 16;

// The samples of a piece of a recomputed output (RecomputedOutput): 4 of
// cnn-small's 28x28x32 images are 400 KB, a fifth of a core's L2.
constexpr int64_t kRecomputedSamples = 4;

// A view of images of `shape` ([N, C, H, W]) in `format` at data.
TensorView<const float> image_view(const float* data, const std::vector<int64_t>& shape,
                                   MemoryFormat format);

// "[32, 28, 28]", for messages.
std::string shape_text(const std::vector<int64_t>& shape);
// A spec option as a number, or `fallback` when the spec does not give it;
// int_option_or: a whole number (sizes, steps), |value| <= 10^15.
double option_or(const ModelSpec::LayerSpec& spec, const std::string& key, double fallback);
int64_t int_option_or(const ModelSpec::LayerSpec& spec, const std::string& key, int64_t fallback);
// A positional argument of a spec as a whole number (sizes), |value| <= 10^15.
int64_t int_arg(const std::string& text);

// Fills weights of a layer with `fan_in` inputs and `fan_out` outputs per `init`.
void fill_init(std::vector<float>& w, int64_t fan_in, int64_t fan_out, const InitOptions& init,
               std::mt19937_64& rng);

// Square kernel k, zero padding (conv_layer.cpp).
std::unique_ptr<Layer> make_conv_layer(const std::vector<int64_t>& input, int64_t out, int64_t k,
                                       int64_t stride, int64_t pad, bool bias, MemoryFormat format);

// A layer that can end a residual block: y = relu(layer(x) + z) in one pass
// (batchnorm: batch_norm_add_relu, the ReLU mask kept as bits).
class AddReluTail {
 public:
  virtual ~AddReluTail() = default;
  // Whether it can (noisy BN cannot: its noise comes between the BN and the sum).
  virtual bool fuses_add_relu() const = 0;
  virtual const Tensor& forward_add_relu(const Tensor& x, const Tensor& z, Mode mode) = 0;
  // Writes dz = dL/dz (= dL/d(layer(x) + z) where the ReLU passes) and returns
  // dL/dx (an empty tensor unless need_input_grad); adds the parameter gradients.
  virtual const Tensor& backward_add_relu(const Tensor& dy, bool need_input_grad, Tensor& dz) = 0;
};

// A layer that can apply the ReLU that follows it in the same pass, in training
// (batchnorm: batch_norm_relu, the ReLU mask kept as bits). Model::forward uses
// it for "batchnorm; relu": a separate ReLU reads and writes the activations
// once more forward and twice more backward (cnn-small: 12.8 MB each after its
// first convolution).
class ReluTail {
 public:
  virtual ~ReluTail() = default;
  // Whether it can now (noisy or synchronized BN cannot: the noise or the ranks'
  // sums come between the BN and the ReLU).
  virtual bool fuses_relu() const = 0;
  // y = relu(layer(x)), train mode.
  virtual const Tensor& forward_relu(const Tensor& x) = 0;
  // Whether it can also take the 2×2 max pooling with stride 2 that follows the
  // relu (is_max_pool_2x2; synchronized BN too, whose fuses_relu is false):
  // y = maxpool(relu(layer(x))), and no
  // relu output is written or read again (cnn-small: 12.8 MB written and read
  // forward, and the pooling's dense gradient written and read twice backward).
  virtual bool fuses_relu_max_pool() const = 0;
  virtual const Tensor& forward_relu_max_pool(const Tensor& x) = 0;
  // Whether its last forward was forward_relu or forward_relu_max_pool (not its
  // own forward, as a probe running the layers one by one calls it): backward
  // must then be backward_relu, given dL/dy of that forward's y.
  virtual bool ran_with_relu() const = 0;
  virtual bool ran_with_max_pool() const = 0;
  // dL/dy of relu(layer(x)) (or of its max pooling) -> dL/dx (an empty tensor
  // unless need_input_grad); adds the parameter gradients.
  virtual const Tensor& backward_relu(const Tensor& dy, bool need_input_grad) = 0;
  // backward_relu with dL/dx wanted in chunks of samples, for a layer before
  // it that takes its gradient so (TakesGradientInChunks): begin_backward_relu
  // adds the parameter gradients and makes what dx needs from the whole batch;
  // then input_grad_of writes dL/dx of any samples, on the calling thread,
  // until the next forward. After forward_relu_max_pool (ran_with_max_pool).
  virtual void begin_backward_relu(const Tensor& dy) = 0;
  virtual void input_grad_of(int64_t first, int64_t count, float* dx) const = 0;
  // forward_relu_max_pool of the last forward_without_output of `source`
  // (x of `shape`, [N, C, H, W], in `format`), taken piece by piece: x is
  // never whole. Its backward is backward_relu's.
  virtual const Tensor& forward_relu_max_pool_of(class RecomputedOutput& source,
                                                 const std::vector<int64_t>& shape,
                                                 MemoryFormat format) = 0;
};

// A layer whose training output costs less to compute again, a few samples at
// a time, than to write whole and read back: BN + ReLU + 2×2 max pooling after
// it (ReluTail::forward_relu_max_pool_of) then takes it in pieces of
// kRecomputedSamples samples, each made as it is used, while it is in cache:
// for the moments, for the pooling, and for dx in the backward. cnn-small's
// conv 1 -> 32 (9 multiply-adds an output) wrote 12.8 MB that were read back
// three times.
class RecomputedOutput {
 public:
  virtual ~RecomputedOutput() = default;
  // Whether it pays for this layer now.
  virtual bool recomputes_output() const = 0;
  // A training forward that keeps x and writes no output; returns the output's
  // shape. Its backward (TakesGradientInChunks) is as after forward(), in
  // chunks of a piece's samples.
  virtual std::vector<int64_t> forward_without_output(const Tensor& x) = 0;
  // Whether the last forward was forward_without_output.
  virtual bool output_recomputed() const = 0;
  // The output of samples [first, first + count) of that forward, a piece
  // (kRecomputedSamples samples from a multiple of it, or the batch's last),
  // into y in the model's format; on the calling thread (of a for_each_chunk),
  // until the next forward or parameter update.
  virtual void output_of(int64_t first, int64_t count, float* y) = 0;
};

// A layer whose backward can take dL/dy in chunks of samples, each made just
// before the layer uses it, while it is in cache (conv, from ReluTail): then
// dL/dy is never written whole and read back. cnn-small's BN after its first
// conv: 12.8 MB each way.
class TakesGradientInChunks {
 public:
  virtual ~TakesGradientInChunks() = default;
  // Writes dL/dy of samples [first, first + count) (the layer's output, in
  // the model's format) into dy.
  using GradientChunk = std::function<void(int64_t first, int64_t count, float* dy)>;
  // backward(), dL/dy given by `chunk`.
  virtual const Tensor& backward_in_chunks(const GradientChunk& chunk, bool need_input_grad) = 0;
};

// A max pooling layer that can take the relu before it in the same pass, in
// training (Model::forward, when no batchnorm took both): relu then max pooling
// is max pooling then relu, and a window whose maximum is <= 0 passes no
// gradient, so the relu's output and its backward are never written (cnn-small
// without BN: 12.8 MB each way). Its backward is then that of both.
class MaxPoolAfterRelu {
 public:
  virtual ~MaxPoolAfterRelu() = default;
  virtual bool takes_relu() const = 0;  // max pooling (not average)
  virtual const Tensor& forward_after_relu(const Tensor& x) = 0;  // maxpool(relu(x))
  virtual bool ran_after_relu() const = 0;
};

// A "maxpool 2" layer (2×2 windows, stride 2): what ReluTail can fuse.
bool is_max_pool_2x2(const Layer& layer);

// The pooling half of BN → ReLU → 2×2 max pooling (stride 2) in one pass, in
// either format, given BN's per-channel coefficients as the BN
// kernels fold them (cpu/coefficients.hpp): p = (x - mean_hi)·scale + shift,
// z = max(p, 0) (NaN stays NaN), y = each window's maximum of z by max
// pooling's rule (first of ties, NaN wins). Odd rows and columns left over are
// in no window (floor mode). It keeps per output where the maximum was, or that
// it did not pass the ReLU (no gradient), and the x there.
class ReluMaxPool2x2 {
 public:
  static constexpr uint8_t kNoGradient = 4;  // the window's maximum is <= 0 or NaN
  // x: [N, C, H, W], H, W >= 2; y: [N, C, H/2, W/2] in x's format.
  void forward(const Tensor& x, const float* mean_hi, const float* scale, const float* shift,
               Tensor& y);
  // Backward, dy = dL/dy of the last forward: per channel Σg and Σg·(x - mean)
  // in double, g = dL/dz at the windows' maxima that passed the ReLU (0
  // elsewhere); the same bits on any number of threads.
  void sums(const Tensor& dy, const double* mean, double* sum_g, double* sum_gx) const;
  // dx = a·g + b·(x - mean_hi) + k per channel, g as above.
  struct DxCoefficients {
    const float *mean_hi, *a, *b, *k;  // per channel
  };
  void dx(const Tensor& x, const Tensor& dy, const DxCoefficients& co, Tensor& dx) const;
  // The forward with x given by samples: begin_forward sizes y and what the
  // forward keeps for x of `shape` in `format`; forward_of_samples pools
  // samples [first, first + count), x_samples holding just them, on the
  // calling thread.
  void begin_forward(const std::vector<int64_t>& shape, MemoryFormat format, Tensor& y);
  void forward_of_samples(const float* x_samples, int64_t first, int64_t count,
                          const float* mean_hi, const float* scale, const float* shift,
                          Tensor& y);
  // dx for samples [first, first + count) only, x_samples their x, into `dx`
  // (count samples in x's format), on the calling thread.
  void dx_of_samples(const float* x_samples, const Tensor& dy, const DxCoefficients& co,
                     int64_t first, int64_t count, float* dx) const;
  // The last forward's x: its shape, format, and values per sample.
  const std::vector<int64_t>& input_shape() const { return shape_; }
  MemoryFormat input_format() const { return format_; }
  int64_t sample_size() const { return shape_[1] * shape_[2] * shape_[3]; }

 private:
  // dx's units of work: channels-first planes (i, c), channels-last input rows (i, ih).
  int64_t dx_units_per_sample() const;
  // dx of one unit, x_unit its x.
  void dx_unit(const float* x_unit, const Tensor& dy, const DxCoefficients& co, int64_t unit,
               float* out) const;
  // Forward units: channels-first planes (i, c), channels-last output rows (i, oh).
  int64_t forward_units_per_sample() const;
  void forward_unit(const float* x_sample, int64_t unit, const float* mean_hi, const float* scale,
                    const float* shift, Tensor& y);

  std::vector<int64_t> shape_;  // the last forward's x
  MemoryFormat format_ = MemoryFormat::channels_first;

  std::vector<uint8_t> index_;  // per output: 2·kh + kw of the maximum, or kNoGradient
  std::vector<float> x_at_;     // per output: x at the maximum
  mutable std::vector<double> partials_;
};

// "residual ... [shortcut ...] end" (residual_layer.cpp).
std::unique_ptr<Layer> make_residual(const ModelSpec::LayerSpec& spec, const std::vector<int64_t>& input,
                                     MemoryFormat format, size_t index);

// Layer normalization over all of a sample's features, or with rms RMS
// normalization (no centering, no β) (layer_norm_layer.cpp).
std::unique_ptr<Layer> make_layer_norm(const std::vector<int64_t>& input_shape, double eps,
                                       MemoryFormat format, bool rms = false);
// "batchnorm", "batchrenorm" and "ghostbatchnorm" (batch_norm_layers.cpp).
constexpr int64_t kDefaultRenormWarmup = 500;   // steps over which rmax, dmax reach their values
constexpr int64_t kDefaultGhostBatchSize = 32;  // virtual batch size
// `index` (the layer's position) keeps the noise of noisy BN layers (noise=S) apart.
std::unique_ptr<Layer> make_batch_norm_layer(const ModelSpec::LayerSpec& spec,
                                             const std::vector<int64_t>& input_shape, size_t index);

}  // namespace normkit::nn::detail
