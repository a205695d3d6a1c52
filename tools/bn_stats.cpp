// BN's statistics at inference, from the command line (normkit/engine/bn_stats.hpp):
//   normkit recalibrate CKPT --samples N --out F   precise BN: population statistics
//                                                  over N training samples
//   normkit adapt CKPT --data D --samples N --out F the same on unlabeled samples of
//                                                  other (shifted) data
//   normkit shift --data DIR --shift noise:0.2 --out DIR2   a shifted copy of an IDX set
// and the statistics sources of `normkit eval --bn-stats` and `train --eval-bn-stats`.
// The checkpoints written keep everything of the original but the batch-norm
// layers' running statistics, and say where those came from.
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <iostream>

#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include "cli.hpp"
#include "normkit/engine/bn_stats.hpp"
#include "normkit/engine/shift.hpp"

namespace normkit::cli {

// ---------------------------------------------------------------- statistics sources

StatsSource parse_stats_source(const std::string& text) {
  StatsSource s;
  s.text = text;
  std::vector<std::string> parts;
  for (size_t start = 0;;) {
    const size_t colon = text.find(':', start);
    parts.push_back(text.substr(start, colon - start));
    if (colon == std::string::npos) break;
    start = colon + 1;
  }
  auto number = [&](const std::string& part, int64_t least) {
    const auto v = whole_number(part);
    if (!v || *v < least)
      usage_error("--bn-stats '" + text + "': '" + part + "' should be a whole number >= " + std::to_string(least));
    return *v;
  };
  const std::string& kind = parts[0];
  if (kind == "running" && parts.size() == 1) {
    s.kind = StatsSource::Kind::running;
  } else if (kind == "precise" && (parts.size() == 2 || parts.size() == 3)) {
    s.kind = StatsSource::Kind::precise;
    s.samples = number(parts[1], 1);
    if (parts.size() == 3) s.batch_size = number(parts[2], 2);
  } else if (kind == "adapt" && parts.size() == 2) {
    s.kind = StatsSource::Kind::adapt;
    s.samples = number(parts[1], 1);
  } else if (kind == "batch" && parts.size() == 2) {
    s.kind = StatsSource::Kind::batch;
    s.batch_size = number(parts[1], 2);
  } else {
    usage_error("--bn-stats '" + text + "': expected running, precise:N, precise:N:B, adapt:N or batch:B");
  }
  return s;
}

train::Evaluation evaluate_with(nn::Model& model, const data::Dataset& test, const StatsSource& s,
                                const data::Dataset* train, uint64_t seed) {
  using Kind = StatsSource::Kind;
  if (s.kind == Kind::running) return train::evaluate(model, test);
  if (s.kind == Kind::batch) return bn_stats::evaluate_batch_statistics(model, test, s.batch_size, seed);
  const data::Dataset* source = s.kind == Kind::adapt ? &test : train;
  if (!source || source->count() == 0) usage_error("--bn-stats " + s.text + ": no training data to estimate on");
  if (s.samples > source->count())
    usage_error(fmt::format("--bn-stats {}: the {} set has only {} samples", s.text,
                            s.kind == Kind::adapt ? "evaluated" : "training", source->count()));
  bn_stats::PreciseOptions o;
  o.samples = s.samples;
  o.seed = seed;
  if (s.batch_size > 0) {
    o.pass = bn_stats::Pass::train;
    o.batch_size = s.batch_size;
  }
  bn_stats::SavedStatistics saved(model);  // the trained statistics come back afterwards
  bn_stats::recalibrate(model, *source, o);
  return train::evaluate(model, test);
}

json evaluate_statistics_sources(nn::Model& model, const std::vector<StatsSource>& sources,
                                 const Data& data, bool with_test, uint64_t seed) {
  json out = json::object();
  for (const auto& s : sources) {
    json m = json::object();
    for (const auto& [name, set] : {std::pair<const char*, const data::Dataset*>{"val", &data.val},
                                    {"test", &data.test}}) {
      if (set->count() == 0 || (std::string(name) == "test" && !with_test)) continue;
      const train::Evaluation e = evaluate_with(model, *set, s, &data.train, seed);
      m[std::string(name) + "_loss"] = e.loss;
      m[std::string(name) + "_acc"] = e.accuracy;
    }
    out[s.text] = m;
  }
  return out;
}

// ---------------------------------------------------------------- shifts

float pixel_max(const RunOptions& o) {
  std::error_code ec;
  return o.inputs == "raw" && fs::is_directory(o.data, ec) ? 255.0f : 1.0f;
}

data::Shift parse_shift(const std::string& text) {
  try {
    return data::Shift::parse(text);
  } catch (const Error& e) {
    usage_error(std::string("--shift: ") + e.what());
  }
}

namespace {
void shift_samples(data::Dataset& set, const data::Shift& shift, uint64_t seed, const RunOptions& o) {
  if (shift.kind == data::Shift::Kind::none) return;
  try {
    data::apply_shift(set, shift, seed, pixel_max(o));
  } catch (const Error& e) {
    usage_error("--shift " + shift.to_string() + ": " + e.what());
  }
}
}  // namespace

int command_eval_statistics(const fs::path& checkpoint_path, const io::Checkpoint& checkpoint,
                            const RunOptions& run, const RunOptions& evaluated, const data::Dataset& test,
                            const std::vector<std::string>& source_texts,
                            const std::vector<std::string>& shift_texts, uint64_t seed, bool as_json) {
  std::vector<StatsSource> sources;
  for (const auto& t : source_texts.empty() ? std::vector<std::string>{"running"} : source_texts)
    sources.push_back(parse_stats_source(t));
  std::vector<data::Shift> shifts;
  for (const auto& t : shift_texts.empty() ? std::vector<std::string>{"none"} : shift_texts)
    shifts.push_back(parse_shift(t));
  // Precise statistics come from the run's own training split.
  data::Dataset train;
  for (const auto& s : sources)
    if (s.kind == StatsSource::Kind::precise && train.count() == 0) {
      if (run.data.empty())
        runtime_error("--bn-stats " + s.text + ": the checkpoint does not say which data it was trained on");
      train = std::move(load_data(run).train);
      check_data_fits(checkpoint.spec, train);
      if (checkpoint.standardizer.fitted()) standardize(checkpoint.standardizer, train);
    }
  auto model = io::build_model(checkpoint);
  json results = json::array();
  for (const auto& shift : shifts) {
    data::Dataset shifted = test;
    shift_samples(shifted, shift, seed, evaluated);
    if (checkpoint.standardizer.fitted()) standardize(checkpoint.standardizer, shifted);
    for (const auto& s : sources) {
      const auto start = std::chrono::steady_clock::now();
      const train::Evaluation e = evaluate_with(*model, shifted, s, &train, seed);
      results.push_back({{"shift", shift.to_string()},
                         {"bn_stats", s.text},
                         {"loss", e.loss},
                         {"accuracy", e.accuracy},
                         {"seconds", std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count()}});
    }
  }
  if (as_json) {
    const json out = {{"checkpoint", checkpoint_path.string()},
                      {"data", evaluated.data},
                      {"samples", test.count()},
                      {"seed", seed},
                      {"results", results}};
    std::cout << out.dump(2) << '\n';
    return 0;
  }
  fmt::print("checkpoint {}: {} epochs trained\n", checkpoint_path.string(), checkpoint.progress.epochs_done);
  fmt::print("data {}: {} test samples\n\n", evaluated.data, test.count());
  fmt::print("{:<18} {:<18} {:>9} {:>9}\n", "shift", "bn statistics", "loss", "accuracy");
  for (const auto& r : results)
    fmt::print("{:<18} {:<18} {:>9.4f} {:>9.4f}\n", r["shift"].get<std::string>(), r["bn_stats"].get<std::string>(),
               r["loss"].get<double>(), r["accuracy"].get<double>());
  return 0;
}

namespace {

// ---------------------------------------------------------------- recalibrate and adapt

// Progress on a terminal: "recalibrating  12000/30000 samples".
bn_stats::Progress progress_line(const std::string& label) {
  if (::isatty(STDERR_FILENO) != 1) return {};
  return [label](int64_t done, int64_t total) {
    fmt::print(stderr, "\r{}  {}/{} samples\033[K", label, done, total);
    if (done == total) fmt::print(stderr, "\r\033[K");
    std::fflush(stderr);
  };
}

json layers_json(const std::vector<bn_stats::LayerStatistics>& layers) {
  json out = json::array();
  for (const auto& l : layers) {
    double mean_change = 0, var_ratio = 0;
    for (size_t c = 0; c < l.mean.size(); ++c) {
      mean_change += std::abs(l.mean[c] - l.old_mean[c]) / std::sqrt(l.old_variance[c] + 1e-5);
      var_ratio += std::log((l.variance[c] + 1e-5) / (l.old_variance[c] + 1e-5));
    }
    const double channels = static_cast<double>(std::max<size_t>(l.mean.size(), 1));
    out.push_back({{"layer", l.layer},
                   {"type", l.type},
                   {"channels", l.mean.size()},
                   {"values_per_channel", l.count},
                   // How far the statistics moved, averaged over channels: the mean in
                   // old standard deviations, the variance as a geometric-mean ratio.
                   {"mean_change_in_sd", mean_change / channels},
                   {"variance_ratio", std::exp(var_ratio / channels)},
                   {"mean", l.mean},
                   {"variance", l.variance}});
  }
  return out;
}

void check_out(const StatsCommandFlags& f) {
  std::error_code ec;
  const auto status = fs::status(f.out, ec);
  if (fs::is_directory(status)) usage_error("--out '" + f.out.string() + "' is a directory, not a file");
  if (fs::exists(status) && fs::equivalent(f.out, f.checkpoint, ec))
    usage_error("--out is the checkpoint itself: write the result to another file (the original stays as it is)");
  if (fs::exists(status) && !f.overwrite)
    usage_error("'" + f.out.string() + "' already exists: pass --overwrite to replace it");
}

// recalibrate (adapt = false) and adapt share everything but where the samples come from.
int command_statistics(const StatsCommandFlags& f, bool adapt) {
  const char* command = adapt ? "adapt" : "recalibrate";
  check_out(f);
  apply_threads(f.threads);
  const io::Checkpoint checkpoint = io::load_checkpoint(f.checkpoint);
  const json app = application_json(checkpoint);
  RunOptions o;
  if (app.is_object() && app.contains("options")) o = run_options_from_json(app["options"]);
  else if (!adapt)
    runtime_error("checkpoint '" + f.checkpoint.string() +
                  "' does not say which data it was trained on (not written by `normkit train`): "
                  "use `normkit adapt --data`");
  const data::Shift shift = parse_shift(f.shift);
  data::Dataset samples;
  if (adapt) {
    o.data = f.data;
    o.test_data.clear();
    Data d = load_data(o, f.split == "train");
    samples = std::move(f.split == "train" ? d.train : d.test);
  } else {
    samples = std::move(load_data(o).train);
  }
  if (samples.count() == 0) usage_error("no samples to estimate the statistics on");
  check_data_fits(checkpoint.spec, samples);
  shift_samples(samples, shift, f.seed, o);
  if (checkpoint.standardizer.fitted()) standardize(checkpoint.standardizer, samples);
  if (f.samples > samples.count())
    usage_error(fmt::format("--samples {}: the {} holds only {} samples", f.samples,
                            adapt ? "data's " + f.split + " split" : std::string("training set"),
                            samples.count()));
  auto model = io::build_model(checkpoint);
  bn_stats::PreciseOptions p;
  p.samples = f.samples;
  p.seed = f.seed;
  if (f.batch_size > 0) {
    p.pass = bn_stats::Pass::train;
    p.batch_size = f.batch_size;
  }
  const auto layers = bn_stats::recalibrate(*model, samples, p, progress_line(command));

  // The original's everything, the new statistics, and a note of where they came from.
  io::TrainingProgress progress = checkpoint.progress;
  json record = {{"command", command},
                 {"from", f.checkpoint.string()},
                 {"samples", f.samples},
                 {"pass", f.batch_size > 0 ? "train" : "eval"},
                 {"seed", f.seed}};
  if (f.batch_size > 0) record["batch_size"] = f.batch_size;
  if (adapt) record.update({{"data", f.data}, {"split", f.split}, {"shift", shift.to_string()}});
  if (app.is_object()) {
    json updated = app;
    if (!updated.contains("bn_statistics")) updated["bn_statistics"] = json::array();
    updated["bn_statistics"].push_back(record);
    progress.application = updated.dump();
  }
  auto optimizer = io::build_optimizer(checkpoint, *model);
  io::save_checkpoint(f.out, io::make_checkpoint(*model, optimizer.get(), checkpoint.standardizer, progress));

  if (f.json) {
    json out = record;
    out["out"] = f.out.string();
    out["layers"] = layers_json(layers);
    std::cout << out.dump(2) << '\n';
    return 0;
  }
  fmt::print("normkit {}: {} -> {}\n", command, f.checkpoint.string(), f.out.string());
  fmt::print("statistics over {} samples{} ({} pass{})\n", f.samples,
             adapt ? fmt::format(" of {} ({} split{})", f.data, f.split,
                                 shift.kind == data::Shift::Kind::none ? "" : ", shift " + shift.to_string())
                   : " of the training set",
             f.batch_size > 0 ? "train" : "eval",
             f.batch_size > 0 ? fmt::format(", batches of {}", f.batch_size) : "");
  fmt::print("{:>6}  {:<16} {:>8} {:>14} {:>18} {:>14}\n", "layer", "type", "channels", "values/channel",
             "mean moved (sd)", "variance ratio");
  for (const auto& l : layers_json(layers))
    fmt::print("{:>6}  {:<16} {:>8} {:>14.0f} {:>18.4f} {:>14.4f}\n", l["layer"].get<size_t>(),
               l["type"].get<std::string>(), l["channels"].get<size_t>(), l["values_per_channel"].get<double>(),
               l["mean_change_in_sd"].get<double>(), l["variance_ratio"].get<double>());
  fmt::print("saved {}\n", f.out.string());
  return 0;
}

// ---------------------------------------------------------------- shift

void put_u32(std::string& s, uint32_t v) {
  for (int shift = 24; shift >= 0; shift -= 8) s.push_back(static_cast<char>((v >> shift) & 0xff));
}

// IDX files of unsigned bytes: images (magic 0x803, N × H × W) and labels (0x801, N).
void write_idx(const fs::path& dir, const std::string& prefix, const data::Dataset& set) {
  std::string images, labels;
  put_u32(images, 0x803);
  put_u32(images, static_cast<uint32_t>(set.count()));
  put_u32(images, static_cast<uint32_t>(set.sample_shape[1]));
  put_u32(images, static_cast<uint32_t>(set.sample_shape[2]));
  images.reserve(images.size() + set.features.size());
  for (const float v : set.features) images.push_back(static_cast<char>(static_cast<uint8_t>(std::lround(v * 255.0f))));
  put_u32(labels, 0x801);
  put_u32(labels, static_cast<uint32_t>(set.count()));
  for (const int32_t l : set.labels) labels.push_back(static_cast<char>(l));
  write_file_atomically(dir / (prefix + "-images-idx3-ubyte"), images);
  write_file_atomically(dir / (prefix + "-labels-idx1-ubyte"), labels);
}

int command_shift(const ShiftFlags& f) {
  const data::Shift shift = parse_shift(f.shift);
  std::error_code ec;
  if (!fs::is_directory(f.data, ec))
    usage_error("--data '" + f.data + "': expected a directory of IDX files (shifts apply to images)");
  if (fs::exists(f.out / "t10k-images-idx3-ubyte", ec) && !f.overwrite)
    usage_error("'" + f.out.string() + "' already holds a data set: pass --overwrite to replace it");
  // Both splits are read before anything is written: a bad input writes nothing.
  data::Dataset sets[2] = {data::load_mnist_directory(f.data, data::Split::train),
                           data::load_mnist_directory(f.data, data::Split::test)};
  for (auto& set : sets) {
    if (set.sample_shape[0] != 1) usage_error("normkit shift writes single-channel IDX images only");
    for (const int32_t l : set.labels)
      if (l > 255) usage_error("labels above 255 do not fit an IDX label file");
  }
  // The two splits draw from different streams of the same seed.
  data::apply_shift(sets[0], shift, f.seed ^ 0x7a41ull);
  data::apply_shift(sets[1], shift, f.seed);
  fs::create_directories(f.out, ec);
  if (ec) runtime_error("cannot create '" + f.out.string() + "': " + ec.message());
  write_idx(f.out, "train", sets[0]);
  write_idx(f.out, "t10k", sets[1]);
  fmt::print("normkit shift: {} with {} (seed {}) -> {} ({} training and {} test images)\n", f.data,
             shift.to_string(), f.seed, f.out.string(), sets[0].count(), sets[1].count());
  return 0;
}

}  // namespace

// ---------------------------------------------------------------- the commands

void add_bn_stats_commands(CLI::App& app, BnStatsFlags& flags) {
  auto common = [](CLI::App* c, StatsCommandFlags& f) {
    c->add_option("checkpoint", f.checkpoint, "a checkpoint file (OUT/checkpoint.nkc)")->required();
    c->add_option("--out", f.out, "the checkpoint to write (the original is not changed)")->required();
    c->add_option("--samples", f.samples, "how many samples to estimate the statistics on (drawn with --seed)")
        ->check(CLI::Range(int64_t{1}, int64_t{1} << 40))
        ->capture_default_str();
    c->add_option("--batch-size", f.batch_size,
                  "0: the eval pass (layer by layer, each batch-norm layer gets the statistics of the "
                  "inputs it sees at inference); B: the train pass (batches of B normalized with their "
                  "own statistics, as in training, pooled: fvcore's precise BN)")
        ->check(CLI::Range(int64_t{0}, int64_t{1} << 30))
        ->capture_default_str();
    c->add_option("--seed", f.seed, "which samples (and the --shift noise)")->capture_default_str();
    c->add_option("--threads", f.threads, "threads")->check(CLI::Range(1, 4096));
    c->add_flag("--overwrite", f.overwrite, "replace --out if it exists");
    c->add_flag("--json", f.json, "machine-readable output");
  };
  flags.recalibrate_command = app.add_subcommand(
      "recalibrate", "precise BN: replace every batch-norm layer's running mean and variance with exact "
                     "population statistics over N training samples; save them as a new checkpoint");
  common(flags.recalibrate_command, flags.recalibrate);
  flags.adapt_command = app.add_subcommand(
      "adapt", "adapt batch norm to other data (test-time adaptation): population statistics over N "
               "unlabeled samples of --data (optionally shifted); save them as a new checkpoint");
  common(flags.adapt_command, flags.adapt);
  flags.adapt.samples = 1000;
  flags.adapt_command->get_option("--samples")->default_str("1000");
  flags.adapt_command->add_option("--data", flags.adapt.data, "an IDX directory or a CSV table of the new data")
      ->required();
  flags.adapt_command
      ->add_option("--split", flags.adapt.split,
                   "which part of --data: test (what `eval --data` then scores, as Schneider et al. "
                   "2020) or train")
      ->check(CLI::IsMember({"test", "train"}))
      ->capture_default_str();
  flags.adapt_command
      ->add_option("--shift", flags.adapt.shift,
                   "shift the samples first: noise:S, contrast:C, brightness:B or saltpepper:P (see "
                   "`normkit shift`)")
      ->capture_default_str();
  flags.shift_command = app.add_subcommand(
      "shift", "write a shifted copy of an IDX image data set (both splits): Gaussian noise, contrast, "
               "brightness or salt-and-pepper at a severity, drawn from a seed");
  flags.shift_command->add_option("--data", flags.shift.data, "an IDX directory")->capture_default_str();
  flags.shift_command
      ->add_option("--shift", flags.shift.shift,
                   "noise:S (Gaussian, S the standard deviation on [0, 1] pixels), contrast:C (around each "
                   "image's mean), brightness:B (added), saltpepper:P (the fraction of pixels set to 0 or 1)")
      ->required();
  flags.shift_command->add_option("--seed", flags.shift.seed, "seeds the noise")->capture_default_str();
  flags.shift_command->add_option("--out", flags.shift.out, "the directory to write")->required();
  flags.shift_command->add_flag("--overwrite", flags.shift.overwrite, "replace a data set in --out");
}

int command_bn_stats(const BnStatsFlags& flags) {
  if (*flags.recalibrate_command) return command_statistics(flags.recalibrate, false);
  if (*flags.adapt_command) return command_statistics(flags.adapt, true);
  return command_shift(flags.shift);
}

}  // namespace normkit::cli
