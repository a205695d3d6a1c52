// The NumPy-to-view adapter's functions that do not depend on the element type.
#include "numpy_views.hpp"

#include <algorithm>
#include <cstdlib>

namespace normkit::python {

void type_error(const std::string& message) { throw py::type_error(message); }
void value_error(const std::string& message) { throw py::value_error(message); }

std::string repr_of(const py::handle& object) { return py::repr(object).cast<std::string>(); }
std::string type_name(const py::handle& object) {
  return py::str(py::type::of(object).attr("__name__")).cast<std::string>();
}
std::string shape_of(const py::array& a) { return repr_of(a.attr("shape")); }
std::string dtype_of(const py::array& a) { return py::str(a.dtype()).cast<std::string>(); }

py::module_ numpy() { return py::module_::import("numpy"); }

bool is_aligned(const py::array& a) {
  return (a.flags() & py::detail::npy_api::NPY_ARRAY_ALIGNED_) != 0;
}

py::array float_array(const py::object& object, const char* name) {
  py::array a = py::array::ensure(object);
  if (!a) type_error(std::string(name) + ": expected an array, got " + type_name(object));
  if (!has_dtype<float>(a) && !has_dtype<double>(a))
    type_error(std::string(name) + ": expected float32 or float64 data, got " + dtype_of(a));
  return a;
}

Layout layout_for(const std::optional<std::string>& name, const py::array& x) {
  const auto ndim = x.ndim();
  Layout layout = Layout::NC;
  if (name) {
    layout = layout_from_string(*name);
  } else {
    switch (ndim) {
      case 2: layout = Layout::NC; break;
      case 3: layout = Layout::NCL; break;
      case 4: layout = Layout::NCHW; break;
      case 5: layout = Layout::NCDHW; break;
      default:
        value_error("x: expected 2 to 5 dimensions (NC, NCL, NCHW, NCDHW), got shape " +
                    shape_of(x));
    }
  }
  if (rank_of(layout) != ndim)
    value_error("x: layout " + std::string(to_string(layout)) + " needs " +
                std::to_string(rank_of(layout)) + " dimensions, got shape " + shape_of(x));
  return layout;
}

int64_t channels_of(const py::array& x, Layout layout) { return x.shape(channel_axis(layout)); }

py::array copy_keeping_order(const py::array& a) {
  return numpy().attr("array")(a, py::arg("copy") = true, py::arg("order") = "K");
}

void check_like_x(const py::array& a, const py::array& x, const char* name, bool same_dtype) {
  if (!same_dtype)
    type_error(std::string(name) + ": dtype " + dtype_of(a) + " does not match x's " + dtype_of(x));
  if (!a.attr("shape").equal(x.attr("shape")))
    value_error(std::string(name) + ": shape " + shape_of(a) + " does not match x's shape " +
                shape_of(x));
}

py::array empty_like(const py::array& a) { return numpy().attr("empty_like")(a); }

void check_no_partial_overlap(const py::array& out, const py::array& in, const char* out_name,
                              const char* in_name) {
  if (out.data() == in.data()) return;
  if (numpy().attr("may_share_memory")(out, in).cast<bool>())
    value_error(std::string(out_name) + ": overlaps " + in_name +
                " (only exact in-place use, with the same strides, is supported)");
}

void check_no_self_overlap(const py::array& a, const char* name) {
  // Sufficient for distinct elements: by increasing |stride|, each axis's stride
  // clears the whole block of the axes below it. (A layout that interleaves
  // without overlapping fails it too, and is refused with the same words.)
  std::vector<std::pair<py::ssize_t, py::ssize_t>> axes;  // |stride|, extent
  for (py::ssize_t axis = 0; axis < a.ndim(); ++axis)
    if (a.shape(axis) > 1) axes.emplace_back(std::abs(a.strides(axis)), a.shape(axis));
  std::sort(axes.begin(), axes.end());
  py::ssize_t block = a.itemsize();
  for (const auto& [stride, extent] : axes) {
    if (stride < block)
      value_error(std::string(name) + ": array overlaps itself (strides " + repr_of(a.attr("strides")) +
                  " for shape " + shape_of(a) + "); every element needs its own memory");
    block = stride * (extent - 1) + block;
  }
}

void check_disjoint(const Operand& written, const std::vector<Operand>& others) {
  if (!py::isinstance<py::array>(written.array)) return;
  for (const Operand& other : others) {
    if (!py::isinstance<py::array>(other.array)) continue;
    const py::object shares = numpy().attr("shares_memory");
    bool overlap = true;
    try {
      overlap = shares(written.array, other.array, py::arg("max_work") = 100000).cast<bool>();
    } catch (const py::error_already_set&) {  // numpy.TooHardError: assume they do
    }
    if (overlap)
      value_error(std::string(written.name) + ": shares memory with " + other.name +
                  " (it is updated in place, so it needs memory of its own)");
  }
}

py::array checked_array(const py::object& object, const char* name) {
  py::array a = py::array::ensure(object);
  if (!a) type_error(std::string(name) + ": expected an array, got " + type_name(object));
  return a;
}

void check_one_dimensional(const py::array& a, const char* name) {
  if (a.ndim() != 1)
    value_error(std::string(name) + ": expected a 1-D array of one value per channel, got shape " +
                shape_of(a));
}

py::array in_place_array(const py::object& object, const char* name, const std::string& x_dtype,
                         bool right_dtype) {
  if (!py::isinstance<py::array>(object))
    type_error(std::string(name) + ": expected a numpy.ndarray (it is updated in place), got " +
               type_name(object));
  py::array a = py::reinterpret_borrow<py::array>(object);
  if (!right_dtype)
    type_error(std::string(name) + ": dtype " + dtype_of(a) + " does not match x's " + x_dtype +
               " (it is updated in place, so it is not converted)");
  check_one_dimensional(a, name);
  if (!(a.flags() & py::array::c_style) || !is_aligned(a))
    value_error(std::string(name) + ": array must be contiguous and aligned (it is updated in place)");
  if (!a.writeable()) value_error(std::string(name) + ": array is read-only");
  return a;
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

BatchNormOptions options_of(std::optional<double> momentum, double eps,
                            const std::string& momentum_convention,
                            const std::string& running_variance) {
  BatchNormOptions options;
  options.eps = eps;
  options.momentum = momentum;
  if (momentum_convention == "weight_on_new")
    options.momentum_convention = MomentumConvention::weight_on_new;
  else if (momentum_convention == "weight_on_old")
    options.momentum_convention = MomentumConvention::weight_on_old;
  else
    value_error("momentum_convention: expected 'weight_on_new' (PyTorch) or 'weight_on_old' "
                "(Keras), got '" + momentum_convention + "'");
  if (running_variance == "unbiased")
    options.running_variance = RunningVariance::unbiased;
  else if (running_variance == "biased")
    options.running_variance = RunningVariance::biased;
  else
    value_error("running_variance: expected 'unbiased' (PyTorch) or 'biased' (Keras), got '" +
                running_variance + "'");
  return options;
}

BackwardMode mode_of(const std::string& mode) {
  if (mode == "training") return BackwardMode::training;
  if (mode == "frozen") return BackwardMode::frozen;
  value_error("mode: expected 'training' or 'frozen', got '" + mode + "'");
}

void Staged::stage_all(std::initializer_list<Named> inputs, py::array* output) {
  for (const Named& a : inputs) *a.array = numpy().attr("ascontiguousarray")(*a.array);
  if (!output) return;
  callers_output_ = *output;
  *output = numpy().attr("empty_like")(*output, py::arg("order") = "C");
}

void Staged::finish(py::array& output) const {
  if (!callers_output_) return;
  numpy().attr("copyto")(callers_output_, output);
  output = py::reinterpret_borrow<py::array>(callers_output_);
}

std::tuple<py::arg_v, py::arg_v> affine_args() {
  return {py::arg("weight") = py::none(), py::arg("bias") = py::none()};
}

std::tuple<py::arg_v, py::arg_v, py::arg_v> running_args() {
  return {py::arg("running_mean") = py::none(), py::arg("running_var") = py::none(),
          py::arg("num_batches_tracked") = py::none()};
}

std::tuple<py::arg_v, py::arg_v> momentum_eps_args() {
  return {py::arg("momentum") = 0.1, py::arg("eps") = 1e-5};
}

std::tuple<py::arg_v, py::arg_v> convention_args() {
  return {py::arg("momentum_convention") = "weight_on_new",
          py::arg("running_variance") = "unbiased"};
}

std::tuple<py::kw_only, py::arg_v, py::arg_v> layout_out_args() {
  return {py::kw_only(), py::arg("layout") = py::none(), py::arg("out") = py::none()};
}

std::tuple<py::kw_only, py::arg_v, py::arg_v, py::arg_v> backward_tail_args() {
  return {py::kw_only(), py::arg("layout") = py::none(), py::arg("out") = py::none(),
          py::arg("compute_dx") = true};
}

}  // namespace normkit::python
