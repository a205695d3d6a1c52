// CSV tables of numbers with one integer label column.
#include <charconv>
#include <cmath>
#include <fstream>
#include <string>
#include <string_view>

#include "normkit/engine/data.hpp"
#include "support.hpp"

namespace normkit::data {

using engine::fail_runtime;

namespace {

std::vector<std::string_view> split(std::string_view line, char delimiter) {
  std::vector<std::string_view> fields;
  size_t start = 0;
  while (true) {
    const size_t end = line.find(delimiter, start);
    fields.push_back(line.substr(start, end == std::string_view::npos ? end : end - start));
    if (end == std::string_view::npos) break;
    start = end + 1;
  }
  return fields;
}

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t' || s.back() == '\r')) s.remove_suffix(1);
  return s;
}

bool parse_number(std::string_view text, double& value) {
  text = trim(text);
  if (!text.empty() && text.front() == '+') text.remove_prefix(1);
  const auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), value);
  return error == std::errc() && end == text.data() + text.size() && !text.empty();
}

}  // namespace

Dataset load_csv(const std::filesystem::path& path, const CsvOptions& options) {
  if (options.num_classes < 0)
    engine::fail_invalid("num_classes must be >= 0 (0: infer), got ", options.num_classes);
  std::ifstream in(path);
  if (!in) fail_runtime(path.string(), ": cannot open");
  const std::string where = path.string();

  Dataset set;
  std::string line;
  int64_t line_number = 0, columns = 0, label_column = 0;
  int32_t max_label = -1;
  bool header = false;
  std::vector<double> values;
  while (std::getline(in, line)) {
    ++line_number;
    if (trim(line).empty()) continue;
    const auto fields = split(line, options.delimiter);
    values.assign(fields.size(), 0.0);
    bool numeric = true;
    for (size_t i = 0; i < fields.size() && numeric; ++i) numeric = parse_number(fields[i], values[i]);
    if (columns == 0) {
      columns = static_cast<int64_t>(fields.size());
      if (columns < 2) fail_runtime(where, ": need at least one feature and a label column");
      label_column = options.label_column < 0 ? columns - 1 : options.label_column;
      if (label_column >= columns)
        fail_runtime(where, ": label column ", label_column, " does not exist (", columns,
                     " columns)");
      // A header line; its column count does not bind the data (scikit-learn's
      // bundled tables start "n_samples,n_features,class names...").
      if (!numeric && !header) {
        header = true;
        columns = 0;
        continue;
      }
    }
    if (static_cast<int64_t>(fields.size()) != columns)
      fail_runtime(where, ":", line_number, ": expected ", columns, " columns, got ", fields.size());
    if (!numeric) fail_runtime(where, ":", line_number, ": a field is not a number");
    for (int64_t c = 0; c < columns; ++c) {
      const double v = values[c];
      if (c == label_column) {
        if (v != std::floor(v) || v < 0 || v > 1e6)
          fail_runtime(where, ":", line_number, ": label ", v, " is not a class index");
        const auto label = static_cast<int32_t>(v);
        if (options.num_classes > 0 && label >= options.num_classes)
          fail_runtime(where, ":", line_number, ": label ", label, " is out of range [0, ",
                       options.num_classes, ")");
        max_label = std::max(max_label, label);
        set.labels.push_back(label);
      } else {
        if (!std::isfinite(v))
          fail_runtime(where, ":", line_number, ": column ", c + 1, " is not a finite number");
        set.features.push_back(static_cast<float>(v));
      }
    }
  }
  if (set.labels.empty()) fail_runtime(where, ": no data rows");
  set.sample_shape = {columns - 1};
  set.num_classes = options.num_classes > 0 ? options.num_classes : max_label + 1;
  return set;
}

}  // namespace normkit::data
