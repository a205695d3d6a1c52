// Layer normalization and RMS normalization (normkit/layer_norm.hpp): x's trailing
// dimensions (normalized_shape) are a row, the leading ones count the rows. x is used
// in place when its rows are contiguous and equally spaced (any C-contiguous array,
// or a slice of wider rows); otherwise it is copied.
#include <limits>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "families.hpp"
#include "numpy_views.hpp"

namespace normkit::python {
namespace {

struct RowsShape {
  int64_t rows = 1, cols = 1;
  py::ssize_t leading = 0;  // number of leading (row) dimensions
};

RowsShape rows_shape(const py::array& x, const std::vector<int64_t>& normalized_shape,
                     const char* name) {
  const auto k = static_cast<py::ssize_t>(normalized_shape.size());
  if (k == 0) value_error("normalized_shape: expected at least one dimension, got ()");
  bool matches = x.ndim() >= k;
  for (py::ssize_t i = 0; matches && i < k; ++i)
    matches = x.shape(x.ndim() - k + i) == normalized_shape[static_cast<size_t>(i)];
  if (!matches)
    value_error(std::string(name) + ": expected shape [*, " + repr_of(py::tuple(py::cast(normalized_shape))) +
                "] (normalized_shape last), got " + shape_of(x));
  RowsShape s;
  s.leading = x.ndim() - k;
  for (py::ssize_t i = 0; i < s.leading; ++i) s.rows *= x.shape(i);
  for (const int64_t n : normalized_shape) s.cols *= n;
  return s;
}

// The rows of `a` as a RowsView, or nullopt when they are not contiguous and equally spaced.
template <class T>
std::optional<RowsView<T>> rows_view(T* data, const py::array& a, const RowsShape& s) {
  if (!strides_expressible<std::remove_const_t<T>>(a)) return std::nullopt;
  const auto element = static_cast<py::ssize_t>(sizeof(T));
  // Trailing dimensions: one dense run of cols values (size-1 axes address nothing).
  py::ssize_t expected = 1;
  for (py::ssize_t axis = a.ndim() - 1; axis >= s.leading; --axis) {
    if (a.shape(axis) != 1 && a.strides(axis) / element != expected) return std::nullopt;
    expected *= a.shape(axis);
  }
  // Leading dimensions: collapse to one row stride.
  int64_t row_stride = s.cols, inner_extent = 1;
  bool found = false;
  for (py::ssize_t axis = s.leading - 1; axis >= 0; --axis) {
    if (a.shape(axis) == 1) continue;
    const int64_t stride = a.strides(axis) / element;
    if (!found) {
      row_stride = stride;
      found = true;
    } else if (stride != row_stride * inner_extent) {
      return std::nullopt;
    }
    inner_extent *= a.shape(axis);
  }
  if (s.rows > 1 && row_stride < s.cols) return std::nullopt;  // overlapping or reversed rows
  return RowsView<T>{data, s.rows, s.cols, s.rows > 1 ? row_stride : s.cols};
}

template <class T>
std::pair<py::array, ConstRowsView<T>> input_rows(py::array a, const RowsShape& s) {
  if (auto v = rows_view<const T>(static_cast<const T*>(a.data()), a, s)) return {a, *v};
  a = numpy().attr("ascontiguousarray")(a).cast<py::array>();
  return {a, *rows_view<const T>(static_cast<const T*>(a.data()), a, s)};
}

// out= or a new C-contiguous array of x's shape.
template <class T>
std::pair<py::array, RowsView<T>> output_rows(const py::object& out, const py::array& x,
                                                  const RowsShape& s) {
  py::array a = out.is_none() ? numpy().attr("empty")(x.attr("shape"), x.dtype()).cast<py::array>()
                              : writable_like<T>(out, x, "out");
  auto v = rows_view<T>(static_cast<T*>(a.mutable_data()), a, s);
  if (!v) value_error("out: its rows (the normalized dimensions) must be contiguous and equally spaced");
  return {a, *v};
}

std::vector<py::ssize_t> leading_shape(const py::array& x, const RowsShape& s) {
  std::vector<py::ssize_t> shape;
  for (py::ssize_t i = 0; i < s.leading; ++i) shape.push_back(x.shape(i));
  return shape;
}

// count values in any shape, read flat: per-column parameters (weight, bias:
// normalized_shape or flat) and per-row statistics from forward. what says which.
template <class T>
Values<T> reshaped_values(const py::object& object, int64_t count, const char* what,
                          const char* name) {
  py::array a = checked_array(object, name);
  if (a.size() != count)
    value_error(std::string(name) + ": expected " + std::to_string(count) + " values (" + what +
                "), got shape " + shape_of(a));
  auto values = Values<T>::ensure(a.attr("reshape")(count));
  if (!values) type_error(std::string(name) + ": cannot convert " + dtype_of(a) + " to x's dtype");
  return values;
}

template <class T>
std::optional<Values<T>> column_values(const py::object& object, const RowsShape& s,
                                       const char* name) {
  if (object.is_none()) return std::nullopt;
  return reshaped_values<T>(object, s.cols, "normalized_shape", name);
}

template <class T>
Values<T> row_values(const py::object& object, const RowsShape& s, const char* name) {
  if (object.is_none()) value_error(std::string(name) + " is required");
  return reshaped_values<T>(object, s.rows, "one per row", name);
}

// A parameter's gradient of normalized_shape when wanted (else None and an empty span).
template <class T>
std::pair<py::object, std::span<T>> parameter_gradient(bool wanted,
                                                       const std::vector<int64_t>& shape) {
  if (!wanted) return {py::none(), {}};
  py::array_t<T> a(std::vector<py::ssize_t>(shape.begin(), shape.end()));
  return {a, span_of(a)};
}

template <class T>
py::tuple rows_forward(bool rms, py::array x, const std::vector<int64_t>& normalized_shape,
                       const py::object& weight, const py::object& bias, double eps,
                       const py::object& out) {
  x = readable<T>(x);
  const RowsShape s = rows_shape(x, normalized_shape, "x");
  auto [y, yv] = output_rows<T>(out, x, s);
  check_no_partial_overlap(y, x, "out", "x");
  auto [source, xv] = input_rows<T>(x, s);
  const auto gamma = column_values<T>(weight, s, "weight");
  const auto beta = column_values<T>(bias, s, "bias");
  const auto leading = leading_shape(x, s);
  py::array_t<T> mean(leading), invstd(leading);
  const std::span<T> mean_span = span_of(mean), invstd_span = span_of(invstd);
  {
    py::gil_scoped_release unlocked;
    if (rms)
      rms_norm_forward<T>(xv, yv, span_of(gamma), eps, invstd_span);
    else
      layer_norm_forward<T>(xv, yv, span_of(gamma), span_of(beta), {mean_span, invstd_span}, eps);
  }
  if (rms) return py::make_tuple(y, invstd);
  return py::make_tuple(y, mean, invstd);
}

template <class T>
py::tuple rows_backward(bool rms, py::array x, const py::object& dy_object,
                        const std::vector<int64_t>& normalized_shape, const py::object& weight,
                        const py::object& mean_object, const py::object& invstd_object,
                        const py::object& out, bool compute_dx, bool compute_dweight,
                        bool compute_dbias) {
  x = readable<T>(x);
  const RowsShape s = rows_shape(x, normalized_shape, "x");
  py::array dy = readable_like<T>(dy_object, x, "dy");
  std::optional<py::array> dx;
  RowsView<T> dxv;
  if (compute_dx) {
    auto [array, view] = output_rows<T>(out, x, s);
    check_no_partial_overlap(array, x, "out", "x");
    check_no_partial_overlap(array, dy, "out", "dy");
    dx = array;
    dxv = view;
  } else if (!out.is_none()) {
    value_error("out: given, but compute_dx is False");
  }
  auto [x_source, xv] = input_rows<T>(x, s);
  auto [dy_source, dyv] = input_rows<T>(dy, s);
  const auto gamma = column_values<T>(weight, s, "weight");
  const auto invstd = row_values<T>(invstd_object, s, rms ? "inv_rms" : "invstd");
  const auto mean = rms ? std::optional<Values<T>>() : row_values<T>(mean_object, s, "mean");
  auto [dgamma, dgamma_span] = parameter_gradient<T>(compute_dweight, normalized_shape);
  auto [dbeta, dbeta_span] = parameter_gradient<T>(compute_dbias && !rms, normalized_shape);
  {
    py::gil_scoped_release unlocked;
    if (rms)
      rms_norm_backward<T>(xv, dyv, dxv, span_of(gamma), span_of(invstd), dgamma_span);
    else
      layer_norm_backward<T>(xv, dyv, dxv, span_of(gamma), span_of(*mean), span_of(invstd),
                             dgamma_span, dbeta_span);
  }
  py::object dx_object = dx ? py::object(*dx) : py::object(py::none());
  if (rms) return py::make_tuple(dx_object, dgamma);
  return py::make_tuple(dx_object, dgamma, dbeta);
}

// torch.nn.RMSNorm's eps=None: the machine epsilon of x's dtype.
double rms_eps(const std::optional<double>& eps, const py::array& x) {
  if (eps) return *eps;
  return has_dtype<float>(x) ? static_cast<double>(std::numeric_limits<float>::epsilon())
                             : std::numeric_limits<double>::epsilon();
}

}  // namespace

void register_layer_norm(py::module_& m) {
  m.def(
      "layer_norm_forward",
      [](const py::object& x, const std::vector<int64_t>& normalized_shape,
         const py::object& weight, const py::object& bias, double eps, const py::object& out) {
        return by_dtype(x, [&](auto t, const py::array& a) {
          return rows_forward<decltype(t)>(false, a, normalized_shape, weight, bias, eps, out);
        });
      },
      py::arg("x"), py::arg("normalized_shape"), py::arg("weight") = py::none(),
      py::arg("bias") = py::none(), py::arg("eps") = kLayerNormEps, py::kw_only(),
      py::arg("out") = py::none(),
      R"doc(Layer normalization over x's trailing dimensions (normalized_shape).

Returns (y, mean, invstd); mean and invstd = 1 / sqrt(biased variance + eps) have x's
leading shape (one value per row). weight and bias hold normalized_shape's values.
float32 runs the fast kernels, float64 the reference implementation.)doc");

  m.def(
      "layer_norm_backward",
      [](const py::object& x, const py::object& dy, const std::vector<int64_t>& normalized_shape,
         const py::object& weight, const py::object& mean, const py::object& invstd,
         const py::object& out, bool compute_dx, bool compute_dweight, bool compute_dbias) {
        return by_dtype(x, [&](auto t, const py::array& a) {
          return rows_backward<decltype(t)>(false, a, dy, normalized_shape, weight, mean, invstd,
                                            out, compute_dx, compute_dweight, compute_dbias);
        });
      },
      py::arg("x"), py::arg("dy"), py::arg("normalized_shape"), py::arg("weight"),
      py::arg("mean"), py::arg("invstd"), py::kw_only(), py::arg("out") = py::none(),
      py::arg("compute_dx") = true, py::arg("compute_dweight") = true,
      py::arg("compute_dbias") = true,
      "Gradients of layer_norm_forward: returns (dx, dweight, dbias); each is None when not "
      "computed. mean and invstd are layer_norm_forward's.");

  m.def(
      "rms_norm_forward",
      [](const py::object& x, const std::vector<int64_t>& normalized_shape,
         const py::object& weight, std::optional<double> eps, const py::object& out) {
        return by_dtype(x, [&](auto t, const py::array& a) {
          return rows_forward<decltype(t)>(true, a, normalized_shape, weight, py::none(),
                                           rms_eps(eps, a), out);
        });
      },
      py::arg("x"), py::arg("normalized_shape"), py::arg("weight") = py::none(),
      py::arg("eps") = py::none(), py::kw_only(), py::arg("out") = py::none(),
      R"doc(RMS normalization over x's trailing dimensions: y = x / sqrt(mean(x**2) + eps) * weight.

Returns (y, inv_rms); inv_rms has x's leading shape. eps=None is the machine epsilon of
x's dtype (torch.nn.RMSNorm's default).)doc");

  m.def(
      "rms_norm_backward",
      [](const py::object& x, const py::object& dy, const std::vector<int64_t>& normalized_shape,
         const py::object& weight, const py::object& inv_rms, const py::object& out,
         bool compute_dx, bool compute_dweight) {
        return by_dtype(x, [&](auto t, const py::array& a) {
          return rows_backward<decltype(t)>(true, a, dy, normalized_shape, weight, py::none(),
                                            inv_rms, out, compute_dx, compute_dweight, false);
        });
      },
      py::arg("x"), py::arg("dy"), py::arg("normalized_shape"), py::arg("weight"),
      py::arg("inv_rms"), py::kw_only(), py::arg("out") = py::none(),
      py::arg("compute_dx") = true, py::arg("compute_dweight") = true,
      "Gradients of rms_norm_forward: returns (dx, dweight), None when not computed.");
}

}  // namespace normkit::python
