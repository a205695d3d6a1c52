#pragma once
// The pieces of the `normkit` command shared by its subcommands: run options,
// data loading, one training run with its checkpoint and metrics, and the
// terminal progress line.
#include <chrono>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "normkit/engine/checkpoint.hpp"
#include "normkit/engine/data.hpp"
#include "normkit/engine/distributed.hpp"
#include "normkit/engine/nn.hpp"
#include "normkit/engine/shift.hpp"
#include "normkit/engine/train.hpp"
#include "normkit/error.hpp"
#include "normkit/standardizer.hpp"

namespace CLI {
class App;
}

namespace normkit::cli {

namespace fs = std::filesystem;
using json = nlohmann::ordered_json;  // keeps keys in the order written

// A usage error (exit code 2): a bad option value or combination.
[[noreturn]] void usage_error(const std::string& message);
// `text` as a whole number (all of it, no sign games), or nothing.
std::optional<int64_t> whole_number(const std::string& text);
// A runtime error (exit code 1): missing files, bad data, failed training.
[[noreturn]] void runtime_error(const std::string& message);

// Everything that determines a training run's results (and --threads, which
// should not). Stored in the checkpoint as JSON so that --resume and `eval`
// know how the run was made.
struct RunOptions {
  std::string model = "cnn-small";  // a preset name or a spec file
  std::string norm = "batch";       // nn::ModelSpec::with_norm: batch (the spec as given), none, layer, ...
  int64_t epochs = 10;
  int64_t batch_size = 128;
  double lr = 0.05;  // Adam's default (1e-3) when --optimizer adam and no --lr
  // The learning rate per step (learning_rate_at): the epoch's rate under
  // lr_schedule (constant; cosine: lr·(1 + cos(π·epoch/epochs))/2; step:
  // lr·lr_gamma^⌊epoch/lr_step⌋), times a linear warm-up over the first
  // warmup_steps steps ((step + 1)/warmup_steps).
  std::string lr_schedule = "constant";
  int64_t lr_step = 0;     // epochs per decay of the step schedule
  double lr_gamma = 0.1;   // the step schedule's factor
  int64_t warmup_steps = 0;
  std::string optimizer = "sgd";
  double momentum = 0.9;
  bool nesterov = false;
  double weight_decay = 0.0;
  std::string init = "he";
  double init_std = 0.01;
  uint64_t seed = 1;
  std::string data = data::kFashionMnistDirectory;
  std::string test_data;  // CSV only: a separate test table
  // CSV: the label column (last, first, a number counted from 1, or a header
  // name), whether the first line is a header (auto, yes, no), the delimiter.
  std::string csv_label_column = "last";
  std::string csv_header = "auto";
  std::string csv_delimiter = ",";
  std::string format = "nhwc";
  int64_t limit_train = 0, limit_test = 0;  // 0: all samples
  int threads = 0;                          // 0: OpenMP's default
  // Data: a stratified validation split held out of the training set, a
  // stratified subset of N training samples per class (both drawn with
  // data_seed, not --seed, so every run of a comparison sees the same split),
  // and the inputs standardized (fitted on the training split) or left raw.
  double val_fraction = 0;
  int64_t per_class = 0;  // 0: all
  uint64_t data_seed = 0;
  std::string inputs = "standardize";  // or raw: IDX pixels 0-255, CSV values as written
  // The test set: evaluated every epoch, at the end only, or never; "auto" is
  // every epoch without a validation split and at the end with one.
  std::string test_eval = "auto";
  // Divergence: a NaN/inf loss always stops the run; with a factor > 0 so does
  // an epoch whose mean training loss exceeds factor × the first step's loss.
  double diverge_factor = 0;
  // Frozen BN from this epoch on (0: never): every batch-norm layer then
  // normalizes with its running statistics, which stop updating (γ, β learn).
  int64_t freeze_bn_after = 0;
  // Model selection by the validation loss (needs val_fraction > 0; the test
  // set never chooses): keep "best" also writes OUT/best.nkc at each new lowest
  // validation loss; early_stop N > 0 ends the run N epochs after the last
  // epoch that lowered it.
  int64_t early_stop = 0;
  std::string keep = "last";
  // steps.jsonl: training loss every log_every steps, evaluation every
  // eval_every steps, probes (probe.hpp) every probe_every steps and at the
  // steps listed in probe_at (e.g. "0,1,10,100"); 0 / empty: none.
  int64_t log_every = 0, eval_every = 0, probe_every = 0;
  std::string probe_at;
  int64_t probe_samples = 1000, probe_units = 4;
  bool probe_ics = false;
  // Data-parallel runs (mpirun): batch-norm statistics of the global batch; off,
  // each rank normalizes its shard (ghost BN with the shard as ghost batch).
  bool sync_bn = true;
  // After each epoch, also evaluate with these batch-norm statistics sources
  // (comma-separated StatsSource texts, e.g. "precise:1000,batch:16"), into the
  // metrics line's "bn_stats" object; the model keeps its running statistics.
  std::string eval_bn_stats;
};
json to_json(const RunOptions& o);
// The learning rate of the 0-based global training `step` (steps_per_epoch of
// them per epoch) under the options' schedule and warm-up. It depends only on
// the options and the step, so resumed runs use the rates uninterrupted ones do.
double learning_rate_at(const RunOptions& o, int64_t step, int64_t steps_per_epoch);
RunOptions run_options_from_json(const json& j);  // throws normkit::Error on a bad document
// Model selection by the epochs' validation losses: the 1-based epoch of the
// lowest (the first on ties; 0: none), and whether `patience` (--early-stop)
// epochs have passed since it (never with patience 0).
int64_t lowest_epoch(const std::vector<double>& losses);
bool patience_over(const std::vector<double>& losses, int64_t patience);

// The steps of --probe-at (a usage error names a bad list).
std::set<int64_t> probe_steps(const RunOptions& options);

// Sets normkit's and OpenMP's (oneDNN's) thread counts; 0 keeps the defaults.
void apply_threads(int threads);

// The model spec of `options` (a preset, "mlp:OPTIONS" sized for `data`'s samples
// and classes, or a spec file), with its batchnorm layers replaced as `norm` says.
nn::ModelSpec resolve_spec(const RunOptions& options, const std::string& norm,
                           const data::Dataset& data);

// Refuses what --norm would silently turn into something else: instance norm
// that drops every normalization (it has nothing to normalize after a linear
// layer; dropping some is a warning), and frozen batch norm in a model trained
// from scratch (it would normalize with mean 0 and variance 1).
void check_normalization(const nn::ModelSpec& spec, const nn::ModelSpec& result, const std::string& norm);

// How a --norm value reads in tables and reports: "layer norm", "layer
// normalization", "LN"; for none: "no normalization", "no normalization", "none".
std::string norm_label(const std::string& norm);
std::string norm_name(const std::string& norm);
std::string norm_abbreviation(const std::string& norm);

// The CSV loader's options of a run (a usage error names a bad --csv-delimiter).
data::CsvOptions csv_options(const RunOptions& options);

struct Data {
  data::Dataset train, val, test;  // val: empty without --val-fraction
};
// The training, validation and test sets of `options`: the validation split
// and the per-class subset taken from the training set, then the first
// limit_* samples of train and test; for a CSV without --test-data a fixed 20%
// of the rows is held out as test set.
Data load_data(const RunOptions& options, bool need_train = true);
// Checks that the model's input matches the data's samples.
void check_data_fits(const nn::ModelSpec& spec, const data::Dataset& set);
void standardize(const data::Standardizer& standardizer, data::Dataset& set);
// The data of a run, standardized with `standardizer` (fitted first on the
// training set when `fit`), or left as loaded with --inputs raw. The matrix
// products' kernels compile meanwhile (nn::KernelWarmUp).
Data prepare_data(const RunOptions& options, data::Standardizer* standardizer, bool fit);
// One line: model, sample counts, optimizer, batch size, seed, format.
std::string describe_run(const RunOptions& options, const Data& data);

// A file that ships with normkit, by its installed name under <prefix>/share/normkit
// ("plot_metrics.py", "lab/report.py", "experiments"): the installed copy when
// there is one (found relative to the executable), else the source tree's.
fs::path data_file(const std::string& name);
// Starts `argv[0]` with `argv`, stdout and stderr going to `log`; returns the pid
// (a runtime error names what failed). With own_group, the child is the leader
// of a process group of its own: a terminal's Ctrl-C reaches only the parent,
// which passes it on once (a second SIGINT would end a child mid-save).
int spawn_process(const std::vector<std::string>& argv, const fs::path& log, bool own_group = false);
// Waits for `pid`; returns its exit code, or 128 + the signal that ended it.
int wait_process(int pid);
// Runs one of normkit's Python scripts (data_file(script)) with Debian's
// /usr/bin/python3 (or $NORMKIT_PYTHON), output to `log` (removed afterwards);
// returns "" on success, else what went wrong (the script's last line).
std::string run_python(const std::string& script, const std::vector<std::string>& args,
                       const fs::path& log);

// Writes `text` to `path` through a temporary file and a rename.
void write_file_atomically(const fs::path& path, const std::string& text);

// The terminal progress line on stderr (only when stderr is a terminal): one
// line, redrawn in place, that fits the terminal's width (tools/progress.cpp).
class Progress {
 public:
  explicit Progress(std::string label);
  static bool enabled();
  // The terminal's width: stderr's window size, else $COLUMNS, else 80.
  static int terminal_columns();
  // The line drawn for `columns` columns: at most columns - 1 characters.
  static std::string line(const std::string& label, int64_t epoch, int64_t epochs,
                          const train::StepProgress& p, int columns);
  void update(int64_t epoch, int64_t epochs, const train::StepProgress& p);
  void clear();

 private:
  std::string label_;
  std::chrono::steady_clock::time_point last_{};
  bool shown_ = false;
};

struct EpochRecord {
  json metrics;  // one line of metrics.jsonl (also when the epoch then counts as diverged)
  bool ok = true;
  std::string error;  // when the run diverged (NaN/inf loss, or --diverge-factor)
  // The signal (SIGINT, SIGTERM) that stopped the epoch part-way: the run is
  // saved where it stopped (metrics is null) and --resume continues it there.
  int interrupted = 0;
};

// One training run in directory `out`: OUT/checkpoint.nkc and OUT/metrics.jsonl.
class Run {
 public:
  // A fresh run; fails if OUT already holds a checkpoint, unless overwrite.
  static Run start(const RunOptions& options, const std::string& name, const fs::path& out,
                   const std::string& norm, const data::Standardizer& standardizer,
                   const data::Dataset& train, bool overwrite);
  // Continues the run saved in OUT/checkpoint.nkc.
  static Run resume(const fs::path& out);

  // Trains epoch epochs_done() + 1 (with the lines of steps.jsonl), evaluates,
  // saves the checkpoint, appends the metrics line. A NaN/inf loss leaves the
  // checkpoint as it was and returns ok = false; an epoch whose loss exceeds
  // the divergence factor is saved and returns ok = false. The run is then
  // stopped, as diverged. A stop request (train::install_stop_handlers) ends the
  // epoch after the current step: the checkpoint then holds the position in the
  // epoch (written atomically) and the record says interrupted.
  EpochRecord train_epoch(const Data& data, Progress* progress);
  // Steps done in the epoch in progress (0 at an epoch's start).
  int64_t epoch_step() const { return position_.step; }
  // OUT/run.json, the run's outcome for scripts: status "finished" or
  // "diverged", epochs and steps done, training seconds, the divergence (epoch,
  // step, reason), the best epoch (lowest validation loss; 0 without a
  // validation split), whether --early-stop ended it, and the last metrics.
  // Written when the run ends either way.
  void write_outcome() const;
  // The 1-based epoch of the lowest validation loss so far (the first on
  // ties; 0 without a validation split), and whether --early-stop has ended
  // the run: early_stop epochs have passed since it.
  int64_t best_epoch() const;
  bool stopped_early() const;
  fs::path best_checkpoint_path() const { return out_ / "best.nkc"; }

  const RunOptions& options() const { return options_; }
  RunOptions& options() { return options_; }
  const std::string& name() const { return name_; }
  const std::string& norm() const { return norm_; }
  const fs::path& out() const { return out_; }
  fs::path checkpoint_path() const { return out_ / "checkpoint.nkc"; }
  int64_t epochs_done() const { return epochs_done_; }
  bool stopped() const { return !stop_reason_.empty(); }
  const std::string& stop_reason() const { return stop_reason_; }
  const json& history() const { return history_; }
  const data::Standardizer& standardizer() const { return standardizer_; }
  // The training data's class names (kept in the checkpoint for eval and predict).
  const std::vector<std::string>& class_names() const { return class_names_; }
  nn::Model& model() { return *model_; }
  std::string model_spec_text() const { return model_->spec().to_string(); }

 private:
  Run() = default;
  void save_checkpoint() const;
  void rewrite_metrics() const;
  void rewrite_steps(int64_t steps_done) const;
  // The validation and/or the test set's loss and accuracy (val_/test_ keys).
  json evaluate_sets(const Data& data, bool with_val, bool with_test);
  std::vector<double> val_losses() const;  // the epochs' so far

  RunOptions options_;
  std::string name_, norm_;
  fs::path out_;
  data::Standardizer standardizer_;
  std::vector<std::string> class_names_;
  std::unique_ptr<nn::Model> model_;
  std::unique_ptr<nn::Optimizer> optimizer_;
  int64_t epochs_done_ = 0;
  json history_ = json::array();
  std::string stop_reason_;
  json divergence_;             // null, or {epoch, step, loss, reason}
  double initial_loss_ = -1;    // the first step's loss (-1: not yet trained)
  // Mid-epoch: where the epoch in progress stands, and the training loss of the
  // steps.jsonl window in progress (both saved in the checkpoint, so a resumed
  // run logs what an uninterrupted one does).
  train::EpochPosition position_;
  struct {
    double loss = 0;
    int64_t correct = 0, samples = 0;
  } window_;
};

// Data-parallel training (`mpirun -np N normkit train`, tools/process_group.cpp).
struct GroupFlags {
  int ranks = 0;           // the number of ranks expected (0: whatever the launcher started)
  double timeout = 300.0;  // seconds a rank waits for the others in a collective
};
// Joins the process group when an MPI launcher started this process (once;
// later calls return the same group), else returns nullptr. Ranks other than 0
// write nothing to stdout; ranks on one machine share its cores (threads).
dist::Communicator* join_process_group(const GroupFlags& flags);
dist::Communicator* process_group();  // nullptr: not joined
// Rank 0 of the group, or a process on its own: the one that writes checkpoints and metrics.
bool writes_files();
// "rank 1 of 2: " in a group, "" otherwise: for error messages.
std::string rank_prefix();
// The exit status of `normkit` with `code`: in a group, 0 and an interruption
// (128 + SIGINT or SIGTERM: every rank stopped after the same step, rank 0 saved)
// finalize MPI; anything else ends every rank (MPI_Abort), since the others
// would wait for this one.
int leave_process_group(int code);

// The exit status of a command stopped by `signal`: 128 + its number (130 for
// SIGINT, 143 for SIGTERM), after a line saying where the run was saved.
int report_interruption(int signal, const std::string& where);

// What a command was told besides the run options.
struct CommandFlags {
  fs::path out;
  std::string name;  // the run's name in metrics.jsonl; default: OUT's directory name
  bool resume = false, overwrite = false;
  GroupFlags group;  // train only
  bool report = false;  // train only: OUT/report.md and OUT/curves.png when the run ends
  std::string max_memory;  // --max-memory: "8G", "512M", bytes; "" = this machine's memory
};

// Refuses (runtime error) to train `spec` with batches of `batch_size` when the
// memory it needs (nn::ModelSize: parameters, gradients, optimizer state,
// activations) exceeds `max_memory` (CommandFlags::max_memory), naming both.
void check_memory(const nn::ModelSpec& spec, int64_t batch_size, const std::string& max_memory);
// The run options given explicitly on the command line (as to_json keys).
using GivenOptions = std::set<std::string>;

// On --resume: the checkpoint's options, with --epochs, --threads, --data,
// --test-data and the step logging and probe options taken from the command line; any other option given explicitly
// must equal the checkpoint's (a usage error names the first that differs).
RunOptions merge_resume_options(const RunOptions& stored, const RunOptions& given,
                                const GivenOptions& given_keys);

// The options with --data, --test-data and a --model spec file as absolute
// paths, so that the checkpoint's copy works from any directory (eval, --resume).
RunOptions with_absolute_paths(RunOptions options);

// Checks option combinations CLI11 cannot check by itself; sets Adam's
// default learning rate when --lr was not given.
RunOptions finish_options(RunOptions options, const GivenOptions& given);

int command_train(const RunOptions& options, const GivenOptions& given, const CommandFlags& flags);
int command_compare(const RunOptions& options, const GivenOptions& given, const CommandFlags& flags);

// The run description the CLI stores in a checkpoint (null when absent or not
// JSON), and the class names it holds (empty when the data named none).
// The run options it holds (the defaults when it holds none).
json application_json(const io::Checkpoint& checkpoint);
RunOptions run_options_of(const json& application);
std::vector<std::string> class_names_of(const json& application);

// `normkit predict` (tools/predict.cpp).
struct PredictFlags {
  fs::path checkpoint;
  std::vector<std::string> inputs;
  int top = 3;
  int64_t limit = 0;
  int threads = 0;
  bool json = false;
};
CLI::App* add_predict_command(CLI::App& app, PredictFlags& flags);
int command_predict(const PredictFlags& flags);

// `normkit fold` (tools/fold.cpp).
struct FoldFlags {
  fs::path checkpoint, out;
  bool overwrite = false, json = false;
};
CLI::App* add_fold_command(CLI::App& app, FoldFlags& flags);
int command_fold(const FoldFlags& flags);

// `normkit recalibrate`, `adapt` and `shift` (tools/bn_stats.cpp).
struct StatsCommandFlags {
  fs::path checkpoint, out;
  std::string data, shift = "none", split = "test";  // adapt only
  int64_t samples = 10000, batch_size = 0;           // batch_size 0: the eval pass
  uint64_t seed = 0;
  int threads = 0;
  bool overwrite = false, json = false;
};
struct ShiftFlags {
  std::string data = data::kFashionMnistDirectory, shift;
  fs::path out;
  uint64_t seed = 0;
  bool overwrite = false;
};
struct BnStatsFlags {
  StatsCommandFlags recalibrate, adapt;
  ShiftFlags shift;
  CLI::App *recalibrate_command = nullptr, *adapt_command = nullptr, *shift_command = nullptr;
};
void add_bn_stats_commands(CLI::App& app, BnStatsFlags& flags);
int command_bn_stats(const BnStatsFlags& flags);  // the one of the three that was given

// Where batch-norm layers take their statistics at evaluation (normkit/engine/bn_stats.hpp):
// running, precise:N (N training samples, eval pass), precise:N:B (train pass in
// batches of B), adapt:N (N samples of the evaluated set itself, unlabeled), batch:B.
struct StatsSource {
  enum class Kind { running, precise, adapt, batch };
  Kind kind = Kind::running;
  int64_t samples = 0, batch_size = 0;
  std::string text;  // as given
};
StatsSource parse_stats_source(const std::string& text);  // a usage error names a bad one
// The sources of train's --eval-bn-stats (comma-separated).
std::vector<StatsSource> eval_bn_stats_sources(const RunOptions& options);
// `test` evaluated with the statistics of `s` (train: the training set, for
// precise); the model's statistics are as they were afterwards.
train::Evaluation evaluate_with(nn::Model& model, const data::Dataset& test, const StatsSource& s,
                                const data::Dataset* train, uint64_t seed);
// {"precise:1000": {"val_loss", "val_acc", "test_loss", "test_acc"}, ...} for `train --eval-bn-stats`.
json evaluate_statistics_sources(nn::Model& model, const std::vector<StatsSource>& sources,
                                 const Data& data, bool with_test, uint64_t seed);
// `eval --shift`: the shift (a usage error names a bad one) and the pixels' range of a run's data.
data::Shift parse_shift(const std::string& text);
float pixel_max(const RunOptions& options);
// `normkit eval --bn-stats ... --shift ...`: `test` (loaded, not yet standardized)
// under every shift × statistics source; `run`: the checkpoint's own options (its
// training data), `evaluated`: with eval's --data.
int command_eval_statistics(const fs::path& checkpoint_path, const io::Checkpoint& checkpoint,
                            const RunOptions& run, const RunOptions& evaluated, const data::Dataset& test,
                            const std::vector<std::string>& sources, const std::vector<std::string>& shifts,
                            uint64_t seed, bool json);
// `normkit lab list|run|report` (tools/lab.cpp).
struct LabFlags {
  std::vector<std::string> names;  // run: experiment names, or "all"
  bool quick = false, full = false, no_report = false;
  int seeds = 0, jobs = 0, threads = 1;
  fs::path out = "runs/lab";  // run: the lab's directory; report: the directory to report on
  fs::path experiments;       // the declarations (default: data_file("experiments"))
  CLI::App *list = nullptr, *run = nullptr, *report = nullptr;
};
CLI::App* add_lab_command(CLI::App& app, LabFlags& flags);
int command_lab(const LabFlags& flags);

}  // namespace normkit::cli
