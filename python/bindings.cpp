// normkit's functional NumPy API (the extension module normkit._normkit).
//
// Arrays reach the kernels as they are: NumPy's byte strides become element
// strides, so transposed, sliced or channels-last arrays are not copied and the
// kernels choose their path from the strides, as in C++. The only copies made
// are of inputs NumPy lays out in a way a TensorView cannot express (strides
// that are not whole elements, misaligned data), of per-channel parameters
// given in another dtype or layout (C values, never x), and the staging in
// extents_agree below. Arrays that a function writes (out=, running statistics,
// num_batches_tracked) are never converted: a converted copy would take the
// result and leave the caller's array as it was, so they must already have the
// right dtype, shape and flags.
//
// Every check that needs Python happens before the GIL is released; the C++
// functions then check the rest before they write anything, so an exception
// leaves every array as it was. The one exception is NaN or infinity in a
// training batch: it shows in the statistics computed by the call that also
// writes y, so out= then holds that call's values (running statistics do not).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <limits>
#include <optional>
#include <sstream>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "normkit/normkit.hpp"
#include "normkit/standardizer.hpp"

namespace py = pybind11;
namespace nk = normkit;

namespace {

[[noreturn]] void type_error(const std::string& message) { throw py::type_error(message); }
[[noreturn]] void value_error(const std::string& message) { throw py::value_error(message); }

std::string repr_of(const py::handle& object) { return py::repr(object).cast<std::string>(); }
std::string type_name(const py::handle& object) {
  return py::str(py::type::of(object).attr("__name__")).cast<std::string>();
}
std::string shape_of(const py::array& a) { return repr_of(a.attr("shape")); }
std::string dtype_of(const py::array& a) { return py::str(a.dtype()).cast<std::string>(); }

py::module_ numpy() { return py::module_::import("numpy"); }

template <class T>
bool has_dtype(const py::array& a) {
  return py::isinstance<py::array_t<T>>(a);
}

bool is_aligned(const py::array& a) {
  return (a.flags() & py::detail::npy_api::NPY_ARRAY_ALIGNED_) != 0;
}

// x, dy: any array-like; NumPy converts lists, but the dtype must be one the
// library has kernels for, since a float16 or integer x converted silently to
// float32 would be a hidden full-size copy.
py::array float_array(const py::object& object, const char* name) {
  py::array a = py::array::ensure(object);
  if (!a) type_error(std::string(name) + ": expected an array, got " + type_name(object));
  if (!has_dtype<float>(a) && !has_dtype<double>(a))
    type_error(std::string(name) + ": expected float32 or float64 data, got " + dtype_of(a));
  return a;
}

// The layout names the order of x's axes; without one, channels-first by rank.
nk::Layout layout_for(const std::optional<std::string>& name, const py::array& x) {
  const auto ndim = x.ndim();
  nk::Layout layout = nk::Layout::NC;
  if (name) {
    layout = nk::layout_from_string(*name);
  } else {
    switch (ndim) {
      case 2: layout = nk::Layout::NC; break;
      case 3: layout = nk::Layout::NCL; break;
      case 4: layout = nk::Layout::NCHW; break;
      case 5: layout = nk::Layout::NCDHW; break;
      default:
        value_error("x: expected 2 to 5 dimensions (NC, NCL, NCHW, NCDHW), got shape " +
                    shape_of(x));
    }
  }
  if (nk::rank_of(layout) != ndim)
    value_error("x: layout " + std::string(nk::to_string(layout)) + " needs " +
                std::to_string(nk::rank_of(layout)) + " dimensions, got shape " + shape_of(x));
  return layout;
}

template <class T>
bool strides_expressible(const py::array& a) {
  if (!is_aligned(a)) return false;
  for (py::ssize_t axis = 0; axis < a.ndim(); ++axis)
    if (a.strides(axis) % static_cast<py::ssize_t>(sizeof(T)) != 0) return false;
  return true;
}

// An input the kernels read. order="K" keeps the memory order of the original.
template <class T>
py::array readable(py::array a) {
  if (strides_expressible<T>(a)) return a;
  return numpy().attr("array")(a, py::arg("copy") = true, py::arg("order") = "K");
}

template <class T>
nk::TensorView<T> view_of(T* data, const py::array& a, nk::Layout layout) {
  std::array<int64_t, nk::kMaxRank> sizes{}, strides{};
  const auto rank = static_cast<size_t>(a.ndim());
  for (size_t axis = 0; axis < rank; ++axis) {
    sizes[axis] = a.shape(static_cast<py::ssize_t>(axis));
    strides[axis] = a.strides(static_cast<py::ssize_t>(axis)) / static_cast<py::ssize_t>(sizeof(T));
  }
  return nk::TensorView<T>::strided(data, std::span<const int64_t>(sizes.data(), rank),
                                    std::span<const int64_t>(strides.data(), rank), layout);
}

template <class T>
nk::ConstTensorView<T> input_view(const py::array& a, nk::Layout layout) {
  return view_of<const T>(static_cast<const T*>(a.data()), a, layout);
}

template <class T>
nk::TensorView<T> output_view(py::array& a, nk::Layout layout) {
  return view_of<T>(static_cast<T*>(a.mutable_data()), a, layout);
}

// A second input of x's shape and dtype (dy).
template <class T>
py::array readable_like(const py::object& object, const py::array& x, const char* name) {
  py::array a = float_array(object, name);
  if (!has_dtype<T>(a))
    type_error(std::string(name) + ": dtype " + dtype_of(a) + " does not match x's " + dtype_of(x));
  if (!a.attr("shape").equal(x.attr("shape")))
    value_error(std::string(name) + ": shape " + shape_of(a) + " does not match x's shape " +
                shape_of(x));
  return readable<T>(a);
}

// An array the function writes in full: out=, or a new one in x's memory order
// (numpy.empty_like keeps it), so that x and y share a geometry and the kernels
// stream both the same way.
template <class T>
py::array writable_like(const py::object& out, const py::array& x, const char* name) {
  if (out.is_none()) return numpy().attr("empty_like")(x);
  if (!py::isinstance<py::array>(out))
    type_error(std::string(name) + ": expected a numpy.ndarray, got " + type_name(out));
  py::array a = py::reinterpret_borrow<py::array>(out);
  if (!has_dtype<T>(a))
    type_error(std::string(name) + ": dtype " + dtype_of(a) + " does not match x's " + dtype_of(x));
  if (!a.attr("shape").equal(x.attr("shape")))
    value_error(std::string(name) + ": shape " + shape_of(a) + " does not match x's shape " +
                shape_of(x));
  if (!a.writeable()) value_error(std::string(name) + ": array is read-only");
  if (!strides_expressible<T>(a))
    value_error(std::string(name) + ": array is misaligned or its strides are not whole elements");
  return a;
}

// Workaround for a library bug (reported): the implementations index every view of
// one call with x's [outer, C, inner] extents, but geometry_of folds each view on its
// own (rows form for one, planes for another), so two views of one shape can disagree
// and a kernel then reads or writes out of bounds. A call whose views disagree runs on
// C-contiguous copies (which always agree), and results are copied back afterwards.
template <class T>
bool extents_agree(nk::Layout layout,
                   std::initializer_list<std::pair<const py::array*, const char*>> arrays) {
  std::optional<nk::Geometry> first;
  for (const auto& [array, name] : arrays) {
    if (!array) continue;
    const auto view = view_of<const T>(static_cast<const T*>(array->data()), *array, layout);
    const nk::Geometry g = nk::geometry_of(view, name);
    if (!first)
      first = g;
    else if (!first->same_extent(g))
      return false;
  }
  return true;
}

py::array c_contiguous(const py::array& a) { return numpy().attr("ascontiguousarray")(a); }
py::array c_empty_like(const py::array& a) {
  return numpy().attr("empty_like")(a, py::arg("order") = "C");
}
void copy_into(const py::object& target, const py::array& source) {
  numpy().attr("copyto")(target, source);
}

// Exact aliasing is in-place computation, which the C++ functions check; any other
// overlap would let the kernels read values they have already overwritten.
void check_no_partial_overlap(const py::array& out, const py::array& in, const char* out_name,
                              const char* in_name) {
  if (out.data() == in.data()) return;
  if (numpy().attr("may_share_memory")(out, in).cast<bool>())
    value_error(std::string(out_name) + ": overlaps " + in_name +
                " (only exact in-place use, with the same strides, is supported)");
}

// A backward's dx: `out` (or a new array like x) when compute_dx, never partly
// overlapping x or dy; nothing when not wanted, and then `out` must not be given.
template <class T>
std::optional<py::array> gradient_out(const py::object& out, const py::array& x, const py::array& dy,
                                      bool compute_dx) {
  if (!compute_dx) {
    if (!out.is_none()) value_error("out: given, but compute_dx is False");
    return std::nullopt;
  }
  py::array dx = writable_like<T>(out, x, "out");
  check_no_partial_overlap(dx, x, "out", "x");
  check_no_partial_overlap(dx, dy, "out", "dy");
  return dx;
}

// Per-channel values the functions only read (γ, β, statistics): converted to x's
// dtype and made contiguous, at the cost of copying C values.
template <class T>
using Channels = py::array_t<T, py::array::c_style | py::array::forcecast>;

template <class T>
std::optional<Channels<T>> channel_values(const py::object& object, const char* name) {
  if (object.is_none()) return std::nullopt;
  py::array a = py::array::ensure(object);
  if (!a) type_error(std::string(name) + ": expected an array, got " + type_name(object));
  if (a.ndim() != 1)
    value_error(std::string(name) + ": expected a 1-D array of one value per channel, got shape " +
                shape_of(a));
  auto converted = Channels<T>::ensure(a);
  if (!converted)
    type_error(std::string(name) + ": cannot convert " + dtype_of(a) + " to the dtype of x");
  return converted;
}

template <class T>
std::span<const T> span_of(const std::optional<Channels<T>>& a) {
  if (!a) return {};
  return {a->data(), static_cast<size_t>(a->size())};
}

template <class T>
Channels<T> required_channel_values(const py::object& object, const char* name) {
  if (object.is_none()) value_error(std::string(name) + " is required");
  return *channel_values<T>(object, name);
}

// Per-channel arrays updated in place (running statistics): used as they are.
template <class T>
std::span<T> updated_in_place(const py::object& object, const char* name, const char* x_dtype) {
  if (object.is_none()) return {};
  if (!py::isinstance<py::array>(object))
    type_error(std::string(name) + ": expected a numpy.ndarray (it is updated in place), got " +
               type_name(object));
  py::array a = py::reinterpret_borrow<py::array>(object);
  if (!has_dtype<T>(a))
    type_error(std::string(name) + ": dtype " + dtype_of(a) + " does not match x's " + x_dtype +
               " (it is updated in place, so it is not converted)");
  if (a.ndim() != 1)
    value_error(std::string(name) + ": expected a 1-D array of one value per channel, got shape " +
                shape_of(a));
  if (!(a.flags() & py::array::c_style) || !is_aligned(a))
    value_error(std::string(name) + ": array must be contiguous and aligned (it is updated in place)");
  if (!a.writeable()) value_error(std::string(name) + ": array is read-only");
  return {static_cast<T*>(a.mutable_data()), static_cast<size_t>(a.size())};
}

int64_t* counter_in_place(const py::object& object) {
  if (object.is_none()) return nullptr;
  if (!py::isinstance<py::array>(object))
    type_error("num_batches_tracked: expected a numpy.ndarray of one int64 (it is updated in "
               "place), got " + type_name(object));
  py::array a = py::reinterpret_borrow<py::array>(object);
  if (!has_dtype<int64_t>(a))
    type_error("num_batches_tracked: expected dtype int64, got " + dtype_of(a));
  if (a.size() != 1)
    value_error("num_batches_tracked: expected one value, got shape " + shape_of(a));
  if (!is_aligned(a)) value_error("num_batches_tracked: array is misaligned");
  if (!a.writeable()) value_error("num_batches_tracked: array is read-only");
  return static_cast<int64_t*>(a.mutable_data());
}

nk::BatchNormOptions options_of(std::optional<double> momentum, double eps,
                                const std::string& momentum_convention,
                                const std::string& running_variance) {
  nk::BatchNormOptions options;
  options.eps = eps;
  options.momentum = momentum;
  if (momentum_convention == "weight_on_new")
    options.momentum_convention = nk::MomentumConvention::weight_on_new;
  else if (momentum_convention == "weight_on_old")
    options.momentum_convention = nk::MomentumConvention::weight_on_old;
  else
    value_error("momentum_convention: expected 'weight_on_new' (PyTorch) or 'weight_on_old' "
                "(Keras), got '" + momentum_convention + "'");
  if (running_variance == "unbiased")
    options.running_variance = nk::RunningVariance::unbiased;
  else if (running_variance == "biased")
    options.running_variance = nk::RunningVariance::biased;
  else
    value_error("running_variance: expected 'unbiased' (PyTorch) or 'biased' (Keras), got '" +
                running_variance + "'");
  return options;
}

int64_t channels_of(const py::array& x, nk::Layout layout) {
  return x.shape(nk::channel_axis(layout));
}

template <class T>
std::span<T> span_of(py::array_t<T>& a) {
  return {a.mutable_data(), static_cast<size_t>(a.size())};
}

// ---------------------------------------------------------------------------
// The functions, for one element type. Arguments arrive as Python objects so
// that the element type is decided by x alone.

template <class T>
py::tuple forward_training(py::array x, const py::object& weight, const py::object& bias,
                           const py::object& running_mean, const py::object& running_var,
                           const py::object& num_batches_tracked, const nk::BatchNormOptions& options,
                           const std::optional<std::string>& layout_name, const py::object& out) {
  const nk::Layout layout = layout_for(layout_name, x);
  x = readable<T>(x);
  py::array y = writable_like<T>(out, x, "out");
  check_no_partial_overlap(y, x, "out", "x");
  const auto gamma = channel_values<T>(weight, "weight");
  const auto beta = channel_values<T>(bias, "bias");
  const std::string x_dtype = dtype_of(x);
  const std::span<T> mean = updated_in_place<T>(running_mean, "running_mean", x_dtype.c_str());
  const std::span<T> var = updated_in_place<T>(running_var, "running_var", x_dtype.c_str());
  int64_t* batches = counter_in_place(num_batches_tracked);
  const int64_t channels = channels_of(x, layout);
  py::array_t<T> save_mean(channels), save_invstd(channels);

  py::object caller_out;
  if (!extents_agree<T>(layout, {{&x, "x"}, {&y, "out"}})) {
    caller_out = y;
    x = c_contiguous(x);
    y = c_empty_like(y);
  }

  const auto xv = input_view<T>(x, layout);
  const auto yv = output_view<T>(y, layout);
  const nk::SavedStats<T> saved{span_of(save_mean), span_of(save_invstd)};
  const nk::RunningStats<T> running{mean, var, batches};
  {
    py::gil_scoped_release unlocked;
    nk::batch_norm_forward_training<T>(xv, yv, span_of(gamma), span_of(beta), saved, running,
                                       options);
  }
  if (caller_out) {
    copy_into(caller_out, y);
    y = py::reinterpret_borrow<py::array>(caller_out);
  }
  return py::make_tuple(y, save_mean, save_invstd);
}

template <class T>
py::array forward_inference(py::array x, const py::object& weight, const py::object& bias,
                            const py::object& running_mean, const py::object& running_var,
                            double eps, const std::optional<std::string>& layout_name,
                            const py::object& out) {
  const nk::Layout layout = layout_for(layout_name, x);
  x = readable<T>(x);
  py::array y = writable_like<T>(out, x, "out");
  check_no_partial_overlap(y, x, "out", "x");
  const auto gamma = channel_values<T>(weight, "weight");
  const auto beta = channel_values<T>(bias, "bias");
  const auto mean = required_channel_values<T>(running_mean, "running_mean");
  const auto var = required_channel_values<T>(running_var, "running_var");

  py::object caller_out;
  if (!extents_agree<T>(layout, {{&x, "x"}, {&y, "out"}})) {
    caller_out = y;
    x = c_contiguous(x);
    y = c_empty_like(y);
  }
  const auto xv = input_view<T>(x, layout);
  const auto yv = output_view<T>(y, layout);
  {
    py::gil_scoped_release unlocked;
    nk::batch_norm_forward_inference<T>(xv, yv, span_of(gamma), span_of(beta),
                                        {mean.data(), static_cast<size_t>(mean.size())},
                                        {var.data(), static_cast<size_t>(var.size())}, eps);
  }
  if (caller_out) {
    copy_into(caller_out, y);
    return py::reinterpret_borrow<py::array>(caller_out);
  }
  return y;
}

template <class T>
py::array forward_apply(py::array x, const py::object& weight, const py::object& bias,
                        const py::object& mean_object, const py::object& invstd_object,
                        const std::optional<std::string>& layout_name, const py::object& out) {
  const nk::Layout layout = layout_for(layout_name, x);
  x = readable<T>(x);
  py::array y = writable_like<T>(out, x, "out");
  check_no_partial_overlap(y, x, "out", "x");
  const auto gamma = channel_values<T>(weight, "weight");
  const auto beta = channel_values<T>(bias, "bias");
  const auto mean = required_channel_values<T>(mean_object, "mean");
  const auto invstd = required_channel_values<T>(invstd_object, "invstd");

  py::object caller_out;
  if (!extents_agree<T>(layout, {{&x, "x"}, {&y, "out"}})) {
    caller_out = y;
    x = c_contiguous(x);
    y = c_empty_like(y);
  }
  const auto xv = input_view<T>(x, layout);
  const auto yv = output_view<T>(y, layout);
  {
    py::gil_scoped_release unlocked;
    nk::batch_norm_forward_apply<T>(xv, yv, span_of(gamma), span_of(beta),
                                    {mean.data(), static_cast<size_t>(mean.size())},
                                    {invstd.data(), static_cast<size_t>(invstd.size())});
  }
  if (caller_out) {
    copy_into(caller_out, y);
    return py::reinterpret_borrow<py::array>(caller_out);
  }
  return y;
}

nk::BackwardMode mode_of(const std::string& mode) {
  if (mode == "training") return nk::BackwardMode::training;
  if (mode == "frozen") return nk::BackwardMode::frozen;
  value_error("mode: expected 'training' or 'frozen', got '" + mode + "'");
}

template <class T>
py::tuple backward(py::array x, const py::object& dy_object, const py::object& weight,
                   const py::object& mean_object, const py::object& invstd_object,
                   const std::string& mode_name, const std::optional<std::string>& layout_name,
                   const py::object& out, bool compute_dx) {
  const nk::BackwardMode mode = mode_of(mode_name);
  const nk::Layout layout = layout_for(layout_name, x);
  x = readable<T>(x);
  py::array dy = readable_like<T>(dy_object, x, "dy");
  std::optional<py::array> dx = gradient_out<T>(out, x, dy, compute_dx);
  const auto gamma = channel_values<T>(weight, "weight");
  const auto mean = required_channel_values<T>(mean_object, "mean");
  const auto invstd = required_channel_values<T>(invstd_object, "invstd");
  const int64_t channels = channels_of(x, layout);
  py::array_t<T> dgamma(channels), dbeta(channels);

  py::object caller_out;
  if (!extents_agree<T>(layout, {{&x, "x"}, {&dy, "dy"}, {dx ? &*dx : nullptr, "out"}})) {
    x = c_contiguous(x);
    dy = c_contiguous(dy);
    if (dx) {
      caller_out = *dx;
      dx = c_empty_like(*dx);
    }
  }

  const auto xv = input_view<T>(x, layout);
  const auto dyv = input_view<T>(dy, layout);
  // An empty view (data == nullptr) asks for dγ and dβ only.
  nk::TensorView<T> dxv;
  if (dx) dxv = output_view<T>(*dx, layout);
  {
    py::gil_scoped_release unlocked;
    nk::batch_norm_backward<T>(xv, dyv, dxv, span_of(gamma),
                               {mean.data(), static_cast<size_t>(mean.size())},
                               {invstd.data(), static_cast<size_t>(invstd.size())},
                               span_of(dgamma), span_of(dbeta), mode);
  }
  if (caller_out) {
    copy_into(caller_out, *dx);
    dx = py::reinterpret_borrow<py::array>(caller_out);
  }
  return py::make_tuple(dx ? py::object(*dx) : py::object(py::none()), dgamma, dbeta);
}

template <class T>
py::array_t<nk::Moments> moments(py::array x, const std::optional<std::string>& layout_name) {
  const nk::Layout layout = layout_for(layout_name, x);
  x = readable<T>(x);
  py::array_t<nk::Moments> result(channels_of(x, layout));
  const auto xv = input_view<T>(x, layout);
  const std::span<nk::Moments> out(result.mutable_data(), static_cast<size_t>(result.size()));
  {
    py::gil_scoped_release unlocked;
    nk::batch_norm_moments<T>(xv, out);
  }
  return result;
}

py::array_t<nk::Moments> moments_array(const py::object& object, const char* name) {
  if (!py::isinstance<py::array_t<nk::Moments>>(object))
    type_error(std::string(name) + ": expected an array of normkit.moments_dtype (from "
               "batch_norm_moments), got " +
               (py::isinstance<py::array>(object)
                    ? dtype_of(py::reinterpret_borrow<py::array>(object))
                    : type_name(object)));
  auto a = py::array_t<nk::Moments, py::array::c_style>::ensure(object);
  if (a.ndim() != 1)
    value_error(std::string(name) + ": expected a 1-D array, got shape " + shape_of(a));
  return a;
}

template <class T>
void update_running(const py::array_t<nk::Moments>& batch, const py::object& running_mean,
                    const py::object& running_var, const py::object& num_batches_tracked,
                    const nk::BatchNormOptions& options, const char* dtype) {
  const std::span<T> mean = updated_in_place<T>(running_mean, "running_mean", dtype);
  const std::span<T> var = updated_in_place<T>(running_var, "running_var", dtype);
  int64_t* batches = counter_in_place(num_batches_tracked);
  const std::span<const nk::Moments> stats(batch.data(), static_cast<size_t>(batch.size()));
  nk::batch_norm_update_running<T>(stats, {mean, var, batches}, options);
}

template <class T>
py::array_t<T> invstd(const py::array& var_array, double eps) {
  const auto var = *channel_values<T>(var_array, "var");
  py::array_t<T> result(var.size());
  nk::batch_norm_invstd<T>({var.data(), static_cast<size_t>(var.size())}, eps, span_of(result));
  return result;
}

// A NumPy float32 array runs the fast kernels, float64 the reference.
template <class F>
auto by_dtype(const py::array& x, F&& call) {
  if (has_dtype<float>(x)) return call(float{});
  return call(double{});
}

py::dict options_dict(const nk::BatchNormOptions& options) {
  py::dict result;
  result["eps"] = options.eps;
  result["momentum"] = options.momentum ? py::object(py::float_(*options.momentum)) : py::object(py::none());
  result["momentum_convention"] =
      options.momentum_convention == nk::MomentumConvention::weight_on_new ? "weight_on_new"
                                                                            : "weight_on_old";
  result["running_variance"] =
      options.running_variance == nk::RunningVariance::unbiased ? "unbiased" : "biased";
  return result;
}

// ---------------------------------------------------------------------------
// Layer normalization and RMS normalization (normkit/layer_norm.hpp): x's
// trailing dimensions (normalized_shape) are a row, the leading ones count the
// rows. x is used in place when its rows are contiguous and equally spaced
// (any C-contiguous array, or a slice of wider rows); otherwise it is copied.

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
std::optional<nk::RowsView<T>> rows_view(T* data, const py::array& a, const RowsShape& s) {
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
  return nk::RowsView<T>{data, s.rows, s.cols, s.rows > 1 ? row_stride : s.cols};
}

template <class T>
std::pair<py::array, nk::ConstRowsView<T>> input_rows(py::array a, const RowsShape& s) {
  if (auto v = rows_view<const T>(static_cast<const T*>(a.data()), a, s)) return {a, *v};
  a = c_contiguous(a);
  return {a, *rows_view<const T>(static_cast<const T*>(a.data()), a, s)};
}

// out= or a new C-contiguous array of x's shape.
template <class T>
std::pair<py::array, nk::RowsView<T>> output_rows(const py::object& out, const py::array& x,
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

// Per-column parameters (weight, bias): normalized_shape or flat with cols values.
template <class T>
std::optional<Channels<T>> column_values(const py::object& object, const RowsShape& s,
                                         const char* name) {
  if (object.is_none()) return std::nullopt;
  py::array a = py::array::ensure(object);
  if (!a) type_error(std::string(name) + ": expected an array, got " + type_name(object));
  if (a.size() != s.cols)
    value_error(std::string(name) + ": expected " + std::to_string(s.cols) +
                " values (normalized_shape), got shape " + shape_of(a));
  auto converted = Channels<T>::ensure(a.attr("reshape")(s.cols));
  if (!converted) type_error(std::string(name) + ": cannot convert " + dtype_of(a) + " to x's dtype");
  return converted;
}

// Per-row statistics from forward: rows values in any shape.
template <class T>
Channels<T> row_values(const py::object& object, const RowsShape& s, const char* name) {
  if (object.is_none()) value_error(std::string(name) + " is required");
  py::array a = py::array::ensure(object);
  if (!a) type_error(std::string(name) + ": expected an array, got " + type_name(object));
  if (a.size() != s.rows)
    value_error(std::string(name) + ": expected " + std::to_string(s.rows) +
                " values (one per row), got shape " + shape_of(a));
  auto converted = Channels<T>::ensure(a.attr("reshape")(s.rows));
  if (!converted) type_error(std::string(name) + ": cannot convert " + dtype_of(a) + " to x's dtype");
  return converted;
}

template <class T>
std::span<const T> span_of(const Channels<T>& a) {
  return {a.data(), static_cast<size_t>(a.size())};
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
  const std::span<T> mean_span(mean.mutable_data(), static_cast<size_t>(mean.size()));
  const std::span<T> invstd_span(invstd.mutable_data(), static_cast<size_t>(invstd.size()));
  {
    py::gil_scoped_release unlocked;
    if (rms)
      nk::rms_norm_forward<T>(xv, yv, span_of(gamma), eps, invstd_span);
    else
      nk::layer_norm_forward<T>(xv, yv, span_of(gamma), span_of(beta), {mean_span, invstd_span},
                                eps);
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
  nk::RowsView<T> dxv;
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
  const auto mean = rms ? std::optional<Channels<T>>() : row_values<T>(mean_object, s, "mean");
  const py::tuple param_shape = py::cast(normalized_shape);
  py::object dgamma = py::none(), dbeta = py::none();
  std::span<T> dgamma_span, dbeta_span;
  if (compute_dweight) {
    py::array_t<T> a(std::vector<py::ssize_t>(normalized_shape.begin(), normalized_shape.end()));
    dgamma_span = {a.mutable_data(), static_cast<size_t>(a.size())};
    dgamma = a;
  }
  if (compute_dbias && !rms) {
    py::array_t<T> a(std::vector<py::ssize_t>(normalized_shape.begin(), normalized_shape.end()));
    dbeta_span = {a.mutable_data(), static_cast<size_t>(a.size())};
    dbeta = a;
  }
  {
    py::gil_scoped_release unlocked;
    if (rms)
      nk::rms_norm_backward<T>(xv, dyv, dxv, span_of(gamma), span_of(invstd), dgamma_span);
    else
      nk::layer_norm_backward<T>(xv, dyv, dxv, span_of(gamma), span_of(*mean), span_of(invstd),
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

// Batch Renormalization and Ghost BN (bn_variants.hpp), in the style above.

template <class T>
py::tuple renorm_forward_training(py::array x, const py::object& weight, const py::object& bias,
                                  const py::object& running_mean, const py::object& running_var,
                                  const py::object& num_batches_tracked, nk::RenormLimits limits,
                                  const nk::BatchNormOptions& options,
                                  const std::optional<std::string>& layout_name,
                                  const py::object& out) {
  const nk::Layout layout = layout_for(layout_name, x);
  x = readable<T>(x);
  py::array y = writable_like<T>(out, x, "out");
  check_no_partial_overlap(y, x, "out", "x");
  const auto gamma = channel_values<T>(weight, "weight");
  const auto beta = channel_values<T>(bias, "bias");
  const std::string x_dtype = dtype_of(x);
  const std::span<T> mean = updated_in_place<T>(running_mean, "running_mean", x_dtype.c_str());
  const std::span<T> var = updated_in_place<T>(running_var, "running_var", x_dtype.c_str());
  int64_t* batches = counter_in_place(num_batches_tracked);
  const int64_t channels = channels_of(x, layout);
  py::array_t<T> save_mean(channels), save_invstd(channels), r(channels), d(channels);
  const auto xv = input_view<T>(x, layout);
  const auto yv = output_view<T>(y, layout);
  {
    py::gil_scoped_release unlocked;
    nk::batch_renorm_forward_training<T>(
        xv, yv, span_of(gamma), span_of(beta),
        {span_of(save_mean), span_of(save_invstd), span_of(r), span_of(d)}, {mean, var, batches},
        limits, options);
  }
  return py::make_tuple(y, save_mean, save_invstd, r, d);
}

template <class T>
py::tuple renorm_backward(py::array x, const py::object& dy_object, const py::object& weight,
                          const py::object& mean_object, const py::object& invstd_object,
                          const py::object& r_object, const py::object& d_object,
                          const std::optional<std::string>& layout_name, const py::object& out,
                          bool compute_dx) {
  const nk::Layout layout = layout_for(layout_name, x);
  x = readable<T>(x);
  py::array dy = readable_like<T>(dy_object, x, "dy");
  std::optional<py::array> dx = gradient_out<T>(out, x, dy, compute_dx);
  const auto gamma = channel_values<T>(weight, "weight");
  const auto mean = required_channel_values<T>(mean_object, "mean");
  const auto invstd = required_channel_values<T>(invstd_object, "invstd");
  const auto r = required_channel_values<T>(r_object, "r");
  const auto d = required_channel_values<T>(d_object, "d");
  const int64_t channels = channels_of(x, layout);
  py::array_t<T> dgamma(channels), dbeta(channels);
  const auto xv = input_view<T>(x, layout);
  const auto dyv = input_view<T>(dy, layout);
  nk::TensorView<T> dxv;
  if (dx) dxv = output_view<T>(*dx, layout);
  {
    py::gil_scoped_release unlocked;
    nk::batch_renorm_backward<T>(xv, dyv, dxv, span_of(gamma),
                                 {mean.data(), static_cast<size_t>(mean.size())},
                                 {invstd.data(), static_cast<size_t>(invstd.size())},
                                 {r.data(), static_cast<size_t>(r.size())},
                                 {d.data(), static_cast<size_t>(d.size())}, span_of(dgamma),
                                 span_of(dbeta));
  }
  return py::make_tuple(dx ? py::object(*dx) : py::object(py::none()), dgamma, dbeta);
}

template <class T>
py::tuple ghost_forward_training(py::array x, int64_t virtual_batch_size, const py::object& weight,
                                 const py::object& bias, const py::object& running_mean,
                                 const py::object& running_var,
                                 const py::object& num_batches_tracked,
                                 const nk::BatchNormOptions& options,
                                 const std::optional<std::string>& layout_name,
                                 const py::object& out) {
  const nk::Layout layout = layout_for(layout_name, x);
  x = readable<T>(x);
  py::array y = writable_like<T>(out, x, "out");
  check_no_partial_overlap(y, x, "out", "x");
  const auto gamma = channel_values<T>(weight, "weight");
  const auto beta = channel_values<T>(bias, "bias");
  const std::string x_dtype = dtype_of(x);
  const std::span<T> mean = updated_in_place<T>(running_mean, "running_mean", x_dtype.c_str());
  const std::span<T> var = updated_in_place<T>(running_var, "running_var", x_dtype.c_str());
  int64_t* batches = counter_in_place(num_batches_tracked);
  const int64_t channels = channels_of(x, layout);
  const int64_t ghosts = nk::ghost_batch_count(x.shape(0), virtual_batch_size);
  py::array_t<T> save_mean({ghosts, channels}), save_invstd({ghosts, channels});
  const auto xv = input_view<T>(x, layout);
  const auto yv = output_view<T>(y, layout);
  {
    py::gil_scoped_release unlocked;
    nk::ghost_batch_norm_forward_training<T>(xv, yv, span_of(gamma), span_of(beta),
                                             virtual_batch_size,
                                             {span_of(save_mean), span_of(save_invstd)},
                                             {mean, var, batches}, options);
  }
  return py::make_tuple(y, save_mean, save_invstd);
}

// Per-virtual-batch statistics: (ghosts, C) or flat, read as ghosts·C contiguous values.
template <class T>
py::array_t<T, py::array::c_style | py::array::forcecast> ghost_values(const py::object& object,
                                                                       const char* name) {
  if (object.is_none()) value_error(std::string(name) + " is required");
  auto a = py::array_t<T, py::array::c_style | py::array::forcecast>::ensure(object);
  if (!a) type_error(std::string(name) + ": cannot convert to the dtype of x");
  return a;
}

template <class T>
py::tuple ghost_backward(py::array x, const py::object& dy_object, const py::object& weight,
                         int64_t virtual_batch_size, const py::object& mean_object,
                         const py::object& invstd_object,
                         const std::optional<std::string>& layout_name, const py::object& out,
                         bool compute_dx) {
  const nk::Layout layout = layout_for(layout_name, x);
  x = readable<T>(x);
  py::array dy = readable_like<T>(dy_object, x, "dy");
  std::optional<py::array> dx = gradient_out<T>(out, x, dy, compute_dx);
  const auto gamma = channel_values<T>(weight, "weight");
  const auto mean = ghost_values<T>(mean_object, "mean");
  const auto invstd = ghost_values<T>(invstd_object, "invstd");
  const int64_t channels = channels_of(x, layout);
  py::array_t<T> dgamma(channels), dbeta(channels);
  const auto xv = input_view<T>(x, layout);
  const auto dyv = input_view<T>(dy, layout);
  nk::TensorView<T> dxv;
  if (dx) dxv = output_view<T>(*dx, layout);
  {
    py::gil_scoped_release unlocked;
    nk::ghost_batch_norm_backward<T>(xv, dyv, dxv, span_of(gamma), virtual_batch_size,
                                     {mean.data(), static_cast<size_t>(mean.size())},
                                     {invstd.data(), static_cast<size_t>(invstd.size())},
                                     span_of(dgamma), span_of(dbeta));
  }
  return py::make_tuple(dx ? py::object(*dx) : py::object(py::none()), dgamma, dbeta);
}

}  // namespace

// Sections defined after the module body (each in its own part of this file).
void add_standardizer(py::module_& m);
// ---------------------------------------------------------------------------
// Fused BN+ReLU and BN+Add+ReLU (normkit/batch_norm_fused.hpp). The ReLU mask
// is a 1-D uint8 array of ceil(x.size / 8) bytes, bits in x's memory order
// (which a copy in order "K" keeps, so x may be compacted below without
// changing the meaning of a mask).
namespace fused {

py::array_t<uint8_t> mask_out(const py::object& object, int64_t numel) {
  const int64_t bytes = nk::relu_mask_bytes(numel);
  if (object.is_none()) return py::array_t<uint8_t>(bytes);
  if (!py::isinstance<py::array_t<uint8_t>>(object))
    type_error("mask: expected a numpy.ndarray of uint8 (it is written), got " + type_name(object));
  auto a = py::reinterpret_borrow<py::array_t<uint8_t>>(object);
  if (a.ndim() != 1 || !(a.flags() & py::array::c_style))
    value_error("mask: expected a contiguous 1-D array, got shape " + shape_of(a));
  if (!a.writeable()) value_error("mask: array is read-only");
  return a;
}

py::array_t<uint8_t> mask_in(const py::object& object) {
  if (object.is_none()) value_error("mask is required (from the forward pass)");
  py::array a = py::array::ensure(object);
  if (!a || !has_dtype<uint8_t>(a))
    type_error("mask: expected an array of uint8 (from the forward pass)");
  if (a.ndim() != 1) value_error("mask: expected a 1-D array, got shape " + shape_of(a));
  return py::array_t<uint8_t, py::array::c_style>::ensure(a);
}

bool dense(const py::array& a) {
  return a.attr("strides").equal(numpy().attr("empty_like")(a).attr("strides"));
}

// x compacted in its own memory order when it has gaps (z and dz must have
// x's strides, and new arrays are dense); z brought to x's strides.
template <class T>
std::pair<py::array, std::optional<py::array>> inputs(py::array x, const py::object& z_object) {
  x = readable<T>(x);
  if (z_object.is_none()) return {x, std::nullopt};
  if (!dense(x)) x = numpy().attr("array")(x, py::arg("copy") = true, py::arg("order") = "K");
  py::array z = readable_like<T>(z_object, x, "residual");
  if (!z.attr("strides").equal(x.attr("strides"))) {
    py::array copy = numpy().attr("empty_like")(x);
    copy_into(copy, z);
    z = copy;
  }
  return {x, z};
}

std::span<uint8_t> bytes_of(py::array_t<uint8_t>& a) {
  return {a.mutable_data(), static_cast<size_t>(a.size())};
}

template <class T>
py::tuple forward_training(py::array x, const py::object& z_object, const py::object& weight,
                           const py::object& bias, const py::object& running_mean,
                           const py::object& running_var, const py::object& num_batches_tracked,
                           const nk::BatchNormOptions& options,
                           const std::optional<std::string>& layout_name, const py::object& out,
                           const py::object& mask_object) {
  const nk::Layout layout = layout_for(layout_name, x);
  auto [xa, za] = inputs<T>(x, z_object);
  py::array y = writable_like<T>(out, xa, "out");
  check_no_partial_overlap(y, xa, "out", "x");
  if (za) check_no_partial_overlap(y, *za, "out", "residual");
  auto mask = mask_out(mask_object, xa.size());
  const auto gamma = channel_values<T>(weight, "weight");
  const auto beta = channel_values<T>(bias, "bias");
  const std::string x_dtype = dtype_of(xa);
  const std::span<T> mean = updated_in_place<T>(running_mean, "running_mean", x_dtype.c_str());
  const std::span<T> var = updated_in_place<T>(running_var, "running_var", x_dtype.c_str());
  int64_t* batches = counter_in_place(num_batches_tracked);
  const int64_t channels = channels_of(xa, layout);
  py::array_t<T> save_mean(channels), save_invstd(channels);
  const auto xv = input_view<T>(xa, layout);
  const auto yv = output_view<T>(y, layout);
  const nk::SavedStats<T> saved{span_of(save_mean), span_of(save_invstd)};
  const nk::RunningStats<T> running{mean, var, batches};
  const auto mask_bytes = bytes_of(mask);
  if (za) {
    const auto zv = input_view<T>(*za, layout);
    py::gil_scoped_release unlocked;
    nk::batch_norm_add_relu_forward_training<T>(xv, zv, yv, mask_bytes, span_of(gamma),
                                                span_of(beta), saved, running, options);
  } else {
    py::gil_scoped_release unlocked;
    nk::batch_norm_relu_forward_training<T>(xv, yv, mask_bytes, span_of(gamma), span_of(beta),
                                            saved, running, options);
  }
  return py::make_tuple(y, mask, save_mean, save_invstd);
}

template <class T>
py::tuple forward_inference(py::array x, const py::object& z_object, const py::object& weight,
                            const py::object& bias, const py::object& running_mean,
                            const py::object& running_var, double eps,
                            const std::optional<std::string>& layout_name, const py::object& out,
                            const py::object& mask_object) {
  const nk::Layout layout = layout_for(layout_name, x);
  auto [xa, za] = inputs<T>(x, z_object);
  py::array y = writable_like<T>(out, xa, "out");
  check_no_partial_overlap(y, xa, "out", "x");
  if (za) check_no_partial_overlap(y, *za, "out", "residual");
  auto mask = mask_out(mask_object, xa.size());
  const auto gamma = channel_values<T>(weight, "weight");
  const auto beta = channel_values<T>(bias, "bias");
  const auto mean = required_channel_values<T>(running_mean, "running_mean");
  const auto var = required_channel_values<T>(running_var, "running_var");
  const auto xv = input_view<T>(xa, layout);
  const auto yv = output_view<T>(y, layout);
  const std::span<const T> mean_s(mean.data(), static_cast<size_t>(mean.size()));
  const std::span<const T> var_s(var.data(), static_cast<size_t>(var.size()));
  const auto mask_bytes = bytes_of(mask);
  if (za) {
    const auto zv = input_view<T>(*za, layout);
    py::gil_scoped_release unlocked;
    nk::batch_norm_add_relu_forward_inference<T>(xv, zv, yv, mask_bytes, span_of(gamma),
                                                 span_of(beta), mean_s, var_s, eps);
  } else {
    py::gil_scoped_release unlocked;
    nk::batch_norm_relu_forward_inference<T>(xv, yv, mask_bytes, span_of(gamma), span_of(beta),
                                             mean_s, var_s, eps);
  }
  return py::make_tuple(y, mask);
}

template <class T>
py::tuple backward(py::array x, const py::object& dy_object, const py::object& mask_object,
                   const py::object& weight, const py::object& mean_object,
                   const py::object& invstd_object, const std::string& mode_name,
                   const std::optional<std::string>& layout_name, const py::object& out,
                   bool compute_dx, bool add) {
  const nk::BackwardMode mode = mode_of(mode_name);
  const nk::Layout layout = layout_for(layout_name, x);
  x = readable<T>(x);
  if (add && !dense(x)) x = numpy().attr("array")(x, py::arg("copy") = true, py::arg("order") = "K");
  py::array dy = readable_like<T>(dy_object, x, "dy");
  const auto mask = mask_in(mask_object);
  std::optional<py::array> dx = gradient_out<T>(out, x, dy, compute_dx);
  std::optional<py::array> dz;
  if (add) dz = numpy().attr("empty_like")(x);
  const auto gamma = channel_values<T>(weight, "weight");
  const auto mean = required_channel_values<T>(mean_object, "mean");
  const auto invstd = required_channel_values<T>(invstd_object, "invstd");
  const int64_t channels = channels_of(x, layout);
  py::array_t<T> dgamma(channels), dbeta(channels);
  const auto xv = input_view<T>(x, layout);
  const auto dyv = input_view<T>(dy, layout);
  nk::TensorView<T> dxv, dzv;
  if (dx) dxv = output_view<T>(*dx, layout);
  if (dz) dzv = output_view<T>(*dz, layout);
  const std::span<const uint8_t> mask_bytes(mask.data(), static_cast<size_t>(mask.size()));
  const std::span<const T> mean_s(mean.data(), static_cast<size_t>(mean.size()));
  const std::span<const T> invstd_s(invstd.data(), static_cast<size_t>(invstd.size()));
  {
    py::gil_scoped_release unlocked;
    if (add)
      nk::batch_norm_add_relu_backward<T>(xv, dyv, mask_bytes, dxv, dzv, span_of(gamma), mean_s,
                                          invstd_s, span_of(dgamma), span_of(dbeta), mode);
    else
      nk::batch_norm_relu_backward<T>(xv, dyv, mask_bytes, dxv, span_of(gamma), mean_s, invstd_s,
                                      span_of(dgamma), span_of(dbeta), mode);
  }
  const py::object dx_result = dx ? py::object(*dx) : py::object(py::none());
  if (add) return py::make_tuple(dx_result, *dz, dgamma, dbeta);
  return py::make_tuple(dx_result, dgamma, dbeta);
}

void define(py::module_& m) {
  auto training = [](bool add) {
    return [add](const py::object& x_object, const py::object& residual, const py::object& weight,
                 const py::object& bias, const py::object& running_mean,
                 const py::object& running_var, const py::object& num_batches_tracked,
                 std::optional<double> momentum, double eps,
                 const std::optional<std::string>& layout, const py::object& out,
                 const py::object& mask, const std::string& momentum_convention,
                 const std::string& running_variance) {
      const py::array x = float_array(x_object, "x");
      if (add && residual.is_none()) value_error("residual is required");
      const auto options = options_of(momentum, eps, momentum_convention, running_variance);
      return by_dtype(x, [&](auto t) {
        return forward_training<decltype(t)>(x, add ? residual : py::none(), weight, bias,
                                             running_mean, running_var, num_batches_tracked,
                                             options, layout, out, mask);
      });
    };
  };
  const char* training_doc = R"doc(Batch normalization with the batch's statistics, then [+ residual and] ReLU.

Returns (y, mask, save_mean, save_invstd); mask is a uint8 array of ceil(x.size / 8)
bytes, bit k (bit k % 8 of byte k // 8) = pre-activation > 0 for the element with the
k-th lowest address in x. Other arguments as batch_norm_forward_training.)doc";
  m.def("batch_norm_relu_forward_training",
        [training](const py::object& x, const py::object& weight, const py::object& bias,
                   const py::object& rm, const py::object& rv, const py::object& nbt,
                   std::optional<double> momentum, double eps,
                   const std::optional<std::string>& layout, const py::object& out,
                   const py::object& mask, const std::string& mc, const std::string& rvar) {
          return training(false)(x, py::none(), weight, bias, rm, rv, nbt, momentum, eps, layout,
                                 out, mask, mc, rvar);
        },
        py::arg("x"), py::arg("weight") = py::none(), py::arg("bias") = py::none(),
        py::arg("running_mean") = py::none(), py::arg("running_var") = py::none(),
        py::arg("num_batches_tracked") = py::none(), py::arg("momentum") = 0.1,
        py::arg("eps") = 1e-5, py::kw_only(), py::arg("layout") = py::none(),
        py::arg("out") = py::none(), py::arg("mask") = py::none(),
        py::arg("momentum_convention") = "weight_on_new", py::arg("running_variance") = "unbiased",
        training_doc);
  m.def("batch_norm_add_relu_forward_training", training(true), py::arg("x"), py::arg("residual"),
        py::arg("weight") = py::none(), py::arg("bias") = py::none(),
        py::arg("running_mean") = py::none(), py::arg("running_var") = py::none(),
        py::arg("num_batches_tracked") = py::none(), py::arg("momentum") = 0.1,
        py::arg("eps") = 1e-5, py::kw_only(), py::arg("layout") = py::none(),
        py::arg("out") = py::none(), py::arg("mask") = py::none(),
        py::arg("momentum_convention") = "weight_on_new", py::arg("running_variance") = "unbiased",
        training_doc);

  auto inference = [](bool add) {
    return [add](const py::object& x_object, const py::object& residual, const py::object& weight,
                 const py::object& bias, const py::object& running_mean,
                 const py::object& running_var, double eps,
                 const std::optional<std::string>& layout, const py::object& out,
                 const py::object& mask) {
      const py::array x = float_array(x_object, "x");
      if (add && residual.is_none()) value_error("residual is required");
      return by_dtype(x, [&](auto t) {
        return forward_inference<decltype(t)>(x, add ? residual : py::none(), weight, bias,
                                              running_mean, running_var, eps, layout, out, mask);
      });
    };
  };
  m.def("batch_norm_relu_forward_inference",
        [inference](const py::object& x, const py::object& weight, const py::object& bias,
                    const py::object& rm, const py::object& rv, double eps,
                    const std::optional<std::string>& layout, const py::object& out,
                    const py::object& mask) {
          return inference(false)(x, py::none(), weight, bias, rm, rv, eps, layout, out, mask);
        },
        py::arg("x"), py::arg("weight") = py::none(), py::arg("bias") = py::none(),
        py::arg("running_mean") = py::none(), py::arg("running_var") = py::none(),
        py::arg("eps") = 1e-5, py::kw_only(), py::arg("layout") = py::none(),
        py::arg("out") = py::none(), py::arg("mask") = py::none(),
        "relu(batch_norm with running statistics): returns (y, mask).");
  m.def("batch_norm_add_relu_forward_inference", inference(true), py::arg("x"),
        py::arg("residual"), py::arg("weight") = py::none(), py::arg("bias") = py::none(),
        py::arg("running_mean") = py::none(), py::arg("running_var") = py::none(),
        py::arg("eps") = 1e-5, py::kw_only(), py::arg("layout") = py::none(),
        py::arg("out") = py::none(), py::arg("mask") = py::none(),
        "relu(batch_norm with running statistics + residual): returns (y, mask).");

  auto grad = [](bool add) {
    return [add](const py::object& x_object, const py::object& dy, const py::object& mask,
                 const py::object& weight, const py::object& mean, const py::object& invstd,
                 const std::string& mode, const std::optional<std::string>& layout,
                 const py::object& out, bool compute_dx) {
      const py::array x = float_array(x_object, "x");
      return by_dtype(x, [&](auto t) {
        return backward<decltype(t)>(x, dy, mask, weight, mean, invstd, mode, layout, out,
                                     compute_dx, add);
      });
    };
  };
  m.def("batch_norm_relu_backward", grad(false), py::arg("x"), py::arg("dy"), py::arg("mask"),
        py::arg("weight"), py::arg("mean"), py::arg("invstd"), py::kw_only(),
        py::arg("mode") = "training", py::arg("layout") = py::none(), py::arg("out") = py::none(),
        py::arg("compute_dx") = true,
        "Gradients through relu(batch_norm(x)) given the forward's mask: (dx, dweight, dbias).");
  m.def("batch_norm_add_relu_backward", grad(true), py::arg("x"), py::arg("dy"), py::arg("mask"),
        py::arg("weight"), py::arg("mean"), py::arg("invstd"), py::kw_only(),
        py::arg("mode") = "training", py::arg("layout") = py::none(), py::arg("out") = py::none(),
        py::arg("compute_dx") = true,
        "Gradients through relu(batch_norm(x) + residual) given the forward's mask: "
        "(dx, dresidual, dweight, dbias).");
  m.def("relu_mask_bytes", &nk::relu_mask_bytes, py::arg("numel"),
        "Bytes of a ReLU mask for numel elements: ceil(numel / 8).");
}

}  // namespace fused

// ---------------------------------------------------------------------------
// Group and instance normalization. Statistics are per (sample, group): they
// come back as (N, G) arrays and are taken in any shape of N·G values.
namespace {

template <class T>
using Flat = py::array_t<T, py::array::c_style | py::array::forcecast>;

template <class T>
Flat<T> flat_values(const py::object& object, const char* name) {
  if (object.is_none()) value_error(std::string(name) + " is required");
  py::array a = py::array::ensure(object);
  if (!a) type_error(std::string(name) + ": expected an array, got " + type_name(object));
  auto converted = Flat<T>::ensure(numpy().attr("ravel")(a));
  if (!converted)
    type_error(std::string(name) + ": cannot convert " + dtype_of(a) + " to the dtype of x");
  return converted;
}

// (span_of(const Flat<T>&) is span_of(const Channels<T>&) above: the same array type.)

template <class T>
py::tuple group_norm_forward(py::array x, int64_t groups, const py::object& weight,
                             const py::object& bias, double eps,
                             const std::optional<std::string>& layout_name, const py::object& out) {
  const nk::Layout layout = layout_for(layout_name, x);
  x = readable<T>(x);
  py::array y = writable_like<T>(out, x, "out");
  check_no_partial_overlap(y, x, "out", "x");
  const auto gamma = channel_values<T>(weight, "weight");
  const auto beta = channel_values<T>(bias, "bias");
  const int64_t n = x.shape(0);
  // A group count that does not divide C is the C++ function's error; the
  // statistics arrays only need a size.
  const int64_t stat_groups = groups > 0 ? groups : 0;
  py::array_t<T> save_mean({n, stat_groups}), save_invstd({n, stat_groups});
  const auto xv = input_view<T>(x, layout);
  const auto yv = output_view<T>(y, layout);
  const nk::SavedStats<T> saved{span_of(save_mean), span_of(save_invstd)};
  {
    py::gil_scoped_release unlocked;
    nk::group_norm_forward<T>(xv, yv, groups, span_of(gamma), span_of(beta), saved, eps);
  }
  return py::make_tuple(y, save_mean, save_invstd);
}

template <class T>
py::tuple group_norm_backward(py::array x, const py::object& dy_object, int64_t groups,
                              const py::object& weight, const py::object& mean_object,
                              const py::object& invstd_object,
                              const std::optional<std::string>& layout_name,
                              const py::object& out, bool compute_dx) {
  const nk::Layout layout = layout_for(layout_name, x);
  x = readable<T>(x);
  py::array dy = readable_like<T>(dy_object, x, "dy");
  std::optional<py::array> dx = gradient_out<T>(out, x, dy, compute_dx);
  const auto gamma = channel_values<T>(weight, "weight");
  const auto mean = flat_values<T>(mean_object, "mean");
  const auto invstd = flat_values<T>(invstd_object, "invstd");
  const int64_t channels = channels_of(x, layout);
  py::array_t<T> dgamma(channels), dbeta(channels);
  const auto xv = input_view<T>(x, layout);
  const auto dyv = input_view<T>(dy, layout);
  nk::TensorView<T> dxv;
  if (dx) dxv = output_view<T>(*dx, layout);
  {
    py::gil_scoped_release unlocked;
    nk::group_norm_backward<T>(xv, dyv, dxv, groups, span_of(gamma), span_of(mean),
                               span_of(invstd), span_of(dgamma), span_of(dbeta));
  }
  return py::make_tuple(dx ? py::object(*dx) : py::object(py::none()), dgamma, dbeta);
}

template <class T>
py::tuple instance_norm_forward_training(py::array x, const py::object& weight,
                                         const py::object& bias, const py::object& running_mean,
                                         const py::object& running_var,
                                         const py::object& num_batches_tracked,
                                         const nk::BatchNormOptions& options,
                                         const std::optional<std::string>& layout_name,
                                         const py::object& out) {
  const nk::Layout layout = layout_for(layout_name, x);
  x = readable<T>(x);
  py::array y = writable_like<T>(out, x, "out");
  check_no_partial_overlap(y, x, "out", "x");
  const auto gamma = channel_values<T>(weight, "weight");
  const auto beta = channel_values<T>(bias, "bias");
  const std::string x_dtype = dtype_of(x);
  const std::span<T> mean = updated_in_place<T>(running_mean, "running_mean", x_dtype.c_str());
  const std::span<T> var = updated_in_place<T>(running_var, "running_var", x_dtype.c_str());
  int64_t* batches = counter_in_place(num_batches_tracked);
  const int64_t n = x.shape(0), channels = channels_of(x, layout);
  py::array_t<T> save_mean({n, channels}), save_invstd({n, channels});
  const auto xv = input_view<T>(x, layout);
  const auto yv = output_view<T>(y, layout);
  const nk::SavedStats<T> saved{span_of(save_mean), span_of(save_invstd)};
  const nk::RunningStats<T> running{mean, var, batches};
  {
    py::gil_scoped_release unlocked;
    nk::instance_norm_forward_training<T>(xv, yv, span_of(gamma), span_of(beta), saved, running,
                                          options);
  }
  return py::make_tuple(y, save_mean, save_invstd);
}

void register_group_norm(py::module_& m) {
  m.def(
      "group_norm_forward",
      [](const py::object& x_object, int64_t num_groups, const py::object& weight,
         const py::object& bias, double eps, const std::optional<std::string>& layout,
         const py::object& out) {
        const py::array x = float_array(x_object, "x");
        return by_dtype(x, [&](auto t) {
          return group_norm_forward<decltype(t)>(x, num_groups, weight, bias, eps, layout, out);
        });
      },
      py::arg("x"), py::arg("num_groups"), py::arg("weight") = py::none(),
      py::arg("bias") = py::none(), py::arg("eps") = 1e-5, py::kw_only(),
      py::arg("layout") = py::none(), py::arg("out") = py::none(),
      R"doc(Group normalization: returns (y, mean, invstd), the statistics as (N, num_groups)
arrays (PyTorch's native_group_norm saves the same). weight and bias: one value per channel.
C must be divisible by num_groups.)doc");

  m.def(
      "group_norm_backward",
      [](const py::object& x_object, const py::object& dy, int64_t num_groups,
         const py::object& weight, const py::object& mean, const py::object& invstd,
         const std::optional<std::string>& layout, const py::object& out, bool compute_dx) {
        const py::array x = float_array(x_object, "x");
        return by_dtype(x, [&](auto t) {
          return group_norm_backward<decltype(t)>(x, dy, num_groups, weight, mean, invstd, layout,
                                                  out, compute_dx);
        });
      },
      py::arg("x"), py::arg("dy"), py::arg("num_groups"), py::arg("weight"), py::arg("mean"),
      py::arg("invstd"), py::kw_only(), py::arg("layout") = py::none(),
      py::arg("out") = py::none(), py::arg("compute_dx") = true,
      "Gradients of group normalization: returns (dx, dweight, dbias); mean and invstd are "
      "group_norm_forward's. compute_dx=False returns dx as None.");

  m.def(
      "instance_norm_forward_training",
      [](const py::object& x_object, const py::object& weight, const py::object& bias,
         const py::object& running_mean, const py::object& running_var,
         const py::object& num_batches_tracked, std::optional<double> momentum, double eps,
         const std::optional<std::string>& layout, const py::object& out,
         const std::string& momentum_convention, const std::string& running_variance) {
        const py::array x = float_array(x_object, "x");
        const auto options = options_of(momentum, eps, momentum_convention, running_variance);
        return by_dtype(x, [&](auto t) {
          return instance_norm_forward_training<decltype(t)>(x, weight, bias, running_mean,
                                                             running_var, num_batches_tracked,
                                                             options, layout, out);
        });
      },
      py::arg("x"), py::arg("weight") = py::none(), py::arg("bias") = py::none(),
      py::arg("running_mean") = py::none(), py::arg("running_var") = py::none(),
      py::arg("num_batches_tracked") = py::none(), py::arg("momentum") = 0.1,
      py::arg("eps") = 1e-5, py::kw_only(), py::arg("layout") = py::none(),
      py::arg("out") = py::none(), py::arg("momentum_convention") = "weight_on_new",
      py::arg("running_variance") = "unbiased",
      R"doc(Instance normalization with each instance's own statistics: returns (y, mean, invstd),
the statistics as (N, C) arrays. running_mean and running_var (updated in place when given)
move towards the batch average of the instance means and unbiased variances, as PyTorch's
instance_norm does. Inference with running statistics is batch_norm_forward_inference;
its gradient is batch_norm_backward(mode="frozen").)doc");

  m.def(
      "instance_norm_backward",
      [](const py::object& x_object, const py::object& dy, const py::object& weight,
         const py::object& mean, const py::object& invstd,
         const std::optional<std::string>& layout, const py::object& out, bool compute_dx) {
        const py::array x = float_array(x_object, "x");
        const int64_t channels = channels_of(x, layout_for(layout, x));
        return by_dtype(x, [&](auto t) {
          return group_norm_backward<decltype(t)>(x, dy, channels, weight, mean, invstd, layout,
                                                  out, compute_dx);
        });
      },
      py::arg("x"), py::arg("dy"), py::arg("weight"), py::arg("mean"), py::arg("invstd"),
      py::kw_only(), py::arg("layout") = py::none(), py::arg("out") = py::none(),
      py::arg("compute_dx") = true,
      "Gradients of instance_norm_forward_training: returns (dx, dweight, dbias).");
}

}  // namespace

PYBIND11_MODULE(_normkit, m) {
  m.doc() = "normkit's functional NumPy API: batch normalization on CPU, exact against PyTorch.";
  m.attr("__version__") = nk::version;

  PYBIND11_NUMPY_DTYPE(nk::Moments, count, mean, m2);
  m.attr("moments_dtype") = py::dtype::of<nk::Moments>();

  // normkit::Error says whose fault an error is; Python spells that as the exception type.
  py::register_exception_translator([](std::exception_ptr error) {
    try {
      if (error) std::rethrow_exception(error);
    } catch (const nk::Error& e) {
      PyErr_SetString(e.kind() == nk::ErrorKind::invalid_argument ? PyExc_ValueError
                                                                  : PyExc_RuntimeError,
                      e.what());
    }
  });

  m.def(
      "batch_norm_forward_training",
      [](const py::object& x_object, const py::object& weight, const py::object& bias,
         const py::object& running_mean, const py::object& running_var,
         const py::object& num_batches_tracked, std::optional<double> momentum, double eps,
         const std::optional<std::string>& layout, const py::object& out,
         const std::string& momentum_convention, const std::string& running_variance) {
        const py::array x = float_array(x_object, "x");
        const auto options = options_of(momentum, eps, momentum_convention, running_variance);
        return by_dtype(x, [&](auto t) {
          return forward_training<decltype(t)>(x, weight, bias, running_mean, running_var,
                                               num_batches_tracked, options, layout, out);
        });
      },
      py::arg("x"), py::arg("weight") = py::none(), py::arg("bias") = py::none(),
      py::arg("running_mean") = py::none(), py::arg("running_var") = py::none(),
      py::arg("num_batches_tracked") = py::none(), py::arg("momentum") = 0.1,
      py::arg("eps") = 1e-5, py::kw_only(), py::arg("layout") = py::none(),
      py::arg("out") = py::none(), py::arg("momentum_convention") = "weight_on_new",
      py::arg("running_variance") = "unbiased",
      R"doc(Batch normalization with the batch's own statistics.

Returns (y, save_mean, save_invstd); save_invstd = 1 / sqrt(biased batch variance + eps).
running_mean and running_var (1-D arrays of x's dtype) and num_batches_tracked (one int64)
are updated in place when given. momentum=None is the cumulative average over
num_batches_tracked. layout names the order of x's axes ("NCHW", "NHWC", ...); default
channels-first by x.ndim. Keras conventions: pass **normkit.keras_options().
float32 runs the fast kernels, float64 the reference implementation.)doc");

  m.def(
      "batch_norm_forward_inference",
      [](const py::object& x_object, const py::object& weight, const py::object& bias,
         const py::object& running_mean, const py::object& running_var, double eps,
         const std::optional<std::string>& layout, const py::object& out) {
        const py::array x = float_array(x_object, "x");
        return by_dtype(x, [&](auto t) {
          return forward_inference<decltype(t)>(x, weight, bias, running_mean, running_var, eps,
                                                layout, out);
        });
      },
      py::arg("x"), py::arg("weight") = py::none(), py::arg("bias") = py::none(),
      py::arg("running_mean") = py::none(), py::arg("running_var") = py::none(),
      py::arg("eps") = 1e-5, py::kw_only(), py::arg("layout") = py::none(),
      py::arg("out") = py::none(),
      "y = (x - running_mean) / sqrt(running_var + eps) * weight + bias. running_mean and "
      "running_var are required.");

  m.def(
      "batch_norm_forward_apply",
      [](const py::object& x_object, const py::object& weight, const py::object& bias,
         const py::object& mean, const py::object& invstd,
         const std::optional<std::string>& layout, const py::object& out) {
        const py::array x = float_array(x_object, "x");
        return by_dtype(x, [&](auto t) {
          return forward_apply<decltype(t)>(x, weight, bias, mean, invstd, layout, out);
        });
      },
      py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("mean"), py::arg("invstd"),
      py::kw_only(), py::arg("layout") = py::none(), py::arg("out") = py::none(),
      "y = (x - mean) * invstd * weight + bias with given statistics (e.g. merged moments).");

  m.def(
      "batch_norm_backward",
      [](const py::object& x_object, const py::object& dy, const py::object& weight,
         const py::object& mean, const py::object& invstd, const std::string& mode,
         const std::optional<std::string>& layout, const py::object& out, bool compute_dx) {
        const py::array x = float_array(x_object, "x");
        return by_dtype(x, [&](auto t) {
          return backward<decltype(t)>(x, dy, weight, mean, invstd, mode, layout, out,
                                       compute_dx);
        });
      },
      py::arg("x"), py::arg("dy"), py::arg("weight"), py::arg("mean"), py::arg("invstd"),
      py::kw_only(), py::arg("mode") = "training", py::arg("layout") = py::none(),
      py::arg("out") = py::none(), py::arg("compute_dx") = true,
      R"doc(Gradients of batch normalization: returns (dx, dweight, dbias).

mode="training": mean and invstd are forward-training's saved statistics and gradients
flow through them. mode="frozen": mean is the running mean and invstd =
batch_norm_invstd(running_var, eps); dx = weight * invstd * dy.
compute_dx=False returns dx as None and computes only dweight and dbias.)doc");

  m.def(
      "batch_norm_moments",
      [](const py::object& x_object, const std::optional<std::string>& layout) {
        const py::array x = float_array(x_object, "x");
        return by_dtype(x, [&](auto t) { return moments<decltype(t)>(x, layout); });
      },
      py::arg("x"), py::kw_only(), py::arg("layout") = py::none(),
      "Per-channel (count, mean, m2) of x as an array of normkit.moments_dtype; "
      "m2 = sum((x - mean)**2). Combine partials with merge_moments.");

  m.def(
      "merge_moments",
      [](const py::object& a_object, const py::object& b_object) {
        const auto a = moments_array(a_object, "a");
        const auto b = moments_array(b_object, "b");
        if (a.size() != b.size())
          value_error("merge_moments: a has " + std::to_string(a.size()) + " channels, b has " +
                      std::to_string(b.size()));
        py::array_t<nk::Moments> result(a.size());
        auto* merged = result.mutable_data();
        for (py::ssize_t c = 0; c < a.size(); ++c) {
          merged[c] = a.data()[c];
          merged[c].merge(b.data()[c]);
        }
        return result;
      },
      py::arg("a"), py::arg("b"),
      "Channel-wise merge of two sets of moments (Chan et al.), as if their data were one batch.");

  m.def(
      "batch_norm_update_running",
      [](const py::object& batch, const py::object& running_mean, const py::object& running_var,
         const py::object& num_batches_tracked, std::optional<double> momentum, double eps,
         const std::string& momentum_convention, const std::string& running_variance) {
        const auto stats = moments_array(batch, "moments");
        const auto options = options_of(momentum, eps, momentum_convention, running_variance);
        // The running arrays decide the element type; without them only the counter moves.
        const bool single = !running_mean.is_none() && py::isinstance<py::array>(running_mean) &&
                            has_dtype<float>(py::reinterpret_borrow<py::array>(running_mean));
        if (single || running_mean.is_none())
          update_running<float>(stats, running_mean, running_var, num_batches_tracked, options,
                                "float32");
        else
          update_running<double>(stats, running_mean, running_var, num_batches_tracked, options,
                                 "float64");
      },
      py::arg("moments"), py::arg("running_mean") = py::none(),
      py::arg("running_var") = py::none(), py::arg("num_batches_tracked") = py::none(),
      py::arg("momentum") = 0.1, py::arg("eps") = 1e-5, py::kw_only(),
      py::arg("momentum_convention") = "weight_on_new", py::arg("running_variance") = "unbiased",
      "Update running statistics in place from batch moments, as forward-training does.");

  m.def(
      "batch_norm_invstd",
      [](const py::object& var_object, double eps) -> py::array {
        const py::array var = float_array(var_object, "var");
        if (has_dtype<float>(var)) return invstd<float>(var, eps);
        return invstd<double>(var, eps);
      },
      py::arg("var"), py::arg("eps") = 1e-5, "1 / sqrt(var + eps), per channel.");

  m.def(
      "keras_options", [] { return options_dict(nk::BatchNormOptions::keras()); },
      "tf.keras BatchNormalization's conventions as keyword arguments for "
      "batch_norm_forward_training: eps 1e-3, momentum 0.99 on the old value, biased variance.");
  m.def(
      "pytorch_options", [] { return options_dict(nk::BatchNormOptions{}); },
      "PyTorch's conventions (the defaults) as keyword arguments.");

  m.def("set_num_threads", &nk::set_num_threads, py::arg("n"),
        "Threads used by the kernels (n >= 1). Results do not depend on it.");
  m.def("num_threads", &nk::num_threads);

  // ---- layer normalization and RMS normalization
  m.def(
      "layer_norm_forward",
      [](const py::object& x_object, const std::vector<int64_t>& normalized_shape,
         const py::object& weight, const py::object& bias, double eps, const py::object& out) {
        const py::array x = float_array(x_object, "x");
        return by_dtype(x, [&](auto t) {
          return rows_forward<decltype(t)>(false, x, normalized_shape, weight, bias, eps, out);
        });
      },
      py::arg("x"), py::arg("normalized_shape"), py::arg("weight") = py::none(),
      py::arg("bias") = py::none(), py::arg("eps") = nk::kLayerNormEps, py::kw_only(),
      py::arg("out") = py::none(),
      R"doc(Layer normalization over x's trailing dimensions (normalized_shape).

Returns (y, mean, invstd); mean and invstd = 1 / sqrt(biased variance + eps) have x's
leading shape (one value per row). weight and bias hold normalized_shape's values.
float32 runs the fast kernels, float64 the reference implementation.)doc");

  m.def(
      "layer_norm_backward",
      [](const py::object& x_object, const py::object& dy,
         const std::vector<int64_t>& normalized_shape, const py::object& weight,
         const py::object& mean, const py::object& invstd, const py::object& out, bool compute_dx,
         bool compute_dweight, bool compute_dbias) {
        const py::array x = float_array(x_object, "x");
        return by_dtype(x, [&](auto t) {
          return rows_backward<decltype(t)>(false, x, dy, normalized_shape, weight, mean, invstd,
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
      [](const py::object& x_object, const std::vector<int64_t>& normalized_shape,
         const py::object& weight, std::optional<double> eps, const py::object& out) {
        const py::array x = float_array(x_object, "x");
        return by_dtype(x, [&](auto t) {
          return rows_forward<decltype(t)>(true, x, normalized_shape, weight, py::none(),
                                           rms_eps(eps, x), out);
        });
      },
      py::arg("x"), py::arg("normalized_shape"), py::arg("weight") = py::none(),
      py::arg("eps") = py::none(), py::kw_only(), py::arg("out") = py::none(),
      R"doc(RMS normalization over x's trailing dimensions: y = x / sqrt(mean(x**2) + eps) * weight.

Returns (y, inv_rms); inv_rms has x's leading shape. eps=None is the machine epsilon of
x's dtype (torch.nn.RMSNorm's default).)doc");

  m.def(
      "rms_norm_backward",
      [](const py::object& x_object, const py::object& dy,
         const std::vector<int64_t>& normalized_shape, const py::object& weight,
         const py::object& inv_rms, const py::object& out, bool compute_dx,
         bool compute_dweight) {
        const py::array x = float_array(x_object, "x");
        return by_dtype(x, [&](auto t) {
          return rows_backward<decltype(t)>(true, x, dy, normalized_shape, weight, py::none(),
                                            inv_rms, out, compute_dx, compute_dweight, false);
        });
      },
      py::arg("x"), py::arg("dy"), py::arg("normalized_shape"), py::arg("weight"),
      py::arg("inv_rms"), py::kw_only(), py::arg("out") = py::none(),
      py::arg("compute_dx") = true, py::arg("compute_dweight") = true,
      "Gradients of rms_norm_forward: returns (dx, dweight), None when not computed.");
  // ---- Batch Renormalization and Ghost BN (bn_variants.hpp)
  m.def(
      "batch_renorm_forward_training",
      [](const py::object& x_object, const py::object& weight, const py::object& bias,
         const py::object& running_mean, const py::object& running_var,
         const py::object& num_batches_tracked, double rmax, double dmax,
         std::optional<double> momentum, double eps, const std::optional<std::string>& layout,
         const py::object& out, const std::string& momentum_convention,
         const std::string& running_variance) {
        const py::array x = float_array(x_object, "x");
        const auto options = options_of(momentum, eps, momentum_convention, running_variance);
        return by_dtype(x, [&](auto t) {
          return renorm_forward_training<decltype(t)>(x, weight, bias, running_mean, running_var,
                                                      num_batches_tracked, {rmax, dmax}, options,
                                                      layout, out);
        });
      },
      py::arg("x"), py::arg("weight") = py::none(), py::arg("bias") = py::none(),
      py::arg("running_mean") = py::none(), py::arg("running_var") = py::none(),
      py::arg("num_batches_tracked") = py::none(), py::arg("rmax") = 1.0, py::arg("dmax") = 0.0,
      py::arg("momentum") = 0.1, py::arg("eps") = 1e-5, py::kw_only(),
      py::arg("layout") = py::none(), py::arg("out") = py::none(),
      py::arg("momentum_convention") = "weight_on_new", py::arg("running_variance") = "unbiased",
      R"doc(Batch Renormalization (Ioffe 2017, Algorithm 1) in training.

Returns (y, save_mean, save_invstd, r, d). r = clip(sigma_B / sigma, 1/rmax, rmax),
d = clip((mu_B - mu) / sigma, -dmax, dmax) with sigma = sqrt(running_var + eps);
y = weight * ((x - mu_B) * save_invstd * r + d) + bias. running_mean and running_var are
required and are updated in place as batch_norm_forward_training updates them.)doc");

  m.def(
      "batch_renorm_backward",
      [](const py::object& x_object, const py::object& dy, const py::object& weight,
         const py::object& mean, const py::object& invstd, const py::object& r,
         const py::object& d, const std::optional<std::string>& layout, const py::object& out,
         bool compute_dx) {
        const py::array x = float_array(x_object, "x");
        return by_dtype(x, [&](auto t) {
          return renorm_backward<decltype(t)>(x, dy, weight, mean, invstd, r, d, layout, out,
                                              compute_dx);
        });
      },
      py::arg("x"), py::arg("dy"), py::arg("weight"), py::arg("mean"), py::arg("invstd"),
      py::arg("r"), py::arg("d"), py::kw_only(), py::arg("layout") = py::none(),
      py::arg("out") = py::none(), py::arg("compute_dx") = true,
      "Gradients of batch renormalization with r and d constant: returns (dx, dweight, dbias).");

  m.def(
      "batch_renorm_limits",
      [](int64_t step, double rmax, double dmax, int64_t hold_steps, int64_t rmax_ramp_steps,
         int64_t dmax_ramp_steps) {
        const auto limits =
            nk::BatchRenormSchedule{rmax, dmax, hold_steps, rmax_ramp_steps, dmax_ramp_steps}.at(step);
        return py::make_tuple(limits.rmax, limits.dmax);
      },
      py::arg("step"), py::kw_only(), py::arg("rmax") = 3.0, py::arg("dmax") = 5.0,
      py::arg("hold_steps") = 0, py::arg("rmax_ramp_steps") = 0, py::arg("dmax_ramp_steps") = 0,
      "(rmax, dmax) at a training step: 1 and 0 for hold_steps, then each rising linearly to its "
      "final value over its ramp.");

  m.def(
      "ghost_batch_norm_forward_training",
      [](const py::object& x_object, int64_t virtual_batch_size, const py::object& weight,
         const py::object& bias, const py::object& running_mean, const py::object& running_var,
         const py::object& num_batches_tracked, std::optional<double> momentum, double eps,
         const std::optional<std::string>& layout, const py::object& out,
         const std::string& momentum_convention, const std::string& running_variance) {
        const py::array x = float_array(x_object, "x");
        const auto options = options_of(momentum, eps, momentum_convention, running_variance);
        return by_dtype(x, [&](auto t) {
          return ghost_forward_training<decltype(t)>(x, virtual_batch_size, weight, bias,
                                                     running_mean, running_var,
                                                     num_batches_tracked, options, layout, out);
        });
      },
      py::arg("x"), py::arg("virtual_batch_size"), py::arg("weight") = py::none(),
      py::arg("bias") = py::none(), py::arg("running_mean") = py::none(),
      py::arg("running_var") = py::none(), py::arg("num_batches_tracked") = py::none(),
      py::arg("momentum") = 0.1, py::arg("eps") = 1e-5, py::kw_only(),
      py::arg("layout") = py::none(), py::arg("out") = py::none(),
      py::arg("momentum_convention") = "weight_on_new", py::arg("running_variance") = "unbiased",
      R"doc(Ghost batch normalization in training: BN on each slice of virtual_batch_size
samples (x.split(virtual_batch_size); the last may be smaller), running statistics updated
once per slice in order. Returns (y, save_mean, save_invstd), the saved statistics of shape
(number of virtual batches, C).)doc");

  m.def(
      "ghost_batch_norm_backward",
      [](const py::object& x_object, const py::object& dy, const py::object& weight,
         int64_t virtual_batch_size, const py::object& mean, const py::object& invstd,
         const std::optional<std::string>& layout, const py::object& out, bool compute_dx) {
        const py::array x = float_array(x_object, "x");
        return by_dtype(x, [&](auto t) {
          return ghost_backward<decltype(t)>(x, dy, weight, virtual_batch_size, mean, invstd,
                                             layout, out, compute_dx);
        });
      },
      py::arg("x"), py::arg("dy"), py::arg("weight"), py::arg("virtual_batch_size"),
      py::arg("mean"), py::arg("invstd"), py::kw_only(), py::arg("layout") = py::none(),
      py::arg("out") = py::none(), py::arg("compute_dx") = true,
      "Gradients of ghost batch normalization: returns (dx, dweight, dbias).");
  fused::define(m);
  add_standardizer(m);

  register_group_norm(m);
}

// ---------------------------------------------------------------------------
// normkit.Standardizer: the input standardizer (normkit::data::Standardizer)
// with scikit-learn's StandardScaler names. It works in float32, as the
// engine does: inputs of other real dtypes are converted (a copy), results are
// float32, and mean_, var_, scale_ are the float32 values transform uses.

namespace {

using Table = py::array_t<float, py::array::c_style | py::array::forcecast>;

[[noreturn]] void attribute_error(const std::string& message) { throw py::attribute_error(message); }

// x as a C-contiguous float32 [samples, features] table (converted only when it
// is not one already), checked for shape and for NaN or infinity.
Table table_of(const py::object& object, const char* what) {
  py::array a = py::array::ensure(object);
  if (!a) type_error(std::string(what) + ": expected an array, got " + type_name(object));
  const char kind = a.dtype().kind();
  if (kind != 'f' && kind != 'i' && kind != 'u')
    type_error(std::string(what) + ": expected real numbers, got dtype " + dtype_of(a));
  if (a.ndim() != 2)
    value_error(std::string(what) + ": expected a 2-D array (samples, features), got shape " +
                shape_of(a));
  if (a.shape(0) < 1 || a.shape(1) < 1)
    value_error(std::string(what) + ": expected at least one sample and one feature, got shape " +
                shape_of(a));
  Table table = Table::ensure(a);
  if (!table) type_error(std::string(what) + ": cannot convert " + dtype_of(a) + " to float32");
  const float* values = table.data();
  const auto features = static_cast<size_t>(table.shape(1));
  for (size_t i = 0, n = static_cast<size_t>(table.size()); i < n; ++i)
    if (!std::isfinite(values[i]))
      value_error(std::string(what) + ": NaN or infinity at sample " + std::to_string(i / features) +
                  ", feature " + std::to_string(i % features) + " (as float32)");
  return table;
}

std::span<const float> values_of(const Table& t) { return {t.data(), static_cast<size_t>(t.size())}; }

void require_fitted(const nk::data::Standardizer& s) {
  if (!s.fitted()) value_error("this Standardizer is not fitted yet: call fit or partial_fit first");
}

py::array_t<float> float_vector(const std::vector<float>& values) {
  py::array_t<float> out(static_cast<py::ssize_t>(values.size()));
  std::copy(values.begin(), values.end(), out.mutable_data());
  return out;
}

// transform and inverse_transform: on a new array (copy=True), or in place on
// x itself when it is already a writable C-contiguous float32 array.
template <class Apply>
py::array apply_to(const nk::data::Standardizer& s, const py::object& x, bool copy, const char* what,
                   Apply&& apply) {
  require_fitted(s);
  Table table = table_of(x, what);
  if (table.shape(1) != s.features())
    value_error(std::string(what) + ": x has " + std::to_string(table.shape(1)) +
                " features, the standardizer was fitted on " + std::to_string(s.features()));
  py::array_t<float> result;
  if (copy) {
    result = py::array_t<float>(std::vector<py::ssize_t>{table.shape(0), table.shape(1)});
    std::copy(table.data(), table.data() + table.size(), result.mutable_data());
  } else {
    if (!table.is(x) || !table.writeable())
      value_error(std::string(what) + ": copy=False works in place, so x must be a writable "
                  "C-contiguous float32 array");
    result = table;
  }
  std::span<float> values(result.mutable_data(), static_cast<size_t>(result.size()));
  {
    py::gil_scoped_release unlocked;
    apply(values);
  }
  return result;
}

std::string path_of(const py::object& path) {
  return py::str(py::module_::import("os").attr("fspath")(path)).cast<std::string>();
}

[[noreturn]] void os_error(const std::string& path) {
  PyErr_SetFromErrnoWithFilename(PyExc_OSError, path.c_str());
  throw py::error_already_set();
}

// Written under a temporary name next to the file, then renamed over it: a
// failed save leaves an existing file as it was.
void save_file(const nk::data::Standardizer& s, const std::string& path) {
  require_fitted(s);
  std::ostringstream bytes;
  s.save(bytes);
  const std::string data = bytes.str();
  const std::string temp = path + ".tmp-" + std::to_string(::getpid());
  {
    std::ofstream out(temp, std::ios::binary | std::ios::trunc);
    if (!out) os_error(temp);
    out.write(data.data(), static_cast<std::streamsize>(data.size()));
    out.flush();
    if (!out) {
      const int error = errno;
      std::remove(temp.c_str());
      errno = error;
      os_error(path);
    }
  }
  if (std::rename(temp.c_str(), path.c_str()) != 0) {
    const int error = errno;
    std::remove(temp.c_str());
    errno = error;
    os_error(path);
  }
}

nk::data::Standardizer load_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) os_error(path);
  try {
    nk::data::Standardizer s = nk::data::Standardizer::load(in);
    if (in.peek() != std::char_traits<char>::eof())
      throw nk::Error(nk::ErrorKind::runtime, "standardizer: unexpected bytes after the statistics");
    return s;
  } catch (const nk::Error& e) {
    throw nk::Error(nk::ErrorKind::runtime, "'" + path + "': " + e.what());
  }
}

}  // namespace

void add_standardizer(py::module_& m) {
  using nk::data::Standardizer;
  py::class_<Standardizer>(m, "Standardizer", R"doc(Per-feature standardization x' = (x - mean_) / scale_.

scikit-learn's StandardScaler, in float32: scale_ is the population (biased) standard
deviation, and 1 for features of zero variance (they map to 0, never NaN). fit and
partial_fit take (samples, features) arrays; partial_fit merges the statistics of each
chunk with those seen before (Chan et al.), so streaming a data set in chunks gives what
one fit on all of it gives. NaN or infinity in any input is a ValueError.)doc")
      .def(py::init<>())
      .def(
          "fit",
          [](Standardizer& s, const py::object& x) -> Standardizer& {
            const Table table = table_of(x, "fit");
            {
              py::gil_scoped_release unlocked;
              s.fit(values_of(table), table.shape(1));
            }
            return s;
          },
          py::arg("x"), py::return_value_policy::reference_internal,
          "Statistics of x alone (earlier fits are forgotten). Returns self.")
      .def(
          "partial_fit",
          [](Standardizer& s, const py::object& x) -> Standardizer& {
            const Table table = table_of(x, "partial_fit");
            if (s.fitted() && table.shape(1) != s.features())
              value_error("partial_fit: x has " + std::to_string(table.shape(1)) +
                          " features, the standardizer was fitted on " +
                          std::to_string(s.features()));
            {
              py::gil_scoped_release unlocked;
              s.partial_fit(values_of(table), table.shape(1));
            }
            return s;
          },
          py::arg("x"), py::return_value_policy::reference_internal,
          "Merges the statistics of x into those seen so far. Returns self.")
      .def(
          "transform",
          [](const Standardizer& s, const py::object& x, bool copy) {
            return apply_to(s, x, copy, "transform", [&](std::span<float> v) { s.transform(v); });
          },
          py::arg("x"), py::arg("copy") = true,
          "(x - mean_) / scale_ as a new float32 array; copy=False overwrites x (a writable "
          "C-contiguous float32 array) and returns it.")
      .def(
          "inverse_transform",
          [](const Standardizer& s, const py::object& x, bool copy) {
            return apply_to(s, x, copy, "inverse_transform",
                            [&](std::span<float> v) { s.inverse_transform(v); });
          },
          py::arg("x"), py::arg("copy") = true, "x * scale_ + mean_; copy as for transform.")
      .def_property_readonly("mean_", [](const Standardizer& s) {
        if (!s.fitted()) attribute_error("mean_: the Standardizer is not fitted yet");
        return float_vector(s.mean());
      }, "Per-feature mean (float32).")
      .def_property_readonly("var_", [](const Standardizer& s) {
        if (!s.fitted()) attribute_error("var_: the Standardizer is not fitted yet");
        return float_vector(s.variance());
      }, "Per-feature population variance (float32; 0 for constant features).")
      .def_property_readonly("scale_", [](const Standardizer& s) {
        if (!s.fitted()) attribute_error("scale_: the Standardizer is not fitted yet");
        return float_vector(s.scale());
      }, "Per-feature population standard deviation, 1 where it is 0 (float32).")
      .def_property_readonly("n_samples_seen_", [](const Standardizer& s) {
        if (!s.fitted()) attribute_error("n_samples_seen_: the Standardizer is not fitted yet");
        return s.samples_seen();
      }, "Samples fitted since the last fit.")
      .def_property_readonly("n_features_in_", [](const Standardizer& s) {
        if (!s.fitted()) attribute_error("n_features_in_: the Standardizer is not fitted yet");
        return s.features();
      })
      .def(
          "save", [](const Standardizer& s, const py::object& path) { save_file(s, path_of(path)); },
          py::arg("path"),
          "Writes the statistics (count, mean, M2 per feature, in double) to a file, atomically.")
      .def_static(
          "load", [](const py::object& path) { return load_file(path_of(path)); }, py::arg("path"),
          "A Standardizer from a file written by save; a truncated or corrupted file is a "
          "RuntimeError naming it.")
      .def("__repr__", [](const Standardizer& s) {
        if (!s.fitted()) return std::string("Standardizer(not fitted)");
        return "Standardizer(features=" + std::to_string(s.features()) +
               ", samples=" + std::to_string(s.samples_seen()) + ")";
      });
}
