#pragma once
// What every layer-norm / RMS-norm implementation receives: validated problems
// of `rows` rows of `cols` contiguous values. The public functions in
// layer_norm.cpp check arguments and pick an implementation (float: the fast
// kernels in src/cpu/layer_norm_cpu.cpp; double: the reference in
// src/ref/layer_norm_ref.cpp); implementations only compute.
#include <cstdint>

namespace normkit::kernels::rows {

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

// Fast kernels for float (src/cpu/layer_norm_cpu.cpp).
void cpu_forward(const Forward<float>& p);
void cpu_backward(const Backward<float>& p);

namespace ref {
// Plain loops, double accumulation: the oracle the fast kernels are tested against.
template <class T> void forward(const Forward<T>& p);
template <class T> void backward(const Backward<T>& p);
}  // namespace ref

}  // namespace normkit::kernels::rows
