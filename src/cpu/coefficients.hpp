#pragma once
// The per-channel coefficients the fast kernels apply, written once for every
// family that uses them (batch norm, fused BN+ReLU, group norm). Internal
// linkage, as leaf_loops.hpp explains.
//
// The accuracy trick (docs/design.md, "mean_hi"): y = (x - mean) * invstd * γ + β
// runs as one subtraction and one multiply-add in float,
//   y = (x - mean_hi) * scale + shift,  mean_hi = float(mean),
//   scale = γ·invstd,  shift = β - (mean - mean_hi)·scale.
// x - mean_hi is exact when x is near the mean, so large means (1e6 with std 1)
// keep their digits; the textbook fold shift = β - mean·scale would lose them.
#include <algorithm>
#include <cmath>
#include <span>

#include "cpu/leaf_loops.hpp"
#include "kernels/batch_norm.hpp"
#include "kernels/group_norm.hpp"
#include "normkit/batch_norm.hpp"

namespace normkit::kernels::cpu {
namespace {

struct ApplyCoefficients {
  float mean_hi, scale, shift;
};
[[maybe_unused]] ApplyCoefficients apply_coefficients(double mean, double invstd, double gamma,
                                                      double beta) {
  const float mean_hi = static_cast<float>(mean);
  const double scale = gamma * invstd;
  return {mean_hi, static_cast<float>(scale),
          static_cast<float>(beta - (mean - static_cast<double>(mean_hi)) * scale)};
}

// Per-channel apply coefficients (apply_coefficients) for a block of channels
// from merged moments, as arrays, in loops the compiler vectorizes: with
// thousands of channels and few rows (32×4096), scalar square roots and
// divisions per channel cost as much as the data passes. (src/cpu is built
// with -fno-math-errno, without which the square root does not vectorize.)
// invstd is bn::invstd_of's, bit for bit: IEEE division and square root.
[[maybe_unused]] NORMKIT_SIMD_CLONES
void invstd_array(int64_t channels, double count, const double* __restrict m2, double eps,
                  double* __restrict invstd) {
  leaf::with_division_by(count, [&](auto divide) __attribute__((always_inline)) {
    for (int64_t c = 0; c < channels; ++c) invstd[c] = 1.0 / std::sqrt(divide(m2[c]) + eps);
  });
}
[[maybe_unused]] NORMKIT_SIMD_CLONES
void coefficient_arrays(int64_t channels, const double* __restrict mean,
                        const double* __restrict invstd, const float* __restrict gamma,
                        const float* __restrict beta, float* __restrict mean_hi,
                        float* __restrict scale, float* __restrict shift) {
  for (int64_t c = 0; c < channels; ++c) {
    const float hi = static_cast<float>(mean[c]);
    const double sc = (gamma ? static_cast<double>(gamma[c]) : 1.0) * invstd[c];
    mean_hi[c] = hi;
    scale[c] = static_cast<float>(sc);
    shift[c] = static_cast<float>((beta ? static_cast<double>(beta[c]) : 0.0) -
                                  (mean[c] - static_cast<double>(hi)) * sc);
  }
}

// coefficient_arrays of channels [c0, c0 + width) of a problem with the
// statistics (mean, invstd) over all channels, into arrays over all channels:
// inference's column units, each thread its own channels.
template <class Problem>
void coefficients_of_channels(const Problem& p, int64_t c0, int64_t width, float* mean_hi,
                              float* scale, float* shift) {
  coefficient_arrays(width, p.mean + c0, p.invstd + c0, p.gamma ? p.gamma + c0 : nullptr,
                     p.beta ? p.beta + c0 : nullptr, mean_hi + c0, scale + c0, shift + c0);
}

// A forward-training's block of channels [c0, c0 + width) once its moments are
// merged (the on_block of rows_moments_phase): the moments written and reported
// final with their invstd, and the block's apply coefficients. Batch norm and
// BN+ReLU both, so that their y agree bit for bit.
template <class Forward>
void finish_forward_block(const Forward& p, int64_t c0, int64_t width, double count,
                          const double* mean, const double* m2, float* mean_hi, float* scale,
                          float* shift) {
  constexpr int64_t kPiece = 256;  // invstd on the stack: no allocation in a region
  double invstd[kPiece];
  for (int64_t b = 0; b < width; b += kPiece) {
    const int64_t n = std::min(kPiece, width - b);
    for (int64_t c = b; c < b + n; ++c) p.moments[c0 + c] = {count, mean[c], m2[c]};
    invstd_array(n, count, m2 + b, p.eps, invstd);
    p.moments_done(c0 + b, n, invstd);
    coefficient_arrays(n, mean + b, invstd, p.gamma ? p.gamma + c0 + b : nullptr,
                       p.beta ? p.beta + c0 + b : nullptr, mean_hi + c0 + b, scale + c0 + b,
                       shift + c0 + b);
  }
}

// Training backward folded into dx = a·dy + b·(x - mean_hi) + k:
//   a = γ·invstd,  b = -a·invstd·dγ/M,  k = -a·dβ/M - b·(mean - mean_hi).
// Frozen: b = k = 0.
struct BackwardCoefficients {
  float mean_hi, a, b, k;
};
[[maybe_unused]] BackwardCoefficients backward_coefficients(double mean, double invstd,
                                                            double gamma, double sum_dy,
                                                            double sum_dy_xhat, double count,
                                                            BackwardMode mode) {
  const float mean_hi = static_cast<float>(mean);
  const double a = gamma * invstd;
  if (mode == BackwardMode::frozen) return {mean_hi, static_cast<float>(a), 0.0f, 0.0f};
  const double b = -a * invstd * sum_dy_xhat / count;
  const double k = -a * sum_dy / count - b * (mean - static_cast<double>(mean_hi));
  return {mean_hi, static_cast<float>(a), static_cast<float>(b), static_cast<float>(k)};
}

// Channel c's coefficients for a fused forward (bn_fused::Forward): from the
// batch moments it computed (training) or the statistics it was given.
template <class Problem>
ApplyCoefficients forward_coefficients(const Problem& p, int64_t c) {
  const double mean = p.training ? p.moments[c].mean : p.mean[c];
  const double invstd =
      p.training ? bn::invstd_of(p.moments[c].biased_variance(), p.eps) : p.invstd[c];
  return apply_coefficients(mean, invstd, leaf::param_or(p.gamma, c, 1.0),
                            leaf::param_or(p.beta, c, 0.0));
}

// A batch-norm backward problem's channel c (bn::Backward, bn_fused::Backward),
// from Σdy and Σdy·(x - mean): writes dβ = Σdy and dγ = invstd·Σdy·(x - mean),
// and returns dx's coefficients.
template <class Problem>
BackwardCoefficients finish_channel(const Problem& p, int64_t c, double sum_dy,
                                    double sum_dy_xmu) {
  p.sum_dy[c] = sum_dy;
  p.sum_dy_xhat[c] = sum_dy_xmu * p.invstd[c];
  return backward_coefficients(p.mean[c], p.invstd[c], leaf::param_or(p.gamma, c, 1.0), sum_dy,
                               p.sum_dy_xhat[c], static_cast<double>(p.x_geom.reduction_size()),
                               p.mode);
}

// The same from Σdy·(x - mean_hi), mean_hi = float(mean), as the kernels sum
// it (x - mean_hi is exact near the mean): Σdy·(x - mean) = Σdy·(x - mean_hi) -
// Σdy·(mean - mean_hi).
template <class Problem>
BackwardCoefficients finish_channel_from_hi(const Problem& p, int64_t c, double sum_dy,
                                            double sum_dy_xhi) {
  const double mean_error = p.mean[c] - static_cast<double>(static_cast<float>(p.mean[c]));
  return finish_channel(p, c, sum_dy, sum_dy_xhi - sum_dy * mean_error);
}

// The rows kernels' batch-norm backward (channels last): dx's coefficients as
// one array each, for the apply loop that streams whole rows.
struct RowBackwardCoefficients {
  RowBackwardCoefficients(leaf::Workspace& ws, const double* mean, int64_t channels)
      : mean_hi(ws.take_for_overwrite<float>(channels)),
        a(ws.take_for_overwrite<float>(channels)),
        b(ws.take_for_overwrite<float>(channels)),
        k(ws.take_for_overwrite<float>(channels)) {
    for (int64_t c = 0; c < channels; ++c) mean_hi[c] = static_cast<float>(mean[c]);
  }
  // Each stripe of rows summed Σdy and Σdy·(x - mean_hi) per channel into its
  // own slots (stripe s, channel c at s·C + c). Per channel: the stripes added
  // in stripe order (so results do not depend on the thread count), then
  // finish_channel_from_hi. Called inside a parallel region, whose threads
  // share the channels.
  template <class Problem>
  void finish_from_stripes(const Problem& p, int64_t stripes, const double* stripe_dy,
                           const double* stripe_dy_xmu) {
    const auto channels = static_cast<int64_t>(mean_hi.size());
#pragma omp for schedule(static)
    for (int64_t c = 0; c < channels; ++c) {
      double sum_dy = 0, sum_dy_xmu = 0;
      for (int64_t s = 0; s < stripes; ++s) {
        sum_dy += stripe_dy[s * channels + c];
        sum_dy_xmu += stripe_dy_xmu[s * channels + c];
      }
      set(c, finish_channel_from_hi(p, c, sum_dy, sum_dy_xmu));
    }
  }
  void set(int64_t c, const BackwardCoefficients& bc) {
    a[c] = bc.a;
    b[c] = bc.b;
    k[c] = bc.k;
  }
  std::span<float> mean_hi, a, b, k;
};

// ---- group norm: coefficients per (sample, group) block

// A block's sums from the per-channel Σdy and Σdy·(x - mean): with r = invstd,
// M = C/G·S, Sg = Σ_c γ_c·Σdy and Sgx = r·Σ_c γ_c·Σdy·(x - mean) (= Σγ·dy·x̂),
//   dx = r·γ_c·dy - r·Sg/M - r²·Sgx/M·(x - mean)
//      = a_c·dy + b·(x - mean_hi) + k,  a_c = r·γ_c,  b = -r²·Sgx/M,
//        k = -r·Sg/M - b·(mean - mean_hi).
struct BlockGradient {
  float mean_hi, b, k;
};
[[maybe_unused]] BlockGradient block_gradient(double mean, double invstd, double sum_g,
                                              double sum_g_xmu, double count) {
  const float mean_hi = static_cast<float>(mean);
  const double b = -invstd * invstd * (invstd * sum_g_xmu) / count;
  const double k = -invstd * sum_g / count - b * (mean - static_cast<double>(mean_hi));
  return {mean_hi, static_cast<float>(b), static_cast<float>(k)};
}

// Per-(n, c) sums, given as Σdy and Σdy·(x - float(mean)), completed into
// per-block coefficients; `sum_dy_xmu` is corrected in place to Σdy·(x - mean).
[[maybe_unused]] BlockGradient finish_block(const gn::Backward<float>& p, int64_t block,
                                            const double* sum_dy, double* sum_dy_xmu) {
  const int64_t per_group = p.x_geom.c / p.groups, first_c = (block % p.groups) * per_group;
  const double mean = p.mean[block], error = mean - static_cast<float>(mean);
  double sum_g = 0, sum_g_xmu = 0;
  for (int64_t j = 0; j < per_group; ++j) {
    sum_dy_xmu[j] -= sum_dy[j] * error;
    const double gamma = leaf::param_or(p.gamma, first_c + j, 1.0);
    sum_g += gamma * sum_dy[j];
    sum_g_xmu += gamma * sum_dy_xmu[j];
  }
  return block_gradient(mean, p.invstd[block], sum_g, sum_g_xmu,
                        static_cast<double>(per_group * p.x_geom.s));
}

[[maybe_unused]] BackwardCoefficients channel_backward(const gn::Backward<float>& p,
                                                       int64_t block, int64_t c,
                                                       const BlockGradient& bg) {
  return {bg.mean_hi, static_cast<float>(p.invstd[block] * leaf::param_or(p.gamma, c, 1.0)),
          bg.b, bg.k};
}

// dγ[c] = Σ_n invstd·Σdy·(x - mean), dβ[c] = Σ_n Σdy, in sample order.
[[maybe_unused]] void finish_parameters(const gn::Backward<float>& p, const double* sum_dy,
                                        const double* sum_dy_xmu) {
  const SampleGeometry& g = p.x_geom;
  const int64_t per_group = g.c / p.groups;
  for (int64_t c = 0; c < g.c; ++c) p.dgamma[c] = p.dbeta[c] = 0;
  for (int64_t n = 0; n < g.n; ++n)
    for (int64_t c = 0; c < g.c; ++c) {
      p.dbeta[c] += sum_dy[n * g.c + c];
      p.dgamma[c] += p.invstd[n * p.groups + c / per_group] * sum_dy_xmu[n * g.c + c];
    }
}

}  // namespace
}  // namespace normkit::kernels::cpu
