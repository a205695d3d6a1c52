#pragma once
// Layer normalization and RMS normalization over the trailing dimensions.
//
// The data are `rows` rows of `cols` values: cols is the product of the
// normalized shape (PyTorch's normalized_shape), rows the product of the
// leading dimensions. Within a row the values are contiguous; rows are
// `row_stride` elements apart (row_stride >= cols; a slice of wider rows works).
//
// LayerNorm, per row (PyTorch's native_layer_norm):
//   mean = Σx / N,  var = Σ(x - mean)² / N   (biased),  invstd = 1 / sqrt(var + eps)
//   y = (x - mean) · invstd · γ + β          (γ, β: one value per column)
// Backward, with x̂ = (x - mean)·invstd and g = dy·γ:
//   dx = invstd · (g - Σg / N - x̂ · Σ(g·x̂) / N)
//   dγ = Σ_rows dy·x̂,  dβ = Σ_rows dy        (column sums)
//
// RMSNorm (Zhang & Sennrich 2019; torch.nn.RMSNorm), per row:
//   inv_rms = 1 / sqrt(Σx² / N + eps),  y = x · inv_rms · γ
// Backward, with g = dy·γ:
//   dx = inv_rms · (g - x · inv_rms² · Σ(g·x) / N)
//   dγ = Σ_rows dy · x · inv_rms
//
// Spans of per-column values (γ, β, dγ, dβ) hold exactly cols values, spans of
// per-row values (saved statistics) exactly rows values; an empty span means
// "absent": γ = 1, β = 0, statistics not saved, gradient not wanted. A dx view
// with data == nullptr computes only the parameter gradients. Outputs may alias
// an input (in place) only with the same row stride.
//
// float views run the fast kernels; double views run the reference
// implementation (exact, not fast). Every function validates all of its
// arguments first and throws normkit::Error before changing anything. One check
// needs the data: forward raises a runtime error naming the first row whose
// statistics are NaN or infinite; y has been written by then, the saved
// statistics are left as they were.
//
// Results are bitwise identical for any number of threads: each row is
// normalized by one thread, and dγ, dβ are sums over fixed blocks of rows,
// combined in a fixed order.
#include <cstdint>
#include <span>
#include <type_traits>

namespace normkit {

// `rows` rows of `cols` contiguous values, `row_stride` elements apart.
template <class T>
struct RowsView {
  T* data = nullptr;
  int64_t rows = 0, cols = 0, row_stride = 0;

  static RowsView contiguous(T* data, int64_t rows, int64_t cols) {
    return {data, rows, cols, cols};
  }
  operator RowsView<const std::remove_const_t<T>>() const
    requires(!std::is_const_v<T>)
  {
    return {data, rows, cols, row_stride};
  }
};

template <class T>
using ConstRowsView = RowsView<const T>;

// Per-row outputs of layer_norm_forward that backward needs, as PyTorch saves them.
template <class T>
struct LayerNormSaved {
  std::span<T> mean;    // per row
  std::span<T> invstd;  // per row: 1 / sqrt(biased variance + eps)
};

// PyTorch's torch.nn.LayerNorm default.
constexpr double kLayerNormEps = 1e-5;

template <class T>
void layer_norm_forward(ConstRowsView<T> x, RowsView<T> y, std::span<const T> gamma,
                        std::span<const T> beta, LayerNormSaved<T> saved,
                        double eps = kLayerNormEps);

// mean, invstd: layer_norm_forward's saved statistics (required).
template <class T>
void layer_norm_backward(ConstRowsView<T> x, ConstRowsView<T> dy, RowsView<T> dx,
                         std::span<const T> gamma, std::span<const T> mean,
                         std::span<const T> invstd, std::span<T> dgamma, std::span<T> dbeta);

// save_inv_rms: per row, 1 / sqrt(Σx² / N + eps) (empty: not saved). eps has
// no default here: torch.nn.RMSNorm's eps=None means the machine epsilon of the
// data type (normkit.torch.RMSNorm passes it).
template <class T>
void rms_norm_forward(ConstRowsView<T> x, RowsView<T> y, std::span<const T> gamma, double eps,
                      std::span<T> save_inv_rms);

// inv_rms: rms_norm_forward's saved values (required).
template <class T>
void rms_norm_backward(ConstRowsView<T> x, ConstRowsView<T> dy, RowsView<T> dx,
                       std::span<const T> gamma, std::span<const T> inv_rms, std::span<T> dgamma);

}  // namespace normkit
