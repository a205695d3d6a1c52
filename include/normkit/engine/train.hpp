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
  // parameters and buffers as it found them and the gradients zero (the step
  // leaves them so, and the next step's backward adds to them).
  double batch_loss = 0;
  int64_t batch_correct = 0, batch_size = 0;
};
using ProgressCallback = std::function<void(const StepProgress&)>;

// Where a partly trained epoch stands: the steps done and the running sums over
// them. Training that stops after any step and later continues from here gives
// the metrics, parameters and statistics an uninterrupted epoch gives.
struct EpochPosition {
  int64_t step = 0;     // steps done in the epoch
  double loss_sum = 0;  // Σ batch loss × batch size over those steps
  int64_t correct = 0, samples = 0;
  double seconds = 0;   // training time spent on them
  bool operator==(const EpochPosition&) const = default;
};

struct EpochResult {
  double loss = 0, accuracy = 0, seconds = 0;
  int64_t samples = 0;
  // A stop was requested (stop_signal() != 0): the epoch ended after the step
  // it was running; `position` continues it (loss, accuracy are then unset).
  bool interrupted = false;
  EpochPosition position;
};

// Stopping cleanly on SIGINT and SIGTERM. The signals are only recorded;
// train_epoch looks after every step, finishes that step and returns
// interrupted, so the caller can save a checkpoint that resumes exactly there
// and exit with 128 + the signal (130, 143). A second signal of either kind
// ends the process at once (its default action), for a user who will not wait.
// install_stop_handlers starts a thread that takes both signals (sigwait) and
// blocks them in the calling thread and in its OpenMP threads (libgomp's pool):
// no thread that computes ever runs a handler (oneDNN 2.x's sgemm corrupts the
// heap when one does). Threads started earlier by others (MPI's) may still run
// the handler: call it before starting threads that compute. Processes started
// afterwards with exec inherit the blocked signals: unblock them there (a
// child of fork alone starts with them unblocked and nothing recorded).
// Throws normkit::Error (runtime) if it cannot. Calling it again is harmless.
void install_stop_handlers();
// A stop as a signal asks it (another rank's signal; tests); it does not count
// as the first signal.
void request_stop(int signal) noexcept;
int stop_signal() noexcept;  // the signal that asked to stop, 0 for none
void clear_stop() noexcept;  // no stop, and the next signal is a first one again

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
// last batch would hold a single sample (it is dropped: BN needs two) or, over
// `ranks` data-parallel ranks, fewer samples than ranks.
int64_t steps_per_epoch(int64_t count, int64_t batch_size, int ranks = 1);

// One epoch of mini-batch training (the last partial batch is kept, unless it
// has a single sample: BN needs two), from step `start.step` on with `start`'s
// sums (a resumed epoch). Throws normkit::Error (runtime) naming the epoch and
// step when the loss becomes NaN or infinite; the model is then partly updated
// and must not be saved. Returns interrupted after the current step when a stop
// is requested (see install_stop_handlers).
//
// Data-parallel with a `group` (distributed.hpp): every rank calls this with the
// same model, data and arguments; each takes its shard (dist::shard_of) of every
// global batch of batch_size; after backward the gradients of the global
// batch's mean loss are summed over the ranks and the buffers averaged (running
// statistics kept per rank, with synchronized BN off, then track the mean of
// the shards'); losses and accuracies returned and reported are the global
// batch's. With synchronized batch norm (Model::synchronize_batch_norm) N ranks
// compute what one process computes, to float rounding. A last batch too small
// to give every rank a sample is dropped. A stop requested on any rank travels
// with that step's gradient sum: every rank stops after the same step (and
// stop_signal() then names it on every rank). At the end of the epoch the ranks'
// parameters, buffers and optimizer state are compared (dist::check_same).
EpochResult train_epoch(nn::Model& model, nn::Optimizer& optimizer, const data::Dataset& train,
                        int64_t batch_size, uint64_t seed, int64_t epoch,
                        const ProgressCallback& progress = {}, const EpochPosition& start = {},
                        dist::Communicator* group = nullptr);

// The batch of evaluations and predictions (eval mode: a sample's logits do not
// depend on it). Small on purpose: the throughput is the same from 64 to 1000
// samples, but every layer keeps buffers for the largest batch it has seen, and
// they are touched fresh once per process: at 1000, cnn-small's took 430 MB
// more and `normkit eval` 2.1-2.4 s instead of 0.9-1.1 s (10k test images).
inline constexpr int64_t kEvaluationBatch = 128;

// With a `group`, each rank evaluates its shard of `set` and every rank gets the totals.
Evaluation evaluate(nn::Model& model, const data::Dataset& set,
                    int64_t batch_size = kEvaluationBatch, dist::Communicator* group = nullptr);

// The loss, accuracy and confusion matrix of batches of logits, accumulated:
// what evaluate computes, for evaluations that produce their logits otherwise
// (bn_stats.hpp: batch statistics at test time).
class Scorer {
 public:
  void add(const nn::Tensor& logits, const int32_t* labels);
  // Data-parallel: every rank's scores summed (a collective), so that each rank's
  // result() is the whole set's; `classes` for a rank that scored nothing.
  void sum_over(dist::Communicator& group, int32_t classes);
  Evaluation result() const;

 private:
  Evaluation e_;
  double loss_sum_ = 0;
  int64_t correct_ = 0, count_ = 0;
};

}  // namespace normkit::train
