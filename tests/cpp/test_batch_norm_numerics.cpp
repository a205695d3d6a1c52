// Numerics of the float API: large means, constant channels, and bitwise
// determinism across thread counts.
#include <omp.h>

#include "test_support.hpp"

namespace {

using namespace normkit_test;
using normkit::BackwardMode;
using normkit::Moments;
using normkit::TensorView;

// Statistics of canonical float data computed here in long double (two-pass).
struct DirectStats {
  std::vector<double> mean, var;  // var biased
  std::vector<double> unbiased;
};
DirectStats direct_stats(const Logical& g, const std::vector<float>& x) {
  DirectStats d;
  const int64_t S = g.s();
  for (int64_t c = 0; c < g.c; ++c) {
    long double sum = 0, m2 = 0;
    for (int64_t n = 0; n < g.n; ++n)
      for (int64_t s = 0; s < S; ++s) sum += x[(n * g.c + c) * S + s];
    const long double mean = sum / g.m();
    for (int64_t n = 0; n < g.n; ++n)
      for (int64_t s = 0; s < S; ++s) {
        const long double e = x[(n * g.c + c) * S + s] - mean;
        m2 += e * e;
      }
    d.mean.push_back(static_cast<double>(mean));
    d.var.push_back(static_cast<double>(m2 / g.m()));
    d.unbiased.push_back(static_cast<double>(m2 / (g.m() - 1)));
  }
  return d;
}

// ------------------------------------------------------------ large means

struct LargeMean {
  const char* name;
  Arrangement arrangement;
  double mean;
};

// Variance from moments, from the saved invstd and from the running variance
// within 1e-3 (relative) of the variance computed in long double from the same
// float data; E[x²] - E[x]² in float would lose every digit here. y is held to
// the differential tests' bound (2e-6) against y computed from those statistics.
class LargeMeans : public ::testing::TestWithParam<LargeMean> {};

TEST_P(LargeMeans, VarianceAndOutputKeepTheirDigits) {
  const LargeMean& k = GetParam();
  const Logical& g = k.arrangement.logical;
  Rng rng(seed_of(k.name));
  std::vector<double> mean_c, std_c(g.c, 1.0);
  for (int64_t c = 0; c < g.c; ++c) mean_c.push_back(k.mean * (1 + 0.25 * static_cast<double>(c)));
  const auto x = channel_data(g, mean_c, std_c, rng);
  const DirectStats ref = direct_stats(g, x);

  Buffer<float> xb(k.arrangement), yb(k.arrangement);
  xb.scatter(x);
  std::vector<Moments> moments(g.c);
  normkit::batch_norm_moments<float>(xb.cview(), moments);
  const double eps = 1e-5;
  std::vector<float> mean(g.c), invstd(g.c), rm(g.c, 0.0f), rv(g.c, 1.0f);
  normkit::batch_norm_forward_training<float>(xb.cview(), yb.view(), {}, {}, {mean, invstd},
                                              {rm, rv}, {eps, 1.0});
  for (int64_t c = 0; c < g.c; ++c) {
    SCOPED_TRACE("channel " + std::to_string(c) + ", mean " + std::to_string(ref.mean[c]) +
                 ", variance " + std::to_string(ref.var[c]));
    EXPECT_NEAR(moments[c].mean, ref.mean[c], 1e-3 * std::sqrt(ref.var[c]));
    EXPECT_NEAR(moments[c].biased_variance(), ref.var[c], 1e-3 * ref.var[c]);
    const double var_from_invstd = 1.0 / (double{invstd[c]} * double{invstd[c]}) - eps;
    EXPECT_NEAR(var_from_invstd, ref.var[c], 1e-3 * ref.var[c]);
    EXPECT_NEAR(double{rv[c]}, ref.unbiased[c], 1e-3 * ref.unbiased[c]);
  }
  std::vector<double> y_want(x.size());
  const int64_t S = g.s();
  for (size_t i = 0; i < x.size(); ++i) {
    const int64_t c = (static_cast<int64_t>(i) / S) % g.c;
    y_want[i] = (x[i] - ref.mean[c]) / std::sqrt(ref.var[c] + eps);
  }
  EXPECT_TRUE(all_close("y", yb.gather(), y_want, {2e-6, 2e-6}, &g));
}

INSTANTIATE_TEST_SUITE_P(
    Float, LargeMeans,
    ::testing::Values(LargeMean{"NCHW_1e4", dense(Layout::NCHW, {8, 4, {32, 32}}), 1e4},
                      LargeMean{"NCHW_1e6", dense(Layout::NCHW, {8, 4, {32, 32}}), 1e6},
                      LargeMean{"NHWC_1e4", dense(Layout::NHWC, {8, 4, {32, 32}}), 1e4},
                      LargeMean{"NHWC_1e6", dense(Layout::NHWC, {8, 4, {32, 32}}), 1e6},
                      LargeMean{"NC_1e6", dense(Layout::NC, {8192, 5, {}}), 1e6},
                      LargeMean{"NCHW_channels_last_1e6", nchw_channels_last({8, 4, {32, 32}}), 1e6}),
    ByName());

// ------------------------------------------------------------ constant channels

// A constant channel has variance 0: x̂ = 0, so y is exactly β (invstd =
// 1/sqrt(eps) is finite), dγ is exactly 0 and nothing is NaN.
template <class T>
void check_constant_channel(Layout layout) {
  const Logical g{4, 3, spatial_rank(layout) ? std::vector<int64_t>(spatial_rank(layout), 5)
                                             : std::vector<int64_t>{}};
  Rng rng(3);
  auto x = convert<T>(channel_data(g, {0.5, 0, -2}, {1, 0, 1}, rng));
  const int64_t S = g.s();
  for (const float value : {3.7f, 1e6f + 0.0625f}) {
    SCOPED_TRACE("channel 1 constant at " + std::to_string(value));
    for (int64_t n = 0; n < g.n; ++n)
      for (int64_t s = 0; s < S; ++s) x[(n * g.c + 1) * S + s] = static_cast<T>(value);
    Buffer<T> xb(dense(layout, g)), yb(dense(layout, g)), dyb(dense(layout, g)),
        dxb(dense(layout, g));
    xb.scatter(x);
    const std::vector<T> gamma = {T(1.5), T(-0.75), T(2)}, beta = {T(0.25), T(-0.3), T(1)};
    std::vector<T> mean(3), invstd(3), rm(3, T(0)), rv(3, T(1));
    normkit::batch_norm_forward_training<T>(xb.cview(), yb.view(), gamma, beta, {mean, invstd},
                                            {rm, rv});
    const auto y = yb.gather();
    EXPECT_TRUE(std::all_of(y.begin(), y.end(), [](T v) { return std::isfinite(v); }));
    for (int64_t n = 0; n < g.n; ++n)
      for (int64_t s = 0; s < S; ++s) ASSERT_EQ(y[(n * g.c + 1) * S + s], beta[1]);
    EXPECT_EQ(mean[1], static_cast<T>(value));
    EXPECT_NEAR(invstd[1], 1.0 / std::sqrt(1e-5), 1e-6 / std::sqrt(1e-5));
    EXPECT_NEAR(rv[1], 0.9, 1e-7);  // 0.9 * 1 + 0.1 * 0

    dyb.scatter(convert<T>(uniform_floats(x.size(), -1, 1, rng)));
    std::vector<T> dgamma(3), dbeta(3);
    for (const BackwardMode mode : {BackwardMode::training, BackwardMode::frozen}) {
      normkit::batch_norm_backward<T>(xb.cview(), dyb.cview(), dxb.view(), gamma, mean, invstd,
                                      dgamma, dbeta, mode);
      const auto dx = dxb.gather();
      EXPECT_TRUE(std::all_of(dx.begin(), dx.end(), [](T v) { return std::isfinite(v); }));
      EXPECT_EQ(dgamma[1], T(0));
      EXPECT_TRUE(std::isfinite(dbeta[1]));
    }
  }
}

TEST(ConstantChannel, FloatChannelsFirst) { check_constant_channel<float>(Layout::NCHW); }
TEST(ConstantChannel, FloatChannelsLast) { check_constant_channel<float>(Layout::NHWC); }
TEST(ConstantChannel, FloatRows) { check_constant_channel<float>(Layout::NC); }
TEST(ConstantChannel, DoubleChannelsFirst) { check_constant_channel<double>(Layout::NCHW); }
TEST(ConstantChannel, DoubleChannelsLast) { check_constant_channel<double>(Layout::NHWC); }

// ------------------------------------------------------------ determinism

struct Outputs {
  std::vector<float> y, mean, invstd, rm, rv, y_inference, dx, dgamma, dbeta, dx_frozen;
  std::vector<double> moments;  // count, mean, m2 per channel
};

// run_all's γ and β.
std::pair<std::vector<float>, std::vector<float>> affine_of(const Logical& g) {
  std::vector<float> gamma(g.c), beta(g.c);
  for (int64_t c = 0; c < g.c; ++c) {
    gamma[c] = 1.0f + 0.01f * static_cast<float>(c);
    beta[c] = 0.5f - 0.02f * static_cast<float>(c);
  }
  return {gamma, beta};
}

Outputs run_all(const Arrangement& a, const std::vector<float>& x, const std::vector<float>& dy) {
  const Logical& g = a.logical;
  Outputs o;
  Buffer<float> xb(a), yb(a), dyb(a), dxb(a);
  xb.scatter(x);
  dyb.scatter(dy);
  const auto [gamma, beta] = affine_of(g);
  o.mean.resize(g.c);
  o.invstd.resize(g.c);
  o.rm.assign(g.c, 0.5f);
  o.rv.assign(g.c, 2.0f);
  normkit::batch_norm_forward_training<float>(xb.cview(), yb.view(), gamma, beta,
                                              {o.mean, o.invstd}, {o.rm, o.rv});
  o.y = yb.gather();
  normkit::batch_norm_forward_inference<float>(xb.cview(), yb.view(), gamma, beta, o.rm, o.rv);
  o.y_inference = yb.gather();
  o.dgamma.resize(g.c);
  o.dbeta.resize(g.c);
  normkit::batch_norm_backward<float>(xb.cview(), dyb.cview(), dxb.view(), gamma, o.mean, o.invstd,
                                      o.dgamma, o.dbeta, BackwardMode::training);
  o.dx = dxb.gather();
  std::vector<float> frozen_invstd(g.c);
  normkit::batch_norm_invstd<float>(o.rv, 1e-5, frozen_invstd);
  normkit::batch_norm_backward<float>(xb.cview(), dyb.cview(), dxb.view(), gamma, o.rm,
                                      frozen_invstd, {}, {}, BackwardMode::frozen);
  o.dx_frozen = dxb.gather();
  std::vector<Moments> moments(g.c);
  normkit::batch_norm_moments<float>(xb.cview(), moments);
  for (const auto& m : moments) o.moments.insert(o.moments.end(), {m.count, m.mean, m.m2});
  return o;
}

struct DeterminismCase {
  const char* name;
  Arrangement arrangement;
};

class Determinism : public ::testing::TestWithParam<DeterminismCase> {};

// x (channel means in [-50, 50], deviations in [0.1, 3]) and dy for a.
std::pair<std::vector<float>, std::vector<float>> determinism_data(const Arrangement& a,
                                                                   const std::string& name) {
  const Logical& g = a.logical;
  Rng rng(seed_of(name));
  std::vector<double> mean_c, std_c;
  for (int64_t c = 0; c < g.c; ++c) {
    mean_c.push_back(rng.uniform(-50, 50));
    std_c.push_back(rng.uniform(0.1, 3));
  }
  auto x = channel_data(g, mean_c, std_c, rng);
  auto dy = uniform_floats(x.size(), -1, 1, rng);
  return {std::move(x), std::move(dy)};
}

void expect_same_outputs(const Outputs& other, const Outputs& one) {
  EXPECT_TRUE(bitwise_equal("y", other.y, one.y));
  EXPECT_TRUE(bitwise_equal("save_mean", other.mean, one.mean));
  EXPECT_TRUE(bitwise_equal("save_invstd", other.invstd, one.invstd));
  EXPECT_TRUE(bitwise_equal("running_mean", other.rm, one.rm));
  EXPECT_TRUE(bitwise_equal("running_var", other.rv, one.rv));
  EXPECT_TRUE(bitwise_equal("inference y", other.y_inference, one.y_inference));
  EXPECT_TRUE(bitwise_equal("dx (training)", other.dx, one.dx));
  EXPECT_TRUE(bitwise_equal("dgamma", other.dgamma, one.dgamma));
  EXPECT_TRUE(bitwise_equal("dbeta", other.dbeta, one.dbeta));
  EXPECT_TRUE(bitwise_equal("dx (frozen)", other.dx_frozen, one.dx_frozen));
  EXPECT_TRUE(bitwise_equal("moments", other.moments, one.moments));
}

// 1, 2 and 3 threads give the same bits, for C below and above the thread count.
TEST_P(Determinism, SameBitsForAnyThreadCount) {
  const Arrangement& a = GetParam().arrangement;
  const auto [x, dy] = determinism_data(a, GetParam().name);
  const int before = normkit::num_threads();
  Outputs one;
  {
    ThreadCount threads(1);
    one = run_all(a, x, dy);
  }
  for (const int n : {2, 3}) {
    SCOPED_TRACE(std::to_string(n) + " threads against 1");
    Outputs other;
    {
      ThreadCount threads(n);
      ASSERT_EQ(normkit::num_threads(), n);
      other = run_all(a, x, dy);
    }
    expect_same_outputs(other, one);
  }
  EXPECT_EQ(normkit::num_threads(), before);
}

// Called from inside a caller's parallel region (each thread on its own
// tensors), the kernels give the bits of a call from outside one. Small
// problems run on the calling thread without a region of their own
// (core/parallel.hpp); their worksharing loops must not bind to the caller's team.
TEST_P(Determinism, SameBitsWhenCalledInsideAParallelRegion) {
  const Arrangement& a = GetParam().arrangement;
  // (Not a structured binding: clang 14 cannot capture one in an OpenMP region.)
  const auto data = determinism_data(a, GetParam().name);
  const std::vector<float>& x = data.first;
  const std::vector<float>& dy = data.second;
  ThreadCount threads(2);
  const Outputs one = run_all(a, x, dy);
  std::vector<Outputs> inside(2);
#pragma omp parallel num_threads(2)
  inside[static_cast<size_t>(omp_get_thread_num())] = run_all(a, x, dy);
  for (size_t t = 0; t < inside.size(); ++t) {
    SCOPED_TRACE("thread " + std::to_string(t) + " of a region of 2");
    expect_same_outputs(inside[t], one);
  }
}

INSTANTIATE_TEST_SUITE_P(
    Float, Determinism,
    ::testing::Values(
        DeterminismCase{"NCHW_C1", dense(Layout::NCHW, {8, 1, {50, 125}})},
        DeterminismCase{"NCHW_C3", dense(Layout::NCHW, {8, 3, {50, 125}})},
        DeterminismCase{"NCHW_C64", dense(Layout::NCHW, {8, 64, {32, 32}})},
        DeterminismCase{"NCL_C5_short_runs", dense(Layout::NCL, {3000, 5, {7}})},
        // Runs of 7×7 = 49 (position lanes), with more channels than threads.
        // x is 301 KB: with 1 thread the forward takes statistics, then the
        // output pass in memory order; with 2 and 3 a channel at a time
        // (leaf_loops.hpp, kInCacheBytesPerThread). Both must give the same bits.
        DeterminismCase{"NCHW_C96_7x7", dense(Layout::NCHW, {16, 96, {7, 7}})},
        // The same with long runs and three pieces per channel: 749 KB, two
        // passes with 1 and 2 threads. (Fails if the channel-at-a-time plan
        // groups a channel's runs into other pieces.)
        DeterminismCase{"NCHW_C24_both_plans", dense(Layout::NCHW, {13, 24, {24, 25}})},
        // 3.1 MB, runs of 4096: with 1 thread y is streamed and the forward
        // works channel at a time; with 2 and 3 not, and it takes statistics,
        // then the output pass (leaf::forward_channel_at_a_time). That holds
        // for an L2 of 1.6 to 3 MB (sysconf; 2 MB on the CI machine); with
        // others all three take one plan.
        DeterminismCase{"NCHW_C24_streamed_or_not", dense(Layout::NCHW, {8, 24, {64, 64}})},
        // 5 MB of 7×7 planes. With an L2 of 1.7 to 2.5 MB (sysconf; 2 MB on the
        // CI machine) the outputs are streamed with 1 and 2 threads: the forward
        // takes blocks of channels, whose bounds differ with the thread count
        // (leaf::channel_block), the backward its sums, then dx in memory order
        // (leaf::backward_channel_at_a_time); with 3 threads not: the forward's
        // two passes, the backward a channel at a time. All give the same bits.
        DeterminismCase{"NCHW_C512_7x7_plans", dense(Layout::NCHW, {50, 512, {7, 7}})},
        // Outputs of 16.8 MB, more than the caches of most machines hold.
        DeterminismCase{"NCHW_C64_large", dense(Layout::NCHW, {16, 64, {64, 64}})},
        DeterminismCase{"NHWC_C64_large", dense(Layout::NHWC, {16, 64, {64, 64}})},
        DeterminismCase{"NHWC_C1", dense(Layout::NHWC, {8, 1, {50, 125}})},
        DeterminismCase{"NHWC_C3", dense(Layout::NHWC, {8, 3, {50, 125}})},
        DeterminismCase{"NHWC_C64", dense(Layout::NHWC, {8, 64, {32, 32}})},
        DeterminismCase{"NC_C17", dense(Layout::NC, {40000, 17, {}})},
        // Rows in column units against rows in phases (cpu/rows_loops.hpp,
        // column_units): 256x1024 takes phases at 1 and 2 threads, units at 3;
        // 196x2048 phases at 1, units at 2 and 3 (7 chunks of rows).
        DeterminismCase{"NC_256x1024_units_or_phases", dense(Layout::NC, {256, 1024, {}})},
        DeterminismCase{"NC_196x2048_units_or_phases", dense(Layout::NC, {196, 2048, {}})},
        DeterminismCase{"NCHW_channels_last_C16", nchw_channels_last({8, 16, {40, 40}})}),
    ByName());

// Outputs larger than the threads' L2 go to memory with streaming stores,
// computed first into a buffer in L1 (src/cpu/streamed_output.hpp), or, for
// contiguous rows and planes side by side on AVX-512 CPUs, straight from the
// loop; rows too short to stream, apart from each other, are written in place.
// The same problem both ways gives the same bits: dense (streamed) against
// rows or planes padded to a stride just past them (written in place).
TEST(StreamedOutputs, SameBitsAsOutputsWrittenInPlace) {
  const Logical rows{64, 64, {32, 32}};    // 16.8 MB: rows of 64 channels
  const Logical planes{1024, 64, {8, 8}};  // 16.8 MB: planes of 64 values
  // 16.8 MB in 3 channels: fewer than whole units per thread, so the backward
  // takes the units plan too (64 channels of short runs take it when dx is
  // streamed, side by side: leaf::backward_channel_at_a_time).
  const Logical few_channels{21845, 3, {8, 8}};
  // 12.8 MB of 7×7 planes: dense, blocks of channels whose planes lie side by
  // side (leaf::channel_block); padded, the two passes.
  const Logical blocks{128, 512, {7, 7}};
  // Planes of 16 values, one line each when aligned (the shortest planes
  // streamed straight), and of 256 in 3 channels: units of whole planes in
  // the backward too, which streams dx straight under 512 values.
  const Logical lines{1024, 256, {4, 4}};
  const Logical few_256{5461, 3, {16, 16}};
  const std::pair<Arrangement, Arrangement> cases[] = {
      {dense(Layout::NHWC, rows), rows_padded(Layout::NHWC, rows, 3)},
      {dense(Layout::NCHW, planes), channel_padded(Layout::NCHW, planes, 3)},
      {dense(Layout::NCHW, few_channels), channel_padded(Layout::NCHW, few_channels, 3)},
      {dense(Layout::NCHW, blocks), channel_padded(Layout::NCHW, blocks, 3)},
      {dense(Layout::NCHW, lines), channel_padded(Layout::NCHW, lines, 3)},
      {dense(Layout::NCHW, few_256), channel_padded(Layout::NCHW, few_256, 3)},
  };
  for (const auto& [streamed, in_place] : cases) {
    SCOPED_TRACE(streamed.describe() + " against " + in_place.describe());
    const auto [x, dy] = determinism_data(streamed, "streamed outputs");
    ThreadCount threads(2);
    expect_same_outputs(run_all(in_place, x, dy), run_all(streamed, x, dy));
  }
}

// Streamed outputs written over their input (y over x, dx over dy, as the API
// allows): the streaming stores of a line must come after every read of it.
// Dense NHWC rows and NCHW planes take the straight-from-the-loop paths on
// AVX-512 CPUs, the buffer elsewhere; either way the bits of outputs written
// beside the inputs.
class StreamedOverInput : public ::testing::TestWithParam<DeterminismCase> {};

TEST_P(StreamedOverInput, TheSameAsBesideIt) {
  const Arrangement& a = GetParam().arrangement;
  const Logical& g = a.logical;
  const auto [x, dy] = determinism_data(a, "streamed over the input");
  ThreadCount threads(2);
  const Outputs beside = run_all(a, x, dy);
  const auto [gamma, beta] = affine_of(g);
  Buffer<float> xy(a), xb(a);
  xb.scatter(x);
  std::vector<float> mean(g.c), invstd(g.c), rm(g.c, 0.5f), rv(g.c, 2.0f);
  xy.scatter(x);
  normkit::batch_norm_forward_training<float>(xy.cview(), xy.view(), gamma, beta, {mean, invstd},
                                              {rm, rv});
  EXPECT_TRUE(bitwise_equal("y over x", xy.gather(), beside.y));
  xy.scatter(x);
  normkit::batch_norm_forward_inference<float>(xy.cview(), xy.view(), gamma, beta, rm, rv);
  EXPECT_TRUE(bitwise_equal("inference y over x", xy.gather(), beside.y_inference));
  std::vector<float> dgamma(g.c), dbeta(g.c);
  Buffer<float> dydx(a);
  dydx.scatter(dy);
  normkit::batch_norm_backward<float>(xb.cview(), dydx.cview(), dydx.view(), gamma, mean, invstd,
                                      dgamma, dbeta, BackwardMode::training);
  EXPECT_TRUE(bitwise_equal("dx over dy", dydx.gather(), beside.dx));
  EXPECT_TRUE(bitwise_equal("dgamma", dgamma, beside.dgamma));
  std::vector<float> frozen_invstd(g.c);
  normkit::batch_norm_invstd<float>(rv, 1e-5, frozen_invstd);
  dydx.scatter(dy);
  normkit::batch_norm_backward<float>(xb.cview(), dydx.cview(), dydx.view(), gamma, rm,
                                      frozen_invstd, {}, {}, BackwardMode::frozen);
  EXPECT_TRUE(bitwise_equal("frozen dx over dy", dydx.gather(), beside.dx_frozen));
}

INSTANTIATE_TEST_SUITE_P(
    Float, StreamedOverInput,
    ::testing::Values(DeterminismCase{"NHWC_rows", dense(Layout::NHWC, {64, 64, {32, 32}})},
                      // 12.8 MB of 7x7 planes: lines across two planes
                      DeterminismCase{"NCHW_7x7", dense(Layout::NCHW, {128, 512, {7, 7}})}),
    ByName());

TEST(Threads, SetAndRestore) {
  const int before = normkit::num_threads();
  EXPECT_GE(before, 1);
  {
    ThreadCount threads(3);
    EXPECT_EQ(normkit::num_threads(), 3);
  }
  EXPECT_EQ(normkit::num_threads(), before);
}

}  // namespace
