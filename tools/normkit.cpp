// `normkit`: train models with and without batch normalization, compare them,
// evaluate and inspect checkpoints, fold batch norm into the layers before it.
//
// Exit codes: 0 success, 1 runtime error (missing or bad files, training that
// diverged), 2 usage error (bad options). Every error is one line on stderr
// starting "normkit: error: ".
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <map>

#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include "cli.hpp"
#include "normkit/version.hpp"

namespace normkit::cli {

namespace {

using OptionMap = std::map<std::string, CLI::Option*>;  // to_json key -> option

// A finite number above (or at, for non_negative) zero, with a plain message.
CLI::Validator number_at_least_zero(bool allow_zero) {
  return CLI::Validator(
      [allow_zero](std::string& text) -> std::string {
        double value = 0;
        size_t used = 0;
        try {
          value = std::stod(text, &used);
        } catch (const std::exception&) {
          used = 0;
        }
        if (used != text.size() || !std::isfinite(value) || value < 0 || (!allow_zero && value == 0))
          return "must be a " + std::string(allow_zero ? "non-negative" : "positive") +
                 " number, got '" + text + "'";
        return "";
      },
      allow_zero ? "NONNEGATIVE" : "POSITIVE");
}
const CLI::Validator kPositive = number_at_least_zero(false);
const CLI::Validator kNonNegative = number_at_least_zero(true);
// The spins of an idle OpenMP thread before it sleeps, unless the user chose a
// policy (main says why).
constexpr const char* kSpinCount = "3000";

// The options that describe a training run, shared by `train` and `compare`.
void add_run_options(CLI::App* app, RunOptions& o, OptionMap& options, bool with_norm) {
  auto add = [&](const std::string& key, CLI::Option* option) { options[key] = option; };
  add("model", app->add_option("--model", o.model,
                               "a preset (mlp-paper, cnn-small), mlp:OPTIONS (a plain MLP sized for "
                               "the data: depth=L,width=W,act=relu|sigmoid|tanh,bn=before|after,"
                               "dropout=P,input_bn=0|1) or a model spec file (text or JSON)")
                   ->capture_default_str());
  add("norm", app->add_option("--norm", o.norm,
                              with_norm
                                  ? "batch: the model as specified; none: without its batchnorm layers; "
                                    "frozen, renorm, ghost, layer, group, instance, noisy: each "
                                    "batchnorm replaced by frozen BN, batch renorm, ghost BN, layer, "
                                    "group or instance norm, or noisy BN"
                                  : "the normalization compared against none: batch (the model as "
                                    "specified), frozen, renorm, ghost, layer, group, instance or noisy")
                  ->check(CLI::IsMember(nn::ModelSpec::norm_kinds()))
                  ->capture_default_str());
  add("epochs", app->add_option("--epochs", o.epochs, "epochs to train (in total, when resuming)")
                    ->check(CLI::Range(int64_t{1}, int64_t{100000}))
                    ->capture_default_str());
  add("batch_size", app->add_option("--batch-size", o.batch_size, "mini-batch size (>= 2)")
                        ->check(CLI::Range(int64_t{2}, int64_t{1} << 20))
                        ->capture_default_str());
  add("lr", app->add_option("--lr", o.lr, "learning rate (default 0.05 for sgd, 0.001 for adam)")
                ->check(kPositive));
  add("lr_schedule", app->add_option("--lr-schedule", o.lr_schedule,
                                     "per epoch: constant; cosine: lr·(1 + cos(π·epoch/epochs))/2 "
                                     "(follows --epochs, also when resuming); step: lr·gamma^⌊epoch/N⌋ "
                                     "(--lr-step N, --lr-gamma)")
                         ->check(CLI::IsMember({"constant", "cosine", "step"}))
                         ->capture_default_str());
  add("lr_step", app->add_option("--lr-step", o.lr_step,
                                 "--lr-schedule step: multiply the rate by --lr-gamma every N epochs")
                     ->check(CLI::Range(int64_t{1}, int64_t{100000})));
  add("lr_gamma", app->add_option("--lr-gamma", o.lr_gamma, "--lr-schedule step: the factor")
                      ->check(kPositive)
                      ->capture_default_str());
  add("warmup_steps", app->add_option("--warmup-steps", o.warmup_steps,
                                      "linear warm-up: step s (from 0) of the first N trains with "
                                      "(s + 1)/N of the scheduled rate")
                          ->check(CLI::Range(int64_t{0}, int64_t{1} << 40))
                          ->capture_default_str());
  add("optimizer", app->add_option("--optimizer", o.optimizer, "sgd or adam")
                       ->check(CLI::IsMember({"sgd", "adam"}))
                       ->capture_default_str());
  add("momentum", app->add_option("--momentum", o.momentum, "SGD momentum")
                      ->check(CLI::Range(0.0, 1.0))
                      ->capture_default_str());
  add("nesterov", app->add_flag("--nesterov", o.nesterov, "Nesterov momentum (SGD)"));
  add("weight_decay", app->add_option("--weight-decay", o.weight_decay, "L2 weight decay")
                          ->check(kNonNegative)
                          ->capture_default_str());
  add("init", app->add_option("--init", o.init, "weight initialization: he, xavier or normal")
                  ->check(CLI::IsMember({"he", "xavier", "normal"}))
                  ->capture_default_str());
  add("init_std", app->add_option("--init-std", o.init_std, "standard deviation for --init normal")
                      ->check(kPositive)
                      ->capture_default_str());
  add("seed", app->add_option("--seed", o.seed,
                              "seeds the initialization and the data order: the same command "
                              "gives the same metrics")
                  ->capture_default_str());
  add("threads", app->add_option("--threads", o.threads,
                                 std::string("threads (default: OpenMP's default); idle ones "
                                             "spin briefly, then sleep (GOMP_SPINCOUNT=") +
                                     kSpinCount +
                                     " unless OMP_WAIT_POLICY or GOMP_SPINCOUNT is set)")
                     ->check(CLI::Range(1, 4096)));
  add("data", app->add_option("--data", o.data,
                              "a directory of (Fashion-)MNIST IDX files, or a CSV table")
                  ->capture_default_str());
  add("test_data", app->add_option("--test-data", o.test_data,
                                   "CSV: a separate test table (default: a fixed 20% of --data)"));
  add("csv_label_column",
      app->add_option("--csv-label-column", o.csv_label_column,
                      "CSV: the label column: last, first, a column number counted from 1 (as in "
                      "error messages), or a column's name in the header line")
          ->capture_default_str());
  add("csv_header", app->add_option("--csv-header", o.csv_header,
                                    "CSV: whether the first line is a header: auto (when one of "
                                    "its fields is not a number where the next line's is, or it "
                                    "is scikit-learn's n_samples,n_features,class names line), "
                                    "yes or no")
                        ->check(CLI::IsMember({"auto", "yes", "no"}))
                        ->capture_default_str());
  add("csv_delimiter", app->add_option("--csv-delimiter", o.csv_delimiter,
                                       "CSV: the field delimiter, one character (or tab)")
                           ->capture_default_str());
  add("format", app->add_option("--format", o.format, "activation memory format: nchw or nhwc")
                    ->check(CLI::IsMember({"nchw", "nhwc"}))
                    ->capture_default_str());
  add("limit_train", app->add_option("--limit-train", o.limit_train,
                                     "use only the first N training samples (0: all)")
                         ->check(kNonNegative));
  add("limit_test", app->add_option("--limit-test", o.limit_test,
                                    "use only the first N test samples (0: all)")
                        ->check(kNonNegative));
  add("val_fraction", app->add_option("--val-fraction", o.val_fraction,
                                      "hold out this fraction of the training set (stratified, "
                                      "drawn with --data-seed) as a validation set, evaluated "
                                      "every epoch")
                          ->check(CLI::Range(0.0, 0.99)));
  add("per_class", app->add_option("--per-class", o.per_class,
                                   "train on a stratified subset of N samples per class (0: all)")
                       ->check(kNonNegative));
  add("data_seed", app->add_option("--data-seed", o.data_seed,
                                   "seeds the validation split and the per-class subset (not "
                                   "--seed: runs that differ in --seed share the split)")
                       ->capture_default_str());
  add("inputs", app->add_option("--inputs", o.inputs,
                                "standardize (per feature, fitted on the training set), raw "
                                "(IDX pixels 0-255, CSV values as written) or scaled (IDX pixels "
                                "in [0, 1], CSV values as written)")
                    ->check(CLI::IsMember({"standardize", "raw", "scaled"}))
                    ->capture_default_str());
  add("test_eval", app->add_option("--test-eval", o.test_eval,
                                   "when the test set is evaluated: epoch, end or never (default: "
                                   "every epoch, or only after the last with --val-fraction)")
                       ->check(CLI::IsMember({"auto", "epoch", "end", "never"})));
  add("diverge_factor",
      app->add_option("--diverge-factor", o.diverge_factor,
                      "also stop as diverged when an epoch's mean training loss exceeds F times "
                      "the first step's loss (0: only a NaN/inf loss stops the run)")
          ->check(kNonNegative));
  add("freeze_bn_after",
      app->add_option("--freeze-bn-after", o.freeze_bn_after,
                      "from epoch N+1 on, freeze every batch-norm layer: normalize with the "
                      "running statistics, stop updating them, keep training γ and β (0: never)")
          ->check(kNonNegative));
  add("log_every", app->add_option("--log-every", o.log_every,
                                   "write the mean training loss and accuracy of the last K steps "
                                   "to OUT/steps.jsonl every K steps (0: off)")
                       ->check(kNonNegative));
  add("eval_every", app->add_option("--eval-every", o.eval_every,
                                    "evaluate the validation set (and the test set when it is "
                                    "evaluated every epoch) every K steps, in steps.jsonl")
                        ->check(kNonNegative));
  add("probe_every", app->add_option("--probe-every", o.probe_every,
                                     "probe the model every K steps and before the first: "
                                     "activation percentiles, BN statistics, per-layer gradient "
                                     "norms on a fixed probe batch, in steps.jsonl")
                         ->check(kNonNegative));
  add("probe_at", app->add_option("--probe-at", o.probe_at, "also probe at these steps (e.g. 0,1,10,100)"));
  add("probe_samples", app->add_option("--probe-samples", o.probe_samples,
                                       "the probe batch: the first N validation samples (training "
                                       "samples without a validation split)")
                           ->check(CLI::Range(int64_t{2}, int64_t{1} << 20))
                           ->capture_default_str());
  add("probe_units", app->add_option("--probe-units", o.probe_units,
                                     "units per activation layer whose 15/50/85th percentiles "
                                     "are recorded")
                         ->check(CLI::Range(int64_t{0}, int64_t{1} << 20))
                         ->capture_default_str());
  add("eval_bn_stats",
      app->add_option("--eval-bn-stats", o.eval_bn_stats,
                      "after each epoch, also evaluate with these batch-norm statistics (comma-separated: "
                      "precise:N, precise:N:B, adapt:N, batch:B; see `normkit eval --bn-stats`), in "
                      "metrics.jsonl's \"bn_stats\""));
  add("probe_ics", app->add_flag("--probe-ics", o.probe_ics,
                                 "probes also measure Santurkar et al.'s gradient ICS per weight "
                                 "layer (one more forward and backward per layer)"));
}

void add_command_flags(CLI::App* app, CommandFlags& f, const std::string& default_out) {
  f.out = default_out;
  app->add_option("--out", f.out, "output directory")->capture_default_str();
  auto* resume = app->add_flag("--resume", f.resume, "continue the run saved in --out");
  app->add_flag("--overwrite", f.overwrite, "replace a run already in --out")->excludes(resume);
  app->add_option("--max-memory", f.max_memory,
                  "refuse a model that needs more memory to train than this (8G, 512M, bytes; "
                  "default: this machine's memory)");
}

GivenOptions given_options(const OptionMap& options) {
  GivenOptions given;
  for (const auto& [key, option] : options)
    if (option->count() > 0) given.insert(key);
  return given;
}

// ---------------------------------------------------------------- train

// `train --report`: OUT/curves.png (plot_metrics.py: the losses and accuracies
// per epoch, the training loss per logged step) and OUT/report.md, the run in
// one page. Returns what kept the plot from being drawn ("" if nothing).
std::string write_train_report(const Run& run, const Data& data) {
  const fs::path& out = run.out();
  const RunOptions& o = run.options();
  std::error_code ec;
  fs::remove(out / "curves.png", ec);  // never a stale figure
  const std::string plot_problem = run_python(
      "plot_metrics.py",
      {"--out", (out / "curves.png").string(), "--title", fmt::format("{}, {}", o.model, norm_label(run.norm())),
       run.name() + "=" + (out / "metrics.jsonl").string()},
      out / ".plot.log");
  std::string r = fmt::format("# {}: {}\n\n{}, {}.\n\n", run.name(), o.model, describe_run(o, data),
                              run.norm() == "none" ? "without normalization" : "with " + norm_label(run.norm()));
  r += fmt::format("{} of {} epochs trained", run.epochs_done(), o.epochs);
  if (run.stopped_early()) r += fmt::format(", stopped early (--early-stop {})", o.early_stop);
  if (run.best_epoch() > 0) r += fmt::format("; the lowest validation loss in epoch {}", run.best_epoch());
  r += ".\n\n## Per epoch\n\n| epoch | lr | train loss | train acc | val loss | val acc | test loss | test acc | s |\n"
       "|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n";
  for (const json& m : run.history()) {
    r += fmt::format("| {} | {:.4g} |", m["epoch"].get<int64_t>(), m["lr"].get<double>());
    for (const char* key : {"train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc"})
      r += m.contains(key) ? fmt::format(" {:.4f} |", m[key].get<double>()) : " |";
    r += fmt::format(" {:.1f} |\n", m["seconds"].get<double>());
  }
  r += "\n## Curves\n\n";
  r += plot_problem.empty() ? "![loss and accuracy per epoch, training loss per logged step](curves.png)\n"
                            : "No plot: " + plot_problem + ".\n";
  r += "\n## Files\n\n- `checkpoint.nkc`: the last epoch (`--resume` continues it)\n";
  if (fs::is_regular_file(out / "best.nkc", ec)) r += fmt::format("- `best.nkc`: epoch {}\n", run.best_epoch());
  r += "- `metrics.jsonl`: one line per epoch; `run.json`: the outcome\n";
  if (fs::is_regular_file(out / "steps.jsonl", ec)) r += "- `steps.jsonl`: one line per logged step\n";
  write_file_atomically(out / "report.md", r);
  return plot_problem;
}

int report_stop(const Run& run) {
  run.write_outcome();
  std::string message = run.stop_reason();
  if (run.epochs_done() > 0)
    message += fmt::format("; the last good checkpoint (epoch {}) is {}", run.epochs_done(),
                           run.checkpoint_path().string());
  fmt::print(stderr, "normkit: error: {}{}\n", rank_prefix(), message);
  return 1;
}

// The options of `train` for data-parallel runs under mpirun.
void add_group_options(CLI::App* app, RunOptions& o, OptionMap& options, GroupFlags& group) {
  options["sync_bn"] = app->add_flag(
      "--sync-bn,!--no-sync-bn", o.sync_bn,
      "under mpirun: batch norm with the statistics of the global batch, merged over the ranks "
      "(default); --no-sync-bn: each rank normalizes its own shard (ghost BN, ghost batch = shard)");
  app->add_option("--ranks", group.ranks,
                  "under mpirun: the number of ranks this run expects; another number is an error")
      ->check(CLI::Range(1, 1 << 20));
  app->add_option("--timeout", group.timeout,
                  "under mpirun: seconds a rank waits for the others before it ends the run "
                  "(a rank that died or hangs)")
      ->check(kPositive)
      ->capture_default_str();
}

// Every rank starts from the same options, data and model: checked, not assumed.
void check_same_start(dist::Communicator& group, Run& run, const Data& data) {
  const std::string start = fmt::format("{} {} {} {}", to_json(run.options()).dump(),
                                        run.epochs_done(), data.train.count(), data.test.count());
  std::vector<const std::vector<float>*> arrays;
  for (const auto& [name, values] : run.model().state()) arrays.push_back(values);
  dist::check_same(group, dist::fingerprint(start) ^ dist::fingerprint(arrays),
                   "the run's options, data or starting model (start every rank with the same "
                   "command, files and --out)");
}

}  // namespace

int command_train(const RunOptions& given_options, const GivenOptions& given,
                  const CommandFlags& flags) {
  dist::Communicator* group = join_process_group(flags.group);
  fs::path out_path = fs::absolute(flags.out).lexically_normal();
  if (out_path.filename().empty()) out_path = out_path.parent_path();  // "runs/x/"
  std::string name = flags.name.empty() ? out_path.filename().string() : flags.name;
  if (name.empty()) name = "train";
  // Ctrl-C or SIGTERM: the current step finishes, the run is saved where it
  // stopped, and the exit status is 128 + the signal.
  train::install_stop_handlers();
  std::optional<Run> run;
  Data data;
  if (flags.resume) {
    run.emplace(Run::resume(flags.out));
    run->options() = merge_resume_options(run->options(), given_options, given);
    check_memory(run->model().spec(), run->options().batch_size, flags.max_memory);
    apply_threads(run->options().threads);
    data::Standardizer standardizer = run->standardizer();
    data = prepare_data(run->options(), &standardizer, false);
    check_data_fits(run->model().spec(), data.train);
    check_data_fits(run->model().spec(), data.test);
  } else {
    const RunOptions o = finish_options(given_options, given);
    std::error_code ec;
    if (fs::exists(flags.out / "checkpoint.nkc", ec) && !flags.overwrite)
      usage_error("'" + flags.out.string() + "' already holds a run (checkpoint.nkc): pass --resume to "
                  "continue it or --overwrite to start over");
    apply_threads(o.threads);
    data::Standardizer standardizer;
    data = prepare_data(o, &standardizer, true);
    const nn::ModelSpec spec = resolve_spec(o, o.norm, data.train);
    check_normalization(resolve_spec(o, "batch", data.train), spec, o.norm);
    check_memory(spec, o.batch_size, flags.max_memory);
    check_data_fits(spec, data.train);
    check_data_fits(spec, data.test);
    run.emplace(Run::start(o, name, flags.out, o.norm, standardizer, data.train, flags.overwrite));
  }
  const RunOptions& o = run->options();
  std::string ranks;
  if (group) {
    if (o.probe_every > 0 || !o.probe_at.empty())
      usage_error("--probe-every and --probe-at run in one process, not under mpirun");
    const int synchronized = run->model().synchronize_batch_norm(o.sync_bn ? group : nullptr);
    check_same_start(*group, *run, data);
    ranks = fmt::format("; {} ranks{}", group->size(),
                        synchronized ? o.sync_bn ? ", synchronized batch norm"
                                                 : ", batch norm per rank"
                                     : "");
  }
  fmt::print("normkit train: {} ({}{}), {}\n", describe_run(o, data),
             run->norm() == "none" ? "without normalization" : "with " + norm_label(run->norm()),
             ranks,
             !flags.resume           ? fmt::format("output in {}", flags.out.string())
             : run->epoch_step() > 0 ? fmt::format("resuming epoch {} after step {}",
                                                   run->epochs_done() + 1, run->epoch_step())
                                     : fmt::format("resuming after epoch {}", run->epochs_done()));
  std::fflush(stdout);
  if (run->stopped_early()) {
    fmt::print("stopped early after epoch {}: no lower validation loss for {} epochs (best: epoch {}); "
               "nothing to do\n", run->epochs_done(), o.early_stop, run->best_epoch());
    run->write_outcome();
    return 0;
  }
  if (run->epochs_done() >= o.epochs) {
    fmt::print("already trained {} of {} epochs; nothing to do (raise --epochs to continue)\n",
               run->epochs_done(), o.epochs);
    run->write_outcome();
    return 0;
  }
  std::optional<Progress> progress;
  if (Progress::enabled() && writes_files()) progress.emplace("");
  while (run->epochs_done() < o.epochs) {
    const EpochRecord record = run->train_epoch(data, progress ? &*progress : nullptr);
    if (record.interrupted)
      return report_interruption(
          record.interrupted, fmt::format("epoch {} stopped after step {}; saved in {}: continue with "
                                          "`normkit train --resume --out {}`",
                                          run->epochs_done() + 1, run->epoch_step(),
                                          run->checkpoint_path().string(), flags.out.string()));
    const json& m = record.metrics;
    if (!m.is_null()) {
      std::string evaluated;
      for (const char* set : {"val", "test"})
        if (m.contains(std::string(set) + "_acc"))
          evaluated += fmt::format("  {} loss {:.4f} acc {:.4f}", set, m[std::string(set) + "_loss"].get<double>(),
                                   m[std::string(set) + "_acc"].get<double>());
      fmt::print("epoch {}/{}  train loss {:.4f} acc {:.4f}{}  {:.1f} s ({:.0f} samples/s)\n",
                 m["epoch"].get<int64_t>(), o.epochs, m["train_loss"].get<double>(),
                 m["train_acc"].get<double>(), evaluated, m["seconds"].get<double>(),
                 m["samples_per_second"].get<double>());
      std::fflush(stdout);
    }
    if (!record.ok) return report_stop(*run);
    if (run->stopped_early()) {
      fmt::print("stopped early after epoch {}: no lower validation loss for {} epochs (best: epoch {})\n",
                 run->epochs_done(), o.early_stop, run->best_epoch());
      break;
    }
    // A signal during the epoch's last step, its evaluation or its save: the epoch is saved.
    if (const int signal = train::stop_signal(); signal != 0 && run->epochs_done() < o.epochs)
      return report_interruption(signal, fmt::format("saved after epoch {} in {}: continue with "
                                                     "`normkit train --resume --out {}`",
                                                     run->epochs_done(), run->checkpoint_path().string(),
                                                     flags.out.string()));
  }
  run->write_outcome();
  fmt::print("saved {} (epoch {}); metrics in {}\n", run->checkpoint_path().string(),
             run->epochs_done(), (flags.out / "metrics.jsonl").string());
  if (o.keep == "best" && run->best_epoch() > 0)
    fmt::print("best epoch {} (validation loss {:.4f}): {}\n", run->best_epoch(),
               run->history()[static_cast<size_t>(run->best_epoch() - 1)]["val_loss"].get<double>(),
               run->best_checkpoint_path().string());
  if (flags.report && writes_files()) {
    const std::string plot_problem = write_train_report(*run, data);
    fmt::print("report: {}{}\n", (flags.out / "report.md").string(),
               plot_problem.empty() ? "" : " (no plot: " + plot_problem + ")");
  }
  return 0;
}

namespace {

// ---------------------------------------------------------------- eval, info

struct InspectFlags {
  fs::path checkpoint;
  std::string data;
  int64_t limit_test = -1;
  int threads = 0;
  bool json = false;
  std::vector<std::string> bn_stats, shifts;  // eval: statistics sources and input shifts
  uint64_t seed = 0;
};

int command_eval(const InspectFlags& f) {
  apply_threads(f.threads);
  const io::Checkpoint checkpoint = io::load_checkpoint(f.checkpoint);
  const json app = application_json(checkpoint);
  RunOptions o = run_options_of(app);
  bool whole_table = false;
  if (!f.data.empty()) {
    std::error_code ec;
    RunOptions given;
    given.data = f.data;
    given = with_absolute_paths(given);
    whole_table = fs::is_regular_file(given.data, ec) && given.data != o.data;
    o.data = given.data;
    o.test_data.clear();
  }
  if (f.limit_test >= 0) o.limit_test = f.limit_test;
  Data data;
  std::vector<std::string> names = class_names_of(app);
  if (whole_table) {  // a table given for evaluation is all test data
    data::CsvOptions csv = csv_options(o);
    csv.class_names = names;  // string labels mean what they meant in training
    data.test = data::load_csv(o.data, csv);
    if (o.limit_test > 0 && o.limit_test < data.test.count()) {
      data.test.labels.resize(static_cast<size_t>(o.limit_test));
      data.test.features.resize(static_cast<size_t>(o.limit_test * data.test.sample_size()));
    }
  } else {
    data = load_data(o, false);
  }
  if (names.empty()) names = data.test.class_names;
  if (data.test.count() == 0) usage_error("no test samples to evaluate");
  check_data_fits(checkpoint.spec, data.test);
  if (!f.bn_stats.empty() || !f.shifts.empty()) {
    RunOptions run;  // the checkpoint's own: its training data, for precise statistics
    if (app.is_object() && app.contains("options")) run = run_options_from_json(app["options"]);
    else run.data.clear();
    return command_eval_statistics(f.checkpoint, checkpoint, run, o, data.test, f.bn_stats, f.shifts, f.seed, f.json);
  }
  if (checkpoint.standardizer.fitted()) standardize(checkpoint.standardizer, data.test);
  auto model = io::build_model(checkpoint);
  const train::Evaluation e = train::evaluate(*model, data.test);
  const int32_t k = e.classes;
  auto count = [&](int32_t truth, int32_t predicted) {
    return static_cast<double>(e.confusion[static_cast<size_t>(truth * k + predicted)]);
  };
  // Per class: precision = TP / predicted as it, recall = TP / truly it, F1
  // their harmonic mean; 0 where a denominator is 0 (scikit-learn's zero_division=0).
  std::vector<double> precision(k), recall(k), f1(k);
  std::vector<int64_t> support(k);
  for (int32_t c = 0; c < k; ++c) {
    double predicted = 0, truly = 0;
    for (int32_t other = 0; other < k; ++other) {
      predicted += count(other, c);
      truly += count(c, other);
    }
    support[c] = static_cast<int64_t>(truly);
    precision[c] = predicted > 0 ? count(c, c) / predicted : 0.0;
    recall[c] = truly > 0 ? count(c, c) / truly : 0.0;
    f1[c] = precision[c] + recall[c] > 0 ? 2 * precision[c] * recall[c] / (precision[c] + recall[c]) : 0.0;
  }
  auto mean = [&](const std::vector<double>& v) {
    double sum = 0;
    for (const double x : v) sum += x;
    return k ? sum / k : 0.0;
  };
  auto name_of = [&](int32_t c) { return c < static_cast<int32_t>(names.size()) ? names[c] : std::to_string(c); };
  if (f.json) {
    json confusion = json::array();
    for (int32_t t = 0; t < k; ++t)
      confusion.push_back(std::vector<int64_t>(e.confusion.begin() + t * k, e.confusion.begin() + (t + 1) * k));
    const json out = {{"checkpoint", f.checkpoint.string()},
                      {"data", o.data},
                      {"samples", data.test.count()},
                      {"loss", e.loss},
                      {"accuracy", e.accuracy},
                      {"classes", k},
                      {"class_names", names.empty() ? json(nullptr) : json(names)},
                      {"confusion", confusion},
                      {"precision", precision},
                      {"recall", recall},
                      {"f1", f1},
                      {"support", support},
                      {"macro_f1", mean(f1)},
                      {"per_class_accuracy", recall}};
    std::cout << out.dump(2) << '\n';
    return 0;
  }
  fmt::print("checkpoint {}: {} epochs trained\n", f.checkpoint.string(), checkpoint.progress.epochs_done);
  fmt::print("data {}: {} test samples\n", o.data, data.test.count());
  fmt::print("test loss {:.4f}  accuracy {:.4f}\n\n", e.loss, e.accuracy);
  size_t width = 11;  // "macro mean "
  for (int32_t c = 0; c < k; ++c) width = std::max(width, fmt::format("{} {}", c, name_of(c)).size());
  width = std::min<size_t>(width, 24);
  fmt::print("{:<{}}  precision  recall      F1  support\n", "class", width);
  for (int32_t c = 0; c < k; ++c) {
    std::string label = names.empty() ? std::to_string(c) : fmt::format("{} {}", c, name_of(c));
    if (label.size() > width) label.resize(width);
    fmt::print("{:<{}}  {:>9.4f}  {:>6.4f}  {:>6.4f}  {:>7}\n", label, width, precision[c], recall[c], f1[c],
               support[c]);
  }
  fmt::print("{:<{}}  {:>9.4f}  {:>6.4f}  {:>6.4f}  {:>7}\n\n", "macro mean", width, mean(precision),
             mean(recall), mean(f1), data.test.count());
  fmt::print("confusion matrix (rows: true class, columns: predicted class{})\n",
             names.empty() ? "" : "; the numbers as in the table above");
  fmt::print("{:>6}", "");
  for (int32_t p = 0; p < k; ++p) fmt::print("{:>6}", p);
  fmt::print("\n");
  for (int32_t t = 0; t < k; ++t) {
    fmt::print("{:>6}", t);
    for (int32_t p = 0; p < k; ++p) fmt::print("{:>6}", e.confusion[static_cast<size_t>(t * k + p)]);
    fmt::print("\n");
  }
  return 0;
}

int command_info(const InspectFlags& f) {
  const io::Checkpoint c = io::load_checkpoint(f.checkpoint);
  auto model = io::build_model(c);
  const json app = application_json(c);
  std::error_code ec;
  const auto size = fs::file_size(f.checkpoint, ec);
  const int64_t target = app.is_object() && app.contains("options") ? app["options"].value("epochs", int64_t{0}) : 0;
  if (f.json) {
    json out = {{"checkpoint", f.checkpoint.string()},
                {"version", io::kCheckpointVersion},
                {"bytes", size},
                {"spec", c.spec.to_string()},
                {"format", c.format == nn::MemoryFormat::channels_last ? "nhwc" : "nchw"},
                {"parameters", model->parameter_count()},
                {"epochs_done", c.progress.epochs_done},
                {"epoch_step", c.progress.position.step},  // steps done in the next epoch
                {"seed", c.progress.seed},
                {"batch_size", c.progress.batch_size},
                {"optimizer", {{"name", c.optimizer.name},
                               {"options", c.optimizer.options},
                               {"steps", c.optimizer.steps}}},
                {"standardizer_features", c.standardizer.features()},
                {"class_names", class_names_of(app).empty() ? json(nullptr) : json(class_names_of(app))}};
    if (app.is_object()) {
      out["run"] = app.value("name", "");
      out["norm"] = app.value("norm", "");
      if (app.contains("options")) out["options"] = app["options"];
      if (app.contains("history") && !app["history"].empty()) out["last_epoch"] = app["history"].back();
      if (app.contains("bn_statistics")) out["bn_statistics"] = app["bn_statistics"];
    }
    std::cout << out.dump(2) << '\n';
    return 0;
  }
  fmt::print("checkpoint {} (format version {}, {} bytes)\n", f.checkpoint.string(),
             io::kCheckpointVersion, size);
  if (app.is_object())
    fmt::print("run {} ({}), model {}\n", app.value("name", "?"),
               app.value("norm", "") == "none" ? "without normalization"
                                               : "with " + norm_label(app.value("norm", "batch")),
               app.contains("options") ? app["options"].value("model", "?") : "?");
  if (app.is_object() && app.contains("folded") && app["folded"].is_object())
    fmt::print("folded from {} ({} batchnorm layers folded by `normkit fold`)\n",
               app["folded"].value("from", "?"),
               app["folded"].contains("folded") ? app["folded"]["folded"].size() : size_t{0});
  fmt::print("spec: {}\n", c.spec.to_string());
  fmt::print("memory format: {}\n\n", c.format == nn::MemoryFormat::channels_last ? "nhwc" : "nchw");
  fmt::print("{}", model->summary());
  fmt::print("\ntraining: {} epochs done{}{}, seed {}, batch size {}\n", c.progress.epochs_done,
             target ? fmt::format(" of {}", target) : "",
             c.progress.position.step > 0
                 ? fmt::format(" and {} steps of epoch {} (interrupted there)", c.progress.position.step,
                               c.progress.epochs_done + 1)
                 : "",
             c.progress.seed, c.progress.batch_size);
  if (!c.optimizer.name.empty()) {
    std::string options;
    for (const auto& [key, value] : c.optimizer.options)
      options += fmt::format("{}{} {:g}", options.empty() ? "" : ", ", key, value);
    fmt::print("optimizer: {} ({}), {} steps\n", c.optimizer.name, options, c.optimizer.steps);
  }
  if (app.is_object() && app.contains("history") && !app["history"].empty()) {
    const json& last = app["history"].back();
    fmt::print("last epoch: train loss {:.4f} acc {:.4f}, test loss {:.4f} acc {:.4f}\n",
               last.value("train_loss", 0.0), last.value("train_acc", 0.0),
               last.value("test_loss", 0.0), last.value("test_acc", 0.0));
  }
  if (app.is_object() && app.contains("bn_statistics"))
    for (const auto& r : app["bn_statistics"])
      fmt::print("batch-norm statistics: {} over {} samples ({} pass) from {}\n", r.value("command", "?"),
                 r.value("samples", int64_t{0}), r.value("pass", "?"), r.value("from", "?"));
  if (c.standardizer.fitted())
    fmt::print("standardizer: {} features (fitted on {:.0f} samples)\n", c.standardizer.features(),
               c.standardizer.moments().front().count);
  else
    fmt::print("standardizer: none\n");
  if (const auto names = class_names_of(app); !names.empty())
    fmt::print("classes: {}\n", fmt::join(names, ", "));
  return 0;
}

int run_main(int argc, char** argv) {
  CLI::App app{"normkit: batch normalization on CPUs, and a training engine to see what it does.\n"
               "Train models with and without BN, compare them, inspect checkpoints."};
  app.name("normkit");
  app.set_version_flag("--version", std::string("normkit ") + normkit::version);
  app.require_subcommand(1);
  app.option_defaults()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);  // the last one wins

  RunOptions train_options, compare_options;
  OptionMap train_given, compare_given;
  CommandFlags train_flags, compare_flags;
  auto* train = app.add_subcommand("train", "train a model; per-epoch metrics and a checkpoint go to --out");
  add_run_options(train, train_options, train_given, true);
  add_command_flags(train, train_flags, "runs/train");
  add_group_options(train, train_options, train_given, train_flags.group);
  train->add_option("--name", train_flags.name, "the run's name in metrics.jsonl (default: --out's name)");
  train->add_flag("--report", train_flags.report,
                  "when the run ends, also write OUT/report.md and OUT/curves.png (losses and accuracies per "
                  "epoch, the training loss per step logged with --log-every; python3-matplotlib)");
  // Model selection: train only (compare's two runs train the same epochs).
  train_given["early_stop"] =
      train->add_option("--early-stop", train_options.early_stop,
                        "stop N epochs after the last epoch that lowered the validation loss "
                        "(needs --val-fraction; 0: never)")
          ->check(kNonNegative);
  train_given["keep"] = train->add_option("--keep", train_options.keep,
                                          "last, or best: also keep the epoch of the lowest validation "
                                          "loss in OUT/best.nkc (needs --val-fraction)")
                            ->check(CLI::IsMember({"last", "best"}))
                            ->capture_default_str();

  auto* compare = app.add_subcommand(
      "compare", "train the same model with and without its normalization (batch norm, or --norm; same seed, data order and "
                 "initialization); write a table, report.md and curves.png to --out");
  add_run_options(compare, compare_options, compare_given, false);
  add_command_flags(compare, compare_flags, "runs/compare");

  InspectFlags eval_flags, info_flags;
  auto* eval = app.add_subcommand("eval", "test loss, accuracy and confusion matrix of a checkpoint");
  eval->add_option("checkpoint", eval_flags.checkpoint, "a checkpoint file (OUT/checkpoint.nkc)")->required();
  eval->add_option("--data", eval_flags.data,
                   "an IDX directory (its test set) or a CSV table (all of it, unless it is the "
                   "run's own --data: then its test rows); default: the run's data");
  eval->add_option("--limit-test", eval_flags.limit_test, "use only the first N test samples")
      ->check(kNonNegative);
  eval->add_option("--threads", eval_flags.threads, "threads")->check(CLI::Range(1, 4096));
  eval->add_flag("--json", eval_flags.json, "machine-readable output");
  eval->add_option("--bn-stats", eval_flags.bn_stats,
                   "the batch-norm statistics to evaluate with (repeat for several): running (as "
                   "trained), precise:N (population statistics of N training samples), precise:N:B "
                   "(pooled over training-mode batches of B), adapt:N (of N samples of the evaluated "
                   "set, unlabeled), batch:B (each shuffled test batch of B its own)")
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeAll);
  eval->add_option("--shift", eval_flags.shifts,
                   "evaluate on shifted inputs (repeat for several): noise:S, contrast:C, brightness:B, "
                   "saltpepper:P, none (see `normkit shift`)")
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeAll);
  eval->add_option("--seed", eval_flags.seed, "seeds the samples of precise/adapt, the batches of batch:B "
                                              "and the shifts' noise")
      ->capture_default_str();

  auto* info = app.add_subcommand("info", "model summary, parameter count and training progress of a checkpoint");
  info->add_option("checkpoint", info_flags.checkpoint, "a checkpoint file (OUT/checkpoint.nkc)")->required();
  info->add_flag("--json", info_flags.json, "machine-readable output");

  FoldFlags fold_flags;
  auto* fold = add_fold_command(app, fold_flags);
  LabFlags lab_flags;
  auto* lab = add_lab_command(app, lab_flags);
  PredictFlags predict_flags;
  auto* predict = add_predict_command(app, predict_flags);
  BnStatsFlags bn_stats_flags;
  add_bn_stats_commands(app, bn_stats_flags);

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == static_cast<int>(CLI::ExitCodes::Success)) return app.exit(e);  // --help, --version
    fmt::print(stderr, "normkit: error: {}\nRun '{} --help' for the options.\n", e.what(),
               app.got_subcommand(train)     ? "normkit train"
               : app.got_subcommand(compare) ? "normkit compare"
               : app.got_subcommand(eval)    ? "normkit eval"
               : app.got_subcommand(info)    ? "normkit info"
               : app.got_subcommand(fold)    ? "normkit fold"
               : app.got_subcommand(predict) ? "normkit predict"
               : app.got_subcommand(lab)     ? "normkit lab"
               : app.got_subcommand(bn_stats_flags.recalibrate_command) ? "normkit recalibrate"
               : app.got_subcommand(bn_stats_flags.adapt_command)       ? "normkit adapt"
               : app.got_subcommand(bn_stats_flags.shift_command)       ? "normkit shift"
                                             : "normkit");
    return 2;
  }
  if (*train)
    return command_train(with_absolute_paths(train_options), given_options(train_given), train_flags);
  if (*compare) {
    if (dist::started_by_mpi_launcher())
      usage_error("compare runs in one process; under mpirun, train each arm with normkit train");
    return command_compare(with_absolute_paths(compare_options), given_options(compare_given),
                           compare_flags);
  }
  if (*eval) return command_eval(eval_flags);
  if (*fold) return command_fold(fold_flags);
  if (*predict) return command_predict(predict_flags);
  if (*lab) return command_lab(lab_flags);
  if (*bn_stats_flags.recalibrate_command || *bn_stats_flags.adapt_command || *bn_stats_flags.shift_command)
    return command_bn_stats(bn_stats_flags);
  return command_info(info_flags);
}

}  // namespace

}  // namespace normkit::cli

namespace {
int run_and_report(int argc, char** argv) {
  using normkit::cli::rank_prefix;
  try {
    return normkit::cli::run_main(argc, argv);
  } catch (const normkit::Error& e) {
    std::fflush(stdout);
    fmt::print(stderr, "normkit: error: {}{}\n", rank_prefix(), e.what());
    return e.kind() == normkit::ErrorKind::invalid_argument ? 2 : 1;
  } catch (const std::exception& e) {
    std::fflush(stdout);
    fmt::print(stderr, "normkit: error: {}{}\n", rank_prefix(), e.what());
    return 1;
  } catch (...) {
    std::fflush(stdout);
    fmt::print(stderr, "normkit: error: {}unexpected failure\n", rank_prefix());
    return 1;
  }
}
}  // namespace

int main(int argc, char** argv) {
  // OpenMP's runtime reads its wait policy from the environment when it loads,
  // before main. Both of libgomp's usual policies cost a training run time:
  // - its default lets an idle thread spin ~300000 times before it sleeps; on a
  //   machine shared with other jobs that spinning holds the core the thread
  //   being waited for needs (cnn-small, 100 steps, 2 threads, 2 cores with a
  //   second job: 21.8 s against 3.5 s passive);
  // - passive waiting puts the second thread to sleep after every parallel
  //   region, and a training step opens dozens: an empty 2-thread region took
  //   2.7 us back to back but 53-66 us after 40 us of serial work (this VM
  //   halts the idle core; waking it goes through the hypervisor).
  // 3000 spins (20-40 us here) keep the thread awake between the regions of one
  // step and let it sleep soon after. cnn-small, 100 steps of 128, 2 threads:
  // 1.45-1.51 s against 1.58-1.64 s passive; with a busy-looping second job
  // 3.08-3.17 s against 2.88-3.10 s (10000 spins: 3.31-3.52 s). So the CLI runs
  // itself again with GOMP_SPINCOUNT=3000 unless the user set a policy
  // (OMP_WAIT_POLICY or GOMP_SPINCOUNT); same process id, arguments and
  // environment otherwise. If the exec fails, it runs as it is.
  if (!std::getenv("OMP_WAIT_POLICY") && !std::getenv("GOMP_SPINCOUNT") &&
      ::setenv("GOMP_SPINCOUNT", normkit::cli::kSpinCount, 1) == 0)
    ::execv("/proc/self/exe", argv);
  // Under mpirun an error on one rank ends them all (the others would wait for it).
  return normkit::cli::leave_process_group(run_and_report(argc, argv));
}
