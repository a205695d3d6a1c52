// Fast layer normalization and RMS normalization, rows form: rows of
// contiguous values (the normalized features fastest). The rules every fast
// kernel keeps (determinism, SIMD clones, internal linkage) are in
// src/cpu/README.md.
//
// Forward, per row: statistics from blocks of at most kBlock values, two passes
// over each block while it is in L1 (its mean, shifted by its first value; then
// Σ(x - mean)² corrected by Σ(x - mean)), blocks merged in order with Chan's
// formula; then one pass to write y. A row of 768 floats (3 KB) is read from
// memory once and re-read from L1, so the forward costs about a copy.
// RMSNorm sums x² instead, in double lanes (no cancellation, no overflow).
//
// Backward, per row: one pass for Σg and Σg·(x - mean) (g = dy·γ, in double
// lanes) and the row's dy·x̂ and dy added to the column sums dγ, dβ; one pass
// writing dx.
//
// Determinism: a row is always computed by one thread, in a fixed order, so y,
// the statistics and dx do not depend on the thread count. dγ and dβ are column
// sums over all rows: rows are cut into stripes whose boundaries depend only on
// the problem (never on the thread count), each stripe sums its rows in order
// into its own double partials, and partials are added in stripe order.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <span>

#include "core/parallel.hpp"
#include "cpu/implementations.hpp"
#include "cpu/leaf_loops.hpp"
#include "cpu/streamed_output.hpp"
#include "kernels/layer_norm.hpp"
#include "normkit/moments.hpp"

namespace normkit::kernels::ln {
namespace {

using detail::parallel_for;
using detail::parallel_region;
using detail::threads_for;
using leaf::kDoubleLanes;
using leaf::kTailLanes;
using leaf::lane_total;

// Float sums run over 64 fixed lanes (leaf_loops.hpp); a lane sees at most
// kBlock / 64 = 64 values of a block, already centred, so the float sums lose
// almost nothing; lane totals and blocks combine in double.
constexpr int64_t kBlock = 4096;
// dγ, dβ: at most this many stripes of rows, and at most this many partial
// values per array (a few MB), whatever the thread count.
constexpr int64_t kMaxStripes = 32;
constexpr int64_t kMaxPartials = int64_t{1} << 19;

// Σx² in double: each square of a float is exact in double.
NORMKIT_SIMD_CLONES
double sum_squares(const float* __restrict x, int64_t n) {
  double acc[kDoubleLanes] = {}, acc8[kTailLanes] = {};
  double tail = 0;
  int64_t i = 0;
  for (; i + kDoubleLanes <= n; i += kDoubleLanes)
    for (int l = 0; l < kDoubleLanes; ++l) {
      const double v = x[i + l];
      acc[l] += v * v;
    }
  for (; i + kTailLanes <= n; i += kTailLanes)
    for (int l = 0; l < kTailLanes; ++l) {
      const double v = x[i + l];
      acc8[l] += v * v;
    }
  for (; i < n; ++i) {
    const double v = x[i];
    tail += v * v;
  }
  return lane_total<kDoubleLanes>(acc) + lane_total<kTailLanes>(acc8) + tail;
}

Moments row_moments(const float* x, int64_t cols) {
  Moments m;
  for (int64_t b = 0; b < cols; b += kBlock) {
    const int64_t len = std::min(kBlock, cols - b);
    m.merge(leaf::run_moments(x + b, 1, len, len));
  }
  return m;
}

// x̂ = (x - mean)·invstd as (x - center)·scale - offset in float, with
// center = float(mean), scale = float(invstd), offset = (mean - center)·invstd:
// x - center is exact for x near the mean, so a mean of 1e6 with std 1 keeps
// its digits (x·scale - mean·scale would lose them).
struct RowCoefficients {
  float center, scale, offset;
};
RowCoefficients row_coefficients(double mean, double invstd) {
  const auto center = static_cast<float>(mean);
  return {center, static_cast<float>(invstd),
          static_cast<float>((mean - static_cast<double>(center)) * invstd)};
}

// y = x̂·γ + β; the branches on γ/β sit outside the loops so each loop vectorizes.
NORMKIT_SIMD_CLONES
void apply_row(const float* x, float* y, int64_t n, RowCoefficients k, const float* __restrict gamma,
               const float* __restrict beta) {
  const float c = k.center, s = k.scale, o = k.offset;
  if (gamma && beta) {
    for (int64_t j = 0; j < n; ++j) y[j] = ((x[j] - c) * s - o) * gamma[j] + beta[j];
  } else if (gamma) {
    for (int64_t j = 0; j < n; ++j) y[j] = ((x[j] - c) * s - o) * gamma[j];
  } else if (beta) {
    for (int64_t j = 0; j < n; ++j) y[j] = ((x[j] - c) * s - o) + beta[j];
  } else {
    for (int64_t j = 0; j < n; ++j) y[j] = (x[j] - c) * s - o;
  }
}

// One pass over a row for backward: Σg and Σg·(x - center) with g = dy·γ (the
// products in float, one rounding each; their sums in double lanes, since
// Σg·(x - mean) cancels heavily), and the row's share of the column sums
// dγ += dy·x̂, dβ += dy in double (the product of two floats is exact in double).
// The variants (γ or not, which outputs are wanted) are compile-time flags, so
// every loop is branch-free and vectorizes; each is inlined into the
// target_clones dispatcher below and compiled for its instruction set.
struct GradientSums {
  double sum_g, sum_g_xc;
};
template <bool kGamma, bool kRowSums, bool kDGamma, bool kDBeta>
[[gnu::always_inline]] inline GradientSums backward_sums_impl(
    const float* __restrict x, const float* __restrict dy, const float* __restrict gamma,
    int64_t n, RowCoefficients k, double* __restrict dgamma, double* __restrict dbeta) {
  const float c = k.center, s = k.scale, o = k.offset;
  double acc1[kDoubleLanes] = {}, acc2[kDoubleLanes] = {};
  double tail1 = 0, tail2 = 0;
  auto element = [&](int64_t j, double& a1, double& a2) {
    if constexpr (kRowSums) {
      const double g = kGamma ? dy[j] * gamma[j] : dy[j];
      a1 += g;
      a2 += g * static_cast<double>(x[j] - c);
    }
    if constexpr (kDGamma) dgamma[j] += static_cast<double>(dy[j]) * static_cast<double>((x[j] - c) * s - o);
    if constexpr (kDBeta) dbeta[j] += static_cast<double>(dy[j]);
  };
  int64_t i = 0;
  for (; i + kDoubleLanes <= n; i += kDoubleLanes)
    for (int l = 0; l < kDoubleLanes; ++l) element(i + l, acc1[l], acc2[l]);
  for (; i < n; ++i) element(i, tail1, tail2);
  return {lane_total<kDoubleLanes>(acc1) + tail1, lane_total<kDoubleLanes>(acc2) + tail2};
}

NORMKIT_SIMD_CLONES
GradientSums backward_sums(const float* x, const float* dy, const float* gamma, int64_t n,
                           RowCoefficients k, bool row_sums, double* dgamma, double* dbeta) {
#define NORMKIT_BACKWARD_SUMS(G, R)                                                  \
  if (dgamma && dbeta) return backward_sums_impl<G, R, true, true>(x, dy, gamma, n, k, dgamma, dbeta); \
  if (dgamma) return backward_sums_impl<G, R, true, false>(x, dy, gamma, n, k, dgamma, dbeta);        \
  if (dbeta) return backward_sums_impl<G, R, false, true>(x, dy, gamma, n, k, dgamma, dbeta);         \
  return backward_sums_impl<G, R, false, false>(x, dy, gamma, n, k, dgamma, dbeta);
  if (row_sums && gamma) {
    NORMKIT_BACKWARD_SUMS(true, true)
  } else if (row_sums) {
    NORMKIT_BACKWARD_SUMS(false, true)
  } else {
    // Without dx the row sums are not needed, nor γ.
    NORMKIT_BACKWARD_SUMS(false, false)
  }
#undef NORMKIT_BACKWARD_SUMS
}

// dx = a·g + b·x̂ + k with g = dy·γ, x̂ as in apply_row (see row_backward). No
// __restrict on x, dy, dx: dx may be x or dy (in place); each element is read
// before it is written.
struct DxCoefficients {
  float a, b, k;
};
NORMKIT_SIMD_CLONES
void dx_row(const float* x, const float* dy, float* dx, const float* __restrict gamma, int64_t n,
            RowCoefficients r, DxCoefficients c) {
  const float center = r.center, s = r.scale, o = r.offset;
  if (gamma) {
    for (int64_t j = 0; j < n; ++j)
      dx[j] = c.a * (dy[j] * gamma[j]) + c.b * ((x[j] - center) * s - o) + c.k;
  } else {
    for (int64_t j = 0; j < n; ++j) dx[j] = c.a * dy[j] + c.b * ((x[j] - center) * s - o) + c.k;
  }
}

// y of row r; through the streamed buffer when `stream` (cpu/streamed_output.hpp).
void forward_row(const Forward<float>& p, int64_t r, bool stream) {
  const float* x = p.x + r * p.x_stride;
  const auto n = static_cast<double>(p.cols);
  double mean = 0, invstd = 0;
  if (p.centering == Centering::layer) {
    const Moments m = row_moments(x, p.cols);
    mean = m.mean;
    invstd = 1.0 / std::sqrt(m.m2 / n + p.eps);
    p.mean[r] = mean;
  } else {
    invstd = 1.0 / std::sqrt(sum_squares(x, p.cols) / n + p.eps);
  }
  p.invstd[r] = invstd;
  const RowCoefficients k = row_coefficients(mean, invstd);
  cpu::write_outputs<1>(stream, {{{p.y + r * p.y_stride, p.cols}}}, 1, p.cols,
                        [&](int64_t, int64_t, const auto& out) {
    apply_row(x, out[0].data, p.cols, k, p.gamma, p.beta);
  });
}

// With x̂ = (x - mean)·r (r = invstd), g = dy·γ, N = cols:
//   dx = r·(g - Σg/N - x̂·Σ(g·x̂)/N) = a·g + b·x̂ + k,
//   a = r,  b = -r·Σ(g·x̂)/N,  k = -r·Σg/N   (RMSNorm: mean = 0, no Σg term).
// Σ(g·x̂) = r·S with S = Σg·(x - mean) = Σg·(x - center) - Σg·(mean - center).
// Every coefficient is of the size of r·g: nothing under- or overflows in float
// that dx itself would not (r³ could, for rows of values near 1e20).
void row_backward(const Backward<float>& p, int64_t r, double* dgamma, double* dbeta) {
  const float* x = p.x + r * p.x_stride;
  const float* dy = p.dy + r * p.dy_stride;
  const bool centred = p.centering == Centering::layer;
  const double mean = centred ? p.mean[r] : 0.0, invstd = p.invstd[r];
  const RowCoefficients rc = row_coefficients(mean, invstd);
  // All reads of x and dy before dx is written: dx may be x or dy.
  const GradientSums gs =
      backward_sums(x, dy, p.gamma, p.cols, rc, p.dx != nullptr, dgamma, dbeta);
  if (!p.dx) return;
  const double n = static_cast<double>(p.cols);
  const double sum_g = centred ? gs.sum_g : 0.0;
  const double sum_g_xhat =
      invstd * (gs.sum_g_xc - gs.sum_g * (mean - static_cast<double>(rc.center)));
  dx_row(x, dy, p.dx + r * p.dx_stride, p.gamma, p.cols, rc,
         {static_cast<float>(invstd), static_cast<float>(-invstd * sum_g_xhat / n),
          static_cast<float>(-invstd * sum_g / n)});
}

// out[j] = Σ_s part[s·stride + j], s in increasing order for every column (the
// loop over columns is the inner one, so it vectorizes without reordering a sum).
constexpr int64_t kMergeColumns = 1024;
NORMKIT_SIMD_CLONES
void merge_stripes(const double* __restrict part, int64_t stride, int64_t stripes, int64_t width,
                   double* __restrict out) {
  std::copy(part, part + width, out);
  for (int64_t s = 1; s < stripes; ++s)
    for (int64_t j = 0; j < width; ++j) out[j] += part[s * stride + j];
}

// The first 4 KB of the next row (x, and y to be written, unless y is
// streamed) requested while this row is computed, so that the next row's first
// pass does not start by waiting on memory. Measured on 8192×768: the forward
// 6-7% faster at 1 and 2 threads; requesting only its first 4 or 16 lines
// gained nothing, nor did the same for the backward.
constexpr int64_t kNextRowFloats = 1024;  // not leaf::kPrefetchFloats: a row start, not a distance
void prefetch_row(int64_t cols, const float* x, float* y) {
  const int64_t n = std::min(cols, kNextRowFloats);
  for (int64_t j = 0; j < n; j += leaf::kLineFloats) {
    __builtin_prefetch(x + j);
    if (y) __builtin_prefetch(y + j, 1);
  }
}

void rows_forward(const Forward<float>& p) {
  // y streamed past the threads' L2, a row at a time (rows too short to
  // stream, or too long for the buffer, are written in place). 8192×768, × a
  // copy, alternated, 1 and 2 threads: forward 1.16-1.19 -> 1.09-1.13. The
  // backward's dx streamed as well measured 1.94-2.03 -> 2.04-2.06: it is
  // written in place.
  const int threads = threads_for(p.rows * p.cols);
  const bool stream = cpu::streams<1>(cpu::stream_output(p.rows * p.cols, threads),
                                      {{{p.y, p.cols}}}, 1, p.cols);
  parallel_for(threads, p.rows, [&](int64_t r) {
    if (r + 1 < p.rows)
      prefetch_row(p.cols, p.x + (r + 1) * p.x_stride,
                   stream ? nullptr : p.y + (r + 1) * p.y_stride);
    forward_row(p, r, stream);
  });
}

void rows_backward(const Backward<float>& p) {
  // Twice the data of forward: x and dy.
  const int threads = threads_for(2 * p.rows * p.cols);
  const bool sums = p.dgamma || p.dbeta;
  if (!sums) {
    parallel_for(threads, p.rows, [&](int64_t r) { row_backward(p, r, nullptr, nullptr); });
    return;
  }
  // Stripes depend on rows and cols only.
  const int64_t stripes =
      std::clamp<int64_t>(std::min(p.rows, kMaxStripes), 1,
                          std::max<int64_t>(1, kMaxPartials / p.cols));
  const int64_t cols = p.cols;
  const size_t per_array = static_cast<size_t>(stripes * cols);
  leaf::Workspace ws;
  double* const buffer = ws.take<double>(2 * per_array).data();
  double* const part_gamma = p.dgamma ? buffer : nullptr;
  double* const part_beta = p.dbeta ? buffer + per_array : nullptr;
  const int64_t column_blocks = (cols + kMergeColumns - 1) / kMergeColumns;
  parallel_region(threads, [&] {
#pragma omp for schedule(static)
    for (int64_t s = 0; s < stripes; ++s) {
      const int64_t first = s * p.rows / stripes, last = (s + 1) * p.rows / stripes;
      for (int64_t r = first; r < last; ++r)
        row_backward(p, r, part_gamma ? part_gamma + s * cols : nullptr,
                     part_beta ? part_beta + s * cols : nullptr);
    }
#pragma omp for schedule(static)
    for (int64_t block = 0; block < column_blocks; ++block) {
      const int64_t j0 = block * kMergeColumns, width = std::min(kMergeColumns, cols - j0);
      if (part_gamma) merge_stripes(part_gamma + j0, cols, stripes, width, p.dgamma + j0);
      if (part_beta) merge_stripes(part_beta + j0, cols, stripes, width, p.dbeta + j0);
    }
  });
}

// Every checked problem: rows of any stride.
const char* rows_decline(int64_t, int64_t) { return nullptr; }

}  // namespace

extern const Impl kRows = {"rows", rows_decline, rows_forward, rows_backward};

}  // namespace normkit::kernels::ln
