// The public fused BN+ReLU / BN+Add+ReLU functions: check every argument, pick
// the fast kernel or the reference, own the saved and running statistics.
// Nothing is written before all checks have passed (batch_norm.cpp's rules and
// its checks, shared through core/norm_checks.hpp).
#include "normkit/batch_norm_fused.hpp"

#include <array>
#include <cmath>
#include <span>

#include "core/check.hpp"
#include "core/dispatch.hpp"
#include "core/norm_checks.hpp"
#include "core/workspace.hpp"
#include "kernels/batch_norm_fused.hpp"
#include "ops/batch_norm_internal.hpp"

namespace normkit {

using detail::check_count;
using detail::check_eps;
using detail::check_in_place;
using detail::check_running;
using detail::check_training_size;
using detail::checked_input;
using detail::checked_like;
using detail::fail_invalid;
using detail::kPerChannel;
using detail::or_null;
using detail::unify;
using detail::Workspace;
namespace bn_fused = kernels::bn_fused;

namespace {

// A view that must have x's strides as well as its shape (z, dz): the mask and
// the kernels index it with x's geometry.
template <class T, class U>
void check_strides_like(const TensorView<U>& view, ConstTensorView<T> x, const char* name) {
  for (int axis = 0; axis < x.rank(); ++axis)
    if (x.shape[axis] > 1 && view.strides[axis] != x.strides[axis])
      fail_invalid(name, ": strides differ from x's (", name, " must be laid out like x, shape ",
                   x.shape_string(), ")");
}

template <class M>
void check_mask(std::span<M> mask, int64_t numel, bool required) {
  if (mask.empty() && !required) return;
  if (mask.empty()) fail_invalid("mask: required (the ReLU mask written by the forward pass)");
  if (!mask.data()) fail_invalid("mask: data pointer is null");
  if (static_cast<int64_t>(mask.size()) < relu_mask_bytes(numel))
    fail_invalid("mask: needs ", relu_mask_bytes(numel), " bytes (1 bit per element of x, ",
                 numel, " elements), got ", mask.size());
}

// The unused high bits of the last byte are defined as 0.
void clear_mask_tail(uint8_t* mask, int64_t numel) {
  if (mask && numel % 8)
    mask[numel / 8] = static_cast<uint8_t>(mask[numel / 8] & ((1u << (numel % 8)) - 1u));
}

// Runs a forward or backward problem on the first fast path that takes it
// (the views walked together and the mask order decide), else the reference.
template <class Fast, class Problem>
void run(const char* op, Fast bn_fused::Impl::*fast, void (*reference)(const Problem&),
         const Problem& problem, std::initializer_list<Geometry> others) {
  detail::run(op, bn_fused::implementations(), fast, reference, problem, problem.x_geom,
              std::span<const Geometry>(others.begin(), others.size()), problem.order);
}

// Checks shared by every forward; returns the geometries of x, z, y.
template <class T>
std::array<Geometry, 3> checked_forward(ConstTensorView<T> x, const ConstTensorView<T>* z,
                                        TensorView<T> y, std::span<uint8_t> mask,
                                        std::span<const T> gamma, std::span<const T> beta) {
  Geometry gx = checked_input(x, "x");
  Geometry gz = gx;
  if (z) {
    gz = checked_like(*z, x, "z");
    check_strides_like(*z, x, "z");
  }
  Geometry gy = checked_like(y, x, "y");
  check_in_place(y.data, gy, x.data, gx, "x");
  if (z) check_in_place(y.data, gy, z->data, gz, "z");
  if (z)
    unify<T>(x, gx, {{&gy, y}, {&gz, *z}});
  else
    unify<T>(x, gx, {{&gy, y}});
  if (!z) gz = gx;
  check_mask(mask, x.numel(), false);
  check_count(gamma, gx.channels, "weight (gamma)", kPerChannel, false);
  check_count(beta, gx.channels, "bias (beta)", kPerChannel, false);
  return {gx, gz, gy};
}

template <class T>
void forward_training(ConstTensorView<T> x, const ConstTensorView<T>* z, TensorView<T> y,
                      std::span<uint8_t> mask, std::span<const T> gamma, std::span<const T> beta,
                      SavedStats<T> saved, RunningStats<T> running, const BatchNormOptions& options,
                      const char* op) {
  const auto [gx, gz, gy] = checked_forward(x, z, y, mask, gamma, beta);
  check_training_size(gx, x);
  check_count(saved.mean, gx.channels, "save_mean", kPerChannel, false);
  check_count(saved.invstd, gx.channels, "save_invstd", kPerChannel, false);
  check_running(running, gx.channels, options);

  const detail::TrainingEpilogue<T> epilogue(gx.channels, running, saved, options);
  uint8_t* mask_data = or_null(mask);
  const bn_fused::Forward<T> problem{gx,      gz,     gy,      x.data,
                                     z ? z->data : nullptr, y.data, mask_data,
                                     bn_fused::mask_order_of(gx), or_null(gamma), or_null(beta),
                                     true,    options.eps, epilogue.moments().data(), nullptr, nullptr,
                                     epilogue.report()};
  run(op, &bn_fused::Impl::forward, bn_fused::ref::forward<T>, problem, {gy, gz});
  clear_mask_tail(mask_data, x.numel());
  epilogue.conclude();  // on a fault, y and the mask have changed, nothing else
}

template <class T>
void forward_inference(ConstTensorView<T> x, const ConstTensorView<T>* z, TensorView<T> y,
                       std::span<uint8_t> mask, std::span<const T> gamma, std::span<const T> beta,
                       std::span<const T> running_mean, std::span<const T> running_var, double eps,
                       const char* op) {
  check_eps(eps);
  const auto [gx, gz, gy] = checked_forward(x, z, y, mask, gamma, beta);
  check_count(running_mean, gx.channels, "running_mean", kPerChannel, true);
  check_count(running_var, gx.channels, "running_var", kPerChannel, true);
  Workspace ws;
  const std::span<double> mean = ws.copy<double>(running_mean),
                          invstd = ws.take_for_overwrite<double>(running_var.size());
  // As batch_norm_forward_inference's (rounded to T first), so the two agree.
  detail::checked_inference_invstd<T>(running_var, eps, "running_var", invstd);
  uint8_t* mask_data = or_null(mask);
  const bn_fused::Forward<T> problem{gx,      gz,     gy,      x.data,
                                     z ? z->data : nullptr, y.data, mask_data,
                                     bn_fused::mask_order_of(gx), or_null(gamma), or_null(beta),
                                     false,   eps,    nullptr, mean.data(), invstd.data()};
  run(op, &bn_fused::Impl::forward, bn_fused::ref::forward<T>, problem, {gy, gz});
  clear_mask_tail(mask_data, x.numel());
}

template <class T>
void backward(ConstTensorView<T> x, ConstTensorView<T> dy, std::span<const uint8_t> mask,
              TensorView<T> dx, TensorView<T>* dz, std::span<const T> gamma,
              std::span<const T> mean, std::span<const T> invstd, std::span<T> dgamma,
              std::span<T> dbeta, BackwardMode mode, const char* op) {
  Geometry gx = checked_input(x, "x");
  Geometry gdy = checked_like(dy, x, "dy");
  Geometry gdx = dx.data ? checked_like(dx, x, "dx") : gdy;
  const bool want_dz = dz && dz->data;
  Geometry gdz = gx;
  if (want_dz) {
    gdz = checked_like(*dz, x, "dz");
    check_strides_like(*dz, x, "dz");
    if (dz->data == x.data || dz->data == dy.data || dz->data == dx.data)
      fail_invalid("dz: must not share memory with x, dy or dx");
  }
  if (dx.data == x.data) fail_invalid("dx: must not be x itself");
  if (dx.data && dx.data == dy.data && !(gdx == gdy))
    fail_invalid("dx: in-place output must have the same strides as dy");
  ConstTensorView<T> dx_const = dx, dz_const = want_dz ? ConstTensorView<T>(*dz) : x;
  if (dx.data)
    unify<T>(x, gx, {{&gdy, dy}, {&gdx, dx_const}, {&gdz, dz_const}});
  else
    unify<T>(x, gx, {{&gdy, dy}, {&gdz, dz_const}});
  if (!dx.data) gdx = gdy;
  if (!want_dz) gdz = gx;
  if (mode != BackwardMode::training && mode != BackwardMode::frozen)
    fail_invalid("mode: unknown backward mode");
  if (mode == BackwardMode::training) check_training_size(gx, x);
  check_mask(mask, x.numel(), true);
  check_count(gamma, gx.channels, "weight (gamma)", kPerChannel, false);
  check_count(mean, gx.channels, "mean", kPerChannel, true);
  check_count(invstd, gx.channels, "invstd", kPerChannel, true);
  check_count(dgamma, gx.channels, "dgamma", kPerChannel, false);
  check_count(dbeta, gx.channels, "dbeta", kPerChannel, false);

  Workspace ws;
  const std::span<double> mean_d = ws.copy<double>(mean), invstd_d = ws.copy<double>(invstd);
  const std::span<double> sum_dy = ws.take<double>(gx.channels),
                          sum_dy_xhat = ws.take<double>(gx.channels);
  const bn_fused::Backward<T> problem{gx,      gdy,     gdx,           gdz,
                                      x.data,  dy.data, mask.data(),   bn_fused::mask_order_of(gx),
                                      dx.data, want_dz ? dz->data : nullptr, or_null(gamma),
                                      mean_d.data(), invstd_d.data(), mode, sum_dy.data(),
                                      sum_dy_xhat.data()};
  run(op, &bn_fused::Impl::backward, bn_fused::ref::backward<T>, problem, {gdy, gdx, gdz});
  for (int64_t c = 0; c < gx.channels; ++c) {
    if (!dgamma.empty()) dgamma[c] = static_cast<T>(sum_dy_xhat[c]);
    if (!dbeta.empty()) dbeta[c] = static_cast<T>(sum_dy[c]);
  }
}

}  // namespace

template <class T>
void batch_norm_relu_forward_training(ConstTensorView<T> x, TensorView<T> y,
                                      std::span<uint8_t> mask, std::span<const T> gamma,
                                      std::span<const T> beta, SavedStats<T> saved,
                                      RunningStats<T> running, const BatchNormOptions& options) {
  forward_training<T>(x, nullptr, y, mask, gamma, beta, saved, running, options,
                      "batch_norm_relu_forward_training");
}

template <class T>
void batch_norm_add_relu_forward_training(ConstTensorView<T> x, ConstTensorView<T> z,
                                          TensorView<T> y, std::span<uint8_t> mask,
                                          std::span<const T> gamma, std::span<const T> beta,
                                          SavedStats<T> saved, RunningStats<T> running,
                                          const BatchNormOptions& options) {
  forward_training<T>(x, &z, y, mask, gamma, beta, saved, running, options,
                      "batch_norm_add_relu_forward_training");
}

template <class T>
void batch_norm_relu_forward_inference(ConstTensorView<T> x, TensorView<T> y,
                                       std::span<uint8_t> mask, std::span<const T> gamma,
                                       std::span<const T> beta, std::span<const T> running_mean,
                                       std::span<const T> running_var, double eps) {
  forward_inference<T>(x, nullptr, y, mask, gamma, beta, running_mean, running_var, eps,
                       "batch_norm_relu_forward_inference");
}

template <class T>
void batch_norm_add_relu_forward_inference(ConstTensorView<T> x, ConstTensorView<T> z,
                                           TensorView<T> y, std::span<uint8_t> mask,
                                           std::span<const T> gamma, std::span<const T> beta,
                                           std::span<const T> running_mean,
                                           std::span<const T> running_var, double eps) {
  forward_inference<T>(x, &z, y, mask, gamma, beta, running_mean, running_var, eps,
                       "batch_norm_add_relu_forward_inference");
}

template <class T>
void batch_norm_relu_backward(ConstTensorView<T> x, ConstTensorView<T> dy,
                              std::span<const uint8_t> mask, TensorView<T> dx,
                              std::span<const T> gamma, std::span<const T> mean,
                              std::span<const T> invstd, std::span<T> dgamma, std::span<T> dbeta,
                              BackwardMode mode) {
  backward<T>(x, dy, mask, dx, nullptr, gamma, mean, invstd, dgamma, dbeta, mode,
              "batch_norm_relu_backward");
}

template <class T>
void batch_norm_add_relu_backward(ConstTensorView<T> x, ConstTensorView<T> dy,
                                  std::span<const uint8_t> mask, TensorView<T> dx,
                                  TensorView<T> dz, std::span<const T> gamma,
                                  std::span<const T> mean, std::span<const T> invstd,
                                  std::span<T> dgamma, std::span<T> dbeta, BackwardMode mode) {
  backward<T>(x, dy, mask, dx, &dz, gamma, mean, invstd, dgamma, dbeta, mode,
              "batch_norm_add_relu_backward");
}

#define NORMKIT_INSTANTIATE_FUSED(T)                                                             \
  template void batch_norm_relu_forward_training<T>(ConstTensorView<T>, TensorView<T>,         \
                                                    std::span<uint8_t>, std::span<const T>,     \
                                                    std::span<const T>, SavedStats<T>,          \
                                                    RunningStats<T>, const BatchNormOptions&);  \
  template void batch_norm_add_relu_forward_training<T>(                                       \
      ConstTensorView<T>, ConstTensorView<T>, TensorView<T>, std::span<uint8_t>,               \
      std::span<const T>, std::span<const T>, SavedStats<T>, RunningStats<T>,                  \
      const BatchNormOptions&);                                                                \
  template void batch_norm_relu_forward_inference<T>(                                          \
      ConstTensorView<T>, TensorView<T>, std::span<uint8_t>, std::span<const T>,               \
      std::span<const T>, std::span<const T>, std::span<const T>, double);                     \
  template void batch_norm_add_relu_forward_inference<T>(                                      \
      ConstTensorView<T>, ConstTensorView<T>, TensorView<T>, std::span<uint8_t>,               \
      std::span<const T>, std::span<const T>, std::span<const T>, std::span<const T>, double); \
  template void batch_norm_relu_backward<T>(ConstTensorView<T>, ConstTensorView<T>,            \
                                            std::span<const uint8_t>, TensorView<T>,            \
                                            std::span<const T>, std::span<const T>,             \
                                            std::span<const T>, std::span<T>, std::span<T>,     \
                                            BackwardMode);                                      \
  template void batch_norm_add_relu_backward<T>(                                               \
      ConstTensorView<T>, ConstTensorView<T>, std::span<const uint8_t>, TensorView<T>,         \
      TensorView<T>, std::span<const T>, std::span<const T>, std::span<const T>, std::span<T>, \
      std::span<T>, BackwardMode);

NORMKIT_INSTANTIATE_FUSED(float)
NORMKIT_INSTANTIATE_FUSED(double)

}  // namespace normkit
