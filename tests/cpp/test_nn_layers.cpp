// The engine's layers one at a time: forward against plain double loops,
// backward against central differences, both memory formats against each other.
#include <gtest/gtest.h>
#include <oneapi/dnnl/dnnl.h>
#include <pthread.h>
#include <signal.h>

#include <cmath>
#include <numeric>
#include <set>
#include <sstream>

#include "nn_test_support.hpp"
#include "normkit/batch_norm.hpp"
#include "normkit/threading.hpp"

namespace {

using namespace nn_test;
using normkit::ErrorKind;
using normkit::nn::Parameter;

constexpr MemoryFormat kFormats[] = {MemoryFormat::channels_first, MemoryFormat::channels_last};

// |actual - expected| <= tol · (1 + |expected|), element by element.
void expect_close(const std::vector<float>& actual, const std::vector<double>& expected, double tol,
                  const std::string& what) {
  ASSERT_EQ(actual.size(), expected.size()) << what;
  for (size_t i = 0; i < actual.size(); ++i)
    ASSERT_NEAR(actual[i], expected[i], tol * (1 + std::abs(expected[i]))) << what << " at " << i;
}
void expect_close(const std::vector<float>& actual, const std::vector<float>& expected, double tol,
                  const std::string& what) {
  expect_close(actual, std::vector<double>(expected.begin(), expected.end()), tol, what);
}

Parameter* param(Layer& layer, const std::string& name) {
  for (auto* p : layer.parameters())
    if (p->name == name) return p;
  return nullptr;
}

// ---------------------------------------------------------------- linear

TEST(NnLinear, ForwardMatchesDoubleLoopsAndGradientsMatchFiniteDifferences) {
  for (const bool bias : {true, false}) {
    const std::string what = bias ? "with bias" : "without bias";
    SCOPED_TRACE(what);
    const int64_t N = 5, IN = 7, OUT = 4;
    auto layer = make_layer(std::string("linear 4 bias=") + (bias ? "1" : "0"), {IN},
                            MemoryFormat::channels_first);
    EXPECT_EQ(layer->parameters().size(), bias ? 2u : 1u);
    Parameter* w = param(*layer, "weight");
    ASSERT_NE(w, nullptr);
    w->value = normal_values(OUT * IN, 11);
    if (bias) param(*layer, "bias")->value = normal_values(OUT, 12);
    const auto xs = normal_values(N * IN, 13);
    const Tensor x = make_tensor({N, IN}, MemoryFormat::channels_first, xs);
    const Tensor& y = layer->forward(x, Mode::train);
    ASSERT_EQ(y.shape, (std::vector<int64_t>{N, OUT}));
    std::vector<double> ref(N * OUT);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t o = 0; o < OUT; ++o) {
        double s = bias ? param(*layer, "bias")->value[o] : 0.0;
        for (int64_t i = 0; i < IN; ++i) s += double{w->value[o * IN + i]} * xs[n * IN + i];
        ref[n * OUT + o] = s;
      }
    expect_close(y.data, ref, 1e-5, "y");
    check_layer_gradients(*layer, x, {}, "linear " + what);
  }
}

TEST(NnLinear, ParameterGradientsAccumulateAcrossBackwardCalls) {
  auto layer = make_layer("linear 3", {4}, MemoryFormat::channels_first);
  std::mt19937_64 rng(3);
  layer->initialize({}, rng);
  const Tensor x = make_tensor({2, 4}, MemoryFormat::channels_first, normal_values(8, 4));
  Tensor dy = make_tensor({2, 3}, MemoryFormat::channels_first, normal_values(6, 5));
  zero_grads(*layer);
  layer->forward(x, Mode::train);
  layer->backward(dy, true);
  std::vector<std::vector<float>> once;
  for (auto* p : layer->parameters()) once.push_back(p->grad);
  layer->forward(x, Mode::train);
  layer->backward(dy, false);
  const auto params = layer->parameters();
  for (size_t k = 0; k < params.size(); ++k)
    for (size_t i = 0; i < once[k].size(); ++i)
      EXPECT_FLOAT_EQ(params[k]->grad[i], 2 * once[k][i]) << params[k]->name;
}

// The kernels compile on another thread while the first products run here
// (both go through oneDNN's one-time set-up); the caller's signal mask is
// left as it was.
TEST(NnLinear, GradientsAreRightWhileTheKernelsCompileOnAnotherThread) {
  const int64_t N = 64, IN = 100, OUT = 30;
  auto layer = make_layer("linear 30 bias=0", {IN}, MemoryFormat::channels_first);
  Parameter* w = param(*layer, "weight");
  w->value = normal_values(OUT * IN, 21);
  const auto xs = normal_values(N * IN, 22), dys = normal_values(N * OUT, 23);
  const Tensor x = make_tensor({N, IN}, MemoryFormat::channels_first, xs);
  const Tensor dy = make_tensor({N, OUT}, MemoryFormat::channels_first, dys);
  sigset_t before, after;
  pthread_sigmask(SIG_SETMASK, nullptr, &before);
  std::vector<float> dx;
  {
    const normkit::nn::KernelWarmUp warm_up;
    pthread_sigmask(SIG_SETMASK, nullptr, &after);
    zero_grads(*layer);
    layer->forward(x, Mode::train);
    dx = layer->backward(dy, true).data;
  }
  for (int signal = 1; signal < NSIG; ++signal)
    EXPECT_EQ(sigismember(&before, signal), sigismember(&after, signal)) << "signal " << signal;
  std::vector<double> dw(OUT * IN, 0.0), dx_ref(N * IN, 0.0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t o = 0; o < OUT; ++o)
      for (int64_t i = 0; i < IN; ++i) {
        dw[o * IN + i] += double{dys[n * OUT + o]} * xs[n * IN + i];
        dx_ref[n * IN + i] += double{dys[n * OUT + o]} * w->value[o * IN + i];
      }
  expect_close(w->grad, dw, 1e-5, "dW");
  expect_close(dx, dx_ref, 1e-5, "dx");
}

TEST(NnLinear, RejectsTheWrongInputWithItsName) {
  auto layer = make_layer("linear 3", {4}, MemoryFormat::channels_first);
  EXPECT_TRUE(throws_error([&] { layer->output_shape({5}); }, ErrorKind::invalid_argument,
                           {"linear(4 -> 3, bias)", "[5]"}));
}

// ---------------------------------------------------------------- conv

struct ConvCase {
  int64_t k, stride, pad;
  bool bias;
};

// y[n, o, oh, ow] = b[o] + Σ_{ci, kh, kw} W[o, ci, kh, kw] · x[n, ci, oh·s - p + kh, ow·s - p + kw]
std::vector<double> conv_reference(const std::vector<float>& x, const std::vector<int64_t>& shape,
                                   const std::vector<float>& w, const std::vector<float>* b,
                                   int64_t out, const ConvCase& c) {
  const int64_t N = shape[0], C = shape[1], H = shape[2], W = shape[3];
  const int64_t OH = (H + 2 * c.pad - c.k) / c.stride + 1, OW = (W + 2 * c.pad - c.k) / c.stride + 1;
  std::vector<double> y(N * out * OH * OW);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t o = 0; o < out; ++o)
      for (int64_t oh = 0; oh < OH; ++oh)
        for (int64_t ow = 0; ow < OW; ++ow) {
          double s = b ? (*b)[o] : 0.0;
          for (int64_t ci = 0; ci < C; ++ci)
            for (int64_t kh = 0; kh < c.k; ++kh)
              for (int64_t kw = 0; kw < c.k; ++kw) {
                const int64_t ih = oh * c.stride - c.pad + kh, iw = ow * c.stride - c.pad + kw;
                if (ih < 0 || ih >= H || iw < 0 || iw >= W) continue;
                s += double{w[((o * C + ci) * c.k + kh) * c.k + kw]} * x[((n * C + ci) * H + ih) * W + iw];
              }
          y[((n * out + o) * OH + oh) * OW + ow] = s;
        }
  return y;
}

TEST(NnConv, ForwardMatchesDoubleLoopsAndGradientsMatchFiniteDifferencesInBothFormats) {
  const std::vector<int64_t> shape = {3, 2, 7, 6};
  const int64_t OUT = 4;
  const auto xs = normal_values(product(shape), 21);
  for (const ConvCase c : {ConvCase{3, 1, 0, true}, ConvCase{3, 1, 1, false}, ConvCase{3, 2, 0, false},
                           ConvCase{3, 2, 1, true}, ConvCase{1, 1, 0, false}, ConvCase{2, 2, 1, true}}) {
    const std::string line = "conv 4 " + std::to_string(c.k) + " stride=" + std::to_string(c.stride) +
                             " pad=" + std::to_string(c.pad) + " bias=" + (c.bias ? "1" : "0");
    std::vector<std::vector<float>> outputs, input_grads, weight_grads;
    for (const auto format : kFormats) {
      const std::string what = line + ", " + name_of(format);
      SCOPED_TRACE(what);
      auto layer = make_layer(line, {shape[1], shape[2], shape[3]}, format);
      Parameter* w = param(*layer, "weight");
      w->value = normal_values(w->value.size(), 22);
      Parameter* b = param(*layer, "bias");
      ASSERT_EQ(b != nullptr, c.bias);
      if (b) b->value = normal_values(OUT, 23);
      const Tensor x = make_tensor(shape, format, xs);
      const Tensor& y = layer->forward(x, Mode::train);
      EXPECT_EQ(y.format, format);
      const auto ref = conv_reference(xs, shape, w->value, b ? &b->value : nullptr, OUT, c);
      expect_close(canonical(y), ref, 1e-5, "y");
      outputs.push_back(canonical(y));
      check_layer_gradients(*layer, x, {}, what);

      // The same dy (in logical order) in both formats, for the comparison below.
      const Tensor& y2 = layer->forward(x, Mode::train);
      Tensor dy = make_tensor(y2.shape, format, normal_values(y2.data.size(), 24));
      zero_grads(*layer);
      input_grads.push_back(canonical(layer->backward(dy, true)));
      weight_grads.push_back(w->grad);
    }
    // Same weights, same logical input: same logical outputs and gradients.
    expect_close(outputs[1], outputs[0], 1e-5, line + ": y, channels_last vs channels_first");
    expect_close(input_grads[1], input_grads[0], 1e-5, line + ": dx, channels_last vs channels_first");
    expect_close(weight_grads[1], weight_grads[0], 1e-5, line + ": dW, channels_last vs channels_first");
  }
}

// A batch of several chunks (16 samples each, the last shorter), in the
// layouts the channels-first primitives pick (blocks for 32 channels,
// channels-last for 4), in a first step and a second (the forward keeps x for
// the backward): y, dx and dW against double sums, in both formats. Each sum
// is allowed float rounding in proportion to the sum of its terms' magnitudes.
TEST(NnConv, BatchesOfSeveralChunksMatchDoubleSumsInBothFormats) {
  const int64_t N = 40, OUT = 8, S = 6;  // 3x3, pad 1: S x S in and out
  for (const int64_t C : {4, 32}) {
    const std::vector<int64_t> shape = {N, C, S, S};
    const auto xs = normal_values(product(shape), 31);
    const auto ws = normal_values(OUT * C * 9, 32);
    const auto dys = normal_values(N * OUT * S * S, 33);
    // y, dx and dW with the magnitude sums of their terms.
    std::vector<double> y(N * OUT * S * S), dx(N * C * S * S), dw(OUT * C * 9);
    std::vector<double> y_abs(y.size()), dx_abs(dx.size()), dw_abs(dw.size());
    for (int64_t n = 0; n < N; ++n)
      for (int64_t o = 0; o < OUT; ++o)
        for (int64_t c = 0; c < C; ++c)
          for (int64_t kh = 0; kh < 3; ++kh)
            for (int64_t kw = 0; kw < 3; ++kw)
              for (int64_t h = 0; h < S; ++h)
                for (int64_t w = 0; w < S; ++w) {
                  const int64_t ih = h + kh - 1, iw = w + kw - 1;
                  if (ih < 0 || ih >= S || iw < 0 || iw >= S) continue;
                  const int64_t yi = ((n * OUT + o) * S + h) * S + w;
                  const int64_t xi = ((n * C + c) * S + ih) * S + iw;
                  const int64_t wi = ((o * C + c) * 3 + kh) * 3 + kw;
                  y[yi] += double{xs[xi]} * ws[wi];
                  y_abs[yi] += std::abs(double{xs[xi]} * ws[wi]);
                  dx[xi] += double{dys[yi]} * ws[wi];
                  dx_abs[xi] += std::abs(double{dys[yi]} * ws[wi]);
                  dw[wi] += double{dys[yi]} * xs[xi];
                  dw_abs[wi] += std::abs(double{dys[yi]} * xs[xi]);
                }
    const auto expect_sums = [](const std::vector<float>& actual, const std::vector<double>& sums,
                                const std::vector<double>& magnitudes, const std::string& what) {
      ASSERT_EQ(actual.size(), sums.size()) << what;
      for (size_t i = 0; i < sums.size(); ++i)
        ASSERT_NEAR(actual[i], sums[i], 2e-6 * (1 + magnitudes[i])) << what << " at " << i;
    };
    for (const auto format : kFormats) {
      SCOPED_TRACE(std::to_string(C) + " channels, " + name_of(format));
      auto layer = make_layer("conv 8 3 pad=1 bias=0", {C, S, S}, format);
      param(*layer, "weight")->value = ws;
      const Tensor x = make_tensor(shape, format, xs);
      const Tensor dy = make_tensor({N, OUT, S, S}, format, dys);
      for (int step = 1; step <= 2; ++step) {
        const std::string when = "step " + std::to_string(step) + ": ";
        zero_grads(*layer);
        expect_sums(canonical(layer->forward(x, Mode::train)), y, y_abs, when + "y");
        expect_sums(canonical(layer->backward(dy, true)), dx, dx_abs, when + "dx");
        expect_sums(param(*layer, "weight")->grad, dw, dw_abs, when + "dW");
      }
    }
  }
}

// oneDNN's reference loops run a convolution hundreds of times slower than
// its JIT kernels (8 -> 16 channels channels-first: 955 ms a chunk against
// 0.7 ms). Its verbose log names the implementation of every primitive run.
TEST(NnConv, NeverRunsOneDnnsReferenceLoopsInEitherFormat) {
  for (const int64_t channels : {1, 2, 3, 4, 8, 12, 16})
    for (const auto format : kFormats) {
      const std::string what = std::to_string(channels) + " channels, " + name_of(format);
      SCOPED_TRACE(what);
      auto layer = make_layer("conv 16 3 pad=1", {channels, 10, 10}, format);
      std::mt19937_64 rng(7);
      layer->initialize({}, rng);
      const Tensor x = make_tensor({4, channels, 10, 10}, format, normal_values(400 * channels, 8));
      const Tensor dy = make_tensor({4, 16, 10, 10}, format, normal_values(6400, 9));
      zero_grads(*layer);
      dnnl_set_verbose(1);
      testing::internal::CaptureStdout();
      // A first layer's backward (no dx), then any other's.
      for (const bool input_grad : {false, true, true}) {
        layer->forward(x, Mode::train);
        layer->backward(dy, input_grad);
      }
      const std::string log = testing::internal::GetCapturedStdout();
      dnnl_set_verbose(0);
      std::istringstream lines(log);
      int convolutions = 0;
      for (std::string line; std::getline(lines, line);) {
        const bool ran = line.find(",exec,") != std::string::npos;
        if (!ran || line.find("convolution") == std::string::npos) continue;
        ++convolutions;
        EXPECT_EQ(line.find(",ref:"), std::string::npos) << line;
      }
      EXPECT_EQ(convolutions, 3 * 2 + 2) << "forward, weight gradient 3 times; data gradient twice";
    }
}

TEST(NnConv, WeightGradientsAccumulateInBothFormats) {
  for (const auto format : kFormats) {
    SCOPED_TRACE(name_of(format));
    auto layer = make_layer("conv 3 3 pad=1", {2, 5, 5}, format);
    std::mt19937_64 rng(5);
    layer->initialize({}, rng);
    const Tensor x = make_tensor({2, 2, 5, 5}, format, normal_values(100, 6));
    const Tensor dy = make_tensor({2, 3, 5, 5}, format, normal_values(150, 7));
    zero_grads(*layer);
    layer->forward(x, Mode::train);
    layer->backward(dy, false);
    std::vector<std::vector<float>> once;
    for (auto* p : layer->parameters()) once.push_back(p->grad);
    layer->forward(x, Mode::train);
    layer->backward(dy, true);
    const auto params = layer->parameters();
    for (size_t k = 0; k < params.size(); ++k)
      for (size_t i = 0; i < once[k].size(); ++i)
        EXPECT_NEAR(params[k]->grad[i], 2 * once[k][i], 1e-5 * (1 + std::abs(once[k][i])))
            << params[k]->name;
  }
}

TEST(NnConv, RejectsBadGeometry) {
  EXPECT_TRUE(throws_error([] { make_layer("conv 4 5", {1, 3, 3}, MemoryFormat::channels_first); },
                           ErrorKind::invalid_argument, {"kernel 5", "larger"}));
  EXPECT_TRUE(throws_error([] { make_layer("conv 4 3 stride=0", {1, 8, 8}, MemoryFormat::channels_first); },
                           ErrorKind::invalid_argument, {"stride 0"}));
  EXPECT_TRUE(throws_error([] { make_layer("conv 4 3", {8}, MemoryFormat::channels_first); },
                           ErrorKind::invalid_argument, {"conv", "[C, H, W]"}));
}

// A backward needs the dy of the last forward's output: before any forward,
// or with another batch size or shape, it names the problem and reads nothing.
TEST(NnConv, RejectsAGradientOfAnotherShape) {
  auto layer = make_layer("conv 3 3 pad=1", {2, 5, 5}, MemoryFormat::channels_last);
  const Tensor dy = make_tensor({2, 3, 5, 5}, MemoryFormat::channels_last, normal_values(150, 7));
  EXPECT_TRUE(throws_error([&] { layer->backward(dy, true); }, ErrorKind::invalid_argument,
                           {"conv(2 -> 3", "dy [2, 3, 5, 5]", "last forward"}));
  layer->forward(make_tensor({4, 2, 5, 5}, MemoryFormat::channels_last, normal_values(200, 6)),
                 Mode::train);
  for (const auto& shape : {std::vector<int64_t>{2, 3, 5, 5}, {4, 3, 5, 4}, {4, 75}}) {
    const Tensor bad = make_tensor(shape, MemoryFormat::channels_last, normal_values(4 * 75, 8));
    EXPECT_TRUE(throws_error([&] { layer->backward(bad, true); }, ErrorKind::invalid_argument,
                             {"dy", "last forward"}));
  }
}

// ---------------------------------------------------------------- pooling

// Distinct values at least 0.05 apart (a shuffled ramp), so a window's maximum
// does not change under the ±0.01 steps of the gradient check.
std::vector<float> distinct_values(size_t count, uint64_t seed) {
  std::vector<float> out(count);
  for (size_t i = 0; i < count; ++i) out[i] = 0.05f * static_cast<float>(i) - 0.025f * static_cast<float>(count);
  std::mt19937_64 rng(seed);
  std::shuffle(out.begin(), out.end(), rng);
  return out;
}

std::vector<double> pool_reference(const std::vector<float>& x, const std::vector<int64_t>& shape,
                                   int64_t k, int64_t s, bool max) {
  const int64_t N = shape[0], C = shape[1], H = shape[2], W = shape[3];
  const int64_t OH = (H - k) / s + 1, OW = (W - k) / s + 1;
  std::vector<double> y(N * C * OH * OW);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t oh = 0; oh < OH; ++oh)
        for (int64_t ow = 0; ow < OW; ++ow) {
          double best = -INFINITY, sum = 0;
          for (int64_t kh = 0; kh < k; ++kh)
            for (int64_t kw = 0; kw < k; ++kw) {
              const double v = x[((n * C + c) * H + oh * s + kh) * W + ow * s + kw];
              best = std::max(best, v);
              sum += v;
            }
          y[((n * C + c) * OH + oh) * OW + ow] = max ? best : sum / static_cast<double>(k * k);
        }
  return y;
}

TEST(NnPool, ForwardMatchesDoubleLoopsAndGradientsMatchFiniteDifferences) {
  const std::vector<int64_t> shape = {2, 3, 7, 6};
  const auto xs = distinct_values(product(shape), 31);
  for (const char* type : {"maxpool", "avgpool"})
    for (const auto& [k, s] : {std::pair<int64_t, int64_t>{2, 2}, {3, 1}, {3, 2}, {2, 1}, {2, 3}})
      for (const auto format : kFormats) {
        const std::string line = std::string(type) + " " + std::to_string(k) + " stride=" + std::to_string(s);
        const std::string what = line + ", " + name_of(format);
        SCOPED_TRACE(what);
        auto layer = make_layer(line, {shape[1], shape[2], shape[3]}, format);
        const Tensor x = make_tensor(shape, format, xs);
        const Tensor& y = layer->forward(x, Mode::train);
        expect_close(canonical(y), pool_reference(xs, shape, k, s, type[0] == 'm'), 1e-6, "y");
        // Eval gives the same values.
        const auto train_y = y.data;
        EXPECT_EQ(layer->forward(x, Mode::eval).data, train_y);
        check_layer_gradients(*layer, x, {}, what);
      }
}

TEST(NnActivation, ReluPropagatesNaNLikePyTorch) {
  auto layer = make_layer("relu", {3}, MemoryFormat::channels_first);
  const auto& y = layer->forward(make_tensor({1, 3}, MemoryFormat::channels_first, {NAN, -1.0f, 2.0f}), Mode::train);
  EXPECT_TRUE(std::isnan(y.data[0]));
  EXPECT_EQ(y.data[1], 0.0f);
  EXPECT_EQ(y.data[2], 2.0f);
}

TEST(NnPool, MaxPoolPropagatesNaNLikePyTorch) {
  auto layer = make_layer("maxpool 2", {1, 2, 2}, MemoryFormat::channels_first);
  const Tensor x = make_tensor({1, 1, 2, 2}, MemoryFormat::channels_first, {1.0f, NAN, 3.0f, 2.0f});
  EXPECT_TRUE(std::isnan(layer->forward(x, Mode::train).data[0]));
}

// PyTorch's rule in every format and window path (the 2×2 stride-2 loops are
// their own, and channels-first ones work in blocks of 16, 8 or 4 windows):
// ties go to the first position in the window, NaN wins, the last NaN if
// several; the gradient goes to the position that won.
TEST(NnPool, MaxPoolTiesGoFirstAndTheLastNaNWinsInBothFormats) {
  // Four kinds of 2×2 window (positions 0-3 in (kh, kw) order); window `win`
  // of channel c is of kind (c + win) % 4. Rows of 2, 5, 9 and 17 windows reach
  // every block width and the overlapping last block; the input row has one
  // column more (in no window).
  const std::vector<std::vector<float>> kinds = {
      {2.0f, 2.0f, 2.0f, 2.0f}, {1.0f, 5.0f, 5.0f, 0.0f}, {1.0f, NAN, 3.0f, NAN}, {NAN, 9.0f, 1.0f, 2.0f}};
  const int winner[] = {0, 1, 3, 0};
  for (const int64_t s : {2, 3})
    for (const int64_t windows : {2, 5, 9, 17})
      for (const auto format : kFormats) {
        const std::string line = "maxpool 2 stride=" + std::to_string(s);
        SCOPED_TRACE(line + ", " + std::to_string(windows) + " windows, " + name_of(format));
        const int64_t C = 4, W = s * (windows - 1) + 3;
        std::vector<float> xs(C * 2 * W, -7.0f);
        const auto at = [&](int64_t c, int64_t win, int j) { return (c * 2 + j / 2) * W + win * s + j % 2; };
        for (int64_t c = 0; c < C; ++c)
          for (int64_t win = 0; win < windows; ++win)
            for (int j = 0; j < 4; ++j) xs[at(c, win, j)] = kinds[(c + win) % 4][j];
        auto layer = make_layer(line, {C, 2, W}, format);
        const Tensor x = make_tensor({1, C, 2, W}, format, xs);
        const auto y = canonical(layer->forward(x, Mode::train));
        ASSERT_EQ(y.size(), static_cast<size_t>(windows * C));
        const Tensor dy = make_tensor({1, C, 1, windows}, format, std::vector<float>(windows * C, 1.0f));
        const auto dx = canonical(layer->backward(dy, true));
        const auto eval_y = canonical(layer->forward(x, Mode::eval));
        std::vector<bool> in_window(xs.size(), false);
        for (int64_t c = 0; c < C; ++c)
          for (int64_t win = 0; win < windows; ++win) {
            const int kind = static_cast<int>((c + win) % 4);
            const float best = kinds[kind][winner[kind]];
            for (const float got : {y[c * windows + win], eval_y[c * windows + win]}) {
              if (std::isnan(best)) EXPECT_TRUE(std::isnan(got)) << "channel " << c << " window " << win;
              else EXPECT_EQ(got, best) << "channel " << c << " window " << win;
            }
            for (int j = 0; j < 4; ++j) {
              in_window[at(c, win, j)] = true;
              EXPECT_EQ(dx[at(c, win, j)], j == winner[kind] ? 1.0f : 0.0f)
                  << "channel " << c << " window " << win << " position " << j;
            }
          }
        for (size_t i = 0; i < xs.size(); ++i)  // the columns in no window
          if (!in_window[i]) {
            EXPECT_EQ(dx[i], 0.0f) << "input " << i;
          }
      }
}

// BN, ReLU and 2×2 max pooling in one pass (ReluMaxPool2x2), by the same
// rules as the separate layers: the first of tied maxima, the last NaN, and no
// gradient for a maximum <= 0 or NaN. Five kinds of window; rows of 2, 5, 9
// and 17 windows (the loops take blocks of 16, 8 or 4 windows, the last one
// overlapping the one before or masked), one column and one row more in no
// window. Coefficients chosen so that every value is exact. The backward's
// sums are checked without the NaN (BN's training forward refuses NaN, so no
// NaN reaches them).
TEST(NnBatchNormReluMaxPool, TiesGoFirstTheLastNaNWinsAndNothingAtOrBelowZeroPasses) {
  // p = (x - 0.5)·2 - 1 = 2x - 2; dx = 3·g at the maximum + 0.5·(x - 0.5) + 0.25.
  const int64_t C = 5, H = 3;
  const float mean = 0.5f, scale = 2.0f, shift = -1.0f, a = 3.0f, b = 0.5f, k = 0.25f;
  for (const bool with_nan : {true, false})
    for (const int64_t windows : {2, 5, 9, 17})
      for (const auto format : kFormats) {
        SCOPED_TRACE(std::to_string(windows) + " windows, " + name_of(format) +
                     (with_nan ? ", NaN" : ""));
        const std::vector<std::vector<float>> kinds = {
            {2.0f, 2.0f, 2.0f, 2.0f},
            {1.0f, 5.0f, 5.0f, 0.0f},
            with_nan ? std::vector<float>{1.0f, NAN, 3.0f, NAN}
                     : std::vector<float>{1.0f, 7.0f, 3.0f, 7.0f},
            {0.5f, 0.25f, 1.0f, 0.75f},
            {0.0f, 0.5f, 0.0f, -1.0f}};
        const int winner[] = {0, 1, with_nan ? 3 : 1, 2, 1};
        const bool passes[] = {true, true, !with_nan, false, false};  // its maximum is > 0
        const int64_t W = 2 * windows + 1;
        std::vector<float> xs(C * H * W, -3.0f);
        const auto at = [&](int64_t c, int64_t win, int j) {
          return (c * H + j / 2) * W + 2 * win + j % 2;
        };
        for (int64_t c = 0; c < C; ++c)
          for (int64_t win = 0; win < windows; ++win)
            for (int j = 0; j < 4; ++j) xs[at(c, win, j)] = kinds[(c + win) % 5][j];
        normkit::nn::detail::ReluMaxPool2x2 pool;
        const std::vector<float> means(C, mean), scales(C, scale), shifts(C, shift), as(C, a),
            bs(C, b), ks(C, k);
        const Tensor x = make_tensor({1, C, H, W}, format, xs);
        Tensor y_tensor, dx_tensor;
        pool.forward(x, means.data(), scales.data(), shifts.data(), y_tensor);
        const auto y = canonical(y_tensor);
        const Tensor dy =
            make_tensor({1, C, 1, windows}, format, std::vector<float>(windows * C, 1.0f));
        std::vector<double> sum_g(C), sum_gx(C);
        const std::vector<double> mean_d(C, mean);
        pool.sums(dy, mean_d.data(), sum_g.data(), sum_gx.data());
        pool.dx(x, dy, {means.data(), as.data(), bs.data(), ks.data()}, dx_tensor);
        const auto dx = canonical(dx_tensor);
        for (int64_t c = 0; c < C; ++c) {
          double expected_g = 0, expected_gx = 0;
          for (int64_t win = 0; win < windows; ++win) {
            SCOPED_TRACE("channel " + std::to_string(c) + " window " + std::to_string(win));
            const int kind = static_cast<int>((c + win) % 5);
            const float best = kinds[kind][winner[kind]], got = y[c * windows + win];
            if (std::isnan(best)) EXPECT_TRUE(std::isnan(got));
            else EXPECT_EQ(got, std::max(2.0f * best - 2.0f, 0.0f));
            if (passes[kind]) {
              expected_g += 1;
              expected_gx += best - 0.5;
            }
            for (int j = 0; j < 4; ++j) {
              const float xv = kinds[kind][j], value = dx[at(c, win, j)];
              const float gradient = passes[kind] && j == winner[kind] ? a : 0.0f;
              if (std::isnan(xv)) EXPECT_TRUE(std::isnan(value));
              else EXPECT_EQ(value, gradient + b * (xv - mean) + k) << "position " << j;
              xs[at(c, win, j)] = NAN;  // marks the inputs in a window
            }
          }
          if (with_nan) continue;
          EXPECT_EQ(sum_g[c], expected_g) << "channel " << c;
          EXPECT_EQ(sum_gx[c], expected_gx) << "channel " << c;
        }
        for (size_t i = 0; i < xs.size(); ++i)  // the last column and row: in no window
          if (!std::isnan(xs[i])) {
            EXPECT_EQ(dx[i], b * (xs[i] - mean) + k) << "input " << i;
          }
      }
}

// ---------------------------------------------------------------- activations

TEST(NnActivation, ForwardValuesAndGradients) {
  const std::vector<int64_t> shape = {2, 3, 4, 5};
  auto xs = normal_values(product(shape), 41, 1.5f);
  // ReLU's kink stays out of reach of the ±0.01 steps.
  for (auto& v : xs)
    if (std::abs(v) < 0.05f) v = v < 0 ? -0.05f : 0.05f;
  for (const char* type : {"relu", "sigmoid", "tanh"})
    for (const auto format : kFormats) {
      const std::string what = std::string(type) + ", " + name_of(format);
      SCOPED_TRACE(what);
      auto layer = make_layer(type, {shape[1], shape[2], shape[3]}, format);
      EXPECT_TRUE(layer->parameters().empty());
      const Tensor x = make_tensor(shape, format, xs);
      const Tensor& y = layer->forward(x, Mode::train);
      EXPECT_EQ(y.format, format);
      std::vector<double> ref(xs.size());
      for (size_t i = 0; i < xs.size(); ++i) {
        const double v = xs[i];
        ref[i] = type[0] == 'r' ? std::max(v, 0.0) : type[0] == 's' ? 1 / (1 + std::exp(-v)) : std::tanh(v);
      }
      expect_close(canonical(y), ref, 2e-7, "y");
      check_layer_gradients(*layer, x, {}, what);
    }
  // Rank 2 as well (after a linear layer).
  auto layer = make_layer("sigmoid", {6}, MemoryFormat::channels_first);
  check_layer_gradients(*layer, make_tensor({4, 6}, MemoryFormat::channels_first, normal_values(24, 42)), {},
                        "sigmoid on [4, 6]");
}

// ---------------------------------------------------------------- dropout

TEST(NnDropout, MaskIsConsistentBetweenForwardAndBackward) {
  auto layer = make_layer("dropout 0.3", {2, 8, 8}, MemoryFormat::channels_last, 4);
  layer->set_step(7, 3);
  const std::vector<int64_t> shape = {4, 2, 8, 8};
  auto xs = normal_values(product(shape), 51);
  for (auto& v : xs) v = std::abs(v) + 0.5f;  // nonzero, so y / x shows the mask
  const Tensor x = make_tensor(shape, MemoryFormat::channels_last, xs);
  const auto y = layer->forward(x, Mode::train).data;
  Tensor dy = x;
  for (auto& v : dy.data) v = 1.0f;
  const auto dx = layer->backward(dy, true).data;
  const float keep_scale = 1.0f / 0.7f;
  int64_t dropped = 0;
  for (size_t i = 0; i < y.size(); ++i) {
    if (y[i] == 0.0f) {
      ++dropped;
      EXPECT_EQ(dx[i], 0.0f) << i;
    } else {
      EXPECT_FLOAT_EQ(y[i], x.data[i] * keep_scale) << i;
      EXPECT_FLOAT_EQ(dx[i], keep_scale) << i;
    }
  }
  EXPECT_GT(dropped, 0);
  // Gradients by finite differences too (the mask is fixed by (seed, step)).
  check_layer_gradients(*layer, x, {}, "dropout");
}

TEST(NnDropout, EvalIsTheIdentityAndTrainingKeepsAboutOneMinusP) {
  const double p = 0.25;
  auto layer = make_layer("dropout 0.25", {1000}, MemoryFormat::channels_first, 2);
  const int64_t N = 100, total = 100 * 1000;
  const auto xs = normal_values(total, 52);
  const Tensor x = make_tensor({N, 1000}, MemoryFormat::channels_first, xs);
  layer->set_step(1, 0);
  EXPECT_EQ(layer->forward(x, Mode::eval).data, xs);
  const auto y = layer->forward(x, Mode::train).data;
  int64_t kept = 0;
  double sum_x = 0, sum_y = 0;
  for (int64_t i = 0; i < total; ++i) {
    kept += y[i] != 0.0f;
    sum_x += xs[i];
    sum_y += y[i];
  }
  // Binomial(total, 1 - p): 5 standard deviations.
  const double expected = total * (1 - p), sd = std::sqrt(total * p * (1 - p));
  EXPECT_NEAR(static_cast<double>(kept), expected, 5 * sd);
  // The same (seed, step) gives the same mask, another step another one, and the
  // thread count does not matter.
  layer->set_step(1, 0);
  const int saved_threads = normkit::num_threads();
  normkit::set_num_threads(1);
  EXPECT_EQ(layer->forward(x, Mode::train).data, y);
  normkit::set_num_threads(saved_threads);
  layer->set_step(1, 1);
  EXPECT_NE(layer->forward(x, Mode::train).data, y);
  // Two dropout layers at different positions draw different masks.
  auto other = make_layer("dropout 0.25", {1000}, MemoryFormat::channels_first, 3);
  other->set_step(1, 0);
  EXPECT_NE(other->forward(x, Mode::train).data, y);
  (void)sum_x;
  (void)sum_y;
}

TEST(NnDropout, RejectsProbabilityOutsideZeroOne) {
  EXPECT_TRUE(throws_error([] { make_layer("dropout 1", {4}, MemoryFormat::channels_first); },
                           ErrorKind::invalid_argument, {"dropout", "[0, 1)"}));
  EXPECT_TRUE(throws_error([] { make_layer("dropout -0.1", {4}, MemoryFormat::channels_first); },
                           ErrorKind::invalid_argument, {"dropout"}));
}

// ---------------------------------------------------------------- flatten

TEST(NnFlatten, ChannelsLastFlattensInChannelsFirstOrder) {
  for (const auto& shape : {std::vector<int64_t>{3, 4, 2, 5}, std::vector<int64_t>{2, 1, 3, 3}}) {
    const int64_t features = shape[1] * shape[2] * shape[3];
    SCOPED_TRACE(testing::Message() << shape[1] << " channels");
    const auto xs = normal_values(product(shape), 61);
    std::vector<std::vector<float>> ys, dxs;
    const auto dys = normal_values(xs.size(), 62);
    for (const auto format : kFormats) {
      auto layer = make_layer("flatten", {shape[1], shape[2], shape[3]}, format);
      EXPECT_EQ(layer->output_shape({shape[1], shape[2], shape[3]}), (std::vector<int64_t>{features}));
      const Tensor& y = layer->forward(make_tensor(shape, format, xs), Mode::train);
      EXPECT_EQ(y.shape, (std::vector<int64_t>{shape[0], features}));
      EXPECT_EQ(y.format, MemoryFormat::channels_first);
      ys.push_back(y.data);
      Tensor dy = make_tensor({shape[0], features}, MemoryFormat::channels_first, dys);
      const Tensor& dx = layer->backward(dy, true);
      EXPECT_EQ(dx.format, format);
      EXPECT_EQ(dx.shape, shape);
      dxs.push_back(canonical(dx));
    }
    EXPECT_EQ(ys[0], xs);  // (c, h, w) order, as torch.flatten
    EXPECT_EQ(ys[1], ys[0]);
    EXPECT_EQ(dxs[0], dys);
    EXPECT_EQ(dxs[1], dxs[0]);
  }
}

// ---------------------------------------------------------------- batch norm

// Double copies through the reference kernels, the oracle for the layer.
TEST(NnBatchNorm, LayerMatchesTheKernelsInTrainAndEvalModes) {
  for (const auto& shape : {std::vector<int64_t>{6, 5}, std::vector<int64_t>{3, 4, 3, 5}})
    for (const auto format : kFormats) {
      if (shape.size() == 2 && format == MemoryFormat::channels_last) continue;
      const std::string what = std::string(shape.size() == 2 ? "BatchNorm1d, " : "BatchNorm2d, ") + name_of(format);
      SCOPED_TRACE(what);
      const int64_t C = shape[1];
      std::vector<int64_t> input(shape.begin() + 1, shape.end());
      auto layer = make_layer("batchnorm eps=0.001 momentum=0.2", input, format);
      auto* gamma = param(*layer, "weight");
      auto* beta = param(*layer, "bias");
      ASSERT_TRUE(gamma && beta);
      gamma->value = normal_values(C, 71, 0.5f, 1.0f);
      beta->value = normal_values(C, 72);
      const auto xs = normal_values(product(shape), 73, 2.0f, 3.0f);
      const auto dys = normal_values(product(shape), 74);
      const Tensor x = make_tensor(shape, format, xs);
      const Tensor& y = layer->forward(x, Mode::train);

      // The oracle works on canonical (channels-first) double copies.
      const normkit::Layout layout = shape.size() == 2 ? normkit::Layout::NC : normkit::Layout::NCHW;
      std::vector<double> xd(xs.begin(), xs.end()), yd(xs.size()), dyd(dys.begin(), dys.end()),
          dxd(xs.size());
      std::vector<double> g(gamma->value.begin(), gamma->value.end()), b(beta->value.begin(), beta->value.end());
      std::vector<double> mean(C), invstd(C), rmean(C, 0.0), rvar(C, 1.0), dg(C), db(C);
      int64_t tracked = 0;
      const normkit::BatchNormOptions options{1e-3, 0.2};
      auto view = [&](std::vector<double>& v) {
        return normkit::TensorView<double>::contiguous(v.data(), shape, layout);
      };
      normkit::batch_norm_forward_training<double>(view(xd), view(yd), g, b, {mean, invstd},
                                                   {rmean, rvar, &tracked}, options);
      expect_close(canonical(y), yd, 1e-5, "y");
      std::vector<float> running;
      for (const auto& buffer : layer->buffers()) running.insert(running.end(), buffer.values->begin(), buffer.values->end());
      std::vector<double> expected_running = rmean;
      expected_running.insert(expected_running.end(), rvar.begin(), rvar.end());
      expected_running.push_back(1.0);  // num_batches_tracked
      expect_close(running, expected_running, 1e-5, "running statistics");

      zero_grads(*layer);
      const Tensor dy = make_tensor(shape, format, dys);
      const Tensor& dx = layer->backward(dy, true);
      normkit::batch_norm_backward<double>(view(xd), view(dyd), view(dxd), g, mean, invstd, dg, db);
      expect_close(canonical(dx), dxd, 1e-4, "dx");
      expect_close(gamma->grad, dg, 1e-5, "dgamma");
      expect_close(beta->grad, db, 1e-5, "dbeta");

      // Eval: the running statistics, not the batch's.
      const Tensor& ye = layer->forward(x, Mode::eval);
      normkit::batch_norm_forward_inference<double>(view(xd), view(yd), g, b, rmean, rvar, 1e-3);
      expect_close(canonical(ye), yd, 1e-5, "eval y");
      EXPECT_EQ(layer->buffers()[2].values->at(0), 1.0f) << "eval must not count a batch";

      GradCheckOptions o;
      o.step = 1e-2;
      check_layer_gradients(*layer, x, o, what);
    }
}

TEST(NnBatchNorm, RunningStatisticsAreBuffersNotParameters) {
  auto layer = make_layer("batchnorm", {3}, MemoryFormat::channels_first);
  std::vector<std::string> names;
  for (auto* p : layer->parameters()) names.push_back(p->name);
  EXPECT_EQ(names, (std::vector<std::string>{"weight", "bias"}));
  names.clear();
  for (const auto& b : layer->buffers()) names.push_back(b.name);
  EXPECT_EQ(names, (std::vector<std::string>{"running_mean", "running_var", "num_batches_tracked"}));
  EXPECT_TRUE(throws_error([] { make_layer("batchnorm eps=0", {3}, MemoryFormat::channels_first); },
                           ErrorKind::invalid_argument, {"eps"}));
  EXPECT_TRUE(throws_error([] { make_layer("batchnorm momentum=2", {3}, MemoryFormat::channels_first); },
                           ErrorKind::invalid_argument, {"momentum"}));
}

// ---------------------------------------------------------------- loss

TEST(NnLoss, SoftmaxCrossEntropyValueGradientAndCount) {
  const int64_t N = 5, K = 4;
  const auto zs = normal_values(N * K, 81, 2.0f);
  const std::vector<int32_t> labels = {0, 3, 1, 1, 2};
  Tensor logits = make_tensor({N, K}, MemoryFormat::channels_first, zs);
  Tensor dlogits;
  const auto result = normkit::nn::softmax_cross_entropy(logits, labels.data(), &dlogits);
  double loss = 0;
  int64_t correct = 0;
  for (int64_t n = 0; n < N; ++n) {
    double sum = 0;
    for (int64_t j = 0; j < K; ++j) sum += std::exp(double{zs[n * K + j]});
    loss += std::log(sum) - zs[n * K + labels[n]];
    correct += std::max_element(&zs[n * K], &zs[n * K] + K) - &zs[n * K] == labels[n];
    for (int64_t j = 0; j < K; ++j) {
      const double expected = (std::exp(double{zs[n * K + j]}) / sum - (j == labels[n])) / N;
      EXPECT_NEAR(dlogits.data[n * K + j], expected, 1e-7);
    }
  }
  EXPECT_NEAR(result.loss, loss / N, 1e-12);
  EXPECT_EQ(result.correct, correct);

  // Finite differences of the loss itself.
  GradientComparison cmp;
  for (size_t i = 0; i < zs.size(); ++i) {
    Tensor probe = logits;
    probe.data[i] = zs[i] + 1e-3f;
    const double up = probe.data[i], plus = normkit::nn::softmax_cross_entropy(probe, labels.data(), nullptr).loss;
    probe.data[i] = zs[i] - 1e-3f;
    const double down = probe.data[i], minus = normkit::nn::softmax_cross_entropy(probe, labels.data(), nullptr).loss;
    cmp.add(dlogits.data[i], (plus - minus) / (up - down));
  }
  std::string where;
  EXPECT_LE(cmp.worst(1e-4, 0.01, &where), 1.0) << where;

  // Large logits do not overflow.
  Tensor big = make_tensor({1, 3}, MemoryFormat::channels_first, {1000.0f, 0.0f, -1000.0f});
  const int32_t zero = 0;
  EXPECT_NEAR(normkit::nn::softmax_cross_entropy(big, &zero, nullptr).loss, 0.0, 1e-12);
  const int32_t bad = 4;
  EXPECT_TRUE(throws_error([&] { normkit::nn::softmax_cross_entropy(logits, &bad, nullptr); },
                           ErrorKind::invalid_argument, {"label 4", "[0, 4)"}));
}

// ---------------------------------------------------------------- sizes

// ModelSpec::size against the models it describes: the same parameter and buffer
// counts and output shapes, for every layer kind with its size-changing options,
// in both formats. Checkpoints rely on it (their arrays are checked against the
// sizes before the model is built).
TEST(NnModelSize, AgreesWithTheBuiltModelForEveryLayerKind) {
  const std::vector<std::string> specs = {
      "input 3 9 9; conv 4 3 stride=2 pad=1; batchnorm; relu; maxpool 2; flatten; linear 5; "
      "sigmoid; linear 3 bias=0",
      "input 2 8 8; conv 6 3 bias=0; batchrenorm; tanh; avgpool 3 stride=1; groupnorm groups=3; "
      "instancenorm track_running_stats=1; rmsnorm; flatten; dropout 0.5; layernorm; rmsnorm; linear 4",
      "input 4 5 5; ghostbatchnorm size=4; instancenorm affine=0; groupnorm affine=0 groups=2; "
      "layernorm; flatten; linear 2",
      "input 7; linear 6 bias=0; batchnorm frozen=1; relu; groupnorm groups=2; layernorm; "
      "ghostbatchnorm noise=0.5; dropout 0.1; linear 2",
      "input 3 6 6; conv 4 3 pad=1 bias=0; batchnorm; relu; residual; conv 4 3 pad=1 bias=0; "
      "batchnorm; relu; conv 4 3 pad=1 bias=0; batchnorm; end; residual; conv 8 3 stride=2 pad=1; "
      "shortcut; conv 8 1 stride=2 bias=0; batchnorm; end; flatten; linear 3"};
  std::set<std::string> kinds_seen;
  for (const auto& text : specs) {
    SCOPED_TRACE(text);
    const auto spec = normkit::nn::ModelSpec::parse(text);
    for (const auto& layer : spec.layers) kinds_seen.insert(layer.type);
    const normkit::nn::ModelSize size = spec.size();
    for (const auto format : kFormats) {
      normkit::nn::Model model(spec, format);
      int64_t parameters = 0, state = 0;
      for (auto* p : model.parameters()) parameters += static_cast<int64_t>(p->value.size());
      for (const auto& [name, values] : model.state()) state += static_cast<int64_t>(values->size());
      EXPECT_EQ(size.parameters, parameters);
      EXPECT_EQ(size.buffers, state - parameters);
    }
    // Every layer's output shape, through the registry's size functions.
    std::vector<int64_t> shape = spec.input_shape;
    normkit::nn::Model model(spec);
    for (size_t i = 0; i < spec.layers.size(); ++i) {
      const auto* kind = normkit::nn::detail::find_layer_kind(spec.layers[i].type);
      const auto layer = kind->size(spec.layers[i], shape);
      ASSERT_TRUE(layer) << spec.layers[i].type;
      const auto built = model.layers()[i]->output_shape(shape);
      EXPECT_EQ(layer->output, built) << spec.layers[i].type;
      shape = built;
    }
  }
  for (const auto& kind : normkit::nn::detail::layer_kinds())
    EXPECT_TRUE(kinds_seen.contains(kind.type)) << kind.type << " has no size test";
}

// The activations of cnn-small, counted by hand: each layer's output and input
// gradient, the convolutions' weight gradient per chunk of 16 samples, the
// max-pooling positions (2 bytes each).
TEST(NnModelSize, CountsTheActivationsOfCnnSmall) {
  const auto size = normkit::nn::ModelSpec::preset("cnn-small").size();
  const int64_t conv1 = 32 * 784 + 784 + 288 / 16, conv2 = 64 * 196 + 32 * 196 + 18432 / 16;
  // batchnorm and relu keep two copies of their input's size; maxpool its input, output, positions
  const int64_t block1 = 2 * (2 * 32 * 784) + 32 * 784 + 32 * 196 + 32 * 196 / 2;
  const int64_t block2 = 2 * (2 * 64 * 196) + 64 * 196 + 64 * 49 + 64 * 49 / 2;
  const int64_t head = 2 * 3136 + (128 + 3136) + 2 * (2 * 128) + (10 + 128);
  EXPECT_EQ(size.activations, conv1 + block1 + conv2 + block2 + head);
  EXPECT_EQ(size.parameters, 32 * 9 + 2 * 32 + 64 * 288 + 2 * 64 + 3136 * 128 + 2 * 128 + 1290);
  EXPECT_EQ(size.buffers, 3 * 1 + 2 * (32 + 64 + 128));
  EXPECT_DOUBLE_EQ(size.training_bytes(128),
                   4.0 * (4.0 * static_cast<double>(size.parameters) +
                          static_cast<double>(size.buffers) +
                          128.0 * static_cast<double>(size.activations)));
}

// Sizes that do not fit in 64 bits are errors naming the layer, not undefined
// behaviour (UBSan found these in Flatten and LayerNorm before the check).
TEST(NnModelSize, OverflowingSizesAreErrors) {
  using normkit::nn::ModelSpec;
  EXPECT_TRUE(throws_error([] { ModelSpec::parse("input 10000000 10000000 10000000; flatten; linear 10").size(); },
                           ErrorKind::invalid_argument, {"the input's size overflows"}));
  EXPECT_TRUE(throws_error(
      [] { normkit::nn::Model(ModelSpec::parse("input 1 28 28; conv 8 3 pad=1000000000; flatten; linear 10")); },
      ErrorKind::invalid_argument, {"layer 1 (conv)", "overflows"}));
  EXPECT_TRUE(throws_error(
      [] { normkit::nn::Model(ModelSpec::parse("input 64 100000 100000; conv 64 1; conv 64 1 pad=1000000000; linear 2")); },
      ErrorKind::invalid_argument, {"layer 2 (conv)", "overflows"}));
}

// A model whose parameters alone exceed any machine's memory is refused with the
// figure before anything is allocated (it would take 160 TB).
TEST(NnModelSize, AModelBeyondThisMachinesMemoryIsRefused) {
  EXPECT_TRUE(throws_error(
      [] { normkit::nn::Model(normkit::nn::ModelSpec::parse("input 1000000; linear 10000000; linear 10")); },
      ErrorKind::runtime, {"10000110000010 parameters", "160 TB", "more than this machine's"}));
}

// A layer whose input does not suit it ends the sizes there; building the model
// names the problem.
TEST(NnModelSize, StopsAtALayerThatDoesNotFitAndTheModelNamesIt) {
  const auto spec = normkit::nn::ModelSpec::parse("input 5; linear 4; conv 3 3; linear 2");
  EXPECT_EQ(spec.size().parameters, 24);
  EXPECT_TRUE(throws_error([&] { normkit::nn::Model model(spec); }, ErrorKind::invalid_argument,
                           {"layer 2", "conv: needs a [C, H, W] input"}));
}

}  // namespace
