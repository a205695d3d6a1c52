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

#include <array>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "normkit/normkit.hpp"

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
  std::optional<py::array> dx;
  if (compute_dx) {
    dx = writable_like<T>(out, x, "out");
    check_no_partial_overlap(*dx, x, "out", "x");
    check_no_partial_overlap(*dx, dy, "out", "dy");
  } else if (!out.is_none()) {
    value_error("out: given, but compute_dx is False");
  }
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

}  // namespace

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

template <class T>
std::span<const T> span_of(const Flat<T>& a) {
  return {a.data(), static_cast<size_t>(a.size())};
}

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
  std::optional<py::array> dx;
  if (compute_dx) {
    dx = writable_like<T>(out, x, "out");
    check_no_partial_overlap(*dx, x, "out", "x");
    check_no_partial_overlap(*dx, dy, "out", "dy");
  } else if (!out.is_none()) {
    value_error("out: given, but compute_dx is False");
  }
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

  register_group_norm(m);
}
