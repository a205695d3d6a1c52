#pragma once
// The fused BN+ReLU / BN+Add+ReLU contract: what every implementation
// (src/cpu/, src/ref/) receives: checked problems in [outer, channels, inner]
// geometry (as kernels/batch_norm.hpp), plus the ReLU mask and where each
// element's bit is. The public functions (src/ops/batch_norm_fused.cpp) check
// arguments, pick an implementation (core/dispatch.hpp) and own the saved and
// running statistics; implementations only compute.
#include <algorithm>
#include <array>
#include <cstdint>
#include <span>

#include "kernels/batch_norm.hpp"
#include "normkit/batch_norm.hpp"
#include "normkit/moments.hpp"
#include "normkit/tensor.hpp"

namespace normkit::kernels::bn_fused {

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
// numbers the elements densely in that order: the mask's bit order is part of
// the contract, so it is defined here.
inline MaskOrder mask_order_of(const Geometry& x) {
  struct Axis {
    int64_t extent, stride;
    int64_t* rank;
  };
  MaskOrder order;
  std::array<Axis, 3> axes{{{x.outer, x.outer_stride, &order.outer},
                            {x.channels, x.channel_stride, &order.channel},
                            {x.inner, x.inner_stride, &order.inner}}};
  // Axes of extent 1 address nothing; sort them last so they do not split a run.
  // A stable insertion sort: std::stable_sort allocates a buffer, even for three.
  const auto key = [](const Axis& a) { return a.extent > 1 ? a.stride : int64_t{-1}; };
  for (size_t i = 1; i < axes.size(); ++i)
    for (size_t j = i; j > 0 && key(axes[j]) > key(axes[j - 1]); --j) std::swap(axes[j], axes[j - 1]);
  int64_t step = 1;
  for (int k = 2; k >= 0; --k) {
    *axes[k].rank = step;
    step *= axes[k].extent;
  }
  return order;
}

// Forward: p = (x - mean)·invstd·γ + β [+ z];  y = relu(p);  mask bit = p > 0.
// training: the batch statistics are computed (moments out, eps given);
// otherwise mean/invstd are given.
template <class T>
struct Forward {
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
  bn::MomentsReport moments_done = {};  // training
};

// Backward: g = mask ? dy : 0; dz = g; BN backward of g (see bn::Backward).
template <class T>
struct Backward {
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

// One fast path for float data (core/dispatch.hpp): `decline` says why it
// cannot take x with the other views of the call and the mask's bit order
// (nullptr: it can).
struct Impl {
  const char* name;
  const char* (*decline)(const Geometry& x, std::span<const Geometry> others,
                         const MaskOrder& order);
  void (*forward)(const Forward<float>&);
  void (*backward)(const Backward<float>&);
};

// In the order tried (src/cpu/implementations.cpp).
std::span<const Impl> implementations();

namespace ref {
// Plain loops, double accumulation: the oracle the fast kernels are tested against.
template <class T> void forward(const Forward<T>& p);
template <class T> void backward(const Backward<T>& p);
}  // namespace ref

}  // namespace normkit::kernels::bn_fused
