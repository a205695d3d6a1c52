#pragma once
// Leaf loops and small helpers shared by the fast CPU kernels (batch norm,
// fused BN+ReLU, group norm, layer norm): the statistics passes over runs of
// contiguous floats, and the plans they share.
//
// Everything here has internal linkage (an unnamed namespace), so every kernel
// file that includes it compiles its own copy with its own target_clones
// resolver: no clone or resolver is shared between translation units, and a
// file's compile options apply to its copy.
// Functions are [[maybe_unused]] because not every file uses every loop.
//
// SIMD: the loops are written over fixed lanes, so the compiler vectorizes them
// without reassociating any sum, and NORMKIT_SIMD_CLONES compiles them for
// x86-64-v4 (AVX-512), x86-64-v3 (AVX2+FMA) and baseline x86-64 with a choice
// at run time. The order of additions is fixed by the source, but the v3/v4
// clones may contract a·b + c into one FMA (one rounding instead of two), which
// the baseline clone cannot: results are bitwise identical for any thread count
// on one machine, and may differ in the last bits between machines that run
// different clones.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <span>

#include "core/parallel.hpp"
#include "core/simd_clones.hpp"
#include "core/workspace.hpp"
#include "cpu/streamed_output.hpp"
#include "normkit/moments.hpp"

namespace normkit::kernels::leaf {
namespace {

// Float sums run over 64 fixed lanes (4 AVX-512 or 8 AVX2 registers: enough
// independent additions to hide their latency), a run's remainder through 8
// more lanes, then one by one; lane totals are added in double. Sums whose
// terms cancel (gradients) run in 32 double lanes.
constexpr int kLanes = 64;
constexpr int kTailLanes = 8;
constexpr int kDoubleLanes = 32;

// Σ of N lanes as a fixed binary tree, in double.
template <int N, class A>
inline double lane_total(const A* acc) {
  if constexpr (N == 1) {
    return static_cast<double>(acc[0]);
  } else {
    return lane_total<N / 2>(acc) + lane_total<N / 2>(acc + N / 2);
  }
}

using normkit::detail::Workspace;

[[maybe_unused]] double param_or(const float* p, int64_t c, double fallback) {
  return p ? static_cast<double>(p[c]) : fallback;
}

// Whole units (channels, blocks) per thread, each unit's statistics then its
// apply while it is in cache, pays off when the units alone keep every thread
// busy; otherwise the units' pieces are spread over the threads in phases.
[[maybe_unused]] bool whole_units_per_thread(int64_t units, int threads) {
  return units % threads == 0 || units >= 8 * threads;
}

// The loops that read runs from memory (the first pass of the statistics,
// the gradient sums) ask for the lines kPrefetchFloats ahead: the planes
// kernels read a channel's runs of a few KB far apart, where the hardware
// prefetchers restart on every run. The second passes read from cache and do
// not ask. Measured: the fused NCHW gradient sums at 1 thread, 2.2-2.3 ms with
// it, 2.8 without (3.5 with g expanded first); at 2 threads, BN's NCHW
// backward at 0.8-0.9× its time without (16×256×28×28, 32×64×56×56) and 0.67-
// 0.83× on 32×2048×7×7, its forward-train at 0.85-0.95×.
// Short runs (7×7: fewer values than kLanes) ask for the lines
// kShortRunPrefetchFloats past each run's start: there lie the runs of a
// channel about five later, which the kernel reaches soon (channels in order).
// 2 KB ahead, as the long runs, 32×2048×7×7 NCHW forward-train took 1.33-1.37×
// a copy against 1.26-1.32 with 1 KB (1 and 2 threads, alternated runs),
// BN+ReLU's 1.40-1.49 against 1.32-1.41 and its backward 2.73-2.89 against
// 2.44-2.68. The long runs keep 2 KB: 1 KB everywhere was slower on
// 32×64×56×56.
constexpr int64_t kPrefetchFloats = 512;
constexpr int64_t kShortRunPrefetchFloats = 256;
// The cache lines of the `Floats` floats `Distance` floats after p (one per
// 16), which may lie past the end of p's array: a prefetch never faults, and
// the address is computed as an integer, not as a pointer out of bounds.
template <int Floats, int64_t Distance = kPrefetchFloats>
inline void prefetch_ahead(const float* p) {
  const uintptr_t ahead = reinterpret_cast<uintptr_t>(p) + Distance * sizeof(float);
  for (int line = 0; line < Floats / 16; ++line)
    __builtin_prefetch(reinterpret_cast<const void*>(ahead + line * 16 * sizeof(float)));
}

// ----- leaf loops over `runs` runs of `len` contiguous floats, `stride` apart -----

// Σ(x - shift): the shift (a value of the data) keeps the float sums small
// when the mean is large compared with the spread.
[[maybe_unused]] NORMKIT_SIMD_CLONES
double shifted_sum_runs(const float* __restrict x, int64_t runs, int64_t len, int64_t stride,
                        float shift) {
  float acc[kLanes] = {}, acc8[kTailLanes] = {};
  double tail = 0;
  for (int64_t r = 0; r < runs; ++r) {
    const float* p = x + r * stride;
    int64_t i = 0;
    for (; i + kLanes <= len; i += kLanes) {
      prefetch_ahead<kLanes>(p + i);
      for (int l = 0; l < kLanes; ++l) acc[l] += p[i + l] - shift;
    }
    for (; i + kTailLanes <= len; i += kTailLanes)
      for (int l = 0; l < kTailLanes; ++l) acc8[l] += p[i + l] - shift;
    for (; i < len; ++i) tail += static_cast<double>(p[i] - shift);
  }
  return lane_total<kLanes>(acc) + lane_total<kTailLanes>(acc8) + tail;
}

// Σd and Σd² with d = x - center; Σd (near 0) corrects Σd² for the distance
// between center and the exact mean (the "corrected two-pass" algorithm).
struct CenteredSums {
  double sum_d, sum_d2;
};
[[maybe_unused]] NORMKIT_SIMD_CLONES
CenteredSums centered_sums_runs(const float* x, int64_t runs, int64_t len, int64_t stride,
                                float center) {
  float acc1[kLanes] = {}, acc2[kLanes] = {}, acc1_8[kTailLanes] = {}, acc2_8[kTailLanes] = {};
  double tail1 = 0, tail2 = 0;
  for (int64_t r = 0; r < runs; ++r) {
    const float* p = x + r * stride;
    int64_t i = 0;
    for (; i + kLanes <= len; i += kLanes)
      for (int l = 0; l < kLanes; ++l) {
        const float d = p[i + l] - center;
        acc1[l] += d;
        acc2[l] += d * d;
      }
    for (; i + kTailLanes <= len; i += kTailLanes)
      for (int l = 0; l < kTailLanes; ++l) {
        const float d = p[i + l] - center;
        acc1_8[l] += d;
        acc2_8[l] += d * d;
      }
    for (; i < len; ++i) {
      const double d = static_cast<double>(p[i] - center);
      tail1 += d;
      tail2 += d * d;
    }
  }
  return {lane_total<kLanes>(acc1) + lane_total<kTailLanes>(acc1_8) + tail1,
          lane_total<kLanes>(acc2) + lane_total<kTailLanes>(acc2_8) + tail2};
}

// The moments of `runs` runs of `len` floats, two passes while they are in
// cache: their mean shifted by their first value, then the corrected sums of
// squares around that mean (rounded to float) in float lanes; the passes are
// `shifted` and `centered` (shifted_sum_runs and centered_sums_runs, or their
// short-run forms).
template <class Shifted, class Centered>
Moments two_pass_moments(const float* x, int64_t runs, int64_t len, int64_t stride,
                         Shifted shifted, Centered centered) {
  const double n = static_cast<double>(runs * len);
  const float shift = x[0];
  const double mean = shift + shifted(x, runs, len, stride, shift) / n;
  const auto center = static_cast<float>(mean);
  const CenteredSums cs = centered(x, runs, len, stride, center);
  return {n, center + cs.sum_d / n, cs.sum_d2 - cs.sum_d * cs.sum_d / n};
}
[[maybe_unused]] Moments run_moments(const float* x, int64_t runs, int64_t len, int64_t stride) {
  return two_pass_moments(x, runs, len, stride, shifted_sum_runs, centered_sums_runs);
}

// Σg and Σg·(x - center) in double lanes (gradient_sums_runs, below): the
// gradient g is not centred, so the second sum cancels heavily.
struct GradientSums {
  double sum_g, sum_g_xc;
};

// ----- batch norm's planes pieces (batch_norm_planes.cpp, batch_norm_fused_planes.cpp) -----
// Both kernels take a piece's statistics and gradient sums from here, so that
// BN+ReLU's are BN's bit for bit: the engine runs "batchnorm; relu" fused and
// must land on the bits of the unfused layers (synchronized BN, probes).

// The sums of leaf::run_moments for runs shorter than kLanes (7×7 = 49, 14 values...), where
// the loops of run_moments would spend most of their time in their tails. Here a lane
// is a position: run r adds its value i into lane (r mod k)·len + i, with k
// runs side by side so that k·len <= kLanes lanes are in use and each sees at
// most runs/k values. The lanes' order of additions is fixed by the geometry,
// as above.
[[maybe_unused]] NORMKIT_SIMD_CLONES
double shifted_sum_short_runs(const float* __restrict x, int64_t runs, int64_t len,
                              int64_t stride, float shift) {
  float acc[kLanes] = {};
  const int64_t k = kLanes / len;
  for (int64_t r = 0, slot = 0; r < runs; ++r, slot = slot + 1 == k ? 0 : slot + 1) {
    const float* __restrict p = x + r * stride;
    prefetch_ahead<kLanes, kShortRunPrefetchFloats>(p);
    float* __restrict a = acc + slot * len;
    for (int64_t i = 0; i < len; ++i) a[i] += p[i] - shift;
  }
  return lane_total<kLanes>(acc);
}

[[maybe_unused]] NORMKIT_SIMD_CLONES
CenteredSums centered_sums_short_runs(const float* __restrict x, int64_t runs, int64_t len,
                                      int64_t stride, float center) {
  float acc1[kLanes] = {}, acc2[kLanes] = {};
  const int64_t k = kLanes / len;
  for (int64_t r = 0, slot = 0; r < runs; ++r, slot = slot + 1 == k ? 0 : slot + 1) {
    const float* __restrict p = x + r * stride;
    float* __restrict a1 = acc1 + slot * len;
    float* __restrict a2 = acc2 + slot * len;
    for (int64_t i = 0; i < len; ++i) {
      const float d = p[i] - center;
      a1[i] += d;
      a2[i] += d * d;
    }
  }
  return {lane_total<kLanes>(acc1), lane_total<kLanes>(acc2)};
}

// ----- the gradient g of the sums: dy (BN), or dy masked by ReLU bits (fused) -----
// The fused kernels (batch_norm_fused_*.cpp) take g = mask ? dy : 0 with the
// mask in bits (relu_mask.hpp). Their loops read the bits themselves, 32 lanes
// at a time, so that x, dy and the bits stream together: expanding g into an
// L1 buffer first and summing it then measured 1.3-1.6x slower than BN's
// loops over the same bytes (1 thread, 32×64×56×56). A masked loop adds exactly
// the values BN's loop adds for g, in the same order, so the fused kernels'
// sums are BN's bit for bit. Run r's first bit is bit_first + r·bit_stride.
struct GradientSource {
  const float* dy;
  int64_t stride;
  const uint8_t* mask = nullptr;
  int64_t bit_first = 0, bit_stride = 0;
};

// `count` (at most 32) bits of mask from bit `first` (>= 0): bit l of the
// result is mask bit first + l. Reads only the bytes that hold them.
inline uint32_t mask_bits(const uint8_t* mask, int64_t first, int count) {
  const auto bit = static_cast<uint64_t>(first);
  const uint8_t* p = mask + bit / 8;
  const auto shift = static_cast<unsigned>(bit % 8);
  if (count == 32) {
    uint32_t lo;
    std::memcpy(&lo, p, 4);
    return shift == 0 ? lo : static_cast<uint32_t>((lo | uint64_t{p[4]} << 32) >> shift);
  }
  uint64_t w = 0;
  for (unsigned j = 0; j < (shift + count + 7) / 8; ++j) w |= uint64_t{p[j]} << (8 * j);
  return static_cast<uint32_t>(w >> shift);
}

// A masked loop over a run first asks for all the cache lines of the run's
// bits: they are a few lines, too few for the hardware prefetchers to pick up,
// and each would be a miss the loop waits for.
inline void prefetch_bits(const uint8_t* mask, int64_t first, int64_t count) {
  const uint8_t* p = mask + static_cast<uint64_t>(first) / 8;
  const uint8_t* end = mask + static_cast<uint64_t>(first + count + 7) / 8;
  for (; p < end; p += 64) __builtin_prefetch(p);
  __builtin_prefetch(end - 1);
}

// g of lane l, given the lanes' mask bits m (32 or 64 of them).
template <bool Masked, class Bits>
[[gnu::always_inline]] inline float lane_gradient(const float* gp, Bits m, int64_t l) {
  float v = gp[l];
  if constexpr (Masked) {  // v's bits and-ed with the lane's bit spread out: integer ops vectorize
    uint32_t u;
    std::memcpy(&u, &v, 4);
    u &= 0u - static_cast<uint32_t>((m >> l) & 1u);
    std::memcpy(&v, &u, 4);
  }
  return v;
}

// The bits of a run of `len` < 64 values from bit `first`: bit i is value i's.
inline uint64_t short_run_bits(const uint8_t* mask, int64_t first, int64_t len) {
  const auto lo = static_cast<int>(std::min<int64_t>(len, 32));
  uint64_t m = mask_bits(mask, first, lo);
  if (len > 32) m |= uint64_t{mask_bits(mask, first + 32, static_cast<int>(len - 32))} << 32;
  return m;
}

// Σg and Σg·(x - center) of `runs` runs of x and g (strided), in 32 double
// lanes, a run's remainder through 8 more, then one by one. Inlined into the
// clones below (BN's and the fused kernels'), each compiled for its
// instruction set.
template <bool Masked>
[[gnu::always_inline]] inline GradientSums gradient_sums_body(const float* __restrict x,
                                                              int64_t x_stride,
                                                              const GradientSource& src,
                                                              int64_t runs, int64_t len,
                                                              float center) {
  const double center_d = center;
  double acc1[kDoubleLanes] = {}, acc2[kDoubleLanes] = {};
  double acc1_8[kTailLanes] = {}, acc2_8[kTailLanes] = {};
  double tail1 = 0, tail2 = 0;
  for (int64_t r = 0; r < runs; ++r) {
    const float* xp = x + r * x_stride;
    const float* gp = src.dy + r * src.stride;
    const int64_t bit = src.bit_first + r * src.bit_stride;
    if constexpr (Masked) prefetch_bits(src.mask, bit, len);
    uint32_t m = ~0u;
    int64_t i = 0;
    for (; i + kDoubleLanes <= len; i += kDoubleLanes) {
      if constexpr (Masked) m = mask_bits(src.mask, bit + i, kDoubleLanes);
      prefetch_ahead<kDoubleLanes>(xp + i);
      prefetch_ahead<kDoubleLanes>(gp + i);
      for (int l = 0; l < kDoubleLanes; ++l) {
        const double g = lane_gradient<Masked>(gp + i, m, l);
        acc1[l] += g;
        acc2[l] += g * (static_cast<double>(xp[i + l]) - center_d);
      }
    }
    for (; i + kTailLanes <= len; i += kTailLanes) {
      if constexpr (Masked) m = mask_bits(src.mask, bit + i, kTailLanes);
      for (int l = 0; l < kTailLanes; ++l) {
        const double g = lane_gradient<Masked>(gp + i, m, l);
        acc1_8[l] += g;
        acc2_8[l] += g * (static_cast<double>(xp[i + l]) - center_d);
      }
    }
    for (; i < len; ++i) {
      if constexpr (Masked) m = mask_bits(src.mask, bit + i, 1);
      const double g = lane_gradient<Masked>(gp + i, m, 0);
      tail1 += g;
      tail2 += g * (static_cast<double>(xp[i]) - center_d);
    }
  }
  return {lane_total<kDoubleLanes>(acc1) + lane_total<kTailLanes>(acc1_8) + tail1,
          lane_total<kDoubleLanes>(acc2) + lane_total<kTailLanes>(acc2_8) + tail2};
}

[[maybe_unused]] NORMKIT_SIMD_CLONES
GradientSums gradient_sums_runs(const float* __restrict x, int64_t x_stride,
                                const float* __restrict dy, int64_t dy_stride, int64_t runs,
                                int64_t len, float center) {
  return gradient_sums_body<false>(x, x_stride, {dy, dy_stride}, runs, len, center);
}

[[maybe_unused]] NORMKIT_SIMD_CLONES
GradientSums gradient_sums_masked_runs(const float* __restrict x, int64_t x_stride,
                                       const GradientSource& src, int64_t runs, int64_t len,
                                       float center) {
  return gradient_sums_body<true>(x, x_stride, src, runs, len, center);
}

// Short runs, as shifted_sum_short_runs, in double lanes (g as in
// gradient_sums_body).
template <bool Masked>
[[gnu::always_inline]] inline GradientSums gradient_sums_short_body(const float* __restrict x,
                                                                    int64_t x_stride,
                                                                    const GradientSource& src,
                                                                    int64_t runs, int64_t len,
                                                                    float center) {
  const double center_d = center;
  double acc1[kLanes] = {}, acc2[kLanes] = {};
  const int64_t k = kLanes / len;
  for (int64_t r = 0, slot = 0; r < runs; ++r, slot = slot + 1 == k ? 0 : slot + 1) {
    const float* __restrict xp = x + r * x_stride;
    const float* __restrict gp = src.dy + r * src.stride;
    prefetch_ahead<kLanes, kShortRunPrefetchFloats>(xp);
    prefetch_ahead<kLanes, kShortRunPrefetchFloats>(gp);
    double* __restrict a1 = acc1 + slot * len;
    double* __restrict a2 = acc2 + slot * len;
    uint64_t m = ~uint64_t{0};
    if constexpr (Masked) m = short_run_bits(src.mask, src.bit_first + r * src.bit_stride, len);
    for (int64_t i = 0; i < len; ++i) {
      const double g = lane_gradient<Masked>(gp, m, i);
      a1[i] += g;
      a2[i] += g * (static_cast<double>(xp[i]) - center_d);
    }
  }
  return {lane_total<kLanes>(acc1), lane_total<kLanes>(acc2)};
}

[[maybe_unused]] NORMKIT_SIMD_CLONES
GradientSums gradient_sums_short_runs(const float* __restrict x, int64_t x_stride,
                                      const float* __restrict dy, int64_t dy_stride,
                                      int64_t runs, int64_t len, float center) {
  return gradient_sums_short_body<false>(x, x_stride, {dy, dy_stride}, runs, len, center);
}

[[maybe_unused]] NORMKIT_SIMD_CLONES
GradientSums gradient_sums_masked_short_runs(const float* __restrict x, int64_t x_stride,
                                             const GradientSource& src, int64_t runs,
                                             int64_t len, float center) {
  return gradient_sums_short_body<true>(x, x_stride, src, runs, len, center);
}

// A piece's moments: run_moments, or for short runs the same two passes with
// a lane per position.
[[maybe_unused]] Moments piece_moments(const float* x, int64_t runs, int64_t len, int64_t stride) {
  if (len >= kLanes) return run_moments(x, runs, len, stride);
  return two_pass_moments(x, runs, len, stride, shifted_sum_short_runs, centered_sums_short_runs);
}

// A piece's Σg and Σg·(x - mean): the double sums run around float(mean), and
// Σg·(mean - float(mean)) is taken off in double.
[[maybe_unused]] GradientSums piece_gradient_sums(const float* x, int64_t x_stride, const float* g,
                                                  int64_t g_stride, int64_t runs, int64_t len,
                                                  double mean) {
  const auto center = static_cast<float>(mean);
  const auto sums_of = len < kLanes ? gradient_sums_short_runs : gradient_sums_runs;
  const GradientSums sums = sums_of(x, x_stride, g, g_stride, runs, len, center);
  return {sums.sum_g, sums.sum_g_xc - sums.sum_g * (mean - center)};
}

// piece_gradient_sums for g from a GradientSource (the fused kernels' masked g).
[[maybe_unused]] GradientSums piece_gradient_sums(const float* x, int64_t x_stride,
                                                  const GradientSource& g, int64_t runs,
                                                  int64_t len, double mean) {
  const auto center = static_cast<float>(mean);
  const auto sums_of = len < kLanes ? gradient_sums_masked_short_runs : gradient_sums_masked_runs;
  const GradientSums sums = sums_of(x, x_stride, g, runs, len, center);
  return {sums.sum_g, sums.sum_g_xc - sums.sum_g * (mean - center)};
}

// ----- batch norm's plans (batch_norm_{planes,rows}.cpp, batch_norm_fused_{planes,rows}.cpp) -----

// Calls f(divide), divide(x) = x / n: as x * (1 / n) when n is a power of two,
// for then 1/n is exact and the product is the quotient bit for bit (both
// are x·2^-k correctly rounded), at a fraction of a division's cost. The
// products the kernels form this way (a float's sums and squares, an M2, in
// double) are exact, never subnormal, so a multiply-add the compiler fuses
// from one rounds as the division's add does. Per-channel finishing with
// thousands of channels and few rows divides 4096 values by the same row count
// several times (bn1d 32x4096, chunks of 16 rows). (n is a count: a whole number.)
template <class F>
[[gnu::always_inline]] inline void with_division_by(double n, F&& f) {
  const auto whole = n >= 1 && n < 0x1p53 ? static_cast<uint64_t>(n) : 0;
  if (whole != 0 && static_cast<double>(whole) == n && (whole & (whole - 1)) == 0)
    f([r = 1.0 / n](double x) __attribute__((always_inline)) { return x * r; });
  else
    f([n](double x) __attribute__((always_inline)) { return x / n; });
}

// The two ends of a rows chunk's moments (n rows), per channel, for the blocked
// and the long-row loops alike. First the point the second pass sums around:
// the first row's value `shift` plus the mean difference from it (Σ in `sum`).
[[gnu::always_inline]] inline void chunk_centers(double n, int64_t channels,
                                                 const float* __restrict shift,
                                                 const float* __restrict sum,
                                                 float* __restrict center) {
  with_division_by(n, [&](auto divide) __attribute__((always_inline)) {
    for (int64_t c = 0; c < channels; ++c)
      center[c] = static_cast<float>(static_cast<double>(shift[c]) + divide(static_cast<double>(sum[c])));
  });
}
// Then mean = center + Σd/n and M2 = Σd² - (Σd)²/n from the second pass's sums.
[[gnu::always_inline]] inline void chunk_moments(double n, int64_t channels,
                                                 const float* __restrict center,
                                                 const float* __restrict sum_d,
                                                 const float* __restrict sum_d2,
                                                 double* __restrict mean, double* __restrict m2) {
  with_division_by(n, [&](auto divide) __attribute__((always_inline)) {
    for (int64_t c = 0; c < channels; ++c) {
      const double sd = sum_d[c];
      mean[c] = center[c] + divide(sd);
      m2[c] = sum_d2[c] - divide(sd * sd);
    }
  });
}

// A planes piece: small enough that its second pass reads from L1.
constexpr int64_t kPieceElements = 4096;
// A rows chunk: at most this many elements and kMaxChunkRows rows (the number
// of float additions per channel accumulator).
constexpr int64_t kRowChunkElements = 65536;
constexpr int64_t kMaxChunkRows = 64;
// Rows chunks are grouped into this many stripes, each merged in order.
constexpr int64_t kMaxStripes = 32;

// Planes ([outer, C, inner], inner contiguous): a channel's elements split
// into pieces, either groups of whole inner runs, or (for long runs)
// fixed-length parts of one run. Depends only on the geometry.
struct Pieces {
  int64_t per_channel;
  int64_t runs_per_piece;  // grouping mode: whole runs per piece
  int64_t parts_per_run;   // splitting mode: parts per run (1 in grouping mode)

  template <class Geometry>
  explicit Pieces(const Geometry& g) {
    if (g.inner >= kPieceElements) {
      runs_per_piece = 1;
      parts_per_run = (g.inner + kPieceElements - 1) / kPieceElements;
      per_channel = g.outer * parts_per_run;
    } else {
      runs_per_piece = std::max<int64_t>(1, kPieceElements / std::max<int64_t>(g.inner, 1));
      parts_per_run = 1;
      per_channel = (g.outer + runs_per_piece - 1) / runs_per_piece;
    }
  }
  struct Span {
    int64_t first_run, runs, first_inner, len;
  };
  template <class Geometry>
  Span span(const Geometry& g, int64_t piece) const {
    if (parts_per_run > 1) {
      const int64_t first_inner = (piece % parts_per_run) * kPieceElements;
      return {piece / parts_per_run, 1, first_inner, std::min(kPieceElements, g.inner - first_inner)};
    }
    const int64_t first_run = piece * runs_per_piece;
    return {first_run, std::min(runs_per_piece, g.outer - first_run), 0, g.inner};
  }
};

// Channel c's piece `s` of planes data x (geometry g): its moments, for BN and
// the fused kernels alike.
template <class Geometry>
Moments piece_moments(const Geometry& g, const float* x, int64_t c, const Pieces::Span& s) {
  return piece_moments(x + g.offset(s.first_run, c, s.first_inner), s.runs, s.len, g.outer_stride);
}
// Channel c's moments: its pieces' merged in order, whatever the plan.
template <class Geometry>
Moments channel_moments(const Geometry& g, const Pieces& pieces, const float* x, int64_t c) {
  Moments m;
  for (int64_t i = 0; i < pieces.per_channel; ++i)
    m.merge(piece_moments(g, x, c, pieces.span(g, i)));
  return m;
}

// The planes forward passes (BN, fused BN+ReLU) work channel at a time, the
// output pass re-reading the channel's x from cache, when x fits in cache (at
// most kInCacheBytesPerThread per thread), or when y is streamed (`stream`,
// cpu/streamed_output.hpp; the training forward only, which reads x twice
// otherwise) in runs long enough to stream and a channel's x stays in L2
// between its passes. Otherwise they read x twice from memory:
// statistics, then the output in memory order. Channel at a time reads and
// writes a channel's runs, one per outer index and far apart: with ordinary
// stores (each line of y read before it is written) it measured 1.1-1.4×
// slower than the two passes on 12.8 MB tensors (28×28 and 7×7 planes) and 2×
// on 128×32×28×28. With y streamed it reads x once and writes y once. Bench,
// forward-train × a copy, two passes -> channel at a time, alternated runs, 1
// and 2 threads: 32×64×56×56 1.45-1.52 -> 1.21-1.25, 16×256×28×28 1.40-1.53 ->
// 1.13-1.23, 128×64×56×56 (1.6 MB a channel) 1.42-1.47 -> 1.33, 4×64×16×28×28
// 1.51-1.57 -> 1.15-1.19; BN+ReLU 32×64×56×56 1.51-1.52 -> 1.27-1.30. (Runs of
// 7×7 or 14×14 values, too short to stream, take blocks of channels instead:
// channel_block.)
constexpr int64_t kInCacheBytesPerThread = int64_t{256} << 10;
template <class Geometry>
bool forward_channel_at_a_time(const Geometry& g, int threads, bool stream) {
  if (!whole_units_per_thread(g.channels, threads)) return false;
  const int64_t channel_bytes = g.reduction_size() * int64_t{sizeof(float)};
  if (g.channels * channel_bytes <= kInCacheBytesPerThread * threads) return true;
  return stream && std::min(g.inner, kPieceElements) >= cpu::kMinStreamedRun &&
         channel_bytes <= cpu::l2_bytes();
}

// Whether the channels' runs of g and of `others` (same extents) lie side by
// side: a span of consecutive channels at one outer index is one run.
template <class Geometry>
bool runs_side_by_side(const Geometry& g, std::initializer_list<Geometry> others) {
  const auto packed = [&](const Geometry& h) {
    return h.channel_stride == g.inner && h.inner_stride == 1;
  };
  return packed(g) && std::all_of(others.begin(), others.end(), packed);
}

// The planes backward (BN, fused BN+ReLU) works a channel at a time when a
// thread owns whole channels: its sums read x and dy from memory, its dx pass
// re-reads them from cache. Except for runs too short to stream, side by side
// (`side_by_side`: in x, dy and the outputs), when dx is streamed (7×7, 14×14
// planes past the caches): a channel's dx would be written in place in short
// runs far apart (each line read before it is written), so the sums are taken
// first and dx is written in memory order, streamed. Bench, backward × a copy,
// alternated runs, 1 and 2 threads: 32×2048×7×7 NCHW 2.85-3.20 -> 2.41-2.68
// (forward+backward 4.12-4.70 -> 3.45-3.85), BN+ReLU 4.51-4.67 -> 2.97-3.05
// (0.97-1.08 -> 0.77-0.78 × the unfused sequence); 64×512×14×14 unchanged
// (2.07-2.16 -> 2.13-2.18). Blocks of channels as in the forward
// (channel_block) measured 2.95-3.25.
template <class Geometry>
bool backward_channel_at_a_time(const Geometry& g, int threads, bool stream, bool side_by_side) {
  return whole_units_per_thread(g.channels, threads) &&
         !(stream && g.inner < cpu::kMinStreamedRun && side_by_side);
}

// Runs too short for the plans above (7×7, 14×14 planes: a channel's runs are
// too short to stream and lie far apart): blocks of consecutive channels, a
// quarter to a half of L2 of x each (the thread's range in equal blocks), each
// thread its own range of channels, block after
// block (forward_by_channel_blocks). A block's statistics read its x from
// memory; its output pass reads x again from L2 and writes, per outer index,
// the block's runs side by side: one run, long enough to stream. Returns the
// channels per block, or 0 when this plan does not apply: the output is not
// streamed, the runs are long enough for the others, the channels' runs do not
// lie side by side (`side_by_side`: in x and the outputs, runs_side_by_side), or
// a block's run per outer index would be too short to stream. Measured (bench, forward-train × a
// copy, two passes -> blocks, alternated runs, 1 and 2 threads): 32×2048×7×7
// NCHW 1.70-1.93 -> 1.37-1.54, BN+ReLU 1.80-1.91 -> 1.49-1.53, 64×512×14×14
// 1.43-1.50 -> 1.27-1.33. Blocks of an eighth of L2 measured 1.47-1.53 (7×7),
// a half 1.48-1.60; asking for the next block's lines during the output pass,
// or reading the block in memory order first, 1.59-1.88.
template <class Geometry>
int64_t channel_block(const Geometry& g, int threads, bool stream, bool side_by_side) {
  if (!stream || g.inner >= cpu::kMinStreamedRun || !side_by_side ||
      !whole_units_per_thread(g.channels, threads))
    return 0;
  const int64_t channel_bytes = g.reduction_size() * int64_t{sizeof(float)};
  const int64_t per_thread = (g.channels + threads - 1) / threads;
  const int64_t blocks = std::max<int64_t>(1, per_thread * channel_bytes / (cpu::l2_bytes() / 4));
  const int64_t block = (per_thread + blocks - 1) / blocks;
  return block * g.inner >= cpu::kMinStreamedRun ? block : 0;
}

// The forward by blocks of `block` channels (channel_block), each of
// `threads` threads its own range of channels, block after block: for each
// block, coeff[c] = channel(c) for its channels (statistics, then the output's
// coefficients), then apply(o, c0, c1, coeff) for each outer index o.
template <class Coefficients, class Channel, class Apply>
void forward_by_channel_blocks(int64_t channels, int64_t outer, int64_t block, int threads,
                               Channel channel, Apply apply) {
  Workspace ws;
  const std::span<Coefficients> coeff = ws.take_for_overwrite<Coefficients>(channels);
  detail::parallel_region(threads, [&] {
    const int64_t t = omp_get_thread_num(), n = omp_get_num_threads();
    const int64_t first = channels * t / n, last = channels * (t + 1) / n;
    for (int64_t c0 = first; c0 < last; c0 += block) {
      const int64_t c1 = std::min(last, c0 + block);
      for (int64_t c = c0; c < c1; ++c) coeff[c] = channel(c);
      for (int64_t o = 0; o < outer; ++o) apply(o, c0, c1, coeff.data());
    }
  });
}

// Calls fn(c, i) for every piece i of every channel c, from inside a parallel
// region, and waits for all threads. When channels alone keep the threads
// busy, each thread takes a range of channels and walks it a piece row at a
// time: its reads are a few long sequential streams (a piece row's runs, across
// its channels), not a channel's short runs far apart. Otherwise the pieces
// are shared out evenly, a channel's pieces together. Pieces are independent,
// so the order does not change any result.
template <class Geometry, class Fn>
void for_each_piece(const Geometry& g, const Pieces& pieces, Fn fn) {
  const int64_t t = omp_get_thread_num(), threads = omp_get_num_threads();
  if (whole_units_per_thread(g.channels, static_cast<int>(threads))) {
    const int64_t first = g.channels * t / threads, last = g.channels * (t + 1) / threads;
    for (int64_t i = 0; i < pieces.per_channel; ++i)
      for (int64_t c = first; c < last; ++c) fn(c, i);
  } else {
    const int64_t total = g.channels * pieces.per_channel;
    for (int64_t u = total * t / threads; u < total * (t + 1) / threads; ++u)
      fn(u / pieces.per_channel, u % pieces.per_channel);
  }
#pragma omp barrier
}

// The planes output pass in memory order: (outer, channel) runs with channels
// fastest, cut into units of about kPieceElements (several short runs, or a
// part of a long one). Nothing is summed here, so any order gives the same bits.
struct ApplyUnits {
  int64_t channels_per_unit, units_per_outer, parts_per_run, part_len, count;
  template <class Geometry>
  explicit ApplyUnits(const Geometry& g) {
    if (g.inner >= kPieceElements) {
      channels_per_unit = 1;
      parts_per_run = (g.inner + kPieceElements - 1) / kPieceElements;
      part_len = kPieceElements;
      units_per_outer = g.channels * parts_per_run;
    } else {
      channels_per_unit = std::max<int64_t>(1, kPieceElements / g.inner);
      parts_per_run = 1;
      part_len = g.inner;
      units_per_outer = (g.channels + channels_per_unit - 1) / channels_per_unit;
    }
    count = g.outer * units_per_outer;
  }

  // Unit `unit`: channels [c0, c0 + channels) of outer index o, each the
  // inner positions [first, first + len).
  struct Span {
    int64_t o, c0, channels, first, len;
  };
  template <class Geometry>
  Span span(const Geometry& g, int64_t unit) const {
    const int64_t o = unit / units_per_outer, within = unit % units_per_outer;
    if (parts_per_run > 1) {
      const int64_t c = within / parts_per_run, first = (within % parts_per_run) * part_len;
      return {o, c, 1, first, std::min(part_len, g.inner - first)};
    }
    const int64_t c0 = within * channels_per_unit;
    return {o, c0, std::min(g.channels, c0 + channels_per_unit) - c0, 0, g.inner};
  }
};

// Rows ([rows, C], channels contiguous): rows cut into chunks of a fixed
// number of rows, and chunks into at most kMaxStripes stripes; both depend only
// on the geometry.
struct RowPlan {
  int64_t rows, channels, chunk_rows, chunks, stripes;
  template <class Geometry>
  explicit RowPlan(const Geometry& g) : rows(g.outer), channels(g.channels) {
    chunk_rows = std::clamp<int64_t>(kRowChunkElements / std::max<int64_t>(channels, 1), 1,
                                     std::min(rows, kMaxChunkRows));
    chunks = (rows + chunk_rows - 1) / chunk_rows;
    stripes = std::min(chunks, kMaxStripes);
  }
  int64_t first_chunk(int64_t stripe) const { return stripe * chunks / stripes; }
  int64_t first_row(int64_t chunk) const { return chunk * chunk_rows; }
  int64_t rows_in(int64_t chunk) const { return std::min(chunk_rows, rows - chunk * chunk_rows); }
};

constexpr int kLineFloats = 16;  // floats per 64-byte cache line

// Requests the lines of rows [r0, r1) of p (rows `stride` apart), columns [c0, c1).
[[gnu::always_inline]] inline void request_lines(const float* p, int64_t stride, int64_t r0,
                                                 int64_t r1, int64_t c0, int64_t c1) {
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t c = c0; c < c1; c += kLineFloats) __builtin_prefetch(p + r * stride + c);
}

// Per-channel moments of a block of B channels over a chunk of rows (B
// contiguous floats per row, rows `stride` apart), vectorized across channels:
// the chunk's mean shifted by its first row, then corrected sums around it.
// The sums stay in registers while the rows go by, and the block's rows in L1
// for the second pass. Every channel's sums run over the rows in order, so a
// channel's result does not depend on B or on the block it falls in (the rows
// kernels of BN and GN pick blocks freely). While the second pass reads from
// cache, the lines of the next chunk (`next`: the same columns of the
// following next_rows rows; none when 0) can be requested, so that its first
// pass does not wait for memory. Always inlined into its caller, so that it is
// compiled for that function's instruction sets (an outlined copy would be
// baseline x86-64, without FMA: other bits).
template <int B>
[[gnu::always_inline]] inline void rows_block_moments(const float* __restrict xb, int64_t stride,
                                                      int64_t rows, double* __restrict mean,
                                                      double* __restrict m2, const float* next,
                                                      int64_t next_rows) {
  const double n = static_cast<double>(rows);
  float shift[B], sum[B] = {}, center[B];
  for (int l = 0; l < B; ++l) shift[l] = xb[l];
  for (int64_t r = 0; r < rows; ++r)
    for (int l = 0; l < B; ++l) sum[l] += xb[r * stride + l] - shift[l];
  chunk_centers(n, B, shift, sum, center);
  float sum_d[B] = {}, sum_d2[B] = {};
  for (int64_t r = 0; r < rows; ++r) {
    if (r < next_rows) request_lines(next, stride, r, r + 1, 0, B);
    for (int l = 0; l < B; ++l) {
      const float d = xb[r * stride + l] - center[l];
      sum_d[l] += d;
      sum_d2[l] += d * d;
    }
  }
  chunk_moments(n, B, center, sum_d, sum_d2, mean, m2);
}

// Chan's merge of (count_b, mean_b[c], m2_b[c]) into (count_a, mean_a[c],
// m2_a[c]) for every channel: Moments::merge, vectorized across channels
// (every channel of a rows chunk has seen the same number of rows).
[[maybe_unused]] NORMKIT_SIMD_CLONES
void merge_moment_arrays(double count_a, double* __restrict mean_a, double* __restrict m2_a,
                         double count_b, const double* __restrict mean_b,
                         const double* __restrict m2_b, int64_t channels) {
  if (count_a == 0) {
    std::copy(mean_b, mean_b + channels, mean_a);
    std::copy(m2_b, m2_b + channels, m2_a);
    return;
  }
  const double weight = count_b / (count_a + count_b);
  for (int64_t c = 0; c < channels; ++c) {
    const double delta = mean_b[c] - mean_a[c];
    mean_a[c] += delta * weight;
    m2_a[c] += m2_b[c] + delta * delta * count_a * weight;
  }
}

}  // namespace
}  // namespace normkit::kernels::leaf
