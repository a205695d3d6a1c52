// Synchronized batch normalization's halves (batch_norm_forward_from_moments,
// batch_norm_backward_reduce, batch_norm_backward_apply): a batch cut into
// shards along N, each shard's partials combined in shard order, gives what
// forward-training and backward give on the whole batch; one shard gives it
// bit for bit (float, fast kernels).
#include "test_support.hpp"

namespace {

using namespace normkit_test;
using normkit::BackwardMode;
using normkit::BatchNormOptions;
using normkit::ErrorKind;
using normkit::Moments;
using normkit::TensorView;

struct SyncCase {
  const char* name;
  Arrangement arrangement;
};

std::vector<SyncCase> sync_cases() {
  return {
      {"NCHW", dense(Layout::NCHW, {7, 5, {6, 5}})},
      {"NC", dense(Layout::NC, {7, 70, {}})},  // rows kernels, one channel block + a tail
      // Rows in 20 column units (each its channels' coefficients), on any thread count.
      {"NC_column_units", dense(Layout::NC, {7, 5000, {}})},
      {"NHWC", dense(Layout::NHWC, {7, 6, {4, 5}})},
      {"NCHW_channels_last_strides", nchw_channels_last({7, 16, {3, 4}})},
      {"NCL_batch_slice", outer_padded(Layout::NCL, {7, 3, {9}}, 5)},
  };
}

// A view of samples [first, first + count) of a buffer's tensor.
template <class T, class B>
TensorView<T> shard(B& buffer, int64_t first, int64_t count) {
  const Arrangement& a = buffer.arrangement;
  auto sizes = a.sizes;
  sizes[0] = count;
  return TensorView<T>::strided(buffer.storage.data() + first * a.strides[0], sizes, a.strides,
                                a.layout);
}

// One problem: x, dy, γ, β with channel means far from zero (where the order of
// a merge matters most).
template <class T>
struct SyncProblem {
  Arrangement arr;
  Logical g;
  Buffer<T> x, dy;
  std::vector<T> gamma, beta;
  explicit SyncProblem(const SyncCase& c)
      : arr(c.arrangement), g(arr.logical), x(arr), dy(arr) {
    Rng rng(seed_of(c.name));
    std::vector<double> mean_c, std_c;
    for (int64_t ch = 0; ch < g.c; ++ch) {
      mean_c.push_back(rng.uniform(-50, 50));
      std_c.push_back(rng.uniform(0.5, 4));
      gamma.push_back(static_cast<T>(rng.uniform(0.5, 1.5)));
      beta.push_back(static_cast<T>(rng.uniform(-1, 1)));
    }
    x.scatter(channel_data(g, mean_c, std_c, rng));
    dy.scatter(uniform_floats(static_cast<size_t>(g.numel()), -1, 1, rng));
  }
};

// What one process computes on the whole batch.
template <class T>
struct Whole {
  std::vector<T> y, dx, mean, invstd, running_mean, running_var, dgamma, dbeta;
  int64_t batches = 0;
};
template <class T>
Whole<T> whole_batch(SyncProblem<T>& p) {
  const int64_t C = p.g.c;
  Whole<T> w{{}, {}, std::vector<T>(C), std::vector<T>(C), std::vector<T>(C, T(0.5)),
             std::vector<T>(C, T(2)), std::vector<T>(C), std::vector<T>(C), 3};
  Buffer<T> y(p.arr), dx(p.arr);
  normkit::batch_norm_forward_training<T>(p.x.cview(), y.view(), p.gamma, p.beta,
                                          {w.mean, w.invstd},
                                          {w.running_mean, w.running_var, &w.batches});
  normkit::batch_norm_backward<T>(p.x.cview(), p.dy.cview(), dx.view(), p.gamma, w.mean,
                                  w.invstd, w.dgamma, w.dbeta, BackwardMode::training);
  w.y = y.gather();
  w.dx = dx.gather();
  return w;
}

// The same batch as shards of the given sizes, partials combined in shard order.
template <class T>
Whole<T> sharded(SyncProblem<T>& p, const std::vector<int64_t>& sizes) {
  const int64_t C = p.g.c;
  Whole<T> s{{}, {}, std::vector<T>(C), std::vector<T>(C), std::vector<T>(C, T(0.5)),
             std::vector<T>(C, T(2)), std::vector<T>(C), std::vector<T>(C), 3};
  Buffer<T> y(p.arr), dx(p.arr);
  std::vector<Moments> merged(C);
  int64_t first = 0;
  for (const int64_t n : sizes) {
    std::vector<Moments> local(C);
    normkit::batch_norm_moments<T>(shard<const T>(p.x, first, n), local);
    for (int64_t c = 0; c < C; ++c) merged[c].merge(local[c]);
    first += n;
  }
  first = 0;
  for (size_t k = 0; k < sizes.size(); ++k) {
    // Every shard saves the same statistics; running statistics move once per batch.
    std::vector<T> mean(C), invstd(C), rm = s.running_mean, rv = s.running_var;
    int64_t batches = s.batches;
    normkit::batch_norm_forward_from_moments<T>(shard<const T>(p.x, first, sizes[k]),
                                                shard<T>(y, first, sizes[k]), p.gamma, p.beta,
                                                merged, {mean, invstd}, {rm, rv, &batches});
    if (k + 1 == sizes.size()) {
      s.mean = mean;
      s.invstd = invstd;
      s.running_mean = rm;
      s.running_var = rv;
      s.batches = batches;
    }
    first += sizes[k];
  }
  std::vector<double> sum_dy(C, 0.0), sum_dy_xhat(C, 0.0);
  first = 0;
  for (const int64_t n : sizes) {
    std::vector<double> a(C), b(C);
    normkit::batch_norm_backward_reduce<T>(shard<const T>(p.x, first, n),
                                           shard<const T>(p.dy, first, n), s.mean, s.invstd, a, b);
    for (int64_t c = 0; c < C; ++c) {
      sum_dy[c] += a[c];
      sum_dy_xhat[c] += b[c];
    }
    first += n;
  }
  first = 0;
  for (const int64_t n : sizes) {
    normkit::batch_norm_backward_apply<T>(shard<const T>(p.x, first, n),
                                          shard<const T>(p.dy, first, n), shard<T>(dx, first, n),
                                          p.gamma, s.mean, s.invstd, sum_dy, sum_dy_xhat,
                                          static_cast<double>(p.g.m()));
    first += n;
  }
  for (int64_t c = 0; c < C; ++c) {
    s.dgamma[c] = static_cast<T>(sum_dy_xhat[c]);
    s.dbeta[c] = static_cast<T>(sum_dy[c]);
  }
  s.y = y.gather();
  s.dx = dx.gather();
  EXPECT_TRUE(y.padding_is(sentinel<T>(), "y"));
  EXPECT_TRUE(dx.padding_is(sentinel<T>(), "dx"));
  return s;
}

class SyncBatchNorm : public ::testing::TestWithParam<SyncCase> {};

// One shard: the halves are forward-training and backward, bit for bit.
TEST_P(SyncBatchNorm, OneShardIsTheWholeBatchBitwise) {
  SyncProblem<float> p(GetParam());
  const Whole<float> w = whole_batch(p);
  const Whole<float> s = sharded(p, {p.g.n});
  EXPECT_TRUE(bitwise_equal("y", s.y, w.y));
  EXPECT_TRUE(bitwise_equal("save_mean", s.mean, w.mean));
  EXPECT_TRUE(bitwise_equal("save_invstd", s.invstd, w.invstd));
  EXPECT_TRUE(bitwise_equal("running_mean", s.running_mean, w.running_mean));
  EXPECT_TRUE(bitwise_equal("running_var", s.running_var, w.running_var));
  EXPECT_EQ(s.batches, w.batches);
  EXPECT_TRUE(bitwise_equal("dx", s.dx, w.dx));
  EXPECT_TRUE(bitwise_equal("dgamma", s.dgamma, w.dgamma));
  EXPECT_TRUE(bitwise_equal("dbeta", s.dbeta, w.dbeta));
}

// Uneven shards, one of a single sample: the whole batch's results to rounding.
template <class T>
void check_shards(const SyncCase& c, double rtol) {
  SyncProblem<T> p(c);
  const Whole<T> w = whole_batch(p);
  for (const auto& sizes : std::vector<std::vector<int64_t>>{{3, 4}, {3, 1, 3}, {2, 2, 2, 1}}) {
    SCOPED_TRACE("shards of " + std::to_string(sizes[0]) + ", " + std::to_string(sizes[1]) + "...");
    const Whole<T> s = sharded(p, sizes);
    // y, dx and the gradients are of unit scale (|γ| ~ 1, |dy| <= 1); statistics
    // are compared relative to the channel means' size (50).
    const Tolerance unit{rtol, rtol}, stats{50 * rtol, rtol};
    EXPECT_TRUE(all_close("y", s.y, w.y, unit));
    EXPECT_TRUE(all_close("save_mean", s.mean, w.mean, stats));
    EXPECT_TRUE(all_close("save_invstd", s.invstd, w.invstd, unit));
    EXPECT_TRUE(all_close("running_mean", s.running_mean, w.running_mean, stats));
    EXPECT_TRUE(all_close("running_var", s.running_var, w.running_var, stats));
    EXPECT_EQ(s.batches, w.batches);
    const double M = static_cast<double>(p.g.m());
    EXPECT_TRUE(all_close("dx", s.dx, w.dx, unit));
    EXPECT_TRUE(all_close("dgamma", s.dgamma, w.dgamma, {M * rtol, rtol}));
    EXPECT_TRUE(all_close("dbeta", s.dbeta, w.dbeta, {M * rtol, rtol}));
  }
}

TEST_P(SyncBatchNorm, ShardsGiveTheWholeBatchFloat) { check_shards<float>(GetParam(), 2e-6); }
TEST_P(SyncBatchNorm, ShardsGiveTheWholeBatchDouble) { check_shards<double>(GetParam(), 1e-13); }

// The statistics half alone (batch_norm_statistics_from_moments, for callers
// that apply the normalization themselves): the saved and running statistics
// forward_from_moments writes, bit for bit.
template <class T>
void check_statistics_half(const SyncCase& c) {
  SyncProblem<T> p(c);
  const int64_t C = p.g.c;
  std::vector<Moments> moments(C);
  normkit::batch_norm_moments<T>(p.x.cview(), moments);
  std::vector<T> mean(C), invstd(C), rm(C, T(0.5)), rv(C, T(2)), mean2(C), invstd2(C), rm2 = rm, rv2 = rv;
  int64_t batches = 3, batches2 = 3;
  Buffer<T> y(p.arr);
  normkit::batch_norm_forward_from_moments<T>(p.x.cview(), y.view(), p.gamma, p.beta, moments, {mean, invstd},
                                              {rm, rv, &batches});
  normkit::batch_norm_statistics_from_moments<T>(moments, {mean2, invstd2}, {rm2, rv2, &batches2});
  EXPECT_TRUE(bitwise_equal("save_mean", mean2, mean));
  EXPECT_TRUE(bitwise_equal("save_invstd", invstd2, invstd));
  EXPECT_TRUE(bitwise_equal("running_mean", rm2, rm));
  EXPECT_TRUE(bitwise_equal("running_var", rv2, rv));
  EXPECT_EQ(batches2, batches);
}
TEST_P(SyncBatchNorm, TheStatisticsHalfWritesWhatForwardFromMomentsDoes) {
  check_statistics_half<float>(GetParam());
  check_statistics_half<double>(GetParam());
}

INSTANTIATE_TEST_SUITE_P(Layouts, SyncBatchNorm, ::testing::ValuesIn(sync_cases()), ByName());

// ---------------------------------------------------------------- errors

struct SyncErrors : ::testing::Test {
  SyncProblem<float> p{{"NC", dense(Layout::NC, {4, 3, {}})}};
  std::vector<Moments> moments = std::vector<Moments>(3, Moments{8, 1.0, 4.0});
  std::vector<float> rm = std::vector<float>(3, 0.25f), rv = std::vector<float>(3, 2.0f);
  std::vector<float> mean = std::vector<float>(3, 0.0f), invstd = std::vector<float>(3, 1.0f);
  std::vector<double> s1 = std::vector<double>(3, 0.0), s2 = std::vector<double>(3, 0.0);
  int64_t batches = 5;
  Buffer<float> out{p.arr, 7.0f};

  void forward(std::span<const Moments> m) {
    normkit::batch_norm_forward_from_moments<float>(p.x.cview(), out.view(), p.gamma, p.beta, m,
                                                    {}, {rm, rv, &batches});
  }
  ::testing::AssertionResult unchanged() {
    for (float v : out.storage)
      if (v != 7.0f) return ::testing::AssertionFailure() << "output written";
    if (rm != std::vector<float>(3, 0.25f) || rv != std::vector<float>(3, 2.0f) || batches != 5)
      return ::testing::AssertionFailure() << "running statistics changed";
    return ::testing::AssertionSuccess();
  }
};

TEST_F(SyncErrors, ForwardNeedsTwoValuesPerChannel) {
  moments[1].count = 1;
  EXPECT_TRUE(throws_error([&] { forward(moments); }, ErrorKind::invalid_argument,
                           {"more than 1 value per channel", "channel 1"}));
  EXPECT_TRUE(unchanged());
}

TEST_F(SyncErrors, ForwardRefusesNonFiniteMomentsBeforeWriting) {
  moments[2].m2 = std::numeric_limits<double>::quiet_NaN();
  EXPECT_TRUE(throws_error([&] { forward(moments); }, ErrorKind::runtime, {"channel 2", "NaN"}));
  EXPECT_TRUE(unchanged());
}

TEST_F(SyncErrors, ForwardChecksTheMomentsCount) {
  moments.pop_back();
  EXPECT_TRUE(throws_error([&] { forward(moments); }, ErrorKind::invalid_argument,
                           {"moments should contain 3 elements"}));
  EXPECT_TRUE(unchanged());
}

TEST_F(SyncErrors, TheStatisticsHalfChecksAsForwardFromMomentsDoes) {
  std::vector<float> saved_mean(3, 9.0f), saved_invstd(3, 9.0f);
  auto statistics = [&](std::span<const Moments> m) {
    normkit::batch_norm_statistics_from_moments<float>(m, {saved_mean, saved_invstd}, {rm, rv, &batches});
  };
  auto untouched = [&] {
    return unchanged() && saved_mean == std::vector<float>(3, 9.0f) &&
           saved_invstd == std::vector<float>(3, 9.0f);
  };
  std::vector<Moments> few = moments, nan = moments, none;
  few[1].count = 1;
  nan[2].m2 = std::numeric_limits<double>::quiet_NaN();
  EXPECT_TRUE(throws_error([&] { statistics(few); }, ErrorKind::invalid_argument,
                           {"more than 1 value per channel", "channel 1"}));
  EXPECT_TRUE(untouched());
  EXPECT_TRUE(throws_error([&] { statistics(nan); }, ErrorKind::runtime, {"channel 2", "NaN"}));
  EXPECT_TRUE(untouched());
  EXPECT_TRUE(throws_error([&] { statistics(none); }, ErrorKind::invalid_argument, {"moments", "at least one"}));
  EXPECT_TRUE(untouched());
  std::vector<float> short_mean(2);
  EXPECT_TRUE(throws_error(
      [&] { normkit::batch_norm_statistics_from_moments<float>(moments, {short_mean, saved_invstd}, {}); },
      ErrorKind::invalid_argument, {"save_mean should contain 3"}));
  EXPECT_TRUE(untouched());
  statistics(moments);  // and a good call writes them
  EXPECT_EQ(batches, 6);
  EXPECT_EQ(saved_mean, std::vector<float>(3, 1.0f));
}

TEST_F(SyncErrors, BackwardApplyChecksTheCount) {
  for (const double count : {1.0, 3.0, std::numeric_limits<double>::infinity()}) {
    EXPECT_TRUE(throws_error(
        [&] {
          normkit::batch_norm_backward_apply<float>(p.x.cview(), p.dy.cview(), out.view(), p.gamma,
                                                    mean, invstd, s1, s2, count);
        },
        ErrorKind::invalid_argument, {"count", "at least x's 4"}));
    EXPECT_TRUE(unchanged());
  }
}

TEST_F(SyncErrors, BackwardChecksSumsAndOutput) {
  std::vector<double> short_sums(2);
  EXPECT_TRUE(throws_error(
      [&] {
        normkit::batch_norm_backward_reduce<float>(p.x.cview(), p.dy.cview(), mean, invstd,
                                                   short_sums, s2);
      },
      ErrorKind::invalid_argument, {"sum_dy should contain 3"}));
  EXPECT_TRUE(throws_error(
      [&] {
        normkit::batch_norm_backward_apply<float>(p.x.cview(), p.dy.cview(), TensorView<float>{},
                                                  p.gamma, mean, invstd, s1, s2, 8);
      },
      ErrorKind::invalid_argument, {"dx"}));
}

// A shard of one sample per channel is fine for the reduce half (the whole
// batch has more); its sums are the sample's own.
TEST(SyncBatchNormShard, ReduceTakesASingleValuePerChannel) {
  std::vector<float> x = {3.0f, -1.0f}, dy = {0.5f, 2.0f}, mean = {1.0f, 1.0f}, invstd = {0.5f, 2.0f};
  std::vector<double> s1(2), s2(2);
  normkit::batch_norm_backward_reduce<float>(
      TensorView<const float>::contiguous(x.data(), {1, 2}, Layout::NC),
      TensorView<const float>::contiguous(dy.data(), {1, 2}, Layout::NC), mean, invstd, s1, s2);
  EXPECT_EQ(s1, (std::vector<double>{0.5, 2.0}));
  EXPECT_EQ(s2, (std::vector<double>{0.5 * (3.0 - 1.0) * 0.5, 2.0 * (-1.0 - 1.0) * 2.0}));
}

}  // namespace
