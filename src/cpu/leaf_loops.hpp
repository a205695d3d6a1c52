#pragma once
// Leaf loops and small helpers shared by the fast CPU kernels (batch norm,
// fused BN+ReLU, group norm, layer norm): the statistics passes over runs of
// contiguous floats, and the per-thread scratch and plans they share.
//
// Everything here has internal linkage (an unnamed namespace), so every kernel
// file that includes it compiles its own copy with its own target_clones
// resolver: no clone or resolver is shared between translation units, and a
// file's compile options apply to its copy.
// Functions are [[maybe_unused]] because not every file uses every loop.
//
// SIMD: the loops are written over fixed lanes, so the compiler vectorizes them
// without reassociating any sum, and NORMKIT_SIMD_CLONES compiles them for
// x86-64-v4 (AVX-512), x86-64-v3 (AVX2+FMA) and baseline x86-64 with a choice
// at run time. The order of additions is fixed by the source, but the v3/v4
// clones may contract a·b + c into one FMA (one rounding instead of two), which
// the baseline clone cannot: results are bitwise identical for any thread count
// on one machine, and may differ in the last bits between machines that run
// different clones.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "core/simd_clones.hpp"
#include "normkit/moments.hpp"

namespace normkit::kernels::leaf {
namespace {

// Float sums run over 64 fixed lanes (4 AVX-512 or 8 AVX2 registers: enough
// independent additions to hide their latency), a run's remainder through 8
// more lanes, then one by one; lane totals are added in double. Sums whose
// terms cancel (gradients) run in 32 double lanes.
constexpr int kLanes = 64;
constexpr int kTailLanes = 8;
constexpr int kDoubleLanes = 32;

// Σ of N lanes as a fixed binary tree, in double.
template <int N, class A>
inline double lane_total(const A* acc) {
  if constexpr (N == 1) {
    return static_cast<double>(acc[0]);
  } else {
    return lane_total<N / 2>(acc) + lane_total<N / 2>(acc + N / 2);
  }
}

// Per-thread scratch that outlives a call: a fresh large vector per call is
// fresh pages from the kernel, whose faults cost more than a small problem.
// Each thread (and each including file) has its own, so a call's slot must not
// be used by a callee or by another thread; `slot` tells a call's buffers apart.
template <class T>
T* scratch(int slot, size_t count) {
  thread_local std::vector<T> buffers[8];
  auto& buffer = buffers[slot];
  if (buffer.size() < count) buffer.resize(count);
  return buffer.data();
}

[[maybe_unused]] double param_or(const float* p, int64_t c, double fallback) {
  return p ? static_cast<double>(p[c]) : fallback;
}

// Whole units (channels, blocks) per thread, each unit's statistics then its
// apply while it is in cache, pays off when the units alone keep every thread
// busy; otherwise the units' pieces are spread over the threads in phases.
[[maybe_unused]] bool whole_units_per_thread(int64_t units, int threads) {
  return units % threads == 0 || units >= 8 * threads;
}

// ----- leaf loops over `runs` runs of `len` contiguous floats, `stride` apart -----

// Σ(x - shift): the shift (a value of the data) keeps the float sums small
// when the mean is large compared with the spread.
[[maybe_unused]] NORMKIT_SIMD_CLONES
double shifted_sum_runs(const float* __restrict x, int64_t runs, int64_t len, int64_t stride,
                        float shift) {
  float acc[kLanes] = {}, acc8[kTailLanes] = {};
  double tail = 0;
  for (int64_t r = 0; r < runs; ++r) {
    const float* p = x + r * stride;
    int64_t i = 0;
    for (; i + kLanes <= len; i += kLanes)
      for (int l = 0; l < kLanes; ++l) acc[l] += p[i + l] - shift;
    for (; i + kTailLanes <= len; i += kTailLanes)
      for (int l = 0; l < kTailLanes; ++l) acc8[l] += p[i + l] - shift;
    for (; i < len; ++i) tail += static_cast<double>(p[i] - shift);
  }
  return lane_total<kLanes>(acc) + lane_total<kTailLanes>(acc8) + tail;
}

// Σd and Σd² with d = x - center; Σd (near 0) corrects Σd² for the distance
// between center and the exact mean (the "corrected two-pass" algorithm).
struct CenteredSums {
  double sum_d, sum_d2;
};
[[maybe_unused]] NORMKIT_SIMD_CLONES
CenteredSums centered_sums_runs(const float* x, int64_t runs, int64_t len, int64_t stride,
                                float center) {
  float acc1[kLanes] = {}, acc2[kLanes] = {}, acc1_8[kTailLanes] = {}, acc2_8[kTailLanes] = {};
  double tail1 = 0, tail2 = 0;
  for (int64_t r = 0; r < runs; ++r) {
    const float* p = x + r * stride;
    int64_t i = 0;
    for (; i + kLanes <= len; i += kLanes)
      for (int l = 0; l < kLanes; ++l) {
        const float d = p[i + l] - center;
        acc1[l] += d;
        acc2[l] += d * d;
      }
    for (; i + kTailLanes <= len; i += kTailLanes)
      for (int l = 0; l < kTailLanes; ++l) {
        const float d = p[i + l] - center;
        acc1_8[l] += d;
        acc2_8[l] += d * d;
      }
    for (; i < len; ++i) {
      const double d = static_cast<double>(p[i] - center);
      tail1 += d;
      tail2 += d * d;
    }
  }
  return {lane_total<kLanes>(acc1) + lane_total<kTailLanes>(acc1_8) + tail1,
          lane_total<kLanes>(acc2) + lane_total<kTailLanes>(acc2_8) + tail2};
}

// The moments of `runs` runs of `len` floats, two passes while they are in
// cache: their mean shifted by their first value, then the corrected sums of
// squares around that mean (rounded to float) in float lanes.
[[maybe_unused]] Moments run_moments(const float* x, int64_t runs, int64_t len, int64_t stride) {
  const double n = static_cast<double>(runs * len);
  const float shift = x[0];
  const double mean = shift + shifted_sum_runs(x, runs, len, stride, shift) / n;
  const auto center = static_cast<float>(mean);
  const CenteredSums cs = centered_sums_runs(x, runs, len, stride, center);
  return {n, center + cs.sum_d / n, cs.sum_d2 - cs.sum_d * cs.sum_d / n};
}

// Σg and Σg·(x - center) of one run, in double lanes: the gradient g is not
// centred, so the second sum cancels heavily.
struct GradientSums {
  double sum_g, sum_g_xc;
};
[[maybe_unused]] NORMKIT_SIMD_CLONES
GradientSums gradient_sums_run(const float* __restrict x, const float* __restrict g, int64_t len,
                               float center) {
  const double center_d = center;
  double acc1[kDoubleLanes] = {}, acc2[kDoubleLanes] = {};
  double tail1 = 0, tail2 = 0;
  int64_t i = 0;
  for (; i + kDoubleLanes <= len; i += kDoubleLanes)
    for (int l = 0; l < kDoubleLanes; ++l) {
      const double gv = g[i + l];
      acc1[l] += gv;
      acc2[l] += gv * (static_cast<double>(x[i + l]) - center_d);
    }
  for (; i < len; ++i) {
    const double gv = g[i];
    tail1 += gv;
    tail2 += gv * (static_cast<double>(x[i]) - center_d);
  }
  return {lane_total<kDoubleLanes>(acc1) + tail1, lane_total<kDoubleLanes>(acc2) + tail2};
}

// ----- batch norm's plans (batch_norm_{planes,rows}.cpp, batch_norm_fused_{planes,rows}.cpp) -----

// A planes piece: small enough that its second pass reads from L1.
constexpr int64_t kPieceElements = 4096;
// A rows chunk: at most this many elements and kMaxChunkRows rows (the number
// of float additions per channel accumulator).
constexpr int64_t kRowChunkElements = 65536;
constexpr int64_t kMaxChunkRows = 64;
// Rows chunks are grouped into this many stripes, each merged in order.
constexpr int64_t kMaxStripes = 32;

// Planes ([outer, C, inner], inner contiguous): a channel's elements split
// into pieces, either groups of whole inner runs, or (for long runs)
// fixed-length parts of one run. Depends only on the geometry.
struct Pieces {
  int64_t per_channel;
  int64_t runs_per_piece;  // grouping mode: whole runs per piece
  int64_t parts_per_run;   // splitting mode: parts per run (1 in grouping mode)

  template <class Geometry>
  explicit Pieces(const Geometry& g) {
    if (g.inner >= kPieceElements) {
      runs_per_piece = 1;
      parts_per_run = (g.inner + kPieceElements - 1) / kPieceElements;
      per_channel = g.outer * parts_per_run;
    } else {
      runs_per_piece = std::max<int64_t>(1, kPieceElements / std::max<int64_t>(g.inner, 1));
      parts_per_run = 1;
      per_channel = (g.outer + runs_per_piece - 1) / runs_per_piece;
    }
  }
  struct Span {
    int64_t first_run, runs, first_inner, len;
  };
  template <class Geometry>
  Span span(const Geometry& g, int64_t piece) const {
    if (parts_per_run > 1) {
      const int64_t first_inner = (piece % parts_per_run) * kPieceElements;
      return {piece / parts_per_run, 1, first_inner, std::min(kPieceElements, g.inner - first_inner)};
    }
    const int64_t first_run = piece * runs_per_piece;
    return {first_run, std::min(runs_per_piece, g.outer - first_run), 0, g.inner};
  }
};

// Rows ([rows, C], channels contiguous): rows cut into chunks of a fixed
// number of rows, and chunks into at most kMaxStripes stripes; both depend only
// on the geometry.
struct RowPlan {
  int64_t rows, channels, chunk_rows, chunks, stripes;
  template <class Geometry>
  explicit RowPlan(const Geometry& g) : rows(g.outer), channels(g.channels) {
    chunk_rows = std::clamp<int64_t>(kRowChunkElements / std::max<int64_t>(channels, 1), 1,
                                     std::min(rows, kMaxChunkRows));
    chunks = (rows + chunk_rows - 1) / chunk_rows;
    stripes = std::min(chunks, kMaxStripes);
  }
  int64_t first_chunk(int64_t stripe) const { return stripe * chunks / stripes; }
  int64_t first_row(int64_t chunk) const { return chunk * chunk_rows; }
  int64_t rows_in(int64_t chunk) const { return std::min(chunk_rows, rows - chunk * chunk_rows); }
};

// Chan's merge of (count_b, mean_b[c], m2_b[c]) into (count_a, mean_a[c],
// m2_a[c]) for every channel: Moments::merge, vectorized across channels
// (every channel of a rows chunk has seen the same number of rows).
[[maybe_unused]] NORMKIT_SIMD_CLONES
void merge_moment_arrays(double count_a, double* __restrict mean_a, double* __restrict m2_a,
                         double count_b, const double* __restrict mean_b,
                         const double* __restrict m2_b, int64_t channels) {
  if (count_a == 0) {
    std::copy(mean_b, mean_b + channels, mean_a);
    std::copy(m2_b, m2_b + channels, m2_a);
    return;
  }
  const double weight = count_b / (count_a + count_b);
  for (int64_t c = 0; c < channels; ++c) {
    const double delta = mean_b[c] - mean_a[c];
    mean_a[c] += delta * weight;
    m2_a[c] += m2_b[c] + delta * delta * count_a * weight;
  }
}

}  // namespace
}  // namespace normkit::kernels::leaf
