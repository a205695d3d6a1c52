#include "nn/layers.hpp"
#include "normkit/engine/nn.hpp"
#include "support.hpp"

namespace normkit::nn {

int64_t Tensor::numel() const noexcept {
  int64_t n = 1;
  for (const auto d : shape) n *= d;
  return shape.empty() ? 0 : n;
}

void Tensor::reshape(std::vector<int64_t> new_shape, MemoryFormat new_format) {
  shape = std::move(new_shape);
  format = new_format;
  data.resize(static_cast<size_t>(numel()));
}

namespace {
template <class T>
TensorView<T> view_of(T* data, const std::vector<int64_t>& shape, MemoryFormat format) {
  if (shape.size() == 2) return TensorView<T>::contiguous(data, {shape[0], shape[1]}, Layout::NC);
  if (shape.size() != 4)
    engine::fail_invalid("tensor: expected a [N, C] or [N, C, H, W] shape, got rank ", shape.size());
  const int64_t n = shape[0], c = shape[1], h = shape[2], w = shape[3];
  if (format == MemoryFormat::channels_first)
    return TensorView<T>::contiguous(data, {n, c, h, w}, Layout::NCHW);
  const int64_t sizes[] = {n, c, h, w};
  const int64_t strides[] = {h * w * c, 1, w * c, c};
  return TensorView<T>::strided(data, sizes, strides, Layout::NCHW);
}
}  // namespace

TensorView<float> Tensor::view() { return view_of(data.data(), shape, format); }
TensorView<const float> Tensor::view() const { return view_of(data.data(), shape, format); }

TensorView<const float> detail::image_view(const float* data, const std::vector<int64_t>& shape,
                                           MemoryFormat format) {
  return view_of(data, shape, format);
}

}  // namespace normkit::nn
