// The engine's layers. Matrix products go through oneDNN's sgemm (gemm.hpp);
// convolution is oneDNN's (conv_layer.cpp); batch normalization is normkit's kernels.
#include "nn/layers.hpp"

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <sstream>
#include <unordered_map>

#include "nn/gemm.hpp"
#include "nn/onednn.hpp"
#include "nn/group_norm_layer.hpp"
#include "support.hpp"

namespace normkit::nn::detail {

using engine::checked_add;
using engine::checked_mul;
using engine::fail_invalid;
using engine::fail_runtime;
using engine::parallel_for;
using engine::parallel_region;
using engine::splitmix64;
using engine::threads_for;

namespace {
// A number of a spec. ModelSpec::parse has checked the words of the specs it
// makes; a spec built in code has not, so a word that is no number is an error
// here rather than std::stod's exception.
double spec_number(const std::string& text) {
  size_t used = 0;
  double value = 0;
  try {
    value = std::stod(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used == 0 || used != text.size() || !std::isfinite(value))
    fail_invalid("'", text, "' is not a number");
  return value;
}
// Beyond any size a layer can have; converting a larger double to int64_t is undefined.
int64_t whole_number(double value, const std::string& text) {
  if (!(std::abs(value) <= 1e15)) fail_invalid("'", text, "' is out of range");
  return static_cast<int64_t>(value);
}
}  // namespace

// Shared by the layer files (declared in layers.hpp).
double option_or(const ModelSpec::LayerSpec& spec, const std::string& key, double fallback) {
  const auto it = spec.options.find(key);
  return it == spec.options.end() ? fallback : spec_number(it->second);
}

int64_t int_arg(const std::string& text) { return whole_number(spec_number(text), text); }

int64_t int_option_or(const ModelSpec::LayerSpec& spec, const std::string& key, int64_t fallback) {
  const auto it = spec.options.find(key);
  return it == spec.options.end() ? fallback : whole_number(spec_number(it->second), it->second);
}

std::string shape_text(const std::vector<int64_t>& shape) {
  std::ostringstream out;
  out << '[';
  for (size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  out << ']';
  return out.str();
}

// Shared by the layers with weights (declared in layers.hpp).
void fill_init(std::vector<float>& w, int64_t fan_in, int64_t fan_out, const InitOptions& init,
               std::mt19937_64& rng) {
  switch (init.kind) {
    case Init::he: {  // He et al. 2015: N(0, 2 / fan_in)
      std::normal_distribution<float> dist(0.0f, std::sqrt(2.0f / static_cast<float>(fan_in)));
      for (auto& v : w) v = dist(rng);
      break;
    }
    case Init::xavier: {  // Glorot & Bengio 2010: U(±sqrt(6 / (fan_in + fan_out)))
      const float a = std::sqrt(6.0f / static_cast<float>(fan_in + fan_out));
      std::uniform_real_distribution<float> dist(-a, a);
      for (auto& v : w) v = dist(rng);
      break;
    }
    case Init::normal: {
      std::normal_distribution<float> dist(0.0f, init.normal_std);
      for (auto& v : w) v = dist(rng);
      break;
    }
  }
}

namespace {


// What backward returns for the first layer, whose input needs no gradient.
const Tensor& no_input_grad(Tensor& dx, MemoryFormat format) {
  dx.reshape({}, format);
  return dx;
}

// Element (n, c, h, w) of a [N, C, H, W] tensor in either format.
struct Strides4 {
  int64_t n, c, h, w;
  Strides4(const std::vector<int64_t>& shape, MemoryFormat format) {
    const int64_t C = shape[1], H = shape[2], W = shape[3];
    if (format == MemoryFormat::channels_first) {
      n = C * H * W, c = H * W, h = W, w = 1;
    } else {
      n = H * W * C, c = 1, h = W * C, w = C;
    }
  }
  int64_t at(int64_t in, int64_t ic, int64_t ih, int64_t iw) const {
    return in * n + ic * c + ih * h + iw * w;
  }
};

// ---------------------------------------------------------------- Linear
// y = x·Wᵀ + b, W: [out, in] (PyTorch's layout). The forward runs on oneDNN's
// matmul primitive, which reads W as Wᵀ where it is (sgemm's transposed
// operand measured 1.3-1.4x slower: 98 vs 69 us for 64x784 -> 100, 718 vs 557
// us for 128x3136 -> 128, one thread); the gradients run on sgemm (gemm.hpp),
// as fast as matmul for them.
class Linear final : public Layer {
 public:
  Linear(int64_t in, int64_t out, bool bias) : in_(in), out_(out) {
    weight_ = {"weight", std::vector<float>(out * in), std::vector<float>(out * in)};
    if (bias) bias_ = Parameter{"bias", std::vector<float>(out), std::vector<float>(out)};
  }
  std::string type() const override { return "linear"; }
  std::string describe() const override {
    std::ostringstream s;
    s << "linear(" << in_ << " -> " << out_ << (bias_ ? ", bias" : ", no bias") << ")";
    return s.str();
  }
  std::vector<int64_t> output_shape(const std::vector<int64_t>& input) const override {
    if (input.size() != 1 || input[0] != in_)
      fail_invalid(describe(), ": expected input [", in_, "], got ", shape_text(input),
                   " (add 'flatten' before it?)");
    return {out_};
  }
  // The rows of x in 1, 2, 4 or 8 chunks (by the size of the product, never by
  // the thread count), each a one-thread matmul (onednn.hpp).
  const Tensor& forward(const Tensor& x, Mode) override {
    input_ = &x;
    const int64_t n = x.shape[0];
    y_.reshape({n, out_}, MemoryFormat::channels_first);
    int64_t chunks = 1;
    while (chunks < 8 && n >= 2 * chunks && n * in_ * out_ / (2 * chunks) >= kMultiplyAddsPerChunk)
      chunks *= 2;
    const int64_t rows = (n + chunks - 1) / chunks;
    try {
      for_each_chunk((n + rows - 1) / rows, [&](int64_t chunk, int) {
        const int64_t first = chunk * rows;
        Product& p = product(std::min(rows, n - first));
        std::unordered_map<int, dnnl::memory> args = {
            {DNNL_ARG_SRC, dnnl::memory(p.src, cpu_engine(), const_cast<float*>(x.data.data()) + first * in_)},
            {DNNL_ARG_WEIGHTS, dnnl::memory(p.weights, cpu_engine(), weight_.value.data())},
            {DNNL_ARG_DST, dnnl::memory(p.dst, cpu_engine(), y_.data.data() + first * out_)},
            {DNNL_ARG_SCRATCHPAD, thread_scratchpad(p.scratchpad)}};
        if (bias_) args.emplace(DNNL_ARG_BIAS, dnnl::memory(p.bias, cpu_engine(), bias_->value.data()));
        dnnl::stream stream(cpu_engine());
        p.primitive.execute(stream, args);
      });
    } catch (const dnnl::error& e) {
      fail_runtime(describe(), ": oneDNN matmul failed: ", e.what());
    }
    return y_;
  }
  const Tensor& backward(const Tensor& dy, bool need_input_grad) override {
    const Tensor& x = *input_;
    const int64_t n = x.shape[0];
    // dW += dyᵀ·x;  db += Σ_n dy;  dx = dy·W
    gemm(true, false, out_, in_, n, 1.0f, dy.data.data(), out_, x.data.data(), in_, 1.0f,
         weight_.grad.data(), in_);
    if (bias_)
      for (int64_t i = 0; i < n; ++i)
        for (int64_t o = 0; o < out_; ++o) bias_->grad[o] += dy.data[i * out_ + o];
    if (!need_input_grad) return no_input_grad(dx_, MemoryFormat::channels_first);
    dx_.reshape({n, in_}, MemoryFormat::channels_first);
    gemm(false, false, n, in_, out_, 1.0f, dy.data.data(), out_, weight_.value.data(), in_, 0.0f,
         dx_.data.data(), in_);
    return dx_;
  }
  std::vector<Parameter*> parameters() override {
    if (bias_) return {&weight_, &*bias_};
    return {&weight_};
  }
  void initialize(const InitOptions& init, std::mt19937_64& rng) override {
    fill_init(weight_.value, in_, out_, init, rng);
    if (bias_) std::fill(bias_->value.begin(), bias_->value.end(), 0.0f);
  }

 private:
  // Large, because a second thread is dear: the CLI's threads wait passively,
  // and on a 2-core VM an empty 2-thread region took 30 us back to back and
  // 86-128 us after 0.2-1 ms of serial work (the idle core has to be woken).
  // With 1M per chunk, mlp-paper's 64x784 -> 100 product ran as 4 chunks on
  // 2 threads in 228 us per step, against 90 us as one chunk.
  static constexpr int64_t kMultiplyAddsPerChunk = 16 << 20;

  // The one-thread matmul for `rows` rows of x, made on first use.
  struct Product {
    dnnl::memory::desc src, weights, bias, dst, scratchpad;
    dnnl::matmul primitive;
  };
  Product& product(int64_t rows) {
    return products_.get(rows, [&] {
      const auto f32 = dnnl::memory::data_type::f32;
      const dnnl::memory::desc src({rows, in_}, f32, {in_, 1});
      const dnnl::memory::desc weights({in_, out_}, f32, {1, in_});  // Wᵀ of W [out, in]
      const dnnl::memory::desc bias =
          bias_ ? dnnl::memory::desc({1, out_}, f32, {out_, 1}) : dnnl::memory::desc();
      const dnnl::memory::desc dst({rows, out_}, f32, {out_, 1});
      OneThread one_thread;
      const dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(src, weights, bias, dst), user_scratchpad(),
                                            cpu_engine());
      return Product{src, weights, bias, dst, pd.scratchpad_desc(), dnnl::matmul(pd)};
    });
  }

  int64_t in_, out_;
  Parameter weight_;
  std::optional<Parameter> bias_;
  const Tensor* input_ = nullptr;
  Tensor y_, dx_;
  Cache<Product> products_;  // by rows
};

// ---------------------------------------------------------------- pooling
// k×k windows, stride s, no padding (floor mode, as PyTorch's default).
// Max pooling keeps, per output, where in its window the maximum was: kh·k + kw
// (uint16: windows up to 255 wide; 2 bytes per output instead of an 8-byte
// index of the input). Ties go to the first position; NaN wins, the last NaN
// if several (PyTorch's rule: take v when v > best or v is NaN).
using WindowIndex = uint16_t;
constexpr int64_t kMaxPoolWindow = 255;
// A window that passes no gradient (MaxPoolAfterRelu): no position is this.
constexpr WindowIndex kNoWindowPosition = 0xFFFF;
// That rule, written once (| rather than ||: see the leaf loops below).
[[gnu::always_inline]] inline bool takes_over(float v, float best) {
  return (v > best) | (v != v);
}

// The leaf loops: plain functions over unaliased pointers, compiled for
// AVX-512/AVX2/baseline (support.hpp), written so that the compare, the
// select and the index blend vectorize (no short-circuit ||, which GCC turns
// into branches). `index` null: no indices wanted (eval).

// Channels-last: one output pixel, its `channels` channels at once.
NORMKIT_ENGINE_SIMD_CLONES
void max_window_rows(const float* __restrict src, int64_t row_step, int64_t col_step, int64_t k,
                     int64_t channels, float* __restrict out, WindowIndex* __restrict index) {
  WindowIndex unused[1];
  const bool keep = index != nullptr;
  WindowIndex* __restrict at = keep ? index : unused;
  for (int64_t c = 0; c < channels; ++c) out[c] = src[c];
  if (keep)
    for (int64_t c = 0; c < channels; ++c) at[c] = 0;
  for (int64_t kh = 0; kh < k; ++kh)
    for (int64_t kw = kh == 0 ? 1 : 0; kw < k; ++kw) {
      const float* __restrict p = src + kh * row_step + kw * col_step;
      const auto position = static_cast<WindowIndex>(kh * k + kw);
      if (keep) {
        for (int64_t c = 0; c < channels; ++c) {
          const float v = p[c], best = out[c];
          const bool take = takes_over(v, best);
          out[c] = take ? v : best;
          at[c] = take ? position : at[c];
        }
      } else {
        for (int64_t c = 0; c < channels; ++c) {
          const float v = p[c], best = out[c];
          out[c] = takes_over(v, best) ? v : best;
        }
      }
    }
}
// The maximum of one 2×2 window's values (v0 v1 on its first row, v2 v3 on
// its second) and where it is (0-3), by the rule above. Positions are 32-bit
// like the floats: mixed widths keep the callers' loops from vectorizing.
[[gnu::always_inline]] inline float max_of_2x2(float v0, float v1, float v2, float v3,
                                               uint32_t& at) {
  float best = v0;
  uint32_t position = 0;
  bool take = takes_over(v1, best);
  best = take ? v1 : best;
  position = take ? 1u : position;
  take = takes_over(v2, best);
  best = take ? v2 : best;
  position = take ? 2u : position;
  take = takes_over(v3, best);
  best = take ? v3 : best;
  position = take ? 3u : position;
  at = position;
  return best;
}

// Channels-last, 2×2 windows with stride 2 (the common case): one output row
// of `windows` pixels from input rows r0 and r1, each window's four values
// compared in registers. (index is tested outside the loops: a select inside
// them is if-converted into masked operations.)
NORMKIT_ENGINE_SIMD_CLONES
void max_window_rows_2x2(const float* __restrict r0, const float* __restrict r1, int64_t windows,
                         int64_t channels, float* __restrict out, WindowIndex* __restrict index) {
  for (int64_t ow = 0; ow < windows; ++ow) {
    const float* __restrict a = r0 + 2 * ow * channels;
    const float* __restrict b = r1 + 2 * ow * channels;
    float* __restrict o = out + ow * channels;
    uint32_t at;
    if (index) {
      WindowIndex* __restrict positions = index + ow * channels;
      for (int64_t c = 0; c < channels; ++c) {
        o[c] = max_of_2x2(a[c], a[channels + c], b[c], b[channels + c], at);
        positions[c] = static_cast<WindowIndex>(at);
      }
    } else {
      for (int64_t c = 0; c < channels; ++c)
        o[c] = max_of_2x2(a[c], a[channels + c], b[c], b[channels + c], at);
    }
  }
}
// Channels-first rows are short (14 or 7 outputs: too short for a loop over
// the row to vectorize); the 2×2 loops take fixed blocks of windows
// (max_windows_2x2), the others run as scalar code, and these selects by bit
// mask keep that code free of branches, which random data would mispredict.
inline float select(bool take, float a, float b) {
  const uint32_t mask = 0u - static_cast<uint32_t>(take);
  return std::bit_cast<float>((std::bit_cast<uint32_t>(a) & mask) | (std::bit_cast<uint32_t>(b) & ~mask));
}
inline uint32_t select(bool take, uint32_t a, uint32_t b) {
  const uint32_t mask = 0u - static_cast<uint32_t>(take);
  return (a & mask) | (b & ~mask);
}
inline void take_max(float v, uint32_t position, float& best, uint32_t& at) {
  const bool take = takes_over(v, best);
  best = select(take, v, best);
  at = select(take, position, at);
}

// Channels-first, 2×2 windows with stride 2 (the common case): B windows of
// input rows r0, r1 at once, a fixed count so that the compare, the select and
// the index blend vectorize even on rows of 14 or 7 outputs (a loop over the
// row's own length ran as scalar code below 31 outputs: cnn-small's first
// pooling, 128×32×28×28, took 9-10 ms per step that way, 1.2-1.3 ms this way).
template <int B>
[[gnu::always_inline]] inline void max_windows_2x2(const float* __restrict r0,
                                                   const float* __restrict r1,
                                                   float* __restrict out,
                                                   WindowIndex* __restrict index) {
  float best[B];
  uint32_t at[B];
  // Not unrolled first: unrolled, the straight-line code is not vectorized,
  // and its branches on the compares mispredict on real data (ReLU's zeros).
#pragma GCC unroll 1
  for (int l = 0; l < B; ++l)
    best[l] = max_of_2x2(r0[2 * l], r0[2 * l + 1], r1[2 * l], r1[2 * l + 1], at[l]);
  for (int l = 0; l < B; ++l) out[l] = best[l];
  if (index)
    for (int l = 0; l < B; ++l) index[l] = static_cast<WindowIndex>(at[l]);
}
// Runs block.template operator()<B>(ow) over a row of `width` windows in
// blocks of B = 16, 8 or 4, the widest that fits; the last block ends at the
// row's end, overlapping the one before it (it rewrites the same values).
// False when the row is narrower than 4.
template <class Block>
[[gnu::always_inline]] inline bool for_window_blocks(int64_t width, Block&& block) {
  const auto blocks = [&]<int B>() __attribute__((always_inline)) {
    int64_t ow = 0;
    for (; ow + B <= width; ow += B) block.template operator()<B>(ow);
    if (ow < width) block.template operator()<B>(width - B);
  };
  if (width >= 16)
    blocks.template operator()<16>();
  else if (width >= 8)
    blocks.template operator()<8>();
  else if (width >= 4)
    blocks.template operator()<4>();
  else
    return false;
  return true;
}
// Channels-first, any window: one output row of `width` pixels.
void max_window_row(const float* __restrict src, int64_t row_step, int64_t stride, int64_t k,
                    int64_t width, float* __restrict out, WindowIndex* __restrict index) {
  for (int64_t ow = 0; ow < width; ++ow) {
    float best = src[ow * stride];
    uint32_t at = 0;
    for (int64_t kh = 0; kh < k; ++kh)
      for (int64_t kw = kh == 0 ? 1 : 0; kw < k; ++kw)
        take_max(src[kh * row_step + ow * stride + kw], static_cast<uint32_t>(kh * k + kw), best, at);
    out[ow] = best;
    if (index) index[ow] = static_cast<WindowIndex>(at);
  }
}
// Channels-first, 2×2 windows with stride 2: the `rows` output rows of one
// plane (input rows row_step apart), each in blocks of 16, 8 or 4 windows as
// its width allows.
NORMKIT_ENGINE_SIMD_CLONES
void max_window_plane_2x2(const float* __restrict plane, int64_t row_step, int64_t rows,
                          int64_t width, float* __restrict out, WindowIndex* __restrict index) {
  for (int64_t oh = 0; oh < rows; ++oh) {
    const float* r0 = plane + 2 * oh * row_step;
    const float* r1 = r0 + row_step;
    float* row_out = out + oh * width;
    WindowIndex* row_index = index ? index + oh * width : nullptr;
    const bool done = for_window_blocks(width, [&]<int B>(int64_t ow) __attribute__((always_inline)) {
      max_windows_2x2<B>(r0 + 2 * ow, r1 + 2 * ow, row_out + ow, row_index ? row_index + ow : nullptr);
    });
    if (!done)
      max_window_row(r0, row_step, 2, 2, width, row_out, row_index);
  }
}
// Backward of disjoint windows, channels-last: one input row of `width` pixels
// at window row kh, from its output row's `windows` windows (gradients g and
// indices, `channels` per window); 0 outside every window.
NORMKIT_ENGINE_SIMD_CLONES
void max_unpool_rows(const float* __restrict g, const WindowIndex* __restrict index, int64_t kh,
                     int64_t k, int64_t stride, int64_t windows, int64_t width, int64_t channels,
                     float* __restrict out) {
  for (int64_t iw = 0; iw < width; ++iw) {
    const int64_t ow = iw / stride, kw = iw % stride;
    float* __restrict o = out + iw * channels;
    if (ow >= windows || kw >= k) {
      for (int64_t c = 0; c < channels; ++c) o[c] = 0.0f;
      continue;
    }
    const auto position = static_cast<WindowIndex>(kh * k + kw);
    const float* __restrict gw = g + ow * channels;
    const WindowIndex* __restrict iw_index = index + ow * channels;
    for (int64_t c = 0; c < channels; ++c) o[c] = iw_index[c] == position ? gw[c] : 0.0f;
  }
}
// Channels-first, 2×2 windows with stride 2: one input row at window row kh.
[[gnu::always_inline]] inline void max_unpool_row_2x2(const float* __restrict g,
                                                      const WindowIndex* __restrict index,
                                                      int64_t kh, int64_t windows, int64_t width,
                                                      float* __restrict out) {
  const auto left = static_cast<WindowIndex>(2 * kh), right = static_cast<WindowIndex>(2 * kh + 1);
  const bool done = for_window_blocks(windows, [&]<int B>(int64_t ow) __attribute__((always_inline)) {
    float* __restrict pairs = out + 2 * ow;
#pragma GCC unroll 1  // as in max_windows_2x2
    for (int l = 0; l < B; ++l) {
      const uint32_t at = index[ow + l];
      const float gl = g[ow + l];
      pairs[2 * l] = at == left ? gl : 0.0f;
      pairs[2 * l + 1] = at == right ? gl : 0.0f;
    }
  });
  for (int64_t ow = 0; !done && ow < windows; ++ow) {
    out[2 * ow] = select(index[ow] == left, g[ow], 0.0f);
    out[2 * ow + 1] = select(index[ow] == right, g[ow], 0.0f);
  }
  for (int64_t iw = 2 * windows; iw < width; ++iw) out[iw] = 0.0f;
}
// Channels-first, 2×2 windows with stride 2: the `height` input rows of one
// plane from its `rows` output rows. A plane per call, not a row: a call per
// row of 14 values (cnn-small's second pooling) cost more than the row.
NORMKIT_ENGINE_SIMD_CLONES
void max_unpool_plane_2x2(const float* __restrict g, const WindowIndex* __restrict index,
                          int64_t rows, int64_t windows, int64_t height, int64_t width,
                          float* __restrict out) {
  for (int64_t ih = 0; ih < height; ++ih) {
    float* row = out + ih * width;
    const int64_t oh = ih / 2;
    if (oh >= rows)
      std::fill(row, row + width, 0.0f);
    else
      max_unpool_row_2x2(g + oh * windows, index + oh * windows, ih % 2, windows, width, row);
  }
}
// Channels-first, any disjoint windows: one input row at window row kh.
void max_unpool_row(const float* __restrict g, const WindowIndex* __restrict index, int64_t kh,
                    int64_t k, int64_t stride, int64_t windows, int64_t width, float* __restrict out) {
  for (int64_t iw = 0; iw < width; ++iw) {
    const int64_t ow = iw / stride, kw = iw % stride;
    out[iw] = ow < windows && kw < k ? select(index[ow] == kh * k + kw, g[ow], 0.0f) : 0.0f;
  }
}
void average_window_rows(const float* __restrict src, int64_t first, int64_t row_step,
                         int64_t col_step, int64_t k, int64_t channels, float* __restrict out) {
  const float inv_area = 1.0f / static_cast<float>(k * k);
  for (int64_t c = 0; c < channels; ++c) out[c] = 0.0f;
  for (int64_t kh = 0; kh < k; ++kh)
    for (int64_t kw = 0; kw < k; ++kw)
      for (int64_t c = 0; c < channels; ++c) out[c] += src[first + kh * row_step + kw * col_step + c];
  for (int64_t c = 0; c < channels; ++c) out[c] *= inv_area;
}

// BN, ReLU and 2×2 max pooling with stride 2 in one pass (layers.hpp,
// ReluMaxPool2x2), one window: its four x (x0 x1 on its first row, x2 x3 on
// its second) normalized as the BN kernels do it, p = (x - m)·s + t, and the
// maximum taken by max pooling's rule above on p, not on relu(p): the ReLU
// never changes which positive value is the first maximum, and a maximum <= 0
// gets no gradient whichever it is. So y = relu(max p) (NaN stays NaN; only a
// maximum of -0 differs, +0 here against the separate layers' first -0), and
// the selects stay branch-free (the ReLU inside the compare chain stopped
// GCC's vectorizer). Also where the maximum was (or kNoGradient) and the x there.
[[gnu::always_inline]] inline void bn_relu_max_window(float x0, float x1, float x2, float x3,
                                                      float m, float s, float t, float& y,
                                                      float& x_at, uint32_t& index) {
  const float p1 = (x1 - m) * s + t, p2 = (x2 - m) * s + t, p3 = (x3 - m) * s + t;
  float best = (x0 - m) * s + t, x_best = x0;
  uint32_t at = 0;
  bool take = takes_over(p1, best);
  best = take ? p1 : best;
  x_best = take ? x1 : x_best;
  at = take ? 1u : at;
  take = takes_over(p2, best);
  best = take ? p2 : best;
  x_best = take ? x2 : x_best;
  at = take ? 2u : at;
  take = takes_over(p3, best);
  best = take ? p3 : best;
  x_best = take ? x3 : x_best;
  at = take ? 3u : at;
  y = best < 0.0f ? 0.0f : best;
  x_at = x_best;
  index = best > 0.0f ? at : ReluMaxPool2x2::kNoGradient;
}
// Channels-last: one output row of `windows` pixels from input rows r0, r1.
NORMKIT_ENGINE_SIMD_CLONES
void bn_relu_max_rows_2x2(const float* __restrict r0, const float* __restrict r1, int64_t windows,
                          int64_t channels, const float* __restrict mean_hi,
                          const float* __restrict scale, const float* __restrict shift,
                          float* __restrict out, uint8_t* __restrict index,
                          float* __restrict x_at) {
  for (int64_t ow = 0; ow < windows; ++ow) {
    const float* __restrict a = r0 + 2 * ow * channels;
    const float* __restrict b = r1 + 2 * ow * channels;
    const int64_t o = ow * channels;
    for (int64_t c = 0; c < channels; ++c) {
      uint32_t at;
      bn_relu_max_window(a[c], a[channels + c], b[c], b[channels + c], mean_hi[c], scale[c],
                         shift[c], out[o + c], x_at[o + c], at);
      index[o + c] = static_cast<uint8_t>(at);
    }
  }
}
// Channels-first: the `rows` output rows of one plane (input rows row_step
// apart), in blocks of windows as max_window_plane_2x2 takes them (the
// positions narrowed to bytes in a loop of their own: in the same loop, the
// mixed widths did not vectorize).
NORMKIT_ENGINE_SIMD_CLONES
void bn_relu_max_plane_2x2(const float* __restrict plane, int64_t row_step, int64_t rows,
                           int64_t width, float m, float s, float t, float* __restrict out,
                           uint8_t* __restrict index, float* __restrict x_at) {
  for (int64_t oh = 0; oh < rows; ++oh) {
    const float* r0 = plane + 2 * oh * row_step;
    const float* r1 = r0 + row_step;
    const int64_t o = oh * width;
    const bool done = for_window_blocks(width, [&]<int B>(int64_t ow) __attribute__((always_inline)) {
      uint32_t at[B];
#pragma GCC unroll 1  // as in max_windows_2x2
      for (int l = 0; l < B; ++l) {
        const int64_t w = ow + l;
        bn_relu_max_window(r0[2 * w], r0[2 * w + 1], r1[2 * w], r1[2 * w + 1], m, s, t, out[o + w],
                           x_at[o + w], at[l]);
      }
      for (int l = 0; l < B; ++l) index[o + ow + l] = static_cast<uint8_t>(at[l]);
    });
    for (int64_t w = 0; !done && w < width; ++w) {
      uint32_t at;
      bn_relu_max_window(r0[2 * w], r0[2 * w + 1], r1[2 * w], r1[2 * w + 1], m, s, t, out[o + w],
                         x_at[o + w], at);
      index[o + w] = static_cast<uint8_t>(at);
    }
  }
}
// The gradient g of a window whose maximum passed the ReLU (its position is
// not kNoGradient), else 0: the backward's sums take it. (The mask as bits: a
// select on the index compare did not vectorize.)
[[gnu::always_inline]] inline double passed_gradient(float g, uint8_t position) {
  return select(position != ReluMaxPool2x2::kNoGradient, g, 0.0f);
}
// Its backward's sums over `pixels` output pixels: per channel Σg and
// Σg·(x - mean) in double, g = dL/dy where the window's maximum passed the ReLU.
NORMKIT_ENGINE_SIMD_CLONES
void bn_relu_max_sums(const float* __restrict g, const uint8_t* __restrict index,
                      const float* __restrict x_at, int64_t pixels, int64_t channels,
                      const double* __restrict mean, double* __restrict sum_g,
                      double* __restrict sum_gx) {
  for (int64_t c = 0; c < channels; ++c) sum_g[c] = sum_gx[c] = 0.0;
  for (int64_t p = 0; p < pixels; ++p) {
    const float* __restrict gp = g + p * channels;
    const uint8_t* __restrict ip = index + p * channels;
    const float* __restrict xp = x_at + p * channels;
    for (int64_t c = 0; c < channels; ++c) {
      const double gi = passed_gradient(gp[c], ip[c]);
      sum_g[c] += gi;
      sum_gx[c] += gi * (static_cast<double>(xp[c]) - mean[c]);
    }
  }
}
// And its dx on one input row of `width` pixels at window row kh, from its
// output row (g, index; null when the row is in no window):
// dx = a·g + b·(x - mean_hi) + k, g the row's gradient at its windows' maxima
// and 0 elsewhere (the coefficients as the BN kernels fold them).
NORMKIT_ENGINE_SIMD_CLONES
void bn_relu_max_dx_row(const float* __restrict x, const float* __restrict g,
                        const uint8_t* __restrict index, int64_t kh, int64_t windows,
                        int64_t width, int64_t channels, const float* __restrict mean_hi,
                        const float* __restrict a, const float* __restrict b,
                        const float* __restrict k, float* __restrict dx) {
  for (int64_t iw = 0; iw < width; ++iw) {
    const float* __restrict xi = x + iw * channels;
    float* __restrict o = dx + iw * channels;
    const int64_t ow = iw / 2;
    if (!g || ow >= windows) {
      for (int64_t c = 0; c < channels; ++c) o[c] = b[c] * (xi[c] - mean_hi[c]) + k[c];
      continue;
    }
    const auto position = static_cast<uint8_t>(2 * kh + iw % 2);
    const float* __restrict gw = g + ow * channels;
    const uint8_t* __restrict at = index + ow * channels;
    for (int64_t c = 0; c < channels; ++c) {
      const float gi = gw[c];  // loaded unconditionally: a conditional load blocks vectorization
      o[c] = a[c] * (at[c] == position ? gi : 0.0f) + (b[c] * (xi[c] - mean_hi[c]) + k[c]);
    }
  }
}

// Channels-first sums: one plane's `count` outputs, one channel: Σg and
// Σg·(x - mean) in double, in eight lanes (output i in lane i % 8) added in
// lane order at the end, so that the bits are fixed. The lanes are local, so
// they stay in registers: through bn_relu_max_sums' arrays (8 channels) each
// 8 outputs waited on a store and a load, and a 28x28 layer's sums took 2.1x
// its channels-last time.
NORMKIT_ENGINE_SIMD_CLONES
void bn_relu_max_plane_sums(const float* __restrict g, const uint8_t* __restrict index,
                            const float* __restrict x_at, int64_t count, double mean,
                            double& sum_g, double& sum_gx) {
  constexpr int64_t kLanes = 8;
  double lane_g[kLanes] = {}, lane_gx[kLanes] = {};
  const auto add = [&](int64_t i, int64_t lane) __attribute__((always_inline)) {
    const double gi = passed_gradient(g[i], index[i]);
    lane_g[lane] += gi;
    lane_gx[lane] += gi * (static_cast<double>(x_at[i]) - mean);
  };
  const int64_t whole = count / kLanes * kLanes;
  for (int64_t i = 0; i < whole; i += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) add(i + l, l);
  for (int64_t i = whole; i < count; ++i) add(i, i - whole);
  sum_g = sum_gx = 0.0;
  for (int64_t l = 0; l < kLanes; ++l) {
    sum_g += lane_g[l];
    sum_gx += lane_gx[l];
  }
}
// Channels-first dx: one plane (one channel's coefficients) from its `rows` ×
// `windows` outputs: dx = b·(x - mean_hi) + k, plus a·g at each window's
// maximum. Generic: first the flat part over the whole plane, then a·g added
// window by window (a window without gradient adds 0 at its first position, so
// the loop has no branch). Written as one pass over pairs of columns, rows of
// 14 or 7 windows vectorized only 4 wide, and the plane took 3 times as long.
// dx where no window's gradient reaches: count values of b·(x - mean_hi) + k.
[[gnu::always_inline]] inline void plane_dx_without_gradient(const float* __restrict x,
                                                             int64_t count, float m, float b,
                                                             float k, float* __restrict dx) {
  for (int64_t i = 0; i < count; ++i) dx[i] = b * (x[i] - m) + k;
}
NORMKIT_ENGINE_SIMD_CLONES
void bn_relu_max_plane_dx_generic(const float* __restrict x, const float* __restrict g,
                                  const uint8_t* __restrict index, int64_t rows, int64_t windows,
                                  int64_t height, int64_t width, float m, float a, float b,
                                  float k, float* __restrict dx) {
  plane_dx_without_gradient(x, height * width, m, b, k, dx);
  for (int64_t oh = 0; oh < rows; ++oh)
    for (int64_t ow = 0; ow < windows; ++ow) {
      const int64_t o = oh * windows + ow;
      const uint32_t at = index[o];
      const float add = at != ReluMaxPool2x2::kNoGradient ? a * g[o] : 0.0f;
      dx[(2 * oh + (at >> 1 & 1)) * width + 2 * ow + (at & 1)] += add;
    }
}
#if defined(__x86_64__) && defined(__GNUC__)
// The same on AVX-512, as one pass: dx = a·(g at the maximum, else 0) +
// (b·(x - mean_hi) + k), 8 windows (16 columns) of an input row at a time,
// each window's gradient and position widened to its two columns by a lane
// permute, the row's last block masked. The window-by-window adds above made
// cnn-small's 28x28 layer's dx 1.9x its channels-last time.
__attribute__((target("avx512f,avx512bw,avx512vl"))) void bn_relu_max_plane_dx_avx512(
    const float* x, const float* g, const uint8_t* index, int64_t rows, int64_t windows,
    int64_t height, int64_t width, float m, float a, float b, float k, float* dx) {
  const __m512i twice = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
  const __m512i column = _mm512_set_epi32(1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0);
  const __m512 vm = _mm512_set1_ps(m), va = _mm512_set1_ps(a), vb = _mm512_set1_ps(b),
               vk = _mm512_set1_ps(k);
  // The maskz forms throughout: the plain ones pass GCC 12's self-initialized
  // "undefined" vectors, which -Wmaybe-uninitialized reports.
  constexpr __mmask16 kAll = 0xFFFF;
  for (int64_t ih = 0; ih < 2 * rows; ++ih) {
    const int64_t o = ih / 2 * windows;
    const __m512i position = _mm512_add_epi32(column, _mm512_set1_epi32(ih % 2 == 0 ? 0 : 2));
    const float* xr = x + ih * width;
    float* out = dx + ih * width;
    for (int64_t ow = 0; ow < windows; ow += 8) {
      const int64_t count = std::min<int64_t>(8, windows - ow);
      const auto window_lanes = static_cast<__mmask16>((1u << count) - 1);
      const auto column_lanes = static_cast<__mmask16>((1u << (2 * count)) - 1);
      const __m512 gw = _mm512_maskz_permutexvar_ps(
          kAll, twice, _mm512_maskz_loadu_ps(window_lanes, g + o + ow));
      const __m512i at = _mm512_maskz_permutexvar_epi32(
          kAll, twice,
          _mm512_maskz_cvtepu8_epi32(kAll, _mm_maskz_loadu_epi8(window_lanes, index + o + ow)));
      const __m512 sel = _mm512_maskz_mov_ps(_mm512_cmpeq_epi32_mask(at, position), gw);
      const __m512 xv = _mm512_maskz_loadu_ps(column_lanes, xr + 2 * ow);
      const __m512 base = _mm512_fmadd_ps(vb, _mm512_sub_ps(xv, vm), vk);
      _mm512_mask_storeu_ps(out + 2 * ow, column_lanes, _mm512_fmadd_ps(va, sel, base));
    }
    plane_dx_without_gradient(xr + 2 * windows, width - 2 * windows, m, b, k, out + 2 * windows);
  }
  // An odd last row is in no window.
  const int64_t first = 2 * rows * width;
  plane_dx_without_gradient(x + first, height * width - first, m, b, k, dx + first);
}
#endif
void bn_relu_max_plane_dx(const float* x, const float* g, const uint8_t* index, int64_t rows,
                          int64_t windows, int64_t height, int64_t width, float m, float a,
                          float b, float k, float* dx) {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool avx512 = __builtin_cpu_supports("avx512f") &&
                             __builtin_cpu_supports("avx512bw") &&
                             __builtin_cpu_supports("avx512vl");
  if (avx512)
    return bn_relu_max_plane_dx_avx512(x, g, index, rows, windows, height, width, m, a, b, k, dx);
#endif
  bn_relu_max_plane_dx_generic(x, g, index, rows, windows, height, width, m, a, b, k, dx);
}

// Max pooling after a relu (Pool2d::forward_after_relu): the ReLU of each
// maximum, and no position for a maximum that does not pass it.
NORMKIT_ENGINE_SIMD_CLONES
void relu_of_maxima(float* __restrict y, WindowIndex* __restrict index, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = y[i];
    y[i] = v < 0.0f ? 0.0f : v;
    index[i] = v > 0.0f ? index[i] : kNoWindowPosition;
  }
}

class Pool2d final : public Layer, public MaxPoolAfterRelu {
 public:
  Pool2d(const std::vector<int64_t>& input, int64_t k, int64_t stride, bool max, MemoryFormat format)
      : c_(input[0]), h_(input[1]), w_(input[2]), k_(k), stride_(stride), max_(max), format_(format) {
    oh_ = window_positions(h_, k_, stride_);
    ow_ = window_positions(w_, k_, stride_);
  }
  std::string type() const override { return max_ ? "maxpool" : "avgpool"; }
  bool is_max_2x2() const { return max_ && k_ == 2 && stride_ == 2; }
  std::string describe() const override {
    std::ostringstream s;
    s << type() << "(" << k_ << "x" << k_ << ", stride " << stride_ << ")";
    return s.str();
  }
  std::vector<int64_t> output_shape(const std::vector<int64_t>& input) const override {
    if (input.size() != 3 || input[0] != c_ || input[1] != h_ || input[2] != w_)
      fail_invalid(describe(), ": expected input [", c_, ", ", h_, ", ", w_, "], got ",
                   shape_text(input));
    return {c_, oh_, ow_};
  }
  bool takes_relu() const override { return max_; }
  bool ran_after_relu() const override { return after_relu_; }
  // Max pooling of relu(x), train mode: the pooling of x, then the ReLU of each
  // maximum; a window whose maximum is <= 0 (or NaN) keeps no position
  // (kNoWindowPosition), so backward passes it no gradient, as the relu's
  // backward would (the first maximum of relu(x), when positive, is x's).
  const Tensor& forward_after_relu(const Tensor& x) override {
    if (!max_) fail_invalid(describe(), ": only max pooling takes the relu before it");
    forward(x, Mode::train);
    after_relu_ = true;
    constexpr int64_t kPiece = 16384;
    const int64_t total = y_.numel();
    parallel_for(threads_for(total), (total + kPiece - 1) / kPiece, [&](int64_t piece) {
      const int64_t first = piece * kPiece;
      relu_of_maxima(y_.data.data() + first, index_.data() + first, std::min(kPiece, total - first));
    });
    return y_;
  }
  const Tensor& forward(const Tensor& x, Mode mode) override {
    after_relu_ = false;
    const int64_t n = x.shape[0];
    y_.reshape({n, c_, oh_, ow_}, format_);
    if (max_) {
      if (mode == Mode::train) index_.resize(y_.data.size());
      max_forward(x, mode == Mode::train);
      return y_;
    }
    // Average: each output (i, c, oh, ow) sums its window; channels-last runs the
    // channel loop innermost (contiguous), channels-first the window loops.
    const Strides4 in(x.shape, format_), out(y_.shape, format_);
    const float inv_area = 1.0f / static_cast<float>(k_ * k_);
    const float* src = x.data.data();
    float* dst = y_.data.data();
    if (format_ == MemoryFormat::channels_last) {
      parallel_for(threads_for(x.numel()), n * oh_ * ow_, [&](int64_t t) {
        const int64_t i = t / (oh_ * ow_), oh = (t / ow_) % oh_, ow = t % ow_;
        average_window_rows(src, in.at(i, 0, oh * stride_, ow * stride_), in.h, in.w, k_, c_,
                            dst + t * c_);
      });
      return y_;
    }
    parallel_for(threads_for(x.numel()), n * oh_ * ow_, [&](int64_t t) {
      const int64_t i = t / (oh_ * ow_), oh = (t / ow_) % oh_, ow = t % ow_;
      for (int64_t c = 0; c < c_; ++c) {
        const int64_t first = in.at(i, c, oh * stride_, ow * stride_);
        float sum = 0.0f;
        for (int64_t kh = 0; kh < k_; ++kh)
          for (int64_t kw = 0; kw < k_; ++kw) sum += src[first + kh * in.h + kw * in.w];
        dst[out.at(i, c, oh, ow)] = sum * inv_area;
      }
    });
    return y_;
  }
  const Tensor& backward(const Tensor& dy, bool need_input_grad) override {
    if (!need_input_grad) return no_input_grad(dx_, format_);
    const int64_t n = dy.shape[0];
    dx_.reshape({n, c_, h_, w_}, format_);
    if (max_ && stride_ >= k_) {
      max_backward_disjoint(dy);
      return dx_;
    }
    std::fill(dx_.data.begin(), dx_.data.end(), 0.0f);
    const Strides4 in(dx_.shape, format_), out(dy.shape, format_);
    const float inv_area = 1.0f / static_cast<float>(k_ * k_);
    // Overlapping windows add into the same input: one thread per sample, so
    // no two threads write the same element.
    parallel_for(threads_for(dy.numel() * k_ * k_), n, [&](int64_t i) {
      for (int64_t c = 0; c < c_; ++c)
        for (int64_t oh = 0; oh < oh_; ++oh)
          for (int64_t ow = 0; ow < ow_; ++ow) {
            const int64_t o = out.at(i, c, oh, ow);
            if (max_) {
              if (index_[o] == kNoWindowPosition) continue;  // after a relu: no gradient
              const int64_t kh = index_[o] / k_, kw = index_[o] % k_;
              dx_.data[in.at(i, c, oh * stride_ + kh, ow * stride_ + kw)] += dy.data[o];
              continue;
            }
            const float g = dy.data[o] * inv_area;
            for (int64_t kh = 0; kh < k_; ++kh)
              for (int64_t kw = 0; kw < k_; ++kw)
                dx_.data[in.at(i, c, oh * stride_ + kh, ow * stride_ + kw)] += g;
          }
    });
    return dx_;
  }

 private:
  // index_ is written in train mode only.
  void max_forward(const Tensor& x, bool keep_index) {
    const int64_t n = x.shape[0];
    const Strides4 in(x.shape, format_);
    const float* src = x.data.data();
    float* dst = y_.data.data();
    WindowIndex* index = keep_index ? index_.data() : nullptr;
    if (format_ == MemoryFormat::channels_last && k_ == 2 && stride_ == 2) {
      parallel_for(threads_for(x.numel()), n * oh_, [&](int64_t r) {  // output rows, (i, oh)
        const float* row = src + in.at(r / oh_, 0, 2 * (r % oh_), 0);
        max_window_rows_2x2(row, row + in.h, ow_, c_, dst + r * ow_ * c_,
                            index ? index + r * ow_ * c_ : nullptr);
      });
      return;
    }
    if (format_ == MemoryFormat::channels_last) {
      parallel_for(threads_for(x.numel()), n * oh_ * ow_, [&](int64_t t) {
        const int64_t i = t / (oh_ * ow_), oh = (t / ow_) % oh_, ow = t % ow_;
        max_window_rows(src + in.at(i, 0, oh * stride_, ow * stride_), in.h, in.w, k_, c_,
                        dst + t * c_, index ? index + t * c_ : nullptr);
      });
      return;
    }
    if (k_ == 2 && stride_ == 2) {
      parallel_for(threads_for(x.numel()), n * c_, [&](int64_t plane) {  // (i, c)
        max_window_plane_2x2(src + plane * h_ * w_, w_, oh_, ow_, dst + plane * oh_ * ow_,
                             index ? index + plane * oh_ * ow_ : nullptr);
      });
      return;
    }
    // Output rows, (i, c, oh).
    parallel_for(threads_for(x.numel()), n * c_ * oh_, [&](int64_t r) {
      const int64_t plane = r / oh_, oh = r % oh_;
      const float* row = src + (plane * h_ + oh * stride_) * w_;
      max_window_row(row, w_, stride_, k_, ow_, dst + r * ow_, index ? index + r * ow_ : nullptr);
    });
  }
  // Windows that do not overlap (stride >= k): every input element is in at
  // most one window, so dx is written once, in memory order, from its window's
  // index and gradient (0 outside every window), with no zero fill first.
  void max_backward_disjoint(const Tensor& dy) {
    const float* g = dy.data.data();
    const WindowIndex* index = index_.data();
    float* dx = dx_.data.data();
    // Input row ih is in window row oh = ih / stride at kh = ih % stride, unless
    // kh >= k or oh >= the output rows: then it is in no window.
    const bool last = format_ == MemoryFormat::channels_last;
    if (!last && k_ == 2 && stride_ == 2) {
      parallel_for(threads_for(dx_.numel()), dx_.shape[0] * c_, [&](int64_t plane) {  // (i, c)
        max_unpool_plane_2x2(g + plane * oh_ * ow_, index + plane * oh_ * ow_, oh_, ow_, h_, w_,
                             dx + plane * h_ * w_);
      });
      return;
    }
    const int64_t row_size = last ? w_ * c_ : w_;        // floats per input row
    const int64_t window_row = last ? ow_ * c_ : ow_;    // per output row
    // Input rows: (i, ih) or (i, c, ih).
    parallel_for(threads_for(dx_.numel()), dx_.numel() / row_size, [&](int64_t r) {
      const int64_t plane = r / h_, oh = (r % h_) / stride_, kh = (r % h_) % stride_;
      float* out = dx + r * row_size;
      if (oh >= oh_ || kh >= k_) {
        std::fill(out, out + row_size, 0.0f);
        return;
      }
      const int64_t o = (plane * oh_ + oh) * window_row;
      if (last)
        max_unpool_rows(g + o, index + o, kh, k_, stride_, ow_, w_, c_, out);
      else
        max_unpool_row(g + o, index + o, kh, k_, stride_, ow_, w_, out);
    });
  }

  int64_t c_, h_, w_, k_, stride_, oh_ = 0, ow_ = 0;
  bool max_;
  bool after_relu_ = false;  // the last forward was forward_after_relu
  MemoryFormat format_;
  std::vector<WindowIndex> index_;  // max pooling, train mode: kh·k + kw per output
  Tensor y_, dx_;
};

}  // namespace

bool is_max_pool_2x2(const Layer& layer) {
  const auto* pool = dynamic_cast<const Pool2d*>(&layer);
  return pool && pool->is_max_2x2();
}

void ReluMaxPool2x2::forward(const Tensor& x, const float* mean_hi, const float* scale,
                             const float* shift, Tensor& y) {
  begin_forward(x.shape, x.format, y);
  const int64_t per_sample = forward_units_per_sample();
  parallel_for(threads_for(x.numel()), x.shape[0] * per_sample, [&](int64_t unit) {
    forward_unit(x.data.data() + unit / per_sample * sample_size(), unit, mean_hi, scale, shift,
                 y);
  });
}

void ReluMaxPool2x2::begin_forward(const std::vector<int64_t>& shape, MemoryFormat format,
                                   Tensor& y) {
  if (shape.size() != 4 || shape[2] < 2 || shape[3] < 2)
    fail_invalid("batchnorm, relu, maxpool in one pass: expected [N, C, H, W] with H, W >= 2, got ",
                 shape_text(shape));
  shape_ = shape;
  format_ = format;
  y.reshape({shape[0], shape[1], shape[2] / 2, shape[3] / 2}, format);
  index_.resize(y.data.size());
  x_at_.resize(y.data.size());
}

void ReluMaxPool2x2::forward_of_samples(const float* x_samples, int64_t first, int64_t count,
                                        const float* mean_hi, const float* scale,
                                        const float* shift, Tensor& y) {
  const int64_t per_sample = forward_units_per_sample();
  for (int64_t u = 0; u < count * per_sample; ++u)
    forward_unit(x_samples + u / per_sample * sample_size(), first * per_sample + u, mean_hi,
                 scale, shift, y);
}

int64_t ReluMaxPool2x2::forward_units_per_sample() const {
  return format_ == MemoryFormat::channels_first ? shape_[1] : shape_[2] / 2;
}

// Forward unit `unit`, x_sample the x of its sample: channels-first a plane
// (i, c); channels-last an output row (i, oh) (an odd height's last input row
// is in no unit).
void ReluMaxPool2x2::forward_unit(const float* x_sample, int64_t unit, const float* mean_hi,
                                  const float* scale, const float* shift, Tensor& y) {
  const int64_t c = shape_[1], h = shape_[2], w = shape_[3], oh = h / 2, ow = w / 2;
  if (format_ == MemoryFormat::channels_first) {
    const int64_t ch = unit % c, o = unit * oh * ow;
    bn_relu_max_plane_2x2(x_sample + ch * h * w, w, oh, ow, mean_hi[ch], scale[ch], shift[ch],
                          y.data.data() + o, index_.data() + o, x_at_.data() + o);
    return;
  }
  const float* row = x_sample + 2 * (unit % oh) * w * c;
  const int64_t o = unit * ow * c;
  bn_relu_max_rows_2x2(row, row + w * c, ow, c, mean_hi, scale, shift, y.data.data() + o,
                       index_.data() + o, x_at_.data() + o);
}

void ReluMaxPool2x2::sums(const Tensor& dy, const double* mean, double* sum_g,
                          double* sum_gx) const {
  if (dy.data.size() != index_.size() || dy.shape.size() != 4)
    fail_invalid("batchnorm, relu, maxpool in one pass: dy ", shape_text(dy.shape),
                 " is not the shape of the last forward's output");
  const int64_t c = dy.shape[1], pixels = dy.numel() / c;
  // Partial sums per fixed chunk (channels-last: of pixels; channels-first: a
  // plane), added in chunk order: the same bits on any number of threads.
  const bool first = dy.format == MemoryFormat::channels_first;
  constexpr int64_t kChunkPixels = 256;
  const int64_t chunks = first ? dy.shape[0] * c : (pixels + kChunkPixels - 1) / kChunkPixels;
  partials_.resize(static_cast<size_t>(first ? 2 * chunks : 2 * c * chunks));
  parallel_for(threads_for(dy.numel()), chunks, [&](int64_t chunk) {
    if (first) {
      const int64_t plane_size = pixels / dy.shape[0], at = chunk * plane_size;
      bn_relu_max_plane_sums(dy.data.data() + at, index_.data() + at, x_at_.data() + at,
                             plane_size, mean[chunk % c], partials_[2 * chunk],
                             partials_[2 * chunk + 1]);
      return;
    }
    const int64_t start = chunk * kChunkPixels, count = std::min(kChunkPixels, pixels - start);
    double* part = partials_.data() + 2 * c * chunk;
    bn_relu_max_sums(dy.data.data() + start * c, index_.data() + start * c,
                     x_at_.data() + start * c, count, c, mean, part, part + c);
  });
  for (int64_t ch = 0; ch < c; ++ch) sum_g[ch] = sum_gx[ch] = 0.0;
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    if (first) {
      sum_g[chunk % c] += partials_[2 * chunk];
      sum_gx[chunk % c] += partials_[2 * chunk + 1];
      continue;
    }
    for (int64_t ch = 0; ch < c; ++ch) {
      sum_g[ch] += partials_[2 * c * chunk + ch];
      sum_gx[ch] += partials_[2 * c * chunk + c + ch];
    }
  }
}

void ReluMaxPool2x2::dx(const Tensor& x, const Tensor& dy, const DxCoefficients& co,
                        Tensor& dx) const {
  dx.reshape(x.shape, x.format);
  const int64_t units = x.shape[0] * dx_units_per_sample(), unit_size = x.numel() / units;
  parallel_for(threads_for(x.numel()), units, [&](int64_t unit) {
    dx_unit(x.data.data() + unit * unit_size, dy, co, unit, dx.data.data() + unit * unit_size);
  });
}

void ReluMaxPool2x2::dx_of_samples(const float* x_samples, const Tensor& dy,
                                   const DxCoefficients& co, int64_t first, int64_t count,
                                   float* dx) const {
  const int64_t per_sample = dx_units_per_sample(), unit_size = sample_size() / per_sample;
  for (int64_t u = 0; u < count * per_sample; ++u)
    dx_unit(x_samples + u * unit_size, dy, co, first * per_sample + u, dx + u * unit_size);
}

int64_t ReluMaxPool2x2::dx_units_per_sample() const {
  return format_ == MemoryFormat::channels_first ? shape_[1] : shape_[2];
}

// Unit `unit` of dx, into `out` (the unit's h·w or w·c values).
void ReluMaxPool2x2::dx_unit(const float* x_unit, const Tensor& dy, const DxCoefficients& co,
                             int64_t unit, float* out) const {
  const int64_t c = shape_[1], h = shape_[2], w = shape_[3];
  const int64_t oh = h / 2, ow = w / 2;
  if (format_ == MemoryFormat::channels_first) {
    const int64_t ch = unit % c, o = unit * oh * ow;  // unit = plane (i, c)
    bn_relu_max_plane_dx(x_unit, dy.data.data() + o, index_.data() + o, oh, ow, h, w,
                         co.mean_hi[ch], co.a[ch], co.b[ch], co.k[ch], out);
    return;
  }
  const int64_t i = unit / h, ih = unit % h;  // unit = input row (i, ih)
  const int64_t o = (i * oh + ih / 2) * ow * c;  // the output row, when ih / 2 < oh
  const bool in_window = ih / 2 < oh;
  bn_relu_max_dx_row(x_unit, in_window ? dy.data.data() + o : nullptr,
                     in_window ? index_.data() + o : nullptr, ih % 2, ow, w, c, co.mean_hi, co.a,
                     co.b, co.k, out);
}

namespace {

// ---------------------------------------------------------------- elementwise
enum class Activation { relu, sigmoid, tanh };

// Branch-free and unaliased, so the compiler vectorizes them (a branch on the
// sign of y mispredicts half the time).
void relu_forward(const float* __restrict in, float* __restrict out, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) out[i] = std::max(in[i], 0.0f);
}
void relu_backward(const float* __restrict y, const float* __restrict g, float* __restrict out,
                   int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    const float gi = g[i];  // loaded unconditionally: a conditional load blocks vectorization
    out[i] = y[i] > 0.0f ? gi : 0.0f;
  }
}

// [begin, end) of a range split evenly over the threads of a parallel region.
std::pair<int64_t, int64_t> thread_share(int64_t total) {
  const int64_t threads = omp_get_num_threads(), t = omp_get_thread_num();
  return {total * t / threads, total * (t + 1) / threads};
}
class Elementwise final : public Layer {
 public:
  explicit Elementwise(Activation kind) : kind_(kind) {}
  std::string type() const override {
    return kind_ == Activation::relu ? "relu" : kind_ == Activation::sigmoid ? "sigmoid" : "tanh";
  }
  std::string describe() const override { return type(); }
  std::vector<int64_t> output_shape(const std::vector<int64_t>& input) const override {
    return input;
  }
  const Tensor& forward(const Tensor& x, Mode) override {
    y_.reshape(x.shape, x.format);
    const int64_t total = x.numel();
    const float* in = x.data.data();
    float* out = y_.data.data();
    switch (kind_) {
      case Activation::relu:
        parallel_region(threads_for(total), [&] {
          const auto [begin, end] = thread_share(total);
          relu_forward(in, out, begin, end);
        });
        break;
      case Activation::sigmoid:
      case Activation::tanh:
        transcendental_forward(in, out, total);
        break;
    }
    return y_;
  }
  // Derivatives from the output: relu' = [y > 0], sigmoid' = y(1 - y), tanh' = 1 - y².
  const Tensor& backward(const Tensor& dy, bool need_input_grad) override {
    if (!need_input_grad) return no_input_grad(dx_, dy.format);
    dx_.reshape(dy.shape, dy.format);
    const int64_t total = dy.numel();
    const float* y = y_.data.data();
    const float* g = dy.data.data();
    float* out = dx_.data.data();
    switch (kind_) {
      case Activation::relu:
        parallel_region(threads_for(total), [&] {
          const auto [begin, end] = thread_share(total);
          relu_backward(y, g, out, begin, end);
        });
        break;
      case Activation::sigmoid:
        parallel_for(threads_for(total), total,
                     [&](int64_t i) { out[i] = g[i] * y[i] * (1.0f - y[i]); });
        break;
      case Activation::tanh:
        parallel_for(threads_for(total), total,
                     [&](int64_t i) { out[i] = g[i] * (1.0f - y[i] * y[i]); });
        break;
    }
    return dx_;
  }

 private:
  // Sigmoid and tanh on oneDNN's eltwise primitive (vectorized exp and tanh;
  // std::exp one value at a time took 13.5 us for mlp-paper's 64x100 values,
  // oneDNN 4.0, within 3e-7 of it), in chunks of kChunk values, each a
  // one-thread primitive: an element's value never depends on its chunk.
  static constexpr int64_t kChunk = 1 << 16;
  void transcendental_forward(const float* in, float* out, int64_t total) {
    try {
      for_each_chunk((total + kChunk - 1) / kChunk, [&](int64_t chunk, int) {
        const int64_t first = chunk * kChunk, count = std::min(kChunk, total - first);
        auto& [desc, scratchpad, primitive] = eltwise_.get(count, [&] {
          const dnnl::memory::desc d({count}, dnnl::memory::data_type::f32, dnnl::memory::format_tag::x);
          const auto algorithm = kind_ == Activation::sigmoid ? dnnl::algorithm::eltwise_logistic
                                                              : dnnl::algorithm::eltwise_tanh;
          OneThread one_thread;
          const dnnl::eltwise_forward::primitive_desc pd(
              {dnnl::prop_kind::forward_inference, algorithm, d, 0.0f, 0.0f}, user_scratchpad(), cpu_engine());
          return Eltwise{d, pd.scratchpad_desc(), dnnl::eltwise_forward(pd)};
        });
        dnnl::stream stream(cpu_engine());
        primitive.execute(stream, {{DNNL_ARG_SRC, dnnl::memory(desc, cpu_engine(), const_cast<float*>(in) + first)},
                                   {DNNL_ARG_DST, dnnl::memory(desc, cpu_engine(), out + first)},
                                   {DNNL_ARG_SCRATCHPAD, thread_scratchpad(scratchpad)}});
      });
    } catch (const dnnl::error& e) {
      fail_runtime(describe(), ": oneDNN eltwise failed: ", e.what());
    }
  }

  Activation kind_;
  Tensor y_, dx_;
  struct Eltwise {
    dnnl::memory::desc data, scratchpad;
    dnnl::eltwise_forward primitive;
  };
  Cache<Eltwise> eltwise_;  // by chunk length
};

// ---------------------------------------------------------------- dropout
// Inverted dropout: kept values are scaled by 1/(1 - p) in training; eval is
// the identity. The mask is a hash of (seed, step, layer, index), so it does
// not depend on threads or on where a run was resumed.
class Dropout final : public Layer {
 public:
  Dropout(double p, uint64_t salt) : p_(p), salt_(salt) {
    if (!(p >= 0.0 && p < 1.0)) fail_invalid("dropout: p must be in [0, 1), got ", p);
  }
  std::string type() const override { return "dropout"; }
  std::string describe() const override { return "dropout(" + std::to_string(p_) + ")"; }
  std::vector<int64_t> output_shape(const std::vector<int64_t>& input) const override {
    return input;
  }
  void set_step(uint64_t seed, uint64_t step) override { key_ = splitmix64(seed ^ splitmix64(step + salt_)); }
  void set_batch_offset(int64_t first_sample) override { first_sample_ = first_sample; }
  const Tensor& forward(const Tensor& x, Mode mode) override {
    y_.reshape(x.shape, x.format);
    const int64_t total = x.numel();
    // Element i of this batch is element `offset + i` of the global batch.
    const auto offset = static_cast<uint64_t>(first_sample_ * (x.shape[0] ? total / x.shape[0] : 0));
    if (mode == Mode::eval || p_ == 0.0) {
      std::copy(x.data.begin(), x.data.end(), y_.data.begin());
      scale_.assign(static_cast<size_t>(total), 1.0f);
      return y_;
    }
    scale_.resize(static_cast<size_t>(total));
    const float keep_scale = static_cast<float>(1.0 / (1.0 - p_));
    const auto threshold = static_cast<uint64_t>(p_ * 18446744073709551616.0);
    parallel_for(threads_for(total), total, [&](int64_t i) {
      scale_[i] = splitmix64(key_ + offset + static_cast<uint64_t>(i)) < threshold ? 0.0f : keep_scale;
      y_.data[i] = x.data[i] * scale_[i];
    });
    return y_;
  }
  const Tensor& backward(const Tensor& dy, bool need_input_grad) override {
    if (!need_input_grad) return no_input_grad(dx_, dy.format);
    dx_.reshape(dy.shape, dy.format);
    for (size_t i = 0; i < dy.data.size(); ++i) dx_.data[i] = dy.data[i] * scale_[i];
    return dx_;
  }

 private:
  double p_;
  uint64_t salt_, key_ = 0;
  int64_t first_sample_ = 0;
  std::vector<float> scale_;
  Tensor y_, dx_;
};

// ---------------------------------------------------------------- flatten
// [N, C, H, W] -> [N, C·H·W] in (c, h, w) order whatever the memory format,
// so a model means the same thing in either format (and matches PyTorch).
class Flatten final : public Layer {
 public:
  Flatten(const std::vector<int64_t>& input, MemoryFormat format) : input_(input), format_(format) {}
  std::string type() const override { return "flatten"; }
  std::string describe() const override { return "flatten"; }
  std::vector<int64_t> output_shape(const std::vector<int64_t>& input) const override {
    int64_t n = 1;
    for (const auto d : input) n *= d;
    return {n};
  }
  const Tensor& forward(const Tensor& x, Mode) override {
    const int64_t n = x.shape[0], features = x.numel() / n;
    y_.reshape({n, features}, MemoryFormat::channels_first);
    // With one channel, channels-last data are already in (c, h, w) order.
    if (x.shape.size() != 4 || x.format == MemoryFormat::channels_first || x.shape[1] == 1)
      std::copy(x.data.begin(), x.data.end(), y_.data.begin());
    else
      reorder_images(x.data.data(), y_.data.data(), x.shape, dnnl::memory::format_tag::nhwc,
                     dnnl::memory::format_tag::nchw);
    return y_;
  }
  const Tensor& backward(const Tensor& dy, bool need_input_grad) override {
    if (!need_input_grad) return no_input_grad(dx_, format_);
    const int64_t n = dy.shape[0];
    std::vector<int64_t> shape = {n};
    shape.insert(shape.end(), input_.begin(), input_.end());
    if (shape.size() != 4) {
      dx_.reshape(shape, MemoryFormat::channels_first);
      std::copy(dy.data.begin(), dy.data.end(), dx_.data.begin());
      return dx_;
    }
    dx_.reshape(shape, format_);
    if (format_ == MemoryFormat::channels_first || shape[1] == 1)
      std::copy(dy.data.begin(), dy.data.end(), dx_.data.begin());
    else
      reorder_images(dy.data.data(), dx_.data.data(), shape, dnnl::memory::format_tag::nchw,
                     dnnl::memory::format_tag::nhwc);
    return dx_;
  }

 private:
  // Images [N, C, H, W] from one memory format to the other (a transpose per
  // sample), by oneDNN's reorder, in chunks of samples over normkit's threads.
  static void reorder_images(const float* from, float* to, const std::vector<int64_t>& shape,
                             dnnl::memory::format_tag from_tag, dnnl::memory::format_tag to_tag) {
    constexpr int64_t kSamples = 16;
    const int64_t n = shape[0], per_sample = shape[1] * shape[2] * shape[3];
    try {
      for_each_chunk((n + kSamples - 1) / kSamples, [&](int64_t chunk, int) {
        const int64_t first = chunk * kSamples, k = std::min(kSamples, n - first);
        const dnnl::memory::dims dims = {k, shape[1], shape[2], shape[3]};
        const auto f32 = dnnl::memory::data_type::f32;
        dnnl::memory src({dims, f32, from_tag}, cpu_engine(),
                         const_cast<float*>(from) + first * per_sample);
        dnnl::memory dst({dims, f32, to_tag}, cpu_engine(), to + first * per_sample);
        dnnl::stream stream(cpu_engine());
        dnnl::reorder(src, dst).execute(stream, src, dst);
      });
    } catch (const dnnl::error& e) {
      fail_runtime("flatten: oneDNN reorder failed: ", e.what());
    }
  }

  std::vector<int64_t> input_;
  MemoryFormat format_;
  Tensor y_, dx_;
};

// Batch norm and its variants: batch_norm_layers.cpp (make_batch_norm_layer).

}  // namespace

namespace {

using Input = std::vector<int64_t>;

void need_image(const std::string& type, const Input& input) {
  if (input.size() != 3) fail_invalid(type, ": needs a [C, H, W] input, got ", shape_text(input));
}

std::unique_ptr<Layer> build_linear(const ModelSpec::LayerSpec& spec, const Input& input,
                                    MemoryFormat, size_t) {
  if (input.size() != 1)
    fail_invalid("linear: needs a flat input, got ", shape_text(input), " (add 'flatten')");
  const int64_t out = int_arg(spec.args[0]);
  if (out < 1) fail_invalid("linear: output size must be >= 1, got ", out);
  return std::make_unique<Linear>(input[0], out, option_or(spec, "bias", 1) != 0);
}

std::unique_ptr<Layer> build_conv(const ModelSpec::LayerSpec& spec, const Input& input,
                                  MemoryFormat format, size_t) {
  need_image(spec.type, input);
  const int64_t out = int_arg(spec.args[0]), k = int_arg(spec.args[1]);
  const int64_t stride = int_option_or(spec, "stride", 1), pad = int_option_or(spec, "pad", 0);
  if (out < 1 || k < 1 || stride < 1 || pad < 0)
    fail_invalid("conv: bad sizes (out ", out, ", kernel ", k, ", stride ", stride, ", pad ", pad, ")");
  if (input[1] + 2 * pad < k || input[2] + 2 * pad < k)
    fail_invalid("conv: kernel ", k, " is larger than the padded input ", shape_text(input));
  return make_conv_layer(input, out, k, stride, pad, option_or(spec, "bias", 1) != 0, format);
}

std::unique_ptr<Layer> build_pool(const ModelSpec::LayerSpec& spec, const Input& input,
                                  MemoryFormat format, size_t) {
  const std::string& t = spec.type;
  need_image(t, input);
  const int64_t k = int_arg(spec.args[0]);
  const int64_t stride = int_option_or(spec, "stride", k);
  if (k < 1 || stride < 1 || input[1] < k || input[2] < k)
    fail_invalid(t, ": window ", k, " (stride ", stride, ") does not fit input ", shape_text(input));
  if (t == "maxpool" && k > kMaxPoolWindow)
    fail_invalid(t, ": windows up to ", kMaxPoolWindow, " wide are supported, got ", k);
  return std::make_unique<Pool2d>(input, k, stride, t == "maxpool", format);
}

template <Activation kActivation>
std::unique_ptr<Layer> build_activation(const ModelSpec::LayerSpec&, const Input&, MemoryFormat,
                                        size_t) {
  return std::make_unique<Elementwise>(kActivation);
}

std::unique_ptr<Layer> build_dropout(const ModelSpec::LayerSpec& spec, const Input&, MemoryFormat,
                                     size_t index) {
  return std::make_unique<Dropout>(spec_number(spec.args[0]), 0x1000193ull * (index + 1));
}

std::unique_ptr<Layer> build_flatten(const ModelSpec::LayerSpec&, const Input& input,
                                     MemoryFormat format, size_t) {
  return std::make_unique<Flatten>(input, format);
}

std::unique_ptr<Layer> build_layer_norm(const ModelSpec::LayerSpec& spec, const Input& input,
                                        MemoryFormat format, size_t) {
  return make_layer_norm(input, option_or(spec, "eps", 1e-5), format);
}

// eps defaults to float's machine epsilon, as torch.nn.RMSNorm's eps=None.
std::unique_ptr<Layer> build_rms_norm(const ModelSpec::LayerSpec& spec, const Input& input,
                                      MemoryFormat format, size_t) {
  return make_layer_norm(input, option_or(spec, "eps", 1.1920928955078125e-07), format, true);
}

std::unique_ptr<Layer> build_batch_norm(const ModelSpec::LayerSpec& spec, const Input& input,
                                        MemoryFormat, size_t index) {
  return make_batch_norm_layer(spec, input, index);
}

std::unique_ptr<Layer> build_group_norm(const ModelSpec::LayerSpec& spec, const Input& input,
                                        MemoryFormat, size_t) {
  return make_group_norm_layer(spec, input);
}

std::unique_ptr<Layer> build_instance_norm(const ModelSpec::LayerSpec& spec, const Input& input,
                                           MemoryFormat, size_t) {
  return make_instance_norm_layer(spec, input);
}

// ---------------------------------------------------------------- sizes
// LayerKind::size for each kind: the output shape, parameters and buffers of the
// layer build would make (tests hold them against the built layers), and its
// activations: every layer keeps its output and an input gradient for backward,
// some layers more (below). nullopt: the input does not suit the layer.

int64_t numel_of(const Input& shape) {
  int64_t n = 1;
  for (const int64_t d : shape) n = checked_mul(n, d, "a layer's size");
  return n;
}

LayerSize sized(const Input& input, Input output, int64_t parameters = 0, int64_t buffers = 0,
                int64_t extra_activations = 0) {
  const int64_t kept = checked_add(numel_of(output), numel_of(input), "the size of a layer's activations");
  return {std::move(output), parameters, buffers,
          checked_add(kept, extra_activations, "the size of a layer's activations")};
}

std::optional<LayerSize> size_linear(const ModelSpec::LayerSpec& spec, const Input& input) {
  const int64_t out = int_arg(spec.args[0]);
  if (input.size() != 1 || out < 1) return std::nullopt;
  const int64_t weights = checked_mul(input[0], out, "linear: the weight count");
  const bool bias = option_or(spec, "bias", 1) != 0;
  return sized(input, {out}, checked_add(weights, bias ? out : 0, "linear: the parameter count"));
}

// Beyond the output and input gradient: the weight gradient of every chunk of
// kConvChunkSamples samples, kept apart until they are added in order (conv_layer.cpp).
std::optional<LayerSize> size_conv(const ModelSpec::LayerSpec& spec, const Input& input) {
  const int64_t out = int_arg(spec.args[0]), k = int_arg(spec.args[1]);
  const int64_t stride = int_option_or(spec, "stride", 1), pad = int_option_or(spec, "pad", 0);
  if (input.size() != 3 || out < 1 || k < 1 || stride < 1 || pad < 0) return std::nullopt;
  const int64_t padding = checked_mul(2, pad, "conv: the padding");
  const int64_t h = checked_add(input[1], padding, "conv: the padded height");
  const int64_t w = checked_add(input[2], padding, "conv: the padded width");
  if (h < k || w < k) return std::nullopt;
  const int64_t oh = window_positions(h, k, stride), ow = window_positions(w, k, stride);
  const int64_t per_position = checked_mul(checked_mul(k, k, "conv: the kernel"), input[0],
                                           "conv: the weights per output channel");
  const int64_t weights = checked_mul(per_position, out, "conv: the weight count");
  const bool bias = option_or(spec, "bias", 1) != 0;
  const int64_t parameters = checked_add(weights, bias ? out : 0, "conv: the parameter count");
  return sized(input, {out, oh, ow}, parameters, 0,
               parameters / kConvChunkSamples + (parameters % kConvChunkSamples != 0));
}

// Max pooling also keeps the position of each output's maximum in its window
// (a WindowIndex: half a float's room).
std::optional<LayerSize> size_pool(const ModelSpec::LayerSpec& spec, const Input& input) {
  const int64_t k = int_arg(spec.args[0]), stride = int_option_or(spec, "stride", k);
  if (input.size() != 3 || k < 1 || stride < 1 || input[1] < k || input[2] < k) return std::nullopt;
  const Input output = {input[0], window_positions(input[1], k, stride),
                        window_positions(input[2], k, stride)};
  static_assert(sizeof(WindowIndex) * 2 == sizeof(float));
  const int64_t outputs = numel_of(output);
  return sized(input, output, 0, 0, spec.type == "maxpool" ? outputs / 2 + outputs % 2 : 0);
}

std::optional<LayerSize> size_activation(const ModelSpec::LayerSpec&, const Input& input) {
  return sized(input, input);
}

// Dropout also keeps its scale (0 or 1/(1-p)) per element.
std::optional<LayerSize> size_dropout(const ModelSpec::LayerSpec&, const Input& input) {
  return sized(input, input, 0, 0, numel_of(input));
}

std::optional<LayerSize> size_flatten(const ModelSpec::LayerSpec&, const Input& input) {
  return sized(input, {numel_of(input)});
}

bool flat_or_image(const Input& input) { return input.size() == 1 || input.size() == 3; }

// γ, β; running mean and variance and the batch counter. Noisy BN also keeps
// its noise and the gradient it scales, per element.
std::optional<LayerSize> size_batch_norm(const ModelSpec::LayerSpec& spec, const Input& input) {
  if (!flat_or_image(input)) return std::nullopt;
  const int64_t c = input[0];
  const bool noisy = option_or(spec, "noise", 0) > 0;
  return sized(input, input, checked_mul(2, c, "the parameter count"),
               checked_add(checked_mul(2, c, "the buffer count"), 1, "the buffer count"),
               noisy ? checked_mul(2, numel_of(input), "the noise") : 0);
}

// γ and β for every feature of a sample.
std::optional<LayerSize> size_layer_norm(const ModelSpec::LayerSpec&, const Input& input) {
  if (!flat_or_image(input)) return std::nullopt;
  return sized(input, input, checked_mul(2, numel_of(input), "layernorm: the parameter count"));
}

std::optional<LayerSize> size_rms_norm(const ModelSpec::LayerSpec&, const Input& input) {
  if (!flat_or_image(input)) return std::nullopt;  // γ only
  return sized(input, input, numel_of(input));
}

std::optional<LayerSize> size_group_norm(const ModelSpec::LayerSpec& spec, const Input& input) {
  if (!flat_or_image(input)) return std::nullopt;
  const bool affine = option_or(spec, "affine", 1) != 0;
  return sized(input, input, affine ? checked_mul(2, input[0], "the parameter count") : 0);
}

std::optional<LayerSize> size_instance_norm(const ModelSpec::LayerSpec& spec, const Input& input) {
  if (input.size() != 3) return std::nullopt;
  const int64_t c2 = checked_mul(2, input[0], "the parameter count");
  const bool affine = option_or(spec, "affine", 1) != 0;
  const bool tracked = option_or(spec, "track_running_stats", 0) != 0;
  return sized(input, input, affine ? c2 : 0, tracked ? c2 + 1 : 0);
}

// The layers of its body and shortcut (each sized by its own kind), and what the
// block keeps itself: its output and the gradient of the sum (output-sized), and
// its input gradient. nullopt when a layer does not suit its input or the body's
// output is not the shortcut's (the build names which).
std::optional<LayerSize> size_residual(const ModelSpec::LayerSpec& spec, const Input& input) {
  if (spec.body.empty()) return std::nullopt;
  int64_t parameters = 0, buffers = 0, activations = 0;
  auto add = [&](const std::vector<ModelSpec::LayerSpec>& layers) -> std::optional<Input> {
    Input shape = input;
    for (const auto& layer : layers) {
      const LayerKind* kind = find_layer_kind(layer.type);
      if (!kind) return std::nullopt;
      const std::optional<LayerSize> size = kind->size(layer, shape);
      if (!size) return std::nullopt;
      parameters = checked_add(parameters, size->parameters, "residual: the parameter count");
      buffers = checked_add(buffers, size->buffers, "residual: the buffer count");
      activations = checked_add(activations, size->activations, "residual: the activations");
      shape = size->output;
    }
    return shape;
  };
  const std::optional<Input> body = add(spec.body), shortcut = add(spec.shortcut);
  if (!body || !shortcut || *body != *shortcut) return std::nullopt;
  return sized(input, *body, parameters, buffers,
               checked_add(activations, numel_of(*body), "residual: the activations"));
}

}  // namespace

const std::vector<LayerKind>& layer_kinds() {
  static const std::vector<LayerKind> table = {
      {"linear", 1, 1, {"bias"}, false, build_linear, size_linear},
      {"conv", 2, 2, {"stride", "pad", "bias"}, false, build_conv, size_conv},
      {"maxpool", 1, 1, {"stride"}, false, build_pool, size_pool},
      {"avgpool", 1, 1, {"stride"}, false, build_pool, size_pool},
      {"relu", 0, 0, {}, false, build_activation<Activation::relu>, size_activation},
      {"sigmoid", 0, 0, {}, false, build_activation<Activation::sigmoid>, size_activation},
      {"tanh", 0, 0, {}, false, build_activation<Activation::tanh>, size_activation},
      {"dropout", 1, 1, {}, false, build_dropout, size_dropout},
      {"flatten", 0, 0, {}, false, build_flatten, size_flatten},
      {"batchnorm", 0, 0, {"eps", "momentum", "frozen", "noise"}, true, build_batch_norm,
       size_batch_norm},
      {"batchrenorm", 0, 0, {"eps", "momentum", "rmax", "dmax", "warmup", "frozen", "noise"}, true,
       build_batch_norm, size_batch_norm},
      {"ghostbatchnorm", 0, 0, {"eps", "momentum", "size", "frozen", "noise"}, true, build_batch_norm,
       size_batch_norm},
      {"layernorm", 0, 0, {"eps"}, true, build_layer_norm, size_layer_norm},
      {"rmsnorm", 0, 0, {"eps"}, true, build_rms_norm, size_rms_norm},
      {"groupnorm", 0, 0, {"groups", "eps", "affine"}, true, build_group_norm, size_group_norm},
      {"instancenorm", 0, 0, {"eps", "momentum", "affine", "track_running_stats"}, true,
       build_instance_norm, size_instance_norm},
      {"residual", 0, 0, {}, false, make_residual, size_residual},
  };
  return table;
}

const LayerKind* find_layer_kind(const std::string& type) {
  for (const LayerKind& kind : layer_kinds())
    if (type == kind.type) return &kind;
  return nullptr;
}

std::unique_ptr<Layer> make_layer(const ModelSpec::LayerSpec& spec,
                                  const std::vector<int64_t>& input, MemoryFormat format,
                                  size_t index) {
  const LayerKind* kind = find_layer_kind(spec.type);
  if (!kind) fail_invalid("unknown layer type '", spec.type, "'");
  return kind->build(spec, input, format, index);
}

}  // namespace normkit::nn::detail
