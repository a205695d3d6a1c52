// The reference (the public double API): forward against the textbook formula
// computed here in long double, and every gradient against central finite
// differences of a loss through the forward pass.
//
// Training mode: loss = Σ w·y with y = forward_training(x, γ, β) and random w,
// so dL/dy = w and backward(dy = w) must give dL/dx, dL/dγ, dL/dβ (the batch
// statistics depend on x). Frozen mode: the loss goes through
// forward_inference with running statistics, constants in x.
//
// Central differences with step h have truncation error ~h²·|f'''| (~1e-10
// here) and rounding error ~1e-16·Σ|w·y| / h (~1e-10): a 1e-7 tolerance is far
// above both and far below any real mistake (a missing term of the training
// gradient is O(1/M) of the gradient, here above 1e-2).
#include "test_support.hpp"

namespace {

using namespace normkit_test;
using normkit::BackwardMode;
using normkit::TensorView;

constexpr double kStep = 1e-5;
constexpr double kGradTolerance = 1e-7;

struct Problem {
  Arrangement arrangement;
  std::vector<double> x, w, gamma, beta, running_mean, running_var;  // x, w canonical
  double eps = 1e-3;  // large enough that a gradient which ignored eps would show

  explicit Problem(Arrangement a, uint64_t seed) : arrangement(std::move(a)) {
    Rng rng(seed);
    const Logical& g = arrangement.logical;
    std::vector<double> mean_c, std_c;
    for (int64_t c = 0; c < g.c; ++c) {
      mean_c.push_back(rng.uniform(-2, 2));
      std_c.push_back(rng.uniform(0.3, 1.5));
      gamma.push_back(rng.uniform(0.5, 1.5) * (c % 2 ? -1 : 1));
      beta.push_back(rng.uniform(-1, 1));
      running_mean.push_back(mean_c.back() + rng.uniform(-0.3, 0.3));
      running_var.push_back(std_c.back() * std_c.back() * rng.uniform(0.5, 2));
    }
    x = convert<double>(channel_data(g, mean_c, std_c, rng));
    for (size_t i = 0; i < x.size(); ++i) x[i] += rng.uniform(-1e-3, 1e-3);  // beyond float
    for (size_t i = 0; i < x.size(); ++i) w.push_back(rng.uniform(-1, 1));
  }
  const Logical& g() const { return arrangement.logical; }

  // y for the given x, γ, β through the view's layout and strides.
  std::vector<double> forward(const std::vector<double>& xs, const std::vector<double>& gm,
                              const std::vector<double>& bt, BackwardMode mode) const {
    Buffer<double> xb(arrangement), yb(arrangement);
    xb.scatter(xs);
    if (mode == BackwardMode::training)
      normkit::batch_norm_forward_training<double>(xb.cview(), yb.view(), gm, bt, {}, {},
                                                   {eps, 0.1});
    else
      normkit::batch_norm_forward_inference<double>(xb.cview(), yb.view(), gm, bt, running_mean,
                                                    running_var, eps);
    return yb.gather();
  }
  double loss(const std::vector<double>& xs, const std::vector<double>& gm,
              const std::vector<double>& bt, BackwardMode mode) const {
    const auto y = forward(xs, gm, bt, mode);
    long double sum = 0;
    for (size_t i = 0; i < y.size(); ++i) sum += static_cast<long double>(w[i]) * y[i];
    return static_cast<double>(sum);
  }
};

struct Gradients {
  std::vector<double> dx, dgamma, dbeta;
};

Gradients analytic(const Problem& p, BackwardMode mode) {
  const Logical& g = p.g();
  std::vector<double> mean(g.c), invstd(g.c);
  Buffer<double> xb(p.arrangement), yb(p.arrangement), dyb(p.arrangement), dxb(p.arrangement);
  xb.scatter(p.x);
  dyb.scatter(p.w);
  if (mode == BackwardMode::training) {
    normkit::batch_norm_forward_training<double>(xb.cview(), yb.view(), p.gamma, p.beta,
                                                 {mean, invstd}, {}, {p.eps, 0.1});
  } else {
    mean = p.running_mean;
    normkit::batch_norm_invstd<double>(p.running_var, p.eps, invstd);
  }
  Gradients grads{{}, std::vector<double>(g.c), std::vector<double>(g.c)};
  normkit::batch_norm_backward<double>(xb.cview(), dyb.cview(), dxb.view(), p.gamma, mean, invstd,
                                       grads.dgamma, grads.dbeta, mode);
  grads.dx = dxb.gather();
  return grads;
}

Gradients numeric(const Problem& p, BackwardMode mode) {
  Gradients grads;
  auto central = [&](auto&& loss_at) { return (loss_at(kStep) - loss_at(-kStep)) / (2 * kStep); };
  for (size_t i = 0; i < p.x.size(); ++i)
    grads.dx.push_back(central([&](double h) {
      auto xs = p.x;
      xs[i] += h;
      return p.loss(xs, p.gamma, p.beta, mode);
    }));
  for (size_t c = 0; c < p.gamma.size(); ++c) {
    grads.dgamma.push_back(central([&](double h) {
      auto gm = p.gamma;
      gm[c] += h;
      return p.loss(p.x, gm, p.beta, mode);
    }));
    grads.dbeta.push_back(central([&](double h) {
      auto bt = p.beta;
      bt[c] += h;
      return p.loss(p.x, p.gamma, bt, mode);
    }));
  }
  return grads;
}

struct GradCase {
  const char* name;
  Arrangement arrangement;
};

class FiniteDifferences : public ::testing::TestWithParam<GradCase> {
 protected:
  void check(BackwardMode mode) {
    const Problem p(GetParam().arrangement, seed_of(GetParam().name));
    const Gradients a = analytic(p, mode), n = numeric(p, mode);
    const Tolerance tol{kGradTolerance, kGradTolerance};
    EXPECT_TRUE(all_close("dx", a.dx, n.dx, tol, &p.g()));
    EXPECT_TRUE(all_close("dgamma", a.dgamma, n.dgamma, tol));
    EXPECT_TRUE(all_close("dbeta", a.dbeta, n.dbeta, tol));
  }
};

TEST_P(FiniteDifferences, TrainingMode) { check(BackwardMode::training); }
TEST_P(FiniteDifferences, FrozenMode) { check(BackwardMode::frozen); }

INSTANTIATE_TEST_SUITE_P(
    Double, FiniteDifferences,
    ::testing::Values(GradCase{"NCHW", dense(Layout::NCHW, {2, 3, {2, 3}})},
                      GradCase{"NHWC", dense(Layout::NHWC, {3, 2, {2, 2}})},
                      GradCase{"NC", dense(Layout::NC, {5, 2, {}})},
                      GradCase{"NCL_two_values_per_channel", dense(Layout::NCL, {1, 3, {2}})},
                      GradCase{"NCHW_channels_last_padded", nchw_channels_last({2, 3, {2, 2}}, 1)}),
    ByName());

// Forward against y = (x - mean) / sqrt(var + eps) * γ + β computed here in
// long double (two-pass, biased variance), and the saved statistics with it.
TEST(ReferenceForward, MatchesTheTextbookFormula) {
  for (const Layout layout : {Layout::NCHW, Layout::NHWC}) {
    SCOPED_TRACE(std::string(normkit::to_string(layout)));
    const Problem p(dense(layout, {3, 4, {3, 5}}), 99);
    const Logical& g = p.g();
    const int64_t S = g.s();
    std::vector<double> y_want(p.x.size()), mean_want(g.c), invstd_want(g.c);
    for (int64_t c = 0; c < g.c; ++c) {
      long double sum = 0, m2 = 0;
      for (int64_t n = 0; n < g.n; ++n)
        for (int64_t s = 0; s < S; ++s) sum += p.x[(n * g.c + c) * S + s];
      const long double mean = sum / g.m();
      for (int64_t n = 0; n < g.n; ++n)
        for (int64_t s = 0; s < S; ++s) {
          const long double d = p.x[(n * g.c + c) * S + s] - mean;
          m2 += d * d;
        }
      const long double invstd = 1.0L / std::sqrt(m2 / g.m() + p.eps);
      mean_want[c] = static_cast<double>(mean);
      invstd_want[c] = static_cast<double>(invstd);
      for (int64_t n = 0; n < g.n; ++n)
        for (int64_t s = 0; s < S; ++s) {
          const int64_t i = (n * g.c + c) * S + s;
          y_want[i] = static_cast<double>((p.x[i] - mean) * invstd * p.gamma[c] + p.beta[c]);
        }
    }
    Buffer<double> xb(p.arrangement), yb(p.arrangement);
    xb.scatter(p.x);
    std::vector<double> mean(g.c), invstd(g.c);
    normkit::batch_norm_forward_training<double>(xb.cview(), yb.view(), p.gamma, p.beta,
                                                 {mean, invstd}, {}, {p.eps, 0.1});
    const Tolerance tol{1e-14, 1e-14};
    EXPECT_TRUE(all_close("y", yb.gather(), y_want, tol, &g));
    EXPECT_TRUE(all_close("save_mean", mean, mean_want, tol));
    EXPECT_TRUE(all_close("save_invstd", invstd, invstd_want, tol));
  }
}

// forward_apply with given statistics equals forward_inference with the
// matching running variance, and forward_training's y equals forward_apply
// with the statistics it saved.
TEST(ReferenceForward, ApplyIsTheSecondHalfOfTraining) {
  const Problem p(dense(Layout::NCL, {4, 3, {5}}), 5);
  const Logical& g = p.g();
  Buffer<double> xb(p.arrangement), y_train(p.arrangement), y_apply(p.arrangement);
  xb.scatter(p.x);
  std::vector<double> mean(g.c), invstd(g.c);
  normkit::batch_norm_forward_training<double>(xb.cview(), y_train.view(), p.gamma, p.beta,
                                               {mean, invstd}, {}, {p.eps, 0.1});
  normkit::batch_norm_forward_apply<double>(xb.cview(), y_apply.view(), p.gamma, p.beta, mean,
                                            invstd);
  EXPECT_TRUE(bitwise_equal("y", y_apply.storage, y_train.storage));
}

}  // namespace
