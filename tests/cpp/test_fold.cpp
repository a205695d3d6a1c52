// fold_batch_norm: exact values on data built so that every step is exact, a
// sweep against the formula evaluated in long double, the folded layer against
// Linear + BN evaluated directly, in place, absent γ/β/bias, and errors that
// leave the outputs untouched.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "normkit/error.hpp"
#include "normkit/fold.hpp"

namespace {

using normkit::fold_batch_norm;

template <class T>
std::vector<T> random_values(size_t n, std::mt19937_64& rng, double lo, double hi) {
  std::uniform_real_distribution<double> dist(lo, hi);
  std::vector<T> out(n);
  for (auto& v : out) v = static_cast<T>(dist(rng));
  return out;
}

template <class T>
struct Problem {
  size_t channels, rest;
  std::vector<T> weight, bias, gamma, beta, mean, var;
  double eps = 1e-5;
  Problem(size_t c, size_t r, uint64_t seed) : channels(c), rest(r) {
    std::mt19937_64 rng(seed);
    weight = random_values<T>(c * r, rng, -2.0, 2.0);
    bias = random_values<T>(c, rng, -1.0, 1.0);
    gamma = random_values<T>(c, rng, -3.0, 3.0);
    beta = random_values<T>(c, rng, -1.0, 1.0);
    mean = random_values<T>(c, rng, -50.0, 50.0);
    var = random_values<T>(c, rng, 0.0, 10.0);
    var[0] = 0;  // a dead channel: only eps keeps the scale finite
  }
};

// Error of `value` in units in the last place of T at `scale` (the magnitude of
// the largest term that went into the reference, so that a cancelling sum is
// judged by the rounding of its terms).
template <class T>
double ulps(T value, long double reference, long double scale) {
  const long double spacing =
      std::max<long double>(std::abs(scale), std::numeric_limits<T>::min()) *
      std::numeric_limits<T>::epsilon();
  return static_cast<double>(std::abs(static_cast<long double>(value) - reference) / spacing);
}

TEST(FoldBatchNorm, ExactWhenEveryStepIsExact) {
  // var + eps = 4, 1, 16 (square roots 2, 1, 4); γ = 3, -2, 0.5: s = 1.5, -2, 0.125.
  const std::vector<float> weight = {1, -2, 0.5f, 4, 3, 0, -1, 0.25f, 8, -8, 2, 1};
  const std::vector<float> bias = {1, 2, -3}, gamma = {3, -2, 0.5f}, beta = {0.25f, 0, 1};
  const std::vector<float> mean = {0.5f, -1, 5}, var = {3.75f, 0.75f, 15.75f};
  std::vector<float> w(12), b(3);
  fold_batch_norm<float>(weight, bias, gamma, beta, mean, var, 0.25, w, b);
  const std::vector<float> expected_w = {1.5f, -3, 0.75f, 6, -6, 0, 2, -0.5f, 1, -1, 0.25f, 0.125f};
  // b' = (b - μ)·s + β = 0.5·1.5 + 0.25, 3·(-2) + 0, (-8)·0.125 + 1
  const std::vector<float> expected_b = {1.0f, -6.0f, 0.0f};
  EXPECT_EQ(w, expected_w);
  EXPECT_EQ(b, expected_b);
}

template <class T>
void sweep_against_formula(double max_ulps) {
  for (const size_t channels : {1, 3, 8, 17})
    for (const size_t rest : {1, 9, 27, 100}) {
      SCOPED_TRACE("channels " + std::to_string(channels) + ", rest " + std::to_string(rest));
      const Problem<T> p(channels, rest, channels * 1000 + rest);
      std::vector<T> w(p.weight.size()), b(channels);
      fold_batch_norm<T>(p.weight, p.bias, p.gamma, p.beta, p.mean, p.var, p.eps, w, b);
      double worst_w = 0, worst_b = 0;
      for (size_t c = 0; c < channels; ++c) {
        // s = γ / sqrt(σ² + eps);  W' = W·s;  b' = (b − μ)·s + β
        const long double s = static_cast<long double>(p.gamma[c]) /
                              std::sqrt(static_cast<long double>(p.var[c]) + p.eps);
        for (size_t i = 0; i < rest; ++i)
          worst_w = std::max(worst_w, ulps(w[c * rest + i], p.weight[c * rest + i] * s,
                                           p.weight[c * rest + i] * s));
        const long double moved = (static_cast<long double>(p.bias[c]) - p.mean[c]) * s;
        const long double shift = moved + p.beta[c];
        worst_b = std::max(worst_b, ulps(b[c], shift,
                                         std::max(std::abs(shift), std::abs(moved))));
      }
      EXPECT_LE(worst_w, max_ulps);
      EXPECT_LE(worst_b, max_ulps);
    }
}

// float: the double computation rounded once, so within half an ulp plus
// double's error; double: a few roundings of double.
TEST(FoldBatchNorm, FloatMatchesTheFormulaToRounding) { sweep_against_formula<float>(0.51); }
TEST(FoldBatchNorm, DoubleMatchesTheFormulaToRounding) { sweep_against_formula<double>(4.0); }

// The folded layer computes what the layer followed by inference-mode BN does:
// y = BN(W·x + b) evaluated in double straight from BN's definition.
TEST(FoldBatchNorm, FoldedLayerEqualsLayerThenBatchNorm) {
  const size_t channels = 6, in = 11, rows = 5;
  const Problem<double> p(channels, in, 7);
  std::mt19937_64 rng(8);
  const auto x = random_values<double>(rows * in, rng, -3.0, 3.0);
  std::vector<double> w(p.weight.size()), b(channels);
  fold_batch_norm<double>(p.weight, p.bias, p.gamma, p.beta, p.mean, p.var, p.eps, w, b);
  for (size_t r = 0; r < rows; ++r)
    for (size_t c = 0; c < channels; ++c) {
      const double s = p.gamma[c] / std::sqrt(p.var[c] + p.eps);
      double layer = p.bias[c], folded = b[c], terms = 0;
      for (size_t i = 0; i < in; ++i) {
        layer += p.weight[c * in + i] * x[r * in + i];
        folded += w[c * in + i] * x[r * in + i];
        terms += std::abs(p.weight[c * in + i] * x[r * in + i]);
      }
      const double bn = (layer - p.mean[c]) / std::sqrt(p.var[c] + p.eps) * p.gamma[c] + p.beta[c];
      // Both sides are sums of terms of at most this size, each with double's rounding.
      const double magnitude = (terms + std::abs(p.bias[c]) + std::abs(p.mean[c])) * std::abs(s) +
                               std::abs(p.beta[c]);
      EXPECT_NEAR(folded, bn, 64 * std::numeric_limits<double>::epsilon() * magnitude);
    }
}

TEST(FoldBatchNorm, InPlaceEqualsOutOfPlace) {
  const Problem<float> p(5, 12, 3);
  std::vector<float> w(p.weight.size()), b(5);
  fold_batch_norm<float>(p.weight, p.bias, p.gamma, p.beta, p.mean, p.var, p.eps, w, b);
  std::vector<float> w_in = p.weight, b_in = p.bias;
  fold_batch_norm<float>(w_in, b_in, p.gamma, p.beta, p.mean, p.var, p.eps, w_in, b_in);
  EXPECT_EQ(w_in, w);
  EXPECT_EQ(b_in, b);
}

TEST(FoldBatchNorm, AbsentGammaBetaBiasAreOneZeroZero) {
  const Problem<float> p(4, 6, 5);
  const std::vector<float> ones(4, 1.0f), zeros(4, 0.0f);
  std::vector<float> w1(p.weight.size()), b1(4), w2(p.weight.size()), b2(4);
  fold_batch_norm<float>(p.weight, {}, {}, {}, p.mean, p.var, p.eps, w1, b1);
  fold_batch_norm<float>(p.weight, zeros, ones, zeros, p.mean, p.var, p.eps, w2, b2);
  EXPECT_EQ(w1, w2);
  EXPECT_EQ(b1, b2);
}

// Runs the fold with one argument spoiled; expects an invalid-argument error
// whose message holds `words`, and outputs left as they were.
struct Spoiled {
  Problem<float> p{3, 4, 11};
  std::vector<float> w = std::vector<float>(12, -7.0f), b = std::vector<float>(3, -7.0f);
  std::span<float> w_out{w}, b_out{b};
  std::span<const float> weight{p.weight}, bias{p.bias}, gamma{p.gamma}, beta{p.beta},
      mean{p.mean}, var{p.var};
  void expect_error(const std::string& words) {
    SCOPED_TRACE(words);
    const std::vector<float> w_before(w_out.begin(), w_out.end()), b_before(b_out.begin(), b_out.end());
    try {
      fold_batch_norm<float>(weight, bias, gamma, beta, mean, var, p.eps, w_out, b_out);
      ADD_FAILURE() << "no error";
    } catch (const normkit::Error& e) {
      EXPECT_EQ(e.kind(), normkit::ErrorKind::invalid_argument);
      EXPECT_NE(std::string(e.what()).find(words), std::string::npos) << e.what();
    }
    EXPECT_EQ(std::vector<float>(w_out.begin(), w_out.end()), w_before);
    EXPECT_EQ(std::vector<float>(b_out.begin(), b_out.end()), b_before);
  }
};

TEST(FoldBatchNorm, BadSizesAreRejectedBeforeWriting) {
  { Spoiled s; s.mean = s.mean.first(0); s.expect_error("running_mean: empty"); }
  { Spoiled s; s.var = s.var.first(2); s.expect_error("running_var should contain 3 elements"); }
  { Spoiled s; s.gamma = s.gamma.first(2); s.expect_error("gamma should contain 3"); }
  { Spoiled s; s.beta = s.beta.first(1); s.expect_error("beta should contain 3"); }
  { Spoiled s; s.bias = s.bias.first(2); s.expect_error("bias should contain 3"); }
  { Spoiled s; s.weight = s.weight.first(11); s.w_out = s.w_out.first(11); s.expect_error("weight: 11 values"); }
  { Spoiled s; s.weight = s.weight.first(0); s.w_out = s.w_out.first(0); s.expect_error("weight: 0 values"); }
  { Spoiled s; s.w_out = s.w_out.first(9); s.expect_error("folded_weight should contain 12"); }
  { Spoiled s; s.b_out = s.b_out.first(2); s.expect_error("folded_bias should contain 3"); }
}

TEST(FoldBatchNorm, BadValuesAreRejectedBeforeWriting) {
  for (const double eps : {0.0, -1e-5, double(NAN), double(INFINITY)}) {
    Spoiled s;
    s.p.eps = eps;
    s.expect_error("eps must be positive and finite");
  }
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  for (const float bad : {nan, inf, -inf}) {
    { Spoiled s; s.p.weight[5] = bad; s.expect_error("weight: value 5"); }
    { Spoiled s; s.p.bias[1] = bad; s.expect_error("bias: value 1"); }
    { Spoiled s; s.p.gamma[2] = bad; s.expect_error("gamma: value 2"); }
    { Spoiled s; s.p.beta[0] = bad; s.expect_error("beta: value 0"); }
    { Spoiled s; s.p.mean[1] = bad; s.expect_error("running_mean: value 1"); }
    { Spoiled s; s.p.var[2] = bad; s.expect_error("running_var: value 2"); }
  }
  { Spoiled s; s.p.var[1] = -1.0f; s.expect_error("channel 1: running_var + eps"); }
  { Spoiled s; s.p.eps = 0.25; s.p.var[1] = -0.25f; s.expect_error("running_var + eps = 0 is not positive"); }
  // s = 1e30 / sqrt(1e-5) ≈ 3e32 fits a float; 1e7 times it does not.
  {
    Spoiled s;
    s.p.gamma[2] = 1e30f;
    s.p.var[2] = 0;
    s.p.mean[2] = 0;
    s.p.bias[2] = 0;
    s.p.weight[9] = 1e7f;
    s.expect_error("channel 2: folded weight 1 overflows");
  }
  { Spoiled s; s.p.gamma[0] = 1e35f; s.p.var[0] = 0; s.expect_error("channel 0: the folded scale"); }
}

TEST(FoldBatchNorm, OverlapOtherThanExactInPlaceIsRejected) {
  {
    Spoiled s;
    std::vector<float> shared(15, -7.0f);
    s.w_out = std::span<float>(shared).first(12);
    s.b_out = std::span<float>(shared).subspan(10, 3);
    s.expect_error("folded_weight: overlaps folded_bias");
  }
  {
    Spoiled s;
    std::vector<float> shifted(13);
    std::copy(s.p.weight.begin(), s.p.weight.end(), shifted.begin());
    s.weight = std::span<const float>(shifted).first(12);
    s.w_out = std::span<float>(shifted).subspan(1, 12);
    s.expect_error("folded_weight: overlaps its input without being the same array");
  }
  {
    Spoiled s;
    s.b_out = std::span<float>(s.p.gamma);
    s.expect_error("folded_bias: overlaps gamma");
  }
  {
    Spoiled s;
    s.b_out = std::span<float>(s.p.weight).last(3);
    s.expect_error("folded_bias: overlaps weight");
  }
}

}  // namespace
