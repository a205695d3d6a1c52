#pragma once
// Non-owning tensor views.
//
// A Layout names the order of a view's axes, and so which axis holds the
// channels: axis 1 for channels-first (NC, NCL, NCHW, NCDHW), the last axis for
// channels-last (NLC, NHWC, NDHWC). Strides (in elements, not bytes) say where
// the data are, so the same logical NCHW tensor can sit in memory as NCHW or as
// NHWC, as PyTorch's channels_last tensors do. Kernels choose their path from
// the strides, not from the name.
#include <array>
#include <cstdint>
#include <initializer_list>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>

namespace normkit {

enum class Layout { NC, NCL, NCHW, NCDHW, NLC, NHWC, NDHWC };

constexpr int kMaxRank = 5;

int rank_of(Layout layout) noexcept;
bool is_channels_last(Layout layout) noexcept;
// Index of the channel axis in the shape: 1 for channels-first, rank - 1 for channels-last.
int channel_axis(Layout layout) noexcept;
std::string_view to_string(Layout layout) noexcept;
// Parses "NCHW", "nhwc", ...; throws normkit::Error for an unknown name.
Layout layout_from_string(std::string_view name);

using Shape = std::array<int64_t, kMaxRank>;

template <class T>
struct TensorView {
  T* data = nullptr;
  Layout layout = Layout::NC;
  Shape shape{};    // only the first rank_of(layout) entries are used
  Shape strides{};  // in elements

  // A dense view: strides follow the axis order of the layout, last axis fastest.
  // Throws normkit::Error when the number of sizes does not match the layout.
  static TensorView contiguous(T* data, std::span<const int64_t> sizes, Layout layout);
  static TensorView contiguous(T* data, std::initializer_list<int64_t> sizes, Layout layout) {
    return contiguous(data, std::span<const int64_t>(sizes.begin(), sizes.size()), layout);
  }
  static TensorView strided(T* data, std::span<const int64_t> sizes,
                            std::span<const int64_t> element_strides, Layout layout);

  int rank() const noexcept { return rank_of(layout); }
  int64_t channels() const noexcept { return shape[channel_axis(layout)]; }
  int64_t numel() const noexcept;
  std::string shape_string() const;  // "[32, 64, 56, 56] (NCHW)"

  // A view of the same data as const.
  operator TensorView<const std::remove_const_t<T>>() const
    requires(!std::is_const_v<T>)
  {
    return {data, layout, shape, strides};
  }
};

template <class T>
using ConstTensorView = TensorView<const T>;

// A view's data seen as [outer, channels, inner] with one stride each: every
// normalization kernel works on this form. Element (o, c, i) sits at
// o * outer_stride + c * channel_stride + i * inner_stride.
// Channels-last data with contiguous channels is the special case
// channel_stride == 1, inner == 1 ("rows": outer rows of `channels` values).
struct Geometry {
  int64_t outer = 0, channels = 0, inner = 0;
  int64_t outer_stride = 0, channel_stride = 0, inner_stride = 0;

  int64_t reduction_size() const noexcept { return outer * inner; }
  int64_t offset(int64_t o, int64_t c, int64_t i) const noexcept {
    return o * outer_stride + c * channel_stride + i * inner_stride;
  }
  bool operator==(const Geometry&) const = default;
  bool same_extent(const Geometry& other) const noexcept {
    return outer == other.outer && channels == other.channels && inner == other.inner;
  }
};

// Collapses the axes before and after the channel axis into `outer` and `inner`.
// With Folding::best, a view whose channels are contiguous and whose other axes
// form one run is put in rows form (inner == 1), and a single run per channel
// becomes `inner`; the extents then depend on the strides, so views of one
// call that fold differently must all use Folding::none (extents from the
// shape alone). Throws normkit::Error naming the argument when the strides
// cannot be collapsed, or for a negative size or stride.
enum class Folding { best, none };
template <class T>
Geometry geometry_of(const TensorView<T>& view, std::string_view argument_name,
                     Folding folding = Folding::best);

}  // namespace normkit
