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
#include "kernels/batch_norm.hpp"

namespace normkit::kernels::bn {
namespace {

using cpu::ApplyCoefficients;
using cpu::apply_coefficients;
using cpu::BackwardCoefficients;
using cpu::backward_coefficients;
using cpu::blocked_channels;
using cpu::coefficient_arrays;
using cpu::kColumnBlock;
using cpu::kRowGroup;
using cpu::next_chunk;
using cpu::finish_channel_from_hi;
using cpu::finish_forward_block;
using cpu::RowBackwardCoefficients;
using cpu::rows_chunk_moments;
using cpu::rows_moments_into;
using cpu::rows_moments_phase;
using cpu::rows_apply_chunk;
using cpu::rows_backward_apply_chunk;
using cpu::rows_gradient_sums_chunk;
using detail::parallel_for;
using detail::parallel_region;
using detail::threads_for;
using leaf::merge_moment_arrays;
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
  void set(int64_t c, ApplyCoefficients k) const {
    mean_hi[c] = k.mean_hi;
    scale[c] = k.scale;
    shift[c] = k.shift;
  }
};

// The apply over every chunk; inside a parallel region (an orphaned omp for).
void rows_apply_phase(const Geometry& gx, const Geometry& gy, const float* x, float* y,
                      const RowCoefficients& k) {
  const RowPlan plan(gx);
#pragma omp for schedule(static)
  for (int64_t chunk = 0; chunk < plan.chunks; ++chunk) {
    const int64_t r0 = plan.first_row(chunk);
    rows_apply_chunk(x + r0 * gx.outer_stride, gx.outer_stride, y + r0 * gy.outer_stride,
                     gy.outer_stride, plan.rows_in(chunk), plan.channels, k.mean_hi, k.scale,
                     k.shift);
  }
}

// ---- column units: small problems ----
// When all rows of a block of channels fit in L2 (256×1024, 32×4096), each
// thread takes whole blocks of channels ("units") over all rows: their moments,
// coefficients and apply (or gradient sums and dx) in one go, while the block is
// in cache, with no barrier between the phases: on a small problem the phased
// path's barriers, merges of every channel per chunk and second read of x cost
// more than the data passes. A channel's sums run over the same chunks and
// stripes (RowPlan) in the same order as the phased path: the results are
// bitwise the same, for any width and any thread count.
constexpr int64_t kUnitBytes = 256 * 1024;  // a unit's part of x (and of dy)
struct ColumnUnits {
  int64_t width = 0, count = 0;  // count 0: the phased path
};
// Units are at most
// kColumnBlock wide (the sums stay in L1), in steps of 16 channels (whole cache
// lines), and as many as keep the threads evenly busy. Only when a full-width
// unit fits: narrower ones read x in short strided runs, which the prefetchers
// follow badly (32×2048×7×7 NHWC in units of 32 channels took twice as long as
// the phased path).
ColumnUnits column_units(const RowPlan& plan, int threads) {
  int64_t width = std::min(kColumnBlock, plan.channels);
  if (plan.rows * width * static_cast<int64_t>(sizeof(float)) > kUnitBytes) return {};
  int64_t count = (plan.channels + width - 1) / width;
  if (!leaf::whole_units_per_thread(count, threads)) {
    const int64_t even = (count + threads - 1) / threads * threads;
    width = ((plan.channels + even - 1) / even + 15) / 16 * 16;
    count = (plan.channels + width - 1) / width;
  }
  return {width, count};
}

// A unit narrower than the rows is walked row by row, not in register blocks:
// a block's column of a long row's rows, 4 KB or more apart, falls into a few
// L1 sets (and L2 sets) and is evicted before its next pass.
int64_t unit_blocked(const RowPlan& plan, int64_t width) {
  return width == plan.channels ? blocked_channels(width) : 0;
}

// Moments of channels [c0, c0 + width) over all rows into mean and m2: chunks
// merged in order within each stripe, stripes in order, as rows_moments_phase.
// Returns the count.
double unit_moments(const Geometry& g, const RowPlan& plan, const float* x, int64_t c0,
                    int64_t width, double* mean, double* m2) {
  Workspace ws;
  float* const sums = ws.take_for_overwrite<float>(3 * width).data();
  double* const stripe_mean = ws.take_for_overwrite<double>(width).data();
  double* const stripe_m2 = ws.take_for_overwrite<double>(width).data();
  double* const chunk_mean = ws.take_for_overwrite<double>(width).data();
  double* const chunk_m2 = ws.take_for_overwrite<double>(width).data();
  double count = 0;
  for (int64_t s = 0; s < plan.stripes; ++s) {
    double stripe_count = 0;
    for (int64_t k = plan.first_chunk(s); k < plan.first_chunk(s + 1); ++k) {
      const int64_t n = plan.rows_in(k);
      rows_chunk_moments(x + plan.first_row(k) * g.outer_stride + c0, g.outer_stride, n, width,
                         unit_blocked(plan, width), sums, sums + width, sums + 2 * width, chunk_mean, chunk_m2);
      merge_moment_arrays(stripe_count, stripe_mean, stripe_m2, static_cast<double>(n),
                          chunk_mean, chunk_m2, width);
      stripe_count += static_cast<double>(n);
    }
    merge_moment_arrays(count, mean, m2, stripe_count, stripe_mean, stripe_m2, width);
    count += stripe_count;
  }
  return count;
}

void rows_forward_units(const Forward<float>& p, const RowPlan& plan, ColumnUnits units,
                        int threads) {
  parallel_for(threads, units.count, [&](int64_t u) {
    const int64_t c0 = u * units.width, width = std::min(units.width, plan.channels - c0);
    Workspace ws;  // this thread's
    double* const mean = ws.take_for_overwrite<double>(width).data();
    double* const m2 = ws.take_for_overwrite<double>(width).data();
    const RowCoefficients k(ws.take_for_overwrite<float>(3 * width).data(), width);
    const double count = unit_moments(p.x_geom, plan, p.x, c0, width, mean, m2);
    for (int64_t c = 0; c < width; ++c) p.moments[c0 + c] = {count, mean[c], m2[c]};
    p.moments_done(c0, width);
    coefficient_arrays(width, count, mean, m2, p.gamma ? p.gamma + c0 : nullptr,
                       p.beta ? p.beta + c0 : nullptr, p.eps, k.mean_hi, k.scale, k.shift);
    rows_apply_chunk(p.x + c0, p.x_geom.outer_stride, p.y + c0, p.y_geom.outer_stride, plan.rows,
                     width, k.mean_hi, k.scale, k.shift);
  });
}

// Statistics, coefficients and apply in one parallel region: opening a region
// and waking threads costs microseconds, which small problems (256×1024) notice.
void rows_forward_training(const Forward<float>& p) {
  const Geometry& g = p.x_geom;
  const RowPlan plan(g);
  const int64_t C = plan.channels;
  const int threads = threads_for(C * g.outer);
  if (const ColumnUnits units = column_units(plan, threads); units.count > 0)
    return rows_forward_units(p, plan, units, threads);
  Workspace ws;
  double* const stripe_mean = ws.take_for_overwrite<double>(plan.stripes * C).data();
  double* const stripe_m2 = ws.take_for_overwrite<double>(plan.stripes * C).data();
  double* const stripe_count = ws.take_for_overwrite<double>(plan.stripes).data();
  const RowCoefficients k(ws.take_for_overwrite<float>(3 * C).data(), C);
  parallel_region(threads, [&] {
    rows_moments_phase(g, p.x, stripe_mean, stripe_m2, stripe_count,
                       [&](int64_t c0, int64_t width, double count, const double* mean,
                           const double* m2) {
                         finish_forward_block(p, c0, width, count, mean, m2, k.mean_hi, k.scale,
                                              k.shift);
                       });
    rows_apply_phase(g, p.y_geom, p.x, p.y, k);  // its omp for waits for the coefficients
  });
}

void rows_moments(const Geometry& g, const float* x, Moments* out) {
  rows_moments_into(g, x, out, threads_for(g.channels * g.outer));
}

void rows_apply(const Apply<float>& p) {
  const int64_t C = p.x_geom.channels;
  Workspace ws;
  const RowCoefficients k(ws.take_for_overwrite<float>(3 * C).data(), C);
  for (int64_t c = 0; c < C; ++c)
    k.set(c, apply_coefficients(p.mean[c], p.invstd[c], param_or(p.gamma, c, 1.0),
                                param_or(p.beta, c, 0.0)));
  parallel_region(threads_for(C * p.x_geom.outer),
                  [&] { rows_apply_phase(p.x_geom, p.y_geom, p.x, p.y, k); });
}

// Backward over column units (see ColumnUnits): per channel, Σdy and
// Σdy·(x - mean_hi) summed over the stripes' rows in order and the stripes
// added in order, as the phased path; then dx while x and dy are in cache.
void rows_backward_units(const Backward<float>& p, const RowPlan& plan, ColumnUnits units,
                         int threads) {
  const Geometry &gx = p.x_geom, &gdy = p.dy_geom;
  parallel_for(threads, units.count, [&](int64_t u) {
    const int64_t c0 = u * units.width, width = std::min(units.width, plan.channels - c0);
    const int64_t blocked = unit_blocked(plan, width);
    Workspace ws;  // this thread's
    float* const mean_hi = ws.take_for_overwrite<float>(4 * width).data();
    float *const a = mean_hi + width, *const b = a + width, *const k = b + width;
    // a stripe's Σdy, Σdy·(x - mean_hi)
    double* const stripe = ws.take_for_overwrite<double>(2 * width).data();
    double* const total = ws.take_for_overwrite<double>(2 * width).data();
    for (int64_t c = 0; c < width; ++c) mean_hi[c] = static_cast<float>(p.mean[c0 + c]);
    std::fill(total, total + 2 * width, 0.0);
    for (int64_t s = 0; s < plan.stripes; ++s) {
      std::fill(stripe, stripe + 2 * width, 0.0);
      for (int64_t chunk = plan.first_chunk(s); chunk < plan.first_chunk(s + 1); ++chunk) {
        const int64_t r0 = plan.first_row(chunk);
        rows_gradient_sums_chunk(p.x + r0 * gx.outer_stride + c0, gx.outer_stride,
                                 p.dy + r0 * gdy.outer_stride + c0, gdy.outer_stride,
                                 plan.rows_in(chunk), width, blocked, mean_hi, stripe,
                                 stripe + width);
      }
      for (int64_t c = 0; c < 2 * width; ++c) total[c] += stripe[c];
    }
    for (int64_t c = 0; c < width; ++c) {
      const BackwardCoefficients bc = finish_channel_from_hi(p, c0 + c, total[c], total[width + c]);
      a[c] = bc.a;
      b[c] = bc.b;
      k[c] = bc.k;
    }
    if (p.dx)
      rows_backward_apply_chunk(p.x + c0, gx.outer_stride, p.dy + c0, gdy.outer_stride, p.dx + c0,
                                p.dx_geom.outer_stride, plan.rows, width, blocked, mean_hi, a, b, k);
  });
}

void rows_backward(const Backward<float>& p) {
  const Geometry& gx = p.x_geom;
  const RowPlan plan(gx);
  const int64_t C = plan.channels;
  const int threads = threads_for(2 * C * plan.rows);
  if (const ColumnUnits units = column_units(plan, threads); units.count > 0)
    return rows_backward_units(p, plan, units, threads);
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
    if (p.dx) {
#pragma omp for schedule(static)
      for (int64_t chunk = 0; chunk < plan.chunks; ++chunk) {
        const int64_t r0 = plan.first_row(chunk);
        rows_backward_apply_chunk(p.x + r0 * gx.outer_stride, gx.outer_stride,
                                  p.dy + r0 * p.dy_geom.outer_stride, p.dy_geom.outer_stride,
                                  p.dx + r0 * p.dx_geom.outer_stride, p.dx_geom.outer_stride,
                                  plan.rows_in(chunk), C, blocked_channels(C), co.mean_hi.data(),
                                  co.a.data(), co.b.data(), co.k.data());
      }
    }
  });
}

// dx from given sums (synchronized BN): the apply half of rows_backward.
void rows_backward_apply(const BackwardApply<float>& p) {
  const Geometry& gx = p.x_geom;
  const RowPlan plan(gx);
  const int64_t C = plan.channels;
  Workspace ws;
  RowBackwardCoefficients co(ws, p.mean, C);
  for (int64_t c = 0; c < C; ++c)
    co.set(c, backward_coefficients(p.mean[c], p.invstd[c], param_or(p.gamma, c, 1.0),
                                    p.sum_dy[c], p.sum_dy_xhat[c], p.count,
                                    BackwardMode::training));
  parallel_for(threads_for(2 * C * plan.rows), plan.chunks, [&](int64_t chunk) {
    const int64_t r0 = plan.first_row(chunk);
    rows_backward_apply_chunk(p.x + r0 * gx.outer_stride, gx.outer_stride,
                              p.dy + r0 * p.dy_geom.outer_stride, p.dy_geom.outer_stride,
                              p.dx + r0 * p.dx_geom.outer_stride, p.dx_geom.outer_stride,
                              plan.rows_in(chunk), C, blocked_channels(C), co.mean_hi.data(),
                              co.a.data(), co.b.data(), co.k.data());
  });
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
