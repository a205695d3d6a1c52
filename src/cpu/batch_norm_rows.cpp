// Fast batch normalization, rows form: contiguous channels, one row of C
// values per position (NLC, NHWC, NDHWC, NC, and PyTorch's channels_last
// tensors). The rules every fast kernel keeps (determinism, SIMD clones,
// internal linkage) are in src/cpu/README.md; the accuracy scheme is the
// planes form's (batch_norm_planes.cpp), over chunks of rows instead of pieces.
#include <omp.h>
#include <xmmintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "core/parallel.hpp"
#include "cpu/coefficients.hpp"
#include "cpu/implementations.hpp"
#include "cpu/leaf_loops.hpp"
#include "cpu/streaming.hpp"
#include "kernels/batch_norm.hpp"

namespace normkit::kernels::bn {
namespace {

using cpu::ApplyCoefficients;
using cpu::apply_coefficients;
using cpu::BackwardCoefficients;
using cpu::backward_coefficients;
using cpu::finish_channel;
using cpu::stream_apply;
using cpu::stream_backward;
using cpu::streaming_output;
using detail::threads_for;
using leaf::merge_moment_arrays;
using leaf::param_or;
using leaf::RowPlan;
using leaf::scratch;

// ================= rows: [rows, C], channels contiguous =================

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
inline int64_t blocked_channels(int64_t channels) {
  return channels <= kMaxBlockedChannels ? channels / kRowBlock * kRowBlock : 0;
}

// Per-channel moments of one chunk (at most kMaxChunkRows rows): the same two
// passes as planes, vectorized across channels: the chunk's mean shifted by its
// first row, then corrected sums around it.
NORMKIT_SIMD_CLONES
void rows_chunk_moments(const float* __restrict x, int64_t stride, int64_t rows,
                        int64_t channels, float* __restrict sum, float* __restrict center,
                        float* __restrict sum_d2, double* __restrict mean,
                        double* __restrict m2) {
  const double n = static_cast<double>(rows);
  const int64_t blocked = blocked_channels(channels);
  int64_t c0 = 0;
  for (; c0 < blocked; c0 += kRowBlock) {
    const float* __restrict xb = x + c0;
    float s[kRowBlock] = {}, ctr[kRowBlock], s1[kRowBlock] = {}, s2[kRowBlock] = {};
    for (int64_t r = 0; r < rows; ++r)
      for (int l = 0; l < kRowBlock; ++l) s[l] += xb[r * stride + l] - xb[l];
    for (int l = 0; l < kRowBlock; ++l)
      ctr[l] = static_cast<float>(static_cast<double>(xb[l]) + static_cast<double>(s[l]) / n);
    for (int64_t r = 0; r < rows; ++r)
      for (int l = 0; l < kRowBlock; ++l) {
        const float d = xb[r * stride + l] - ctr[l];
        s1[l] += d;
        s2[l] += d * d;
      }
    for (int l = 0; l < kRowBlock; ++l) {
      const double sd = s1[l];
      mean[c0 + l] = ctr[l] + sd / n;
      m2[c0 + l] = s2[l] - sd * sd / n;
    }
  }
  // Long rows: columns of kColumnBlock channels, so that the sums stay in L1
  // and a column of the chunk in L2 between the passes.
  for (int64_t b0 = c0; b0 < channels; b0 += kColumnBlock) {
    const int64_t b1 = std::min(channels, b0 + kColumnBlock);
    std::fill(sum + b0, sum + b1, 0.0f);
    for (int64_t r = 0; r < rows; ++r) {
      const float* xp = x + r * stride;
      for (int64_t c = b0; c < b1; ++c) sum[c] += xp[c] - x[c];
    }
    for (int64_t c = b0; c < b1; ++c)
      center[c] = static_cast<float>(static_cast<double>(x[c]) + static_cast<double>(sum[c]) / n);
    std::fill(sum + b0, sum + b1, 0.0f);
    std::fill(sum_d2 + b0, sum_d2 + b1, 0.0f);
    for (int64_t r = 0; r < rows; ++r) {
      const float* xp = x + r * stride;
      for (int64_t c = b0; c < b1; ++c) {
        const float d = xp[c] - center[c];
        sum[c] += d;
        sum_d2[c] += d * d;
      }
    }
    for (int64_t c = b0; c < b1; ++c) {
      const double sd = sum[c];
      mean[c] = center[c] + sd / n;
      m2[c] = sum_d2[c] - sd * sd / n;
    }
  }
}

// Per-channel apply coefficients (apply_coefficients) for a block of channels
// from merged moments, as arrays, in a loop the compiler vectorizes: with
// thousands of channels and few rows (32×4096), scalar square roots and
// divisions per channel cost as much as the data passes. (This file is built
// with -fno-math-errno, without which the square root does not vectorize.)
NORMKIT_SIMD_CLONES
void coefficient_arrays(int64_t channels, double count, const double* __restrict mean,
                        const double* __restrict m2, const float* __restrict gamma,
                        const float* __restrict beta, double eps, float* __restrict mean_hi,
                        float* __restrict scale, float* __restrict shift) {
  for (int64_t c = 0; c < channels; ++c) {
    const double invstd = 1.0 / std::sqrt(m2[c] / count + eps);
    const float hi = static_cast<float>(mean[c]);
    const double sc = (gamma ? static_cast<double>(gamma[c]) : 1.0) * invstd;
    mean_hi[c] = hi;
    scale[c] = static_cast<float>(sc);
    shift[c] = static_cast<float>((beta ? static_cast<double>(beta[c]) : 0.0) -
                                  (mean[c] - static_cast<double>(hi)) * sc);
  }
}

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

NORMKIT_SIMD_CLONES
void rows_apply_chunk(const float* x, int64_t x_stride, float* y,
                      int64_t y_stride, int64_t rows, int64_t channels,
                      const float* __restrict mean_hi, const float* __restrict scale,
                      const float* __restrict shift, bool stream) {
  if (stream) {
    for (int64_t r = 0; r < rows; ++r)
      stream_apply(x + r * x_stride, y + r * y_stride, channels, mean_hi, scale, shift, 1);
    _mm_sfence();
    return;
  }
  const int64_t blocked = blocked_channels(channels);
  int64_t c0 = 0;
  for (; c0 < blocked; c0 += kRowBlock) {
    float m[kRowBlock], sc[kRowBlock], t[kRowBlock];
    for (int l = 0; l < kRowBlock; ++l) {
      m[l] = mean_hi[c0 + l];
      sc[l] = scale[c0 + l];
      t[l] = shift[c0 + l];
    }
    for (int64_t r = 0; r < rows; ++r) {
      const float* xp = x + r * x_stride + c0;
      float* yp = y + r * y_stride + c0;
      for (int l = 0; l < kRowBlock; ++l) yp[l] = (xp[l] - m[l]) * sc[l] + t[l];
    }
  }
  for (int64_t r = 0; r < rows && c0 < channels; ++r) {
    const float* xp = x + r * x_stride;
    float* yp = y + r * y_stride;
    for (int64_t c = c0; c < channels; ++c) yp[c] = (xp[c] - mean_hi[c]) * scale[c] + shift[c];
  }
}

// The apply over every chunk; inside a parallel region (an orphaned omp for).
void rows_apply_phase(const Geometry& gx, const Geometry& gy, const float* x, float* y,
                      const RowCoefficients& k) {
  const RowPlan plan(gx);
  const bool stream = streaming_output(gy, y, x);
#pragma omp for schedule(static)
  for (int64_t chunk = 0; chunk < plan.chunks; ++chunk) {
    const int64_t r0 = plan.first_row(chunk);
    rows_apply_chunk(x + r0 * gx.outer_stride, gx.outer_stride, y + r0 * gy.outer_stride,
                     gy.outer_stride, plan.rows_in(chunk), plan.channels, k.mean_hi, k.scale,
                     k.shift, stream);
  }
}

// Moments per channel over all rows: chunks merged in order within each
// stripe, stripes merged in order (in blocks of channels, one block per task).
// Runs inside a parallel region (orphaned omp for); each merged block of
// channels is handed to on_block(c0, width, count, mean, m2) by the thread that
// merged it, mean and m2 pointing at channel c0.
template <class OnBlock>
void rows_moments_phase(const Geometry& g, const float* x, double* stripe_mean, double* stripe_m2,
                        double* stripe_count, OnBlock on_block) {
  const RowPlan plan(g);
  const int64_t C = plan.channels;
  constexpr int64_t kChannelBlock = 256;
  const int64_t blocks = (C + kChannelBlock - 1) / kChannelBlock;
  float* const sums = scratch<float>(3, 3 * C);
  double* const chunk_mean = scratch<double>(4, C);
  double* const chunk_m2 = scratch<double>(5, C);
#pragma omp for schedule(static)
  for (int64_t s = 0; s < plan.stripes; ++s) {
    double count = 0;
    for (int64_t k = plan.first_chunk(s); k < plan.first_chunk(s + 1); ++k) {
      const int64_t n = plan.rows_in(k);
      rows_chunk_moments(x + plan.first_row(k) * g.outer_stride, g.outer_stride, n, C, sums,
                         sums + C, sums + 2 * C, chunk_mean, chunk_m2);
      merge_moment_arrays(count, stripe_mean + s * C, stripe_m2 + s * C,
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
      merge_moment_arrays(count, stripe_mean + c0, stripe_m2 + c0, stripe_count[s],
                          stripe_mean + s * C + c0, stripe_m2 + s * C + c0, width);
      count += stripe_count[s];
    }
    on_block(c0, width, count, stripe_mean + c0, stripe_m2 + c0);
  }
}

void rows_moments_into(const Geometry& g, const float* x, Moments* out, int threads) {
  const RowPlan plan(g);
  double* const stripe_mean = scratch<double>(0, plan.stripes * plan.channels);
  double* const stripe_m2 = scratch<double>(1, plan.stripes * plan.channels);
  double* const stripe_count = scratch<double>(2, plan.stripes);
#pragma omp parallel num_threads(threads)
  rows_moments_phase(g, x, stripe_mean, stripe_m2, stripe_count,
                     [&](int64_t c0, int64_t width, double count, const double* mean,
                         const double* m2) {
                       for (int64_t c = 0; c < width; ++c) out[c0 + c] = {count, mean[c], m2[c]};
                     });
}

// Statistics, coefficients and apply in one parallel region: opening a region
// and waking threads costs microseconds, which small problems (256×1024) notice.
void rows_forward_training(const Forward<float>& p) {
  const Geometry& g = p.x_geom;
  const RowPlan plan(g);
  const int64_t C = plan.channels;
  const int threads = threads_for(C * g.outer);
  double* const stripe_mean = scratch<double>(0, plan.stripes * C);
  double* const stripe_m2 = scratch<double>(1, plan.stripes * C);
  double* const stripe_count = scratch<double>(2, plan.stripes);
  const RowCoefficients k(scratch<float>(6, 3 * C), C);
#pragma omp parallel num_threads(threads)
  {
    rows_moments_phase(g, p.x, stripe_mean, stripe_m2, stripe_count,
                       [&](int64_t c0, int64_t width, double count, const double* mean,
                           const double* m2) {
                         for (int64_t c = 0; c < width; ++c)
                           p.moments[c0 + c] = {count, mean[c], m2[c]};
                         coefficient_arrays(width, count, mean, m2, p.gamma ? p.gamma + c0 : nullptr,
                                            p.beta ? p.beta + c0 : nullptr, p.eps, k.mean_hi + c0,
                                            k.scale + c0, k.shift + c0);
                       });
    rows_apply_phase(g, p.y_geom, p.x, p.y, k);  // its omp for waits for the coefficients
  }
}

void rows_moments(const Geometry& g, const float* x, Moments* out) {
  rows_moments_into(g, x, out, threads_for(g.channels * g.outer));
}

void rows_apply(const Apply<float>& p) {
  const int64_t C = p.x_geom.channels;
  const RowCoefficients k(scratch<float>(6, 3 * C), C);
  for (int64_t c = 0; c < C; ++c)
    k.set(c, apply_coefficients(p.mean[c], p.invstd[c], param_or(p.gamma, c, 1.0),
                                param_or(p.beta, c, 0.0)));
#pragma omp parallel num_threads(threads_for(C * p.x_geom.outer))
  rows_apply_phase(p.x_geom, p.y_geom, p.x, p.y, k);
}

// Σdy and Σdy·(x - mean) of one chunk per channel, added to a stripe's double
// sums (double: dy is not centred, so the second sum cancels heavily).
NORMKIT_SIMD_CLONES
void rows_gradient_sums_chunk(const float* __restrict x, int64_t x_stride,
                              const float* __restrict dy, int64_t dy_stride, int64_t rows,
                              int64_t channels, const float* __restrict center,
                              double* __restrict sum_dy, double* __restrict sum_dy_xc) {
  const int64_t blocked = blocked_channels(channels);
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
      const float* gp = dy + r * dy_stride + c0;
      for (int l = 0; l < kRowBlock; ++l) {
        const double g = gp[l];
        s1[l] += g;
        s2[l] += g * (static_cast<double>(xp[l]) - ctr[l]);
      }
    }
    for (int l = 0; l < kRowBlock; ++l) {
      sum_dy[c0 + l] = s1[l];
      sum_dy_xc[c0 + l] = s2[l];
    }
  }
  for (int64_t b0 = c0; b0 < channels; b0 += kColumnBlock) {  // long rows: sums stay in L1
    const int64_t b1 = std::min(channels, b0 + kColumnBlock);
    for (int64_t r = 0; r < rows; ++r) {
      const float* xp = x + r * x_stride;
      const float* gp = dy + r * dy_stride;
      for (int64_t c = b0; c < b1; ++c) {
        const double g = gp[c];
        sum_dy[c] += g;
        sum_dy_xc[c] += g * (static_cast<double>(xp[c]) - static_cast<double>(center[c]));
      }
    }
  }
}

NORMKIT_SIMD_CLONES
void rows_backward_apply_chunk(const float* x, int64_t x_stride, const float* dy,
                               int64_t dy_stride, float* dx, int64_t dx_stride, int64_t rows,
                               int64_t channels, const float* mean_hi, const float* a,
                               const float* b, const float* k, bool stream) {
  if (stream) {
    for (int64_t r = 0; r < rows; ++r)
      stream_backward(x + r * x_stride, dy + r * dy_stride, dx + r * dx_stride, channels, mean_hi,
                      a, b, k, 1);
    _mm_sfence();
    return;
  }
  const int64_t blocked = blocked_channels(channels);
  int64_t c0 = 0;
  for (; c0 < blocked; c0 += kRowBlock) {
    float m[kRowBlock], av[kRowBlock], bv[kRowBlock], kv[kRowBlock];
    for (int l = 0; l < kRowBlock; ++l) {
      m[l] = mean_hi[c0 + l];
      av[l] = a[c0 + l];
      bv[l] = b[c0 + l];
      kv[l] = k[c0 + l];
    }
    for (int64_t r = 0; r < rows; ++r) {
      const float* xp = x + r * x_stride + c0;
      const float* gp = dy + r * dy_stride + c0;
      float* dp = dx + r * dx_stride + c0;
      for (int l = 0; l < kRowBlock; ++l) dp[l] = av[l] * gp[l] + bv[l] * (xp[l] - m[l]) + kv[l];
    }
  }
  for (int64_t r = 0; r < rows && c0 < channels; ++r) {
    const float* xp = x + r * x_stride;
    const float* gp = dy + r * dy_stride;
    float* dp = dx + r * dx_stride;
    for (int64_t c = c0; c < channels; ++c)
      dp[c] = a[c] * gp[c] + b[c] * (xp[c] - mean_hi[c]) + k[c];
  }
}

void rows_backward(const Backward<float>& p) {
  const Geometry& gx = p.x_geom;
  const RowPlan plan(gx);
  const int64_t C = plan.channels;
  const int threads = threads_for(2 * C * plan.rows);
  double* const stripe_dy = scratch<double>(0, plan.stripes * C);
  double* const stripe_dy_xmu = scratch<double>(1, plan.stripes * C);
  std::fill(stripe_dy, stripe_dy + plan.stripes * C, 0.0);
  std::fill(stripe_dy_xmu, stripe_dy_xmu + plan.stripes * C, 0.0);
  std::vector<float> mean_hi(C), a(C), b(C), k(C);
  std::vector<double> mean_error(C);  // mean - float(mean)
  for (int64_t c = 0; c < C; ++c) {
    mean_hi[c] = static_cast<float>(p.mean[c]);
    mean_error[c] = p.mean[c] - mean_hi[c];
  }
#pragma omp parallel num_threads(threads)
  {
#pragma omp for schedule(static)
    for (int64_t s = 0; s < plan.stripes; ++s)
      for (int64_t chunk = plan.first_chunk(s); chunk < plan.first_chunk(s + 1); ++chunk) {
        const int64_t r0 = plan.first_row(chunk);
        rows_gradient_sums_chunk(p.x + r0 * gx.outer_stride, gx.outer_stride,
                                 p.dy + r0 * p.dy_geom.outer_stride, p.dy_geom.outer_stride,
                                 plan.rows_in(chunk), C, mean_hi.data(), stripe_dy + s * C,
                                 stripe_dy_xmu + s * C);
      }
#pragma omp for schedule(static)
    for (int64_t c = 0; c < C; ++c) {
      double sum_dy = 0, sum_dy_xmu = 0;
      for (int64_t s = 0; s < plan.stripes; ++s) {
        sum_dy += stripe_dy[s * C + c];
        sum_dy_xmu += stripe_dy_xmu[s * C + c];
      }
      sum_dy_xmu -= sum_dy * mean_error[c];
      const BackwardCoefficients bc = finish_channel(p, c, sum_dy, sum_dy_xmu);
      a[c] = bc.a;
      b[c] = bc.b;
      k[c] = bc.k;
    }
    if (p.dx) {
#pragma omp for schedule(static)
      for (int64_t chunk = 0; chunk < plan.chunks; ++chunk) {
        const int64_t r0 = plan.first_row(chunk);
        rows_backward_apply_chunk(p.x + r0 * gx.outer_stride, gx.outer_stride,
                                  p.dy + r0 * p.dy_geom.outer_stride, p.dy_geom.outer_stride,
                                  p.dx + r0 * p.dx_geom.outer_stride, p.dx_geom.outer_stride,
                                  plan.rows_in(chunk), C, mean_hi.data(), a.data(), b.data(),
                                  k.data(), streaming_output(p.dx_geom, p.dx, p.x, p.dy));
      }
    }
  }
}

// dx from given sums (synchronized BN): the apply half of rows_backward.
void rows_backward_apply(const BackwardApply<float>& p) {
  const Geometry& gx = p.x_geom;
  const RowPlan plan(gx);
  const int64_t C = plan.channels;
  std::vector<float> mean_hi(C), a(C), b(C), k(C);
  for (int64_t c = 0; c < C; ++c) {
    const BackwardCoefficients bc =
        backward_coefficients(p.mean[c], p.invstd[c], param_or(p.gamma, c, 1.0), p.sum_dy[c],
                              p.sum_dy_xhat[c], p.count, BackwardMode::training);
    mean_hi[c] = bc.mean_hi;
    a[c] = bc.a;
    b[c] = bc.b;
    k[c] = bc.k;
  }
  const bool stream = streaming_output(p.dx_geom, p.dx, p.x, p.dy);
#pragma omp parallel for num_threads(threads_for(2 * C * plan.rows)) schedule(static)
  for (int64_t chunk = 0; chunk < plan.chunks; ++chunk) {
    const int64_t r0 = plan.first_row(chunk);
    rows_backward_apply_chunk(p.x + r0 * gx.outer_stride, gx.outer_stride,
                              p.dy + r0 * p.dy_geom.outer_stride, p.dy_geom.outer_stride,
                              p.dx + r0 * p.dx_geom.outer_stride, p.dx_geom.outer_stride,
                              plan.rows_in(chunk), C, mean_hi.data(), a.data(), b.data(), k.data(),
                              stream);
  }
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
