// Fast batch normalization, rows form: contiguous channels, one row of C
// values per position (NLC, NHWC, NDHWC, NC, and PyTorch's channels_last
// tensors). The rules every fast kernel keeps (determinism, SIMD clones,
// internal linkage) are in src/cpu/README.md; the accuracy scheme is the
// planes form's (batch_norm_planes.cpp), over chunks of rows instead of pieces.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <span>

#include "core/parallel.hpp"
#include "cpu/coefficients.hpp"
#include "cpu/implementations.hpp"
#include "cpu/leaf_loops.hpp"
#include "cpu/rows_loops.hpp"
#include "cpu/streamed_output.hpp"
#include "kernels/batch_norm.hpp"

namespace normkit::kernels::bn {
namespace {

using cpu::backward_coefficients;
using cpu::blocked_channels;
using cpu::column_units;
using cpu::ColumnUnits;
using cpu::next_chunk;
using cpu::finish_forward_block;
using cpu::RowBackwardCoefficients;
using cpu::rows_moments_into;
using cpu::rows_forward_training_region;
using cpu::apply_rows_to;
using cpu::rows_backward_apply_chunk;
using cpu::rows_gradient_sums_chunk;
using cpu::for_thread_rows;
using cpu::unit_backward;
using cpu::unit_blocked;
using cpu::unit_moments;
using detail::parallel_for;
using detail::parallel_region;
using detail::threads_for;
using leaf::param_or;
using leaf::RowPlan;
using leaf::Workspace;

// ================= rows: [rows, C], channels contiguous =================

// Channel blocks, row groups and the chunk loops of the statistics and
// gradient sums: cpu/rows_loops.hpp (shared with the fused kernels).

// Per-channel coefficients as three arrays, so the row loop vectorizes over channels.
struct RowCoefficients {
  float* mean_hi;
  float* scale;
  float* shift;
  explicit RowCoefficients(float* storage, int64_t channels)
      : mean_hi(storage), scale(storage + channels), shift(storage + 2 * channels) {}
};

// rows_backward_apply_chunk, writing through the streamed buffer when `stream`
// (cpu/streamed_output.hpp: outputs larger than the threads' L2), or straight
// from the loop, as cpu::apply_rows_to does for the forward.
void backward_apply_rows_to(bool stream, const float* x, int64_t x_stride, const float* dy,
                            int64_t dy_stride, float* dx, int64_t dx_stride, int64_t rows,
                            int64_t channels, int64_t blocked, const float* mean_hi,
                            const float* a, const float* b, const float* k) {
#if NORMKIT_HAS_SIMD_CLONES
  if (cpu::streams_straight(stream, rows * channels, channels, {x_stride, dy_stride, dx_stride},
                            {dx}))
    return cpu::rows_backward_apply_streamed_avx512<false>(
        x, dy, nullptr, 0, dx, nullptr, rows * channels, channels, {mean_hi, a, b, k});
#endif
  cpu::write_row_pieces<1>(stream, {{{dx, dx_stride}}}, rows, channels,
                           [&](int64_t r0, int64_t n, const auto& out) {
    rows_backward_apply_chunk(x + r0 * x_stride, x_stride, dy + r0 * dy_stride, dy_stride,
                              out[0].data, out[0].stride, n, channels, blocked, mean_hi, a, b, k);
  });
}

// dx of this thread's share of the rows (for_thread_rows), from dx's
// coefficients over all channels: batch norm's backward and its apply half.
template <class Problem>
void backward_apply_thread_rows(const Problem& p, const RowPlan& plan, bool stream,
                                const RowBackwardCoefficients& co) {
  const Geometry& gx = p.x_geom;
  for_thread_rows(plan, [&](int64_t r0, int64_t rows) {
    backward_apply_rows_to(stream, p.x + r0 * gx.outer_stride, gx.outer_stride,
                           p.dy + r0 * p.dy_geom.outer_stride, p.dy_geom.outer_stride,
                           p.dx + r0 * p.dx_geom.outer_stride, p.dx_geom.outer_stride, rows,
                           plan.channels, blocked_channels(plan.channels), co.mean_hi.data(),
                           co.a.data(), co.b.data(), co.k.data());
  });
}

// y of rows [r0, r0 + rows).
void rows_apply_rows(const Geometry& gx, const Geometry& gy, const float* x, float* y,
                     int64_t r0, int64_t rows, const RowCoefficients& k, bool stream) {
  apply_rows_to(stream, x + r0 * gx.outer_stride, gx.outer_stride, y + r0 * gy.outer_stride,
                gy.outer_stride, rows, gx.channels, k.mean_hi, k.scale, k.shift);
}

// Each unit's moments and coefficients (finish_forward_block, into arrays over
// all channels), then its y while its columns are in cache.
void rows_forward_units(const Forward<float>& p, const RowPlan& plan, ColumnUnits units,
                        int threads, bool stream) {
  Workspace ws;
  const RowCoefficients k(ws.take_for_overwrite<float>(3 * plan.channels).data(), plan.channels);
  parallel_for(threads, units.count, [&](int64_t u) {
    const auto [c0, width] = units.of(u, plan.channels);
    Workspace own;  // this thread's
    double* const mean = own.take_for_overwrite<double>(width).data();
    double* const m2 = own.take_for_overwrite<double>(width).data();
    const double count = unit_moments(p.x_geom, plan, p.x, c0, width, mean, m2);
    finish_forward_block(p, c0, width, count, mean, m2, k.mean_hi, k.scale, k.shift);
    apply_rows_to(stream, p.x + c0, p.x_geom.outer_stride, p.y + c0, p.y_geom.outer_stride,
                  plan.rows, width, k.mean_hi + c0, k.scale + c0, k.shift + c0);
  });
}

void rows_forward_training(const Forward<float>& p) {
  const Geometry& g = p.x_geom;
  const RowPlan plan(g);
  const int64_t C = plan.channels;
  const int threads = threads_for(C * g.outer);
  const bool stream = cpu::stream_output(C * plan.rows, threads);
  if (const ColumnUnits units = column_units(plan, threads); units.count > 0)
    return rows_forward_units(p, plan, units, threads, stream);
  Workspace ws;
  const RowCoefficients k(ws.take_for_overwrite<float>(3 * C).data(), C);
  rows_forward_training_region(p, plan, threads, k.mean_hi, k.scale, k.shift,
                               [&](int64_t r0, int64_t rows) {
    rows_apply_rows(g, p.y_geom, p.x, p.y, r0, rows, k, stream);
  });
}

void rows_moments(const Geometry& g, const float* x, Moments* out) {
  rows_moments_into(g, x, out, threads_for(g.channels * g.outer));
}

void rows_apply(const Apply<float>& p) {
  const int64_t C = p.x_geom.channels;
  Workspace ws;
  const RowCoefficients k(ws.take_for_overwrite<float>(3 * C).data(), C);
  const RowPlan plan(p.x_geom);
  const int threads = threads_for(C * p.x_geom.outer);
  const bool stream = cpu::stream_output(C * plan.rows, threads);
  // The coefficients as forward-training's (finish_forward_block), so that the
  // same statistics give the same y; vectorized (4096 channels one at a time
  // took longer than the apply of 32 rows on 2 threads). With few rows, column
  // units, each thread its channels' coefficients and then their columns, as
  // forward-training (32x4096 inference at 2 threads, with the invstd shared
  // out too: 38-41 -> 23.5 us, 20 calls after eviction).
  if (const ColumnUnits units = column_units(plan, threads); units.count > 0) {
    parallel_for(threads, units.count, [&](int64_t u) {
      const auto [c0, width] = units.of(u, C);
      cpu::coefficients_of_channels(p, c0, width, k.mean_hi, k.scale, k.shift);
      apply_rows_to(stream, p.x + c0, p.x_geom.outer_stride, p.y + c0, p.y_geom.outer_stride,
                    plan.rows, width, k.mean_hi + c0, k.scale + c0, k.shift + c0);
    });
    return;
  }
  cpu::coefficient_arrays(C, p.mean, p.invstd, p.gamma, p.beta, k.mean_hi, k.scale, k.shift);
  parallel_region(threads, [&] {
    for_thread_rows(plan, [&](int64_t r0, int64_t rows) {
      rows_apply_rows(p.x_geom, p.y_geom, p.x, p.y, r0, rows, k, stream);
    });
  });
}

// Backward over column units (see ColumnUnits): per channel, Σdy and
// Σdy·(x - mean_hi) summed over the stripes' rows in order and the stripes
// added in order, as the phased path; then dx while x and dy are in cache.
void rows_backward_units(const Backward<float>& p, const RowPlan& plan, ColumnUnits units,
                         int threads, bool stream) {
  const Geometry &gx = p.x_geom, &gdy = p.dy_geom;
  parallel_for(threads, units.count, [&](int64_t u) {
    const int64_t width = units.of(u, plan.channels).width;
    const int64_t blocked = unit_blocked(plan, width);
    unit_backward(
        p, plan, units, u,
        [&](int64_t r0, int64_t rows, int64_t c0, int64_t w, const float* mean_hi, double* s1,
            double* s2) {
          rows_gradient_sums_chunk(p.x + r0 * gx.outer_stride + c0, gx.outer_stride,
                                   p.dy + r0 * gdy.outer_stride + c0, gdy.outer_stride, rows, w,
                                   blocked, mean_hi, s1, s2);
        },
        [&](int64_t c0, int64_t w, const float* mean_hi, const float* a, const float* b,
            const float* k) {
          if (p.dx)
            backward_apply_rows_to(stream, p.x + c0, gx.outer_stride, p.dy + c0,
                                   gdy.outer_stride, p.dx + c0, p.dx_geom.outer_stride, plan.rows,
                                   w, blocked, mean_hi, a, b, k);
        });
  });
}

void rows_backward(const Backward<float>& p) {
  const Geometry& gx = p.x_geom;
  const RowPlan plan(gx);
  const int64_t C = plan.channels;
  const int threads = threads_for(2 * C * plan.rows);
  const bool stream = cpu::stream_output(C * plan.rows, threads);
  if (const ColumnUnits units = column_units(plan, threads); units.count > 0)
    return rows_backward_units(p, plan, units, threads, stream);
  Workspace ws;
  double* const stripe_dy = ws.take<double>(plan.stripes * C).data();
  double* const stripe_dy_xmu = ws.take<double>(plan.stripes * C).data();
  RowBackwardCoefficients co(ws, p.mean, C);
  parallel_region(threads, [&] {
#pragma omp for schedule(static)
    for (int64_t s = 0; s < plan.stripes; ++s)
      for (int64_t chunk = plan.first_chunk(s); chunk < plan.first_chunk(s + 1); ++chunk) {
        const int64_t r0 = plan.first_row(chunk);
        rows_gradient_sums_chunk(p.x + r0 * gx.outer_stride, gx.outer_stride,
                                 p.dy + r0 * p.dy_geom.outer_stride, p.dy_geom.outer_stride,
                                 plan.rows_in(chunk), C, blocked_channels(C), co.mean_hi.data(),
                                 stripe_dy + s * C, stripe_dy_xmu + s * C,
                                 next_chunk(plan, chunk, gx, p.x, &p.dy_geom, p.dy));
      }
    co.finish_from_stripes(p, plan.stripes, stripe_dy, stripe_dy_xmu);
    // (after finish_from_stripes, whose omp for ends with a barrier)
    if (p.dx) backward_apply_thread_rows(p, plan, stream, co);
  });
}

// dx from given sums (synchronized BN): the apply half of rows_backward.
void rows_backward_apply(const BackwardApply<float>& p) {
  const Geometry& gx = p.x_geom;
  const RowPlan plan(gx);
  const int64_t C = plan.channels;
  Workspace ws;
  RowBackwardCoefficients co(ws, p.mean, C);
  const auto set_coefficients = [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c)
      co.set(c, backward_coefficients(p.mean[c], p.invstd[c], param_or(p.gamma, c, 1.0),
                                      p.sum_dy[c], p.sum_dy_xhat[c], p.count,
                                      BackwardMode::training));
  };
  const int threads = threads_for(2 * C * plan.rows);
  const bool stream = cpu::stream_output(C * plan.rows, threads);
  // Few rows: column units, each thread its channels' coefficients and then
  // their columns, as the inference (rows_apply).
  if (const ColumnUnits units = column_units(plan, threads); units.count > 0) {
    parallel_for(threads, units.count, [&](int64_t u) {
      const auto [c0, width] = units.of(u, C);
      set_coefficients(c0, c0 + width);
      backward_apply_rows_to(stream, p.x + c0, gx.outer_stride, p.dy + c0, p.dy_geom.outer_stride,
                             p.dx + c0, p.dx_geom.outer_stride, plan.rows, width,
                             unit_blocked(plan, width), co.mean_hi.data() + c0, co.a.data() + c0,
                             co.b.data() + c0, co.k.data() + c0);
    });
    return;
  }
  set_coefficients(0, C);
  parallel_region(threads, [&] { backward_apply_thread_rows(p, plan, stream, co); });
}

const char* rows_decline(const Geometry& x, std::span<const Geometry> others) {
  if (x.inner != 1 || (x.channel_stride != 1 && x.channels > 1))
    return "channels are not contiguous rows";
  for (const auto& o : others)
    if (o.inner != 1 || (o.channel_stride != 1 && o.channels > 1) || o.outer != x.outer)
      return "an output or gradient is not laid out like x";
  return nullptr;
}

}  // namespace

extern const Impl kRows = {
    "rows", rows_decline, rows_forward_training, rows_apply, rows_backward,
    [](const Statistics<float>& p) { rows_moments(p.x_geom, p.x, p.moments); },
    rows_backward_apply};

}  // namespace normkit::kernels::bn
