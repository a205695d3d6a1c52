// normkit's functional NumPy API, the extension module normkit._normkit: the
// library-wide pieces (version, threads, errors), then one family at a time.
// numpy_views.hpp says how arrays reach the kernels.
#include <pybind11/pybind11.h>

#include <exception>

#include "families.hpp"
#include "normkit/normkit.hpp"

namespace py = pybind11;
namespace nk = normkit;

PYBIND11_MODULE(_normkit, m) {
  m.doc() = "normkit's functional NumPy API: the normalization family on CPU, exact against "
            "PyTorch.";
  m.attr("__version__") = nk::version;

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

  m.def("set_num_threads", &nk::set_num_threads, py::arg("n"),
        "Threads used by the kernels (n >= 1). Results do not depend on it.");
  m.def("num_threads", &nk::num_threads);

  nk::python::register_batch_norm(m);
  nk::python::register_bn_variants(m);
  nk::python::register_batch_norm_fused(m);
  nk::python::register_layer_norm(m);
  nk::python::register_group_norm(m);
  nk::python::register_standardizer(m);
}
