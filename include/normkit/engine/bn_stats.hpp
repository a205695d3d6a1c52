#pragma once
// Where a model's batch-norm layers take their statistics at inference, and the
// remedies for BN's train/inference gap.
//
// A batch-norm layer (batchnorm, batchrenorm, ghostbatchnorm) trains on the
// statistics of each mini-batch and infers with running averages (an EMA)
// that lag the weights and, at small batches, differ from the batch statistics
// the next layers were trained on. Three sources of statistics at evaluation:
//
// - running: the layers' running statistics, as trained (Model::forward(eval)).
// - precise (recalibrate): population statistics over N samples replace the
//   running statistics, computed exactly by merged moments (Chan et al.: count,
//   mean, M2 per channel; no EMA, no E[x²] − E[x]² cancellation). Two passes:
//     eval (default): layer by layer in the model's order. Layer k's statistics
//       are those of its inputs with every layer before it in eval mode and
//       every batch-norm layer before it already recalibrated: exactly the
//       inputs it will see at inference. On the N samples, the recalibrated
//       model's batch-norm layers then output mean β and variance γ²·σ²/(σ²+eps)
//       per channel. Independent of the batch size (up to float rounding). One
//       pass over the N samples per batch-norm layer, each only up to that layer.
//     train: one pass in batches of B; each batch-norm layer normalizes with
//       its batch's statistics, as in training (the other layers as in eval:
//       no dropout), and its statistics are pooled over all batches: the
//       population statistics of the inputs training produced at batch size B.
//       This is fvcore's update_bn_stats / Wu & Johnson 2021's PreciseBN (which
//       average the per-batch mean and variance with their sizes; merging the
//       moments is the same thing, exact). It keeps BN's train-mode inputs,
//       which at small B differ from those the inference network produces.
//   The variance written is the population's, M2 / count (not the unbiased
//   M2 / (count − 1) PyTorch keeps for a batch: here the population is given).
// - batch:B: the test set, shuffled with a seed (so batches are not sorted by
//   class: a batch of one class would leak its label through its statistics),
//   in batches of B samples, each batch-norm layer normalizing with the batch's
//   own statistics (training's normalization; the test result then depends on
//   which samples share a batch). A last batch of a single sample joins the one
//   before.
//
// Adapting to shifted data (test-time adaptation, Schneider et al. 2020,
// AdaBN): recalibrate on unlabeled samples of the new distribution.
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include "normkit/engine/data.hpp"
#include "normkit/engine/nn.hpp"
#include "normkit/engine/train.hpp"
#include "normkit/moments.hpp"

namespace normkit::bn_stats {

// batchnorm, batchrenorm and ghostbatchnorm: BN's running statistics and inference.
bool is_batch_norm(const nn::Layer& layer);
// Their indices in the model, in order.
std::vector<size_t> batch_norm_layers(const nn::Model& model);

enum class Pass { eval, train };

struct PreciseOptions {
  // The first `samples` of a permutation of the data set drawn from `seed`.
  int64_t samples = 10000;
  uint64_t seed = 0;
  // eval: the chunk size (memory only); train: the batch size of the pass.
  int64_t batch_size = 256;
  Pass pass = Pass::eval;
};

// What recalibrate wrote into one batch-norm layer.
struct LayerStatistics {
  size_t layer = 0;  // index in the model
  std::string type;
  double count = 0;  // values per channel: samples × positions
  std::vector<double> mean, variance;          // the population statistics (written as floats)
  std::vector<float> old_mean, old_variance;   // the running statistics before
};

// Called after each chunk or batch: (done, total) in units of samples passed
// through the model (a pass per batch-norm layer in eval mode).
using Progress = std::function<void(int64_t done, int64_t total)>;

// Replaces every batch-norm layer's running mean and variance with the
// population statistics of `set`'s samples (see above); nothing else of the
// model changes (parameters, num_batches_tracked, frozen flags). `set` must
// hold samples of the model's input shape, prepared as the model expects
// (standardized). normkit::Error — and the model exactly as it was — for a model
// without batch-norm layers, samples < 1 or more than the set holds, a batch
// size < 1 (train: < 2), a layer that would see fewer than 2 values per
// channel, or inputs that become NaN or infinite.
std::vector<LayerStatistics> recalibrate(nn::Model& model, const data::Dataset& set,
                                         const PreciseOptions& options, const Progress& progress = {});

// Test loss, accuracy and confusion matrix with batch statistics (batch:B
// above); the model is left exactly as it was. batch_size >= 2.
train::Evaluation evaluate_batch_statistics(nn::Model& model, const data::Dataset& set,
                                            int64_t batch_size, uint64_t seed = 0);

// The running statistics of a model's batch-norm layers, put back when this
// object is destroyed (or restore() is called): evaluate with other statistics,
// then return to the trained ones, also when an error interrupts.
class SavedStatistics {
 public:
  explicit SavedStatistics(nn::Model& model);
  ~SavedStatistics() { restore(); }
  SavedStatistics(const SavedStatistics&) = delete;
  SavedStatistics& operator=(const SavedStatistics&) = delete;
  void restore();
  void keep();  // the model keeps its current statistics: nothing is put back

 private:
  std::vector<std::pair<std::vector<float>*, std::vector<float>>> saved_;
};

}  // namespace normkit::bn_stats
