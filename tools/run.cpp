// Run options, data loading and one training run (checkpoint + metrics) for the
// `normkit` command.
#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <numeric>
#include <sstream>

#include <fmt/format.h>

#include "cli.hpp"
#include "normkit/threading.hpp"

namespace normkit::cli {

void usage_error(const std::string& message) { throw Error(ErrorKind::invalid_argument, message); }
void runtime_error(const std::string& message) { throw Error(ErrorKind::runtime, message); }

// ---------------------------------------------------------------- options

double learning_rate_at(const RunOptions& o, int64_t epoch) {
  if (o.lr_schedule != "cosine") return o.lr;
  const double pi = 3.14159265358979323846;
  return o.lr * 0.5 * (1.0 + std::cos(pi * static_cast<double>(epoch) / static_cast<double>(o.epochs)));
}

json to_json(const RunOptions& o) {
  return {{"model", o.model},
          {"norm", o.norm},
          {"epochs", o.epochs},
          {"batch_size", o.batch_size},
          {"lr", o.lr},
          {"lr_schedule", o.lr_schedule},
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
          {"threads", o.threads}};
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
  } catch (const json::exception& e) {
    runtime_error(std::string("bad run options: ") + e.what());
  }
  return o;
}

RunOptions merge_resume_options(const RunOptions& stored, const RunOptions& given,
                                const GivenOptions& given_keys) {
  const json old_values = to_json(stored), new_values = to_json(given);
  for (const auto& key : given_keys) {
    if (key == "epochs" || key == "threads" || key == "data" || key == "test_data") continue;
    if (!old_values.contains(key) || old_values[key] == new_values[key]) continue;
    std::string option = "--" + key;
    std::replace(option.begin(), option.end(), '_', '-');
    usage_error(option + " " + new_values[key].dump() + " differs from the checkpoint's " +
                old_values[key].dump() +
                ": a resumed run keeps its settings (only --epochs, --threads and --data may change)");
  }
  RunOptions merged = stored;
  if (given_keys.contains("epochs")) merged.epochs = given.epochs;
  if (given_keys.contains("threads")) merged.threads = given.threads;
  if (given_keys.contains("data")) merged.data = given.data;
  if (given_keys.contains("test_data")) merged.test_data = given.test_data;
  return merged;
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
  if (given.contains("init_std") && o.init != "normal")
    usage_error("--init-std applies to --init normal only");
  return o;
}

void apply_threads(int threads) {
  if (threads <= 0) return;
  set_num_threads(threads);
  omp_set_num_threads(threads);  // oneDNN's sgemm runs on OpenMP
}

namespace {

// A spec file is the text format of ModelSpec::parse, or JSON:
//   {"input": [1, 28, 28],
//    "layers": ["conv 32 3 pad=1 bias=0", {"type": "batchnorm", "options": {"momentum": 0.1}}, ...]}
// where a layer is a line of the text format or an object {type, args, options},
// and a residual block {"type": "residual", "body": [layers], "shortcut": [layers]}
// (docs/model-spec.md).
std::string word_of(const json& v) { return v.is_string() ? v.get<std::string>() : v.dump(); }

void append_layers(std::string& text, const json& layers) {
  if (!layers.is_array()) usage_error("JSON spec: \"layers\", \"body\" and \"shortcut\" must be lists");
  for (const auto& layer : layers) {
    text += "\n";
    if (layer.is_string()) {
      text += layer.get<std::string>();
      continue;
    }
    text += layer.at("type").get<std::string>();
    for (const auto& a : layer.value("args", json::array())) text += " " + word_of(a);
    const json options = layer.value("options", json::object());
    for (const auto& [key, value] : options.items()) text += " " + key + "=" + word_of(value);
    if (layer.contains("body") || layer.contains("shortcut")) {
      append_layers(text, layer.value("body", json::array()));
      if (layer.contains("shortcut")) {
        text += "\nshortcut";
        append_layers(text, layer.at("shortcut"));
      }
      text += "\nend";
    }
  }
}

std::string spec_text_of(const std::string& file) {
  const auto first = file.find_first_not_of(" \t\r\n");
  if (first == std::string::npos || file[first] != '{') return file;
  json j;
  try {
    j = json::parse(file);
  } catch (const json::exception& e) {
    usage_error(std::string("not valid JSON: ") + e.what());
  }
  std::string text = "input";
  try {
    for (const auto& d : j.at("input")) text += " " + word_of(d);
    append_layers(text, j.at("layers"));
  } catch (const json::exception& e) {
    usage_error(std::string("JSON spec: expected {\"input\": [...], \"layers\": [...]}: ") + e.what());
  }
  return text;
}

}  // namespace

nn::ModelSpec resolve_spec(const RunOptions& options, const std::string& norm) {
  nn::ModelSpec spec;
  if (options.model == "mlp-paper" || options.model == "cnn-small") {
    spec = nn::ModelSpec::preset(options.model);
  } else {
    std::error_code ec;
    if (!fs::is_regular_file(options.model, ec))
      usage_error("--model '" + options.model +
                  "' is neither a preset (mlp-paper, cnn-small) nor a model spec file");
    std::ifstream in(options.model);
    std::stringstream text;
    text << in.rdbuf();
    if (!in) runtime_error("--model '" + options.model + "': cannot read the file");
    try {
      spec = nn::ModelSpec::parse(spec_text_of(text.str()));
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
          "at all); train with batch norm, and freeze the statistics of a trained model",
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
    if (need_train) d.train = data::load_mnist_directory(path, data::Split::train);
    d.test = data::load_mnist_directory(path, data::Split::test);
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
      const auto order = train::epoch_order(table.count(), 0x7e57, 0);
      const auto held_out = table.count() / 5;
      d.test = subset(table, {order.begin(), order.begin() + held_out});
      if (need_train) d.train = subset(table, {order.begin() + held_out, order.end()});
    }
  } else {
    runtime_error("--data '" + o.data + "': no such file or directory");
  }
  keep_first(d.train, o.limit_train);
  keep_first(d.test, o.limit_test);
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
  {
    std::ofstream out(temp, std::ios::binary | std::ios::trunc);
    out << text;
    out.flush();
    if (!out) runtime_error("cannot write '" + temp.string() + "'");
  }
  std::error_code ec;
  fs::rename(temp, path, ec);
  if (ec) {
    fs::remove(temp, ec);
    runtime_error("cannot write '" + path.string() + "': " + ec.message());
  }
}

std::string describe_run(const RunOptions& o, const Data& data) {
  std::string optimizer = fmt::format("{} lr {:g}", o.optimizer, o.lr);
  if (o.optimizer == "sgd" && o.momentum > 0)
    optimizer += fmt::format(" momentum {:g}{}", o.momentum, o.nesterov ? " (Nesterov)" : "");
  if (o.weight_decay > 0) optimizer += fmt::format(" weight decay {:g}", o.weight_decay);
  // A batch holds at most the whole training set.
  const std::string batch =
      data.train.count() > 0 && o.batch_size > data.train.count()
          ? fmt::format("batch {} (--batch-size {} is more than the {} training samples: one "
                        "batch per epoch)",
                        data.train.count(), o.batch_size, data.train.count())
          : fmt::format("batch {}", o.batch_size);
  return fmt::format("{}, {} train / {} test samples, {}, {}, seed {}, {}", o.model,
                     data.train.count(), data.test.count(), optimizer, batch, o.seed, o.format);
}

Data prepare_data(const RunOptions& o, data::Standardizer* standardizer, bool fit) {
  Data data = load_data(o);
  if (data.train.count() < 2) usage_error("training needs at least 2 samples");
  if (fit) standardizer->fit(data.train.features, data.train.sample_size());
  standardize(*standardizer, data.train);
  standardize(*standardizer, data.test);
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
               const std::string& norm, const data::Standardizer& standardizer, bool overwrite) {
  Run run;
  run.options_ = options;
  run.options_.norm = norm;
  run.name_ = name;
  run.norm_ = norm;
  run.out_ = out;
  run.standardizer_ = standardizer;
  std::error_code ec;
  if (fs::exists(run.checkpoint_path(), ec) && !overwrite)
    usage_error("'" + out.string() + "' already holds a run (" + run.checkpoint_path().string() +
                "): pass --resume to continue it or --overwrite to start over");
  const nn::ModelSpec spec = resolve_spec(options, norm);
  run.model_ = std::make_unique<nn::Model>(
      spec, options.format == "nchw" ? nn::MemoryFormat::channels_first : nn::MemoryFormat::channels_last);
  run.model_->initialize(init_options(options), options.seed);
  run.optimizer_ = io::make_optimizer(options.optimizer, optimizer_options(options),
                                      run.model_->parameters());
  fs::create_directories(out, ec);
  if (ec) runtime_error("cannot create '" + out.string() + "': " + ec.message());
  fs::remove(run.checkpoint_path(), ec);  // --overwrite: the old run is gone
  run.rewrite_metrics();
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
    if (!run.history_.is_array()) throw std::runtime_error("history is not a list");
  } catch (const std::exception& e) {
    runtime_error("checkpoint '" + run.checkpoint_path().string() +
                  "' was not written by `normkit train` (its run description: " + e.what() + ")");
  }
  run.standardizer_ = checkpoint.standardizer;
  run.model_ = io::build_model(checkpoint);
  run.optimizer_ = io::build_optimizer(checkpoint, *run.model_);
  if (!run.optimizer_) runtime_error("checkpoint '" + run.checkpoint_path().string() + "' holds no optimizer state");
  run.epochs_done_ = checkpoint.progress.epochs_done;
  if (static_cast<int64_t>(run.history_.size()) != run.epochs_done_)
    runtime_error("checkpoint '" + run.checkpoint_path().string() + "': its metrics cover " +
                  std::to_string(run.history_.size()) + " epochs, not " +
                  std::to_string(run.epochs_done_));
  // metrics.jsonl may be missing its last line (a crash between saving the
  // checkpoint and appending) or hold lines of a later, lost epoch: the
  // checkpoint's copy is the truth.
  run.rewrite_metrics();
  return run;
}

EpochRecord Run::train_epoch(const Data& data, Progress* progress) {
  const int64_t epoch = epochs_done_;  // 0-based
  train::ProgressCallback callback;
  if (progress)
    callback = [&](const train::StepProgress& p) { progress->update(epoch + 1, options_.epochs, p); };
  train::EpochResult result;
  optimizer_->learning_rate = static_cast<float>(learning_rate_at(options_, epoch));
  try {
    result = train::train_epoch(*model_, *optimizer_, data.train, options_.batch_size,
                                options_.seed, epoch, callback);
  } catch (const Error& e) {
    if (progress) progress->clear();
    if (e.kind() != ErrorKind::runtime) throw;
    // The model is partly updated: it is not saved, the run stops here.
    // train_epoch names the step of a non-finite loss; other failures (a layer
    // refusing non-finite activations) get at least the epoch.
    stop_reason_ = e.what();
    if (stop_reason_.find("at epoch") == std::string::npos)
      stop_reason_ = "training stopped in epoch " + std::to_string(epoch + 1) + ": " + stop_reason_;
    return {{}, false, stop_reason_};
  }
  if (progress) progress->clear();
  const auto eval_start = std::chrono::steady_clock::now();
  const train::Evaluation evaluation = train::evaluate(*model_, data.test);
  const double eval_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - eval_start).count();
  json m = {{"run", name_},
            {"epoch", epoch + 1},
            {"train_loss", result.loss},
            {"train_acc", result.accuracy},
            {"test_loss", evaluation.loss},
            {"test_acc", evaluation.accuracy},
            {"seconds", result.seconds},
            {"eval_seconds", eval_seconds},
            {"samples_per_second", static_cast<double>(result.samples) / std::max(result.seconds, 1e-9)},
            {"train_samples", result.samples},
            {"test_samples", data.test.count()},
            {"norm", norm_},
            {"model", options_.model},
            {"optimizer", options_.optimizer},
            {"lr", learning_rate_at(options_, epoch)},
            {"batch_size", options_.batch_size},
            {"seed", options_.seed}};
  ++epochs_done_;
  history_.push_back(m);
  try {
    save_checkpoint();
  } catch (...) {
    --epochs_done_;
    history_.erase(history_.end() - 1);
    throw;
  }
  std::ofstream metrics(out_ / "metrics.jsonl", std::ios::app);
  metrics << m.dump() << '\n';
  metrics.flush();
  if (!metrics) runtime_error("cannot append to '" + (out_ / "metrics.jsonl").string() + "'");
  return {m, true, ""};
}

void Run::save_checkpoint() const {
  io::TrainingProgress progress;
  progress.epochs_done = epochs_done_;
  progress.seed = options_.seed;
  progress.batch_size = options_.batch_size;
  json app = {{"name", name_}, {"norm", norm_}, {"options", to_json(options_)}, {"history", history_}};
  if (!class_names_.empty()) app["classes"] = class_names_;
  progress.application = app.dump();
  io::save_checkpoint(checkpoint_path(),
                      io::make_checkpoint(*model_, optimizer_.get(), standardizer_, std::move(progress)));
}

void Run::rewrite_metrics() const {
  std::string text;
  for (const auto& m : history_) text += m.dump() + "\n";
  write_file_atomically(out_ / "metrics.jsonl", text);
}

}  // namespace normkit::cli
