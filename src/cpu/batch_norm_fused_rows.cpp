// Fast BN+ReLU and BN+Add+ReLU, rows form: contiguous channels, a row of C
// values per position (NHWC, ...), whose mask order is (row, channel). The
// rules every fast kernel keeps are in src/cpu/README.md; forward and backward
// follow batch_norm_fused_planes.cpp's scheme over chunks of rows. The chunk
// loops of the statistics and gradient sums are BN's own (cpu/rows_loops.hpp),
// so the results are relu(BN(x)) and its gradients bit for bit. The backward
// reads the mask bits inside its loops where the channels allow it
// (rows_backward_masked), as the planes kernels do.
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <span>

#include "core/parallel.hpp"
#include "cpu/coefficients.hpp"
#include "cpu/implementations.hpp"
#include "cpu/leaf_loops.hpp"
#include "cpu/relu_mask.hpp"
#include "cpu/rows_loops.hpp"
#include "cpu/streamed_output.hpp"
#include "kernels/batch_norm_fused.hpp"

namespace normkit::kernels::bn_fused {
namespace {

using cpu::BackwardCoefficients;
using cpu::ColumnUnits;
using cpu::blocked_channels;
using cpu::expand_bits;
using cpu::finish_channel;
using cpu::RowBackwardCoefficients;
using cpu::rows_gradient_sums_chunk;
using cpu::rows_forward_training_region;
using cpu::kExpandBlock;
using cpu::pack_positive_bits;
using detail::parallel_for;
using detail::parallel_region;
using detail::threads_for;
using leaf::RowPlan;
using leaf::Workspace;

// ======================= rows =======================

// y of rows [r0, r0 + rows) and channels [c0, c0 + width), and the mask bits
// when wanted (then of whole rows: c0 = 0, width = C), through the streamed
// buffer when `stream` (cpu/streamed_output.hpp).
void rows_apply_relu_pack(const Forward<float>& p, int64_t r0, int64_t rows, int64_t c0,
                          int64_t width, const float* mean_hi, const float* scale,
                          const float* shift, bool stream) {
  const Geometry& gx = p.x_geom;
  const int64_t C = gx.channels;
  const cpu::Output y{p.y + r0 * p.y_geom.outer_stride + c0, p.y_geom.outer_stride};
  cpu::write_row_pieces<1>(stream, {y}, rows, width, [&](int64_t first, int64_t count,
                                                         const auto& out) {
    const int64_t r = r0 + first;
    cpu::rows_apply_relu_chunk(p.x + r * gx.outer_stride + c0, gx.outer_stride,
                               p.z ? p.z + r * p.z_geom.outer_stride + c0 : nullptr,
                               p.z_geom.outer_stride, out[0].data, out[0].stride, count, width,
                               mean_hi + c0, scale + c0, shift + c0);
    if (!p.mask) return;
    if (out[0].stride == C) {  // one run: a call per row costs a dispatch and two atomics
      pack_positive_bits(out[0].data, count * C, p.mask, r * C);
    } else {
      for (int64_t i = 0; i < count; ++i)
        pack_positive_bits(out[0].data + i * out[0].stride, C, p.mask, (r + i) * C);
    }
  });
}

// Training: batch norm's statistics and coefficients (rows_forward_training_region,
// finish_forward_block: BN's bits), then y and the mask, in one parallel region.
void rows_forward(const Forward<float>& p) {
  const RowPlan plan(p.x_geom);
  const int64_t C = plan.channels;
  const int threads = threads_for(C * p.x_geom.outer);
  const bool stream = cpu::stream_output(C * plan.rows, threads);
  Workspace ws;
  float* const mean_hi = ws.take_for_overwrite<float>(C).data();
  float* const scale = ws.take_for_overwrite<float>(C).data();
  float* const shift = ws.take_for_overwrite<float>(C).data();
  auto apply = [&](int64_t r0, int64_t rows) {
    rows_apply_relu_pack(p, r0, rows, 0, C, mean_hi, scale, shift, stream);
  };
  if (p.training)
    return rows_forward_training_region(p, plan, threads, mean_hi, scale, shift, apply);
  // As batch norm's rows inference (rows_apply): the same coefficients, which
  // do not depend on how the channels are split, so that BN+ReLU's y is relu
  // of BN's, bit for bit. Column units only without a mask (a row's mask bits
  // are packed over all its channels).
  if (const ColumnUnits units = cpu::column_units(plan, threads); units.count > 0 && !p.mask) {
    parallel_for(threads, units.count, [&](int64_t u) {
      const auto [c0, width] = units.of(u, C);
      cpu::coefficients_of_channels(p, c0, width, mean_hi, scale, shift);
      rows_apply_relu_pack(p, 0, plan.rows, c0, width, mean_hi, scale, shift, stream);
    });
    return;
  }
  cpu::coefficient_arrays(C, p.mean, p.invstd, p.gamma, p.beta, mean_hi, scale, shift);
  parallel_region(threads, [&] {
    cpu::for_thread_rows(plan, apply);
  });
}

// dx and dz of rows [r0, r0 + rows), channels [c0, c0 + width), through the
// streamed buffer when `stream` (cpu/streamed_output.hpp), or straight from
// the loop (cpu::stream_rows_avx512).
void rows_backward_masked_apply(const Backward<float>& p, bool stream, int64_t r0, int64_t rows,
                                int64_t c0, int64_t width, const float* mean_hi, const float* a,
                                const float* b, const float* k) {
  const int64_t C = p.x_geom.channels;
  const std::array<cpu::Output, 2> outputs{
      {{p.dx ? p.dx + r0 * p.dx_geom.outer_stride + c0 : nullptr, p.dx_geom.outer_stride},
       {p.dz ? p.dz + r0 * p.dz_geom.outer_stride + c0 : nullptr, p.dz_geom.outer_stride}}};
#if NORMKIT_HAS_SIMD_CLONES
  const auto& [dx, dz] = outputs;
  if (c0 == 0 && width == C &&
      cpu::streams_straight(stream, rows * C, C,
                            {p.x_geom.outer_stride, p.dy_geom.outer_stride,
                             dx.data ? dx.stride : C, dz.data ? dz.stride : C},
                            {dx.data, dz.data}))
    return cpu::rows_backward_apply_streamed_avx512<true>(
        p.x + r0 * p.x_geom.outer_stride, p.dy + r0 * p.dy_geom.outer_stride, p.mask, r0 * C,
        dx.data, dz.data, rows * C, C, {mean_hi, a, b, k});
#endif
  cpu::write_row_pieces(stream, outputs, rows, width,
                        [&](int64_t first, int64_t count, const auto& out) {
    const int64_t r = r0 + first;
    cpu::rows_backward_apply_masked_chunk(
        p.x + r * p.x_geom.outer_stride + c0, p.x_geom.outer_stride,
        leaf::GradientSource{p.dy + r * p.dy_geom.outer_stride + c0, p.dy_geom.outer_stride,
                             p.mask, r * C + c0, C},
        out[0].data, out[0].stride, out[1].data, out[1].stride, count, width, mean_hi, a, b, k);
  });
}

// rows_backward_masked on a small problem: BN's column units (as BN's
// rows_backward_units), each unit's sums over the stripes' chunks in order,
// its coefficients, then dx and dz while its columns are in cache. The same
// sums in the same order as the phased path: the same bits. Units whose width
// is not a multiple of kNarrowRowBlock (the masked loops' blocks) decline.
bool rows_backward_masked_units(const Backward<float>& p, const RowPlan& plan, int threads,
                                bool stream) {
  const ColumnUnits units = cpu::column_units(plan, threads);
  if (units.count == 0 || units.width % cpu::kNarrowRowBlock != 0) return false;
  const Geometry& gx = p.x_geom;
  const int64_t C = plan.channels;
  auto source = [&](int64_t r0, int64_t c0) {
    return leaf::GradientSource{p.dy + r0 * p.dy_geom.outer_stride + c0, p.dy_geom.outer_stride,
                                p.mask, r0 * C + c0, C};
  };
  parallel_for(threads, units.count, [&](int64_t u) {
    cpu::unit_backward(
        p, plan, units, u,
        [&](int64_t r0, int64_t rows, int64_t c0, int64_t width, const float* mean_hi,
            double* s1, double* s2) {
          cpu::rows_gradient_sums_masked_chunk(p.x + r0 * gx.outer_stride + c0, gx.outer_stride,
                                               source(r0, c0), rows, width, mean_hi, s1, s2);
        },
        [&](int64_t c0, int64_t width, const float* mean_hi, const float* a, const float* b,
            const float* k) {
          if (p.dx || p.dz)
            rows_backward_masked_apply(p, stream, 0, plan.rows, c0, width, mean_hi, a, b, k);
        });
  });
  return true;
}

// The backward with g read from dy and the bits inside the loops
// (leaf::GradientSource), when C is a multiple of kNarrowRowBlock (32, 64,
// 96, ..., 512, 1024...): BN's sums over chunks and stripes, then dx and dz in one
// pass. Each channel adds its rows in row order, as in BN's blocked and long-row
// loops alike, so the sums are BN's bit for bit for any C. Other channel
// counts expand g first (rows_backward).
void rows_backward_masked(const Backward<float>& p, const RowPlan& plan, int threads) {
  const bool stream = cpu::stream_output(plan.channels * plan.rows, threads);
  if (rows_backward_masked_units(p, plan, threads, stream)) return;
  const Geometry& gx = p.x_geom;
  const int64_t C = plan.channels;
  Workspace ws;
  double* const stripe_g = ws.take<double>(plan.stripes * C).data();
  double* const stripe_g_xmu = ws.take<double>(plan.stripes * C).data();
  RowBackwardCoefficients co(ws, p.mean, C);
  auto source = [&](int64_t r0) {
    return leaf::GradientSource{p.dy + r0 * p.dy_geom.outer_stride, p.dy_geom.outer_stride, p.mask,
                                r0 * C, C};
  };
  parallel_region(threads, [&] {
#pragma omp for schedule(static)
    for (int64_t s = 0; s < plan.stripes; ++s)
      for (int64_t chunk = plan.first_chunk(s); chunk < plan.first_chunk(s + 1); ++chunk) {
        const int64_t r0 = plan.first_row(chunk);
        cpu::rows_gradient_sums_masked_chunk(
            p.x + r0 * gx.outer_stride, gx.outer_stride, source(r0), plan.rows_in(chunk), C,
            co.mean_hi.data(), stripe_g + s * C, stripe_g_xmu + s * C,
            cpu::next_chunk(plan, chunk, gx, p.x, &p.dy_geom, p.dy));
      }
    co.finish_from_stripes(p, plan.stripes, stripe_g, stripe_g_xmu);
    // (after finish_from_stripes, whose omp for ends with a barrier)
    if (p.dx || p.dz)
      cpu::for_thread_rows(plan, [&](int64_t r0, int64_t rows) {
        rows_backward_masked_apply(p, stream, r0, rows, 0, C, co.mean_hi.data(), co.a.data(),
                                   co.b.data(), co.k.data());
      });
  });
}

// g of a chunk's rows, packed (rows × C) into `g`.
void rows_expand_chunk(const Backward<float>& p, int64_t r0, int64_t rows, float* g) {
  const int64_t C = p.x_geom.channels;
  if (p.dy_geom.outer_stride == C) {
    expand_bits(p.dy + r0 * C, p.mask, r0 * C, rows * C, g);
    return;
  }
  for (int64_t r = 0; r < rows; ++r)
    expand_bits(p.dy + (r0 + r) * p.dy_geom.outer_stride, p.mask, (r0 + r) * C, C, g + r * C);
}

void rows_backward(const Backward<float>& p) {
  const Geometry& gx = p.x_geom;
  const RowPlan plan(gx);
  const int64_t C = plan.channels;
  const int threads = threads_for(2 * C * plan.rows);
  if (C > 0 && C % cpu::kNarrowRowBlock == 0) return rows_backward_masked(p, plan, threads);
  Workspace ws;
  double* const stripe_g = ws.take<double>(plan.stripes * C).data();
  double* const stripe_g_xmu = ws.take<double>(plan.stripes * C).data();
  RowBackwardCoefficients co(ws, p.mean, C);
  const int64_t block_rows = std::clamp<int64_t>(kExpandBlock / std::max<int64_t>(C, 1), 1, plan.chunk_rows);
  parallel_region(threads, [&] {
    // g is expanded block_rows at a time (reads of dy and of x alternate
    // quickly), and BN's chunk loop sums each block: a channel adds its rows in
    // row order either way, so the sums are BN's bit for bit.
    Workspace own;  // this thread's
    float* const g = own.take_for_overwrite<float>(static_cast<size_t>(block_rows * C)).data();
#pragma omp for schedule(static)
    for (int64_t s = 0; s < plan.stripes; ++s)
      for (int64_t chunk = plan.first_chunk(s); chunk < plan.first_chunk(s + 1); ++chunk) {
        const int64_t first = plan.first_row(chunk), end = first + plan.rows_in(chunk);
        for (int64_t r0 = first; r0 < end; r0 += block_rows) {
          const int64_t rows = std::min(block_rows, end - r0);
          rows_expand_chunk(p, r0, rows, g);
          rows_gradient_sums_chunk(p.x + r0 * gx.outer_stride, gx.outer_stride, g, C, rows, C,
                                   blocked_channels(C), co.mean_hi.data(), stripe_g + s * C,
                                   stripe_g_xmu + s * C);
        }
      }
    co.finish_from_stripes(p, plan.stripes, stripe_g, stripe_g_xmu);
    if (p.dx || p.dz) {
#pragma omp for schedule(static)
      for (int64_t chunk = 0; chunk < plan.chunks; ++chunk) {
        const int64_t first = plan.first_row(chunk), end = first + plan.rows_in(chunk);
        for (int64_t r0 = first; r0 < end; r0 += block_rows) {
          const int64_t rows = std::min(block_rows, end - r0);
          rows_expand_chunk(p, r0, rows, g);
          if (p.dx)
            cpu::rows_backward_apply_chunk(p.x + r0 * gx.outer_stride, gx.outer_stride, g, C,
                                           p.dx + r0 * p.dx_geom.outer_stride,
                                           p.dx_geom.outer_stride, rows, C, blocked_channels(C),
                                           co.mean_hi.data(), co.a.data(), co.b.data(),
                                           co.k.data());
          if (p.dz)
            for (int64_t r = 0; r < rows; ++r)
              std::copy(g + r * C, g + (r + 1) * C, p.dz + (r0 + r) * p.dz_geom.outer_stride);
        }
      }
    }
  });
}

const char* rows_decline(const Geometry& x, std::span<const Geometry> others,
                         const MaskOrder& order) {
  if (x.inner != 1 || (x.channel_stride != 1 && x.channels > 1))
    return "channels are not contiguous rows";
  for (const Geometry& o : others)
    if (o.inner != 1 || (o.channel_stride != 1 && o.channels > 1) || o.outer != x.outer)
      return "an output or gradient is not laid out like x";
  if (order.channel != 1 || (x.outer > 1 && order.outer != x.channels))
    return "the mask order is not (row, channel)";
  return nullptr;
}

}  // namespace

extern const Impl kRows = {"rows", rows_decline, rows_forward, rows_backward};

}  // namespace normkit::kernels::bn_fused
