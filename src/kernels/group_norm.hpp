#pragma once
// The group-normalization contract: what every implementation (src/cpu/,
// src/ref/) receives: checked problems in [N, C, S] geometry (S = the spatial
// axes viewed as one) with per-(n, g) statistics in double. The public
// functions (src/ops/group_norm.cpp) check arguments, pick an implementation
// (core/dispatch.hpp) and own the running statistics of instance norm;
// implementations only compute.
#include <cstdint>
#include <span>

#include "core/sample_geometry.hpp"
#include "normkit/moments.hpp"

namespace normkit::kernels::gn {

template <class T>
struct Forward {
  SampleGeometry x_geom, y_geom;
  const T* x;
  T* y;
  const T* gamma;  // nullptr: γ = 1
  const T* beta;   // nullptr: β = 0
  int64_t groups;
  double eps;
  Moments* moments;  // out: N·G, order n·G + g
};

template <class T>
struct Backward {
  SampleGeometry x_geom, dy_geom, dx_geom;
  const T* x;
  const T* dy;
  T* dx;  // nullptr: not wanted
  const T* gamma;
  int64_t groups;
  const double* mean;    // N·G
  const double* invstd;  // N·G
  double* dgamma;        // out: C (Σ_n Σ_s dy·x̂)
  double* dbeta;         // out: C (Σ_n Σ_s dy)
};

// Per-(n, g) moments of x (group_norm_moments).
template <class T>
struct Statistics {
  SampleGeometry x_geom;
  const T* x;
  int64_t groups;
  Moments* moments;  // out: N·G, order n·G + g
};

// One fast path for float data (core/dispatch.hpp): `decline` says why it
// cannot take x with the other views of the call (nullptr: it can).
struct Impl {
  const char* name;
  const char* (*decline)(const SampleGeometry& x, std::span<const SampleGeometry> others);
  void (*forward)(const Forward<float>&);
  void (*backward)(const Backward<float>&);
  void (*moments)(const Statistics<float>&);
};

// In the order tried (src/cpu/implementations.cpp).
std::span<const Impl> implementations();

namespace ref {
template <class T> void moments(const Statistics<T>& p);
template <class T> void forward(const Forward<T>& p);
template <class T> void backward(const Backward<T>& p);
}  // namespace ref

}  // namespace normkit::kernels::gn
