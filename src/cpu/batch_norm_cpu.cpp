// Fast batch normalization for float data.
//
// Two implementations, chosen by the strides of the data:
//   planes: channels-first with a contiguous inner run (NC·L, NCHW, NCDHW);
//   rows:   contiguous channels, one row of C values per position (NLC, NHWC,
//           NDHWC, NC, and PyTorch's channels_last tensors).
//
// Determinism: every reduction is split into pieces whose boundaries depend only
// on the problem's geometry (never on the thread count), each piece's partial is
// computed by one thread in a fixed order, and partials are merged in a fixed
// order. So results are bitwise identical for any number of threads.
//
// Accuracy: a piece's moments come from two passes over the piece while it is
// in cache (its mean, then Σ(x - mean)² corrected by Σ(x - mean)), summed in
// float lanes that each see a few hundred centred values; pieces combine in
// double with Chan's merge. The apply pass subtracts the float-rounded mean before scaling
// (see ApplyCoefficients), so a mean of 1e6 with std 1 keeps its digits.
//
// SIMD: the leaf loops are written over fixed lanes so the compiler
// vectorizes them without reassociating sums, and are compiled for AVX-512,
// AVX2+FMA and baseline x86-64 with a runtime choice (target_clones). The
// order of additions is fixed by the source, but the AVX2 and AVX-512 clones
// may contract a multiply and an add into one FMA (one rounding instead of
// two) where the baseline clone cannot: bits are identical for any thread
// count on one machine, not across machines that run different clones. The
// loops shared with the other kernels are in leaf_loops.hpp.
#include <omp.h>
#include <unistd.h>
#include <xmmintrin.h>

#include <algorithm>
#include <cstdio>
#include <cmath>
#include <vector>

#include "batch_norm_kernels.hpp"
#include "core/parallel.hpp"
#include "leaf_loops.hpp"

namespace normkit::kernels {
namespace {

using detail::threads_for;
using leaf::CenteredSums;
using leaf::kDoubleLanes;
using leaf::kLanes;
using leaf::kPieceElements;
using leaf::kTailLanes;
using leaf::lane_total;
using leaf::merge_moment_arrays;
using leaf::param_or;
using leaf::Pieces;
using leaf::RowPlan;
using leaf::scratch;
using leaf::whole_units_per_thread;

// Inside a piece, sums run in float lanes (leaf_loops.hpp); lane totals are
// added in double, and pieces combine in double. Each lane sees at most a few
// hundred values that are already centred (x - shift), so the float sums lose
// almost nothing.

// Outputs at least half as large as the last-level cache are written with
// non-temporal stores. An ordinary store first reads the line it writes: for a
// kernel that reads x once and writes y, that is a third tensor's worth of
// memory traffic (the copy the benchmark compares with pays it too). An output
// this large would not stay in cache for its consumer anyway; a smaller one
// might, and streaming it past the cache was measured to cost more than it
// saves (12.8 MB tensors, 32 MB L3).
// The cache size comes from sysfs: in virtual machines cpuid (and so
// sysconf) can report a much larger L3 than the one the guest shares.
int64_t last_level_cache_bytes() {
  int64_t size = 0;
  if (std::FILE* f = std::fopen("/sys/devices/system/cpu/cpu0/cache/index3/size", "r")) {
    long value = 0;
    char unit = 0;
    if (std::fscanf(f, "%ld%c", &value, &unit) >= 1)
      size = int64_t{value} << (unit == 'K' ? 10 : unit == 'M' ? 20 : 0);
    std::fclose(f);
  }
  if (size <= 0) size = sysconf(_SC_LEVEL3_CACHE_SIZE);
  return size > 0 ? size : int64_t{32} << 20;
}

int64_t streaming_bytes() {
  static const int64_t bytes = std::max<int64_t>(int64_t{8} << 20, last_level_cache_bytes() / 2);
  return bytes;
}

// Streaming pays only over long contiguous stretches: a stretch that ends
// inside a cache line leaves a partly written line, which costs more than the
// read it saves (7×7 planes: runs of 196 bytes). In place (the output is an
// input), streamed lines would leave the cache while the rest of them is still
// to be read: ordinary stores then.
constexpr int64_t kMinStreamedFloats = 256;
bool streaming_output(const Geometry& g, const float* out, const float* in,
                      const float* other_in = nullptr) {
  const bool rows = g.inner == 1;
  const int64_t stretch = rows ? (g.outer_stride == g.channels ? g.outer * g.channels : g.channels)
                               : (g.inner_stride == 1 ? g.inner : 1);
  return out != in && out != other_in && stretch >= kMinStreamedFloats &&
         g.outer * g.channels * g.inner * static_cast<int64_t>(sizeof(float)) >= streaming_bytes();
}

// ----- leaf loops over `runs` runs of `len` contiguous floats, `stride` apart -----

// The sums of leaf::run_moments for runs shorter than kLanes (7×7 = 49, 14 values...), where
// the loops above would spend most of their time in their tails. Here a lane
// is a position: run r adds its value i into lane (r mod k)·len + i, with k
// runs side by side so that k·len <= kLanes lanes are in use and each sees at
// most runs/k values. The lanes' order of additions is fixed by the geometry,
// as above.
NORMKIT_SIMD_CLONES
double shifted_sum_short_runs(const float* __restrict x, int64_t runs, int64_t len,
                              int64_t stride, float shift) {
  float acc[kLanes] = {};
  const int64_t k = kLanes / len;
  for (int64_t r = 0, slot = 0; r < runs; ++r, slot = slot + 1 == k ? 0 : slot + 1) {
    const float* __restrict p = x + r * stride;
    float* __restrict a = acc + slot * len;
    for (int64_t i = 0; i < len; ++i) a[i] += p[i] - shift;
  }
  return lane_total<kLanes>(acc);
}

NORMKIT_SIMD_CLONES
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

// ----- non-temporal (streaming) stores, see streaming_bytes -----
// Four floats per 16-byte aligned store; the unaligned head and the tail of a
// run go through the same SSE operations one float at a time, so on this path
// every element is rounded alike (separate multiply and add, never fused).
// `step` is 0 for one coefficient per run (planes), 1 for one per element (rows).

inline bool aligned16(const float* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

inline void stream_apply(const float* x, float* y, int64_t len, const float* mean_hi,
                         const float* scale, const float* shift, int64_t step) {
  const auto one = [&](int64_t i) {
    const int64_t c = i * step;
    const __m128 v = _mm_add_ss(
        _mm_mul_ss(_mm_sub_ss(_mm_load_ss(x + i), _mm_load_ss(mean_hi + c)), _mm_load_ss(scale + c)),
        _mm_load_ss(shift + c));
    y[i] = _mm_cvtss_f32(v);
  };
  int64_t i = 0;
  for (; i < len && !aligned16(y + i); ++i) one(i);
  const __m128 m1 = _mm_set1_ps(*mean_hi), s1 = _mm_set1_ps(*scale), t1 = _mm_set1_ps(*shift);
  for (; i + 4 <= len; i += 4) {
    const __m128 m = step ? _mm_loadu_ps(mean_hi + i) : m1;
    const __m128 sc = step ? _mm_loadu_ps(scale + i) : s1;
    const __m128 t = step ? _mm_loadu_ps(shift + i) : t1;
    _mm_stream_ps(y + i, _mm_add_ps(_mm_mul_ps(_mm_sub_ps(_mm_loadu_ps(x + i), m), sc), t));
  }
  for (; i < len; ++i) one(i);
}

// dx = (a·dy + b·(x - mean_hi)) + k, in that order, as the ordinary path.
inline void stream_backward(const float* x, const float* dy, float* dx, int64_t len,
                            const float* mean_hi, const float* a, const float* b, const float* k,
                            int64_t step) {
  const auto one = [&](int64_t i) {
    const int64_t c = i * step;
    const __m128 ag = _mm_mul_ss(_mm_load_ss(a + c), _mm_load_ss(dy + i));
    const __m128 bx = _mm_mul_ss(_mm_load_ss(b + c), _mm_sub_ss(_mm_load_ss(x + i), _mm_load_ss(mean_hi + c)));
    dx[i] = _mm_cvtss_f32(_mm_add_ss(_mm_add_ss(ag, bx), _mm_load_ss(k + c)));
  };
  int64_t i = 0;
  for (; i < len && !aligned16(dx + i); ++i) one(i);
  const __m128 m1 = _mm_set1_ps(*mean_hi), a1 = _mm_set1_ps(*a), b1 = _mm_set1_ps(*b),
               k1 = _mm_set1_ps(*k);
  for (; i + 4 <= len; i += 4) {
    const __m128 m = step ? _mm_loadu_ps(mean_hi + i) : m1;
    const __m128 av = step ? _mm_loadu_ps(a + i) : a1;
    const __m128 bv = step ? _mm_loadu_ps(b + i) : b1;
    const __m128 kv = step ? _mm_loadu_ps(k + i) : k1;
    const __m128 ag = _mm_mul_ps(av, _mm_loadu_ps(dy + i));
    const __m128 bx = _mm_mul_ps(bv, _mm_sub_ps(_mm_loadu_ps(x + i), m));
    _mm_stream_ps(dx + i, _mm_add_ps(_mm_add_ps(ag, bx), kv));
  }
  for (; i < len; ++i) one(i);
}

NORMKIT_SIMD_CLONES
void apply_runs(const float* x, int64_t x_stride, float* y, int64_t y_stride, int64_t runs,
                int64_t len, ApplyCoefficients k, bool stream) {
  if (stream) {
    for (int64_t r = 0; r < runs; ++r)
      stream_apply(x + r * x_stride, y + r * y_stride, len, &k.mean_hi, &k.scale, &k.shift, 0);
    _mm_sfence();  // the streamed lines are written before anyone reads y
    return;
  }
  for (int64_t r = 0; r < runs; ++r) {
    const float* xp = x + r * x_stride;
    float* yp = y + r * y_stride;
    for (int64_t i = 0; i < len; ++i) yp[i] = (xp[i] - k.mean_hi) * k.scale + k.shift;
  }
}

// Σdy and Σdy·(x - center). dy is not centred, so Σdy·(x - center) cancels
// heavily: its terms are formed and summed in double (32 lanes).
struct GradientSums {
  double sum_dy, sum_dy_xc;
};
NORMKIT_SIMD_CLONES
GradientSums gradient_sums_runs(const float* __restrict x, int64_t x_stride,
                                const float* __restrict dy, int64_t dy_stride, int64_t runs,
                                int64_t len, float center) {
  const double center_d = center;
  double acc1[kDoubleLanes] = {}, acc2[kDoubleLanes] = {};
  double acc1_8[kTailLanes] = {}, acc2_8[kTailLanes] = {};
  double tail1 = 0, tail2 = 0;
  for (int64_t r = 0; r < runs; ++r) {
    const float* xp = x + r * x_stride;
    const float* gp = dy + r * dy_stride;
    int64_t i = 0;
    for (; i + kDoubleLanes <= len; i += kDoubleLanes)
      for (int l = 0; l < kDoubleLanes; ++l) {
        const double g = gp[i + l];
        acc1[l] += g;
        acc2[l] += g * (static_cast<double>(xp[i + l]) - center_d);
      }
    for (; i + kTailLanes <= len; i += kTailLanes)
      for (int l = 0; l < kTailLanes; ++l) {
        const double g = gp[i + l];
        acc1_8[l] += g;
        acc2_8[l] += g * (static_cast<double>(xp[i + l]) - center_d);
      }
    for (; i < len; ++i) {
      const double g = gp[i];
      tail1 += g;
      tail2 += g * (static_cast<double>(xp[i]) - center_d);
    }
  }
  return {lane_total<kDoubleLanes>(acc1) + lane_total<kTailLanes>(acc1_8) + tail1,
          lane_total<kDoubleLanes>(acc2) + lane_total<kTailLanes>(acc2_8) + tail2};
}

// Short runs, as shifted_sum_short_runs, in double lanes.
NORMKIT_SIMD_CLONES
GradientSums gradient_sums_short_runs(const float* __restrict x, int64_t x_stride,
                                      const float* __restrict dy, int64_t dy_stride,
                                      int64_t runs, int64_t len, float center) {
  const double center_d = center;
  double acc1[kLanes] = {}, acc2[kLanes] = {};
  const int64_t k = kLanes / len;
  for (int64_t r = 0, slot = 0; r < runs; ++r, slot = slot + 1 == k ? 0 : slot + 1) {
    const float* __restrict xp = x + r * x_stride;
    const float* __restrict gp = dy + r * dy_stride;
    double* __restrict a1 = acc1 + slot * len;
    double* __restrict a2 = acc2 + slot * len;
    for (int64_t i = 0; i < len; ++i) {
      const double g = gp[i];
      a1[i] += g;
      a2[i] += g * (static_cast<double>(xp[i]) - center_d);
    }
  }
  return {lane_total<kLanes>(acc1), lane_total<kLanes>(acc2)};
}

NORMKIT_SIMD_CLONES
void backward_apply_runs(const float* x, int64_t x_stride, const float* dy, int64_t dy_stride,
                         float* dx, int64_t dx_stride, int64_t runs, int64_t len,
                         BackwardCoefficients k, bool stream) {
  if (stream) {
    for (int64_t r = 0; r < runs; ++r)
      stream_backward(x + r * x_stride, dy + r * dy_stride, dx + r * dx_stride, len, &k.mean_hi,
                      &k.a, &k.b, &k.k, 0);
    _mm_sfence();
    return;
  }
  for (int64_t r = 0; r < runs; ++r) {
    const float* xp = x + r * x_stride;
    const float* gp = dy + r * dy_stride;
    float* dp = dx + r * dx_stride;
    for (int64_t i = 0; i < len; ++i) dp[i] = k.a * gp[i] + k.b * (xp[i] - k.mean_hi) + k.k;
  }
}

// ================= planes: [outer, C, inner], inner contiguous =================

// Two passes over a piece that stays in L1: its mean (shifted by its first
// value), then the corrected sums of squares around that mean in float.
// Short runs take the same two passes with a lane per position.
Moments piece_moments(const Geometry& g, const float* x, int64_t c, const Pieces::Span& s) {
  const float* base = x + g.offset(s.first_run, c, s.first_inner);
  if (s.len >= kLanes) return leaf::run_moments(base, s.runs, s.len, g.outer_stride);
  const double n = static_cast<double>(s.runs * s.len);
  const float shift = base[0];
  const double mean = shift + shifted_sum_short_runs(base, s.runs, s.len, g.outer_stride, shift) / n;
  const auto center = static_cast<float>(mean);
  const CenteredSums cs = centered_sums_short_runs(base, s.runs, s.len, g.outer_stride, center);
  return {n, center + cs.sum_d / n, cs.sum_d2 - cs.sum_d * cs.sum_d / n};
}

void piece_apply(const Geometry& gx, const Geometry& gy, const float* x, float* y, int64_t c,
                 const Pieces::Span& s, ApplyCoefficients k) {
  apply_runs(x + gx.offset(s.first_run, c, s.first_inner), gx.outer_stride,
             y + gy.offset(s.first_run, c, s.first_inner), gy.outer_stride, s.runs, s.len, k,
             streaming_output(gy, y, x));
}

// The apply in memory order: (outer, channel) runs with channels fastest, cut
// into units of about kPieceElements (several short runs, or a part of a long
// one). No reduction here, so any order gives the same bits.
struct ApplyUnits {
  int64_t channels_per_unit, units_per_outer, parts_per_run, part_len, count;
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
};

template <class RunFn>
void for_each_run_of_unit(const Geometry& g, const ApplyUnits& u, int64_t unit, RunFn run) {
  const int64_t o = unit / u.units_per_outer, within = unit % u.units_per_outer;
  if (u.parts_per_run > 1) {
    const int64_t c = within / u.parts_per_run, first = (within % u.parts_per_run) * u.part_len;
    run(o, c, first, std::min(u.part_len, g.inner - first));
    return;
  }
  const int64_t c0 = within * u.channels_per_unit;
  for (int64_t c = c0; c < std::min(g.channels, c0 + u.channels_per_unit); ++c) run(o, c, 0, g.inner);
}

void planes_forward_training(const ForwardTraining<float>& p) {
  const Geometry& g = p.x_geom;
  const Pieces pieces(g);
  const int threads = threads_for(g.channels * g.reduction_size());
  auto coefficients = [&](int64_t c) {
    return apply_coefficients(p.moments[c].mean, invstd_of(p.moments[c].biased_variance(), p.eps),
                              param_or(p.gamma, c, 1.0), param_or(p.beta, c, 0.0));
  };
  if (whole_units_per_thread(g.channels, threads)) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t c = 0; c < g.channels; ++c) {
      Moments m;
      for (int64_t i = 0; i < pieces.per_channel; ++i)
        m.merge(piece_moments(g, p.x, c, pieces.span(g, i)));
      p.moments[c] = m;
      const ApplyCoefficients k = coefficients(c);
      for (int64_t i = 0; i < pieces.per_channel; ++i)
        piece_apply(g, p.y_geom, p.x, p.y, c, pieces.span(g, i), k);
    }
    return;
  }
  const int64_t total = g.channels * pieces.per_channel;
  const ApplyUnits units(g);
  const bool stream = streaming_output(p.y_geom, p.y, p.x);
  std::vector<Moments> partial(total);
  std::vector<ApplyCoefficients> coeff(g.channels);
#pragma omp parallel num_threads(threads)
  {
#pragma omp for schedule(static)
    for (int64_t t = 0; t < total; ++t)
      partial[t] = piece_moments(g, p.x, t / pieces.per_channel, pieces.span(g, t % pieces.per_channel));
#pragma omp for schedule(static)
    for (int64_t c = 0; c < g.channels; ++c) {
      Moments m;
      for (int64_t i = 0; i < pieces.per_channel; ++i) m.merge(partial[c * pieces.per_channel + i]);
      p.moments[c] = m;
      coeff[c] = coefficients(c);
    }
#pragma omp for schedule(static)
    for (int64_t t = 0; t < units.count; ++t)
      for_each_run_of_unit(g, units, t, [&](int64_t o, int64_t c, int64_t first, int64_t len) {
        apply_runs(p.x + g.offset(o, c, first), 0, p.y + p.y_geom.offset(o, c, first), 0, 1, len,
                   coeff[c], stream);
      });
  }
}

void planes_moments(const Geometry& g, const float* x, Moments* out) {
  const Pieces pieces(g);
  const int64_t total = g.channels * pieces.per_channel;
  std::vector<Moments> partial(total);
#pragma omp parallel num_threads(threads_for(g.channels * g.reduction_size()))
  {
#pragma omp for schedule(static)
    for (int64_t t = 0; t < total; ++t)
      partial[t] = piece_moments(g, x, t / pieces.per_channel, pieces.span(g, t % pieces.per_channel));
#pragma omp for schedule(static)
    for (int64_t c = 0; c < g.channels; ++c) {
      Moments m;
      for (int64_t i = 0; i < pieces.per_channel; ++i) m.merge(partial[c * pieces.per_channel + i]);
      out[c] = m;
    }
  }
}

void planes_apply(const Apply<float>& p) {
  const Geometry& g = p.x_geom;
  const ApplyUnits units(g);
  const bool stream = streaming_output(p.y_geom, p.y, p.x);
  std::vector<ApplyCoefficients> coeff(g.channels);
  for (int64_t c = 0; c < g.channels; ++c)
    coeff[c] = apply_coefficients(p.mean[c], p.invstd[c], param_or(p.gamma, c, 1.0),
                                  param_or(p.beta, c, 0.0));
#pragma omp parallel for num_threads(threads_for(g.channels * g.reduction_size())) schedule(static)
  for (int64_t t = 0; t < units.count; ++t)
    for_each_run_of_unit(g, units, t, [&](int64_t o, int64_t c, int64_t first, int64_t len) {
      apply_runs(p.x + g.offset(o, c, first), 0, p.y + p.y_geom.offset(o, c, first), 0, 1, len,
                 coeff[c], stream);
    });
}

// Σdy and Σdy·(x - mean) of a piece; the float sums run around float(mean)
// and Σdy·(mean - float(mean)) is taken off in double.
GradientSums piece_gradient_sums(const Backward<float>& p, int64_t c, const Pieces::Span& s) {
  const Geometry& gx = p.x_geom;
  const Geometry& gd = p.dy_geom;
  const auto center = static_cast<float>(p.mean[c]);
  const auto sums_of = s.len < kLanes ? gradient_sums_short_runs : gradient_sums_runs;
  const GradientSums sums =
      sums_of(p.x + gx.offset(s.first_run, c, s.first_inner), gx.outer_stride,
              p.dy + gd.offset(s.first_run, c, s.first_inner), gd.outer_stride, s.runs, s.len,
              center);
  return {sums.sum_dy, sums.sum_dy_xc - sums.sum_dy * (p.mean[c] - center)};
}

void piece_backward_apply(const Backward<float>& p, int64_t c, const Pieces::Span& s,
                          BackwardCoefficients k) {
  const Geometry& gx = p.x_geom;
  const Geometry& gd = p.dy_geom;
  const Geometry& go = p.dx_geom;
  backward_apply_runs(p.x + gx.offset(s.first_run, c, s.first_inner), gx.outer_stride,
                      p.dy + gd.offset(s.first_run, c, s.first_inner), gd.outer_stride,
                      p.dx + go.offset(s.first_run, c, s.first_inner), go.outer_stride, s.runs,
                      s.len, k, streaming_output(go, p.dx, p.x, p.dy));
}

// From Σdy and Σdy·(x - mean): dβ = Σdy, dγ = invstd·Σdy·(x - mean), and dx's coefficients.
BackwardCoefficients finish_channel(const Backward<float>& p, int64_t c, double sum_dy,
                                    double sum_dy_xmu) {
  p.sum_dy[c] = sum_dy;
  p.sum_dy_xhat[c] = sum_dy_xmu * p.invstd[c];
  return backward_coefficients(p.mean[c], p.invstd[c], param_or(p.gamma, c, 1.0), sum_dy,
                               p.sum_dy_xhat[c], static_cast<double>(p.x_geom.reduction_size()),
                               p.mode);
}

void planes_backward(const Backward<float>& p) {
  const Geometry& g = p.x_geom;
  const Pieces pieces(g);
  const int threads = threads_for(2 * g.channels * g.reduction_size());
  if (whole_units_per_thread(g.channels, threads)) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t c = 0; c < g.channels; ++c) {
      double sum_dy = 0, sum_dy_xmu = 0;
      for (int64_t i = 0; i < pieces.per_channel; ++i) {
        const GradientSums s = piece_gradient_sums(p, c, pieces.span(g, i));
        sum_dy += s.sum_dy;
        sum_dy_xmu += s.sum_dy_xc;
      }
      const BackwardCoefficients k = finish_channel(p, c, sum_dy, sum_dy_xmu);
      if (p.dx)
        for (int64_t i = 0; i < pieces.per_channel; ++i) piece_backward_apply(p, c, pieces.span(g, i), k);
    }
    return;
  }
  const int64_t total = g.channels * pieces.per_channel;
  const ApplyUnits units(g);
  const bool stream = streaming_output(p.dx_geom, p.dx, p.x, p.dy);
  std::vector<GradientSums> partial(total);
  std::vector<BackwardCoefficients> coeff(g.channels);
#pragma omp parallel num_threads(threads)
  {
#pragma omp for schedule(static)
    for (int64_t t = 0; t < total; ++t)
      partial[t] = piece_gradient_sums(p, t / pieces.per_channel, pieces.span(g, t % pieces.per_channel));
#pragma omp for schedule(static)
    for (int64_t c = 0; c < g.channels; ++c) {
      double sum_dy = 0, sum_dy_xmu = 0;
      for (int64_t i = 0; i < pieces.per_channel; ++i) {
        sum_dy += partial[c * pieces.per_channel + i].sum_dy;
        sum_dy_xmu += partial[c * pieces.per_channel + i].sum_dy_xc;
      }
      coeff[c] = finish_channel(p, c, sum_dy, sum_dy_xmu);
    }
    if (p.dx) {
#pragma omp for schedule(static)
      for (int64_t t = 0; t < units.count; ++t)
        for_each_run_of_unit(g, units, t, [&](int64_t o, int64_t c, int64_t first, int64_t len) {
          backward_apply_runs(p.x + g.offset(o, c, first), 0, p.dy + p.dy_geom.offset(o, c, first),
                              0, p.dx + p.dx_geom.offset(o, c, first), 0, 1, len, coeff[c],
                              stream);
        });
    }
  }
}

// dx from given sums (synchronized BN): the apply half of planes_backward.
void planes_backward_apply(const BackwardApply<float>& p) {
  const Geometry& g = p.x_geom;
  const ApplyUnits units(g);
  const bool stream = streaming_output(p.dx_geom, p.dx, p.x, p.dy);
  std::vector<BackwardCoefficients> coeff(g.channels);
  for (int64_t c = 0; c < g.channels; ++c)
    coeff[c] = backward_coefficients(p.mean[c], p.invstd[c], param_or(p.gamma, c, 1.0),
                                     p.sum_dy[c], p.sum_dy_xhat[c], p.count, BackwardMode::training);
#pragma omp parallel for num_threads(threads_for(2 * g.channels * g.reduction_size())) schedule(static)
  for (int64_t t = 0; t < units.count; ++t)
    for_each_run_of_unit(g, units, t, [&](int64_t o, int64_t c, int64_t first, int64_t len) {
      backward_apply_runs(p.x + g.offset(o, c, first), 0, p.dy + p.dy_geom.offset(o, c, first), 0,
                          p.dx + p.dx_geom.offset(o, c, first), 0, 1, len, coeff[c], stream);
    });
}

const char* planes_decline(const Geometry& x, std::span<const Geometry> others) {
  if (x.inner_stride != 1 || x.inner < 2) return "inner run is not contiguous";
  for (const auto& o : others)
    if (o.inner_stride != 1 || o.inner != x.inner || o.outer != x.outer)
      return "an output or gradient is not laid out like x";
  return nullptr;
}

// ================= rows: [rows, C], channels contiguous =================

// Rows kernels walk channels in blocks of kRowBlock: a block's accumulators
// and coefficients stay in registers (rather than being loaded and stored for
// every row), and its part of a chunk (at most 64 rows × 64 floats = 16 KB)
// stays in L1 between passes. Every channel still adds its rows in row order,
// so blocking changes no result; channels past the last whole block take the
// plain loops. Only short rows are blocked: with long ones (1024 channels and
// more) a block is a narrow strided column of the chunk, which the hardware
// prefetchers follow worse than whole rows, and whose rows, 4 KB or more apart,
// compete for the same few L1 sets.
constexpr int64_t kRowBlock = 64;
constexpr int64_t kMaxBlockedChannels = 256;
constexpr int64_t kColumnBlock = 256;
inline int64_t blocked_channels(int64_t channels) {
  return channels <= kMaxBlockedChannels ? channels / kRowBlock * kRowBlock : 0;
}

// Per-channel moments of one chunk (at most kMaxChunkRows rows): the same two
// passes as planes, vectorized across channels: the chunk's mean shifted by its
// first row, then corrected sums around it.
NORMKIT_SIMD_CLONES
void rows_chunk_moments(const float* __restrict x, int64_t stride, int64_t rows,
                        int64_t channels, float* __restrict sum, float* __restrict center,
                        float* __restrict sum_d2, double* __restrict mean,
                        double* __restrict m2) {
  const double n = static_cast<double>(rows);
  const int64_t blocked = blocked_channels(channels);
  int64_t c0 = 0;
  for (; c0 < blocked; c0 += kRowBlock) {
    const float* __restrict xb = x + c0;
    float s[kRowBlock] = {}, ctr[kRowBlock], s1[kRowBlock] = {}, s2[kRowBlock] = {};
    for (int64_t r = 0; r < rows; ++r)
      for (int l = 0; l < kRowBlock; ++l) s[l] += xb[r * stride + l] - xb[l];
    for (int l = 0; l < kRowBlock; ++l)
      ctr[l] = static_cast<float>(static_cast<double>(xb[l]) + static_cast<double>(s[l]) / n);
    for (int64_t r = 0; r < rows; ++r)
      for (int l = 0; l < kRowBlock; ++l) {
        const float d = xb[r * stride + l] - ctr[l];
        s1[l] += d;
        s2[l] += d * d;
      }
    for (int l = 0; l < kRowBlock; ++l) {
      const double sd = s1[l];
      mean[c0 + l] = ctr[l] + sd / n;
      m2[c0 + l] = s2[l] - sd * sd / n;
    }
  }
  // Long rows: columns of kColumnBlock channels, so that the sums stay in L1
  // and a column of the chunk in L2 between the passes.
  for (int64_t b0 = c0; b0 < channels; b0 += kColumnBlock) {
    const int64_t b1 = std::min(channels, b0 + kColumnBlock);
    std::fill(sum + b0, sum + b1, 0.0f);
    for (int64_t r = 0; r < rows; ++r) {
      const float* xp = x + r * stride;
      for (int64_t c = b0; c < b1; ++c) sum[c] += xp[c] - x[c];
    }
    for (int64_t c = b0; c < b1; ++c)
      center[c] = static_cast<float>(static_cast<double>(x[c]) + static_cast<double>(sum[c]) / n);
    std::fill(sum + b0, sum + b1, 0.0f);
    std::fill(sum_d2 + b0, sum_d2 + b1, 0.0f);
    for (int64_t r = 0; r < rows; ++r) {
      const float* xp = x + r * stride;
      for (int64_t c = b0; c < b1; ++c) {
        const float d = xp[c] - center[c];
        sum[c] += d;
        sum_d2[c] += d * d;
      }
    }
    for (int64_t c = b0; c < b1; ++c) {
      const double sd = sum[c];
      mean[c] = center[c] + sd / n;
      m2[c] = sum_d2[c] - sd * sd / n;
    }
  }
}

// Per-channel apply coefficients (apply_coefficients) for a block of channels
// from merged moments, as arrays, in a loop the compiler vectorizes: with
// thousands of channels and few rows (32×4096), scalar square roots and
// divisions per channel cost as much as the data passes. (This file is built
// with -fno-math-errno, without which the square root does not vectorize.)
NORMKIT_SIMD_CLONES
void coefficient_arrays(int64_t channels, double count, const double* __restrict mean,
                        const double* __restrict m2, const float* __restrict gamma,
                        const float* __restrict beta, double eps, float* __restrict mean_hi,
                        float* __restrict scale, float* __restrict shift) {
  for (int64_t c = 0; c < channels; ++c) {
    const double invstd = 1.0 / std::sqrt(m2[c] / count + eps);
    const float hi = static_cast<float>(mean[c]);
    const double sc = (gamma ? static_cast<double>(gamma[c]) : 1.0) * invstd;
    mean_hi[c] = hi;
    scale[c] = static_cast<float>(sc);
    shift[c] = static_cast<float>((beta ? static_cast<double>(beta[c]) : 0.0) -
                                  (mean[c] - static_cast<double>(hi)) * sc);
  }
}

// Per-channel coefficients as three arrays, so the row loop vectorizes over channels.
struct RowCoefficients {
  float* mean_hi;
  float* scale;
  float* shift;
  explicit RowCoefficients(float* storage, int64_t channels)
      : mean_hi(storage), scale(storage + channels), shift(storage + 2 * channels) {}
  void set(int64_t c, ApplyCoefficients k) const {
    mean_hi[c] = k.mean_hi;
    scale[c] = k.scale;
    shift[c] = k.shift;
  }
};

NORMKIT_SIMD_CLONES
void rows_apply_chunk(const float* x, int64_t x_stride, float* y,
                      int64_t y_stride, int64_t rows, int64_t channels,
                      const float* __restrict mean_hi, const float* __restrict scale,
                      const float* __restrict shift, bool stream) {
  if (stream) {
    for (int64_t r = 0; r < rows; ++r)
      stream_apply(x + r * x_stride, y + r * y_stride, channels, mean_hi, scale, shift, 1);
    _mm_sfence();
    return;
  }
  const int64_t blocked = blocked_channels(channels);
  int64_t c0 = 0;
  for (; c0 < blocked; c0 += kRowBlock) {
    float m[kRowBlock], sc[kRowBlock], t[kRowBlock];
    for (int l = 0; l < kRowBlock; ++l) {
      m[l] = mean_hi[c0 + l];
      sc[l] = scale[c0 + l];
      t[l] = shift[c0 + l];
    }
    for (int64_t r = 0; r < rows; ++r) {
      const float* xp = x + r * x_stride + c0;
      float* yp = y + r * y_stride + c0;
      for (int l = 0; l < kRowBlock; ++l) yp[l] = (xp[l] - m[l]) * sc[l] + t[l];
    }
  }
  for (int64_t r = 0; r < rows && c0 < channels; ++r) {
    const float* xp = x + r * x_stride;
    float* yp = y + r * y_stride;
    for (int64_t c = c0; c < channels; ++c) yp[c] = (xp[c] - mean_hi[c]) * scale[c] + shift[c];
  }
}

// The apply over every chunk; inside a parallel region (an orphaned omp for).
void rows_apply_phase(const Geometry& gx, const Geometry& gy, const float* x, float* y,
                      const RowCoefficients& k) {
  const RowPlan plan(gx);
  const bool stream = streaming_output(gy, y, x);
#pragma omp for schedule(static)
  for (int64_t chunk = 0; chunk < plan.chunks; ++chunk) {
    const int64_t r0 = plan.first_row(chunk);
    rows_apply_chunk(x + r0 * gx.outer_stride, gx.outer_stride, y + r0 * gy.outer_stride,
                     gy.outer_stride, plan.rows_in(chunk), plan.channels, k.mean_hi, k.scale,
                     k.shift, stream);
  }
}

// Moments per channel over all rows: chunks merged in order within each
// stripe, stripes merged in order (in blocks of channels, one block per task).
// Runs inside a parallel region (orphaned omp for); each merged block of
// channels is handed to on_block(c0, width, count, mean, m2) by the thread that
// merged it, mean and m2 pointing at channel c0.
template <class OnBlock>
void rows_moments_phase(const Geometry& g, const float* x, double* stripe_mean, double* stripe_m2,
                        double* stripe_count, OnBlock on_block) {
  const RowPlan plan(g);
  const int64_t C = plan.channels;
  constexpr int64_t kChannelBlock = 256;
  const int64_t blocks = (C + kChannelBlock - 1) / kChannelBlock;
  float* const sums = scratch<float>(3, 3 * C);
  double* const chunk_mean = scratch<double>(4, C);
  double* const chunk_m2 = scratch<double>(5, C);
#pragma omp for schedule(static)
  for (int64_t s = 0; s < plan.stripes; ++s) {
    double count = 0;
    for (int64_t k = plan.first_chunk(s); k < plan.first_chunk(s + 1); ++k) {
      const int64_t n = plan.rows_in(k);
      rows_chunk_moments(x + plan.first_row(k) * g.outer_stride, g.outer_stride, n, C, sums,
                         sums + C, sums + 2 * C, chunk_mean, chunk_m2);
      merge_moment_arrays(count, stripe_mean + s * C, stripe_m2 + s * C,
                          static_cast<double>(n), chunk_mean, chunk_m2, C);
      count += static_cast<double>(n);
    }
    stripe_count[s] = count;
  }
#pragma omp for schedule(static)
  for (int64_t block = 0; block < blocks; ++block) {
    const int64_t c0 = block * kChannelBlock, width = std::min(kChannelBlock, C - c0);
    double count = stripe_count[0];
    for (int64_t s = 1; s < plan.stripes; ++s) {
      merge_moment_arrays(count, stripe_mean + c0, stripe_m2 + c0, stripe_count[s],
                          stripe_mean + s * C + c0, stripe_m2 + s * C + c0, width);
      count += stripe_count[s];
    }
    on_block(c0, width, count, stripe_mean + c0, stripe_m2 + c0);
  }
}

void rows_moments_into(const Geometry& g, const float* x, Moments* out, int threads) {
  const RowPlan plan(g);
  double* const stripe_mean = scratch<double>(0, plan.stripes * plan.channels);
  double* const stripe_m2 = scratch<double>(1, plan.stripes * plan.channels);
  double* const stripe_count = scratch<double>(2, plan.stripes);
#pragma omp parallel num_threads(threads)
  rows_moments_phase(g, x, stripe_mean, stripe_m2, stripe_count,
                     [&](int64_t c0, int64_t width, double count, const double* mean,
                         const double* m2) {
                       for (int64_t c = 0; c < width; ++c) out[c0 + c] = {count, mean[c], m2[c]};
                     });
}

// Statistics, coefficients and apply in one parallel region: opening a region
// and waking threads costs microseconds, which small problems (256×1024) notice.
void rows_forward_training(const ForwardTraining<float>& p) {
  const Geometry& g = p.x_geom;
  const RowPlan plan(g);
  const int64_t C = plan.channels;
  const int threads = threads_for(C * g.outer);
  double* const stripe_mean = scratch<double>(0, plan.stripes * C);
  double* const stripe_m2 = scratch<double>(1, plan.stripes * C);
  double* const stripe_count = scratch<double>(2, plan.stripes);
  const RowCoefficients k(scratch<float>(6, 3 * C), C);
#pragma omp parallel num_threads(threads)
  {
    rows_moments_phase(g, p.x, stripe_mean, stripe_m2, stripe_count,
                       [&](int64_t c0, int64_t width, double count, const double* mean,
                           const double* m2) {
                         for (int64_t c = 0; c < width; ++c)
                           p.moments[c0 + c] = {count, mean[c], m2[c]};
                         coefficient_arrays(width, count, mean, m2, p.gamma ? p.gamma + c0 : nullptr,
                                            p.beta ? p.beta + c0 : nullptr, p.eps, k.mean_hi + c0,
                                            k.scale + c0, k.shift + c0);
                       });
    rows_apply_phase(g, p.y_geom, p.x, p.y, k);  // its omp for waits for the coefficients
  }
}

void rows_moments(const Geometry& g, const float* x, Moments* out) {
  rows_moments_into(g, x, out, threads_for(g.channels * g.outer));
}

void rows_apply(const Apply<float>& p) {
  const int64_t C = p.x_geom.channels;
  const RowCoefficients k(scratch<float>(6, 3 * C), C);
  for (int64_t c = 0; c < C; ++c)
    k.set(c, apply_coefficients(p.mean[c], p.invstd[c], param_or(p.gamma, c, 1.0),
                                param_or(p.beta, c, 0.0)));
#pragma omp parallel num_threads(threads_for(C * p.x_geom.outer))
  rows_apply_phase(p.x_geom, p.y_geom, p.x, p.y, k);
}

// Σdy and Σdy·(x - mean) of one chunk per channel, added to a stripe's double
// sums (double: dy is not centred, so the second sum cancels heavily).
NORMKIT_SIMD_CLONES
void rows_gradient_sums_chunk(const float* __restrict x, int64_t x_stride,
                              const float* __restrict dy, int64_t dy_stride, int64_t rows,
                              int64_t channels, const float* __restrict center,
                              double* __restrict sum_dy, double* __restrict sum_dy_xc) {
  const int64_t blocked = blocked_channels(channels);
  int64_t c0 = 0;
  for (; c0 < blocked; c0 += kRowBlock) {
    double s1[kRowBlock], s2[kRowBlock], ctr[kRowBlock];
    for (int l = 0; l < kRowBlock; ++l) {
      s1[l] = sum_dy[c0 + l];
      s2[l] = sum_dy_xc[c0 + l];
      ctr[l] = center[c0 + l];
    }
    for (int64_t r = 0; r < rows; ++r) {
      const float* xp = x + r * x_stride + c0;
      const float* gp = dy + r * dy_stride + c0;
      for (int l = 0; l < kRowBlock; ++l) {
        const double g = gp[l];
        s1[l] += g;
        s2[l] += g * (static_cast<double>(xp[l]) - ctr[l]);
      }
    }
    for (int l = 0; l < kRowBlock; ++l) {
      sum_dy[c0 + l] = s1[l];
      sum_dy_xc[c0 + l] = s2[l];
    }
  }
  for (int64_t b0 = c0; b0 < channels; b0 += kColumnBlock) {  // long rows: sums stay in L1
    const int64_t b1 = std::min(channels, b0 + kColumnBlock);
    for (int64_t r = 0; r < rows; ++r) {
      const float* xp = x + r * x_stride;
      const float* gp = dy + r * dy_stride;
      for (int64_t c = b0; c < b1; ++c) {
        const double g = gp[c];
        sum_dy[c] += g;
        sum_dy_xc[c] += g * (static_cast<double>(xp[c]) - static_cast<double>(center[c]));
      }
    }
  }
}

NORMKIT_SIMD_CLONES
void rows_backward_apply_chunk(const float* x, int64_t x_stride, const float* dy,
                               int64_t dy_stride, float* dx, int64_t dx_stride, int64_t rows,
                               int64_t channels, const float* mean_hi, const float* a,
                               const float* b, const float* k, bool stream) {
  if (stream) {
    for (int64_t r = 0; r < rows; ++r)
      stream_backward(x + r * x_stride, dy + r * dy_stride, dx + r * dx_stride, channels, mean_hi,
                      a, b, k, 1);
    _mm_sfence();
    return;
  }
  const int64_t blocked = blocked_channels(channels);
  int64_t c0 = 0;
  for (; c0 < blocked; c0 += kRowBlock) {
    float m[kRowBlock], av[kRowBlock], bv[kRowBlock], kv[kRowBlock];
    for (int l = 0; l < kRowBlock; ++l) {
      m[l] = mean_hi[c0 + l];
      av[l] = a[c0 + l];
      bv[l] = b[c0 + l];
      kv[l] = k[c0 + l];
    }
    for (int64_t r = 0; r < rows; ++r) {
      const float* xp = x + r * x_stride + c0;
      const float* gp = dy + r * dy_stride + c0;
      float* dp = dx + r * dx_stride + c0;
      for (int l = 0; l < kRowBlock; ++l) dp[l] = av[l] * gp[l] + bv[l] * (xp[l] - m[l]) + kv[l];
    }
  }
  for (int64_t r = 0; r < rows && c0 < channels; ++r) {
    const float* xp = x + r * x_stride;
    const float* gp = dy + r * dy_stride;
    float* dp = dx + r * dx_stride;
    for (int64_t c = c0; c < channels; ++c)
      dp[c] = a[c] * gp[c] + b[c] * (xp[c] - mean_hi[c]) + k[c];
  }
}

void rows_backward(const Backward<float>& p) {
  const Geometry& gx = p.x_geom;
  const RowPlan plan(gx);
  const int64_t C = plan.channels;
  const int threads = threads_for(2 * C * plan.rows);
  double* const stripe_dy = scratch<double>(0, plan.stripes * C);
  double* const stripe_dy_xmu = scratch<double>(1, plan.stripes * C);
  std::fill(stripe_dy, stripe_dy + plan.stripes * C, 0.0);
  std::fill(stripe_dy_xmu, stripe_dy_xmu + plan.stripes * C, 0.0);
  std::vector<float> mean_hi(C), a(C), b(C), k(C);
  std::vector<double> mean_error(C);  // mean - float(mean)
  for (int64_t c = 0; c < C; ++c) {
    mean_hi[c] = static_cast<float>(p.mean[c]);
    mean_error[c] = p.mean[c] - mean_hi[c];
  }
#pragma omp parallel num_threads(threads)
  {
#pragma omp for schedule(static)
    for (int64_t s = 0; s < plan.stripes; ++s)
      for (int64_t chunk = plan.first_chunk(s); chunk < plan.first_chunk(s + 1); ++chunk) {
        const int64_t r0 = plan.first_row(chunk);
        rows_gradient_sums_chunk(p.x + r0 * gx.outer_stride, gx.outer_stride,
                                 p.dy + r0 * p.dy_geom.outer_stride, p.dy_geom.outer_stride,
                                 plan.rows_in(chunk), C, mean_hi.data(), stripe_dy + s * C,
                                 stripe_dy_xmu + s * C);
      }
#pragma omp for schedule(static)
    for (int64_t c = 0; c < C; ++c) {
      double sum_dy = 0, sum_dy_xmu = 0;
      for (int64_t s = 0; s < plan.stripes; ++s) {
        sum_dy += stripe_dy[s * C + c];
        sum_dy_xmu += stripe_dy_xmu[s * C + c];
      }
      sum_dy_xmu -= sum_dy * mean_error[c];
      const BackwardCoefficients bc = finish_channel(p, c, sum_dy, sum_dy_xmu);
      a[c] = bc.a;
      b[c] = bc.b;
      k[c] = bc.k;
    }
    if (p.dx) {
#pragma omp for schedule(static)
      for (int64_t chunk = 0; chunk < plan.chunks; ++chunk) {
        const int64_t r0 = plan.first_row(chunk);
        rows_backward_apply_chunk(p.x + r0 * gx.outer_stride, gx.outer_stride,
                                  p.dy + r0 * p.dy_geom.outer_stride, p.dy_geom.outer_stride,
                                  p.dx + r0 * p.dx_geom.outer_stride, p.dx_geom.outer_stride,
                                  plan.rows_in(chunk), C, mean_hi.data(), a.data(), b.data(),
                                  k.data(), streaming_output(p.dx_geom, p.dx, p.x, p.dy));
      }
    }
  }
}

// dx from given sums (synchronized BN): the apply half of rows_backward.
void rows_backward_apply(const BackwardApply<float>& p) {
  const Geometry& gx = p.x_geom;
  const RowPlan plan(gx);
  const int64_t C = plan.channels;
  std::vector<float> mean_hi(C), a(C), b(C), k(C);
  for (int64_t c = 0; c < C; ++c) {
    const BackwardCoefficients bc =
        backward_coefficients(p.mean[c], p.invstd[c], param_or(p.gamma, c, 1.0), p.sum_dy[c],
                              p.sum_dy_xhat[c], p.count, BackwardMode::training);
    mean_hi[c] = bc.mean_hi;
    a[c] = bc.a;
    b[c] = bc.b;
    k[c] = bc.k;
  }
  const bool stream = streaming_output(p.dx_geom, p.dx, p.x, p.dy);
#pragma omp parallel for num_threads(threads_for(2 * C * plan.rows)) schedule(static)
  for (int64_t chunk = 0; chunk < plan.chunks; ++chunk) {
    const int64_t r0 = plan.first_row(chunk);
    rows_backward_apply_chunk(p.x + r0 * gx.outer_stride, gx.outer_stride,
                              p.dy + r0 * p.dy_geom.outer_stride, p.dy_geom.outer_stride,
                              p.dx + r0 * p.dx_geom.outer_stride, p.dx_geom.outer_stride,
                              plan.rows_in(chunk), C, mean_hi.data(), a.data(), b.data(), k.data(),
                              stream);
  }
}

const char* rows_decline(const Geometry& x, std::span<const Geometry> others) {
  if (x.inner != 1 || (x.channel_stride != 1 && x.channels > 1))
    return "channels are not contiguous rows";
  for (const auto& o : others)
    if (o.inner != 1 || (o.channel_stride != 1 && o.channels > 1) || o.outer != x.outer)
      return "an output or gradient is not laid out like x";
  return nullptr;
}

constexpr Implementation kImplementations[] = {
    {"planes (channels-first, contiguous inner runs)", planes_decline, planes_forward_training,
     planes_apply, planes_backward, planes_moments, planes_backward_apply},
    {"rows (contiguous channels)", rows_decline, rows_forward_training, rows_apply,
     rows_backward, rows_moments, rows_backward_apply},
};

}  // namespace

std::span<const Implementation> cpu_implementations() { return kImplementations; }

}  // namespace normkit::kernels
