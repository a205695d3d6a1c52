// normkit.Standardizer: the input standardizer (normkit::data::Standardizer)
// as a scikit-learn estimator: StandardScaler's names (fit, partial_fit,
// transform, fit_transform, inverse_transform, mean_, var_, scale_, ...), the
// estimator protocol (fit(X, y=None), get_params/set_params, pickling and
// deep copies) so that it works inside sklearn.pipeline.Pipeline and clone(),
// and the data's dtype kept: float32 data is fitted and transformed with the
// fast kernels in float32, float64 data exactly in float64; other real dtypes
// (integers) become float64, as in scikit-learn. mean_, var_ and scale_ are
// float64 (the statistics are kept in double).
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <optional>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "families.hpp"
#include "normkit/standardizer.hpp"
#include "numpy_views.hpp"

namespace normkit::python {
namespace {

[[noreturn]] void attribute_error(const std::string& message) { throw py::attribute_error(message); }

// The estimator: the statistics and StandardScaler's `copy` parameter.
struct Estimator {
  data::Standardizer stats;
  bool copy = true;
};

// x as a checked [samples, features] array of real numbers, converted (a copy)
// only when it is not C-contiguous float32 or float64 already: ints and other
// real dtypes become float64.
py::array table_of(const py::object& object, const char* what) {
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
  constexpr int kFlags = py::array::c_style | py::array::forcecast;
  py::array table;
  if (has_dtype<float>(a))
    table = py::array_t<float, kFlags>::ensure(a);
  else
    table = py::array_t<double, kFlags>::ensure(a);
  if (!table) type_error(std::string(what) + ": cannot convert " + dtype_of(a) + " to a float array");
  return table;
}

// Runs call(T{}) with T the element type of a table from table_of.
template <class F>
auto by_table_dtype(const py::array& table, F&& call) {
  if (has_dtype<float>(table)) return call(float{});
  return call(double{});
}

template <class T>
std::span<const T> values_of(const py::array& table) {
  return {static_cast<const T*>(table.data()), static_cast<size_t>(table.size())};
}

// NaN or infinity anywhere is a ValueError naming the first one.
template <class T>
void check_finite(std::span<const T> values, int64_t features, const char* what) {
  for (size_t i = 0; i < values.size(); ++i)
    if (!std::isfinite(values[i]))
      value_error(std::string(what) + ": NaN or infinity at sample " + std::to_string(i / features) +
                  ", feature " + std::to_string(i % features) +
                  (std::is_same_v<T, float> ? " (as float32)" : ""));
}

void require_fitted(const data::Standardizer& s) {
  if (!s.fitted()) value_error("this Standardizer is not fitted yet: call fit or partial_fit first");
}

py::array_t<double> double_vector(const std::vector<double>& values) {
  py::array_t<double> out(static_cast<py::ssize_t>(values.size()));
  std::copy(values.begin(), values.end(), out.mutable_data());
  return out;
}

// Merges x's statistics into s (after fit's reset, when `reset`).
void fit_table(data::Standardizer& s, const py::object& x, bool reset, const char* what) {
  py::array table = table_of(x, what);
  const int64_t features = table.shape(1);
  if (!reset && s.fitted() && features != s.features())
    value_error(std::string(what) + ": x has " + std::to_string(features) +
                " features, the standardizer was fitted on " + std::to_string(s.features()));
  by_table_dtype(table, [&](auto t) {
    using T = decltype(t);
    const std::span<const T> values = values_of<T>(table);
    check_finite(values, features, what);
    py::gil_scoped_release unlocked;
    if (reset)
      s.fit(values, features);
    else
      s.partial_fit(values, features);
  });
}

// transform and inverse_transform: on a new array (copy), or in place on x
// itself when it is already a writable C-contiguous float32 or float64 array.
py::array apply_to(const Estimator& e, const py::object& x, const std::optional<bool>& copy_option,
                   const char* what, bool inverse) {
  const data::Standardizer& s = e.stats;
  require_fitted(s);
  py::array table = table_of(x, what);
  if (table.shape(1) != s.features())
    value_error(std::string(what) + ": x has " + std::to_string(table.shape(1)) +
                " features, the standardizer was fitted on " + std::to_string(s.features()));
  const bool copy = copy_option.value_or(e.copy);
  return by_table_dtype(table, [&](auto t) -> py::array {
    using T = decltype(t);
    check_finite(values_of<T>(table), table.shape(1), what);
    py::array_t<T> result;
    if (copy) {
      result = py::array_t<T>(std::vector<py::ssize_t>{table.shape(0), table.shape(1)});
      std::copy_n(static_cast<const T*>(table.data()), table.size(), result.mutable_data());
    } else {
      if (!table.is(x) || !table.writeable())
        value_error(std::string(what) + ": copy=False works in place, so x must be a writable "
                    "C-contiguous float32 or float64 array");
      result = py::reinterpret_borrow<py::array_t<T>>(table);
    }
    std::span<T> values(result.mutable_data(), static_cast<size_t>(result.size()));
    {
      py::gil_scoped_release unlocked;
      if (inverse)
        s.inverse_transform(values);
      else
        s.transform(values);
    }
    return result;
  });
}

py::bytes to_bytes(const data::Standardizer& s) {
  std::ostringstream bytes;
  if (s.fitted()) s.save(bytes);
  return py::bytes(bytes.str());
}

data::Standardizer from_bytes(const std::string& bytes, const std::string& source) {
  std::istringstream in(bytes);
  try {
    data::Standardizer s = data::Standardizer::load(in);
    if (in.peek() != std::char_traits<char>::eof())
      throw Error(ErrorKind::runtime, "standardizer: unexpected bytes after the statistics");
    return s;
  } catch (const Error& e) {
    throw Error(ErrorKind::runtime, source + ": " + e.what());
  }
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
void save_file(const data::Standardizer& s, const std::string& path) {
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

data::Standardizer load_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) os_error(path);
  std::stringstream bytes;
  bytes << in.rdbuf();
  return from_bytes(bytes.str(), "'" + path + "'");
}

}  // namespace

void register_standardizer(py::module_& m) {
  py::class_<Estimator>(m, "Standardizer", R"doc(Standardizer(*, copy=True): per-feature standardization x' = (x - mean_) / scale_.

scikit-learn's StandardScaler (with_mean and with_std always on): scale_ is the population
(biased) standard deviation, and 1 for features of zero variance (they map to 0, never NaN).
An estimator as scikit-learn expects: fit(X, y=None), partial_fit, transform, fit_transform,
inverse_transform, get_params/set_params, pickling and copy.deepcopy, so it can be a step of
sklearn.pipeline.Pipeline. The data's dtype is kept: float32 runs normkit's BN statistics
kernels in float32, float64 is exact in float64; integers become float64. partial_fit merges
the statistics of each chunk with those seen before (Chan et al.), so streaming a data set in
chunks gives what one fit on all of it gives. NaN or infinity in any input is a ValueError.
copy=False makes transform work in place on a writable C-contiguous float32/float64 array.)doc")
      .def(py::init([](bool copy) { return Estimator{{}, copy}; }), py::kw_only(), py::arg("copy") = true)
      .def_readwrite("copy", &Estimator::copy, "transform's default for copy=None.")
      .def(
          "get_params", [](const Estimator& e, bool) { return py::dict(py::arg("copy") = e.copy); },
          py::arg("deep") = true, "The estimator's parameters, {'copy': ...} (scikit-learn's protocol).")
      .def(
          "set_params",
          [](Estimator& e, const py::kwargs& params) -> Estimator& {
            for (const auto& [key, value] : params) {
              const auto name = py::str(key).cast<std::string>();
              if (name != "copy")
                value_error("set_params: Standardizer has no parameter '" + name + "' (it has: copy)");
              e.copy = value.cast<bool>();
            }
            return e;
          },
          py::return_value_policy::reference_internal, "Sets parameters by name; returns self.")
      .def(
          "fit",
          [](Estimator& e, const py::object& x, const py::object&) -> Estimator& {
            fit_table(e.stats, x, true, "fit");
            return e;
          },
          py::arg("X"), py::arg("y") = py::none(), py::return_value_policy::reference_internal,
          "Statistics of X alone (earlier fits are forgotten); y is ignored. Returns self.")
      .def(
          "partial_fit",
          [](Estimator& e, const py::object& x, const py::object&) -> Estimator& {
            fit_table(e.stats, x, false, "partial_fit");
            return e;
          },
          py::arg("X"), py::arg("y") = py::none(), py::return_value_policy::reference_internal,
          "Merges the statistics of X into those seen so far; y is ignored. Returns self.")
      .def(
          "transform",
          [](const Estimator& e, const py::object& x, const std::optional<bool>& copy) {
            return apply_to(e, x, copy, "transform", false);
          },
          py::arg("X"), py::arg("copy") = py::none(),
          "(X - mean_) / scale_ in X's dtype (float32 or float64), as a new array; copy=False "
          "(or copy=None with the estimator's copy=False) overwrites X and returns it.")
      .def(
          "fit_transform",
          [](Estimator& e, const py::object& x, const py::object&) {
            fit_table(e.stats, x, true, "fit_transform");
            return apply_to(e, x, std::nullopt, "fit_transform", false);
          },
          py::arg("X"), py::arg("y") = py::none(), "fit(X).transform(X).")
      .def(
          "inverse_transform",
          [](const Estimator& e, const py::object& x, const std::optional<bool>& copy) {
            return apply_to(e, x, copy, "inverse_transform", true);
          },
          py::arg("X"), py::arg("copy") = py::none(), "X * scale_ + mean_; copy as for transform.")
      .def_property_readonly("mean_", [](const Estimator& e) {
        if (!e.stats.fitted()) attribute_error("mean_: the Standardizer is not fitted yet");
        return double_vector(e.stats.mean<double>());
      }, "Per-feature mean (float64).")
      .def_property_readonly("var_", [](const Estimator& e) {
        if (!e.stats.fitted()) attribute_error("var_: the Standardizer is not fitted yet");
        return double_vector(e.stats.variance<double>());
      }, "Per-feature population variance (float64; 0 for constant features).")
      .def_property_readonly("scale_", [](const Estimator& e) {
        if (!e.stats.fitted()) attribute_error("scale_: the Standardizer is not fitted yet");
        return double_vector(e.stats.scale<double>());
      }, "Per-feature population standard deviation, 1 where it is 0 (float64).")
      .def_property_readonly("n_samples_seen_", [](const Estimator& e) {
        if (!e.stats.fitted()) attribute_error("n_samples_seen_: the Standardizer is not fitted yet");
        return e.stats.samples_seen();
      }, "Samples fitted since the last fit.")
      .def_property_readonly("n_features_in_", [](const Estimator& e) {
        if (!e.stats.fitted()) attribute_error("n_features_in_: the Standardizer is not fitted yet");
        return e.stats.features();
      })
      .def(
          "save", [](const Estimator& e, const py::object& path) { save_file(e.stats, path_of(path)); },
          py::arg("path"),
          "Writes the statistics (count, mean, M2 per feature, in double) to a file, atomically.")
      .def_static(
          "load", [](const py::object& path) { return Estimator{load_file(path_of(path)), true}; },
          py::arg("path"),
          "A Standardizer from a file written by save; a truncated or corrupted file is a "
          "RuntimeError naming it.")
      .def(py::pickle(
          [](const Estimator& e) { return py::make_tuple(e.copy, to_bytes(e.stats)); },
          [](const py::tuple& state) {
            if (state.size() != 2) value_error("Standardizer: bad pickled state");
            const auto bytes = state[1].cast<std::string>();
            return Estimator{bytes.empty() ? data::Standardizer{} : from_bytes(bytes, "pickled Standardizer"),
                             state[0].cast<bool>()};
          }))
      .def("__repr__", [](const Estimator& e) {
        const std::string copy = e.copy ? "" : "copy=False, ";
        if (!e.stats.fitted()) return "Standardizer(" + copy + "not fitted)";
        return "Standardizer(" + copy + "features=" + std::to_string(e.stats.features()) +
               ", samples=" + std::to_string(e.stats.samples_seen()) + ")";
      });
}

}  // namespace normkit::python
