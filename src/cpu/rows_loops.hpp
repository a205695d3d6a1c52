#pragma once
// The rows form's statistics and gradient-sum loops over one chunk of rows
// (channels contiguous), shared by batch_norm_rows.cpp and
// batch_norm_fused_rows.cpp: BN+ReLU's moments and sums are BN's bit for bit,
// which the engine relies on (it fuses "batchnorm; relu", and synchronized BN
// and probes run the layers unfused). Internal linkage, as leaf_loops.hpp
// explains.
#include <algorithm>
#include <cstdint>

#include "cpu/leaf_loops.hpp"

namespace normkit::kernels::cpu {
namespace {

// Rows kernels walk channels in blocks of kRowBlock: a block's accumulators
// and coefficients stay in registers (rather than being loaded and stored for
// every row), and its part of a chunk (at most 64 rows × 64 floats = 16 KB)
// stays in L1 between passes. Every channel still adds its rows in row order,
// so blocking changes no result; channels past the last whole block take the
// plain loops. Only short rows are blocked: with long ones (1024 channels and
// more) a block is a narrow strided column of the chunk, which the hardware
// prefetchers follow worse than whole rows, and whose rows, 4 KB or more apart,
// compete for the same few L1 sets.
constexpr int64_t kRowBlock = 64;
constexpr int64_t kMaxBlockedChannels = 256;
constexpr int64_t kColumnBlock = 256;
constexpr int64_t kRowGroup = 4;
[[maybe_unused]] inline int64_t blocked_channels(int64_t channels) {
  return channels <= kMaxBlockedChannels ? channels / kRowBlock * kRowBlock : 0;
}

// Per-channel moments of one chunk (at most kMaxChunkRows rows): the same two
// passes as planes, vectorized across channels: the chunk's mean shifted by its
// first row, then corrected sums around it.
[[maybe_unused]] NORMKIT_SIMD_CLONES
void rows_chunk_moments(const float* __restrict x, int64_t stride, int64_t rows,
                        int64_t channels, int64_t blocked, float* __restrict sum,
                        float* __restrict center, float* __restrict sum_d2,
                        double* __restrict mean, double* __restrict m2) {
  const double n = static_cast<double>(rows);
  int64_t c0 = 0;
  for (; c0 < blocked; c0 += kRowBlock)
    leaf::rows_block_moments<kRowBlock>(x + c0, stride, rows, mean + c0, m2 + c0, nullptr, 0);
  // Long rows: columns of kColumnBlock channels, so that the sums stay in L1
  // and a column of the chunk in L2 between the passes; kRowGroup rows at a
  // time, added one after the other, so a sum is loaded and stored once per group.
  for (int64_t b0 = c0; b0 < channels; b0 += kColumnBlock) {
    const int64_t b1 = std::min(channels, b0 + kColumnBlock);
    std::fill(sum + b0, sum + b1, 0.0f);
    for (int64_t r = 0; r < rows; r += kRowGroup) {
      const float* xp = x + r * stride;
      const int64_t group = std::min(kRowGroup, rows - r);
      if (group == kRowGroup) {
        for (int64_t c = b0; c < b1; ++c) {
          float a = sum[c];
          for (int j = 0; j < kRowGroup; ++j) a += xp[j * stride + c] - x[c];
          sum[c] = a;
        }
      } else {
        for (int64_t j = 0; j < group; ++j)
          for (int64_t c = b0; c < b1; ++c) sum[c] += xp[j * stride + c] - x[c];
      }
    }
    for (int64_t c = b0; c < b1; ++c)
      center[c] = static_cast<float>(static_cast<double>(x[c]) + static_cast<double>(sum[c]) / n);
    std::fill(sum + b0, sum + b1, 0.0f);
    std::fill(sum_d2 + b0, sum_d2 + b1, 0.0f);
    for (int64_t r = 0; r < rows; r += kRowGroup) {
      const float* xp = x + r * stride;
      const int64_t group = std::min(kRowGroup, rows - r);
      if (group == kRowGroup) {
        for (int64_t c = b0; c < b1; ++c) {
          float a1 = sum[c], a2 = sum_d2[c];
          for (int j = 0; j < kRowGroup; ++j) {
            const float d = xp[j * stride + c] - center[c];
            a1 += d;
            a2 += d * d;
          }
          sum[c] = a1;
          sum_d2[c] = a2;
        }
      } else {
        for (int64_t j = 0; j < group; ++j)
          for (int64_t c = b0; c < b1; ++c) {
            const float d = xp[j * stride + c] - center[c];
            sum[c] += d;
            sum_d2[c] += d * d;
          }
      }
    }
    for (int64_t c = b0; c < b1; ++c) {
      const double sd = sum[c];
      mean[c] = center[c] + sd / n;
      m2[c] = sum_d2[c] - sd * sd / n;
    }
  }
}

// The blocked part of rows_gradient_sums_chunk (below): channels [0, blocked)
// in blocks of kRowBlock, g from a leaf::GradientSource (row r's bits start at
// bit_first + r·bit_stride), so that the fused kernel's masked sums add
// exactly BN's values in BN's order. Returns the first channel not summed.
template <bool Masked>
[[gnu::always_inline]] inline int64_t rows_gradient_sums_blocks(
    const float* __restrict x, int64_t x_stride, const leaf::GradientSource& src, int64_t rows,
    int64_t blocked, const float* __restrict center, double* __restrict sum_dy,
    double* __restrict sum_dy_xc) {
  int64_t c0 = 0;
  for (; c0 < blocked; c0 += kRowBlock) {
    double s1[kRowBlock], s2[kRowBlock], ctr[kRowBlock];
    for (int l = 0; l < kRowBlock; ++l) {
      s1[l] = sum_dy[c0 + l];
      s2[l] = sum_dy_xc[c0 + l];
      ctr[l] = center[c0 + l];
    }
    for (int64_t r = 0; r < rows; ++r) {
      const float* xp = x + r * x_stride + c0;
      const float* gp = src.dy + r * src.stride + c0;
      const auto add = [&](int l, double gl) {
        s1[l] += gl;
        s2[l] += gl * (static_cast<double>(xp[l]) - ctr[l]);
      };
      if constexpr (Masked) {
        float g[kRowBlock];
        for (int h = 0; h < kRowBlock / 32; ++h) {
          const uint32_t m =
              leaf::mask_bits(src.mask, src.bit_first + r * src.bit_stride + c0 + 32 * h, 32);
          for (int l = 0; l < 32; ++l) g[32 * h + l] = leaf::lane_gradient<true>(gp + 32 * h, m, l);
        }
        for (int l = 0; l < kRowBlock; ++l) add(l, g[l]);
      } else {
        for (int l = 0; l < kRowBlock; ++l) add(l, gp[l]);
      }
    }
    for (int l = 0; l < kRowBlock; ++l) {
      sum_dy[c0 + l] = s1[l];
      sum_dy_xc[c0 + l] = s2[l];
    }
  }
  return c0;
}

// rows_gradient_sums_blocks with g = mask ? dy : 0, for channels that are all
// in blocks (blocked_channels(C) == C).
[[maybe_unused]] NORMKIT_SIMD_CLONES
void rows_gradient_sums_masked_chunk(const float* __restrict x, int64_t x_stride,
                                     const leaf::GradientSource& src, int64_t rows,
                                     int64_t channels, const float* __restrict center,
                                     double* __restrict sum_dy, double* __restrict sum_dy_xc) {
  rows_gradient_sums_blocks<true>(x, x_stride, src, rows, channels, center, sum_dy, sum_dy_xc);
}

// Σdy and Σdy·(x - mean) of one chunk per channel, added to a stripe's double
// sums (double: dy is not centred, so the second sum cancels heavily).
[[maybe_unused]] NORMKIT_SIMD_CLONES
void rows_gradient_sums_chunk(const float* __restrict x, int64_t x_stride,
                              const float* __restrict dy, int64_t dy_stride, int64_t rows,
                              int64_t channels, int64_t blocked, const float* __restrict center,
                              double* __restrict sum_dy, double* __restrict sum_dy_xc) {
  const int64_t c0 = rows_gradient_sums_blocks<false>(x, x_stride, {dy, dy_stride}, rows, blocked,
                                                      center, sum_dy, sum_dy_xc);
  // Long rows: the sums stay in L1; kRowGroup rows at a time, one after the other.
  for (int64_t b0 = c0; b0 < channels; b0 += kColumnBlock) {
    const int64_t b1 = std::min(channels, b0 + kColumnBlock);
    for (int64_t r = 0; r < rows; r += kRowGroup) {
      const float* xp = x + r * x_stride;
      const float* gp = dy + r * dy_stride;
      const int64_t group = std::min(kRowGroup, rows - r);
      if (group == kRowGroup) {
        for (int64_t c = b0; c < b1; ++c) {
          const double ctr = center[c];
          double s1 = sum_dy[c], s2 = sum_dy_xc[c];
          for (int j = 0; j < kRowGroup; ++j) {
            const double g = gp[j * dy_stride + c];
            s1 += g;
            s2 += g * (static_cast<double>(xp[j * x_stride + c]) - ctr);
          }
          sum_dy[c] = s1;
          sum_dy_xc[c] = s2;
        }
      } else {
        for (int64_t j = 0; j < group; ++j)
          for (int64_t c = b0; c < b1; ++c) {
            const double g = gp[j * dy_stride + c];
            sum_dy[c] += g;
            sum_dy_xc[c] +=
                g * (static_cast<double>(xp[j * x_stride + c]) - static_cast<double>(center[c]));
          }
      }
    }
  }
}

// Moments per channel over all rows: chunks merged in order within each
// stripe, stripes merged in order (in blocks of channels, one block per task).
// Runs inside a parallel region (orphaned omp for); each merged block of
// channels is handed to on_block(c0, width, count, mean, m2) by the thread that
// merged it, mean and m2 pointing at channel c0.
template <class Geometry, class OnBlock>
void rows_moments_phase(const Geometry& g, const float* x, double* stripe_mean, double* stripe_m2,
                        double* stripe_count, OnBlock on_block) {
  const leaf::RowPlan plan(g);
  const int64_t C = plan.channels;
  constexpr int64_t kChannelBlock = 256;
  const int64_t blocks = (C + kChannelBlock - 1) / kChannelBlock;
  float* const sums = leaf::scratch<float>(3, 3 * C);
  double* const chunk_mean = leaf::scratch<double>(4, C);
  double* const chunk_m2 = leaf::scratch<double>(5, C);
#pragma omp for schedule(static)
  for (int64_t s = 0; s < plan.stripes; ++s) {
    double count = 0;
    for (int64_t k = plan.first_chunk(s); k < plan.first_chunk(s + 1); ++k) {
      const int64_t n = plan.rows_in(k);
      rows_chunk_moments(x + plan.first_row(k) * g.outer_stride, g.outer_stride, n, C,
                         blocked_channels(C), sums, sums + C, sums + 2 * C, chunk_mean, chunk_m2);
      leaf::merge_moment_arrays(count, stripe_mean + s * C, stripe_m2 + s * C,
                          static_cast<double>(n), chunk_mean, chunk_m2, C);
      count += static_cast<double>(n);
    }
    stripe_count[s] = count;
  }
#pragma omp for schedule(static)
  for (int64_t block = 0; block < blocks; ++block) {
    const int64_t c0 = block * kChannelBlock, width = std::min(kChannelBlock, C - c0);
    double count = stripe_count[0];
    for (int64_t s = 1; s < plan.stripes; ++s) {
      leaf::merge_moment_arrays(count, stripe_mean + c0, stripe_m2 + c0, stripe_count[s],
                          stripe_mean + s * C + c0, stripe_m2 + s * C + c0, width);
      count += stripe_count[s];
    }
    on_block(c0, width, count, stripe_mean + c0, stripe_m2 + c0);
  }
}

// rows_moments_phase over every block, into out (its own parallel region).
template <class Geometry>
void rows_moments_into(const Geometry& g, const float* x, Moments* out, int threads) {
  const leaf::RowPlan plan(g);
  double* const stripe_mean = leaf::scratch<double>(0, plan.stripes * plan.channels);
  double* const stripe_m2 = leaf::scratch<double>(1, plan.stripes * plan.channels);
  double* const stripe_count = leaf::scratch<double>(2, plan.stripes);
#pragma omp parallel num_threads(threads)
  rows_moments_phase(g, x, stripe_mean, stripe_m2, stripe_count,
                     [&](int64_t c0, int64_t width, double count, const double* mean,
                         const double* m2) {
                       for (int64_t c = 0; c < width; ++c) out[c0 + c] = {count, mean[c], m2[c]};
                     });
}

}  // namespace
}  // namespace normkit::kernels::cpu
