// Fast BN+ReLU and BN+Add+ReLU, planes form: channels-first data with
// contiguous inner runs (NCL, NCHW, NCDHW) whose mask order is (outer,
// channel, inner). The rules every fast kernel keeps are in src/cpu/README.md.
//
// Forward = batch statistics (the scheme of batch_norm_planes.cpp: pieces
// fixed by the geometry, float lanes inside a piece, Chan merges in double in
// a fixed order) + one pass that writes y = relu(BN(x) [+ z]) and packs the
// mask from the y just written (y > 0 exactly where the pre-activation is > 0).
// The plans are the unfused BN kernel's (batch_norm_planes.cpp): channel at a
// time, x re-read from cache, for problems that fit in cache or, in training,
// when y is streamed in runs long enough; blocks of channels for short runs
// when y is streamed, in training; otherwise the statistics, then the output
// pass in memory order. The backward as BN's (leaf::backward_channel_at_a_time).
//
// Backward = the BN backward of g = mask ? dy : 0, where the leaf loops take g
// from dy and the bits themselves (leaf::GradientSource), so that x, dy and
// the bits stream together. g never exists as a tensor, and the mask costs
// 1/32 of dy's bytes. (BN+Add+ReLU writes g as dz in the same loop as dx.)
//
// The statistics and the gradient sums are batch_norm_planes.cpp's own
// (leaf::piece_moments, leaf::piece_gradient_sums): BN+ReLU gives relu(BN(x))
// and its gradients bit for bit.
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <span>

#include "core/parallel.hpp"
#include "cpu/coefficients.hpp"
#include "cpu/implementations.hpp"
#include "cpu/leaf_loops.hpp"
#include "cpu/relu_mask.hpp"
#include "cpu/streamed_output.hpp"
#include "kernels/batch_norm_fused.hpp"

namespace normkit::kernels::bn_fused {
namespace {

using cpu::ApplyCoefficients;
using cpu::BackwardCoefficients;
using cpu::finish_channel;
using cpu::forward_coefficients;
using cpu::pack_positive_bits;
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
using leaf::piece_moments;
using leaf::Pieces;
using leaf::Workspace;

// y = relu((x - mean_hi)·scale + shift [+ z]) over `runs` runs of `len`
// values, run r `stride` elements after run r - 1 in x, y and z alike (z may be
// null), with coefficients k[r] (runs of consecutive channels) or k[0]
// (k_step 0); relu keeps NaN. One call for a unit's short runs (7×7: 83
// channels of 49 values), as BN's apply_runs: a call per run through the
// clones' resolver costs as much as a short run's arithmetic.
NORMKIT_SIMD_CLONES
void apply_relu_runs(const float* __restrict x, const float* __restrict z, float* __restrict y,
                     int64_t stride, int64_t runs, int64_t len, const ApplyCoefficients* k,
                     int64_t k_step) {
  for (int64_t r = 0; r < runs; ++r) {
    const float* xr = x + r * stride;
    float* yr = y + r * stride;
    const ApplyCoefficients kr = k[r * k_step];
    if (z) {
      const float* zr = z + r * stride;
      for (int64_t i = 0; i < len; ++i) {
        const float p = (xr[i] - kr.mean_hi) * kr.scale + kr.shift + zr[i];
        yr[i] = p < 0.0f ? 0.0f : p;
      }
    } else {
      for (int64_t i = 0; i < len; ++i) {
        const float p = (xr[i] - kr.mean_hi) * kr.scale + kr.shift;
        yr[i] = p < 0.0f ? 0.0f : p;
      }
    }
  }
}

// ======================= planes =======================

// One run (or part of one) of the output pass: y, and the mask from the y just
// written, through the streamed buffer when `stream` (cpu/streamed_output.hpp;
// a run shorter than cpu::kMinStreamedRun is written in place).
void run_forward_apply(const Forward<float>& p, int64_t o, int64_t c, int64_t first, int64_t len,
                       ApplyCoefficients k, bool stream) {
  const float* zr = p.z ? p.z + p.z_geom.offset(o, c, first) : nullptr;
  const cpu::Output y{p.y + p.y_geom.offset(o, c, first), p.y_geom.channel_stride};
  cpu::write_outputs<1>(stream, {y}, 1, len, [&](int64_t, int64_t, const auto& out) {
    apply_relu_runs(p.x + p.x_geom.offset(o, c, first), zr, out[0].data, 0, 1, len, &k, 0);
    if (p.mask) pack_positive_bits(out[0].data, len, p.mask, p.order.bit(o, c, first));
  });
}

// Whether a unit of several channels lies back to back in x, y and z
// (contiguous NCHW data): then it is one span of memory and of bits. A unit of
// several channels holds their whole runs (ApplyUnits), and this entry takes
// only masks in (outer, channel, inner) order (planes_order), so its bits
// are consecutive already.
bool unit_is_one_span(const Forward<float>& p, const ApplyUnits::Span& s) {
  const auto packed = [&](const Geometry& g) { return g.channel_stride == p.x_geom.inner; };
  return s.channels > 1 && packed(p.x_geom) && packed(p.y_geom) && (!p.z || packed(p.z_geom));
}

// The output pass over span s (a unit of ApplyUnits, or a block of channels
// at one outer index) with per-channel coefficients. A span of short runs
// laid out as one span of memory is one apply and one pack of its
// bits: packing run by run took four atomic byte updates per run (the bytes
// a run shares with its neighbours), as much as the run's arithmetic.
void span_forward_apply(const Forward<float>& p, const ApplyUnits::Span& s,
                        const ApplyCoefficients* coeff, bool stream) {
  const Geometry& g = p.x_geom;
  if (!unit_is_one_span(p, s)) {
    for (int64_t c = s.c0; c < s.c0 + s.channels; ++c)
      run_forward_apply(p, s.o, c, s.first, s.len, coeff[c], stream);
    return;
  }
  const cpu::Output y{p.y + p.y_geom.offset(s.o, s.c0, 0), s.len};
  cpu::write_outputs<1>(stream, {y}, s.channels, s.len,
                        [&](int64_t r0, int64_t runs, const auto& out) {
    const int64_t c0 = s.c0 + r0;
    const float* z = p.z ? p.z + p.z_geom.offset(s.o, c0, 0) : nullptr;
    apply_relu_runs(p.x + g.offset(s.o, c0, 0), z, out[0].data, s.len, runs, s.len, coeff + c0, 1);
    if (p.mask) pack_positive_bits(out[0].data, runs * s.len, p.mask, p.order.bit(s.o, c0, 0));
  });
}
void unit_forward_apply(const Forward<float>& p, const ApplyUnits& units, int64_t t,
                        const ApplyCoefficients* coeff, bool stream) {
  span_forward_apply(p, units.span(p.x_geom, t), coeff, stream);
}

// BN's plans (batch_norm_planes.cpp): channel at a time when x fits in cache
// or, in training, when y is streamed (leaf::forward_channel_at_a_time: x is
// then read once instead of twice; inference reads it once either way);
// blocks of channels for short runs when y is streamed, in training
// (leaf::channel_block); otherwise statistics, then the output pass in memory
// order.
void planes_forward(const Forward<float>& p) {
  const Geometry& g = p.x_geom;
  const Pieces pieces(g);
  const int threads = threads_for(g.channels * g.reduction_size());
  const bool stream = cpu::stream_output(g.channels * g.reduction_size(), threads);
  auto channel_statistics = [&](int64_t c) {
    p.moments[c] = channel_moments(g, pieces, p.x, c);
    p.moments_done(c, 1);
  };
  if (forward_channel_at_a_time(g, threads, stream && p.training)) {
    parallel_for(threads, g.channels, [&](int64_t c) {
      if (p.training) channel_statistics(c);
      const ApplyCoefficients k = forward_coefficients(p, c);
      for (int64_t i = 0; i < pieces.per_channel; ++i) {
        const Pieces::Span s = pieces.span(g, i);
        for (int64_t r = s.first_run; r < s.first_run + s.runs; ++r)
          run_forward_apply(p, r, c, s.first_inner, s.len, k, stream);
      }
    });
    return;
  }
  const bool side_by_side =
      leaf::runs_side_by_side(g, {p.y_geom}) && (!p.z || leaf::runs_side_by_side(g, {p.z_geom}));
  const int64_t block = p.training ? channel_block(g, threads, stream, side_by_side) : 0;
  if (block > 0) {
    forward_by_channel_blocks<ApplyCoefficients>(
        g.channels, g.outer, block, threads,
        [&](int64_t c) {
          channel_statistics(c);
          return forward_coefficients(p, c);
        },
        [&](int64_t o, int64_t c0, int64_t c1, const ApplyCoefficients* coeff) {
          span_forward_apply(p, {o, c0, c1 - c0, 0, g.inner}, coeff, stream);
        });
    return;
  }
  const ApplyUnits units(g);
  Workspace ws;
  const std::span<Moments> partial = ws.take<Moments>(p.training ? g.channels * pieces.per_channel : 0);
  const std::span<ApplyCoefficients> coeff = ws.take_for_overwrite<ApplyCoefficients>(g.channels);
  parallel_region(threads, [&] {
    if (p.training)
      for_each_piece(g, pieces, [&](int64_t c, int64_t i) {
        partial[c * pieces.per_channel + i] = piece_moments(g, p.x, c, pieces.span(g, i));
      });
#pragma omp for schedule(static)
    for (int64_t c = 0; c < g.channels; ++c) {
      if (p.training) {
        Moments m;
        for (int64_t i = 0; i < pieces.per_channel; ++i) m.merge(partial[c * pieces.per_channel + i]);
        p.moments[c] = m;
        p.moments_done(c, 1);
      }
      coeff[c] = forward_coefficients(p, c);
    }
#pragma omp for schedule(static)
    for (int64_t t = 0; t < units.count; ++t) unit_forward_apply(p, units, t, coeff.data(), stream);
  });
}

// Σg and Σg·(x - mean) of a piece: BN's sums (leaf::piece_gradient_sums) bit
// for bit, with g read from dy and the bits inside the loop (leaf::GradientSource).
GradientSums piece_gradient_sums(const Backward<float>& p, int64_t c, const Pieces::Span& s) {
  const leaf::GradientSource src{p.dy + p.dy_geom.offset(s.first_run, c, s.first_inner),
                                 p.dy_geom.outer_stride, p.mask,
                                 p.order.bit(s.first_run, c, s.first_inner), p.order.outer};
  return leaf::piece_gradient_sums(p.x + p.x_geom.offset(s.first_run, c, s.first_inner),
                                   p.x_geom.outer_stride, src, s.runs, s.len, p.mean[c]);
}

// g = mask ? dy : 0 over `runs` runs of `len` values from their bits (run r's
// from bit `bit` + r·bit_stride), into dz if wanted, and dx = a·g + b·(x -
// mean_hi) + k if wanted: x, dy and the bits stream together, as in the sums
// (leaf::GradientSource). One call per piece, not per run: for short runs
// (7×7, 14×14) a call through the clones' resolver per run cost as much as the
// run's arithmetic.
struct MaskedRuns {
  const float* x;
  int64_t x_stride;
  const float* dy;
  int64_t dy_stride;
  const uint8_t* mask;
  int64_t bit, bit_stride;
  float* dx;
  int64_t dx_stride;
  float* dz;
  int64_t dz_stride;
};
// One run, with dx and dz wanted or not as template arguments, so that no
// loop tests them: a test inside a loop is if-converted into masked
// operations, which are not contracted into FMAs, and dx would round otherwise
// than BN's (backward_apply_runs in batch_norm_planes.cpp).
template <bool DX, bool DZ>
[[gnu::always_inline]] inline void backward_apply_masked_run(
    const float* __restrict x, const float* __restrict dy, const uint8_t* mask, int64_t bit,
    float* __restrict dx, float* __restrict dz, int64_t len, BackwardCoefficients k) {
  constexpr int kBlock = 32;
  leaf::prefetch_bits(mask, bit, len);
  int64_t i = 0;
  for (; i + kBlock <= len; i += kBlock) {
    const uint32_t m = leaf::mask_bits(mask, bit + i, kBlock);
    leaf::prefetch_ahead<kBlock>(x + i);
    leaf::prefetch_ahead<kBlock>(dy + i);
    float g[kBlock];
    for (int l = 0; l < kBlock; ++l) g[l] = leaf::lane_gradient<true>(dy + i, m, l);
    if constexpr (DZ)
      for (int l = 0; l < kBlock; ++l) dz[i + l] = g[l];
    if constexpr (DX)
      for (int l = 0; l < kBlock; ++l) dx[i + l] = k.a * g[l] + k.b * (x[i + l] - k.mean_hi) + k.k;
  }
  if (i < len) {  // the rest, fewer than kBlock
    const int n = static_cast<int>(len - i);
    const uint32_t m = leaf::mask_bits(mask, bit + i, n);
    for (int l = 0; l < n; ++l) {
      const float g = leaf::lane_gradient<true>(dy + i, m, l);
      if constexpr (DZ) dz[i + l] = g;
      if constexpr (DX) dx[i + l] = k.a * g + k.b * (x[i + l] - k.mean_hi) + k.k;
    }
  }
}

// Run r takes the coefficients k[r·k_step]: one channel's runs (k_step 0), or
// a unit's runs of consecutive channels (k_step 1).
template <bool DX, bool DZ>
[[gnu::always_inline]] inline void backward_apply_masked_runs_of(
    const MaskedRuns& m, int64_t runs, int64_t len, const BackwardCoefficients* k,
    int64_t k_step) {
  for (int64_t r = 0; r < runs; ++r)
    backward_apply_masked_run<DX, DZ>(m.x + r * m.x_stride, m.dy + r * m.dy_stride, m.mask,
                                      m.bit + r * m.bit_stride,
                                      DX ? m.dx + r * m.dx_stride : nullptr,
                                      DZ ? m.dz + r * m.dz_stride : nullptr, len, k[r * k_step]);
}

NORMKIT_SIMD_CLONES
void backward_apply_masked_runs(const MaskedRuns& m, int64_t runs, int64_t len,
                                const BackwardCoefficients* k, int64_t k_step) {
  if (m.dx && m.dz) return backward_apply_masked_runs_of<true, true>(m, runs, len, k, k_step);
  if (m.dx) return backward_apply_masked_runs_of<true, false>(m, runs, len, k, k_step);
  if (m.dz) return backward_apply_masked_runs_of<false, true>(m, runs, len, k, k_step);
}

// dx and dz of `runs` runs of `len` values from (o, c, i), `run_stride` apart
// (a channel's runs: outer_stride; a unit's channels: channel_stride), run r
// with the coefficients k[r·k_step], through the streamed buffer when `stream`
// (cpu/streamed_output.hpp).
void runs_backward_apply(const Backward<float>& p, int64_t o, int64_t c, int64_t i, int64_t runs,
                         int64_t len, bool along_channels, const BackwardCoefficients* k,
                         int64_t k_step, bool stream) {
  const auto stride = [&](const Geometry& h) {
    return along_channels ? h.channel_stride : h.outer_stride;
  };
  const int64_t bit_stride = along_channels ? p.order.channel : p.order.outer;
  const std::array<cpu::Output, 2> outputs{
      {{p.dx ? p.dx + p.dx_geom.offset(o, c, i) : nullptr, stride(p.dx_geom)},
       {p.dz ? p.dz + p.dz_geom.offset(o, c, i) : nullptr, stride(p.dz_geom)}}};
  cpu::write_outputs(stream, outputs, runs, len, [&](int64_t r0, int64_t n, const auto& out) {
    const int64_t ro = along_channels ? o : o + r0, rc = along_channels ? c + r0 : c;
    const MaskedRuns m{p.x + p.x_geom.offset(ro, rc, i),
                       stride(p.x_geom),
                       p.dy + p.dy_geom.offset(ro, rc, i),
                       stride(p.dy_geom),
                       p.mask,
                       p.order.bit(ro, rc, i),
                       bit_stride,
                       out[0].data,
                       out[0].stride,
                       out[1].data,
                       out[1].stride};
    backward_apply_masked_runs(m, n, len, k + r0 * k_step, k_step);
  });
}

// A piece of channel c (its runs along outer), or unit t (ApplyUnits: runs of
// consecutive channels, in memory order).
void piece_backward_apply(const Backward<float>& p, int64_t c, const Pieces::Span& s,
                          BackwardCoefficients k, bool stream) {
  runs_backward_apply(p, s.first_run, c, s.first_inner, s.runs, s.len, false, &k, 0, stream);
}
void unit_backward_apply(const Backward<float>& p, const ApplyUnits& units, int64_t t,
                         const BackwardCoefficients* coeff, bool stream) {
  const ApplyUnits::Span s = units.span(p.x_geom, t);
  runs_backward_apply(p, s.o, s.c0, s.first, s.channels, s.len, true, coeff + s.c0, 1, stream);
}

void planes_backward(const Backward<float>& p) {
  const Geometry& g = p.x_geom;
  const Pieces pieces(g);
  const int threads = threads_for(2 * g.channels * g.reduction_size());
  const bool second_pass = p.dx || p.dz;
  const bool stream = cpu::stream_output(g.channels * g.reduction_size(), threads);
  const bool side_by_side = leaf::runs_side_by_side(g, {p.dy_geom}) &&
                            (!p.dx || leaf::runs_side_by_side(g, {p.dx_geom})) &&
                            (!p.dz || leaf::runs_side_by_side(g, {p.dz_geom}));
  if (backward_channel_at_a_time(g, threads, stream && second_pass, side_by_side)) {
    parallel_for(threads, g.channels, [&](int64_t c) {
      double sum_g = 0, sum_g_xmu = 0;
      for (int64_t i = 0; i < pieces.per_channel; ++i) {
        const GradientSums s = piece_gradient_sums(p, c, pieces.span(g, i));
        sum_g += s.sum_g;
        sum_g_xmu += s.sum_g_xc;
      }
      const BackwardCoefficients k = finish_channel(p, c, sum_g, sum_g_xmu);
      if (second_pass)
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
      double sum_g = 0, sum_g_xmu = 0;
      for (int64_t i = 0; i < pieces.per_channel; ++i) {
        sum_g += partial[c * pieces.per_channel + i].sum_g;
        sum_g_xmu += partial[c * pieces.per_channel + i].sum_g_xc;
      }
      coeff[c] = finish_channel(p, c, sum_g, sum_g_xmu);
    }
    if (second_pass) {
#pragma omp for schedule(static)
      for (int64_t t = 0; t < units.count; ++t)
        unit_backward_apply(p, units, t, coeff.data(), stream);
    }
  });
}

bool planes_order(const Geometry& x, const MaskOrder& order) {
  return order.inner == 1 && (x.channels == 1 || order.channel == x.inner) &&
         (x.outer == 1 || order.outer == x.channels * x.inner);
}

const char* planes_decline(const Geometry& x, std::span<const Geometry> others,
                           const MaskOrder& order) {
  if (x.inner_stride != 1 || x.inner < 2) return "inner run is not contiguous";
  for (const Geometry& o : others)
    if (o.inner_stride != 1 || o.inner != x.inner || o.outer != x.outer)
      return "an output or gradient is not laid out like x";
  if (!planes_order(x, order)) return "the mask order is not (outer, channel, inner)";
  return nullptr;
}


}  // namespace

extern const Impl kPlanes = {"planes", planes_decline, planes_forward, planes_backward};

}  // namespace normkit::kernels::bn_fused
