#pragma once
// One registration function per op family, each in its own file, called in this
// order by module.cpp (the order of the C++ headers in normkit/normkit.hpp).
#include <pybind11/pybind11.h>

namespace normkit::python {

void register_batch_norm(pybind11::module_& m);        // batch_norm.cpp
void register_bn_variants(pybind11::module_& m);       // bn_variants.cpp
void register_batch_norm_fused(pybind11::module_& m);  // batch_norm_fused.cpp
void register_layer_norm(pybind11::module_& m);        // layer_norm.cpp
void register_group_norm(pybind11::module_& m);        // group_norm.cpp
void register_standardizer(pybind11::module_& m);      // standardizer.cpp

}  // namespace normkit::python
