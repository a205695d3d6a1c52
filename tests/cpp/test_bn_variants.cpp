// Batch Renormalization, Ghost BN and frozen BN (bn_variants.hpp).
//
// Oracles, written here independently of the library's folding of r and d:
// - renorm: the paper's Algorithm 1 evaluated in long double on canonical data;
// - ghost: BN (the double reference API) called on copies of each virtual batch;
// - frozen: forward_inference and batch_norm_backward in frozen mode.
// Gradients: central differences of L = Σ w·y (see test_batch_norm_reference.cpp
// for why 1e-7 is a safe tolerance for these double problems). Renorm's r and d
// are constants for the gradient by definition, so its finite differences hold
// them fixed (or use data where both are clipped, hence locally constant).
#include "test_support.hpp"

namespace {

using namespace normkit_test;
using normkit::BatchNormOptions;
using normkit::ErrorKind;
using normkit::RenormLimits;
using normkit::TensorView;

constexpr double kStep = 1e-5;
constexpr double kGradTolerance = 1e-7;

// Per-channel statistics of canonical data in long double (biased and unbiased variance).
struct ChannelStats {
  std::vector<long double> mean, var, unbiased;
};
ChannelStats stats_of(const Logical& g, const std::vector<double>& x) {
  ChannelStats s;
  const int64_t S = g.s();
  for (int64_t c = 0; c < g.c; ++c) {
    long double sum = 0, m2 = 0;
    for (int64_t n = 0; n < g.n; ++n)
      for (int64_t i = 0; i < S; ++i) sum += x[(n * g.c + c) * S + i];
    const long double mean = sum / g.m();
    for (int64_t n = 0; n < g.n; ++n)
      for (int64_t i = 0; i < S; ++i) {
        const long double e = x[(n * g.c + c) * S + i] - mean;
        m2 += e * e;
      }
    s.mean.push_back(mean);
    s.var.push_back(m2 / g.m());
    s.unbiased.push_back(m2 / (g.m() - 1));
  }
  return s;
}

// ---------------------------------------------------------------- renorm oracle

struct RenormProblem {
  Arrangement arrangement;
  std::vector<double> x, w, gamma, beta, running_mean, running_var;
  double eps = 1e-3, momentum = 0.1;
  RenormLimits limits{1.5, 0.5};

  const Logical& g() const { return arrangement.logical; }
};

// Channel c's running statistics make σ_B/σ ≈ ratio[c] and (μ_B − μ)/σ ≈ shift[c],
// so the test chooses which channels are clipped.
RenormProblem renorm_problem(Arrangement a, uint64_t seed, const std::vector<double>& ratio,
                             const std::vector<double>& shift) {
  RenormProblem p{std::move(a), {}, {}, {}, {}, {}, {}};
  Rng rng(seed);
  const Logical& g = p.g();
  std::vector<double> mean_c, std_c;
  for (int64_t c = 0; c < g.c; ++c) {
    mean_c.push_back(rng.uniform(-2, 2));
    std_c.push_back(rng.uniform(0.5, 1.5));
    p.gamma.push_back(rng.uniform(0.5, 1.5) * (c % 2 ? -1 : 1));
    p.beta.push_back(rng.uniform(-1, 1));
  }
  p.x = convert<double>(channel_data(g, mean_c, std_c, rng));
  for (auto& v : p.x) v += rng.uniform(-1e-3, 1e-3);
  for (size_t i = 0; i < p.x.size(); ++i) p.w.push_back(rng.uniform(-1, 1));
  const ChannelStats s = stats_of(g, p.x);
  for (int64_t c = 0; c < g.c; ++c) {
    const double sigma_b = std::sqrt(static_cast<double>(s.var[c]) + p.eps);
    const double sigma = sigma_b / ratio[c % ratio.size()];
    p.running_var.push_back(sigma * sigma - p.eps);
    p.running_mean.push_back(static_cast<double>(s.mean[c]) - shift[c % shift.size()] * sigma);
  }
  return p;
}

struct RenormOracle {
  std::vector<double> y, mean, invstd, r, d, running_mean, running_var;
};

// Algorithm 1 of the paper, with the running variance updated as BN updates it.
RenormOracle renorm_oracle(const Logical& g, const std::vector<double>& x,
                           const std::vector<double>& gamma, const std::vector<double>& beta,
                           const std::vector<double>& rm, const std::vector<double>& rv,
                           double eps, double momentum, RenormLimits limits) {
  const ChannelStats s = stats_of(g, x);
  RenormOracle o;
  o.y.resize(x.size());
  const int64_t S = g.s();
  for (int64_t c = 0; c < g.c; ++c) {
    const long double sigma_b = std::sqrt(s.var[c] + eps);
    const long double sigma = std::sqrt(static_cast<long double>(rv[c]) + eps);
    const long double r = std::clamp<long double>(sigma_b / sigma, 1 / static_cast<long double>(limits.rmax),
                                                  limits.rmax);
    const long double d = std::clamp<long double>((s.mean[c] - rm[c]) / sigma, -limits.dmax, limits.dmax);
    for (int64_t n = 0; n < g.n; ++n)
      for (int64_t i = 0; i < S; ++i) {
        const int64_t k = (n * g.c + c) * S + i;
        const long double x_hat = (x[k] - s.mean[c]) / sigma_b * r + d;
        o.y[k] = static_cast<double>(gamma[c] * x_hat + beta[c]);
      }
    o.mean.push_back(static_cast<double>(s.mean[c]));
    o.invstd.push_back(static_cast<double>(1 / sigma_b));
    o.r.push_back(static_cast<double>(r));
    o.d.push_back(static_cast<double>(d));
    o.running_mean.push_back(static_cast<double>((1 - momentum) * rm[c] + momentum * s.mean[c]));
    o.running_var.push_back(static_cast<double>((1 - momentum) * rv[c] + momentum * s.unbiased[c]));
  }
  return o;
}

template <class T>
struct RenormResult {
  std::vector<T> y, mean, invstd, r, d, running_mean, running_var, dx, dgamma, dbeta;
  int64_t tracked = 0;
};

// Forward (and backward with dy = w) through the library on the problem's arrangement.
template <class T>
RenormResult<T> run_renorm(const RenormProblem& p, RenormLimits limits, bool with_backward = true) {
  const Logical& g = p.g();
  RenormResult<T> out;
  Buffer<T> xb(p.arrangement), yb(p.arrangement), dyb(p.arrangement), dxb(p.arrangement);
  xb.scatter(p.x);
  dyb.scatter(p.w);
  const auto gamma = convert<T>(p.gamma), beta = convert<T>(p.beta);
  out.mean.resize(g.c);
  out.invstd.resize(g.c);
  out.r.resize(g.c);
  out.d.resize(g.c);
  out.running_mean = convert<T>(p.running_mean);
  out.running_var = convert<T>(p.running_var);
  normkit::batch_renorm_forward_training<T>(
      xb.cview(), yb.view(), gamma, beta, {out.mean, out.invstd, out.r, out.d},
      {out.running_mean, out.running_var, &out.tracked}, limits, {p.eps, p.momentum});
  out.y = yb.gather();
  EXPECT_TRUE(yb.padding_is(sentinel<T>(), "y"));
  if (with_backward) {
    out.dgamma.resize(g.c);
    out.dbeta.resize(g.c);
    normkit::batch_renorm_backward<T>(xb.cview(), dyb.cview(), dxb.view(), gamma, out.mean,
                                      out.invstd, out.r, out.d, out.dgamma, out.dbeta);
    out.dx = dxb.gather();
  }
  return out;
}

struct ArrangementCase {
  const char* name;
  Arrangement arrangement;
};

const auto kArrangements = ::testing::Values(
    ArrangementCase{"NCHW", dense(Layout::NCHW, {3, 4, {3, 5}})},
    ArrangementCase{"NHWC", dense(Layout::NHWC, {3, 4, {3, 5}})},
    ArrangementCase{"NC", dense(Layout::NC, {9, 5, {}})},
    ArrangementCase{"NC_C17", dense(Layout::NC, {33, 17, {}})},
    ArrangementCase{"NCL_outer_padded", outer_padded(Layout::NCL, {4, 3, {7}}, 3)},
    ArrangementCase{"NCHW_channels_last_padded", nchw_channels_last({2, 6, {3, 3}}, 1)},
    ArrangementCase{"NCDHW", dense(Layout::NCDHW, {2, 3, {2, 3, 2}})},
    ArrangementCase{"NC_two_values_per_channel", dense(Layout::NC, {2, 5, {}})});

// Channels cycle through: unclipped, r clipped above, r clipped below, d clipped
// both ways (with rmax = 1.5, dmax = 0.5).
const std::vector<double> kRatios = {1.2, 3.0, 0.25, 0.9, 1.1};
const std::vector<double> kShifts = {0.3, 0.1, -0.2, 2.0, -3.0};

class Renorm : public ::testing::TestWithParam<ArrangementCase> {};

TEST_P(Renorm, ForwardAndRunningStatisticsFollowThePapersAlgorithm) {
  const RenormProblem p = renorm_problem(GetParam().arrangement, seed_of(GetParam().name), kRatios, kShifts);
  const Logical& g = p.g();
  const RenormOracle o = renorm_oracle(g, p.x, p.gamma, p.beta, p.running_mean, p.running_var, p.eps,
                                       p.momentum, p.limits);
  // The cases the data were made for: clipping at each bound, and none.
  bool r_high = false, r_low = false, d_high = false, d_low = false, free = false;
  for (int64_t c = 0; c < g.c; ++c) {
    r_high |= o.r[c] == p.limits.rmax;
    r_low |= o.r[c] == 1 / p.limits.rmax;
    d_high |= o.d[c] == p.limits.dmax;
    d_low |= o.d[c] == -p.limits.dmax;
    free |= o.r[c] < p.limits.rmax && o.r[c] > 1 / p.limits.rmax && std::fabs(o.d[c]) < p.limits.dmax;
  }
  if (g.c >= 5) {
    EXPECT_TRUE(r_high && r_low && d_high && d_low && free);
  }

  const auto exact = run_renorm<double>(p, p.limits, false);
  const Tolerance tight{1e-13, 1e-13};
  EXPECT_TRUE(all_close("y (double)", exact.y, o.y, tight, &g));
  EXPECT_TRUE(all_close("r", exact.r, o.r, tight));
  EXPECT_TRUE(all_close("d", exact.d, o.d, tight));
  EXPECT_TRUE(all_close("save_mean", exact.mean, o.mean, tight));
  EXPECT_TRUE(all_close("save_invstd", exact.invstd, o.invstd, tight));
  EXPECT_TRUE(all_close("running_mean", exact.running_mean, o.running_mean, tight));
  EXPECT_TRUE(all_close("running_var", exact.running_var, o.running_var, tight));
  EXPECT_EQ(exact.tracked, 1);

  // float: y within a few float roundings of terms of size |γ|·(|x̂| + d) + |β| (≲ 10 here).
  const auto fast = run_renorm<float>(p, p.limits, false);
  EXPECT_TRUE(all_close("y (float)", fast.y, o.y, {1e-5, 1e-6}, &g));
  EXPECT_TRUE(all_close("r (float)", fast.r, o.r, {0, 1e-6}));
  EXPECT_TRUE(all_close("running_var (float)", fast.running_var, o.running_var, {0, 1e-6}));
}

// r = 1, d = 0 is BN: the same bits as batch_norm_forward_training and its backward.
template <class T>
void check_renorm_limit_is_batch_norm(const RenormProblem& p) {
  const Logical& g = p.g();
  const auto renorm = run_renorm<T>(p, {1.0, 0.0});
  for (int64_t c = 0; c < g.c; ++c) {
    ASSERT_EQ(renorm.r[c], T(1));
    ASSERT_EQ(renorm.d[c], T(0));
  }
  Buffer<T> xb(p.arrangement), yb(p.arrangement), dyb(p.arrangement), dxb(p.arrangement);
  xb.scatter(p.x);
  dyb.scatter(p.w);
  const auto gamma = convert<T>(p.gamma), beta = convert<T>(p.beta);
  std::vector<T> mean(g.c), invstd(g.c), rm = convert<T>(p.running_mean), rv = convert<T>(p.running_var);
  int64_t tracked = 0;
  normkit::batch_norm_forward_training<T>(xb.cview(), yb.view(), gamma, beta, {mean, invstd},
                                          {rm, rv, &tracked}, {p.eps, p.momentum});
  std::vector<T> dgamma(g.c), dbeta(g.c);
  normkit::batch_norm_backward<T>(xb.cview(), dyb.cview(), dxb.view(), gamma, mean, invstd, dgamma,
                                  dbeta);
  EXPECT_TRUE(bitwise_equal("y", renorm.y, yb.gather()));
  EXPECT_TRUE(bitwise_equal("save_mean", renorm.mean, mean));
  EXPECT_TRUE(bitwise_equal("save_invstd", renorm.invstd, invstd));
  EXPECT_TRUE(bitwise_equal("running_mean", renorm.running_mean, rm));
  EXPECT_TRUE(bitwise_equal("running_var", renorm.running_var, rv));
  EXPECT_TRUE(bitwise_equal("dx", renorm.dx, dxb.gather()));
  EXPECT_TRUE(bitwise_equal("dgamma", renorm.dgamma, dgamma));
  EXPECT_TRUE(bitwise_equal("dbeta", renorm.dbeta, dbeta));
}

TEST_P(Renorm, LimitsOneAndZeroAreBatchNormBitForBit) {
  const RenormProblem p = renorm_problem(GetParam().arrangement, seed_of(GetParam().name), kRatios, kShifts);
  {
    SCOPED_TRACE("float");
    check_renorm_limit_is_batch_norm<float>(p);
  }
  {
    SCOPED_TRACE("double");
    check_renorm_limit_is_batch_norm<double>(p);
  }
}

// The loss with r and d fixed at the values of the unperturbed batch: what the
// paper's stop_gradient differentiates.
double renorm_loss_fixed_rd(const RenormProblem& p, const std::vector<double>& x,
                            const std::vector<double>& gamma, const std::vector<double>& beta,
                            const std::vector<double>& r, const std::vector<double>& d) {
  const Logical& g = p.g();
  const ChannelStats s = stats_of(g, x);
  const int64_t S = g.s();
  long double loss = 0;
  for (int64_t n = 0; n < g.n; ++n)
    for (int64_t c = 0; c < g.c; ++c)
      for (int64_t i = 0; i < S; ++i) {
        const int64_t k = (n * g.c + c) * S + i;
        const long double x_hat = (x[k] - s.mean[c]) / std::sqrt(s.var[c] + p.eps) * r[c] + d[c];
        loss += p.w[k] * (gamma[c] * x_hat + beta[c]);
      }
  return static_cast<double>(loss);
}

struct Numeric {
  std::vector<double> dx, dgamma, dbeta;
};
template <class Loss>
Numeric central_differences(const RenormProblem& p, Loss&& loss) {
  Numeric out;
  auto central = [&](auto&& at) { return (at(kStep) - at(-kStep)) / (2 * kStep); };
  for (size_t i = 0; i < p.x.size(); ++i)
    out.dx.push_back(central([&](double h) {
      auto xs = p.x;
      xs[i] += h;
      return loss(xs, p.gamma, p.beta);
    }));
  for (size_t c = 0; c < p.gamma.size(); ++c) {
    out.dgamma.push_back(central([&](double h) {
      auto gm = p.gamma;
      gm[c] += h;
      return loss(p.x, gm, p.beta);
    }));
    out.dbeta.push_back(central([&](double h) {
      auto bt = p.beta;
      bt[c] += h;
      return loss(p.x, p.gamma, bt);
    }));
  }
  return out;
}

TEST_P(Renorm, BackwardMatchesFiniteDifferencesWithRAndDHeldConstant) {
  const RenormProblem p = renorm_problem(GetParam().arrangement, seed_of(GetParam().name), kRatios, kShifts);
  const auto analytic = run_renorm<double>(p, p.limits);
  const Numeric numeric = central_differences(p, [&](const auto& x, const auto& gm, const auto& bt) {
    return renorm_loss_fixed_rd(p, x, gm, bt, analytic.r, analytic.d);
  });
  const Tolerance tol{kGradTolerance, kGradTolerance};
  EXPECT_TRUE(all_close("dx", analytic.dx, numeric.dx, tol, &p.g()));
  EXPECT_TRUE(all_close("dgamma", analytic.dgamma, numeric.dgamma, tol));
  EXPECT_TRUE(all_close("dbeta", analytic.dbeta, numeric.dbeta, tol));

  // float backward against the double one: terms of unit size, γ·r up to 1.5·1.5.
  const auto fast = run_renorm<float>(p, p.limits);
  EXPECT_TRUE(all_close("dx (float)", fast.dx, analytic.dx, {2e-5, 1e-5}, &p.g()));
  std::vector<double> sum_scale;
  for (int64_t c = 0; c < p.g().c; ++c) sum_scale.push_back(static_cast<double>(p.g().m()) * 4);
  EXPECT_TRUE(all_close("dgamma (float)", fast.dgamma, analytic.dgamma, {1e-6, 1e-6}, nullptr, &sum_scale));
  EXPECT_TRUE(all_close("dbeta (float)", fast.dbeta, analytic.dbeta, {1e-6, 1e-6}, nullptr, &sum_scale));
}

// Where every r and d is clipped they do not move with x, so the library's own
// forward is differentiable and its gradient is the backward's.
TEST_P(Renorm, WhenEveryRAndDIsClippedTheForwardsOwnGradientIsTheBackward) {
  const RenormProblem p = renorm_problem(GetParam().arrangement, seed_of(GetParam().name),
                                         {4.0, 0.2}, {3.0, -3.0});
  const auto analytic = run_renorm<double>(p, p.limits);
  for (int64_t c = 0; c < p.g().c; ++c) {
    ASSERT_TRUE(analytic.r[c] == p.limits.rmax || analytic.r[c] == 1 / p.limits.rmax) << c;
    ASSERT_EQ(std::fabs(analytic.d[c]), p.limits.dmax) << c;
  }
  const Numeric numeric = central_differences(p, [&](const auto& x, const auto& gm, const auto& bt) {
    RenormProblem q = p;
    q.x = x;
    q.gamma = gm;
    q.beta = bt;
    const auto y = run_renorm<double>(q, p.limits, false).y;
    long double loss = 0;
    for (size_t i = 0; i < y.size(); ++i) loss += static_cast<long double>(p.w[i]) * y[i];
    return static_cast<double>(loss);
  });
  const Tolerance tol{kGradTolerance, kGradTolerance};
  EXPECT_TRUE(all_close("dx", analytic.dx, numeric.dx, tol, &p.g()));
  EXPECT_TRUE(all_close("dgamma", analytic.dgamma, numeric.dgamma, tol));
  EXPECT_TRUE(all_close("dbeta", analytic.dbeta, numeric.dbeta, tol));
}

INSTANTIATE_TEST_SUITE_P(Variants, Renorm, kArrangements, ByName());

TEST(RenormSchedule, PaperAndLinearRamps) {
  const auto paper = normkit::BatchRenormSchedule::paper();
  auto expect = [](RenormLimits got, double rmax, double dmax, const char* what) {
    EXPECT_DOUBLE_EQ(got.rmax, rmax) << what;
    EXPECT_DOUBLE_EQ(got.dmax, dmax) << what;
  };
  expect(paper.at(0), 1, 0, "paper, step 0");
  expect(paper.at(4999), 1, 0, "paper, step 4999");
  expect(paper.at(5000), 1, 0, "paper, step 5000 (ramps start)");
  expect(paper.at(15000), 1 + 2 * 10000.0 / 35000, 5 * 10000.0 / 20000, "paper, step 15000");
  expect(paper.at(25000), 1 + 2 * 20000.0 / 35000, 5, "paper, dmax reaches 5 at 25k");
  expect(paper.at(40000), 3, 5, "paper, rmax reaches 3 at 40k");
  expect(paper.at(1000000), 3, 5, "paper, later");
  const auto linear = normkit::BatchRenormSchedule::linear(100, 2.0, 4.0);
  expect(linear.at(0), 1, 0, "linear, step 0");
  expect(linear.at(50), 1.5, 2, "linear, half way");
  expect(linear.at(100), 2, 4, "linear, end");
  expect(normkit::BatchRenormSchedule::linear(0).at(0), 3, 5, "no warm-up");
  EXPECT_TRUE(throws_error([] { normkit::BatchRenormSchedule{0.5, 5}.at(0); },
                           ErrorKind::invalid_argument, {"rmax", "0.5"}));
  EXPECT_TRUE(throws_error([] { normkit::BatchRenormSchedule{3, -1}.at(0); },
                           ErrorKind::invalid_argument, {"dmax", "-1"}));
  EXPECT_TRUE(throws_error([] { normkit::BatchRenormSchedule::linear(-5).at(0); },
                           ErrorKind::invalid_argument, {"step counts"}));
  EXPECT_TRUE(throws_error([&] { paper.at(-1); }, ErrorKind::invalid_argument, {"step -1"}));
}

// ---------------------------------------------------------------- ghost BN

struct GhostCase {
  const char* name;
  Arrangement arrangement;
  int64_t virtual_batch_size;
};

// The canonical values of samples [first, first + count).
std::vector<double> samples(const Logical& g, const std::vector<double>& x, int64_t first, int64_t count) {
  const int64_t per = g.c * g.s();
  return {x.begin() + first * per, x.begin() + (first + count) * per};
}

struct GhostOracle {
  std::vector<double> y, mean, invstd, running_mean, running_var, dx, dgamma, dbeta;
  int64_t tracked = 0;
};

// BN (double reference API) on a dense copy of each virtual batch, running
// statistics carried from one to the next.
GhostOracle ghost_oracle(const Logical& g, const std::vector<double>& x, const std::vector<double>& w,
                         const std::vector<double>& gamma, const std::vector<double>& beta,
                         std::vector<double> rm, std::vector<double> rv, int64_t size,
                         const BatchNormOptions& options) {
  GhostOracle o;
  o.dgamma.assign(g.c, 0.0);
  o.dbeta.assign(g.c, 0.0);
  for (int64_t first = 0; first < g.n; first += size) {
    const int64_t count = std::min(size, g.n - first);
    Logical chunk = g;
    chunk.n = count;
    auto xs = samples(g, x, first, count), ws = samples(g, w, first, count);
    std::vector<double> y(xs.size()), dx(xs.size()), mean(g.c), invstd(g.c), dg(g.c), db(g.c);
    normkit::batch_norm_forward_training<double>(canonical_view(xs.data(), chunk),
                                                 canonical_view(y.data(), chunk), gamma, beta,
                                                 {mean, invstd}, {rm, rv, &o.tracked}, options);
    normkit::batch_norm_backward<double>(canonical_view(xs.data(), chunk), canonical_view(ws.data(), chunk),
                                         canonical_view(dx.data(), chunk), gamma, mean, invstd, dg, db);
    o.y.insert(o.y.end(), y.begin(), y.end());
    o.dx.insert(o.dx.end(), dx.begin(), dx.end());
    o.mean.insert(o.mean.end(), mean.begin(), mean.end());
    o.invstd.insert(o.invstd.end(), invstd.begin(), invstd.end());
    for (int64_t c = 0; c < g.c; ++c) {
      o.dgamma[c] += dg[c];
      o.dbeta[c] += db[c];
    }
  }
  o.running_mean = rm;
  o.running_var = rv;
  return o;
}

template <class T>
struct GhostResult {
  std::vector<T> y, mean, invstd, running_mean, running_var, dx, dgamma, dbeta;
  int64_t tracked = 0;
};

struct GhostProblem {
  Arrangement arrangement;
  int64_t size;
  std::vector<double> x, w, gamma, beta, running_mean, running_var;
  BatchNormOptions options{1e-3, 0.2};
  const Logical& g() const { return arrangement.logical; }
};

GhostProblem ghost_problem(const GhostCase& k) {
  GhostProblem p{k.arrangement, k.virtual_batch_size, {}, {}, {}, {}, {}, {}};
  Rng rng(seed_of(k.name));
  const Logical& g = p.g();
  std::vector<double> mean_c, std_c;
  for (int64_t c = 0; c < g.c; ++c) {
    mean_c.push_back(rng.uniform(-2, 2));
    std_c.push_back(rng.uniform(0.5, 1.5));
    p.gamma.push_back(rng.uniform(0.5, 1.5) * (c % 2 ? -1 : 1));
    p.beta.push_back(rng.uniform(-1, 1));
    p.running_mean.push_back(rng.uniform(-1, 1));
    p.running_var.push_back(rng.uniform(0.5, 2));
  }
  p.x = convert<double>(channel_data(g, mean_c, std_c, rng));
  // Virtual batches with different statistics, as in a batch that is not shuffled.
  const int64_t per = g.c * g.s();
  for (size_t i = 0; i < p.x.size(); ++i) p.x[i] += 0.5 * static_cast<double>((static_cast<int64_t>(i) / per) % 3);
  for (size_t i = 0; i < p.x.size(); ++i) p.w.push_back(rng.uniform(-1, 1));
  return p;
}

template <class T>
GhostResult<T> run_ghost(const GhostProblem& p, bool with_backward = true) {
  const Logical& g = p.g();
  const int64_t ghosts = normkit::ghost_batch_count(g.n, p.size);
  GhostResult<T> out;
  Buffer<T> xb(p.arrangement), yb(p.arrangement), dyb(p.arrangement), dxb(p.arrangement);
  xb.scatter(p.x);
  dyb.scatter(p.w);
  const auto gamma = convert<T>(p.gamma), beta = convert<T>(p.beta);
  out.mean.resize(ghosts * g.c);
  out.invstd.resize(ghosts * g.c);
  out.running_mean = convert<T>(p.running_mean);
  out.running_var = convert<T>(p.running_var);
  normkit::ghost_batch_norm_forward_training<T>(xb.cview(), yb.view(), gamma, beta, p.size,
                                                {out.mean, out.invstd},
                                                {out.running_mean, out.running_var, &out.tracked},
                                                p.options);
  out.y = yb.gather();
  EXPECT_TRUE(yb.padding_is(sentinel<T>(), "y"));
  if (with_backward) {
    out.dgamma.resize(g.c);
    out.dbeta.resize(g.c);
    normkit::ghost_batch_norm_backward<T>(xb.cview(), dyb.cview(), dxb.view(), gamma, p.size,
                                          out.mean, out.invstd, out.dgamma, out.dbeta);
    out.dx = dxb.gather();
    EXPECT_TRUE(dxb.padding_is(sentinel<T>(), "dx"));
  }
  return out;
}

class Ghost : public ::testing::TestWithParam<GhostCase> {};

TEST_P(Ghost, EqualsBatchNormAppliedToEachVirtualBatchInTurn) {
  const GhostProblem p = ghost_problem(GetParam());
  const Logical& g = p.g();
  const GhostOracle o = ghost_oracle(g, p.x, p.w, p.gamma, p.beta, p.running_mean, p.running_var,
                                     p.size, p.options);
  const auto exact = run_ghost<double>(p);
  const Tolerance tight{1e-13, 1e-13};
  EXPECT_TRUE(all_close("y", exact.y, o.y, tight, &g));
  EXPECT_TRUE(all_close("save_mean", exact.mean, o.mean, tight));
  EXPECT_TRUE(all_close("save_invstd", exact.invstd, o.invstd, tight));
  EXPECT_TRUE(all_close("running_mean", exact.running_mean, o.running_mean, tight));
  EXPECT_TRUE(all_close("running_var", exact.running_var, o.running_var, tight));
  EXPECT_EQ(exact.tracked, normkit::ghost_batch_count(g.n, p.size));
  EXPECT_EQ(o.tracked, exact.tracked);
  EXPECT_TRUE(all_close("dx", exact.dx, o.dx, tight, &g));
  EXPECT_TRUE(all_close("dgamma", exact.dgamma, o.dgamma, tight));
  EXPECT_TRUE(all_close("dbeta", exact.dbeta, o.dbeta, tight));

  // float: the fast kernels on slices, held to the BN suites' bounds.
  const auto fast = run_ghost<float>(p);
  EXPECT_TRUE(all_close("y (float)", fast.y, o.y, {4e-6, 2e-6}, &g));
  EXPECT_TRUE(all_close("running_var (float)", fast.running_var, o.running_var, {0, 1e-6}));
  EXPECT_TRUE(all_close("dx (float)", fast.dx, o.dx, {2e-5, 1e-5}, &g));
  std::vector<double> sum_scale(g.c, static_cast<double>(g.m()) * 2);
  EXPECT_TRUE(all_close("dgamma (float)", fast.dgamma, o.dgamma, {1e-6, 1e-6}, nullptr, &sum_scale));
}

// The statistics of each virtual batch depend on its samples only: central
// differences of the library's own forward.
TEST_P(Ghost, BackwardMatchesFiniteDifferences) {
  const GhostProblem p = ghost_problem(GetParam());
  const auto analytic = run_ghost<double>(p);
  auto loss = [&](const std::vector<double>& x, const std::vector<double>& gm, const std::vector<double>& bt) {
    GhostProblem q = p;
    q.x = x;
    q.gamma = gm;
    q.beta = bt;
    const auto y = run_ghost<double>(q, false).y;
    long double sum = 0;
    for (size_t i = 0; i < y.size(); ++i) sum += static_cast<long double>(p.w[i]) * y[i];
    return static_cast<double>(sum);
  };
  RenormProblem shim;  // central_differences reads x, gamma and beta only
  shim.x = p.x;
  shim.gamma = p.gamma;
  shim.beta = p.beta;
  const Numeric numeric = central_differences(shim, loss);
  const Tolerance tol{kGradTolerance, kGradTolerance};
  EXPECT_TRUE(all_close("dx", analytic.dx, numeric.dx, tol, &p.g()));
  EXPECT_TRUE(all_close("dgamma", analytic.dgamma, numeric.dgamma, tol));
  EXPECT_TRUE(all_close("dbeta", analytic.dbeta, numeric.dbeta, tol));
}

INSTANTIATE_TEST_SUITE_P(
    Variants, Ghost,
    ::testing::Values(GhostCase{"NCHW_even", dense(Layout::NCHW, {6, 3, {2, 3}}), 2},
                      GhostCase{"NCHW_last_smaller", dense(Layout::NCHW, {7, 3, {2, 2}}), 3},
                      GhostCase{"NCHW_one_sample_each", dense(Layout::NCHW, {3, 2, {2, 3}}), 1},
                      GhostCase{"NHWC_last_smaller", dense(Layout::NHWC, {5, 4, {2, 2}}), 2},
                      GhostCase{"NC_last_smaller", dense(Layout::NC, {11, 5, {}}), 4},
                      GhostCase{"NC_C17", dense(Layout::NC, {12, 17, {}}), 6},
                      GhostCase{"NC_size_above_batch", dense(Layout::NC, {6, 3, {}}), 32},
                      GhostCase{"NCL_outer_padded", outer_padded(Layout::NCL, {5, 3, {4}}, 2), 2},
                      GhostCase{"NCHW_channels_last_padded", nchw_channels_last({5, 6, {2, 3}}, 1), 2}),
    ByName());

// One virtual batch holding the whole batch is BN, bit for bit.
TEST(GhostSingle, OneVirtualBatchIsBatchNormBitForBit) {
  GhostProblem p = ghost_problem({"single", dense(Layout::NCHW, {4, 5, {3, 7}}), 4});
  const auto ghost = run_ghost<float>(p);
  const Logical& g = p.g();
  Buffer<float> xb(p.arrangement), yb(p.arrangement), dyb(p.arrangement), dxb(p.arrangement);
  xb.scatter(p.x);
  dyb.scatter(p.w);
  const auto gamma = convert<float>(p.gamma), beta = convert<float>(p.beta);
  std::vector<float> mean(g.c), invstd(g.c), rm = convert<float>(p.running_mean),
                                             rv = convert<float>(p.running_var), dg(g.c), db(g.c);
  int64_t tracked = 0;
  normkit::batch_norm_forward_training<float>(xb.cview(), yb.view(), gamma, beta, {mean, invstd},
                                              {rm, rv, &tracked}, p.options);
  normkit::batch_norm_backward<float>(xb.cview(), dyb.cview(), dxb.view(), gamma, mean, invstd, dg, db);
  EXPECT_TRUE(bitwise_equal("y", ghost.y, yb.gather()));
  EXPECT_TRUE(bitwise_equal("running_var", ghost.running_var, rv));
  EXPECT_TRUE(bitwise_equal("dx", ghost.dx, dxb.gather()));
  EXPECT_TRUE(bitwise_equal("dgamma", ghost.dgamma, dg));
}

TEST(GhostCount, CeilingOfBatchOverSize) {
  EXPECT_EQ(normkit::ghost_batch_count(9, 4), 3);
  EXPECT_EQ(normkit::ghost_batch_count(8, 4), 2);
  EXPECT_EQ(normkit::ghost_batch_count(3, 32), 1);
  EXPECT_EQ(normkit::ghost_batch_count(0, 4), 0);
  EXPECT_TRUE(throws_error([] { normkit::ghost_batch_count(8, 0); }, ErrorKind::invalid_argument,
                           {"virtual_batch_size", "0"}));
}

// y may alias x: the same bits as out of place, for both variants.
TEST(VariantsInPlace, SameBitsAsOutOfPlace) {
  for (const auto& a : {dense(Layout::NCHW, {6, 5, {3, 4}}), dense(Layout::NHWC, {6, 5, {3, 4}})}) {
    SCOPED_TRACE(a.describe());
    const RenormProblem p = renorm_problem(a, 21, kRatios, kShifts);
    const auto gamma = convert<float>(p.gamma), beta = convert<float>(p.beta);
    const auto out_of_place = run_renorm<float>(p, p.limits, false);
    Buffer<float> xb(a);
    xb.scatter(p.x);
    std::vector<float> rm = convert<float>(p.running_mean), rv = convert<float>(p.running_var);
    normkit::batch_renorm_forward_training<float>(xb.cview(), xb.view(), gamma, beta, {}, {rm, rv},
                                                  p.limits, {p.eps, p.momentum});
    EXPECT_TRUE(bitwise_equal("renorm y", xb.gather(), out_of_place.y));

    const GhostProblem q{a, 4, p.x, p.w, p.gamma, p.beta, p.running_mean, p.running_var};
    const auto ghost = run_ghost<float>(q, false);
    Buffer<float> gb(a);
    gb.scatter(p.x);
    rm = convert<float>(p.running_mean);
    rv = convert<float>(p.running_var);
    normkit::ghost_batch_norm_forward_training<float>(gb.cview(), gb.view(), gamma, beta, 4, {},
                                                      {rm, rv}, q.options);
    EXPECT_TRUE(bitwise_equal("ghost y", gb.gather(), ghost.y));
    EXPECT_TRUE(bitwise_equal("ghost running_var", rv, ghost.running_var));
  }
}

// ---------------------------------------------------------------- frozen

TEST(Frozen, IsInferenceForwardAndFrozenBackward) {
  for (const Layout layout : {Layout::NCHW, Layout::NHWC, Layout::NC}) {
    SCOPED_TRACE(std::string(normkit::to_string(layout)));
    const Logical g{4, 3, spatial_rank(layout) ? std::vector<int64_t>(spatial_rank(layout), 3)
                                               : std::vector<int64_t>{}};
    RenormProblem p = renorm_problem(dense(layout, g), 17, {1.3, 0.7}, {0.4, -0.2});
    const std::vector<double> rm = p.running_mean, rv = p.running_var;
    // dx, dγ, dβ of L = Σ w·forward_inference(x) by central differences: the statistics are constants.
    auto loss = [&](const std::vector<double>& x, const std::vector<double>& gm, const std::vector<double>& bt) {
      Buffer<double> xb(p.arrangement), yb(p.arrangement);
      xb.scatter(x);
      normkit::batch_norm_forward_inference<double>(xb.cview(), yb.view(), gm, bt, rm, rv, p.eps);
      const auto y = yb.gather();
      long double sum = 0;
      for (size_t i = 0; i < y.size(); ++i) sum += static_cast<long double>(p.w[i]) * y[i];
      return static_cast<double>(sum);
    };
    const Numeric numeric = central_differences(p, loss);
    Buffer<double> xb(p.arrangement), dyb(p.arrangement), dxb(p.arrangement);
    xb.scatter(p.x);
    dyb.scatter(p.w);
    std::vector<double> dg(g.c), db(g.c);
    normkit::frozen_batch_norm_backward<double>(xb.cview(), dyb.cview(), dxb.view(), p.gamma, rm, rv,
                                                p.eps, dg, db);
    const Tolerance tol{kGradTolerance, kGradTolerance};
    EXPECT_TRUE(all_close("dx", dxb.gather(), numeric.dx, tol, &g));
    EXPECT_TRUE(all_close("dgamma", dg, numeric.dgamma, tol));
    EXPECT_TRUE(all_close("dbeta", db, numeric.dbeta, tol));

    // float: batch_norm_backward in frozen mode with batch_norm_invstd, bit for bit.
    Buffer<float> xf(p.arrangement), dyf(p.arrangement), dxf(p.arrangement), dx_bn(p.arrangement);
    xf.scatter(p.x);
    dyf.scatter(p.w);
    const auto gamma = convert<float>(p.gamma), rmf = convert<float>(rm), rvf = convert<float>(rv);
    std::vector<float> dgf(g.c), dbf(g.c), invstd(g.c), dg_bn(g.c), db_bn(g.c);
    normkit::frozen_batch_norm_backward<float>(xf.cview(), dyf.cview(), dxf.view(), gamma, rmf, rvf,
                                               p.eps, dgf, dbf);
    normkit::batch_norm_invstd<float>(rvf, p.eps, invstd);
    normkit::batch_norm_backward<float>(xf.cview(), dyf.cview(), dx_bn.view(), gamma, rmf, invstd,
                                        dg_bn, db_bn, normkit::BackwardMode::frozen);
    EXPECT_TRUE(bitwise_equal("dx", dxf.storage, dx_bn.storage));
    EXPECT_TRUE(bitwise_equal("dgamma", dgf, dg_bn));
    EXPECT_TRUE(bitwise_equal("dbeta", dbf, db_bn));
  }
}

// ---------------------------------------------------------------- determinism

TEST(VariantsDeterminism, SameBitsForAnyThreadCount) {
  for (const auto& a : {dense(Layout::NCHW, {16, 6, {40, 40}}), dense(Layout::NHWC, {16, 24, {20, 20}}),
                        dense(Layout::NC, {4096, 19, {}})}) {
    SCOPED_TRACE(a.describe());
    RenormProblem rp = renorm_problem(a, 5, kRatios, kShifts);
    rp.limits = {2.0, 1.0};
    GhostProblem gp{a, 6, rp.x, rp.w, rp.gamma, rp.beta, rp.running_mean, rp.running_var};
    RenormResult<float> renorm_one;
    GhostResult<float> ghost_one;
    {
      ThreadCount threads(1);
      renorm_one = run_renorm<float>(rp, rp.limits);
      ghost_one = run_ghost<float>(gp);
    }
    for (const int n : {2, 3}) {
      ThreadCount threads(n);
      const auto renorm = run_renorm<float>(rp, rp.limits);
      const auto ghost = run_ghost<float>(gp);
      EXPECT_TRUE(bitwise_equal("renorm y", renorm.y, renorm_one.y));
      EXPECT_TRUE(bitwise_equal("renorm running_var", renorm.running_var, renorm_one.running_var));
      EXPECT_TRUE(bitwise_equal("renorm dx", renorm.dx, renorm_one.dx));
      EXPECT_TRUE(bitwise_equal("renorm dgamma", renorm.dgamma, renorm_one.dgamma));
      EXPECT_TRUE(bitwise_equal("ghost y", ghost.y, ghost_one.y));
      EXPECT_TRUE(bitwise_equal("ghost running_var", ghost.running_var, ghost_one.running_var));
      EXPECT_TRUE(bitwise_equal("ghost dx", ghost.dx, ghost_one.dx));
      EXPECT_TRUE(bitwise_equal("ghost dgamma", ghost.dgamma, ghost_one.dgamma));
    }
  }
}

// ---------------------------------------------------------------- errors

// Every rejected call leaves y, saved and running statistics and the counter as they were.
TEST(VariantsErrors, RenormRejectsBadArgumentsAndChangesNothing) {
  const Logical g{4, 3, {5}};
  const Arrangement a = dense(Layout::NCL, g);
  Rng rng(8);
  auto x = channel_data(g, {0, 1, 2}, {1, 1, 1}, rng);
  std::vector<float> gamma(3, 1.0f), beta(3, 0.0f), y(x.size(), -7.0f), mean(3, -7.0f),
      invstd(3, -7.0f), r(3, -7.0f), d(3, -7.0f), rm(3, 0.5f), rv(3, 2.0f);
  int64_t tracked = 4;
  const auto y0 = y, rm0 = rm, rv0 = rv, r0 = r;
  auto xv = [&] { return canonical_view<const float>(x.data(), g); };
  auto yv = [&] { return canonical_view<float>(y.data(), g); };
  auto call = [&](RenormLimits limits, normkit::RunningStats<float> running, std::span<float> save_r,
                  normkit::TensorView<const float> xs) {
    normkit::batch_renorm_forward_training<float>(xs, yv(), gamma, beta, {mean, invstd, save_r, d},
                                                  running, limits);
  };
  const normkit::RunningStats<float> good{rm, rv, &tracked};
  auto unchanged = [&] {
    EXPECT_EQ(y, y0);
    EXPECT_EQ(rm, rm0);
    EXPECT_EQ(rv, rv0);
    EXPECT_EQ(r, r0);
    EXPECT_EQ(tracked, 4);
  };
  EXPECT_TRUE(throws_error([&] { call({0.5, 1}, good, r, xv()); }, ErrorKind::invalid_argument, {"rmax", "0.5"}));
  unchanged();
  EXPECT_TRUE(throws_error([&] { call({NAN, 1}, good, r, xv()); }, ErrorKind::invalid_argument, {"rmax"}));
  EXPECT_TRUE(throws_error([&] { call({2, -0.5}, good, r, xv()); }, ErrorKind::invalid_argument, {"dmax", "-0.5"}));
  EXPECT_TRUE(throws_error([&] { call({2, 1}, {}, r, xv()); }, ErrorKind::invalid_argument, {"running_mean and running_var are required"}));
  std::vector<float> short_rm(2, 0.0f);
  EXPECT_TRUE(throws_error([&] { call({2, 1}, {short_rm, rv, &tracked}, r, xv()); },
                           ErrorKind::invalid_argument, {"running_mean", "3"}));
  std::vector<float> bad_rv = {1.0f, -1.0f, 1.0f};
  EXPECT_TRUE(throws_error([&] { call({2, 1}, {rm, bad_rv, &tracked}, r, xv()); },
                           ErrorKind::invalid_argument, {"channel 1", "running_var + eps"}));
  std::vector<float> short_r(2);
  EXPECT_TRUE(throws_error([&] { call({2, 1}, good, short_r, xv()); }, ErrorKind::invalid_argument, {"save_r", "3"}));
  std::vector<float> single(3, 1.0f);
  EXPECT_TRUE(throws_error(
      [&] {
        normkit::batch_renorm_forward_training<float>(
            TensorView<const float>::contiguous(single.data(), {1, 3}, Layout::NC),
            TensorView<float>::contiguous(y.data(), {1, 3}, Layout::NC), gamma, beta, {}, good, {2, 1});
      },
      ErrorKind::invalid_argument, {"more than 1 value per channel"}));
  EXPECT_TRUE(throws_error(
      [&] {
        normkit::batch_renorm_forward_training<float>(
            xv(), TensorView<float>::contiguous(y.data(), {4, 3, 4}, Layout::NCL), gamma, beta, {},
            good, {2, 1});
      },
      ErrorKind::invalid_argument, {"y: shape"}));
  unchanged();
  x[7] = NAN;
  EXPECT_TRUE(throws_error([&] { call({2, 1}, good, r, xv()); }, ErrorKind::runtime, {"NaN"}));
  unchanged();  // nothing written, y included

  x[7] = 0.0f;
  std::vector<float> dx(x.size()), dg(3), db(3);
  EXPECT_TRUE(throws_error(
      [&] {
        normkit::batch_renorm_backward<float>(xv(), xv(), canonical_view<float>(dx.data(), g), gamma,
                                              mean, invstd, short_r, d, dg, db);
      },
      ErrorKind::invalid_argument, {"r should contain 3"}));
}

TEST(VariantsErrors, GhostRejectsBadArgumentsAndChangesNothing) {
  const Logical g{5, 3, {}};
  Rng rng(9);
  auto x = channel_data(g, {0, 1, 2}, {1, 1, 1}, rng);
  std::vector<float> y(x.size(), -7.0f), mean(9, -7.0f), invstd(9, -7.0f), rm(3, 0.5f), rv(3, 2.0f);
  int64_t tracked = 4;
  const auto y0 = y, mean0 = mean, rm0 = rm, rv0 = rv;
  auto xv = [&] { return canonical_view<const float>(x.data(), g); };
  auto yv = [&] { return canonical_view<float>(y.data(), g); };
  auto call = [&](int64_t size, std::span<float> save_mean, std::span<float> save_invstd) {
    normkit::ghost_batch_norm_forward_training<float>(xv(), yv(), {}, {}, size, {save_mean, save_invstd},
                                                      {rm, rv, &tracked});
  };
  auto unchanged = [&](bool y_too) {
    if (y_too) {
      EXPECT_EQ(y, y0);
    }
    EXPECT_EQ(mean, mean0);
    EXPECT_EQ(rm, rm0);
    EXPECT_EQ(rv, rv0);
    EXPECT_EQ(tracked, 4);
  };
  EXPECT_TRUE(throws_error([&] { call(0, mean, invstd); }, ErrorKind::invalid_argument, {"virtual_batch_size", "0"}));
  EXPECT_TRUE(throws_error([&] { call(-3, mean, invstd); }, ErrorKind::invalid_argument, {"virtual_batch_size", "-3"}));
  // 5 samples in virtual batches of 2: the last holds one value per channel.
  EXPECT_TRUE(throws_error([&] { call(2, mean, invstd); }, ErrorKind::invalid_argument,
                           {"more than 1 value per channel", "virtual_batch_size 2"}));
  std::vector<float> short_mean(3);
  EXPECT_TRUE(throws_error([&] { call(3, short_mean, invstd); }, ErrorKind::invalid_argument,
                           {"save_mean", "6", "virtual batches"}));
  unchanged(true);
  // NaN in the second virtual batch: the first was normalized, but no state changed.
  x[3 * 3 + 1] = NAN;
  std::vector<float> mean6(6, -7.0f), invstd6(6, -7.0f);
  const auto mean60 = mean6;
  EXPECT_TRUE(throws_error([&] { call(3, mean6, invstd6); }, ErrorKind::runtime, {"NaN"}));
  EXPECT_EQ(mean6, mean60);
  EXPECT_EQ(invstd6, mean60);
  unchanged(false);

  x[3 * 3 + 1] = 0.0f;
  std::vector<float> dx(x.size()), dg(3), db(3), dy_short(12);
  EXPECT_TRUE(throws_error(
      [&] {
        normkit::ghost_batch_norm_backward<float>(
            xv(), TensorView<const float>::contiguous(dy_short.data(), {4, 3}, Layout::NC),
            canonical_view<float>(dx.data(), g), {}, 3, mean6, mean6, dg, db);
      },
      ErrorKind::invalid_argument, {"dy: shape"}));
  EXPECT_TRUE(throws_error(
      [&] {
        normkit::ghost_batch_norm_backward<float>(xv(), xv(), canonical_view<float>(dx.data(), g), {},
                                                  3, short_mean, mean6, dg, db);
      },
      ErrorKind::invalid_argument, {"mean should contain 6"}));
}

}  // namespace
