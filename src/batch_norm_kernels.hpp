#pragma once
// What every batch-normalization implementation receives: validated problems in
// [outer, channels, inner] geometry with per-channel statistics in double.
// The public functions in batch_norm.cpp check arguments, pick an
// implementation and own the running statistics; implementations only compute.
#include <cmath>
#include <span>

#include "normkit/batch_norm.hpp"
#include "normkit/moments.hpp"
#include "normkit/tensor.hpp"

namespace normkit::kernels {

template <class T>
struct ForwardTraining {
  Geometry x_geom, y_geom;
  const T* x;
  T* y;
  const T* gamma;  // nullptr: γ = 1
  const T* beta;   // nullptr: β = 0
  double eps;
  Moments* moments;  // out: one per channel
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
// (synchronized BN: the sums and count are the whole batch's, x and dy a shard).
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

// y = (x - mean) * invstd * γ + β as one subtraction and one multiply-add in
// float: y = (x - mean_hi) * scale + shift, mean_hi = float(mean),
// scale = γ·invstd, shift = β - (mean - mean_hi)·scale. x - mean_hi is exact
// when x is near the mean, so large means (1e6 with std 1) keep their digits;
// the textbook fold shift = β - mean·scale would lose them.
struct ApplyCoefficients {
  float mean_hi, scale, shift;
};
inline ApplyCoefficients apply_coefficients(double mean, double invstd, double gamma, double beta) {
  const float mean_hi = static_cast<float>(mean);
  const double scale = gamma * invstd;
  return {mean_hi, static_cast<float>(scale),
          static_cast<float>(beta - (mean - static_cast<double>(mean_hi)) * scale)};
}

// Training backward folded into dx = a·dy + b·(x - mean_hi) + k:
//   a = γ·invstd,  b = -a·invstd·dγ/M,  k = -a·dβ/M - b·(mean - mean_hi).
// Frozen: b = k = 0.
struct BackwardCoefficients {
  float mean_hi, a, b, k;
};
inline BackwardCoefficients backward_coefficients(double mean, double invstd, double gamma,
                                                  double sum_dy, double sum_dy_xhat, double count,
                                                  BackwardMode mode) {
  const float mean_hi = static_cast<float>(mean);
  const double a = gamma * invstd;
  if (mode == BackwardMode::frozen) return {mean_hi, static_cast<float>(a), 0.0f, 0.0f};
  const double b = -a * invstd * sum_dy_xhat / count;
  const double k = -a * sum_dy / count - b * (mean - static_cast<double>(mean_hi));
  return {mean_hi, static_cast<float>(a), static_cast<float>(b), static_cast<float>(k)};
}

// An implementation for float data. `decline` returns why it cannot take a
// problem (nullptr: it can); the dispatcher asks them in order, fastest first.
struct Implementation {
  const char* name;
  const char* (*decline)(const Geometry& x, std::span<const Geometry> others);
  void (*forward_training)(const ForwardTraining<float>&);
  void (*apply)(const Apply<float>&);
  void (*backward)(const Backward<float>&);
  void (*moments)(const Geometry&, const float*, Moments*);
  void (*backward_apply)(const BackwardApply<float>&);
};

std::span<const Implementation> cpu_implementations();  // fast kernels, src/cpu

namespace ref {
// Plain loops, double accumulation: the oracle the fast kernels are tested against.
template <class T> void forward_training(const ForwardTraining<T>& p);
template <class T> void apply(const Apply<T>& p);
template <class T> void backward(const Backward<T>& p);
template <class T> void moments(const Geometry& g, const T* x, Moments* out);
template <class T> void backward_apply(const BackwardApply<T>& p);
}  // namespace ref

}  // namespace normkit::kernels
