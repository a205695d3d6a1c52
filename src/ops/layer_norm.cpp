// The public layer-norm and RMS-norm functions: check every argument, then run
// the first fast path that takes the problem (core/dispatch.hpp) or the
// reference (double data). Nothing is written before
// all checks have passed; saved statistics are written only once they are
// known to be finite.
#include "normkit/layer_norm.hpp"

#include <cmath>
#include <string>
#include <span>

#include "core/check.hpp"
#include "core/dispatch.hpp"
#include "core/norm_checks.hpp"
#include "core/workspace.hpp"
#include "kernels/layer_norm.hpp"

namespace normkit {

using detail::check_count;
using detail::check_eps;
using detail::fail_invalid;
using detail::fail_runtime;
using detail::or_null;
using detail::Workspace;
namespace ln = kernels::ln;
using ln::Centering;

namespace {

template <class T>
std::string describe(const RowsView<T>& v) {
  return detail::concat("[", v.rows, " rows x ", v.cols, " cols, row stride ", v.row_stride, "]");
}

template <class T>
void check_input(const RowsView<T>& v, const char* name) {
  if (v.rows < 0 || v.cols < 0) fail_invalid(name, ": negative size ", describe(v));
  if (v.rows == 0 || v.cols == 0) fail_invalid(name, ": empty tensor ", describe(v));
  if (!v.data) fail_invalid(name, ": data pointer is null");
  // One row needs no stride; otherwise rows must not overlap.
  if (v.rows > 1 && v.row_stride < v.cols)
    fail_invalid(name, ": row stride ", v.row_stride, " is smaller than the row length ", v.cols,
                 " (rows would overlap)");
}

// A view walked together with x: same extent; in place only with the same stride.
template <class T, class X>
void check_rows_like(const RowsView<T>& v, const RowsView<X>& x, const char* name, const char* x_name) {
  if (v.rows != x.rows || v.cols != x.cols)
    fail_invalid(name, ": ", v.rows, " rows x ", v.cols, " cols do not match ", x_name, "'s ",
                 x.rows, " x ", x.cols);
  check_input(v, name);
  if (static_cast<const void*>(v.data) == static_cast<const void*>(x.data) && v.rows > 1 &&
      v.row_stride != x.row_stride)
    fail_invalid(name, ": in-place use needs the same row stride as ", x_name, " (", v.row_stride,
                 " vs ", x.row_stride, ")");
}

template <class T>
void run_forward(const ln::Forward<T>& p, const char* op) {
  detail::run(op, ln::implementations(), &ln::Impl::forward, ln::ref::forward<T>, p, p.rows,
              p.cols);
}

template <class T>
void run_backward(const ln::Backward<T>& p, const char* op) {
  detail::run(op, ln::implementations(), &ln::Impl::backward, ln::ref::backward<T>, p, p.rows,
              p.cols);
}

// A row whose statistics are not finite held NaN or ∞ (or its variance
// overflowed); an infinite variance or mean square shows as invstd = 0.
void check_finite_rows(std::span<const double> mean, std::span<const double> invstd) {
  for (size_t r = 0; r < invstd.size(); ++r)
    if (!(std::isfinite(invstd[r]) && invstd[r] > 0) || (!mean.empty() && !std::isfinite(mean[r])))
      fail_runtime("x: row ", r,
                   " contains NaN or infinite values (or its variance overflows); saved "
                   "statistics left unchanged");
}

template <class T>
void check_statistics(std::span<const T> values, const char* name) {
  for (size_t r = 0; r < values.size(); ++r)
    if (!std::isfinite(static_cast<double>(values[r])))
      fail_invalid(name, "[", r, "] is not finite (", values[r], ")");
}

template <class T>
void backward_common(Centering centering, ConstRowsView<T> x, ConstRowsView<T> dy,
                     RowsView<T> dx, std::span<const T> gamma, std::span<const T> mean,
                     std::span<const T> invstd, std::span<T> dgamma, std::span<T> dbeta) {
  check_input(x, "x");
  check_rows_like(dy, x, "dy", "x");
  if (dx.data) {
    check_rows_like(dx, x, "dx", "x");
    check_rows_like(dx, dy, "dx", "dy");
  }
  check_count(gamma, x.cols, "weight (gamma)", "one per column", false);
  if (centering == Centering::layer) check_count(mean, x.rows, "mean", "one per row", true);
  check_count(invstd, x.rows, centering == Centering::layer ? "invstd" : "inv_rms", "one per row", true);
  check_count(dgamma, x.cols, "dgamma", "one per column", false);
  check_count(dbeta, x.cols, "dbeta", "one per column", false);
  check_statistics(mean, "mean");
  check_statistics(invstd, centering == Centering::layer ? "invstd" : "inv_rms");

  Workspace ws;
  const std::span<double> mean_d = ws.copy<double>(mean), invstd_d = ws.copy<double>(invstd);
  const std::span<double> dgamma_d = ws.take<double>(dgamma.empty() ? 0 : x.cols),
                          dbeta_d = ws.take<double>(dbeta.empty() ? 0 : x.cols);
  run_backward<T>({centering, x.rows, x.cols, x.data, x.row_stride, dy.data, dy.row_stride,
                   dx.data, dx.row_stride, or_null(gamma),
                   centering == Centering::layer ? mean_d.data() : nullptr, invstd_d.data(),
                   dgamma.empty() ? nullptr : dgamma_d.data(),
                   dbeta.empty() ? nullptr : dbeta_d.data()},
                  centering == Centering::layer ? "layer_norm_backward" : "rms_norm_backward");
  for (size_t j = 0; j < dgamma.size(); ++j) dgamma[j] = static_cast<T>(dgamma_d[j]);
  for (size_t j = 0; j < dbeta.size(); ++j) dbeta[j] = static_cast<T>(dbeta_d[j]);
}

}  // namespace

template <class T>
void layer_norm_forward(ConstRowsView<T> x, RowsView<T> y, std::span<const T> gamma,
                        std::span<const T> beta, LayerNormSaved<T> saved, double eps) {
  check_input(x, "x");
  check_rows_like(y, x, "y", "x");
  check_count(gamma, x.cols, "weight (gamma)", "one per column", false);
  check_count(beta, x.cols, "bias (beta)", "one per column", false);
  check_count(saved.mean, x.rows, "save_mean", "one per row", false);
  check_count(saved.invstd, x.rows, "save_invstd", "one per row", false);
  check_eps(eps);

  Workspace ws;
  const std::span<double> mean = ws.take<double>(x.rows), invstd = ws.take<double>(x.rows);
  run_forward<T>({Centering::layer, x.rows, x.cols, x.data, x.row_stride, y.data, y.row_stride,
                  or_null(gamma), or_null(beta), eps, mean.data(), invstd.data()},
                 "layer_norm_forward");
  check_finite_rows(mean, invstd);
  for (size_t r = 0; r < saved.mean.size(); ++r) saved.mean[r] = static_cast<T>(mean[r]);
  for (size_t r = 0; r < saved.invstd.size(); ++r) saved.invstd[r] = static_cast<T>(invstd[r]);
}

template <class T>
void layer_norm_backward(ConstRowsView<T> x, ConstRowsView<T> dy, RowsView<T> dx,
                         std::span<const T> gamma, std::span<const T> mean,
                         std::span<const T> invstd, std::span<T> dgamma, std::span<T> dbeta) {
  backward_common<T>(Centering::layer, x, dy, dx, gamma, mean, invstd, dgamma, dbeta);
}

template <class T>
void rms_norm_forward(ConstRowsView<T> x, RowsView<T> y, std::span<const T> gamma, double eps,
                      std::span<T> save_inv_rms) {
  check_input(x, "x");
  check_rows_like(y, x, "y", "x");
  check_count(gamma, x.cols, "weight (gamma)", "one per column", false);
  check_count(save_inv_rms, x.rows, "save_inv_rms", "one per row", false);
  check_eps(eps);

  Workspace ws;
  const std::span<double> inv_rms = ws.take<double>(x.rows);
  run_forward<T>({Centering::rms, x.rows, x.cols, x.data, x.row_stride, y.data, y.row_stride,
                  or_null(gamma), nullptr, eps, nullptr, inv_rms.data()},
                 "rms_norm_forward");
  check_finite_rows({}, inv_rms);
  for (size_t r = 0; r < save_inv_rms.size(); ++r) save_inv_rms[r] = static_cast<T>(inv_rms[r]);
}

template <class T>
void rms_norm_backward(ConstRowsView<T> x, ConstRowsView<T> dy, RowsView<T> dx,
                       std::span<const T> gamma, std::span<const T> inv_rms, std::span<T> dgamma) {
  backward_common<T>(Centering::rms, x, dy, dx, gamma, {}, inv_rms, dgamma, {});
}

#define NORMKIT_INSTANTIATE_ROWS(T)                                                             \
  template void layer_norm_forward<T>(ConstRowsView<T>, RowsView<T>, std::span<const T>,        \
                                      std::span<const T>, LayerNormSaved<T>, double);           \
  template void layer_norm_backward<T>(ConstRowsView<T>, ConstRowsView<T>, RowsView<T>,         \
                                       std::span<const T>, std::span<const T>,                  \
                                       std::span<const T>, std::span<T>, std::span<T>);         \
  template void rms_norm_forward<T>(ConstRowsView<T>, RowsView<T>, std::span<const T>, double,  \
                                    std::span<T>);                                              \
  template void rms_norm_backward<T>(ConstRowsView<T>, ConstRowsView<T>, RowsView<T>,           \
                                     std::span<const T>, std::span<const T>, std::span<T>);

NORMKIT_INSTANTIATE_ROWS(float)
NORMKIT_INSTANTIATE_ROWS(double)

}  // namespace normkit
