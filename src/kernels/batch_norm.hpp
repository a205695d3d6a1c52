#pragma once
// The batch-normalization contract: what every implementation (src/cpu/,
// src/ref/) receives: checked problems in [outer, channels, inner] geometry
// with per-channel statistics in double. The public functions (src/ops/
// batch_norm.cpp) check arguments, pick an implementation (core/dispatch.hpp)
// and own the running statistics; implementations only compute, and tell a
// forward-training's caller when each block of channels' moments is final.
#include <cmath>
#include <span>

#include "normkit/batch_norm.hpp"
#include "normkit/moments.hpp"
#include "normkit/tensor.hpp"

namespace normkit::kernels::bn {

// A forward-training's report that the moments of channels [c0, c0 + n) are
// final, made on the thread that computed them, once per channel; `call`
// (optional) does not throw. The op's per-channel work on the moments (running
// and saved statistics) runs there and reads them where they were written:
// from the caller, after the region, it pulled every other thread's moments
// from that core's cache (32x4096 at 2 threads: 9 of 44 us).
// `invstd`, when the kernel has it, is invstd_of(biased variance, eps) of those
// channels in double, so that the saved invstd is not computed a second time
// (with thousands of channels and few rows its divisions and square roots are
// a tenth of the forward pass).
struct MomentsReport {
  void (*call)(const void* context, int64_t c0, int64_t n, const double* invstd) = nullptr;
  const void* context = nullptr;
  void operator()(int64_t c0, int64_t n, const double* invstd = nullptr) const {
    if (call) call(context, c0, n, invstd);
  }
};

// Forward-training: the batch statistics, then y.
template <class T>
struct Forward {
  Geometry x_geom, y_geom;
  const T* x;
  T* y;
  const T* gamma;  // nullptr: γ = 1
  const T* beta;   // nullptr: β = 0
  double eps;
  Moments* moments;  // out: one per channel
  MomentsReport moments_done = {};
};

// y = (x - mean) * invstd * γ + β with given per-channel statistics.
template <class T>
struct Apply {
  Geometry x_geom, y_geom;
  const T* x;
  T* y;
  const T* gamma;
  const T* beta;
  const double* mean;
  const double* invstd;
};

template <class T>
struct Backward {
  Geometry x_geom, dy_geom, dx_geom;
  const T* x;
  const T* dy;
  T* dx;  // nullptr: not wanted
  const T* gamma;
  const double* mean;
  const double* invstd;
  BackwardMode mode;
  double* sum_dy;        // out: Σdy per channel (= dβ)
  double* sum_dy_xhat;   // out: Σdy·x̂ per channel (= dγ)
};

// Training-mode dx from given per-channel sums over `count` values per channel
// (synchronized BN: the sums and count are the whole batch's, x and dy a shard;
// batch_norm_backward_apply). Backward with dx == nullptr computes the sums.
template <class T>
struct BackwardApply {
  Geometry x_geom, dy_geom, dx_geom;
  const T* x;
  const T* dy;
  T* dx;
  const T* gamma;
  const double* mean;
  const double* invstd;
  const double* sum_dy;
  const double* sum_dy_xhat;
  double count;
};

inline double invstd_of(double biased_var, double eps) { return 1.0 / std::sqrt(biased_var + eps); }

// Per-channel moments of x (batch_norm_moments).
template <class T>
struct Statistics {
  Geometry x_geom;
  const T* x;
  Moments* moments;  // out: one per channel
};

// One fast path for float data (core/dispatch.hpp): `decline` says why it
// cannot take x with the other views of the call (nullptr: it can).
struct Impl {
  const char* name;
  const char* (*decline)(const Geometry& x, std::span<const Geometry> others);
  void (*forward)(const Forward<float>&);
  void (*apply)(const Apply<float>&);
  void (*backward)(const Backward<float>&);
  void (*moments)(const Statistics<float>&);
  void (*backward_apply)(const BackwardApply<float>&);
};

// In the order tried (src/cpu/implementations.cpp).
std::span<const Impl> implementations();

namespace ref {
// Plain loops, double accumulation: the oracle the fast kernels are tested against.
template <class T> void forward(const Forward<T>& p);
template <class T> void apply(const Apply<T>& p);
template <class T> void backward(const Backward<T>& p);
template <class T> void moments(const Statistics<T>& p);
template <class T> void backward_apply(const BackwardApply<T>& p);
}  // namespace ref

}  // namespace normkit::kernels::bn
