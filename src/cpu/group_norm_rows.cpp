// Fast group normalization, rows form: channels contiguous (NLC, NHWC, NDHWC,
// NC, PyTorch channels_last): per sample, S rows of C floats. Statistics:
// per chunk of rows, per-channel partial moments vectorized along C, merged
// per group. Forward: a thread takes whole samples, their statistics over
// whole rows, then y in memory order while the sample is in L2 (800 KB for
// 16×256×28×28). Backward: a thread takes whole samples when their x and dy
// fit in L2 (the sums, then dx streamed), otherwise slabs of whole groups
// about 64 channels wide over all rows (200 KB of x, 400 KB with dy, stay in
// L2 between the sums and dx). When samples (or slabs) are too few, the work
// is spread in three phases as in group_norm_planes.cpp. The rules every fast
// kernel keeps are in src/cpu/README.md.
#include <algorithm>
#include <cmath>
#include <span>

#include "core/parallel.hpp"
#include "cpu/coefficients.hpp"
#include "cpu/implementations.hpp"
#include "cpu/leaf_loops.hpp"
#include "cpu/rows_loops.hpp"
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
using leaf::kMaxChunkRows;
using leaf::param_or;
using leaf::rows_block_moments;
using leaf::Workspace;
using leaf::whole_units_per_thread;

// ================= rows: per sample, S rows of C contiguous floats =================

// Slabs: whole groups, about kSlabChannels channels wide, over all S rows (the
// backward's units; the forward's statistics pieces when samples are few).
// Rows are cut into chunks of kRowChunkValues / slab width rows (16 KB of a
// slab: the two statistics passes of a block of channels read from L1). The
// chunks fix the order of every float sum, and both cuts depend only on the
// geometry; how many channels are computed together does not change a bit.
constexpr int64_t kSlabChannels = 64;
constexpr int64_t kRowChunkValues = 4096;

struct RowPlan {
  int64_t per_group, slab_channels, slabs, chunk_rows, chunks;
  RowPlan(const SampleGeometry& g, int64_t groups) : per_group(g.c / groups) {
    slab_channels = std::min(g.c, std::max<int64_t>(1, kSlabChannels / per_group) * per_group);
    slabs = (g.c + slab_channels - 1) / slab_channels;
    chunk_rows = std::clamp<int64_t>(kRowChunkValues / slab_channels, 1, std::min(g.s, kMaxChunkRows));
    chunks = (g.s + chunk_rows - 1) / chunk_rows;
  }
  int64_t first_channel(int64_t slab) const { return slab * slab_channels; }
  int64_t width(int64_t slab, int64_t c) const { return std::min(slab_channels, c - slab * slab_channels); }
  int64_t first_row(int64_t chunk) const { return chunk * chunk_rows; }
  int64_t rows_in(int64_t chunk, int64_t s) const {
    return std::min(chunk_rows, s - chunk * chunk_rows);
  }
};

// A chunk's per-channel moments (leaf::rows_block_moments): wide blocks first
// (more independent sums in flight), then narrower ones, then the channels left
// one by one; the next chunk's lines requested meanwhile.
constexpr int kWideBlock = 64;
constexpr int kChannelBlock = 32;

NORMKIT_SIMD_CLONES
void rows_chunk_moments(const float* __restrict x, int64_t stride, int64_t rows, int64_t channels,
                        double* __restrict mean, double* __restrict m2, const float* next,
                        int64_t next_rows) {
  int64_t c0 = 0;
  for (; c0 + kWideBlock <= channels; c0 += kWideBlock)
    rows_block_moments<kWideBlock>(x + c0, stride, rows, mean + c0, m2 + c0, next + c0, next_rows);
  for (; c0 + kChannelBlock <= channels; c0 += kChannelBlock)
    rows_block_moments<kChannelBlock>(x + c0, stride, rows, mean + c0, m2 + c0, next + c0,
                                      next_rows);
  for (int64_t c = c0; c < channels; ++c)
    rows_block_moments<1>(x + c, stride, rows, mean + c, m2 + c, nullptr, 0);
}

// The moments of the groups of channels [c0, c0 + width) (whole groups) over
// one chunk of rows: per-channel moments merged over each group's channels in
// channel order. out: one per group of the range. A channel's moments do not
// depend on which channels are computed with it, so any cut of a chunk into
// ranges of whole groups gives the same bits.
void rows_chunk_group_moments(const SampleGeometry& g, const float* x, const RowPlan& plan,
                              int64_t n, int64_t c0, int64_t width, int64_t chunk, Moments* out) {
  const int64_t rows = plan.rows_in(chunk, g.s);
  Workspace ws;
  double* const mean = ws.take_for_overwrite<double>(2 * width).data();
  double* const m2 = mean + width;
  const bool last = chunk + 1 == plan.chunks;
  rows_chunk_moments(x + g.offset(n, c0, plan.first_row(chunk)), g.s_stride, rows, width, mean, m2,
                     last ? x : x + g.offset(n, c0, plan.first_row(chunk + 1)),
                     last ? 0 : plan.rows_in(chunk + 1, g.s));
  const double count = static_cast<double>(rows);
  for (int64_t j = 0; j < width / plan.per_group; ++j) {
    Moments m;
    for (int64_t c = j * plan.per_group; c < (j + 1) * plan.per_group; ++c)
      m.merge({count, mean[c], m2[c]});
    out[j] = m;
  }
}

// Statistics of sample n's groups, chunks of whole rows merged in chunk order,
// into moments[n·G + group].
void rows_sample_moments(const SampleGeometry& g, const float* x, const RowPlan& plan,
                         int64_t groups, int64_t n, Moments* moments) {
  Moments* const out = moments + n * groups;
  Workspace ws;
  Moments* const chunk_moments = ws.take<Moments>(groups).data();
  for (int64_t j = 0; j < groups; ++j) out[j] = Moments{};
  for (int64_t chunk = 0; chunk < plan.chunks; ++chunk) {
    rows_chunk_group_moments(g, x, plan, n, 0, g.c, chunk, chunk_moments);
    for (int64_t j = 0; j < groups; ++j) out[j].merge(chunk_moments[j]);
  }
}

// When samples are too few for the threads, the statistics are spread in
// pieces (sample, chunk of rows, part of the channels), merged in chunk
// order. Parts are whole slabs, and only as many as it takes to give every
// thread several pieces: whole rows are read in memory order, slabs in short
// strided segments (slow to fetch), and the bits are the same either way.
struct StatisticsPieces {
  int64_t parts, part_channels, count;
  StatisticsPieces(const SampleGeometry& g, const RowPlan& plan, int threads) {
    const int64_t wanted = (8 * threads + g.n * plan.chunks - 1) / (g.n * plan.chunks);
    parts = std::clamp<int64_t>(wanted, 1, plan.slabs);
    part_channels = ((plan.slabs + parts - 1) / parts) * plan.slab_channels;
    parts = (g.c + part_channels - 1) / part_channels;
    count = g.n * plan.chunks * parts;
  }
  // Piece t: sample, chunk, first channel, channels.
  int64_t sample(int64_t t, const RowPlan& plan) const { return t / (plan.chunks * parts); }
  int64_t chunk(int64_t t, const RowPlan& plan) const { return t / parts % plan.chunks; }
  int64_t first_channel(int64_t t) const { return t % parts * part_channels; }
  int64_t width(int64_t t, int64_t c) const {
    return std::min(part_channels, c - first_channel(t));
  }
};

// Phases 1 and 2 (inside a parallel region): the pieces' group moments, then
// each sample's groups merged in chunk order into moments[n·G + group].
void rows_moments_phases(const SampleGeometry& g, const float* x, const RowPlan& plan,
                         int64_t groups, const StatisticsPieces& pieces,
                         std::span<Moments> partial, Moments* moments) {
  const int64_t per_piece = pieces.part_channels / plan.per_group;
#pragma omp for schedule(static)
  for (int64_t t = 0; t < pieces.count; ++t) {
    const int64_t c0 = pieces.first_channel(t);
    rows_chunk_group_moments(g, x, plan, pieces.sample(t, plan), c0, pieces.width(t, g.c),
                             pieces.chunk(t, plan), &partial[t * per_piece]);
  }
#pragma omp for schedule(static)
  for (int64_t n = 0; n < g.n; ++n)
    for (int64_t j = 0; j < groups; ++j) {
      const int64_t part = j / per_piece;
      Moments m;
      for (int64_t chunk = 0; chunk < plan.chunks; ++chunk)
        m.merge(partial[((n * plan.chunks + chunk) * pieces.parts + part) * per_piece +
                        j % per_piece]);
      moments[n * groups + j] = m;
    }
}

// Coefficient arrays over C per sample, so the row loop vectorizes along C.
struct SampleCoefficients {
  float *mean_hi, *scale, *shift;
};

void rows_sample_coefficients(const Forward<float>& p, int64_t per_group, int64_t n,
                              SampleCoefficients k) {
  for (int64_t c = 0; c < p.x_geom.c; ++c) {
    const Moments& m = p.moments[n * p.groups + c / per_group];
    const ApplyCoefficients a =
        apply_coefficients(m.mean, 1.0 / std::sqrt(m.biased_variance() + p.eps),
                           param_or(p.gamma, c, 1.0), param_or(p.beta, c, 0.0));
    k.mean_hi[c] = a.mean_hi;
    k.scale[c] = a.scale;
    k.shift[c] = a.shift;
  }
}

// y of rows [first_row, first_row + rows) of sample n, whole rows in memory
// order, through the streamed buffer when `stream` (cpu/streamed_output.hpp).
void rows_sample_apply(const Forward<float>& p, int64_t n, int64_t first_row, int64_t rows,
                       const SampleCoefficients& k, bool stream) {
  cpu::apply_rows_to(stream, p.x + p.x_geom.offset(n, 0, first_row), p.x_geom.s_stride,
                     p.y + p.y_geom.offset(n, 0, first_row), p.y_geom.s_stride, rows, p.x_geom.c,
                     k.mean_hi, k.scale, k.shift);
}

// A thread takes whole samples when they keep every thread busy: statistics
// over whole rows, then y while the sample is in L2 (800 KB for
// 16×256×28×28). Otherwise three phases: statistics pieces, merges, then y
// in chunks of rows.
void rows_forward(const Forward<float>& p) {
  const SampleGeometry& g = p.x_geom;
  const RowPlan plan(g, p.groups);
  const int threads = threads_for(g.n * g.c * g.s);
  const bool stream = cpu::stream_output(g.n * g.c * g.s, threads);
  Workspace ws;
  const std::span<float> coeff = ws.take_for_overwrite<float>(3 * g.n * g.c);
  auto coefficients_of = [&](int64_t n) {
    float* base = coeff.data() + 3 * n * g.c;
    return SampleCoefficients{base, base + g.c, base + 2 * g.c};
  };
  if (whole_units_per_thread(g.n, threads)) {
    parallel_for(threads, g.n, [&](int64_t n) {
      rows_sample_moments(g, p.x, plan, p.groups, n, p.moments);
      rows_sample_coefficients(p, plan.per_group, n, coefficients_of(n));
      rows_sample_apply(p, n, 0, g.s, coefficients_of(n), stream);
    });
    return;
  }
  const StatisticsPieces pieces(g, plan, threads);
  const std::span<Moments> partial =
      ws.take<Moments>(pieces.count * (pieces.part_channels / plan.per_group));
  parallel_region(threads, [&] {
    rows_moments_phases(g, p.x, plan, p.groups, pieces, partial, p.moments);
#pragma omp for schedule(static)
    for (int64_t n = 0; n < g.n; ++n)
      rows_sample_coefficients(p, plan.per_group, n, coefficients_of(n));
#pragma omp for schedule(static)
    for (int64_t t = 0; t < g.n * plan.chunks; ++t) {
      const int64_t n = t / plan.chunks, chunk = t % plan.chunks;
      rows_sample_apply(p, n, plan.first_row(chunk), plan.rows_in(chunk, g.s), coefficients_of(n),
                        stream);
    }
  });
}

void rows_moments(const SampleGeometry& g, const float* x, int64_t groups, Moments* out) {
  const RowPlan plan(g, groups);
  const int threads = threads_for(g.n * g.c * g.s);
  if (whole_units_per_thread(g.n, threads)) {
    parallel_for(threads, g.n, [&](int64_t n) { rows_sample_moments(g, x, plan, groups, n, out); });
    return;
  }
  const StatisticsPieces pieces(g, plan, threads);
  Workspace ws;
  const std::span<Moments> partial =
      ws.take<Moments>(pieces.count * (pieces.part_channels / plan.per_group));
  parallel_region(threads, [&] { rows_moments_phases(g, x, plan, groups, pieces, partial, out); });
}

// Σdy and Σdy·(x - center[c]) of one chunk per channel, from zero, in double,
// in blocks of kChannelBlock channels whose sums stay in registers.
NORMKIT_SIMD_CLONES
void rows_gradient_sums_chunk(const float* __restrict x, int64_t x_stride,
                              const float* __restrict dy, int64_t dy_stride, int64_t rows,
                              int64_t channels, const float* __restrict center,
                              double* __restrict sum_dy, double* __restrict sum_dy_xc) {
  int64_t c0 = 0;
  for (; c0 + kChannelBlock <= channels; c0 += kChannelBlock) {
    double a[kChannelBlock] = {}, b[kChannelBlock] = {}, centre[kChannelBlock];
    for (int l = 0; l < kChannelBlock; ++l) centre[l] = center[c0 + l];
    for (int64_t r = 0; r < rows; ++r) {
      const float* xp = x + r * x_stride + c0;
      const float* gp = dy + r * dy_stride + c0;
      for (int l = 0; l < kChannelBlock; ++l) {
        const double gr = gp[l];
        a[l] += gr;
        b[l] += gr * (static_cast<double>(xp[l]) - centre[l]);
      }
    }
    for (int l = 0; l < kChannelBlock; ++l) {
      sum_dy[c0 + l] = a[l];
      sum_dy_xc[c0 + l] = b[l];
    }
  }
  for (int64_t c = c0; c < channels; ++c) {
    double a = 0, b = 0;
    const double centre = center[c];
    for (int64_t r = 0; r < rows; ++r) {
      const double gr = dy[r * dy_stride + c];
      a += gr;
      b += gr * (static_cast<double>(x[r * x_stride + c]) - centre);
    }
    sum_dy[c] = a;
    sum_dy_xc[c] = b;
  }
}

NORMKIT_SIMD_CLONES
void rows_backward_apply_chunk(const float* x, int64_t x_stride, const float* dy,
                               int64_t dy_stride, float* dx, int64_t dx_stride, int64_t rows,
                               int64_t channels, const float* __restrict mean_hi,
                               const float* __restrict a, const float* __restrict b,
                               const float* __restrict k) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xp = x + r * x_stride;
    const float* gp = dy + r * dy_stride;
    float* dp = dx + r * dx_stride;
    for (int64_t c = 0; c < channels; ++c)
      dp[c] = a[c] * gp[c] + b[c] * (xp[c] - mean_hi[c]) + k[c];
  }
}

void rows_backward(const Backward<float>& p) {
  const SampleGeometry& g = p.x_geom;
  const RowPlan plan(g, p.groups);
  const int64_t C = g.c, G = p.groups;
  const int threads = threads_for(2 * g.n * g.c * g.s);
  const int64_t units = g.n * plan.slabs;
  Workspace ws;
  const std::span<double> sum_dy = ws.take<double>(g.n * C), sum_dy_xmu = ws.take<double>(g.n * C);
  // Per sample: mean_hi (the centre of the sums, then of dx), a, b, k per channel.
  const std::span<float> coeff = ws.take_for_overwrite<float>(4 * g.n * C);
  for (int64_t n = 0; n < g.n; ++n)
    for (int64_t c = 0; c < C; ++c)
      coeff[4 * n * C + c] = static_cast<float>(p.mean[n * G + c / plan.per_group]);
  // Σ over one chunk of a slab, from zero, into a and b (width values each).
  auto chunk_sums = [&](int64_t n, int64_t slab, int64_t chunk, double* a, double* b) {
    const int64_t c0 = plan.first_channel(slab), r0 = plan.first_row(chunk);
    rows_gradient_sums_chunk(p.x + g.offset(n, c0, r0), g.s_stride,
                             p.dy + p.dy_geom.offset(n, c0, r0), p.dy_geom.s_stride,
                             plan.rows_in(chunk, g.s), plan.width(slab, C), &coeff[4 * n * C + c0],
                             a, b);
  };
  // Chunk sums added to the per-(n, c) sums in chunk order (the first onto zeros).
  auto add_chunk = [&](int64_t n, int64_t slab, const double* a, const double* b) {
    const int64_t c0 = plan.first_channel(slab);
    for (int64_t j = 0; j < plan.width(slab, C); ++j) {
      sum_dy[n * C + c0 + j] += a[j];
      sum_dy_xmu[n * C + c0 + j] += b[j];
    }
  };
  auto finish_slab = [&](int64_t n, int64_t slab) {
    float* const k = &coeff[4 * n * C];
    const int64_t c_first = plan.first_channel(slab), c_end = c_first + plan.width(slab, C);
    for (int64_t c0 = c_first; c0 < c_end; c0 += plan.per_group) {
      const int64_t block = n * G + c0 / plan.per_group;
      const BlockGradient bg = finish_block(p, block, &sum_dy[n * C + c0], &sum_dy_xmu[n * C + c0]);
      for (int64_t c = c0; c < c0 + plan.per_group; ++c) {
        const BackwardCoefficients bc = channel_backward(p, block, c, bg);
        k[C + c] = bc.a;
        k[2 * C + c] = bc.b;
        k[3 * C + c] = bc.k;
      }
    }
  };
  auto apply = [&](int64_t n, int64_t slab, int64_t first_row, int64_t rows) {
    const int64_t c0 = plan.first_channel(slab);
    const float* k = &coeff[4 * n * C];
    rows_backward_apply_chunk(p.x + g.offset(n, c0, first_row), g.s_stride,
                              p.dy + p.dy_geom.offset(n, c0, first_row), p.dy_geom.s_stride,
                              p.dx + p.dx_geom.offset(n, c0, first_row), p.dx_geom.s_stride, rows,
                              plan.width(slab, C), k + c0, k + C + c0, k + 2 * C + c0,
                              k + 3 * C + c0);
  };
  // A thread takes whole samples when they keep every thread busy and a
  // sample's x and dy fit in L2: each chunk's sums over whole rows (slab after
  // slab, so every channel's sums are the ones below), then dx over whole rows
  // while the sample is in L2, streamed past the threads' L2. (Units of one
  // slab read x and dy in runs of a slab's width, 256 bytes for 64 channels,
  // rows apart. 16×256×28×28 NHWC backward, × a copy, bench, alternated, 1 and
  // 2 threads: 3.62-3.96 that way, 2.63-2.86 this way.)
  const bool sample_in_l2 = 2 * C * g.s * int64_t{sizeof(float)} <= cpu::l2_bytes();
  if (sample_in_l2 && whole_units_per_thread(g.n, threads)) {
    const bool stream = cpu::stream_output(g.n * C * g.s, threads);
    parallel_region(threads, [&] {
      Workspace own;  // this thread's
      const std::span<double> a = own.take_for_overwrite<double>(plan.slab_channels),
                              b = own.take_for_overwrite<double>(plan.slab_channels);
#pragma omp for schedule(static)
      for (int64_t n = 0; n < g.n; ++n) {
        for (int64_t chunk = 0; chunk < plan.chunks; ++chunk)
          for (int64_t slab = 0; slab < plan.slabs; ++slab) {
            chunk_sums(n, slab, chunk, a.data(), b.data());
            add_chunk(n, slab, a.data(), b.data());
          }
        for (int64_t slab = 0; slab < plan.slabs; ++slab) finish_slab(n, slab);
        if (!p.dx) continue;
        const float* k = &coeff[4 * n * C];
        const float* x = p.x + g.offset(n, 0, 0);
        const float* dy = p.dy + p.dy_geom.offset(n, 0, 0);
        const int64_t xs = g.s_stride, dys = p.dy_geom.s_stride;
        const cpu::Output dx{p.dx + p.dx_geom.offset(n, 0, 0), p.dx_geom.s_stride};
        cpu::write_outputs<1>(stream, {dx}, g.s, C, [&](int64_t r0, int64_t rows, const auto& out) {
          rows_backward_apply_chunk(x + r0 * xs, xs, dy + r0 * dys, dys, out[0].data,
                                    out[0].stride, rows, C, k, k + C, k + 2 * C, k + 3 * C);
        });
      }
    });
  } else if (whole_units_per_thread(units, threads)) {
    parallel_region(threads, [&] {
      Workspace own;  // this thread's
      const std::span<double> a = own.take_for_overwrite<double>(plan.slab_channels),
                              b = own.take_for_overwrite<double>(plan.slab_channels);
#pragma omp for schedule(static)
      for (int64_t u = 0; u < units; ++u) {
        const int64_t n = u / plan.slabs, slab = u % plan.slabs;
        for (int64_t chunk = 0; chunk < plan.chunks; ++chunk) {
          chunk_sums(n, slab, chunk, a.data(), b.data());
          add_chunk(n, slab, a.data(), b.data());
        }
        finish_slab(n, slab);
        if (p.dx) apply(n, slab, 0, g.s);
      }
    });
  } else {
    const int64_t pieces = units * plan.chunks, width = plan.slab_channels;
    const std::span<double> partial = ws.take_for_overwrite<double>(2 * pieces * width);
    parallel_region(threads, [&] {
#pragma omp for schedule(static)
      for (int64_t t = 0; t < pieces; ++t) {
        const int64_t u = t / plan.chunks;
        chunk_sums(u / plan.slabs, u % plan.slabs, t % plan.chunks, &partial[2 * t * width],
                   &partial[(2 * t + 1) * width]);
      }
#pragma omp for schedule(static)
      for (int64_t u = 0; u < units; ++u) {
        const int64_t n = u / plan.slabs, slab = u % plan.slabs;
        for (int64_t chunk = 0; chunk < plan.chunks; ++chunk) {
          const int64_t t = u * plan.chunks + chunk;
          add_chunk(n, slab, &partial[2 * t * width], &partial[(2 * t + 1) * width]);
        }
        finish_slab(n, slab);
      }
      if (p.dx) {
#pragma omp for schedule(static)
        for (int64_t t = 0; t < pieces; ++t) {
          const int64_t u = t / plan.chunks, chunk = t % plan.chunks;
          apply(u / plan.slabs, u % plan.slabs, plan.first_row(chunk), plan.rows_in(chunk, g.s));
        }
      }
    });
  }
  finish_parameters(p, sum_dy.data(), sum_dy_xmu.data());
}

const char* rows_decline(const SampleGeometry& x, std::span<const SampleGeometry> others) {
  if (x.c_stride != 1 && x.c > 1) return "channels are not contiguous";
  for (const SampleGeometry& o : others)
    if ((o.c_stride != 1 && o.c > 1) || !o.same_extent(x))
      return "an output or gradient is not laid out like x";
  return nullptr;
}

}  // namespace

extern const Impl kRows = {
    "rows", rows_decline, rows_forward, rows_backward,
    [](const Statistics<float>& p) { rows_moments(p.x_geom, p.x, p.groups, p.moments); }};

}  // namespace normkit::kernels::gn
