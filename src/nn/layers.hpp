#pragma once
// Layer implementations; Model builds them from a ModelSpec.
#include <memory>

#include "normkit/nn.hpp"

namespace normkit::nn::detail {

// Builds the layer for `spec` given its input shape (without N).
// `index` (the layer's position) keeps the randomness of equal layers apart.
std::unique_ptr<Layer> make_layer(const ModelSpec::LayerSpec& spec,
                                  const std::vector<int64_t>& input_shape, MemoryFormat format,
                                  size_t index);

}  // namespace normkit::nn::detail
