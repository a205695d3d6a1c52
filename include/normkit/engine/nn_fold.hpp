#pragma once
// Folding a trained model's batch normalization into the layers before it, for
// inference (the per-layer formula is in normkit/fold.hpp).
//
// Every `linear` or `conv` layer directly followed by a `batchnorm` becomes the
// same layer with a bias (bias=1) holding W' = W·s and b' = (b − μ)·s + β, and
// the batchnorm disappears; a batchnorm right after one that was folded goes
// into the same layer. A batchnorm after anything else (an activation, pooling,
// flatten, dropout, the input) cannot be folded and is kept as it was. The
// folded model's eval-mode outputs equal the original's to float rounding; in
// training mode they differ (BN would use batch statistics). Its spec is an
// ordinary spec, so its checkpoints load with load_checkpoint like any other.
#include <cstddef>
#include <memory>
#include <string>
#include <vector>

#include "normkit/engine/checkpoint.hpp"
#include "normkit/engine/nn.hpp"

namespace normkit::nn {

struct FoldedBatchNorm {
  size_t batchnorm;     // the batchnorm's index in the original spec
  size_t into;          // the original index of the linear/conv layer it was folded into
  size_t folded_index;  // that layer's index in the folded spec
};

struct KeptBatchNorm {
  size_t batchnorm;     // its index in the original spec
  size_t folded_index;  // its index in the folded spec
  std::string after;    // the type of the layer before it, or "input"
};

struct FoldResult {
  std::unique_ptr<Model> model;  // the folded model (same memory format), holding its state
  std::vector<FoldedBatchNorm> folded;
  std::vector<KeptBatchNorm> kept;
};

// Reads `model`'s parameters and running statistics; does not change them.
// normkit::Error (runtime, naming the batchnorm) when its values cannot be
// folded (see fold_batch_norm: e.g. running_var + eps <= 0, or an overflow).
FoldResult fold_batch_norms(Model& model);

}  // namespace normkit::nn

namespace normkit::io {

struct FoldedCheckpoint {
  Checkpoint checkpoint;
  std::vector<nn::FoldedBatchNorm> folded;
  std::vector<nn::KeptBatchNorm> kept;
};

// The checkpoint's model folded, with the same memory format, standardizer and
// training progress (application data included), and no optimizer state: the
// folded parameters are not the ones the optimizer was moving, so a folded
// checkpoint is for evaluation, not for resuming training.
FoldedCheckpoint fold_checkpoint(const Checkpoint& checkpoint);

}  // namespace normkit::io
