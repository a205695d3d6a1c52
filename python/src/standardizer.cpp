// normkit.Standardizer: the input standardizer (normkit::data::Standardizer) with
// scikit-learn's StandardScaler names. It works in float32, as the engine does:
// inputs of other real dtypes are converted (a copy), results are float32, and
// mean_, var_, scale_ are the float32 values transform uses.
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "families.hpp"
#include "normkit/standardizer.hpp"
#include "numpy_views.hpp"

namespace normkit::python {
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

void require_fitted(const data::Standardizer& s) {
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
py::array apply_to(const data::Standardizer& s, const py::object& x, bool copy, const char* what,
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
  try {
    data::Standardizer s = data::Standardizer::load(in);
    if (in.peek() != std::char_traits<char>::eof())
      throw Error(ErrorKind::runtime, "standardizer: unexpected bytes after the statistics");
    return s;
  } catch (const Error& e) {
    throw Error(ErrorKind::runtime, "'" + path + "': " + e.what());
  }
}

}  // namespace

void register_standardizer(py::module_& m) {
  using data::Standardizer;
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

}  // namespace normkit::python
