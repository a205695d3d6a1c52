#pragma once
// What the fused BN+ReLU / BN+Add+ReLU implementations receive: validated
// problems in [outer, channels, inner] geometry (see batch_norm_kernels.hpp),
// plus the ReLU mask and where each element's bit is.
#include <cstdint>

#include "kernels/batch_norm.hpp"

namespace normkit::kernels {

// Bit index of element (o, c, i) = o·outer + c·channel + i·inner: the rank of
// its address among x's elements (batch_norm_fused.hpp). Computed from x's
// geometry by mask_order_of.
struct MaskOrder {
  int64_t outer = 0, channel = 0, inner = 0;
  int64_t bit(int64_t o, int64_t c, int64_t i) const noexcept {
    return o * outer + c * channel + i * inner;
  }
  bool operator==(const MaskOrder&) const = default;
};

// Sorts x's three axes by decreasing stride (ties: outer, channel, inner) and
// numbers the elements densely in that order.
MaskOrder mask_order_of(const Geometry& x);

// Forward: p = (x - mean)·invstd·γ + β [+ z];  y = relu(p);  mask bit = p > 0.
// training: the batch statistics are computed (moments out, eps given);
// otherwise mean/invstd are given.
template <class T>
struct FusedForward {
  Geometry x_geom, z_geom, y_geom;
  const T* x;
  const T* z;  // nullptr: BN+ReLU
  T* y;
  uint8_t* mask;  // nullptr: not wanted
  MaskOrder order;
  const T* gamma;
  const T* beta;
  bool training;
  double eps;          // training
  Moments* moments;    // training: out, one per channel
  const double* mean;  // inference
  const double* invstd;
};

// Backward: g = mask ? dy : 0; dz = g; BN backward of g (see Backward).
template <class T>
struct FusedBackward {
  Geometry x_geom, dy_geom, dx_geom, dz_geom;
  const T* x;
  const T* dy;
  const uint8_t* mask;
  MaskOrder order;
  T* dx;  // nullptr: not wanted
  T* dz;  // nullptr: not wanted (or BN+ReLU)
  const T* gamma;
  const double* mean;
  const double* invstd;
  BackwardMode mode;
  double* sum_dy;       // out: Σg per channel (= dβ)
  double* sum_dy_xhat;  // out: Σg·x̂ per channel (= dγ)
};

// Bits of `count` elements from bit `first` on: bit (first + k) = (v[k] > 0),
// for a run of floats; the bytes at the run's two ends are shared with other
// runs (other threads), so those are updated atomically.
void pack_positive_bits(const float* v, int64_t count, uint8_t* mask, int64_t first);

namespace ref {
template <class T> void fused_forward(const FusedForward<T>& p);
template <class T> void fused_backward(const FusedBackward<T>& p);
}  // namespace ref

namespace fused_cpu {
// The fast float kernels; each returns why it cannot take the problem
// (nullptr: done).
const char* forward(const FusedForward<float>& p);
const char* backward(const FusedBackward<float>& p);
}  // namespace fused_cpu

}  // namespace normkit::kernels
