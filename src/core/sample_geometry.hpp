#pragma once
// The [N, C, S] view of a tensor that per-sample statistics (group and
// instance norm) work on, next to the public [outer, C, inner] Geometry
// (normkit/tensor.hpp), and the same axis collapse that geometry_of uses.
#include <cstdint>
#include <string_view>

#include "normkit/tensor.hpp"

namespace normkit {

// Element (n, c, s) sits at n·n_stride + c·c_stride + s·s_stride. Unlike
// Geometry, N stays apart from the spatial axes even for channels-last data:
// group statistics are per sample.
struct SampleGeometry {
  int64_t n = 0, c = 0, s = 0;
  int64_t n_stride = 0, c_stride = 0, s_stride = 0;

  int64_t offset(int64_t in, int64_t ic, int64_t is) const noexcept {
    return in * n_stride + ic * c_stride + is * s_stride;
  }
  bool same_extent(const SampleGeometry& o) const noexcept {
    return n == o.n && c == o.c && s == o.s;
  }
  bool operator==(const SampleGeometry&) const = default;
};

// The spatial axes (all but N and C) must collapse into one evenly strided
// run; N and C keep their own strides, so batch slices and padded rows work in
// either layout. Throws normkit::Error naming the argument otherwise, and for
// an unknown layout or a negative size or stride (as geometry_of).
template <class T>
SampleGeometry sample_geometry_of(const TensorView<T>& view, std::string_view argument_name);

}  // namespace normkit
