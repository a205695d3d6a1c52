// LayerNorm and RMSNorm (include/normkit/layer_norm.hpp):
//   - the double API (the reference) against the textbook formula in long double,
//     and its gradients against central finite differences;
//   - the float API (fast kernels) against the double API on the same data, over
//     row lengths below, at and above the SIMD widths and the 4096-value block,
//     with and without γ/β and row padding; finite differences in float;
//   - large means, in-place use, untouched padding, determinism across 1/2/3
//     threads, and every argument error.
//
// Tolerances for float against double, |fast - ref| <= atol·scale + rtol·|ref|:
//   y:       2e-6 abs (values of unit size: |x̂| <= 1.8 here, |γ| <= 1.5, |β| <= 1)
//            plus 2e-6 relative: a few float roundings of x̂·γ + β;
//   mean:    1e-6·σ of the row + 1e-6 relative; invstd: 1e-6 relative;
//   dx:      2e-6·scale, scale = invstd·max|dy·γ| of the row (the size of the
//            terms dx is the difference of);
//   dγ, dβ:  1e-6·Σ|dy·x̂| and 1e-6·Σ|dy| of the column (a sum's rounding is
//            relative to the sum of its terms' sizes).
// Dropping one value of a 768-value row moves its mean by ~1e-3σ and every y by
// as much: far beyond these bounds.
#include <array>

#include "kernels/layer_norm.hpp"
#include "test_support.hpp"

namespace {

using namespace normkit_test;
using normkit::ConstRowsView;
using normkit::ErrorKind;
using normkit::RowsView;

enum class Op { layer, rms };
const char* name_of(Op op) { return op == Op::layer ? "layer" : "rms"; }

// rows × cols values in a buffer with `pad` unused values after each row.
template <class T>
struct Rows {
  int64_t rows, cols, stride;
  std::vector<T> storage;
  Rows(int64_t r, int64_t c, int64_t pad, T fill = sentinel<T>())
      : rows(r), cols(c), stride(c + pad), storage(static_cast<size_t>(r * (c + pad)), fill) {}
  RowsView<T> view() { return {storage.data(), rows, cols, stride}; }
  ConstRowsView<T> cview() const { return {storage.data(), rows, cols, stride}; }
  T& at(int64_t r, int64_t j) { return storage[r * stride + j]; }
  template <class U>
  void scatter(const std::vector<U>& dense) {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < cols; ++j) at(r, j) = static_cast<T>(dense[r * cols + j]);
  }
  std::vector<T> gather() const {
    std::vector<T> dense(static_cast<size_t>(rows * cols));
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < cols; ++j) dense[r * cols + j] = storage[r * stride + j];
    return dense;
  }
  bool padding_intact(T fill = sentinel<T>()) const {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = cols; j < stride; ++j)
        if (!same_bits(storage[r * stride + j], fill)) return false;
    return true;
  }
};

// Row r: uniform values with mean mean_of(r) and std std_of(r).
std::vector<float> row_data(int64_t rows, int64_t cols, double mean, double spread, Rng& rng) {
  std::vector<float> v(static_cast<size_t>(rows * cols));
  for (int64_t r = 0; r < rows; ++r) {
    const double m = mean + rng.uniform(-1, 1) * (mean == 0 ? 1.0 : 1e-3 * std::fabs(mean));
    const double s = spread * rng.uniform(0.3, 1.5);
    for (int64_t j = 0; j < cols; ++j)
      v[r * cols + j] = static_cast<float>(m + s * rng.uniform(-std::sqrt(3.0), std::sqrt(3.0)));
  }
  return v;
}

// Outputs of one forward + backward through the public API for element type T.
template <class T>
struct Results {
  std::vector<T> y, mean, invstd, dx, dgamma, dbeta;
};

struct Case {
  int64_t rows, cols, pad = 0;
  bool affine = true, bias = true;
  double mean = 0.5, spread = 1.0, eps = 1e-5;
};

struct Inputs {
  std::vector<float> x, dy, gamma, beta;  // dense; gamma/beta empty when absent
};

Inputs inputs_for(const Case& c, uint64_t seed) {
  Rng rng(seed);
  Inputs in;
  in.x = row_data(c.rows, c.cols, c.mean, c.spread, rng);
  in.dy = uniform_floats(static_cast<size_t>(c.rows * c.cols), -1, 1, rng);
  if (c.affine) {
    in.gamma = uniform_floats(static_cast<size_t>(c.cols), 0.5, 1.5, rng);
    for (size_t j = 0; j < in.gamma.size(); j += 3) in.gamma[j] = -in.gamma[j];
  }
  if (c.bias) in.beta = uniform_floats(static_cast<size_t>(c.cols), -1, 1, rng);
  return in;
}

// Forward, then backward with forward's saved statistics, or with `saved`'s
// when given (the reference then differentiates at the statistics the fast
// kernels saved: they are float, and at a mean of 1e6 float(mean) is up to
// 0.03σ away from the mean, which moves every gradient by as much).
template <class T>
Results<T> run(Op op, const Case& c, const Inputs& in, const Results<float>* saved = nullptr) {
  Rows<T> x(c.rows, c.cols, c.pad), y(c.rows, c.cols, c.pad), dy(c.rows, c.cols, c.pad),
      dx(c.rows, c.cols, c.pad);
  x.scatter(in.x);
  dy.scatter(in.dy);
  const auto gamma = convert<T>(in.gamma);
  const auto beta = convert<T>(op == Op::layer ? in.beta : std::vector<float>{});
  Results<T> out;
  out.invstd.resize(c.rows);
  out.dgamma.resize(c.affine ? c.cols : 0);
  if (op == Op::layer) {
    out.mean.resize(c.rows);
    out.dbeta.resize(c.bias ? c.cols : 0);
    normkit::layer_norm_forward<T>(x.cview(), y.view(), gamma, beta, {out.mean, out.invstd}, c.eps);
    const auto mean = saved ? convert<T>(saved->mean) : out.mean;
    const auto invstd = saved ? convert<T>(saved->invstd) : out.invstd;
    normkit::layer_norm_backward<T>(x.cview(), dy.cview(), dx.view(), gamma, mean, invstd,
                                    out.dgamma, out.dbeta);
  } else {
    normkit::rms_norm_forward<T>(x.cview(), y.view(), gamma, c.eps, out.invstd);
    const auto invstd = saved ? convert<T>(saved->invstd) : out.invstd;
    normkit::rms_norm_backward<T>(x.cview(), dy.cview(), dx.view(), gamma, invstd, out.dgamma);
  }
  EXPECT_TRUE(y.padding_intact()) << "y padding overwritten";
  EXPECT_TRUE(dx.padding_intact()) << "dx padding overwritten";
  out.y = y.gather();
  out.dx = dx.gather();
  return out;
}

std::string describe(Op op, const Case& c) {
  std::ostringstream s;
  s << name_of(op) << " rows " << c.rows << " cols " << c.cols << " pad " << c.pad
    << (c.affine ? " γ" : "") << (c.bias && op == Op::layer ? " β" : "") << " mean " << c.mean
    << " spread " << c.spread;
  return s.str();
}

// Compares the float API with the double API run on the same (float) values.
void compare_fast_with_reference(Op op, const Case& c, uint64_t seed) {
  SCOPED_TRACE(describe(op, c));
  const Inputs in = inputs_for(c, seed);
  const Results<float> fast = run<float>(op, c, in);
  // y and the statistics against forward in double; gradients against the
  // double backward at fast's saved (float) statistics.
  const Results<double> ref = run<double>(op, c, in, &fast);

  // Logical{1, rows, {cols}}: all_close's "channel" is then the row.
  const Logical by_row{1, c.rows, {c.cols}};
  std::vector<double> row_sigma(c.rows), dx_scale(c.rows);
  std::vector<double> dgamma_scale(c.cols, 0.0), dbeta_scale(c.cols, 0.0);
  for (int64_t r = 0; r < c.rows; ++r) {
    // The statistics the backward ran with (fast's saved ones).
    const double m = op == Op::layer ? fast.mean[r] : 0.0, invstd = fast.invstd[r];
    double max_g = 0;
    row_sigma[r] = 1.0 / ref.invstd[r];
    for (int64_t j = 0; j < c.cols; ++j) {
      const size_t i = r * c.cols + j;
      const double g = in.dy[i] * (c.affine ? in.gamma[j] : 1.0f);
      max_g = std::max(max_g, std::fabs(g));
      dgamma_scale[j] += std::fabs(in.dy[i] * (in.x[i] - m) * invstd);
      dbeta_scale[j] += std::fabs(in.dy[i]);
    }
    dx_scale[r] = invstd * max_g;
  }
  EXPECT_TRUE(all_close("y", fast.y, ref.y, {2e-6, 2e-6}));
  if (op == Op::layer) {
    EXPECT_TRUE(all_close("mean", fast.mean, ref.mean, {1e-6, 1e-6}, nullptr, &row_sigma));
  }
  EXPECT_TRUE(all_close("invstd", fast.invstd, ref.invstd, {0.0, 1e-6}));
  EXPECT_TRUE(all_close("dx", fast.dx, ref.dx, {2e-6, 2e-6}, &by_row, &dx_scale));
  EXPECT_TRUE(all_close("dgamma", fast.dgamma, ref.dgamma, {1e-6, 1e-6}, nullptr, &dgamma_scale));
  if (op == Op::layer) {
    EXPECT_TRUE(all_close("dbeta", fast.dbeta, ref.dbeta, {1e-6, 1e-6}, nullptr, &dbeta_scale));
  }
}

constexpr std::array kOps = {Op::layer, Op::rms};

TEST(LayerNormFast, MatchesReferenceOverRowLengths) {
  const int64_t cols_list[] = {1,  2,  3,  7,   8,   15,  16,   17,   31,   32,   33,  63,
                               64, 65, 95, 127, 128, 129, 768, 1000, 4095, 4096, 4097, 9000};
  for (const Op op : kOps)
    for (const int64_t cols : cols_list)
      for (const int64_t rows : {int64_t{1}, int64_t{3}, int64_t{37}}) {
        if (rows * cols > 200000) continue;
        compare_fast_with_reference(op, {rows, cols, 0}, seed_of(describe(op, {rows, cols})));
      }
}

// The forward's y larger than the threads' L2 goes to memory with streaming
// stores through a buffer (src/cpu/streamed_output.hpp). A row's y and dx
// depend on that row alone: rows of 4096 × 768 (12.6 MB, streamed) give the
// bits of the row normalized by itself (written in place), dense and padded,
// and in place (y = x) the same bits.
TEST(LayerNormFast, StreamedOutputsAreEachRowAlone) {
  ThreadCount threads(2);
  for (const Op op : kOps)
    for (const int64_t pad : {0, 3}) {
      const Case all{4096, 768, pad};
      SCOPED_TRACE(describe(op, all));
      const Inputs in = inputs_for(all, 31);
      const Results<float> streamed = run<float>(op, all, in);
      std::vector<int64_t> rows = {2047, 2048, all.rows - 1};  // where 2 threads split, the last
      for (int64_t r = 0; r < all.rows; r += 97) rows.push_back(r);
      for (const int64_t r : rows) {
        const Case one{1, 768, pad};
        Inputs row = in;
        row.x.assign(in.x.begin() + r * 768, in.x.begin() + (r + 1) * 768);
        row.dy.assign(in.dy.begin() + r * 768, in.dy.begin() + (r + 1) * 768);
        const Results<float> alone = run<float>(op, one, row);
        const auto part = [&](const std::vector<float>& v) {
          return std::vector<float>(v.begin() + r * 768, v.begin() + (r + 1) * 768);
        };
        EXPECT_TRUE(bitwise_equal("y of row " + std::to_string(r), part(streamed.y), alone.y));
        EXPECT_TRUE(bitwise_equal("dx of row " + std::to_string(r), part(streamed.dx), alone.dx));
        EXPECT_TRUE(same_bits(streamed.invstd[r], alone.invstd[0]));
      }
      if (op == Op::layer) {
        Rows<float> xy(all.rows, all.cols, pad);
        xy.scatter(in.x);
        std::vector<float> mean(all.rows), invstd(all.rows);
        normkit::layer_norm_forward<float>(xy.cview(), xy.view(), in.gamma, in.beta,
                                           {mean, invstd});
        EXPECT_TRUE(bitwise_equal("y in place", xy.gather(), streamed.y));
      }
    }
}

TEST(LayerNormFast, MatchesReferenceOverRowCounts) {
  // Row counts around the number of dγ stripes (32) and its multiples.
  for (const Op op : kOps)
    for (const int64_t rows : {1, 2, 5, 31, 32, 33, 64, 65, 100, 257, 1000})
      compare_fast_with_reference(op, {rows, 64, 0}, seed_of(describe(op, {rows, 64})));
}

TEST(LayerNormFast, MatchesReferenceWithAndWithoutAffineAndPadding) {
  for (const Op op : kOps)
    for (const int64_t pad : {0, 1, 5})
      for (const bool affine : {false, true})
        for (const bool bias : {false, true}) {
          const Case c{19, 70, pad, affine, bias};
          compare_fast_with_reference(op, c, seed_of(describe(op, c)));
        }
}

TEST(LayerNormFast, MatchesReferenceForLargeMeans) {
  // A mean of 1e6 with std 1 in float: the textbook fold x·scale - mean·scale
  // would keep ~2 digits of y; x - float(mean) first keeps them all.
  for (const Op op : kOps)
    for (const double mean : {1e3, 1e6}) {
      Case c{8, 768, 0};
      c.mean = mean;
      c.spread = 1.0;
      compare_fast_with_reference(op, c, seed_of(describe(op, c)));
    }
  Case c{4, 5000, 3};  // more than one 4096-value block per row
  c.mean = 1e6;
  compare_fast_with_reference(Op::layer, c, seed_of(describe(Op::layer, c)));
}

TEST(LayerNormFast, RmsNormSurvivesValuesWhoseSquaresOverflowFloat) {
  // |x| ~ 1e20: x² overflows float, not double (where RMSNorm sums).
  Case c{3, 100, 0, true, false};
  c.mean = 0;
  c.spread = 1e20;
  compare_fast_with_reference(Op::rms, c, seed_of("overflow"));
}

// ---------------------------------------------------------------- the reference

TEST(LayerNormReference, MatchesTheTextbookFormula) {
  const int64_t rows = 4, cols = 9;
  Rng rng(seed_of("textbook"));
  std::vector<double> x(rows * cols), gamma(cols), beta(cols);
  for (auto& v : x) v = rng.uniform(-3, 5);
  for (auto& v : gamma) v = rng.uniform(-1.5, 1.5);
  for (auto& v : beta) v = rng.uniform(-1, 1);
  const double eps = 1e-3;
  std::vector<double> y(rows * cols), mean(rows), invstd(rows), y_rms(rows * cols), inv_rms(rows);
  normkit::layer_norm_forward<double>(ConstRowsView<double>{x.data(), rows, cols, cols},
                                      RowsView<double>{y.data(), rows, cols, cols}, gamma, beta,
                                      {mean, invstd}, eps);
  normkit::rms_norm_forward<double>(ConstRowsView<double>{x.data(), rows, cols, cols},
                                    RowsView<double>{y_rms.data(), rows, cols, cols}, gamma, eps,
                                    inv_rms);
  for (int64_t r = 0; r < rows; ++r) {
    long double sum = 0, sq = 0;
    for (int64_t j = 0; j < cols; ++j) {
      sum += x[r * cols + j];
      sq += static_cast<long double>(x[r * cols + j]) * x[r * cols + j];
    }
    const long double m = sum / cols;
    long double var = 0;
    for (int64_t j = 0; j < cols; ++j) var += (x[r * cols + j] - m) * (x[r * cols + j] - m);
    var /= cols;
    const long double is = 1 / std::sqrt(var + eps), ir = 1 / std::sqrt(sq / cols + eps);
    EXPECT_NEAR(mean[r], static_cast<double>(m), 1e-14);
    EXPECT_NEAR(invstd[r], static_cast<double>(is), 1e-14 * static_cast<double>(is));
    EXPECT_NEAR(inv_rms[r], static_cast<double>(ir), 1e-14 * static_cast<double>(ir));
    for (int64_t j = 0; j < cols; ++j) {
      const size_t i = r * cols + j;
      EXPECT_NEAR(y[i], static_cast<double>((x[i] - m) * is * gamma[j] + beta[j]), 1e-13);
      EXPECT_NEAR(y_rms[i], static_cast<double>(x[i] * ir * gamma[j]), 1e-13);
    }
  }
}

// Loss L = Σ w·y; backward with dy = w must give dL/dx, dL/dγ, dL/dβ.
template <class T>
struct FiniteDifferenceProblem {
  Op op;
  int64_t rows, cols, pad;
  double eps;
  std::vector<T> x, w, gamma, beta;

  double loss(const std::vector<T>& xs, const std::vector<T>& gm, const std::vector<T>& bt) const {
    Rows<T> xb(rows, cols, pad), yb(rows, cols, pad);
    xb.scatter(xs);
    if (op == Op::layer)
      normkit::layer_norm_forward<T>(xb.cview(), yb.view(), gm, bt, {}, eps);
    else
      normkit::rms_norm_forward<T>(xb.cview(), yb.view(), gm, eps, {});
    const auto y = yb.gather();
    long double sum = 0;
    for (size_t i = 0; i < y.size(); ++i) sum += static_cast<long double>(w[i]) * y[i];
    return static_cast<double>(sum);
  }
};

template <class T>
FiniteDifferenceProblem<T> fd_problem(Op op, int64_t rows, int64_t cols, double eps) {
  Rng rng(seed_of(std::string("fd ") + name_of(op) + (sizeof(T) == 4 ? " float" : " double")));
  FiniteDifferenceProblem<T> p{op, rows, cols, 2, eps, {}, {}, {}, {}};
  for (int64_t i = 0; i < rows * cols; ++i) {
    p.x.push_back(static_cast<T>(rng.uniform(-1, 3)));
    p.w.push_back(static_cast<T>(rng.uniform(-1, 1)));
  }
  for (int64_t j = 0; j < cols; ++j) {
    p.gamma.push_back(static_cast<T>(rng.uniform(0.5, 1.5) * (j % 2 ? -1 : 1)));
    if (op == Op::layer) p.beta.push_back(static_cast<T>(rng.uniform(-1, 1)));
  }
  return p;
}

// Central differences of step h; the analytic gradients from the public API.
template <class T>
void check_gradients(const FiniteDifferenceProblem<T>& p, double h, Tolerance tol) {
  SCOPED_TRACE(std::string(name_of(p.op)) + (sizeof(T) == 4 ? " float" : " double"));
  Rows<T> xb(p.rows, p.cols, p.pad), yb(p.rows, p.cols, p.pad), dyb(p.rows, p.cols, p.pad),
      dxb(p.rows, p.cols, p.pad);
  xb.scatter(p.x);
  dyb.scatter(p.w);
  std::vector<T> mean(p.rows), invstd(p.rows), dgamma(p.cols), dbeta(p.beta.size());
  if (p.op == Op::layer) {
    normkit::layer_norm_forward<T>(xb.cview(), yb.view(), p.gamma, p.beta, {mean, invstd}, p.eps);
    normkit::layer_norm_backward<T>(xb.cview(), dyb.cview(), dxb.view(), p.gamma, mean, invstd,
                                    dgamma, dbeta);
  } else {
    normkit::rms_norm_forward<T>(xb.cview(), yb.view(), p.gamma, p.eps, invstd);
    normkit::rms_norm_backward<T>(xb.cview(), dyb.cview(), dxb.view(), p.gamma, invstd, dgamma);
  }
  const auto dx = dxb.gather();
  auto central = [&](auto&& loss_at) { return (loss_at(h) - loss_at(-h)) / (2 * h); };
  std::vector<double> ndx, ndgamma, ndbeta;
  for (size_t i = 0; i < p.x.size(); ++i)
    ndx.push_back(central([&](double step) {
      auto xs = p.x;
      xs[i] += static_cast<T>(step);
      return p.loss(xs, p.gamma, p.beta);
    }));
  for (int64_t j = 0; j < p.cols; ++j) {
    ndgamma.push_back(central([&](double step) {
      auto gm = p.gamma;
      gm[j] += static_cast<T>(step);
      return p.loss(p.x, gm, p.beta);
    }));
    if (!p.beta.empty())
      ndbeta.push_back(central([&](double step) {
        auto bt = p.beta;
        bt[j] += static_cast<T>(step);
        return p.loss(p.x, p.gamma, bt);
      }));
  }
  EXPECT_TRUE(all_close("dx", dx, ndx, tol));
  EXPECT_TRUE(all_close("dgamma", dgamma, ndgamma, tol));
  EXPECT_TRUE(all_close("dbeta", dbeta, ndbeta, tol));
}

TEST(LayerNormGradients, ReferenceMatchesFiniteDifferences) {
  // Step 1e-5: truncation ~h²·|f'''| and rounding ~1e-16·Σ|w·y|/h are both
  // ~1e-10; a missing term of the gradient (the mean's or the variance's) is
  // O(1/N) = O(0.1) of it. eps 1e-2 is large enough that ignoring it would show.
  for (const Op op : kOps) check_gradients(fd_problem<double>(op, 3, 7, 1e-2), 1e-5, {1e-7, 1e-7});
}

TEST(LayerNormGradients, FastKernelsMatchFiniteDifferences) {
  // In float, with step 2^-6 (exact in float): rounding of the loss (~6e-8·Σ|w·y|
  // ≈ 1e-6) over 2h gives ~4e-5, truncation ~h²·|f'''|/6 ~ 1e-4 for these
  // unit-sized inputs: 1e-3 is above both and below a missing term (~0.1).
  for (const Op op : kOps) check_gradients(fd_problem<float>(op, 3, 7, 1e-2), 0x1p-6, {1e-3, 1e-3});
}

// ---------------------------------------------------------------- determinism, in place

TEST(LayerNormFast, BitwiseIdenticalForOneTwoThreeThreads) {
  for (const Op op : kOps)
    for (const Case& c : {Case{999, 768, 0}, Case{4096, 96, 1}, Case{5, 20000, 0}}) {
      SCOPED_TRACE(describe(op, c));
      const Inputs in = inputs_for(c, seed_of("threads"));
      std::vector<Results<float>> results;
      for (const int threads : {1, 2, 3}) {
        ThreadCount scope(threads);
        results.push_back(run<float>(op, c, in));
      }
      for (size_t k = 1; k < results.size(); ++k) {
        EXPECT_TRUE(bitwise_equal("y", results[0].y, results[k].y));
        EXPECT_TRUE(bitwise_equal("mean", results[0].mean, results[k].mean));
        EXPECT_TRUE(bitwise_equal("invstd", results[0].invstd, results[k].invstd));
        EXPECT_TRUE(bitwise_equal("dx", results[0].dx, results[k].dx));
        EXPECT_TRUE(bitwise_equal("dgamma", results[0].dgamma, results[k].dgamma));
        EXPECT_TRUE(bitwise_equal("dbeta", results[0].dbeta, results[k].dbeta));
      }
    }
}

TEST(LayerNormFast, ColumnSumsInDoubleAreBitwiseIdenticalForOneTwoThreeThreads) {
  // dγ and dβ leave the kernel as double sums and are rounded to float after:
  // a thread-dependent order of the double additions would almost never show in
  // the float results, so the kernel's double outputs are compared here.
  using normkit::kernels::ln::Backward;
  using normkit::kernels::ln::Centering;
  for (const Centering centering : {Centering::layer, Centering::rms})
    for (const Case& c : {Case{999, 768, 0}, Case{4096, 96, 1}, Case{70, 3000, 0}}) {
      SCOPED_TRACE(describe(centering == Centering::layer ? Op::layer : Op::rms, c));
      const Inputs in = inputs_for(c, seed_of("double sums"));
      std::vector<double> mean(c.rows), invstd(c.rows);
      Rng rng(seed_of("statistics"));
      for (int64_t r = 0; r < c.rows; ++r) {
        mean[r] = rng.uniform(0, 1);
        invstd[r] = rng.uniform(0.5, 2);
      }
      std::vector<std::vector<double>> dgamma, dbeta;
      for (const int threads : {1, 2, 3}) {
        ThreadCount scope(threads);
        dgamma.emplace_back(c.cols);
        dbeta.emplace_back(c.cols);
        normkit::kernels::ln::implementations()[0].backward(Backward<float>{
            centering, c.rows, c.cols, in.x.data(), c.cols, in.dy.data(), c.cols, nullptr, 0,
            in.gamma.data(), centering == Centering::layer ? mean.data() : nullptr, invstd.data(),
            dgamma.back().data(), centering == Centering::layer ? dbeta.back().data() : nullptr});
      }
      for (size_t k = 1; k < dgamma.size(); ++k) {
        EXPECT_TRUE(bitwise_equal("dgamma (double)", dgamma[0], dgamma[k]));
        EXPECT_TRUE(bitwise_equal("dbeta (double)", dbeta[0], dbeta[k]));
      }
    }
}

TEST(LayerNormFast, InPlaceGivesTheSameBits) {
  for (const Op op : kOps) {
    const Case c{7, 100, 3};
    SCOPED_TRACE(describe(op, c));
    const Inputs in = inputs_for(c, seed_of("in place"));
    const Results<float> expected = run<float>(op, c, in);
    const auto beta = op == Op::layer ? in.beta : std::vector<float>{};
    // y over x.
    Rows<float> xy(c.rows, c.cols, c.pad);
    xy.scatter(in.x);
    std::vector<float> mean(c.rows), invstd(c.rows);
    if (op == Op::layer)
      normkit::layer_norm_forward<float>(xy.cview(), xy.view(), in.gamma, beta, {mean, invstd});
    else
      normkit::rms_norm_forward<float>(xy.cview(), xy.view(), in.gamma, c.eps, invstd);
    EXPECT_TRUE(bitwise_equal("y in place", xy.gather(), expected.y));
    EXPECT_TRUE(xy.padding_intact());
    // dx over dy, then dx over x.
    for (const bool over_x : {false, true}) {
      Rows<float> x(c.rows, c.cols, c.pad), dy(c.rows, c.cols, c.pad);
      x.scatter(in.x);
      dy.scatter(in.dy);
      Rows<float>& target = over_x ? x : dy;
      std::vector<float> dgamma(c.cols), dbeta(c.cols);
      if (op == Op::layer)
        normkit::layer_norm_backward<float>(x.cview(), dy.cview(), target.view(), in.gamma,
                                            expected.mean, expected.invstd, dgamma, dbeta);
      else
        normkit::rms_norm_backward<float>(x.cview(), dy.cview(), target.view(), in.gamma,
                                          expected.invstd, dgamma);
      EXPECT_TRUE(bitwise_equal(over_x ? "dx over x" : "dx over dy", target.gather(), expected.dx));
      EXPECT_TRUE(bitwise_equal("dgamma in place", dgamma, expected.dgamma));
    }
  }
}

TEST(LayerNormFast, ParameterGradientsAloneAndDxAlone) {
  const Case c{40, 33, 0};
  const Inputs in = inputs_for(c, seed_of("parts"));
  const Results<float> all = run<float>(Op::layer, c, in);
  Rows<float> x(c.rows, c.cols, 0), dy(c.rows, c.cols, 0), dx(c.rows, c.cols, 0);
  x.scatter(in.x);
  dy.scatter(in.dy);
  std::vector<float> dgamma(c.cols), dbeta(c.cols);
  normkit::layer_norm_backward<float>(x.cview(), dy.cview(), {}, in.gamma, all.mean, all.invstd,
                                      dgamma, dbeta);
  EXPECT_TRUE(bitwise_equal("dgamma without dx", dgamma, all.dgamma));
  EXPECT_TRUE(bitwise_equal("dbeta without dx", dbeta, all.dbeta));
  normkit::layer_norm_backward<float>(x.cview(), dy.cview(), dx.view(), in.gamma, all.mean,
                                      all.invstd, {}, {});
  EXPECT_TRUE(bitwise_equal("dx without dgamma, dbeta", dx.gather(), all.dx));
}

// ---------------------------------------------------------------- errors

struct ErrorSetup {
  Rows<float> x{4, 6, 0, 1.0f}, y{4, 6, 0, 0.0f}, dy{4, 6, 0, 1.0f}, dx{4, 6, 0, 0.0f};
  std::vector<float> gamma = std::vector<float>(6, 1.0f), beta = std::vector<float>(6, 0.0f);
  std::vector<float> mean = std::vector<float>(4, 0.0f), invstd = std::vector<float>(4, 1.0f);
  std::vector<float> dgamma = std::vector<float>(6, 7.0f), dbeta = std::vector<float>(6, 7.0f);
  ErrorSetup() {
    for (int64_t i = 0; i < 24; ++i) x.storage[i] = static_cast<float>(i % 5);
  }
};

TEST(LayerNormErrors, BadArgumentsAreRejectedBeforeAnythingIsWritten) {
  ErrorSetup s;
  auto y_untouched = [&] { return std::all_of(s.y.storage.begin(), s.y.storage.end(), [](float v) { return v == 0.0f; }); };
  const auto inv = ErrorKind::invalid_argument;
  auto forward = [&](ConstRowsView<float> x, RowsView<float> y, std::span<const float> g,
                     std::span<const float> b, std::span<float> m, std::span<float> is, double eps) {
    return [=] { normkit::layer_norm_forward<float>(x, y, g, b, {m, is}, eps); };
  };
  const auto xv = s.x.cview();
  const auto yv = s.y.view();
  EXPECT_TRUE(throws_error(forward(xv, yv, s.gamma, s.beta, s.mean, s.invstd, 0.0), inv, {"eps", "0"}));
  EXPECT_TRUE(throws_error(forward(xv, yv, s.gamma, s.beta, s.mean, s.invstd, -1e-5), inv, {"eps"}));
  EXPECT_TRUE(throws_error(forward(xv, yv, s.gamma, s.beta, s.mean, s.invstd, std::nan("")), inv, {"eps"}));
  EXPECT_TRUE(throws_error(forward(xv, yv, std::span(s.gamma).first(5), s.beta, s.mean, s.invstd, 1e-5),
                           inv, {"weight", "6", "5"}));
  EXPECT_TRUE(throws_error(forward(xv, yv, s.gamma, std::span(s.beta).first(2), s.mean, s.invstd, 1e-5),
                           inv, {"bias", "6", "2"}));
  EXPECT_TRUE(throws_error(forward(xv, yv, s.gamma, s.beta, std::span(s.mean).first(3), s.invstd, 1e-5),
                           inv, {"save_mean", "4", "3"}));
  EXPECT_TRUE(throws_error(forward(xv, yv, s.gamma, s.beta, s.mean, std::span(s.invstd).first(1), 1e-5),
                           inv, {"save_invstd", "4", "1"}));
  EXPECT_TRUE(throws_error(forward({xv.data, 4, 6, 5}, yv, {}, {}, {}, {}, 1e-5), inv,
                           {"x", "row stride 5", "6"}));
  EXPECT_TRUE(throws_error(forward({xv.data, 0, 6, 6}, {yv.data, 0, 6, 6}, {}, {}, {}, {}, 1e-5),
                           inv, {"x", "empty"}));
  EXPECT_TRUE(throws_error(forward({nullptr, 4, 6, 6}, yv, {}, {}, {}, {}, 1e-5), inv, {"x", "null"}));
  EXPECT_TRUE(throws_error(forward(xv, {yv.data, 4, 5, 6}, {}, {}, {}, {}, 1e-5), inv,
                           {"y", "do not match"}));
  EXPECT_TRUE(throws_error(forward(xv, {yv.data, 4, 6, 6}, {}, {}, {}, {}, -1), inv, {"eps"}));
  // In place with another row stride.
  EXPECT_TRUE(throws_error(forward({s.x.storage.data(), 2, 6, 6}, {s.x.storage.data(), 2, 6, 7}, {},
                                   {}, {}, {}, 1e-5),
                           inv, {"in-place", "row stride"}));
  EXPECT_TRUE(y_untouched());
  EXPECT_TRUE(throws_error([&] { normkit::rms_norm_forward<float>(xv, yv, s.gamma, 0.0, s.invstd); },
                           inv, {"eps"}));
  EXPECT_TRUE(throws_error(
      [&] { normkit::rms_norm_forward<float>(xv, yv, std::span(s.gamma).first(4), 1e-6, {}); }, inv,
      {"weight", "6", "4"}));
  EXPECT_TRUE(throws_error(
      [&] { normkit::rms_norm_forward<float>(xv, yv, {}, 1e-6, std::span(s.invstd).first(2)); }, inv,
      {"save_inv_rms", "4", "2"}));
  EXPECT_TRUE(y_untouched());

  // Backward.
  auto dx_untouched = [&] { return std::all_of(s.dx.storage.begin(), s.dx.storage.end(), [](float v) { return v == 0.0f; }); };
  auto grads_untouched = [&] {
    return std::all_of(s.dgamma.begin(), s.dgamma.end(), [](float v) { return v == 7.0f; }) &&
           std::all_of(s.dbeta.begin(), s.dbeta.end(), [](float v) { return v == 7.0f; });
  };
  const auto dyv = s.dy.cview();
  const auto dxv = s.dx.view();
  EXPECT_TRUE(throws_error([&] { normkit::layer_norm_backward<float>(xv, dyv, dxv, s.gamma, {}, s.invstd, s.dgamma, s.dbeta); },
                           inv, {"mean", "4", "0"}));
  EXPECT_TRUE(throws_error([&] { normkit::layer_norm_backward<float>(xv, dyv, dxv, s.gamma, s.mean, {}, s.dgamma, s.dbeta); },
                           inv, {"invstd", "4"}));
  EXPECT_TRUE(throws_error([&] { normkit::layer_norm_backward<float>(xv, {dyv.data, 3, 6, 6}, dxv, s.gamma, s.mean, s.invstd, s.dgamma, s.dbeta); },
                           inv, {"dy", "do not match"}));
  EXPECT_TRUE(throws_error([&] { normkit::layer_norm_backward<float>(xv, dyv, {dxv.data, 4, 7, 7}, s.gamma, s.mean, s.invstd, s.dgamma, s.dbeta); },
                           inv, {"dx", "do not match"}));
  EXPECT_TRUE(throws_error([&] { normkit::layer_norm_backward<float>(xv, dyv, dxv, s.gamma, s.mean, s.invstd, std::span(s.dgamma).first(5), s.dbeta); },
                           inv, {"dgamma", "6", "5"}));
  EXPECT_TRUE(throws_error([&] { normkit::layer_norm_backward<float>(xv, dyv, dxv, s.gamma, s.mean, s.invstd, s.dgamma, std::span(s.dbeta).first(1)); },
                           inv, {"dbeta", "6", "1"}));
  EXPECT_TRUE(throws_error([&] { normkit::layer_norm_backward<float>(xv, dyv, dxv, std::span(s.gamma).first(3), s.mean, s.invstd, s.dgamma, s.dbeta); },
                           inv, {"weight", "6", "3"}));
  std::vector<float> nan_invstd = s.invstd;
  nan_invstd[2] = std::nanf("");
  EXPECT_TRUE(throws_error([&] { normkit::layer_norm_backward<float>(xv, dyv, dxv, s.gamma, s.mean, nan_invstd, s.dgamma, s.dbeta); },
                           inv, {"invstd[2]", "not finite"}));
  EXPECT_TRUE(throws_error([&] { normkit::layer_norm_backward<float>(xv, dyv, {s.dy.storage.data(), 2, 6, 7}, s.gamma, std::span(s.mean).first(2), std::span(s.invstd).first(2), s.dgamma, s.dbeta); },
                           inv, {"dx", "do not match"}));
  EXPECT_TRUE(throws_error([&] { normkit::rms_norm_backward<float>(xv, dyv, dxv, s.gamma, std::span(s.invstd).first(3), s.dgamma); },
                           inv, {"inv_rms", "4", "3"}));
  EXPECT_TRUE(dx_untouched());
  EXPECT_TRUE(grads_untouched());
}

TEST(LayerNormErrors, NonFiniteRowIsARuntimeErrorAndSavedStatisticsStay) {
  for (const Op op : kOps)
    for (const float bad : {std::nanf(""), std::numeric_limits<float>::infinity()}) {
      SCOPED_TRACE(name_of(op));
      Rows<float> x(5, 40, 0, 1.0f), y(5, 40, 0, 0.0f);
      for (int64_t i = 0; i < 200; ++i) x.storage[i] = static_cast<float>(i % 7);
      x.at(3, 17) = bad;
      std::vector<float> mean(5, -9.0f), invstd(5, -9.0f);
      auto call = [&] {
        if (op == Op::layer)
          normkit::layer_norm_forward<float>(x.cview(), y.view(), {}, {}, {mean, invstd});
        else
          normkit::rms_norm_forward<float>(x.cview(), y.view(), {}, 1e-6, invstd);
      };
      EXPECT_TRUE(throws_error(call, ErrorKind::runtime, {"row 3", "NaN or infinite"}));
      EXPECT_TRUE(std::all_of(mean.begin(), mean.end(), [](float v) { return v == -9.0f; }));
      EXPECT_TRUE(std::all_of(invstd.begin(), invstd.end(), [](float v) { return v == -9.0f; }));
    }
}

}  // namespace
