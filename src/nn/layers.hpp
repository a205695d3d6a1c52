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

// "[32, 28, 28]", for messages.
std::string shape_text(const std::vector<int64_t>& shape);
// A spec option as a number, or `fallback` when the spec does not give it.
double option_or(const ModelSpec::LayerSpec& spec, const std::string& key, double fallback);

// Layer normalization over all of a sample's features (src/nn/layer_norm_layer.cpp).
std::unique_ptr<Layer> make_layer_norm(const std::vector<int64_t>& input_shape, double eps,
                                       MemoryFormat format);
// "batchnorm", "batchrenorm" and "ghostbatchnorm" (src/nn/batch_norm_layers.cpp).
constexpr int64_t kDefaultRenormWarmup = 500;   // steps over which rmax, dmax reach their values
constexpr int64_t kDefaultGhostBatchSize = 32;  // virtual batch size
// `index` (the layer's position) keeps the noise of noisy BN layers (noise=S) apart.
std::unique_ptr<Layer> make_batch_norm_layer(const ModelSpec::LayerSpec& spec,
                                             const std::vector<int64_t>& input_shape, size_t index);

}  // namespace normkit::nn::detail
