// Run options, data loading and one training run (checkpoint + metrics) for the
// `normkit` command.
#include <fcntl.h>
#include <omp.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <csignal>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <numeric>
#include <optional>
#include <set>
#include <sstream>

#include <fmt/format.h>

#include "cli.hpp"
#include "normkit/engine/probe.hpp"
#include "normkit/threading.hpp"

extern char** environ;

namespace normkit::cli {

void usage_error(const std::string& message) { throw Error(ErrorKind::invalid_argument, message); }
void runtime_error(const std::string& message) { throw Error(ErrorKind::runtime, message); }

// ---------------------------------------------------------------- options

double learning_rate_at(const RunOptions& o, int64_t step, int64_t steps_per_epoch) {
  const int64_t epoch = step / std::max<int64_t>(steps_per_epoch, 1);
  double lr = o.lr;
  if (o.lr_schedule == "cosine") {
    const double pi = 3.14159265358979323846;
    lr *= 0.5 * (1.0 + std::cos(pi * static_cast<double>(epoch) / static_cast<double>(o.epochs)));
  } else if (o.lr_schedule == "step") {
    lr *= std::pow(o.lr_gamma, static_cast<double>(epoch / o.lr_step));
  }
  if (step < o.warmup_steps) lr *= static_cast<double>(step + 1) / static_cast<double>(o.warmup_steps);
  return lr;
}

int64_t lowest_epoch(const std::vector<double>& losses) {
  return losses.empty() ? 0 : std::min_element(losses.begin(), losses.end()) - losses.begin() + 1;
}

bool patience_over(const std::vector<double>& losses, int64_t patience) {
  return patience > 0 && !losses.empty() && static_cast<int64_t>(losses.size()) - lowest_epoch(losses) >= patience;
}

json to_json(const RunOptions& o) {
  return {{"model", o.model},
          {"norm", o.norm},
          {"epochs", o.epochs},
          {"batch_size", o.batch_size},
          {"lr", o.lr},
          {"lr_schedule", o.lr_schedule},
          {"lr_step", o.lr_step},
          {"lr_gamma", o.lr_gamma},
          {"warmup_steps", o.warmup_steps},
          {"optimizer", o.optimizer},
          {"momentum", o.momentum},
          {"nesterov", o.nesterov},
          {"weight_decay", o.weight_decay},
          {"init", o.init},
          {"init_std", o.init_std},
          {"seed", o.seed},
          {"data", o.data},
          {"test_data", o.test_data},
          {"csv_label_column", o.csv_label_column},
          {"csv_header", o.csv_header},
          {"csv_delimiter", o.csv_delimiter},
          {"format", o.format},
          {"limit_train", o.limit_train},
          {"limit_test", o.limit_test},
          {"threads", o.threads},
          {"val_fraction", o.val_fraction},
          {"per_class", o.per_class},
          {"data_seed", o.data_seed},
          {"inputs", o.inputs},
          {"test_eval", o.test_eval},
          {"diverge_factor", o.diverge_factor},
          {"freeze_bn_after", o.freeze_bn_after},
          {"early_stop", o.early_stop},
          {"keep", o.keep},
          {"log_every", o.log_every},
          {"eval_every", o.eval_every},
          {"probe_every", o.probe_every},
          {"probe_at", o.probe_at},
          {"probe_samples", o.probe_samples},
          {"probe_units", o.probe_units},
          {"probe_ics", o.probe_ics},
          {"sync_bn", o.sync_bn},
          {"eval_bn_stats", o.eval_bn_stats}};
}

RunOptions run_options_from_json(const json& j) {
  RunOptions o;
  try {
    o.model = j.at("model").get<std::string>();
    o.norm = j.at("norm").get<std::string>();
    o.epochs = j.at("epochs").get<int64_t>();
    o.batch_size = j.at("batch_size").get<int64_t>();
    o.lr = j.at("lr").get<double>();
    o.lr_schedule = j.value("lr_schedule", std::string("constant"));  // absent before schedules
    o.lr_step = j.value("lr_step", RunOptions{}.lr_step);
    o.lr_gamma = j.value("lr_gamma", RunOptions{}.lr_gamma);
    o.warmup_steps = j.value("warmup_steps", RunOptions{}.warmup_steps);
    o.optimizer = j.at("optimizer").get<std::string>();
    o.momentum = j.at("momentum").get<double>();
    o.nesterov = j.at("nesterov").get<bool>();
    o.weight_decay = j.at("weight_decay").get<double>();
    o.init = j.at("init").get<std::string>();
    o.init_std = j.at("init_std").get<double>();
    o.seed = j.at("seed").get<uint64_t>();
    o.data = j.at("data").get<std::string>();
    o.test_data = j.at("test_data").get<std::string>();
    // Before named columns: a number counted from 0, -1 for the last.
    if (const json& label = j.at("csv_label_column"); label.is_number())
      o.csv_label_column = label.get<int>() < 0 ? "last" : std::to_string(label.get<int>() + 1);
    else
      o.csv_label_column = label.get<std::string>();
    o.csv_header = j.value("csv_header", std::string("auto"));
    o.csv_delimiter = j.value("csv_delimiter", std::string(","));
    o.format = j.at("format").get<std::string>();
    o.limit_train = j.at("limit_train").get<int64_t>();
    o.limit_test = j.at("limit_test").get<int64_t>();
    o.threads = j.at("threads").get<int>();
    // Absent in checkpoints written before these options existed: their defaults.
    const RunOptions d;
    o.val_fraction = j.value("val_fraction", d.val_fraction);
    o.per_class = j.value("per_class", d.per_class);
    o.data_seed = j.value("data_seed", d.data_seed);
    o.inputs = j.value("inputs", d.inputs);
    o.test_eval = j.value("test_eval", d.test_eval);
    o.diverge_factor = j.value("diverge_factor", d.diverge_factor);
    o.freeze_bn_after = j.value("freeze_bn_after", d.freeze_bn_after);
    o.early_stop = j.value("early_stop", d.early_stop);
    o.keep = j.value("keep", d.keep);
    o.log_every = j.value("log_every", d.log_every);
    o.eval_every = j.value("eval_every", d.eval_every);
    o.probe_every = j.value("probe_every", d.probe_every);
    o.probe_at = j.value("probe_at", d.probe_at);
    o.probe_samples = j.value("probe_samples", d.probe_samples);
    o.probe_units = j.value("probe_units", d.probe_units);
    o.probe_ics = j.value("probe_ics", d.probe_ics);
    o.sync_bn = j.value("sync_bn", d.sync_bn);
    o.eval_bn_stats = j.value("eval_bn_stats", d.eval_bn_stats);
  } catch (const json::exception& e) {
    runtime_error(std::string("bad run options: ") + e.what());
  }
  return o;
}

RunOptions merge_resume_options(const RunOptions& stored, const RunOptions& given,
                                const GivenOptions& given_keys) {
  // What may change on resume: how long (epochs, early stopping), how many
  // threads, where the data lives, and what is logged (none of it changes the
  // training itself).
  static const std::set<std::string> changeable = {
      "epochs",    "early_stop",    "threads",       "data",          "test_data",   "log_every", "eval_every",
      "probe_every", "probe_at", "probe_samples", "probe_units", "probe_ics", "eval_bn_stats"};
  const json old_values = to_json(stored), new_values = to_json(given);
  for (const auto& key : given_keys) {
    if (changeable.contains(key)) continue;
    if (!old_values.contains(key) || old_values[key] == new_values[key]) continue;
    std::string option = "--" + key;
    std::replace(option.begin(), option.end(), '_', '-');
    usage_error(option + " " + new_values[key].dump() + " differs from the checkpoint's " +
                old_values[key].dump() +
                ": a resumed run keeps its settings (only --epochs, --threads, --data and the "
                "logging and probe options may change)");
  }
  json merged = old_values;
  for (const auto& key : given_keys)
    if (changeable.contains(key)) merged[key] = new_values[key];
  return run_options_from_json(merged);
}

RunOptions with_absolute_paths(RunOptions o) {
  auto absolute = [](std::string& path) {
    if (!path.empty()) path = fs::absolute(path).lexically_normal().string();
  };
  absolute(o.data);
  absolute(o.test_data);
  std::error_code ec;
  if (o.model != "mlp-paper" && o.model != "cnn-small" && fs::is_regular_file(o.model, ec))
    absolute(o.model);
  return o;
}

RunOptions finish_options(RunOptions o, const GivenOptions& given) {
  if (o.optimizer == "adam") {
    if (!given.contains("lr")) o.lr = 1e-3;
    if (given.contains("momentum") || given.contains("nesterov"))
      usage_error("--momentum and --nesterov apply to --optimizer sgd only");
  }
  if (o.nesterov && o.momentum == 0) usage_error("--nesterov needs --momentum > 0");
  if (o.lr_schedule == "step" && o.lr_step < 1)
    usage_error("--lr-schedule step needs --lr-step N: the epochs between decays by --lr-gamma");
  if (!(o.lr_gamma <= 1)) usage_error("--lr-gamma must be in (0, 1], got " + std::to_string(o.lr_gamma));
  if (o.lr_schedule != "step" && (given.contains("lr_step") || given.contains("lr_gamma")))
    usage_error("--lr-step and --lr-gamma apply to --lr-schedule step only");
  if (given.contains("init_std") && o.init != "normal")
    usage_error("--init-std applies to --init normal only");
  if (!(o.val_fraction >= 0 && o.val_fraction < 1))
    usage_error("--val-fraction must be in [0, 1), got " + std::to_string(o.val_fraction));
  if (o.test_eval == "auto") o.test_eval = o.val_fraction > 0 ? "end" : "epoch";
  if (o.test_eval != "epoch" && o.val_fraction == 0 && given.contains("test_eval"))
    usage_error("--test-eval " + o.test_eval + " needs --val-fraction: without a validation split "
                "the test set is what each epoch is evaluated on");
  for (const auto& [key, option] : {std::pair{"early_stop", "--early-stop"}, std::pair{"keep", "--keep"}})
    if (given.contains(key) && o.val_fraction == 0 && (o.early_stop > 0 || o.keep == "best"))
      usage_error(std::string(option) + " chooses by the validation loss: give --val-fraction "
                  "(the test set is never used to choose)");
  (void)probe_steps(o);  // checks --probe-at
  (void)eval_bn_stats_sources(o);
  return o;
}

std::vector<StatsSource> eval_bn_stats_sources(const RunOptions& o) {
  std::vector<StatsSource> out;
  std::stringstream in(o.eval_bn_stats);
  for (std::string item; std::getline(in, item, ',');) out.push_back(parse_stats_source(item));
  return out;
}

std::set<int64_t> probe_steps(const RunOptions& o) {
  std::set<int64_t> steps;
  std::stringstream in(o.probe_at);
  for (std::string item; std::getline(in, item, ',');) {
    const auto step = whole_number(item);
    if (!step || *step < 0) usage_error("--probe-at: expected steps like 0,1,10,100, got '" + o.probe_at + "'");
    steps.insert(*step);
  }
  return steps;
}

std::optional<int64_t> whole_number(const std::string& text) {
  size_t used = 0;
  int64_t v = 0;
  try {
    v = std::stoll(text, &used);
  } catch (const std::exception&) {
    return std::nullopt;
  }
  if (text.empty() || used != text.size()) return std::nullopt;
  return v;
}

namespace {
// "8G", "512M", "1.5T", "100000" (bytes).
double bytes_of(const std::string& text) {
  size_t used = 0;
  double value = 0;
  try {
    value = std::stod(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  const std::string unit = used > 0 ? text.substr(used) : "";
  const std::map<std::string, double> units = {{"", 1},      {"K", 1e3},  {"M", 1e6},  {"G", 1e9},
                                               {"T", 1e12},  {"KB", 1e3}, {"MB", 1e6}, {"GB", 1e9},
                                               {"TB", 1e12}};
  if (used == 0 || !units.contains(unit) || !(value > 0) || !std::isfinite(value))
    usage_error("--max-memory '" + text + "': expected a size such as 8G, 512M or a number of bytes");
  return value * units.at(unit);
}
}  // namespace

void check_memory(const nn::ModelSpec& spec, int64_t batch_size, const std::string& max_memory) {
  const double limit = max_memory.empty() ? nn::physical_memory_bytes() : bytes_of(max_memory);
  nn::ModelSize size;
  try {
    size = spec.size();
  } catch (const Error& e) {
    usage_error(e.what());
  }
  if (size.training_bytes(batch_size) <= limit) return;
  runtime_error("the model needs about " + size.describe(batch_size) + " to train, more than " +
                (max_memory.empty() ? "this machine's " + nn::byte_text(limit) + " of memory"
                                    : "--max-memory " + nn::byte_text(limit)) +
                "; use a smaller model or batch" +
                (max_memory.empty() ? "" : ", or raise --max-memory"));
}

int report_interruption(int signal, const std::string& where) {
  std::fflush(stdout);
  fmt::print(stderr, "normkit: interrupted by {}: {}\n", signal == SIGTERM ? "SIGTERM" : "SIGINT", where);
  return 128 + signal;
}

void apply_threads(int threads) {
  if (threads <= 0) return;
  set_num_threads(threads);
  omp_set_num_threads(threads);  // oneDNN's sgemm runs on OpenMP
}

nn::ModelSpec resolve_spec(const RunOptions& options, const std::string& norm,
                           const data::Dataset& data) {
  nn::ModelSpec spec;
  if (options.model == "mlp-paper" || options.model == "cnn-small") {
    spec = nn::ModelSpec::preset(options.model);
  } else if (options.model.starts_with("mlp:")) {
    try {
      spec = nn::ModelSpec::mlp(options.model.substr(4), data.sample_shape, data.num_classes);
    } catch (const Error& e) {
      usage_error("--model '" + options.model + "': " + e.what());
    }
  } else {
    std::error_code ec;
    if (!fs::is_regular_file(options.model, ec))
      usage_error("--model '" + options.model +
                  "' is neither a preset (mlp-paper, cnn-small, mlp:OPTIONS) nor a model spec file");
    std::ifstream in(options.model);
    std::stringstream text;
    text << in.rdbuf();
    if (!in) runtime_error("--model '" + options.model + "': cannot read the file");
    try {
      spec = nn::ModelSpec::parse(text.str());  // the text form or JSON
    } catch (const Error& e) {
      usage_error("--model '" + options.model + "': " + e.what());
    }
  }
  try {
    return spec.with_norm(norm);
  } catch (const Error& e) {
    usage_error("--norm " + norm + ": " + e.what());
  }
}

void check_normalization(const nn::ModelSpec& spec, const nn::ModelSpec& result, const std::string& norm) {
  // with_norm only drops layers (instance norm after flat features).
  const size_t dropped = spec.layers.size() - result.layers.size();
  if (norm != "none" && dropped > 0) {
    if (result == spec.without_batch_norm())
      usage_error("--norm " + norm + ": every batchnorm layer of the model follows flat features ([N, C]: one "
                  "value per sample and channel), where " + norm_label(norm) +
                  " has nothing to normalize, so none would be left; use --norm none for a model "
                  "without normalization, or a model with convolutions");
    fmt::print(stderr, "normkit: warning: --norm {}: {} of the model's batchnorm layers follow{} flat "
               "features, where {} has nothing to normalize: {} dropped (see `normkit info`)\n",
               norm, dropped, dropped == 1 ? "s" : "", norm_label(norm), dropped == 1 ? "it is" : "they are");
  }
  // A fresh model's running statistics are mean 0 and variance 1: frozen
  // batch norm would compute γ·x/sqrt(1 + eps) + β, which is no normalization.
  for (size_t i = 0; i < result.layers.size(); ++i)
    if (const auto it = result.layers[i].options.find("frozen");
        it != result.layers[i].options.end() && it->second != "0")
      usage_error(fmt::format(
          "{}layer {} ({} frozen=1): a model trained from scratch has no statistics to freeze (its "
          "running statistics are mean 0 and variance 1, so frozen batch norm would not normalize "
          "at all); train with batch norm and --freeze-bn-after N to freeze them after N epochs",
          norm == "frozen" ? "--norm frozen: " : "--model: ", i + 1, result.layers[i].type));
}

namespace {
struct NormNames {
  const char *label, *name, *abbreviation;
};
NormNames norm_names(const std::string& norm) {
  if (norm == "batch") return {"batch norm", "batch normalization", "BN"};
  if (norm == "frozen") return {"frozen batch norm", "frozen batch normalization", "frozen BN"};
  if (norm == "renorm") return {"batch renorm", "batch renormalization", "BRN"};
  if (norm == "ghost") return {"ghost batch norm", "ghost batch normalization", "GBN"};
  if (norm == "layer") return {"layer norm", "layer normalization", "LN"};
  if (norm == "group") return {"group norm", "group normalization", "GN"};
  if (norm == "instance") return {"instance norm", "instance normalization", "IN"};
  if (norm == "noisy") return {"noisy batch norm", "noisy batch normalization", "noisy BN"};
  return {"no normalization", "no normalization", "none"};
}
}  // namespace

std::string norm_label(const std::string& norm) { return norm_names(norm).label; }
std::string norm_name(const std::string& norm) { return norm_names(norm).name; }
std::string norm_abbreviation(const std::string& norm) { return norm_names(norm).abbreviation; }

// ---------------------------------------------------------------- data

namespace {

data::Dataset subset(const data::Dataset& set, std::vector<int64_t> indices) {
  std::sort(indices.begin(), indices.end());  // keep the file's order
  data::Dataset out;
  out.sample_shape = set.sample_shape;
  out.num_classes = set.num_classes;
  out.class_names = set.class_names;
  const int64_t n = set.sample_size();
  out.features.reserve(indices.size() * static_cast<size_t>(n));
  for (const int64_t i : indices) {
    out.features.insert(out.features.end(), set.features.begin() + i * n,
                        set.features.begin() + (i + 1) * n);
    out.labels.push_back(set.labels[i]);
  }
  return out;
}

// Keeps only the rows `indices` (increasing) of `set`, in place (no second copy
// of 60k images: the lab starts many runs).
void keep_rows(data::Dataset& set, const std::vector<int64_t>& indices) {
  const int64_t n = set.sample_size();
  int64_t k = 0;
  for (const int64_t i : indices) {
    if (i != k) {
      std::copy(set.features.begin() + i * n, set.features.begin() + (i + 1) * n,
                set.features.begin() + k * n);
      set.labels[static_cast<size_t>(k)] = set.labels[static_cast<size_t>(i)];
    }
    ++k;
  }
  set.features.resize(static_cast<size_t>(k * n));
  set.labels.resize(static_cast<size_t>(k));
}

// The rows of a training set a run uses, as increasing indices into it: the
// validation split (--val-fraction) and what trains (the rest, then
// --per-class of each class, then the first --limit-train).
struct TrainRows {
  std::vector<int64_t> val, train;
};

// The positions in `rows` of each class, in an order drawn from `seed` (the
// same for every run of a comparison, whatever its --seed).
std::vector<std::vector<int64_t>> shuffled_by_class(const data::Dataset& set,
                                                    const std::vector<int64_t>& rows, uint64_t seed) {
  std::vector<std::vector<int64_t>> by_class(static_cast<size_t>(set.num_classes));
  for (const int64_t i : train::epoch_order(static_cast<int64_t>(rows.size()), seed ^ 0xda7a5eedull, 0))
    by_class[static_cast<size_t>(set.labels[static_cast<size_t>(rows[static_cast<size_t>(i)])])].push_back(i);
  return by_class;
}

// From the labels alone: the IDX loader then converts only these rows.
TrainRows choose_train_rows(const data::Dataset& set, const RunOptions& o) {
  TrainRows chosen;
  chosen.train.resize(static_cast<size_t>(set.count()));
  std::iota(chosen.train.begin(), chosen.train.end(), 0);
  auto rows_at = [&](std::vector<int64_t> positions) {
    std::sort(positions.begin(), positions.end());  // the file's order
    for (int64_t& p : positions) p = chosen.train[static_cast<size_t>(p)];
    return positions;
  };
  if (o.val_fraction > 0) {  // a stratified fraction (rounded per class)
    std::vector<int64_t> held, kept;
    for (const auto& members : shuffled_by_class(set, chosen.train, o.data_seed)) {
      const auto n = static_cast<std::ptrdiff_t>(
          std::llround(o.val_fraction * static_cast<double>(members.size())));
      held.insert(held.end(), members.begin(), members.begin() + n);
      kept.insert(kept.end(), members.begin() + n, members.end());
    }
    if (held.empty())
      usage_error("--val-fraction " + std::to_string(o.val_fraction) + " holds out no sample");
    chosen.val = rows_at(std::move(held));
    chosen.train = rows_at(std::move(kept));
  }
  if (o.per_class > 0) {
    std::vector<int64_t> kept;
    for (const auto& members : shuffled_by_class(set, chosen.train, o.data_seed ^ 0x5ab5e7ull)) {
      if (static_cast<int64_t>(members.size()) < o.per_class)
        usage_error("--per-class " + std::to_string(o.per_class) + ": a class has only " +
                    std::to_string(members.size()) + " training samples");
      kept.insert(kept.end(), members.begin(), members.begin() + o.per_class);
    }
    chosen.train = rows_at(std::move(kept));
  }
  if (o.limit_train > 0 && o.limit_train < static_cast<int64_t>(chosen.train.size()))
    chosen.train.resize(static_cast<size_t>(o.limit_train));
  return chosen;
}

// Splits `train` (its rows indexed by `chosen`) into the validation set and what trains.
void take_rows(Data& d, const TrainRows& chosen) {
  if (!chosen.val.empty()) d.val = subset(d.train, chosen.val);
  keep_rows(d.train, chosen.train);
}

void keep_first(data::Dataset& set, int64_t limit) {
  if (limit <= 0 || limit >= set.count()) return;
  set.labels.resize(static_cast<size_t>(limit));
  set.features.resize(static_cast<size_t>(limit * set.sample_size()));
}

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string t = "[";
  for (size_t i = 0; i < shape.size(); ++i) t += (i ? ", " : "") + std::to_string(shape[i]);
  return t + "]";
}

}  // namespace

data::CsvOptions csv_options(const RunOptions& o) {
  data::CsvOptions csv;
  csv.label_column = o.csv_label_column;
  csv.header = o.csv_header == "yes" ? data::CsvHeader::yes
               : o.csv_header == "no" ? data::CsvHeader::no
                                      : data::CsvHeader::detect;
  if (o.csv_delimiter == "tab" || o.csv_delimiter == "\\t")
    csv.delimiter = '\t';
  else if (o.csv_delimiter.size() == 1 && o.csv_delimiter != "\"")
    csv.delimiter = o.csv_delimiter[0];
  else
    usage_error("--csv-delimiter '" + o.csv_delimiter + "': expected one character (or tab)");
  return csv;
}

Data load_data(const RunOptions& o, bool need_train) {
  Data d;
  std::error_code ec;
  const fs::path path = o.data;
  if (fs::is_directory(path, ec)) {
    if (!o.test_data.empty()) usage_error("--test-data applies to CSV tables only");
    if (need_train) {
      // Only the rows the run uses are converted; then they are indexed anew.
      TrainRows chosen;
      std::vector<int64_t> loaded;
      d.train = data::load_mnist_directory(path, data::Split::train, [&](const data::Dataset& labels) {
        chosen = choose_train_rows(labels, o);
        std::merge(chosen.val.begin(), chosen.val.end(), chosen.train.begin(), chosen.train.end(),
                   std::back_inserter(loaded));
        return loaded;
      });
      for (auto* rows : {&chosen.val, &chosen.train})
        for (int64_t& i : *rows)
          i = std::lower_bound(loaded.begin(), loaded.end(), i) - loaded.begin();
      take_rows(d, chosen);
    }
    data::RowChoice first_test_rows;
    if (o.limit_test > 0)
      first_test_rows = [&](const data::Dataset& labels) {
        std::vector<int64_t> rows(static_cast<size_t>(std::min(o.limit_test, labels.count())));
        std::iota(rows.begin(), rows.end(), 0);
        return rows;
      };
    d.test = data::load_mnist_directory(path, data::Split::test, first_test_rows);
  } else if (fs::is_regular_file(path, ec)) {
    data::CsvOptions csv = csv_options(o);
    data::Dataset table = data::load_csv(path, csv);
    if (!o.test_data.empty()) {
      csv.num_classes = table.num_classes;
      csv.class_names = table.class_names;
      d.test = data::load_csv(o.test_data, csv);
      d.train = std::move(table);
    } else {
      // A fixed 20% of the rows (the same whatever --seed) is the test set.
      if (table.count() < 10)
        runtime_error("--data '" + o.data + "': " + std::to_string(table.count()) +
                      " rows are too few to hold out a test set; give --test-data");
      auto order = train::epoch_order(table.count(), 0x7e57, 0);
      const auto held_out = table.count() / 5;
      d.test = subset(table, {order.begin(), order.begin() + held_out});
      if (need_train) {  // the rest, in place: no second copy of the table
        std::sort(order.begin() + held_out, order.end());
        keep_rows(table, {order.begin() + held_out, order.end()});
        d.train = std::move(table);
      }
    }
    if (need_train) take_rows(d, choose_train_rows(d.train, o));
    keep_first(d.test, o.limit_test);
  } else {
    runtime_error("--data '" + o.data + "': no such file or directory");
  }
  // Raw IDX pixels are the bytes of the file (the loader scales them to [0, 1]).
  if (o.inputs == "raw" && fs::is_directory(path, ec))
    for (data::Dataset* set : {&d.train, &d.val, &d.test})
      for (float& v : set->features) v = std::round(v * 255.0f);
  return d;
}

void check_data_fits(const nn::ModelSpec& spec, const data::Dataset& set) {
  if (spec.input_shape != set.sample_shape)
    usage_error("the model expects samples of shape " + shape_text(spec.input_shape) +
                ", the data has " + shape_text(set.sample_shape) +
                (set.sample_shape.size() == 1 ? " (for a table, use a spec starting 'input " +
                                                    std::to_string(set.sample_shape[0]) + "')"
                                              : ""));
  nn::Model model(spec);
  std::vector<int64_t> shape = spec.input_shape;
  for (const auto& layer : model.layers()) shape = layer->output_shape(shape);
  if (shape[0] < set.num_classes)
    usage_error("the model has " + std::to_string(shape[0]) + " outputs, the data " +
                std::to_string(set.num_classes) + " classes");
}

void standardize(const data::Standardizer& standardizer, data::Dataset& set) {
  if (set.count() == 0) return;
  if (standardizer.features() != set.sample_size())
    usage_error("the standardizer was fitted on " + std::to_string(standardizer.features()) +
                " features, the data has " + std::to_string(set.sample_size()));
  standardizer.transform(set.features);
}

void write_file_atomically(const fs::path& path, const std::string& text) {
  const fs::path temp = path.parent_path() / ("." + path.filename().string() + ".tmp");
  std::error_code ec;
  {
    std::ofstream out(temp, std::ios::binary | std::ios::trunc);
    out << text;
    out.flush();
    if (!out) {  // a full disk: say so, and leave no partial temporary behind
      const std::string reason = std::strerror(errno);
      out.close();
      fs::remove(temp, ec);
      runtime_error("cannot write '" + path.string() + "': " + reason + "; it is unchanged");
    }
  }
  fs::rename(temp, path, ec);
  if (ec) {
    fs::remove(temp, ec);
    runtime_error("cannot write '" + path.string() + "': " + ec.message());
  }
}

fs::path data_file(const std::string& name) {
  std::error_code ec;
  const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  if (!ec) {
    const fs::path installed = exe.parent_path().parent_path() / NORMKIT_INSTALLED_DATA_DIR / name;
    if (fs::exists(installed, ec)) return installed;
  }
  if (name == "experiments") return NORMKIT_SOURCE_EXPERIMENTS_DIR;
  return fs::path(NORMKIT_SOURCE_TOOLS_DIR) / name;
}

int spawn_process(const std::vector<std::string>& args, const fs::path& log, bool own_group) {
  std::vector<char*> argv;
  for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_adddup2(&actions, STDOUT_FILENO, STDERR_FILENO);
  posix_spawnattr_t attributes;
  posix_spawnattr_init(&attributes);
  // The child starts with no signal blocked (train::install_stop_handlers blocks two here).
  sigset_t none;
  sigemptyset(&none);
  posix_spawnattr_setsigmask(&attributes, &none);
  short flags = POSIX_SPAWN_SETSIGMASK;
  if (own_group) {
    posix_spawnattr_setpgroup(&attributes, 0);
    flags |= POSIX_SPAWN_SETPGROUP;
  }
  posix_spawnattr_setflags(&attributes, flags);
  pid_t pid = 0;
  const int spawned = posix_spawn(&pid, args[0].c_str(), &actions, &attributes, argv.data(), environ);
  posix_spawnattr_destroy(&attributes);
  posix_spawn_file_actions_destroy(&actions);
  if (spawned != 0) runtime_error("cannot run " + args[0] + ": " + std::strerror(spawned));
  return pid;
}

int wait_process(int pid) {
  int status = 0;
  while (waitpid(pid, &status, 0) < 0)
    if (errno != EINTR) return 127;
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

std::string run_python(const std::string& script_name, const std::vector<std::string>& args,
                       const fs::path& log) {
  const char* python_env = std::getenv("NORMKIT_PYTHON");
  const std::string python = python_env ? python_env : "/usr/bin/python3";
  const fs::path script = script_name == "plot_metrics.py" && std::getenv("NORMKIT_PLOT_SCRIPT")
                              ? fs::path(std::getenv("NORMKIT_PLOT_SCRIPT"))
                              : data_file(script_name);
  std::error_code ec;
  if (!fs::is_regular_file(script, ec)) return "the script " + script.string() + " is missing";
  std::vector<std::string> argv = {python, script.string()};
  argv.insert(argv.end(), args.begin(), args.end());
  int code = 0;
  try {
    code = wait_process(spawn_process(argv, log));
  } catch (const Error& e) {
    return e.what();
  }
  std::ifstream in(log);
  std::stringstream text;
  text << in.rdbuf();
  fs::remove(log, ec);
  if (code == 0) return "";
  std::string output = text.str();
  while (!output.empty() && (output.back() == '\n' || output.back() == ' ')) output.pop_back();
  if (const auto nl = output.rfind('\n'); nl != std::string::npos) output = output.substr(nl + 1);
  return fmt::format("{} {} failed{}", python, script.filename().string(),
                     output.empty() ? "" : ": " + output);
}

std::string describe_run(const RunOptions& o, const Data& data) {
  std::string optimizer = fmt::format("{} lr {:g}", o.optimizer, o.lr);
  if (o.optimizer == "sgd" && o.momentum > 0)
    optimizer += fmt::format(" momentum {:g}{}", o.momentum, o.nesterov ? " (Nesterov)" : "");
  if (o.weight_decay > 0) optimizer += fmt::format(" weight decay {:g}", o.weight_decay);
  const std::string val =
      data.val.count() > 0 ? fmt::format(" / {} validation", data.val.count()) : "";
  // A batch holds at most the whole training set.
  const std::string batch =
      data.train.count() > 0 && o.batch_size > data.train.count()
          ? fmt::format("batch {} (--batch-size {} is more than the {} training samples: one "
                        "batch per epoch)",
                        data.train.count(), o.batch_size, data.train.count())
          : fmt::format("batch {}", o.batch_size);
  return fmt::format("{}, {} train{} / {} test samples{}, {}, {}, seed {}, {}", o.model,
                     data.train.count(), val, data.test.count(),
                     o.inputs == "standardize" ? "" : " (" + o.inputs + " inputs)", optimizer, batch, o.seed,
                     o.format);
}

Data prepare_data(const RunOptions& o, data::Standardizer* standardizer, bool fit) {
  const nn::KernelWarmUp warm_up;  // on the other core while the data loads
  Data data = load_data(o);
  if (data.train.count() < 2) usage_error("training needs at least 2 samples");
  if (o.inputs != "standardize") return data;  // raw, scaled: the standardizer stays unfitted
  if (fit) standardizer->fit(data.train.features, data.train.sample_size());
  for (data::Dataset* set : {&data.train, &data.val, &data.test}) standardize(*standardizer, *set);
  return data;
}

json application_json(const io::Checkpoint& c) {
  if (c.progress.application.empty()) return nullptr;
  try {
    return json::parse(c.progress.application);
  } catch (const json::exception&) {
    return nullptr;
  }
}

RunOptions run_options_of(const json& app) {
  if (app.is_object() && app.contains("options")) return run_options_from_json(app["options"]);
  return {};
}

std::vector<std::string> class_names_of(const json& app) {
  std::vector<std::string> names;
  if (app.is_object() && app.contains("classes") && app["classes"].is_array())
    for (const auto& name : app["classes"])
      if (name.is_string()) names.push_back(name.get<std::string>());
  return names;
}

// ---------------------------------------------------------------- a run

namespace {

std::map<std::string, double> optimizer_options(const RunOptions& o) {
  if (o.optimizer == "adam") return {{"lr", o.lr}, {"weight_decay", o.weight_decay}};
  return {{"lr", o.lr},
          {"momentum", o.momentum},
          {"weight_decay", o.weight_decay},
          {"nesterov", o.nesterov ? 1.0 : 0.0}};
}

nn::InitOptions init_options(const RunOptions& o) {
  nn::InitOptions init;
  init.kind = o.init == "xavier" ? nn::Init::xavier : o.init == "normal" ? nn::Init::normal : nn::Init::he;
  init.normal_std = static_cast<float>(o.init_std);
  return init;
}

}  // namespace

Run Run::start(const RunOptions& options, const std::string& name, const fs::path& out,
               const std::string& norm, const data::Standardizer& standardizer,
               const data::Dataset& train, bool overwrite) {
  Run run;
  run.options_ = options;
  run.options_.norm = norm;
  run.name_ = name;
  run.norm_ = norm;
  run.out_ = out;
  run.standardizer_ = standardizer;
  run.class_names_ = train.class_names;
  std::error_code ec;
  if (fs::exists(run.checkpoint_path(), ec) && !overwrite)
    usage_error("'" + out.string() + "' already holds a run (" + run.checkpoint_path().string() +
                "): pass --resume to continue it or --overwrite to start over");
  const nn::ModelSpec spec = resolve_spec(options, norm, train);
  run.model_ = std::make_unique<nn::Model>(
      spec, options.format == "nchw" ? nn::MemoryFormat::channels_first : nn::MemoryFormat::channels_last);
  run.model_->initialize(init_options(options), options.seed);
  run.optimizer_ = io::make_optimizer(options.optimizer, optimizer_options(options),
                                      run.model_->parameters());
  if (!writes_files()) return run;
  fs::create_directories(out, ec);
  if (ec) runtime_error("cannot create '" + out.string() + "': " + ec.message());
  fs::remove(run.checkpoint_path(), ec);  // --overwrite: the old run is gone
  fs::remove(out / "run.json", ec);
  run.rewrite_metrics();
  run.rewrite_steps(0);
  return run;
}

Run Run::resume(const fs::path& out) {
  Run run;
  run.out_ = out;
  std::error_code ec;
  if (!fs::exists(run.checkpoint_path(), ec))
    runtime_error("--resume: there is no checkpoint to resume in '" + out.string() + "' (" +
                  run.checkpoint_path().string() + " does not exist)");
  const io::Checkpoint checkpoint = io::load_checkpoint(run.checkpoint_path());
  try {
    const json app = json::parse(checkpoint.progress.application);
    run.options_ = run_options_from_json(app.at("options"));
    run.name_ = app.at("name").get<std::string>();
    run.norm_ = app.at("norm").get<std::string>();
    run.history_ = app.at("history");
    run.class_names_ = class_names_of(app);
    run.initial_loss_ = app.value("initial_loss", -1.0);
    if (!run.history_.is_array()) throw std::runtime_error("history is not a list");
    if (app.contains("window")) {
      const json& w = app["window"];
      run.window_ = {w.at("loss").get<double>(), w.at("correct").get<int64_t>(), w.at("samples").get<int64_t>()};
    }
  } catch (const std::exception& e) {
    runtime_error("checkpoint '" + run.checkpoint_path().string() +
                  "' was not written by `normkit train` (its run description: " + e.what() + ")");
  }
  run.standardizer_ = checkpoint.standardizer;
  run.model_ = io::build_model(checkpoint);
  run.optimizer_ = io::build_optimizer(checkpoint, *run.model_);
  if (!run.optimizer_) runtime_error("checkpoint '" + run.checkpoint_path().string() + "' holds no optimizer state");
  run.epochs_done_ = checkpoint.progress.epochs_done;
  run.position_ = checkpoint.progress.position;
  if (static_cast<int64_t>(run.history_.size()) != run.epochs_done_)
    runtime_error("checkpoint '" + run.checkpoint_path().string() + "': its metrics cover " +
                  std::to_string(run.history_.size()) + " epochs, not " +
                  std::to_string(run.epochs_done_));
  // metrics.jsonl may be missing its last line (a crash between saving the
  // checkpoint and appending) or hold lines of a later, lost epoch: the
  // checkpoint's copy is the truth. steps.jsonl keeps the steps it covers.
  if (writes_files()) {
    run.rewrite_metrics();
    const int64_t steps_before =
        run.history_.empty() ? 0 : run.history_.back().value("steps", int64_t{0});
    run.rewrite_steps(steps_before + run.position_.step);
    fs::remove(out / "run.json", ec);
    // What a save cut short by a crash left next to the checkpoint.
    io::remove_stale_temporaries(run.checkpoint_path());
  }
  return run;
}

json Run::evaluate_sets(const Data& data, bool with_val, bool with_test) {
  json m = json::object();
  auto add = [&](const char* name, const data::Dataset& set) {
    const train::Evaluation e = train::evaluate(*model_, set, train::kEvaluationBatch, process_group());
    m[std::string(name) + "_loss"] = e.loss;
    m[std::string(name) + "_acc"] = e.accuracy;
  };
  if (with_val && data.val.count() > 0) add("val", data.val);
  if (with_test) add("test", data.test);
  return m;
}

namespace {

// The probe batch: the first probe_samples of the validation set, or of the
// training set without one (never the test set), in the model's format.
struct ProbeBatch {
  nn::Tensor batch;
  std::vector<int32_t> labels;
};
ProbeBatch probe_batch(const Data& data, const RunOptions& o, nn::MemoryFormat format) {
  const data::Dataset& set = data.val.count() > 0 ? data.val : data.train;
  const int64_t n = std::min<int64_t>(o.probe_samples, set.count());
  std::vector<int64_t> order(static_cast<size_t>(n));
  std::iota(order.begin(), order.end(), 0);
  ProbeBatch p;
  train::make_batch(set, order, 0, n, format, p.batch, p.labels);
  return p;
}

json probe_json(const probe::Result& r) {
  json out = {{"loss", r.loss}, {"acc", r.accuracy}};
  json acts = json::array(), norms = json::array(), weights = json::array();
  for (const auto& a : r.activations)
    acts.push_back({{"layer", a.layer}, {"type", a.type}, {"units", a.units},
                    {"input_mean", a.input_mean}, {"input_std", a.input_std},
                    {"percentiles", a.percentiles}, {"output_mean", a.output_mean},
                    {"dead_fraction", a.dead_fraction}});
  for (const auto& n : r.norms)
    norms.push_back({{"layer", n.layer}, {"type", n.type}, {"batch_mean_abs", n.batch_mean_abs},
                     {"batch_var", n.batch_var}, {"running_mean_abs", n.running_mean_abs},
                     {"running_var", n.running_var}, {"gamma", n.gamma}, {"beta", n.beta}});
  for (const auto& w : r.weights) {
    json item = {{"layer", w.layer}, {"type", w.type}, {"grad_norm", w.grad_norm},
                 {"weight_norm", w.weight_norm}};
    if (w.ics_distance >= 0) {
      item["ics_distance"] = w.ics_distance;
      item["ics_cosine"] = w.ics_cosine;
    }
    weights.push_back(item);
  }
  out["activations"] = acts;
  out["norms"] = norms;
  out["weights"] = weights;
  return out;
}

double sum_seconds(const json& history) {
  double total = 0;
  for (const auto& m : history) total += m.value("seconds", 0.0);
  return total;
}

}  // namespace

EpochRecord Run::train_epoch(const Data& data, Progress* progress) {
  const int64_t epoch = epochs_done_;  // 0-based
  const RunOptions& o = options_;
  const int64_t steps = train::steps_per_epoch(data.train.count(), o.batch_size,
                                               process_group() ? process_group()->size() : 1);
  const int64_t first_step = epoch * steps;  // global steps done before this epoch
  const bool test_each_epoch = o.test_eval == "epoch";
  const std::set<int64_t> probe_at = probe_steps(o);
  const bool logging = o.log_every > 0 || o.eval_every > 0 || o.probe_every > 0 || !probe_at.empty();
  std::optional<ProbeBatch> probe_data;
  probe::Options probe_options;
  probe_options.units = o.probe_units;
  probe_options.ics = o.probe_ics;
  std::ofstream steps_file;
  if (logging && writes_files()) {
    steps_file.open(out_ / "steps.jsonl", std::ios::app);
    if (!steps_file) runtime_error("cannot append to '" + (out_ / "steps.jsonl").string() + "'");
  }
  const auto start = std::chrono::steady_clock::now();
  double overhead = 0;  // seconds spent logging, evaluating and probing, not training
  const double seconds_before = sum_seconds(history_) + position_.seconds;
  double& window_loss = window_.loss;
  int64_t &window_correct = window_.correct, &window_samples = window_.samples;
  // One line of steps.jsonl at global step `step`, with what is due there.
  auto log_step = [&](int64_t step, bool train_window) {
    const bool eval_due = o.eval_every > 0 && step % o.eval_every == 0;
    const bool probe_due = (o.probe_every > 0 && step % o.probe_every == 0) || probe_at.contains(step);
    const bool log_due = train_window && o.log_every > 0 && step % o.log_every == 0;
    if (!eval_due && !probe_due && !log_due) return;
    const auto t0 = std::chrono::steady_clock::now();
    json line = {{"step", step},
                 {"epoch", static_cast<double>(step) / static_cast<double>(steps)},
                 {"lr", learning_rate_at(o, std::max<int64_t>(step - 1, 0), steps)},  // the last step's
                 {"seconds", seconds_before +
                                 std::chrono::duration<double>(t0 - start).count() - overhead}};
    if (train_window && window_samples > 0) {
      line["train_loss"] = window_loss / static_cast<double>(window_samples);
      line["train_acc"] = static_cast<double>(window_correct) / static_cast<double>(window_samples);
    }
    if (eval_due) line.update(evaluate_sets(data, true, test_each_epoch));
    if (probe_due) {
      probe_options.ics_lr = learning_rate_at(o, step, steps);  // the next step's
      if (!probe_data) probe_data = probe_batch(data, o, model_->format());
      line["probe"] = probe_json(probe::run(*model_, probe_data->batch, probe_data->labels, probe_options));
    }
    if (writes_files()) {  // every rank evaluates (a collective); rank 0 writes
      steps_file << line.dump() << '\n';
      steps_file.flush();
      if (!steps_file) runtime_error("cannot append to '" + (out_ / "steps.jsonl").string() + "'");
    }
    if (log_due) window_loss = 0, window_correct = 0, window_samples = 0;
    overhead += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  };
  if (epoch == 0 && position_.step == 0 && logging) log_step(0, false);
  train::ProgressCallback callback = [&](const train::StepProgress& p) {
    if (initial_loss_ < 0) initial_loss_ = p.batch_loss;
    // The next step's rate (warm-up changes it every step); after the epoch's
    // last, the optimizer keeps that step's (the next epoch's is set before it:
    // a cosine schedule's rate at epochs/epochs is 0, which no optimizer accepts).
    if (p.step < p.steps)
      optimizer_->learning_rate = static_cast<float>(learning_rate_at(o, first_step + p.step, steps));
    if (progress) progress->update(epoch + 1, o.epochs, p);
    if (!logging) return;
    window_loss += p.batch_loss * static_cast<double>(p.batch_size);
    window_correct += p.batch_correct;
    window_samples += p.batch_size;
    log_step(first_step + p.step, true);
  };
  // The spec records frozen=1, so a resumed run stays frozen.
  if (o.freeze_bn_after > 0 && epoch >= o.freeze_bn_after) model_->freeze_batch_norm();
  train::EpochResult result;
  optimizer_->learning_rate = static_cast<float>(learning_rate_at(o, first_step + position_.step, steps));
  try {
    result = train::train_epoch(*model_, *optimizer_, data.train, o.batch_size, o.seed, epoch,
                                callback, position_, process_group());
  } catch (const Error& e) {
    if (progress) progress->clear();
    if (e.kind() != ErrorKind::runtime) throw;
    // The model is partly updated: it is not saved, the run stops here.
    // train_epoch names the step of a non-finite loss; other failures (a layer
    // refusing non-finite activations) get at least the epoch.
    stop_reason_ = e.what();
    if (stop_reason_.find("at epoch") == std::string::npos)
      stop_reason_ = "training stopped in epoch " + std::to_string(epoch + 1) + ": " + stop_reason_;
    divergence_ = {{"epoch", epoch + 1}, {"reason", stop_reason_}};
    return {{}, false, stop_reason_};
  }
  if (progress) progress->clear();
  if (result.interrupted) {
    const train::EpochPosition before = position_;
    position_ = result.position;
    try {
      if (writes_files()) save_checkpoint();
    } catch (...) {
      position_ = before;
      throw;
    }
    // Every rank stopped after the same step; they leave together once rank 0 has saved.
    if (auto* group = process_group())
      dist::check_same(*group, static_cast<uint64_t>(position_.step),
                       "the step after which the run stopped");
    return {{}, true, "", train::stop_signal()};
  }
  position_ = {};
  window_ = {};
  const auto eval_start = std::chrono::steady_clock::now();
  json evaluation = evaluate_sets(data, true, test_each_epoch);
  // The run's last epoch: --epochs reached, or --early-stop ends the run here
  // (by this epoch's validation loss); --test-eval end evaluates the test set there.
  std::vector<double> losses = val_losses();
  if (evaluation.contains("val_loss")) losses.push_back(evaluation["val_loss"].get<double>());
  const bool last = epoch + 1 >= o.epochs || patience_over(losses, o.early_stop);
  const bool with_test = test_each_epoch || (o.test_eval == "end" && last);
  if (with_test && !test_each_epoch) evaluation.update(evaluate_sets(data, false, true));
  if (!o.eval_bn_stats.empty())
    evaluation["bn_stats"] =
        evaluate_statistics_sources(*model_, eval_bn_stats_sources(o), data, with_test, o.seed);
  const double eval_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - eval_start).count();
  const double seconds = std::max(result.seconds - overhead, 0.0);
  json m = {{"run", name_},
            {"epoch", epoch + 1},
            {"steps", first_step + steps},
            {"train_loss", result.loss},
            {"train_acc", result.accuracy}};
  m.update(evaluation);
  m.update(json{{"seconds", seconds},
                {"eval_seconds", eval_seconds},
                {"samples_per_second", static_cast<double>(result.samples) / std::max(seconds, 1e-9)},
                {"train_samples", result.samples},
                {"val_samples", data.val.count()},
                {"test_samples", data.test.count()},
                {"norm", norm_},
                {"model", o.model},
                {"optimizer", o.optimizer},
                {"lr", learning_rate_at(o, first_step + steps - 1, steps)},  // its last step's
                {"batch_size", o.batch_size},
                {"seed", o.seed},
                {"ranks", process_group() ? process_group()->size() : 1}});
  ++epochs_done_;
  history_.push_back(m);
  if (writes_files()) {
    try {
      save_checkpoint();
      if (o.keep == "best" && best_epoch() == epochs_done_) {
        // A copy of the checkpoint just written (whole: it was renamed into place),
        // renamed into place in turn.
        const fs::path temporary = best_checkpoint_path().string() + ".tmp";
        fs::copy_file(checkpoint_path(), temporary, fs::copy_options::overwrite_existing);
        fs::rename(temporary, best_checkpoint_path());
      }
    } catch (...) {
      --epochs_done_;
      history_.erase(history_.end() - 1);
      throw;
    }
    std::ofstream metrics(out_ / "metrics.jsonl", std::ios::app);
    metrics << m.dump() << '\n';
    metrics.flush();
    if (!metrics) runtime_error("cannot append to '" + (out_ / "metrics.jsonl").string() + "'");
  }
  if (o.diverge_factor > 0 && !(result.loss <= o.diverge_factor * initial_loss_)) {
    stop_reason_ = fmt::format(
        "training diverged in epoch {}: its mean loss {:.4g} exceeds {:g} × the first step's loss "
        "{:.4g} (--diverge-factor)",
        epoch + 1, result.loss, o.diverge_factor, initial_loss_);
    divergence_ = {{"epoch", epoch + 1}, {"loss", result.loss}, {"reason", stop_reason_}};
    return {m, false, stop_reason_};
  }
  return {m, true, ""};
}

std::vector<double> Run::val_losses() const {
  std::vector<double> losses;
  for (const json& m : history_)
    if (m.contains("val_loss")) losses.push_back(m["val_loss"].get<double>());
  return losses;
}

int64_t Run::best_epoch() const { return lowest_epoch(val_losses()); }

bool Run::stopped_early() const { return patience_over(val_losses(), options_.early_stop); }

void Run::write_outcome() const {
  if (!writes_files()) return;
  const json out = {{"status", divergence_.is_null() ? "finished" : "diverged"},
                    {"stopped_early", stopped_early()},
                    {"best_epoch", best_epoch()},
                    {"run", name_},
                    {"epochs_done", epochs_done_},
                    {"epochs", options_.epochs},
                    {"steps_done", history_.empty() ? 0 : history_.back().value("steps", int64_t{0})},
                    {"seconds", sum_seconds(history_)},
                    {"initial_loss", initial_loss_},
                    {"divergence", divergence_},
                    {"last", history_.empty() ? json(nullptr) : history_.back()}};
  write_file_atomically(out_ / "run.json", out.dump(2) + "\n");
}

void Run::save_checkpoint() const {
  io::TrainingProgress progress;
  progress.epochs_done = epochs_done_;
  progress.seed = options_.seed;
  progress.batch_size = options_.batch_size;
  progress.position = position_;
  json app = {{"name", name_},
              {"norm", norm_},
              {"options", to_json(options_)},
              {"history", history_},
              {"initial_loss", initial_loss_}};
  if (!class_names_.empty()) app["classes"] = class_names_;
  if (position_.step > 0)
    app["window"] = {{"loss", window_.loss}, {"correct", window_.correct}, {"samples", window_.samples}};
  progress.application = app.dump();
  io::save_checkpoint(checkpoint_path(),
                      io::make_checkpoint(*model_, optimizer_.get(), standardizer_, std::move(progress)));
}

void Run::rewrite_metrics() const {
  std::string text;
  for (const auto& m : history_) text += m.dump() + "\n";
  write_file_atomically(out_ / "metrics.jsonl", text);
}

void Run::rewrite_steps(int64_t steps_done) const {
  // Keeps the lines of the steps the checkpoint covers (a crash can leave a
  // cut line or lines of a lost epoch); a fresh run starts without the file.
  const fs::path path = out_ / "steps.jsonl";
  std::error_code ec;
  if (steps_done == 0 || !fs::exists(path, ec)) {
    fs::remove(path, ec);
    return;
  }
  std::ifstream in(path);
  std::string text, line;
  while (std::getline(in, line)) {
    json j = json::parse(line, nullptr, false);
    if (j.is_discarded() || !j.is_object() || !j.contains("step")) continue;
    if (j["step"].get<int64_t>() <= steps_done) text += line + "\n";
  }
  write_file_atomically(path, text);
}

}  // namespace normkit::cli
