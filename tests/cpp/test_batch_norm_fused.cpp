// Fused BN+ReLU and BN+Add+ReLU (batch_norm_fused.hpp): the float API (fast
// kernels) against the double API (reference) and against the unfused float
// sequence (batch_norm_* then relu / add+relu: bit for bit); the mask's bits and bit order;
// finite-difference gradients; determinism across thread counts; errors.
//
// Tolerances are those of test_batch_norm_fast.cpp (see its header): y 2e-6
// (here with unit-sized z added: one more rounding), dx 2e-6 of |γ|·invstd·max|dy|,
// dγ/dβ 1e-6 of Σ|g·x̂| / Σ|g|, statistics 1e-6. The mask is exact: each bit
// must equal (y > 0) of the y written next to it, and must equal the
// reference's (p > 0) wherever |p| exceeds 1e-4 (closer to 0, float and
// double may legitimately round to different sides).
#include <array>
#include <limits>

#include "normkit/batch_norm_fused.hpp"
#include "test_support.hpp"

namespace {

using namespace normkit_test;
using normkit::BackwardMode;
using normkit::TensorView;

constexpr Tolerance kY{2e-6, 2e-6};
constexpr Tolerance kDx{2e-6, 2e-6};
constexpr Tolerance kSum{1e-6, 1e-6};
constexpr double kEps = 1e-5, kMomentum = 0.1;
constexpr double kKink = 1e-4;

bool bit_of(const std::vector<uint8_t>& mask, int64_t k) { return (mask[k / 8] >> (k % 8)) & 1u; }

// rank[canonical index] = bit index of that element (its rank in memory order).
std::vector<int64_t> memory_ranks(const Arrangement& a) {
  std::vector<std::pair<int64_t, int64_t>> by_offset;
  for_each_element(a, [&](int64_t i, int64_t offset) { by_offset.push_back({offset, i}); });
  std::sort(by_offset.begin(), by_offset.end());
  std::vector<int64_t> rank(by_offset.size());
  for (size_t k = 0; k < by_offset.size(); ++k) rank[by_offset[k].second] = static_cast<int64_t>(k);
  return rank;
}

struct Case {
  std::string name;
  Arrangement arr;
  bool fast = true;  // a fast kernel takes it (else the reference runs)
};

void PrintTo(const Case& c, std::ostream* os) { *os << c.name << " " << c.arr.describe(); }

std::vector<Case> cases() {
  std::vector<Case> out;
  auto add = [&](std::string name, Arrangement a) { out.push_back({std::move(name), std::move(a)}); };
  const Logical odd{3, 5, {7, 3}};       // 315 elements: mask tail, runs not multiples of 8
  const Logical long_runs{2, 3, {70, 61}};  // inner 4270 > one piece; 25620 elements
  const Logical many_rows{3, 7, {30, 31}};  // 2790 rows: many chunks and stripes
  const Logical wide{2, 70, {3, 1}};       // C not a multiple of 8 in rows
  const Logical blocks{3, 128, {5, 7}};     // rows whose channels are all in 64-lane blocks
  const Logical long_rows{2, 320, {3, 5}};  // as blocks, more channels than BN blocks
  const Logical narrow_block{3, 96, {5, 7}};  // a 64-lane block, then a 32-lane one
  const Logical runs_of_49{5, 3, {7, 7}};   // planes runs of 33-63 values: two mask words
  for (const Logical& g :
       {odd, long_runs, many_rows, wide, blocks, long_rows, narrow_block, runs_of_49}) {
    const std::string shape = std::to_string(g.n) + "x" + std::to_string(g.c) + "x" +
                              std::to_string(g.spatial[0]) + "x" + std::to_string(g.spatial[1]);
    add("NCHW_" + shape, dense(Layout::NCHW, g));
    add("NHWC_" + shape, dense(Layout::NHWC, g));
    add("channels_last_" + shape, nchw_channels_last(g));
  }
  add("NC", dense(Layout::NC, {37, 11, {}}));
  add("NC_column_units", dense(Layout::NC, {5, 300, {}}));  // units of 256 and 44 channels
  add("NCL", dense(Layout::NCL, {3, 4, {13}}));
  add("NLC", dense(Layout::NLC, {3, 9, {13}}));
  add("NCDHW", dense(Layout::NCDHW, {2, 3, {3, 4, 5}}));
  add("NDHWC", dense(Layout::NDHWC, {2, 3, {3, 4, 5}}));
  add("NCHW_outer_padded", outer_padded(Layout::NCHW, odd, 5));
  add("NCHW_channel_padded", channel_padded(Layout::NCHW, odd, 3));
  add("NHWC_rows_padded", rows_padded(Layout::NHWC, odd, 3));
  add("NHWC_blocks_rows_padded", rows_padded(Layout::NHWC, blocks, 3));
  add("channels_last_padded", nchw_channels_last(odd, 2));
  // Inner stride 2: no fast path, the reference runs.
  out.push_back({"NCHW_inner_stride_2",
                 with_strides(Layout::NCHW, odd, {2 * 5 * 21, 2 * 21, 2 * 3, 2}), false});
  return out;
}

struct Data {
  Logical g;
  std::vector<float> x, z, dy, gamma, beta, rm0, rv0;
};

Data make_data(const Logical& g, const std::string& name) {
  Rng rng(seed_of(name));
  Data d{g, {}, {}, {}, {}, {}, {}, {}};
  std::vector<double> mean(g.c), stddev(g.c);
  for (int64_t c = 0; c < g.c; ++c) {
    mean[c] = rng.uniform(-2, 2);
    stddev[c] = rng.uniform(0.3, 2);
  }
  d.x = channel_data(g, mean, stddev, rng);
  d.z = uniform_floats(g.numel(), -1, 1, rng);
  d.dy = uniform_floats(g.numel(), -1, 1, rng);
  d.gamma = uniform_floats(g.c, 0.5, 1.5, rng);
  d.beta = uniform_floats(g.c, -1, 1, rng);
  d.rm0 = uniform_floats(g.c, -1, 1, rng);
  d.rv0 = uniform_floats(g.c, 0.5, 2, rng);
  return d;
}

// The per-channel scale of dx (|γ|·invstd·max|g|) and of dγ, dβ (Σ|g·x̂|, Σ|g|).
struct GradientScales {
  std::vector<double> dx, dgamma, dbeta;
};
GradientScales gradient_scales(const Logical& g, const std::vector<float>& x,
                               const std::vector<double>& gvals, const std::vector<float>& gamma,
                               const std::vector<double>& mean, const std::vector<double>& invstd) {
  GradientScales s{std::vector<double>(g.c, 0), std::vector<double>(g.c, 0),
                   std::vector<double>(g.c, 0)};
  std::vector<double> max_g(g.c, 0);
  for (int64_t i = 0; i < g.numel(); ++i) {
    const int64_t c = g.channel_of(i);
    max_g[c] = std::max(max_g[c], std::fabs(gvals[i]));
    s.dgamma[c] += std::fabs(gvals[i] * (x[i] - mean[c]) * invstd[c]);
    s.dbeta[c] += std::fabs(gvals[i]);
  }
  for (int64_t c = 0; c < g.c; ++c) s.dx[c] = std::fabs(gamma[c]) * invstd[c] * max_g[c];
  return s;
}

class FusedVsReference : public ::testing::TestWithParam<Case> {};

void check_case(const Case& cs, bool add, bool training) {
  SCOPED_TRACE(cs.name + (add ? " add" : "") + (training ? " training" : " inference") + " " +
               cs.arr.describe());
  const Logical& g = cs.arr.logical;
  const Data d = make_data(g, cs.name + (add ? "+" : ""));
  const int64_t numel = g.numel();
  const auto bytes = static_cast<size_t>(normkit::relu_mask_bytes(numel));
  const auto rank = memory_ranks(cs.arr);

  // ---- reference: the double API on canonical data (canonical bit order)
  const auto xd = convert<double>(d.x), zd = convert<double>(d.z), dyd = convert<double>(d.dy);
  const auto gd = convert<double>(d.gamma), bd = convert<double>(d.beta);
  std::vector<double> y_ref(numel), mean_ref(g.c), invstd_ref(g.c);
  auto rm_ref = convert<double>(d.rm0), rv_ref = convert<double>(d.rv0);
  std::vector<uint8_t> mask_ref(bytes, 0xff);
  const auto xcv = canonical_view<const double>(xd.data(), g);
  const auto zcv = canonical_view<const double>(zd.data(), g);
  const auto ycv = canonical_view<double>(y_ref.data(), g);
  if (training) {
    if (add)
      normkit::batch_norm_add_relu_forward_training<double>(xcv, zcv, ycv, mask_ref, gd, bd,
                                                            {mean_ref, invstd_ref},
                                                            {rm_ref, rv_ref}, {kEps, kMomentum});
    else
      normkit::batch_norm_relu_forward_training<double>(xcv, ycv, mask_ref, gd, bd,
                                                        {mean_ref, invstd_ref}, {rm_ref, rv_ref},
                                                        {kEps, kMomentum});
  } else {
    mean_ref = rm_ref;
    normkit::batch_norm_invstd<double>(rv_ref, kEps, invstd_ref);
    if (add)
      normkit::batch_norm_add_relu_forward_inference<double>(xcv, zcv, ycv, mask_ref, gd, bd,
                                                             rm_ref, rv_ref, kEps);
    else
      normkit::batch_norm_relu_forward_inference<double>(xcv, ycv, mask_ref, gd, bd, rm_ref,
                                                         rv_ref, kEps);
  }
  // Pre-activations in double, for the mask check away from the kink.
  std::vector<double> pre(numel);
  for (int64_t i = 0; i < numel; ++i) {
    const int64_t c = g.channel_of(i);
    pre[i] = (xd[i] - mean_ref[c]) * invstd_ref[c] * gd[c] + bd[c] + (add ? zd[i] : 0.0);
  }

  // ---- fast: the float API on the case's view
  Buffer<float> xb(cs.arr), zb(cs.arr), yb(cs.arr), dyb(cs.arr), dxb(cs.arr), dzb(cs.arr);
  xb.scatter(d.x);
  zb.scatter(d.z);
  dyb.scatter(d.dy);
  std::vector<uint8_t> mask(bytes, 0xa5);
  std::vector<float> mean(g.c), invstd(g.c);
  auto rm = d.rm0, rv = d.rv0;
  if (training) {
    if (add)
      normkit::batch_norm_add_relu_forward_training<float>(xb.cview(), zb.cview(), yb.view(), mask,
                                                           d.gamma, d.beta, {mean, invstd},
                                                           {rm, rv}, {kEps, kMomentum});
    else
      normkit::batch_norm_relu_forward_training<float>(xb.cview(), yb.view(), mask, d.gamma,
                                                       d.beta, {mean, invstd}, {rm, rv},
                                                       {kEps, kMomentum});
  } else {
    if (add)
      normkit::batch_norm_add_relu_forward_inference<float>(xb.cview(), zb.cview(), yb.view(),
                                                            mask, d.gamma, d.beta, rm, rv, kEps);
    else
      normkit::batch_norm_relu_forward_inference<float>(xb.cview(), yb.view(), mask, d.gamma,
                                                        d.beta, rm, rv, kEps);
    normkit::batch_norm_invstd<float>(rv, kEps, invstd);
    mean = rm;
  }
  const auto y = yb.gather();
  EXPECT_TRUE(all_close("y vs reference", y, y_ref, kY, &g));
  EXPECT_TRUE(yb.padding_is(sentinel<float>(), "y"));
  if (!training) {
    // Without a mask, few rows take column units as BN's inference does (with a
    // mask, its bits packed over all channels, they do not): the same y.
    Buffer<float> nb(cs.arr);
    if (add)
      normkit::batch_norm_add_relu_forward_inference<float>(xb.cview(), zb.cview(), nb.view(), {},
                                                            d.gamma, d.beta, d.rm0, d.rv0, kEps);
    else
      normkit::batch_norm_relu_forward_inference<float>(xb.cview(), nb.view(), {}, d.gamma,
                                                        d.beta, d.rm0, d.rv0, kEps);
    EXPECT_TRUE(bitwise_equal("y without a mask", nb.gather(), y));
    EXPECT_TRUE(nb.padding_is(sentinel<float>(), "y without a mask"));
  }
  if (training) {
    std::vector<double> sigma(g.c);
    for (int64_t c = 0; c < g.c; ++c) sigma[c] = 1.0 / invstd_ref[c];
    EXPECT_TRUE(all_close("save_mean", mean, mean_ref, kSum, nullptr, &sigma));
    EXPECT_TRUE(all_close("save_invstd", invstd, invstd_ref, {0.0, 1e-6}));
    EXPECT_TRUE(all_close("running_mean", rm, rm_ref, kSum, nullptr, &sigma));
    EXPECT_TRUE(all_close("running_var", rv, rv_ref, {0.0, 1e-6}));
  }

  // The mask: bit rank[i] is (y > 0), and the reference's bit i away from the kink.
  int64_t wrong_self = 0, wrong_ref = 0, compared = 0;
  for (int64_t i = 0; i < numel; ++i) {
    const bool bit = bit_of(mask, rank[i]);
    wrong_self += bit != (y[i] > 0);
    if (std::fabs(pre[i]) > kKink) {
      ++compared;
      wrong_ref += bit != bit_of(mask_ref, i);
      wrong_ref += bit != (pre[i] > 0);
    }
  }
  EXPECT_EQ(wrong_self, 0) << "mask bits that disagree with y > 0";
  EXPECT_EQ(wrong_ref, 0) << "mask bits that disagree with the reference";
  EXPECT_GT(compared, numel * 9 / 10);
  if (numel % 8) {
    EXPECT_EQ(mask[bytes - 1] >> (numel % 8), 0) << "unused bits of the last byte";
    EXPECT_EQ(mask_ref[bytes - 1] >> (numel % 8), 0) << "unused bits of the reference's last byte";
  }

  // ---- the unfused float sequence, BN then (add and) relu, bit for bit where a
  // fast kernel runs: the fused kernels take their statistics and gradient sums
  // from BN's kernels, and the engine relies on it (it fuses "batchnorm; relu",
  // and a synchronized or probed model runs them unfused). The reference rounds
  // BN(x) + z once, in double, which the float sequence cannot.
  const auto same = [&](const char* what, const auto& got, const auto& want, const Tolerance& tol,
                        const std::vector<double>* scale) {
    return cs.fast ? bitwise_equal(what, got, want) : all_close(what, got, want, tol, &g, scale);
  };
  {
    Buffer<float> ub(cs.arr);
    std::vector<float> umean(g.c), uinvstd(g.c);
    auto urm = d.rm0, urv = d.rv0;
    if (training)
      normkit::batch_norm_forward_training<float>(xb.cview(), ub.view(), d.gamma, d.beta,
                                                  {umean, uinvstd}, {urm, urv}, {kEps, kMomentum});
    else
      normkit::batch_norm_forward_inference<float>(xb.cview(), ub.view(), d.gamma, d.beta, d.rm0,
                                                   d.rv0, kEps);
    auto u = ub.gather();
    for (int64_t i = 0; i < numel; ++i) {
      const float p = add ? u[i] + d.z[i] : u[i];
      u[i] = p < 0.0f ? 0.0f : p;
    }
    EXPECT_TRUE(same("y vs unfused BN then relu", y, u, kY, nullptr));
    if (training) {
      EXPECT_TRUE(bitwise_equal("save_mean vs unfused", mean, umean));
      EXPECT_TRUE(bitwise_equal("save_invstd vs unfused", invstd, uinvstd));
      EXPECT_TRUE(bitwise_equal("running_mean vs unfused", rm, urm));
      EXPECT_TRUE(bitwise_equal("running_var vs unfused", rv, urv));
    }
  }

  // ---- backward, from the fast mask; the reference gets it in canonical order
  std::vector<uint8_t> mask_canonical(bytes, 0);
  std::vector<double> gvals(numel);
  for (int64_t i = 0; i < numel; ++i)
    if (bit_of(mask, rank[i])) {
      mask_canonical[i / 8] = static_cast<uint8_t>(mask_canonical[i / 8] | (1u << (i % 8)));
      gvals[i] = d.dy[i];
    }
  const BackwardMode mode = training ? BackwardMode::training : BackwardMode::frozen;
  std::vector<double> dx_ref(numel), dz_ref(numel), dgamma_ref(g.c), dbeta_ref(g.c);
  const auto dycv = canonical_view<const double>(dyd.data(), g);
  const auto meand = convert<double>(mean), invstdd = convert<double>(invstd);
  if (add)
    normkit::batch_norm_add_relu_backward<double>(xcv, dycv, mask_canonical,
                                                  canonical_view<double>(dx_ref.data(), g),
                                                  canonical_view<double>(dz_ref.data(), g), gd,
                                                  meand, invstdd, dgamma_ref, dbeta_ref, mode);
  else
    normkit::batch_norm_relu_backward<double>(xcv, dycv, mask_canonical,
                                              canonical_view<double>(dx_ref.data(), g), gd, meand,
                                              invstdd, dgamma_ref, dbeta_ref, mode);
  std::vector<float> dgamma(g.c), dbeta(g.c);
  if (add)
    normkit::batch_norm_add_relu_backward<float>(xb.cview(), dyb.cview(), mask, dxb.view(),
                                                 dzb.view(), d.gamma, mean, invstd, dgamma, dbeta,
                                                 mode);
  else
    normkit::batch_norm_relu_backward<float>(xb.cview(), dyb.cview(), mask, dxb.view(), d.gamma,
                                             mean, invstd, dgamma, dbeta, mode);
  const auto scales = gradient_scales(g, d.x, gvals, d.gamma, meand, invstdd);
  const auto dx = dxb.gather();
  EXPECT_TRUE(all_close("dx vs reference", dx, dx_ref, kDx, &g, &scales.dx));
  EXPECT_TRUE(all_close("dgamma vs reference", dgamma, dgamma_ref, kSum, nullptr, &scales.dgamma));
  EXPECT_TRUE(all_close("dbeta vs reference", dbeta, dbeta_ref, kSum, nullptr, &scales.dbeta));
  EXPECT_TRUE(dxb.padding_is(sentinel<float>(), "dx"));
  if (add) {
    // dz = mask ? dy : 0 exactly.
    EXPECT_TRUE(bitwise_equal("dz", dzb.gather(), convert<float>(gvals)));
    EXPECT_TRUE(all_close("dz reference", dz_ref, gvals, {0, 0}));
    EXPECT_TRUE(dzb.padding_is(sentinel<float>(), "dz"));
  }
  // The unfused sequence: g = mask ? dy : 0 as a tensor, then BN backward.
  {
    Buffer<float> gb(cs.arr), ub(cs.arr);
    gb.scatter(gvals);
    std::vector<float> ug(g.c), ubeta(g.c);
    normkit::batch_norm_backward<float>(xb.cview(), gb.cview(), ub.view(), d.gamma, mean, invstd,
                                        ug, ubeta, mode);
    EXPECT_TRUE(same("dx vs unfused", dx, ub.gather(), kDx, &scales.dx));
    EXPECT_TRUE(bitwise_equal("dgamma vs unfused", dgamma, ug));
    EXPECT_TRUE(bitwise_equal("dbeta vs unfused", dbeta, ubeta));
  }
  // Only dγ, dβ: the same sums.
  {
    std::vector<float> dgamma2(g.c), dbeta2(g.c);
    normkit::batch_norm_relu_backward<float>(xb.cview(), dyb.cview(), mask, {}, d.gamma, mean,
                                             invstd, dgamma2, dbeta2, mode);
    EXPECT_TRUE(bitwise_equal("dgamma without dx", dgamma2, dgamma));
    EXPECT_TRUE(bitwise_equal("dbeta without dx", dbeta2, dbeta));
  }
}

TEST_P(FusedVsReference, ReluTraining) { check_case(GetParam(), false, true); }
TEST_P(FusedVsReference, AddReluTraining) { check_case(GetParam(), true, true); }
TEST_P(FusedVsReference, ReluInference) { check_case(GetParam(), false, false); }
TEST_P(FusedVsReference, AddReluInference) { check_case(GetParam(), true, false); }

INSTANTIATE_TEST_SUITE_P(BatchNormFused, FusedVsReference, ::testing::ValuesIn(cases()), ByName{});

// Outputs of 6-13 MB, larger than two threads' L2: y (and the mask from it),
// dx and dz go out through the streamed buffer (src/cpu/streamed_output.hpp),
// dx and dz as two outputs in one; NCHW by runs, by units of short planes and,
// in training, by blocks of 7×7 planes side by side (leaf::channel_block).
INSTANTIATE_TEST_SUITE_P(
    Streamed, FusedVsReference,
    ::testing::Values(Case{"NCHW_56x56", dense(Layout::NCHW, {64, 16, {56, 56}})},
                      Case{"NCHW_8x8", dense(Layout::NCHW, {2048, 16, {8, 8}})},
                      Case{"NCHW_7x7_blocks", dense(Layout::NCHW, {64, 512, {7, 7}})},
                      Case{"NHWC_C64", dense(Layout::NHWC, {64, 64, {28, 28}})}),
    ByName{});

// Channels-last BN+Add+ReLU backward streams dx and dz straight from its loop
// on AVX-512 CPUs when the two lie at the same place of a cache line, and
// through the streamed buffer otherwise (cpu::streams_straight): the
// same dx and dz, bit for bit, also each alone and over dy.
TEST(FusedStreamedOutputs, DxAndDzStraightOrThroughTheBufferAreTheSame) {
  const Logical g{64, 64, {28, 28}};  // 12.8 MB per tensor: streamed at 2 threads
  const Arrangement arr = dense(Layout::NHWC, g);
  const Data d = make_data(g, "dx and dz streamed");
  Buffer<float> xb(arr), zb(arr), yb(arr), dyb(arr);
  xb.scatter(d.x);
  zb.scatter(d.z);
  dyb.scatter(d.dy);
  ThreadCount threads(2);
  std::vector<uint8_t> mask(static_cast<size_t>(normkit::relu_mask_bytes(g.numel())));
  std::vector<float> mean(g.c), invstd(g.c), rm = d.rm0, rv = d.rv0;
  normkit::batch_norm_add_relu_forward_training<float>(xb.cview(), zb.cview(), yb.view(), mask,
                                                       d.gamma, d.beta, {mean, invstd}, {rm, rv});
  // dx `dx_shift` floats past the start of a line (4: partial lines at either
  // end of each thread's rows, lines across the ends of rows, mask bits read
  // at a shift); dz at the same place of a line, or 4 floats further.
  const auto backward = [&](int64_t dx_shift, int64_t dz_shift) {
    std::vector<float> storage(static_cast<size_t>(2 * g.numel() + 64));
    const auto at = reinterpret_cast<uintptr_t>(storage.data()) % 64 / sizeof(float);
    float* const dx = storage.data() + (16 - at) % 16 + dx_shift;
    float* const dz = dx + g.numel() + 16 + dz_shift;
    std::vector<float> dgamma(g.c), dbeta(g.c);
    normkit::batch_norm_add_relu_backward<float>(
        xb.cview(), dyb.cview(), mask, TensorView<float>::strided(dx, arr.sizes, arr.strides,
                                                                  arr.layout),
        TensorView<float>::strided(dz, arr.sizes, arr.strides, arr.layout), d.gamma, mean,
        invstd, dgamma, dbeta);
    return std::make_pair(std::vector<float>(dx, dx + g.numel()),
                          std::vector<float>(dz, dz + g.numel()));
  };
  const auto [dx_buffered, dz_buffered] = backward(0, 4);
  for (const int64_t dx_shift : {0, 4}) {
    SCOPED_TRACE("dx " + std::to_string(dx_shift) + " floats past a line");
    const auto [dx_straight, dz_straight] = backward(dx_shift, 0);
    EXPECT_TRUE(bitwise_equal("dx", dx_straight, dx_buffered));
    EXPECT_TRUE(bitwise_equal("dz", dz_straight, dz_buffered));
  }
  // One output alone, which always lines up with itself (straight on
  // AVX-512): dx or dz of BN+Add+ReLU, BN+ReLU's dx (the same g = mask ? dy :
  // 0), and BN+ReLU's dx over dy, where every line must be read before it is
  // streamed.
  const TensorView<float> none;
  const auto alone = [&](bool want_dx, bool add) {
    Buffer<float> out(arr);
    std::vector<float> dgamma(g.c), dbeta(g.c);
    if (add)
      normkit::batch_norm_add_relu_backward<float>(xb.cview(), dyb.cview(), mask,
                                                   want_dx ? out.view() : none,
                                                   want_dx ? none : out.view(), d.gamma, mean,
                                                   invstd, dgamma, dbeta);
    else
      normkit::batch_norm_relu_backward<float>(xb.cview(), dyb.cview(), mask, out.view(),
                                               d.gamma, mean, invstd, dgamma, dbeta);
    return out.storage;  // memory order, as dx_buffered
  };
  EXPECT_TRUE(bitwise_equal("dx alone", alone(true, true), dx_buffered));
  EXPECT_TRUE(bitwise_equal("dz alone", alone(false, true), dz_buffered));
  EXPECT_TRUE(bitwise_equal("BN+ReLU dx", alone(true, false), dx_buffered));
  Buffer<float> dydx(arr);
  dydx.scatter(d.dy);
  std::vector<float> dgamma(g.c), dbeta(g.c);
  normkit::batch_norm_relu_backward<float>(xb.cview(), dydx.cview(), mask, dydx.view(), d.gamma,
                                           mean, invstd, dgamma, dbeta);
  EXPECT_TRUE(bitwise_equal("BN+ReLU dx over dy", dydx.storage, dx_buffered));
}

// The documented bit order on a tiny dense NCHW and NHWC tensor, by hand.
// ceil(numel / 8) without overflow up to the largest int64; negative sizes are errors.
TEST(BatchNormFusedMask, MaskBytesForEveryCount) {
  for (const auto& [numel, bytes] : std::vector<std::pair<int64_t, int64_t>>{
           {0, 0}, {1, 1}, {7, 1}, {8, 1}, {9, 2}, {64, 8}, {65, 9},
           {std::numeric_limits<int64_t>::max(), int64_t{1} << 60}})
    EXPECT_EQ(normkit::relu_mask_bytes(numel), bytes) << numel;
  for (const int64_t negative : {int64_t{-1}, int64_t{-5}, std::numeric_limits<int64_t>::min()})
    EXPECT_THROW(normkit::relu_mask_bytes(negative), normkit::Error) << negative;
}

TEST(BatchNormFusedMask, BitOrderIsMemoryOrder) {
  // x: N=1, C=2, H=1, W=5; channel 0 = [-2, -1, 0, 1, 2] (mean 0), channel 1 = reversed.
  const std::vector<float> nchw = {-2, -1, 0, 1, 2, 2, 1, 0, -1, -2};
  std::vector<float> y(10);
  std::vector<uint8_t> mask(2, 0xff);
  normkit::batch_norm_relu_forward_training<float>(
      TensorView<const float>::contiguous(nchw.data(), {1, 2, 1, 5}, Layout::NCHW),
      TensorView<float>::contiguous(y.data(), {1, 2, 1, 5}, Layout::NCHW), mask, {}, {}, {}, {});
  // Elements 3, 4 (channel 0) and 5, 6 (channel 1) are positive.
  EXPECT_EQ(mask[0], 0b01111000);
  EXPECT_EQ(mask[1], 0b00);
  // The same tensor in NHWC memory: element k = w·C + c.
  std::vector<float> nhwc(10);
  for (int w = 0; w < 5; ++w)
    for (int c = 0; c < 2; ++c) nhwc[w * 2 + c] = nchw[c * 5 + w];
  std::fill(mask.begin(), mask.end(), 0xff);
  normkit::batch_norm_relu_forward_training<float>(
      TensorView<const float>::contiguous(nhwc.data(), {1, 1, 5, 2}, Layout::NHWC),
      TensorView<float>::contiguous(y.data(), {1, 1, 5, 2}, Layout::NHWC), mask, {}, {}, {}, {});
  // Positive: (w0,c1), (w1,c1), (w3,c0), (w4,c0) -> bits 1, 3, 6, 8.
  EXPECT_EQ(mask[0], 0b01001010);
  EXPECT_EQ(mask[1], 0b01);
}

// Finite differences of L = Σ w·y through the double API, with every
// pre-activation kept away from the ReLU kink.
TEST(BatchNormFusedGradients, FiniteDifferences) {
  for (const bool add : {false, true}) {
    SCOPED_TRACE(add ? "BN+Add+ReLU" : "BN+ReLU");
    const Logical g{3, 2, {2, 3}};
    const int64_t n = g.numel();
    Rng rng(seed_of(add ? "fd add" : "fd"));
    std::vector<double> x(n), z(n), w(n), gamma{1.3, 0.7}, beta{0.2, -0.4};
    for (auto& v : x) v = rng.uniform(-2, 2);
    for (auto& v : w) v = rng.uniform(-1, 1);
    // z = s - BN(x), s away from 0, so that p = s.
    std::vector<double> bn(n), mean(g.c), invstd(g.c);
    normkit::batch_norm_forward_training<double>(canonical_view<const double>(x.data(), g),
                                                 canonical_view<double>(bn.data(), g), gamma, beta,
                                                 {mean, invstd}, {});
    for (int64_t i = 0; i < n; ++i) {
      const double s = (rng.uniform() < 0.5 ? -1 : 1) * rng.uniform(0.2, 1.0);
      z[i] = add ? s - bn[i] : 0.0;
    }
    if (!add) {
      for (int64_t i = 0; i < n; ++i) ASSERT_GT(std::fabs(bn[i]), 1e-3) << "data near the kink";
    }
    std::vector<uint8_t> mask(static_cast<size_t>(normkit::relu_mask_bytes(n)));
    auto loss = [&](const std::vector<double>& xv, const std::vector<double>& zv,
                    const std::vector<double>& gv, const std::vector<double>& bv) {
      std::vector<double> y(n), m(g.c), s(g.c);
      if (add)
        normkit::batch_norm_add_relu_forward_training<double>(
            canonical_view<const double>(xv.data(), g), canonical_view<const double>(zv.data(), g),
            canonical_view<double>(y.data(), g), mask, gv, bv, {m, s}, {});
      else
        normkit::batch_norm_relu_forward_training<double>(
            canonical_view<const double>(xv.data(), g), canonical_view<double>(y.data(), g), mask,
            gv, bv, {m, s}, {});
      double l = 0;
      for (int64_t i = 0; i < n; ++i) l += w[i] * y[i];
      return l;
    };
    loss(x, z, gamma, beta);  // the mask of the point itself
    const auto mask0 = mask;
    std::vector<double> dx(n), dz(n), dgamma(g.c), dbeta(g.c);
    if (add)
      normkit::batch_norm_add_relu_backward<double>(
          canonical_view<const double>(x.data(), g), canonical_view<const double>(w.data(), g),
          mask0, canonical_view<double>(dx.data(), g), canonical_view<double>(dz.data(), g), gamma,
          mean, invstd, dgamma, dbeta);
    else
      normkit::batch_norm_relu_backward<double>(canonical_view<const double>(x.data(), g),
                                                canonical_view<const double>(w.data(), g), mask0,
                                                canonical_view<double>(dx.data(), g), gamma, mean,
                                                invstd, dgamma, dbeta);
    const double h = 1e-6;
    auto numeric = [&](std::vector<double>& v, size_t k) {
      const double saved = v[k];
      v[k] = saved + h;
      const double up = loss(x, z, gamma, beta);
      v[k] = saved - h;
      const double down = loss(x, z, gamma, beta);
      v[k] = saved;
      return (up - down) / (2 * h);
    };
    for (size_t k = 0; k < static_cast<size_t>(n); ++k) {
      EXPECT_NEAR(dx[k], numeric(x, k), 1e-6) << "dx[" << k << "]";
      if (add) {
        EXPECT_NEAR(dz[k], numeric(z, k), 1e-6) << "dz[" << k << "]";
      }
    }
    for (size_t c = 0; c < 2; ++c) {
      EXPECT_NEAR(dgamma[c], numeric(gamma, c), 1e-6) << "dgamma[" << c << "]";
      EXPECT_NEAR(dbeta[c], numeric(beta, c), 1e-6) << "dbeta[" << c << "]";
    }
  }
}

// Bitwise identical outputs for 1, 2 and 3 threads, on problems big enough to
// be split (planes channel at a time and in phases; rows in stripes).
TEST(BatchNormFusedDeterminism, ThreadCounts) {
  const std::vector<Case> big = {
      {"NCHW C5 phases", dense(Layout::NCHW, {8, 5, {50, 53}})},
      {"NCHW C24 channels", dense(Layout::NCHW, {4, 24, {33, 35}})},
      // 749 KB, three pieces per channel: statistics then the output in memory
      // order with 1 and 2 threads, a channel at a time with 3
      // (leaf_loops.hpp, forward_channel_at_a_time).
      {"NCHW C24 both plans", dense(Layout::NCHW, {13, 24, {24, 25}})},
      // 5 MB of 7×7 planes: streamed with 1 and 2 threads (blocks of channels
      // forward, dx in memory order backward), not with 3 (an L2 of 1.7 to 2.5
      // MB; test_batch_norm_numerics.cpp, NCHW_C512_7x7_plans).
      {"NCHW 7x7 plans", dense(Layout::NCHW, {50, 512, {7, 7}})},
      {"NHWC", dense(Layout::NHWC, {8, 13, {31, 33}})},
  };
  for (const Case& cs : big) {
    SCOPED_TRACE(cs.name);
    const Logical& g = cs.arr.logical;
    const Data d = make_data(g, cs.name);
    Buffer<float> xb(cs.arr), zb(cs.arr), dyb(cs.arr);
    xb.scatter(d.x);
    zb.scatter(d.z);
    dyb.scatter(d.dy);
    struct Out {
      std::vector<float> y, mean, invstd, rm, rv, dx, dz, dgamma, dbeta;
      std::vector<uint8_t> mask;
    };
    auto run = [&](int threads) {
      ThreadCount scope(threads);
      Out o;
      Buffer<float> yb(cs.arr), dxb(cs.arr), dzb(cs.arr);
      o.mask.assign(static_cast<size_t>(normkit::relu_mask_bytes(g.numel())), 0);
      o.mean.resize(g.c);
      o.invstd.resize(g.c);
      o.rm = d.rm0;
      o.rv = d.rv0;
      o.dgamma.resize(g.c);
      o.dbeta.resize(g.c);
      normkit::batch_norm_add_relu_forward_training<float>(xb.cview(), zb.cview(), yb.view(),
                                                           o.mask, d.gamma, d.beta,
                                                           {o.mean, o.invstd}, {o.rm, o.rv});
      normkit::batch_norm_add_relu_backward<float>(xb.cview(), dyb.cview(), o.mask, dxb.view(),
                                                   dzb.view(), d.gamma, o.mean, o.invstd,
                                                   o.dgamma, o.dbeta);
      o.y = yb.storage;
      o.dx = dxb.storage;
      o.dz = dzb.storage;
      return o;
    };
    const Out one = run(1);
    for (const int threads : {2, 3}) {
      SCOPED_TRACE(std::to_string(threads) + " threads");
      const Out other = run(threads);
      EXPECT_TRUE(bitwise_equal("y", other.y, one.y));
      EXPECT_EQ(other.mask, one.mask);
      EXPECT_TRUE(bitwise_equal("save_mean", other.mean, one.mean));
      EXPECT_TRUE(bitwise_equal("save_invstd", other.invstd, one.invstd));
      EXPECT_TRUE(bitwise_equal("running_mean", other.rm, one.rm));
      EXPECT_TRUE(bitwise_equal("running_var", other.rv, one.rv));
      EXPECT_TRUE(bitwise_equal("dx", other.dx, one.dx));
      EXPECT_TRUE(bitwise_equal("dz", other.dz, one.dz));
      EXPECT_TRUE(bitwise_equal("dgamma", other.dgamma, one.dgamma));
      EXPECT_TRUE(bitwise_equal("dbeta", other.dbeta, one.dbeta));
    }
  }
}

// Bad arguments raise normkit::Error naming the problem, and nothing changes.
TEST(BatchNormFusedErrors, RejectedBeforeAnythingChanges) {
  const Logical g{2, 3, {3, 5}};  // 90 elements: 12 mask bytes
  const int64_t n = g.numel();
  std::vector<float> x(n, 1.0f), z(n, 0.5f), y(n, -7.0f), dy(n, 1.0f), dx(n, -7.0f), dz(n, -7.0f);
  for (int64_t i = 0; i < n; ++i) x[i] = static_cast<float>(i % 7);
  std::vector<float> gamma(3, 1.0f), beta(3, 0.0f), rm(3, 0.25f), rv(3, 2.0f), mean(3, 9.0f),
      invstd(3, 9.0f), dgamma(3, 9.0f), dbeta(3, 9.0f);
  std::vector<uint8_t> mask(12, 0x5a), small(11, 0x5a);
  const auto xv = TensorView<const float>::contiguous(x.data(), {2, 3, 3, 5}, Layout::NCHW);
  const auto zv = TensorView<const float>::contiguous(z.data(), {2, 3, 3, 5}, Layout::NCHW);
  const auto yv = TensorView<float>::contiguous(y.data(), {2, 3, 3, 5}, Layout::NCHW);
  const auto dyv = TensorView<const float>::contiguous(dy.data(), {2, 3, 3, 5}, Layout::NCHW);
  const auto dxv = TensorView<float>::contiguous(dx.data(), {2, 3, 3, 5}, Layout::NCHW);
  const auto dzv = TensorView<float>::contiguous(dz.data(), {2, 3, 3, 5}, Layout::NCHW);
  const auto z_wrong_shape = TensorView<const float>::contiguous(z.data(), {2, 3, 5, 3}, Layout::NCHW);
  const auto z_nhwc = TensorView<const float>::contiguous(z.data(), {2, 3, 5, 3}, Layout::NHWC);
  const std::array<int64_t, 4> sizes{2, 3, 3, 5}, cl_strides{45, 1, 15, 3};
  const auto z_channels_last = TensorView<const float>::strided(z.data(), sizes, cl_strides, Layout::NCHW);
  const auto invalid = normkit::ErrorKind::invalid_argument;
  const auto before = std::make_tuple(y, rm, rv, mean, invstd, mask, dx, dz, dgamma, dbeta);

  EXPECT_TRUE(throws_error(
      [&] {
        normkit::batch_norm_relu_forward_training<float>(xv, yv, small, gamma, beta,
                                                         {mean, invstd}, {rm, rv});
      },
      invalid, {"mask", "12 bytes", "11"}));
  EXPECT_TRUE(throws_error(
      [&] {
        normkit::batch_norm_add_relu_forward_training<float>(xv, z_wrong_shape, yv, mask, gamma,
                                                             beta, {mean, invstd}, {rm, rv});
      },
      invalid, {"z", "shape"}));
  EXPECT_TRUE(throws_error(
      [&] {
        normkit::batch_norm_add_relu_forward_training<float>(xv, z_nhwc, yv, mask, gamma, beta,
                                                             {mean, invstd}, {rm, rv});
      },
      invalid, {"z"}));
  EXPECT_TRUE(throws_error(
      [&] {
        normkit::batch_norm_add_relu_forward_training<float>(xv, z_channels_last, yv, mask, gamma,
                                                             beta, {mean, invstd}, {rm, rv});
      },
      invalid, {"z", "strides"}));
  EXPECT_TRUE(throws_error(
      [&] {
        normkit::batch_norm_relu_forward_training<float>(xv, yv, mask, std::span(gamma).first(2),
                                                         beta, {mean, invstd}, {rm, rv});
      },
      invalid, {"weight", "3"}));
  EXPECT_TRUE(throws_error(
      [&] {
        normkit::batch_norm_relu_forward_training<float>(xv, yv, mask, gamma, beta, {mean, invstd},
                                                         {rm, rv}, {kEps, 1.5});
      },
      invalid, {"momentum"}));
  EXPECT_TRUE(throws_error(
      [&] {
        normkit::batch_norm_relu_forward_inference<float>(xv, yv, small, gamma, beta, rm, rv);
      },
      invalid, {"mask"}));
  EXPECT_TRUE(throws_error(
      [&] {
        normkit::batch_norm_add_relu_forward_inference<float>(xv, zv, yv, mask, gamma, beta, rm,
                                                              rv, -1.0);
      },
      invalid, {"eps"}));
  EXPECT_TRUE(throws_error(
      [&] {
        normkit::batch_norm_relu_backward<float>(xv, dyv, {}, dxv, gamma, mean, invstd, dgamma,
                                                 dbeta);
      },
      invalid, {"mask", "required"}));
  EXPECT_TRUE(throws_error(
      [&] {
        normkit::batch_norm_add_relu_backward<float>(xv, dyv, {}, dxv, dzv, gamma, mean, invstd,
                                                     dgamma, dbeta);
      },
      invalid, {"mask", "required"}));
  EXPECT_TRUE(throws_error(
      [&] {
        normkit::batch_norm_relu_backward<float>(xv, dyv, small, dxv, gamma, mean, invstd, dgamma,
                                                 dbeta);
      },
      invalid, {"mask", "12 bytes"}));
  EXPECT_TRUE(throws_error(
      [&] {
        normkit::batch_norm_add_relu_backward<float>(xv, dyv, mask, dxv, dxv, gamma, mean, invstd,
                                                     dgamma, dbeta);
      },
      invalid, {"dz"}));
  EXPECT_TRUE(throws_error(
      [&] {
        normkit::batch_norm_add_relu_backward<float>(
            xv, dyv, mask, dxv,
            TensorView<float>::strided(dz.data(), sizes, cl_strides, Layout::NCHW), gamma, mean,
            invstd, dgamma, dbeta);
      },
      invalid, {"dz", "strides"}));
  EXPECT_TRUE(throws_error(
      [&] {
        normkit::batch_norm_relu_backward<float>(xv, dyv, mask, dxv, gamma,
                                                 std::span(mean).first(1), invstd, dgamma, dbeta);
      },
      invalid, {"mean"}));
  EXPECT_EQ(before, std::make_tuple(y, rm, rv, mean, invstd, mask, dx, dz, dgamma, dbeta));

  // NaN in x: y and the mask are written, statistics are not.
  x[4] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_TRUE(throws_error(
      [&] {
        normkit::batch_norm_relu_forward_training<float>(xv, yv, mask, gamma, beta, {mean, invstd},
                                                         {rm, rv});
      },
      normkit::ErrorKind::runtime, {"NaN"}));
  EXPECT_EQ(std::get<1>(before), rm);
  EXPECT_EQ(std::get<2>(before), rv);
  EXPECT_EQ(std::get<3>(before), mean);
}

}  // namespace

namespace {

// y may overwrite x (or z) in place, and z may be x itself: relu(BN(x) + x).
TEST(BatchNormFusedInPlace, SameResultsAsOutOfPlace) {
  for (const Layout layout : {Layout::NCHW, Layout::NHWC}) {
    SCOPED_TRACE(std::string(normkit::to_string(layout)));
    const Logical g{3, 5, {7, 9}};
    const Arrangement arr = dense(layout, g);
    const Data d = make_data(g, "in place");
    const auto bytes = static_cast<size_t>(normkit::relu_mask_bytes(g.numel()));
    Buffer<float> xb(arr), zb(arr), yb(arr);
    xb.scatter(d.x);
    zb.scatter(d.z);
    std::vector<uint8_t> mask(bytes), mask2(bytes);
    std::vector<float> mean(g.c), invstd(g.c), mean2(g.c), invstd2(g.c);
    normkit::batch_norm_add_relu_forward_training<float>(xb.cview(), zb.cview(), yb.view(), mask,
                                                         d.gamma, d.beta, {mean, invstd}, {});
    Buffer<float> inplace(arr);
    inplace.scatter(d.x);
    normkit::batch_norm_add_relu_forward_training<float>(inplace.cview(), zb.cview(),
                                                         inplace.view(), mask2, d.gamma, d.beta,
                                                         {mean2, invstd2}, {});
    EXPECT_TRUE(bitwise_equal("y in place of x", inplace.storage, yb.storage));
    EXPECT_EQ(mask2, mask);
    EXPECT_TRUE(bitwise_equal("save_mean", mean2, mean));

    // z = x: the same as an out-of-place z holding x's values.
    Buffer<float> zx(arr), y_alias(arr), y_copy(arr);
    zx.scatter(d.x);
    normkit::batch_norm_add_relu_forward_training<float>(xb.cview(), xb.cview(), y_alias.view(),
                                                         mask, d.gamma, d.beta, {}, {});
    normkit::batch_norm_add_relu_forward_training<float>(xb.cview(), zx.cview(), y_copy.view(),
                                                         mask2, d.gamma, d.beta, {}, {});
    EXPECT_TRUE(bitwise_equal("y with z = x", y_alias.storage, y_copy.storage));
    EXPECT_EQ(mask2, mask);

    // Backward: dx may overwrite dy.
    Buffer<float> dyb(arr), dxb(arr);
    dyb.scatter(d.dy);
    std::vector<float> dgamma(g.c), dbeta(g.c), dgamma2(g.c), dbeta2(g.c);
    normkit::batch_norm_relu_backward<float>(xb.cview(), dyb.cview(), mask, dxb.view(), d.gamma,
                                             mean, invstd, dgamma, dbeta);
    normkit::batch_norm_relu_backward<float>(xb.cview(), dyb.cview(), mask, dyb.view(), d.gamma,
                                             mean, invstd, dgamma2, dbeta2);
    EXPECT_TRUE(bitwise_equal("dx in place of dy", dyb.storage, dxb.storage));
    EXPECT_TRUE(bitwise_equal("dgamma", dgamma2, dgamma));
  }
}

}  // namespace
