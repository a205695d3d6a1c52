// Fast group normalization, planes form: each channel's S positions
// contiguous (NCL, NCHW, NCDHW). A (sample, group) block is C/G runs of S
// floats, one contiguous run of C/G·S floats for dense data. A thread takes
// whole blocks: their statistics, then y, while the block (25 KB for GN(32) on
// 16×256×28×28) is still in L1/L2. When blocks are too few to keep the threads
// busy, the same pieces are spread over the threads in three phases
// (partials, merge, apply).
//
// Accuracy as batch norm's kernels (batch_norm_planes.cpp): two passes over a
// piece in cache in float lanes, pieces merged in double with Chan's formula;
// the apply subtracts the float-rounded mean before scaling; the gradient sums
// run in double. The rules every fast kernel keeps are in src/cpu/README.md.
#include <algorithm>
#include <cmath>
#include <span>

#include "core/parallel.hpp"
#include "cpu/coefficients.hpp"
#include "cpu/implementations.hpp"
#include "cpu/leaf_loops.hpp"
#include "cpu/streamed_output.hpp"
#include "kernels/group_norm.hpp"

namespace normkit::kernels::gn {
namespace {

using cpu::ApplyCoefficients;
using cpu::apply_coefficients;
using cpu::BackwardCoefficients;
using cpu::BlockGradient;
using cpu::channel_backward;
using cpu::finish_block;
using cpu::finish_parameters;
using detail::parallel_for;
using detail::parallel_region;
using detail::threads_for;
using leaf::GradientSums;
using leaf::gradient_sums_runs;
using leaf::kPieceElements;
using leaf::param_or;
using leaf::whole_units_per_thread;

// Parts of a channel run for the apply and gradient phases when blocks are few.
constexpr int64_t kRunPart = 16384;

NORMKIT_SIMD_CLONES
void apply_run(const float* __restrict x, float* __restrict y, int64_t len, ApplyCoefficients k) {
  for (int64_t i = 0; i < len; ++i) y[i] = (x[i] - k.mean_hi) * k.scale + k.shift;
}

// In place (y == x) the restrict promise above would be broken.
NORMKIT_SIMD_CLONES
void apply_run_in_place(float* x, int64_t len, ApplyCoefficients k) {
  for (int64_t i = 0; i < len; ++i) x[i] = (x[i] - k.mean_hi) * k.scale + k.shift;
}

// With `stream` (cpu/streamed_output.hpp), through the streamed buffer, in
// parts of at most a buffer (x may be y: a part is computed before it is
// written; parts too short to stream are written in place); or on AVX-512
// CPUs straight from the loop, with no fence: the caller's series of runs
// ends with one (cpu::streamed_stores_done; inside the region too: a reader
// of y after the apply must come after it).
void apply_any(const float* x, float* y, int64_t len, ApplyCoefficients k, bool stream) {
#if NORMKIT_HAS_SIMD_CLONES
  if (cpu::streams_straight(stream, len, len, {}, {y}))
    return cpu::stream_apply_run_avx512(x, y, len, k.mean_hi, k.scale, k.shift);
#endif
  if (!stream) {
    if (x == y)
      apply_run_in_place(y, len, k);
    else
      apply_run(x, y, len, k);
    return;
  }
  for (int64_t first = 0; first < len; first += cpu::kStreamBlock) {
    const int64_t n = std::min(cpu::kStreamBlock, len - first);
    cpu::write_outputs<1>(true, {{{y + first, n}}}, 1, n, [&](int64_t, int64_t, const auto& out) {
      apply_any(x + first, out[0].data, n, k, false);
    });
  }
}

NORMKIT_SIMD_CLONES
void backward_apply_run(const float* x, const float* dy, float* dx, int64_t len,
                        BackwardCoefficients k) {
  for (int64_t i = 0; i < len; ++i) dx[i] = k.a * dy[i] + k.b * (x[i] - k.mean_hi) + k.k;
}

// ================= planes: each channel's S positions contiguous =================

// A block (n, g) as `runs` runs of `len` floats, `stride` apart (one run when
// the group's channels follow each other), cut into pieces: groups of whole
// runs up to kPieceElements, or parts of a long run. Depends only on the geometry.
struct BlockPlan {
  int64_t per_group, runs, len, stride;
  int64_t runs_per_piece, parts_per_run, pieces;

  BlockPlan(const SampleGeometry& g, int64_t groups) : per_group(g.c / groups) {
    if (per_group == 1 || g.c_stride == g.s) {
      runs = 1, len = per_group * g.s, stride = len;
    } else {
      runs = per_group, len = g.s, stride = g.c_stride;
    }
    if (len >= kPieceElements) {
      runs_per_piece = 1;
      parts_per_run = (len + kPieceElements - 1) / kPieceElements;
      pieces = runs * parts_per_run;
    } else {
      runs_per_piece = std::max<int64_t>(1, kPieceElements / len);
      parts_per_run = 1;
      pieces = (runs + runs_per_piece - 1) / runs_per_piece;
    }
  }
  // Moments of piece `i` of the block starting at `base`: two passes in cache.
  Moments piece_moments(const float* base, int64_t i) const {
    int64_t first_run, count_runs, first, piece_len;
    if (parts_per_run > 1) {
      first_run = i / parts_per_run, count_runs = 1;
      first = (i % parts_per_run) * kPieceElements;
      piece_len = std::min(kPieceElements, len - first);
    } else {
      first_run = i * runs_per_piece, count_runs = std::min(runs_per_piece, runs - first_run);
      first = 0, piece_len = len;
    }
    return leaf::run_moments(base + first_run * stride + first, count_runs, piece_len, stride);
  }
};

// Apply and gradient work in units of (n, c, part of the channel's run).
struct RunParts {
  int64_t parts;
  explicit RunParts(int64_t s) : parts((s + kRunPart - 1) / kRunPart) {}
  int64_t first(int64_t part) const { return part * kRunPart; }
  int64_t len(int64_t part, int64_t s) const { return std::min(kRunPart, s - part * kRunPart); }
};

ApplyCoefficients channel_coefficients(const Forward<float>& p, int64_t n, int64_t c) {
  const Moments& m = p.moments[n * p.groups + c / (p.x_geom.c / p.groups)];
  return apply_coefficients(m.mean, 1.0 / std::sqrt(m.biased_variance() + p.eps),
                            param_or(p.gamma, c, 1.0), param_or(p.beta, c, 0.0));
}

void planes_forward(const Forward<float>& p) {
  const SampleGeometry& g = p.x_geom;
  const BlockPlan plan(g, p.groups);
  const int64_t blocks = g.n * p.groups;
  const int threads = threads_for(g.n * g.c * g.s);
  const bool stream = cpu::stream_output(g.n * g.c * g.s, threads);
  auto block_base = [&](int64_t block) {
    const int64_t n = block / p.groups, first_c = (block % p.groups) * plan.per_group;
    return p.x + g.offset(n, first_c, 0);
  };
  if (whole_units_per_thread(blocks, threads)) {
    parallel_for(threads, blocks, [&](int64_t block) {
      const float* base = block_base(block);
      Moments m;
      for (int64_t i = 0; i < plan.pieces; ++i) m.merge(plan.piece_moments(base, i));
      p.moments[block] = m;
      const int64_t n = block / p.groups, first_c = (block % p.groups) * plan.per_group;
      for (int64_t c = first_c; c < first_c + plan.per_group; ++c)
        apply_any(p.x + g.offset(n, c, 0), p.y + p.y_geom.offset(n, c, 0), g.s,
                  channel_coefficients(p, n, c), stream);
      if (stream) cpu::streamed_stores_done();
    });
    return;
  }
  const int64_t total = blocks * plan.pieces;
  const RunParts parts(g.s);
  const int64_t apply_units = g.n * g.c * parts.parts;
  leaf::Workspace ws;
  const std::span<Moments> partial = ws.take<Moments>(total);
  parallel_region(threads, [&] {
#pragma omp for schedule(static)
    for (int64_t t = 0; t < total; ++t)
      partial[t] = plan.piece_moments(block_base(t / plan.pieces), t % plan.pieces);
#pragma omp for schedule(static)
    for (int64_t block = 0; block < blocks; ++block) {
      Moments m;
      for (int64_t i = 0; i < plan.pieces; ++i) m.merge(partial[block * plan.pieces + i]);
      p.moments[block] = m;
    }
#pragma omp for schedule(static)
    for (int64_t u = 0; u < apply_units; ++u) {
      const int64_t part = u % parts.parts, nc = u / parts.parts;
      const int64_t n = nc / g.c, c = nc % g.c, first = parts.first(part);
      apply_any(p.x + g.offset(n, c, first), p.y + p.y_geom.offset(n, c, first),
                parts.len(part, g.s), channel_coefficients(p, n, c), stream);
    }
    if (stream) cpu::streamed_stores_done();
  });
}

void planes_moments(const SampleGeometry& g, const float* x, int64_t groups, Moments* out) {
  const BlockPlan plan(g, groups);
  const int64_t blocks = g.n * groups, total = blocks * plan.pieces;
  leaf::Workspace ws;
  const std::span<Moments> partial = ws.take<Moments>(total);
  parallel_region(threads_for(g.n * g.c * g.s), [&] {
#pragma omp for schedule(static)
    for (int64_t t = 0; t < total; ++t) {
      const int64_t block = t / plan.pieces;
      const float* base = x + g.offset(block / groups, (block % groups) * plan.per_group, 0);
      partial[t] = plan.piece_moments(base, t % plan.pieces);
    }
#pragma omp for schedule(static)
    for (int64_t block = 0; block < blocks; ++block) {
      Moments m;
      for (int64_t i = 0; i < plan.pieces; ++i) m.merge(partial[block * plan.pieces + i]);
      out[block] = m;
    }
  });
}

// Σdy and Σdy·(x - float(mean)) of one part of channel c of sample n.
GradientSums planes_part_sums(const Backward<float>& p, int64_t n, int64_t c, int64_t first,
                              int64_t len) {
  const int64_t block = n * p.groups + c / (p.x_geom.c / p.groups);
  return gradient_sums_runs(p.x + p.x_geom.offset(n, c, first), 0,
                            p.dy + p.dy_geom.offset(n, c, first), 0, 1, len,
                            static_cast<float>(p.mean[block]));
}

void planes_backward(const Backward<float>& p) {
  const SampleGeometry& g = p.x_geom;
  const int64_t per_group = g.c / p.groups, blocks = g.n * p.groups;
  const RunParts parts(g.s);
  const int threads = threads_for(2 * g.n * g.c * g.s);
  leaf::Workspace ws;
  const std::span<double> sum_dy = ws.take<double>(g.n * g.c),
                          sum_dy_xmu = ws.take<double>(g.n * g.c);
  // Σ over a channel's parts in part order, the same in both schedules.
  auto channel_sums = [&](int64_t n, int64_t c, const GradientSums* part_sums) {
    double a = 0, b = 0;
    for (int64_t i = 0; i < parts.parts; ++i) {
      a += part_sums[i].sum_g;
      b += part_sums[i].sum_g_xc;
    }
    sum_dy[n * g.c + c] = a;
    sum_dy_xmu[n * g.c + c] = b;
  };
  if (whole_units_per_thread(blocks, threads)) {
    parallel_region(threads, [&] {
      leaf::Workspace own;  // this thread's
      const std::span<GradientSums> part_sums = own.take<GradientSums>(parts.parts);
#pragma omp for schedule(static)
      for (int64_t block = 0; block < blocks; ++block) {
        const int64_t n = block / p.groups, first_c = (block % p.groups) * per_group;
        for (int64_t c = first_c; c < first_c + per_group; ++c) {
          for (int64_t i = 0; i < parts.parts; ++i)
            part_sums[i] = planes_part_sums(p, n, c, parts.first(i), parts.len(i, g.s));
          channel_sums(n, c, part_sums.data());
        }
        const BlockGradient bg = finish_block(p, block, &sum_dy[n * g.c + first_c],
                                              &sum_dy_xmu[n * g.c + first_c]);
        if (p.dx)
          for (int64_t c = first_c; c < first_c + per_group; ++c)
            backward_apply_run(p.x + g.offset(n, c, 0), p.dy + p.dy_geom.offset(n, c, 0),
                               p.dx + p.dx_geom.offset(n, c, 0), g.s,
                               channel_backward(p, block, c, bg));
      }
    });
  } else {
    const int64_t units = g.n * g.c * parts.parts;
    const std::span<GradientSums> partial = ws.take<GradientSums>(units);
    const std::span<BlockGradient> block_coeff = ws.take<BlockGradient>(blocks);
    parallel_region(threads, [&] {
#pragma omp for schedule(static)
      for (int64_t u = 0; u < units; ++u) {
        const int64_t part = u % parts.parts, nc = u / parts.parts;
        partial[u] = planes_part_sums(p, nc / g.c, nc % g.c, parts.first(part), parts.len(part, g.s));
      }
#pragma omp for schedule(static)
      for (int64_t block = 0; block < blocks; ++block) {
        const int64_t n = block / p.groups, first_c = (block % p.groups) * per_group;
        for (int64_t c = first_c; c < first_c + per_group; ++c)
          channel_sums(n, c, &partial[(n * g.c + c) * parts.parts]);
        block_coeff[block] = finish_block(p, block, &sum_dy[n * g.c + first_c],
                                          &sum_dy_xmu[n * g.c + first_c]);
      }
      if (p.dx) {
#pragma omp for schedule(static)
        for (int64_t u = 0; u < units; ++u) {
          const int64_t part = u % parts.parts, nc = u / parts.parts;
          const int64_t n = nc / g.c, c = nc % g.c, first = parts.first(part);
          const int64_t block = n * p.groups + c / per_group;
          backward_apply_run(p.x + g.offset(n, c, first), p.dy + p.dy_geom.offset(n, c, first),
                             p.dx + p.dx_geom.offset(n, c, first), parts.len(part, g.s),
                             channel_backward(p, block, c, block_coeff[block]));
        }
      }
    });
  }
  finish_parameters(p, sum_dy.data(), sum_dy_xmu.data());
}

const char* planes_decline(const SampleGeometry& x, std::span<const SampleGeometry> others) {
  if (x.s_stride != 1 || x.s < 2) return "spatial positions are not contiguous runs";
  for (const SampleGeometry& o : others)
    if (o.s_stride != 1 || !o.same_extent(x))
      return "an output or gradient is not laid out like x";
  return nullptr;
}

}  // namespace

extern const Impl kPlanes = {
    "planes", planes_decline, planes_forward, planes_backward,
    [](const Statistics<float>& p) { planes_moments(p.x_geom, p.x, p.groups, p.moments); }};

}  // namespace normkit::kernels::gn
