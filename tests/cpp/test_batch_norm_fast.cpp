// Differential tests: the float API (fast kernels, src/cpu) against the
// reference kernels (kernels::bn::ref::*: plain loops, double accumulation) run on
// the same float data.
//
// Every case builds one logical tensor, scatters it into a view with the case's
// layout and strides, runs the float API on the view, gathers the outputs back
// to canonical [N, C, S] order and compares them with the reference run on the
// canonical data. Output buffers start as a recognisable NaN: an element the
// kernel never wrote fails the comparison, and padding must still hold it
// afterwards. Input padding holds the same NaN, so a kernel that reads padding
// into a statistic produces NaN (and an error) instead of a plausible number.
//
// Tolerances, |fast - ref| <= atol * scale + rtol * |ref| (llm.c's validate_result
// with a scale for outputs whose terms are not of unit size). float's unit
// roundoff is 2^-24 = 6e-8, so each bound is a few dozen roundings:
//   y, inference y:  atol 2e-6, rtol 2e-6, scale 1. y = (x - mean_hi)*scale + shift
//                    is a few float roundings of unit-sized values (|x̂| <= 1.8,
//                    |γ| <= 1.5, |β| <= 1 here) plus the fast statistics' error;
//   dx:              atol 2e-6, rtol 2e-6, scale |γ|·invstd·max|dy| of the channel:
//                    training dx is a difference of terms of that size and cancels
//                    to far below them (always for M = 2, where x̂ = ±1);
//   dγ, dβ:          atol 1e-6, rtol 1e-6, scale Σ|dy·x̂| and Σ|dy| of the channel:
//                    a sum's rounding error is relative to the sum of its terms' sizes;
//   saved/running mean: atol 1e-6 with scale σ of the channel, rtol 1e-6;
//   invstd, running var: rtol 1e-6.
// Measured on the sweep (NORMKIT_TEST_VERBOSE=1 prints it), the worst error is
// about a tenth of its bound (y 0.11, dx 0.08, invstd 0.17, running var 0.11,
// dγ and dβ 0.03). Dropping or doubling one element of a 50000-element channel
// moves the statistics by ~2e-5 σ and dγ, dβ by ~2e-5 of their scale: every
// bound above catches it. The textbook fold y = x·scale + (β - mean·scale) loses
// digits in proportion to |mean|/σ: already beyond the y bound at mean 3, σ 0.5
// (and hopeless at mean 1e4: test_batch_norm_numerics.cpp).
//
// One test runs one layout and stride form over several (C, M) cases; a failure
// names the case, the views' strides and the implementation that ran.
#include <array>

#include "kernels/batch_norm.hpp"
#include "test_support.hpp"

namespace {

using namespace normkit_test;
using normkit::BackwardMode;
using normkit::Moments;
using normkit::TensorView;

constexpr Tolerance kY{2e-6, 2e-6};
constexpr Tolerance kDx{2e-6, 2e-6};
constexpr Tolerance kSum{1e-6, 1e-6};
constexpr Tolerance kMean{1e-6, 1e-6};
constexpr Tolerance kRelative{0.0, 1e-6};

constexpr std::array kAllLayouts = {Layout::NC,  Layout::NCL,  Layout::NCHW, Layout::NCDHW,
                                    Layout::NLC, Layout::NHWC, Layout::NDHWC};

// M split into N and the layout's spatial sizes: parts[s] = {N, spatial...} for s spatial axes.
Logical split(Layout layout, int64_t c, int64_t m) {
  struct Row {
    int64_t m;
    std::array<std::vector<int64_t>, 4> parts;
  };
  static const std::vector<Row> table = {
      {2, {{{2}, {1, 2}, {2, 1, 1}, {1, 1, 1, 2}}}},
      {3, {{{3}, {3, 1}, {1, 1, 3}, {1, 3, 1, 1}}}},
      {7, {{{7}, {1, 7}, {7, 1, 1}, {1, 1, 7, 1}}}},
      {30, {{{30}, {3, 10}, {2, 3, 5}, {1, 2, 3, 5}}}},
      {1024, {{{1024}, {4, 256}, {4, 16, 16}, {2, 8, 8, 8}}}},
      {50000, {{{50000}, {8, 6250}, {8, 50, 125}, {2, 10, 50, 50}}}},
  };
  for (const auto& row : table)
    if (row.m == m) {
      const auto& p = row.parts[spatial_rank(layout)];
      return Logical{p[0], c, std::vector<int64_t>(p.begin() + 1, p.end())};
    }
  ADD_FAILURE() << "no split for M = " << m;
  return {};
}

enum class Kind {
  dense,
  rows_padded,     // channels-last rows of C + 3 values
  outer_padded,    // channels-first, outer stride C*S + 5
  channel_padded,  // channels-first, channel stride S + 3
  nchw_channels_last,         // logical NCHW, channels-last strides
  nchw_channels_last_padded,  // the same with rows of C + 2
  mixed,     // x dense; y and dx padded; dy padded differently
  in_place,  // y written over x, dx over dy (padded when the layout allows)
};

const char* kind_name(Kind kind) {
  switch (kind) {
    case Kind::dense: return "dense";
    case Kind::rows_padded: return "rows_padded";
    case Kind::outer_padded: return "outer_padded";
    case Kind::channel_padded: return "channel_padded";
    case Kind::nchw_channels_last: return "channels_last_strides";
    case Kind::nchw_channels_last_padded: return "channels_last_strides_padded";
    case Kind::mixed: return "mixed_strides";
    case Kind::in_place: return "in_place";
  }
  return "?";
}

struct Case {
  Layout layout;
  int64_t c, m;
  Kind kind;
};

std::string case_name(const Case& k) {
  return std::string(normkit::to_string(k.layout)) + "_C" + std::to_string(k.c) + "_M" +
         std::to_string(k.m) + "_" + kind_name(k.kind);
}

// The padded arrangement a layout allows: rows for channels-last (and NC),
// outer padding for channels-first.
Arrangement padded(Layout layout, const Logical& g, int64_t pad) {
  if (normkit::is_channels_last(layout) || layout == Layout::NC) return rows_padded(layout, g, pad);
  return outer_padded(layout, g, pad);
}

struct Arrangements {
  Arrangement x, y, dy, dx;
  bool in_place = false;
};

Arrangements arrange(const Case& k) {
  const Logical g = split(k.layout, k.c, k.m);
  switch (k.kind) {
    case Kind::dense: {
      const auto a = dense(k.layout, g);
      return {a, a, a, a};
    }
    case Kind::rows_padded: {
      const auto a = rows_padded(k.layout, g, 3);
      return {a, a, a, a};
    }
    case Kind::outer_padded: {
      const auto a = outer_padded(k.layout, g, 5);
      return {a, a, a, a};
    }
    case Kind::channel_padded: {
      const auto a = channel_padded(k.layout, g, 3);
      return {a, a, a, a};
    }
    case Kind::nchw_channels_last: {
      const auto a = nchw_channels_last(g);
      return {a, a, a, a};
    }
    case Kind::nchw_channels_last_padded: {
      const auto a = nchw_channels_last(g, 2);
      return {a, a, a, a};
    }
    case Kind::mixed:
      return {dense(k.layout, g), padded(k.layout, g, 4), padded(k.layout, g, 1),
              padded(k.layout, g, 6)};
    case Kind::in_place: {
      const auto a = padded(k.layout, g, 2);
      return {a, a, a, a, true};
    }
  }
  return {};
}

// Which implementation the dispatcher will choose (as core/dispatch.hpp's choose()).
std::string dispatch_of(const Arrangement& x, std::initializer_list<const Arrangement*> others) {
  std::vector<float> dummy(1);
  auto geom = [&](const Arrangement& a) {
    return normkit::geometry_of(
        TensorView<const float>::strided(dummy.data(), a.sizes, a.strides, a.layout), "view");
  };
  const normkit::Geometry gx = geom(x);
  std::vector<normkit::Geometry> rest;
  for (const auto* o : others) rest.push_back(geom(*o));
  for (const auto& impl : normkit::kernels::bn::implementations())
    if (!impl.decline(gx, rest)) return impl.name;
  return "reference";
}

// One case's logical data and the reference's batch statistics.
struct CaseData {
  Case k;
  Arrangements arr;
  Logical g;
  normkit::Geometry canonical;  // the oracle's geometry: dense [N, C, S]
  Rng rng;
  std::vector<double> mean_c, std_c;  // of the distribution
  std::vector<float> x, gamma, beta;
  std::vector<Moments> moments;  // the reference's batch moments
  std::vector<double> sigma;     // per channel, of the batch (biased)

  explicit CaseData(const Case& c)
      : k(c),
        arr(arrange(c)),
        g(arr.x.logical),
        canonical(normkit::geometry_of(canonical_view<const float>(nullptr, g), "canonical")),
        rng(seed_of(case_name(c))) {
    for (int64_t ch = 0; ch < g.c; ++ch) {
      mean_c.push_back(rng.uniform(-3, 3));
      std_c.push_back(rng.uniform(0.5, 2));
    }
    x = channel_data(g, mean_c, std_c, rng);
    for (int64_t ch = 0; ch < g.c; ++ch) {
      gamma.push_back(static_cast<float>((rng.uniform() < 0.5 ? -1 : 1) * rng.uniform(0.5, 1.5)));
      beta.push_back(static_cast<float>(rng.uniform(-1, 1)));
    }
    moments.resize(g.c);
    normkit::kernels::bn::ref::moments<float>({canonical, x.data(), moments.data()});
    for (const auto& mo : moments) sigma.push_back(std::sqrt(mo.biased_variance()));
  }

  // Inputs are checked for being left unchanged when a copy is cheap.
  bool small() const { return arr.x.storage <= (int64_t{1} << 22); }
  // The 200 MB cases run one variant of each direction.
  bool big() const { return g.numel() > (int64_t{1} << 24); }

  std::vector<float> dy_data() {
    std::vector<float> dy(x.size());
    const int64_t S = g.s();
    std::vector<double> offset(g.c);
    for (auto& o : offset) o = rng.uniform(-0.5, 0.5);
    for (int64_t n = 0; n < g.n; ++n)
      for (int64_t ch = 0; ch < g.c; ++ch)
        for (int64_t s = 0; s < S; ++s)
          dy[(n * g.c + ch) * S + s] = static_cast<float>(offset[ch] + rng.uniform(-1, 1));
    return dy;
  }
  std::string trace(std::initializer_list<const Arrangement*> others) const {
    std::string text = case_name(k) + ": x " + arr.x.describe();
    for (const auto* o : others) text += "; out/grad " + o->describe();
    return text + "; float path: " + dispatch_of(arr.x, others);
  }
};

template <class T>
std::span<const T> maybe(const std::vector<T>& v, bool present) {
  return present ? std::span<const T>(v) : std::span<const T>();
}
template <class T>
const T* pointer_or_null(const std::vector<T>& v, bool present) {
  return present ? v.data() : nullptr;
}
template <class T>
void refill(std::vector<T>& v, T value) {
  std::fill(v.begin(), v.end(), value);
}

void check_forward_training(const Case& k) {
  CaseData s(k);
  const Logical& g = s.g;
  SCOPED_TRACE(s.trace({&s.arr.y}));
  const double eps = 1e-5, momentum = 0.1;
  std::vector<float> rm0, rv0;
  for (int64_t c = 0; c < g.c; ++c) {
    rm0.push_back(static_cast<float>(s.rng.uniform(-1, 1)));
    rv0.push_back(static_cast<float>(s.rng.uniform(0.5, 2)));
  }
  Buffer<float> xb(s.arr.x), yb(s.arr.y);
  std::vector<float> y_ref(s.x.size()), y_got;
  std::vector<Moments> moments_ref(g.c);
  for (const bool affine : {true, false}) {
    if (!affine && s.big()) continue;
    SCOPED_TRACE(affine ? "with gamma, beta, saved and running statistics"
                        : "without gamma, beta, saved or running statistics");
    // Reference: y, and the statistics the public API derives from its moments
    // (saved mean and invstd; PyTorch's running update with the unbiased variance).
    normkit::kernels::bn::ref::forward<float>(
        {s.canonical, s.canonical, s.x.data(), y_ref.data(), pointer_or_null(s.gamma, affine),
         pointer_or_null(s.beta, affine), eps, moments_ref.data()});
    std::vector<double> mean_ref(g.c), invstd_ref(g.c), rm_ref(g.c), rv_ref(g.c);
    for (int64_t c = 0; c < g.c; ++c) {
      const Moments& m = moments_ref[c];
      mean_ref[c] = m.mean;
      invstd_ref[c] = 1.0 / std::sqrt(m.m2 / m.count + eps);
      rm_ref[c] = (1 - momentum) * rm0[c] + momentum * m.mean;
      rv_ref[c] = (1 - momentum) * rv0[c] + momentum * m.m2 / (m.count - 1);
    }

    // Fast.
    refill(yb.storage, sentinel<float>());
    (s.arr.in_place ? yb : xb).scatter(s.x);
    const auto x_before = s.small() && !s.arr.in_place ? xb.storage : std::vector<float>();
    const TensorView<const float> xv = s.arr.in_place ? yb.cview() : xb.cview();
    std::vector<float> mean(g.c, sentinel<float>()), invstd(g.c, sentinel<float>());
    auto rm = rm0, rv = rv0;
    int64_t batches = 3;
    if (affine) {
      normkit::batch_norm_forward_training<float>(xv, yb.view(), s.gamma, s.beta, {mean, invstd},
                                                  {rm, rv, &batches}, {eps, momentum});
    } else {
      normkit::batch_norm_forward_training<float>(xv, yb.view(), {}, {}, {}, {}, {eps, momentum});
    }

    y_got = yb.gather();
    EXPECT_TRUE(all_close("y", y_got, y_ref, kY, &g));
    EXPECT_TRUE(yb.padding_is(sentinel<float>(), "y"));
    if (!x_before.empty()) {
      EXPECT_TRUE(bitwise_equal("x (input)", xb.storage, x_before));
    }
    if (!affine) continue;
    EXPECT_TRUE(all_close("save_mean", mean, mean_ref, kMean, nullptr, &s.sigma));
    EXPECT_TRUE(all_close("save_invstd", invstd, invstd_ref, kRelative));
    EXPECT_TRUE(all_close("running_mean", rm, rm_ref, kMean, nullptr, &s.sigma));
    EXPECT_TRUE(all_close("running_var", rv, rv_ref, kRelative));
    EXPECT_EQ(batches, 4);
  }
}

void check_forward_inference(const Case& k) {
  CaseData s(k);
  const Logical& g = s.g;
  SCOPED_TRACE(s.trace({&s.arr.y}));
  std::vector<float> rm, rv;
  for (int64_t c = 0; c < g.c; ++c) {
    rm.push_back(static_cast<float>(s.mean_c[c] + 0.2 * s.std_c[c] * s.rng.uniform(-1, 1)));
    rv.push_back(static_cast<float>(s.std_c[c] * s.std_c[c] * s.rng.uniform(0.5, 2)));
  }
  struct Variant {
    const char* name;
    bool gamma, beta;
    double eps;
  };
  Buffer<float> xb(s.arr.x), yb(s.arr.y);
  std::vector<float> y_ref(s.x.size()), y_got;
  for (const Variant v : {Variant{"gamma and beta", true, true, 1e-5},
                          Variant{"neither gamma nor beta", false, false, 1e-5},
                          Variant{"gamma only, eps 1e-3", true, false, 1e-3}}) {
    if (s.big() && !(v.gamma && v.beta)) continue;
    SCOPED_TRACE(v.name);
    // Reference: y = (x - running_mean) / sqrt(running_var + eps) * γ + β.
    std::vector<double> mean_d(rm.begin(), rm.end()), invstd_d(g.c);
    for (int64_t c = 0; c < g.c; ++c) invstd_d[c] = 1.0 / std::sqrt(double{rv[c]} + v.eps);
    normkit::kernels::bn::ref::apply<float>({s.canonical, s.canonical, s.x.data(), y_ref.data(),
                                         pointer_or_null(s.gamma, v.gamma),
                                         pointer_or_null(s.beta, v.beta), mean_d.data(),
                                         invstd_d.data()});

    refill(yb.storage, sentinel<float>());
    (s.arr.in_place ? yb : xb).scatter(s.x);
    const auto x_before = s.small() && !s.arr.in_place ? xb.storage : std::vector<float>();
    const TensorView<const float> xv = s.arr.in_place ? yb.cview() : xb.cview();
    normkit::batch_norm_forward_inference<float>(xv, yb.view(), maybe(s.gamma, v.gamma),
                                                 maybe(s.beta, v.beta), rm, rv, v.eps);
    y_got = yb.gather();
    EXPECT_TRUE(all_close("y", y_got, y_ref, kY, &g));
    EXPECT_TRUE(yb.padding_is(sentinel<float>(), "y"));
    if (!x_before.empty()) {
      EXPECT_TRUE(bitwise_equal("x (input)", xb.storage, x_before));
    }
  }
}

// Both backward modes: training with the batch's own statistics (as forward
// saved them), frozen with running statistics.
void check_backward(const Case& k, BackwardMode mode) {
  CaseData s(k);
  const Logical& g = s.g;
  SCOPED_TRACE(s.trace({&s.arr.dy, &s.arr.dx}));
  const double eps = 1e-5;
  std::vector<float> mean(g.c), invstd(g.c);
  if (mode == BackwardMode::training) {
    for (int64_t c = 0; c < g.c; ++c) {
      mean[c] = static_cast<float>(s.moments[c].mean);
      invstd[c] = static_cast<float>(1.0 / std::sqrt(s.moments[c].biased_variance() + eps));
    }
  } else {
    std::vector<float> rv(g.c);
    for (int64_t c = 0; c < g.c; ++c) {
      mean[c] = static_cast<float>(s.mean_c[c] + 0.2 * s.std_c[c] * s.rng.uniform(-1, 1));
      rv[c] = static_cast<float>(s.std_c[c] * s.std_c[c] * s.rng.uniform(0.5, 2));
    }
    normkit::batch_norm_invstd<float>(rv, eps, invstd);
  }
  const std::vector<float> dy = s.dy_data();
  const std::vector<double> mean_d(mean.begin(), mean.end()), invstd_d(invstd.begin(), invstd.end());

  // Scales for the tolerances, per channel: |γ|·invstd·max|dy|, Σ|dy·x̂|, Σ|dy|.
  std::vector<double> max_dy(g.c, 0.0), sum_abs_dy_xhat(g.c, 0.0), sum_abs_dy(g.c, 0.0);
  const int64_t S = g.s();
  for (int64_t n = 0; n < g.n; ++n)
    for (int64_t c = 0; c < g.c; ++c)
      for (int64_t i = (n * g.c + c) * S; i < (n * g.c + c + 1) * S; ++i) {
        const double d = std::fabs(double{dy[i]});
        max_dy[c] = std::max(max_dy[c], d);
        sum_abs_dy[c] += d;
        sum_abs_dy_xhat[c] += d * std::fabs((s.x[i] - mean_d[c]) * invstd_d[c]);
      }

  struct Variant {
    const char* name;
    bool gamma, dx, dgamma_dbeta;
  };
  Buffer<float> xb(s.arr.x), dyb(s.arr.dy), dxb(s.arr.dx);
  xb.scatter(s.x);
  const auto x_before = s.small() ? xb.storage : std::vector<float>();
  std::vector<float> dx_ref(s.x.size()), dx_got;
  for (const Variant v : {Variant{"gamma; dx, dgamma and dbeta", true, true, true},
                          Variant{"no gamma; dgamma and dbeta only (dx absent)", false, false, true},
                          Variant{"no gamma; dx only", false, true, false}}) {
    if (s.big() && !v.gamma) continue;
    SCOPED_TRACE(v.name);
    std::vector<double> dgamma_ref(g.c), dbeta_ref(g.c);
    normkit::kernels::bn::ref::backward<float>(
        {s.canonical, s.canonical, s.canonical, s.x.data(), dy.data(),
         v.dx ? dx_ref.data() : nullptr, pointer_or_null(s.gamma, v.gamma), mean_d.data(),
         invstd_d.data(), mode, dbeta_ref.data(), dgamma_ref.data()});

    const bool in_place = s.arr.in_place && v.dx;  // dx written over dy
    refill(dxb.storage, sentinel<float>());
    refill(dyb.storage, sentinel<float>());
    (in_place ? dxb : dyb).scatter(dy);
    const TensorView<const float> dyv = in_place ? dxb.cview() : dyb.cview();
    const auto dy_before = s.small() && !in_place ? dyb.storage : std::vector<float>();
    std::vector<float> dgamma(g.c, sentinel<float>()), dbeta(g.c, sentinel<float>());
    normkit::batch_norm_backward<float>(
        xb.cview(), dyv, v.dx ? dxb.view() : TensorView<float>{}, maybe(s.gamma, v.gamma), mean,
        invstd, v.dgamma_dbeta ? std::span(dgamma) : std::span<float>(),
        v.dgamma_dbeta ? std::span(dbeta) : std::span<float>(), mode);

    if (v.dx) {
      std::vector<double> dx_scale(g.c);
      for (int64_t c = 0; c < g.c; ++c)
        dx_scale[c] = (v.gamma ? std::fabs(double{s.gamma[c]}) : 1.0) * invstd_d[c] * max_dy[c];
      dx_got = dxb.gather();
      EXPECT_TRUE(all_close("dx", dx_got, dx_ref, kDx, &g, &dx_scale));
      EXPECT_TRUE(dxb.padding_is(sentinel<float>(), "dx"));
    } else {
      EXPECT_TRUE(std::all_of(dxb.storage.begin(), dxb.storage.end(),
                              [](float e) { return same_bits(e, sentinel<float>()); }))
          << "dx was not passed, yet its buffer changed";
    }
    if (v.dgamma_dbeta) {
      EXPECT_TRUE(all_close("dgamma", dgamma, dgamma_ref, kSum, nullptr, &sum_abs_dy_xhat));
      EXPECT_TRUE(all_close("dbeta", dbeta, dbeta_ref, kSum, nullptr, &sum_abs_dy));
    }
    if (!x_before.empty()) {
      EXPECT_TRUE(bitwise_equal("x (input)", xb.storage, x_before));
    }
    if (!dy_before.empty()) {
      EXPECT_TRUE(bitwise_equal("dy (input)", dyb.storage, dy_before));
    }
  }
}

// A group of cases run by one test: one layout and stride form, every C and M.
struct Group {
  Layout layout;
  Kind kind;
  std::vector<int64_t> channels, sizes;
  std::string name;
};

void PrintTo(const Group& group, std::ostream* os) { *os << group.name; }

class FastVsReference : public ::testing::TestWithParam<Group> {
 protected:
  template <class F>
  void for_each_case(F&& check) {
    const Group& group = GetParam();
    for (const int64_t c : group.channels)
      for (const int64_t m : group.sizes) {
        check(Case{group.layout, c, m, group.kind});
        if (HasFatalFailure()) return;
      }
  }
};

TEST_P(FastVsReference, ForwardTraining) { for_each_case(check_forward_training); }
TEST_P(FastVsReference, ForwardInference) { for_each_case(check_forward_inference); }
TEST_P(FastVsReference, BackwardTraining) {
  for_each_case([](const Case& k) { check_backward(k, BackwardMode::training); });
}
TEST_P(FastVsReference, BackwardFrozen) {
  for_each_case([](const Case& k) { check_backward(k, BackwardMode::frozen); });
}

// 96: a 64-lane and a 32-lane register block in the rows form (rows_loops.hpp).
const std::vector<int64_t> kChannels = {1, 3, 16, 17, 64, 96, 1000};
const std::vector<int64_t> kSizes = {2, 3, 7, 1024, 50000};

// Every layout over every (C, M) pair, one test per layout and C, except
// C = 1000 with M = 50000 (200 MB per tensor): that pair runs in the two
// layouts with kernels of their own (Big below).
std::vector<Group> dense_sweep() {
  std::vector<Group> groups;
  for (const Layout layout : kAllLayouts)
    for (const int64_t c : kChannels) {
      std::vector<int64_t> sizes = kSizes;
      if (c == 1000) sizes.pop_back();
      groups.push_back({layout, Kind::dense, {c}, sizes,
                        std::string(normkit::to_string(layout)) + "_C" + std::to_string(c)});
    }
  return groups;
}

std::vector<Group> big_cases() {
  return {{Layout::NCHW, Kind::dense, {1000}, {50000}, "NCHW_C1000_M50000"},
          {Layout::NHWC, Kind::dense, {1000}, {50000}, "NHWC_C1000_M50000"}};
}

// Views with padding and foreign strides (outputs' padding must survive), one
// test per layout and stride form, each over C in {1, 3, 16, 17, 64} and
// M in {2, 7, 30, 1024}, plus one long reduction (C 17, M 50000) per form.
std::vector<Group> strided_cases() {
  std::vector<Group> groups;
  auto add = [&](Layout layout, Kind kind) {
    groups.push_back({layout, kind, {1, 3, 16, 17, 64}, {2, 7, 30, 1024},
                      std::string(normkit::to_string(layout)) + "_" + kind_name(kind)});
  };
  for (const Layout layout : {Layout::NC, Layout::NLC, Layout::NHWC, Layout::NDHWC})
    add(layout, Kind::rows_padded);
  for (const Layout layout : {Layout::NCL, Layout::NCHW, Layout::NCDHW}) {
    add(layout, Kind::outer_padded);
    add(layout, Kind::channel_padded);
  }
  add(Layout::NCHW, Kind::nchw_channels_last);
  add(Layout::NCHW, Kind::nchw_channels_last_padded);
  for (const Layout layout : {Layout::NC, Layout::NCHW, Layout::NHWC}) {
    add(layout, Kind::mixed);
    add(layout, Kind::in_place);
  }
  for (const auto& [layout, kind] : std::vector<std::pair<Layout, Kind>>{
           {Layout::NHWC, Kind::rows_padded},
           {Layout::NCHW, Kind::outer_padded},
           {Layout::NCHW, Kind::channel_padded},
           {Layout::NCHW, Kind::nchw_channels_last_padded},
           {Layout::NHWC, Kind::mixed},
           {Layout::NCHW, Kind::in_place}})
    groups.push_back({layout, kind, {17}, {50000},
                      std::string(normkit::to_string(layout)) + "_" + kind_name(kind) +
                          "_C17_M50000"});
  return groups;
}

std::string param_name(const ::testing::TestParamInfo<Group>& info) {
  return test_name_safe(info.param.name);
}

INSTANTIATE_TEST_SUITE_P(Dense, FastVsReference, ::testing::ValuesIn(dense_sweep()), param_name);
INSTANTIATE_TEST_SUITE_P(Big, FastVsReference, ::testing::ValuesIn(big_cases()), param_name);
INSTANTIATE_TEST_SUITE_P(Strided, FastVsReference, ::testing::ValuesIn(strided_cases()),
                         param_name);

// That the float API runs a fast kernel for the common forms at all (else the
// tests above would compare the reference with itself): test_dispatch.cpp.

}  // namespace
