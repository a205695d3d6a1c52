// Running statistics: PyTorch's and Keras' conventions, the cumulative average,
// and track_running_stats = false. Expected values come from the formulas,
// evaluated here in long double on batch statistics computed here.
//   PyTorch: running = (1 - m)·running + m·batch, m = 0.1, unbiased variance;
//            momentum = None: m = 1 / num_batches_tracked (after the increment).
//   Keras:   moving = m·moving + (1 - m)·batch, m = 0.99, biased variance, eps 1e-3.
#include <optional>

#include "test_support.hpp"

namespace {

using namespace normkit_test;
using normkit::BatchNormOptions;
using normkit::MomentumConvention;
using normkit::Moments;
using normkit::RunningVariance;

struct BatchStats {
  std::vector<long double> mean, biased, unbiased;
};

// One batch of canonical data per step, different each step.
struct Batches {
  Logical g{4, 3, {5, 6}};  // M = 120
  std::vector<std::vector<float>> x;
  std::vector<BatchStats> stats;

  explicit Batches(int steps) {
    Rng rng(2024);
    for (int step = 0; step < steps; ++step) {
      std::vector<double> mean_c, std_c;
      for (int64_t c = 0; c < g.c; ++c) {
        mean_c.push_back(rng.uniform(-5, 5));
        std_c.push_back(rng.uniform(0.2, 3));
      }
      x.push_back(channel_data(g, mean_c, std_c, rng));
      BatchStats s;
      const int64_t S = g.s();
      for (int64_t c = 0; c < g.c; ++c) {
        long double sum = 0, m2 = 0;
        for (int64_t n = 0; n < g.n; ++n)
          for (int64_t i = 0; i < S; ++i) sum += x.back()[(n * g.c + c) * S + i];
        const long double mean = sum / g.m();
        for (int64_t n = 0; n < g.n; ++n)
          for (int64_t i = 0; i < S; ++i) {
            const long double d = x.back()[(n * g.c + c) * S + i] - mean;
            m2 += d * d;
          }
        s.mean.push_back(mean);
        s.biased.push_back(m2 / g.m());
        s.unbiased.push_back(m2 / (g.m() - 1));
      }
      stats.push_back(s);
    }
  }
};

template <class T>
struct Tol;
template <>
struct Tol<float> {
  static constexpr double value = 1e-6;  // float rounding and the fast kernels' statistics
};
template <>
struct Tol<double> {
  static constexpr double value = 1e-12;
};

template <class T>
::testing::AssertionResult near_all(const char* what, const std::vector<T>& got,
                                    const std::vector<long double>& want) {
  return all_close(what, got, convert<double>(want), {Tol<T>::value, Tol<T>::value});
}

template <class T>
class RunningStatistics : public ::testing::Test {
 protected:
  // One forward-training step on batch `step` in `layout`; returns y.
  std::vector<T> step(const Batches& b, int step, Layout layout, std::vector<T>& rm,
                      std::vector<T>& rv, int64_t* batches, const BatchNormOptions& options,
                      std::vector<T>* invstd = nullptr) {
    Buffer<T> xb(dense(layout, b.g)), yb(dense(layout, b.g));
    xb.scatter(b.x[step]);
    std::vector<T> mean(b.g.c), invstd_local(b.g.c);
    normkit::batch_norm_forward_training<T>(xb.cview(), yb.view(), {}, {},
                                            {mean, invstd ? *invstd : invstd_local},
                                            {rm, rv, batches}, options);
    return yb.gather();
  }
};

using Types = ::testing::Types<float, double>;
TYPED_TEST_SUITE(RunningStatistics, Types);

TYPED_TEST(RunningStatistics, PyTorchDefaults) {
  using T = TypeParam;
  const BatchNormOptions defaults;
  EXPECT_EQ(defaults.eps, 1e-5);
  EXPECT_EQ(defaults.momentum, std::optional<double>(0.1));
  EXPECT_EQ(defaults.momentum_convention, MomentumConvention::weight_on_new);
  EXPECT_EQ(defaults.running_variance, RunningVariance::unbiased);

  const Batches b(3);
  for (const Layout layout : {Layout::NCHW, Layout::NHWC}) {
    SCOPED_TRACE(std::string(normkit::to_string(layout)));
    std::vector<T> rm = {T(0.5), T(-1), T(2)}, rv = {T(1), T(2), T(0.5)};
    std::vector<long double> want_m(rm.begin(), rm.end()), want_v(rv.begin(), rv.end());
    int64_t batches = 0;
    for (int s = 0; s < 3; ++s) {
      this->step(b, s, layout, rm, rv, &batches, {});
      for (int64_t c = 0; c < b.g.c; ++c) {
        want_m[c] = 0.9L * want_m[c] + 0.1L * b.stats[s].mean[c];
        want_v[c] = 0.9L * want_v[c] + 0.1L * b.stats[s].unbiased[c];
      }
      EXPECT_EQ(batches, s + 1);
      EXPECT_TRUE(near_all("running_mean", rm, want_m)) << "after step " << s + 1;
      EXPECT_TRUE(near_all("running_var", rv, want_v)) << "after step " << s + 1;
    }
  }
}

TYPED_TEST(RunningStatistics, CumulativeAverageWithoutMomentum) {
  using T = TypeParam;
  const Batches b(3);
  BatchNormOptions options;
  options.momentum = std::nullopt;
  for (const Layout layout : {Layout::NCHW, Layout::NHWC}) {
    SCOPED_TRACE(std::string(normkit::to_string(layout)));
    // From num_batches_tracked = 0 the initial values are forgotten at once:
    // after k batches the running values are the plain averages of k batch values.
    std::vector<T> rm(3, T(1000)), rv(3, T(1000));
    int64_t batches = 0;
    std::vector<long double> sum_m(3, 0), sum_v(3, 0);
    for (int s = 0; s < 3; ++s) {
      this->step(b, s, layout, rm, rv, &batches, options);
      std::vector<long double> want_m(3), want_v(3);
      for (int64_t c = 0; c < 3; ++c) {
        sum_m[c] += b.stats[s].mean[c];
        sum_v[c] += b.stats[s].unbiased[c];
        want_m[c] = sum_m[c] / (s + 1);
        want_v[c] = sum_v[c] / (s + 1);
      }
      EXPECT_EQ(batches, s + 1);
      EXPECT_TRUE(near_all("running_mean", rm, want_m)) << "after step " << s + 1;
      EXPECT_TRUE(near_all("running_var", rv, want_v)) << "after step " << s + 1;
    }
    // Continuing from num_batches_tracked = 4: the new batch has weight 1/5.
    std::vector<T> rm2 = {T(1), T(2), T(3)}, rv2 = {T(4), T(5), T(6)};
    int64_t from_four = 4;
    this->step(b, 0, layout, rm2, rv2, &from_four, options);
    std::vector<long double> want_m(3), want_v(3);
    for (int64_t c = 0; c < 3; ++c) {
      want_m[c] = 0.8L * (c + 1) + 0.2L * b.stats[0].mean[c];
      want_v[c] = 0.8L * (c + 4) + 0.2L * b.stats[0].unbiased[c];
    }
    EXPECT_EQ(from_four, 5);
    EXPECT_TRUE(near_all("running_mean", rm2, want_m));
    EXPECT_TRUE(near_all("running_var", rv2, want_v));
  }
}

TYPED_TEST(RunningStatistics, KerasConvention) {
  using T = TypeParam;
  const BatchNormOptions keras = BatchNormOptions::keras();
  EXPECT_EQ(keras.eps, 1e-3);
  EXPECT_EQ(keras.momentum, std::optional<double>(0.99));
  EXPECT_EQ(keras.momentum_convention, MomentumConvention::weight_on_old);
  EXPECT_EQ(keras.running_variance, RunningVariance::biased);

  const Batches b(3);
  for (const Layout layout : {Layout::NCHW, Layout::NHWC}) {
    SCOPED_TRACE(std::string(normkit::to_string(layout)));
    std::vector<T> rm(3, T(0)), rv(3, T(1)), invstd(3);
    std::vector<long double> want_m(3, 0), want_v(3, 1);
    int64_t batches = 0;
    for (int s = 0; s < 3; ++s) {
      this->step(b, s, layout, rm, rv, &batches, keras, &invstd);
      std::vector<long double> want_invstd(3);
      for (int64_t c = 0; c < 3; ++c) {
        want_m[c] = 0.99L * want_m[c] + 0.01L * b.stats[s].mean[c];
        want_v[c] = 0.99L * want_v[c] + 0.01L * b.stats[s].biased[c];
        want_invstd[c] = 1.0L / std::sqrt(b.stats[s].biased[c] + 1e-3L);
      }
      EXPECT_TRUE(near_all("moving_mean", rm, want_m)) << "after step " << s + 1;
      EXPECT_TRUE(near_all("moving_variance", rv, want_v)) << "after step " << s + 1;
      EXPECT_TRUE(near_all("save_invstd (eps 1e-3)", invstd, want_invstd));
    }
    EXPECT_EQ(batches, 3);
  }
}

TYPED_TEST(RunningStatistics, ConventionAndVarianceAreIndependentOptions) {
  using T = TypeParam;
  const Batches b(1);
  const auto& s = b.stats[0];
  {
    SCOPED_TRACE("weight on old, unbiased");
    std::vector<T> rm(3, T(1)), rv(3, T(2));
    this->step(b, 0, Layout::NCHW, rm, rv, nullptr,
               {1e-5, 0.7, MomentumConvention::weight_on_old, RunningVariance::unbiased});
    std::vector<long double> want_m(3), want_v(3);
    for (int64_t c = 0; c < 3; ++c) {
      want_m[c] = 0.7L * 1 + 0.3L * s.mean[c];
      want_v[c] = 0.7L * 2 + 0.3L * s.unbiased[c];
    }
    EXPECT_TRUE(near_all("running_mean", rm, want_m));
    EXPECT_TRUE(near_all("running_var", rv, want_v));
  }
  {
    SCOPED_TRACE("weight on new, biased");
    std::vector<T> rm(3, T(1)), rv(3, T(2));
    this->step(b, 0, Layout::NHWC, rm, rv, nullptr,
               {1e-5, 0.7, MomentumConvention::weight_on_new, RunningVariance::biased});
    std::vector<long double> want_m(3), want_v(3);
    for (int64_t c = 0; c < 3; ++c) {
      want_m[c] = 0.3L * 1 + 0.7L * s.mean[c];
      want_v[c] = 0.3L * 2 + 0.7L * s.biased[c];
    }
    EXPECT_TRUE(near_all("running_mean", rm, want_m));
    EXPECT_TRUE(near_all("running_var", rv, want_v));
  }
}

TYPED_TEST(RunningStatistics, MomentumZeroKeepsAndOneReplaces) {
  using T = TypeParam;
  const Batches b(1);
  std::vector<T> rm = {T(0.25), T(-3), T(7)}, rv = {T(1.5), T(0.125), T(9)};
  const auto rm0 = rm, rv0 = rv;
  int64_t batches = 0;
  this->step(b, 0, Layout::NCHW, rm, rv, &batches, {1e-5, 0.0});
  EXPECT_TRUE(bitwise_equal("running_mean, momentum 0", rm, rm0));
  EXPECT_TRUE(bitwise_equal("running_var, momentum 0", rv, rv0));
  EXPECT_EQ(batches, 1);
  this->step(b, 0, Layout::NHWC, rm, rv, &batches, {1e-5, 1.0});
  EXPECT_TRUE(near_all("running_mean, momentum 1", rm, b.stats[0].mean));
  EXPECT_TRUE(near_all("running_var, momentum 1", rv, b.stats[0].unbiased));
  EXPECT_EQ(batches, 2);
}

// track_running_stats = false: no running spans; y and the saved statistics
// are those of a run that tracks them, and momentum = None needs no counter.
TYPED_TEST(RunningStatistics, NotTracked) {
  using T = TypeParam;
  const Batches b(1);
  for (const Layout layout : {Layout::NCHW, Layout::NHWC}) {
    SCOPED_TRACE(std::string(normkit::to_string(layout)));
    Buffer<T> xb(dense(layout, b.g)), y_tracked(dense(layout, b.g)), y_free(dense(layout, b.g));
    xb.scatter(b.x[0]);
    std::vector<T> mean1(3), invstd1(3), mean2(3), invstd2(3), rm(3, T(0)), rv(3, T(1));
    normkit::batch_norm_forward_training<T>(xb.cview(), y_tracked.view(), {}, {},
                                            {mean1, invstd1}, {rm, rv});
    BatchNormOptions no_momentum;
    no_momentum.momentum = std::nullopt;
    normkit::batch_norm_forward_training<T>(xb.cview(), y_free.view(), {}, {}, {mean2, invstd2},
                                            {}, no_momentum);
    EXPECT_TRUE(bitwise_equal("y", y_free.storage, y_tracked.storage));
    EXPECT_TRUE(bitwise_equal("save_mean", mean2, mean1));
    EXPECT_TRUE(bitwise_equal("save_invstd", invstd2, invstd1));
    // A counter without running statistics is still counted.
    int64_t batches = 7;
    normkit::batch_norm_forward_training<T>(xb.cview(), y_free.view(), {}, {}, {}, {{}, {}, &batches});
    EXPECT_EQ(batches, 8);
  }
}

TYPED_TEST(RunningStatistics, UpdateFromMomentsDirectly) {
  using T = TypeParam;
  // Moments merged from elsewhere (e.g. other processes): count 4, mean 2, M2 6
  // (biased variance 1.5, unbiased 2).
  const std::vector<Moments> moments = {{4, 2, 6}, {8, -1, 14}};
  std::vector<T> rm = {T(1), T(1)}, rv = {T(1), T(1)};
  int64_t batches = 2;
  normkit::batch_norm_update_running<T>(moments, {rm, rv, &batches});
  EXPECT_TRUE(near_all("running_mean", rm, {0.9L + 0.2L, 0.9L - 0.1L}));
  EXPECT_TRUE(near_all("running_var", rv, {0.9L + 0.2L, 0.9L + 0.2L}));
  EXPECT_EQ(batches, 3);
  normkit::batch_norm_update_running<T>(moments, {rm, rv, &batches}, BatchNormOptions::keras());
  EXPECT_TRUE(near_all("moving_mean", rm, {0.99L * 1.1L + 0.02L, 0.99L * 0.8L - 0.01L}));
  EXPECT_TRUE(near_all("moving_variance", rv, {0.99L * 1.1L + 0.015L, 0.99L * 1.1L + 0.0175L}));
  EXPECT_EQ(batches, 4);
}

}  // namespace
