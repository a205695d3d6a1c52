// Fast batch normalization, planes form: channels-first data whose inner run
// is contiguous (NC·L, NCHW, NCDHW). The rules every fast kernel keeps
// (determinism, SIMD clones, internal linkage) are in src/cpu/README.md.
//
// Accuracy: a piece's moments come from two passes over the piece while it is
// in cache (its mean, then Σ(x - mean)² corrected by Σ(x - mean)), summed in
// float lanes that each see a few hundred centred values; pieces combine in
// double with Chan's merge. The apply pass subtracts the float-rounded mean
// before scaling (cpu/coefficients.hpp), so a mean of 1e6 with std 1 keeps its
// digits.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <span>

#include "core/parallel.hpp"
#include "cpu/coefficients.hpp"
#include "cpu/implementations.hpp"
#include "cpu/leaf_loops.hpp"
#include "cpu/streamed_output.hpp"
#include "kernels/batch_norm.hpp"

namespace normkit::kernels::bn {
namespace {

using cpu::ApplyCoefficients;
using cpu::apply_coefficients;
using cpu::BackwardCoefficients;
using cpu::backward_coefficients;
using cpu::finish_channel;
using detail::parallel_for;
using detail::parallel_region;
using detail::threads_for;
using leaf::ApplyUnits;
using leaf::backward_channel_at_a_time;
using leaf::channel_block;
using leaf::channel_moments;
using leaf::for_each_piece;
using leaf::forward_by_channel_blocks;
using leaf::forward_channel_at_a_time;
using leaf::GradientSums;
using leaf::kPieceElements;
using leaf::param_or;
using leaf::piece_moments;
using leaf::Pieces;
using leaf::Workspace;

// Inside a piece, sums run in float lanes (leaf_loops.hpp); lane totals are
// added in double, and pieces combine in double. Each lane sees at most a few
// hundred values that are already centred (x - shift), so the float sums lose
// almost nothing.

// ----- leaf loops over `runs` runs of `len` contiguous floats, `stride` apart -----

// Run r takes the coefficients k[r·k_step]: one channel's runs (k_step 0), or
// a unit's runs of consecutive channels (k_step 1), so that a unit of short
// runs (7×7: 83 channels of 49 values) is one call, not one per run: per-run
// calls through the clones' resolver took a quarter of the 7×7 output pass.
NORMKIT_SIMD_CLONES
void apply_runs(const float* x, int64_t x_stride, float* y, int64_t y_stride, int64_t runs,
                int64_t len, const ApplyCoefficients* k, int64_t k_step) {
  for (int64_t r = 0; r < runs; ++r) {
    const float* xp = x + r * x_stride;
    float* yp = y + r * y_stride;
    const ApplyCoefficients kr = k[r * k_step];
    for (int64_t i = 0; i < len; ++i) yp[i] = (xp[i] - kr.mean_hi) * kr.scale + kr.shift;
  }
}

NORMKIT_SIMD_CLONES
void backward_apply_runs(const float* x, int64_t x_stride, const float* dy, int64_t dy_stride,
                         float* dx, int64_t dx_stride, int64_t runs, int64_t len,
                         const BackwardCoefficients* k, int64_t k_step) {
  for (int64_t r = 0; r < runs; ++r) {
    const float* xp = x + r * x_stride;
    const float* gp = dy + r * dy_stride;
    float* dp = dx + r * dx_stride;
    const BackwardCoefficients kr = k[r * k_step];
    for (int64_t i = 0; i < len; ++i) dp[i] = kr.a * gp[i] + kr.b * (xp[i] - kr.mean_hi) + kr.k;
  }
}

#if NORMKIT_HAS_SIMD_CLONES
// Runs side by side (x, any other input and the output contiguous over `runs`
// runs of `len` >= 16 values, run r with k[r]) streamed straight from the loop
// on AVX-512 CPUs, as contiguous rows are (cpu::stream_rows_avx512). A line
// covers at most two runs: value(i, lanes, centered, pick) computes it from
// x - mean_hi (`centered`) and pick(&K::coefficient), each lane with its own
// run's. The arithmetic is the loops' above as the AVX-512 clone contracts it:
// the same bits (StreamedOutputs tests: dense planes against padded ones).
template <class K, class Value>
__attribute__((target("avx512f"))) inline void stream_runs_avx512(const float* x, float* out,
                                                                  int64_t runs, int64_t len,
                                                                  const K* k, Value&& value) {
  int64_t r = 0, last = -1;  // the line's first run; its offset in the last line's first run
  cpu::stream_rows_avx512<1>({out}, runs * len, len,
                             [&](int64_t i, int64_t c, __mmask16 lanes) __attribute__((
                                 target("avx512f"), always_inline)) {
    if (c <= last) ++r;  // lines advance by at most 16 <= len values: into the next run at most
    last = c;
    // run r's lanes; the others take run r + 1's coefficients
    const __mmask16 here =
        len - c >= 16 ? __mmask16{0xffff} : static_cast<__mmask16>((1u << (len - c)) - 1);
    const K& now = k[r];
    const K& next = k[std::min(r + 1, runs - 1)];
    const auto pick = [&](float K::*coefficient) __attribute__((target("avx512f"),
                                                                always_inline)) {
      return _mm512_mask_blend_ps(here, _mm512_set1_ps(next.*coefficient),
                                  _mm512_set1_ps(now.*coefficient));
    };
    return value(i, lanes, _mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, x + i), pick(&K::mean_hi)),
                 pick);
  });
}
#endif

// The two loops above, writing through the streamed buffer when `stream`
// (cpu/streamed_output.hpp: outputs larger than the threads' L2), or straight
// from the loop: the apply of a channel's runs each on its own
// (stream_apply_run_avx512), and of runs side by side together
// (stream_runs_avx512: units of whole planes and blocks of channels); dx only
// side by side, in runs shorter than kStraightBackwardRuns. Side by side,
// bench, x copy, the two ways alternated (1 / 2 threads): inference 56x56
// 0.82-0.84 -> 0.74-0.75 (2), 7x7 1.08-1.09 -> 0.97-1.00 (2), 14x14 0.87-0.92
// -> 0.72-0.75 (1); forward-train 7x7 1.33-1.37 -> 1.15-1.18 (2). Backward 7x7
// 2.31 -> 2.20-2.23 (2), 14x14 2.17-2.23 -> 2.02-2.11 (1), but 28x28 1.56-1.57
// -> 1.65-1.70 and 56x56 1.74-1.75 -> 1.84-1.85 (1): with long runs the buffer
// costs little, and reading x and dy while streaming dx out of the same core
// costs more.
[[maybe_unused]] constexpr int64_t kStraightBackwardRuns = 512;  // (unused without clones)
void apply_runs_to(bool stream, const float* x, int64_t x_stride, float* y, int64_t y_stride,
                   int64_t runs, int64_t len, const ApplyCoefficients* k, int64_t k_step) {
#if NORMKIT_HAS_SIMD_CLONES
  // A channel's runs, apart (a piece: forward-train's apply of large planes),
  // each straight on its own, one fence after them. Bench, forward-train x
  // copy, alternated (1 / 2 threads): 32x64x56x56 1.21-1.25 -> 1.13 /
  // 1.16-1.20 -> 1.03-1.11; 16x256x28x28 1.13-1.15 -> 1.03-1.06 / 1.11-1.13
  // -> 1.01-1.06.
  if (k_step == 0 && cpu::streams_straight(stream, len, len, {}, {y})) {
    for (int64_t r = 0; r < runs; ++r)
      cpu::stream_apply_run_avx512(x + r * x_stride, y + r * y_stride, len, k->mean_hi, k->scale,
                                   k->shift);
    cpu::streamed_stores_done();
    return;
  }
  if (k_step == 1 && len >= 16 &&
      cpu::streams_straight(stream, runs * len, len, {x_stride, y_stride}, {y}))
    return stream_runs_avx512(x, y, runs, len, k,
                              [&](int64_t, __mmask16, __m512 centered, const auto& pick)
                                  __attribute__((target("avx512f"), always_inline)) {
      return cpu::Lines<1>{_mm512_fmadd_ps(centered, pick(&ApplyCoefficients::scale),
                                           pick(&ApplyCoefficients::shift))};
    });
#endif
  cpu::write_outputs<1>(stream, {{{y, y_stride}}}, runs, len,
                        [&](int64_t r0, int64_t n, const auto& out) {
    apply_runs(x + r0 * x_stride, x_stride, out[0].data, out[0].stride, n, len, k + r0 * k_step,
               k_step);
  });
}

void backward_apply_runs_to(bool stream, const float* x, int64_t x_stride, const float* dy,
                            int64_t dy_stride, float* dx, int64_t dx_stride, int64_t runs,
                            int64_t len, const BackwardCoefficients* k, int64_t k_step) {
#if NORMKIT_HAS_SIMD_CLONES
  if (k_step == 1 && len >= 16 && len < kStraightBackwardRuns &&
      cpu::streams_straight(stream, runs * len, len, {x_stride, dy_stride, dx_stride}, {dx}))
    return stream_runs_avx512(x, dx, runs, len, k,
                              [&](int64_t i, __mmask16 lanes, __m512 centered, const auto& pick)
                                  __attribute__((target("avx512f"), always_inline)) {
      const __m512 sum = _mm512_fmadd_ps(pick(&BackwardCoefficients::a),
                                         _mm512_maskz_loadu_ps(lanes, dy + i),
                                         _mm512_mul_ps(pick(&BackwardCoefficients::b), centered));
      return cpu::Lines<1>{_mm512_add_ps(sum, pick(&BackwardCoefficients::k))};
    });
#endif
  cpu::write_outputs<1>(stream, {{{dx, dx_stride}}}, runs, len,
                        [&](int64_t r0, int64_t n, const auto& out) {
    backward_apply_runs(x + r0 * x_stride, x_stride, dy + r0 * dy_stride, dy_stride, out[0].data,
                        out[0].stride, n, len, k + r0 * k_step, k_step);
  });
}

// The output pass over unit t (leaf::ApplyUnits) in one call.
void unit_apply(const Geometry& gx, const Geometry& gy, const float* x, float* y,
                const ApplyUnits& units, int64_t t, const ApplyCoefficients* coeff, bool stream) {
  const ApplyUnits::Span s = units.span(gx, t);
  apply_runs_to(stream, x + gx.offset(s.o, s.c0, s.first), gx.channel_stride,
                y + gy.offset(s.o, s.c0, s.first), gy.channel_stride, s.channels, s.len,
                coeff + s.c0, 1);
}

void unit_backward_apply(const Geometry& gx, const Geometry& gdy, const Geometry& gdx,
                         const float* x, const float* dy, float* dx, const ApplyUnits& units,
                         int64_t t, const BackwardCoefficients* coeff, bool stream) {
  const ApplyUnits::Span s = units.span(gx, t);
  backward_apply_runs_to(stream, x + gx.offset(s.o, s.c0, s.first), gx.channel_stride,
                         dy + gdy.offset(s.o, s.c0, s.first), gdy.channel_stride,
                         dx + gdx.offset(s.o, s.c0, s.first), gdx.channel_stride, s.channels,
                         s.len, coeff + s.c0, 1);
}

// ================= planes: [outer, C, inner], inner contiguous =================

void piece_apply(const Geometry& gx, const Geometry& gy, const float* x, float* y, int64_t c,
                 const Pieces::Span& s, ApplyCoefficients k, bool stream) {
  apply_runs_to(stream, x + gx.offset(s.first_run, c, s.first_inner), gx.outer_stride,
                y + gy.offset(s.first_run, c, s.first_inner), gy.outer_stride, s.runs, s.len, &k,
                0);
}

void planes_forward_training(const Forward<float>& p) {
  const Geometry& g = p.x_geom;
  const Pieces pieces(g);
  const int threads = threads_for(g.channels * g.reduction_size());
  const bool stream = cpu::stream_output(g.channels * g.reduction_size(), threads);
  auto coefficients = [&](int64_t c) {
    return apply_coefficients(p.moments[c].mean, invstd_of(p.moments[c].biased_variance(), p.eps),
                              param_or(p.gamma, c, 1.0), param_or(p.beta, c, 0.0));
  };
  auto channel_statistics = [&](int64_t c) {
    p.moments[c] = channel_moments(g, pieces, p.x, c);
    p.moments_done(c, 1);
  };
  if (forward_channel_at_a_time(g, threads, stream)) {
    parallel_for(threads, g.channels, [&](int64_t c) {
      channel_statistics(c);
      const ApplyCoefficients k = coefficients(c);
      for (int64_t i = 0; i < pieces.per_channel; ++i)
        piece_apply(g, p.y_geom, p.x, p.y, c, pieces.span(g, i), k, stream);
    });
    return;
  }
  if (const int64_t block =
          channel_block(g, threads, stream, leaf::runs_side_by_side(g, {p.y_geom}));
      block > 0) {
    forward_by_channel_blocks<ApplyCoefficients>(
        g.channels, g.outer, block, threads,
        [&](int64_t c) {
          channel_statistics(c);
          return coefficients(c);
        },
        [&](int64_t o, int64_t c0, int64_t c1, const ApplyCoefficients* coeff) {
          apply_runs_to(stream, p.x + g.offset(o, c0, 0), g.channel_stride,
                        p.y + p.y_geom.offset(o, c0, 0), p.y_geom.channel_stride, c1 - c0,
                        g.inner, coeff + c0, 1);
        });
    return;
  }
  const int64_t total = g.channels * pieces.per_channel;
  const ApplyUnits units(g);
  Workspace ws;
  const std::span<Moments> partial = ws.take<Moments>(total);
  const std::span<ApplyCoefficients> coeff = ws.take_for_overwrite<ApplyCoefficients>(g.channels);
  parallel_region(threads, [&] {
    for_each_piece(g, pieces, [&](int64_t c, int64_t i) {
      partial[c * pieces.per_channel + i] = piece_moments(g, p.x, c, pieces.span(g, i));
    });
#pragma omp for schedule(static)
    for (int64_t c = 0; c < g.channels; ++c) {
      Moments m;
      for (int64_t i = 0; i < pieces.per_channel; ++i) m.merge(partial[c * pieces.per_channel + i]);
      p.moments[c] = m;
      p.moments_done(c, 1);
      coeff[c] = coefficients(c);
    }
#pragma omp for schedule(static)
    for (int64_t t = 0; t < units.count; ++t)
      unit_apply(g, p.y_geom, p.x, p.y, units, t, coeff.data(), stream);
  });
}

void planes_moments(const Geometry& g, const float* x, Moments* out) {
  const Pieces pieces(g);
  const int64_t total = g.channels * pieces.per_channel;
  Workspace ws;
  const std::span<Moments> partial = ws.take<Moments>(total);
  parallel_region(threads_for(g.channels * g.reduction_size()), [&] {
    for_each_piece(g, pieces, [&](int64_t c, int64_t i) {
      partial[c * pieces.per_channel + i] = piece_moments(g, x, c, pieces.span(g, i));
    });
#pragma omp for schedule(static)
    for (int64_t c = 0; c < g.channels; ++c) {
      Moments m;
      for (int64_t i = 0; i < pieces.per_channel; ++i) m.merge(partial[c * pieces.per_channel + i]);
      out[c] = m;
    }
  });
}

void planes_apply(const Apply<float>& p) {
  const Geometry& g = p.x_geom;
  const ApplyUnits units(g);
  Workspace ws;
  const std::span<ApplyCoefficients> coeff = ws.take_for_overwrite<ApplyCoefficients>(g.channels);
  for (int64_t c = 0; c < g.channels; ++c)
    coeff[c] = apply_coefficients(p.mean[c], p.invstd[c], param_or(p.gamma, c, 1.0),
                                  param_or(p.beta, c, 0.0));
  const int threads = threads_for(g.channels * g.reduction_size());
  const bool stream = cpu::stream_output(g.channels * g.reduction_size(), threads);
  parallel_for(threads, units.count, [&](int64_t t) {
    unit_apply(g, p.y_geom, p.x, p.y, units, t, coeff.data(), stream);
  });
}

// Σdy and Σdy·(x - mean) of a piece; the float sums run around float(mean)
// and Σdy·(mean - float(mean)) is taken off in double.
// The piece's sums (leaf::piece_gradient_sums, shared with the fused kernels).
GradientSums piece_gradient_sums(const Backward<float>& p, int64_t c, const Pieces::Span& s) {
  const Geometry& gx = p.x_geom;
  const Geometry& gd = p.dy_geom;
  return leaf::piece_gradient_sums(p.x + gx.offset(s.first_run, c, s.first_inner), gx.outer_stride,
                                   p.dy + gd.offset(s.first_run, c, s.first_inner), gd.outer_stride,
                                   s.runs, s.len, p.mean[c]);
}

void piece_backward_apply(const Backward<float>& p, int64_t c, const Pieces::Span& s,
                          BackwardCoefficients k, bool stream) {
  const Geometry& gx = p.x_geom;
  const Geometry& gd = p.dy_geom;
  const Geometry& go = p.dx_geom;
  backward_apply_runs_to(stream, p.x + gx.offset(s.first_run, c, s.first_inner), gx.outer_stride,
                      p.dy + gd.offset(s.first_run, c, s.first_inner), gd.outer_stride,
                      p.dx + go.offset(s.first_run, c, s.first_inner), go.outer_stride, s.runs,
                      s.len, &k, 0);
}

void planes_backward(const Backward<float>& p) {
  const Geometry& g = p.x_geom;
  const Pieces pieces(g);
  const int threads = threads_for(2 * g.channels * g.reduction_size());
  const bool stream = cpu::stream_output(g.channels * g.reduction_size(), threads);
  if (backward_channel_at_a_time(g, threads, stream && p.dx,
                                 leaf::runs_side_by_side(g, {p.dy_geom, p.dx_geom}))) {
    parallel_for(threads, g.channels, [&](int64_t c) {
      double sum_dy = 0, sum_dy_xmu = 0;
      for (int64_t i = 0; i < pieces.per_channel; ++i) {
        const GradientSums s = piece_gradient_sums(p, c, pieces.span(g, i));
        sum_dy += s.sum_g;
        sum_dy_xmu += s.sum_g_xc;
      }
      const BackwardCoefficients k = finish_channel(p, c, sum_dy, sum_dy_xmu);
      if (p.dx)
        for (int64_t i = 0; i < pieces.per_channel; ++i)
          piece_backward_apply(p, c, pieces.span(g, i), k, stream);
    });
    return;
  }
  const int64_t total = g.channels * pieces.per_channel;
  const ApplyUnits units(g);
  Workspace ws;
  const std::span<GradientSums> partial = ws.take<GradientSums>(total);
  const std::span<BackwardCoefficients> coeff =
      ws.take_for_overwrite<BackwardCoefficients>(g.channels);
  parallel_region(threads, [&] {
    for_each_piece(g, pieces, [&](int64_t c, int64_t i) {
      partial[c * pieces.per_channel + i] = piece_gradient_sums(p, c, pieces.span(g, i));
    });
#pragma omp for schedule(static)
    for (int64_t c = 0; c < g.channels; ++c) {
      double sum_dy = 0, sum_dy_xmu = 0;
      for (int64_t i = 0; i < pieces.per_channel; ++i) {
        sum_dy += partial[c * pieces.per_channel + i].sum_g;
        sum_dy_xmu += partial[c * pieces.per_channel + i].sum_g_xc;
      }
      coeff[c] = finish_channel(p, c, sum_dy, sum_dy_xmu);
    }
    if (p.dx) {
#pragma omp for schedule(static)
      for (int64_t t = 0; t < units.count; ++t)
        unit_backward_apply(g, p.dy_geom, p.dx_geom, p.x, p.dy, p.dx, units, t, coeff.data(),
                            stream);
    }
  });
}

// dx from given sums (synchronized BN): the apply half of planes_backward.
void planes_backward_apply(const BackwardApply<float>& p) {
  const Geometry& g = p.x_geom;
  const ApplyUnits units(g);
  Workspace ws;
  const std::span<BackwardCoefficients> coeff =
      ws.take_for_overwrite<BackwardCoefficients>(g.channels);
  for (int64_t c = 0; c < g.channels; ++c)
    coeff[c] = backward_coefficients(p.mean[c], p.invstd[c], param_or(p.gamma, c, 1.0),
                                     p.sum_dy[c], p.sum_dy_xhat[c], p.count, BackwardMode::training);
  const int threads = threads_for(2 * g.channels * g.reduction_size());
  const bool stream = cpu::stream_output(g.channels * g.reduction_size(), threads);
  parallel_for(threads, units.count, [&](int64_t t) {
    unit_backward_apply(g, p.dy_geom, p.dx_geom, p.x, p.dy, p.dx, units, t, coeff.data(), stream);
  });
}

const char* planes_decline(const Geometry& x, std::span<const Geometry> others) {
  if (x.inner_stride != 1 || x.inner < 2) return "inner run is not contiguous";
  for (const auto& o : others)
    if (o.inner_stride != 1 || o.inner != x.inner || o.outer != x.outer)
      return "an output or gradient is not laid out like x";
  return nullptr;
}

}  // namespace

extern const Impl kPlanes = {
    "planes", planes_decline, planes_forward_training, planes_apply, planes_backward,
    [](const Statistics<float>& p) { planes_moments(p.x_geom, p.x, p.moments); },
    planes_backward_apply};

}  // namespace normkit::kernels::bn
