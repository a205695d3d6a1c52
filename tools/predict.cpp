// `normkit predict CHECKPOINT INPUT...`: the classes a trained model gives new
// inputs, with their probabilities. An input is an image file (PNG, read with
// libpng; its size must be the model's), an IDX directory (its test images),
// an IDX image file, or a CSV table of rows (with or without the label column:
// with it, the true class is shown too). Inputs are standardized with the
// run's statistics, as in training.
#include <png.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <iostream>

#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include "cli.hpp"

namespace normkit::cli {

namespace {

struct Input {
  std::string source;     // what a line of output names: "shirt.png", "rows.csv:3"
  std::vector<float> x;   // the sample, logical (C, H, W) order
  int32_t label = -1;     // the true class when the input holds it
};

// A PNG as a [C, H, W] sample scaled to [0, 1] like the IDX loader's pixels:
// grayscale for one channel, RGB for three.
Input read_png(const fs::path& path, const std::vector<int64_t>& shape) {
  if (shape.size() != 3 || (shape[0] != 1 && shape[0] != 3))
    usage_error("'" + path.string() + "': the model takes samples of shape " + fmt::format("{}", fmt::join(shape, "x")) +
                ", not images (give CSV rows)");
  png_image image{};
  image.version = PNG_IMAGE_VERSION;
  if (!png_image_begin_read_from_file(&image, path.c_str()))
    runtime_error("'" + path.string() + "': not a readable PNG image (" + image.message + ")");
  const int64_t channels = shape[0];
  image.format = channels == 1 ? PNG_FORMAT_GRAY : PNG_FORMAT_RGB;
  if (image.height != shape[1] || image.width != shape[2]) {
    png_image_free(&image);
    usage_error(fmt::format("'{}': the image is {}x{} (width x height), the model takes {}x{}",
                            path.string(), image.width, image.height, shape[2], shape[1]));
  }
  std::vector<uint8_t> pixels(PNG_IMAGE_SIZE(image));
  if (!png_image_finish_read(&image, nullptr, pixels.data(), 0, nullptr))
    runtime_error("'" + path.string() + "': " + image.message);
  Input in{path.string(), std::vector<float>(pixels.size()), -1};
  const int64_t plane = shape[1] * shape[2];
  for (int64_t p = 0; p < plane; ++p)  // interleaved RGB -> planes
    for (int64_t c = 0; c < channels; ++c)
      in.x[static_cast<size_t>(c * plane + p)] = static_cast<float>(pixels[static_cast<size_t>(p * channels + c)]) / 255.0f;
  return in;
}

void add_rows(const data::Dataset& set, const std::string& name, int64_t limit, std::vector<Input>& out) {
  const int64_t n = limit > 0 ? std::min(limit, set.count()) : set.count();
  const int64_t size = set.sample_size();
  for (int64_t i = 0; i < n; ++i)
    out.push_back({fmt::format("{}[{}]", name, i),
                   std::vector<float>(set.features.begin() + i * size, set.features.begin() + (i + 1) * size),
                   set.labels[static_cast<size_t>(i)]});
}

bool ends_with(const std::string& text, const std::string& suffix) {
  return text.size() >= suffix.size() && text.compare(text.size() - suffix.size(), suffix.size(), suffix) == 0;
}

std::vector<Input> read_inputs(const std::vector<std::string>& paths, const RunOptions& run,
                               const std::vector<int64_t>& shape, int64_t features, int64_t limit) {
  std::vector<Input> inputs;
  for (const std::string& name : paths) {
    const fs::path path = name;
    std::error_code ec;
    if (fs::is_directory(path, ec)) {
      data::Dataset set = data::load_mnist_directory(path, data::Split::test);
      add_rows(set, name, limit, inputs);
    } else if (!fs::is_regular_file(path, ec)) {
      runtime_error("'" + name + "': no such file or directory");
    } else if (ends_with(name, ".png") || ends_with(name, ".PNG")) {
      inputs.push_back(read_png(path, shape));
    } else if (name.find("idx3-ubyte") != std::string::npos) {
      // An IDX image file alone: its labels are the matching labels file when there is one.
      std::string labels = name;
      labels.replace(labels.find("idx3-ubyte"), 10, "idx1-ubyte");
      labels.replace(labels.find("images"), 6, "labels");
      if (!fs::is_regular_file(labels, ec)) usage_error("'" + name + "': no matching labels file '" + labels + "'");
      add_rows(data::load_idx(path, labels), name, limit, inputs);
    } else {
      // A CSV table: rows of the features, or of the features and the label.
      data::CsvOptions csv = csv_options(run);
      csv.label_column = "none";
      data::Dataset set = data::load_csv(path, csv);
      if (set.sample_size() == features + 1) {
        csv = csv_options(run);
        set = data::load_csv(path, csv);
      }
      add_rows(set, name, limit, inputs);
    }
  }
  return inputs;
}

}  // namespace

CLI::App* add_predict_command(CLI::App& app, PredictFlags& f) {
  auto* predict = app.add_subcommand(
      "predict", "the classes (and probabilities) a checkpoint's model gives images (PNG), IDX "
                 "files or CSV rows");
  predict->add_option("checkpoint", f.checkpoint, "a checkpoint file (OUT/checkpoint.nkc)")->required();
  predict->add_option("inputs", f.inputs,
                      "PNG images (the model's size; grayscale or RGB as its channels), IDX "
                      "directories or image files, CSV tables (rows of features, with or without "
                      "the label column)")
      ->required();
  predict->add_option("--top", f.top, "classes shown per input, most probable first")
      ->check(CLI::Range(1, 1000))
      ->capture_default_str();
  predict->add_option("--limit", f.limit, "at most N rows of each IDX or CSV input (0: all)")
      ->check(CLI::NonNegativeNumber);
  predict->add_option("--threads", f.threads, "threads")->check(CLI::Range(1, 4096));
  predict->add_flag("--json", f.json, "machine-readable output: every class's probability per input");
  return predict;
}

int command_predict(const PredictFlags& f) {
  apply_threads(f.threads);
  const io::Checkpoint checkpoint = io::load_checkpoint(f.checkpoint);
  const json app = application_json(checkpoint);
  RunOptions run = run_options_of(app);
  const std::vector<std::string> names = class_names_of(app);
  auto model = io::build_model(checkpoint);
  const std::vector<int64_t>& shape = checkpoint.spec.input_shape;
  int64_t features = 1;
  for (const int64_t d : shape) features *= d;

  std::vector<Input> inputs = read_inputs(f.inputs, run, shape, features, f.limit);
  data::Dataset set;
  set.sample_shape = shape;
  for (const Input& in : inputs) {
    if (static_cast<int64_t>(in.x.size()) != features)
      usage_error(fmt::format("'{}': {} values, the model takes samples of {} ({})", in.source, in.x.size(),
                              features, fmt::join(shape, "x")));
    set.features.insert(set.features.end(), in.x.begin(), in.x.end());
    set.labels.push_back(std::max(in.label, 0));
  }
  if (checkpoint.standardizer.fitted()) standardize(checkpoint.standardizer, set);

  // Eval-mode logits in batches, then a softmax in double per sample.
  const int64_t n = set.count();
  std::vector<int64_t> order(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) order[static_cast<size_t>(i)] = i;
  nn::Tensor batch;
  std::vector<int32_t> labels;
  std::vector<std::vector<double>> probabilities;
  for (int64_t first = 0; first < n; first += train::kEvaluationBatch) {
    const int64_t size = std::min(train::kEvaluationBatch, n - first);
    train::make_batch(set, order, first, size, model->format(), batch, labels);
    const nn::Tensor& logits = model->forward(batch, nn::Mode::eval);
    const int64_t k = logits.shape[1];
    for (int64_t i = 0; i < size; ++i) {
      const float* row = logits.data.data() + i * k;
      const double top = *std::max_element(row, row + k);
      std::vector<double> p(static_cast<size_t>(k));
      double sum = 0;
      for (int64_t c = 0; c < k; ++c) sum += p[static_cast<size_t>(c)] = std::exp(static_cast<double>(row[c]) - top);
      for (double& v : p) v /= sum;
      probabilities.push_back(std::move(p));
    }
  }
  auto name_of = [&](size_t c) { return c < names.size() ? names[c] : std::to_string(c); };

  if (f.json) {
    json out = {{"checkpoint", f.checkpoint.string()}, {"classes", names.empty() ? json(nullptr) : json(names)}};
    json predictions = json::array();
    for (size_t i = 0; i < inputs.size(); ++i) {
      const auto& p = probabilities[i];
      const auto best = static_cast<size_t>(std::max_element(p.begin(), p.end()) - p.begin());
      json entry = {{"input", inputs[i].source}, {"class", best}, {"name", name_of(best)},
                    {"probability", p[best]}, {"probabilities", p}};
      if (inputs[i].label >= 0) entry["label"] = inputs[i].label;
      predictions.push_back(std::move(entry));
    }
    out["predictions"] = std::move(predictions);
    std::cout << out.dump(2) << '\n';
    return 0;
  }
  int64_t known = 0, correct = 0;
  for (size_t i = 0; i < inputs.size(); ++i) {
    const auto& p = probabilities[i];
    std::vector<size_t> ranked(p.size());
    for (size_t c = 0; c < p.size(); ++c) ranked[c] = c;
    std::stable_sort(ranked.begin(), ranked.end(), [&](size_t a, size_t b) { return p[a] > p[b]; });
    std::string line = inputs[i].source + ":";
    for (size_t r = 0; r < std::min<size_t>(static_cast<size_t>(f.top), ranked.size()); ++r)
      line += fmt::format("{}{} ({:.4f})", r == 0 ? " " : ", ", name_of(ranked[r]), p[ranked[r]]);
    if (inputs[i].label >= 0) {
      ++known;
      correct += ranked[0] == static_cast<size_t>(inputs[i].label);
      line += fmt::format("  [true: {}]", name_of(static_cast<size_t>(inputs[i].label)));
    }
    fmt::print("{}\n", line);
  }
  if (known > 1)
    fmt::print("{} of {} labelled inputs predicted correctly ({:.4f})\n", correct, known,
               static_cast<double>(correct) / static_cast<double>(known));
  return 0;
}

}  // namespace normkit::cli
