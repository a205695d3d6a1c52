// Group and instance normalization.
//
// - Fast (float API) against the reference kernels (plain loops in double) on
//   the same float data, over a sweep of N, C, G (1, C and in between), spatial
//   sizes (including 1) and layouts (NC, NCL, NCHW, NCDHW, NLC, NHWC, NDHWC,
//   PyTorch channels_last, padded rows, batch slices, padded channels).
//   Outputs start as a recognisable NaN and input padding holds it too (see
//   test_support.hpp), so an unwritten output or a read of padding fails.
// - The reference against the formulas (double loops written here) and its
//   gradients against central differences.
// - Bitwise determinism across 1, 2 and 3 threads, for shapes that take both
//   schedules (whole blocks per thread, and phases).
// - InstanceNorm: running statistics against PyTorch's formula; inference;
//   G = C equivalence; errors.
// - Errors: C % G != 0, sizes of γ/β/statistics, eps <= 0, empty tensors,
//   and nothing written when an argument is rejected.
//
// Tolerances, |fast - ref| <= atol·scale + rtol·|ref| (float roundoff 6e-8):
//   y: atol 2e-6, rtol 2e-6, scale 1: a few roundings of values of size |x̂·γ + β|
//      (|x̂| up to ~3 here, since a group mixes channels of different means);
//   dx: atol 4e-6, scale max invstd·max|γ|·max|dy| (the size of dx's terms);
//   dγ, dβ: atol 1e-6, rtol 1e-6, scale Σ|dy·x̂| and Σ|dy| of the channel;
//   saved mean: atol 1e-6 with scale σ of the group; invstd: rtol 1e-6.
#include <array>

#include "kernels/group_norm.hpp"
#include "test_support.hpp"

namespace {

using namespace normkit_test;
using normkit::Moments;
using normkit::TensorView;
namespace gn = normkit::kernels::gn;

constexpr Tolerance kY{2e-6, 2e-6};
constexpr Tolerance kDx{4e-6, 4e-6};
constexpr Tolerance kSum{1e-6, 1e-6};
constexpr Tolerance kMean{1e-6, 1e-6};
constexpr Tolerance kRelative{0.0, 1e-6};

Layout first_layout(size_t spatial) {
  constexpr std::array layouts = {Layout::NC, Layout::NCL, Layout::NCHW, Layout::NCDHW};
  return layouts[spatial];
}
Layout last_layout(size_t spatial) {
  constexpr std::array layouts = {Layout::NC, Layout::NLC, Layout::NHWC, Layout::NDHWC};
  return layouts[spatial];
}

struct Case {
  std::string name;
  Arrangement arrangement;
  int64_t groups;
};

// Every arrangement of one logical shape that the library takes.
std::vector<Case> arrangements(const Logical& g, int64_t groups) {
  std::vector<Case> out;
  std::ostringstream shape;
  shape << "N" << g.n << "_C" << g.c << "_G" << groups << "_S";
  for (const auto s : g.spatial) shape << s << "x";
  const std::string base = shape.str();
  const size_t rank = g.spatial.size();
  out.push_back({base + "_first", dense(first_layout(rank), g), groups});
  if (rank > 0) out.push_back({base + "_last", dense(last_layout(rank), g), groups});
  out.push_back({base + "_batch_slice", outer_padded(first_layout(rank), g, 5), groups});
  out.push_back({base + "_padded_rows", rows_padded(last_layout(rank), g, 3), groups});
  if (rank > 0) out.push_back({base + "_padded_channels", channel_padded(first_layout(rank), g, 2), groups});
  if (rank == 2) {
    out.push_back({base + "_channels_last", nchw_channels_last(g), groups});
    out.push_back({base + "_channels_last_padded", nchw_channels_last(g, 4), groups});
  }
  return out;
}

std::vector<Case> sweep() {
  struct Shape {
    int64_t n, c;
    std::vector<int64_t> spatial;
    std::vector<int64_t> groups;
  };
  const std::vector<Shape> shapes = {
      {2, 4, {}, {1, 2, 4}},           // NC: a group is C/G values of one sample
      {3, 6, {}, {3}},
      {2, 6, {7}, {1, 2, 3, 6}},       // NCL
      {1, 4, {1}, {2, 4}},             // one spatial position (G = C: one value per group)
      {2, 6, {5, 7}, {1, 3, 6}},       // NCHW
      {3, 32, {1, 1}, {8}},
      {2, 20, {9, 9}, {5}},            // channels above the SIMD width, odd S
      {1, 3, {33, 65}, {1, 3}},        // a block longer than a piece
      {2, 12, {70, 70}, {4}},          // channel runs longer than a piece
      {2, 4, {3, 4, 5}, {1, 2, 4}},    // NCDHW
      {1, 130, {2, 3}, {10, 130}},     // rows wider than the vector lanes
  };
  std::vector<Case> out;
  for (const auto& s : shapes)
    for (const auto groups : s.groups)
      for (auto& c : arrangements({s.n, s.c, s.spatial}, groups)) out.push_back(std::move(c));
  return out;
}

std::string param_name(const ::testing::TestParamInfo<Case>& info) {
  return test_name_safe(info.param.name);
}

struct Data {
  std::vector<float> x, dy, gamma, beta;
};

// Channels of different means and spreads (so a group mixes them), a few large.
Data make_data(const Logical& g, uint64_t seed) {
  Rng rng(seed);
  std::vector<double> mean(g.c), stddev(g.c);
  for (int64_t c = 0; c < g.c; ++c) {
    mean[c] = rng.uniform(-3, 3) + (c % 5 == 4 ? 100.0 : 0.0);
    stddev[c] = rng.uniform(0.5, 2.0);
  }
  Data d;
  d.x = channel_data(g, mean, stddev, rng);
  d.dy = uniform_floats(static_cast<size_t>(g.numel()), -1, 1, rng);
  d.gamma = uniform_floats(static_cast<size_t>(g.c), -1.5, 1.5, rng);
  d.beta = uniform_floats(static_cast<size_t>(g.c), -1, 1, rng);
  return d;
}

normkit::SampleGeometry canonical_geometry(const Logical& g) {
  return {g.n, g.c, g.s(), g.c * g.s(), g.s(), 1};
}

// The reference on canonical double copies of the float data.
struct Reference {
  std::vector<double> y, mean, invstd, dx, dgamma, dbeta;
  std::vector<Moments> moments;
};

Reference reference_forward(const Logical& g, int64_t groups, const Data& d, double eps) {
  Reference r;
  const auto geom = canonical_geometry(g);
  const std::vector<double> x = convert<double>(d.x), gamma = convert<double>(d.gamma),
                            beta = convert<double>(d.beta);
  r.y.assign(x.size(), 0);
  r.moments.resize(g.n * groups);
  gn::ref::forward<double>({geom, geom, x.data(), r.y.data(), gamma.data(), beta.data(), groups,
                            eps, r.moments.data()});
  for (const auto& m : r.moments) {
    r.mean.push_back(m.mean);
    r.invstd.push_back(1.0 / std::sqrt(m.biased_variance() + eps));
  }
  return r;
}

// Backward from the given (float) saved statistics, so that only the backward differs.
void reference_backward(const Logical& g, int64_t groups, const Data& d,
                        const std::vector<float>& mean, const std::vector<float>& invstd,
                        Reference& r) {
  const auto geom = canonical_geometry(g);
  const std::vector<double> x = convert<double>(d.x), dy = convert<double>(d.dy),
                            gamma = convert<double>(d.gamma);
  const std::vector<double> m = convert<double>(mean), s = convert<double>(invstd);
  r.dx.assign(x.size(), 0);
  r.dgamma.assign(g.c, 0);
  r.dbeta.assign(g.c, 0);
  gn::ref::backward<double>({geom, geom, geom, x.data(), dy.data(), r.dx.data(), gamma.data(),
                             groups, m.data(), s.data(), r.dgamma.data(), r.dbeta.data()});
}

struct FastResult {
  std::vector<float> y, mean, invstd, dx, dgamma, dbeta;
};

FastResult run_fast(const Case& k, const Data& d, double eps) {
  const Logical& g = k.arrangement.logical;
  Buffer<float> x(k.arrangement), y(k.arrangement), dy(k.arrangement), dx(k.arrangement);
  x.scatter(d.x);
  dy.scatter(d.dy);
  FastResult r;
  r.mean.assign(g.n * k.groups, 0);
  r.invstd.assign(g.n * k.groups, 0);
  normkit::group_norm_forward<float>(x.cview(), y.view(), k.groups, d.gamma, d.beta,
                                     {r.mean, r.invstd}, eps);
  EXPECT_TRUE(y.padding_is(sentinel<float>(), "y"));
  r.y = y.gather();
  r.dgamma.assign(g.c, 0);
  r.dbeta.assign(g.c, 0);
  normkit::group_norm_backward<float>(x.cview(), dy.cview(), dx.view(), k.groups, d.gamma, r.mean,
                                      r.invstd, r.dgamma, r.dbeta);
  EXPECT_TRUE(dx.padding_is(sentinel<float>(), "dx"));
  r.dx = dx.gather();
  return r;
}

class GroupNormFastVsReference : public ::testing::TestWithParam<Case> {};

TEST_P(GroupNormFastVsReference, ForwardAndBackward) {
  const Case& k = GetParam();
  SCOPED_TRACE(k.arrangement.describe());
  const Logical& g = k.arrangement.logical;
  const Data d = make_data(g, seed_of(k.name));
  const double eps = 1e-5;
  const FastResult fast = run_fast(k, d, eps);
  Reference ref = reference_forward(g, k.groups, d, eps);

  EXPECT_TRUE(all_close("y", fast.y, ref.y, kY, &g));
  std::vector<double> sigma;
  for (const auto& m : ref.moments) sigma.push_back(std::sqrt(m.biased_variance()) + 1e-30);
  EXPECT_TRUE(all_close("save_mean", fast.mean, ref.mean, kMean, nullptr, &sigma));
  EXPECT_TRUE(all_close("save_invstd", fast.invstd, ref.invstd, kRelative));

  reference_backward(g, k.groups, d, fast.mean, fast.invstd, ref);
  double max_invstd = 0, max_gamma = 0, max_dy = 0;
  for (const float v : fast.invstd) max_invstd = std::max(max_invstd, double{v});
  for (const float v : d.gamma) max_gamma = std::max(max_gamma, std::fabs(double{v}));
  for (const float v : d.dy) max_dy = std::max(max_dy, std::fabs(double{v}));
  const std::vector<double> dx_scale(g.c, max_invstd * max_gamma * max_dy);
  EXPECT_TRUE(all_close("dx", fast.dx, ref.dx, kDx, &g, &dx_scale));

  // Scales of dγ and dβ: Σ|dy·x̂| and Σ|dy| per channel.
  std::vector<double> abs_dy(g.c, 0), abs_dy_xhat(g.c, 0);
  const int64_t S = g.s(), per_group = g.c / k.groups;
  for (int64_t n = 0; n < g.n; ++n)
    for (int64_t c = 0; c < g.c; ++c)
      for (int64_t s = 0; s < S; ++s) {
        const int64_t i = (n * g.c + c) * S + s, block = n * k.groups + c / per_group;
        abs_dy[c] += std::fabs(d.dy[i]);
        abs_dy_xhat[c] +=
            std::fabs(d.dy[i] * (d.x[i] - ref.mean[block]) * ref.invstd[block]);
      }
  for (auto& v : abs_dy_xhat) v += 1e-30;
  EXPECT_TRUE(all_close("dbeta", fast.dbeta, ref.dbeta, kSum, nullptr, &abs_dy));
  EXPECT_TRUE(all_close("dgamma", fast.dgamma, ref.dgamma, kSum, nullptr, &abs_dy_xhat));
}

INSTANTIATE_TEST_SUITE_P(Sweep, GroupNormFastVsReference, ::testing::ValuesIn(sweep()), param_name);

// In place: y = x, dx = dy, same strides.
TEST(GroupNormFast, InPlaceMatchesOutOfPlace) {
  for (const Layout layout : {Layout::NCHW, Layout::NHWC}) {
    const Logical g{2, 12, {6, 5}};
    const Data d = make_data(g, 7);
    const Case k{"inplace", dense(layout, g), 3};
    const FastResult expected = run_fast(k, d, 1e-5);
    Buffer<float> x(k.arrangement), dy(k.arrangement);
    x.scatter(d.x);
    dy.scatter(d.dy);
    Buffer<float> x_copy = x;
    std::vector<float> mean(6), invstd(6), dgamma(12), dbeta(12);
    normkit::group_norm_forward<float>(x.cview(), x.view(), 3, d.gamma, d.beta, {mean, invstd});
    EXPECT_TRUE(bitwise_equal("y in place", x.gather(), expected.y));
    normkit::group_norm_backward<float>(x_copy.cview(), dy.cview(), dy.view(), 3, d.gamma, mean,
                                        invstd, dgamma, dbeta);
    EXPECT_TRUE(bitwise_equal("dx in place", dy.gather(), expected.dx));
  }
}

// Without γ/β: γ = 1, β = 0; dx without dγ/dβ and dγ/dβ without dx.
TEST(GroupNormFast, OptionalPartsAreOptional) {
  const Logical g{3, 8, {4, 4}};
  Data d = make_data(g, 11);
  for (const Layout layout : {Layout::NCHW, Layout::NHWC}) {
    Data ones = d;
    ones.gamma.assign(8, 1.0f);
    ones.beta.assign(8, 0.0f);
    const Case k{"optional", dense(layout, g), 4};
    const FastResult with = run_fast(k, ones, 1e-5);
    Buffer<float> x(k.arrangement), y(k.arrangement), dy(k.arrangement), dx(k.arrangement);
    x.scatter(d.x);
    dy.scatter(d.dy);
    normkit::group_norm_forward<float>(x.cview(), y.view(), 4, {}, {}, {});
    EXPECT_TRUE(bitwise_equal("y without affine", y.gather(), with.y));
    normkit::group_norm_backward<float>(x.cview(), dy.cview(), dx.view(), 4, {}, with.mean,
                                        with.invstd, {}, {});
    EXPECT_TRUE(bitwise_equal("dx only", dx.gather(), with.dx));
    std::vector<float> dgamma(8), dbeta(8);
    normkit::group_norm_backward<float>(x.cview(), dy.cview(), {}, 4, {}, with.mean, with.invstd,
                                        dgamma, dbeta);
    EXPECT_TRUE(bitwise_equal("dgamma only", dgamma, with.dgamma));
    EXPECT_TRUE(bitwise_equal("dbeta only", dbeta, with.dbeta));
  }
}

// y and dx of g (streamed at 2 threads) against each sample normalized alone
// (written in place), and in place (y = x, dx = dy) against the same.
void check_each_sample_alone(const Logical& g, int64_t groups, Layout layout) {
  const Logical one{1, g.c, g.spatial};
  const Data d = make_data(g, 23);
  const int64_t per_sample = one.numel();
  ThreadCount threads(2);
  const Case all{"streamed", dense(layout, g), groups};
  SCOPED_TRACE(all.arrangement.describe());
  const FastResult streamed = run_fast(all, d, 1e-5);
  EXPECT_TRUE(all_close("y", streamed.y, reference_forward(g, groups, d, 1e-5).y, kY, &g));
  for (int64_t n = 0; n < g.n; ++n) {
    Data dn = d;
    dn.x.assign(d.x.begin() + n * per_sample, d.x.begin() + (n + 1) * per_sample);
    dn.dy.assign(d.dy.begin() + n * per_sample, d.dy.begin() + (n + 1) * per_sample);
    const FastResult alone = run_fast({"alone", dense(layout, one), groups}, dn, 1e-5);
    const std::vector<float> part(streamed.y.begin() + n * per_sample,
                                  streamed.y.begin() + (n + 1) * per_sample);
    EXPECT_TRUE(bitwise_equal("y of sample " + std::to_string(n), part, alone.y));
    const std::vector<float> dx(streamed.dx.begin() + n * per_sample,
                                streamed.dx.begin() + (n + 1) * per_sample);
    EXPECT_TRUE(bitwise_equal("dx of sample " + std::to_string(n), dx, alone.dx));
  }
  Buffer<float> xy(all.arrangement), x(all.arrangement), dy(all.arrangement);
  xy.scatter(d.x);
  x.scatter(d.x);
  dy.scatter(d.dy);
  std::vector<float> mean(g.n * groups), invstd(g.n * groups), dgamma(g.c), dbeta(g.c);
  normkit::group_norm_forward<float>(xy.cview(), xy.view(), groups, d.gamma, d.beta,
                                     {mean, invstd});
  EXPECT_TRUE(bitwise_equal("y in place", xy.gather(), streamed.y));
  normkit::group_norm_backward<float>(x.cview(), dy.cview(), dy.view(), groups, d.gamma, mean,
                                      invstd, dgamma, dbeta);
  EXPECT_TRUE(bitwise_equal("dx in place (dx = dy)", dy.gather(), streamed.dx));
}

// Outputs larger than the threads' L2 go to memory with streaming stores
// (src/cpu/streamed_output.hpp; rows and planes straight from the loop on
// AVX-512 CPUs). A sample's y and dx depend on that sample alone: 16 samples
// of 1 MB (16.8 MB, streamed) give the bits of each sample normalized by
// itself (1 MB, written in place), and y matches the reference. In place
// (y = x, dx = dy), streamed, the same bits. 3 samples of one group (6.5 MB)
// share 3 blocks over 2 threads: the planes' forward then applies parts of
// planes (130x130: a part's end in the middle of a line).
TEST(GroupNormFast, StreamedOutputsAreEachSampleAlone) {
  struct Shape {
    Logical g;
    int64_t groups;
  };
  for (const auto& [g, groups] : {Shape{{16, 64, {64, 64}}, 8}, Shape{{3, 32, {130, 130}}, 1}})
    for (const Layout layout : {Layout::NCHW, Layout::NHWC})
      check_each_sample_alone(g, groups, layout);
}

// ---------------------------------------------------------------- determinism

TEST(GroupNormDeterminism, BitwiseIdenticalFor1To3Threads) {
  struct Shape {
    Logical g;
    int64_t groups;
  };
  // Blocks or samples: 6 (whole per thread at 1, 2 and 3 threads), 2 and 3
  // (phases at some thread counts), so both schedules are compared. The last
  // shape, channels-last: one thread takes the sample's whole rows (channel
  // blocks 64, 64, 32), two and three cut them into 3 parts of 60 channels
  // (blocks 32 and 28 channels one by one), so a channel's sums must not
  // depend on the block it falls in.
  const std::vector<Shape> shapes = {
      {{3, 64, {32, 32}}, 2}, {{1, 4, {160, 160}}, 2}, {{3, 8, {100, 100}}, 1},
      {{2, 96, {24, 24}}, 32}, {{1, 160, {20, 20}}, 16},
  };
  for (const auto& shape : shapes)
    for (const Layout layout : {Layout::NCHW, Layout::NHWC}) {
      const Case k{"determinism", dense(layout, shape.g), shape.groups};
      SCOPED_TRACE(k.arrangement.describe() + " G " + std::to_string(shape.groups));
      const Data d = make_data(shape.g, 5);
      std::vector<FastResult> results;
      for (const int threads : {1, 2, 3}) {
        ThreadCount scope(threads);
        results.push_back(run_fast(k, d, 1e-5));
      }
      for (size_t i = 1; i < results.size(); ++i) {
        EXPECT_TRUE(bitwise_equal("y", results[0].y, results[i].y));
        EXPECT_TRUE(bitwise_equal("mean", results[0].mean, results[i].mean));
        EXPECT_TRUE(bitwise_equal("invstd", results[0].invstd, results[i].invstd));
        EXPECT_TRUE(bitwise_equal("dx", results[0].dx, results[i].dx));
        EXPECT_TRUE(bitwise_equal("dgamma", results[0].dgamma, results[i].dgamma));
        EXPECT_TRUE(bitwise_equal("dbeta", results[0].dbeta, results[i].dbeta));
      }
      // And still right.
      const Reference ref = reference_forward(shape.g, shape.groups, d, 1e-5);
      EXPECT_TRUE(all_close("y", results[1].y, ref.y, kY, &shape.g));

      // The kernels' double statistics and sums, before they are rounded to float
      // (a different merge order changes them long before it changes a float output).
      const int64_t S = shape.g.s(), C = shape.g.c, N = shape.g.n;
      const bool last = layout == Layout::NHWC;
      const normkit::SampleGeometry geom{N, C, S, C * S, last ? 1 : S, last ? C : 1};
      const gn::Impl& impl = gn::implementations()[last ? 1 : 0];
      ASSERT_EQ(impl.decline(geom, {&geom, 1}), nullptr);
      Buffer<float> x(k.arrangement), dy(k.arrangement);
      x.scatter(d.x);
      dy.scatter(d.dy);
      std::vector<float> y(x.storage.size()), dx(x.storage.size());
      std::vector<std::vector<double>> bits;
      for (const int threads : {1, 2, 3}) {
        ThreadCount scope(threads);
        std::vector<Moments> moments(N * shape.groups);
        impl.forward({geom, geom, x.storage.data(), y.data(), d.gamma.data(), d.beta.data(),
                      shape.groups, 1e-5, moments.data()});
        std::vector<double> mean, invstd, all;
        for (const auto& m : moments) {
          mean.push_back(m.mean);
          invstd.push_back(1.0 / std::sqrt(m.biased_variance() + 1e-5));
          all.insert(all.end(), {m.count, m.mean, m.m2});
        }
        std::vector<double> dgamma(C), dbeta(C);
        impl.backward({geom, geom, geom, x.storage.data(), dy.storage.data(), dx.data(),
                       d.gamma.data(), shape.groups, mean.data(), invstd.data(), dgamma.data(),
                       dbeta.data()});
        all.insert(all.end(), dgamma.begin(), dgamma.end());
        all.insert(all.end(), dbeta.begin(), dbeta.end());
        std::vector<Moments> direct(N * shape.groups);
        impl.moments({geom, x.storage.data(), shape.groups, direct.data()});
        for (const auto& m : direct) all.insert(all.end(), {m.count, m.mean, m.m2});
        bits.push_back(std::move(all));
      }
      EXPECT_TRUE(bitwise_equal("double statistics and sums, 1 vs 2 threads", bits[0], bits[1]));
      EXPECT_TRUE(bitwise_equal("double statistics and sums, 1 vs 3 threads", bits[0], bits[2]));
    }
}

// ---------------------------------------------------------------- reference vs formulas

// y from the definition, written out here: per (n, g) over C/G channels and S positions.
std::vector<double> group_norm_formula(const Logical& g, int64_t groups, const std::vector<double>& x,
                                       const std::vector<double>& gamma,
                                       const std::vector<double>& beta, double eps) {
  const int64_t S = g.s(), per_group = g.c / groups, m = per_group * S;
  std::vector<double> y(x.size());
  for (int64_t n = 0; n < g.n; ++n)
    for (int64_t grp = 0; grp < groups; ++grp) {
      const int64_t first = (n * g.c + grp * per_group) * S;  // a block is contiguous in canonical order
      double mean = 0, var = 0;
      for (int64_t i = 0; i < m; ++i) mean += x[first + i];
      mean /= static_cast<double>(m);
      for (int64_t i = 0; i < m; ++i) var += (x[first + i] - mean) * (x[first + i] - mean);
      var /= static_cast<double>(m);
      for (int64_t i = 0; i < m; ++i) {
        const int64_t c = grp * per_group + i / S;
        y[first + i] = (x[first + i] - mean) / std::sqrt(var + eps) * gamma[c] + beta[c];
      }
    }
  return y;
}

// L = Σ r·y; its gradients from the double API against central differences.
TEST(GroupNormReference, MatchesTheFormulaAndFiniteDifferences) {
  for (const Layout layout : {Layout::NCHW, Layout::NHWC, Layout::NCL, Layout::NC})
    for (const int64_t groups : {1, 2, 3, 6}) {
      const Logical g = layout == Layout::NC    ? Logical{3, 6, {}}
                        : layout == Layout::NCL ? Logical{2, 6, {4}}
                                                : Logical{2, 6, {3, 2}};
      SCOPED_TRACE(std::string(normkit::to_string(layout)) + " G " + std::to_string(groups));
      const Data d = make_data(g, 99 + groups);
      const std::vector<double> x0 = convert<double>(d.x), r = convert<double>(d.dy);
      std::vector<double> gamma = convert<double>(d.gamma), beta = convert<double>(d.beta);
      const double eps = 1e-3;
      const Arrangement a = dense(layout, g);
      auto loss = [&](const std::vector<double>& x, const std::vector<double>& gm,
                      const std::vector<double>& bt, std::vector<double>* y_out = nullptr,
                      std::vector<double>* mean = nullptr, std::vector<double>* invstd = nullptr) {
        Buffer<double> xb(a), yb(a);
        xb.scatter(x);
        std::vector<double> m(g.n * groups), s(g.n * groups);
        normkit::group_norm_forward<double>(xb.cview(), yb.view(), groups, gm, bt, {m, s}, eps);
        const auto y = yb.gather();
        if (y_out) *y_out = y;
        if (mean) *mean = m;
        if (invstd) *invstd = s;
        double l = 0;
        for (size_t i = 0; i < y.size(); ++i) l += r[i] * y[i];
        return l;
      };
      std::vector<double> y, mean, invstd;
      loss(x0, gamma, beta, &y, &mean, &invstd);
      EXPECT_TRUE(all_close("y vs formula", y, group_norm_formula(g, groups, x0, gamma, beta, eps),
                            Tolerance{1e-12, 1e-12}, &g));

      Buffer<double> xb(a), dyb(a), dxb(a);
      xb.scatter(x0);
      dyb.scatter(r);
      std::vector<double> dgamma(g.c), dbeta(g.c);
      normkit::group_norm_backward<double>(xb.cview(), dyb.cview(), dxb.view(), groups, gamma,
                                           mean, invstd, dgamma, dbeta);
      const auto dx = dxb.gather();
      const double h = 1e-6;
      std::vector<double> numeric_dx(x0.size()), numeric_dgamma(g.c), numeric_dbeta(g.c);
      for (size_t i = 0; i < x0.size(); ++i) {
        auto xp = x0, xm = x0;
        xp[i] += h;
        xm[i] -= h;
        numeric_dx[i] = (loss(xp, gamma, beta) - loss(xm, gamma, beta)) / (2 * h);
      }
      for (int64_t c = 0; c < g.c; ++c) {
        auto gp = gamma, gm = gamma, bp = beta, bm = beta;
        gp[c] += h, gm[c] -= h, bp[c] += h, bm[c] -= h;
        numeric_dgamma[c] = (loss(x0, gp, beta) - loss(x0, gm, beta)) / (2 * h);
        numeric_dbeta[c] = (loss(x0, gamma, bp) - loss(x0, gamma, bm)) / (2 * h);
      }
      // Central differences in double with h = 1e-6: truncation ~h², rounding ~1e-16·L/h.
      EXPECT_TRUE(all_close("dx vs finite differences", dx, numeric_dx, Tolerance{1e-7, 1e-6}));
      EXPECT_TRUE(all_close("dgamma vs finite differences", dgamma, numeric_dgamma, Tolerance{1e-7, 1e-6}));
      EXPECT_TRUE(all_close("dbeta vs finite differences", dbeta, numeric_dbeta, Tolerance{1e-7, 1e-6}));
    }
}

// ---------------------------------------------------------------- instance norm

TEST(InstanceNorm, TrainingIsGroupNormWithGEqualsCAndRunningStatsFollowPyTorch) {
  for (const Layout layout : {Layout::NCL, Layout::NCHW, Layout::NHWC, Layout::NDHWC}) {
    const Logical g = layout == Layout::NCL     ? Logical{3, 5, {9}}
                      : layout == Layout::NDHWC ? Logical{2, 5, {2, 3, 4}}
                                                : Logical{4, 5, {6, 7}};
    SCOPED_TRACE(normkit::to_string(layout));
    const Data d = make_data(g, 31);
    const Case k{"instance", dense(layout, g), g.c};
    const FastResult group = run_fast(k, d, 1e-5);
    Buffer<float> x(k.arrangement), y(k.arrangement), dy(k.arrangement), dx(k.arrangement);
    x.scatter(d.x);
    dy.scatter(d.dy);
    std::vector<float> mean(g.n * g.c), invstd(g.n * g.c);
    std::vector<float> running_mean(g.c, 0.5f), running_var(g.c, 2.0f);
    int64_t tracked = 4;
    normkit::BatchNormOptions options;
    options.momentum = 0.3;
    normkit::instance_norm_forward_training<float>(x.cview(), y.view(), d.gamma, d.beta,
                                                   {mean, invstd},
                                                   {running_mean, running_var, &tracked}, options);
    EXPECT_TRUE(bitwise_equal("y", y.gather(), group.y));
    EXPECT_TRUE(bitwise_equal("mean", mean, group.mean));
    EXPECT_TRUE(bitwise_equal("invstd", invstd, group.invstd));
    EXPECT_EQ(tracked, 5);
    // PyTorch: running = (1 - m)·running + m·(1/N)·Σ_n stat[n, c], unbiased variance.
    const int64_t S = g.s();
    std::vector<double> expected_mean(g.c), expected_var(g.c);
    for (int64_t c = 0; c < g.c; ++c) {
      double mean_sum = 0, var_sum = 0;
      for (int64_t n = 0; n < g.n; ++n) {
        const float* p = d.x.data() + (n * g.c + c) * S;
        double m = 0, v = 0;
        for (int64_t s = 0; s < S; ++s) m += p[s];
        m /= static_cast<double>(S);
        for (int64_t s = 0; s < S; ++s) v += (p[s] - m) * (p[s] - m);
        mean_sum += m;
        var_sum += v / static_cast<double>(S - 1);
      }
      expected_mean[c] = 0.7 * 0.5 + 0.3 * mean_sum / static_cast<double>(g.n);
      expected_var[c] = 0.7 * 2.0 + 0.3 * var_sum / static_cast<double>(g.n);
    }
    EXPECT_TRUE(all_close("running_mean", running_mean, expected_mean, Tolerance{0, 1e-6}));
    EXPECT_TRUE(all_close("running_var", running_var, expected_var, Tolerance{0, 1e-6}));

    std::vector<float> dgamma(g.c), dbeta(g.c);
    normkit::instance_norm_backward<float>(x.cview(), dy.cview(), dx.view(), d.gamma, mean, invstd,
                                           dgamma, dbeta);
    EXPECT_TRUE(bitwise_equal("dx", dx.gather(), group.dx));
    EXPECT_TRUE(bitwise_equal("dgamma", dgamma, group.dgamma));

    // Inference with the running statistics: per channel.
    normkit::instance_norm_forward_inference<float>(x.cview(), y.view(), d.gamma, d.beta,
                                                    running_mean, running_var, 1e-5);
    const auto ye = y.gather();
    std::vector<double> expected(ye.size());
    for (int64_t i = 0; i < g.numel(); ++i) {
      const int64_t c = g.channel_of(i);
      expected[i] = (d.x[i] - double{running_mean[c]}) / std::sqrt(double{running_var[c]} + 1e-5) *
                        d.gamma[c] + d.beta[c];
    }
    EXPECT_TRUE(all_close("inference y", ye, expected, Tolerance{2e-6, 2e-6}, &g));
  }
}

TEST(InstanceNorm, CumulativeAverageAndDoublePrecision) {
  const Logical g{2, 3, {4, 5}};
  const Data d = make_data(g, 41);
  const std::vector<double> xd = convert<double>(d.x);
  std::vector<double> yd(xd.size()), rm(3, 0.0), rv(3, 1.0);
  int64_t tracked = 1;
  normkit::BatchNormOptions options;
  options.momentum = std::nullopt;  // cumulative: weight 1 / (tracked + 1) = 1/2
  normkit::instance_norm_forward_training<double>(
      TensorView<const double>::contiguous(xd.data(), {2, 3, 20}, Layout::NCL),
      TensorView<double>::contiguous(yd.data(), {2, 3, 20}, Layout::NCL), {}, {}, {},
      {rm, rv, &tracked}, options);
  EXPECT_EQ(tracked, 2);
  for (int64_t c = 0; c < 3; ++c) {
    double mean_sum = 0, var_sum = 0;
    for (int64_t n = 0; n < 2; ++n) {
      const double* p = xd.data() + (n * 3 + c) * 20;
      double m = 0, v = 0;
      for (int s = 0; s < 20; ++s) m += p[s];
      m /= 20;
      for (int s = 0; s < 20; ++s) v += (p[s] - m) * (p[s] - m);
      mean_sum += m;
      var_sum += v / 19;
    }
    EXPECT_NEAR(rm[c], 0.5 * 0.0 + 0.5 * mean_sum / 2, 1e-14);
    EXPECT_NEAR(rv[c], 0.5 * 1.0 + 0.5 * var_sum / 2, 1e-13);
  }
}

TEST(InstanceNorm, NonFiniteInputLeavesRunningStatisticsAlone) {
  const Logical g{2, 3, {4, 4}};
  Data d = make_data(g, 43);
  d.x[20] = std::numeric_limits<float>::infinity();
  Buffer<float> x(dense(Layout::NCHW, g)), y(dense(Layout::NCHW, g));
  x.scatter(d.x);
  std::vector<float> rm(3, 0.25f), rv(3, 1.5f), mean(6, -7.0f), invstd(6, -7.0f);
  int64_t tracked = 3;
  EXPECT_TRUE(throws_error(
      [&] {
        normkit::instance_norm_forward_training<float>(x.cview(), y.view(), {}, {}, {mean, invstd},
                                                       {rm, rv, &tracked});
      },
      normkit::ErrorKind::runtime, {"NaN or infinite"}));
  EXPECT_EQ(rm, std::vector<float>(3, 0.25f));
  EXPECT_EQ(rv, std::vector<float>(3, 1.5f));
  EXPECT_EQ(mean, std::vector<float>(6, -7.0f));
  EXPECT_EQ(tracked, 3);
}

// ---------------------------------------------------------------- errors

TEST(GroupNormErrors, BadArgumentsAreRejectedBeforeAnythingIsWritten) {
  using normkit::ErrorKind;
  const Logical g{2, 6, {3, 3}};
  const Data d = make_data(g, 3);
  Buffer<float> x(dense(Layout::NCHW, g)), y(dense(Layout::NCHW, g)), dy(dense(Layout::NCHW, g)),
      dx(dense(Layout::NCHW, g));
  x.scatter(d.x);
  dy.scatter(d.dy);
  std::vector<float> mean(6, -7.0f), invstd(6, -7.0f), dgamma(6, -7.0f), dbeta(6, -7.0f);
  const std::vector<float> gamma(6, 1.0f), short_gamma(5, 1.0f), stats(6, 1.0f), short_stats(4, 1.0f);
  auto forward = [&](int64_t groups, std::span<const float> gm, std::span<float> m, double eps) {
    return [&, groups, gm, m, eps] {
      normkit::group_norm_forward<float>(x.cview(), y.view(), groups, gm, {}, {m, invstd}, eps);
    };
  };
  EXPECT_TRUE(throws_error(forward(4, gamma, mean, 1e-5), ErrorKind::invalid_argument,
                           {"divisible by num_groups", "num_groups=4", "[2, 6, 3, 3]"}));
  EXPECT_TRUE(throws_error(forward(0, gamma, mean, 1e-5), ErrorKind::invalid_argument,
                           {"num_groups must be positive"}));
  EXPECT_TRUE(throws_error(forward(3, short_gamma, mean, 1e-5), ErrorKind::invalid_argument,
                           {"weight (gamma) should contain 6 elements", "not 5"}));
  std::vector<float> short_mean(5);
  EXPECT_TRUE(throws_error(forward(3, gamma, short_mean, 1e-5), ErrorKind::invalid_argument,
                           {"save_mean should contain 6 elements"}));
  EXPECT_TRUE(throws_error(forward(3, gamma, mean, 0.0), ErrorKind::invalid_argument, {"eps"}));
  EXPECT_TRUE(throws_error(forward(3, gamma, mean, -1.0), ErrorKind::invalid_argument, {"eps"}));
  EXPECT_TRUE(throws_error(forward(3, gamma, mean, std::nan("")), ErrorKind::invalid_argument, {"eps"}));
  // y of another shape.
  Buffer<float> other(dense(Layout::NCHW, Logical{2, 6, {3, 4}}));
  EXPECT_TRUE(throws_error(
      [&] { normkit::group_norm_forward<float>(x.cview(), other.view(), 3, {}, {}, {}); },
      ErrorKind::invalid_argument, {"y: shape"}));
  // Empty tensor.
  EXPECT_TRUE(throws_error(
      [&] {
        auto empty = TensorView<const float>::contiguous(d.x.data(), {0, 6, 3, 3}, Layout::NCHW);
        auto out = TensorView<float>::contiguous(y.storage.data(), {0, 6, 3, 3}, Layout::NCHW);
        normkit::group_norm_forward<float>(empty, out, 3, {}, {}, {});
      },
      ErrorKind::invalid_argument, {"empty tensor"}));
  EXPECT_TRUE(y.padding_is(sentinel<float>(), "y"));
  for (const float v : y.gather()) ASSERT_TRUE(same_bits(v, sentinel<float>())) << "y was written";
  EXPECT_EQ(mean, std::vector<float>(6, -7.0f));

  auto backward = [&](int64_t groups, std::span<const float> m, std::span<float> dg) {
    return [&, groups, m, dg] {
      normkit::group_norm_backward<float>(x.cview(), dy.cview(), dx.view(), groups, gamma, m,
                                          stats, dg, dbeta);
    };
  };
  EXPECT_TRUE(throws_error(backward(4, stats, dgamma), ErrorKind::invalid_argument,
                           {"divisible by num_groups"}));
  EXPECT_TRUE(throws_error(backward(3, short_stats, dgamma), ErrorKind::invalid_argument,
                           {"mean should contain 6 elements", "one per sample and group"}));
  EXPECT_TRUE(throws_error(backward(3, {}, dgamma), ErrorKind::invalid_argument, {"mean should contain"}));
  std::vector<float> short_dgamma(3);
  EXPECT_TRUE(throws_error(backward(3, stats, short_dgamma), ErrorKind::invalid_argument,
                           {"dgamma should contain 6"}));
  for (const float v : dx.gather()) ASSERT_TRUE(same_bits(v, sentinel<float>())) << "dx was written";
  EXPECT_EQ(dgamma, std::vector<float>(6, -7.0f));
  EXPECT_EQ(dbeta, std::vector<float>(6, -7.0f));
}

TEST(InstanceNormErrors, BadArgumentsAreRejectedBeforeAnythingIsWritten) {
  using normkit::ErrorKind;
  const Logical g{2, 3, {1, 1}};
  const Data d = make_data(g, 5);
  Buffer<float> x(dense(Layout::NCHW, g)), y(dense(Layout::NCHW, g));
  x.scatter(d.x);
  std::vector<float> rm(3, 0.0f), rv(3, 1.0f), short_rm(2, 0.0f);
  int64_t tracked = 0;
  EXPECT_TRUE(throws_error(
      [&] {
        normkit::instance_norm_forward_training<float>(x.cview(), y.view(), {}, {}, {},
                                                       {rm, rv, &tracked});
      },
      ErrorKind::invalid_argument, {"more than 1 spatial element", "[2, 3, 1, 1]"}));
  const Logical g2{2, 3, {2, 2}};
  Buffer<float> x2(dense(Layout::NCHW, g2)), y2(dense(Layout::NCHW, g2));
  x2.scatter(make_data(g2, 6).x);
  EXPECT_TRUE(throws_error(
      [&] {
        normkit::instance_norm_forward_training<float>(x2.cview(), y2.view(), {}, {}, {},
                                                       {short_rm, rv, &tracked});
      },
      ErrorKind::invalid_argument, {"running_mean should contain 3"}));
  normkit::BatchNormOptions bad;
  bad.momentum = 1.5;
  EXPECT_TRUE(throws_error(
      [&] {
        normkit::instance_norm_forward_training<float>(x2.cview(), y2.view(), {}, {}, {},
                                                       {rm, rv, &tracked}, bad);
      },
      ErrorKind::invalid_argument, {"momentum"}));
  bad = {};
  bad.eps = 0;
  EXPECT_TRUE(throws_error(
      [&] {
        normkit::instance_norm_forward_training<float>(x2.cview(), y2.view(), {}, {}, {},
                                                       {rm, rv, &tracked}, bad);
      },
      ErrorKind::invalid_argument, {"eps"}));
  for (const float v : y2.gather()) ASSERT_TRUE(same_bits(v, sentinel<float>())) << "y was written";
  EXPECT_EQ(rm, std::vector<float>(3, 0.0f));
  EXPECT_EQ(tracked, 0);
}

}  // namespace
