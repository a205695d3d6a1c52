#include "normkit/tensor.hpp"

#include <algorithm>
#include <cctype>
#include <string>

#include "core/check.hpp"
#include "core/sample_geometry.hpp"

namespace normkit {

namespace {
struct LayoutInfo {
  Layout layout;
  std::string_view name;
  int rank;
  bool channels_last;
};
constexpr LayoutInfo kLayouts[] = {
    {Layout::NC, "NC", 2, false},       {Layout::NCL, "NCL", 3, false},
    {Layout::NCHW, "NCHW", 4, false},   {Layout::NCDHW, "NCDHW", 5, false},
    {Layout::NLC, "NLC", 3, true},      {Layout::NHWC, "NHWC", 4, true},
    {Layout::NDHWC, "NDHWC", 5, true},
};
const LayoutInfo& info(Layout layout) noexcept {
  for (const auto& entry : kLayouts)
    if (entry.layout == layout) return entry;
  return kLayouts[0];
}
bool is_known(Layout layout) noexcept {
  return std::any_of(std::begin(kLayouts), std::end(kLayouts),
                     [&](const LayoutInfo& entry) { return entry.layout == layout; });
}
}  // namespace

int rank_of(Layout layout) noexcept { return info(layout).rank; }
bool is_channels_last(Layout layout) noexcept { return info(layout).channels_last; }
int channel_axis(Layout layout) noexcept {
  return info(layout).channels_last ? info(layout).rank - 1 : 1;
}
std::string_view to_string(Layout layout) noexcept { return info(layout).name; }

Layout layout_from_string(std::string_view name) {
  std::string upper(name);
  std::transform(upper.begin(), upper.end(), upper.begin(),
                 [](unsigned char ch) { return static_cast<char>(std::toupper(ch)); });
  for (const auto& entry : kLayouts)
    if (entry.name == upper) return entry.layout;
  detail::fail_invalid("layout: unsupported layout '", name,
                       "'; expected one of NC, NCL, NCHW, NCDHW, NLC, NHWC, NDHWC");
}

template <class T>
TensorView<T> TensorView<T>::contiguous(T* data, std::span<const int64_t> sizes, Layout layout) {
  if (!is_known(layout)) detail::fail_invalid("layout: unsupported layout value");
  const int rank = rank_of(layout);
  if (static_cast<int>(sizes.size()) != rank)
    detail::fail_invalid("layout ", to_string(layout), " needs ", rank, " sizes, got ",
                         sizes.size());
  TensorView view;
  view.data = data;
  view.layout = layout;
  int64_t stride = 1;
  for (int axis = rank - 1; axis >= 0; --axis) {
    view.shape[axis] = sizes[axis];
    view.strides[axis] = stride;
    stride *= std::max<int64_t>(sizes[axis], 1);
  }
  return view;
}

template <class T>
TensorView<T> TensorView<T>::strided(T* data, std::span<const int64_t> sizes,
                                     std::span<const int64_t> element_strides, Layout layout) {
  TensorView view = contiguous(data, sizes, layout);
  if (element_strides.size() != sizes.size())
    detail::fail_invalid("strides: expected ", sizes.size(), " strides, got ",
                         element_strides.size());
  std::copy(element_strides.begin(), element_strides.end(), view.strides.begin());
  return view;
}

template <class T>
int64_t TensorView<T>::numel() const noexcept {
  int64_t n = 1;
  for (int axis = 0; axis < rank(); ++axis) n *= shape[axis];
  return n;
}

template <class T>
std::string TensorView<T>::shape_string() const {
  std::string text = "[";
  for (int axis = 0; axis < rank(); ++axis) {
    if (axis) text += ", ";
    text += std::to_string(shape[axis]);
  }
  return text + "] (" + std::string(to_string(layout)) + ")";
}

namespace {
// Collapses axes [first, last) into one (size, stride); false when impossible.
template <class T>
bool collapse(const TensorView<T>& view, int first, int last, int64_t& size, int64_t& stride) {
  size = 1;
  stride = 1;
  bool have_stride = false;
  // Walk from the fastest axis outwards; size-1 axes carry no constraint.
  for (int axis = last - 1; axis >= first; --axis) {
    const int64_t n = view.shape[axis];
    if (n == 0) {  // empty: nothing to address, any strides will do
      size = 0;
      return true;
    }
    if (n == 1) continue;
    if (!have_stride) {
      stride = view.strides[axis];
      have_stride = true;
    } else if (view.strides[axis] != stride * size) {
      return false;
    }
    size *= n;
  }
  return true;
}

// What every geometry needs: a known layout, sizes and strides >= 0.
template <class T>
void check_view(const TensorView<T>& view, std::string_view argument_name) {
  if (!is_known(view.layout))
    detail::fail_invalid(argument_name, ": unsupported layout value");
  for (int axis = 0; axis < view.rank(); ++axis) {
    if (view.shape[axis] < 0)
      detail::fail_invalid(argument_name, ": negative size in shape ", view.shape_string());
    if (view.strides[axis] < 0)
      detail::fail_invalid(argument_name, ": negative strides are not supported (shape ",
                           view.shape_string(), ")");
  }
}
}  // namespace

template <class T>
Geometry geometry_of(const TensorView<T>& view, std::string_view argument_name, Folding folding) {
  check_view(view, argument_name);
  const int rank = view.rank();
  const int c_axis = channel_axis(view.layout);
  Geometry g;
  g.channels = view.shape[c_axis];
  g.channel_stride = view.strides[c_axis];
  if (!collapse(view, 0, c_axis, g.outer, g.outer_stride) ||
      !collapse(view, c_axis + 1, rank, g.inner, g.inner_stride))
    detail::fail_invalid(argument_name, ": the strides of ", view.shape_string(),
                         " do not let the axes around the channel axis be viewed as one; "
                         "pass a contiguous tensor");
  if (g.inner == 1) g.inner_stride = 1;
  if (g.outer == 1) g.outer_stride = g.inner * g.inner_stride;
  if (folding == Folding::none) return g;
  // Channels contiguous and (outer, inner) one evenly strided run: rows form.
  if (g.channels > 1 && g.channel_stride == 1 && g.inner > 1 &&
      g.outer_stride == g.inner * g.inner_stride) {
    g.outer *= g.inner;
    g.outer_stride = g.inner_stride;
    g.inner = 1;
    g.inner_stride = 1;
  }
  // One run per channel that is not rows form (a single channel, or channels
  // that are not contiguous): outer and inner are both reduced, so view the run
  // as inner and let the channels-first kernels stream it.
  if (g.inner == 1 && g.outer > 1 && (g.channels == 1 || g.channel_stride != 1)) {
    g.inner = g.outer;
    g.inner_stride = g.outer_stride;
    g.outer = 1;
    g.outer_stride = g.inner * g.inner_stride;
  }
  return g;
}

template <class T>
SampleGeometry sample_geometry_of(const TensorView<T>& view, std::string_view argument_name) {
  check_view(view, argument_name);
  const int c_axis = channel_axis(view.layout);
  const int first = is_channels_last(view.layout) ? 1 : 2;
  const int last = is_channels_last(view.layout) ? view.rank() - 1 : view.rank();
  SampleGeometry g;
  g.n = view.shape[0];
  g.c = view.shape[c_axis];
  g.n_stride = view.strides[0];
  g.c_stride = view.strides[c_axis];
  if (!collapse(view, first, last, g.s, g.s_stride))
    detail::fail_invalid(argument_name, ": the strides of ", view.shape_string(),
                         " do not let the spatial axes be viewed as one; pass a contiguous tensor");
  return g;
}

template struct TensorView<float>;
template struct TensorView<const float>;
template struct TensorView<double>;
template struct TensorView<const double>;
template Geometry geometry_of(const TensorView<float>&, std::string_view, Folding);
template Geometry geometry_of(const TensorView<const float>&, std::string_view, Folding);
template Geometry geometry_of(const TensorView<double>&, std::string_view, Folding);
template Geometry geometry_of(const TensorView<const double>&, std::string_view, Folding);
template SampleGeometry sample_geometry_of(const TensorView<float>&, std::string_view);
template SampleGeometry sample_geometry_of(const TensorView<const float>&, std::string_view);
template SampleGeometry sample_geometry_of(const TensorView<double>&, std::string_view);
template SampleGeometry sample_geometry_of(const TensorView<const double>&, std::string_view);

}  // namespace normkit
