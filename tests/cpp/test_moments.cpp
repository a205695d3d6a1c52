// Statistics that are exact by construction, and Chan's merge of Moments.
//
// Exact data (oneDNN benchdnn's trick): every channel's values come in pairs
// m ± d_i with m and d_i dyadic (few significant bits), so the mean is exactly
// m and M2 = Σ 2·d_i² exactly, and every partial sum the kernels form is exact
// in float. Both are compared at zero tolerance.
//
// The pairs sit next to each other along the reduction's fastest axis (within
// one inner run for channels-first, in consecutive rows for channels-last), and
// every run and row count is even. The fast kernels merge per-piece moments
// with Chan's formula, which is exact when the pieces' means are equal; a
// piece boundary at an even position keeps pairs whole, so every piece's mean
// is m. (A kernel that cut pieces at odd positions would merge means that
// differ and could round; that would show here.)
#include <array>

#include "test_support.hpp"

namespace {

using namespace normkit_test;
using normkit::Moments;
using normkit::TensorView;

struct ExactData {
  Logical g;
  std::vector<float> x;  // canonical
  std::vector<double> mean, m2;
};

// Channel 0 can hold a large mean (786432.5 = 3·2^18 + 0.5, d in steps of 0.5).
ExactData exact_pairs(const Logical& g, uint64_t seed, bool large_mean_channel) {
  Rng rng(seed);
  ExactData e{g, std::vector<float>(static_cast<size_t>(g.numel())), {}, {}};
  const int64_t S = g.s(), M = g.m();
  for (int64_t c = 0; c < g.c; ++c) {
    const bool large = large_mean_channel && c == 0;
    const double m = large ? 786432.5 : static_cast<double>(rng.integer(-400, 400)) / 4;
    const double step = large ? 0.5 : 0.125;
    int64_t sum_k2 = 0;
    for (int64_t p = 0; p < M; p += 2) {
      const int64_t k = rng.integer(1, large ? 16 : 32);
      sum_k2 += k * k;
      const double d = static_cast<double>(k) * step * (rng.uniform() < 0.5 ? 1 : -1);
      for (int64_t q = 0; q < 2; ++q) {
        const int64_t pos = p + q, n = pos / S, s = pos % S;
        e.x[(n * g.c + c) * S + s] = static_cast<float>(q == 0 ? m + d : m - d);
      }
    }
    e.mean.push_back(m);
    e.m2.push_back(2.0 * static_cast<double>(sum_k2) * step * step);
  }
  return e;
}

struct ExactCase {
  const char* name;
  Arrangement arrangement;
  bool large_mean;
};

std::vector<ExactCase> exact_cases() {
  return {
      {"NCHW_inner_4096", dense(Layout::NCHW, {4, 3, {64, 64}}), true},
      {"NCHW_inner_10000", dense(Layout::NCHW, {2, 2, {100, 100}}), false},
      {"NCL_short_runs", dense(Layout::NCL, {6, 5, {10}}), true},
      {"NCDHW", dense(Layout::NCDHW, {2, 3, {4, 6, 8}}), false},
      {"NC_64_rows", dense(Layout::NC, {64, 3, {}}), true},
      {"NC_1000_rows", dense(Layout::NC, {1000, 16, {}}), false},
      {"NLC", dense(Layout::NLC, {3, 5, {10}}), false},
      {"NHWC_16384_rows", dense(Layout::NHWC, {4, 3, {64, 64}}), true},
      {"NHWC_5000_rows", dense(Layout::NHWC, {2, 16, {50, 50}}), false},
      {"NDHWC", dense(Layout::NDHWC, {2, 7, {4, 4, 6}}), false},
      {"NCHW_channels_last_strides", nchw_channels_last({2, 16, {8, 8}}), true},
      {"NHWC_padded_rows", rows_padded(Layout::NHWC, {2, 17, {10, 10}}, 3), true},
      {"NCHW_batch_slice", outer_padded(Layout::NCHW, {4, 3, {16, 16}}, 5), true},
  };
}

class ExactStatistics : public ::testing::TestWithParam<ExactCase> {
 protected:
  template <class T>
  void check_moments() {
    const ExactCase& k = GetParam();
    const ExactData e = exact_pairs(k.arrangement.logical, seed_of(k.name), k.large_mean);
    Buffer<T> xb(k.arrangement);
    xb.scatter(e.x);
    std::vector<Moments> moments(e.g.c);
    normkit::batch_norm_moments<T>(xb.cview(), moments);
    for (int64_t c = 0; c < e.g.c; ++c) {
      SCOPED_TRACE("channel " + std::to_string(c));
      EXPECT_EQ(moments[c].count, static_cast<double>(e.g.m()));
      EXPECT_EQ(moments[c].mean, e.mean[c]);
      EXPECT_EQ(moments[c].m2, e.m2[c]);
    }
  }

  // Saved mean and invstd, and the running statistics with momentum 1 (the
  // batch's own values), each exactly the formula rounded once to T.
  template <class T>
  void check_forward_training() {
    const ExactCase& k = GetParam();
    const ExactData e = exact_pairs(k.arrangement.logical, seed_of(k.name), k.large_mean);
    const int64_t C = e.g.c;
    const double M = static_cast<double>(e.g.m()), eps = 1e-5;
    Buffer<T> xb(k.arrangement), yb(k.arrangement);
    xb.scatter(e.x);
    std::vector<T> mean(C), invstd(C), running_mean(C, T{3}), running_var(C, T{5});
    normkit::batch_norm_forward_training<T>(xb.cview(), yb.view(), {}, {}, {mean, invstd},
                                            {running_mean, running_var}, {eps, 1.0});
    for (int64_t c = 0; c < C; ++c) {
      SCOPED_TRACE("channel " + std::to_string(c));
      EXPECT_EQ(mean[c], static_cast<T>(e.mean[c]));
      EXPECT_EQ(invstd[c], static_cast<T>(1.0 / std::sqrt(e.m2[c] / M + eps)));
      EXPECT_EQ(running_mean[c], static_cast<T>(e.mean[c]));
      EXPECT_EQ(running_var[c], static_cast<T>(e.m2[c] / (M - 1)));
    }
  }
};

TEST_P(ExactStatistics, MomentsFloat) { check_moments<float>(); }
TEST_P(ExactStatistics, MomentsDouble) { check_moments<double>(); }
TEST_P(ExactStatistics, SavedAndRunningFloat) { check_forward_training<float>(); }
TEST_P(ExactStatistics, SavedAndRunningDouble) { check_forward_training<double>(); }

INSTANTIATE_TEST_SUITE_P(Pairs, ExactStatistics, ::testing::ValuesIn(exact_cases()),
                         ByName());

// ------------------------------------------------------------ Chan's merge

// Two-pass moments in long double: the test's own direct computation.
Moments direct(const double* x, size_t n) {
  long double sum = 0;
  for (size_t i = 0; i < n; ++i) sum += x[i];
  const long double mean = sum / static_cast<long double>(n);
  long double m2 = 0;
  for (size_t i = 0; i < n; ++i) m2 += (x[i] - mean) * (x[i] - mean);
  return {static_cast<double>(n), static_cast<double>(mean), static_cast<double>(m2)};
}

std::vector<double> samples(size_t n, double mean, double stddev, uint64_t seed) {
  Rng rng(seed);
  std::vector<double> v(n);
  for (auto& e : v) e = mean + stddev * rng.uniform(-1.7320508075688772, 1.7320508075688772);
  return v;
}

TEST(MomentsMerge, EmptyIsTheIdentity) {
  const Moments a{4, 2.5, 7.25};
  Moments left = a;
  left.merge(Moments{});
  EXPECT_EQ(left.count, a.count);
  EXPECT_EQ(left.mean, a.mean);
  EXPECT_EQ(left.m2, a.m2);
  Moments right;
  right.merge(a);
  EXPECT_EQ(right.count, a.count);
  EXPECT_EQ(right.mean, a.mean);
  EXPECT_EQ(right.m2, a.m2);
}

TEST(MomentsMerge, EqualCountsOfDyadicDataAreExact) {
  // {1, 3}: mean 2, M2 2;  {5, 7}: mean 6, M2 2;  {1, 3, 5, 7}: mean 4, M2 9 + 1 + 1 + 9 = 20.
  Moments a{2, 2, 2};
  a.merge({2, 6, 2});
  EXPECT_EQ(a.count, 4);
  EXPECT_EQ(a.mean, 4);
  EXPECT_EQ(a.m2, 20);
  // Unequal counts: {10} has M2 0; {1, 3, 5, 7, 10} has mean 5.2 and
  // M2 = 4.2² + 2.2² + 0.2² + 1.8² + 4.8² = 48.8 (weight 1/5 is not dyadic: near, not exact).
  a.merge({1, 10, 0});
  EXPECT_EQ(a.count, 5);
  EXPECT_DOUBLE_EQ(a.mean, 5.2);
  EXPECT_DOUBLE_EQ(a.m2, 48.8);
}

TEST(MomentsMerge, PartsInOrderMatchTheDirectComputation) {
  // Parts of very different sizes, including single values, at two scales of mean.
  for (const double mean : {0.5, 1e6}) {
    SCOPED_TRACE("mean " + std::to_string(mean));
    const auto x = samples(100000, mean, 1.0, 42);
    const std::vector<size_t> cuts = {0, 1, 2, 3, 100, 4096, 4097, 50000, 99999, 100000};
    Moments merged;
    for (size_t i = 0; i + 1 < cuts.size(); ++i)
      merged.merge(direct(x.data() + cuts[i], cuts[i + 1] - cuts[i]));
    const Moments whole = direct(x.data(), x.size());
    EXPECT_EQ(merged.count, whole.count);
    EXPECT_NEAR(merged.mean, whole.mean, 1e-15 * std::fabs(whole.mean) + 1e-15);
    EXPECT_NEAR(merged.m2, whole.m2, 1e-12 * whole.m2);
    EXPECT_NEAR(merged.biased_variance(), 1.0, 0.02);
  }
}

TEST(MomentsMerge, VarianceAccessors) {
  const Moments m{4, 1, 6};
  EXPECT_EQ(m.biased_variance(), 1.5);
  EXPECT_EQ(m.unbiased_variance(), 2.0);
  EXPECT_EQ((Moments{1, 3, 0}).unbiased_variance(), 0.0);
  EXPECT_EQ((Moments{}).biased_variance(), 0.0);
}

// batch_norm_moments of two halves of a batch, merged, are the moments of the
// whole batch: how partial statistics combine across processes.
template <class T>
void check_halves_merge(Layout layout, double tolerance) {
  const Logical g{8, 5, {6, 7}};
  Rng rng(7);
  std::vector<double> mean_c, std_c;
  for (int64_t c = 0; c < g.c; ++c) {
    mean_c.push_back(rng.uniform(-100, 100));
    std_c.push_back(rng.uniform(0.1, 10));
  }
  const auto x = channel_data(g, mean_c, std_c, rng);
  Buffer<T> whole(dense(layout, g));
  whole.scatter(x);
  const auto sizes = sizes_in(layout, g);
  std::vector<int64_t> half_sizes = sizes;
  half_sizes[0] = g.n / 2;
  const auto strides = whole.arrangement.strides;
  const int64_t half_offset = half_sizes[0] * strides[0];
  std::vector<Moments> all(g.c), first(g.c), second(g.c);
  normkit::batch_norm_moments<T>(whole.cview(), all);
  normkit::batch_norm_moments<T>(
      TensorView<const T>::strided(whole.storage.data(), half_sizes, strides, layout), first);
  normkit::batch_norm_moments<T>(
      TensorView<const T>::strided(whole.storage.data() + half_offset, half_sizes, strides, layout),
      second);
  for (int64_t c = 0; c < g.c; ++c) {
    SCOPED_TRACE("channel " + std::to_string(c));
    Moments merged = first[c];
    merged.merge(second[c]);
    EXPECT_EQ(merged.count, all[c].count);
    EXPECT_NEAR(merged.mean, all[c].mean, tolerance * std_c[c]);
    EXPECT_NEAR(merged.m2, all[c].m2, tolerance * all[c].m2);
  }
}

TEST(MomentsMerge, HalvesOfABatchDouble) {
  check_halves_merge<double>(Layout::NCHW, 1e-13);
  check_halves_merge<double>(Layout::NHWC, 1e-13);
}

TEST(MomentsMerge, HalvesOfABatchFloat) {
  check_halves_merge<float>(Layout::NCHW, 1e-6);
  check_halves_merge<float>(Layout::NHWC, 1e-6);
}

}  // namespace
