// Batch Renormalization, Ghost Batch Normalization and frozen BN on the BN
// kernels: each variant only computes different per-channel coefficients (or
// runs BN on slices of the batch). Arguments are checked here before anything
// is written; the BN functions called afterwards check them again, cheaply.
#include "normkit/bn_variants.hpp"

#include <algorithm>
#include <cmath>
#include <span>

#include "core/check.hpp"
#include "core/norm_checks.hpp"
#include "core/workspace.hpp"
#include "kernels/batch_norm.hpp"
#include "ops/batch_norm_internal.hpp"

namespace normkit {

using detail::check_count;
using detail::check_running;
using detail::check_training_size;
using detail::checked_input;
using detail::checked_like;
using detail::fail_invalid;
using detail::fail_runtime;
using detail::kPerChannel;
using detail::Workspace;

namespace {

void check_limits(RenormLimits limits) {
  if (!(limits.rmax >= 1.0) || !std::isfinite(limits.rmax))
    fail_invalid("rmax must be finite and >= 1, got ", limits.rmax);
  if (!(limits.dmax >= 0.0) || !std::isfinite(limits.dmax))
    fail_invalid("dmax must be finite and >= 0, got ", limits.dmax);
}

// Rows [first, first + count) of axis 0 (N in every layout).
template <class V>
V batch_slice(V view, int64_t first, int64_t count) {
  if (view.data) view.data += first * view.strides[0];
  view.shape[0] = count;
  return view;
}

void check_virtual_batch_size(int64_t virtual_batch_size) {
  if (virtual_batch_size <= 0)
    fail_invalid("virtual_batch_size must be positive, got ", virtual_batch_size);
}

// Every virtual batch needs more than one value per channel; the last one is the smallest.
template <class T>
void check_ghost_sizes(ConstTensorView<T> x, const Geometry& g, int64_t virtual_batch_size) {
  const int64_t n = x.shape[0];
  const int64_t per_sample = g.reduction_size() / n;
  const int64_t last = n - (ghost_batch_count(n, virtual_batch_size) - 1) * virtual_batch_size;
  if (last * per_sample <= 1)
    fail_invalid("expected more than 1 value per channel in every virtual batch when training; "
                 "the last virtual batch of input size ",
                 x.shape_string(), " with virtual_batch_size ", virtual_batch_size, " has ",
                 last * per_sample, " (make the batch size leave more than ",
                 per_sample == 1 ? "one sample" : "this", " in the last virtual batch)");
}

}  // namespace

// ---------------------------------------------------------------- Batch Renormalization

RenormLimits BatchRenormSchedule::at(int64_t step) const {
  check_limits({rmax, dmax});
  if (step < 0 || hold_steps < 0 || rmax_ramp_steps < 0 || dmax_ramp_steps < 0)
    fail_invalid("BatchRenormSchedule: step counts must be >= 0 (step ", step, ", hold ",
                 hold_steps, ", rmax ramp ", rmax_ramp_steps, ", dmax ramp ", dmax_ramp_steps, ")");
  if (step < hold_steps) return {1.0, 0.0};
  const double into = static_cast<double>(step - hold_steps);
  auto ramp = [&](int64_t steps) {
    return steps == 0 ? 1.0 : std::min(1.0, into / static_cast<double>(steps));
  };
  return {1.0 + (rmax - 1.0) * ramp(rmax_ramp_steps), dmax * ramp(dmax_ramp_steps)};
}

template <class T>
void batch_renorm_forward_training(ConstTensorView<T> x, TensorView<T> y, std::span<const T> gamma,
                                   std::span<const T> beta, RenormSaved<T> saved,
                                   RunningStats<T> running, RenormLimits limits,
                                   const BatchNormOptions& options) {
  const Geometry gx = checked_input(x, "x");
  checked_like(y, x, "y");
  check_training_size(gx, x);
  const int64_t C = gx.channels;
  check_count(gamma, C, "weight (gamma)", kPerChannel, false);
  check_count(beta, C, "bias (beta)", kPerChannel, false);
  check_count(saved.mean, C, "save_mean", kPerChannel, false);
  check_count(saved.invstd, C, "save_invstd", kPerChannel, false);
  check_count(saved.r, C, "save_r", kPerChannel, false);
  check_count(saved.d, C, "save_d", kPerChannel, false);
  check_running(running, C, options, true);
  check_limits(limits);
  for (int64_t c = 0; c < C; ++c)
    if (!(static_cast<double>(running.var[c]) + options.eps > 0) ||
        !std::isfinite(static_cast<double>(running.var[c])) ||
        !std::isfinite(static_cast<double>(running.mean[c])))
      fail_invalid("running statistics of channel ", c, " must be finite with running_var + eps > 0, got mean ",
                   running.mean[c], ", var ", running.var[c]);

  Workspace ws;
  const std::span<Moments> moments = ws.take<Moments>(C);
  batch_norm_moments<T>(x, moments);
  for (int64_t c = 0; c < C; ++c)
    if (!std::isfinite(moments[c].mean) || !std::isfinite(moments[c].m2))
      fail_runtime("x: channel ", c,
                   " contains NaN or infinite values; nothing written, running statistics left unchanged");

  // y = (x − μ_B)·invstd_B·(γ·r) + (β + γ·d): BN's apply with folded coefficients.
  const std::span<double> mean = ws.take<double>(C), invstd = ws.take<double>(C),
                          r = ws.take<double>(C), d = ws.take<double>(C);
  const std::span<T> gamma_r = ws.take<T>(C), beta_d = ws.take<T>(C);
  for (int64_t c = 0; c < C; ++c) {
    mean[c] = moments[c].mean;
    invstd[c] = kernels::bn::invstd_of(moments[c].biased_variance(), options.eps);
    const double sigma = std::sqrt(static_cast<double>(running.var[c]) + options.eps);
    const double sigma_batch = 1.0 / invstd[c];
    r[c] = std::clamp(sigma_batch / sigma, 1.0 / limits.rmax, limits.rmax);
    d[c] = std::clamp((mean[c] - static_cast<double>(running.mean[c])) / sigma, -limits.dmax,
                      limits.dmax);
    const double g = gamma.empty() ? 1.0 : static_cast<double>(gamma[c]);
    const double b = beta.empty() ? 0.0 : static_cast<double>(beta[c]);
    gamma_r[c] = static_cast<T>(g * r[c]);
    beta_d[c] = static_cast<T>(b + g * d[c]);
  }
  detail::batch_norm_apply_double_stats<T>(x, y, gamma_r, beta_d, mean, invstd,
                                           "batch_renorm_forward_training");
  // The running statistics first: when they refuse the batch (a variance beyond
  // T's range), only y has changed.
  batch_norm_update_running<T>(moments, running, options);

  for (int64_t c = 0; c < C; ++c) {
    if (!saved.mean.empty()) saved.mean[c] = static_cast<T>(mean[c]);
    if (!saved.invstd.empty()) saved.invstd[c] = static_cast<T>(invstd[c]);
    if (!saved.r.empty()) saved.r[c] = static_cast<T>(r[c]);
    if (!saved.d.empty()) saved.d[c] = static_cast<T>(d[c]);
  }
}

template <class T>
void batch_renorm_backward(ConstTensorView<T> x, ConstTensorView<T> dy, TensorView<T> dx,
                           std::span<const T> gamma, std::span<const T> mean,
                           std::span<const T> invstd, std::span<const T> r, std::span<const T> d,
                           std::span<T> dgamma, std::span<T> dbeta) {
  const Geometry gx = checked_input(x, "x");
  const int64_t C = gx.channels;
  check_count(gamma, C, "weight (gamma)", kPerChannel, false);
  check_count(r, C, "r", kPerChannel, true);
  check_count(d, C, "d", kPerChannel, !dgamma.empty());
  check_count(dgamma, C, "dgamma", kPerChannel, false);
  check_count(dbeta, C, "dbeta", kPerChannel, false);

  // With r and d constant, y = (γ·r)·x̂_B + (β + γ·d): BN's backward with γ·r.
  Workspace ws;
  const std::span<T> gamma_r = ws.take<T>(C), sum_dy_xhat = ws.take<T>(C), sum_dy = ws.take<T>(C);
  for (int64_t c = 0; c < C; ++c)
    gamma_r[c] = static_cast<T>((gamma.empty() ? 1.0 : static_cast<double>(gamma[c])) *
                                static_cast<double>(r[c]));
  batch_norm_backward<T>(x, dy, dx, gamma_r, mean, invstd, sum_dy_xhat, sum_dy,
                         BackwardMode::training);
  // dγ = Σ dy·x̂ with x̂ = r·x̂_B + d.
  for (int64_t c = 0; c < C; ++c) {
    if (!dgamma.empty())
      dgamma[c] = static_cast<T>(static_cast<double>(r[c]) * static_cast<double>(sum_dy_xhat[c]) +
                                 static_cast<double>(d[c]) * static_cast<double>(sum_dy[c]));
    if (!dbeta.empty()) dbeta[c] = sum_dy[c];
  }
}

// ---------------------------------------------------------------- Ghost Batch Normalization

int64_t ghost_batch_count(int64_t batch, int64_t virtual_batch_size) {
  check_virtual_batch_size(virtual_batch_size);
  if (batch < 0) fail_invalid("batch size must be >= 0, got ", batch);
  return (batch + virtual_batch_size - 1) / virtual_batch_size;
}

template <class T>
void ghost_batch_norm_forward_training(ConstTensorView<T> x, TensorView<T> y,
                                       std::span<const T> gamma, std::span<const T> beta,
                                       int64_t virtual_batch_size, SavedStats<T> saved,
                                       RunningStats<T> running, const BatchNormOptions& options) {
  check_virtual_batch_size(virtual_batch_size);
  const Geometry gx = checked_input(x, "x");
  checked_like(y, x, "y");
  const int64_t C = gx.channels, n = x.shape[0];
  check_ghost_sizes(x, gx, virtual_batch_size);
  const int64_t ghosts = ghost_batch_count(n, virtual_batch_size);
  check_count(gamma, C, "weight (gamma)", kPerChannel, false);
  check_count(beta, C, "bias (beta)", kPerChannel, false);
  check_count(saved.mean, ghosts * C, "save_mean", "virtual batches × channels", false);
  check_count(saved.invstd, ghosts * C, "save_invstd", "virtual batches × channels", false);
  check_running(running, C, options);

  // Work on copies of the state, so that a NaN in a later virtual batch leaves
  // the caller's running and saved statistics as they were.
  Workspace ws;
  const std::span<T> running_mean = ws.copy<T>(running.mean), running_var = ws.copy<T>(running.var);
  int64_t tracked = running.num_batches_tracked ? *running.num_batches_tracked : 0;
  const std::span<T> save_mean = ws.take<T>(ghosts * C), save_invstd = ws.take<T>(ghosts * C);
  for (int64_t g = 0; g < ghosts; ++g) {
    const int64_t first = g * virtual_batch_size, count = std::min(virtual_batch_size, n - first);
    const std::span<T> mean_g(save_mean.data() + g * C, C), invstd_g(save_invstd.data() + g * C, C);
    batch_norm_forward_training<T>(batch_slice(x, first, count), batch_slice(y, first, count),
                                   gamma, beta, {mean_g, invstd_g},
                                   {running_mean, running_var,
                                    running.num_batches_tracked ? &tracked : nullptr},
                                   options);
  }
  std::copy(running_mean.begin(), running_mean.end(), running.mean.begin());
  std::copy(running_var.begin(), running_var.end(), running.var.begin());
  if (running.num_batches_tracked) *running.num_batches_tracked = tracked;
  if (!saved.mean.empty()) std::copy(save_mean.begin(), save_mean.end(), saved.mean.begin());
  if (!saved.invstd.empty()) std::copy(save_invstd.begin(), save_invstd.end(), saved.invstd.begin());
}

template <class T>
void ghost_batch_norm_backward(ConstTensorView<T> x, ConstTensorView<T> dy, TensorView<T> dx,
                               std::span<const T> gamma, int64_t virtual_batch_size,
                               std::span<const T> mean, std::span<const T> invstd,
                               std::span<T> dgamma, std::span<T> dbeta) {
  check_virtual_batch_size(virtual_batch_size);
  const Geometry gx = checked_input(x, "x");
  checked_like(dy, x, "dy");
  if (dx.data) checked_like(dx, x, "dx");
  const int64_t C = gx.channels, n = x.shape[0];
  check_ghost_sizes(x, gx, virtual_batch_size);
  const int64_t ghosts = ghost_batch_count(n, virtual_batch_size);
  check_count(gamma, C, "weight (gamma)", kPerChannel, false);
  check_count(mean, ghosts * C, "mean", "virtual batches × channels", true);
  check_count(invstd, ghosts * C, "invstd", "virtual batches × channels", true);
  check_count(dgamma, C, "dgamma", kPerChannel, false);
  check_count(dbeta, C, "dbeta", kPerChannel, false);

  Workspace ws;
  const std::span<double> total_dgamma = ws.take<double>(C), total_dbeta = ws.take<double>(C);
  const std::span<T> dgamma_g = ws.take<T>(C), dbeta_g = ws.take<T>(C);
  for (int64_t g = 0; g < ghosts; ++g) {
    const int64_t first = g * virtual_batch_size, count = std::min(virtual_batch_size, n - first);
    batch_norm_backward<T>(batch_slice(x, first, count), batch_slice(dy, first, count),
                           batch_slice(dx, first, count), gamma, mean.subspan(g * C, C),
                           invstd.subspan(g * C, C), dgamma_g, dbeta_g, BackwardMode::training);
    for (int64_t c = 0; c < C; ++c) {
      total_dgamma[c] += static_cast<double>(dgamma_g[c]);
      total_dbeta[c] += static_cast<double>(dbeta_g[c]);
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    if (!dgamma.empty()) dgamma[c] = static_cast<T>(total_dgamma[c]);
    if (!dbeta.empty()) dbeta[c] = static_cast<T>(total_dbeta[c]);
  }
}

// ---------------------------------------------------------------- frozen

template <class T>
void frozen_batch_norm_backward(ConstTensorView<T> x, ConstTensorView<T> dy, TensorView<T> dx,
                                std::span<const T> gamma, std::span<const T> running_mean,
                                std::span<const T> running_var, double eps, std::span<T> dgamma,
                                std::span<T> dbeta) {
  const Geometry gx = checked_input(x, "x");
  check_count(running_var, gx.channels, "running_var", kPerChannel, true);
  Workspace ws;
  const std::span<T> invstd = ws.take<T>(running_var.size());
  batch_norm_invstd<T>(running_var, eps, invstd);
  batch_norm_backward<T>(x, dy, dx, gamma, running_mean, invstd, dgamma, dbeta,
                         BackwardMode::frozen);
}

#define NORMKIT_INSTANTIATE_VARIANTS(T)                                                          \
  template void batch_renorm_forward_training<T>(ConstTensorView<T>, TensorView<T>,            \
                                                 std::span<const T>, std::span<const T>,        \
                                                 RenormSaved<T>, RunningStats<T>, RenormLimits, \
                                                 const BatchNormOptions&);                      \
  template void batch_renorm_backward<T>(ConstTensorView<T>, ConstTensorView<T>, TensorView<T>, \
                                         std::span<const T>, std::span<const T>,                \
                                         std::span<const T>, std::span<const T>,                \
                                         std::span<const T>, std::span<T>, std::span<T>);       \
  template void ghost_batch_norm_forward_training<T>(ConstTensorView<T>, TensorView<T>,        \
                                                     std::span<const T>, std::span<const T>,    \
                                                     int64_t, SavedStats<T>, RunningStats<T>,   \
                                                     const BatchNormOptions&);                  \
  template void ghost_batch_norm_backward<T>(ConstTensorView<T>, ConstTensorView<T>,            \
                                             TensorView<T>, std::span<const T>, int64_t,        \
                                             std::span<const T>, std::span<const T>,            \
                                             std::span<T>, std::span<T>);                       \
  template void frozen_batch_norm_backward<T>(ConstTensorView<T>, ConstTensorView<T>,           \
                                              TensorView<T>, std::span<const T>,                \
                                              std::span<const T>, std::span<const T>, double,   \
                                              std::span<T>, std::span<T>);

NORMKIT_INSTANTIATE_VARIANTS(float)
NORMKIT_INSTANTIATE_VARIANTS(double)

}  // namespace normkit
