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

// Layer normalization over all of a sample's features (src/nn/layer_norm_layer.cpp).
std::unique_ptr<Layer> make_layer_norm(const std::vector<int64_t>& input_shape, double eps,
                                       MemoryFormat format);
// "batchrenorm" and "ghostbatchnorm" (src/nn/bn_variant_layers.cpp).
constexpr int64_t kDefaultRenormWarmup = 500;   // steps over which rmax, dmax reach their values
constexpr int64_t kDefaultGhostBatchSize = 32;  // virtual batch size
std::unique_ptr<Layer> make_bn_variant_layer(const ModelSpec::LayerSpec& spec,
                                             const std::vector<int64_t>& input_shape);

}  // namespace normkit::nn::detail
