// The implementation lists (src/cpu/implementations.cpp, core/dispatch.hpp),
// family by family.
//
// 1. The common forms run a fast entry: the differential tests of each family
//    (test_batch_norm_fast.cpp, ...) prove something about the fast kernels
//    only if the float API really runs one for those forms.
// 2. Every entry of every list is run directly against the reference on every
//    case it accepts (XNNPACK's way), not only the entry the dispatcher picks
//    first: the same problem struct, inputs scattered into the case's strides
//    with NaN padding, outputs starting as NaN. An entry that accepts a case
//    must compute it; padding must stay untouched.
//
// Tolerances are the families' own (derived in test_batch_norm_fast.cpp's
// header): y 2e-6; dx 2e-6 (group norm 4e-6) of |γ|·invstd·max|dy|; sums 1e-6
// of the sum of their terms' sizes; statistics 1e-6 (mean: of σ).
#include <algorithm>
#include <array>
#include <map>
#include <mutex>
#include <optional>
#include <string>

#include "core/dispatch.hpp"
#include "core/norm_checks.hpp"
#include "kernels/batch_norm.hpp"
#include "kernels/batch_norm_fused.hpp"
#include "kernels/group_norm.hpp"
#include "kernels/layer_norm.hpp"
#include "test_support.hpp"

namespace {

using namespace normkit_test;
using normkit::BackwardMode;
using normkit::Geometry;
using normkit::Moments;
using normkit::SampleGeometry;
namespace bn = normkit::kernels::bn;
namespace bn_fused = normkit::kernels::bn_fused;
namespace gn = normkit::kernels::gn;
namespace ln = normkit::kernels::ln;

constexpr Tolerance kY{2e-6, 2e-6};
constexpr Tolerance kDx{2e-6, 2e-6};
constexpr Tolerance kGroupDx{4e-6, 4e-6};
constexpr Tolerance kSum{1e-6, 1e-6};
constexpr Tolerance kMean{1e-6, 1e-6};
constexpr Tolerance kRelative{0.0, 1e-6};
constexpr double kEps = 1e-5;

// ---------------------------------------------------------------- cases

// x's arrangement and the one of the outputs and gradients (usually x's).
struct Case {
  std::string name;
  Arrangement x, out;
  bool common = false;  // a form the fast paths are meant for
  int64_t groups = 1;   // group norm
};

std::vector<Case> tensor_cases() {
  const Logical nchw{4, 16, {16, 16}}, ncl{4, 16, {64}}, nc{256, 16, {}}, odd{3, 6, {7, 5}};
  const Logical short_runs{8, 6, {7, 7}}, wide{2, 300, {3, 3}}, long_rows{64, 1030, {}};
  std::vector<Case> out;
  auto add = [&](std::string name, Arrangement x, bool common, int64_t groups,
                 std::optional<Arrangement> y = std::nullopt) {
    Arrangement o = y ? *y : x;
    out.push_back({std::move(name), std::move(x), std::move(o), common, groups});
  };
  add("dense NCHW", dense(Layout::NCHW, nchw), true, 4);
  add("dense NCL", dense(Layout::NCL, ncl), true, 8);
  add("dense NHWC", dense(Layout::NHWC, nchw), true, 4);
  add("dense NC", dense(Layout::NC, nc), true, 2);
  add("NCHW with channels-last strides", nchw_channels_last(nchw), true, 4);
  add("padded NHWC rows", rows_padded(Layout::NHWC, nchw, 3), true, 2);
  add("NCHW batch slice (outer padding)", outer_padded(Layout::NCHW, nchw, 5), true, 16);
  add("NCHW channel padding", channel_padded(Layout::NCHW, odd, 3), false, 3);
  add("NCDHW", dense(Layout::NCDHW, {2, 3, {3, 4, 5}}), false, 3);
  add("NDHWC", dense(Layout::NDHWC, {2, 3, {3, 4, 5}}), false, 1);
  add("NCHW 7x7 runs", dense(Layout::NCHW, short_runs), false, 2);
  add("NHWC 300 channels", dense(Layout::NHWC, wide), false, 30);
  add("NC 1030 channels", dense(Layout::NC, long_rows), false, 10);
  add("NCHW in, padded NCHW out", dense(Layout::NCHW, odd), false, 2,
      outer_padded(Layout::NCHW, odd, 4));
  add("NCHW in, channels-last out", dense(Layout::NCHW, {3, 6, {7, 5}}), false, 2,
      nchw_channels_last({3, 6, {7, 5}}));
  add("NCHW inner stride 2", with_strides(Layout::NCHW, odd, {2 * 6 * 35, 2 * 35, 2 * 5, 2}), false,
      3);
  return out;
}

// Canonical inputs of one case: per-channel means and spreads away from 0 and 1.
struct Inputs {
  std::vector<float> x, z, dy, gamma, beta;
};
Inputs inputs_for(const Logical& g, const std::string& name) {
  Rng rng(seed_of(name));
  std::vector<double> mean(g.c), stddev(g.c);
  for (int64_t c = 0; c < g.c; ++c) {
    mean[c] = rng.uniform(-2, 2);
    stddev[c] = rng.uniform(0.5, 2);
  }
  Inputs in;
  in.x = channel_data(g, mean, stddev, rng);
  in.z = uniform_floats(g.numel(), -1, 1, rng);
  in.dy = uniform_floats(g.numel(), -1, 1, rng);
  in.gamma = uniform_floats(g.c, 0.5, 1.5, rng);
  in.beta = uniform_floats(g.c, -1, 1, rng);
  return in;
}

// The tensors of one case as the kernels see them: x, z and dy scattered into
// their strides (padding NaN), geometries as the public functions compute them.
struct Views {
  Buffer<float> x, z, dy;
  Geometry gx, gout;

  explicit Views(const Case& k, const Inputs& in) : x(k.x), z(k.out), dy(k.out) {
    x.scatter(in.x);
    z.scatter(in.z);
    dy.scatter(in.dy);
    gx = normkit::geometry_of(x.cview(), "x");
    gout = normkit::geometry_of(dy.cview(), "out");
    normkit::detail::unify<float>(x.cview(), gx, {{&gout, dy.cview()}});
  }
  Buffer<float> output() const { return Buffer<float>(dy.arrangement); }
};

// Calls f(channel, offset in x, offset in an output) for every element.
template <class F>
void for_each(const Geometry& gx, const Geometry& gout, F&& f) {
  for (int64_t o = 0; o < gx.outer; ++o)
    for (int64_t c = 0; c < gx.channels; ++c)
      for (int64_t i = 0; i < gx.inner; ++i) f(c, gx.offset(o, c, i), gout.offset(o, c, i));
}

// An output of the entry against the reference's: logical elements within
// `tol` of it (scale per channel), every other element still the NaN it started as.
template <class ForEach>
::testing::AssertionResult same_output(std::string_view what, const Buffer<float>& fast,
                                       const Buffer<float>& ref, Tolerance tol,
                                       const std::vector<double>& scale, ForEach&& walk) {
  std::vector<float> got, want;
  std::vector<double> scales;
  std::vector<uint8_t> logical(fast.storage.size(), 0);
  walk([&](int64_t c, int64_t, int64_t offset) {
    got.push_back(fast.storage[offset]);
    want.push_back(ref.storage[offset]);
    scales.push_back(scale[c]);
    logical[offset] = 1;
  });
  for (size_t k = 0; k < logical.size(); ++k)
    if (!logical[k] && !same_bits(fast.storage[k], sentinel<float>()))
      return ::testing::AssertionFailure() << what << ": padding at offset " << k << " written";
  return all_close(what, got, want, tol, nullptr, &scales);
}

template <class T>
::testing::AssertionResult same_values(std::string_view what, const std::vector<T>& got,
                                       const std::vector<T>& want, Tolerance tol,
                                       const std::vector<double>& scale) {
  return all_close(what, got, want, tol, nullptr, &scale);
}

::testing::AssertionResult same_moments(std::string_view what, const std::vector<Moments>& got,
                                        const std::vector<Moments>& want) {
  std::vector<double> gm, wm, gm2, wm2, sigma;
  for (size_t k = 0; k < got.size(); ++k) {
    if (got[k].count != want[k].count)
      return ::testing::AssertionFailure()
             << what << "[" << k << "]: count " << got[k].count << ", expected " << want[k].count;
    gm.push_back(got[k].mean);
    wm.push_back(want[k].mean);
    gm2.push_back(got[k].m2);
    wm2.push_back(want[k].m2);
    sigma.push_back(std::sqrt(want[k].biased_variance()));
  }
  auto mean = all_close(std::string(what) + " mean", gm, wm, kMean, nullptr, &sigma);
  if (!mean) return mean;
  return all_close(std::string(what) + " M2", gm2, wm2, kRelative);
}

// Which entry the dispatcher picks, "reference" when none.
template <class Impl, class... Shape>
std::string chosen(std::span<const Impl> list, const Shape&... shape) {
  for (const Impl& impl : list)
    if (!impl.decline(shape...)) return impl.name;
  return "reference";
}

// Every entry of a list must have accepted at least one case: otherwise the
// differential half of this file tested nothing for it.
template <class Impl>
void expect_each_ran(std::span<const Impl> list, const std::map<std::string, int>& runs) {
  for (const Impl& impl : list)
    EXPECT_GT(runs.count(impl.name) ? runs.at(impl.name) : 0, 0)
        << impl.name << " accepted none of the cases";
}

// ---------------------------------------------------------------- batch norm

// Per-channel scales of dx (|γ|·invstd·max|dy|) and of dγ, dβ (Σ|dy·x̂|, Σ|dy|).
struct Scales {
  std::vector<double> one, dx, dgamma, dbeta, sigma;
};
Scales bn_scales(const Views& v, const Inputs& in, const std::vector<double>& mean,
                 const std::vector<double>& invstd) {
  const int64_t C = v.gx.channels;
  Scales s{std::vector<double>(C, 1.0), std::vector<double>(C), std::vector<double>(C),
           std::vector<double>(C), std::vector<double>(C)};
  double max_dy = 0;
  for_each(v.gx, v.gout, [&](int64_t c, int64_t xo, int64_t oo) {
    const double dy = v.dy.storage[oo];
    max_dy = std::max(max_dy, std::fabs(dy));
    s.dgamma[c] += std::fabs(dy * (v.x.storage[xo] - mean[c]) * invstd[c]);
    s.dbeta[c] += std::fabs(dy);
  });
  for (int64_t c = 0; c < C; ++c) {
    s.dx[c] = std::fabs(in.gamma[c]) * invstd[c] * max_dy;
    s.sigma[c] = 1.0 / invstd[c];
  }
  return s;
}

// The reference's statistics of a case (the inputs of apply and backward) and its scales.
struct BnReference {
  std::vector<Moments> moments;
  std::vector<double> mean, invstd;
  Scales scales;
  BnReference(const Views& v, const Inputs& in)
      : moments(v.gx.channels), mean(v.gx.channels), invstd(v.gx.channels) {
    bn::ref::moments<float>({v.gx, v.x.storage.data(), moments.data()});
    for (size_t c = 0; c < moments.size(); ++c) {
      mean[c] = moments[c].mean;
      invstd[c] = bn::invstd_of(moments[c].biased_variance(), kEps);
    }
    scales = bn_scales(v, in, mean, invstd);
  }
};

// What a forward reported through its bn::MomentsReport: how often each
// channel, and its moments when reported, which must be the final ones (the
// op computes the running and saved statistics from them there and then).
// An invstd given with the report must be bn::invstd_of's of the moments, bit for bit.
struct MomentsReports {
  const std::vector<Moments>& out;
  std::vector<int> times = std::vector<int>(out.size());
  std::vector<Moments> seen = std::vector<Moments>(out.size());
  int64_t wrong_invstd = 0;
  std::mutex mutex;  // reported from the kernel's threads
  explicit MomentsReports(const std::vector<Moments>& moments) : out(moments) {}
  static void record(const void* context, int64_t c0, int64_t n, const double* invstd) {
    auto& r = *static_cast<MomentsReports*>(const_cast<void*>(context));
    const std::lock_guard lock(r.mutex);
    for (int64_t c = c0; c < c0 + n; ++c) {
      ++r.times[c];
      r.seen[c] = r.out[c];
      if (invstd && !same_bits(invstd[c - c0],
                               bn::invstd_of(r.out[c].m2 / r.out[c].count, kEps)))
        ++r.wrong_invstd;
    }
  }
  bool none() const { return std::all_of(times.begin(), times.end(), [](int t) { return t == 0; }); }
  ::testing::AssertionResult each_once_and_final(std::string_view what) const {
    if (wrong_invstd != 0)
      return ::testing::AssertionFailure() << what << ": " << wrong_invstd
                                           << " channels reported with another invstd";
    for (size_t c = 0; c < out.size(); ++c) {
      if (times[c] != 1)
        return ::testing::AssertionFailure()
               << what << ": channel " << c << " reported " << times[c] << " times";
      if (!same_bits(seen[c].mean, out[c].mean) || !same_bits(seen[c].m2, out[c].m2) ||
          seen[c].count != out[c].count)
        return ::testing::AssertionFailure()
               << what << ": channel " << c << " reported before its moments were final";
    }
    return ::testing::AssertionSuccess();
  }
};

TEST(Dispatch, EveryBatchNormEntryMatchesTheReferenceOnEveryCaseItAccepts) {
  std::map<std::string, int> runs;
  for (const Case& k : tensor_cases()) {
    const Inputs in = inputs_for(k.x.logical, k.name);
    const Views v(k, in);
    const int64_t C = v.gx.channels;
    const BnReference r(v, in);
    const auto& [moments, mean, invstd, s] = r;
    auto walk = [&](auto&& f) { for_each(v.gx, v.gout, f); };
    for (const bn::Impl& impl : bn::implementations()) {
      if (impl.decline(v.gx, std::array{v.gout})) continue;
      SCOPED_TRACE(k.name + " " + k.x.describe() + ", entry " + impl.name);
      ++runs[impl.name];
      const float* x = v.x.storage.data();
      {  // forward (training)
        Buffer<float> y = v.output(), y_ref = v.output();
        std::vector<Moments> m(C), m_ref(C);
        MomentsReports reports(m), ref_reports(m_ref);
        impl.forward({v.gx, v.gout, x, y.storage.data(), in.gamma.data(), in.beta.data(), kEps,
                      m.data(), {&MomentsReports::record, &reports}});
        bn::ref::forward<float>({v.gx, v.gout, x, y_ref.storage.data(), in.gamma.data(),
                                 in.beta.data(), kEps, m_ref.data(),
                                 {&MomentsReports::record, &ref_reports}});
        EXPECT_TRUE(same_output("forward y", y, y_ref, kY, s.one, walk));
        EXPECT_TRUE(same_moments("forward moments", m, m_ref));
        EXPECT_TRUE(reports.each_once_and_final("forward"));
        EXPECT_TRUE(ref_reports.each_once_and_final("reference forward"));
      }
      {  // apply
        Buffer<float> y = v.output(), y_ref = v.output();
        impl.apply({v.gx, v.gout, x, y.storage.data(), in.gamma.data(), nullptr, mean.data(),
                    invstd.data()});
        bn::ref::apply<float>({v.gx, v.gout, x, y_ref.storage.data(), in.gamma.data(), nullptr,
                               mean.data(), invstd.data()});
        EXPECT_TRUE(same_output("apply y", y, y_ref, kY, s.one, walk));
      }
      {  // moments
        std::vector<Moments> m(C);
        impl.moments({v.gx, x, m.data()});
        EXPECT_TRUE(same_moments("moments", m, moments));
      }
      for (const BackwardMode mode : {BackwardMode::training, BackwardMode::frozen})
        for (const bool want_dx : {true, false}) {
          SCOPED_TRACE(std::string(mode == BackwardMode::training ? "training" : "frozen") +
                       (want_dx ? "" : ", no dx"));
          Buffer<float> dx = v.output(), dx_ref = v.output();
          std::vector<double> sum_dy(C), sum_dy_xhat(C), ref_dy(C), ref_dy_xhat(C);
          const float* dy = v.dy.storage.data();
          impl.backward({v.gx, v.gout, v.gout, x, dy, want_dx ? dx.storage.data() : nullptr,
                         in.gamma.data(), mean.data(), invstd.data(), mode, sum_dy.data(),
                         sum_dy_xhat.data()});
          bn::ref::backward<float>({v.gx, v.gout, v.gout, x, dy,
                                    want_dx ? dx_ref.storage.data() : nullptr, in.gamma.data(),
                                    mean.data(), invstd.data(), mode, ref_dy.data(),
                                    ref_dy_xhat.data()});
          if (want_dx) {
            EXPECT_TRUE(same_output("dx", dx, dx_ref, kDx, s.dx, walk));
          } else {
            EXPECT_TRUE(dx.padding_is(sentinel<float>(), "dx (not wanted)"));
          }
          EXPECT_TRUE(same_values("sum_dy", sum_dy, ref_dy, kSum, s.dbeta));
          EXPECT_TRUE(same_values("sum_dy_xhat", sum_dy_xhat, ref_dy_xhat, kSum, s.dgamma));
        }
    }
  }
  expect_each_ran(bn::implementations(), runs);
}

// ---------------------------------------------------------------- fused BN+ReLU

bool bit(const std::vector<uint8_t>& mask, int64_t k) { return (mask[k / 8] >> (k % 8)) & 1u; }

TEST(Dispatch, EveryFusedEntryMatchesTheReferenceOnEveryCaseItAccepts) {
  std::map<std::string, int> runs;
  for (const Case& k : tensor_cases()) {
    const Inputs in = inputs_for(k.x.logical, k.name);
    const Views v(k, in);
    const int64_t C = v.gx.channels, numel = k.x.logical.numel();
    const bn_fused::MaskOrder order = bn_fused::mask_order_of(v.gx);
    const BnReference r(v, in);
    // Named references, not a structured binding: clang 14 cannot capture one in a lambda.
    const std::vector<double>& mean = r.mean;
    const std::vector<double>& invstd = r.invstd;
    const Scales& s = r.scales;
    auto walk = [&](auto&& f) { for_each(v.gx, v.gout, f); };
    const size_t mask_bytes = static_cast<size_t>(normkit::relu_mask_bytes(numel));
    for (const bn_fused::Impl& impl : bn_fused::implementations()) {
      if (impl.decline(v.gx, std::array{v.gout, v.gout}, order)) continue;
      SCOPED_TRACE(k.name + " " + k.x.describe() + ", entry " + impl.name);
      ++runs[impl.name];
      const float* x = v.x.storage.data();
      std::vector<uint8_t> ref_mask(mask_bytes, 0);
      for (const bool training : {true, false})
        for (const bool add : {false, true}) {
          SCOPED_TRACE(std::string(training ? "training" : "inference") + (add ? ", add" : ""));
          Buffer<float> y = v.output(), y_ref = v.output();
          std::vector<uint8_t> mask(mask_bytes, 0), mask_ref(mask_bytes, 0);
          std::vector<Moments> m(C), m_ref(C);
          const float* z = add ? v.z.storage.data() : nullptr;
          MomentsReports reports(m), ref_reports(m_ref);
          auto problem = [&](float* out, uint8_t* bits, Moments* mo, MomentsReports* report) {
            return bn_fused::Forward<float>{
                v.gx,         v.gout,          v.gout,         x,        z,    out, bits,
                order,        in.gamma.data(), in.beta.data(), training, kEps, mo,  mean.data(),
                invstd.data(), {&MomentsReports::record, report}};
          };
          impl.forward(problem(y.storage.data(), mask.data(), m.data(), &reports));
          bn_fused::ref::forward<float>(
              problem(y_ref.storage.data(), mask_ref.data(), m_ref.data(), &ref_reports));
          EXPECT_TRUE(same_output("y", y, y_ref, kY, s.one, walk));
          if (training) {
            EXPECT_TRUE(same_moments("moments", m, m_ref));
            EXPECT_TRUE(reports.each_once_and_final("forward"));
            EXPECT_TRUE(ref_reports.each_once_and_final("reference forward"));
          } else {
            EXPECT_TRUE(reports.none() && ref_reports.none()) << "moments reported in inference";
          }
          // Each bit is (y > 0) of the y written (y matches the reference's above).
          int64_t wrong = 0;
          for (int64_t o = 0; o < v.gx.outer; ++o)
            for (int64_t c = 0; c < C; ++c)
              for (int64_t i = 0; i < v.gx.inner; ++i)
                wrong +=
                    bit(mask, order.bit(o, c, i)) != (y.storage[v.gout.offset(o, c, i)] > 0.0f);
          EXPECT_EQ(wrong, 0) << "mask bits that are not (y > 0)";
          if (training && add) ref_mask = mask_ref;
        }
      for (const BackwardMode mode : {BackwardMode::training, BackwardMode::frozen})
        for (const bool add : {false, true}) {
          SCOPED_TRACE(std::string(mode == BackwardMode::training ? "training" : "frozen") +
                       (add ? ", dz" : ""));
          Buffer<float> dx = v.output(), dx_ref = v.output(), dz = v.output(), dz_ref = v.output();
          std::vector<double> sum_dy(C), sum_dy_xhat(C), ref_dy(C), ref_dy_xhat(C);
          auto problem = [&](float* dxp, float* dzp, double* sd, double* sdx) {
            return bn_fused::Backward<float>{v.gx,
                                             v.gout,
                                             v.gout,
                                             v.gout,
                                             x,
                                             v.dy.storage.data(),
                                             ref_mask.data(),
                                             order,
                                             dxp,
                                             add ? dzp : nullptr,
                                             in.gamma.data(),
                                             mean.data(),
                                             invstd.data(),
                                             mode,
                                             sd,
                                             sdx};
          };
          impl.backward(
              problem(dx.storage.data(), dz.storage.data(), sum_dy.data(), sum_dy_xhat.data()));
          bn_fused::ref::backward<float>(problem(dx_ref.storage.data(), dz_ref.storage.data(),
                                                 ref_dy.data(), ref_dy_xhat.data()));
          EXPECT_TRUE(same_output("dx", dx, dx_ref, kDx, s.dx, walk));
          if (add) {
            EXPECT_TRUE(same_output("dz", dz, dz_ref, {0.0, 0.0}, s.one, walk));
          }
          EXPECT_TRUE(same_values("sum_dy", sum_dy, ref_dy, kSum, s.dbeta));
          EXPECT_TRUE(same_values("sum_dy_xhat", sum_dy_xhat, ref_dy_xhat, kSum, s.dgamma));
        }
    }
  }
  expect_each_ran(bn_fused::implementations(), runs);
}

// ---------------------------------------------------------------- group norm

struct SampleViews {
  Buffer<float> x, dy;
  SampleGeometry gx, gout;
  SampleViews(const Case& k, const Inputs& in) : x(k.x), dy(k.out) {
    x.scatter(in.x);
    dy.scatter(in.dy);
    gx = normkit::sample_geometry_of(x.cview(), "x");
    gout = normkit::sample_geometry_of(dy.cview(), "out");
  }
  Buffer<float> output() const { return Buffer<float>(dy.arrangement); }
};

template <class F>
void for_each(const SampleGeometry& gx, const SampleGeometry& gout, F&& f) {
  for (int64_t n = 0; n < gx.n; ++n)
    for (int64_t c = 0; c < gx.c; ++c)
      for (int64_t s = 0; s < gx.s; ++s) f(c, gx.offset(n, c, s), gout.offset(n, c, s));
}

TEST(Dispatch, EveryGroupNormEntryMatchesTheReferenceOnEveryCaseItAccepts) {
  std::map<std::string, int> runs;
  for (const Case& k : tensor_cases()) {
    const Inputs in = inputs_for(k.x.logical, k.name);
    const SampleViews v(k, in);
    const int64_t C = v.gx.c, G = k.groups, blocks = v.gx.n * G, per_group = C / G;
    const float* x = v.x.storage.data();
    std::vector<Moments> moments(blocks);
    gn::ref::moments<float>({v.gx, x, G, moments.data()});
    std::vector<double> mean(blocks), invstd(blocks);
    for (int64_t b = 0; b < blocks; ++b) {
      mean[b] = moments[b].mean;
      invstd[b] = bn::invstd_of(moments[b].biased_variance(), kEps);
    }
    // Scales: dx per channel with the largest invstd of its blocks; dγ, dβ per channel.
    std::vector<double> one(C, 1.0), dx_scale(C, 0.0), dgamma_scale(C, 0.0), dbeta_scale(C, 0.0);
    double max_dy = 0, max_gamma = 0;
    for (const float g : in.gamma) max_gamma = std::max(max_gamma, std::fabs(double{g}));
    for (int64_t n = 0; n < v.gx.n; ++n)
      for (int64_t c = 0; c < C; ++c) {
        const int64_t b = n * G + c / per_group;
        dx_scale[c] = std::max(dx_scale[c], invstd[b]);
        for (int64_t sp = 0; sp < v.gx.s; ++sp) {
          const double dy = v.dy.storage[v.gout.offset(n, c, sp)];
          max_dy = std::max(max_dy, std::fabs(dy));
          dgamma_scale[c] += std::fabs(dy * (x[v.gx.offset(n, c, sp)] - mean[b]) * invstd[b]);
          dbeta_scale[c] += std::fabs(dy);
        }
      }
    for (auto& d : dx_scale) d *= max_gamma * max_dy;
    auto walk = [&](auto&& f) { for_each(v.gx, v.gout, f); };
    for (const gn::Impl& impl : gn::implementations()) {
      if (impl.decline(v.gx, std::array{v.gout})) continue;
      SCOPED_TRACE(k.name + " " + k.x.describe() + ", entry " + impl.name);
      ++runs[impl.name];
      {
        Buffer<float> y = v.output(), y_ref = v.output();
        std::vector<Moments> m(blocks), m_ref(blocks);
        impl.forward({v.gx, v.gout, x, y.storage.data(), in.gamma.data(), in.beta.data(), G, kEps,
                      m.data()});
        gn::ref::forward<float>({v.gx, v.gout, x, y_ref.storage.data(), in.gamma.data(),
                                 in.beta.data(), G, kEps, m_ref.data()});
        EXPECT_TRUE(same_output("y", y, y_ref, kY, one, walk));
        EXPECT_TRUE(same_moments("forward moments", m, m_ref));
      }
      {
        std::vector<Moments> m(blocks);
        impl.moments({v.gx, x, G, m.data()});
        EXPECT_TRUE(same_moments("moments", m, moments));
      }
      for (const bool want_dx : {true, false}) {
        Buffer<float> dx = v.output(), dx_ref = v.output();
        std::vector<double> dgamma(C), dbeta(C), ref_dgamma(C), ref_dbeta(C);
        impl.backward({v.gx, v.gout, v.gout, x, v.dy.storage.data(),
                       want_dx ? dx.storage.data() : nullptr, in.gamma.data(), G, mean.data(),
                       invstd.data(), dgamma.data(), dbeta.data()});
        gn::ref::backward<float>({v.gx, v.gout, v.gout, x, v.dy.storage.data(),
                                  want_dx ? dx_ref.storage.data() : nullptr, in.gamma.data(), G,
                                  mean.data(), invstd.data(), ref_dgamma.data(), ref_dbeta.data()});
        if (want_dx) {
          EXPECT_TRUE(same_output("dx", dx, dx_ref, kGroupDx, dx_scale, walk));
        }
        EXPECT_TRUE(same_values("dgamma", dgamma, ref_dgamma, kSum, dgamma_scale));
        EXPECT_TRUE(same_values("dbeta", dbeta, ref_dbeta, kSum, dbeta_scale));
      }
    }
  }
  expect_each_ran(gn::implementations(), runs);
}

// ---------------------------------------------------------------- layer norm, RMS norm

struct RowsCase {
  int64_t rows, cols, stride;
  bool common;
};
const std::vector<RowsCase> kRowsCases = {
    {64, 768, 768, true},   {7, 33, 33, true},      {300, 17, 20, false},
    {5, 5000, 5003, false}, {1, 4096, 4096, false},
};

TEST(Dispatch, EveryLayerNormEntryMatchesTheReferenceOnEveryCaseItAccepts) {
  std::map<std::string, int> runs;
  for (const RowsCase& r : kRowsCases) {
    Rng rng(seed_of("rows " + std::to_string(r.rows) + "x" + std::to_string(r.cols)));
    const size_t storage = static_cast<size_t>((r.rows - 1) * r.stride + r.cols);
    std::vector<float> x(storage, sentinel<float>()), dy(storage, sentinel<float>());
    for (int64_t i = 0; i < r.rows; ++i) {
      const double mean = rng.uniform(-2, 2), spread = rng.uniform(0.5, 2);
      for (int64_t j = 0; j < r.cols; ++j) {
        x[i * r.stride + j] = static_cast<float>(mean + spread * rng.uniform(-1.7, 1.7));
        dy[i * r.stride + j] = static_cast<float>(rng.uniform(-1, 1));
      }
    }
    const std::vector<float> gamma = uniform_floats(r.cols, 0.5, 1.5, rng);
    const std::vector<float> beta = uniform_floats(r.cols, -1, 1, rng);
    // Element (row, col) of an output with this case's strides.
    auto compare = [&](const char* what, const std::vector<float>& got,
                       const std::vector<float>& want, Tolerance tol,
                       const std::vector<double>& row_scale) {
      std::vector<float> g, w;
      std::vector<double> sc;
      for (int64_t i = 0; i < r.rows; ++i)
        for (int64_t j = 0; j < r.cols; ++j) {
          g.push_back(got[i * r.stride + j]);
          w.push_back(want[i * r.stride + j]);
          sc.push_back(row_scale[i]);
        }
      for (size_t k = 0; k < got.size(); ++k)
        if (static_cast<int64_t>(k) % r.stride >= r.cols) {
          EXPECT_TRUE(same_bits(got[k], sentinel<float>())) << what << ": padding written";
        }
      return all_close(what, g, w, tol, nullptr, &sc);
    };
    for (const ln::Impl& impl : ln::implementations()) {
      if (impl.decline(r.rows, r.cols)) continue;
      for (const auto centering : {ln::Centering::layer, ln::Centering::rms}) {
        const bool layer = centering == ln::Centering::layer;
        SCOPED_TRACE(std::to_string(r.rows) + " rows x " + std::to_string(r.cols) + ", stride " +
                     std::to_string(r.stride) + (layer ? ", layer" : ", rms") + ", entry " +
                     impl.name);
        ++runs[impl.name];
        std::vector<float> y(storage, sentinel<float>()), y_ref = y;
        std::vector<double> mean(r.rows), invstd(r.rows), ref_mean(r.rows), ref_invstd(r.rows);
        auto forward = [&](float* out, double* m, double* s) {
          return ln::Forward<float>{centering,
                                    r.rows,
                                    r.cols,
                                    x.data(),
                                    r.stride,
                                    out,
                                    r.stride,
                                    gamma.data(),
                                    layer ? beta.data() : nullptr,
                                    kEps,
                                    layer ? m : nullptr,
                                    s};
        };
        impl.forward(forward(y.data(), mean.data(), invstd.data()));
        ln::ref::forward<float>(forward(y_ref.data(), ref_mean.data(), ref_invstd.data()));
        const std::vector<double> ones(r.rows, 1.0);
        std::vector<double> sigma(r.rows), dx_scale(r.rows);
        for (int64_t i = 0; i < r.rows; ++i) {
          sigma[i] = 1.0 / ref_invstd[i];
          dx_scale[i] = 1.5 * ref_invstd[i];  // max|γ|·invstd·max|dy|
        }
        EXPECT_TRUE(compare("y", y, y_ref, kY, ones));
        if (layer) {
          EXPECT_TRUE(same_values("mean", mean, ref_mean, kMean, sigma));
        }
        EXPECT_TRUE(same_values("invstd", invstd, ref_invstd, kRelative, ones));

        std::vector<float> dx(storage, sentinel<float>()), dx_ref = dx;
        std::vector<double> dgamma(r.cols), dbeta(r.cols), ref_dgamma(r.cols), ref_dbeta(r.cols),
            dgamma_scale(r.cols, 0.0), dbeta_scale(r.cols, 0.0);
        for (int64_t i = 0; i < r.rows; ++i)
          for (int64_t j = 0; j < r.cols; ++j) {
            const double d = dy[i * r.stride + j];
            const double centred = x[i * r.stride + j] - (layer ? ref_mean[i] : 0.0);
            dgamma_scale[j] += std::fabs(d * centred * ref_invstd[i]);
            dbeta_scale[j] += std::fabs(d);
          }
        auto backward = [&](float* out, double* dg, double* db) {
          return ln::Backward<float>{centering,
                                     r.rows,
                                     r.cols,
                                     x.data(),
                                     r.stride,
                                     dy.data(),
                                     r.stride,
                                     out,
                                     r.stride,
                                     gamma.data(),
                                     layer ? ref_mean.data() : nullptr,
                                     ref_invstd.data(),
                                     dg,
                                     layer ? db : nullptr};
        };
        impl.backward(backward(dx.data(), dgamma.data(), dbeta.data()));
        ln::ref::backward<float>(backward(dx_ref.data(), ref_dgamma.data(), ref_dbeta.data()));
        EXPECT_TRUE(compare("dx", dx, dx_ref, kDx, dx_scale));
        EXPECT_TRUE(same_values("dgamma", dgamma, ref_dgamma, kSum, dgamma_scale));
        if (layer) {
          EXPECT_TRUE(same_values("dbeta", dbeta, ref_dbeta, kSum, dbeta_scale));
        }
      }
    }
  }
  expect_each_ran(ln::implementations(), runs);
}

// ---------------------------------------------------------------- the common forms

TEST(Dispatch, CommonFormsRunAFastEntryInEveryFamily) {
  for (const Case& k : tensor_cases()) {
    if (!k.common) continue;
    const Inputs in = inputs_for(k.x.logical, k.name);
    const Views v(k, in);
    const SampleViews sv(k, in);
    const std::string form = k.name + ": " + k.x.describe();
    EXPECT_NE(chosen(bn::implementations(), v.gx, std::array{v.gout}), "reference")
        << "batch norm, " << form;
    EXPECT_NE(chosen(bn_fused::implementations(), v.gx, std::array{v.gout, v.gout},
                     bn_fused::mask_order_of(v.gx)),
              "reference")
        << "fused BN+ReLU, " << form;
    EXPECT_NE(chosen(gn::implementations(), sv.gx, std::array{sv.gout}), "reference")
        << "group norm, " << form;
  }
  for (const RowsCase& r : kRowsCases)
    if (r.common) {
      EXPECT_NE(chosen(ln::implementations(), r.rows, r.cols), "reference")
          << "layer norm, " << r.rows << " x " << r.cols;
    }
}

}  // namespace
