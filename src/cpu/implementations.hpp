#pragma once
// The fast paths, one per (family, memory form) file of src/cpu/; each file
// defines its entry. implementations.cpp puts them in the order tried.
#include "kernels/batch_norm.hpp"
#include "kernels/batch_norm_fused.hpp"
#include "kernels/group_norm.hpp"
#include "kernels/layer_norm.hpp"

namespace normkit::kernels {
namespace bn {
extern const Impl kPlanes;  // batch_norm_planes.cpp
extern const Impl kRows;    // batch_norm_rows.cpp
}  // namespace bn
namespace bn_fused {
extern const Impl kPlanes;  // batch_norm_fused_planes.cpp
extern const Impl kRows;    // batch_norm_fused_rows.cpp
}  // namespace bn_fused
namespace gn {
extern const Impl kPlanes;  // group_norm_planes.cpp
extern const Impl kRows;    // group_norm_rows.cpp
}  // namespace gn
namespace ln {
extern const Impl kRows;  // layer_norm_rows.cpp
}  // namespace ln
}  // namespace normkit::kernels
