// `normkit compare`: the same model trained with and without its normalization
// (batch norm by default, --norm for another), side by side, then a report and a plot.
//
// Both runs start from the same seed: the same initial weights (the BN-free
// model has the same weight layers; BN's γ = 1, β = 0 take no random numbers),
// the same standardized data and the same batches in the same order. Their
// epochs are interleaved so the table grows as training goes.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <optional>
#include <sstream>

#include <fmt/format.h>

#include "cli.hpp"
#include "normkit/version.hpp"

namespace normkit::cli {

namespace {

// The normalized run of an existing comparison: the one subdirectory other
// than none/ that holds a checkpoint (batch/ unless --norm chose another).
fs::path normalized_run_directory(const fs::path& out) {
  std::error_code ec;
  for (const std::string& sub : nn::ModelSpec::norm_kinds())
    if (sub != "none" && fs::exists(out / sub / "checkpoint.nkc", ec)) return out / sub;
  return out / "batch";  // Run::resume names what is missing
}

// The table's two sides: "epoch | side | side" is 79 characters, so that it
// fits an 80-column terminal.
constexpr int kSideWidth = 34;

const json* record_at(const Run& run, size_t epoch) {
  return epoch < run.history().size() ? &run.history()[epoch] : nullptr;
}

// A loss in 4 decimals, or in scientific notation when it has blown up.
std::string loss_text(double loss) {
  return std::abs(loss) < 1e5 ? fmt::format("{:.4f}", loss) : fmt::format("{:.3e}", loss);
}

std::string cells(const json* m, const Run& run) {
  if (m)
    return fmt::format("{:>10} {:>9} {:>6.4f} {:>5.1f}s", loss_text((*m)["train_loss"].get<double>()),
                       loss_text((*m)["test_loss"].get<double>()), (*m)["test_acc"].get<double>(),
                       (*m)["seconds"].get<double>());
  return fmt::format("{:^{}}", run.stopped() ? "stopped (non-finite loss)" : "-", kSideWidth);
}

void print_line(std::string line) {
  while (!line.empty() && line.back() == ' ') line.pop_back();
  fmt::print("{}\n", line);
}

void print_header(const std::string& norm) {
  print_line(fmt::format("{:>5} | {:^{}} | {:^{}}", "", "with " + norm_label(norm), kSideWidth,
                         "without " + norm_label(norm), kSideWidth));
  const std::string columns =
      fmt::format("{:>10} {:>9} {:>6} {:>6}", "train loss", "test loss", "acc", "time");
  fmt::print("{:>5} | {} | {}\n", "epoch", columns, columns);
}

void print_row(size_t epoch, const Run& a, const Run& b) {
  print_line(fmt::format("{:>5} | {} | {}", epoch + 1, cells(record_at(a, epoch), a),
                         cells(record_at(b, epoch), b)));
  std::fflush(stdout);
}

std::string markdown_cells(const json* m, const Run& run) {
  if (m)
    return fmt::format("{} | {} | {:.4f} | {:.1f}", loss_text((*m)["train_loss"].get<double>()),
                       loss_text((*m)["test_loss"].get<double>()), (*m)["test_acc"].get<double>(),
                       (*m)["seconds"].get<double>());
  return run.stopped() ? "stopped | | |" : "– | – | – | –";
}

std::string markdown_table(const Run& a, const Run& b) {
  const std::string n = norm_abbreviation(a.norm());
  std::string t = fmt::format(
      "| epoch | {0} train loss | {0} test loss | {0} test acc | {0} s | no-{0} train loss | "
      "no-{0} test loss | no-{0} test acc | no-{0} s |\n"
      "|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
      n);
  const size_t epochs = std::max(a.history().size(), b.history().size());
  for (size_t e = 0; e < epochs; ++e)
    t += fmt::format("| {} | {} | {} |\n", e + 1, markdown_cells(record_at(a, e), a),
                     markdown_cells(record_at(b, e), b));
  return t;
}

double field(const json& m, const char* key) { return m[key].get<double>(); }

// What differed, in plain words, from the numbers of both runs.
std::string summary(const Run& bn, const Run& plain) {
  std::string out;
  const auto& hb = bn.history();
  const auto& hp = plain.history();
  const std::string name = norm_name(bn.norm());
  if (plain.stopped() || bn.stopped()) {
    for (const Run* r : {&bn, &plain})
      if (r->stopped())
        out += fmt::format("Training {} {} failed after {} completed epoch{} ({}). ",
                           r == &bn ? "with" : "without", name, r->epochs_done(),
                           r->epochs_done() == 1 ? "" : "s", r->stop_reason());
  }
  const size_t common = std::min(hb.size(), hp.size());
  if (common == 0) {
    for (const Run* r : {&bn, &plain})
      if (!r->history().empty())
        out += fmt::format("Training {} it ran {} epoch{}, reaching a test accuracy of {:.4f}. ",
                           r == &bn ? "with" : "without", r->epochs_done(),
                           r->epochs_done() == 1 ? "" : "s", field(r->history().back(), "test_acc"));
    out += "No epoch was completed by both runs, so there is no side-by-side comparison.";
    return out;
  }
  const json& b = hb[common - 1];
  const json& p = hp[common - 1];
  const double diff = 100.0 * (field(b, "test_acc") - field(p, "test_acc"));
  out += fmt::format(
      "After {} epoch{}, the model with {} reached a test accuracy of {:.4f} "
      "against {:.4f} without it ({:+.2f} points), with a training loss of {} against {}. ",
      common, common == 1 ? "" : "s", name, field(b, "test_acc"), field(p, "test_acc"), diff,
      loss_text(field(b, "train_loss")), loss_text(field(p, "train_loss")));
  if (common > 1 && field(hb[0], "test_acc") >= field(p, "test_acc"))
    out += fmt::format(
        "With {}, one epoch (test accuracy {:.4f}) was already enough to match "
        "what the model without it reached after {}. ",
        name, field(hb[0], "test_acc"), common);
  // The fastest epoch of each: the machines are shared and noisy, and the
  // minimum is the least disturbed measurement.
  double fastest_b = field(hb[0], "seconds"), fastest_p = field(hp[0], "seconds");
  for (size_t e = 1; e < common; ++e) {
    fastest_b = std::min(fastest_b, field(hb[e], "seconds"));
    fastest_p = std::min(fastest_p, field(hp[e], "seconds"));
  }
  if (fastest_p > 0)
    out += fmt::format(
        "The fastest epoch with {} took {:.1f} s against {:.1f} s without it "
        "({:.2f}×).",
        name, fastest_b, fastest_p, fastest_b / fastest_p);
  return out;
}

// Runs tools/plot_metrics.py; returns "" on success, else what went wrong.
std::string plot_curves(const fs::path& out, const Run& a, const Run& b) {
  return run_python(
      "plot_metrics.py",
      {"--out", (out / "curves.png").string(), "--title",
       fmt::format("{}: with and without {}", a.options().model, norm_name(a.norm())),
       "with " + norm_abbreviation(a.norm()) + "=" + (a.out() / "metrics.jsonl").string(),
       "without " + norm_abbreviation(a.norm()) + "=" + (b.out() / "metrics.jsonl").string()},
      out / ".plot.log");
}

void write_report(const fs::path& out, const Run& a, const Run& b, const Data& data,
                  const std::string& plot_problem) {
  const RunOptions& o = a.options();
  std::string r;
  const std::string label = norm_label(a.norm());
  r += fmt::format("# {}: with and without {}\n\n", o.model, norm_name(a.norm()));
  r += summary(a, b) + "\n\n";
  r += "## Per epoch\n\nLosses are mean softmax cross-entropy; `s` is the training time of the epoch.\n\n";
  r += markdown_table(a, b) + "\n";
  r += "## Final\n\n";
  for (const Run* run : {&a, &b}) {
    const std::string side = (run == &a ? "With " : "Without ") + label;
    if (run->history().empty()) {
      r += fmt::format("- {}: no completed epoch{}\n", side,
                       run->stopped() ? " (" + run->stop_reason() + ")" : "");
      continue;
    }
    const json& m = run->history().back();
    r += fmt::format("- {}: test accuracy **{:.4f}**, test loss {}, train loss {} after {} "
                     "epoch{}{}; `{}`\n",
                     side, field(m, "test_acc"), loss_text(field(m, "test_loss")),
                     loss_text(field(m, "train_loss")),
                     run->epochs_done(), run->epochs_done() == 1 ? "" : "s", run->stopped() ? " (then stopped: " + run->stop_reason() + ")" : "",
                     (run->out() / "checkpoint.nkc").string());
  }
  r += "\n## Settings\n\n";
  r += fmt::format("- model `{}`, {} epoch{}, memory format {}\n", o.model, o.epochs,
                   o.epochs == 1 ? "" : "s", o.format);
  r += fmt::format("- with {}: `{}`\n", label, a.model_spec_text());
  r += fmt::format("- without {}: `{}`\n", label, b.model_spec_text());
  r += fmt::format("- data `{}`: {} training and {} test samples, standardized per feature with "
                   "statistics of the training set\n",
                   o.data, data.train.count(), data.test.count());
  std::string optimizer = fmt::format("{}, lr {:g}", o.optimizer, o.lr);
  if (o.optimizer == "sgd")
    optimizer += fmt::format(", momentum {:g}{}", o.momentum, o.nesterov ? " (Nesterov)" : "");
  r += fmt::format("- optimizer {}, weight decay {:g}, batch size {}\n", optimizer, o.weight_decay,
                   o.batch_size);
  r += fmt::format("- seed {} for both runs (initial weights and batch order), initialization {}\n",
                   o.seed, o.init);
  r += fmt::format("- threads {}, normkit {}\n", o.threads > 0 ? std::to_string(o.threads) : "default",
                   normkit::version);
  r += "\n## Curves\n\n";
  if (plot_problem.empty())
    r += "![training loss, test loss and test accuracy per epoch](curves.png)\n";
  else
    r += "No plot: " + plot_problem + ".\n";
  r += fmt::format("\n## Files\n\n- `{0}/metrics.jsonl`, `{0}/checkpoint.nkc`: with {1}\n"
                   "- `none/metrics.jsonl`, `none/checkpoint.nkc`: without {1}\n",
                   a.norm(), label);
  write_file_atomically(out / "report.md", r);
}

}  // namespace

int command_compare(const RunOptions& given_options, const GivenOptions& given,
                    const CommandFlags& flags) {
  // Ctrl-C or SIGTERM: the current step finishes, the run it belongs to is saved
  // where it stopped, and the exit status is 128 + the signal (see command_train).
  train::install_stop_handlers();
  std::optional<Run> with_bn, without_bn;
  Data data;
  if (flags.resume) {
    with_bn.emplace(Run::resume(normalized_run_directory(flags.out)));
    without_bn.emplace(Run::resume(flags.out / "none"));
    // --norm names the comparison's normalization: it is checked against the
    // normalized run; the run without normalization stores "none".
    const RunOptions merged = merge_resume_options(with_bn->options(), given_options, given);
    with_bn->options() = merged;
    RunOptions given_plain = given_options;
    given_plain.norm = "none";
    without_bn->options() = merge_resume_options(without_bn->options(), given_plain, given);
    apply_threads(merged.threads);
    data::Standardizer standardizer = with_bn->standardizer();
    data = prepare_data(merged, &standardizer, false);
  } else {
    RunOptions o = finish_options(given_options, given);
    // The comparison's table and plot are per-epoch test curves.
    o.test_eval = "epoch";
    std::error_code ec;
    for (const std::string& sub : nn::ModelSpec::norm_kinds())
      if (fs::exists(flags.out / sub / "checkpoint.nkc", ec) && !flags.overwrite)
        usage_error("'" + flags.out.string() + "' already holds a comparison: pass --resume to "
                    "continue it or --overwrite to start over");
    apply_threads(o.threads);
    if (o.norm == "none") usage_error("--norm none: compare needs a normalization to compare against none");
    data::Standardizer standardizer;
    data = prepare_data(o, &standardizer, true);
    const nn::ModelSpec spec = resolve_spec(o, o.norm, data.train);
    check_normalization(resolve_spec(o, "batch", data.train), spec, o.norm);
    if (spec == spec.without_batch_norm())
      usage_error("--model '" + o.model + "' has no batchnorm layer: there is nothing to compare");
    check_memory(spec, o.batch_size, flags.max_memory);
    check_data_fits(spec, data.train);
    for (const char* stale : {"report.md", "curves.png"}) fs::remove(flags.out / stale, ec);
    with_bn.emplace(Run::start(o, o.norm, flags.out / o.norm, o.norm, standardizer, data.train, flags.overwrite));
    without_bn.emplace(Run::start(o, "none", flags.out / "none", "none", standardizer, data.train, flags.overwrite));
  }
  Run& a = *with_bn;
  Run& b = *without_bn;
  const int64_t epochs = a.options().epochs;
  fmt::print("normkit compare: {}\n", describe_run(a.options(), data));
  fmt::print("output in {}{}\n\n", flags.out.string(),
             flags.resume ? fmt::format(", resuming after epoch {}", std::min(a.epochs_done(), b.epochs_done())) : "");
  print_header(a.norm());
  for (size_t e = 0; e < static_cast<size_t>(std::min(a.epochs_done(), b.epochs_done())); ++e) print_row(e, a, b);
  std::optional<Progress> progress_a, progress_b;
  if (Progress::enabled()) {
    progress_a.emplace(fmt::format("with {:<5}", norm_abbreviation(a.norm())));
    progress_b.emplace(fmt::format("without {}", norm_abbreviation(a.norm())));
  }
  for (int64_t epoch = std::min(a.epochs_done(), b.epochs_done()); epoch < epochs; ++epoch) {
    bool trained = false;
    for (Run* run : {&a, &b}) {
      if (run->stopped() || run->epochs_done() > epoch) continue;
      const EpochRecord record = run->train_epoch(data, run == &a ? (progress_a ? &*progress_a : nullptr)
                                                                  : (progress_b ? &*progress_b : nullptr));
      if (record.interrupted)
        return report_interruption(
            record.interrupted,
            fmt::format("the run {} {} stopped in epoch {} after step {} and is saved: continue with "
                        "`normkit compare --resume --out {}`",
                        run == &a ? "with" : "without", norm_label(a.norm()), run->epochs_done() + 1,
                        run->epoch_step(), flags.out.string()));
      trained = true;
      if (!record.ok)
        fmt::print(stderr, "normkit: warning: the run {} {} stopped: {}\n",
                   run == &a ? "with" : "without", norm_label(a.norm()), record.error);
    }
    if (!trained) break;
    print_row(static_cast<size_t>(epoch), a, b);
    if (const int signal = train::stop_signal(); signal != 0 && epoch + 1 < epochs)
      return report_interruption(signal, fmt::format("both runs are saved after epoch {}: continue with "
                                                     "`normkit compare --resume --out {}`",
                                                     epoch + 1, flags.out.string()));
  }
  const std::string plot_problem = plot_curves(flags.out, a, b);
  if (!plot_problem.empty())
    fmt::print(stderr, "normkit: warning: no plot ({}); the report says so\n", plot_problem);
  write_report(flags.out, a, b, data, plot_problem);
  fmt::print("\n{}\n\nreport: {}{}\n", summary(a, b), (flags.out / "report.md").string(),
             plot_problem.empty() ? ", curves: " + (flags.out / "curves.png").string() : "");
  return 0;
}

}  // namespace normkit::cli
