#pragma once
// Checkpoints: everything needed to evaluate a trained model or to resume its
// training exactly where it stopped, in one versioned binary file.
//
// File layout (all integers and floats little-endian):
//   magic     8 bytes  "\x89NKCKPT\n" (the high byte and the newline catch text-mode mangling)
//   version   u32      kCheckpointVersion
//   size      u64      bytes of content that follow, up to the checksum
//   content:
//     spec          string   ModelSpec::to_string()
//     format        u32      0 channels-first, 1 channels-last
//     standardizer  bytes    Standardizer::save(), empty when not fitted
//     state         u64 count, then per array: string name, u64 n, n × f32
//                            (Model::state(): parameters and BN running statistics)
//     optimizer     string name ("" for none), u64 count, then string key + f64 value
//                   per option, i64 steps, u64 arrays, then per array u64 n, n × f32
//     progress      i64 epochs done, u64 seed, i64 batch size, string application JSON,
//                   then (version 2) the position in the next epoch: i64 step,
//                   f64 loss sum, i64 correct, i64 samples, f64 seconds
//   crc32     u32      zlib's crc32 of every byte before it
// A string or byte block is a u64 length and the bytes.
//
// Saving is atomic: the file is written under a temporary name in the same
// directory, flushed to disk, then renamed over the old one (and the directory
// flushed), so a crash at any point leaves either the old or the new checkpoint.
// Loading checks everything (magic, version, every length against the bytes
// that remain, the checksum, every array against the model its spec builds, the
// optimizer's options and state) before it returns; a bad file is a
// normkit::Error (runtime) naming the file and the problem.
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "normkit/engine/nn.hpp"
#include "normkit/engine/train.hpp"
#include "normkit/standardizer.hpp"

namespace normkit::io {

// Version 2 added the mid-epoch position; version 1 files still load (at an epoch's start).
inline constexpr uint32_t kCheckpointVersion = 2;

struct OptimizerState {
  std::string name;                       // "sgd", "adam"; empty: no optimizer saved
  std::map<std::string, double> options;  // Optimizer::options()
  int64_t steps = 0;
  std::vector<std::vector<float>> arrays;  // Optimizer::state(), in its order
};

struct TrainingProgress {
  int64_t epochs_done = 0;
  uint64_t seed = 0;
  int64_t batch_size = 0;
  std::string application;  // the application's own JSON (the CLI keeps its run options here)
  train::EpochPosition position;  // in epoch epochs_done + 1; step 0: at its start
};

struct Checkpoint {
  nn::ModelSpec spec;
  nn::MemoryFormat format = nn::MemoryFormat::channels_first;
  data::Standardizer standardizer;  // may be unfitted
  std::vector<std::pair<std::string, std::vector<float>>> state;  // Model::state() by name
  OptimizerState optimizer;
  TrainingProgress progress;
};

// A copy of the model's state and the optimizer's (nullptr: none).
Checkpoint make_checkpoint(nn::Model& model, nn::Optimizer* optimizer,
                           const data::Standardizer& standardizer, TrainingProgress progress);

// Serialization without the file system; from_bytes checks as load_checkpoint
// does and names `source` in its errors.
std::vector<char> to_bytes(const Checkpoint& checkpoint);
Checkpoint from_bytes(const std::vector<char>& bytes, const std::string& source);

// Atomic save (see above); on failure the old file is untouched, no temporary
// file is left behind, and normkit::Error (runtime) names the file. First removes
// what remove_stale_temporaries removes.
void save_checkpoint(const std::filesystem::path& path, const Checkpoint& checkpoint);
// Removes the temporary files (".NAME.tmp-XXXXXX" next to it) that saves of the
// checkpoint at `path` left when the process died between writing and renaming;
// best effort, never throws. Two processes must not save one checkpoint at once.
void remove_stale_temporaries(const std::filesystem::path& path) noexcept;
// Fully validated: the build_* functions below cannot fail on its result.
Checkpoint load_checkpoint(const std::filesystem::path& path);

// The model of the checkpoint's spec and format, holding its state.
std::unique_ptr<nn::Model> build_model(const Checkpoint& checkpoint);
// The checkpoint's optimizer over `model`'s parameters, holding its state;
// nullptr when none was saved.
std::unique_ptr<nn::Optimizer> build_optimizer(const Checkpoint& checkpoint, nn::Model& model);

// An optimizer from a name and Optimizer::options() (missing keys take the
// defaults of SgdOptions / AdamOptions); normkit::Error for an unknown name or key.
std::unique_ptr<nn::Optimizer> make_optimizer(const std::string& name,
                                              const std::map<std::string, double>& options,
                                              const std::vector<nn::Parameter*>& parameters);

}  // namespace normkit::io
