#pragma once
// The engine's group- and instance-normalization layers (spec types
// `groupnorm` and `instancenorm`), built by make_layer (layers.cpp).
#include <memory>
#include <vector>

#include "normkit/engine/nn.hpp"

namespace normkit::nn::detail {

// groupnorm [groups=G] [eps=E] [affine=0|1] on [C] or [C, H, W] input.
// groups defaults to min(32, C) when that divides C; otherwise the spec must
// name a divisor of C (no silent adjusting).
std::unique_ptr<Layer> make_group_norm_layer(const ModelSpec::LayerSpec& spec,
                                             const std::vector<int64_t>& input);

// instancenorm [eps=E] [momentum=M] [affine=0|1] [track_running_stats=0|1] on
// [C, H, W] input ([C] has no spatial extent: an error). affine defaults to 1
// (a drop-in for batchnorm, which learns γ and β; PyTorch's InstanceNorm2d
// defaults to affine=False), track_running_stats to 0 as in PyTorch.
std::unique_ptr<Layer> make_instance_norm_layer(const ModelSpec::LayerSpec& spec,
                                                const std::vector<int64_t>& input);

}  // namespace normkit::nn::detail
