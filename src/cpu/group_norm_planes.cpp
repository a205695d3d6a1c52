// Fast group normalization for float data.
//
// Two implementations, chosen by the strides of [N, C, S]:
//   planes: each channel's S positions contiguous (NCL, NCHW, NCDHW). A
//           (sample, group) block is C/G runs of S floats, one contiguous run
//           of C/G·S floats for dense data. A thread takes whole blocks: their
//           statistics, then y, while the block (25 KB for GN(32) on
//           16×256×28×28) is still in L1/L2.
//   rows:   channels contiguous (NLC, NHWC, NDHWC, NC, PyTorch channels_last):
//           per sample, S rows of C floats, cut into slabs of whole groups
//           about 64 channels wide. Per-channel partial moments of a chunk of
//           a slab's rows are vectorized along C, then merged per group. A
//           thread takes whole slabs (200 KB of that shape, so the apply pass
//           re-reads x from L2; a whole sample, 800 KB, 1.6 MB with dy for
//           backward, would not stay there).
// When blocks (slabs) are too few to keep the threads busy, the same pieces
// are spread over the threads in three phases (partials, merge, apply).
//
// Determinism: pieces depend only on the geometry, each piece's partial is
// computed by one thread, and partials are merged in piece order, so results
// are bitwise identical for any thread count and either schedule.
//
// Accuracy: as batch norm's kernels (batch_norm_cpu.cpp): two passes over a
// piece in cache (mean shifted by a value of the data, then corrected sums
// around it) in float lanes, pieces merged in double with Chan's formula; the
// apply subtracts the float-rounded mean before scaling; the gradient sums
// run in double. The leaf loops (those shared with the other kernels in
// leaf_loops.hpp) are compiled for AVX-512, AVX2+FMA and baseline x86-64 and
// chosen at run time; as there, bits are identical for any thread count on one
// machine, not across machines that run different clones (FMA contraction).
#include <algorithm>
#include <cmath>
#include <iterator>
#include <vector>

#include "core/parallel.hpp"
#include "kernels/group_norm.hpp"
#include "leaf_loops.hpp"

namespace normkit::kernels::gn {
namespace {

using detail::threads_for;
using leaf::GradientSums;
using leaf::gradient_sums_run;
using leaf::kMaxChunkRows;
using leaf::kPieceElements;
using leaf::param_or;
using leaf::scratch;
using leaf::whole_units_per_thread;

// Parts of a channel run for the apply and gradient phases when blocks are few.
constexpr int64_t kRunPart = 16384;

// y = (x - mean_hi)·scale + shift: see ApplyCoefficients in batch_norm_kernels.hpp.
struct ApplyCoefficients {
  float mean_hi, scale, shift;
};
ApplyCoefficients apply_coefficients(double mean, double invstd, double gamma, double beta) {
  const float mean_hi = static_cast<float>(mean);
  const double scale = gamma * invstd;
  return {mean_hi, static_cast<float>(scale),
          static_cast<float>(beta - (mean - static_cast<double>(mean_hi)) * scale)};
}

NORMKIT_SIMD_CLONES
void apply_run(const float* __restrict x, float* __restrict y, int64_t len, ApplyCoefficients k) {
  for (int64_t i = 0; i < len; ++i) y[i] = (x[i] - k.mean_hi) * k.scale + k.shift;
}

// In place (y == x) the restrict promise above would be broken.
NORMKIT_SIMD_CLONES
void apply_run_in_place(float* x, int64_t len, ApplyCoefficients k) {
  for (int64_t i = 0; i < len; ++i) x[i] = (x[i] - k.mean_hi) * k.scale + k.shift;
}

void apply_any(const float* x, float* y, int64_t len, ApplyCoefficients k) {
  if (x == y)
    apply_run_in_place(y, len, k);
  else
    apply_run(x, y, len, k);
}

// dx = a·dy + b·(x - mean_hi) + k (see backward_coefficients below).
struct BackwardCoefficients {
  float mean_hi, a, b, k;
};
NORMKIT_SIMD_CLONES
void backward_apply_run(const float* x, const float* dy, float* dx, int64_t len,
                        BackwardCoefficients k) {
  for (int64_t i = 0; i < len; ++i) dx[i] = k.a * dy[i] + k.b * (x[i] - k.mean_hi) + k.k;
}

// A block's sums from the per-channel Σdy and Σdy·(x - mean): with r = invstd,
// M = C/G·S, Sg = Σ_c γ_c·Σdy and Sgx = r·Σ_c γ_c·Σdy·(x - mean) (= Σγ·dy·x̂),
//   dx = r·γ_c·dy - r·Sg/M - r²·Sgx/M·(x - mean)
//      = a_c·dy + b·(x - mean_hi) + k,  a_c = r·γ_c,  b = -r²·Sgx/M,
//        k = -r·Sg/M - b·(mean - mean_hi).
struct BlockGradient {
  float mean_hi, b, k;
};
BlockGradient block_gradient(double mean, double invstd, double sum_g, double sum_g_xmu,
                             double count) {
  const float mean_hi = static_cast<float>(mean);
  const double b = -invstd * invstd * (invstd * sum_g_xmu) / count;
  const double k = -invstd * sum_g / count - b * (mean - static_cast<double>(mean_hi));
  return {mean_hi, static_cast<float>(b), static_cast<float>(k)};
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
  auto block_base = [&](int64_t block) {
    const int64_t n = block / p.groups, first_c = (block % p.groups) * plan.per_group;
    return p.x + g.offset(n, first_c, 0);
  };
  if (whole_units_per_thread(blocks, threads)) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t block = 0; block < blocks; ++block) {
      const float* base = block_base(block);
      Moments m;
      for (int64_t i = 0; i < plan.pieces; ++i) m.merge(plan.piece_moments(base, i));
      p.moments[block] = m;
      const int64_t n = block / p.groups, first_c = (block % p.groups) * plan.per_group;
      for (int64_t c = first_c; c < first_c + plan.per_group; ++c)
        apply_any(p.x + g.offset(n, c, 0), p.y + p.y_geom.offset(n, c, 0), g.s,
                  channel_coefficients(p, n, c));
    }
    return;
  }
  const int64_t total = blocks * plan.pieces;
  const RunParts parts(g.s);
  const int64_t apply_units = g.n * g.c * parts.parts;
  std::vector<Moments> partial(total);
#pragma omp parallel num_threads(threads)
  {
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
                parts.len(part, g.s), channel_coefficients(p, n, c));
    }
  }
}

void planes_moments(const SampleGeometry& g, const float* x, int64_t groups, Moments* out) {
  const BlockPlan plan(g, groups);
  const int64_t blocks = g.n * groups, total = blocks * plan.pieces;
  std::vector<Moments> partial(total);
#pragma omp parallel num_threads(threads_for(g.n * g.c * g.s))
  {
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
  }
}

// Σdy and Σdy·(x - float(mean)) of one part of channel c of sample n.
GradientSums planes_part_sums(const Backward<float>& p, int64_t n, int64_t c, int64_t first,
                              int64_t len) {
  const int64_t block = n * p.groups + c / (p.x_geom.c / p.groups);
  return gradient_sums_run(p.x + p.x_geom.offset(n, c, first),
                           p.dy + p.dy_geom.offset(n, c, first), len,
                           static_cast<float>(p.mean[block]));
}

// Per-(n, c) sums, given as Σdy and Σdy·(x - float(mean)), completed into
// per-block coefficients; `sum_dy_xmu` is corrected in place to Σdy·(x - mean).
BlockGradient finish_block(const Backward<float>& p, int64_t block, const double* sum_dy,
                           double* sum_dy_xmu) {
  const int64_t per_group = p.x_geom.c / p.groups, first_c = (block % p.groups) * per_group;
  const double mean = p.mean[block], error = mean - static_cast<float>(mean);
  double sum_g = 0, sum_g_xmu = 0;
  for (int64_t j = 0; j < per_group; ++j) {
    sum_dy_xmu[j] -= sum_dy[j] * error;
    const double gamma = param_or(p.gamma, first_c + j, 1.0);
    sum_g += gamma * sum_dy[j];
    sum_g_xmu += gamma * sum_dy_xmu[j];
  }
  return block_gradient(mean, p.invstd[block], sum_g, sum_g_xmu,
                        static_cast<double>(per_group * p.x_geom.s));
}

BackwardCoefficients channel_backward(const Backward<float>& p, int64_t block, int64_t c,
                                      const BlockGradient& bg) {
  return {bg.mean_hi, static_cast<float>(p.invstd[block] * param_or(p.gamma, c, 1.0)), bg.b, bg.k};
}

// dγ[c] = Σ_n invstd·Σdy·(x - mean), dβ[c] = Σ_n Σdy, in sample order.
void finish_parameters(const Backward<float>& p, const double* sum_dy, const double* sum_dy_xmu) {
  const SampleGeometry& g = p.x_geom;
  const int64_t per_group = g.c / p.groups;
  for (int64_t c = 0; c < g.c; ++c) p.dgamma[c] = p.dbeta[c] = 0;
  for (int64_t n = 0; n < g.n; ++n)
    for (int64_t c = 0; c < g.c; ++c) {
      p.dbeta[c] += sum_dy[n * g.c + c];
      p.dgamma[c] += p.invstd[n * p.groups + c / per_group] * sum_dy_xmu[n * g.c + c];
    }
}

void planes_backward(const Backward<float>& p) {
  const SampleGeometry& g = p.x_geom;
  const int64_t per_group = g.c / p.groups, blocks = g.n * p.groups;
  const RunParts parts(g.s);
  const int threads = threads_for(2 * g.n * g.c * g.s);
  std::vector<double> sum_dy(g.n * g.c), sum_dy_xmu(g.n * g.c);
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
#pragma omp parallel num_threads(threads)
    {
      std::vector<GradientSums> part_sums(parts.parts);
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
    }
  } else {
    const int64_t units = g.n * g.c * parts.parts;
    std::vector<GradientSums> partial(units);
    std::vector<BlockGradient> block_coeff(blocks);
#pragma omp parallel num_threads(threads)
    {
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
    }
  }
  finish_parameters(p, sum_dy.data(), sum_dy_xmu.data());
}

const char* planes_decline(const SampleGeometry& x, const SampleGeometry* others, int count) {
  if (x.s_stride != 1 || x.s < 2) return "spatial positions are not contiguous runs";
  for (int i = 0; i < count; ++i)
    if (others[i].s_stride != 1 || !others[i].same_extent(x))
      return "an output or gradient is not laid out like x";
  return nullptr;
}

// ================= rows: per sample, S rows of C contiguous floats =================

// A sample is cut into slabs of whole groups, about kSlabChannels channels wide,
// taken over all S rows: a slab of x (200 KB for GN(32) on 16×256×28×28, x and
// dy 400 KB) stays in L2 between its statistics and its apply, where a whole
// sample (800 KB, 1.6 MB with dy) would not. Rows of a slab are cut into chunks
// of at most kRowChunkValues (16 KB: the two statistics passes read from L1).
// Both cuts depend only on the geometry.
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

// Per-channel moments of a chunk of rows, vectorized across channels: the
// chunk's mean shifted by its first row, then corrected sums around it. Blocks
// of kChannelBlock channels keep their sums in registers while the rows go by
// (the block's rows stay in L1 for the second pass); the channels after the
// last whole block go one by one. Every channel's sums run over the rows in
// order either way.
constexpr int kChannelBlock = 32;

NORMKIT_SIMD_CLONES
void rows_chunk_moments(const float* __restrict x, int64_t stride, int64_t rows, int64_t channels,
                        double* __restrict mean, double* __restrict m2) {
  const double n = static_cast<double>(rows);
  int64_t c0 = 0;
  for (; c0 + kChannelBlock <= channels; c0 += kChannelBlock) {
    const float* xb = x + c0;
    float shift[kChannelBlock], sum[kChannelBlock] = {}, center[kChannelBlock];
    for (int l = 0; l < kChannelBlock; ++l) shift[l] = xb[l];
    for (int64_t r = 0; r < rows; ++r)
      for (int l = 0; l < kChannelBlock; ++l) sum[l] += xb[r * stride + l] - shift[l];
    for (int l = 0; l < kChannelBlock; ++l)
      center[l] = static_cast<float>(static_cast<double>(shift[l]) + static_cast<double>(sum[l]) / n);
    float sum_d[kChannelBlock] = {}, sum_d2[kChannelBlock] = {};
    for (int64_t r = 0; r < rows; ++r)
      for (int l = 0; l < kChannelBlock; ++l) {
        const float d = xb[r * stride + l] - center[l];
        sum_d[l] += d;
        sum_d2[l] += d * d;
      }
    for (int l = 0; l < kChannelBlock; ++l) {
      const double sd = sum_d[l];
      mean[c0 + l] = center[l] + sd / n;
      m2[c0 + l] = sum_d2[l] - sd * sd / n;
    }
  }
  for (int64_t c = c0; c < channels; ++c) {
    const float shift = x[c];
    float sum = 0;
    for (int64_t r = 0; r < rows; ++r) sum += x[r * stride + c] - shift;
    const auto center = static_cast<float>(static_cast<double>(shift) + static_cast<double>(sum) / n);
    float sum_d = 0, sum_d2 = 0;
    for (int64_t r = 0; r < rows; ++r) {
      const float d = x[r * stride + c] - center;
      sum_d += d;
      sum_d2 += d * d;
    }
    const double sd = sum_d;
    mean[c] = center + sd / n;
    m2[c] = sum_d2 - sd * sd / n;
  }
}

NORMKIT_SIMD_CLONES
void rows_apply_chunk(const float* x, int64_t x_stride, float* y, int64_t y_stride, int64_t rows,
                      int64_t channels, const float* __restrict mean_hi,
                      const float* __restrict scale, const float* __restrict shift) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xp = x + r * x_stride;
    float* yp = y + r * y_stride;
    for (int64_t c = 0; c < channels; ++c) yp[c] = (xp[c] - mean_hi[c]) * scale[c] + shift[c];
  }
}

// The moments of each group of a slab over one chunk of rows: per-channel
// moments merged over the group's channels in channel order. out: one per
// group of the slab.
void rows_chunk_group_moments(const SampleGeometry& g, const float* x, const RowPlan& plan,
                              int64_t n, int64_t slab, int64_t chunk, Moments* out) {
  const int64_t c0 = plan.first_channel(slab), width = plan.width(slab, g.c);
  const int64_t rows = plan.rows_in(chunk, g.s);
  double* const mean = scratch<double>(0, 2 * width);
  double* const m2 = mean + width;
  rows_chunk_moments(x + g.offset(n, c0, plan.first_row(chunk)), g.s_stride, rows, width, mean, m2);
  const double count = static_cast<double>(rows);
  for (int64_t j = 0; j < width / plan.per_group; ++j) {
    Moments m;
    for (int64_t c = j * plan.per_group; c < (j + 1) * plan.per_group; ++c)
      m.merge({count, mean[c], m2[c]});
    out[j] = m;
  }
}

// Statistics of a slab's groups over all rows, chunks merged in order, into
// moments[n·G + group].
void rows_slab_moments(const SampleGeometry& g, const float* x, const RowPlan& plan,
                       int64_t groups, int64_t n, int64_t slab, Moments* moments) {
  const int64_t first_group = plan.first_channel(slab) / plan.per_group;
  const int64_t count = plan.width(slab, g.c) / plan.per_group;
  Moments* const out = moments + n * groups + first_group;
  Moments* const chunk_moments = scratch<Moments>(1, count);
  for (int64_t j = 0; j < count; ++j) out[j] = Moments{};
  for (int64_t chunk = 0; chunk < plan.chunks; ++chunk) {
    rows_chunk_group_moments(g, x, plan, n, slab, chunk, chunk_moments);
    for (int64_t j = 0; j < count; ++j) out[j].merge(chunk_moments[j]);
  }
}

// Coefficient arrays over C per sample, so the row loop vectorizes along C.
struct SampleCoefficients {
  float *mean_hi, *scale, *shift;
};

void rows_slab_coefficients(const Forward<float>& p, const RowPlan& plan, int64_t n,
                            int64_t slab, SampleCoefficients k) {
  const int64_t c0 = plan.first_channel(slab);
  for (int64_t c = c0; c < c0 + plan.width(slab, p.x_geom.c); ++c) {
    const Moments& m = p.moments[n * p.groups + c / plan.per_group];
    const ApplyCoefficients a =
        apply_coefficients(m.mean, 1.0 / std::sqrt(m.biased_variance() + p.eps),
                           param_or(p.gamma, c, 1.0), param_or(p.beta, c, 0.0));
    k.mean_hi[c] = a.mean_hi;
    k.scale[c] = a.scale;
    k.shift[c] = a.shift;
  }
}

void rows_slab_apply(const Forward<float>& p, const RowPlan& plan, int64_t n, int64_t slab,
                     int64_t first_row, int64_t rows, const SampleCoefficients& k) {
  const int64_t c0 = plan.first_channel(slab);
  rows_apply_chunk(p.x + p.x_geom.offset(n, c0, first_row), p.x_geom.s_stride,
                   p.y + p.y_geom.offset(n, c0, first_row), p.y_geom.s_stride, rows,
                   plan.width(slab, p.x_geom.c), k.mean_hi + c0, k.scale + c0, k.shift + c0);
}

void rows_forward(const Forward<float>& p) {
  const SampleGeometry& g = p.x_geom;
  const RowPlan plan(g, p.groups);
  const int threads = threads_for(g.n * g.c * g.s);
  const int64_t units = g.n * plan.slabs;
  std::vector<float> coeff(3 * g.n * g.c);
  auto coefficients_of = [&](int64_t n) {
    float* base = coeff.data() + 3 * n * g.c;
    return SampleCoefficients{base, base + g.c, base + 2 * g.c};
  };
  if (whole_units_per_thread(units, threads)) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t u = 0; u < units; ++u) {
      const int64_t n = u / plan.slabs, slab = u % plan.slabs;
      rows_slab_moments(g, p.x, plan, p.groups, n, slab, p.moments);
      const SampleCoefficients k = coefficients_of(n);
      rows_slab_coefficients(p, plan, n, slab, k);
      rows_slab_apply(p, plan, n, slab, 0, g.s, k);
    }
    return;
  }
  // Phases: chunks of every slab spread over the threads, merged in chunk order.
  const int64_t pieces = units * plan.chunks, per_slab = plan.slab_channels / plan.per_group;
  std::vector<Moments> partial(pieces * per_slab);
#pragma omp parallel num_threads(threads)
  {
#pragma omp for schedule(static)
    for (int64_t t = 0; t < pieces; ++t) {
      const int64_t u = t / plan.chunks;
      rows_chunk_group_moments(g, p.x, plan, u / plan.slabs, u % plan.slabs, t % plan.chunks,
                               &partial[t * per_slab]);
    }
#pragma omp for schedule(static)
    for (int64_t u = 0; u < units; ++u) {
      const int64_t n = u / plan.slabs, slab = u % plan.slabs;
      const int64_t count = plan.width(slab, g.c) / plan.per_group;
      Moments* const out = p.moments + n * p.groups + plan.first_channel(slab) / plan.per_group;
      for (int64_t j = 0; j < count; ++j) {
        Moments m;
        for (int64_t chunk = 0; chunk < plan.chunks; ++chunk)
          m.merge(partial[(u * plan.chunks + chunk) * per_slab + j]);
        out[j] = m;
      }
      rows_slab_coefficients(p, plan, n, slab, coefficients_of(n));
    }
#pragma omp for schedule(static)
    for (int64_t t = 0; t < pieces; ++t) {
      const int64_t u = t / plan.chunks, chunk = t % plan.chunks;
      rows_slab_apply(p, plan, u / plan.slabs, u % plan.slabs, plan.first_row(chunk),
                      plan.rows_in(chunk, g.s), coefficients_of(u / plan.slabs));
    }
  }
}

void rows_moments(const SampleGeometry& g, const float* x, int64_t groups, Moments* out) {
  const RowPlan plan(g, groups);
  const int64_t units = g.n * plan.slabs;
#pragma omp parallel for num_threads(threads_for(g.n * g.c * g.s)) schedule(static)
  for (int64_t u = 0; u < units; ++u)
    rows_slab_moments(g, x, plan, groups, u / plan.slabs, u % plan.slabs, out);
}

// Σdy and Σdy·(x - center[c]) of one chunk per channel, from zero, in double,
// blocked over channels as rows_chunk_moments.
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
  std::vector<double> sum_dy(g.n * C, 0.0), sum_dy_xmu(g.n * C, 0.0);
  // Per sample: mean_hi (the centre of the sums, then of dx), a, b, k per channel.
  std::vector<float> coeff(4 * g.n * C);
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
  if (whole_units_per_thread(units, threads)) {
#pragma omp parallel num_threads(threads)
    {
      std::vector<double> a(plan.slab_channels), b(plan.slab_channels);
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
    }
  } else {
    const int64_t pieces = units * plan.chunks, width = plan.slab_channels;
    std::vector<double> partial(2 * pieces * width);
#pragma omp parallel num_threads(threads)
    {
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
    }
  }
  finish_parameters(p, sum_dy.data(), sum_dy_xmu.data());
}

const char* rows_decline(const SampleGeometry& x, const SampleGeometry* others, int count) {
  if (x.c_stride != 1 && x.c > 1) return "channels are not contiguous";
  for (int i = 0; i < count; ++i)
    if ((others[i].c_stride != 1 && others[i].c > 1) || !others[i].same_extent(x))
      return "an output or gradient is not laid out like x";
  return nullptr;
}

constexpr Implementation kImplementations[] = {
    {"group planes (channels-first, contiguous spatial runs)", planes_decline, planes_forward,
     planes_backward, planes_moments},
    {"group rows (contiguous channels)", rows_decline, rows_forward, rows_backward, rows_moments},
};

}  // namespace

const Implementation* cpu_implementations(int* count) {
  *count = static_cast<int>(std::size(kImplementations));
  return kImplementations;
}

}  // namespace normkit::kernels::gn
