#pragma once
// Batch normalization fused with ReLU, and with a residual addition then ReLU
// (the tail of a ResNet block), forward and backward, the ReLU mask kept as bits.
//
//   BN+ReLU:      p = BN(x),      y = relu(p)
//   BN+Add+ReLU:  p = BN(x) + z,  y = relu(p)      (z: the residual, x's shape and strides)
// with BN(x) = (x - mean) * invstd * γ + β exactly as in batch_norm.hpp (batch
// statistics in training, running ones in inference), relu(p) = 0 where p < 0,
// else p (so NaN stays NaN), and the mask bit of an element = (p > 0).
//
// Backward, given dy = ∂L/∂y and the mask:
//   g  = mask ? dy : 0                 (the gradient at p)
//   dz = g                             (Add variant)
//   dx, dγ, dβ = batch_norm_backward(x, dy = g)   (see batch_norm.hpp)
// so backward reads one bit per element for the ReLU instead of a float tensor.
//
// The mask: 1 bit per element of x, in x's memory order: the element with the
// k-th lowest address in x has bit k, stored as bit (k % 8) of byte k / 8 (least
// significant bit first; the same bits as little-endian uint64 words, bit k % 64
// of word k / 64). Dense NCHW: k = ((n·C + c)·H + h)·W + w; dense NHWC (or a
// channels_last NCHW view): k = ((n·H + h)·W + w)·C + c. A buffer needs
// relu_mask_bytes(x.numel()) bytes; the unused high bits of the last byte are
// written as 0. An empty mask span means "not wanted" in the forward functions
// (inference without training, say); backward requires it.
//
// Arguments, running statistics, saved statistics and options are those of
// batch_norm_forward_training / _inference / batch_norm_backward, and so are the
// rules: float views run the fast kernels (NCHW-like planes and NHWC-like rows;
// other strides run the reference), double views the reference; every argument
// is validated before anything is written (normkit::Error); forward-training
// raises a runtime error for NaN/infinite statistics after writing y and the
// mask, with saved and running statistics left as they were. Results are
// bitwise identical for any thread count.
#include <cstdint>
#include <span>
#include <string>

#include "normkit/batch_norm.hpp"
#include "normkit/error.hpp"
#include "normkit/tensor.hpp"

namespace normkit {

// Bytes of a mask for a tensor of `numel` elements: ceil(numel / 8), for any
// numel >= 0 (no overflow near 2^63); a negative numel is a normkit::Error.
constexpr int64_t relu_mask_bytes(int64_t numel) {
  if (numel < 0)
    throw Error(ErrorKind::invalid_argument,
                "relu_mask_bytes: numel must be >= 0, got " + std::to_string(numel));
  return numel / 8 + (numel % 8 != 0);
}

// y may alias x (in place) when both have the same strides.
template <class T>
void batch_norm_relu_forward_training(ConstTensorView<T> x, TensorView<T> y,
                                      std::span<uint8_t> mask, std::span<const T> gamma,
                                      std::span<const T> beta, SavedStats<T> saved,
                                      RunningStats<T> running,
                                      const BatchNormOptions& options = {});

// y may alias x or z (in place) when it has their strides.
template <class T>
void batch_norm_add_relu_forward_training(ConstTensorView<T> x, ConstTensorView<T> z,
                                          TensorView<T> y, std::span<uint8_t> mask,
                                          std::span<const T> gamma, std::span<const T> beta,
                                          SavedStats<T> saved, RunningStats<T> running,
                                          const BatchNormOptions& options = {});

// Running statistics: y = relu((x - running_mean) / sqrt(running_var + eps) * γ + β).
template <class T>
void batch_norm_relu_forward_inference(ConstTensorView<T> x, TensorView<T> y,
                                       std::span<uint8_t> mask, std::span<const T> gamma,
                                       std::span<const T> beta, std::span<const T> running_mean,
                                       std::span<const T> running_var, double eps = 1e-5);

template <class T>
void batch_norm_add_relu_forward_inference(ConstTensorView<T> x, ConstTensorView<T> z,
                                           TensorView<T> y, std::span<uint8_t> mask,
                                           std::span<const T> gamma, std::span<const T> beta,
                                           std::span<const T> running_mean,
                                           std::span<const T> running_var, double eps = 1e-5);

// mean/invstd and mode as for batch_norm_backward (training: the saved batch
// statistics; frozen: running mean and batch_norm_invstd(running_var, eps)).
// dx may be an empty view when only dγ, dβ are wanted; dx may alias dy when it
// has dy's strides.
template <class T>
void batch_norm_relu_backward(ConstTensorView<T> x, ConstTensorView<T> dy,
                              std::span<const uint8_t> mask, TensorView<T> dx,
                              std::span<const T> gamma, std::span<const T> mean,
                              std::span<const T> invstd, std::span<T> dgamma, std::span<T> dbeta,
                              BackwardMode mode = BackwardMode::training);

// As above, and dz = mask ? dy : 0 (dz: x's shape and strides; an empty view
// when not wanted). dx and dz must not overlap each other or x and dy.
template <class T>
void batch_norm_add_relu_backward(ConstTensorView<T> x, ConstTensorView<T> dy,
                                  std::span<const uint8_t> mask, TensorView<T> dx,
                                  TensorView<T> dz, std::span<const T> gamma,
                                  std::span<const T> mean, std::span<const T> invstd,
                                  std::span<T> dgamma, std::span<T> dbeta,
                                  BackwardMode mode = BackwardMode::training);

}  // namespace normkit
