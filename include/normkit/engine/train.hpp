#pragma once
// Training loop pieces shared by the CLI, the tests and the experiments:
// deterministic batching, one epoch of training, evaluation.
#include <cstdint>
#include <functional>
#include <vector>

#include "normkit/engine/data.hpp"
#include "normkit/engine/nn.hpp"

namespace normkit::train {

struct StepProgress {
  int64_t step, steps;        // within the epoch
  double loss, accuracy;      // running means over the epoch so far
  double samples_per_second;
  // This step's batch: its mean loss, correct predictions and size (for
  // per-step metrics). The callback runs after the optimizer step; it may
  // evaluate or probe the model (see probe.hpp) as long as it leaves the
  // parameters and buffers as it found them.
  double batch_loss = 0;
  int64_t batch_correct = 0, batch_size = 0;
};
using ProgressCallback = std::function<void(const StepProgress&)>;

struct EpochResult {
  double loss = 0, accuracy = 0, seconds = 0;
  int64_t samples = 0;
};

struct Evaluation {
  double loss = 0, accuracy = 0;
  std::vector<int64_t> confusion;  // classes × classes, row = true label, column = predicted
  int32_t classes = 0;
};

// The order of epoch `epoch`: a permutation that depends only on (seed, epoch),
// so a resumed run sees the batches an uninterrupted one would.
std::vector<int64_t> epoch_order(int64_t count, uint64_t seed, int64_t epoch);

// Copies samples [order[first], ...) into a batch tensor in the model's format.
void make_batch(const data::Dataset& set, const std::vector<int64_t>& order, int64_t first,
                int64_t size, nn::MemoryFormat format, nn::Tensor& batch,
                std::vector<int32_t>& labels);

// The optimizer steps of one epoch: ceil(count / batch_size), less one when the
// last batch would hold a single sample (it is dropped: BN needs two).
int64_t steps_per_epoch(int64_t count, int64_t batch_size);

// One epoch of mini-batch training (the last partial batch is kept, unless it
// has a single sample: BN needs two). Throws normkit::Error (runtime) naming the
// epoch and step when the loss becomes NaN or infinite; the model is then
// partly updated and must not be saved.
EpochResult train_epoch(nn::Model& model, nn::Optimizer& optimizer, const data::Dataset& train,
                        int64_t batch_size, uint64_t seed, int64_t epoch,
                        const ProgressCallback& progress = {});

Evaluation evaluate(nn::Model& model, const data::Dataset& set, int64_t batch_size = 1000);

}  // namespace normkit::train
