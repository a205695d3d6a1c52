#pragma once
// The NumPy-to-view adapter every family's bindings share.
//
// Arrays reach the kernels as they are: NumPy's byte strides become element
// strides, so transposed, sliced or channels-last arrays are not copied and the
// kernels choose their path from the strides, as in C++. The only copies made
// are of inputs NumPy lays out in a way a TensorView cannot express (strides
// that are not whole elements, misaligned data), of per-channel parameters
// given in another dtype or layout (C values, never x), and the staging in
// Staged below. Arrays that a function writes (out=, running statistics,
// num_batches_tracked) are never converted: a converted copy would take the
// result and leave the caller's array as it was, so they must already have the
// right dtype, shape and flags.
//
// Every check that needs Python happens before the GIL is released; the C++
// functions then check the rest before they write anything, so an exception
// leaves every array as it was. The one exception is NaN or infinity in a
// training batch: it shows in the statistics computed by the call that also
// writes y, so out= then holds that call's values (running statistics do not).
//
// A family's wrapper for element type T is a template: by_dtype picks T from x
// (float32 runs the fast kernels, float64 the reference).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "normkit/normkit.hpp"

namespace normkit::python {

namespace py = pybind11;

[[noreturn]] void type_error(const std::string& message);
[[noreturn]] void value_error(const std::string& message);

std::string repr_of(const py::handle& object);
std::string type_name(const py::handle& object);
std::string shape_of(const py::array& a);
std::string dtype_of(const py::array& a);

py::module_ numpy();

template <class T>
bool has_dtype(const py::array& a) {
  return py::isinstance<py::array_t<T>>(a);
}

bool is_aligned(const py::array& a);

// x, dy: any array-like; NumPy converts lists, but the dtype must be one the
// library has kernels for, since a float16 or integer x converted silently to
// float32 would be a hidden full-size copy.
py::array float_array(const py::object& object, const char* name);

// Runs call(T{}, x) with T = float for float32 x, double for float64.
template <class F>
auto by_dtype(const py::object& x_object, F&& call) {
  const py::array x = float_array(x_object, "x");
  if (has_dtype<float>(x)) return call(float{}, x);
  return call(double{}, x);
}

// The layout names the order of x's axes; without one, channels-first by rank.
Layout layout_for(const std::optional<std::string>& name, const py::array& x);
int64_t channels_of(const py::array& x, Layout layout);

template <class T>
bool strides_expressible(const py::array& a) {
  if (!is_aligned(a)) return false;
  for (py::ssize_t axis = 0; axis < a.ndim(); ++axis)
    if (a.strides(axis) % static_cast<py::ssize_t>(sizeof(T)) != 0) return false;
  return true;
}

// An input the kernels read; a copy (order="K" keeps the memory order) only when
// its strides are not whole elements or its data is misaligned.
py::array copy_keeping_order(const py::array& a);
template <class T>
py::array readable(py::array a) {
  if (strides_expressible<T>(a)) return a;
  return copy_keeping_order(a);
}

template <class T>
TensorView<T> view_of(T* data, const py::array& a, Layout layout) {
  std::array<int64_t, kMaxRank> sizes{}, strides{};
  const auto rank = static_cast<size_t>(a.ndim());
  for (size_t axis = 0; axis < rank; ++axis) {
    sizes[axis] = a.shape(static_cast<py::ssize_t>(axis));
    strides[axis] = a.strides(static_cast<py::ssize_t>(axis)) / static_cast<py::ssize_t>(sizeof(T));
  }
  return TensorView<T>::strided(data, std::span<const int64_t>(sizes.data(), rank),
                                std::span<const int64_t>(strides.data(), rank), layout);
}

template <class T>
ConstTensorView<T> input_view(const py::array& a, Layout layout) {
  return view_of<const T>(static_cast<const T*>(a.data()), a, layout);
}

template <class T>
TensorView<T> output_view(py::array& a, Layout layout) {
  return view_of<T>(static_cast<T*>(a.mutable_data()), a, layout);
}

// `a` has x's dtype and shape (name says which argument is meant in the error).
void check_like_x(const py::array& a, const py::array& x, const char* name, bool same_dtype);

// A second input of x's shape and dtype (dy, a residual).
template <class T>
py::array readable_like(const py::object& object, const py::array& x, const char* name) {
  py::array a = float_array(object, name);
  check_like_x(a, x, name, has_dtype<T>(a));
  return readable<T>(a);
}

// An output whose elements overlap each other (a writable view with a zero
// stride, or strides smaller than the block below them) would have the kernels
// write two results into one place.
void check_no_self_overlap(const py::array& a, const char* name);

// An array the function writes in full: out=, or a new one in x's memory order
// (numpy.empty_like keeps it), so that x and y share a geometry and the kernels
// stream both the same way.
py::array empty_like(const py::array& a);
template <class T>
py::array writable_like(const py::object& out, const py::array& x, const char* name) {
  if (out.is_none()) return empty_like(x);
  if (!py::isinstance<py::array>(out))
    type_error(std::string(name) + ": expected a numpy.ndarray, got " + type_name(out));
  py::array a = py::reinterpret_borrow<py::array>(out);
  check_like_x(a, x, name, has_dtype<T>(a));
  if (!a.writeable()) value_error(std::string(name) + ": array is read-only");
  if (!strides_expressible<T>(a))
    value_error(std::string(name) + ": array is misaligned or its strides are not whole elements");
  check_no_self_overlap(a, name);
  return a;
}

// Exact aliasing is in-place computation, which the C++ functions check; any other
// overlap would let the kernels read values they have already overwritten.
void check_no_partial_overlap(const py::array& out, const py::array& in, const char* out_name,
                              const char* in_name);

// Values the functions only read (γ, β, statistics): converted to x's dtype and made
// contiguous, at the cost of copying them.
template <class T>
using Values = py::array_t<T, py::array::c_style | py::array::forcecast>;

template <class T>
std::span<const T> span_of(const Values<T>& a) {
  return {a.data(), static_cast<size_t>(a.size())};
}
template <class T>
std::span<const T> span_of(const std::optional<Values<T>>& a) {
  if (!a) return {};
  return span_of(*a);
}
template <class T>
std::span<T> span_of(py::array_t<T>& a) {
  return {a.mutable_data(), static_cast<size_t>(a.size())};
}

// `object` as a C-contiguous array of T: per-channel values must be 1-D
// (one_dimensional), statistics of other families come in any shape and are read
// flat. Conversion failures name the argument.
py::array checked_array(const py::object& object, const char* name);
template <class T>
Values<T> converted(const py::array& a, const char* name) {
  auto values = Values<T>::ensure(a);
  if (!values) type_error(std::string(name) + ": cannot convert " + dtype_of(a) + " to the dtype of x");
  return values;
}

void check_one_dimensional(const py::array& a, const char* name);

// Per-channel values (γ, β): absent when None.
template <class T>
std::optional<Values<T>> channel_values(const py::object& object, const char* name) {
  if (object.is_none()) return std::nullopt;
  const py::array a = checked_array(object, name);
  check_one_dimensional(a, name);
  return converted<T>(a, name);
}

// Per-channel statistics the call needs (running_mean, mean, invstd, ...).
template <class T>
Values<T> required_channel_values(const py::object& object, const char* name) {
  if (object.is_none()) value_error(std::string(name) + " is required");
  return *channel_values<T>(object, name);
}

// Statistics saved per (sample, group) or per virtual batch: any shape, read flat.
template <class T>
Values<T> flat_values(const py::object& object, const char* name) {
  if (object.is_none()) value_error(std::string(name) + " is required");
  const py::array a = checked_array(object, name);
  return converted<T>(numpy().attr("ravel")(a).cast<py::array>(), name);
}

// Per-channel arrays updated in place (running statistics): used as they are.
py::array in_place_array(const py::object& object, const char* name, const std::string& x_dtype,
                         bool right_dtype);
template <class T>
std::span<T> updated_in_place(const py::object& object, const char* name, const std::string& x_dtype) {
  if (object.is_none()) return {};
  py::array a = in_place_array(object, name, x_dtype,
                               py::isinstance<py::array>(object) &&
                                   has_dtype<T>(py::reinterpret_borrow<py::array>(object)));
  return {static_cast<T*>(a.mutable_data()), static_cast<size_t>(a.size())};
}

int64_t* counter_in_place(const py::object& object);

// An array of a call (x, out, weight, ...), by name; anything but an ndarray is
// skipped (None, or a list that was converted to a new array).
struct Operand {
  py::handle array;
  const char* name;
};
// An array written in place must share no memory with the call's other arrays
// (running_mean given again as running_var, or a view into x, out or weight):
// the kernels would read values they have already overwritten, or write one
// statistic over another.
void check_disjoint(const Operand& written, const std::vector<Operand>& others);

// running_mean, running_var and num_batches_tracked, updated in place when given,
// sharing no memory with each other or with `others` (the call's other arrays).
template <class T>
RunningStats<T> running_in_place(const py::object& mean, const py::object& var,
                                 const py::object& num_batches_tracked, const std::string& x_dtype,
                                 std::vector<Operand> others = {}) {
  RunningStats<T> running{updated_in_place<T>(mean, "running_mean", x_dtype),
                          updated_in_place<T>(var, "running_var", x_dtype),
                          counter_in_place(num_batches_tracked)};
  others.push_back({num_batches_tracked, "num_batches_tracked"});
  check_disjoint({var, "running_var"}, others);
  others.push_back({var, "running_var"});
  check_disjoint({mean, "running_mean"}, others);
  return running;
}

BatchNormOptions options_of(std::optional<double> momentum, double eps,
                            const std::string& momentum_convention,
                            const std::string& running_variance);
BackwardMode mode_of(const std::string& mode);

// ---------------------------------------------------------------------------
// The arguments every per-channel forward (y from x, γ, β) and every backward
// (dx, dγ, dβ from x, dy, γ) starts from, checked in that order.

template <class T>
struct Normalization {
  Layout layout;
  py::array x, y;
  std::optional<Values<T>> weight, bias;

  ConstTensorView<T> x_view() const { return input_view<T>(x, layout); }
  TensorView<T> y_view() { return output_view<T>(y, layout); }
  int64_t channels() const { return channels_of(x, layout); }
  // The arrays an array written in place must not share memory with.
  std::vector<Operand> operands() const {
    const py::handle none = Py_None;
    return {{x, "x"}, {y, "out"}, {weight ? py::handle(*weight) : none, "weight"},
            {bias ? py::handle(*bias) : none, "bias"}};
  }

  // Runs call(x, y, γ, β) on the views, without the GIL.
  template <class Call>
  void run(Call&& call) {
    const auto xv = x_view();
    const auto yv = y_view();
    py::gil_scoped_release unlocked;
    call(xv, yv, span_of(weight), span_of(bias));
  }
};

template <class T>
Normalization<T> normalization(const py::array& x_in, const py::object& weight,
                               const py::object& bias, const std::optional<std::string>& layout_name,
                               const py::object& out) {
  const Layout layout = layout_for(layout_name, x_in);
  py::array x = readable<T>(x_in);
  py::array y = writable_like<T>(out, x, "out");
  check_no_partial_overlap(y, x, "out", "x");
  return {layout, x, y, channel_values<T>(weight, "weight"), channel_values<T>(bias, "bias")};
}

template <class T>
struct Gradients {
  Layout layout;
  py::array x, dy;
  std::optional<py::array> dx;  // absent: dγ and dβ only
  std::optional<Values<T>> weight;
  py::array_t<T> dweight, dbias;

  ConstTensorView<T> x_view() const { return input_view<T>(x, layout); }
  ConstTensorView<T> dy_view() const { return input_view<T>(dy, layout); }
  // An empty view (data == nullptr) asks the C++ functions for dγ and dβ only.
  TensorView<T> dx_view() { return dx ? output_view<T>(*dx, layout) : TensorView<T>{}; }
  py::object dx_or_none() const { return dx ? py::object(*dx) : py::object(py::none()); }
  py::tuple result() const { return py::make_tuple(dx_or_none(), dweight, dbias); }

  // Runs call(x, dy, dx, γ, dγ, dβ) on the views, without the GIL.
  template <class Call>
  void run(Call&& call) {
    const auto xv = x_view();
    const auto dyv = dy_view();
    const auto dxv = dx_view();
    py::gil_scoped_release unlocked;
    call(xv, dyv, dxv, span_of(weight), span_of(dweight), span_of(dbias));
  }
};

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

// x as the kernels read it comes from `prepare` (readable<T> by default): the fused
// residual forms need it compacted first.
template <class T>
Gradients<T> gradients(const py::array& x_in, const py::object& dy_object, const py::object& weight,
                       const std::optional<std::string>& layout_name, const py::object& out,
                       bool compute_dx, py::array (*prepare)(py::array) = &readable<T>) {
  const Layout layout = layout_for(layout_name, x_in);
  py::array x = prepare(x_in);
  py::array dy = readable_like<T>(dy_object, x, "dy");
  std::optional<py::array> dx = gradient_out<T>(out, x, dy, compute_dx);
  auto gamma = channel_values<T>(weight, "weight");
  const int64_t channels = channels_of(x, layout);
  return {layout, x, dy, dx, std::move(gamma), py::array_t<T>(channels), py::array_t<T>(channels)};
}

// Workaround for a library bug (reported): the implementations index every view of
// one call with x's [outer, C, inner] extents, but geometry_of folds each view on its
// own (rows form for one, planes for another), so two views of one shape can disagree
// and a kernel then reads or writes out of bounds. A call whose views disagree runs on
// C-contiguous copies (which always agree): stage() swaps them in, and finish() copies
// the result into the caller's output afterwards.
struct Named {
  py::array* array;  // nullptr: not part of this call
  const char* name;
};

class Staged {
 public:
  template <class T>
  static Staged stage(Layout layout, std::initializer_list<Named> inputs, Named output) {
    Staged staged;
    std::optional<Geometry> first;
    bool agree = true;
    auto check = [&](const Named& a) {
      if (!a.array) return;
      const Geometry g = geometry_of(input_view<T>(*a.array, layout), a.name);
      if (!first) first = g;
      agree = agree && first->same_extent(g);
    };
    for (const Named& a : inputs) check(a);
    check(output);
    if (!agree) staged.stage_all(inputs, output.array);
    return staged;
  }
  // Copies the result into the caller's output (when staged) and makes `output` it.
  void finish(py::array& output) const;

 private:
  void stage_all(std::initializer_list<Named> inputs, py::array* output);

  py::object callers_output_;
};

// The Python function of a forward in training with running statistics:
// (x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, *,
// layout, out, momentum_convention, running_variance). call(T{}, x, weight, bias,
// running_mean, running_var, num_batches_tracked, options, layout, out) runs it for
// x's element type T.
template <class Call>
auto training_forward(Call call) {
  return [call](const py::object& x, const py::object& weight, const py::object& bias,
                const py::object& running_mean, const py::object& running_var,
                const py::object& num_batches_tracked, std::optional<double> momentum, double eps,
                const std::optional<std::string>& layout, const py::object& out,
                const std::string& momentum_convention, const std::string& running_variance) {
    return by_dtype(x, [&](auto t, const py::array& a) {
      return call(t, a, weight, bias, running_mean, running_var, num_batches_tracked,
                  options_of(momentum, eps, momentum_convention, running_variance), layout, out);
    });
  };
}

// ---------------------------------------------------------------------------
// Argument lists: the keyword arguments several functions share, spelled once.
// def(m, name, f, doc, pieces...) passes each piece, a py::arg or a tuple of them,
// to m.def in order.

inline auto as_tuple(const py::arg& a) { return std::make_tuple(a); }
inline auto as_tuple(const py::arg_v& a) { return std::make_tuple(a); }
inline auto as_tuple(const py::kw_only& a) { return std::make_tuple(a); }
template <class... A>
auto as_tuple(const std::tuple<A...>& t) {
  return t;
}

template <class F, class... Pieces>
void def(py::module_& m, const char* name, F&& f, const char* doc, const Pieces&... pieces) {
  std::apply([&](const auto&... args) { m.def(name, std::forward<F>(f), args..., doc); },
             std::tuple_cat(as_tuple(pieces)...));
}

// weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps: the
// positional arguments of batch_norm_forward_training and its variants.
std::tuple<py::arg_v, py::arg_v> affine_args();
std::tuple<py::arg_v, py::arg_v, py::arg_v> running_args();
std::tuple<py::arg_v, py::arg_v> momentum_eps_args();
// The conventions of the running statistics (keyword-only, after layout and out).
std::tuple<py::arg_v, py::arg_v> convention_args();
// layout and out, keyword-only.
std::tuple<py::kw_only, py::arg_v, py::arg_v> layout_out_args();
// layout, out and compute_dx: the keyword-only tail of the backward functions.
std::tuple<py::kw_only, py::arg_v, py::arg_v, py::arg_v> backward_tail_args();

}  // namespace normkit::python
