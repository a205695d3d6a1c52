#pragma once
// The layer-norm / RMS-norm contract: what every implementation (src/cpu/,
// src/ref/) receives: checked problems of `rows` rows of `cols` contiguous
// values. The public functions (src/ops/layer_norm.cpp) check arguments and
// pick an implementation (core/dispatch.hpp); implementations only compute.
#include <cstdint>
#include <span>

namespace normkit::kernels::ln {

// layer: centre each row by its mean (LayerNorm); rms: do not (RMSNorm, mean = 0,
// no β, and the Σg term of the gradient vanishes).
enum class Centering { layer, rms };

template <class T>
struct Forward {
  Centering centering;
  int64_t rows, cols;
  const T* x;
  int64_t x_stride;
  T* y;
  int64_t y_stride;
  const T* gamma;  // nullptr: γ = 1
  const T* beta;   // nullptr: β = 0 (always nullptr for rms)
  double eps;
  double* mean;    // out, per row (layer only; nullptr for rms)
  double* invstd;  // out, per row: 1/sqrt(var + eps) (layer) or 1/sqrt(Σx²/N + eps) (rms)
};

template <class T>
struct Backward {
  Centering centering;
  int64_t rows, cols;
  const T* x;
  int64_t x_stride;
  const T* dy;
  int64_t dy_stride;
  T* dx;  // nullptr: not wanted
  int64_t dx_stride;
  const T* gamma;        // nullptr: γ = 1
  const double* mean;    // per row (layer); nullptr for rms
  const double* invstd;  // per row
  double* dgamma;        // out, per column; nullptr: not wanted
  double* dbeta;         // out, per column (layer only); nullptr: not wanted
};

// One fast path for float data (core/dispatch.hpp): `decline` says why it
// cannot take rows × cols (nullptr: it can).
struct Impl {
  const char* name;
  const char* (*decline)(int64_t rows, int64_t cols);
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

}  // namespace normkit::kernels::ln
