#pragma once
// What group-normalization implementations receive: validated problems in
// [N, C, S] geometry (S = the spatial axes viewed as one) with per-(n, g)
// statistics in double. src/group_norm.cpp checks arguments and owns the
// running statistics of instance norm; implementations only compute.
#include <cstdint>

#include "normkit/moments.hpp"

namespace normkit::kernels::gn {

// Element (n, c, s) sits at n·n_stride + c·c_stride + s·s_stride. Unlike
// Geometry, N stays apart from the spatial axes even for channels-last data:
// group statistics are per sample.
struct SampleGeometry {
  int64_t n = 0, c = 0, s = 0;
  int64_t n_stride = 0, c_stride = 0, s_stride = 0;

  int64_t offset(int64_t in, int64_t ic, int64_t is) const noexcept {
    return in * n_stride + ic * c_stride + is * s_stride;
  }
  bool same_extent(const SampleGeometry& o) const noexcept {
    return n == o.n && c == o.c && s == o.s;
  }
  bool operator==(const SampleGeometry&) const = default;
};

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

// A float implementation: `decline` says why it cannot take a problem (nullptr: it can).
struct Implementation {
  const char* name;
  const char* (*decline)(const SampleGeometry& x, const SampleGeometry* others, int count);
  void (*forward)(const Forward<float>&);
  void (*backward)(const Backward<float>&);
  void (*moments)(const SampleGeometry&, const float*, int64_t groups, Moments*);
};

const Implementation* cpu_implementations(int* count);  // src/cpu/group_norm_cpu.cpp

namespace ref {
template <class T> void moments(const SampleGeometry& g, const T* x, int64_t groups, Moments* out);
template <class T> void forward(const Forward<T>& p);
template <class T> void backward(const Backward<T>& p);
}  // namespace ref

}  // namespace normkit::kernels::gn
